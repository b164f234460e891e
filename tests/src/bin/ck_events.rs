//! `ck_events --out FILE [--break]`: eventfd, epoll, timerfd and signalfd
//! (protocol: `tern_tests::ck`). Single-threaded.
//!
//! Setup:
//! - eventfds: A (O_NONBLOCK) with counter 0x1_2345_6789 (above eventfd2's
//!   32-bit initial value), B (EFD_SEMAPHORE | O_NONBLOCK) counting 3, C
//!   (O_NONBLOCK) with its dup C2, D (counting 1);
//! - timerfds: TL (MONOTONIC) 3600 s left, then every 60 s; TA (REALTIME,
//!   TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET) at now + 3600 s; T1
//!   (MONOTONIC, O_NONBLOCK) a one-shot of 1 ms that has fired, its tick not
//!   read; TP (MONOTONIC) every 100 ms;
//! - a signalfd S (O_NONBLOCK) for SIGUSR1 and SIGRTMIN+3, both blocked,
//!   SIGUSR1 sent to itself and left pending;
//! - a pipe with 10 bytes queued (read end P);
//! - POSIX timers (raw `timer_create`): PT1 (MONOTONIC, SIGRTMIN+4 to the
//!   process, value 0x1111) every 50 ms, counted by a handler; PT2
//!   (REALTIME, SIGEV_NONE) 3600 s left; PT3 (BOOTTIME, SIGUSR2 to this
//!   thread, value 0xfeed) disarmed;
//! - an epoll E2 (O_NONBLOCK set with F_SETFL) watching D (EPOLLIN, data
//!   0xD);
//! - an epoll E watching A (EPOLLIN|EPOLLET, data 0xA000_0000_0000_000A), B
//!   (EPOLLIN, 0xB), T1 (EPOLLIN|EPOLLONESHOT, 0x71), P (EPOLLIN, 0x50), S
//!   (EPOLLIN, 0x5), E2 (EPOLLIN, 0xE2), TL (EPOLLIN, 0x7L); one
//!   epoll_wait then consumes A's edge and disarms T1's oneshot.
//!
//! On SIGTERM it checks: F_GETFL of every fd; an epoll_wait(E, timeout 0)
//! reports exactly B, P, S, E2 (A's edge may show again: a restore
//! re-registers it, as a spurious wakeup) with their data; E's interest
//! list is as set (re-arming T1 with EPOLL_CTL_MOD reports it, writing A
//! reports A, TL is never ready); A reads 0x1_2345_6789, B reads 1 three
//! times then EAGAIN, a write to C reads back through C2, D reads 1; TL has
//! 3540-3600 s left (no more than at `ready`) and a 60 s interval; TA's
//! deadline is the one set (its time left + now within 0.5 s of it); T1
//! holds its one tick; TP fires within 200 ms, with a 100 ms interval; S
//! reads SIGUSR1, then a SIGRTMIN+3 sent now; /proc/self/timers reads as
//! at `ready` (IDs, signals, values, targets, clocks), PT1's handler runs
//! at least twice in 300 ms, PT2 has 3540-3600 s left, PT3 is disarmed.
//!
//! `--break`: right after `ready`: A's counter read, P removed from E, TL
//! disarmed, PT2 deleted.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern_tests::ck;

const A_COUNT: u64 = 0x1_2345_6789;
const A_DATA: u64 = 0xA000_0000_0000_000A;

fn err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn ok(r: i32, what: &str) -> Result<i32, String> {
    if r < 0 {
        return Err(format!("{what}: {}", err()));
    }
    Ok(r)
}

fn getfl(fd: i32) -> i32 {
    // SAFETY: fcntl on an fd number.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

fn write_u64(fd: i32, v: u64) -> Result<(), String> {
    // SAFETY: writes 8 bytes from a local.
    let n = unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
    if n != 8 {
        return Err(format!("write to fd {fd}: {}", err()));
    }
    Ok(())
}

/// One 8-byte read; None on EAGAIN.
fn read_u64(fd: i32) -> Result<Option<u64>, String> {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        return Ok(Some(v));
    }
    if n < 0 && err().raw_os_error() == Some(libc::EAGAIN) {
        return Ok(None);
    }
    Err(format!("read of fd {fd}: {n} ({})", err()))
}

