//! `ck_signals --out FILE [--break]`: signal state (protocol:
//! `tern_tests::ck`).
//!
//! A restored process must have every disposition (handler, flags, mask,
//! restorer), every thread's blocked mask and alternate stack, and every
//! pending signal (process-wide or thread-directed, with its queued siginfo,
//! real-time ones in order) as it had them.
//!
//! Set up (main thread, then a second thread `t2`):
//! - SIGUSR1: SA_SIGINFO|SA_RESTART, mask {SIGUSR2}; SIGUSR2: SA_ONSTACK;
//!   SIGWINCH: SA_RESETHAND|SA_NODEFER; SIGPIPE: SIG_IGN; SIGRTMIN+1,
//!   +4, +5: SA_SIGINFO; SIGRTMIN+2: SA_SIGINFO, mask {SIGINT, SIGQUIT,
//!   SIGRTMIN+6}; SIGRTMIN+3: SA_SIGINFO|SA_RESTART; SIGTERM: plain handler;
//!   SIGCHLD: SIG_DFL with SA_NOCLDSTOP|SA_NOCLDWAIT.
//! - main blocks {SIGHUP, SIGUSR1, SIGRTMIN+1, +3, +5}; t2 blocks those and
//!   {SIGALRM, SIGTERM, SIGRTMIN+4}.
//! - main's alternate stack: 64 KiB (flags 0); t2's: 48 KiB with
//!   SS_AUTODISARM.
//! - pending, process-wide, via sigqueue(2): SIGUSR1 (si_value 1111),
//!   SIGRTMIN+1 three times (1, 2, 3), SIGRTMIN+3 (33); thread-directed via
//!   pthread_sigqueue (rt_tgsigqueueinfo): SIGRTMIN+4 (44) to t2,
//!   SIGRTMIN+5 (55) to main.
//!
//! On SIGTERM (blocked only in t2): every disposition of signals 1..64 as
//! read back at setup, and the installed ones as installed (handler
//! address, flags but SA_RESTORER, mask); each thread's mask (its own
//! pthread_sigmask and /proc/self/task/TID/status SigBlk); pending per thread
//! (SigPnd, ShdPnd and each thread's sigpending()); each thread's
//! sigaltstack. Then main unblocks its signals one at a time: SIGUSR1 must
//! arrive once with 1111, SIGRTMIN+1 three times with 1, 2, 3 in that
//! order, SIGRTMIN+3 with 33, SIGRTMIN+5 with 55, all with si_code SI_QUEUE,
//! si_pid our PID, si_uid our uid, in main; t2 unblocks SIGRTMIN+4 and must
//! get 44 in t2. Behaviour: SIGUSR2 raised in main and in t2 runs on that
//! thread's alternate stack (address of a local); SIGRTMIN+2's handler runs
//! with SIGINT, SIGQUIT, SIGRTMIN+6 and itself blocked; SIGWINCH's handler
//! runs with SIGWINCH not blocked (SA_NODEFER) and finds its disposition
//! reset to SIG_DFL (SA_RESETHAND); a write to a pipe without reader gives
//! EPIPE (SIGPIPE ignored). No other signal arrives.
//!
//! `--break`: right after `ready`, SIGWINCH's handler is installed again
//! without SA_NODEFER, as a restore that lost a flag would leave it.
//!
//! Nothing here depends on time; the waits for t2 count only time during
//! which the process ran.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tern_tests::ck::{break_requested, out_path, report};

const SI_QUEUE: i32 = -1;
/// include/uapi/linux/signal.h (libc has no binding).
const SS_AUTODISARM: i32 = 1 << 31;
/// arch/x86/include/uapi/asm/signal.h: glibc's sigaction() adds it.
const SA_RESTORER: i32 = 0x0400_0000;
const MAIN_ALT: usize = 64 << 10;
const T2_ALT: usize = 48 << 10;

static TERM: AtomicBool = AtomicBool::new(false);

