//! `ck_files --out FILE [--break]`: open files, pipes with unread data and
//! process attributes (protocol: `tern_tests::ck`). Single-threaded.
//!
//! Setup, in the directory the harness starts it in (its cwd):
//! - setsid(), so it is its own session and process-group leader;
//! - `data`: 20000 known bytes, kept open O_RDWR at offset 12345;
//! - `log`: opened O_WRONLY|O_APPEND, 100 known bytes written through it,
//!   then moved to fd 100 (a gap in the fd table);
//! - `ro`: 100 known bytes, opened O_RDONLY|O_CLOEXEC at offset 7;
//! - /dev/null opened O_RDWR;
//! - pipe P1 holding 64 KiB of known unread bytes (its write end
//!   O_NONBLOCK), both ends held;
//! - pipe P2 (O_CLOEXEC ends, resized to 128 KiB with F_SETPIPE_SZ) holding
//!   10 known bytes, both ends held;
//! - chdir to `sub`, umask(027), RLIMIT_NOFILE soft 512 (hard unchanged),
//!   RLIMIT_CORE 0/unlimited, PR_SET_NAME `ck-files-comm`;
//! - the three itimers armed far in the future (ITIMER_REAL 10000.25 s
//!   every 5000.125 s, ITIMER_VIRTUAL 20000.5 s every 6000.375 s,
//!   ITIMER_PROF 30000.75 s every 7000.625 s: they never fire here).
//!
//! It then records, for every fd in /proc/self/fd: the readlink target,
//! F_GETFL, F_GETFD, lseek(SEEK_CUR) (or ESPIPE), the file type, device
//! and inode (rdev for devices), F_GETPIPE_SZ for pipes; and all 16
//! rlimits, personality, pgid, sid, cwd.
//!
//! On SIGTERM (the handler only sets a flag) it checks: the fd table holds
//! exactly the same numbers; every fd has the same flags, close-on-exec bit,
//! offset and kind; regular files and /dev/null the same path, device and
//! inode; pipe ends are pipes (their inode may change on restore) paired as
//! before (both ends of P1 one pipe, of P2 another) with the same capacity;
//! `data`, `log` and `ro` hold exactly their bytes (pread, offsets
//! untouched); P1 holds exactly its 64 KiB and P2 its 10 bytes (FIONREAD,
//! then read out and compared, then a non-blocking read finds them empty);
//! getcwd and /proc/self/cwd are `sub`; /proc/self/status says `Umask: 0027`
//! (umask is never called again); the rlimits, personality, pgid and sid
//! (= its pid) are as recorded; /proc/self/comm and PR_GET_NAME are
//! `ck-files-comm`; each itimer has exactly its interval and a value that
//! is still running down from where it was set (ITIMER_REAL: not more than
//! the monotonic time since setup, plus 1 s, below it; the CPU-time timers,
//! which the kernel rounds up by a tick each time they are set: within
//! 60 s below and 20 ms above); finally a write to fd 100 lands at
//! the end of `log` (O_APPEND works). Nothing else depends on timing.
//!
//! `--break`: right after `ready`, it lseeks `data` to offset 0, as a
//! restore that lost file offsets would.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::time::Duration;
use tern_tests::ck;

const DATA_LEN: usize = 20000;
const DATA_OFF: i64 = 12345;
const LOG_LEN: usize = 100;
const RO_LEN: usize = 100;
const RO_OFF: i64 = 7;
const P1_LEN: usize = 64 * 1024;
const P2_LEN: usize = 10;
const P2_SIZE: i32 = 128 * 1024;
const LOG_FD: i32 = 100;
const COMM: &str = "ck-files-comm";
const UMASK: libc::mode_t = 0o027;
const NOFILE_SOFT: u64 = 512;
const RLIMITS: u32 = 16; // RLIM_NLIMITS (include/uapi/asm-generic/resource.h)

/// Known bytes for each object (`seed` tells them apart).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let i = u32::try_from(i).unwrap();
            i.wrapping_mul(131)
                .wrapping_add(u32::from(seed) * 17 + (i >> 8))
                .to_le_bytes()[0]
        })
        .collect()
}

