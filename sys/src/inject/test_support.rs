#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
//! What the injector's kernel tests share on both architectures: forked
//! target processes, shared counters, waits with deadlines, /proc probes,
//! and the loop target whose helper thread checks floating point.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Injector;
use super::*;

pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn serial() -> MutexGuard<'static, ()> {
    assert_eq!(
        // SAFETY: takes no arguments and cannot fail.
        unsafe { libc::geteuid() },
        0,
        "the injection tests must run as root"
    );
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) const T: Duration = Duration::from_secs(5);

/// Shared between the test and its children (MAP_SHARED).
#[repr(C)]
pub(crate) struct Shared {
    pub(crate) stop: AtomicU32,
    pub(crate) fail: AtomicU64,
    pub(crate) counter: AtomicU64,
    pub(crate) aux: AtomicU64,
    pub(crate) aux2: AtomicU64,
}

pub(crate) fn shared() -> &'static Shared {
    // SAFETY: a fresh shared anonymous page, zero-filled (valid atomics),
    // never unmapped (leaked for the test's lifetime).
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        &*(p as *const Shared)
    }
}

/// The forked children of the tests: one helper for `regs`, `signals`
/// and the injector.
pub(crate) use crate::regs::testutil::{Child, fork_child};

pub(crate) fn tracer_of(pid: i32) -> i32 {
    proc::status(pid, Some(pid)).unwrap().tracerpid
}

pub(crate) fn state_of(pid: i32) -> String {
    proc::status(pid, None).unwrap().state
}

/// Wait until the thread is blocked in syscall `nr`; returns the pc.
pub(crate) fn wait_in_syscall(pid: i32, nr: i64) -> u64 {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let f: Vec<&str> = s.split_whitespace().collect();
        if f.first() == Some(&nr.to_string().as_str()) {
            return u64::from_str_radix(f.last().unwrap().trim_start_matches("0x"), 16).unwrap();
        }
        assert!(
            Instant::now() < end,
            "process {pid} never blocked in syscall {nr}: {s}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub(crate) fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Does this kernel name anonymous VMAs (CONFIG_ANON_VMA_NAME)? Probed on
/// a mapping of our own.
pub(crate) fn kernel_names_anon_vmas() -> bool {
    // SAFETY: maps, names and unmaps one anonymous page of our own; the name is a NUL-terminated literal.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let r = libc::prctl(0x5356_4d41, 0, p as u64, 4096u64, c"probe".as_ptr() as u64);
        libc::munmap(p, 4096);
        r == 0
    }
}

/// The area's first VMA is named `[anon:tern-scratch]` where the kernel
/// can name VMAs, else unnamed; either way find_scratch finds it.
pub(crate) fn assert_scratch_visible(pid: i32, base: u64) {
    let line = maps_line(pid, base);
    assert!(line.contains(" r-xp "), "{line}");
    assert!(maps_line(pid, base + 4096).contains(" rw-p "));
    if kernel_names_anon_vmas() {
        assert!(line.ends_with("[anon:tern-scratch]"), "{line}");
        assert!(maps_line(pid, base + 4096).ends_with("[anon:tern-scratch]"));
    } else {
        assert!(line.trim_end().ends_with(" 0"), "unnamed: {line}");
    }
    assert!(Injector::find_scratch(pid).unwrap().contains(&base));
}

pub(crate) fn maps_line(pid: i32, addr: u64) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{addr:x}-")))
        .unwrap_or("")
        .to_string()
}

pub(crate) fn sys0(inj: &mut Injector, nr: i64) -> i64 {
    inj.syscall(nr, [0; 6]).unwrap()
}

pub(crate) fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two fds into `fds`, a local array of two.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

pub(crate) fn now_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec into a local.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

pub(crate) fn timespec_bytes(ns: i64) -> Vec<u8> {
    let mut v = (ns / 1_000_000_000).to_le_bytes().to_vec();
    v.extend_from_slice(&(ns % 1_000_000_000).to_le_bytes());
    v
}

pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

// ------------------------------------------------------------------ targets

/// A plain loop: counts until told to stop.
pub(crate) fn spin_target(sh: &'static Shared) -> i32 {
    while sh.stop.load(Relaxed) == 0 {
        sh.counter.fetch_add(1, Relaxed);
        std::hint::spin_loop();
    }
    0
}

pub(crate) static GPR_COUNTER: AtomicU64 = AtomicU64::new(0);
pub(crate) static GPR_STOP: AtomicU8 = AtomicU8::new(0);

pub(crate) fn fp_sum() -> f64 {
    let mut s = 0.0f64;
    for i in 1..20_000u32 {
        let x = std::hint::black_box(i as f64);
        s += 1.0 / (x * x);
    }
    s
}

