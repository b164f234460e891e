//! `ck_threads --out FILE [--break]`: threads (protocol: `tern_tests::ck`).
//!
//! A restored process must have the same PID, the same TIDs (glibc caches
//! each thread's TID in its `struct pthread`), the same thread names, each
//! thread's own TLS (fs base), and every thread must go on from where it
//! was, whatever it was blocked in.
//!
//! Main plus 8 threads. Each thread names itself with pthread_setname_np
//! (`ckt-N-KIND`), records its gettid(), its pthread_self(), the address of
//! its thread_local counter and an id in a second thread_local, and loops:
//! - 0 `spin`: computes in user mode, no system call at all;
//! - 1 `cvnote`: waits on a Condvar (futex) with a 1 s timeout, woken by
//!   the feeder (7), checking the shared sequence it is woken for only grows;
//! - 2 `cvtime`: waits on another Condvar that nobody signals (5 ms timeout);
//! - 3 `nap`: nanosleep 1 ms; 4 `longnap`: nanosleep 250 ms;
//! - 5 `pipeA`, 6 `pipeB`: read(2) 8-byte sequence numbers from their pipe;
//!   each number must be the previous one plus one (the bytes in a pipe
//!   survive a dump);
//! - 7 `feeder`: writes the next sequence number to both pipes, notifies
//!   thread 1, sleeps 2 ms.
//!
//! Every iteration a thread checks gettid(), pthread_self(), its TLS
//! counter against a copy kept on its stack, its TLS id and the address of
//! the counter, and publishes the counter. Main does the same with its own.
//!
//! On SIGTERM (main): getpid() and syscall(SYS_getpid) equal the PID
//! recorded at start; /proc/self/task lists exactly the recorded TIDs; each
//! /proc/self/task/TID/comm is the name that thread set; every thread's
//! counter advances (by 2) within 2 s of running time after the signal (the
//! 250 ms sleeper too); every thread answers a check request (its own TID,
//! TLS as above) within 5 s; no thread saw a wrong value while running.
//!
//! `--break`: right after `ready`, thread 3 is renamed `broken` (through
//! /proc/self/task/TID/comm), as a restore that lost the names would leave it.
//!
//! Being frozen does not matter: the progress and answer waits only count
//! time during which the process ran, and the sleeps have no deadline.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tern_tests::ck::{break_requested, out_path, report};

const N: usize = 8;
const KINDS: [&str; N] = [
    "spin", "cvnote", "cvtime", "nap", "longnap", "pipeA", "pipeB", "feeder",
];

static TERM: AtomicBool = AtomicBool::new(false);
static TIDS: [AtomicI32; N] = [const { AtomicI32::new(0) }; N];
static PROGRESS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
/// Check requests: main bumps REQUEST, each thread answers with ANSWER[k]
/// set to the request number it checked itself for.
static REQUEST: AtomicU64 = AtomicU64::new(0);
static ANSWER: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static BAD: Mutex<Vec<String>> = Mutex::new(Vec::new());
static BAD_COUNT: AtomicUsize = AtomicUsize::new(0);
static NOTE: (Mutex<u64>, Condvar) = (Mutex::new(0), Condvar::new());
static NOBODY: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());

thread_local! {
    static COUNTER: Cell<u64> = const { Cell::new(0) };
    static ID: Cell<usize> = const { Cell::new(usize::MAX) };
}

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() }
}

fn name_of(k: usize) -> String {
    format!("ckt-{k}-{}", KINDS[k])
}

fn fail(s: String) {
    BAD_COUNT.fetch_add(1, Ordering::SeqCst);
    let mut b = BAD.lock().unwrap_or_else(|e| e.into_inner());
    if b.len() < 10 {
        b.push(s);
    }
}

/// Wait until `cond` holds, at most `budget` of time during which this
/// process ran (a step that took much longer than asked counts as short).
fn wait_running(budget: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let mut used = Duration::ZERO;
    while used < budget {
        if cond() {
            return true;
        }
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        used += t.elapsed().min(Duration::from_millis(50));
    }
    cond()
}

/// What a thread recorded about itself at start, and checks every round.
struct Me {
    who: String,
    tid: i32,
    pthread: libc::pthread_t,
    id: usize,
    counter_addr: usize,
    shadow: u64,
}

impl Me {
    fn new(who: String, id: usize) -> Me {
        ID.with(|c| c.set(id));
        Me {
            who,
            tid: gettid(),
            // SAFETY: no arguments.
            pthread: unsafe { libc::pthread_self() },
            id,
            counter_addr: COUNTER.with(|c| c as *const Cell<u64> as usize),
            shadow: 0,
        }
    }