fn err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// What one fd looks like.
#[derive(Clone, Debug, PartialEq)]
struct FdInfo {
    link: String,
    flags: i32,
    fd_flags: i32,
    /// lseek(SEEK_CUR), or -errno.
    offset: i64,
    kind: u32,
    dev: u64,
    ino: u64,
    rdev: u64,
    pipe_size: i32,
}

fn fd_info(fd: i32) -> Result<FdInfo, String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("readlink /proc/self/fd/{fd}: {e}"))?
        .to_string_lossy()
        .into_owned();
    // SAFETY: fcntl/lseek/fstat on an fd number with a local stat buffer.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        let fd_flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || fd_flags < 0 {
            return Err(format!("fd {fd} ({link}): fcntl: {}", err()));
        }
        let off = libc::lseek(fd, 0, libc::SEEK_CUR);
        let offset = if off < 0 {
            -(err().raw_os_error().unwrap_or(0) as i64)
        } else {
            off
        };
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(format!("fd {fd} ({link}): fstat: {}", err()));
        }
        let kind = st.st_mode & libc::S_IFMT;
        let pipe_size = if kind == libc::S_IFIFO {
            libc::fcntl(fd, libc::F_GETPIPE_SZ)
        } else {
            0
        };
        Ok(FdInfo {
            link,
            flags,
            fd_flags,
            offset,
            kind,
            dev: st.st_dev,
            ino: st.st_ino,
            rdev: st.st_rdev,
            pipe_size,
        })
    }
}

/// Every open fd but the one listing the directory.
fn fd_table() -> Result<BTreeMap<i32, FdInfo>, String> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("/proc/self/fd: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    fds.sort();
    let mut out = BTreeMap::new();
    for fd in fds {
        // The directory stream's own fd is closed by now.
        // SAFETY: fcntl(F_GETFD) on an fd number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            continue;
        }
        out.insert(fd, fd_info(fd)?);
    }
    Ok(out)
}

fn rlimits() -> Vec<(u64, u64)> {
    (0..RLIMITS)
        .map(|r| {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit(2) writes one rlimit.
            unsafe { libc::getrlimit(r as _, &mut l) };
            (l.rlim_cur, l.rlim_max)
        })
        .collect()
}

fn personality() -> i32 {
    // SAFETY: personality(0xffffffff) only queries.
    unsafe { libc::personality(0xffff_ffff) }
}

/// (pgid, sid) of this process.
fn ids() -> (i32, i32) {
    // SAFETY: plain queries.
    unsafe { (libc::getpgid(0), libc::getsid(0)) }
}

fn open(path: &str, flags: i32) -> Result<i32, String> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: open(2) with a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644) };
    if fd < 0 {
        return Err(format!("open {path}: {}", err()));
    }
    Ok(fd)
}

