//! `ck_fpu --out FILE [--break]`: FPU, SSE and AVX register state (protocol:
//! `tern_tests::ck`).
//!
//! A restored thread must get its whole extended state back (xsave: x87,
//! SSE, the upper halves of the ymm registers, MXCSR, the x87 control and
//! status words), each thread its own, even when it was frozen in the middle
//! of code that keeps values in registers only.
//!
//! Thread `loop`: blocks every signal, then enters an inline-asm loop that
//! never calls anything and never returns. It loads distinct 256-bit
//! patterns into ymm0..ymm15 (so xmm0..15 too), seven 80-bit values with
//! full 64-bit mantissas onto the x87 stack, a non-default x87 control word
//! (0x0A7F: round up, 53-bit precision) and a non-default MXCSR (0xDFC0:
//! round up, FTZ, DAZ). Every iteration it counts itself in memory and
//! compares, without scratch registers: each ymm with its pattern (xor,
//! vptest, xor back), each x87 stack slot with its value (fld + fcomip),
//! the control word, MXCSR (flag bits ignored) and the x87 stack top. On a
//! difference it records the first one (which register, at which
//! iteration), counts it, and loads everything again.
//!
//! Thread `fp`: keeps default MXCSR and control word and sums 1/i² for
//! i = 1..100000 over and over (the sum's terms live in registers while it
//! runs); every result must have the bits of the first one, and MXCSR and
//! the control word must stay the defaults there.
//!
//! On SIGTERM (main): the loop's iteration count advances after the signal
//! (it still runs), no difference was ever recorded (else FAIL naming the
//! register: ymmN, st(N), the control word, MXCSR or the stack top, with
//! the values the loop saw for the words), `fp` made progress after the
//! signal and never got a different sum or control state, and main's own
//! MXCSR and control word are the defaults. Without AVX it says FAIL at
//! once (it does not skip).
//!
//! `--break`: right after `ready`, the loop is told (a flag in memory) to
//! zero ymm3 once, as a restore that lost it would.
//!
//! Being frozen does not matter: the progress waits count only time during
//! which the process ran.

use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_tests::ck::{out_path, report};

const LOOP_CW: u16 = 0x0A7F;
const LOOP_MXCSR: u32 = 0xDFC0;
const DEFAULT_CW: u16 = 0x037F;
const DEFAULT_MXCSR: u32 = 0x1F80;
/// x87 status word TOP field after seven pushes onto an empty stack.
const LOOP_TOP: u32 = 1 << 11;

/// What the loop compares its registers with (read by the asm through
/// `rdi`; offsets passed as constants).
#[repr(C, align(64))]
struct Expect {
    ymm: [[u8; 32]; 16],
    x87: [[u8; 10]; 7],
    cw: u16,
    mxcsr: u32,
    top: u32,
}

/// What the loop writes (through `rsi`) and main reads.
#[repr(C, align(64))]
struct LoopState {
    iter: AtomicU64,
    /// 1 + the code of the first difference (0: none).
    fail_code: AtomicU64,
    fail_count: AtomicU64,
    fail_iter: AtomicU64,
    /// Set by main for `--break`; the loop clears it.
    brk: AtomicU64,
    seen_cw: AtomicU32,
    seen_mxcsr: AtomicU32,
    seen_sw: AtomicU32,
    /// The seen_* words at the first difference.
    bad_cw: AtomicU32,
    bad_mxcsr: AtomicU32,
    bad_sw: AtomicU32,
}

static STATE: LoopState = LoopState {
    iter: AtomicU64::new(0),
    fail_code: AtomicU64::new(0),
    fail_count: AtomicU64::new(0),
    fail_iter: AtomicU64::new(0),
    brk: AtomicU64::new(0),
    seen_cw: AtomicU32::new(0),
    seen_mxcsr: AtomicU32::new(0),
    seen_sw: AtomicU32::new(0),
    bad_cw: AtomicU32::new(0),
    bad_mxcsr: AtomicU32::new(0),
    bad_sw: AtomicU32::new(0),
};

