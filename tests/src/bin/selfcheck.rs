//! A target that checks itself, for the kill-safety tests.
//!
//! `selfcheck [MEM_MIB]` starts, sets everything up (so that its address space
//! and fd table stay fixed afterwards), prints `{"ready":true,"pid":N}` and
//! then runs these threads until told to stop:
//!
//! - two `counter` threads spinning in user mode: each writes a running
//!   sequence into its own array and re-verifies the whole array, and checks a
//!   value kept in registers across a syscall;
//! - `reader`: blocked in read(2) on a pipe, checks it receives 1, 2, 3, ...;
//! - `writer`: nanosleep(2) 5 ms, then writes the next number into the pipe;
//! - `sleeper`: nanosleep(2) 10 ms in a loop, checks each returns 0 after at
//!   least 10 ms (a restarted sleep must not come back early or with EINTR);
//! - `ids`: getpid(2)/gettid(2) in a loop, checks the answers;
//! - `futex`: condition-variable waits with a 20 ms timeout.
//!
//! A `MEM_MIB` MiB region (default 16) holds pseudo-random pages that never
//! change: checkpointing must leave them intact.
//!
//! stdin commands, answered with one JSON line:
//! - `check`: waits until every thread made progress (at most 3 s), verifies
//!   the region, answers `{"result":"PASS"|"FAIL", "detail": ...}`;
//! - `ping`, `exit`.
//!
//! On SIGTERM it runs the same check, prints the line and exits 0 on PASS,
//! 1 on FAIL.

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use tern_tests::pattern::{self, Content, PAGE};

const THREADS: [&str; 7] = [
    "counter0", "counter1", "reader", "writer", "sleeper", "ids", "futex",
];
static PROGRESS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
static FAILED: AtomicBool = AtomicBool::new(false);
static FAILURES: Mutex<String> = Mutex::new(String::new());
static TERM: AtomicBool = AtomicBool::new(false);
const SEED: u64 = 0x5e1f_c4ec;

fn fail(thread: &str, what: std::fmt::Arguments) {
    let mut f = FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    if f.len() < 2000 {
        let _ = writeln!(f, "{thread}: {what}");
    }
    FAILED.store(true, Ordering::SeqCst);
}

fn now() -> Instant {
    Instant::now()
}

fn sleep_raw(d: Duration) -> (i64, i32) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    };
    // SAFETY: sleeping takes integers (or a timespec local we own) and touches no memory of ours else.
    let rc = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    let errno = if rc < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    };
    (rc as i64, errno)
}

fn counter(id: usize, arr: &'static mut [u64]) {
    let n = arr.len() as u64;
    let salt = pattern::mix(id as u64 + 77);
    let mut c: u64 = 0;
    loop {
        c += 1;
        arr[sys::usize_of(c % n)] = pattern::mix(c ^ salt);
        if c.is_multiple_of(4096) {
            for i in 0..n {
                // The last c' <= c with c' % n == i.
                let back = (c + n - i) % n;
                let expect = if c >= back && c - back > 0 {
                    pattern::mix((c - back) ^ salt)
                } else {
                    0
                };
                if arr[sys::usize_of(i)] != expect {
                    fail(
                        THREADS[id],
                        format_args!(
                            "array[{i}] = {:#x}, want {expect:#x} at c={c}",
                            arr[sys::usize_of(i)]
                        ),
                    );
                    break;
                }
            }
            let x = black_box(pattern::mix(c));
            // SAFETY: takes no arguments and cannot fail.
            let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
            if black_box(x) != pattern::mix(c) || ppid <= 0 {
                fail(
                    THREADS[id],
                    format_args!("value changed across a syscall (ppid {ppid})"),
                );
            }
            PROGRESS[id].fetch_add(1, Ordering::Relaxed);
        }
        if c.is_multiple_of(65536) {
            sleep_raw(Duration::from_millis(1));
        }
    }
}

fn reader(fd: i32) {
    let mut expect: u64 = 1;
    loop {
        let mut buf = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            // SAFETY: the kernel writes at most the given length into the buffer, which we own for the call.
            let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr() as *mut _, 8 - got) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                fail("reader", format_args!("read: {e}"));
                sleep_raw(Duration::from_millis(10));
                continue;
            }
            if n == 0 {
                fail("reader", format_args!("read: end of file"));
                return;
            }
            got += n as usize;
        }
        let v = u64::from_le_bytes(buf);
        if v != expect {
            fail("reader", format_args!("got {v}, want {expect}"));
        }
        expect = v + 1;
        PROGRESS[2].fetch_add(1, Ordering::Relaxed);
    }
}