/// Signals the SA_SIGINFO handlers saw: (sig, si_code, si_value, si_pid,
/// si_uid, tid), each packed into atomics so that a handler can record them.
const SLOTS: usize = 64;
static REC_N: AtomicUsize = AtomicUsize::new(0);
static REC: [[AtomicU64; 6]; SLOTS] = [const { [const { AtomicU64::new(0) }; 6] }; SLOTS];
/// SIGRTMIN+2's handler: the blocked mask it ran with.
static RT2_MASK: AtomicU64 = AtomicU64::new(0);
/// SIGUSR2's handler: the address of a local, and the tid.
static USR2_AT: AtomicU64 = AtomicU64::new(0);
static USR2_TID: AtomicI32 = AtomicI32::new(0);
/// SIGWINCH's handler: the blocked mask and its own disposition's handler.
static WINCH_RAN: AtomicBool = AtomicBool::new(false);
static WINCH_MASK: AtomicU64 = AtomicU64::new(0);
static WINCH_DISP: AtomicU64 = AtomicU64::new(u64::MAX);

/// t2's part of the check: main sets REQ, t2 answers DONE with its findings.
static T2_REQ: AtomicBool = AtomicBool::new(false);
static T2_DONE: AtomicBool = AtomicBool::new(false);
static T2_BAD: Mutex<Vec<String>> = Mutex::new(Vec::new());

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() }
}

extern "C" fn on_info(sig: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let i = REC_N.fetch_add(1, Ordering::SeqCst);
    if i >= SLOTS || info.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler;
    // for SI_QUEUE signals the rt fields (pid, uid, value) are set.
    let (code, value, pid, uid) = unsafe {
        (
            (*info).si_code,
            (*info).si_value().sival_ptr as i64,
            (*info).si_pid(),
            (*info).si_uid(),
        )
    };
    let r = &REC[i];
    r[0].store(sig as u64, Ordering::SeqCst);
    r[1].store(code as i64 as u64, Ordering::SeqCst);
    r[2].store(value as u64, Ordering::SeqCst);
    r[3].store(pid as u64, Ordering::SeqCst);
    r[4].store(uid as u64, Ordering::SeqCst);
    r[5].store(gettid() as u64, Ordering::SeqCst);
}

extern "C" fn on_rt2(sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    RT2_MASK.store(thread_mask(), Ordering::SeqCst);
    on_info(sig, info, ctx);
}

extern "C" fn on_usr2(_: i32) {
    let local = 0u8;
    USR2_AT.store(
        std::hint::black_box(&local) as *const u8 as u64,
        Ordering::SeqCst,
    );
    USR2_TID.store(gettid(), Ordering::SeqCst);
}

extern "C" fn on_winch(_: i32) {
    WINCH_MASK.store(thread_mask(), Ordering::SeqCst);
    WINCH_DISP.store(disposition(libc::SIGWINCH).handler as u64, Ordering::SeqCst);
    WINCH_RAN.store(true, Ordering::SeqCst);
}

fn rt(n: i32) -> i32 {
    libc::SIGRTMIN() + n
}

fn sig_name(sig: i32) -> String {
    let names = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGBUS, "SIGBUS"),
    ];
    if let Some((_, n)) = names.iter().find(|(s, _)| *s == sig) {
        return n.to_string();
    }
    if sig >= libc::SIGRTMIN() {
        return format!("SIGRTMIN+{}", sig - libc::SIGRTMIN());
    }
    format!("signal {sig}")
}

fn names(mask: u64) -> String {
    let v: Vec<String> = (1..=64)
        .filter(|s| mask & bit(*s) != 0)
        .map(sig_name)
        .collect();
    format!("{{{}}}", v.join(", "))
}

fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

fn bits(sigs: &[i32]) -> u64 {
    sigs.iter().fold(0, |m, &s| m | bit(s))
}

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for &g in sigs {
            libc::sigaddset(&mut s, g);
        }
        s
    }
}

/// The kernel's 64 signals of a glibc sigset_t (its first 8 bytes).
fn lo(s: &libc::sigset_t) -> u64 {
    // SAFETY: sigset_t is 128 bytes; its first 8 hold signals 1..64.
    unsafe { *(s as *const libc::sigset_t as *const u64) }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Disp {
    handler: usize,
    flags: i32,
    mask: u64,
    restorer: usize,
}

impl std::fmt::Display for Disp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "handler {:#x} flags {:#x} mask {} restorer {:#x}",
            self.handler,
            self.flags,
            names(self.mask),
            self.restorer
        )
    }
}

fn disposition(sig: i32) -> Disp {
    // SAFETY: reading a disposition into a local.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut sa);
        Disp {
            handler: sa.sa_sigaction,
            flags: sa.sa_flags,
            mask: lo(&sa.sa_mask),
            restorer: sa.sa_restorer.map_or(0, |r| r as usize),
        }
    }
}

