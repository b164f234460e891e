//! A process that holds one resource, so that a test can show tern refuses
//! what it cannot checkpoint before freezing anything (and takes what it
//! can).
//!
//! `holder KIND --out FILE`: sets up one resource of KIND, appends what it
//! holds to FILE (`fd N` for each fd that is the resource, `map 0xADDR` for
//! each mapping that is, `child PID` for a child), then `ready PID`, and
//! loops forever incrementing a counter. On SIGUSR1 it appends `alive N`
//! (N = the counter, always larger than the last one).
//!
//! KIND: `none` (nothing: a restorable control), `socket` (a unix
//! socketpair), `tcp-listen`, `eventfd`, `epoll`, `signalfd`, `timerfd`,
//! `posix-timer`, `deleted-file`, `deleted-mapping`, `memfd`, `unix-listen`
//! (a unix socket listening on a path), `deleted-exe` (it re-executes
//! itself from a copy under the temporary directory, then removes the
//! copy) (these are
//! restorable since tern restores them), `memfd-too-big` (65 MiB of
//! data), `deleted-file-linked` (deleted, but linked under another name),
//! `unix-listen-pending` (a connection waiting to be accepted),
//! `unix-fd-in-flight` (a socketpair with an fd sent and not received:
//! found only once frozen),
//! `tcp-connected` (an established connection, both ends), `epoll-closed-target` (an epoll holding an
//! eventfd registered under an fd number since closed),
//! `posix-timer-thread-clock` (a timer on CLOCK_THREAD_CPUTIME_ID),
//! `inotify`, `pidfd`, `child`, `zombie-child`, `deleted-cwd`, `sysv-shm`, `flock`, `device`,
//! `zombie-leader`, `async-io`, `io-uring`, `aio`, `userfaultfd`,
//! `fanotify`, `namespace` (its own UTS namespace). The resource fds are moved to [`FD`] (and [`FD`] + 1
//! for the second end of a socket pair). Temporary files go to `$TMPDIR`
//! (or /tmp) and are removed where the kind allows (`flock` keeps its file:
//! a deleted file would be a second reason to refuse).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tern_tests::ck;

/// Where a resource fd lives.
const FD: i32 = 10;

static USR1: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_sig: libc::c_int) {
    USR1.store(true, Ordering::SeqCst);
}

fn die(msg: &str) -> ! {
    eprintln!("holder: setup failed: {msg}");
    std::process::exit(3);
}

fn check(r: libc::c_long, what: &str) -> libc::c_long {
    if r < 0 {
        die(&format!("{what}: {}", std::io::Error::last_os_error()));
    }
    r
}

/// Move `fd` to `to` (closing `fd`); returns `to`.
fn move_fd(fd: i32, to: i32) -> i32 {
    check(fd as libc::c_long, "fd");
    if fd == to {
        return to;
    }
    // SAFETY: dup2/close on fds this process owns.
    unsafe {
        check(libc::dup2(fd, to) as libc::c_long, "dup2");
        libc::close(fd);
    }
    to
}

fn tmp_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn tmp_path(what: &str) -> PathBuf {
    tmp_dir().join(format!("holder-{what}-{}", std::process::id()))
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_else(|_| die("NUL in path"))
}

/// A new file `path` with `len` bytes, open O_RDWR.
fn create_file(path: &Path, len: usize) -> i32 {
    let c = cstr(path);
    // SAFETY: open/write with a valid C string and buffer.
    unsafe {
        let fd = i32::try_from(check(
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
                0o600,
            ) as _,
            &format!("open {}", path.display()),
        ))
        .unwrap();
        let buf = vec![0x5au8; len];
        if libc::write(fd, buf.as_ptr().cast(), len) != len as isize {
            die(&format!("write {}", path.display()));
        }
        fd
    }
}

fn unlink(path: &Path) {
    let c = cstr(path);
    // SAFETY: unlink(2) of a valid C string.
    check(unsafe { libc::unlink(c.as_ptr()) } as _, "unlink");
}

