//! Self-checking workload (protocol: `tern_tests::ck`): FPU/AVX registers.
//!
//! A thread holds known patterns in ymm0..ymm7 inside an inline-asm loop
//! that never calls anything and compares every register with its pattern
//! on every iteration (a dump freezes it in the middle of the loop), with a
//! non-default MXCSR (round toward zero, flush-to-zero). Another thread
//! keeps a floating-point running sum with a known value. It fails (does not
//! skip) on a CPU without AVX2.
//!
//! On SIGTERM: no register ever differed, the loop still runs (iterations
//! advance), MXCSR is intact in the loop thread, the sum is right.
//!
//! `--break`: the pattern in memory changes once after `ready`, as a
//! register corrupted by a restore would look to the loop.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_tests::ck::{break_requested, out_path, report};

static TERM: AtomicBool = AtomicBool::new(false);
static ITER: AtomicU64 = AtomicU64::new(0);
static MISMATCH: AtomicU64 = AtomicU64::new(0);
static MXCSR_SEEN: AtomicU32 = AtomicU32::new(0);
static SUM_OK: AtomicU64 = AtomicU64::new(0);
static SUM_BAD: AtomicU64 = AtomicU64::new(0);
const MXCSR: u32 = 0x1f80 | (3 << 13) | (1 << 15); // masks, RZ, FTZ

#[repr(C, align(32))]
struct Pattern([u8; 256]);
static mut PATTERN: Pattern = Pattern([0; 256]);

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

/// Load ymm0..7 from `p`, then `n` times compare each with `p`; returns
/// whether all matched every time.
#[target_feature(enable = "avx2")]
unsafe fn hold(p: *const u8, n: u64) -> bool {
    let ok: u64;
    // SAFETY: p points at 256 readable bytes, 32-byte aligned.
    unsafe {
        core::arch::asm!(
            "vmovdqa ymm0, [{p}]",
            "vmovdqa ymm1, [{p} + 32]",
            "vmovdqa ymm2, [{p} + 64]",
            "vmovdqa ymm3, [{p} + 96]",
            "vmovdqa ymm4, [{p} + 128]",
            "vmovdqa ymm5, [{p} + 160]",
            "vmovdqa ymm6, [{p} + 192]",
            "vmovdqa ymm7, [{p} + 224]",
            "2:",
            "vpcmpeqb ymm8, ymm0, [{p}]",
            "vpcmpeqb ymm9, ymm1, [{p} + 32]",
            "vpand ymm8, ymm8, ymm9",
            "vpcmpeqb ymm9, ymm2, [{p} + 64]",
            "vpand ymm8, ymm8, ymm9",
            "vpcmpeqb ymm9, ymm3, [{p} + 96]",
            "vpand ymm8, ymm8, ymm9",
            "vpcmpeqb ymm9, ymm4, [{p} + 128]",
            "vpand ymm8, ymm8, ymm9",
            "vpcmpeqb ymm9, ymm5, [{p} + 160]",
            "vpand ymm8, ymm8, ymm9",
            "vpcmpeqb ymm9, ymm6, [{p} + 192]",
            "vpand ymm8, ymm8, ymm9",
            "vpcmpeqb ymm9, ymm7, [{p} + 224]",
            "vpand ymm8, ymm8, ymm9",
            "vpmovmskb {t:e}, ymm8",
            "cmp {t:e}, -1",
            "jne 3f",
            "dec {n}",
            "jnz 2b",
            "mov {ok}, 1",
            "jmp 4f",
            "3:",
            "xor {ok}, {ok}",
            "4:",
            p = in(reg) p,
            n = inout(reg) n => _,
            t = out(reg) _,
            ok = out(reg) ok,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _, out("ymm9") _,
            options(nostack),
        );
    }
    ok == 1
}

fn mxcsr() -> u32 {
    let mut v: u32 = 0;
    // SAFETY: stmxcsr stores 4 bytes.
    unsafe { core::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn main() {
    let out = out_path();
    if !is_x86_feature_detected!("avx2") {
        eprintln!("ck_fpu needs a CPU with AVX2");
        std::process::exit(3);
    }
    // SAFETY: a handler that stores an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as usize) };
    // SAFETY: written before any reader starts.
    unsafe {
        let pat = &mut *std::ptr::addr_of_mut!(PATTERN);
        for (i, b) in pat.0.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
    }
    std::thread::spawn(|| {
        let v = MXCSR;
        // SAFETY: ldmxcsr loads 4 bytes of valid MXCSR bits.
        unsafe { core::arch::asm!("ldmxcsr [{}]", in(reg) &v, options(nostack)) };
        let p = std::ptr::addr_of!(PATTERN) as *const u8;
        loop {
            // SAFETY: AVX2 checked above; p is the aligned pattern.
            if !unsafe { hold(p, 200_000) } {
                MISMATCH.fetch_add(1, Ordering::SeqCst);
            }
            ITER.fetch_add(1, Ordering::SeqCst);
            MXCSR_SEEN.store(mxcsr(), Ordering::SeqCst);
        }
    });
    std::thread::spawn(|| {
        loop {
            let mut s = 0.0f64;
            for i in 1..=1000 {
                s += 1.0 / (i as f64 * i as f64);
            }
            if (s - 1.643_934_566_681_559_6).abs() < 1e-12 {
                SUM_OK.fetch_add(1, Ordering::SeqCst);
            } else {
                SUM_BAD.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let t0 = Instant::now();
    while ITER.load(Ordering::SeqCst) < 2 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    report(&out, &format!("ready {}", std::process::id()));
    if break_requested() {
        std::thread::sleep(Duration::from_millis(5));
        // SAFETY: a racy byte write is what the break simulates.
        unsafe { std::ptr::addr_of_mut!(PATTERN.0[100]).write_volatile(0) };
    }
    while !TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut bad = Vec::new();
    let it = ITER.load(Ordering::SeqCst);
    let t0 = Instant::now();
    while ITER.load(Ordering::SeqCst) < it + 2 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    if ITER.load(Ordering::SeqCst) < it + 2 {
        bad.push("the register loop stopped".to_string());
    }
    let m = MISMATCH.load(Ordering::SeqCst);
    if m != 0 {
        bad.push(format!(
            "ymm registers differed from their pattern {m} time(s)"
        ));
    }
    let seen = MXCSR_SEEN.load(Ordering::SeqCst);
    if seen & !0x3f != MXCSR & !0x3f {
        bad.push(format!("MXCSR {seen:#x}, expected {MXCSR:#x}"));
    }
    if SUM_BAD.load(Ordering::SeqCst) != 0 || SUM_OK.load(Ordering::SeqCst) == 0 {
        bad.push(format!(
            "floating-point sum wrong {} time(s), right {}",
            SUM_BAD.load(Ordering::SeqCst),
            SUM_OK.load(Ordering::SeqCst)
        ));
    }
    if bad.is_empty() {
        report(&out, "PASS");
        std::process::exit(0);
    }
    report(&out, &format!("FAIL {}", bad.join("; ")));
    std::process::exit(1);
}
