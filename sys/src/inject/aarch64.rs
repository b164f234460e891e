//! aarch64 specifics of the injector: the registers (`NT_PRSTATUS` plus the
//! syscall number, `NT_ARM_SYSTEM_CALL`), the stub code and the frame it
//! restores from. The state machine is in `tracee.rs`.
//!
//! # How a stub gets the thread back without a tracer
//!
//! AArch64 cannot jump to an arbitrary address without a register to hold
//! it, and every general register belongs to the thread. So the stub does
//! what the kernel does after a signal handler: after the injected `svc`, it
//! points SP at its slot's frame, a `struct rt_sigframe` holding the
//! thread's fixed-up registers, FPSIMD state and signal mask, and calls
//! `rt_sigreturn`, which restores all of them (x0-x30, SP, PC, PSTATE)
//! exactly. The frame's `uc_stack.ss_flags` is invalid on purpose: the
//! kernel then leaves the thread's sigaltstack as it is (it ignores that
//! error). That path only runs if tern dies during an injection; normally
//! the tracer puts the registers back itself at the syscall-exit stop.
//!
//! # Syscall restart
//!
//! Unlike x86, arm64 applies the restart fix-up (PC back to the `svc`, x0 =
//! the first argument again) *before* the signal-path stop, so the registers
//! seen at the stop are already fixed up; only `syscallno` must be cleared
//! so that returning from an injected syscall restarts nothing. One loss:
//! for `-ERESTART_RESTARTBLOCK` (an interrupted `nanosleep`, `poll` with a
//! timeout) the kernel would turn x8 into `restart_syscall` after the stop;
//! a thread that was injected restarts the original syscall with its
//! original arguments instead (a relative sleep starts over).

use libc::{c_uint, user_regs_struct};
use nix::errno::Errno;

use super::layout::*;
use super::tracee::FRAME_MAGIC;
use crate::ptrace::{self, regset};

/// The general registers and the syscall number (`pt_regs->syscallno`;
/// -1 when no syscall is in progress), which decides whether the kernel
/// applies its restart logic when the thread returns to user mode.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Regs {
    pub gp: user_regs_struct,
    pub syscallno: i32,
}

/// The registers as callers of the injector see them (`struct user_pt_regs`).
pub(crate) type UserRegs = user_regs_struct;

/// `svc #0`.
pub(crate) const SYSCALL_INSN: [u8; 4] = 0xd400_0001u32.to_le_bytes();
/// `brk #0`: fills the code page between stubs.
const BRK: [u8; 4] = 0xd420_0000u32.to_le_bytes();
/// `__NR_rt_sigreturn` (include/uapi/asm-generic/unistd.h).
const NR_RT_SIGRETURN: u32 = 139;
/// `NT_ARM_SYSTEM_CALL` (include/uapi/linux/elf.h): the syscall number, an int.
const NT_ARM_SYSTEM_CALL: u32 = 0x404;
/// `PTRACE_GETSIGMASK` (include/uapi/linux/ptrace.h).
const PTRACE_GETSIGMASK: c_uint = 0x420a;
/// `PSR_MODE32_BIT` (arch/arm64/include/uapi/asm/ptrace.h): an AArch32 task.
const PSR_MODE32_BIT: u64 = 0x10;
/// No syscall in progress (`NO_SYSCALL`).
const NO_SYSCALL: i32 = -1;

/// `struct user_fpsimd_state` (arch/arm64/include/uapi/asm/ptrace.h):
/// vregs[32] (u128), fpsr, fpcr, 2 reserved u32.
const FPSIMD_STATE_LEN: usize = 528;

