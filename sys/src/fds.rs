//! A process's file descriptor table, read from /proc, and the bytes queued
//! in its pipes, copied without consuming them.
//!
//! This module owns what tern knows about another process's fds: the dump
//! records one [`FdInfo`] per fd and the contents of every pipe; the restore
//! reopens each fd from its [`FdKind`] and refills the pipes.
//!
//! Each fd is classified by its /proc/PID/fd/N link and a stat through that
//! link (which reaches the open object itself: dev, ino, rdev, size, type);
//! its offset, mount and flags, O_CLOEXEC included (the kernel folds the
//! fd's close-on-exec bit into fdinfo's `flags:`), come from
//! /proc/PID/fdinfo/N. The three are separate reads of a table that may be
//! changing, so a reading is only kept when the link did not change across
//! it and the inode numbers agree; an fd closed meanwhile is skipped.
//!
//! A pipe's contents are read through a new read end opened from
//! /proc/PID/fd/N (that works even when the target only holds the write
//! end) and duplicated with tee(2) into a pipe of our own of the same
//! capacity: tee copies buffer references and leaves the target's pipe as
//! it was.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// What an fd refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// A regular file (also a memfd: `/memfd:NAME`, deleted).
    File {
        /// As the kernel prints it, without the ` (deleted)` suffix.
        path: String,
        /// Unlinked while open: the path no longer names it.
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
    /// A named pipe: reopened by its path; the bytes queued in it are
    /// saved like a pipe's (they go when its last fd closes).
    Fifo {
        path: String,
        dev: u64,
        ino: u64,
    },
    CharDev {
        path: String,
        rdev: u64,
    },
    /// A terminal: a pty master or slave, a console, a serial line.
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
    /// `[eventfd]`, `[eventpoll]`, `[userfaultfd]`, `[signalfd]`, ...: the
    /// link without its `anon_inode:` prefix.
    Anon {
        what: String,
    },
    /// Anything else (a namespace, a block device, an O_PATH to a socket
    /// file, ...): the link as read.
    Other {
        link: String,
    },
}

/// One fd of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdInfo {
    pub fd: i32,
    pub kind: FdKind,
    /// fdinfo `flags:` (octal there): access mode, status flags, O_CLOEXEC.
    pub flags: i32,
    /// fdinfo `pos:`, the file offset.
    pub pos: u64,
    /// fdinfo `mnt_id:`, the mount the file was opened through.
    pub mnt_id: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FdsError {
    #[error(
        "listing the fds of PID {pid} ({path}): {source}; check that the process exists and that this user may ptrace it"
    )]
    List {
        pid: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd} of PID {pid}: {what}: {source}")]
    Fd {
        pid: i32,
        fd: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "fd {fd} of PID {pid}: /proc/{pid}/fdinfo/{fd} has no pos/flags lines ({text:?}); is /proc a Linux procfs?"
    )]
    Fdinfo { pid: i32, fd: i32, text: String },
    #[error(
        "fd {fd} of PID {pid} kept changing while tern read it ({tries} tries): freeze the process before reading its fds"
    )]
    Changing { pid: i32, fd: i32, tries: u32 },
    #[error(
        "fd {fd} of PID {pid} is not a pipe or FIFO ({link}): only those have queued data tern can copy"
    )]
    NotAPipe { pid: i32, fd: i32, link: String },
    #[error("pipe fd {fd} of PID {pid}: {what}")]
    Pipe { pid: i32, fd: i32, what: String },
}

/// How often a changing fd is read again before giving up.
const TRIES: u32 = 8;

/// "gone" for the errors that mean the fd (or the process) went away.
fn gone(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

fn bracket_ino(link: &str, prefix: &str) -> Option<u64> {
    link.strip_prefix(prefix)?.strip_suffix(']')?.parse().ok()
}

/// The fields of an fdinfo file that every kind has.
struct FdinfoFields {
    flags: i32,
    pos: u64,
    mnt_id: Option<u64>,
    ino: Option<u64>,
}

fn parse_fdinfo(text: &str) -> Option<FdinfoFields> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    Some(FdinfoFields {
        flags: i32::from_str_radix(field("flags")?, 8).ok()?,
        pos: field("pos")?.parse().ok()?,
        mnt_id: field("mnt_id").and_then(|v| v.parse().ok()),
        ino: field("ino").and_then(|v| v.parse().ok()),
    })
}

