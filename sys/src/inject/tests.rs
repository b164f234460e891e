//! Injection tests against forked target processes. They need root (ptrace
//! of a sibling, /proc/PID/mem writes) and fail, not skip, without it.
//!
//! Targets are forked children that run only raw syscalls, atomics and
//! glibc calls that are safe after fork (glibc resets its malloc locks in
//! the child). They report through a shared anonymous mapping and their exit
//! code. Every child is killed and reaped by a guard. The tests are
//! serialised: they fork, and they measure timing on a 2-core machine.

use std::arch::asm;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::time::Duration;

use super::test_support::*;
use super::*;

static GPR_SAVED_RSP: AtomicU64 = AtomicU64::new(0);
/// Keeps fixed values in all 15 general registers and RSP, and the carry
/// flag set/clear across long nop runs, checking them on every iteration.
/// Returns 0 when stopped, 1 on a register mismatch, 2 on a flag mismatch.
fn gpr_loop() -> u64 {
    let result: u64;
    // SAFETY: saves and restores rbx/rbp/rsp itself, declares every other
    // register it changes; touches only the three statics.
    unsafe {
        asm!(
            "push rbx",
            "push rbp",
            "mov qword ptr [rip + {saved}], rsp",
            "mov rax, 0x11111111",
            "mov rbx, -0x22222222",
            "mov rcx, 0x33333333",
            "mov rdx, -0x44444444",
            "mov rsi, 0x55555555",
            "mov rdi, -0x66666666",
            "mov rbp, 0x77777777",
            "mov r8, -0x08080808",
            "mov r9, 0x09090909",
            "mov r10, -0x10101010",
            "mov r11, 0x11011011",
            "mov r12, -0x12121212",
            "mov r13, 0x13131313",
            "mov r14, -0x14141414",
            "mov r15, 0x15151515",
            "2:",
            "cmp rax, 0x11111111",
            "jne 8f",
            "cmp rbx, -0x22222222",
            "jne 8f",
            "cmp rcx, 0x33333333",
            "jne 8f",
            "cmp rdx, -0x44444444",
            "jne 8f",
            "cmp rsi, 0x55555555",
            "jne 8f",
            "cmp rdi, -0x66666666",
            "jne 8f",
            "cmp rbp, 0x77777777",
            "jne 8f",
            "cmp r8, -0x08080808",
            "jne 8f",
            "cmp r9, 0x09090909",
            "jne 8f",
            "cmp r10, -0x10101010",
            "jne 8f",
            "cmp r11, 0x11011011",
            "jne 8f",
            "cmp r12, -0x12121212",
            "jne 8f",
            "cmp r13, 0x13131313",
            "jne 8f",
            "cmp r14, -0x14141414",
            "jne 8f",
            "cmp r15, 0x15151515",
            "jne 8f",
            "cmp rsp, qword ptr [rip + {saved}]",
            "jne 8f",
            "stc",
            ".rept 64",
            "nop",
            ".endr",
            "jnc 9f",
            "clc",
            ".rept 32",
            "nop",
            ".endr",
            "jc 9f",
            "add qword ptr [rip + {counter}], 1",
            "cmp byte ptr [rip + {stop}], 0",
            "je 2b",
            "xor eax, eax",
            "jmp 7f",
            "8:",
            "mov eax, 1",
            "jmp 7f",
            "9:",
            "mov eax, 2",
            "7:",
            "mov rsp, qword ptr [rip + {saved}]",
            "pop rbp",
            "pop rbx",
            saved = sym GPR_SAVED_RSP,
            counter = sym GPR_COUNTER,
            stop = sym GPR_STOP,
            out("rax") result,
            out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
        );
    }
    result
}

#[repr(C, align(32))]
struct Pattern([u8; 32 * 14]);
static PAT: Pattern = {
    let mut p = [0u8; 32 * 14];
    let mut i = 0;
    while i < p.len() {
        p[i] = (i * 37 + 11).to_le_bytes()[0];
        i += 1;
    }
    Pattern(p)
};
static MXCSR_TEST: u32 = 0xff80; // FTZ, round toward zero, all masked
static MXCSR_DEFAULT: u32 = 0x1f80;
static MXCSR_TMP: AtomicU32 = AtomicU32::new(0);

