//! Image directories opened and written without following links.
//!
//! tern runs as root and writes into directories that users may own (`-D`
//! is often somewhere in a home directory), and reads images that others
//! may have written. This module owns every file-system access to an
//! image, so that:
//!
//! - every write lands inside the image directory and follows no link:
//!   the directory is resolved once, component by component, into a
//!   directory fd (a symlink on the way is followed only if root or tern's
//!   own user owns it; the directory itself may not be a symlink), and each
//!   file is created relative to that fd with `O_CREAT | O_EXCL |
//!   O_NOFOLLOW`, temporary names included (`write_atomic` creates
//!   `NAME.tmp-RANDOM` that way and renames it over `NAME`);
//! - images are private: directories tern creates are 0700 and files 0600
//!   whatever the umask (`fchmod` after creating: the umask can only take
//!   bits away, and an umask of 0277 would leave a file tern cannot write);
//! - every file read is opened `O_NOFOLLOW` relative to the directory fd,
//!   must be a regular file, and is read up to a fixed size: no input makes
//!   tern allocate gigabytes or read `/etc/shadow` through a planted link;
//! - every directory, symlink and file a read went through is recorded
//!   ([`Provenance`]), so that the restore can tell who could have written
//!   the image (see the restorer's trust rules).
//!
//! Images are durable only when [`sync_image`] says so (`fsync` of every
//! file, the directory, and the directory holding it).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::ImageError;

/// Largest JSON file read from an image (`process.json` of a process with
/// thousands of threads and fds stays far below).
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// Largest `pagemap.img` read (6.7 million entries).
pub const MAX_PAGEMAP_BYTES: u64 = 256 << 20;
/// Largest pipe contents read from `pipes/` (the kernel's pipe-max-size
/// defaults to 1 MiB; root may raise it).
pub const MAX_PIPE_BYTES: u64 = 64 << 20;
/// Symlinks followed while resolving one path (as the kernel's MAXSYMLINKS).
const MAX_LINKS: usize = 40;

/// What a path component or file was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvenanceKind {
    Dir,
    Symlink,
    File,
}

/// One directory, symlink or file a read went through: who owns it and
/// who may write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub path: PathBuf,
    pub kind: ProvenanceKind,
    pub uid: u32,
    pub gid: u32,
    /// `st_mode` permission bits (with the sticky bit).
    pub mode: u32,
}

impl Provenance {
    fn of(path: PathBuf, kind: ProvenanceKind, st: &libc::stat) -> Provenance {
        Provenance {
            path,
            kind,
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        }
    }
}

/// A file of an image begun under a temporary name
/// ([`ImageDir::begin_atomic`]), not yet under its own.
#[derive(Debug)]
pub struct PendingFile {
    name: String,
    tmp: String,
    file: File,
}

impl PendingFile {
    /// The name it will take.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// An image directory, held by an fd: renames of it or of the directories
/// above it do not redirect what is read or written.
#[derive(Debug)]
pub struct ImageDir {
    path: PathBuf,
    fd: OwnedFd,
    /// The directory holding this one, for `sync` (its entry for us).
    parent: Option<OwnedFd>,
}

fn cstr(path: &Path, name: &OsStr) -> Result<CString, ImageError> {
    CString::new(name.as_bytes()).map_err(|_| {
        ImageError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in the path"),
        )
    })
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
fn lstat_at(dirfd: i32, name: &CString) -> std::io::Result<libc::stat> {
    // SAFETY: fstatat fills the zeroed struct; name is NUL-terminated.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(last_err());
        }
        Ok(st)
    }
}

fn fstat(fd: i32) -> std::io::Result<libc::stat> {
    // SAFETY: fstat fills the zeroed struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(last_err());
        }
        Ok(st)
    }
}

fn open_at(dirfd: i32, name: &CString, flags: i32, mode: libc::mode_t) -> std::io::Result<OwnedFd> {
    // SAFETY: openat with a NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(last_err());
    }
    // SAFETY: a fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_kind(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