fn install(sig: i32, handler: usize, flags: i32, mask: &[i32]) {
    // SAFETY: a valid sigaction; the handlers only touch atomics.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = flags;
        sa.sa_mask = sigset(mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        setup_failed(&format!("sigaction({})", sig_name(sig)));
    }
}

fn setup_failed(what: &str) -> ! {
    eprintln!("ck_signals: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(3);
}

fn thread_mask() -> u64 {
    // SAFETY: reading this thread's mask into a local (async-signal-safe).
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
        lo(&old)
    }
}

fn block(how: i32, sigs: &[i32]) {
    // SAFETY: changing this thread's mask.
    let rc = unsafe { libc::pthread_sigmask(how, &sigset(sigs), std::ptr::null_mut()) };
    if rc != 0 {
        setup_failed("pthread_sigmask");
    }
}

fn sigpending() -> u64 {
    // SAFETY: sigpending into a local.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut s);
        lo(&s)
    }
}

/// (ss_sp, ss_size, ss_flags) of this thread.
fn altstack() -> (usize, usize, i32) {
    // SAFETY: sigaltstack query into a local.
    unsafe {
        let mut ss: libc::stack_t = std::mem::zeroed();
        libc::sigaltstack(std::ptr::null(), &mut ss);
        (ss.ss_sp as usize, ss.ss_size, ss.ss_flags)
    }
}

fn set_altstack(size: usize, flags: i32) -> usize {
    let mem: &'static mut [u8] = Box::leak(vec![0u8; size].into_boxed_slice());
    let ss = libc::stack_t {
        ss_sp: mem.as_mut_ptr().cast(),
        ss_flags: flags,
        ss_size: size,
    };
    // SAFETY: the leaked buffer lives as long as the process.
    if unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) } != 0 {
        setup_failed("sigaltstack");
    }
    mem.as_ptr() as usize
}

/// A field of /proc/self/task/TID/status as a 64-bit mask.
fn status_mask(tid: i32, field: &str) -> Result<u64, String> {
    let path = format!("/proc/self/task/{tid}/status");
    let s = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| format!("{path}: no {field} line"))
}

/// One received signal.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Got {
    sig: i32,
    code: i32,
    value: i64,
    pid: i32,
    uid: u32,
    tid: i32,
}

impl std::fmt::Display for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} value {} code {} pid {} uid {} in tid {}",
            sig_name(self.sig),
            self.value,
            self.code,
            self.pid,
            self.uid,
            self.tid
        )
    }
}

/// The signals recorded since index `from`.
fn received(from: usize) -> Vec<Got> {
    let n = REC_N.load(Ordering::SeqCst).min(SLOTS);
    (from..n)
        .map(|i| {
            let r = &REC[i];
            let g = |k: usize| r[k].load(Ordering::SeqCst);
            Got {
                sig: i32::try_from(g(0)).unwrap(),
                code: i32::try_from(g(1).cast_signed()).unwrap(),
                value: g(2) as i64,
                pid: i32::try_from(g(3)).unwrap(),
                uid: u32::try_from(g(4)).unwrap(),
                tid: i32::try_from(g(5)).unwrap(),
            }
        })
        .collect()
}