fn writer(fd: i32) {
    let mut v: u64 = 1;
    loop {
        let (rc, errno) = sleep_raw(Duration::from_millis(5));
        if rc != 0 {
            fail(
                "writer",
                format_args!("nanosleep returned {rc} errno {errno}"),
            );
        }
        let b = v.to_le_bytes();
        // SAFETY: the kernel reads at most the given length from the buffer, which we own for the call.
        let n = unsafe { libc::write(fd, b.as_ptr() as *const _, 8) };
        if n != 8 {
            fail(
                "writer",
                format_args!("write returned {n}: {}", std::io::Error::last_os_error()),
            );
        }
        v += 1;
        PROGRESS[3].fetch_add(1, Ordering::Relaxed);
    }
}

fn sleeper() {
    loop {
        let t = now();
        let (rc, errno) = sleep_raw(Duration::from_millis(10));
        let el = t.elapsed();
        if rc != 0 {
            fail(
                "sleeper",
                format_args!("nanosleep returned {rc} errno {errno}"),
            );
        } else if el < Duration::from_millis(10) {
            fail(
                "sleeper",
                format_args!("nanosleep(10 ms) returned after {el:?}"),
            );
        }
        PROGRESS[4].fetch_add(1, Ordering::Relaxed);
    }
}

fn ids() {
    let pid = std::process::id() as i64;
    // SAFETY: takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    loop {
        for _ in 0..100 {
            // SAFETY: takes no arguments and cannot fail.
            let p = unsafe { libc::syscall(libc::SYS_getpid) };
            // SAFETY: takes no arguments and cannot fail.
            let t = unsafe { libc::syscall(libc::SYS_gettid) };
            if p != pid || t != tid {
                fail(
                    "ids",
                    format_args!("getpid {p} (want {pid}), gettid {t} (want {tid})"),
                );
            }
        }
        PROGRESS[5].fetch_add(1, Ordering::Relaxed);
        sleep_raw(Duration::from_micros(200));
    }
}

fn futex() {
    static M: Mutex<u64> = Mutex::new(0);
    static CV: Condvar = Condvar::new();
    loop {
        let g = M.lock().unwrap_or_else(|e| e.into_inner());
        let t = now();
        let (g, res) = CV
            .wait_timeout(g, Duration::from_millis(20))
            .unwrap_or_else(|e| e.into_inner());
        drop(g);
        // Nobody notifies: every wait must time out, after 20 ms.
        if !res.timed_out() {
            // A spurious wake-up is allowed by the API; count it, don't fail.
        } else if t.elapsed() < Duration::from_millis(20) {
            fail(
                "futex",
                format_args!("20 ms wait timed out after {:?}", t.elapsed()),
            );
        }
        PROGRESS[6].fetch_add(1, Ordering::Relaxed);
    }
}

struct Mem {
    addr: usize,
    pages: usize,
}

fn check(mem: &Mem, out: &mut String) -> bool {
    out.clear();
    let before: Vec<u64> = PROGRESS.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    let deadline = now() + Duration::from_secs(3);
    let mut ok = true;
    loop {
        let stuck: Vec<usize> = (0..THREADS.len())
            .filter(|&i| PROGRESS[i].load(Ordering::Relaxed) <= before[i])
            .collect();
        if stuck.is_empty() {
            break;
        }
        if now() > deadline {
            let _ = write!(out, "no progress in 3 s:");
            for i in stuck {
                let _ = write!(out, " {}", THREADS[i]);
            }
            let _ = write!(out, "; ");
            ok = false;
            break;
        }
        sleep_raw(Duration::from_millis(2));
    }
    let mut want = [0u8; PAGE];
    let mut bad = 0;
    for i in 0..mem.pages {
        pattern::fill_page(&mut want, Content::Rand, SEED, 0, i as u64);
        // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
        let page = unsafe { std::slice::from_raw_parts((mem.addr + i * PAGE) as *const u8, PAGE) };
        if page != want {
            if bad == 0 {
                let _ = write!(
                    out,
                    "memory page {i} at {:#x} changed; ",
                    mem.addr + i * PAGE
                );
            }
            bad += 1;
        }
    }
    if bad > 0 {
        let _ = write!(out, "{bad} pages changed; ");
        ok = false;
    }
    if FAILED.load(Ordering::SeqCst) {
        let f = FAILURES.lock().unwrap_or_else(|e| e.into_inner());
        let _ = write!(out, "{}", f.replace('\n', "; "));
        ok = false;
    }
    ok
}

fn emit(ok: bool, detail: &str, line: &mut String) {
    line.clear();
    let _ = write!(
        line,
        "{{\"result\":\"{}\",\"detail\":\"",
        if ok { "PASS" } else { "FAIL" }
    );
    for ch in detail.chars() {
        match ch {
            '"' | '\\' => {
                line.push('\\');
                line.push(ch);
            }
            c if (c as u32) < 0x20 => line.push(' '),
            c => line.push(c),
        }
    }
    line.push_str("\",\"progress\":[");
    for (i, p) in PROGRESS.iter().enumerate() {
        let _ = write!(
            line,
            "{}{}",
            if i > 0 { "," } else { "" },
            p.load(Ordering::Relaxed)
        );
    }
    line.push_str("]}\n");
    write_all(1, line.as_bytes());
}

