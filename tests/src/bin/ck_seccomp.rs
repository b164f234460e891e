//! `ck_seccomp --out FILE [--break]`: seccomp filters in an unprivileged
//! target with no capabilities, different in every thread (protocol:
//! `tern_tests::ck`).
//!
//! Started as root, it sets PR_SET_NO_NEW_PRIVS (inherited by every thread),
//! starts threads A, B and C, then drops to uid/gid 1000 with no
//! supplementary groups and no capabilities (glibc's setgroups/setresgid/
//! setresuid apply to every thread) and makes itself dumpable again, as a
//! process started by uid 1000 would be. Then, in this order (barriers):
//!
//! 1. C installs a filter with `SECCOMP_FILTER_FLAG_TSYNC`: it lands in main,
//!    A, B and C (TSYNC needs every other thread's chain to be an ancestor of
//!    the caller's, so it must come before the per-thread filters);
//! 2. main, A and B each install their own filters, A's with
//!    `SECCOMP_FILTER_FLAG_LOG`;
//! 3. main starts thread D, which inherits main's chain.
//!
//! | filter | syscall                 | errno  | threads         |
//! |--------|-------------------------|--------|-----------------|
//! | T      | sched_getaffinity       | EXDEV  | main A B C      |
//! | M      | getppid                 | EPERM  | main D          |
//! | A      | getsid(0) (flag LOG)    | EDOM   | A               |
//! | B1     | getpgid(0)              | ENOTTY | B               |
//! | B2     | uname                   | ESRCH  | B               |
//!
//! So the threads hold 2 (main), 2 (A), 3 (B), 1 (C), 2 (D) filters. Every
//! thread probes all five syscalls every 2 ms and checks the errno (or the
//! success) it must get.
//!
//! On SIGTERM (the handler only sets a flag: it runs under the filters, which
//! leave rt_sigreturn, write, open... alone) every thread checks, itself:
//! its TID is the one it had; each probe gives the expected errno, or
//! succeeds where this thread has no filter for it; prctl(PR_GET_SECCOMP) is
//! 2 and PR_GET_NO_NEW_PRIVS 1; getresuid/getresgid (per-thread credentials)
//! are 1000 x3 and getgroups is empty; /proc/thread-self/status says
//! `Seccomp: 2`, its `Seccomp_filters:` count, `NoNewPrivs: 1`, Uid/Gid 1000
//! (real, effective, saved, fs), no groups, CapInh/CapPrm/CapEff/CapAmb 0,
//! and all those lines (CapBnd too) as at `ready`; and it made progress after
//! `ready`. Main also checks that /proc/self/task lists exactly the five
//! TIDs, that the process is dumpable and that no probe went wrong while it
//! ran. No check depends on timing, so a freeze of any length is harmless.
//!
//! `--break`: right after `ready`, thread A installs one more filter (uname
//! fails with EACCES), as a restore that gave a thread a filter it did not
//! have would; the check then names A's filter count and uname.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};
use tern_tests::ck;

const UID: u32 = 1000;
const GID: u32 = 1000;
/// `AUDIT_ARCH_X86_64` from include/uapi/linux/audit.h:
/// `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// The syscalls every thread probes.
const PROBES: [(&str, libc::c_long); 5] = [
    ("getppid()", libc::SYS_getppid),
    ("getpgid(0)", libc::SYS_getpgid),
    ("getsid(0)", libc::SYS_getsid),
    ("uname()", libc::SYS_uname),
    ("sched_getaffinity()", libc::SYS_sched_getaffinity),
];

/// One filter: `nr` fails with `errno`, everything else is allowed.
struct Filter {
    name: &'static str,
    nr: libc::c_long,
    errno: i32,
    flags: libc::c_ulong,
}

