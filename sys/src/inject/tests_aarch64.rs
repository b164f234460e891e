//! Injection tests on aarch64 against forked target processes (run in the
//! arm64 guest of `cargo xtask vm-test arm64`). Like the x86_64 ones they
//! need root and fail, not skip, without it. The target's leader keeps
//! fixed values in 23 general registers, SP, NZCV and two FP registers and
//! checks them on every iteration; its helper thread checks FP sums.

use std::arch::asm;
use std::sync::atomic::Ordering::*;
use std::time::Duration;

use super::test_support::*;
use super::*;

/// Returns 0 when stopped, 1 on a general register / SP / FP mismatch, 2
/// on an NZCV mismatch.
fn gpr_loop() -> u64 {
    let result: u64;
    // SAFETY: touches only the registers it declares as clobbered, and
    // memory only through the two statics' pointers; no stack use.
    unsafe {
        asm!(
            "mov x0, #101", "mov x1, #102", "mov x2, #103", "mov x3, #104",
            "mov x4, #105", "mov x5, #106", "mov x6, #107", "mov x7, #108",
            "mov x8, #109", "mov x9, #110", "mov x10, #111", "mov x11, #112",
            "movz x12, #0x3ff0, lsl #48", "mov x13, #114",
            "mov x20, #121", "mov x21, #122", "mov x22, #123", "mov x23, #124",
            "mov x24, #125", "mov x25, #126", "mov x26, #127", "mov x27, #128",
            "mov x28, #129", "mov x30, #130",
            "fmov d8, #1.0", "fmov d9, #2.0",
            "mov x17, sp",
            "movz x16, #0x6000, lsl #16", "msr nzcv, x16",
            "2:",
            "mrs x16, nzcv", "eor x16, x16, #0x60000000", "cbnz x16, 4f",
            "sub x16, x0, #101", "cbnz x16, 3f",
            "sub x16, x1, #102", "cbnz x16, 3f",
            "sub x16, x2, #103", "cbnz x16, 3f",
            "sub x16, x3, #104", "cbnz x16, 3f",
            "sub x16, x4, #105", "cbnz x16, 3f",
            "sub x16, x5, #106", "cbnz x16, 3f",
            "sub x16, x6, #107", "cbnz x16, 3f",
            "sub x16, x7, #108", "cbnz x16, 3f",
            "sub x16, x8, #109", "cbnz x16, 3f",
            "sub x16, x9, #110", "cbnz x16, 3f",
            "sub x16, x10, #111", "cbnz x16, 3f",
            "sub x16, x11, #112", "cbnz x16, 3f",
            "sub x16, x13, #114", "cbnz x16, 3f",
            "sub x16, x20, #121", "cbnz x16, 3f",
            "sub x16, x21, #122", "cbnz x16, 3f",
            "sub x16, x22, #123", "cbnz x16, 3f",
            "sub x16, x23, #124", "cbnz x16, 3f",
            "sub x16, x24, #125", "cbnz x16, 3f",
            "sub x16, x25, #126", "cbnz x16, 3f",
            "sub x16, x26, #127", "cbnz x16, 3f",
            "sub x16, x27, #128", "cbnz x16, 3f",
            "sub x16, x28, #129", "cbnz x16, 3f",
            "sub x16, x30, #130", "cbnz x16, 3f",
            "fmov x16, d8", "sub x16, x16, x12", "cbnz x16, 3f",
            "fmov x16, d9", "lsl x16, x16, #16", "cbnz x16, 3f",
            "fmov x16, d9", "lsr x16, x16, #48", "sub x16, x16, #4, lsl #12", "cbnz x16, 3f",
            "mov x16, sp", "sub x16, x16, x17", "cbnz x16, 3f",
            "ldr x16, [x14]", "add x16, x16, #1", "str x16, [x14]",
            "ldrb w16, [x15]", "cbz w16, 2b",
            "mov x16, #0", "b 5f",
            "3:", "mov x16, #1", "b 5f",
            "4:", "mov x16, #2",
            "5:",
            in("x14") GPR_COUNTER.as_ptr(),
            in("x15") GPR_STOP.as_ptr(),
            out("x16") result,
            out("x17") _,
            out("x0") _, out("x1") _, out("x2") _, out("x3") _, out("x4") _,
            out("x5") _, out("x6") _, out("x7") _, out("x8") _, out("x9") _,
            out("x10") _, out("x11") _, out("x12") _, out("x13") _,
            out("x20") _, out("x21") _, out("x22") _, out("x23") _, out("x24") _,
            out("x25") _, out("x26") _, out("x27") _, out("x28") _, out("x30") _,
            out("v8") _, out("v9") _,
        );
    }
    result
}

