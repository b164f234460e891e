//! The target's VMAs, from `/proc/PID/maps` (read by [`sys::proc`]), and
//! which of them tern records.

use images::VmaRecord;
use sys::proc::ProcError;

/// Name of tern's scratch mapping in the target (set with PR_SET_VMA_ANON_NAME).
pub const SCRATCH_NAME: &str = "[anon:tern-scratch]";

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("no process with PID {pid} (it exited, or never existed); check the PID")]
    NoProcess { pid: i32 },
    #[error(transparent)]
    Read(ProcError),
}

/// One VMA, as `sys::proc` reads it; what tern does with it is
/// [`VmaPolicy`].
pub use sys::proc::Vma;

/// Which VMAs tern records, and how their pages are copied.
pub trait VmaPolicy {
    fn pages(&self) -> u64;
    fn is_private(&self) -> bool;
    fn is_readable(&self) -> bool;
    /// Backed by a regular file (its unmodified pages read from the file).
    fn is_file(&self) -> bool;
    /// Kernel-provided areas that are never copied: the restorer maps them.
    fn is_special(&self) -> bool;
    /// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, SysV shm): its
    /// only copy is the memory itself, so it is recorded. (A memfd's
    /// contents are saved with the file, `crate::unlinked`: its shared
    /// mappings are mapped from it again, as a shared file mapping is.)
    fn is_shared_anon(&self) -> bool;
    /// Whether tern records this VMA's pages.
    fn is_dumped(&self) -> bool;
    /// In this VMA, a page the kernel reports as a file page (page cache,
    /// not yet copied-on-write) reads the same from the backing file: it is
    /// not copied. True for private file mappings only: shared anonymous
    /// memory is also "file" (shmem) to the kernel, but has no other copy.
    fn file_pages_are_holes(&self) -> bool;
    /// The VMA as an image records it.
    fn record(&self) -> VmaRecord;
}

impl VmaPolicy for Vma {
    fn pages(&self) -> u64 {
        (self.end - self.start) / images::PAGE_SIZE
    }
    fn is_private(&self) -> bool {
        self.perms.is_private()
    }
    fn is_readable(&self) -> bool {
        self.perms.read
    }
    fn is_file(&self) -> bool {
        self.inode != 0 && self.name.as_deref().is_some_and(|n| n.starts_with('/'))
    }
    fn is_special(&self) -> bool {
        matches!(
            self.name.as_deref(),
            Some("[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[uprobes]")
        ) || self.name.as_deref() == Some(SCRATCH_NAME)
    }
    fn is_shared_anon(&self) -> bool {
        !self.is_private()
            && (self.inode == 0
                || self
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("/dev/zero") || n.starts_with("/SYSV")))
    }
    fn is_dumped(&self) -> bool {
        !self.is_special() && (self.is_private() || self.is_shared_anon())
    }
    fn file_pages_are_holes(&self) -> bool {
        self.is_private() && self.is_file()
    }
    fn record(&self) -> VmaRecord {
        VmaRecord {
            start: self.start,
            end: self.end,
            perms: self.perms,
            offset: self.offset,
            dev: self.dev_text(),
            inode: self.inode,
            name: self.name.clone(),
            dumped: self.is_dumped(),
            vm_flags: Vec::new(),
            file: None,
        }
    }
}

fn map_err(e: ProcError) -> MapsError {
    match e {
        ProcError::NoProcess { pid } => MapsError::NoProcess { pid },
        e => MapsError::Read(e),
    }
}

/// Read the VMAs of `pid`.
pub fn read_vmas(pid: i32) -> Result<Vec<Vma>, MapsError> {
    sys::proc::maps(pid, None).map_err(map_err)
}

/// `VmFlags` of every VMA of `pid`, keyed by (start, end), from
/// /proc/PID/smaps. Slow for big processes (the kernel walks page tables to
/// count RSS): read it outside the frozen window where possible.
pub fn vm_flags(
    pid: i32,
) -> Result<std::collections::BTreeMap<(u64, u64), Vec<String>>, MapsError> {
    sys::proc::vm_flags(pid).map_err(map_err)
}

/// The files `vmas` map privately, each read once (through
/// `/proc/PID/map_files/`, the mapped inode itself) and keyed by (device,
/// inode) as maps shows them; `known` are not read again. A file that
/// cannot be read is left out (its VMAs get no identity, and the restore
/// cannot check them): logged.
pub fn file_identities(pid: i32, vmas: &[Vma], known: &FileIdentities) -> FileIdentities {
    let mut out = FileIdentities::new();
    for v in vmas.iter().filter(|v| v.is_private() && v.is_file()) {
        let key = (v.dev, v.inode);
        if out.contains_key(&key) {
            continue;
        }
        if let Some(id) = known.get(&key) {
            out.insert(key, id.clone());
            continue;
        }
        match sys::mapped_file::FileIdentity::of_mapping(pid, v.start, v.end) {
            Ok(Some(id)) => {
                out.insert(key, id);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                pid,
                "reading the file mapped at {:#x}-{:#x} ({}) through /proc/{pid}/map_files: {e}; the restore will not be able to check it is the same file",
                v.start,
                v.end,
                v.name_or_empty()
            ),
        }
    }
    out
}

/// Mapped files' identities by (device, inode).
pub type FileIdentities =
    std::collections::HashMap<((i32, i32), u64), sys::mapped_file::FileIdentity>;

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