fn write_all(fd: i32, mut buf: &[u8], what: &str) -> Result<(), String> {
    while !buf.is_empty() {
        // SAFETY: write(2) from a live buffer.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n <= 0 {
            return Err(format!("writing {what} (fd {fd}): {}", err()));
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// The whole content of `fd` by pread (offset untouched), up to `max`.
fn pread_all(fd: i32, max: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; max + 1];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: pread(2) into the rest of a live buffer.
        let n = unsafe {
            libc::pread(
                fd,
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
                got as i64,
            )
        };
        if n < 0 {
            return Err(format!("pread fd {fd}: {}", err()));
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    buf.truncate(got);
    Ok(buf)
}

/// The fds of the objects set up (the rest of the table is inherited).
struct Setup {
    data: i32,
    ro: i32,
    null: i32,
    p1: [i32; 2],
    p2: [i32; 2],
    cwd: String,
    /// CLOCK_MONOTONIC when the itimers were armed.
    armed_us: u64,
}

fn setup() -> Result<Setup, String> {
    // SAFETY: setsid(2), no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(format!("setsid: {}", err()));
    }
    let data = open("data", libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC)?;
    write_all(data, &pattern(1, DATA_LEN), "data")?;
    // SAFETY: lseek on our fd.
    if unsafe { libc::lseek(data, DATA_OFF, libc::SEEK_SET) } != DATA_OFF {
        return Err(format!("lseek data: {}", err()));
    }
    let log = open(
        "log",
        libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_TRUNC,
    )?;
    write_all(log, &pattern(2, LOG_LEN), "log")?;
    // SAFETY: dup2/close on our fds.
    unsafe {
        if libc::dup2(log, LOG_FD) != LOG_FD {
            return Err(format!("dup2 log to {LOG_FD}: {}", err()));
        }
        libc::close(log);
    }
    std::fs::write("ro", pattern(3, RO_LEN)).map_err(|e| format!("write ro: {e}"))?;
    let ro = open("ro", libc::O_RDONLY | libc::O_CLOEXEC)?;
    // SAFETY: lseek on our fd.
    if unsafe { libc::lseek(ro, RO_OFF, libc::SEEK_SET) } != RO_OFF {
        return Err(format!("lseek ro: {}", err()));
    }
    let null = open("/dev/null", libc::O_RDWR)?;
    let mut p1 = [0; 2];
    let mut p2 = [0; 2];
    // SAFETY: pipe2/fcntl on local arrays and our fds.
    unsafe {
        if libc::pipe2(p1.as_mut_ptr(), 0) != 0 {
            return Err(format!("pipe P1: {}", err()));
        }
        if libc::fcntl(p1[1], libc::F_SETFL, libc::O_NONBLOCK) != 0 {
            return Err(format!("O_NONBLOCK on P1: {}", err()));
        }
        if libc::pipe2(p2.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(format!("pipe P2: {}", err()));
        }
        if libc::fcntl(p2[1], libc::F_SETPIPE_SZ, P2_SIZE) < P2_SIZE {
            return Err(format!("F_SETPIPE_SZ on P2: {}", err()));
        }
    }
    // A non-blocking write: fails rather than hangs if the pipe is smaller.
    write_all(p1[1], &pattern(4, P1_LEN), "P1")?;
    write_all(p2[1], &pattern(5, P2_LEN), "P2")?;
    std::fs::create_dir("sub").map_err(|e| format!("mkdir sub: {e}"))?;
    std::env::set_current_dir("sub").map_err(|e| format!("chdir sub: {e}"))?;
    let cwd = std::env::current_dir()
        .map_err(|e| format!("getcwd: {e}"))?
        .to_string_lossy()
        .into_owned();
    let name = CString::new(COMM).map_err(|e| e.to_string())?;
    // SAFETY: umask/setrlimit/prctl with local values.
    unsafe {
        libc::umask(UMASK);
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = NOFILE_SOFT;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
            return Err(format!("setrlimit NOFILE: {}", err()));
        }
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &core) != 0 {
            return Err(format!("setrlimit CORE: {}", err()));
        }
        if libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) != 0 {
            return Err(format!("PR_SET_NAME: {}", err()));
        }
        for (which, value, interval) in ITIMERS {
            let t = libc::itimerval {
                it_interval: tv(interval),
                it_value: tv(value),
            };
            if libc::setitimer(which, &t, std::ptr::null_mut()) != 0 {
                return Err(format!("setitimer {which}: {}", err()));
            }
        }
    }
    Ok(Setup {
        data,
        ro,
        null,
        p1,
        p2,
        cwd,
        armed_us: monotonic_us(),
    })
}

/// (which, value, interval) in microseconds.
const ITIMERS: [(libc::c_int, u64, u64); 3] = [
    (libc::ITIMER_REAL, 10_000_250_000, 5_000_125_000),
    (libc::ITIMER_VIRTUAL, 20_000_500_000, 6_000_375_000),
    (libc::ITIMER_PROF, 30_000_750_000, 7_000_625_000),
];

fn tv(us: u64) -> libc::timeval {
    libc::timeval {
        tv_sec: (us / 1_000_000) as libc::time_t,
        tv_usec: (us % 1_000_000) as libc::suseconds_t,
    }
}