/// tern's effective uid.
fn euid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

/// How a path is resolved.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// For writing: missing directories are created (0700); a symlink is
    /// followed only if root or tern's user owns it; the last component
    /// must not be a symlink.
    Create,
    /// For reading: symlinks are followed and recorded.
    Read,
}

/// Resolve `path` to a directory, component by component, without letting
/// the kernel follow any link on its own. Returns the directory (opened
/// `O_RDONLY | O_DIRECTORY`), its parent, and what was gone through.
fn walk(path: &Path, how: Walk) -> Result<(OwnedFd, Option<OwnedFd>, Vec<Provenance>), ImageError> {
    let io = |p: &Path, e: std::io::Error| ImageError::io(p, e);
    // From `/` always: the directories above the working directory count
    // as much as those below it.
    let absolute;
    let path = if path.is_absolute() {
        path
    } else {
        absolute = std::env::current_dir()
            .map_err(|e| io(Path::new("."), e))?
            .join(path);
        &absolute
    };
    let start = "/";
    let mut cur = open_at(
        libc::AT_FDCWD,
        &CString::new(start).expect("no NUL"),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| io(Path::new(start), e))?;
    let mut seen = PathBuf::from("/");
    let mut prov = Vec::new();
    if let Ok(st) = fstat(cur.as_raw_fd()) {
        prov.push(Provenance::of(seen.clone(), ProvenanceKind::Dir, &st));
    }
    // Components still to resolve, last first.
    let mut todo: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    if todo.is_empty() {
        todo.push(".".into());
    }
    let mut parent: Option<OwnedFd> = None;
    let mut links = 0;
    while let Some(comp) = todo.pop() {
        let last = todo.is_empty();
        let name = cstr(path, &comp)?;
        let here = seen.join(&comp);
        let st = match lstat_at(cur.as_raw_fd(), &name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && how == Walk::Create => {
                // SAFETY: mkdirat relative to a directory fd we hold.
                if unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o700) } != 0 {
                    let e = last_err();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(io(&here, e));
                    }
                }
                let st = lstat_at(cur.as_raw_fd(), &name).map_err(|e| io(&here, e))?;
                if is_kind(&st, libc::S_IFDIR) && st.st_uid == euid() {
                    // 0700 whatever the umask (it can only have taken bits away).
                    // SAFETY: fchmodat on the entry we just made, not following links.
                    unsafe { libc::fchmodat(cur.as_raw_fd(), name.as_ptr(), 0o700, 0) };
                }
                lstat_at(cur.as_raw_fd(), &name).map_err(|e| io(&here, e))?
            }
            Err(e) => return Err(io(&here, e)),
        };
        if is_kind(&st, libc::S_IFLNK) {
            let own = st.st_uid == 0 || st.st_uid == euid();
            if how == Walk::Create && last {
                return Err(ImageError::Unsafe {
                    path: here,
                    what: "is a symbolic link; give the directory itself (tern never writes through a link)".into(),
                });
            }
            if how == Walk::Create && !own {
                return Err(ImageError::Unsafe {
                    path: here,
                    what: format!(
                        "is a symbolic link owned by uid {}, who could point it anywhere; give a path without it",
                        st.st_uid
                    ),
                });
            }
            prov.push(Provenance::of(here.clone(), ProvenanceKind::Symlink, &st));
            links += 1;
            if links > MAX_LINKS {
                return Err(io(&here, std::io::Error::from_raw_os_error(libc::ELOOP)));
            }
            let mut buf = vec![0u8; libc::PATH_MAX as usize];
            // SAFETY: readlinkat into a buffer of the given length.
            let n = unsafe {
                libc::readlinkat(
                    cur.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io(&here, last_err()));
            }
            buf.truncate(n as usize);
            let target = PathBuf::from(OsStr::from_bytes(&buf));
            if target.is_absolute() {
                cur = open_at(
                    libc::AT_FDCWD,
                    &CString::new("/").expect("no NUL"),
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                )
                .map_err(|e| io(Path::new("/"), e))?;
                seen = PathBuf::from("/");
            }
            let before = todo.len();
            for c in target.components().rev() {
                match c {
                    Component::Normal(n) => todo.push(n.to_os_string()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
            if todo.len() == before {
                todo.push(".".into());
            }
            continue;
        }
        if !is_kind(&st, libc::S_IFDIR) {
            return Err(io(&here, std::io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let kind = if last {
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW
        };
        let next = open_at(cur.as_raw_fd(), &name, kind, 0).map_err(|e| io(&here, e))?;
        // The entry may have been replaced between the stat and the open:
        // what counts is what was opened.
        let st = fstat(next.as_raw_fd()).map_err(|e| io(&here, e))?;
        prov.push(Provenance::of(here.clone(), ProvenanceKind::Dir, &st));
        if last {
            parent = Some(
                open_at(
                    cur.as_raw_fd(),
                    &CString::new(".").expect("no NUL"),
                    libc::O_RDONLY | libc::O_DIRECTORY,
                    0,
                )
                .map_err(|e| io(&seen, e))?,
            );
        }
        seen = if comp == ".." {
            seen.parent().map(Path::to_path_buf).unwrap_or(seen)
        } else if comp == "." {
            seen
        } else {
            here
        };
        cur = next;
    }
    Ok((cur, parent, prov))
}

/// Whether `mode` lets group or others write.
pub fn writable_by_others(mode: u32) -> bool {
    mode & 0o022 != 0
}

/// Whether a directory's entries may be replaced by anyone who may write it
/// (no sticky bit).
pub fn replaceable_by_writers(mode: u32) -> bool {
    mode & libc::S_ISVTX == 0
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom fills the buffer (a short read leaves zeros: the
    // name is then less random, and O_EXCL still refuses a taken one).
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ImageDir {
    /// Open `path` for writing an image, creating it (and missing parents)
    /// 0700. Refused: a `path` that is a symlink, a symlink on the way that
    /// someone other than root or tern's user owns, and a directory that
    /// others may write into while another user owns it or without the
    /// sticky bit.
    pub fn create(path: &Path) -> Result<ImageDir, ImageError> {
        let (fd, parent, prov) = walk(path, Walk::Create)?;
        let me = prov.last().expect("the walk records the directory");
        let (uid, mode) = (me.uid, me.mode);
        if writable_by_others(mode) && (uid != euid() || replaceable_by_writers(mode)) {
            return Err(ImageError::Unsafe {
                path: path.to_path_buf(),
                what: format!(
                    "is owned by uid {uid} with mode {mode:04o}: others may write into it{}; give a directory only its owner may write (chmod go-w)",
                    if replaceable_by_writers(mode) {
                        " and replace what tern writes"
                    } else {
                        ""
                    }
                ),
            });
        }
        Ok(ImageDir {
            path: path.to_path_buf(),
            fd,
            parent,
        })
    }

    /// Open `path` for reading an image: returns the directory and every
    /// directory and symlink the path went through.
    pub fn open(path: &Path) -> Result<(ImageDir, Vec<Provenance>), ImageError> {
        let (fd, parent, prov) = walk(path, Walk::Read)?;
        Ok((
            ImageDir {
                path: path.to_path_buf(),
                fd,
                parent,
            },
            prov,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory, for messages.
    pub fn child(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn name(&self, name: &str) -> Result<CString, ImageError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(ImageError::corrupt(
                &self.path,
                format!("{name:?} is not a plain file name"),
            ));
        }
        cstr(&self.path, OsStr::new(name))
    }

    /// The subdirectory `name` (tern's own: `pipes`, `live`), created 0700
    /// if missing; a link or file under that name is removed first, never
    /// followed.
    pub fn create_subdir(&self, name: &str) -> Result<ImageDir, ImageError> {
        let c = self.name(name)?;
        let path = self.child(name);
        if lstat_at(self.fd.as_raw_fd(), &c).is_ok_and(|st| !is_kind(&st, libc::S_IFDIR)) {
            self.remove_file(name)?;
        }
        // SAFETY: mkdirat relative to our directory fd.
        if unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o700) } == 0 {
            // SAFETY: fchmodat on the entry just made, not following links.
            unsafe { libc::fchmodat(self.fd.as_raw_fd(), c.as_ptr(), 0o700, 0) };
        } else {
            let e = last_err();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(ImageError::io(&path, e));
            }
        }
        let fd = open_at(
            self.fd.as_raw_fd(),
            &c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| self.dir_open_error(&c, &path, e))?;
        let parent = self.dup()?;
        Ok(ImageDir {
            path,
            fd,
            parent: Some(parent),
        })
    }

    /// The subdirectory `name` for reading, if it exists (a symlink is
    /// refused), with what it is.
    pub fn open_subdir(&self, name: &str) -> Result<Option<(ImageDir, Provenance)>, ImageError> {
        let c = self.name(name)?;
        let path = self.child(name);
        match open_at(
            self.fd.as_raw_fd(),
            &c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        ) {
            Ok(fd) => {
                let st = fstat(fd.as_raw_fd()).map_err(|e| ImageError::io(&path, e))?;
                let prov = Provenance::of(path.clone(), ProvenanceKind::Dir, &st);
                Ok(Some((
                    ImageDir {
                        path,
                        fd,
                        parent: Some(self.dup()?),
                    },
                    prov,
                )))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(self.dir_open_error(&c, &path, e)),
        }
    }

    /// The error of an `O_DIRECTORY | O_NOFOLLOW` open of `name`: a link
    /// there gives ENOTDIR, not ELOOP, so it is looked at to say so.
    fn dir_open_error(&self, name: &CString, path: &Path, e: std::io::Error) -> ImageError {
        let link = lstat_at(self.fd.as_raw_fd(), name).is_ok_and(|st| is_kind(&st, libc::S_IFLNK));
        link_or(
            path,
            if link {
                std::io::Error::from_raw_os_error(libc::ELOOP)
            } else {
                e
            },
        )
    }

    fn dup(&self) -> Result<OwnedFd, ImageError> {
        self.fd
            .try_clone()
            .map_err(|e| ImageError::io(&self.path, e))
    }

    /// Create the regular file `name` (it must not exist: `O_EXCL`, so a
    /// planted link or file is never written through), mode 0600.
    pub fn create_file(&self, name: &str) -> Result<File, ImageError> {
        let c = self.name(name)?;
        let path = self.child(name);
        let fd = open_at(
            self.fd.as_raw_fd(),
            &c,
            libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_RDWR,
            0o600,
        )
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                ImageError::Unsafe {
                    path: path.clone(),
                    what: "already exists (tern creates each file of an image itself, never writing into one that is there); give an empty directory".into(),
                }
            } else {
                ImageError::io(&path, e)
            }
        })?;
        // 0600 whatever the umask.
        // SAFETY: fchmod on our own fd.
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
            return Err(ImageError::io(&path, last_err()));
        }
        Ok(File::from(fd))
    }

    /// Open the regular file `name` read-write, creating it (0600) if it is
    /// missing; a link there is refused, never followed.
    pub fn open_or_create_file(&self, name: &str) -> Result<File, ImageError> {
        let c = self.name(name)?;
        let path = self.child(name);
        let fd = open_at(
            self.fd.as_raw_fd(),
            &c,
            libc::O_CREAT | libc::O_NOFOLLOW | libc::O_RDWR,
            0o600,
        )
        .map_err(|e| link_or(&path, e))?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| ImageError::io(&path, e))?;
        if !is_kind(&st, libc::S_IFREG) {
            return Err(ImageError::Unsafe {
                path,
                what: "is not a regular file".into(),
            });
        }
        Ok(File::from(fd))
    }

    /// Take an exclusive `flock` on the lock file `name` (created 0600 if
    /// missing), held as long as the returned file is open. `Ok(None)`: it
    /// was still held by someone else after `wait`. A holder that lets go
    /// within `wait` (a tern sweeping stale locks, a probe of whether a
    /// service runs) is waited for, not reported as a second tern; a file
    /// its last holder removed while we opened it is reopened, since a lock
    /// on a removed file keeps nobody out.
    pub fn lock_file(
        &self,
        name: &str,
        wait: std::time::Duration,
    ) -> Result<Option<File>, ImageError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let file = self.open_or_create_file(name)?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                if self.is_same_file(name, &file) {
                    return Ok(Some(file));
                }
            } else {
                let e = last_err();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(ImageError::io(&self.child(name), e));
                }
                std::thread::sleep(std::time::Duration::from_micros(250));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// Whether `name` is still the file `f` (not removed or replaced since
    /// it was opened).
    pub fn is_same_file(&self, name: &str, f: &File) -> bool {
        let (Ok(c), Ok(a)) = (self.name(name), fstat(f.as_raw_fd())) else {
            return false;
        };
        lstat_at(self.fd.as_raw_fd(), &c)
            .is_ok_and(|b| a.st_dev == b.st_dev && a.st_ino == b.st_ino)
    }

    /// Write `bytes` as `name`, atomically: into a new temporary file (its
    /// name random, created `O_EXCL | O_NOFOLLOW`), optionally fsynced, then
    /// renamed over `name` (a rename replaces a link, it never follows it).
    pub fn write_atomic(&self, name: &str, bytes: &[u8], sync: bool) -> Result<(), ImageError> {
        let pending = self.begin_atomic(name)?;
        self.commit_atomic(pending, bytes, sync)
    }

    /// The first half of [`ImageDir::write_atomic`]: the temporary file,
    /// created now (a writer that must be quick later creates its files
    /// ahead: a create costs 60-130 µs on ext4 here, a write and a rename
    /// less).
    pub fn begin_atomic(&self, name: &str) -> Result<PendingFile, ImageError> {
        let tmp = format!("{name}.tmp-{}", random_suffix());
        let file = self.create_file(&tmp)?;
        Ok(PendingFile {
            name: name.to_string(),
            tmp,
            file,
        })
    }

    /// The second half of [`ImageDir::write_atomic`]: `bytes` into the
    /// temporary file, which then takes its name.
    pub fn commit_atomic(
        &self,
        mut pending: PendingFile,
        bytes: &[u8],
        sync: bool,
    ) -> Result<(), ImageError> {
        let tmp_path = self.child(&pending.tmp);
        let f = &mut pending.file;
        let res = f
            .write_all(bytes)
            .and_then(|_| if sync { f.sync_all() } else { Ok(()) })
            .map_err(|e| ImageError::io(&tmp_path, e))
            .and_then(|_| self.rename(&pending.tmp, &pending.name));
        if res.is_err() {
            let _ = self.remove_file(&pending.tmp);
        }
        res
    }

    /// Give up a file begun with [`ImageDir::begin_atomic`].
    pub fn abandon_atomic(&self, pending: PendingFile) {
        let _ = self.remove_file(&pending.tmp);
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), ImageError> {
        let (a, b) = (self.name(from)?, self.name(to)?);
        // SAFETY: renameat within our directory fd.
        if unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                a.as_ptr(),
                self.fd.as_raw_fd(),
                b.as_ptr(),
            )
        } != 0
        {
            return Err(ImageError::io(&self.child(to), last_err()));
        }
        Ok(())
    }

    /// Open the regular file `name` for reading (or for writing, `write`),
    /// not following a link. None if it does not exist.
    pub fn open_file(
        &self,
        name: &str,
        write: bool,
    ) -> Result<Option<(File, Provenance)>, ImageError> {
        let c = self.name(name)?;
        let path = self.child(name);
        let acc = if write { libc::O_RDWR } else { libc::O_RDONLY };
        // O_NONBLOCK: a FIFO planted under an image file's name must not
        // block the open (it is refused below as not a regular file).
        let fd = match open_at(
            self.fd.as_raw_fd(),
            &c,
            acc | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        ) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(link_or(&path, e)),
        };
        let st = fstat(fd.as_raw_fd()).map_err(|e| ImageError::io(&path, e))?;
        if !is_kind(&st, libc::S_IFREG) {
            return Err(ImageError::Unsafe {
                path,
                what: "is not a regular file".into(),
            });
        }
        // Back to blocking reads.
        // SAFETY: fcntl on our own fd.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, acc) };
        let prov = Provenance::of(path, ProvenanceKind::File, &st);
        Ok(Some((File::from(fd), prov)))
    }

    /// Read the regular file `name`, at most `limit` bytes: every file of
    /// an image is read through here ([`MAX_JSON_BYTES`] for the JSON
    /// files, [`MAX_PAGEMAP_BYTES`], [`MAX_PIPE_BYTES`]). A larger file is
    /// refused ([`ImageError::TooLarge`]), not truncated, and is not read:
    /// its size is checked on the opened file first, and the read stops
    /// one byte past the limit should it grow meanwhile.
    pub fn read_file(&self, name: &str, limit: u64) -> Result<(Vec<u8>, Provenance), ImageError> {
        let path = self.child(name);
        let (f, prov) = self.open_file(name, false)?.ok_or_else(|| {
            ImageError::io(&path, std::io::Error::from_raw_os_error(libc::ENOENT))
        })?;
        let size = f.metadata().map_err(|e| ImageError::io(&path, e))?.len();
        if size > limit {
            return Err(ImageError::TooLarge { path, size, limit });
        }
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| ImageError::io(&path, e))?;
        if buf.len() as u64 > limit {
            return Err(ImageError::TooLarge {
                path,
                size: buf.len() as u64,
                limit,
            });
        }
        Ok((buf, prov))
    }

    /// Whether anything (a file, a link, ...) is called `name` here.
    pub fn exists(&self, name: &str) -> bool {
        self.name(name)
            .ok()
            .is_some_and(|c| lstat_at(self.fd.as_raw_fd(), &c).is_ok())
    }

    /// Remove the entry `name` (a link itself, never its target); a missing
    /// one is fine.
    pub fn remove_file(&self, name: &str) -> Result<(), ImageError> {
        let c = self.name(name)?;
        // SAFETY: unlinkat within our directory fd.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            let e = last_err();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(ImageError::io(&self.child(name), e));
            }
        }
        Ok(())
    }

    /// Remove the subdirectory `name` and what tern wrote in it (files and
    /// its own subdirectories, never following a link); a missing one is
    /// fine, and a link or file under that name is removed itself.
    pub fn remove_subdir(&self, name: &str) -> Result<(), ImageError> {
        let c = self.name(name)?;
        match lstat_at(self.fd.as_raw_fd(), &c) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(ImageError::io(&self.child(name), e)),
            Ok(st) if !is_kind(&st, libc::S_IFDIR) => return self.remove_file(name),
            Ok(_) => {}
        }
        if let Some((sub, _)) = self.open_subdir(name)? {
            for entry in sub.list()? {
                sub.remove_subdir(&entry)?;
            }
        }
        // SAFETY: unlinkat(AT_REMOVEDIR) within our directory fd.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            let e = last_err();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(ImageError::io(&self.child(name), e));
            }
        }
        Ok(())
    }

    /// The names in this directory (without `.` and `..`).
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        // Read through /proc/self/fd: std's read_dir wants a path, and this
        // one names exactly the directory we hold.
        let via = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        let mut out: Vec<String> = std::fs::read_dir(&via)
            .map_err(|e| ImageError::io(&self.path, e))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// fsync this directory (its entries) and the one holding it (its own
    /// entry).
    pub fn sync(&self) -> Result<(), ImageError> {
        fsync_fd(self.fd.as_raw_fd()).map_err(|e| ImageError::io(&self.path, e))?;
        if let Some(p) = &self.parent {
            let at = self.path.parent().unwrap_or(Path::new("/"));
            fsync_fd(p.as_raw_fd()).map_err(|e| ImageError::io(at, e))?;
        }
        Ok(())
    }

    /// Make this directory 0700 if tern's user owns it (a state directory
    /// made by an older tern, or by hand).
    pub fn make_private(&self) -> Result<(), ImageError> {
        let st = fstat(self.fd.as_raw_fd()).map_err(|e| ImageError::io(&self.path, e))?;
        if st.st_uid == euid() && st.st_mode & 0o077 != 0 {
            // SAFETY: fchmod on our own directory fd.
            if unsafe { libc::fchmod(self.fd.as_raw_fd(), 0o700) } != 0 {
                return Err(ImageError::io(&self.path, last_err()));
            }
        }
        Ok(())
    }

    /// This directory's own owner and mode.
    pub fn provenance(&self) -> Result<Provenance, ImageError> {
        let st = fstat(self.fd.as_raw_fd()).map_err(|e| ImageError::io(&self.path, e))?;
        Ok(Provenance::of(self.path.clone(), ProvenanceKind::Dir, &st))
    }
}