/// Whether `path` (as seen from here) still names the object `md`.
fn same_file(path: &str, md: &Metadata) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.dev() == md.dev() && m.ino() == md.ino())
}

/// Terminal majors (include/uapi/linux/major.h): TTY_MAJOR 4, TTYAUX_MAJOR
/// 5 (tty, console, ptmx), UNIX98_PTY_MASTER_MAJOR 128..135,
/// UNIX98_PTY_SLAVE_MAJOR 136..143.
fn is_tty_major(major: u32) -> bool {
    matches!(major, 4 | 5 | 128..=143)
}

/// The kind of an fd from its link and the stat through it; None if the
/// two disagree (the fd was replaced between the reads).
fn classify(link: &str, md: &Metadata, flags: i32) -> Option<FdKind> {
    if let Some(ino) = bracket_ino(link, "pipe:[") {
        return (md.ino() == ino).then_some(FdKind::Pipe {
            ino,
            read_end: flags & libc::O_ACCMODE == libc::O_RDONLY,
        });
    }
    if let Some(ino) = bracket_ino(link, "socket:[") {
        return (md.ino() == ino).then_some(FdKind::Socket { ino });
    }
    if let Some(what) = link.strip_prefix("anon_inode:") {
        return Some(FdKind::Anon {
            what: what.to_string(),
        });
    }
    if !link.starts_with('/') {
        return Some(FdKind::Other {
            link: link.to_string(),
        });
    }
    let ft = md.file_type();
    let path = link.to_string();
    Some(if ft.is_file() {
        // " (deleted)" is also a legal end of a file name: believe it only
        // if the name no longer leads to this file.
        match link.strip_suffix(" (deleted)") {
            Some(p) if !same_file(link, md) => FdKind::File {
                path: p.to_string(),
                deleted: true,
                dev: md.dev(),
                ino: md.ino(),
                size: md.size(),
            },
            _ => FdKind::File {
                path,
                deleted: false,
                dev: md.dev(),
                ino: md.ino(),
                size: md.size(),
            },
        }
    } else if ft.is_dir() {
        FdKind::Dir { path }
    } else if ft.is_fifo() {
        FdKind::Fifo {
            path,
            dev: md.dev(),
            ino: md.ino(),
        }
    } else if ft.is_char_device() {
        let rdev = md.rdev();
        if is_tty_major(libc::major(rdev)) {
            FdKind::Tty { path, rdev }
        } else {
            FdKind::CharDev { path, rdev }
        }
    } else {
        FdKind::Other { link: path }
    })
}

enum Reading {
    Gone,
    Changed,
    Got(FdInfo),
}

/// The error of `what`, done to `pid`'s `fd`.
fn fd_err(pid: i32, fd: i32, what: String) -> impl FnOnce(std::io::Error) -> FdsError {
    move |source| FdsError::Fd {
        pid,
        fd,
        what,
        source,
    }
}

/// One consistent reading of `pid`'s `fd`: link, fdinfo and stat, then the
/// link again.
fn read_fd(pid: i32, fd: i32) -> Result<Reading, FdsError> {
    let lpath = format!("/proc/{pid}/fd/{fd}");
    let ipath = format!("/proc/{pid}/fdinfo/{fd}");
    let err = |what: String| fd_err(pid, fd, what);
    macro_rules! get {
        ($e:expr, $what:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) if gone(&e) => return Ok(Reading::Gone),
                Err(e) => return Err(err($what)(e)),
            }
        };
    }
    let link = get!(std::fs::read_link(&lpath), format!("readlink {lpath}"));
    let text = get!(std::fs::read_to_string(&ipath), format!("reading {ipath}"));
    let md = get!(std::fs::metadata(&lpath), format!("stat {lpath}"));
    let again = get!(std::fs::read_link(&lpath), format!("readlink {lpath}"));
    if link != again {
        return Ok(Reading::Changed);
    }
    let link = link.to_string_lossy().into_owned();
    let Some(info) = parse_fdinfo(&text) else {
        return Err(FdsError::Fdinfo { pid, fd, text });
    };
    if info.ino.is_some_and(|ino| ino != md.ino()) {
        return Ok(Reading::Changed);
    }
    let Some(kind) = classify(&link, &md, info.flags) else {
        return Ok(Reading::Changed);
    };
    Ok(Reading::Got(FdInfo {
        fd,
        kind,
        flags: info.flags,
        pos: info.pos,
        mnt_id: info.mnt_id,
    }))
}

