//! Which file a private file mapping holds, so that a restore can tell
//! whether the file it maps again is the one the dump saw.
//!
//! A dump records only the pages of a private file mapping the process
//! wrote (relocated data, a GOT); the restore takes every other page from
//! the file at the same path. If that file changed meanwhile (a rebuilt
//! program, an upgraded library), the process gets new code beside old data
//! and crashes or, worse, runs on wrongly. So the dump records the mapped
//! file's size, modification time and ELF build ID, read through
//! `/proc/PID/map_files/` (the mapped inode itself, whatever its path names
//! now), and the restore compares them with the file it is about to map.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What identifies a mapped file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    /// The ELF `NT_GNU_BUILD_ID` note, in hex, if the file is an ELF file
    /// that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

impl FileIdentity {
    /// The identity of an open file.
    pub fn of(file: &File) -> std::io::Result<FileIdentity> {
        let m = file.metadata()?;
        Ok(FileIdentity {
            size: m.size(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            build_id: build_id(file),
        })
    }

    /// The identity of the regular file `pid` maps at `start..end`,
    /// through `/proc/PID/map_files/`; `None` for anything else (a device
    /// such as `/dev/zero` has no contents to change, and its times change
    /// with every boot).
    pub fn of_mapping(pid: i32, start: u64, end: u64) -> std::io::Result<Option<FileIdentity>> {
        let path = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
        match open_regular(Path::new(&path))? {
            Some((f, _)) => FileIdentity::of(&f).map(Some),
            None => Ok(None),
        }
    }

    /// The identity of the regular file at `path` (symbolic links followed,
    /// as an open by the restored process follows them) and its (device,
    /// inode); `None` if it is not a regular file.
    pub fn of_path(path: &Path) -> std::io::Result<Option<(FileIdentity, (u64, u64))>> {
        match open_regular(path)? {
            Some((f, inode)) => Ok(Some((FileIdentity::of(&f)?, inode))),
            None => Ok(None),
        }
    }

    /// Why a file with identity `now` is not the file this one was: `None`
    /// if it is. With a build ID on both sides the build ID and the size
    /// decide (an identical program reinstalled elsewhere has another
    /// mtime); without, the size and the modification time.
    pub fn differs(&self, now: &FileIdentity) -> Option<String> {
        if self.size != now.size {
            return Some(format!(
                "its size is {} bytes, {} at the dump",
                now.size, self.size
            ));
        }
        match (&self.build_id, &now.build_id) {
            (Some(a), Some(b)) if a != b => {
                Some(format!("its ELF build ID is {b}, {a} at the dump"))
            }
            (Some(_), Some(_)) => None,
            (Some(a), None) => Some(format!("it has no ELF build ID, {a} at the dump")),
            _ if (self.mtime_sec, self.mtime_nsec) != (now.mtime_sec, now.mtime_nsec) => {
                Some(format!(
                    "it was modified at {}.{:09} (seconds since the epoch), {}.{:09} at the dump",
                    now.mtime_sec, now.mtime_nsec, self.mtime_sec, self.mtime_nsec
                ))
            }
            _ => None,
        }
    }
}

/// `path` opened for reading if it is a regular file, with its (device,
/// inode); `None` if it is anything else. tern runs as root and the path
/// may come from an image someone else wrote: it is first opened with
/// `O_PATH`, which runs no driver's open (a device such as a watchdog acts
/// on open) and never blocks (a FIFO would wait for a writer), and only a
/// regular file is then opened for reading, through that very inode.
fn open_regular(path: &Path) -> std::io::Result<Option<(File, (u64, u64))>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)?;
    let m = handle.metadata()?;
    if !m.file_type().is_file() {
        return Ok(None);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))?;
    Ok(Some((f, (m.dev(), m.ino()))))
}

/// The `NT_GNU_BUILD_ID` of an ELF file, in hex; `None` for any other file
/// or an ELF file without one. Reads only the headers and the notes.
fn build_id(file: &File) -> Option<String> {
    use object::Object;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let id = elf.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of_path(p: &Path) -> FileIdentity {
        FileIdentity::of_path(p).unwrap().expect("a regular file").0
    }

    #[test]
    fn own_program_has_its_build_id_through_map_files() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let by_path = of_path(&exe);
        // The text mapping of this program, read through map_files.
        let pid = std::process::id() as i32;
        let maps = crate::proc::maps(pid, None).unwrap();
        let text = maps
            .iter()
            .find(|v| v.name.as_deref() == exe.to_str() && v.perms.exec)
            .expect("this program's text mapping");
        let mapped = FileIdentity::of_mapping(pid, text.start, text.end)
            .unwrap()
            .expect("a regular file");
        assert_eq!(mapped, by_path);
        // The test harness is linked with a build ID (Debian's toolchain
        // default); readelf -n shows the same.
        let id = by_path.build_id.clone().expect("a build ID");
        assert_eq!(id.len(), 40, "{id}");
        assert_eq!(by_path.differs(&mapped), None);
    }

    #[test]
    fn a_device_mapped_privately_has_no_identity() {
        use std::os::fd::AsRawFd;
        let zero = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/zero")
            .unwrap();
        // SAFETY: a fresh private mapping of /dev/zero, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                zero.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = p as u64;
        let got = FileIdentity::of_mapping(std::process::id() as i32, start, start + 8192);
        // SAFETY: the mapping made above, not used after.
        unsafe { libc::munmap(p, 8192) };
        assert_eq!(got.unwrap(), None);
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A FIFO with no writer: an open for reading would wait forever.
        assert_eq!(FileIdentity::of_path(&fifo).unwrap(), None);
        assert_eq!(FileIdentity::of_path(Path::new("/dev/null")).unwrap(), None);
        assert_eq!(FileIdentity::of_path(dir.path()).unwrap(), None);
        // A symbolic link to a regular file is followed.
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert_eq!(of_path(&l), of_path(&f));
    }

    #[test]
    fn a_changed_file_differs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        std::fs::write(&p, b"0123456789").unwrap();
        let before = of_path(&p);
        assert_eq!(before.build_id, None);
        // Same size, later mtime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"9876543210").unwrap();
        let after = of_path(&p);
        let why = before.differs(&after).expect("a rewritten file differs");
        assert!(why.contains("modified at"), "{why}");
        std::fs::write(&p, b"short").unwrap();
        let why = before.differs(&of_path(&p)).unwrap();
        assert!(why.contains("size is 5 bytes, 10 at the dump"), "{why}");
        // Two builds of one program: the build ID decides, not the mtime.
        let a = FileIdentity {
            build_id: Some("aa".into()),
            ..before.clone()
        };
        let moved = FileIdentity {
            mtime_sec: before.mtime_sec + 100,
            ..a.clone()
        };
        assert_eq!(a.differs(&moved), None);
        let rebuilt = FileIdentity {
            build_id: Some("bb".into()),
            ..a.clone()
        };
        assert!(a.differs(&rebuilt).unwrap().contains("build ID is bb"));
    }
}
