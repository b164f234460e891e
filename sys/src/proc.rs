//! `/proc/PID`: the one reader of the files tern parses. What the `procfs`
//! crate parses (status, stat, maps with typed permissions, limits) comes
//! from it; what it does not (the raw auxiliary vector, kept word for word
//! because a restore writes it back) is read here. Every error names the
//! process and the file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use procfs::FromRead;
use procfs::process::{MMPermissions, MMapPath, MemoryMaps, Process};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use procfs::process::{Stat, Status};

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no process with PID {pid} (it exited, or never existed); check the PID")]
    NoProcess { pid: i32 },
    #[error("PID {pid}: {path}: {source}")]
    Read {
        pid: i32,
        path: String,
        #[source]
        source: procfs::ProcError,
    },
    #[error("PID {pid}: {path}: {what}; is /proc a Linux procfs?")]
    Format {
        pid: i32,
        path: String,
        what: String,
    },
}

impl ProcError {
    fn read(pid: i32, path: &str) -> impl FnOnce(procfs::ProcError) -> ProcError {
        let path = path.to_string();
        move |source| match &source {
            procfs::ProcError::NotFound(_) => ProcError::NoProcess { pid },
            procfs::ProcError::Io(e, _)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                ProcError::NoProcess { pid }
            }
            _ => ProcError::Read { pid, path, source },
        }
    }

    /// The process (or thread) is gone.
    pub fn is_gone(&self) -> bool {
        matches!(self, ProcError::NoProcess { .. })
    }
}

/// `/proc/PID`, or `/proc/PID/task/TID` with `tid`.
pub fn dir(pid: i32, tid: Option<i32>) -> String {
    match tid {
        Some(t) => format!("/proc/{pid}/task/{t}"),
        None => format!("/proc/{pid}"),
    }
}

fn read<T: FromRead>(pid: i32, tid: Option<i32>, file: &str) -> Result<T, ProcError> {
    if pid <= 0 || tid.is_some_and(|t| t <= 0) {
        return Err(ProcError::NoProcess { pid });
    }
    let path = format!("{}/{file}", dir(pid, tid));
    T::from_file(&path).map_err(ProcError::read(pid, &path))
}

/// `/proc/PID/status` (or `/proc/PID/task/TID/status` with `tid`).
pub fn status(pid: i32, tid: Option<i32>) -> Result<Status, ProcError> {
    read(pid, tid, "status")
}

/// A status file read once: procfs's parse of it, and the fields procfs
/// does not know (`Seccomp_filters`) from the same text.
#[derive(Debug, Clone)]
pub struct StatusFile {
    pub parsed: Status,
    text: String,
}

impl StatusFile {
    /// The trimmed value of field `name` (`Name:\tvalue`), if present.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    }
}

/// [`status`] with the raw fields.
pub fn status_file(pid: i32, tid: Option<i32>) -> Result<StatusFile, ProcError> {
    if pid <= 0 || tid.is_some_and(|t| t <= 0) {
        return Err(ProcError::NoProcess { pid });
    }
    let path = format!("{}/status", dir(pid, tid));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ProcError::read(pid, &path)(procfs::ProcError::Io(e, Some(PathBuf::from(&path))))
    })?;
    let parsed = Status::from_read(text.as_bytes()).map_err(ProcError::read(pid, &path))?;
    Ok(StatusFile { parsed, text })
}

/// `/proc/PID/stat` (or the thread's with `tid`).
pub fn stat(pid: i32, tid: Option<i32>) -> Result<Stat, ProcError> {
    read(pid, tid, "stat")
}

/// The state letter of `/proc/PID/stat` (or of thread `tid`), read without
/// parsing the rest: for polls (a full parse costs ~40 µs here).
pub fn state(pid: i32, tid: Option<i32>) -> Option<char> {
    if pid <= 0 || tid.is_some_and(|t| t <= 0) {
        return None;
    }
    let text = std::fs::read(format!("{}/stat", dir(pid, tid))).ok()?;
    // "PID (comm) S ...": comm may hold anything, the state follows the
    // last ')'.
    let close = text.iter().rposition(|&b| b == b')')?;
    text.get(close + 2).map(|&b| char::from(b))
}