/// The fd table of `pid`, by ascending fd. An fd closed while it is read is
/// left out; one that keeps being replaced is an error (freeze first).
pub fn fd_table(pid: i32) -> Result<Vec<FdInfo>, FdsError> {
    let dir = format!("/proc/{pid}/fd");
    let list_err = |source| FdsError::List {
        pid,
        path: dir.clone(),
        source,
    };
    let mut fds: Vec<i32> = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(list_err)? {
        let e = e.map_err(list_err)?;
        if let Some(fd) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
            fds.push(fd);
        }
    }
    fds.sort_unstable();
    let mut out = Vec::with_capacity(fds.len());
    let mut skipped = false;
    for fd in fds {
        let mut tries = 0;
        loop {
            tries += 1;
            match read_fd(pid, fd)? {
                Reading::Got(i) => out.push(i),
                Reading::Gone => skipped = true,
                Reading::Changed if tries < TRIES => continue,
                Reading::Changed => return Err(FdsError::Changing { pid, fd, tries }),
            }
            break;
        }
    }
    if skipped {
        // Closed fds, or a process that died while we read: not the same.
        std::fs::read_dir(&dir).map_err(list_err)?;
    }
    Ok(out)
}

/// Whether `pid`'s fds `a` and `b` are one open file description (dup'ed,
/// inherited: one offset, one set of status flags), by kcmp(2) KCMP_FILE.
/// Needs ptrace access to `pid` and CONFIG_KCMP.
pub fn same_description(pid: i32, a: i32, b: i32) -> Result<bool, FdsError> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes integers only.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    if r < 0 {
        return Err(FdsError::Fd {
            pid,
            fd: b,
            what: format!(
                "kcmp(KCMP_FILE) with fd {a} (a kernel without CONFIG_KCMP cannot tell dup'ed fds apart)"
            ),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(r == 0)
}

/// pidfd_open(2) + pidfd_getfd(2): a duplicate, in this process, of `pid`'s
/// `fd` (the same open file description; close-on-exec here). Needs ptrace
/// access to `pid` (Linux 5.6+).
pub fn pidfd_getfd(pid: i32, fd: i32) -> Result<OwnedFd, FdsError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: Errno| FdsError::Fd {
            pid,
            fd,
            what,
            source: std::io::Error::from(e),
        }
    };
    let pidfd = pidfd_open(pid).map_err(err(
        "pidfd_open (does the process exist? Linux 5.3+ is needed)",
    ))?;
    pidfd_getfd_from(&pidfd, fd).map_err(err(
        "pidfd_getfd (is the fd open, and may this user ptrace the process?)",
    ))
}

/// A syscall's result that is a new fd on success.
fn new_fd(r: libc::c_long) -> Result<OwnedFd, Errno> {
    let r = Errno::result(r)?;
    // A kernel fd number is an int: a value beyond it is no fd.
    let fd = std::os::fd::RawFd::try_from(r).map_err(|_| Errno::EOVERFLOW)?;
    // SAFETY: a non-negative result of pidfd_open/pidfd_getfd is a new fd
    // that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_open(2)`: a pidfd for process `pid` (Linux 5.3+), close-on-exec.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes two integers.
    new_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
}

/// `pidfd_getfd(2)`: a duplicate, in this process, of the fd `fd` of the
/// process `pidfd` refers to (Linux 5.6+; needs ptrace access to it).
pub fn pidfd_getfd_from(pidfd: &impl AsRawFd, fd: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_getfd takes three integers.
    new_fd(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })
}

