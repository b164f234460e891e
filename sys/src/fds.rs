//! A process's file descriptor table from /proc, and the bytes queued in its
//! pipes, read without consuming them (tee(2)).
//!
//! Each fd is classified by its /proc/PID/fd link and a stat through it;
//! offsets and flags (O_CLOEXEC included) come from /proc/PID/fdinfo/N. A
//! pipe's contents are read through a new read end opened from
//! /proc/PID/fd/N (which works even if the target only holds the write end)
//! and duplicated with tee into a pipe of our own, so the target's data
//! stays where it is.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    File {
        path: String,
        deleted: bool,
        dev: u64,
        ino: u64,
        size: u64,
    },
    /// An anonymous pipe end.
    Pipe {
        ino: u64,
        read_end: bool,
    },
    /// A named pipe: reopened by its path (its data lives in the FIFO).
    Fifo {
        path: String,
    },
    CharDev {
        path: String,
        rdev: u64,
    },
    Tty {
        path: String,
        rdev: u64,
    },
    Dir {
        path: String,
    },
    Socket {
        ino: u64,
    },
    /// `anon_inode:[eventfd]`, `[eventpoll]`, `[userfaultfd]`, ...
    Anon {
        what: String,
    },
    Other {
        link: String,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FdInfo {
    pub fd: i32,
    pub kind: FdKind,
    /// fdinfo `flags:` (octal there): access mode, status flags, O_CLOEXEC.
    pub flags: i32,
    pub pos: u64,
    pub mnt_id: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FdsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pipe fd {fd} of PID {pid}: {what}")]
    Pipe { pid: i32, fd: i32, what: String },
}

fn io(path: &str) -> impl FnOnce(std::io::Error) -> FdsError + '_ {
    move |source| FdsError::Io {
        path: path.to_string(),
        source,
    }
}

fn bracket_ino(link: &str, prefix: &str) -> Option<u64> {
    link.strip_prefix(prefix)?.strip_suffix(']')?.parse().ok()
}

/// The fd table of `pid`, ascending. An fd closed while we read is skipped.
pub fn fd_table(pid: i32) -> Result<Vec<FdInfo>, FdsError> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(io(&dir))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut out = Vec::new();
    for fd in fds {
        let lpath = format!("/proc/{pid}/fd/{fd}");
        let Ok(link) = std::fs::read_link(&lpath) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let flags = field("flags")
            .and_then(|v| i32::from_str_radix(v, 8).ok())
            .unwrap_or(0);
        let pos = field("pos").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mnt_id = field("mnt_id").and_then(|v| v.parse().ok());
        let kind = if let Some(ino) = bracket_ino(&link, "pipe:[") {
            FdKind::Pipe {
                ino,
                read_end: flags & libc::O_ACCMODE == libc::O_RDONLY,
            }
        } else if let Some(ino) = bracket_ino(&link, "socket:[") {
            FdKind::Socket { ino }
        } else if let Some(what) = link.strip_prefix("anon_inode:") {
            FdKind::Anon {
                what: what.to_string(),
            }
        } else if link.starts_with('/') {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let Ok(md) = std::fs::metadata(&lpath) else {
                continue;
            };
            let ft = md.file_type();
            let deleted = link.ends_with(" (deleted)");
            if ft.is_file() {
                FdKind::File {
                    path: link.trim_end_matches(" (deleted)").to_string(),
                    deleted,
                    dev: md.dev(),
                    ino: md.ino(),
                    size: md.size(),
                }
            } else if ft.is_dir() {
                FdKind::Dir { path: link }
            } else if ft.is_fifo() {
                FdKind::Fifo { path: link }
            } else if ft.is_char_device() {
                let major = libc::major(md.rdev());
                if link.starts_with("/dev/pts/")
                    || link.starts_with("/dev/tty")
                    || (136..=143).contains(&major)
                {
                    FdKind::Tty {
                        path: link,
                        rdev: md.rdev(),
                    }
                } else {
                    FdKind::CharDev {
                        path: link,
                        rdev: md.rdev(),
                    }
                }
            } else {
                FdKind::Other { link }
            }
        } else {
            FdKind::Other { link }
        };
        out.push(FdInfo {
            fd,
            kind,
            flags,
            pos,
            mnt_id,
        });
    }
    Ok(out)
}