static TERM: AtomicBool = AtomicBool::new(false);
static FP_ROUNDS: AtomicU64 = AtomicU64::new(0);
static FP_BAD: AtomicU64 = AtomicU64::new(0);
static FP_FIRST_BAD: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

fn expect() -> Expect {
    let mut ymm = [[0u8; 32]; 16];
    for (r, reg) in ymm.iter_mut().enumerate() {
        for (i, b) in reg.iter_mut().enumerate() {
            // Distinct per register and per byte, never all zero.
            *b = r.to_le_bytes()[0].wrapping_mul(29) ^ i.to_le_bytes()[0].wrapping_mul(71) ^ 0xA3;
        }
    }
    let mut x87 = [[0u8; 10]; 7];
    for (k, v) in x87.iter_mut().enumerate() {
        // Normal extended-precision values whose low mantissa bits no
        // double could hold.
        let mantissa = (1u64 << 63) | 0x5DEE_CE66_D1CE_4E5B_u64.wrapping_mul(k as u64 + 3) >> 1;
        let exponent =
            (0x3FFF + u16::try_from(k).unwrap() * 3 - 9) | if k % 2 == 1 { 0x8000 } else { 0 };
        v[..8].copy_from_slice(&mantissa.to_le_bytes());
        v[8..].copy_from_slice(&exponent.to_le_bytes());
    }
    Expect {
        ymm,
        x87,
        cw: LOOP_CW,
        mxcsr: LOOP_MXCSR,
        top: LOOP_TOP,
    }
}

/// The check of ymmN: xor with the pattern (zero if equal), test, xor back.
macro_rules! ymm_check {
    ($n:literal) => {
        concat!(
            "vxorps ymm",
            $n,
            ", ymm",
            $n,
            ", ymmword ptr [rdi + 32*",
            $n,
            "]\n",
            "vptest ymm",
            $n,
            ", ymm",
            $n,
            "\n",
            "vxorps ymm",
            $n,
            ", ymm",
            $n,
            ", ymmword ptr [rdi + 32*",
            $n,
            "]\n",
            "mov eax, ",
            $n,
            "\n",
            "jnz 8f\n"
        )
    };
}

/// The check of st(I): push the value it must hold (constant 6-I), compare
/// with st(I+1) and pop.
macro_rules! x87_check {
    ($i:literal, $k:literal, $j:literal) => {
        concat!(
            "fld tbyte ptr [rdi + {x87} + 10*",
            $k,
            "]\n",
            "fcomip st, st(",
            $j,
            ")\n",
            "mov eax, 16+",
            $i,
            "\n",
            "jp 8f\n",
            "jne 8f\n"
        )
    };
}

