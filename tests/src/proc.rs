//! What /proc says about a target: maps, fds, thread states, tracer, VMA flags.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    pub name: String,
}

impl MapEntry {
    pub fn is_private(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b'p')
    }
    /// Anonymous shared memory (MAP_SHARED|MAP_ANONYMOUS, SysV shm).
    pub fn is_anon_shared(&self) -> bool {
        !self.is_private()
            && (self.name.starts_with("/dev/zero")
                || self.name.starts_with("/SYSV")
                || self.name.starts_with("[anon_shmem")
                || (self.inode == 0 && !self.name.starts_with('/')))
    }
    /// Private anonymous memory: non-present pages read as zeros.
    pub fn is_private_anon(&self) -> bool {
        self.is_private() && self.inode == 0 && !self.name.starts_with('/')
    }
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / 4096
    }
}

impl fmt::Display for MapEntry {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{:x}-{:x} {} {:08x} {} {} {}",
            self.start, self.end, self.perms, self.offset, self.dev, self.inode, self.name
        )
    }
}

/// Names that are the kernel's or tern's, not the program's memory.
pub const IGNORED_NAMES: [&str; 5] = [
    "[vvar]",
    "[vvar_vclock]",
    "[vdso]",
    "[vsyscall]",
    "[anon:tern-scratch]",
];
pub const SCRATCH_NAME: &str = "[anon:tern-scratch]";
/// First bytes of tern's scratch area (sys/src/inject.rs, `layout`).
/// Kernels without CONFIG_ANON_VMA_NAME (this machine's) cannot name the
/// area: it is then an unnamed r-x page followed by rw- pages, recognised
/// by this header.
pub const SCRATCH_MAGIC: &[u8; 16] = b"\x7ftern-scratch\0\0\0";
/// Size of one scratch area (it differs between architectures: the arm64
/// stubs' frames are signal frames).
pub const SCRATCH_LEN: u64 = sys::inject::SCRATCH_LEN;

/// tern's scratch areas in `pid`, as address ranges: named
/// `[anon:tern-scratch]` mappings, or unnamed anonymous executable pages
/// that start with [`SCRATCH_MAGIC`] (with the rw- pages that follow them,
/// up to [`SCRATCH_LEN`]).
pub fn scratch_areas(pid: i32, maps: &[MapEntry]) -> Vec<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut i = 0;
    while i < maps.len() {
        let m = &maps[i];
        let named = m.name == SCRATCH_NAME;
        let magic = !named
            && m.inode == 0
            && m.name.is_empty()
            && m.perms.starts_with("r-x")
            && mem.as_ref().is_some_and(|f| {
                let mut b = [0u8; 16];
                f.read_exact_at(&mut b, m.start).is_ok() && &b == SCRATCH_MAGIC
            });
        if !(named || magic) {
            i += 1;
            continue;
        }
        let (start, mut end) = (m.start, m.end);
        let mut j = i + 1;
        while j < maps.len()
            && maps[j].start == end
            && maps[j].inode == 0
            && (if named {
                maps[j].name == SCRATCH_NAME
            } else {
                maps[j].name.is_empty()
            })
            && maps[j].end <= start + SCRATCH_LEN
        {
            end = maps[j].end;
            j += 1;
        }
        out.push((start, end));
        i = j;
    }
    out
}

pub fn in_areas(areas: &[(u64, u64)], start: u64, end: u64) -> bool {
    areas.iter().any(|&(s, e)| s <= start && end <= e)
}
pub const UFFD_LINK: &str = "anon_inode:[userfaultfd]";

pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(6, ' ');
            let range = it.next()?;
            let perms = it.next()?.to_string();
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let dev = it.next()?.to_string();
            let inode = it.next()?.parse().ok()?;
            let name = it.next().unwrap_or("").trim_start().to_string();
            let (s, e) = range.split_once('-')?;
            Some(MapEntry {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms,
                offset,
                dev,
                inode,
                name,
            })
        })
        .collect()
}

pub fn maps(pid: i32) -> Result<Vec<MapEntry>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
    Ok(parse_maps(&text))
}