fn us(t: libc::timeval) -> u64 {
    t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64
}

fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// The itimers against what setup armed, `since_us` after it.
fn check_itimers(since_us: u64, fails: &mut Vec<String>) {
    for (which, value, interval) in ITIMERS {
        let mut t = libc::itimerval {
            it_interval: tv(0),
            it_value: tv(0),
        };
        // SAFETY: getitimer writes one itimerval.
        if unsafe { libc::getitimer(which, &mut t) } != 0 {
            fails.push(format!("getitimer {which}: {}", err()));
            continue;
        }
        let (v, i) = (us(t.it_value), us(t.it_interval));
        if i != interval {
            fails.push(format!(
                "itimer {which}: interval {i} us, was set to {interval} us"
            ));
        }
        // setitimer of a CPU-time timer adds a tick to its value (Linux's
        // set_cpu_itimer), once when set up and once more when a restore
        // sets it again: 20 ms of room above.
        let (floor, ceil) = if which == libc::ITIMER_REAL {
            (value.saturating_sub(since_us + 1_000_000), value)
        } else {
            (value - 60_000_000, value + 20_000)
        };
        if v == 0 || v > ceil || v < floor {
            fails.push(format!(
                "itimer {which}: value {v} us, set to {value} us {since_us} us ago (expected in {floor}..={ceil})"
            ));
        }
    }
}

/// Everything recorded after setup.
struct Recorded {
    fds: BTreeMap<i32, FdInfo>,
    rlimits: Vec<(u64, u64)>,
    personality: i32,
    ids: (i32, i32),
}

fn umask_now() -> Result<String, String> {
    let s = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string()))
        .ok_or_else(|| "no Umask line in /proc/self/status".to_string())
}

/// Read exactly the pipe's content from `rfd` (FIONREAD first), then make
/// sure nothing more is there.
fn drain_pipe(name: &str, rfd: i32, want: &[u8], fails: &mut Vec<String>) {
    let mut n: libc::c_int = -1;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(rfd, libc::FIONREAD, &mut n) } != 0 {
        fails.push(format!("{name}: FIONREAD on fd {rfd}: {}", err()));
        return;
    }
    if n as usize != want.len() {
        fails.push(format!(
            "{name}: holds {n} unread bytes, expected {}",
            want.len()
        ));
    }
    // Non-blocking from here on (the flags were compared already).
    // SAFETY: fcntl on our fd.
    unsafe {
        let fl = libc::fcntl(rfd, libc::F_GETFL);
        libc::fcntl(rfd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: read(2) into a live buffer.
        let r = unsafe { libc::read(rfd, buf.as_mut_ptr().cast(), buf.len()) };
        if r <= 0 {
            break;
        }
        got.extend_from_slice(&buf[..r as usize]);
    }
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        fails.push(format!(
            "{name}: read {} bytes, expected {} known bytes (first difference at {first:?})",
            got.len(),
            want.len()
        ));
    }
}