/// Keeps 14 distinct 256-bit values in ymm0..ymm13 and a non-default MXCSR,
/// checking them on every iteration. 0 when stopped, 3 on a ymm mismatch,
/// 4 on an MXCSR mismatch.
#[target_feature(enable = "avx")]
fn avx_loop() -> u64 {
    let result: u64;
    // SAFETY: reads the pattern, writes only MXCSR_TMP and GPR_COUNTER;
    // clobbers are declared (all vector registers via clobber_abi).
    unsafe {
        asm!(
            "ldmxcsr dword ptr [rip + {mxtest}]",
            "vmovdqu ymm0, ymmword ptr [rip + {pat} + 0]",
            "vmovdqu ymm1, ymmword ptr [rip + {pat} + 32]",
            "vmovdqu ymm2, ymmword ptr [rip + {pat} + 64]",
            "vmovdqu ymm3, ymmword ptr [rip + {pat} + 96]",
            "vmovdqu ymm4, ymmword ptr [rip + {pat} + 128]",
            "vmovdqu ymm5, ymmword ptr [rip + {pat} + 160]",
            "vmovdqu ymm6, ymmword ptr [rip + {pat} + 192]",
            "vmovdqu ymm7, ymmword ptr [rip + {pat} + 224]",
            "vmovdqu ymm8, ymmword ptr [rip + {pat} + 256]",
            "vmovdqu ymm9, ymmword ptr [rip + {pat} + 288]",
            "vmovdqu ymm10, ymmword ptr [rip + {pat} + 320]",
            "vmovdqu ymm11, ymmword ptr [rip + {pat} + 352]",
            "vmovdqu ymm12, ymmword ptr [rip + {pat} + 384]",
            "vmovdqu ymm13, ymmword ptr [rip + {pat} + 416]",
            "2:",
            "vxorps ymm14, ymm0, ymmword ptr [rip + {pat} + 0]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm1, ymmword ptr [rip + {pat} + 32]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm2, ymmword ptr [rip + {pat} + 64]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm3, ymmword ptr [rip + {pat} + 96]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm4, ymmword ptr [rip + {pat} + 128]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm5, ymmword ptr [rip + {pat} + 160]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm6, ymmword ptr [rip + {pat} + 192]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm7, ymmword ptr [rip + {pat} + 224]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm8, ymmword ptr [rip + {pat} + 256]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm9, ymmword ptr [rip + {pat} + 288]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm10, ymmword ptr [rip + {pat} + 320]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm11, ymmword ptr [rip + {pat} + 352]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm12, ymmword ptr [rip + {pat} + 384]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "vxorps ymm14, ymm13, ymmword ptr [rip + {pat} + 416]",
            "vptest ymm14, ymm14",
            "jnz 8f",
            "stmxcsr dword ptr [rip + {mxtmp}]",
            "cmp dword ptr [rip + {mxtmp}], 0xff80",
            "jne 9f",
            "add qword ptr [rip + {counter}], 1",
            "cmp byte ptr [rip + {stop}], 0",
            "je 2b",
            "xor eax, eax",
            "jmp 7f",
            "8:",
            "mov eax, 3",
            "jmp 7f",
            "9:",
            "mov eax, 4",
            "7:",
            "ldmxcsr dword ptr [rip + {mxdef}]",
            "vzeroupper",
            pat = sym PAT,
            mxtest = sym MXCSR_TEST,
            mxdef = sym MXCSR_DEFAULT,
            mxtmp = sym MXCSR_TMP,
            counter = sym GPR_COUNTER,
            stop = sym GPR_STOP,
            out("rax") result,
            clobber_abi("C"),
        );
    }
    result
}

fn avx_body() -> u64 {
    // SAFETY: AVX availability is asserted by the test before forking.
    unsafe { avx_loop() }
}

// -------------------------------------------------------------------- tests

#[test]
fn inject_basic_syscalls_and_scratch_data() {
    let _g = serial();
    let sh = shared();
    let (rfd, wfd) = pipe();
    let mut child = fork_child(move || spin_target(sh));
    let pid = child.pid;
    wait_until("the target to run", T, || sh.counter.load(Relaxed) > 0);

    let mut inj = Injector::attach(pid, T).unwrap();
    assert_eq!((inj.pid(), inj.tid()), (pid, pid));
    assert!(
        inj.seccomp_suspended(),
        "PTRACE_O_SUSPEND_SECCOMP should be accepted as root"
    );
    let tracer = tracer_of(pid);
    assert!(
        std::path::Path::new(&format!("/proc/self/task/{tracer}")).exists(),
        "traced by one of our threads (the injector's tracer thread), not {tracer}"
    );
    assert!(matches!(
        inj.syscall(libc::SYS_getpid, [0; 6]),
        Err(InjectError::NoScratch { .. })
    ));
    let c0 = sh.counter.load(Relaxed);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        sh.counter.load(Relaxed),
        c0,
        "the target thread should be stopped"
    );

    let base = inj.ensure_scratch(None).unwrap();
    assert_eq!(base % 4096, 0);
    assert_eq!(inj.ensure_scratch(None).unwrap(), base, "idempotent");
    assert_eq!(inj.debug_state().unwrap().slot, Some(0));
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    assert_eq!(sys0(&mut inj, libc::SYS_gettid), pid as i64);
    assert_eq!(sys0(&mut inj, libc::SYS_getppid), std::process::id() as i64);
    assert_eq!(sys0(&mut inj, 100_000), -(libc::ENOSYS as i64));

    // Data in, through write(2) on the target's copy of the pipe.
    let msg = b"hello from inside\n";
    let a = inj.scratch_data(msg).unwrap();
    assert!(a >= base + layout::DATA_OFF as u64 && a < base + SCRATCH_LEN);
    let n = inj
        .syscall(libc::SYS_write, [wfd as u64, a, msg.len() as u64, 0, 0, 0])
        .unwrap();
    assert_eq!(n, msg.len() as i64);
    let mut buf = [0u8; 64];
    // SAFETY: the kernel writes at most the given length into the buffer, which we own for the call.
    let got = unsafe { libc::read(rfd, buf.as_mut_ptr() as *mut c_void, buf.len()) };
    assert_eq!(&buf[..got as usize], msg);

    // Results out: the data area is writable.
    let ts = inj.scratch_data(&[0u8; 16]).unwrap();
    assert_eq!(
        inj.syscall(
            libc::SYS_clock_gettime,
            [libc::CLOCK_MONOTONIC as u64, ts, 0, 0, 0, 0]
        )
        .unwrap(),
        0
    );
    let v = inj.read_memory(ts, 16).unwrap();
    let secs = i64::from_le_bytes(v[..8].try_into().unwrap());
    assert!(secs > 0 && secs <= now_ns(libc::CLOCK_MONOTONIC) / 1_000_000_000);

    // A path, and an fd created and closed in the target.
    let path = inj.scratch_data(b"/dev/null\0").unwrap();
    assert_eq!(path % 16, 0);
    let fd = inj
        .syscall(
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                path,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
                0,
                0,
            ],
        )
        .unwrap();
    assert!(fd >= 0, "openat: {fd}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .unwrap()
            .to_str(),
        Some("/dev/null")
    );
    assert_eq!(
        inj.syscall(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])
            .unwrap(),
        0
    );
    // The userfaultfd the tracker needs, created inside the target.
    let uffd = inj
        .syscall(
            libc::SYS_userfaultfd,
            [
                (libc::O_CLOEXEC | 1) as u64, /* UFFD_USER_MODE_ONLY */
                0,
                0,
                0,
                0,
                0,
            ],
        )
        .unwrap();
    assert!(uffd >= 0, "userfaultfd: {uffd}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/{uffd}"))
            .unwrap()
            .to_str(),
        Some("anon_inode:[userfaultfd]")
    );
    assert_eq!(
        inj.syscall(libc::SYS_close, [uffd as u64, 0, 0, 0, 0, 0])
            .unwrap(),
        0
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}/fd/{uffd}")).exists());

    // Capacity.
    let big = vec![7u8; SCRATCH_DATA_CAPACITY];
    inj.scratch_data(&big[..SCRATCH_DATA_CAPACITY / 2]).unwrap();
    assert!(matches!(
        inj.scratch_data(&big),
        Err(InjectError::ScratchFull { .. })
    ));
    sys0(&mut inj, libc::SYS_getpid);
    inj.scratch_data(&big).unwrap(); // the area starts afresh after a syscall

    // Named, found, removed.
    assert_scratch_visible(pid, base);
    assert_eq!(Injector::find_scratch(pid).unwrap(), vec![base]);
    inj.remove_scratch().unwrap();
    assert!(Injector::find_scratch(pid).unwrap().is_empty());
    assert!(
        !std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .contains("tern-scratch")
    );
    inj.remove_scratch().unwrap(); // no-op
    inj.detach().unwrap();

    assert_eq!(tracer_of(pid), 0);
    let c1 = sh.counter.load(Relaxed);
    wait_until("the target to run again", T, || {
        sh.counter.load(Relaxed) > c1 + 1000
    });
    sh.stop.store(1, Relaxed);
    assert_eq!(child.wait(T), 0);
    // SAFETY: closes an fd this code opened and no longer uses.
    unsafe {
        libc::close(rfd);
        libc::close(wfd);
    }
}