/// Offsets in `struct rt_sigframe` (arch/arm64/kernel/signal.c): a
/// `siginfo` (128 bytes), then `struct ucontext`
/// (arch/arm64/include/uapi/asm/ucontext.h).
mod sigframe {
    /// Not read by `rt_sigreturn`: tern keeps its frame marker here.
    pub const MAGIC: usize = 0;
    pub const OWNER: usize = 8;
    pub const UC: usize = 128;
    /// `uc_stack` (`stack_t`: ss_sp, ss_flags (int + pad), ss_size).
    pub const SS_FLAGS: usize = UC + 16 + 8;
    /// `uc_sigmask`: the kernel's 64-bit sigset.
    pub const SIGMASK: usize = UC + 40;
    /// `uc_mcontext` (`struct sigcontext`, 16-byte aligned after
    /// `__unused[120]`).
    pub const MCONTEXT: usize = UC + 176;
    pub const REGS: usize = MCONTEXT + 8;
    pub const SP: usize = MCONTEXT + 256;
    pub const PC: usize = MCONTEXT + 264;
    pub const PSTATE: usize = MCONTEXT + 272;
    /// `__reserved[4096]`: the records (`struct _aarch64_ctx` headers).
    pub const RESERVED: usize = MCONTEXT + 288;
    /// `struct fpsimd_context`: head, fpsr, fpcr, vregs[32] (at +16).
    pub const FPSIMD_MAGIC: u32 = 0x4650_8001;
    pub const FPSIMD_SIZE: usize = 528;
    /// Everything `rt_sigreturn` reads.
    pub const LEN: usize = RESERVED + 4096;
}

pub(crate) fn zeroed() -> Regs {
    Regs {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        gp: unsafe { std::mem::zeroed() },
        syscallno: NO_SYSCALL,
    }
}

pub(crate) fn getregs(tid: i32) -> Result<Regs, (&'static str, Errno)> {
    let mut r = zeroed();
    let len = std::mem::size_of::<user_regs_struct>();
    // SAFETY: the buffer is a local of exactly `len` bytes, borrowed for
    // the call.
    let got = unsafe {
        regset(
            libc::PTRACE_GETREGSET,
            tid,
            libc::NT_PRSTATUS as u32,
            (&mut r.gp as *mut user_regs_struct).cast(),
            len,
        )
    }
    .map_err(|e| ("PTRACE_GETREGSET NT_PRSTATUS", e))?;
    if got != len {
        // A compat (AArch32) thread has a shorter register set.
        return Err((
            "PTRACE_GETREGSET NT_PRSTATUS (not a 64-bit thread)",
            Errno::EINVAL,
        ));
    }
    // SAFETY: the buffer is a local of exactly `len` bytes, borrowed for
    // the call.
    unsafe {
        regset(
            libc::PTRACE_GETREGSET,
            tid,
            NT_ARM_SYSTEM_CALL,
            (&mut r.syscallno as *mut i32).cast(),
            4,
        )
    }
    .map_err(|e| ("PTRACE_GETREGSET NT_ARM_SYSTEM_CALL", e))?;
    Ok(r)
}

pub(crate) fn setregs(tid: i32, r: &Regs) -> Result<(), (&'static str, Errno)> {
    let mut gp = r.gp;
    // SAFETY: the buffer is a local of exactly `len` bytes, borrowed for
    // the call.
    unsafe {
        regset(
            libc::PTRACE_SETREGSET,
            tid,
            libc::NT_PRSTATUS as u32,
            (&mut gp as *mut user_regs_struct).cast(),
            std::mem::size_of::<user_regs_struct>(),
        )
    }
    .map_err(|e| ("PTRACE_SETREGSET NT_PRSTATUS", e))?;
    let mut nr = r.syscallno;
    // SAFETY: the buffer is a local of exactly `len` bytes, borrowed for
    // the call.
    unsafe {
        regset(
            libc::PTRACE_SETREGSET,
            tid,
            NT_ARM_SYSTEM_CALL,
            (&mut nr as *mut i32).cast(),
            4,
        )
    }
    .map_err(|e| ("PTRACE_SETREGSET NT_ARM_SYSTEM_CALL", e))?;
    Ok(())
}

pub(crate) fn to_user(r: &Regs) -> UserRegs {
    r.gp
}

pub(crate) fn from_user(r: &UserRegs) -> Result<Regs, String> {
    let r = Regs {
        gp: *r,
        syscallno: NO_SYSCALL,
    };
    check_mode(&r)?;
    Ok(r)
}

pub(crate) fn check_mode(r: &Regs) -> Result<(), String> {
    if r.gp.pstate & PSR_MODE32_BIT != 0 {
        return Err(format!(
            "the thread runs in AArch32 (compat) mode (pstate {:#x}); only 64-bit threads can be injected",
            r.gp.pstate
        ));
    }
    Ok(())
}

pub(crate) fn ip(r: &Regs) -> u64 {
    r.gp.pc
}