fn write_all(fd: i32, mut b: &[u8]) {
    while !b.is_empty() {
        // SAFETY: the kernel reads at most the given length from the buffer, which we own for the call.
        let n = unsafe { libc::write(fd, b.as_ptr() as *const _, b.len()) };
        if n <= 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        b = &b[n as usize..];
    }
}

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

#[inline(never)]
fn prefault_stack() {
    let mut buf = [0u8; 256 * 1024];
    for i in (0..buf.len()).step_by(PAGE) {
        buf[i] = 1;
    }
    black_box(&mut buf);
}

fn main() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    prefault_stack();

    // SIGTERM goes to the main thread only: block it before any thread starts.
    // SAFETY: sigset operations on a local set; pthread_sigmask reads it and writes no old mask (null).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0; // no SA_RESTART: read(2) on stdin returns EINTR
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }

    let pages = mib * 256;
    // SAFETY: maps or moves only anonymous memory of this program at addresses it owns; the result is checked before use.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let mem = Mem {
        addr: addr as usize,
        pages,
    };
    for i in 0..pages {
        let page =
            // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
            unsafe { std::slice::from_raw_parts_mut((mem.addr + i * PAGE) as *mut u8, PAGE) };
        pattern::fill_page(page, Content::Rand, SEED, 0, i as u64);
    }

    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two fds into `fds`, a local array of two.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rfd, wfd) = (fds[0], fds[1]);
    let arrays: Vec<&'static mut [u64]> = (0..2).map(|_| Vec::leak(vec![0u64; 8192])).collect();
    let mut handles = Vec::new();
    for (id, arr) in arrays.into_iter().enumerate() {
        handles.push(
            std::thread::Builder::new()
                .name(THREADS[id].into())
                .spawn(move || counter(id, arr)),
        );
    }
    handles.push(
        std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || reader(rfd)),
    );
    handles.push(
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || writer(wfd)),
    );
    handles.push(
        std::thread::Builder::new()
            .name("sleeper".into())
            .spawn(sleeper),
    );
    handles.push(std::thread::Builder::new().name("ids".into()).spawn(ids));
    handles.push(
        std::thread::Builder::new()
            .name("futex".into())
            .spawn(futex),
    );
    for h in &handles {
        assert!(h.is_ok(), "thread spawn failed");
    }

    // SAFETY: sigset operations on a local set; pthread_sigmask reads it and writes no old mask (null).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }

    // Every buffer the main loop uses, allocated now.
    let mut detail = String::with_capacity(8192);
    let mut line = String::with_capacity(16384);
    let mut input = vec![0u8; 4096];
    let mut have = 0usize;

    // Let every thread get going (and fault in its stack) before saying ready.
    let _ = check(&mem, &mut detail);
    line.clear();
    let _ = writeln!(line, "{{\"ready\":true,\"pid\":{}}}", std::process::id());
    write_all(1, line.as_bytes());

    loop {
        if TERM.load(Ordering::SeqCst) {
            let ok = check(&mem, &mut detail);
            emit(ok, &detail, &mut line);
            // SAFETY: ends this (forked) process at once; nothing after it runs.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        // SAFETY: the kernel writes at most the given length into the buffer, which we own for the call.
        let n = unsafe { libc::read(0, input[have..].as_mut_ptr() as *mut _, input.len() - have) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // SAFETY: ends this (forked) process at once; nothing after it runs.
            unsafe { libc::_exit(2) };
        }
        if n == 0 {
            // SAFETY: ends this (forked) process at once; nothing after it runs.
            unsafe { libc::_exit(0) };
        }
        have += n as usize;
        while let Some(nl) = input[..have].iter().position(|&b| b == b'\n') {
            let cmd = std::str::from_utf8(&input[..nl])
                .unwrap_or("")
                .trim()
                .to_owned();
            input.copy_within(nl + 1..have, 0);
            have -= nl + 1;
            match cmd.as_str() {
                "check" => {
                    let ok = check(&mem, &mut detail);
                    emit(ok, &detail, &mut line);
                }
                "ping" => write_all(1, b"{\"ok\":true}\n"),
                // SAFETY: ends this (forked) process at once; nothing after it runs.
                "exit" => unsafe { libc::_exit(0) },
                _ => write_all(1, b"{\"ok\":false,\"error\":\"unknown command\"}\n"),
            }
        }
        if have == input.len() {
            have = 0;
        }
    }
}
