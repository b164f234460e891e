//! The /proc reading the injector needs: threads, maps, scratch areas.
#![cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;

use super::InjectError;
use super::layout;

/// One line of /proc/PID/maps.
#[derive(Debug, Clone)]
pub(crate) struct Vma {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub inode: u64,
    pub name: String,
}

impl Vma {
    pub fn executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
    pub fn readable(&self) -> bool {
        self.perms.as_bytes().first() == Some(&b'r')
    }
}

fn proc_err(pid: i32, path: &str, source: std::io::Error) -> InjectError {
    if source.kind() == ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
        InjectError::NoSuchProcess { pid }
    } else {
        InjectError::Proc {
            pid,
            path: path.to_string(),
            source,
        }
    }
}

/// The /proc directory of a thread that still has the address space:
/// /proc/PID, or /proc/PID/task/TID when the leader has exited (a zombie
/// leader's maps are empty and its mem unreadable).
fn mm_dir(pid: i32) -> String {
    match choose_thread(pid) {
        Ok(t) if t != pid => format!("/proc/{pid}/task/{t}"),
        _ => format!("/proc/{pid}"),
    }
}

pub(crate) fn read_maps(pid: i32) -> Result<Vec<Vma>, InjectError> {
    let path = format!("{}/maps", mm_dir(pid));
    let text = std::fs::read_to_string(&path).map_err(|e| proc_err(pid, &path, e))?;
    Ok(parse_maps(&text))
}

pub(crate) fn parse_maps(text: &str) -> Vec<Vma> {
    let mut out = Vec::new();
    for line in text.lines() {
        // start-end perms offset dev inode [name]
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let name = it.next().unwrap_or("").trim_start().to_string();
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        out.push(Vma {
            start,
            end,
            perms: perms.to_string(),
            inode: inode.parse().unwrap_or(0),
            name,
        });
    }
    out
}

/// A field of /proc/PID/task/TID/status (or /proc/PID/status with tid = None).
pub(crate) fn status_field(pid: i32, tid: Option<i32>, field: &str) -> Result<String, InjectError> {
    let path = match tid {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| proc_err(pid, &path, e))?;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            return Ok(v.trim().to_string());
        }
    }
    Ok(String::new())
}

fn thread_alive(pid: i32, tid: i32) -> bool {
    match status_field(pid, Some(tid), "State") {
        Ok(s) => !(s.starts_with('Z') || s.starts_with('X')),
        Err(_) => false,
    }
}

/// The leader if alive, else the first live thread.
pub(crate) fn choose_thread(pid: i32) -> Result<i32, InjectError> {
    if pid <= 0 {
        return Err(InjectError::NoSuchProcess { pid });
    }
    let tgid = status_field(pid, None, "Tgid")?;
    if let Ok(tgid) = tgid.parse::<i32>()
        && tgid != pid
    {
        return Err(InjectError::NotAProcess { pid, tgid });
    }
    if thread_alive(pid, pid) {
        return Ok(pid);
    }
    let path = format!("/proc/{pid}/task");
    let mut tids: Vec<i32> = std::fs::read_dir(&path)
        .map_err(|e| proc_err(pid, &path, e))?
        .filter_map(|d| d.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    tids.into_iter()
        .find(|&t| t != pid && thread_alive(pid, t))
        .ok_or(InjectError::NoLiveThread { pid })
}

/// `tid` is a live thread of process `pid`.
pub(crate) fn check_thread(pid: i32, tid: i32) -> Result<(), InjectError> {
    let tgid = status_field(pid, None, "Tgid")?;
    if let Ok(tgid) = tgid.parse::<i32>()
        && tgid != pid
    {
        return Err(InjectError::NotAProcess { pid, tgid });
    }
    if !thread_alive(pid, tid) {
        return Err(InjectError::Exited {
            pid,
            tid,
            status: "no such live thread in /proc/PID/task".into(),
        });
    }
    Ok(())
}

/// Threads of `pid` (other than `exclude`) that the kernel reports blocked
/// in a syscall with their user RIP in `[start, end)`, from
/// /proc/PID/task/TID/syscall ("nr args... sp pc", "-1 sp pc" or "running").
pub(crate) fn threads_with_pc_in(pid: i32, exclude: i32, start: u64, end: u64) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for d in dir.flatten() {
        let Some(tid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tid == exclude {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")) else {
            continue;
        };
        let Some(pc) = text.split_whitespace().last() else {
            continue;
        };
        let Some(pc) = pc
            .strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        if (start..end).contains(&pc) {
            out.push((tid, pc));
        }
    }
    out
}

/// Read target memory through /proc/PID/mem (no attach needed as root).
pub(crate) fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), InjectError> {
    let path = format!("{}/mem", mm_dir(pid));
    let f = File::open(&path).map_err(|e| proc_err(pid, &path, e))?;
    f.read_exact_at(buf, addr)
        .map_err(|source| InjectError::Mem {
            pid,
            tid: pid,
            op: "reading",
            addr,
            hint: "",
            source,
        })
}