pub(crate) fn set_ip(r: &mut Regs, ip: u64) {
    r.gp.pc = ip;
}

pub(crate) fn sp(r: &Regs) -> u64 {
    r.gp.sp
}

/// The syscall number at a syscall-enter stop.
pub(crate) fn entry_nr(r: &Regs) -> i64 {
    r.syscallno as i64
}

/// The return value at a syscall-exit stop.
pub(crate) fn ret(r: &Regs) -> i64 {
    r.gp.regs[0] as i64
}

/// At a syscall-enter stop: make the kernel skip the syscall.
pub(crate) fn skip_syscall(r: &mut Regs) {
    r.syscallno = NO_SYSCALL;
}

/// `fixed` with PC at `entry`, x8 = `nr`, x0-x5 = `args`, SP at `sp`.
pub(crate) fn call_regs(fixed: &Regs, entry: u64, sp: u64, nr: i64, args: [u64; 6]) -> Regs {
    let mut r = *fixed;
    r.gp.pc = entry;
    r.gp.regs[8] = nr as u64;
    r.gp.regs[..6].copy_from_slice(&args);
    r.gp.sp = sp;
    r.syscallno = NO_SYSCALL;
    r
}

/// Address of the first `svc #0` in `code` (mapped at the page-aligned `at`).
pub(crate) fn find_syscall_insn(code: &[u8], at: u64) -> Option<u64> {
    code.chunks_exact(4)
        .position(|w| w == SYSCALL_INSN)
        .map(|i| at + 4 * i as u64)
}

/// The kernel's restart fix-up already happened before the stop (see the
/// module docs): only the syscall number goes.
pub(crate) fn fixup(orig: &Regs) -> Regs {
    Regs {
        gp: orig.gp,
        syscallno: NO_SYSCALL,
    }
}

/// Did the thread keep the registers it was given at a syscall-exit stop
/// (`b`) until the next signal-path stop (`a`)? x7 is not compared: at a
/// syscall stop arm64 shows x7 as the entry/exit marker and puts its own
/// saved value back after the stop, whatever the tracer wrote (see
/// `ptrace_report_syscall` in arch/arm64/kernel/ptrace.c). That is why
/// registers are set for good only at a signal-path stop.
pub(crate) fn same_user_state(a: &Regs, b: &Regs) -> bool {
    let x = |r: &Regs| {
        let mut g = r.gp.regs;
        g[7] = 0;
        (g, r.gp.sp, r.gp.pc, r.gp.pstate)
    };
    let same = x(a) == x(b);
    if !same {
        let regs: Vec<usize> = (0..31)
            .filter(|&i| i != 7 && a.gp.regs[i] != b.gp.regs[i])
            .collect();
        tracing::debug!(
            "registers differ: x{regs:?}, x7 {:#x}/{:#x}, sp {:#x}/{:#x}, pc {:#x}/{:#x}, pstate {:#x}/{:#x}",
            a.gp.regs[7],
            b.gp.regs[7],
            a.gp.sp,
            b.gp.sp,
            a.gp.pc,
            b.gp.pc,
            a.gp.pstate,
            b.gp.pstate
        );
    }
    same
}