#[test]
fn inject_into_thread_blocked_in_read_restarts_it() {
    let _g = serial();
    let (rfd, wfd) = pipe();
    let mut child = fork_child(move || {
        let mut buf = [0u8; 64];
        // SAFETY: the kernel writes at most the given length into the buffer, which we own for the call.
        let n = unsafe { libc::read(rfd, buf.as_mut_ptr() as *mut c_void, buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return if e == libc::EINTR {
                20
            } else if (512..=516).contains(&e) {
                21
            } else {
                22
            };
        }
        if &buf[..n as usize] != b"hello" {
            23
        } else {
            0
        }
    });
    let pid = child.pid;
    wait_in_syscall(pid, libc::SYS_read);

    let mut inj = Injector::attach(pid, T).unwrap();
    let st = inj.debug_state().unwrap();
    assert_eq!(
        (st.orig_orig_rax, st.orig_rax),
        (libc::SYS_read, -512),
        "stopped inside read with -ERESTARTSYS"
    );
    assert_eq!(st.fixed_rip, st.orig_rip - 2);
    inj.ensure_scratch(None).unwrap();
    for _ in 0..50 {
        assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    }
    inj.remove_scratch().unwrap();
    inj.detach().unwrap();

    // Back in read(2), not returned from it.
    std::thread::sleep(Duration::from_millis(50));
    wait_in_syscall(pid, libc::SYS_read);
    assert!(child.alive());
    assert_eq!(
        // SAFETY: the kernel reads at most the given length from the buffer, which we own for the call.
        unsafe { libc::write(wfd, b"hello".as_ptr() as *const c_void, 5) },
        5
    );
    assert_eq!(
        child.wait(T),
        0,
        "20: EINTR, 21: errno 512..516 leaked, 22: other error, 23: wrong data"
    );
    // SAFETY: closes an fd this code opened and no longer uses.
    unsafe {
        libc::close(rfd);
        libc::close(wfd);
    }
}

/// Traced from the test's own thread (no tracer thread): syscalls and a
/// batch of them run, another thread is refused, the detach lets the
/// target go on in its read; an owned target dropped undetached dies.
#[test]
fn attached_here_injects_on_this_thread_only() {
    let _g = serial();
    let (rfd, wfd) = pipe();
    let mut child = fork_child(move || {
        let mut buf = [0u8; 8];
        // SAFETY: the kernel writes at most the given length into the buffer, which we own for the call.
        let n = unsafe { libc::read(rfd, buf.as_mut_ptr() as *mut c_void, buf.len()) };
        if n == 2 && &buf[..2] == b"ok" { 0 } else { 30 }
    });
    let pid = child.pid;
    wait_in_syscall(pid, libc::SYS_read);
    let mut inj = Injector::attach_owned_thread_here(pid, pid, T).unwrap();
    inj.ensure_scratch(None).unwrap();
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    let calls = vec![
        (libc::SYS_getpid, [0; 6]),
        (libc::SYS_gettid, [0; 6]),
        (libc::SYS_getppid, [0; 6]),
    ];
    assert_eq!(
        inj.syscalls(calls).unwrap(),
        vec![pid as i64, pid as i64, i64::from(std::process::id() as i32)]
    );
    let mut inj = std::thread::scope(|sc| {
        sc.spawn(move || {
            let r = inj.syscall(libc::SYS_getpid, [0; 6]);
            assert!(matches!(r, Err(InjectError::Released { .. })), "{r:?}");
            inj
        })
        .join()
        .unwrap()
    });
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    inj.remove_scratch().unwrap();
    inj.detach().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    wait_in_syscall(pid, libc::SYS_read);
    // SAFETY: writes 2 bytes from a static buffer into our pipe.
    let n = unsafe { libc::write(wfd, b"ok".as_ptr() as *const c_void, 2) };
    assert_eq!(n, 2);
    assert_eq!(child.wait(T), 0, "the target went on in its read");

    let mut doomed = fork_child(move || {
        let mut buf = [0u8; 8];
        // SAFETY: as above.
        unsafe { libc::read(rfd, buf.as_mut_ptr() as *mut c_void, buf.len()) };
        31
    });
    wait_in_syscall(doomed.pid, libc::SYS_read);
    drop(Injector::attach_owned_thread_here(doomed.pid, doomed.pid, T).unwrap());
    assert_eq!(
        doomed.wait(T),
        128 + libc::SIGKILL,
        "an owned target dropped undetached dies"
    );
    // SAFETY: closes fds this code opened and no longer uses.
    unsafe {
        libc::close(rfd);
        libc::close(wfd);
    }
}

#[test]
fn inject_into_sleeping_threads_keeps_their_full_sleep() {
    let _g = serial();
    const SLEEP_NS: i64 = 700_000_000;
    // 0: nanosleep, 1: clock_nanosleep relative (both -ERESTART_RESTARTBLOCK),
    // 2: clock_nanosleep TIMER_ABSTIME (-ERESTARTNOHAND).
    let mut kids = Vec::new();
    for kind in 0..3 {
        let child = fork_child(move || {
            let t0 = now_ns(libc::CLOCK_MONOTONIC);
            let req = libc::timespec {
                tv_sec: 0,
                tv_nsec: SLEEP_NS,
            };
            let ret = match kind {
                // glibc's nanosleep() is clock_nanosleep(2); call the real one.
                // SAFETY: the kernel reads a local timespec; no remainder is written (null).
                0 => unsafe {
                    i32::try_from(libc::syscall(
                        libc::SYS_nanosleep,
                        &req,
                        std::ptr::null_mut::<libc::timespec>(),
                    ))
                    .unwrap()
                },
                // SAFETY: the kernel reads a local timespec; no remainder is written (null).
                1 => unsafe {
                    libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &req, std::ptr::null_mut())
                },
                _ => {
                    let end = t0 + SLEEP_NS;
                    let abs = libc::timespec {
                        tv_sec: end / 1_000_000_000,
                        tv_nsec: end % 1_000_000_000,
                    };
                    // SAFETY: the kernel reads a local timespec; no remainder is written (null).
                    unsafe {
                        libc::clock_nanosleep(
                            libc::CLOCK_MONOTONIC,
                            libc::TIMER_ABSTIME,
                            &abs,
                            std::ptr::null_mut(),
                        )
                    }
                }
            };
            let slept = now_ns(libc::CLOCK_MONOTONIC) - t0;
            if ret != 0 {
                return 30;
            }
            if slept < SLEEP_NS { 31 } else { 0 }
        });
        kids.push(child);
    }
    let nrs = [
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_nanosleep,
    ];
    let codes = [-516, -516, -514];
    for (i, child) in kids.iter().enumerate() {
        let pid = child.pid;
        wait_in_syscall(pid, nrs[i]);
        let mut inj = Injector::attach(pid, T).unwrap();
        let st = inj.debug_state().unwrap();
        assert_eq!(
            (st.orig_orig_rax, st.orig_rax),
            (nrs[i], codes[i]),
            "sleeper {i}"
        );
        if codes[i] == -516 {
            assert_eq!(st.fixed_rax, 219, "restart_syscall");
        }
        inj.ensure_scratch(None).unwrap();
        for _ in 0..30 {
            assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
        }
        if i == 0 {
            inj.remove_scratch().unwrap();
        }
        inj.detach().unwrap();
        assert_eq!(tracer_of(pid), 0);
    }
    for (i, mut child) in kids.into_iter().enumerate() {
        assert_eq!(
            child.wait(T),
            0,
            "sleeper {i}: 30: nonzero return, 31: woke early"
        );
    }
}

