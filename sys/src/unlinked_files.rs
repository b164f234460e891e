//! Files a process holds that no path reaches: memfds (`memfd_create(2)`)
//! and files deleted while open or mapped. Their contents exist only in
//! the kernel, so a dump saves them and a restore makes such a file again:
//! what one is (size, mode, owner, links left, memfd seals), its contents
//! read as data extents (holes stay holes: `SEEK_DATA`/`SEEK_HOLE`), and a
//! new memfd, or a file deleted again where the old one was, filled the
//! same way.
//!
//! Read through `/proc/PID/fd/N` or `/proc/PID/map_files/START-END` (the
//! mapped inode itself, for a file only mapped), never by its old path.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// Seals (include/uapi/linux/fcntl.h).
pub const F_SEAL_SEAL: u32 = 0x0001;
pub const F_SEAL_SHRINK: u32 = 0x0002;
pub const F_SEAL_GROW: u32 = 0x0004;
pub const F_SEAL_WRITE: u32 = 0x0008;
pub const F_SEAL_FUTURE_WRITE: u32 = 0x0010;
pub const F_SEAL_EXEC: u32 = 0x0020;
/// Every seal this module knows.
pub const ALL_SEALS: u32 = 0x003f;
/// `HUGETLBFS_MAGIC` (include/uapi/linux/magic.h): a memfd made with
/// `MFD_HUGETLB`.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
/// Longest memfd name `memfd_create` takes (`MFD_NAME_MAX_LEN`: 249 bytes
/// after the kernel's `memfd:` prefix).
pub const MEMFD_NAME_MAX: usize = 249;

#[derive(Debug, thiserror::Error)]
pub enum UnlinkedFileError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} of {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} holds {bytes} bytes of data, more than the {limit} bytes tern saves of a file with no path (a memfd or a deleted file)"
    )]
    TooBig {
        path: String,
        bytes: u64,
        limit: u64,
    },
    #[error("making {what}: {source}")]
    Make {
        what: String,
        source: std::io::Error,
    },
}

/// What kind of file with no path, and what of it a restore gives back
/// besides its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnlinkedFile {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// st_mode's permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Names the file still has elsewhere (a deleted file with other hard
    /// links is not unlinked: a copy would split it from them).
    pub nlink: u64,
    /// On hugetlbfs (`MFD_HUGETLB`).
    pub hugetlb: bool,
    /// F_GET_SEALS, for a file that takes seals (memfds).
    pub seals: Option<u32>,
}

/// One run of data: the bytes at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> UnlinkedFileError {
    let path = path.to_string();
    move |source| UnlinkedFileError::Io { what, path, source }
}

/// Open what fd `fd` of `pid` refers to, for reading (a new open file
/// description: the process's offset and flags stay as they are).
pub fn open_fd(pid: i32, fd: i32) -> Result<File, UnlinkedFileError> {
    open(&format!("/proc/{pid}/fd/{fd}"))
}

/// Open the file the VMA at `start..end` of `pid` maps, for reading.
pub fn open_mapping(pid: i32, start: u64, end: u64) -> Result<File, UnlinkedFileError> {
    open(&format!("/proc/{pid}/map_files/{start:x}-{end:x}"))
}

/// Open the executable of `pid`, for reading.
pub fn open_exe(pid: i32) -> Result<File, UnlinkedFileError> {
    open(&format!("/proc/{pid}/exe"))
}

fn open(path: &str) -> Result<File, UnlinkedFileError> {
    File::open(path).map_err(|source| UnlinkedFileError::Open {
        path: path.to_string(),
        source,
    })
}

/// What `file` is (`path` names it in errors).
pub fn inspect(file: &File, path: &str) -> Result<UnlinkedFile, UnlinkedFileError> {
    let m = file.metadata().map_err(io("fstat", path))?;
    let fs = nix::sys::statfs::fstatfs(file).map_err(|e| io("fstatfs", path)(e.into()))?;
    // SAFETY: fcntl on an fd we own; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    Ok(UnlinkedFile {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        nlink: m.nlink(),
        #[allow(clippy::useless_conversion)]
        hugetlb: i64::from(fs.filesystem_type().0) == HUGETLBFS_MAGIC,
        seals: u32::try_from(seals).ok(),
    })
}