    /// One round: advance the TLS counter and check everything; returns the
    /// counter.
    fn round(&mut self) -> u64 {
        self.shadow += 1;
        let c = COUNTER.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        if c != self.shadow {
            fail(format!(
                "{}: TLS counter {c}, expected {} (TLS of another thread, or stale?)",
                self.who, self.shadow
            ));
            self.shadow = c;
        }
        self.check();
        c
    }

    fn check(&self) {
        let tid = gettid();
        if tid != self.tid {
            fail(format!("{}: gettid() {tid}, was {}", self.who, self.tid));
        }
        // SAFETY: no arguments.
        let me = unsafe { libc::pthread_self() };
        if me != self.pthread {
            fail(format!(
                "{}: pthread_self() {me:#x}, was {:#x} (fs base changed)",
                self.who, self.pthread
            ));
        }
        let id = ID.with(|c| c.get());
        if id != self.id {
            fail(format!(
                "{}: TLS id {id}, expected {} (another thread's TLS?)",
                self.who, self.id
            ));
        }
        let addr = COUNTER.with(|c| c as *const Cell<u64> as usize);
        if addr != self.counter_addr {
            fail(format!(
                "{}: TLS counter at {addr:#x}, was at {:#x}",
                self.who, self.counter_addr
            ));
        }
    }
}

fn set_name(name: &str) {
    let Ok(c) = std::ffi::CString::new(name) else {
        return;
    };
    // SAFETY: a valid C string of at most 15 bytes, the calling thread.
    let rc = unsafe { libc::pthread_setname_np(libc::pthread_self(), c.as_ptr()) };
    if rc != 0 {
        fail(format!("pthread_setname_np({name:?}): error {rc}"));
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("ck_threads: pipe2: {}", std::io::Error::last_os_error());
        std::process::exit(3);
    }
    (fds[0], fds[1])
}

/// Read exactly 8 bytes (a sequence number) from `fd`, retrying on EINTR.
fn read_u64(fd: i32, who: &str) -> Option<u64> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        // SAFETY: reading into the rest of a local buffer.
        let r = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), 8 - got) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if r <= 0 {
            fail(format!(
                "{who}: read(2) on its pipe returned {r} ({})",
                std::io::Error::last_os_error()
            ));
            return None;
        }
        got += r as usize;
    }
    Some(u64::from_le_bytes(buf))
}

fn write_u64(fd: i32, v: u64) {
    let b = v.to_le_bytes();
    // SAFETY: writing a local buffer; 8 bytes < PIPE_BUF is atomic.
    let r = unsafe { libc::write(fd, b.as_ptr().cast(), 8) };
    if r != 8 {
        fail(format!(
            "feeder: write(2) to a pipe returned {r} ({})",
            std::io::Error::last_os_error()
        ));
    }
}