extern "C" fn loop_helper(arg: *mut c_void) -> *mut c_void {
    // SAFETY: `arg` is the &'static Shared passed by loop_target.
    let sh = unsafe { &*(arg as *const Shared) };
    let expect = fp_sum();
    loop {
        sh.counter.store(GPR_COUNTER.load(Relaxed), Relaxed);
        if fp_sum().to_bits() != expect.to_bits() {
            sh.fail.store(100, Relaxed);
        }
        if sh.stop.load(Relaxed) != 0 {
            GPR_STOP.store(1, Relaxed);
            return std::ptr::null_mut();
        }
        // SAFETY: sleeping takes integers (or a timespec local we own) and touches no memory of ours else.
        unsafe { libc::usleep(300) };
    }
}

/// The leader runs `body` (a register-checking loop); a helper thread
/// publishes its counter, checks floating point sums, relays `stop`.
pub(crate) fn loop_target(sh: &'static Shared, body: fn() -> u64) -> i32 {
    let mut t: libc::pthread_t = 0;
    // SAFETY: the thread gets a pointer to `sh`, which outlives it (it is joined before `sh` is dropped); `t` is a local.
    let r = unsafe {
        libc::pthread_create(
            &mut t,
            std::ptr::null(),
            loop_helper,
            sh as *const Shared as *mut c_void,
        )
    };
    if r != 0 {
        return 50;
    }
    let code = body();
    sh.fail.fetch_max(code, Relaxed);
    GPR_STOP.store(1, Relaxed);
    sh.stop.store(1, Relaxed);
    // SAFETY: joins a thread this code created and has not joined or detached; no result is read (null).
    unsafe { libc::pthread_join(t, std::ptr::null_mut()) };
    i32::try_from(sh.fail.load(Relaxed)).unwrap()
}

pub(crate) fn start_loop_target(body: fn() -> u64) -> (Child, &'static Shared) {
    let sh = shared();
    let child = fork_child(move || loop_target(sh, body));
    wait_until("the target loop to run", T, || {
        sh.counter.load(Relaxed) > 1000
    });
    (child, sh)
}

pub(crate) fn stop_target(mut child: Child, sh: &Shared) {
    sh.stop.store(1, Relaxed);
    let code = child.wait(T);
    assert_eq!(
        code, 0,
        "target exited with {code} (1/2: general register/flag corrupted, 3/4: ymm/MXCSR corrupted, 100: FP sum changed)"
    );
}

pub(crate) fn hammer(pid: i32, cycles: usize, per_cycle: usize) {
    for _ in 0..cycles {
        let mut inj = Injector::attach(pid, T).unwrap();
        let known = Injector::find_scratch(pid).unwrap().first().copied();
        let base = inj.ensure_scratch(known).unwrap();
        if let Some(k) = known {
            assert_eq!(base, k, "reused");
        }
        for _ in 0..per_cycle {
            assert_eq!(sys0(&mut inj, libc::SYS_getpid), pid as i64);
        }
        inj.detach().unwrap();
    }
}

pub(crate) fn cleanup_scratch(pid: i32) {
    let mut inj = Injector::attach(pid, T).unwrap();
    if let Some(&k) = Injector::find_scratch(pid).unwrap().first() {
        inj.ensure_scratch(Some(k)).unwrap();
        inj.remove_leftover_scratch().unwrap();
        inj.remove_scratch().unwrap();
    }
    inj.detach().unwrap();
    assert!(Injector::find_scratch(pid).unwrap().is_empty());
}

pub(crate) fn injector_loop(pid: i32, seed: u64, sleep_ms: u64, sh: &Shared) -> i32 {
    let mut rng = Rng(seed | 1);
    loop {
        let Ok(mut inj) = Injector::attach(pid, T) else {
            return 5;
        };
        let Some(known) = Injector::find_scratch(pid)
            .ok()
            .and_then(|v| v.first().copied())
        else {
            return 6;
        };
        match inj.ensure_scratch(Some(known)) {
            Ok(b) if b == known => {}
            _ => return 7,
        }
        sh.aux2.store(1, SeqCst);
        for _ in 0..rng.next() % 20 {
            if rng.next().is_multiple_of(8) {
                let ns = sleep_ms as i64 * 1_000_000 + (rng.next() % 1_000_000) as i64;
                let Ok(ts) = inj.scratch_data(&timespec_bytes(ns)) else {
                    return 8;
                };
                sh.aux.store(1, SeqCst);
                if !matches!(inj.syscall(libc::SYS_nanosleep, [ts, 0, 0, 0, 0, 0]), Ok(0)) {
                    return 9;
                }
            } else {
                sh.aux.store(1, SeqCst);
                if inj.syscall(libc::SYS_getpid, [0; 6]).ok() != Some(pid as i64) {
                    return 10;
                }
            }
            sh.aux.store(0, SeqCst);
        }
        if inj.detach().is_err() {
            return 11;
        }
    }
}

pub(crate) fn setup_scratch(pid: i32) -> u64 {
    let mut inj = Injector::attach(pid, T).unwrap();
    let base = inj.ensure_scratch(None).unwrap();
    inj.detach().unwrap();
    base
}