/// The thread is alive: it exists and is neither a zombie nor dead.
pub fn thread_alive(pid: i32, tid: i32) -> bool {
    stat(pid, Some(tid)).is_ok_and(|s| !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// The threads of `pid` (`/proc/PID/task`), in increasing order.
pub fn tids(pid: i32) -> Result<Vec<i32>, ProcError> {
    let path = format!("/proc/{pid}/task");
    let proc = Process::new(pid).map_err(ProcError::read(pid, &path))?;
    let mut v: Vec<i32> = proc
        .tasks()
        .map_err(ProcError::read(pid, &path))?
        .flatten()
        .map(|t| t.tid)
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Every descendant of `pid` (children, theirs, ...), from
/// `/proc/PID/task/TID/children`; processes that come and go meanwhile may
/// be missed or named after they are gone.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for tid in tids(p).unwrap_or_default() {
            let path = format!("/proc/{p}/task/{tid}/children");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for c in text
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                if !out.contains(&c) && out.len() < 65536 {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

/// One resource limit (`/proc/PID/limits`); `u64::MAX` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// `RLIMIT_*` number.
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The resource limits of `pid`, by `RLIMIT_*` number (0..=15).
pub fn limits(pid: i32) -> Result<Vec<Limit>, ProcError> {
    let path = format!("/proc/{pid}/limits");
    let l = Process::new(pid)
        .and_then(|p| p.limits())
        .map_err(ProcError::read(pid, &path))?;
    let v = |x: procfs::process::LimitValue| match x {
        procfs::process::LimitValue::Unlimited => u64::MAX,
        procfs::process::LimitValue::Value(v) => v,
    };
    // In RLIMIT_* order (include/uapi/asm-generic/resource.h), which is
    // also the order of the file's lines.
    Ok([
        l.max_cpu_time,
        l.max_file_size,
        l.max_data_size,
        l.max_stack_size,
        l.max_core_file_size,
        l.max_resident_set,
        l.max_processes,
        l.max_open_files,
        l.max_locked_memory,
        l.max_address_space,
        l.max_file_locks,
        l.max_pending_signals,
        l.max_msgqueue_size,
        l.max_nice_priority,
        l.max_realtime_priority,
        l.max_realtime_timeout,
    ]
    .into_iter()
    .zip(0u32..)
    .map(|(lim, resource)| Limit {
        resource,
        soft: v(lim.soft_limit),
        hard: v(lim.hard_limit),
    })
    .collect())
}

/// The auxiliary vector of `pid`, word for word as `/proc/PID/auxv` holds
/// it (type, value pairs up to and including `AT_NULL`). Not procfs's
/// parse: that one is a map, which loses the order a restore writes back.
pub fn auxv(pid: i32) -> Result<Vec<u64>, ProcError> {
    let path = format!("/proc/{pid}/auxv");
    let bytes = std::fs::read(&path).map_err(|e| {
        ProcError::read(pid, &path)(procfs::ProcError::Io(e, Some(PathBuf::from(&path))))
    })?;
    if bytes.len() % 8 != 0 {
        return Err(ProcError::Format {
            pid,
            path,
            what: format!("{} bytes, not whole 8-byte words", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_ne_bytes(w)
        })
        .collect())
}

/// The permissions of a VMA as `/proc/PID/maps` shows them (`rw-p`). In
/// text (and in serde) it is that same four-letter form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VmaPerms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s`: shared; `p`: private (copy-on-write).
    pub shared: bool,
}

impl VmaPerms {
    /// `PROT_*` bits for mmap/mprotect.
    pub fn prot(self) -> i32 {
        let mut p = libc::PROT_NONE;
        if self.read {
            p |= libc::PROT_READ;
        }
        if self.write {
            p |= libc::PROT_WRITE;
        }
        if self.exec {
            p |= libc::PROT_EXEC;
        }
        p
    }

    pub fn is_private(self) -> bool {
        !self.shared
    }
}

impl From<MMPermissions> for VmaPerms {
    fn from(p: MMPermissions) -> VmaPerms {
        VmaPerms {
            read: p.contains(MMPermissions::READ),
            write: p.contains(MMPermissions::WRITE),
            exec: p.contains(MMPermissions::EXECUTE),
            shared: p.contains(MMPermissions::SHARED),
        }
    }
}

impl fmt::Display for VmaPerms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |on: bool, ch: char| if on { ch } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x'),
            if self.shared { 's' } else { 'p' }
        )
    }
}

/// Text that is not four letters `[r-][w-][x-][ps]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad VMA permissions {0:?} (expected four letters such as \"rw-p\")")]
pub struct BadPerms(pub String);

impl FromStr for VmaPerms {
    type Err = BadPerms;
    fn from_str(s: &str) -> Result<VmaPerms, BadPerms> {
        let bad = || BadPerms(s.chars().take(16).collect());
        let &[r, w, x, p] = s.as_bytes() else {
            return Err(bad());
        };
        let flag = |b: u8, on: u8| match b {
            b'-' => Ok(false),
            b if b == on => Ok(true),
            _ => Err(bad()),
        };
        Ok(VmaPerms {
            read: flag(r, b'r')?,
            write: flag(w, b'w')?,
            exec: flag(x, b'x')?,
            shared: match p {
                b'p' => false,
                b's' => true,
                _ => return Err(bad()),
            },
        })
    }
}

impl Serialize for VmaPerms {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VmaPerms {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<VmaPerms, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One VMA of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub perms: VmaPerms,
    pub offset: u64,
    /// (major, minor) of the backing file's device.
    pub dev: (i32, i32),
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `[anon:NAME]`) as
    /// maps shows it; `None` for anonymous memory.
    pub name: Option<String>,
}

impl Vma {
    /// `MAJ:MIN` as maps shows the device.
    pub fn dev_text(&self) -> String {
        format!("{:02x}:{:02x}", self.dev.0, self.dev.1)
    }
    /// The name, or "" for anonymous memory.
    pub fn name_or_empty(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

/// The name maps shows for a mapping's path.
fn name_of(p: &MMapPath) -> Option<String> {
    Some(match p {
        MMapPath::Path(p) => p.display().to_string(),
        MMapPath::Heap => "[heap]".into(),
        MMapPath::Stack => "[stack]".into(),
        MMapPath::TStack(t) => format!("[stack:{t}]"),
        MMapPath::Vdso => "[vdso]".into(),
        MMapPath::Vvar => "[vvar]".into(),
        MMapPath::Vsyscall => "[vsyscall]".into(),
        MMapPath::Rollup => "[rollup]".into(),
        MMapPath::Anonymous => return None,
        MMapPath::Vsys(key) => format!("/SYSV{key:08x}"),
        // procfs strips the brackets of pseudo-names (`[vvar_vclock]`,
        // `[anon:NAME]`): put them back so names read as in /proc/PID/maps.
        MMapPath::Other(s) => format!("[{s}]"),
    })
}

fn vmas(maps: MemoryMaps) -> Vec<Vma> {
    maps.into_iter()
        .map(|m| Vma {
            start: m.address.0,
            end: m.address.1,
            perms: m.perms.into(),
            offset: m.offset,
            dev: m.dev,
            inode: m.inode,
            name: name_of(&m.pathname),
        })
        .collect()
}

/// The VMAs of `pid` (`/proc/PID/maps`), or those `/proc/PID/task/TID/maps`
/// shows with `tid` (the same address space; readable through a live
/// thread when the leader is a zombie).
pub fn maps(pid: i32, tid: Option<i32>) -> Result<Vec<Vma>, ProcError> {
    read(pid, tid, "maps").map(vmas)
}

/// The address ranges of `pid`'s VMAs, from `/proc/PID/maps`, parsing only
/// each line's `start-end` (a restore reads them several times while
/// nothing else about the VMAs matters; procfs's full parse costs more
/// than the kernel's text).
pub fn map_ranges(pid: i32) -> Result<Vec<(u64, u64)>, ProcError> {
    let path = format!("{}/maps", dir(pid, None));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ProcError::read(pid, &path)(procfs::ProcError::Io(e, Some(PathBuf::from(&path))))
    })?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let range = l.split(' ').next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("", ""));
            match (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                (Ok(a), Ok(b)) if a < b => Ok((a, b)),
                _ => Err(ProcError::read(pid, &path)(procfs::ProcError::Other(
                    format!("not a maps line: {l:?}"),
                ))),
            }
        })
        .collect()
}