fn check(s: &Setup, rec: &Recorded) -> Vec<String> {
    let mut fails = Vec::new();
    check_itimers(monotonic_us().saturating_sub(s.armed_us), &mut fails);
    match fd_table() {
        Ok(now) => {
            let was: Vec<i32> = rec.fds.keys().copied().collect();
            let is: Vec<i32> = now.keys().copied().collect();
            if was != is {
                fails.push(format!("fd table {is:?}, was {was:?}"));
            }
            for (fd, w) in &rec.fds {
                let Some(n) = now.get(fd) else { continue };
                let who = format!("fd {fd} ({})", w.link);
                let pipe = w.kind == libc::S_IFIFO;
                if pipe {
                    if n.kind != libc::S_IFIFO || !n.link.starts_with("pipe:[") {
                        fails.push(format!("{who}: now {:?} (kind {:o})", n.link, n.kind));
                    }
                    if n.pipe_size != w.pipe_size {
                        fails.push(format!(
                            "{who}: pipe capacity {}, was {}",
                            n.pipe_size, w.pipe_size
                        ));
                    }
                } else {
                    if n.link != w.link {
                        fails.push(format!("{who}: now refers to {:?}", n.link));
                    }
                    if (n.kind, n.dev, n.ino, n.rdev) != (w.kind, w.dev, w.ino, w.rdev) {
                        fails.push(format!(
                            "{who}: kind/dev/ino/rdev {:o}/{}/{}/{}, was {:o}/{}/{}/{}",
                            n.kind, n.dev, n.ino, n.rdev, w.kind, w.dev, w.ino, w.rdev
                        ));
                    }
                }
                if n.flags != w.flags {
                    fails.push(format!("{who}: F_GETFL {:#o}, was {:#o}", n.flags, w.flags));
                }
                if n.fd_flags != w.fd_flags {
                    fails.push(format!(
                        "{who}: F_GETFD {} (FD_CLOEXEC), was {}",
                        n.fd_flags, w.fd_flags
                    ));
                }
                if n.offset != w.offset {
                    fails.push(format!("{who}: offset {}, was {}", n.offset, w.offset));
                }
            }
            // Pipe ends paired as before: same inode now iff same before.
            let pipes: Vec<i32> = rec
                .fds
                .iter()
                .filter(|(_, i)| i.kind == libc::S_IFIFO)
                .map(|(fd, _)| *fd)
                .collect();
            for &a in &pipes {
                for &b in &pipes {
                    if a >= b {
                        continue;
                    }
                    let (Some(na), Some(nb)) = (now.get(&a), now.get(&b)) else {
                        continue;
                    };
                    let was_same = rec.fds[&a].ino == rec.fds[&b].ino;
                    let is_same = na.ino == nb.ino;
                    if was_same != is_same {
                        fails.push(format!(
                            "fds {a} and {b}: {} the same pipe now, {} before",
                            if is_same { "are" } else { "are not" },
                            if was_same { "were" } else { "were not" }
                        ));
                    }
                }
            }
        }
        Err(e) => fails.push(e),
    }
    for (name, fd, want) in [
        ("data", s.data, pattern(1, DATA_LEN)),
        ("ro", s.ro, pattern(3, RO_LEN)),
    ] {
        match pread_all(fd, want.len()) {
            Ok(got) if got == want => {}
            Ok(got) => fails.push(format!(
                "{name} (fd {fd}): {} bytes, not its {} known bytes",
                got.len(),
                want.len()
            )),
            Err(e) => fails.push(e),
        }
    }
    let log_path = std::path::Path::new(&s.cwd).with_file_name("log");
    match std::fs::read(&log_path) {
        Ok(got) if got == pattern(2, LOG_LEN) => {}
        Ok(got) => fails.push(format!(
            "{}: {} bytes, not its {LOG_LEN} known bytes",
            log_path.display(),
            got.len()
        )),
        Err(e) => fails.push(format!("{}: {e}", log_path.display())),
    }
    drain_pipe("P1", s.p1[0], &pattern(4, P1_LEN), &mut fails);
    drain_pipe("P2", s.p2[0], &pattern(5, P2_LEN), &mut fails);
    match std::env::current_dir() {
        Ok(c) if c.to_string_lossy() == s.cwd => {}
        Ok(c) => fails.push(format!("cwd {}, was {}", c.display(), s.cwd)),
        Err(e) => fails.push(format!("getcwd: {e}")),
    }
    match std::fs::read_link("/proc/self/cwd") {
        Ok(c) if c.to_string_lossy() == s.cwd => {}
        Ok(c) => fails.push(format!("/proc/self/cwd {}, was {}", c.display(), s.cwd)),
        Err(e) => fails.push(format!("/proc/self/cwd: {e}")),
    }
    match umask_now() {
        Ok(u) if u == format!("{UMASK:04o}") => {}
        Ok(u) => fails.push(format!("Umask {u}, expected {UMASK:04o}")),
        Err(e) => fails.push(e),
    }
    let rl = rlimits();
    for (r, (now, was)) in rl.iter().zip(&rec.rlimits).enumerate() {
        if now != was {
            fails.push(format!("rlimit {r}: {now:?}, was {was:?}"));
        }
    }
    let nofile = rl[libc::RLIMIT_NOFILE as usize];
    if nofile.0 != NOFILE_SOFT {
        fails.push(format!(
            "RLIMIT_NOFILE soft {}, expected {NOFILE_SOFT}",
            nofile.0
        ));
    }
    if rl[libc::RLIMIT_CORE as usize] != (0, libc::RLIM_INFINITY) {
        fails.push(format!(
            "RLIMIT_CORE {:?}, expected 0/unlimited",
            rl[libc::RLIMIT_CORE as usize]
        ));
    }
    if personality() != rec.personality {
        fails.push(format!(
            "personality {:#x}, was {:#x}",
            personality(),
            rec.personality
        ));
    }
    let pid = std::process::id() as i32;
    if ids() != rec.ids || rec.ids != (pid, pid) {
        fails.push(format!(
            "(pgid, sid) {:?}, was {:?}; pid {pid}",
            ids(),
            rec.ids
        ));
    }
    match std::fs::read_to_string("/proc/self/comm") {
        Ok(c) if c.trim_end() == COMM => {}
        Ok(c) => fails.push(format!(
            "/proc/self/comm {:?}, expected {COMM:?}",
            c.trim_end()
        )),
        Err(e) => fails.push(format!("/proc/self/comm: {e}")),
    }
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(16)];
    if name != COMM.as_bytes() {
        fails.push(format!(
            "PR_GET_NAME {:?}, expected {COMM:?}",
            String::from_utf8_lossy(name)
        ));
    }
    // Last (it changes the file): O_APPEND still appends.
    if let Err(e) = write_all(LOG_FD, b"!", "log") {
        fails.push(e);
    } else {
        // SAFETY: lseek on our fd.
        let off = unsafe { libc::lseek(LOG_FD, 0, libc::SEEK_CUR) };
        let len = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        if off != LOG_LEN as i64 + 1 || len != LOG_LEN as u64 + 1 {
            fails.push(format!(
                "fd {LOG_FD} (log, O_APPEND): a 1-byte write left offset {off} and size {len}, expected {}",
                LOG_LEN + 1
            ));
        }
    }
    let _ = s.null;
    fails
}

