//! Self-checking workload (protocol: `tern_tests::ck`): signal state.
//!
//! Set up: handlers with different flags and masks (SIGUSR1 SA_SIGINFO |
//! SA_RESTART masking SIGUSR2; SIGUSR2 SA_ONSTACK; SIGWINCH SA_RESETHAND |
//! SA_NODEFER; SIGPIPE ignored; SIGRTMIN+1..+4 SA_SIGINFO, +2 masking SIGINT);
//! main blocks SIGUSR1, SIGRTMIN+1, SIGRTMIN+3; a second thread blocks those
//! and SIGRTMIN+4; pending: SIGUSR1 (value 1111), SIGRTMIN+1 three times
//! (values 1, 2, 3), SIGRTMIN+3 (33), all process-wide, and SIGRTMIN+4 (44)
//! directed at the second thread; each thread has its own sigaltstack.
//!
//! On SIGTERM: every disposition, both masks, both pending sets, both
//! alternate stacks are as set up; then the signals are unblocked and must
//! arrive with their values, in order, with si_code SI_QUEUE; a SIGUSR2
//! handler must run on the alternate stack.
//!
//! `--break`: SIGWINCH's flags are changed after `ready`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tern_tests::ck::{break_requested, out_path, report};

static TERM: AtomicBool = AtomicBool::new(false);
static GOT: Mutex<Vec<(i32, i32, i64)>> = Mutex::new(Vec::new());
static ON_STACK_ADDR: AtomicU64 = AtomicU64::new(0);
static T2_CHECK: AtomicUsize = AtomicUsize::new(0); // 1 asked, 2 ok, 3 failed
static T2_RESULT: Mutex<String> = Mutex::new(String::new());

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

extern "C" fn on_info(sig: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo.
    let (code, val) = unsafe { ((*info).si_code, (*info).si_value().sival_ptr as i64) };
    if let Ok(mut g) = GOT.try_lock() {
        g.push((sig, code, val));
    }
}

extern "C" fn on_usr2(_: i32) {
    let x = 0u8;
    ON_STACK_ADDR.store(&x as *const u8 as u64, Ordering::SeqCst);
}

extern "C" fn on_winch(_: i32) {}

fn rt(n: i32) -> i32 {
    libc::SIGRTMIN() + n
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

fn install(sig: i32, handler: usize, flags: i32, mask: &[i32]) {
    // SAFETY: a valid sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = flags;
        sa.sa_mask = sigset(mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// (handler, flags, mask as the first 64 bits)
fn disposition(sig: i32) -> (usize, i32, u64) {
    // SAFETY: reading the disposition into a local.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut sa);
        let mask = *(&sa.sa_mask as *const libc::sigset_t as *const u64);
        (sa.sa_sigaction, sa.sa_flags, mask)
    }
}

fn thread_mask() -> u64 {
    // SAFETY: reading our mask into a local.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
        *(&old as *const libc::sigset_t as *const u64)
    }
}

fn pending() -> u64 {
    // SAFETY: sigpending into a local.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut s);
        *(&s as *const libc::sigset_t as *const u64)
    }
}

fn altstack() -> (u64, i32, usize) {
    // SAFETY: sigaltstack query into a local.
    unsafe {
        let mut ss: libc::stack_t = std::mem::zeroed();
        libc::sigaltstack(std::ptr::null(), &mut ss);
        (ss.ss_sp as u64, ss.ss_flags, ss.ss_size)
    }
}

fn set_altstack(size: usize) -> u64 {
    let mem = Box::leak(vec![0u8; size].into_boxed_slice());
    // SAFETY: the leaked buffer lives forever.
    unsafe {
        let ss = libc::stack_t {
            ss_sp: mem.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: size,
        };
        libc::sigaltstack(&ss, std::ptr::null_mut());
    }
    mem.as_ptr() as u64
}

fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