const F_T: Filter = Filter {
    name: "T",
    nr: libc::SYS_sched_getaffinity,
    errno: libc::EXDEV,
    flags: libc::SECCOMP_FILTER_FLAG_TSYNC,
};
const F_M: Filter = Filter {
    name: "M",
    nr: libc::SYS_getppid,
    errno: libc::EPERM,
    flags: 0,
};
const F_A: Filter = Filter {
    name: "A",
    nr: libc::SYS_getsid,
    errno: libc::EDOM,
    flags: libc::SECCOMP_FILTER_FLAG_LOG,
};
const F_B1: Filter = Filter {
    name: "B1",
    nr: libc::SYS_getpgid,
    errno: libc::ENOTTY,
    flags: 0,
};
const F_B2: Filter = Filter {
    name: "B2",
    nr: libc::SYS_uname,
    errno: libc::ESRCH,
    flags: 0,
};
/// Installed in A by `--break` only; the expectations never include it.
const F_BREAK: Filter = Filter {
    name: "break",
    nr: libc::SYS_uname,
    errno: libc::EACCES,
    flags: 0,
};

/// The threads, their filters (as the kernel must have them) and slots.
const MAIN: usize = 0;
const A: usize = 1;
const B: usize = 2;
const C: usize = 3;
const D: usize = 4;
const NAMES: [&str; 5] = ["main", "A", "B", "C", "D"];
const EXPECTED: [&[&Filter]; 5] = [
    &[&F_T, &F_M],
    &[&F_T, &F_A],
    &[&F_T, &F_B1, &F_B2],
    &[&F_T],
    &[&F_T, &F_M],
];

/// The /proc/thread-self/status lines compared with their value at `ready`.
const STATUS_KEYS: [&str; 11] = [
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
];

struct Slot {
    tid: AtomicI32,
    progress: AtomicU64,
    at_ready: AtomicU64,
    /// The STATUS_KEYS lines at `ready`.
    snapshot: Mutex<Vec<String>>,
    /// The first wrong probe seen while running.
    run_failure: Mutex<Option<String>>,
    /// The final check's findings (None: not done).
    result: Mutex<Option<Vec<String>>>,
}

static SLOTS: [Slot; 5] = [const {
    Slot {
        tid: AtomicI32::new(0),
        progress: AtomicU64::new(0),
        at_ready: AtomicU64::new(0),
        snapshot: Mutex::new(Vec::new()),
        run_failure: Mutex::new(None),
        result: Mutex::new(None),
    }
}; 5];