fn ts(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

fn dur(t: libc::timespec) -> Duration {
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

fn settime(fd: i32, flags: i32, interval: Duration, value: Duration) -> Result<(), String> {
    let spec = libc::itimerspec {
        it_interval: ts(interval),
        it_value: ts(value),
    };
    // SAFETY: timerfd_settime with a local itimerspec.
    ok(
        unsafe { libc::timerfd_settime(fd, flags, &spec, std::ptr::null_mut()) },
        "timerfd_settime",
    )
    .map(|_| ())
}

/// (time left, interval).
fn gettime(fd: i32) -> Result<(Duration, Duration), String> {
    // SAFETY: zeroed plain struct, filled by the kernel.
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: timerfd_gettime into a local.
    let r = unsafe { libc::timerfd_gettime(fd, &mut spec) };
    ok(r, "timerfd_gettime")?;
    Ok((dur(spec.it_value), dur(spec.it_interval)))
}

fn ctl(ep: i32, op: i32, fd: i32, events: u32, data: u64) -> Result<(), String> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: epoll_ctl with a local event.
    ok(
        unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) },
        &format!("epoll_ctl({ep}, {op}, {fd})"),
    )
    .map(|_| ())
}

/// epoll_wait(ep, timeout): data of each ready entry.
fn wait(ep: i32, timeout_ms: i32) -> Result<Vec<u64>, String> {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
    // SAFETY: epoll_wait into a local array of 16.
    let n = ok(
        unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 16, timeout_ms) },
        "epoll_wait",
    )?;
    let mut v: Vec<u64> = evs[..n as usize].iter().map(|e| e.u64).collect();
    v.sort_unstable();
    Ok(v)
}

fn realtime() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn sigrtmin3() -> i32 {
    libc::SIGRTMIN() + 3
}

static PT1_FIRED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn on_pt1(_: i32) {
    PT1_FIRED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// Raw timer_create: the kernel's timer ID.
fn timer_create(clock: i32, signo: i32, value: u64, notify: i32, tid: i32) -> Result<i32, String> {
    let mut sev = [0u8; 64];
    sev[0..8].copy_from_slice(&value.to_ne_bytes());
    sev[8..12].copy_from_slice(&signo.to_ne_bytes());
    sev[12..16].copy_from_slice(&notify.to_ne_bytes());
    sev[16..20].copy_from_slice(&tid.to_ne_bytes());
    let mut id: i32 = -1;
    // SAFETY: timer_create reads 64 bytes of sigevent and writes the id.
    let r = unsafe { libc::syscall(libc::SYS_timer_create, clock, sev.as_ptr(), &mut id) };
    if r != 0 {
        return Err(format!("timer_create(clock {clock}): {}", err()));
    }
    Ok(id)
}

fn timer_settime(id: i32, interval: Duration, value: Duration) -> Result<(), String> {
    let spec = libc::itimerspec {
        it_interval: ts(interval),
        it_value: ts(value),
    };
    // SAFETY: timer_settime with a local itimerspec.
    let r = unsafe {
        libc::syscall(
            libc::SYS_timer_settime,
            id,
            0,
            &spec as *const libc::itimerspec,
            std::ptr::null_mut::<libc::itimerspec>(),
        )
    };
    if r != 0 {
        return Err(format!("timer_settime({id}): {}", err()));
    }
    Ok(())
}

/// (time left, interval) of POSIX timer `id`.
fn timer_gettime(id: i32) -> Result<(Duration, Duration), String> {
    // SAFETY: zeroed plain struct, filled by the kernel.
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: timer_gettime into a local.
    let r = unsafe {
        libc::syscall(
            libc::SYS_timer_gettime,
            id,
            &mut spec as *mut libc::itimerspec,
        )
    };
    if r != 0 {
        return Err(format!("timer_gettime({id}): {}", err()));
    }
    Ok((dur(spec.it_value), dur(spec.it_interval)))
}

struct Timers {
    pt1: i32,
    pt2: i32,
    pt3: i32,
}

fn posix_timers() -> Result<Timers, String> {
    // SAFETY: installs a handler that only adds to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_pt1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        ok(
            libc::sigaction(libc::SIGRTMIN() + 4, &sa, std::ptr::null_mut()),
            "sigaction(SIGRTMIN+4)",
        )?;
        // SIGUSR2 (PT3's, never sent: PT3 is disarmed) ignored anyway.
        libc::signal(libc::SIGUSR2, libc::SIG_IGN);
    }
    let pt1 = timer_create(libc::CLOCK_MONOTONIC, libc::SIGRTMIN() + 4, 0x1111, 0, 0)?;
    timer_settime(pt1, Duration::from_millis(50), Duration::from_millis(50))?;
    let pt2 = timer_create(libc::CLOCK_REALTIME, libc::SIGALRM, 0, libc::SIGEV_NONE, 0)?;
    timer_settime(pt2, Duration::ZERO, Duration::from_secs(3600))?;
    // SAFETY: gettid takes nothing.
    let me = unsafe { libc::gettid() };
    let pt3 = timer_create(
        libc::CLOCK_BOOTTIME,
        libc::SIGUSR2,
        0xfeed,
        libc::SIGEV_THREAD_ID,
        me,
    )?;
    Ok(Timers { pt1, pt2, pt3 })
}