#[test]
fn thousand_injections_leave_avx_and_general_registers_intact() {
    let _g = serial();
    assert!(
        std::arch::is_x86_feature_detected!("avx"),
        "this test needs AVX"
    );
    for body in [avx_body as fn() -> u64, gpr_loop] {
        let (child, sh) = start_loop_target(body);
        let pid = child.pid;
        let c0 = sh.counter.load(Relaxed);
        hammer(pid, 10, 100);
        assert_eq!(sh.fail.load(Relaxed), 0);
        wait_until("the loop to progress", T, || {
            sh.counter.load(Relaxed) > c0 + 10_000
        });
        cleanup_scratch(pid);
        stop_target(child, sh);
    }
}

#[test]
fn scratch_is_named_found_by_name_or_magic_and_reused() {
    let _g = serial();
    let sh = shared();
    let child = fork_child(move || spin_target(sh));
    let pid = child.pid;
    let mut inj = Injector::attach(pid, T).unwrap();
    let base = inj.ensure_scratch(None).unwrap();
    assert_scratch_visible(pid, base);
    assert_eq!(Injector::find_scratch(pid).unwrap(), vec![base]);
    if kernel_names_anon_vmas() {
        // Take the name away: the magic header still identifies it.
        let r = inj
            .syscall(libc::SYS_prctl, [0x5356_4d41, 0, base, SCRATCH_LEN, 0, 0])
            .unwrap();
        assert_eq!(r, 0);
        assert!(
            !maps_line(pid, base).contains("tern-scratch"),
            "{}",
            maps_line(pid, base)
        );
        assert_eq!(Injector::find_scratch(pid).unwrap(), vec![base]);
    }
    inj.detach().unwrap();

    // A second injector reuses it (no new mapping, no vDSO window).
    let mut inj = Injector::attach(pid, T).unwrap();
    assert_eq!(inj.ensure_scratch(Some(base)).unwrap(), base);
    assert_eq!(
        inj.debug_state().unwrap().raw_syscall,
        None,
        "reuse must not touch the vDSO"
    );
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    inj.detach().unwrap();

    // A bogus `known` is ignored; leftovers are removed through the new area.
    let mut inj = Injector::attach(pid, T).unwrap();
    let fresh = inj.ensure_scratch(Some(base + 4096)).unwrap();
    assert_ne!(fresh, base);
    let mut found = Injector::find_scratch(pid).unwrap();
    found.sort();
    let mut both = vec![base, fresh];
    both.sort();
    assert_eq!(found, both);
    assert_eq!(inj.remove_leftover_scratch().unwrap(), vec![base]);
    assert_eq!(Injector::find_scratch(pid).unwrap(), vec![fresh]);
    inj.remove_scratch().unwrap();
    assert!(Injector::find_scratch(pid).unwrap().is_empty());
    inj.detach().unwrap();
    stop_target(child, sh);
}