/// VMAs from the text of a maps file (tests, and maps read by other means).
pub fn parse_maps(pid: i32, text: &str) -> Result<Vec<Vma>, ProcError> {
    MemoryMaps::from_read(text.as_bytes())
        .map(vmas)
        .map_err(ProcError::read(pid, "maps"))
}

/// `VmFlags` of every VMA of `pid`, keyed by (start, end), from
/// `/proc/PID/smaps`, as the kernel spells them. Not procfs's parse: it
/// drops the flags it does not know (`ui`, `ss`, `sl`, ...), which an image
/// must keep.
pub fn vm_flags(pid: i32) -> Result<BTreeMap<(u64, u64), Vec<String>>, ProcError> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ProcError::read(pid, &path)(procfs::ProcError::Io(e, Some(PathBuf::from(&path))))
    })?;
    Ok(parse_vm_flags(&text))
}

fn parse_vm_flags(text: &str) -> BTreeMap<(u64, u64), Vec<String>> {
    let mut out = BTreeMap::new();
    let mut cur: Option<(u64, u64)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            if let Some(k) = cur.take() {
                out.insert(k, rest.split_whitespace().map(str::to_string).collect());
            }
            continue;
        }
        // A header line: "start-end perms offset dev inode [name]".
        let Some(range) = line.split_whitespace().next() else {
            continue;
        };
        if let Some((a, b)) = range.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            && !range.ends_with(':')
        {
            cur = Some((a, b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_the_state_of_stat() {
        let pid = std::process::id() as i32;
        // This thread runs while it reads its own state; the main thread of
        // the test harness may be running or asleep between two reads, so
        // the two readers are compared on a process that stays asleep.
        let me = nix::unistd::gettid().as_raw();
        assert_eq!(state(pid, Some(me)), Some('R'));
        assert_eq!(stat(pid, Some(me)).unwrap().state, 'R');
        assert_eq!(state(-1, None), None);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let cpid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while state(cpid, None) != Some('S') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(state(cpid, None), Some('S'));
        assert_eq!(stat(cpid, None).unwrap().state, 'S');
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(state(cpid, None), None);
    }

    #[test]
    fn map_ranges_are_the_ranges_of_maps() {
        let pid = std::process::id() as i32;
        // Nothing maps or unmaps between the two reads but this thread's
        // own allocations: compare with a buffer that is not freed.
        let keep: Vec<u8> = vec![1; 1 << 20];
        let full: Vec<(u64, u64)> = maps(pid, None)
            .unwrap()
            .iter()
            .map(|v| (v.start, v.end))
            .collect();
        let ranges = map_ranges(pid).unwrap();
        assert!(ranges.len() > 5, "{ranges:x?}");
        let at = keep.as_ptr() as u64;
        assert!(ranges.iter().any(|&(a, b)| (a..b).contains(&at)));
        // Other test threads may map meanwhile: most lines agree.
        let same = ranges.iter().filter(|r| full.contains(r)).count();
        assert!(same * 10 >= ranges.len() * 9, "{ranges:x?} vs {full:x?}");
        assert!(map_ranges(-1).is_err());
    }

    #[test]
    fn perms_read_and_print_as_maps_shows_them() {
        for s in ["rw-p", "r-xp", "---p", "rwxs", "r--s"] {
            let p: VmaPerms = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{s}\""));
            assert_eq!(
                serde_json::from_str::<VmaPerms>(&format!("\"{s}\"")).unwrap(),
                p
            );
        }
        let p: VmaPerms = "r-xs".parse().unwrap();
        assert_eq!(p.prot(), libc::PROT_READ | libc::PROT_EXEC);
        assert!(!p.is_private());
        for bad in ["", "rw-", "rw-px", "wr-p", "rw-q", "rw–p"] {
            assert!(bad.parse::<VmaPerms>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<VmaPerms>("\"rwx\"").is_err());
    }

    #[test]
    fn maps_lines() {
        let text = "7f0000000000-7f0000001000 r-xp 00000000 00:00 0                          [anon:tern-scratch]\n\
                    7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]\n\
                    55550000-55551000 r--s 00001000 08:01 1234                       /usr/bin/a b\n\
                    55551000-55552000 rw-p 00000000 00:00 0 \n";
        let v = parse_maps(7, text).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].start, 0x7f0000000000);
        assert_eq!(v[0].name.as_deref(), Some("[anon:tern-scratch]"));
        assert!(v[0].perms.exec && v[0].perms.read && !v[0].perms.write);
        assert_eq!(v[1].name.as_deref(), Some("[vdso]"));
        assert_eq!(v[2].name.as_deref(), Some("/usr/bin/a b"));
        assert_eq!(
            (v[2].inode, v[2].offset, v[2].dev_text()),
            (1234, 0x1000, "08:01".into())
        );
        assert!(v[2].perms.shared);
        assert_eq!(v[3].name, None);
    }

    #[test]
    fn smaps_flags() {
        let text = "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n\
                    Size:                  4 kB\n\
                    VmFlags: rd wr mr mw me ac sd ui \n\
                    7f0000001000-7f0000002000 r--p 00000000 00:00 0 \n";
        let f = parse_vm_flags(text);
        assert_eq!(f.len(), 1, "a VMA without a VmFlags line has none");
        assert_eq!(
            f[&(0x7f00_0000_0000, 0x7f00_0000_1000)]
                .last()
                .map(String::as_str),
            Some("ui")
        );
        let me = std::process::id() as i32;
        assert!(
            vm_flags(me)
                .unwrap()
                .values()
                .any(|v| v.iter().any(|f| f == "gd")),
            "our stack grows down"
        );
    }

    #[test]
    fn own_process() {
        let pid = std::process::id() as i32;
        let st = status(pid, None).unwrap();
        assert_eq!(st.tgid, pid);
        let f = status_file(pid, Some(pid)).unwrap();
        assert_eq!(f.parsed.pid, pid);
        assert_eq!(f.field("Tgid"), Some(pid.to_string().as_str()));
        assert_eq!(f.field("NoSuchField"), None);
        assert_eq!(stat(pid, Some(pid)).unwrap().pid, pid);
        assert!(thread_alive(pid, pid));
        assert!(tids(pid).unwrap().contains(&pid));
        let vmas = maps(pid, None).unwrap();
        assert!(vmas.iter().any(|v| v.name.as_deref() == Some("[stack]")));
        let lim = limits(pid).unwrap();
        assert_eq!(lim.len(), 16);
        // SAFETY: getrlimit writes one struct rlimit into `r`, a local.
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) writes one struct rlimit into a local.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
        assert_eq!(lim[7].soft, r.rlim_cur);
        let aux = auxv(pid).unwrap();
        assert_eq!(aux.len() % 2, 0);
        assert_eq!(aux[aux.len() - 2..], [0, 0], "ends with AT_NULL");
        // SAFETY: getauxval reads our own auxiliary vector.
        let pagesz = unsafe { libc::getauxval(libc::AT_PAGESZ) };
        assert!(aux.chunks(2).any(|p| p == [libc::AT_PAGESZ, pagesz]));
    }

    #[test]
    fn missing_process_is_named() {
        let e = status(i32::MAX - 1, None).unwrap_err();
        assert!(e.is_gone(), "{e}");
        assert!(e.to_string().contains(&format!("{}", i32::MAX - 1)), "{e}");
        assert!(maps(i32::MAX - 1, None).unwrap_err().is_gone());
        assert!(status_file(i32::MAX - 1, None).unwrap_err().is_gone());
        assert!(tids(i32::MAX - 1).unwrap_err().is_gone());
        assert!(!thread_alive(i32::MAX - 1, i32::MAX - 1));
    }
}