/// Sets up `kind`; returns the lines to report before `ready`.
fn set_up(kind: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let fd_line = |fd: i32| format!("fd {fd}");
    // SAFETY: each arm makes plain syscalls with valid arguments; the
    // process is single-threaded here (fork is safe).
    unsafe {
        match kind {
            "none" => {}
            "socket" => {
                let mut sv = [-1i32; 2];
                check(
                    libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) as _,
                    "socketpair",
                );
                lines.push(fd_line(move_fd(sv[0], FD)));
                lines.push(fd_line(move_fd(sv[1], FD + 1)));
            }
            "tcp-listen" => {
                use std::os::fd::IntoRawFd;
                let l = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap_or_else(|e| die(&format!("bind 127.0.0.1:0: {e}")));
                lines.push(fd_line(move_fd(l.into_raw_fd(), FD)));
            }
            "unix-fd-in-flight" => {
                // A socketpair with an fd sent (SCM_RIGHTS) and not read.
                let mut sv = [-1i32; 2];
                check(
                    libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) as _,
                    "socketpair",
                );
                let passed = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                let mut byte = [1u8];
                let mut iov = libc::iovec {
                    iov_base: byte.as_mut_ptr().cast(),
                    iov_len: 1,
                };
                let mut cbuf = [0u64; 4];
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &raw mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = cbuf.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(4) as _;
                let c = libc::CMSG_FIRSTHDR(&raw const msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), passed);
                check(libc::sendmsg(sv[1], &raw const msg, 0) as _, "sendmsg");
                libc::close(passed);
                lines.push(fd_line(move_fd(sv[0], FD)));
                lines.push(fd_line(move_fd(sv[1], FD + 1)));
            }
            "unix-listen" | "unix-listen-pending" => {
                use std::os::fd::IntoRawFd;
                let p = tmp_path(kind);
                let l = std::os::unix::net::UnixListener::bind(&p)
                    .unwrap_or_else(|e| die(&format!("bind {}: {e}", p.display())));
                if kind == "unix-listen-pending" {
                    // A connection nobody accepts (its client kept).
                    let c = std::os::unix::net::UnixStream::connect(&p)
                        .unwrap_or_else(|e| die(&format!("connect: {e}")));
                    move_fd(c.into_raw_fd(), FD + 1);
                }
                lines.push(fd_line(move_fd(l.into_raw_fd(), FD)));
            }
            "tcp-connected" => {
                use std::os::fd::IntoRawFd;
                let l = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap_or_else(|e| die(&format!("bind 127.0.0.1:0: {e}")));
                let c = std::net::TcpStream::connect(l.local_addr().unwrap())
                    .unwrap_or_else(|e| die(&format!("connect: {e}")));
                let (a, _) = l.accept().unwrap_or_else(|e| die(&format!("accept: {e}")));
                lines.push(fd_line(move_fd(c.into_raw_fd(), FD)));
                lines.push(fd_line(move_fd(a.into_raw_fd(), FD + 1)));
            }
            "eventfd" => {
                lines.push(fd_line(move_fd(libc::eventfd(0, 0), FD)));
            }
            "epoll" => {
                lines.push(fd_line(move_fd(libc::epoll_create1(0), FD)));
            }
            "signalfd" => {
                // SIGUSR2, blocked (SIGUSR1 is the "alive?" signal).
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR2);
                check(
                    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) as _,
                    "sigprocmask",
                );
                lines.push(fd_line(move_fd(libc::signalfd(-1, &set, 0), FD)));
            }
            "timerfd" => {
                let fd = move_fd(libc::timerfd_create(libc::CLOCK_MONOTONIC, 0), FD);
                let its = libc::itimerspec {
                    it_interval: libc::timespec {
                        tv_sec: 1,
                        tv_nsec: 0,
                    },
                    it_value: libc::timespec {
                        tv_sec: 1,
                        tv_nsec: 0,
                    },
                };
                check(
                    libc::timerfd_settime(fd, 0, &its, std::ptr::null_mut()) as _,
                    "timerfd_settime",
                );
                lines.push(fd_line(fd));
            }
            "inotify" => {
                let fd = move_fd(libc::inotify_init1(0), FD);
                let dir = cstr(&tmp_dir());
                check(
                    libc::inotify_add_watch(fd, dir.as_ptr(), libc::IN_CREATE | libc::IN_DELETE)
                        as _,
                    "inotify_add_watch",
                );
                lines.push(fd_line(fd));
            }
            "pidfd" => {
                let fd = i32::try_from(check(
                    libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0),
                    "pidfd_open",
                ))
                .unwrap();
                lines.push(fd_line(move_fd(fd, FD)));
            }
            "posix-timer" => {
                let mut sev: libc::sigevent = std::mem::zeroed();
                sev.sigev_notify = libc::SIGEV_NONE;
                let mut t: libc::timer_t = std::mem::zeroed();
                check(
                    libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut t) as _,
                    "timer_create",
                );
                let its = libc::itimerspec {
                    it_interval: libc::timespec {
                        tv_sec: 100,
                        tv_nsec: 0,
                    },
                    it_value: libc::timespec {
                        tv_sec: 100,
                        tv_nsec: 0,
                    },
                };
                check(
                    libc::timer_settime(t, 0, &its, std::ptr::null_mut()) as _,
                    "timer_settime",
                );
            }
            "epoll-closed-target" => {
                // An eventfd registered as fd FD + 1, then moved to FD + 2:
                // the registration outlives its fd number.
                let ep = move_fd(libc::epoll_create1(0), FD);
                let e = move_fd(libc::eventfd(0, 0), FD + 1);
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: 1,
                };
                check(
                    libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, e, &mut ev) as _,
                    "epoll_ctl",
                );
                move_fd(e, FD + 2);
                lines.push(fd_line(ep));
            }
            "posix-timer-thread-clock" => {
                let mut sev: libc::sigevent = std::mem::zeroed();
                sev.sigev_notify = libc::SIGEV_NONE;
                let mut t: libc::timer_t = std::mem::zeroed();
                check(
                    libc::timer_create(libc::CLOCK_THREAD_CPUTIME_ID, &mut sev, &mut t) as _,
                    "timer_create",
                );
            }
            "child" => {
                let parent = libc::getpid();
                let pid = i32::try_from(check(libc::fork() as _, "fork")).unwrap();
                if pid == 0 {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() != parent {
                        libc::_exit(0);
                    }
                    loop {
                        libc::pause();
                    }
                }
                lines.push(format!("child {pid}"));
            }
            "zombie-child" => {
                let pid = i32::try_from(check(libc::fork() as _, "fork")).unwrap();
                if pid == 0 {
                    libc::_exit(0);
                }
                // Not reaped: wait until it is a zombie (and stays one).
                let stat = format!("/proc/{pid}/stat");
                for _ in 0..5000 {
                    let s = std::fs::read_to_string(&stat).unwrap_or_default();
                    if s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                lines.push(format!("child {pid}"));
            }
            "deleted-cwd" => {
                let d = tmp_path("cwd");
                let c = cstr(&d);
                check(libc::mkdir(c.as_ptr(), 0o700) as _, "mkdir");
                check(libc::chdir(c.as_ptr()) as _, "chdir");
                check(libc::rmdir(c.as_ptr()) as _, "rmdir");
            }
            "deleted-file" => {
                let p = tmp_path("deleted-file");
                let fd = create_file(&p, 4096);
                unlink(&p);
                lines.push(fd_line(move_fd(fd, FD)));
            }
            "deleted-mapping" => {
                let p = tmp_path("deleted-mapping");
                let len = 2 * 4096;
                let fd = create_file(&p, len);
                let a = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    fd,
                    0,
                );
                if a == libc::MAP_FAILED {
                    die("mmap");
                }
                // Read one page, write (COW) the other.
                std::ptr::read_volatile(a as *const u8);
                std::ptr::write_volatile((a as *mut u8).add(4096), 1);
                libc::close(fd);
                unlink(&p);
                lines.push(format!("map {:#x}", a as usize));
            }
            "memfd" => {
                let len = 64 * 1024;
                let fd = move_fd(libc::memfd_create(c"holder".as_ptr(), 0), FD);
                check(libc::ftruncate(fd, len as _) as _, "ftruncate");
                let a = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                if a == libc::MAP_FAILED {
                    die("mmap memfd");
                }
                std::ptr::write_volatile(a as *mut u8, 1);
                lines.push(fd_line(fd));
                lines.push(format!("map {:#x}", a as usize));
            }
            "memfd-too-big" => {
                // 65 MiB of data: more than tern saves of one.
                let fd = move_fd(libc::memfd_create(c"holder-big".as_ptr(), 0), FD);
                let page = vec![7u8; 1 << 20];
                for i in 0..65 {
                    check(
                        libc::pwrite(fd, page.as_ptr().cast(), page.len(), (i << 20) as _) as _,
                        "pwrite",
                    );
                }
                lines.push(fd_line(fd));
            }
            "deleted-file-linked" => {
                // Deleted by the name it was opened with, but still linked
                // by another.
                let p = tmp_path("deleted-linked");
                let other = tmp_path("deleted-linked-other");
                let fd = create_file(&p, 4096);
                let (a, b) = (cstr(&p), cstr(&other));
                check(libc::link(a.as_ptr(), b.as_ptr()) as _, "link");
                unlink(&p);
                lines.push(fd_line(move_fd(fd, FD)));
            }
            "sysv-shm" => {
                let id = i32::try_from(check(
                    libc::shmget(libc::IPC_PRIVATE, 64 * 1024, libc::IPC_CREAT | 0o600) as _,
                    "shmget",
                ))
                .unwrap();
                let a = libc::shmat(id, std::ptr::null(), 0);
                if a as isize == -1 {
                    let e = std::io::Error::last_os_error();
                    libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                    die(&format!("shmat: {e}"));
                }
                check(
                    libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) as _,
                    "shmctl(IPC_RMID)",
                );
                std::ptr::write_volatile(a as *mut u8, 1);
                lines.push(format!("map {:#x}", a as usize));
            }
            "flock" => {
                let p = tmp_path("flock");
                let fd = move_fd(create_file(&p, 16), FD);
                check(libc::flock(fd, libc::LOCK_EX) as _, "flock");
                lines.push(fd_line(fd));
            }
            "device" => {
                let mut fd = libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR);
                if fd < 0 {
                    fd = libc::open(c"/dev/kmsg".as_ptr(), libc::O_RDONLY);
                }
                lines.push(fd_line(move_fd(fd, FD)));
            }
            "async-io" => {
                // A pipe read end that signals its owner on input.
                let mut p = [-1i32; 2];
                check(libc::pipe(p.as_mut_ptr()) as _, "pipe");
                let fd = move_fd(p[0], FD);
                check(
                    libc::fcntl(fd, libc::F_SETOWN, libc::getpid()) as _,
                    "F_SETOWN",
                );
                let fl = libc::fcntl(fd, libc::F_GETFL);
                check(
                    libc::fcntl(fd, libc::F_SETFL, fl | libc::O_ASYNC) as _,
                    "O_ASYNC",
                );
                lines.push(fd_line(fd));
            }
            "io-uring" => {
                // struct io_uring_params is 120 bytes; zeroed asks for defaults.
                let mut params = [0u8; 120];
                let fd = i32::try_from(check(
                    libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()),
                    "io_uring_setup",
                ))
                .unwrap();
                lines.push(fd_line(move_fd(fd, FD)));
            }
            "aio" => {
                let mut ctx: libc::c_ulong = 0;
                check(
                    libc::syscall(libc::SYS_io_setup, 8, &mut ctx as *mut libc::c_ulong),
                    "io_setup",
                );
                lines.push(format!("map {ctx:#x}"));
            }
            "userfaultfd" => {
                let fd = i32::try_from(check(
                    libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC),
                    "userfaultfd",
                ))
                .unwrap();
                // Handshaken as a program would (UFFDIO_API, asking for
                // UFFD_FEATURE_MISSING_SHMEM): one never handshaken is
                // taken for what a tern killed while arming its tracking
                // left, which the next pre-dump removes.
                let mut api = [0u64; 3];
                api[0] = 0xaa; // UFFD_API
                api[1] = 1 << 5; // UFFD_FEATURE_MISSING_SHMEM
                const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
                check(
                    libc::ioctl(fd, UFFDIO_API as _, api.as_mut_ptr()) as _,
                    "UFFDIO_API",
                );
                lines.push(fd_line(move_fd(fd, FD)));
            }
            "fanotify" => {
                // FAN_CLASS_NOTIF (0), events read-only.
                lines.push(fd_line(move_fd(
                    libc::fanotify_init(0, libc::O_RDONLY as u32),
                    FD,
                )));
            }
            "namespace" => {
                check(
                    libc::unshare(libc::CLONE_NEWUTS) as _,
                    "unshare(CLONE_NEWUTS)",
                );
            }
            "deleted-exe" => {
                // Runs from a copy of this binary (see `main`), removed now.
                let exe = std::fs::read_link("/proc/self/exe")
                    .unwrap_or_else(|e| die(&format!("/proc/self/exe: {e}")));
                unlink(&exe);
            }
            "zombie-leader" => {}
            _ => {
                eprintln!("holder: unknown kind {kind:?}");
                std::process::exit(2);
            }
        }
    }
    lines
}