/// The register loop; never returns.
///
/// # Safety
/// `e` and `s` must be valid for the life of the process; AVX must be
/// available.
#[target_feature(enable = "avx")]
unsafe fn register_loop(e: *const Expect, s: *const LoopState) -> ! {
    // SAFETY: the asm reads `e` and writes the atomics of `s` (plain
    // aligned stores, which x86 makes atomic), touches no stack, calls
    // nothing, and never returns, so the registers it owns (all vector and
    // x87 registers, rax, rcx) need not be given back.
    unsafe {
        core::arch::asm!(
            "2:",
            "vmovaps ymm0, ymmword ptr [rdi + 32*0]",
            "vmovaps ymm1, ymmword ptr [rdi + 32*1]",
            "vmovaps ymm2, ymmword ptr [rdi + 32*2]",
            "vmovaps ymm3, ymmword ptr [rdi + 32*3]",
            "vmovaps ymm4, ymmword ptr [rdi + 32*4]",
            "vmovaps ymm5, ymmword ptr [rdi + 32*5]",
            "vmovaps ymm6, ymmword ptr [rdi + 32*6]",
            "vmovaps ymm7, ymmword ptr [rdi + 32*7]",
            "vmovaps ymm8, ymmword ptr [rdi + 32*8]",
            "vmovaps ymm9, ymmword ptr [rdi + 32*9]",
            "vmovaps ymm10, ymmword ptr [rdi + 32*10]",
            "vmovaps ymm11, ymmword ptr [rdi + 32*11]",
            "vmovaps ymm12, ymmword ptr [rdi + 32*12]",
            "vmovaps ymm13, ymmword ptr [rdi + 32*13]",
            "vmovaps ymm14, ymmword ptr [rdi + 32*14]",
            "vmovaps ymm15, ymmword ptr [rdi + 32*15]",
            "fninit",
            "fldcw word ptr [rdi + {cw}]",
            "ldmxcsr dword ptr [rdi + {mxcsr}]",
            "fld tbyte ptr [rdi + {x87} + 10*0]",
            "fld tbyte ptr [rdi + {x87} + 10*1]",
            "fld tbyte ptr [rdi + {x87} + 10*2]",
            "fld tbyte ptr [rdi + {x87} + 10*3]",
            "fld tbyte ptr [rdi + {x87} + 10*4]",
            "fld tbyte ptr [rdi + {x87} + 10*5]",
            "fld tbyte ptr [rdi + {x87} + 10*6]",
            "3:",
            "inc qword ptr [rsi + {iter}]",
            "cmp qword ptr [rsi + {brk}], 0",
            "je 4f",
            "mov qword ptr [rsi + {brk}], 0",
            "vxorps ymm3, ymm3, ymm3",
            "4:",
            ymm_check!(0),
            ymm_check!(1),
            ymm_check!(2),
            ymm_check!(3),
            ymm_check!(4),
            ymm_check!(5),
            ymm_check!(6),
            ymm_check!(7),
            ymm_check!(8),
            ymm_check!(9),
            ymm_check!(10),
            ymm_check!(11),
            ymm_check!(12),
            ymm_check!(13),
            ymm_check!(14),
            ymm_check!(15),
            // st(i) holds constant 6-i; after the push it is st(i+1).
            x87_check!(0, 6, 1),
            x87_check!(1, 5, 2),
            x87_check!(2, 4, 3),
            x87_check!(3, 3, 4),
            x87_check!(4, 2, 5),
            x87_check!(5, 1, 6),
            x87_check!(6, 0, 7),
            "fnstcw word ptr [rsi + {seen_cw}]",
            "movzx ecx, word ptr [rsi + {seen_cw}]",
            "cmp cx, word ptr [rdi + {cw}]",
            "mov eax, 30",
            "jne 8f",
            "stmxcsr dword ptr [rsi + {seen_mxcsr}]",
            "mov ecx, dword ptr [rsi + {seen_mxcsr}]",
            "and ecx, 0xFFFFFFC0",
            "cmp ecx, dword ptr [rdi + {mxcsr}]",
            "mov eax, 31",
            "jne 8f",
            "fnstsw ax",
            "movzx eax, ax",
            "mov dword ptr [rsi + {seen_sw}], eax",
            "and eax, 0x3800",
            "cmp eax, dword ptr [rdi + {top}]",
            "mov eax, 32",
            "jne 8f",
            "jmp 3b",
            // A difference, code in eax: record the first, count, reload.
            "8:",
            "cmp qword ptr [rsi + {fail_code}], 0",
            "jne 9f",
            "lea rcx, [rax + 1]",
            "mov qword ptr [rsi + {fail_code}], rcx",
            "mov rcx, qword ptr [rsi + {iter}]",
            "mov qword ptr [rsi + {fail_iter}], rcx",
            "mov ecx, dword ptr [rsi + {seen_cw}]",
            "mov dword ptr [rsi + {bad_cw}], ecx",
            "mov ecx, dword ptr [rsi + {seen_mxcsr}]",
            "mov dword ptr [rsi + {bad_mxcsr}], ecx",
            "mov ecx, dword ptr [rsi + {seen_sw}]",
            "mov dword ptr [rsi + {bad_sw}], ecx",
            "9:",
            "inc qword ptr [rsi + {fail_count}]",
            "jmp 2b",
            in("rdi") e,
            in("rsi") s,
            in("rax") 0u64,
            in("rcx") 0u64,
            x87 = const offset_of!(Expect, x87),
            cw = const offset_of!(Expect, cw),
            mxcsr = const offset_of!(Expect, mxcsr),
            top = const offset_of!(Expect, top),
            iter = const offset_of!(LoopState, iter),
            brk = const offset_of!(LoopState, brk),
            fail_code = const offset_of!(LoopState, fail_code),
            fail_count = const offset_of!(LoopState, fail_count),
            fail_iter = const offset_of!(LoopState, fail_iter),
            seen_cw = const offset_of!(LoopState, seen_cw),
            seen_mxcsr = const offset_of!(LoopState, seen_mxcsr),
            seen_sw = const offset_of!(LoopState, seen_sw),
            bad_cw = const offset_of!(LoopState, bad_cw),
            bad_mxcsr = const offset_of!(LoopState, bad_mxcsr),
            bad_sw = const offset_of!(LoopState, bad_sw),
            options(noreturn, nostack),
        )
    }
}