#[test]
fn register_checking_loop_runs_clean_without_injection() {
    // The checker itself: its patterns hold and the stop flag ends it.
    let _g = serial();
    let (child, sh) = start_loop_target(gpr_loop);
    stop_target(child, sh);
}

#[test]
fn thousand_injections_leave_general_fp_registers_and_flags_intact() {
    let _g = serial();
    let (child, sh) = start_loop_target(gpr_loop);
    let pid = child.pid;
    let c0 = sh.counter.load(Relaxed);
    hammer(pid, 10, 100);
    let c1 = sh.counter.load(Relaxed);
    wait_until("the loop to progress after detach", T, || {
        sh.counter.load(Relaxed) > c1 + 1000
    });
    assert!(c1 >= c0);
    let base = Injector::find_scratch(pid).unwrap()[0];
    assert_scratch_visible(pid, base);
    cleanup_scratch(pid);
    stop_target(child, sh);
}

#[test]
fn inject_into_thread_blocked_in_read_restarts_it() {
    let _g = serial();
    let (r, w) = pipe();
    let sh = shared();
    let mut child = fork_child(move || {
        let mut b = [0u8; 4];
        // SAFETY: reads into a local buffer.
        let n = unsafe { libc::read(r, b.as_mut_ptr().cast(), 4) };
        sh.aux.store(n as u64, SeqCst);
        if n == 4 && &b == b"ping" { 0 } else { 3 }
    });
    let pid = child.pid;
    wait_in_syscall(pid, libc::SYS_read);
    let mut inj = Injector::attach(pid, T).unwrap();
    inj.ensure_scratch(None).unwrap();
    for _ in 0..20 {
        assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    }
    inj.remove_scratch().unwrap();
    inj.detach().unwrap();
    // Still (again) blocked in read: the interrupted syscall was restarted.
    wait_in_syscall(pid, libc::SYS_read);
    // SAFETY: writes 4 bytes from a static buffer.
    assert_eq!(unsafe { libc::write(w, b"ping".as_ptr().cast(), 4) }, 4);
    assert_eq!(child.wait(T), 0, "read returned {}", sh.aux.load(SeqCst));
}

/// `set_original_regs` between injections (what a restore does): the
/// registers given last are the ones the thread runs with, x7 included
/// (which arm64 restores by itself after every syscall stop).
#[test]
fn registers_set_between_injections_are_the_ones_it_resumes_with() {
    let _g = serial();
    let (child, sh) = start_loop_target(gpr_loop);
    let pid = child.pid;
    let mut inj = Injector::attach(pid, T).unwrap();
    inj.ensure_scratch(None).unwrap();
    let orig = inj.original_regs().unwrap();
    assert_eq!(orig.regs[7], 108, "the loop's x7 pattern");
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    let mut other = orig;
    other.regs[7] = 999;
    other.regs[20] = 998;
    inj.set_original_regs(other).unwrap();
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    inj.set_original_regs(orig).unwrap();
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    inj.set_original_regs(other).unwrap();
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    // Set at a syscall-exit stop and detached right away, as a restore does.
    inj.set_original_regs(orig).unwrap();
    inj.detach().unwrap();
    let c = sh.counter.load(Relaxed);
    wait_until("the loop to run on", T, || {
        sh.counter.load(Relaxed) > c + 1000 || sh.fail.load(Relaxed) != 0
    });
    cleanup_scratch(pid);
    stop_target(child, sh);
}