fn fsync_fd(fd: i32) -> std::io::Result<()> {
    // SAFETY: fsync on an fd we hold.
    if unsafe { libc::fsync(fd) } != 0 {
        return Err(last_err());
    }
    Ok(())
}

/// ELOOP from an `O_NOFOLLOW` open means a symlink: say so.
fn link_or(path: &Path, e: std::io::Error) -> ImageError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        ImageError::Unsafe {
            path: path.to_path_buf(),
            what: "is a symbolic link; tern never reads or writes an image file through a link"
                .into(),
        }
    } else {
        ImageError::io(path, e)
    }
}

/// Put the image in `dir` on stable storage: every regular file in it and
/// in its subdirectories, the directories themselves, and the directory
/// holding it.
pub fn sync_image(dir: &Path) -> Result<(), ImageError> {
    let (d, _) = ImageDir::open(dir)?;
    sync_tree(&d)
}

fn sync_tree(d: &ImageDir) -> Result<(), ImageError> {
    for name in d.list()? {
        if let Some((sub, _)) = d.open_subdir(&name).ok().flatten() {
            sync_tree(&sub)?;
            continue;
        }
        if let Some((f, _)) = d.open_file(&name, false).ok().flatten() {
            fsync_fd(f.as_raw_fd()).map_err(|e| ImageError::io(&d.child(&name), e))?;
        }
    }
    d.sync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_lock_held_for_a_moment_is_waited_for_one_kept_is_reported() {
        use std::time::{Duration, Instant};
        let root = tempfile::tempdir().unwrap();
        let d = ImageDir::create(root.path()).unwrap();
        // A holder that lets go after 20 ms (a sweep, a probe): taken.
        let held = d.lock_file("t.lock", Duration::ZERO).unwrap().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        let got = d.lock_file("t.lock", Duration::from_millis(500)).unwrap();
        assert!(got.is_some(), "a lock let go after 20 ms was not taken");
        t.join().unwrap();
        // A holder that keeps it: reported after the wait, not before.
        let start = Instant::now();
        assert!(
            d.lock_file("t.lock", Duration::from_millis(50))
                .unwrap()
                .is_none()
        );
        assert!(start.elapsed() >= Duration::from_millis(50));
        // Removed by its holder while held (as tern's locks are at the
        // end): a new file is locked, not the removed one.
        let old = got.unwrap();
        d.remove_file("t.lock").unwrap();
        let new = d.lock_file("t.lock", Duration::ZERO).unwrap().unwrap();
        assert!(d.is_same_file("t.lock", &new));
        assert!(!d.is_same_file("t.lock", &old));
    }

    #[test]
    fn files_are_private_whatever_the_umask() {
        let root = tempfile::tempdir().unwrap();
        // SAFETY: umask has no preconditions (tests in this module only).
        let old = unsafe { libc::umask(0o022) };
        let d = ImageDir::create(&root.path().join("a/b")).unwrap();
        d.write_atomic("x.json", b"{}", false).unwrap();
        let sub = d.create_subdir("pipes").unwrap();
        drop(sub.create_file("p.bin").unwrap());
        // SAFETY: umask(2) takes and returns an integer.
        unsafe { libc::umask(old) };
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&root.path().join("a/b")), 0o700);
        assert_eq!(mode(&root.path().join("a/b/x.json")), 0o600);
        assert_eq!(mode(&root.path().join("a/b/pipes")), 0o700);
        assert_eq!(mode(&root.path().join("a/b/pipes/p.bin")), 0o600);
        // No temporary file left.
        assert_eq!(d.list().unwrap(), vec!["pipes", "x.json"]);
    }

    #[test]
    fn links_are_never_written_through() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = root.path().join("img");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("pages.img")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("inv.json")).unwrap();
        let d = ImageDir::create(&dir).unwrap();
        let err = d.create_file("pages.img").unwrap_err().to_string();
        assert!(err.contains("pages.img"), "{err}");
        // An atomic write replaces the link itself.
        d.write_atomic("inv.json", b"{}", false).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(
            !std::fs::symlink_metadata(dir.join("inv.json"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // Reading through a link is refused.
        let err = d.read_file("pages.img", 100).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        // The directory itself a link: refused for writing.
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = ImageDir::create(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        // A link on the way owned by another user: refused for writing.
        let other = root.path().join("other");
        std::os::unix::fs::symlink(root.path(), &other).unwrap();
        // SAFETY: lchown of our own test link.
        let c = CString::new(other.as_os_str().as_bytes()).unwrap();
        // SAFETY: the path is a NUL-terminated CString that outlives the call.
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), 1001, 1001) }, 0);
        let err = ImageDir::create(&other.join("img"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("uid 1001"), "{err}");
        // For reading it is followed and recorded.
        let (_, prov) = ImageDir::open(&other.join("img")).unwrap();
        assert!(
            prov.iter()
                .any(|p| p.kind == ProvenanceKind::Symlink && p.uid == 1001),
            "{prov:?}"
        );
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ImageDir::create(&dir).unwrap_err().to_string();
        assert!(err.contains("others may write"), "{err}");
        // Owned by another user and group-writable: refused too.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
        std::os::unix::fs::chown(&dir, Some(1001), Some(1001)).unwrap();
        assert!(ImageDir::create(&dir).is_err());
        // Owned by another user, only its owner may write: allowed.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = ImageDir::create(&dir).unwrap();
        drop(d.create_file("f").unwrap());
        assert_eq!(std::fs::metadata(dir.join("f")).unwrap().uid(), euid());
    }

    #[test]
    fn oversized_files_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let d = ImageDir::create(root.path()).unwrap();
        d.write_atomic("big", &[1u8; 100], false).unwrap();
        assert_eq!(d.read_file("big", 100).unwrap().0.len(), 100);
        let err = d.read_file("big", 99).unwrap_err();
        assert!(
            matches!(
                &err,
                ImageError::TooLarge {
                    size: 100,
                    limit: 99,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&root.path().join("big").display().to_string())
                && msg.contains("100 bytes")
                && msg.contains("99"),
            "{msg}"
        );
    }

    #[test]
    fn an_oversized_file_is_refused_without_being_read() {
        // A sparse file of 1 TiB: reading it whole would take long and
        // allocate it all; its size alone refuses it.
        let root = tempfile::tempdir().unwrap();
        let d = ImageDir::create(root.path()).unwrap();
        d.create_file("huge").unwrap().set_len(1 << 40).unwrap();
        let t = std::time::Instant::now();
        let err = d.read_file("huge", MAX_JSON_BYTES).unwrap_err();
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(
            matches!(&err, ImageError::TooLarge { size, limit: MAX_JSON_BYTES, .. } if *size == 1 << 40),
            "{err:?}"
        );
    }
}