/// What a failure code of the loop names.
fn code_name(code: u64) -> String {
    match code {
        0..=15 => format!("ymm{code}"),
        16..=22 => format!("st({})", code - 16),
        30 => format!(
            "the x87 control word (found {:#06x}, expected {LOOP_CW:#06x})",
            STATE.bad_cw.load(Ordering::SeqCst)
        ),
        31 => format!(
            "MXCSR (found {:#x}, expected {LOOP_MXCSR:#x} apart from the flag bits)",
            STATE.bad_mxcsr.load(Ordering::SeqCst)
        ),
        32 => format!(
            "the x87 stack top (status word {:#06x}, expected TOP=1)",
            STATE.bad_sw.load(Ordering::SeqCst)
        ),
        c => format!("unknown check {c}"),
    }
}

fn mxcsr() -> u32 {
    let mut v: u32 = 0;
    // SAFETY: stmxcsr stores 4 bytes into a local.
    unsafe { core::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn x87_cw() -> u16 {
    let mut v: u16 = 0;
    // SAFETY: fnstcw stores 2 bytes into a local.
    unsafe { core::arch::asm!("fnstcw [{}]", in(reg) &mut v, options(nostack)) };
    v
}

fn sum() -> f64 {
    let mut s = 0.0f64;
    for i in 1..=100_000u32 {
        let x = std::hint::black_box(i as f64);
        s += 1.0 / (x * x);
    }
    s
}

fn fp_bad(what: String) {
    if FP_BAD.fetch_add(1, Ordering::SeqCst) == 0 {
        *FP_FIRST_BAD.lock().unwrap_or_else(|e| e.into_inner()) = what;
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

pub(crate) fn main() {
    let out = out_path();
    if !is_x86_feature_detected!("avx") {
        report(
            &out,
            "FAIL the CPU (or the kernel's XCR0) lacks AVX: ymm state cannot be checked",
        );
        std::process::exit(1);
    }
    // SAFETY: the handler only stores an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as usize) };
    let e: &'static Expect = Box::leak(Box::new(expect()));

    std::thread::Builder::new()
        .name("loop".into())
        .spawn(move || {
            // SAFETY: blocking every signal in this thread only.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
            }
            // SAFETY: AVX checked above; both live for the process.
            unsafe { register_loop(e, &STATE) }
        })
        .unwrap_or_else(|err| {
            eprintln!("ck_fpu: cannot start the loop thread: {err}");
            std::process::exit(3);
        });
    std::thread::Builder::new()
        .name("fp".into())
        .spawn(|| {
            let first = sum();
            let near = std::f64::consts::PI * std::f64::consts::PI / 6.0 - 1e-5;
            if (first - near).abs() > 1e-9 {
                fp_bad(format!("fp: first sum {first}, expected about {near}"));
            }
            loop {
                let s = sum();
                if s.to_bits() != first.to_bits() {
                    fp_bad(format!(
                        "fp: sum {s:e} ({:#x}), expected {first:e} ({:#x})",
                        s.to_bits(),
                        first.to_bits()
                    ));
                }
                let (m, cw) = (mxcsr(), x87_cw());
                if m & !0x3F != DEFAULT_MXCSR || cw != DEFAULT_CW {
                    fp_bad(format!(
                        "fp: MXCSR {m:#x} and control word {cw:#06x}, expected {DEFAULT_MXCSR:#x} and {DEFAULT_CW:#06x} (the loop thread's?)"
                    ));
                }
                FP_ROUNDS.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .unwrap_or_else(|err| {
            eprintln!("ck_fpu: cannot start the fp thread: {err}");
            std::process::exit(3);
        });
    if !wait_running(Duration::from_secs(10), || {
        STATE.iter.load(Ordering::SeqCst) > 1000 && FP_ROUNDS.load(Ordering::SeqCst) > 0
    }) {
        eprintln!("ck_fpu: the threads did not start");
        std::process::exit(3);
    }

    report(&out, &format!("ready {}", std::process::id()));
    if tern_tests::ck::break_requested() {
        STATE.brk.store(1, Ordering::SeqCst);
    }
    while !TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(2));
    }

    let mut bad = Vec::new();
    let (it, fp) = (
        STATE.iter.load(Ordering::SeqCst),
        FP_ROUNDS.load(Ordering::SeqCst),
    );
    if !wait_running(Duration::from_secs(5), || {
        STATE.iter.load(Ordering::SeqCst) >= it + 1000
    }) {
        bad.push(format!(
            "the register loop stopped: {} iterations, {it} at the signal",
            STATE.iter.load(Ordering::SeqCst)
        ));
    }
    if !wait_running(Duration::from_secs(5), || {
        FP_ROUNDS.load(Ordering::SeqCst) >= fp + 2
    }) {
        bad.push(format!(
            "the fp thread stopped: {} rounds, {fp} at the signal",
            FP_ROUNDS.load(Ordering::SeqCst)
        ));
    }
    if STATE.brk.load(Ordering::SeqCst) != 0 {
        bad.push("the loop never took the --break request".into());
    }
    let code = STATE.fail_code.load(Ordering::SeqCst);
    if code != 0 {
        bad.push(format!(
            "in the loop thread {} differed from what the loop put there (first at iteration {}; {} difference(s) in {} iterations)",
            code_name(code - 1),
            STATE.fail_iter.load(Ordering::SeqCst),
            STATE.fail_count.load(Ordering::SeqCst),
            STATE.iter.load(Ordering::SeqCst)
        ));
    }
    let n = FP_BAD.load(Ordering::SeqCst);
    if n != 0 {
        bad.push(format!(
            "{} ({n} bad round(s))",
            FP_FIRST_BAD.lock().unwrap_or_else(|e| e.into_inner())
        ));
    }
    let (m, cw) = (mxcsr(), x87_cw());
    if m & !0x3F != DEFAULT_MXCSR || cw != DEFAULT_CW {
        bad.push(format!(
            "main: MXCSR {m:#x} and control word {cw:#06x}, expected {DEFAULT_MXCSR:#x} and {DEFAULT_CW:#06x}"
        ));
    }
    if bad.is_empty() {
        report(&out, "PASS");
        std::process::exit(0);
    }
    report(&out, &format!("FAIL {}", bad.join("; ")));
    std::process::exit(1);
}