fn proc_timers() -> String {
    let mut blocks: Vec<String> = std::fs::read_to_string("/proc/self/timers")
        .unwrap_or_else(|e| format!("/proc/self/timers: {e}"))
        .split("ID:")
        .map(|b| b.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|b| !b.is_empty())
        .collect();
    blocks.sort();
    blocks.join(" | ")
}

fn check_timers(t: &Timers, listed: &str) -> Result<(), String> {
    let now = proc_timers();
    if now != listed {
        return Err(format!("/proc/self/timers: {now:?}, expected {listed:?}"));
    }
    let before = PT1_FIRED.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    let fired = PT1_FIRED.load(std::sync::atomic::Ordering::SeqCst) - before;
    if fired < 2 {
        return Err(format!(
            "POSIX timer PT1 (every 50 ms): fired {fired} times in 300 ms"
        ));
    }
    let (left, interval) = timer_gettime(t.pt1)?;
    if interval != Duration::from_millis(50) || left > Duration::from_millis(50) {
        return Err(format!(
            "POSIX timer PT1: {left:?} left every {interval:?}, expected at most 50 ms every 50 ms"
        ));
    }
    let (left, _) = timer_gettime(t.pt2)?;
    if !(Duration::from_secs(3540)..Duration::from_secs(3600)).contains(&left) {
        return Err(format!(
            "POSIX timer PT2: {left:?} left, expected 3540-3600 s"
        ));
    }
    let (left, interval) = timer_gettime(t.pt3)?;
    if !left.is_zero() || !interval.is_zero() {
        return Err(format!(
            "POSIX timer PT3 (disarmed): {left:?} left every {interval:?}"
        ));
    }
    Ok(())
}

struct Fds {
    a: i32,
    b: i32,
    c: i32,
    c2: i32,
    d: i32,
    tl: i32,
    ta: i32,
    t1: i32,
    tp: i32,
    s: i32,
    p: i32,
    /// Held so the pipe keeps its 10 bytes readable.
    #[allow(dead_code)]
    pw: i32,
    e: i32,
    e2: i32,
}

const T1: u64 = 0x7100;
const ET_B: u64 = 0xB;
const ET_P: u64 = 0x50;
const ET_S: u64 = 0x5;
const ET_E2: u64 = 0xE2;
const TL_DATA: u64 = 0x7A;