/// fd number -> link target.
pub fn fds(pid: i32) -> Result<BTreeMap<i32, String>, String> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let e = e.map_err(|e| format!("{dir}: {e}"))?;
        let Ok(n) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // An fd can close while we look.
        if let Ok(t) = std::fs::read_link(e.path()) {
            out.insert(n, t.to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

pub fn tids(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// State letter of a task (field 3 of stat), None if gone.
pub fn task_state(pid: i32, tid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

pub fn state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// Exists and is neither a zombie nor dead.
pub fn alive(pid: i32) -> bool {
    matches!(state(pid), Some(c) if c != 'Z' && c != 'X')
}

/// The task's name (`/proc/PID/comm`; empty if gone).
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

/// On its way out: killed (SIGKILL pending for the process) or exiting
/// (`PF_EXITING` in its flags). It runs no more of its own code.
pub fn exiting(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let flags = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.get(s.rfind(')')? + 1..)?.to_string();
            after.split_whitespace().nth(6)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    let kill_pending = status_field(&format!("/proc/{pid}/status"), "ShdPnd")
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (libc::SIGKILL - 1)) != 0);
    flags & PF_EXITING != 0 || kill_pending
}

/// `NSpid` of `pid`: its PID in each PID namespace it is in, outermost
/// first (empty if gone).
pub fn nspid(pid: i32) -> Vec<i32> {
    status_field(&format!("/proc/{pid}/status"), "NSpid")
        .map(|l| {
            l.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes whose PID in a namespace of their own is `pid` (and
/// which are not `pid` here): a restore of `pid` in another PID namespace.
pub fn in_other_namespace(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let ns = nspid(p);
        if ns.len() > 1 && ns.last() == Some(&pid) && p != pid && alive(p) {
            found.push(p);
        }
    }
    found
}

fn status_field(path: &str, field: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix(field)
            .map(|v| v.trim_start_matches(':').trim().to_string())
    })
}

/// (tid, TracerPid) for every thread whose TracerPid is not 0.
pub fn traced_threads(pid: i32) -> Vec<(i32, i32)> {
    tids(pid)
        .into_iter()
        .filter_map(|t| {
            let v: i32 = status_field(&format!("/proc/{pid}/task/{t}/status"), "TracerPid")?
                .parse()
                .ok()?;
            (v != 0).then_some((t, v))
        })
        .collect()
}

/// Threads in a stopped state ('T' or 't').
pub fn stopped_threads(pid: i32) -> Vec<(i32, char)> {
    tids(pid)
        .into_iter()
        .filter_map(|t| {
            task_state(pid, t)
                .filter(|c| *c == 'T' || *c == 't')
                .map(|c| (t, c))
        })
        .collect()
}

/// VmFlags of every VMA that has any of the userfaultfd flags (`um`, `uw`, `ui`).
pub fn uffd_registered_vmas(pid: i32) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("/proc/{pid}/smaps: {e}"))?;
    let mut out = Vec::new();
    let mut head = String::new();
    for l in text.lines() {
        if let Some(flags) = l.strip_prefix("VmFlags:") {
            if flags
                .split_whitespace()
                .any(|f| f == "um" || f == "uw" || f == "ui")
            {
                out.push(format!("{head} [{}]", flags.trim()));
            }
        } else if l
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
        {
            head = l.to_string();
        }
    }
    Ok(out)
}

pub fn bpf_pin_dir(pid: i32) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/tern/{pid}"))
}

/// Wait until `cond` holds, polling, at most `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The parts of a target that tern must leave as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub maps: Vec<MapEntry>,
    pub fds: BTreeMap<i32, String>,
    /// tern scratch areas found in `maps` (see [`scratch_areas`]).
    pub scratch: Vec<(u64, u64)>,
}

impl Snapshot {
    pub fn take(pid: i32) -> Result<Snapshot, String> {
        let maps = maps(pid)?;
        let scratch = scratch_areas(pid, &maps);
        Ok(Snapshot {
            maps,
            fds: fds(pid)?,
            scratch,
        })
    }

    /// Differences from `before`, as readable lines. With `allow_tern_state`,
    /// one `[anon:tern-scratch]` mapping and one userfaultfd fd are allowed
    /// extra.
    pub fn diff(before: &Snapshot, after: &Snapshot, allow_tern_state: bool) -> Vec<String> {
        let mut out = Vec::new();
        let mut after_maps: Vec<&MapEntry> = after.maps.iter().collect();
        if allow_tern_state {
            let new_areas: Vec<(u64, u64)> = after
                .scratch
                .iter()
                .copied()
                .filter(|a| !before.scratch.contains(a))
                .collect();
            if new_areas.len() > 1 {
                out.push(format!(
                    "{} tern scratch areas (at most one allowed): {:x?}",
                    new_areas.len(),
                    new_areas
                ));
            }
            if let Some(&a) = new_areas.first() {
                after_maps.retain(|m| before.maps.contains(m) || !in_areas(&[a], m.start, m.end));
            }
        }
        for m in &before.maps {
            if !after_maps.contains(&m) {
                out.push(format!("maps: lost   {m}"));
            }
        }
        for m in &after_maps {
            if !before.maps.contains(m) {
                out.push(format!("maps: gained {m}"));
            }
        }
        let mut extra_uffd = 0;
        for (fd, t) in &before.fds {
            match after.fds.get(fd) {
                None => out.push(format!("fd {fd} ({t}) closed")),
                Some(t2) if t2 != t => out.push(format!("fd {fd} was {t}, now {t2}")),
                _ => {}
            }
        }
        for (fd, t) in &after.fds {
            if !before.fds.contains_key(fd) {
                if allow_tern_state && t == UFFD_LINK && extra_uffd == 0 {
                    extra_uffd += 1;
                } else {
                    out.push(format!("fd {fd} ({t}) opened"));
                }
            }
        }
        out
    }
}