fn worker(k: usize, pipe_a: (i32, i32), pipe_b: (i32, i32)) {
    let who = name_of(k);
    set_name(&who);
    let mut me = Me::new(who.clone(), k);
    TIDS[k].store(me.tid, Ordering::SeqCst);
    let mut last_seq = 0u64;
    let mut spin: u64 = 1;
    loop {
        match k {
            0 => {
                for _ in 0..200_000 {
                    spin = spin.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                std::hint::black_box(spin);
            }
            1 => {
                let (m, cv) = &NOTE;
                let g = m.lock().unwrap_or_else(|e| e.into_inner());
                let (g, _) = cv
                    .wait_timeout(g, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner());
                if *g < last_seq {
                    fail(format!("{who}: woken for {}, after {last_seq}", *g));
                }
                last_seq = *g;
            }
            2 => {
                let (m, cv) = &NOBODY;
                let g = m.lock().unwrap_or_else(|e| e.into_inner());
                let _ = cv.wait_timeout(g, Duration::from_millis(5));
            }
            3 => std::thread::sleep(Duration::from_millis(1)),
            4 => std::thread::sleep(Duration::from_millis(250)),
            5 | 6 => {
                let fd = if k == 5 { pipe_a.0 } else { pipe_b.0 };
                match read_u64(fd, &who) {
                    Some(v) if v == last_seq + 1 => last_seq = v,
                    Some(v) => {
                        fail(format!(
                            "{who}: read {v} from its pipe, expected {}",
                            last_seq + 1
                        ));
                        last_seq = v;
                    }
                    None => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            _ => {
                last_seq += 1;
                write_u64(pipe_a.1, last_seq);
                write_u64(pipe_b.1, last_seq);
                let (m, cv) = &NOTE;
                *m.lock().unwrap_or_else(|e| e.into_inner()) = last_seq;
                cv.notify_all();
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let c = me.round();
        PROGRESS[k].store(c, Ordering::SeqCst);
        let req = REQUEST.load(Ordering::SeqCst);
        if req != ANSWER[k].load(Ordering::SeqCst) {
            me.check();
            ANSWER[k].store(req, Ordering::SeqCst);
        }
    }
}

fn main() {
    let out = out_path();
    // SAFETY: the handler only stores an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as usize) };
    // SAFETY: no arguments.
    let pid = unsafe { libc::getpid() };
    let mut main_me = Me::new("main".into(), N);
    let (pipe_a, pipe_b) = (pipe(), pipe());
    for k in 0..N {
        std::thread::spawn(move || worker(k, pipe_a, pipe_b));
    }
    if !wait_running(Duration::from_secs(10), || {
        (0..N).all(|k| PROGRESS[k].load(Ordering::SeqCst) > 0)
    }) {
        eprintln!("ck_threads: threads did not start");
        std::process::exit(3);
    }
    let tids: BTreeSet<i32> = TIDS
        .iter()
        .map(|t| t.load(Ordering::SeqCst))
        .chain([pid])
        .collect();
    report(&out, &format!("ready {pid}"));
    if break_requested() {
        let tid = TIDS[3].load(Ordering::SeqCst);
        let _ = std::fs::write(format!("/proc/self/task/{tid}/comm"), "broken");
    }
    while !TERM.load(Ordering::SeqCst) {
        main_me.round();
        std::thread::sleep(Duration::from_millis(2));
    }

    let mut bad: Vec<String> = Vec::new();
    let at_signal: Vec<u64> = PROGRESS.iter().map(|p| p.load(Ordering::SeqCst)).collect();
    // SAFETY: no arguments.
    let (now_pid, sys_pid) = unsafe { (libc::getpid(), libc::syscall(libc::SYS_getpid)) };
    if now_pid != pid || sys_pid != pid as i64 {
        bad.push(format!(
            "getpid() {now_pid}, syscall(SYS_getpid) {sys_pid}, expected {pid}"
        ));
    }
    main_me.round();
    let now: BTreeSet<i32> = match std::fs::read_dir("/proc/self/task") {
        Ok(d) => d
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => {
            bad.push(format!("/proc/self/task: {e}"));
            BTreeSet::new()
        }
    };
    if now != tids {
        bad.push(format!(
            "/proc/self/task lists {now:?}, expected {tids:?} (missing {:?}, extra {:?})",
            tids.difference(&now).collect::<Vec<_>>(),
            now.difference(&tids).collect::<Vec<_>>()
        ));
    }
    for (k, t) in TIDS.iter().enumerate() {
        let tid = t.load(Ordering::SeqCst);
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|e| format!("<{e}>"));
        if comm != name_of(k) {
            bad.push(format!(
                "thread {} (tid {tid}): /proc/self/task/{tid}/comm is {comm:?}, expected {:?}",
                name_of(k),
                name_of(k)
            ));
        }
    }
    let progressed = |k: usize| PROGRESS[k].load(Ordering::SeqCst) >= at_signal[k] + 2;
    if !wait_running(Duration::from_secs(2), || (0..N).all(progressed)) {
        for k in (0..N).filter(|&k| !progressed(k)) {
            bad.push(format!(
                "thread {} (tid {}) made no progress after SIGTERM (counter {}, {} at the signal)",
                name_of(k),
                TIDS[k].load(Ordering::SeqCst),
                PROGRESS[k].load(Ordering::SeqCst),
                at_signal[k]
            ));
        }
    }
    let req = REQUEST.fetch_add(1, Ordering::SeqCst) + 1;
    let answered = |k: usize| ANSWER[k].load(Ordering::SeqCst) >= req;
    if !wait_running(Duration::from_secs(5), || (0..N).all(answered)) {
        for k in (0..N).filter(|&k| !answered(k)) {
            bad.push(format!(
                "thread {} did not answer the check request",
                name_of(k)
            ));
        }
    }
    main_me.round();
    let n = BAD_COUNT.load(Ordering::SeqCst);
    bad.extend(
        BAD.lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned(),
    );
    if n > 10 {
        bad.push(format!("{n} failures seen by the threads in all"));
    }
    if bad.is_empty() {
        report(&out, "PASS");
        std::process::exit(0);
    }
    report(&out, &format!("FAIL {}", bad.join("; ")));
    std::process::exit(1);
}