fn setup() -> Result<(Fds, Duration), String> {
    let nb = libc::O_NONBLOCK;
    // SAFETY: plain syscalls creating fds of our own, with local buffers.
    unsafe {
        let a = ok(libc::eventfd(0, libc::EFD_CLOEXEC | nb), "eventfd A")?;
        write_u64(a, A_COUNT)?;
        let b = ok(
            libc::eventfd(3, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE | nb),
            "eventfd B",
        )?;
        let c = ok(libc::eventfd(0, nb), "eventfd C")?;
        let c2 = ok(libc::dup(c), "dup C")?;
        let d = ok(libc::eventfd(1, libc::EFD_CLOEXEC), "eventfd D")?;
        let tl = ok(
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC),
            "timerfd TL",
        )?;
        settime(tl, 0, Duration::from_secs(60), Duration::from_secs(3600))?;
        let ta = ok(
            libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_CLOEXEC),
            "timerfd TA",
        )?;
        let deadline = Duration::from_secs(realtime().as_secs() + 3600);
        settime(
            ta,
            libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET,
            Duration::ZERO,
            deadline,
        )?;
        let t1 = ok(
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | nb),
            "timerfd T1",
        )?;
        settime(t1, 0, Duration::ZERO, Duration::from_millis(1))?;
        let tp = ok(
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC),
            "timerfd TP",
        )?;
        settime(
            tp,
            0,
            Duration::from_millis(100),
            Duration::from_millis(100),
        )?;
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, sigrtmin3());
        ok(
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            "sigprocmask",
        )?;
        let s = ok(libc::signalfd(-1, &set, libc::SFD_CLOEXEC | nb), "signalfd")?;
        ok(libc::kill(libc::getpid(), libc::SIGUSR1), "kill SIGUSR1")?;
        let mut pp = [0; 2];
        ok(libc::pipe2(pp.as_mut_ptr(), libc::O_CLOEXEC), "pipe2")?;
        let [p, pw] = pp;
        if libc::write(pw, b"0123456789".as_ptr().cast(), 10) != 10 {
            return Err(format!("write to the pipe: {}", err()));
        }
        let e2 = ok(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1 E2")?;
        ok(
            libc::fcntl(e2, libc::F_SETFL, getfl(e2) | nb),
            "F_SETFL on E2",
        )?;
        ctl(e2, libc::EPOLL_CTL_ADD, d, libc::EPOLLIN as u32, 0xD)?;
        let e = ok(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1 E")?;
        let r#in = libc::EPOLLIN as u32;
        ctl(
            e,
            libc::EPOLL_CTL_ADD,
            a,
            r#in | libc::EPOLLET as u32,
            A_DATA,
        )?;
        ctl(e, libc::EPOLL_CTL_ADD, b, r#in, ET_B)?;
        // T1 fires 1 ms after it was set.
        std::thread::sleep(Duration::from_millis(20));
        ctl(
            e,
            libc::EPOLL_CTL_ADD,
            t1,
            r#in | libc::EPOLLONESHOT as u32,
            T1,
        )?;
        ctl(e, libc::EPOLL_CTL_ADD, p, r#in, ET_P)?;
        ctl(e, libc::EPOLL_CTL_ADD, s, r#in, ET_S)?;
        ctl(e, libc::EPOLL_CTL_ADD, e2, r#in, ET_E2)?;
        ctl(e, libc::EPOLL_CTL_ADD, tl, r#in, TL_DATA)?;
        let first = wait(e, 0)?;
        let want = {
            let mut w = vec![A_DATA, ET_B, T1, ET_P, ET_S, ET_E2];
            w.sort_unstable();
            w
        };
        if first != want {
            return Err(format!(
                "the first epoll_wait reported {first:x?}, expected {want:x?}"
            ));
        }
        Ok((
            Fds {
                a,
                b,
                c,
                c2,
                d,
                tl,
                ta,
                t1,
                tp,
                s,
                p,
                pw,
                e,
                e2,
            },
            deadline,
        ))
    }
}

fn check(f: &Fds, flags: &[(&str, i32, i32)], deadline: Duration, bad: &mut Vec<String>) {
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            bad.push(e);
        }
    };
    for &(n, fd, want) in flags {
        let found = getfl(fd);
        if found != want {
            note(Err(format!(
                "{n} (fd {fd}): F_GETFL found {found:#x}, expected {want:#x}"
            )));
        }
    }
    // Readiness, before anything is read.
    note((|| {
        let mut got = wait(f.e, 0)?;
        got.retain(|&d| d != A_DATA);
        let mut want = vec![ET_B, ET_P, ET_S, ET_E2];
        want.sort_unstable();
        if got != want {
            return Err(format!(
                "epoll E: ready {got:x?}, expected {want:x?} (A aside)"
            ));
        }
        let nested = wait(f.e2, 0)?;
        if nested != [0xD] {
            return Err(format!("epoll E2: ready {nested:x?}, expected [d]"));
        }
        // A disarmed oneshot stays silent until re-armed.
        ctl(
            f.e,
            libc::EPOLL_CTL_MOD,
            f.t1,
            libc::EPOLLIN as u32 | libc::EPOLLONESHOT as u32,
            T1,
        )
        .map_err(|e| format!("re-arming T1 in E: {e}"))?;
        if !wait(f.e, 0)?.contains(&T1) {
            return Err("epoll E: T1 not reported once re-armed".into());
        }
        Ok(())
    })());
    // Counters.
    note((|| {
        match read_u64(f.a)? {
            Some(A_COUNT) => {}
            v => return Err(format!("eventfd A: read {v:x?}, expected {A_COUNT:#x}")),
        }
        write_u64(f.a, 1)?;
        if !wait(f.e, 0)?.contains(&A_DATA) {
            return Err("epoll E: A not reported after a write (edge-triggered)".into());
        }
        let sem: Vec<Option<u64>> = (0..4).map(|_| read_u64(f.b)).collect::<Result<_, _>>()?;
        if sem != [Some(1), Some(1), Some(1), None] {
            return Err(format!(
                "eventfd B (semaphore of 3): reads {sem:?}, expected three 1s then EAGAIN"
            ));
        }
        write_u64(f.c, 42)?;
        match read_u64(f.c2)? {
            Some(42) => {}
            v => {
                return Err(format!(
                    "eventfd C2 (dup of C): read {v:?} after 42 was written to C"
                ));
            }
        }
        match read_u64(f.d)? {
            Some(1) => Ok(()),
            v => Err(format!("eventfd D: read {v:?}, expected 1")),
        }
    })());
    // Timers.
    note((|| {
        let (left, interval) = gettime(f.tl)?;
        if !(Duration::from_secs(3540)..Duration::from_secs(3600)).contains(&left)
            || interval != Duration::from_secs(60)
        {
            return Err(format!(
                "timerfd TL: {left:?} left every {interval:?}, expected 3540-3600 s every 60 s"
            ));
        }
        let (left, interval) = gettime(f.ta)?;
        let at = realtime() + left;
        let off = at.as_secs_f64() - deadline.as_secs_f64();
        if off.abs() > 0.5 || !interval.is_zero() {
            return Err(format!(
                "timerfd TA (absolute): fires {off:+.3} s from its deadline, interval {interval:?}"
            ));
        }
        match read_u64(f.t1)? {
            Some(1) => {}
            v => {
                return Err(format!(
                    "timerfd T1: read {v:?}, expected its 1 unread tick"
                ));
            }
        }
        let (_, interval) = gettime(f.tp)?;
        if interval != Duration::from_millis(100) {
            return Err(format!(
                "timerfd TP: interval {interval:?}, expected 100 ms"
            ));
        }
        // Drain what accumulated, then the next expiry within 200 ms.
        read_u64(f.tp)?;
        let t0 = Instant::now();
        let mut pfd = libc::pollfd {
            fd: f.tp,
            events: libc::POLLIN,
            revents: 0,
        };
        // PT1's signal interrupts the wait (poll is never restarted).
        let n = loop {
            // SAFETY: poll on one local pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
            if n >= 0 || err().raw_os_error() != Some(libc::EINTR) || t0.elapsed().as_secs() >= 1 {
                break n;
            }
        };
        let took = t0.elapsed();
        if n != 1 || took > Duration::from_millis(200) {
            return Err(format!(
                "timerfd TP (every 100 ms): next expiry after {took:?} (poll {n})"
            ));
        }
        Ok(())
    })());
    // Signals.
    note((|| {
        let mut si: libc::signalfd_siginfo =
            // SAFETY: a plain struct filled by read.
            unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let read = |si: &mut libc::signalfd_siginfo| {
            // SAFETY: reads one siginfo into a local.
            unsafe { libc::read(f.s, (si as *mut libc::signalfd_siginfo).cast(), size) }
        };
        if read(&mut si) != size as isize || si.ssi_signo != libc::SIGUSR1 as u32 {
            return Err(format!(
                "signalfd S: read signal {} ({}), expected the pending SIGUSR1",
                si.ssi_signo,
                err()
            ));
        }
        // SAFETY: kill to ourselves.
        unsafe { libc::kill(libc::getpid(), sigrtmin3()) };
        if read(&mut si) != size as isize || si.ssi_signo != sigrtmin3() as u32 {
            return Err(format!(
                "signalfd S: read signal {} ({}), expected SIGRTMIN+3 just sent",
                si.ssi_signo,
                err()
            ));
        }
        Ok(())
    })());
}

fn main() {
    let out = ck::out_path();
    let broken = ck::break_requested();
    if let Err(e) = ck::catch_sigterm() {
        ck::finish(&out, &[format!("setup: {e}")]);
    }
    let (f, deadline) = match setup() {
        Ok(x) => x,
        Err(e) => ck::finish(&out, &[format!("setup: {e}")]),
    };
    let named = [
        ("A", f.a),
        ("B", f.b),
        ("C", f.c),
        ("C2", f.c2),
        ("D", f.d),
        ("TL", f.tl),
        ("TA", f.ta),
        ("T1", f.t1),
        ("TP", f.tp),
        ("S", f.s),
        ("P", f.p),
        ("E", f.e),
        ("E2", f.e2),
    ];
    let flags: Vec<(&str, i32, i32)> = named.iter().map(|&(n, fd)| (n, fd, getfl(fd))).collect();
    let timers = match posix_timers() {
        Ok(t) => t,
        Err(e) => ck::finish(&out, &[format!("setup: {e}")]),
    };
    let listed = proc_timers();
    ck::report(&out, &format!("ready {}", std::process::id()));
    if broken {
        let _ = read_u64(f.a);
        let _ = ctl(f.e, libc::EPOLL_CTL_DEL, f.p, 0, 0);
        let _ = settime(f.tl, 0, Duration::ZERO, Duration::ZERO);
        // SAFETY: deletes one of our own timers.
        unsafe { libc::syscall(libc::SYS_timer_delete, timers.pt2) };
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut bad = Vec::new();
    check(&f, &flags, deadline, &mut bad);
    if let Err(e) = check_timers(&timers, &listed) {
        bad.push(e);
    }
    ck::finish(&out, &bad);
}