fn main() {
    let out = out_path();
    let pid = std::process::id() as i32;
    let info = on_info as *const () as usize;
    let sa_info = libc::SA_SIGINFO;
    install(libc::SIGTERM, on_term as *const () as usize, 0, &[]);
    install(
        libc::SIGUSR1,
        info,
        sa_info | libc::SA_RESTART,
        &[libc::SIGUSR2],
    );
    install(
        libc::SIGUSR2,
        on_usr2 as *const () as usize,
        libc::SA_ONSTACK,
        &[],
    );
    install(
        libc::SIGWINCH,
        on_winch as *const () as usize,
        libc::SA_RESETHAND | libc::SA_NODEFER,
        &[],
    );
    // SAFETY: ignore SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    for n in 1..=4 {
        let mask: &[i32] = if n == 2 { &[libc::SIGINT] } else { &[] };
        install(rt(n), info, sa_info, mask);
    }
    let main_blocked = [libc::SIGUSR1, rt(1), rt(3)];
    // SAFETY: block in this thread.
    unsafe {
        libc::pthread_sigmask(
            libc::SIG_BLOCK,
            &sigset(&main_blocked),
            std::ptr::null_mut(),
        )
    };
    let stack_a = set_altstack(64 << 10);
    // The second thread (inherits main's mask, adds SIGRTMIN+4 and SIGTERM).
    let (tx, rx) = std::sync::mpsc::channel();
    let t2 = std::thread::spawn(move || {
        // SAFETY: block in this thread.
        unsafe {
            libc::pthread_sigmask(
                libc::SIG_BLOCK,
                &sigset(&[rt(4), libc::SIGTERM]),
                std::ptr::null_mut(),
            )
        };
        let stack_b = set_altstack(32 << 10);
        let my_mask = thread_mask();
        tx.send((pthread_self_id(), stack_b)).unwrap();
        loop {
            if T2_CHECK.load(Ordering::SeqCst) == 1 {
                let mut bad = Vec::new();
                if thread_mask() != my_mask {
                    bad.push(format!(
                        "thread 2 mask {:#x}, expected {my_mask:#x}",
                        thread_mask()
                    ));
                }
                if altstack() != (stack_b, 0, 32 << 10) {
                    bad.push(format!(
                        "thread 2 altstack {:?}, expected {:?}",
                        altstack(),
                        (stack_b, 0, 32 << 10)
                    ));
                }
                if pending() & bit(rt(4)) == 0 {
                    bad.push("thread 2: SIGRTMIN+4 not pending".into());
                }
                // Deliver ours.
                // SAFETY: unblock in this thread.
                unsafe {
                    libc::pthread_sigmask(
                        libc::SIG_UNBLOCK,
                        &sigset(&[rt(4)]),
                        std::ptr::null_mut(),
                    )
                };
                *T2_RESULT.lock().unwrap() = bad.join("; ");
                T2_CHECK.store(if bad.is_empty() { 2 } else { 3 }, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let (t2_pthread, _stack_b) = rx.recv().unwrap();
    // Pending signals.
    let q = |sig: i32, v: i64| {
        // SAFETY: sigqueue to ourselves.
        unsafe {
            libc::sigqueue(
                pid,
                sig,
                libc::sigval {
                    sival_ptr: v as *mut libc::c_void,
                },
            )
        };
    };
    q(libc::SIGUSR1, 1111);
    q(rt(1), 1);
    q(rt(1), 2);
    q(rt(1), 3);
    q(rt(3), 33);
    // SAFETY: queue to the second thread.
    unsafe {
        libc::pthread_sigqueue(
            t2_pthread,
            rt(4),
            libc::sigval {
                sival_ptr: 44 as *mut libc::c_void,
            },
        )
    };
    let sigs = [
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGWINCH,
        libc::SIGPIPE,
        rt(1),
        rt(2),
        rt(3),
        rt(4),
    ];
    let dispositions: Vec<_> = sigs.iter().map(|&s| disposition(s)).collect();
    let main_mask = thread_mask();
    let main_alt = altstack();
    std::thread::sleep(Duration::from_millis(20));
    let pend = pending();
    report(&out, &format!("ready {pid}"));
    if break_requested() {
        install(libc::SIGWINCH, on_winch as *const () as usize, 0, &[]);
    }
    while !TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut bad = Vec::new();
    for (i, &s) in sigs.iter().enumerate() {
        if disposition(s) != dispositions[i] {
            bad.push(format!(
                "signal {s}: disposition {:x?}, expected {:x?}",
                disposition(s),
                dispositions[i]
            ));
        }
    }
    if thread_mask() != main_mask {
        bad.push(format!(
            "main mask {:#x}, expected {main_mask:#x}",
            thread_mask()
        ));
    }
    if altstack() != main_alt || main_alt.0 != stack_a {
        bad.push(format!(
            "main altstack {:?}, expected {main_alt:?}",
            altstack()
        ));
    }
    if pending() != pend {
        bad.push(format!("pending {:#x}, expected {pend:#x}", pending()));
    }
    // Thread 2's own checks.
    T2_CHECK.store(1, Ordering::SeqCst);
    let t0 = Instant::now();
    while T2_CHECK.load(Ordering::SeqCst) < 2 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    match T2_CHECK.load(Ordering::SeqCst) {
        2 => {}
        3 => bad.push(T2_RESULT.lock().unwrap().clone()),
        _ => bad.push("thread 2 did not answer".into()),
    }
    // Unblock and collect.
    // SAFETY: unblock in this thread.
    unsafe {
        libc::pthread_sigmask(
            libc::SIG_UNBLOCK,
            &sigset(&main_blocked),
            std::ptr::null_mut(),
        )
    };
    std::thread::sleep(Duration::from_millis(20));
    let got = GOT.lock().unwrap().clone();
    let si_queue = -1; // SI_QUEUE
    let want = [
        (libc::SIGUSR1, si_queue, 1111),
        (rt(1), si_queue, 1),
        (rt(1), si_queue, 2),
        (rt(1), si_queue, 3),
        (rt(3), si_queue, 33),
    ];
    // Each signal's instances in queue order (the order between different
    // signals depends on how the kernel nests their handlers).
    let mut main_got: Vec<_> = got.iter().copied().filter(|g| g.0 != rt(4)).collect();
    main_got.sort_by_key(|g| g.0);
    if main_got != want {
        bad.push(format!("delivered {main_got:?}, expected {want:?}"));
    }
    if !got.contains(&(rt(4), si_queue, 44)) {
        bad.push(format!(
            "SIGRTMIN+4 with value 44 not delivered to thread 2: {got:?}"
        ));
    }
    // SA_ONSTACK: SIGUSR2 runs on the alternate stack.
    // SAFETY: raise in this thread.
    unsafe { libc::raise(libc::SIGUSR2) };
    let a = ON_STACK_ADDR.load(Ordering::SeqCst);
    if !(stack_a..stack_a + (64 << 10)).contains(&a) {
        bad.push(format!(
            "SIGUSR2 handler ran at {a:#x}, not on the alternate stack {stack_a:#x}+64K"
        ));
    }
    drop(t2);
    if bad.is_empty() {
        report(&out, "PASS");
        std::process::exit(0);
    }
    report(&out, &format!("FAIL {}", bad.join("; ")));
    std::process::exit(1);
}

fn pthread_self_id() -> libc::pthread_t {
    // SAFETY: no arguments.
    unsafe { libc::pthread_self() }
}