/// A pid that no process has: scans down from pid_max.
pub fn unused_pid() -> i32 {
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (1000..max)
        .rev()
        // SAFETY: kill(2) takes integers only.
        .find(|&p| unsafe { libc::kill(p, 0) } != 0 && !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("no free pid")
}

/// What a process looks like from outside, line by line, as a restore must
/// bring it back: every VMA of /proc/PID/smaps (range, permissions, offset,
/// device, inode, name; Size, KernelPageSize, MMUPageSize, THPeligible,
/// ProtectionKey; VmFlags without soft-dirty and userfaultfd registration,
/// which are tern's tracking) and every fd (what it refers to, fdinfo
/// flags, offset). Residency (Rss, Pss, ...) is left out, and so are the
/// numbers a restore cannot keep: the inode of shared anonymous memory, of
/// files deleted while mapped, of pipes and of sockets (new objects, same
/// content).
pub fn shape(pid: i32) -> Result<Vec<String>, String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("/proc/{pid}/smaps: {e}"))?;
    let mut out = Vec::new();
    let mut cur = String::new();
    for l in smaps.lines() {
        let mut w = l.split_whitespace();
        let Some(first) = w.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(5..).map(|n| n.join(" ")).unwrap_or_default();
            let shmem = f.get(3) == Some(&"00:01") || name.starts_with("/SYSV");
            cur = format!(
                "{} {} {} {} {} {}",
                f[0],
                f.get(1).unwrap_or(&""),
                f.get(2).unwrap_or(&""),
                f.get(3).unwrap_or(&""),
                if shmem {
                    "(shmem)"
                } else if name.ends_with(" (deleted)") {
                    "(a new file, deleted)"
                } else {
                    f.get(4).unwrap_or(&"")
                },
                name
            );
        } else if let Some(rest) = l.strip_prefix("VmFlags:") {
            let flags: Vec<&str> = rest
                .split_whitespace()
                .filter(|f| !matches!(*f, "sd" | "um" | "uw" | "ui"))
                .collect();
            cur.push_str(&format!(" | VmFlags {}", flags.join(" ")));
        } else if matches!(
            first,
            "Size:" | "KernelPageSize:" | "MMUPageSize:" | "THPeligible:" | "ProtectionKey:"
        ) {
            cur.push_str(&format!(" | {first} {}", w.collect::<Vec<_>>().join(" ")));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    for fd in fds {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_else(|e| format!("? {e}"));
        let link = if link.starts_with("pipe:[") {
            "pipe".to_string()
        } else if link.starts_with("socket:[") {
            "socket".to_string()
        } else {
            link
        };
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let field = |n: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(n))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        out.push(format!(
            "fd {fd} {link} flags {} pos {}",
            field("flags:"),
            field("pos:")
        ));
    }
    Ok(out)
}

/// The lines of `a` and `b` that differ, for a failure message (empty when
/// they are equal).
pub fn shape_diff(a: &[String], b: &[String]) -> String {
    let mut s = String::new();
    for l in a.iter().filter(|l| !b.contains(l)) {
        s.push_str(&format!("\n  before only: {l}"));
    }
    for l in b.iter().filter(|l| !a.contains(l)) {
        s.push_str(&format!("\n  after only:  {l}"));
    }
    s
}

/// What became of `pid` in a child subreaper: its wait status if it was
/// reaped here (our orphan), `None` if another parent (tern) reaped it.
/// Panics if it is still there after `timeout`.
pub fn reap_orphan(pid: i32, timeout: Duration) -> Option<i32> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let mut st = 0;
        // SAFETY: waitpid on a process reparented to us (or ECHILD).
        let r = unsafe { libc::waitpid(pid, &mut st, libc::__WALL | libc::WNOHANG) };
        if r == pid {
            return Some(st);
        }
        if r < 0 && !alive(pid) && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return None; // reaped by tern
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("PID {pid} still there after {timeout:?}");
}