/// tee(2) without blocking: duplicates up to `len` bytes of pipe `from`
/// into pipe `to`, consuming nothing.
fn sys_tee(from: &impl AsFd, to: &impl AsFd, len: usize) -> Result<usize, Errno> {
    // SAFETY: tee takes two fds we hold and integers.
    let r = unsafe {
        libc::tee(
            from.as_fd().as_raw_fd(),
            to.as_fd().as_raw_fd(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    Errno::result(r).map(|n| n as usize)
}

/// FIONREAD on a pipe: the bytes queued in it.
fn sys_fionread(f: &impl AsFd) -> Result<usize, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, to `n`.
    let r = unsafe { libc::ioctl(f.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) };
    Errno::result(r).map(|_| n.max(0) as usize)
}

/// A new, non-blocking read end of the pipe or FIFO behind `pid`'s `fd`.
/// Refuses anything else before opening it (opening a device can have
/// effects).
fn open_pipe(pid: i32, fd: i32) -> Result<File, FdsError> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let fd_err = |what: String| fd_err(pid, fd, what);
    let md = std::fs::metadata(&path).map_err(fd_err(format!("stat {path}")))?;
    if !md.file_type().is_fifo() {
        let link = std::fs::read_link(&path)
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_else(|e| format!("readlink: {e}"));
        return Err(FdsError::NotAPipe { pid, fd, link });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(fd_err(format!("opening {path} for reading")))
}

fn pipe_size(f: &impl AsFd) -> Result<usize, Errno> {
    fcntl(f.as_fd().as_raw_fd(), FcntlArg::F_GETPIPE_SZ).map(|n| n.max(0) as usize)
}

/// Capacity (F_GETPIPE_SZ) of the pipe or FIFO behind `pid`'s `fd`.
pub fn pipe_capacity(pid: i32, fd: i32) -> Result<usize, FdsError> {
    let f = open_pipe(pid, fd)?;
    pipe_size(&f).map_err(|e| FdsError::Pipe {
        pid,
        fd,
        what: format!("F_GETPIPE_SZ: {e}"),
    })
}

/// Every byte queued in the pipe or FIFO behind `pid`'s `fd`, left in
/// place. The process should be frozen: a pipe written or read meanwhile
/// gives an error, never a torn copy.
pub fn peek_pipe(pid: i32, fd: i32) -> Result<Vec<u8>, FdsError> {
    let err = |what: String| FdsError::Pipe { pid, fd, what };
    let src = open_pipe(pid, fd)?;
    let cap = pipe_size(&src).map_err(|e| err(format!("F_GETPIPE_SZ: {e}")))?;
    let queued = sys_fionread(&src).map_err(|e| err(format!("FIONREAD: {e}")))?;
    if queued == 0 {
        return Ok(Vec::new());
    }
    let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| err(format!("creating a pipe to copy into: {e}")))?;
    // tee links the source's buffers one by one: ours needs as many slots,
    // i.e. the same capacity, however full each buffer is.
    let want = libc::c_int::try_from(cap).unwrap_or(libc::c_int::MAX);
    match fcntl(wr.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(want)) {
        Ok(n) if usize::try_from(n).is_ok_and(|n| n >= cap) => {}
        Ok(n) => return Err(err(format!("our copy pipe got {n} bytes, not {cap}"))),
        Err(e) => {
            return Err(err(format!(
                "sizing a pipe of {cap} bytes to copy into: {e} (raise /proc/sys/fs/pipe-max-size or run as root)"
            )));
        }
    }
    let n = sys_tee(&src, &wr, queued).map_err(|e| err(format!("tee: {e}")))?;
    if n != queued {
        return Err(err(format!(
            "tee copied {n} of the {queued} queued bytes: is the process still running? freeze it first"
        )));
    }
    drop(wr);
    let mut out = Vec::with_capacity(n);
    File::from(rd)
        .read_to_end(&mut out)
        .map_err(|e| err(format!("reading the copy: {e}")))?;
    if out.len() != n {
        return Err(err(format!("read {} of {n} copied bytes", out.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::testutil::{T, child_read, child_write, fork_child, pipe, read_timeout};
    use std::ffi::CString;

    /// FNV-1a, simple enough to run in a forked child.
    fn fnv(b: &[u8]) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for &x in b {
            h = (h ^ x as u64).wrapping_mul(0x100_0000_01b3);
        }
        h
    }

    /// Byte `i` of the data in the pipe the child fills in 7-byte writes.
    fn small_byte(i: usize) -> u8 {
        (i * 7 + 3).to_le_bytes()[0]
    }

    fn words<const N: usize>(b: &[u8]) -> [u64; N] {
        let mut out = [0u64; N];
        for (k, c) in b.chunks_exact(8).take(N).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            out[k] = u64::from_ne_bytes(w);
        }
        out
    }

    fn bytes<const N: usize, const B: usize>(w: [u64; N]) -> [u8; B] {
        let mut b = [0u8; B];
        for (k, v) in w.iter().enumerate() {
            b[k * 8..k * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    const NFDS: usize = 14;

    /// Run in the forked child: open everything, report the fd numbers,
    /// wait; then read the big pipe and report what it got; wait; exit.
    /// Raw syscalls only; every buffer comes from the parent.
    struct Setup {
        rw: CString,
        ap: CString,
        ro: CString,
        del: CString,
        dir: CString,
        data: Vec<u8>,
        back: Vec<u8>,
        keep_w: i32,
        drop_r: i32,
        rep: i32,
        go: i32,
    }

    fn child_main(s: &mut Setup) -> i32 {
        // SAFETY: raw syscalls on paths and buffers the parent prepared; a
        // child that hangs dies of SIGALRM.
        unsafe {
            libc::alarm(30);
            libc::close(s.drop_r);
            let rw = libc::open(s.rw.as_ptr(), libc::O_RDWR);
            libc::lseek(rw, 12345, libc::SEEK_SET);
            let ap = libc::open(s.ap.as_ptr(), libc::O_WRONLY | libc::O_APPEND);
            child_write(ap, b"0123456789");
            let ro = libc::open(s.ro.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            let dir = libc::open(s.dir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            let del = libc::open(s.del.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o600);
            child_write(del, &s.data[..777]);
            libc::unlink(s.del.as_ptr());
            let mut p = [-1i32; 2];
            libc::pipe(p.as_mut_ptr());
            let sized = libc::fcntl(p[1], libc::F_SETPIPE_SZ, 1 << 20);
            child_write(p[1], &s.data);
            // The other pipe, filled up in 7-byte writes: many partly
            // filled buffers.
            libc::fcntl(s.keep_w, libc::F_SETFL, libc::O_NONBLOCK);
            let mut small = 0usize;
            loop {
                let mut b = [0u8; 7];
                for (k, x) in b.iter_mut().enumerate() {
                    *x = small_byte(small + k);
                }
                if libc::write(s.keep_w, b.as_ptr().cast(), 7) != 7 {
                    break;
                }
                small += 7;
            }
            let efd = libc::eventfd(0, libc::EFD_CLOEXEC);
            let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let ptm = libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            let unlock: libc::c_int = 0;
            libc::ioctl(ptm, libc::TIOCSPTLCK, &unlock);
            let pts = libc::ioctl(ptm, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY);
            let fds: [i32; NFDS] = [
                rw, ap, ro, null, dir, del, p[0], p[1], s.keep_w, efd, sock, ptm, pts, sized,
            ];
            let mut w = [0u64; NFDS + 1];
            for (k, f) in fds.iter().enumerate() {
                w[k] = *f as i64 as u64;
            }
            w[NFDS] = small as u64;
            child_write(s.rep, &bytes::<{ NFDS + 1 }, { (NFDS + 1) * 8 }>(w));
            let mut b = [0u8];
            if !child_read(s.go, &mut b) {
                return 2;
            }
            // Read back everything the parent peeked at, and make sure
            // there is nothing more.
            let ok = child_read(p[0], &mut s.back);
            libc::fcntl(p[0], libc::F_SETFL, libc::O_NONBLOCK);
            let more = libc::read(p[0], b.as_mut_ptr().cast(), 1);
            let empty = more < 0 && Errno::last() == Errno::EAGAIN;
            child_write(
                s.rep,
                &bytes::<3, 24>([ok as u64, fnv(&s.back), empty as u64]),
            );
            child_read(s.go, &mut b);
        }
        0
    }

    /// A child holding files in various modes and offsets, a deleted file,
    /// /dev/null, a directory, two pipes (one with both ends and 100 KiB,
    /// one with only the write end, full of small writes), an eventfd, a
    /// socket and a pty pair: fd_table reports each as it is, peek_pipe
    /// returns exactly the queued bytes, and the child (and this process)
    /// can still read them all afterwards.
    #[test]
    fn table_of_a_child_and_its_pipes() {
        let tmp = tempfile::tempdir().unwrap();
        let dirp = tmp.path().canonicalize().unwrap();
        let path = |n: &str| dirp.join(n).to_str().unwrap().to_string();
        let c = |p: &str| CString::new(p).unwrap();
        std::fs::write(path("rw"), vec![1u8; 20000]).unwrap();
        std::fs::write(path("ap"), vec![2u8; 100]).unwrap();
        std::fs::write(path("ro"), vec![3u8; 50]).unwrap();
        let data: Vec<u8> = (0..100 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect();
        let (rep_r, rep_w) = pipe();
        let (go_r, go_w) = pipe();
        let (small_r, small_w) = pipe();
        let mut setup = Setup {
            rw: c(&path("rw")),
            ap: c(&path("ap")),
            ro: c(&path("ro")),
            del: c(&path("del")),
            dir: c(dirp.to_str().unwrap()),
            data: data.clone(),
            back: vec![0u8; data.len()],
            keep_w: small_w.as_raw_fd(),
            drop_r: small_r.as_raw_fd(),
            rep: rep_w.as_raw_fd(),
            go: go_r.as_raw_fd(),
        };
        let mut child = fork_child(move || {
            let code = child_main(&mut setup);
            std::mem::forget(setup); // no free() after fork
            code
        });
        drop(small_w); // the child holds the only write end
        let pid = child.pid;
        let r = read_timeout(&rep_r, (NFDS + 1) * 8, T, "the child's fd numbers");
        let w: [u64; NFDS + 1] = words(&r);
        let [
            rw,
            ap,
            ro,
            null,
            dir,
            del,
            p0,
            p1,
            keep_w,
            efd,
            sock,
            ptm,
            pts,
            sized,
        ] = std::array::from_fn(|k| i32::try_from(w[k] as i64).unwrap());
        let small = crate::usize_of(w[NFDS]);
        assert!(
            [rw, ap, ro, null, dir, del, p0, p1, efd, sock]
                .iter()
                .all(|&f| f >= 0),
            "the child could not open everything: {w:?}"
        );
        assert_eq!(sized, 1 << 20, "F_SETPIPE_SZ to 1 MiB");
        assert!(
            ptm >= 0 && pts >= 0,
            "no pty pair: is devpts mounted at /dev/pts? {w:?}"
        );

        let t = fd_table(pid).unwrap();
        let get = |fd: i32| {
            t.iter()
                .find(|i| i.fd == fd)
                .unwrap_or_else(|| panic!("fd {fd} missing: {t:#?}"))
                .clone()
        };
        let acc = |i: &FdInfo| i.flags & libc::O_ACCMODE;
        let cloexec = |i: &FdInfo| i.flags & libc::O_CLOEXEC != 0;
        let file = |fd: i32, name: &str, size: u64| {
            let i = get(fd);
            let md = std::fs::metadata(path(name)).unwrap();
            assert_eq!(
                i.kind,
                FdKind::File {
                    path: path(name),
                    deleted: false,
                    dev: md.dev(),
                    ino: md.ino(),
                    size
                },
                "fd {fd}"
            );
            assert!(i.mnt_id.is_some(), "{i:?}");
            i
        };
        let i = file(rw, "rw", 20000);
        assert_eq!((acc(&i), cloexec(&i), i.pos), (libc::O_RDWR, false, 12345));
        let i = file(ap, "ap", 110);
        assert_eq!((acc(&i), cloexec(&i), i.pos), (libc::O_WRONLY, false, 110));
        assert!(i.flags & libc::O_APPEND != 0, "{i:?}");
        let i = file(ro, "ro", 50);
        assert_eq!((acc(&i), cloexec(&i), i.pos), (libc::O_RDONLY, true, 0));
        let i = get(null);
        assert_eq!(
            i.kind,
            FdKind::CharDev {
                path: "/dev/null".into(),
                rdev: libc::makedev(1, 3)
            }
        );
        assert_eq!(acc(&i), libc::O_RDWR);
        let i = get(dir);
        assert_eq!(
            i.kind,
            FdKind::Dir {
                path: dirp.to_str().unwrap().into()
            }
        );
        assert!(i.flags & libc::O_DIRECTORY != 0, "{i:?}");
        let i = get(del);
        match &i.kind {
            FdKind::File {
                path: p,
                deleted: true,
                size: 777,
                ..
            } if *p == path("del") => {}
            k => panic!("the deleted file shows as {k:?}"),
        }
        assert_eq!(i.pos, 777);
        let ino = |fd: i32| {
            std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .unwrap()
                .ino()
        };
        let big = ino(p0);
        assert_eq!(
            get(p0).kind,
            FdKind::Pipe {
                ino: big,
                read_end: true
            }
        );
        assert_eq!(
            get(p1).kind,
            FdKind::Pipe {
                ino: big,
                read_end: false
            }
        );
        let small_ino = nix::sys::stat::fstat(small_r.as_raw_fd()).unwrap().st_ino;
        assert_eq!(
            get(keep_w).kind,
            FdKind::Pipe {
                ino: small_ino,
                read_end: false
            }
        );
        assert!(
            !t.iter().any(|i| i.kind
                == FdKind::Pipe {
                    ino: small_ino,
                    read_end: true
                }),
            "the child closed its read end of the small pipe: {t:#?}"
        );
        let i = get(efd);
        assert_eq!(
            i.kind,
            FdKind::Anon {
                what: "[eventfd]".into()
            }
        );
        assert!(cloexec(&i));
        assert_eq!(get(sock).kind, FdKind::Socket { ino: ino(sock) });
        assert!(
            matches!(get(ptm).kind, FdKind::Tty { ref path, rdev } if path == "/dev/ptmx" && libc::major(rdev) == 5)
        );
        assert!(
            matches!(get(pts).kind, FdKind::Tty { ref path, rdev } if path.starts_with("/dev/pts/") && (136..=143).contains(&libc::major(rdev)))
        );

        // The big pipe, through either end, twice: nothing is consumed.
        assert_eq!(pipe_capacity(pid, p0).unwrap(), 1 << 20);
        assert_eq!(pipe_capacity(pid, p1).unwrap(), 1 << 20);
        assert!(
            peek_pipe(pid, p0).unwrap() == data,
            "peek through the read end"
        );
        assert!(
            peek_pipe(pid, p1).unwrap() == data,
            "peek through the write end"
        );
        // The full pipe of small writes, through the only end the child has.
        let cap = pipe_size(&small_r).unwrap();
        assert_eq!(pipe_capacity(pid, keep_w).unwrap(), cap);
        assert!(
            small + 7 * (cap / 4096) >= cap && small <= cap,
            "{small} of {cap}"
        );
        let want: Vec<u8> = (0..small).map(small_byte).collect();
        assert!(
            peek_pipe(pid, keep_w).unwrap() == want,
            "peek of {small} bytes"
        );
        assert!(read_timeout(&small_r, small, T, "the small pipe") == want);
        assert_eq!(
            peek_pipe(pid, keep_w).unwrap(),
            Vec::<u8>::new(),
            "now empty"
        );
        // Not pipes: refused without opening them.
        for fd in [rw, null, sock, efd] {
            match peek_pipe(pid, fd) {
                Err(FdsError::NotAPipe { pid: p, fd: f, .. }) if (p, f) == (pid, fd) => {}
                r => panic!("peek_pipe of fd {fd}: {r:?}"),
            }
        }
        let e = peek_pipe(pid, 999).unwrap_err().to_string();
        assert!(e.contains("fd 999") && e.contains(&pid.to_string()), "{e}");

        // The child reads its pipe itself: all the bytes, nothing more.
        nix::unistd::write(&go_w, b"x").unwrap();
        let r: [u64; 3] = words(&read_timeout(&rep_r, 24, T, "the child's checksum"));
        assert_eq!(r, [1, fnv(&data), 1], "[read all, checksum, then empty]");
        nix::unistd::write(&go_w, b"x").unwrap();
        assert_eq!(child.wait(T), 0);
        // A process that is gone.
        let e = fd_table(pid).unwrap_err().to_string();
        assert!(e.contains(&format!("PID {pid}")), "{e}");
    }

    /// An fd that is closed or replaced while the table is read is left out
    /// or read again, never reported half from one file and half from
    /// another, and never an error.
    #[test]
    fn table_of_a_churning_process() {
        const LOW: i32 = 5000;
        let (pr_owned, _pw) = pipe();
        let pr = pr_owned.as_raw_fd();
        let pipe_ino = nix::sys::stat::fstat(pr).unwrap().st_ino;
        let mut child = fork_child(move || {
            // SAFETY: raw syscalls on fds this child holds; SIGALRM ends it.
            unsafe {
                libc::alarm(30);
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                // Numbers nothing inherited uses; allowed by the limit.
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                // Root may raise the hard limit (a bare init has 4096).
                lim.rlim_max = lim.rlim_max.max((LOW + 1024) as libc::rlim_t);
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                libc::close_range(LOW as u32, (LOW + 299) as u32, 0);
                let mut k = 0;
                loop {
                    // LOW..LOW+300 cycle between a pipe read end, /dev/null
                    // (write only) and nothing.
                    let fd = LOW + k % 300;
                    libc::dup2(if k % 600 < 300 { pr } else { null }, fd);
                    libc::close(LOW + (k + 150) % 300);
                    k += 1;
                }
            }
        });
        // At least 2 s and 11 rounds (an emulated guest reads slowly), at
        // most 20 s.
        let t0 = std::time::Instant::now();
        let (mut seen, mut rounds) = (0usize, 0);
        while (t0.elapsed().as_secs() < 2 || rounds <= 10) && t0.elapsed().as_secs() < 20 {
            let t = fd_table(child.pid).unwrap();
            rounds += 1;
            for i in t.iter().filter(|i| (LOW..LOW + 300).contains(&i.fd)) {
                seen += 1;
                let ok = match &i.kind {
                    FdKind::Pipe { ino, read_end } => {
                        *ino == pipe_ino && *read_end && i.flags & libc::O_ACCMODE == 0
                    }
                    FdKind::CharDev { path, .. } => {
                        path == "/dev/null" && i.flags & libc::O_ACCMODE == libc::O_WRONLY
                    }
                    _ => false,
                };
                assert!(ok, "a mixed reading: {i:?}");
            }
        }
        child.kill();
        assert!(
            rounds > 10 && seen > 100,
            "{rounds} rounds saw {seen} churning fds"
        );
    }

    #[test]
    fn parse_and_classify() {
        let f = parse_fdinfo("pos:\t12345\nflags:\t02100002\nmnt_id:\t24\nino:\t3\n").unwrap();
        assert_eq!(f.pos, 12345);
        // The kernel's O_LARGEFILE (0o100000 on x86_64; libc says 0).
        assert_eq!(f.flags, libc::O_CLOEXEC | 0o100000 | libc::O_RDWR);
        assert_eq!((f.mnt_id, f.ino), (Some(24), Some(3)));
        assert!(parse_fdinfo("garbage").is_none());
        let md = std::fs::metadata("/dev/null").unwrap();
        // A link whose inode is not the one stat found: replaced meanwhile.
        assert!(classify("pipe:[1]", &md, 0).is_none());
        assert!(classify("socket:[1]", &md, 0).is_none());
        assert_eq!(
            classify("net:[4026531840]", &md, 0),
            Some(FdKind::Other {
                link: "net:[4026531840]".into()
            })
        );
        // A file literally named "... (deleted)" that still exists.
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x (deleted)");
        std::fs::write(&p, b"abc").unwrap();
        let md = std::fs::metadata(&p).unwrap();
        let k = classify(p.to_str().unwrap(), &md, 0).unwrap();
        assert!(
            matches!(k, FdKind::File { ref path, deleted: false, size: 3, .. } if path.ends_with("x (deleted)")),
            "{k:?}"
        );
    }

    #[test]
    fn pidfd_getfd_duplicates_a_childs_fd() {
        let (r, w) = pipe();
        let (rr, wr) = (r.as_raw_fd(), w.as_raw_fd());
        let mut child = fork_child(move || {
            // SAFETY: raw syscalls; SIGALRM ends a child left behind.
            unsafe {
                libc::alarm(30);
                libc::close(rr);
                child_write(wr, b"through the copy");
                libc::pause();
            }
            0
        });
        drop(w);
        // Once the child has written, our copy of its fd is its pipe end.
        assert_eq!(read_timeout(&r, 1, T, "the child's first byte"), b"t");
        let copy = pidfd_getfd(child.pid, wr).unwrap();
        assert_eq!(
            nix::sys::stat::fstat(copy.as_raw_fd()).unwrap().st_ino,
            nix::sys::stat::fstat(r.as_raw_fd()).unwrap().st_ino
        );
        nix::unistd::write(&copy, b"!").unwrap();
        let rest = read_timeout(&r, 16, T, "the rest");
        assert_eq!(&rest, b"hrough the copy!");
        let e = pidfd_getfd(child.pid, 1000).unwrap_err().to_string();
        assert!(
            e.contains("fd 1000") && e.contains(&child.pid.to_string()),
            "{e}"
        );
        child.kill();
        let e = pidfd_getfd(child.pid, wr).unwrap_err().to_string();
        assert!(e.contains("pidfd_open"), "{e}");
    }
}