fn die(msg: &str) -> ! {
    eprintln!("ck_files: setup failed: {msg}");
    std::process::exit(3);
}

fn main() {
    let out = ck::out_path();
    let brk = ck::break_requested();
    ck::catch_sigterm().unwrap_or_else(|e| die(&e));
    let s = setup().unwrap_or_else(|e| die(&e));
    let rec = Recorded {
        fds: fd_table().unwrap_or_else(|e| die(&e)),
        rlimits: rlimits(),
        personality: personality(),
        ids: ids(),
    };
    let expect = [
        (s.data, libc::O_RDWR, DATA_OFF, 0),
        (LOG_FD, libc::O_WRONLY | libc::O_APPEND, LOG_LEN as i64, 0),
        (s.ro, libc::O_RDONLY, RO_OFF, libc::FD_CLOEXEC),
        (s.null, libc::O_RDWR, 0, 0),
    ];
    for (fd, fl, off, fdfl) in expect {
        match rec.fds.get(&fd) {
            Some(i)
                if i.flags & (libc::O_ACCMODE | libc::O_APPEND) == fl
                    && i.offset == off
                    && i.fd_flags == fdfl => {}
            other => die(&format!("fd {fd} after setup: {other:?}")),
        }
    }
    if umask_now().ok().as_deref() != Some("0027") {
        die(&format!("Umask after setup: {:?}", umask_now()));
    }
    ck::report(&out, &format!("ready {}", std::process::id()));
    if brk {
        // SAFETY: lseek on our fd.
        unsafe { libc::lseek(s.data, 0, libc::SEEK_SET) };
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let fails = check(&s, &rec);
    ck::finish(&out, &fails)
}