/// The stub's `rt_sigreturn` path: the tracer dies while the thread sleeps
/// in an injected nanosleep; the thread finishes it and resumes exactly
/// where it was (registers, SP, flags, FP), through the frame.
#[test]
fn tracer_killed_during_a_blocking_injected_syscall() {
    let _g = serial();
    let (mut target, sh) = start_loop_target(gpr_loop);
    let pid = target.pid;
    let base = setup_scratch(pid);

    let mut inj = fork_child(move || injector_loop_one_sleep(pid, 400));
    let pc = wait_in_syscall(pid, libc::SYS_nanosleep);
    assert_eq!(
        pc,
        base + layout::STUB_OFF as u64 + 4,
        "sleeping in the stub's svc"
    );
    inj.kill();
    check_target_after_kill(&mut target, sh, &mut inj, "kill during nanosleep");
    let c = sh.counter.load(Relaxed);
    wait_until(
        "the loop to resume after the sleep",
        Duration::from_secs(5),
        || sh.counter.load(Relaxed) > c + 10_000,
    );
    assert_eq!(sh.fail.load(Relaxed), 0);

    // A new injector attaches while the thread is still in the stub: it
    // takes the thread's state from the stub frame.
    let mut inj = fork_child(move || injector_loop_one_sleep(pid, 2000));
    wait_in_syscall(pid, libc::SYS_nanosleep);
    inj.kill();
    check_target_after_kill(&mut target, sh, &mut inj, "kill during nanosleep (2)");
    let mut me = Injector::attach(pid, T).unwrap();
    assert_eq!(me.ensure_scratch(Some(base)).unwrap(), base);
    assert_eq!(sys0(&mut me, libc::SYS_getpid), pid as i64);
    me.detach().unwrap();
    let c = sh.counter.load(Relaxed);
    wait_until(
        "the loop to resume at once",
        Duration::from_millis(3000),
        || sh.counter.load(Relaxed) > c + 10_000,
    );
    assert_eq!(sh.fail.load(Relaxed), 0);

    cleanup_scratch(pid);
    stop_target(target, sh);
}

#[test]
fn tracer_killed_at_random_points_100_times() {
    let _g = serial();
    let (mut target, sh) = start_loop_target(gpr_loop);
    let pid = target.pid;
    setup_scratch(pid);
    let mut rng = Rng(now_ns(libc::CLOCK_MONOTONIC) as u64);
    let mut mid_injection = 0;
    for i in 0..100 {
        let seed = rng.next();
        sh.aux.store(0, SeqCst);
        sh.aux2.store(0, SeqCst);
        let mut inj = fork_child(move || injector_loop(pid, seed, 1, sh));
        if rng.next().is_multiple_of(2) {
            wait_until("the injector to attach", T, || sh.aux2.load(SeqCst) == 1);
        }
        let us = rng.next() % 20_000;
        std::thread::sleep(Duration::from_micros(us));
        inj.kill();
        mid_injection += sh.aux.load(SeqCst);
        check_target_after_kill(
            &mut target,
            sh,
            &mut inj,
            &format!("iteration {i} (killed after {us} us)"),
        );
    }
    let last = sh.counter.load(Relaxed);
    wait_until("the loop to progress", T, || {
        sh.counter.load(Relaxed) > last + 1000
    });
    eprintln!("{mid_injection} of 100 kills landed inside an Injector::syscall call");
    assert!(
        mid_injection >= 10,
        "only {mid_injection} kills mid-injection"
    );
    cleanup_scratch(pid);
    stop_target(target, sh);
}

#[test]
fn syscall_batches_run_in_a_process_being_built() {
    check_syscall_batches();
}