/// Unblock `sig` in this thread: its queued instances must arrive right
/// away, with `values` in that order, as SI_QUEUE from us, in this thread.
fn deliver(sig: i32, values: &[i64], pid: i32, uid: u32, bad: &mut Vec<String>) {
    let from = REC_N.load(Ordering::SeqCst);
    block(libc::SIG_UNBLOCK, &[sig]);
    let got = received(from);
    let want: Vec<Got> = values
        .iter()
        .map(|&value| Got {
            sig,
            code: SI_QUEUE,
            value,
            pid,
            uid,
            tid: gettid(),
        })
        .collect();
    if got != want {
        let show = |v: &[Got]| {
            v.iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        bad.push(format!(
            "unblocking {} in tid {}: received [{}], expected [{}]",
            sig_name(sig),
            gettid(),
            show(&got),
            show(&want)
        ));
    }
    if sigpending() & bit(sig) != 0 {
        bad.push(format!(
            "{} still pending after delivery in tid {}",
            sig_name(sig),
            gettid()
        ));
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

/// What t2 expects of itself.
struct T2Want {
    mask: u64,
    pending: u64,
    alt: (usize, usize, i32),
    pid: i32,
    uid: u32,
}

fn t2_check(w: &T2Want) -> Vec<String> {
    let mut bad = Vec::new();
    let tid = gettid();
    let m = thread_mask();
    if m != w.mask {
        bad.push(format!(
            "t2 (tid {tid}) blocked mask {}, expected {}",
            names(m),
            names(w.mask)
        ));
    }
    let p = sigpending();
    if p != w.pending {
        bad.push(format!(
            "t2 (tid {tid}) sigpending() {}, expected {}",
            names(p),
            names(w.pending)
        ));
    }
    let a = altstack();
    if a != w.alt {
        bad.push(format!(
            "t2 (tid {tid}) sigaltstack (sp {:#x}, size {}, flags {:#x}), expected (sp {:#x}, size {}, flags {:#x})",
            a.0, a.1, a.2, w.alt.0, w.alt.1, w.alt.2
        ));
    }
    deliver(rt(4), &[44], w.pid, w.uid, &mut bad);
    USR2_AT.store(0, Ordering::SeqCst);
    // SAFETY: a signal to this very thread; its handler only stores atomics.
    unsafe { libc::syscall(libc::SYS_tgkill, w.pid, tid, libc::SIGUSR2) };
    let at = sys::usize_of(USR2_AT.load(Ordering::SeqCst));
    if !(w.alt.0..w.alt.0 + w.alt.1).contains(&at) || USR2_TID.load(Ordering::SeqCst) != tid {
        bad.push(format!(
            "SIGUSR2 (SA_ONSTACK) in t2 ran with a local at {at:#x} in tid {}, not on t2's alternate stack {:#x}+{}",
            USR2_TID.load(Ordering::SeqCst),
            w.alt.0,
            w.alt.1
        ));
    }
    bad
}

fn main() {
    let out = out_path();
    // SAFETY: no arguments.
    let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    let info = on_info as *const () as usize;
    let sa_info = libc::SA_SIGINFO;
    // (signal, handler, flags, mask) as installed.
    let installed: Vec<(i32, usize, i32, Vec<i32>)> = vec![
        (libc::SIGTERM, on_term as *const () as usize, 0, vec![]),
        (
            libc::SIGUSR1,
            info,
            sa_info | libc::SA_RESTART,
            vec![libc::SIGUSR2],
        ),
        (
            libc::SIGUSR2,
            on_usr2 as *const () as usize,
            libc::SA_ONSTACK,
            vec![],
        ),
        (
            libc::SIGWINCH,
            on_winch as *const () as usize,
            libc::SA_RESETHAND | libc::SA_NODEFER,
            vec![],
        ),
        (libc::SIGPIPE, libc::SIG_IGN, 0, vec![]),
        // SIG_DFL, but its flags change what the kernel does with children.
        (
            libc::SIGCHLD,
            libc::SIG_DFL,
            libc::SA_NOCLDSTOP | libc::SA_NOCLDWAIT,
            vec![],
        ),
        (rt(1), info, sa_info, vec![]),
        (
            rt(2),
            on_rt2 as *const () as usize,
            sa_info,
            vec![libc::SIGINT, libc::SIGQUIT, rt(6)],
        ),
        (rt(3), info, sa_info | libc::SA_RESTART, vec![]),
        (rt(4), info, sa_info, vec![]),
        (rt(5), info, sa_info, vec![]),
    ];
    for (sig, h, flags, mask) in &installed {
        install(*sig, *h, *flags, mask);
    }
    // Every disposition as the kernel holds it now (glibc adds SA_RESTORER).
    let all_sigs: Vec<i32> = (1..=64)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP && (s < 32 || s >= libc::SIGRTMIN()))
        .collect();
    let snapshot: Vec<Disp> = all_sigs.iter().map(|&s| disposition(s)).collect();

    let main_blocked = [libc::SIGHUP, libc::SIGUSR1, rt(1), rt(3), rt(5)];
    block(libc::SIG_BLOCK, &main_blocked);
    let main_sp = set_altstack(MAIN_ALT, 0);

    // t2: inherits main's mask, blocks more, has its own alternate stack.
    let t2_extra = [libc::SIGALRM, libc::SIGTERM, rt(4)];
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        block(libc::SIG_BLOCK, &t2_extra);
        let sp = set_altstack(T2_ALT, SS_AUTODISARM);
        // SAFETY: no arguments.
        let _ = tx.send((unsafe { libc::pthread_self() }, gettid(), sp));
        loop {
            if T2_REQ.load(Ordering::SeqCst) && !T2_DONE.load(Ordering::SeqCst) {
                let w = T2Want {
                    mask: bits(&main_blocked) | bits(&t2_extra),
                    pending: bits(&[libc::SIGUSR1, rt(1), rt(3), rt(4)]),
                    alt: (sp, T2_ALT, SS_AUTODISARM),
                    pid,
                    uid,
                };
                *T2_BAD.lock().unwrap_or_else(|e| e.into_inner()) = t2_check(&w);
                T2_DONE.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let Ok((t2_pthread, t2_tid, _)) = rx.recv() else {
        setup_failed("the second thread did not start");
    };

    // Pending signals.
    let q = |sig: i32, v: i64| {
        let val = libc::sigval {
            sival_ptr: v as *mut libc::c_void,
        };
        // SAFETY: sigqueue(2) to ourselves.
        if unsafe { libc::sigqueue(pid, sig, val) } != 0 {
            setup_failed(&format!("sigqueue({})", sig_name(sig)));
        }
    };
    let tq = |thread: libc::pthread_t, sig: i32, v: i64| {
        let val = libc::sigval {
            sival_ptr: v as *mut libc::c_void,
        };
        // SAFETY: a live thread of ours.
        if unsafe { libc::pthread_sigqueue(thread, sig, val) } != 0 {
            setup_failed(&format!("pthread_sigqueue({})", sig_name(sig)));
        }
    };
    q(libc::SIGUSR1, 1111);
    q(rt(1), 1);
    q(rt(1), 2);
    q(rt(1), 3);
    q(rt(3), 33);
    tq(t2_pthread, rt(4), 44);
    // SAFETY: no arguments.
    tq(unsafe { libc::pthread_self() }, rt(5), 55);

    let main_mask = bits(&main_blocked);
    let t2_mask = main_mask | bits(&t2_extra);
    let shared = bits(&[libc::SIGUSR1, rt(1), rt(3)]);
    let main_pnd = bit(rt(5));
    let t2_pnd = bit(rt(4));
    let check_state = |bad: &mut Vec<String>| {
        for (tid, who, mask, pnd) in [
            (pid, "main", main_mask, main_pnd),
            (t2_tid, "t2", t2_mask, t2_pnd),
        ] {
            for (field, want) in [("SigBlk", mask), ("SigPnd", pnd), ("ShdPnd", shared)] {
                match status_mask(tid, field) {
                    Ok(v) if v == want => {}
                    Ok(v) => bad.push(format!(
                        "{who} (tid {tid}) {field} {}, expected {}",
                        names(v),
                        names(want)
                    )),
                    Err(e) => bad.push(e),
                }
            }
        }
    };
    let mut setup_bad = Vec::new();
    check_state(&mut setup_bad);
    if !setup_bad.is_empty() {
        eprintln!("ck_signals: set-up is not as intended: {setup_bad:?}");
        std::process::exit(3);
    }

    report(&out, &format!("ready {pid}"));
    if break_requested() {
        install(
            libc::SIGWINCH,
            on_winch as *const () as usize,
            libc::SA_RESETHAND,
            &[],
        );
    }
    while !TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(2));
    }

    let mut bad: Vec<String> = Vec::new();
    // Dispositions.
    for (sig, h, flags, mask) in &installed {
        let d = disposition(*sig);
        let want_mask = bits(mask);
        if d.handler != *h || d.flags & !SA_RESTORER != *flags || d.mask != want_mask {
            bad.push(format!(
                "{}: disposition handler {:#x} flags {:#x} mask {}, installed handler {h:#x} flags {flags:#x} mask {}",
                sig_name(*sig),
                d.handler,
                d.flags & !SA_RESTORER,
                names(d.mask),
                names(want_mask)
            ));
        }
    }
    for (i, &sig) in all_sigs.iter().enumerate() {
        let d = disposition(sig);
        if d != snapshot[i] {
            bad.push(format!(
                "{}: disposition {d}, was {}",
                sig_name(sig),
                snapshot[i]
            ));
        }
    }
    // Masks and pending sets, from the kernel's side and main's own.
    check_state(&mut bad);
    let m = thread_mask();
    if m != main_mask {
        bad.push(format!(
            "main blocked mask {}, expected {}",
            names(m),
            names(main_mask)
        ));
    }
    let p = sigpending();
    if p != shared | main_pnd {
        bad.push(format!(
            "main sigpending() {}, expected {}",
            names(p),
            names(shared | main_pnd)
        ));
    }
    let a = altstack();
    if a != (main_sp, MAIN_ALT, 0) {
        bad.push(format!(
            "main sigaltstack (sp {:#x}, size {}, flags {:#x}), expected (sp {main_sp:#x}, size {MAIN_ALT}, flags 0)",
            a.0, a.1, a.2
        ));
    }
    // t2 checks itself and takes its thread-directed signal.
    T2_REQ.store(true, Ordering::SeqCst);
    if wait_running(Duration::from_secs(5), || T2_DONE.load(Ordering::SeqCst)) {
        bad.extend(
            T2_BAD
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
    } else {
        bad.push(format!("t2 (tid {t2_tid}) did not answer"));
    }
    // Main's queued signals, one signal at a time.
    deliver(libc::SIGUSR1, &[1111], pid, uid, &mut bad);
    deliver(rt(1), &[1, 2, 3], pid, uid, &mut bad);
    deliver(rt(3), &[33], pid, uid, &mut bad);
    deliver(rt(5), &[55], pid, uid, &mut bad);
    // SA_ONSTACK in main.
    // SAFETY: a signal to this thread; the handler only stores atomics.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, gettid(), libc::SIGUSR2) };
    let at = sys::usize_of(USR2_AT.load(Ordering::SeqCst));
    if !(main_sp..main_sp + MAIN_ALT).contains(&at) {
        bad.push(format!(
            "SIGUSR2 (SA_ONSTACK) in main ran with a local at {at:#x}, not on main's alternate stack {main_sp:#x}+{MAIN_ALT}"
        ));
    }
    // SIGRTMIN+2's sa_mask.
    let from = REC_N.load(Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, gettid(), rt(2)) };
    let want = bits(&[libc::SIGINT, libc::SIGQUIT, rt(6), rt(2)]);
    let m = RT2_MASK.load(Ordering::SeqCst);
    if received(from).len() != 1 || m & want != want {
        bad.push(format!(
            "SIGRTMIN+2's handler ran {} time(s) with mask {}, expected once with {} blocked",
            received(from).len(),
            names(m),
            names(want)
        ));
    }
    // SIGWINCH: SA_NODEFER and SA_RESETHAND at work.
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, gettid(), libc::SIGWINCH) };
    if !WINCH_RAN.load(Ordering::SeqCst) {
        bad.push("SIGWINCH's handler did not run".into());
    } else {
        let m = WINCH_MASK.load(Ordering::SeqCst);
        if m & bit(libc::SIGWINCH) != 0 {
            bad.push(format!(
                "SIGWINCH's handler ran with SIGWINCH blocked (mask {}): SA_NODEFER lost",
                names(m)
            ));
        }
        let h = WINCH_DISP.load(Ordering::SeqCst);
        if h != libc::SIG_DFL as u64 || disposition(libc::SIGWINCH).handler != libc::SIG_DFL {
            bad.push(format!(
                "SIGWINCH's disposition was not reset to SIG_DFL by SA_RESETHAND (in the handler: {h:#x})"
            ));
        }
    }
    // SIGPIPE ignored: a write to a pipe without reader gives EPIPE.
    let mut fds = [0i32; 2];
    // SAFETY: pipe fills two fds, closed again below.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) == 0 {
            libc::close(fds[0]);
            let r = libc::write(fds[1], b"x".as_ptr().cast(), 1);
            let e = std::io::Error::last_os_error().raw_os_error();
            if r != -1 || e != Some(libc::EPIPE) {
                bad.push(format!(
                    "write to a pipe without reader: {r} ({e:?}), expected EPIPE"
                ));
            }
            libc::close(fds[1]);
        }
    }
    // Nothing else arrived.
    let all = received(0);
    if all.len() != 8 {
        bad.push(format!(
            "{} SA_SIGINFO signals received in all, expected 8: [{}]",
            all.len(),
            all.iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if bad.is_empty() {
        report(&out, "PASS");
        std::process::exit(0);
    }
    report(&out, &format!("FAIL {}", bad.join("; ")));
    std::process::exit(1);
}