#[test]
fn attach_errors_are_clear() {
    let _g = serial();
    assert!(matches!(
        Injector::attach(i32::MAX, T),
        Err(InjectError::NoSuchProcess { pid: i32::MAX })
    ));
    // A thread id that is not a process id: one of our own threads.
    let me = std::process::id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    let (_stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        // SAFETY: takes no arguments and cannot fail.
        tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = stop_rx.recv();
    });
    let tid = rx.recv().unwrap();
    match Injector::attach(tid, T) {
        Err(e @ InjectError::NotAProcess { .. }) => {
            assert!(e.to_string().contains(&me.to_string()))
        }
        other => panic!("{other:?}"),
    }
    drop(_stop_tx);
    h.join().unwrap();

    let sh = shared();
    let child = fork_child(move || spin_target(sh));
    let inj = Injector::attach(child.pid, T).unwrap();
    match Injector::attach(child.pid, T) {
        Err(e @ InjectError::AlreadyTraced { .. }) => {
            assert!(e.to_string().contains("already traced"))
        }
        other => panic!("{other:?}"),
    }
    drop(inj); // Drop detaches
    assert_eq!(tracer_of(child.pid), 0);
    stop_target(child, sh);
}

#[test]
fn leader_gone_attaches_another_thread() {
    let _g = serial();
    let sh = shared();
    extern "C" fn worker(arg: *mut c_void) -> *mut c_void {
        // SAFETY: `arg` is the &Shared handed to pthread_create; it outlives the thread, which is joined before it is dropped.
        let sh = unsafe { &*(arg as *const Shared) };
        while sh.stop.load(Relaxed) == 0 {
            sh.counter.fetch_add(1, Relaxed);
        }
        // SAFETY: ends this (forked) process at once; nothing after it runs.
        unsafe { libc::_exit(0) }
    }
    let mut child = fork_child(move || {
        let mut t: libc::pthread_t = 0;
        // SAFETY: the thread gets a pointer to `sh`, which outlives it (it is joined before `sh` is dropped); `t` is a local.
        unsafe {
            libc::pthread_create(
                &mut t,
                std::ptr::null(),
                worker,
                sh as *const Shared as *mut c_void,
            );
            // exit(2) of the leader thread only (pthread_exit would unwind
            // through the fork helper's catch_unwind).
            libc::syscall(libc::SYS_exit, 0);
        }
        99
    });
    let pid = child.pid;
    wait_until("the leader to exit", T, || {
        proc::status(pid, Some(pid)).is_ok_and(|s| s.state.starts_with('Z'))
    });
    let mut inj = Injector::attach(pid, T).unwrap();
    assert_ne!(inj.tid(), pid);
    inj.ensure_scratch(None).unwrap();
    assert_eq!(sys0(&mut inj, libc::SYS_gettid), inj.tid() as i64);
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    inj.remove_scratch().unwrap();
    inj.detach().unwrap();
    let c = sh.counter.load(Relaxed);
    wait_until("the thread to run again", T, || {
        sh.counter.load(Relaxed) > c + 1000
    });
    sh.stop.store(1, Relaxed);
    assert_eq!(child.wait(T), 0);
}

#[test]
fn group_stopped_target_stays_stopped() {
    let _g = serial();
    let sh = shared();
    let mut child = fork_child(move || spin_target(sh));
    let pid = child.pid;
    wait_until("the target to run", T, || sh.counter.load(Relaxed) > 0);
    // SAFETY: kill(2) takes integers only.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until("the stop", T, || state_of(pid).starts_with('T'));
    let mut inj = Injector::attach(pid, T).unwrap();
    inj.ensure_scratch(None).unwrap();
    assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
    inj.remove_scratch().unwrap();
    inj.detach().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        state_of(pid).starts_with("T (stopped)"),
        "{}",
        state_of(pid)
    );
    let c = sh.counter.load(Relaxed);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(sh.counter.load(Relaxed), c, "still stopped");
    // SAFETY: kill(2) takes integers only.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_until("the target to continue", T, || {
        sh.counter.load(Relaxed) > c + 1000
    });
    sh.stop.store(1, Relaxed);
    assert_eq!(child.wait(T), 0);
}

static SIG_COUNT: AtomicU64 = AtomicU64::new(0);
static SIG_SUM: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_rt(_sig: i32, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SAFETY: SA_SIGINFO handler: `info` is valid; sigqueue sets si_value.
    let v = unsafe { (*info).si_value().sival_ptr } as u64;
    SIG_SUM.fetch_add(v, Relaxed);
    SIG_COUNT.fetch_add(1, Relaxed);
}