pub(crate) fn check_target_after_kill(
    target: &mut Child,
    sh: &Shared,
    killed: &mut Child,
    what: &str,
) {
    let code = killed.wait(T);
    assert_eq!(
        code,
        128 + libc::SIGKILL,
        "{what}: the injector exited by itself with {code}"
    );
    wait_until("TracerPid 0", T, || tracer_of(target.pid) == 0);
    assert!(target.alive(), "{what}: the target died");
    assert_eq!(
        sh.fail.load(Relaxed),
        0,
        "{what}: the target saw corrupted registers"
    );
}

pub(crate) fn injector_loop_one_sleep(pid: i32, ms: i64) -> i32 {
    let Ok(mut inj) = Injector::attach(pid, T) else {
        return 5;
    };
    let Some(known) = Injector::find_scratch(pid)
        .ok()
        .and_then(|v| v.first().copied())
    else {
        return 6;
    };
    if inj.ensure_scratch(Some(known)).is_err() {
        return 7;
    }
    inj.set_timeout(Duration::from_secs(10)).unwrap();
    let ts = inj.scratch_data(&timespec_bytes(ms * 1_000_000)).unwrap();
    let _ = inj.syscall(libc::SYS_nanosleep, [ts, 0, 0, 0, 0, 0]);
    12
}

/// Batches of syscalls in a process being built (owned, traced from this
/// thread): results in order, the first failure ends a batch unless it may
/// fail, data the calls point at is in place, a batch longer than one
/// table runs whole, and a signal that comes during a blocking call of a
/// batch neither breaks the batch nor is lost (the target, which ignores
/// it, goes on in its read).
pub(crate) fn check_syscall_batches() {
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
    let mut inj = Injector::attach_owned_thread_here(pid, pid, Duration::from_secs(5)).unwrap();
    inj.ensure_scratch(None).unwrap();
    let call = |nr: i64| Syscall::new(nr, [0; 6]);
    let bad_close = Syscall::new(libc::SYS_close, [u64::MAX, 0, 0, 0, 0, 0]);
    let me = i64::from(std::process::id() as i32);
    // The first failure ends the batch.
    let r = inj
        .syscall_batch(
            vec![call(libc::SYS_getpid), bad_close, call(libc::SYS_getppid)],
            Vec::new(),
        )
        .unwrap();
    assert_eq!(r, vec![pid as i64, -i64::from(libc::EBADF)]);
    // Unless it may fail.
    let r = inj
        .syscall_batch(
            vec![bad_close.may_fail(), call(libc::SYS_getppid)],
            Vec::new(),
        )
        .unwrap();
    assert_eq!(r, vec![-i64::from(libc::EBADF), me]);
    // Data: a path the call opens.
    let at = inj.batch_data_addr().unwrap();
    let r = inj
        .syscall_batch(
            vec![Syscall::new(
                libc::SYS_openat,
                [
                    libc::AT_FDCWD as u64,
                    at,
                    (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                    0,
                    0,
                    0,
                ],
            )],
            b"/proc/version\0".to_vec(),
        )
        .unwrap();
    assert!(r[0] >= 0, "openat from batch data: {}", r[0]);
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{}", r[0])).unwrap();
    assert_eq!(link, std::path::Path::new("/proc/version"));
    inj.syscall(libc::SYS_close, [r[0] as u64, 0, 0, 0, 0, 0])
        .unwrap();
    // Data beyond the slot's area is refused, not written into the next.
    let r = inj.syscall_batch(vec![call(libc::SYS_getpid)], vec![0u8; 9000]);
    assert!(matches!(r, Err(InjectError::ScratchFull { .. })), "{r:?}");
    // Longer than one table: every call runs.
    let r = inj
        .syscall_batch(vec![call(libc::SYS_gettid); 300], Vec::new())
        .unwrap();
    assert_eq!(r, vec![pid as i64; 300]);
    // A signal (SIGWINCH, ignored by default) sent 50 ms into a 200 ms
    // nanosleep of a batch: the sleep is restarted, not cut short.
    let ts = timespec_bytes(200_000_000);
    let at = inj.batch_data_addr().unwrap();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: tgkill(2) with plain integers.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGWINCH) };
    });
    let t = Instant::now();
    let r = inj
        .syscall_batch(
            vec![
                Syscall::new(libc::SYS_nanosleep, [at, 0, 0, 0, 0, 0]),
                call(libc::SYS_getpid),
            ],
            ts,
        )
        .unwrap();
    sender.join().unwrap();
    assert_eq!(r, vec![0, pid as i64], "nanosleep, getpid");
    assert!(
        t.elapsed() >= Duration::from_millis(195),
        "the sleep was cut short: {:?}",
        t.elapsed()
    );
    inj.remove_scratch().unwrap();
    inj.detach().unwrap();
    wait_in_syscall(pid, libc::SYS_read);
    // SAFETY: writes 2 bytes from a static buffer into our pipe.
    let n = unsafe { libc::write(wfd, b"ok".as_ptr() as *const c_void, 2) };
    assert_eq!(n, 2);
    assert_eq!(
        child.wait(Duration::from_secs(5)),
        0,
        "the target went on in its read"
    );
    // SAFETY: closes fds this code opened and no longer uses.
    unsafe {
        libc::close(rfd);
        libc::close(wfd);
    }
}