/// The device memfds live on here (the kernel's internal shmem mount): a
/// deleted file named `/memfd:...` on another device is a deleted file,
/// not a memfd.
pub fn memfd_device() -> Result<u64, UnlinkedFileError> {
    let f = make_memfd("tern-probe")?;
    Ok(File::from(f)
        .metadata()
        .map_err(io("fstat", "a memfd"))?
        .dev())
}

/// The data extents of `file` (of `size` bytes) and their bytes, at most
/// `limit` bytes of data in all.
pub fn read_contents(
    file: &File,
    path: &str,
    size: u64,
    limit: u64,
) -> Result<(Vec<Extent>, Vec<u8>), UnlinkedFileError> {
    let extents = data_extents(file, path, size)?;
    let bytes: u64 = extents.iter().map(|e| e.len).sum();
    if bytes > limit {
        return Err(UnlinkedFileError::TooBig {
            path: path.to_string(),
            bytes,
            limit,
        });
    }
    let mut data = vec![0u8; crate::usize_of(bytes)];
    let mut at = 0usize;
    for e in &extents {
        let len = crate::usize_of(e.len);
        file.read_exact_at(&mut data[at..at + len], e.offset)
            .map_err(io("reading", path))?;
        at += len;
    }
    Ok((extents, data))
}

/// The runs of data in the first `size` bytes of `file`. A file system
/// without SEEK_DATA gives one run of everything.
pub fn data_extents(file: &File, path: &str, size: u64) -> Result<Vec<Extent>, UnlinkedFileError> {
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        let off = i64::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: lseek on an fd we own.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data past `off`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r.cast_unsigned()))
    };
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let start = match seek(at, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![Extent {
                    offset: 0,
                    len: size,
                }]);
            }
            Err(e) => return Err(io("SEEK_DATA", path)(e)),
        };
        if start >= size {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)
            .map_err(io("SEEK_HOLE", path))?
            .unwrap_or(size)
            .min(size);
        out.push(Extent {
            offset: start,
            len: end - start,
        });
        at = end;
    }
    Ok(out)
}