#[test]
fn signals_arriving_during_injection_are_delivered_not_lost() {
    let _g = serial();
    let sh = shared();
    let sig = libc::SIGRTMIN();
    let child = fork_child(move || {
        // SAFETY: installs a handler in this forked child; `sa` is a local, all-zero (valid) before its fields are set, and no old action is read (null).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_rt as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        sh.aux2.store(1, Relaxed);
        while sh.stop.load(Relaxed) == 0 {
            sh.counter.fetch_add(1, Relaxed);
            sh.aux.store(
                SIG_COUNT.load(Relaxed) << 32 | SIG_SUM.load(Relaxed),
                Relaxed,
            );
        }
        0
    });
    let pid = child.pid;
    wait_until("the handler", T, || sh.aux2.load(Relaxed) == 1);
    const N: u64 = 300;
    let sender = std::thread::spawn(move || {
        for i in 1..=N {
            let v = libc::sigval {
                sival_ptr: i as *mut c_void,
            };
            // SAFETY: sigqueue(3) takes integers and a sigval by value.
            assert_eq!(unsafe { libc::sigqueue(pid, sig, v) }, 0);
            std::thread::sleep(Duration::from_micros(300));
        }
    });
    let mut injected = 0;
    let mut delivered = 0;
    while !sender.is_finished() || injected < 1000 {
        let mut inj = Injector::attach(pid, T).unwrap();
        let known = Injector::find_scratch(pid).unwrap().first().copied();
        inj.ensure_scratch(known).unwrap();
        for _ in 0..100 {
            assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
            injected += 1;
        }
        let d = inj.debug_state().unwrap().delivered;
        // What a dump relies on to know the memory may have changed.
        assert!(inj.ran_program_code().unwrap() >= d);
        delivered += d;
        inj.detach().unwrap();
    }
    assert!(
        delivered > 0,
        "no signal arrived during an injection: the test did not test anything"
    );
    sender.join().unwrap();
    let want = (N << 32) | (N * (N + 1) / 2);
    wait_until("all signals to be handled", T, || {
        sh.aux.load(Relaxed) == want
    });
    cleanup_scratch(pid);
    stop_target(child, sh);
}

/// Runs in a forked child: inject forever (until killed).
#[test]
fn tracer_killed_during_a_blocking_injected_syscall() {
    let _g = serial();
    let (mut target, sh) = start_loop_target(gpr_loop);
    let pid = target.pid;
    let base = setup_scratch(pid);

    // 1. The tracer dies while the thread sleeps in an injected nanosleep:
    //    the thread finishes it and resumes through the stub.
    let mut inj = fork_child(move || injector_loop_one_sleep(pid, 400));
    let pc = wait_in_syscall(pid, libc::SYS_nanosleep);
    assert_eq!(
        pc,
        base + layout::STUB_OFF as u64 + 2,
        "sleeping in the stub's syscall"
    );
    inj.kill();
    check_target_after_kill(&mut target, sh, &mut inj, "kill during nanosleep");
    let c = sh.counter.load(Relaxed);
    wait_until(
        "the loop to resume after the sleep",
        Duration::from_secs(3),
        || sh.counter.load(Relaxed) > c + 10_000,
    );
    assert_eq!(sh.fail.load(Relaxed), 0);

    // 2. Same, but a new injector attaches while the thread is still in the
    //    stub: it recovers the thread's state from the stub frame.
    let mut inj = fork_child(move || injector_loop_one_sleep(pid, 2000));
    wait_in_syscall(pid, libc::SYS_nanosleep);
    inj.kill();
    check_target_after_kill(&mut target, sh, &mut inj, "kill during nanosleep (2)");
    let mut me = Injector::attach(pid, T).unwrap();
    assert!(
        me.debug_state().unwrap().recovered,
        "state recovered from the stub frame"
    );
    assert_eq!(me.ensure_scratch(Some(base)).unwrap(), base);
    assert_eq!(sys0(&mut me, libc::SYS_getpid), pid as i64);
    me.detach().unwrap();
    let c = sh.counter.load(Relaxed);
    wait_until(
        "the loop to resume at once",
        Duration::from_millis(1500),
        || sh.counter.load(Relaxed) > c + 10_000,
    );
    assert_eq!(sh.fail.load(Relaxed), 0);

    cleanup_scratch(pid);
    stop_target(target, sh);
}

#[test]
fn tracer_killed_at_random_points_400_times() {
    let _g = serial();
    let (mut target, sh) = start_loop_target(gpr_loop);
    let pid = target.pid;
    setup_scratch(pid);
    let mut rng = Rng(now_ns(libc::CLOCK_MONOTONIC) as u64);
    let mut last = sh.counter.load(Relaxed);
    let mut mid_injection = 0;
    for i in 0..400 {
        let seed = rng.next();
        sh.aux.store(0, SeqCst);
        sh.aux2.store(0, SeqCst);
        let mut inj = fork_child(move || injector_loop(pid, seed, 1, sh));
        // Half the time from the fork (attach, first injections), half the
        // time from the first completed attach (injection loops).
        if rng.next().is_multiple_of(2) {
            wait_until("the injector to attach", T, || sh.aux2.load(SeqCst) == 1);
        }
        let us = match rng.next() % 4 {
            0 => rng.next() % 300,
            1 | 2 => rng.next() % 3000,
            _ => rng.next() % 12_000,
        };
        std::thread::sleep(Duration::from_micros(us));
        inj.kill();
        mid_injection += sh.aux.load(SeqCst);
        check_target_after_kill(
            &mut target,
            sh,
            &mut inj,
            &format!("iteration {i} (killed after {us} us)"),
        );
        if i % 40 == 39 {
            wait_until("the loop to progress", T, || {
                sh.counter.load(Relaxed) > last + 1000
            });
            last = sh.counter.load(Relaxed);
        }
    }
    wait_until("the loop to progress", T, || {
        sh.counter.load(Relaxed) > last + 1000
    });
    eprintln!("{mid_injection} of 400 kills landed inside an Injector::syscall call");
    assert!(
        mid_injection >= 60,
        "only {mid_injection} kills landed inside an injection"
    );
    cleanup_scratch(pid);
    assert_eq!(tracer_of(pid), 0);
    stop_target(target, sh);
}

