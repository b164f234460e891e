//! Self-checking workload (protocol: `tern_tests::ck`): 8 threads plus main.
//!
//! Each thread names itself `ckt-N`, records its TID, keeps a thread-local
//! counter with a shadow copy (TLS through the restored fs base), and works:
//! threads 0 and 4 spin in user mode, 1 and 5 wait on a condition variable
//! with a timeout (futex), 2 and 6 sleep (nanosleep), 3 and 7 block in
//! read(2) on a pipe that main feeds. Every iteration checks gettid() and
//! the TLS counter.
//!
//! On SIGTERM, main checks: the PID, /proc/self/task holds exactly the
//! recorded TIDs, every thread's name, every thread still makes progress
//! (within 5 s) and none saw a wrong TID or TLS value.
//!
//! `--break`: thread 3 is renamed after `ready`.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tern_tests::ck::{break_requested, out_path, report};

const N: usize = 8;
static TERM: AtomicBool = AtomicBool::new(false);
static TIDS: [AtomicI32; N] = [const { AtomicI32::new(0) }; N];
static PROGRESS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static BAD: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    static COUNTER: Cell<u64> = const { Cell::new(0) };
}

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() }
}

fn set_name(name: &str) {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string, current thread.
    unsafe { libc::pthread_setname_np(libc::pthread_self(), c.as_ptr()) };
}

fn fail(s: String) {
    let mut b = BAD.lock().unwrap();
    if b.len() < 20 {
        b.push(s);
    }
}

fn main() {
    let out = out_path();
    // SAFETY: installing a handler that only stores an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as usize) };
    let pid = std::process::id() as i32;
    let cv = Arc::new((Mutex::new(0u64), Condvar::new()));
    let mut feeds = Vec::new();
    let mut handles = Vec::new();
    for k in 0..N {
        let mut fds = [0i32; 2];
        if k % 4 == 3 {
            // SAFETY: pipe fills two fds.
            unsafe { libc::pipe(fds.as_mut_ptr()) };
            feeds.push(fds[1]);
        }
        let cv = cv.clone();
        handles.push(std::thread::spawn(move || {
            set_name(&format!("ckt-{k}"));
            let me = gettid();
            TIDS[k].store(me, Ordering::SeqCst);
            let mut shadow = 0u64;
            loop {
                match k % 4 {
                    0 => {
                        for _ in 0..100_000 {
                            std::hint::black_box(shadow);
                        }
                    }
                    1 => {
                        let (m, c) = &*cv;
                        let g = m.lock().unwrap();
                        let _ = c.wait_timeout(g, Duration::from_millis(5)).unwrap();
                    }
                    2 => std::thread::sleep(Duration::from_millis(2)),
                    _ => {
                        let mut b = [0u8; 1];
                        // SAFETY: read into a local byte.
                        let r = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
                        if r != 1 {
                            fail(format!("thread {k}: read from its pipe returned {r}"));
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                shadow += 1;
                let c = COUNTER.with(|c| {
                    c.set(c.get() + 1);
                    c.get()
                });
                if c != shadow {
                    fail(format!("thread {k}: TLS counter {c}, expected {shadow}"));
                }
                if gettid() != me {
                    fail(format!("thread {k}: gettid {} != {me}", gettid()));
                }
                PROGRESS[k].fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Wait until every thread has a TID and made progress.
    let t0 = Instant::now();
    while (0..N).any(|k| PROGRESS[k].load(Ordering::SeqCst) == 0) {
        if t0.elapsed() > Duration::from_secs(10) {
            eprintln!("threads did not start");
            std::process::exit(3);
        }
        feed(&feeds);
        std::thread::sleep(Duration::from_millis(1));
    }
    let tids: BTreeSet<i32> = (0..N)
        .map(|k| TIDS[k].load(Ordering::SeqCst))
        .chain([pid])
        .collect();
    report(&out, &format!("ready {pid}"));
    if break_requested() {
        let c = std::ffi::CString::new("broken").unwrap();
        // SAFETY: write the name of a thread of ours through procfs.
        let _ = std::fs::write(
            format!("/proc/self/task/{}/comm", TIDS[3].load(Ordering::SeqCst)),
            c.as_bytes(),
        );
    }
    while !TERM.load(Ordering::SeqCst) {
        feed(&feeds);
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut bad: Vec<String> = Vec::new();
    // SAFETY: no arguments.
    if unsafe { libc::getpid() } != pid {
        bad.push(format!("getpid {} != {pid}", unsafe { libc::getpid() }));
    }
    let now: BTreeSet<i32> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    if now != tids {
        bad.push(format!("threads {now:?}, expected {tids:?}"));
    }
    for (k, tid) in TIDS.iter().enumerate() {
        let tid = tid.load(Ordering::SeqCst);
        let name =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
        if name.trim() != format!("ckt-{k}") {
            bad.push(format!(
                "thread {k} (tid {tid}) is named {:?}, expected ckt-{k}",
                name.trim()
            ));
        }
    }
    let before: Vec<u64> = (0..N).map(|k| PROGRESS[k].load(Ordering::SeqCst)).collect();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5)
        && (0..N).any(|k| PROGRESS[k].load(Ordering::SeqCst) <= before[k] + 2)
    {
        feed(&feeds);
        std::thread::sleep(Duration::from_millis(2));
    }
    for k in 0..N {
        if PROGRESS[k].load(Ordering::SeqCst) <= before[k] + 2 {
            bad.push(format!("thread {k} made no progress"));
        }
    }
    bad.extend(BAD.lock().unwrap().iter().cloned());
    if bad.is_empty() {
        report(&out, "PASS");
        std::process::exit(0);
    }
    report(&out, &format!("FAIL {}", bad.join("; ")));
    std::process::exit(1);
}

fn feed(feeds: &[i32]) {
    for &w in feeds {
        // SAFETY: write one byte to our own pipe.
        unsafe { libc::write(w, b"x".as_ptr().cast(), 1) };
    }
}