static CHECK: AtomicBool = AtomicBool::new(false);
static READY: AtomicBool = AtomicBool::new(false);
static BREAK_NOW: AtomicBool = AtomicBool::new(false);
static CHECKED: AtomicUsize = AtomicUsize::new(0);
static SETUP_ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(e: i32) -> String {
    match e {
        0 => "success".into(),
        libc::EPERM => "EPERM".into(),
        libc::ESRCH => "ESRCH".into(),
        libc::EXDEV => "EXDEV".into(),
        libc::ENOTTY => "ENOTTY".into(),
        libc::EDOM => "EDOM".into(),
        libc::EACCES => "EACCES".into(),
        e => format!("errno {e}"),
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid(2) takes no arguments.
    unsafe { i32::try_from(libc::syscall(libc::SYS_gettid)).unwrap() }
}

/// Run one probed syscall in the calling thread: 0 on success, else errno.
fn probe(nr: libc::c_long) -> i32 {
    let mut uts = std::mem::MaybeUninit::<libc::utsname>::uninit();
    let mut mask = [0u64; 16];
    // SAFETY: raw syscalls whose pointer arguments are buffers owned here
    // and large enough (utsname; a 1024-bit CPU mask).
    let rc = unsafe {
        match nr {
            libc::SYS_getpgid | libc::SYS_getsid => libc::syscall(nr, 0),
            libc::SYS_uname => libc::syscall(nr, uts.as_mut_ptr()),
            libc::SYS_sched_getaffinity => {
                libc::syscall(nr, 0, std::mem::size_of_val(&mask), mask.as_mut_ptr())
            }
            _ => libc::syscall(nr),
        }
    };
    if rc < 0 { errno() } else { 0 }
}

/// Compare every probe with what `filters` say; one line per difference.
fn check_probes(who: &str, filters: &[&Filter], out: &mut Vec<String>) {
    for (name, nr) in PROBES {
        let want = filters.iter().find(|f| f.nr == nr).map_or(0, |f| f.errno);
        let got = probe(nr);
        if got != want {
            out.push(format!(
                "{who}: {name} gave {}, expected {}",
                errno_name(got),
                errno_name(want)
            ));
        }
    }
}

/// Install `f` in the calling thread (TSYNC: in every thread).
fn install(f: &Filter) -> Result<(), String> {
    let data = |field: usize| u32::try_from(field).unwrap();
    let arch_off = data(std::mem::offset_of!(libc::seccomp_data, arch));
    let nr_off = data(std::mem::offset_of!(libc::seccomp_data, nr));
    let ld = u16::try_from(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS).unwrap();
    let jeq = u16::try_from(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K).unwrap();
    let ret = u16::try_from(libc::BPF_RET | libc::BPF_K).unwrap();
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let prog = [
        ins(ld, 0, 0, arch_off),
        ins(jeq, 0, 3, AUDIT_ARCH_X86_64),
        ins(ld, 0, 0, nr_off),
        ins(jeq, 0, 1, u32::try_from(f.nr).unwrap()),
        ins(
            ret,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | (f.errno as u32 & libc::SECCOMP_RET_DATA),
        ),
        ins(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).unwrap(),
        filter: prog.as_ptr() as *mut _,
    };
    // SAFETY: seccomp(2) reads `fprog` and the program it points to, both
    // alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            f.flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    match rc {
        0 => Ok(()),
        // TSYNC: the TID of a thread that could not be synchronised.
        t if t > 0 => Err(format!(
            "filter {} (TSYNC) from tid {}: thread {t} cannot take it",
            f.name,
            gettid()
        )),
        _ => Err(format!(
            "installing filter {} in tid {}: {}",
            f.name,
            gettid(),
            std::io::Error::last_os_error()
        )),
    }
}

/// The STATUS_KEYS lines of /proc/thread-self/status (missing: "KEY:?").
fn status_lines(path: &str) -> Result<Vec<String>, String> {
    let s = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(STATUS_KEYS
        .iter()
        .map(|k| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix(k)
                        .and_then(|r| r.strip_prefix(':'))
                        .map(|v| {
                            format!(
                                "{k}: {}",
                                v.split_whitespace().collect::<Vec<_>>().join(" ")
                            )
                        })
                })
                .unwrap_or_else(|| format!("{k}:?"))
        })
        .collect())
}

/// What the status lines of thread `idx` must say.
fn expected_status(idx: usize) -> Vec<String> {
    let zero = "0000000000000000";
    vec![
        format!("Uid: {UID} {UID} {UID} {UID}"),
        format!("Gid: {GID} {GID} {GID} {GID}"),
        "Groups: ".into(),
        format!("CapInh: {zero}"),
        format!("CapPrm: {zero}"),
        format!("CapEff: {zero}"),
        format!("CapAmb: {zero}"),
        "NoNewPrivs: 1".into(),
        "Seccomp: 2".into(),
        format!("Seccomp_filters: {}", EXPECTED[idx].len()),
    ]
}