#[test]
fn tracer_killed_while_the_target_was_blocked_in_read() {
    // The stub frame must hold the fixed-up registers (RIP back on the
    // `syscall`, RAX = read): the thread re-enters read(2) by itself.
    let _g = serial();
    let (rfd, wfd) = pipe();
    let mut child = fork_child(move || {
        let mut buf = [0u8; 64];
        // SAFETY: the kernel writes at most the given length into the buffer, which we own for the call.
        let n = unsafe { libc::read(rfd, buf.as_mut_ptr() as *mut c_void, buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return if e == libc::EINTR {
                20
            } else if (512..=516).contains(&e) {
                21
            } else {
                22
            };
        }
        if &buf[..n as usize] != b"hello" {
            23
        } else {
            0
        }
    });
    let pid = child.pid;
    let read_pc = wait_in_syscall(pid, libc::SYS_read);
    let base = setup_scratch(pid);
    wait_in_syscall(pid, libc::SYS_read);
    let mut inj = fork_child(move || injector_loop_one_sleep(pid, 300));
    let pc = wait_in_syscall(pid, libc::SYS_nanosleep);
    assert_eq!(pc, base + layout::STUB_OFF as u64 + 2);
    inj.kill();
    let code = inj.wait(T);
    assert_eq!(code, 128 + libc::SIGKILL);
    wait_until("TracerPid 0", T, || tracer_of(pid) == 0);
    // After the sleep the stub jumps back onto read's `syscall`.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        wait_in_syscall(pid, libc::SYS_read),
        read_pc,
        "back in the same read(2)"
    );
    assert!(child.alive());
    cleanup_scratch(pid);
    assert_eq!(
        // SAFETY: the kernel reads at most the given length from the buffer, which we own for the call.
        unsafe { libc::write(wfd, b"hello".as_ptr() as *const c_void, 5) },
        5
    );
    assert_eq!(
        child.wait(T),
        0,
        "20: EINTR, 21: errno 512..516 leaked, 22: other error, 23: wrong data"
    );
    // SAFETY: closes an fd this code opened and no longer uses.
    unsafe {
        libc::close(rfd);
        libc::close(wfd);
    }
}

unsafe extern "C" {
    /// glibc 2.35+: offset of the thread's `struct rseq` from the thread pointer.
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

#[repr(C, align(32))]
struct RseqCs([u64; 4]);
static mut RSEQ_CS: RseqCs = RseqCs([0; 4]);
static RSEQ_ABORTS: AtomicU64 = AtomicU64::new(0);

/// Spins inside an rseq critical section whose descriptor stays armed,
/// checking on every iteration that the kernel still has it (rseq_cs != 0:
/// the kernel clears it only when it sees the thread outside the section).
/// 0 when stopped (and the section was aborted at least once), 5 if the
/// thread ran inside the section with the descriptor gone, 6 if never
/// aborted, 60 if glibc registered no rseq area.
fn rseq_body() -> u64 {
    // SAFETY: reading glibc's exported constants.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return 60;
    }
    let result: u64;
    // SAFETY: writes only the rseq_cs field of this thread's registered
    // rseq area (the documented way to enter a critical section), the
    // static descriptor and counters; clobbers are declared.
    unsafe {
        asm!(
            "lea rax, [rip + 3f]",
            "mov qword ptr [rip + {desc} + 8], rax",
            "lea rcx, [rip + 4f]",
            "sub rcx, rax",
            "mov qword ptr [rip + {desc} + 16], rcx",
            "lea rax, [rip + 6f]",
            "mov qword ptr [rip + {desc} + 24], rax",
            "2:",
            "lea rax, [rip + {desc}]",
            "mov qword ptr fs:[r11 + 8], rax",
            "3:",
            "cmp qword ptr fs:[r11 + 8], 0",
            "je 8f",
            "add qword ptr [rip + {counter}], 1",
            "cmp byte ptr [rip + {stop}], 0",
            "je 3b",
            "4:",
            "mov qword ptr fs:[r11 + 8], 0",
            "xor eax, eax",
            "jmp 7f",
            ".long 0x53053053",
            "6:",
            "add qword ptr [rip + {aborts}], 1",
            "jmp 2b",
            "8:",
            "mov qword ptr fs:[r11 + 8], 0",
            "mov eax, 5",
            "7:",
            desc = sym RSEQ_CS,
            counter = sym GPR_COUNTER,
            stop = sym GPR_STOP,
            aborts = sym RSEQ_ABORTS,
            inout("r11") off => _,
            out("rax") result,
            out("rcx") _,
        );
    }
    if result == 0 && RSEQ_ABORTS.load(Relaxed) == 0 {
        6
    } else {
        result
    }
}

#[test]
fn thread_stopped_in_an_rseq_critical_section_resumes_at_its_abort_handler() {
    let _g = serial();
    let (child, sh) = start_loop_target(rseq_body);
    let pid = child.pid;
    let mut aborted = 0;
    for _ in 0..20 {
        let mut inj = Injector::attach(pid, T).unwrap();
        let known = Injector::find_scratch(pid).unwrap().first().copied();
        inj.ensure_scratch(known).unwrap();
        if inj.debug_state().unwrap().rseq_aborted {
            aborted += 1;
        }
        for _ in 0..20 {
            assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
        }
        inj.detach().unwrap();
        let c = sh.counter.load(Relaxed);
        wait_until("the loop to run", T, || {
            sh.counter.load(Relaxed) > c + 1000 || sh.fail.load(Relaxed) != 0
        });
        assert_eq!(
            sh.fail.load(Relaxed),
            0,
            "5: the thread ran inside its critical section with the kernel unaware of it"
        );
    }
    assert!(
        aborted > 0,
        "the thread was never stopped inside its critical section"
    );
    cleanup_scratch(pid);
    stop_target(child, sh);
}

/// Drop CAP_SYS_ADMIN from the calling thread only (credentials are
/// per-thread; threads it creates inherit them).
fn drop_cap_sys_admin_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget/capset read and write the local header and two-element data array the uapi expects.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
        d[0].effective &= !(1 << 21); // CAP_SYS_ADMIN
        d[0].permitted &= !(1 << 21); // CAP_SYS_ADMIN
        assert_eq!(libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()), 0);
    }
}

