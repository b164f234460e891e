//! The target's VMAs, from `/proc/PID/maps` (parsed by the `procfs` crate),
//! and which of them tern records.

use images::VmaRecord;
use procfs::process::MMapPath;

/// Name of tern's scratch mapping in the target (set with PR_SET_VMA_ANON_NAME).
pub const SCRATCH_NAME: &str = "[anon:tern-scratch]";

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("no process with PID {pid} (it exited, or never existed); check the PID")]
    NoProcess { pid: i32 },
    #[error("/proc/{pid}/maps: {source}")]
    Read {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
    #[error("PID {pid}: {what}")]
    Smaps { pid: i32, what: String },
}

/// One VMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    pub name: Option<String>,
}

impl Vma {
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / images::PAGE_SIZE
    }
    pub fn is_private(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b'p')
    }
    pub fn is_readable(&self) -> bool {
        self.perms.as_bytes().first() == Some(&b'r')
    }
    /// Backed by a regular file (its unmodified pages read from the file).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.name.as_deref().is_some_and(|n| n.starts_with('/'))
    }
    /// Kernel-provided areas that are never copied: the restorer maps them.
    pub fn is_special(&self) -> bool {
        matches!(
            self.name.as_deref(),
            Some("[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[uprobes]")
        ) || self.name.as_deref() == Some(SCRATCH_NAME)
    }
    /// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, memfd, SysV shm):
    /// its only copy is the memory itself, so it is recorded.
    pub fn is_shared_anon(&self) -> bool {
        !self.is_private()
            && (self.inode == 0
                || self.name.as_deref().is_some_and(|n| {
                    n.starts_with("/dev/zero") || n.starts_with("/SYSV") || n.starts_with("/memfd:")
                }))
    }
    /// Whether tern records this VMA's pages.
    pub fn is_dumped(&self) -> bool {
        !self.is_special() && (self.is_private() || self.is_shared_anon())
    }
    /// In this VMA, a page the kernel reports as a file page (page cache,
    /// not yet copied-on-write) reads the same from the backing file: it is
    /// not copied. True for private file mappings only: shared anonymous
    /// memory is also "file" (shmem) to the kernel, but has no other copy.
    pub fn file_pages_are_holes(&self) -> bool {
        self.is_private() && self.is_file()
    }
    pub fn record(&self) -> VmaRecord {
        VmaRecord {
            start: self.start,
            end: self.end,
            perms: self.perms.clone(),
            offset: self.offset,
            dev: self.dev.clone(),
            inode: self.inode,
            name: self.name.clone(),
            dumped: self.is_dumped(),
            vm_flags: Vec::new(),
        }
    }
}

/// Read the VMAs of `pid`.
pub fn read_vmas(pid: i32) -> Result<Vec<Vma>, MapsError> {
    let proc = procfs::process::Process::new(pid).map_err(|e| map_err(pid, e))?;
    let maps = proc.maps().map_err(|e| map_err(pid, e))?;
    Ok(maps
        .into_iter()
        .map(|m| {
            let p = m.perms;
            let perms: String = [
                if p.contains(procfs::process::MMPermissions::READ) {
                    'r'
                } else {
                    '-'
                },
                if p.contains(procfs::process::MMPermissions::WRITE) {
                    'w'
                } else {
                    '-'
                },
                if p.contains(procfs::process::MMPermissions::EXECUTE) {
                    'x'
                } else {
                    '-'
                },
                if p.contains(procfs::process::MMPermissions::SHARED) {
                    's'
                } else {
                    'p'
                },
            ]
            .iter()
            .collect();
            Vma {
                start: m.address.0,
                end: m.address.1,
                perms,
                offset: m.offset,
                dev: format!("{:02x}:{:02x}", m.dev.0, m.dev.1),
                inode: m.inode,
                name: path_name(&m.pathname),
            }
        })
        .collect())
}

fn map_err(pid: i32, e: procfs::ProcError) -> MapsError {
    match e {
        procfs::ProcError::NotFound(_) => MapsError::NoProcess { pid },
        e => MapsError::Read { pid, source: e },
    }
}

fn path_name(p: &MMapPath) -> Option<String> {
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

/// `VmFlags` of every VMA of `pid`, keyed by (start, end), from
/// /proc/PID/smaps. Slow for big processes (the kernel walks page tables to
/// count RSS): read it outside the frozen window where possible.
pub fn vm_flags(
    pid: i32,
) -> Result<std::collections::BTreeMap<(u64, u64), Vec<String>>, MapsError> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(|e| MapsError::Smaps {
        pid,
        what: format!("{path}: {e}"),
    })?;
    let mut out = std::collections::BTreeMap::new();
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_maps_classify() {
        let vmas = read_vmas(std::process::id() as i32).unwrap();
        assert!(
            vmas.iter()
                .any(|v| v.name.as_deref() == Some("[vdso]") && !v.is_dumped())
        );
        assert!(
            vmas.iter()
                .any(|v| v.name.as_deref() == Some("[stack]") && v.is_dumped())
        );
        // Our own executable's text: private file mapping, dumped (COW pages
        // only), its file pages are holes.
        assert!(vmas.iter().any(|v| v.is_file() && v.file_pages_are_holes()));
        assert!(matches!(
            read_vmas(i32::MAX - 1),
            Err(MapsError::NoProcess { .. })
        ));
    }
}