/// The final check of thread `idx`, run in that thread.
fn final_check(idx: usize) -> Vec<String> {
    let who = format!(
        "{} (tid {})",
        NAMES[idx],
        SLOTS[idx].tid.load(Ordering::SeqCst)
    );
    let mut out = Vec::new();
    let tid = gettid();
    if tid != SLOTS[idx].tid.load(Ordering::SeqCst) {
        out.push(format!("{who}: gettid() is now {tid}"));
    }
    check_probes(&who, EXPECTED[idx], &mut out);
    // SAFETY: prctl(2) queries with no pointer arguments.
    let (mode, nnp) = unsafe {
        (
            libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0),
            libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        )
    };
    if mode != 2 {
        out.push(format!("{who}: PR_GET_SECCOMP {mode}, expected 2 (filter)"));
    }
    if nnp != 1 {
        out.push(format!("{who}: PR_GET_NO_NEW_PRIVS {nnp}, expected 1"));
    }
    // Raw syscalls: credentials are per thread in the kernel.
    let (mut r, mut e, mut s) = (0u32, 0u32, 0u32);
    let (mut rg, mut eg, mut sg) = (0u32, 0u32, 0u32);
    // SAFETY: the syscalls write three u32 each into locals; getgroups with
    // size 0 writes nothing.
    let (rc1, rc2, ngroups) = unsafe {
        (
            libc::syscall(libc::SYS_getresuid, &mut r, &mut e, &mut s),
            libc::syscall(libc::SYS_getresgid, &mut rg, &mut eg, &mut sg),
            libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<libc::gid_t>()),
        )
    };
    if rc1 != 0 || (r, e, s) != (UID, UID, UID) {
        out.push(format!(
            "{who}: getresuid {r}/{e}/{s} (rc {rc1}), expected {UID} x3"
        ));
    }
    if rc2 != 0 || (rg, eg, sg) != (GID, GID, GID) {
        out.push(format!(
            "{who}: getresgid {rg}/{eg}/{sg} (rc {rc2}), expected {GID} x3"
        ));
    }
    if ngroups != 0 {
        out.push(format!(
            "{who}: getgroups says {ngroups} groups, expected none"
        ));
    }
    match status_lines("/proc/thread-self/status") {
        Ok(now) => {
            let want = expected_status(idx);
            for w in &want {
                let key = w.split(':').next().unwrap_or("");
                let got = now.iter().find(|l| l.split(':').next() == Some(key));
                if got != Some(w) {
                    let got = got.map_or("no such line", |g| g.as_str());
                    out.push(format!("{who}: status {got:?}, expected {w:?}"));
                }
            }
            let snap = lock(&SLOTS[idx].snapshot).clone();
            for (was, is) in snap.iter().zip(&now) {
                if was != is && !out.iter().any(|o| o.contains(is.as_str())) {
                    out.push(format!("{who}: status {is:?}, was {was:?} at ready"));
                }
            }
        }
        Err(e) => out.push(format!("{who}: {e}")),
    }
    let (p, r) = (
        SLOTS[idx].progress.load(Ordering::SeqCst),
        SLOTS[idx].at_ready.load(Ordering::SeqCst),
    );
    if p <= r {
        out.push(format!(
            "{who}: made no progress after ready ({p} probe rounds, {r} at ready)"
        ));
    }
    if let Some(f) = lock(&SLOTS[idx].run_failure).clone() {
        out.push(format!("while running: {f}"));
    }
    out
}

/// One round of the running loop of thread `idx`.
fn run_round(idx: usize) {
    let mut out = Vec::new();
    check_probes(NAMES[idx], EXPECTED[idx], &mut out);
    if let Some(first) = out.into_iter().next() {
        let mut f = lock(&SLOTS[idx].run_failure);
        if f.is_none() {
            *f = Some(first);
        }
    }
    SLOTS[idx].progress.fetch_add(1, Ordering::SeqCst);
}