#[test]
fn seccomp_filter_without_suspension_is_reported_not_fatal() {
    let _g = serial();
    let sh = shared();
    let child = fork_child(move || {
        // if nr == getppid: RET_TRAP; if nr == getuid: RET_ERRNO(EPERM); else ALLOW
        let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        let prog = [
            f(0x20, 0, 0, 0), // ld [nr]
            f(0x15, 0, 1, u32::try_from(libc::SYS_getppid).unwrap()),
            f(0x06, 0, 0, 0x0003_0000), // SECCOMP_RET_TRAP
            f(0x15, 0, 1, u32::try_from(libc::SYS_getuid).unwrap()),
            f(0x06, 0, 0, 0x0005_0000 | libc::EPERM as u32), // SECCOMP_RET_ERRNO
            f(0x06, 0, 0, 0x7fff_0000),                      // SECCOMP_RET_ALLOW
        ];
        let fprog = libc::sock_fprog {
            len: u16::try_from(prog.len()).unwrap(),
            filter: prog.as_ptr() as *mut _,
        };
        // SAFETY: prctl takes integers and a sock_fprog local that points at the filter, alive for the call.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog) != 0
            {
                return 40;
            }
        }
        spin_target(sh)
    });
    let pid = child.pid;
    wait_until("the filtered target to run", T, || {
        sh.counter.load(Relaxed) > 0
    });
    assert_eq!(proc::status(pid, None).unwrap().seccomp, Some(2));

    std::thread::spawn(move || {
        drop_cap_sys_admin_in_this_thread();
        let mut inj = Injector::attach(pid, T).unwrap();
        assert!(
            !inj.seccomp_suspended(),
            "SUSPEND_SECCOMP needs CAP_SYS_ADMIN"
        );
        inj.ensure_scratch(None).unwrap();
        assert_eq!(
            sys0(&mut inj, libc::SYS_getuid),
            -(libc::EPERM as i64),
            "RET_ERRNO applies"
        );
        match inj.syscall(libc::SYS_getppid, [0; 6]) {
            Err(
                e @ InjectError::Fault {
                    sig: libc::SIGSYS, ..
                },
            ) => {
                assert!(e.to_string().contains("seccomp"), "{e}")
            }
            other => panic!("expected a SIGSYS fault, got {other:?}"),
        }
        // The injector is still usable, and the SIGSYS never reaches the target.
        assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
        inj.remove_scratch().unwrap();
        inj.detach().unwrap();
    })
    .join()
    .unwrap();

    let c = sh.counter.load(Relaxed);
    wait_until("the target to run on", T, || {
        sh.counter.load(Relaxed) > c + 1000
    });
    std::thread::sleep(Duration::from_millis(50));
    let st = proc::status(pid, Some(pid)).unwrap();
    assert_eq!(
        (st.shdpnd, st.sigpnd),
        (0, 0),
        "signals pending (process, thread)"
    );
    stop_target(child, sh);
}

#[test]
fn two_threads_injected_at_once_share_the_scratch_area() {
    let _g = serial();
    let sh = shared();
    extern "C" fn worker(arg: *mut c_void) -> *mut c_void {
        // SAFETY: `arg` is the &Shared handed to pthread_create; it outlives the thread, which is joined before it is dropped.
        let sh = unsafe { &*(arg as *const Shared) };
        // SAFETY: takes no arguments and cannot fail.
        sh.aux.store(unsafe { libc::gettid() } as u64, SeqCst);
        while sh.stop.load(Relaxed) == 0 {
            sh.aux2.fetch_add(1, Relaxed);
        }
        std::ptr::null_mut()
    }
    let mut child = fork_child(move || {
        let mut t: libc::pthread_t = 0;
        // SAFETY: the thread gets a pointer to `sh`, which outlives it (it is joined before `sh` is dropped); `t` is a local.
        unsafe {
            libc::pthread_create(
                &mut t,
                std::ptr::null(),
                worker,
                sh as *const Shared as *mut c_void,
            )
        };
        let r = spin_target(sh);
        // SAFETY: joins a thread this code created and has not joined or detached; no result is read (null).
        unsafe { libc::pthread_join(t, std::ptr::null_mut()) };
        r
    });
    let pid = child.pid;
    wait_until("the worker thread", T, || sh.aux.load(SeqCst) != 0);
    let tid = i32::try_from(sh.aux.load(SeqCst)).unwrap();
    assert!(matches!(
        Injector::attach_thread(pid, 999_999_999, T),
        Err(InjectError::Exited { .. })
    ));

    let mut a = Injector::attach(pid, T).unwrap();
    let mut b = Injector::attach_thread(pid, tid, T).unwrap();
    assert_eq!((a.tid(), b.tid()), (pid, tid));
    let base = a.ensure_scratch(None).unwrap();
    assert_eq!(b.ensure_scratch(Some(base)).unwrap(), base);
    assert_eq!(a.debug_state().unwrap().slot, Some(0));
    assert_eq!(b.debug_state().unwrap().slot, Some(1));
    for _ in 0..50 {
        assert_eq!(sys0(&mut a, libc::SYS_gettid), pid as i64);
        assert_eq!(sys0(&mut b, libc::SYS_gettid), tid as i64);
    }
    let da = a.scratch_data(b"aaaa").unwrap();
    let db = b.scratch_data(b"bbbb").unwrap();
    assert_ne!(da, db, "separate data areas");
    assert_eq!(a.read_memory(da, 4).unwrap(), b"aaaa");
    assert!(matches!(
        a.remove_scratch(),
        Err(InjectError::ScratchInUse { .. })
    ));
    b.detach().unwrap();
    a.remove_scratch().unwrap();
    a.detach().unwrap();
    assert!(Injector::find_scratch(pid).unwrap().is_empty());
    let (c, c2) = (sh.counter.load(Relaxed), sh.aux2.load(Relaxed));
    wait_until("both threads to run", T, || {
        sh.counter.load(Relaxed) > c + 1000 && sh.aux2.load(Relaxed) > c2 + 1000
    });
    sh.stop.store(1, Relaxed);
    assert_eq!(child.wait(T), 0);
}

#[test]
fn syscall_batches_run_in_a_process_being_built() {
    check_syscall_batches();
}
