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

pub(crate) use crate::proc::Vma;

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

impl From<crate::proc::ProcError> for InjectError {
    fn from(e: crate::proc::ProcError) -> InjectError {
        match e {
            crate::proc::ProcError::NoProcess { pid } => InjectError::NoSuchProcess { pid },
            e => InjectError::ProcFile(e),
        }
    }
}

/// A thread that still has the address space: `None` for the leader,
/// `Some(tid)` of a live thread when the leader has exited (a zombie
/// leader's maps are empty and its mem unreadable).
fn mm_thread(pid: i32) -> Option<i32> {
    match choose_thread(pid) {
        Ok(t) if t != pid => Some(t),
        _ => None,
    }
}

fn mm_dir(pid: i32) -> String {
    crate::proc::dir(pid, mm_thread(pid))
}

pub(crate) fn read_maps(pid: i32) -> Result<Vec<Vma>, InjectError> {
    Ok(crate::proc::maps(pid, mm_thread(pid))?)
}

/// /proc/PID/task/TID/status (or /proc/PID/status with tid = None).
pub(crate) fn status(pid: i32, tid: Option<i32>) -> Result<crate::proc::Status, InjectError> {
    Ok(crate::proc::status(pid, tid)?)
}

/// The leader if alive, else the first live thread.
pub(crate) fn choose_thread(pid: i32) -> Result<i32, InjectError> {
    if pid <= 0 {
        return Err(InjectError::NoSuchProcess { pid });
    }
    let tgid = status(pid, None)?.tgid;
    if tgid != pid {
        return Err(InjectError::NotAProcess { pid, tgid });
    }
    if crate::proc::thread_alive(pid, pid) {
        return Ok(pid);
    }
    crate::proc::tids(pid)?
        .into_iter()
        .find(|&t| t != pid && crate::proc::thread_alive(pid, t))
        .ok_or(InjectError::NoLiveThread { pid })
}

/// `tid` is a live thread of process `pid`.
pub(crate) fn check_thread(pid: i32, tid: i32) -> Result<(), InjectError> {
    let tgid = status(pid, None)?.tgid;
    if tgid != pid {
        return Err(InjectError::NotAProcess { pid, tgid });
    }
    if !crate::proc::thread_alive(pid, tid) {
        return Err(InjectError::Exited {
            pid,
            tid,
            status: "no such live thread in /proc/PID/task".into(),
        });
    }
    Ok(())
}

/// `tid` is a thread of process `pid`, which tern made itself (a restore):
/// only that it is there (a parse of /proc/PID/status costs 40-200 µs, a
/// fifth of a lazy restore's seize). The seize says the rest.
pub(crate) fn check_owned_thread(pid: i32, tid: i32) -> Result<(), InjectError> {
    if pid <= 0 || tid <= 0 {
        return Err(InjectError::NoSuchProcess { pid });
    }
    if std::fs::symlink_metadata(format!("/proc/{pid}/task/{tid}")).is_err() {
        return Err(InjectError::Exited {
            pid,
            tid,
            status: "no such thread in /proc/PID/task".into(),
        });
    }
    Ok(())
}

/// Threads of `pid` (other than `exclude`) that the kernel reports blocked
/// in a syscall with their user RIP in `[start, end)`, from
/// /proc/PID/task/TID/syscall ("nr args... sp pc", "-1 sp pc" or "running").
pub(crate) fn threads_with_pc_in(pid: i32, exclude: i32, start: u64, end: u64) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    let Ok(tids) = crate::proc::tids(pid) else {
        return out;
    };
    for tid in tids {
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
        if !v.perms.exec || !v.perms.read {
            continue;
        }
        let named = v.name_or_empty() == layout::MAPS_NAME;
        // The second part of an area is rw-, so an executable VMA that
        // directly follows a named one of ours is no separate area.
        if named
            && i > 0
            && maps[i - 1].end == v.start
            && maps[i - 1].name_or_empty() == layout::MAPS_NAME
        {
            continue;
        }
        let anon = v.name.is_none() && v.inode == 0;
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
        if v.start != end || (v.name_or_empty() != layout::MAPS_NAME && end != base) {
            break;
        }
        end = v.end;
    }
    end.saturating_sub(base).max(layout::PAGE)
}