fn nap(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Record this thread's TID.
fn record(idx: usize) {
    SLOTS[idx].tid.store(gettid(), Ordering::SeqCst);
}

/// Record this thread's status lines (once its filters are in place).
fn snapshot(idx: usize) {
    match status_lines("/proc/thread-self/status") {
        Ok(l) => *lock(&SLOTS[idx].snapshot) = l,
        Err(e) => lock(&SETUP_ERRORS).push(format!("{}: {e}", NAMES[idx])),
    }
}

fn setup_error(e: String) {
    lock(&SETUP_ERRORS).push(e);
}

/// The body of threads A, B, C (with barriers) and D (without).
fn worker(idx: usize, barrier: Option<&Barrier>) {
    record(idx);
    if let Some(b) = barrier {
        b.wait(); // threads exist
        b.wait(); // privileges dropped
        if idx == C
            && let Err(e) = install(&F_T)
        {
            setup_error(e);
        }
        b.wait(); // TSYNC filter in place
        let own: &[&Filter] = match idx {
            A => &[&F_A],
            B => &[&F_B1, &F_B2],
            _ => &[],
        };
        for f in own {
            if let Err(e) = install(f) {
                setup_error(e);
            }
        }
        b.wait(); // per-thread filters in place
    }
    snapshot(idx);
    let mut broke = false;
    loop {
        if CHECK.load(Ordering::SeqCst) {
            let r = final_check(idx);
            *lock(&SLOTS[idx].result) = Some(r);
            CHECKED.fetch_add(1, Ordering::SeqCst);
            loop {
                nap(1000);
            }
        }
        if idx == A && !broke && BREAK_NOW.load(Ordering::SeqCst) {
            broke = true;
            if let Err(e) = install(&F_BREAK) {
                setup_error(e);
            }
        }
        run_round(idx);
        if READY.load(Ordering::SeqCst) && SLOTS[idx].at_ready.load(Ordering::SeqCst) == 0 {
            SLOTS[idx]
                .at_ready
                .store(SLOTS[idx].progress.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        nap(2);
    }
}

fn die(msg: &str) -> ! {
    eprintln!("ck_seccomp: setup failed: {msg}");
    std::process::exit(3);
}

/// Create the result file as root and give it to uid 1000, so that the
/// dropped process can append to it.
fn precreate(out: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    std::os::unix::fs::fchown(&f, Some(UID), Some(GID))
        .map_err(|e| format!("chown {}: {e}", out.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("chmod {}: {e}", out.display()))
}

fn drop_privileges() -> Result<(), String> {
    // SAFETY: credential syscalls through glibc, which applies them to every
    // thread of the process; setgroups reads no memory for size 0.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(format!(
                "setgroups([]): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setresgid(GID, GID, GID) != 0 {
            return Err(format!(
                "setresgid({GID}): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setresuid(UID, UID, UID) != 0 {
            return Err(format!(
                "setresuid({UID}): {}",
                std::io::Error::last_os_error()
            ));
        }
        // A uid change made the process non-dumpable; a process started by
        // uid 1000 would be dumpable.
        if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
            return Err(format!(
                "PR_SET_DUMPABLE: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn main() {
    let out = ck::out_path();
    let brk = ck::break_requested();
    // SAFETY: geteuid(2) has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        die("must be started as root (it drops to uid 1000 itself)");
    }
    ck::catch_sigterm().unwrap_or_else(|e| die(&e));
    if let Err(e) = precreate(&out) {
        die(&e);
    }
    // SAFETY: prctl(2) with integer arguments; inherited by the threads.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        die("PR_SET_NO_NEW_PRIVS");
    }
    record(MAIN);
    let barrier: &'static Barrier = Box::leak(Box::new(Barrier::new(4)));
    for idx in [A, B, C] {
        if let Err(e) = std::thread::Builder::new()
            .name(format!("ck-{}", NAMES[idx]))
            .spawn(move || worker(idx, Some(barrier)))
        {
            die(&format!("spawn thread {}: {e}", NAMES[idx]));
        }
    }
    barrier.wait(); // threads exist
    if let Err(e) = drop_privileges() {
        die(&e);
    }
    barrier.wait(); // privileges dropped
    barrier.wait(); // C: TSYNC filter
    if let Err(e) = install(&F_M) {
        setup_error(e);
    }
    barrier.wait(); // per-thread filters
    if let Err(e) = std::thread::Builder::new()
        .name("ck-D".into())
        .spawn(move || worker(D, None))
    {
        die(&format!("spawn thread D: {e}"));
    }
    snapshot(MAIN);
    // Every thread has run at least one round (and D recorded itself).
    let t0 = Instant::now();
    while SLOTS
        .iter()
        .skip(1)
        .any(|s| s.progress.load(Ordering::SeqCst) == 0)
    {
        if t0.elapsed() > Duration::from_secs(10) {
            die("threads did not start probing within 10 s");
        }
        nap(1);
    }
    run_round(MAIN);
    let mut setup = lock(&SETUP_ERRORS).clone();
    // Main's own probes; the other threads report through run_failure.
    check_probes(NAMES[MAIN], EXPECTED[MAIN], &mut setup);
    for (idx, s) in SLOTS.iter().enumerate() {
        if let Some(f) = lock(&s.run_failure).clone() {
            setup.push(format!("{}: {f}", NAMES[idx]));
        }
        let snap = lock(&s.snapshot).clone();
        let want = expected_status(idx);
        for w in want {
            if !snap.contains(&w) {
                setup.push(format!("{}: status {snap:?} lacks {w:?}", NAMES[idx]));
            }
        }
    }
    if !setup.is_empty() {
        die(&setup.join("; "));
    }
    let tids: Vec<i32> = SLOTS.iter().map(|s| s.tid.load(Ordering::SeqCst)).collect();
    SLOTS[MAIN].at_ready.store(
        SLOTS[MAIN].progress.load(Ordering::SeqCst),
        Ordering::SeqCst,
    );
    READY.store(true, Ordering::SeqCst);
    // Every worker noted its progress at ready before we say ready.
    while SLOTS.iter().any(|s| s.at_ready.load(Ordering::SeqCst) == 0) {
        nap(1);
    }
    ck::report(&out, &format!("ready {}", std::process::id()));
    if brk {
        BREAK_NOW.store(true, Ordering::SeqCst);
    }

    while !ck::terminated() {
        run_round(MAIN);
        nap(2);
    }

    CHECK.store(true, Ordering::SeqCst);
    let mut fails = final_check(MAIN);
    let t0 = Instant::now();
    while CHECKED.load(Ordering::SeqCst) < 4 && t0.elapsed() < Duration::from_secs(10) {
        nap(2);
    }
    for idx in [A, B, C, D] {
        match lock(&SLOTS[idx].result).clone() {
            Some(r) => fails.extend(r),
            None => fails.push(format!(
                "{} (tid {}) did not run its check within 10 s",
                NAMES[idx], tids[idx]
            )),
        }
    }
    let mut now: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    now.sort();
    let mut want = tids.clone();
    want.sort();
    if now != want {
        fails.push(format!("/proc/self/task lists {now:?}, expected {want:?}"));
    }
    // SAFETY: prctl(2) query.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    if dumpable != 1 {
        fails.push(format!("PR_GET_DUMPABLE {dumpable}, expected 1"));
    }
    let extra = lock(&SETUP_ERRORS).clone();
    fails.extend(extra);
    ck::finish(&out, &fails)
}

#[cfg(test)]
mod tests {
    /// include/uapi/linux/seccomp.h: struct seccomp_data { int nr; __u32
    /// arch; __u64 instruction_pointer; __u64 args[6]; } (the filter loads
    /// nr at 0 and arch at 4); include/uapi/linux/filter.h: struct
    /// sock_filter is 8 bytes.
    #[test]
    fn seccomp_data_layout() {
        assert_eq!(std::mem::offset_of!(libc::seccomp_data, nr), 0);
        assert_eq!(std::mem::offset_of!(libc::seccomp_data, arch), 4);
        assert_eq!(std::mem::size_of::<libc::seccomp_data>(), 64);
        assert_eq!(std::mem::size_of::<libc::sock_filter>(), 8);
    }
}