/// A new memfd named `name`, sealable (the seals a dumped one had are
/// added once the restore is done with it: see [`add_seals`]).
pub fn make_memfd(name: &str) -> Result<OwnedFd, UnlinkedFileError> {
    let c = CString::new(name).map_err(|_| UnlinkedFileError::Make {
        what: format!("memfd {name:?}"),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(UnlinkedFileError::Make {
            what: format!("memfd {name:?}"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new file with no name in directory `dir` (`O_TMPFILE`: it never
/// appears in `dir`, and goes when its last user closes it).
pub fn make_tmpfile(dir: &Path) -> Result<OwnedFd, UnlinkedFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
        .map(OwnedFd::from)
        .map_err(|source| UnlinkedFileError::Make {
            what: format!("an unnamed file in {}", dir.display()),
            source,
        })
}

/// A new file that reads, in /proc, as `path (deleted)`: made unnamed in
/// `path`'s directory (reached without following a link), given `path` for
/// a moment (only if the name is free: nothing is replaced), opened by it,
/// and unlinked again. Where the name is taken (a rotated log's new file,
/// say), it stays unnamed (`DIR/#INODE (deleted)`). Root-owned and 0600
/// while named: made for the restore only, and filled after.
pub fn make_deleted(path: &Path) -> Result<OwnedFd, UnlinkedFileError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    let make = |source: std::io::Error| UnlinkedFileError::Make {
        what: format!("a deleted file for {}", path.display()),
        source,
    };
    let (Some(parent), Some(base)) = (path.parent(), path.file_name()) else {
        return Err(make(std::io::Error::from_raw_os_error(libc::EINVAL)));
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    let dir = openat2(libc::AT_FDCWD, parent, how).map_err(|e| make(e.into()))?;
    // SAFETY: a new fd we own.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    let how = OpenHow::new()
        .flags(OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC)
        .mode(nix::sys::stat::Mode::from_bits_truncate(0o600))
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    let tmp = openat2(dir.as_raw_fd(), ".", how).map_err(|e| make(e.into()))?;
    // SAFETY: a new fd we own.
    let tmp = unsafe { OwnedFd::from_raw_fd(tmp) };
    let linked = nix::unistd::linkat(
        Some(tmp.as_raw_fd()),
        Path::new(""),
        Some(dir.as_raw_fd()),
        Path::new(base),
        nix::fcntl::AtFlags::AT_EMPTY_PATH,
    );
    if let Err(e) = linked {
        tracing::debug!(
            "{}: not named ({e}); the file stays unnamed",
            path.display()
        );
        return Ok(tmp);
    }
    // Opened by the name (not following a link), so that its /proc link
    // says `path`; it must be the file just made.
    let how = OpenHow::new()
        .flags(OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    let named = openat2(dir.as_raw_fd(), base, how)
        // SAFETY: a new fd we own.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let same = |fd: &OwnedFd| {
        let a = nix::sys::stat::fstat(fd.as_raw_fd());
        let b = nix::sys::stat::fstat(tmp.as_raw_fd());
        matches!((a, b), (Ok(a), Ok(b)) if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino))
    };
    let named = named.ok().filter(same);
    let unlinked = nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        base,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    match (named, unlinked) {
        (Some(fd), Ok(())) => Ok(fd),
        (_, Err(e)) => Err(make(e.into())),
        (None, Ok(())) => Ok(tmp),
    }
}

/// Give `fd` (`what` in errors) its size, `data` laid out at `extents`
/// (in order, one after the other in `data`), its permission bits and, if
/// given, its owner.
pub fn fill(
    fd: &OwnedFd,
    what: &str,
    size: u64,
    extents: &[Extent],
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), UnlinkedFileError> {
    let f = File::from(fd.try_clone().map_err(io("dup", what))?);
    f.set_len(size).map_err(io("ftruncate", what))?;
    let mut at = 0usize;
    for e in extents {
        let len = crate::usize_of(e.len);
        let bytes = data
            .get(at..at + len)
            .ok_or_else(|| io("filling", what)(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        f.write_all_at(bytes, e.offset)
            .map_err(io("writing", what))?;
        at += len;
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io("fchown", what))?;
    }
    // After the chown, which clears setuid and setgid.
    nix::sys::stat::fchmod(
        f.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777),
    )
    .map_err(|e| io("fchmod", what)(e.into()))?;
    Ok(())
}

/// A read-only open of the file `fd` is (the same file, a new open file
/// description).
pub fn read_only(fd: &OwnedFd, what: &str) -> Result<OwnedFd, UnlinkedFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(OwnedFd::from)
        .map_err(io("reopening read-only", what))
}

/// Add `seals` to the memfd `fd`.
pub fn add_seals(fd: &OwnedFd, what: &str, seals: u32) -> Result<(), UnlinkedFileError> {
    if seals == 0 {
        return Ok(());
    }
    // SAFETY: fcntl on an fd we own, with an int argument.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals.cast_signed()) };
    if r < 0 {
        return Err(io("F_ADD_SEALS", what)(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    #[test]
    fn a_sparse_memfd_is_read_as_its_data_runs_and_made_again_with_its_seals() {
        let fd = make_memfd("unit").unwrap();
        let mut f = File::from(fd.try_clone().unwrap());
        f.set_len(64 << 20).unwrap();
        f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        f.seek(std::io::SeekFrom::Start((64 << 20) - 5)).unwrap();
        f.write_all(b"end!!").unwrap();
        add_seals(&fd, "unit", F_SEAL_GROW | F_SEAL_SHRINK).unwrap();
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let opened = open_fd(std::process::id().cast_signed(), fd.as_raw_fd()).unwrap();
        let info = inspect(&opened, &path).unwrap();
        assert_eq!(info.size, 64 << 20);
        assert_eq!(info.seals, Some(F_SEAL_GROW | F_SEAL_SHRINK));
        assert_eq!(info.nlink, 0);
        assert!(!info.hugetlb);
        assert_eq!(info.dev, memfd_device().unwrap());
        let (ext, data) = read_contents(&opened, &path, info.size, 1 << 20).unwrap();
        // tmpfs reports data by page: two pages, not 64 MiB.
        assert_eq!(ext.len(), 2, "{ext:?}");
        assert_eq!(ext[0].offset, 1 << 20);
        assert_eq!(data.len(), 8192);
        assert_eq!(&data[..6], b"middle");
        assert_eq!(&data[8192 - 5..], b"end!!");
        // Over the limit: refused, naming the file.
        let e = read_contents(&opened, &path, info.size, 4096).unwrap_err();
        assert!(e.to_string().contains(&path), "{e}");

        let again = make_memfd("unit-again").unwrap();
        fill(&again, "again", info.size, &ext, &data, 0o640, None).unwrap();
        add_seals(&again, "again", info.seals.unwrap()).unwrap();
        let g = File::from(again);
        let back = inspect(&g, "again").unwrap();
        assert_eq!(
            (back.size, back.mode, back.seals),
            (64 << 20, 0o640, info.seals)
        );
        let mut buf = [0u8; 6];
        g.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(&buf, b"middle");
        // Seals hold: the file cannot grow.
        assert!(g.set_len(128 << 20).is_err());
        assert_eq!(
            std::fs::read_link(format!("/proc/self/fd/{}", g.as_raw_fd()))
                .unwrap()
                .to_str()
                .unwrap(),
            "/memfd:unit-again (deleted)"
        );
    }

    #[test]
    fn a_deleted_file_is_read_through_its_mapping_and_made_again_deleted_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gone");
        std::fs::write(&p, b"kept after the unlink").unwrap();
        let f = File::open(&p).unwrap();
        // SAFETY: a private read-only mapping of a file we hold open.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        drop(f);
        std::fs::remove_file(&p).unwrap();
        let start = addr as u64;
        let opened = open_mapping(std::process::id().cast_signed(), start, start + 4096).unwrap();
        let info = inspect(&opened, "mapping").unwrap();
        assert_eq!((info.nlink, info.size), (0, 21));
        // Seals: none on most file systems; tmpfs files take them and
        // start with F_SEAL_SEAL (a memfd is told apart by its device).
        assert!(
            matches!(info.seals, None | Some(F_SEAL_SEAL)),
            "{:?}",
            info.seals
        );
        let (ext, data) = read_contents(&opened, "mapping", info.size, 1 << 20).unwrap();
        assert_eq!(data, b"kept after the unlink");
        // SAFETY: unmapping what this test mapped.
        unsafe { libc::munmap(addr, 4096) };

        let again = make_deleted(&p).unwrap();
        fill(&again, "again", info.size, &ext, &data, 0o4755, None).unwrap();
        let g = File::from(again);
        let m = g.metadata().unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!(
            std::fs::read(format!("/proc/self/fd/{}", g.as_raw_fd())).unwrap(),
            data
        );
        // Named as it was, and gone from the directory.
        let link = std::fs::read_link(format!("/proc/self/fd/{}", g.as_raw_fd())).unwrap();
        assert_eq!(link.to_str().unwrap(), format!("{} (deleted)", p.display()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(inspect(&g, "again").unwrap().nlink, 0);

        // A name taken meanwhile is left alone: the file stays unnamed.
        std::fs::write(&p, b"someone else's").unwrap();
        let other = File::from(make_deleted(&p).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", other.as_raw_fd())).unwrap();
        assert!(link.to_str().unwrap().contains("/#"), "{link:?}");
        // Through a link: refused.
        let sub = dir.path().join("sub");
        std::os::unix::fs::symlink("/etc", &sub).unwrap();
        assert!(make_deleted(&sub.join("passwd")).is_err());
    }
}