/// Does the header at the start of a mapping look like ours?
pub(crate) fn header_is_ours(header: &[u8]) -> bool {
    header.len() >= 20
        && header[..16] == layout::MAGIC
        && u32::from_le_bytes(header[16..20].try_into().unwrap()) >= 1
}

/// Start addresses of our scratch areas in `pid`.
pub(crate) fn find_scratch(pid: i32) -> Result<Vec<u64>, InjectError> {
    let maps = read_maps(pid)?;
    Ok(scratch_in_maps(pid, &maps))
}

pub(crate) fn scratch_in_maps(pid: i32, maps: &[Vma]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut mem: Option<File> = None;
    for (i, v) in maps.iter().enumerate() {
        if !v.executable() || !v.readable() {
            continue;
        }
        let named = v.name == layout::MAPS_NAME;
        // The second part of an area is rw-, so an executable VMA that
        // directly follows a named one of ours is no separate area.
        if named && i > 0 && maps[i - 1].end == v.start && maps[i - 1].name == layout::MAPS_NAME {
            continue;
        }
        let anon = v.name.is_empty() && v.inode == 0;
        if !named && !anon {
            continue;
        }
        let mut header = [0u8; 20];
        let ok = {
            if mem.is_none() {
                mem = File::open(format!("{}/mem", mm_dir(pid))).ok();
            }
            match &mem {
                Some(f) => f.read_exact_at(&mut header, v.start).is_ok() && header_is_ours(&header),
                None => false,
            }
        };
        if ok || named {
            out.push(v.start);
        }
    }
    out.sort_unstable();
    out
}

/// Length of the area starting at `base`: from its header when readable,
/// else the run of contiguous VMAs named like ours.
pub(crate) fn scratch_extent(pid: i32, maps: &[Vma], base: u64) -> u64 {
    let mut header = [0u8; layout::HEADER_LEN];
    if read_mem(pid, base, &mut header).is_ok() && header_is_ours(&header) {
        let len = u64::from_le_bytes(header[24..32].try_into().unwrap());
        if len > 0 && len % layout::PAGE == 0 && len <= 1 << 30 {
            return len;
        }
    }
    let mut end = base;
    for v in maps.iter().filter(|v| v.start >= base) {
        if v.start != end || (v.name != layout::MAPS_NAME && end != base) {
            break;
        }
        end = v.end;
    }
    end.saturating_sub(base).max(layout::PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_maps_lines() {
        let text = "7f0000000000-7f0000001000 r-xp 00000000 00:00 0                          [anon:tern-scratch]\n\
                    7f0000001000-7f0000012000 rw-p 00000000 00:00 0                          [anon:tern-scratch]\n\
                    7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]\n\
                    55550000-55551000 r--p 00000000 08:01 1234                       /usr/bin/a b\n";
        let v = parse_maps(text);
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].start, 0x7f0000000000);
        assert_eq!(v[0].name, "[anon:tern-scratch]");
        assert!(v[0].executable());
        assert!(!v[1].executable());
        assert_eq!(v[2].name, "[vdso]");
        assert_eq!(v[3].name, "/usr/bin/a b");
        assert_eq!(v[3].inode, 1234);
    }
}
