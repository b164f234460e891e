//! Self-checking workload for scheduling state (see `ck.rs` for the
//! protocol): `ck_sched --out FILE [--break]`, run as root.
//!
//! Each thread sets its own, with the calls a program would use:
//! - main: nice 4 (setpriority), pinned to the last CPU it may use, and for
//!   the process an OOM score adjustment of 321 and core dump filter 0x37;
//! - `cks-batch`: SCHED_BATCH with SCHED_RESET_ON_FORK, nice 9, pinned to
//!   the first CPU, best-effort I/O level 6;
//! - `cks-idle`: SCHED_IDLE, idle I/O class;
//! - `cks-fifo`: nice 3, then SCHED_FIFO priority 7, real-time I/O level 2.
//!
//! It records what the kernel says of each thread (from /proc/self/task:
//! nice, rt_priority and policy in `stat`, `Cpus_allowed_list` in
//! `status`; `sched_getscheduler` for the reset-on-fork flag;
//! `ioprio_get`), reports `ready`, and on SIGTERM reads it all again.
//! The threads keep sleeping 2 ms at a time and counting; each must have
//! counted on after the signal.
//!
//! `--break`: right after `ready`, `cks-batch` goes back to nice 0, as a
//! restore that lost the nice values would leave it.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_tests::ck;

const NAMES: [&str; 3] = ["cks-batch", "cks-idle", "cks-fifo"];
static TIDS: [AtomicI32; 3] = [const { AtomicI32::new(0) }; 3];
static COUNT: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
/// Set by a thread whose setup failed: errno << 8 | step.
static SETUP_ERR: AtomicI32 = AtomicI32::new(0);

fn die(msg: &str) -> ! {
    eprintln!("ck_sched: setup failed: {msg}");
    std::process::exit(3);
}

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The CPUs this thread may run on.
fn my_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set the kernel fills.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![];
        }
        (0..1024).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn pin(cpu: usize) -> bool {
    // SAFETY: a set with one CPU, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

fn nice(n: i32) -> bool {
    // SAFETY: setpriority on this thread (PRIO_PROCESS with a TID).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, gettid() as libc::id_t, n) == 0 }
}

fn policy(p: i32, prio: i32) -> bool {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: sched_setscheduler on this thread with a valid param.
    unsafe { libc::sched_setscheduler(0, p, &param) == 0 }
}

fn ioprio(class: i64, level: i64) -> bool {
    // SAFETY: ioprio_set(IOPRIO_WHO_PROCESS, this thread).
    unsafe { libc::syscall(libc::SYS_ioprio_set, 1, 0, class << 13 | level) == 0 }
}

fn name(n: &str) {
    let c = std::ffi::CString::new(n).unwrap();
    // SAFETY: PR_SET_NAME with a NUL-terminated string of <= 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
}

fn thread(k: usize, first_cpu: usize) {
    name(NAMES[k]);
    let ok = match k {
        0 => {
            (policy(libc::SCHED_BATCH | libc::SCHED_RESET_ON_FORK, 0) || fail(1))
                && (nice(9) || fail(2))
                && (pin(first_cpu) || fail(3))
                && (ioprio(2, 6) || fail(4))
        }
        1 => (policy(libc::SCHED_IDLE, 0) || fail(5)) && (ioprio(3, 0) || fail(6)),
        _ => {
            (nice(3) || fail(7))
                && (policy(libc::SCHED_FIFO, 7) || fail(8))
                && (ioprio(1, 2) || fail(9))
        }
    };
    if ok {
        TIDS[k].store(gettid(), Ordering::SeqCst);
    }
    loop {
        std::thread::sleep(Duration::from_millis(2));
        COUNT[k].fetch_add(1, Ordering::SeqCst);
    }
}

fn fail(step: i32) -> bool {
    SETUP_ERR.store(errno() << 8 | step, Ordering::SeqCst);
    false
}

/// What the kernel says of thread `tid` of this process.
fn state(tid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // Fields after the command name: field n is at n - 3.
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| f.get(n - 3).copied().unwrap_or("?");
    let status =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
    let cpus = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    // SAFETY: plain queries of a thread of ours.
    let (sched, io) = unsafe {
        (
            libc::sched_getscheduler(tid),
            libc::syscall(libc::SYS_ioprio_get, 1, tid),
        )
    };
    format!(
        "nice {} rt_priority {} policy {} sched_getscheduler {sched:#x} cpus {cpus} ioprio {io:#x}",
        field(19),
        field(40),
        field(41)
    )
}

fn process_state() -> String {
    let r = |f: &str| {
        std::fs::read_to_string(format!("/proc/self/{f}"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    format!(
        "oom_score_adj {} coredump_filter {}",
        r("oom_score_adj"),
        r("coredump_filter")
    )
}

fn main() {
    let out = ck::out_path();
    ck::catch_sigterm().unwrap_or_else(|e| die(&e));
    let cpus = my_cpus();
    let (first, last) = match (cpus.first(), cpus.last()) {
        (Some(&a), Some(&b)) => (a, b),
        _ => die("sched_getaffinity gave no CPU"),
    };
    for k in 0..NAMES.len() {
        std::thread::spawn(move || thread(k, first));
    }
    if !(nice(4) && pin(last)) {
        die(&format!("nice/pin of the main thread: errno {}", errno()));
    }
    std::fs::write("/proc/self/oom_score_adj", "321").unwrap_or_else(|e| die(&e.to_string()));
    std::fs::write("/proc/self/coredump_filter", "0x37").unwrap_or_else(|e| die(&e.to_string()));
    let t0 = Instant::now();
    while TIDS.iter().any(|t| t.load(Ordering::SeqCst) == 0) {
        let e = SETUP_ERR.load(Ordering::SeqCst);
        if e != 0 {
            die(&format!("thread step {}: errno {}", e & 0xff, e >> 8));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            die("threads did not set themselves up in 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let main_tid = gettid();
    let tids: Vec<(String, i32)> = std::iter::once(("main".to_string(), main_tid))
        .chain(
            NAMES
                .iter()
                .zip(&TIDS)
                .map(|(n, t)| (n.to_string(), t.load(Ordering::SeqCst))),
        )
        .collect();
    let recorded: Vec<String> = tids.iter().map(|(_, t)| state(*t)).collect();
    let recorded_process = process_state();
    ck::report(&out, &format!("ready {}", std::process::id()));
    if ck::break_requested() {
        // SAFETY: setpriority on a thread of ours (root may lower nice).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tids[1].1 as libc::id_t, 0) };
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fails = Vec::new();
    for ((n, t), before) in tids.iter().zip(&recorded) {
        let now = state(*t);
        if &now != before {
            fails.push(format!("thread {n} ({t}): {before} before, {now} now"));
        }
    }
    let now = process_state();
    if now != recorded_process {
        fails.push(format!("process: {recorded_process} before, {now} now"));
    }
    // Every thread goes on (2 s of running time at most).
    let counts: Vec<u64> = COUNT.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2)
        && COUNT
            .iter()
            .zip(&counts)
            .any(|(c, &was)| c.load(Ordering::SeqCst) < was + 2)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    for (k, (c, &was)) in COUNT.iter().zip(&counts).enumerate() {
        if c.load(Ordering::SeqCst) < was + 2 {
            fails.push(format!("thread {} stopped counting", NAMES[k]));
        }
    }
    ck::finish(&out, &fails)
}