fn insn(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

/// `adr x<rd>, pc + off` (off within +-1 MiB).
fn adr(rd: u32, off: i64) -> [u8; 4] {
    assert!((-(1 << 20)..(1 << 20)).contains(&off));
    // The low 21 bits of the two's complement offset, on purpose.
    #[allow(clippy::cast_possible_truncation)]
    let imm = (off as u32) & 0x1f_ffff;
    insn(0x1000_0000 | ((imm & 3) << 29) | ((imm >> 2) << 5) | rd)
}

/// The stub of slot `k`, at `STUB_OFF + k * STUB_STRIDE` of the area:
///
/// ```text
///     svc  #0              ; the injected syscall (PC points here)
///     adr  x9, frame_k     ; reached only if nobody restored the
///     mov  sp, x9          ; registers: the tracer died
///     mov  x8, #139        ; rt_sigreturn from the slot's frame: every
///     svc  #0              ; register, PC, PSTATE, FPSIMD, signal mask
///     brk  #0
/// ```
fn stub_code(k: usize) -> Vec<u8> {
    let at = STUB_OFF + k * STUB_STRIDE;
    let frame = FRAMES_OFF + k * FRAME_STRIDE;
    let mut c = Vec::with_capacity(24);
    c.extend_from_slice(&SYSCALL_INSN);
    c.extend_from_slice(&adr(9, frame as i64 - (at + 4) as i64));
    c.extend_from_slice(&insn(0x9100_013f)); // mov sp, x9 (add sp, x9, #0)
    c.extend_from_slice(&insn(0xd280_0008 | (NR_RT_SIGRETURN << 5))); // movz x8, #139
    c.extend_from_slice(&SYSCALL_INSN);
    c.extend_from_slice(&BRK);
    c
}

/// The first page of every scratch area: header, name, stubs (`brk #0`
/// between them). It does not depend on where the area is mapped.
pub(crate) fn code_page() -> Vec<u8> {
    super::tracee::code_page_with(&BRK, stub_code, &batch_code())
}

/// The batch stub's instructions (at `BATCH_OFF`), for a thread that dies
/// with its tracer (see `Injector::syscall_batch`): x19 points at the
/// table, x20 holds the number of entries.
///
/// ```text
/// loop: cbz  x20, done
///       ldp  x8, x0, [x19]       ; number, first argument
///       ldp  x1, x2, [x19, #16]
///       ldp  x3, x4, [x19, #32]
///       ldp  x5, x21, [x19, #48] ; last argument, "may fail"
///       svc  #0
///       str  x0, [x19, #56]      ; the result
///       add  x19, x19, #64
///       sub  x20, x20, #1
///       cbnz x21, loop
///       cmn  x0, #4095           ; carry set: -4095..=-1, an error
///       b.lo loop
/// done: brk  #0                  ; the tracer takes over here
/// ```
const BATCH_INSNS: [u32; 13] = [
    0xb400_0194,
    0xa940_0268,
    0xa941_0a61,
    0xa942_1263,
    0xa943_5665,
    0xd400_0001,
    0xf900_1e60,
    0x9101_0273,
    0xd100_0694,
    0xb5ff_fef5,
    0xb13f_fc1f,
    0x54ff_fea3,
    0xd420_0000,
];

fn batch_code() -> Vec<u8> {
    BATCH_INSNS.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// Where the PC is at the batch stub's final trap (`brk` reports its own
/// address).
pub(crate) const BATCH_TRAP_PC: usize = 4 * (BATCH_INSNS.len() - 1);

/// `fixed` with the PC at the batch stub `entry`, its table at `table`
/// (`count` entries), SP at `sp` and no syscall to restart.
pub(crate) fn batch_regs(fixed: &Regs, entry: u64, sp: u64, table: u64, count: u64) -> Regs {
    let mut r = *fixed;
    r.gp.pc = entry;
    r.gp.regs[19] = table;
    r.gp.regs[20] = count;
    r.gp.sp = sp;
    r.syscallno = NO_SYSCALL;
    r
}

/// The batch stub's table cursor: the entry after the last one that ran.
pub(crate) fn batch_cursor(r: &Regs) -> u64 {
    r.gp.regs[19]
}

fn put_u64(f: &mut [u8], off: usize, v: u64) {
    f[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(f: &mut [u8], off: usize, v: u32) {
    f[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn word(f: &[u8], o: usize) -> u64 {
    f.get(o..o + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The frame of a slot: an `rt_sigframe` holding `fixed`, the thread's
/// FPSIMD registers and blocked-signal mask (read now: injection changes
/// neither), and the owner's tid in the `siginfo` part.
pub(crate) fn frame(fixed: &Regs, tid: i32, owner: u64) -> Result<Vec<u8>, (&'static str, Errno)> {
    const _: () = assert!(sigframe::LEN <= FRAME_STRIDE);
    let mut fp = [0u8; FPSIMD_STATE_LEN];
    // SAFETY: the buffer is a local of exactly `len` bytes, borrowed for
    // the call.
    let got = unsafe {
        regset(
            libc::PTRACE_GETREGSET,
            tid,
            libc::NT_PRFPREG as u32,
            fp.as_mut_ptr(),
            fp.len(),
        )
    }
    .map_err(|e| ("PTRACE_GETREGSET NT_PRFPREG", e))?;
    if got != FPSIMD_STATE_LEN {
        return Err((
            "PTRACE_GETREGSET NT_PRFPREG (unexpected size)",
            Errno::EINVAL,
        ));
    }
    let mut mask = 0u64;
    // SAFETY: addr is the sigset size (8); the kernel writes that many
    // bytes into `mask`, which we own.
    unsafe { ptrace::request(PTRACE_GETSIGMASK, tid, 8, &raw mut mask as u64) }
        .map_err(|e| ("PTRACE_GETSIGMASK", e))?;

    use sigframe::*;
    let mut f = vec![0u8; FRAME_STRIDE];
    put_u64(&mut f, MAGIC, FRAME_MAGIC);
    put_u64(&mut f, OWNER, owner);
    // SS_ONSTACK | SS_DISABLE is no valid mode: sigaltstack stays as it is.
    put_u32(&mut f, SS_FLAGS, 3);
    put_u64(&mut f, SIGMASK, mask);
    for (i, v) in fixed.gp.regs.iter().enumerate() {
        put_u64(&mut f, REGS + 8 * i, *v);
    }
    put_u64(&mut f, SP, fixed.gp.sp);
    put_u64(&mut f, PC, fixed.gp.pc);
    put_u64(&mut f, PSTATE, fixed.gp.pstate);
    put_u32(&mut f, RESERVED, FPSIMD_MAGIC);
    put_u32(
        &mut f,
        RESERVED + 4,
        u32::try_from(FPSIMD_SIZE).unwrap_or(0),
    );
    // fpsr, fpcr come after the 32 vector registers in user_fpsimd_state.
    f[RESERVED + 8..RESERVED + 16].copy_from_slice(&fp[512..520]);
    f[RESERVED + 16..RESERVED + 16 + 512].copy_from_slice(&fp[..512]);
    // The terminating record (magic 0, size 0) is already zero.
    Ok(f)
}

/// (magic, owner tid) of a frame read back.
pub(crate) fn frame_owner(f: &[u8]) -> (u64, u64) {
    (word(f, sigframe::MAGIC), word(f, sigframe::OWNER))
}

/// The registers the stub's `rt_sigreturn` would restore from frame `f`
/// (already fixed up: no restart pending).
pub(crate) fn regs_from_frame(f: &[u8], like: &Regs) -> Regs {
    let mut r = *like;
    for i in 0..31 {
        r.gp.regs[i] = word(f, sigframe::REGS + 8 * i);
    }
    r.gp.sp = word(f, sigframe::SP);
    r.gp.pc = word(f, sigframe::PC);
    r.gp.pstate = word(f, sigframe::PSTATE);
    r.syscallno = NO_SYSCALL;
    r
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::inject::proc;

    #[test]
    fn uapi_layouts() {
        assert_eq!(std::mem::size_of::<user_regs_struct>(), 34 * 8);
        assert_eq!(sigframe::RESERVED % 16, 0);
        assert_eq!(sigframe::MCONTEXT % 16, 0);
        const { assert!(sigframe::LEN <= FRAME_STRIDE) };
        assert_eq!(FRAMES_OFF % 16, 0);
        assert_eq!(FRAME_STRIDE % 16, 0);
    }

    #[test]
    fn stub_encodings() {
        // Checked against GNU as: `adr x9, .+0x1f00` at offset 4 is 0x1000f809.
        assert_eq!(adr(9, 0x1f00), 0x1000_f809u32.to_le_bytes());
        assert_eq!(adr(9, -4), 0x10ff_ffe9u32.to_le_bytes());
        let p = code_page();
        assert!(proc::header_is_ours(&p));
        for k in 0..SLOTS {
            let at = STUB_OFF + k * STUB_STRIDE;
            assert_eq!(&p[at..at + 4], &SYSCALL_INSN);
            assert_eq!(&p[at + 12..at + 16], &0xd280_1168u32.to_le_bytes());
            assert_eq!(&p[at + 16..at + 20], &SYSCALL_INSN);
        }
        assert_eq!(
            find_syscall_insn(&[0, 0, 0, 0xd4, 1, 0, 0, 0xd4, 0, 1, 0, 0], 0x1000),
            Some(0x1004)
        );
        assert_eq!(
            find_syscall_insn(&[0, 1, 0, 0, 0xd4, 0, 0, 0], 0x1000),
            None
        );
    }
}