/// pidfd_open + pidfd_getfd: a copy of `pid`'s fd in this process.
pub fn pidfd_getfd(pid: i32, fd: i32) -> Result<OwnedFd, FdsError> {
    // SAFETY: plain syscalls; the returned fds are fresh and owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io(&format!("pidfd_open({pid})"))(
                std::io::Error::last_os_error(),
            ));
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let r = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if r < 0 {
            return Err(io(&format!("pidfd_getfd({pid}, {fd})"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(OwnedFd::from_raw_fd(r as i32))
    }
}

/// Capacity of the pipe behind `pid`'s `fd`.
pub fn pipe_capacity(pid: i32, fd: i32) -> Result<usize, FdsError> {
    let f = pidfd_getfd(pid, fd)?;
    // SAFETY: fcntl on our own fd.
    let n = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if n < 0 {
        return Err(FdsError::Pipe {
            pid,
            fd,
            what: format!("F_GETPIPE_SZ: {}", std::io::Error::last_os_error()),
        });
    }
    Ok(n as usize)
}

/// Every byte queued in the pipe behind `pid`'s `fd`, left in place.
pub fn peek_pipe(pid: i32, fd: i32) -> Result<Vec<u8>, FdsError> {
    let err = |what: String| FdsError::Pipe { pid, fd, what };
    let path = format!("/proc/{pid}/fd/{fd}");
    let c = std::ffi::CString::new(path.clone()).expect("no NUL");
    // SAFETY: open/pipe2/fcntl/tee/read on fds we own.
    unsafe {
        let src = libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        );
        if src < 0 {
            return Err(err(format!(
                "opening {path} for reading: {}",
                std::io::Error::last_os_error()
            )));
        }
        let src = OwnedFd::from_raw_fd(src);
        let cap = libc::fcntl(src.as_raw_fd(), libc::F_GETPIPE_SZ).max(4096);
        let mut ours = [0i32; 2];
        if libc::pipe2(ours.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            return Err(err(format!("pipe2: {}", std::io::Error::last_os_error())));
        }
        let (rd, wr) = (OwnedFd::from_raw_fd(ours[0]), OwnedFd::from_raw_fd(ours[1]));
        if libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, cap) < cap {
            return Err(err(format!(
                "cannot size a pipe of {cap} bytes to copy it into: {} (raise /proc/sys/fs/pipe-max-size?)",
                std::io::Error::last_os_error()
            )));
        }
        let n = libc::tee(
            src.as_raw_fd(),
            wr.as_raw_fd(),
            cap as usize,
            libc::SPLICE_F_NONBLOCK,
        );
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(Vec::new()); // empty
            }
            return Err(err(format!("tee: {e}")));
        }
        let mut out = vec![0u8; n as usize];
        let mut got = 0;
        while got < out.len() {
            let r = libc::read(
                rd.as_raw_fd(),
                out[got..].as_mut_ptr().cast(),
                out.len() - got,
            );
            if r <= 0 {
                return Err(err(format!(
                    "reading the copy: {}",
                    std::io::Error::last_os_error()
                )));
            }
            got += r as usize;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own fd table: a file at an offset, /dev/null, a pipe with data
    /// (peeked without consuming), a socket, an eventfd.
    #[test]
    fn own_table_and_pipe_peek() {
        let me = std::process::id() as i32;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 20000]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        // SAFETY: lseek/pipe/write/socket/eventfd on fds we own.
        unsafe { libc::lseek(f.as_raw_fd(), 12345, libc::SEEK_SET) };
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut pf = [0i32; 2];
        assert_eq!(unsafe { libc::pipe(pf.as_mut_ptr()) }, 0);
        let data: Vec<u8> = (0..30000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            unsafe { libc::write(pf[1], data.as_ptr().cast(), data.len()) },
            30000
        );
        let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        let t = fd_table(me).unwrap();
        let get = |fd: i32| t.iter().find(|i| i.fd == fd).unwrap().clone();
        let fi = get(f.as_raw_fd());
        assert!(
            matches!(&fi.kind, FdKind::File { path, deleted: false, size: 20000, .. } if path.ends_with("/f"))
        );
        assert_eq!(fi.pos, 12345);
        assert_eq!(fi.flags & libc::O_ACCMODE, libc::O_RDWR);
        assert!(fi.flags & libc::O_CLOEXEC != 0);
        assert!(matches!(get(null.as_raw_fd()).kind, FdKind::CharDev { .. }));
        assert!(matches!(
            get(pf[0]).kind,
            FdKind::Pipe { read_end: true, .. }
        ));
        assert!(matches!(
            get(pf[1]).kind,
            FdKind::Pipe {
                read_end: false,
                ..
            }
        ));
        assert!(matches!(get(sock).kind, FdKind::Socket { .. }));
        assert!(matches!(&get(efd).kind, FdKind::Anon { what } if what.contains("eventfd")));
        // Peek through the write end, twice: the data stays.
        assert_eq!(peek_pipe(me, pf[1]).unwrap(), data);
        assert_eq!(peek_pipe(me, pf[0]).unwrap(), data);
        let mut back = vec![0u8; 30000];
        assert_eq!(
            unsafe { libc::read(pf[0], back.as_mut_ptr().cast(), 30000) },
            30000
        );
        assert_eq!(back, data);
        assert_eq!(peek_pipe(me, pf[0]).unwrap(), Vec::<u8>::new());
        unsafe {
            libc::close(pf[0]);
            libc::close(pf[1]);
            libc::close(sock);
            libc::close(efd);
        }
    }
}