/// The loop: count, and answer SIGUSR1 with `alive N`.
fn run(out: &Path) -> ! {
    let mut n: u64 = 0;
    loop {
        n += 1;
        if USR1.swap(false, Ordering::SeqCst) {
            ck::report(out, &format!("alive {n}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() {
    let out = ck::out_path();
    let kind = std::env::args()
        .nth(1)
        .filter(|a| a != "--out")
        .unwrap_or_else(|| {
            eprintln!("usage: holder KIND --out FILE");
            std::process::exit(2);
        });
    if kind == "deleted-exe" && std::env::var_os("HOLDER_COPY").is_none() {
        // Run from a copy (same PID: exec), which `set_up` then removes.
        let copy = tmp_path("exe");
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_else(|e| die(&e.to_string()));
        std::fs::copy(&exe, &copy).unwrap_or_else(|e| die(&format!("copy {}: {e}", exe.display())));
        use std::os::unix::process::CommandExt;
        let e = std::process::Command::new(&copy)
            .args(std::env::args_os().skip(1))
            .env("HOLDER_COPY", "1")
            .exec();
        die(&format!("exec {}: {e}", copy.display()));
    }
    // Only the resource of KIND: no fd inherited from whoever started us.
    // SAFETY: close_range(2) of fds this process does not use; installs a
    // handler that only stores to an atomic.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        check(
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) as _,
            "sigaction(SIGUSR1)",
        );
    }
    for l in set_up(&kind) {
        ck::report(&out, &l);
    }
    let pid = std::process::id();
    if kind == "zombie-leader" {
        let o = out.clone();
        std::thread::spawn(move || run(&o));
        ck::report(&out, &format!("ready {pid}"));
        // SAFETY: ends only this (the leader) thread; the other one goes on.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        unreachable!("SYS_exit returned");
    }
    ck::report(&out, &format!("ready {pid}"));
    run(&out)
}
