//! x86_64 specifics of the injector: the registers (`PTRACE_GETREGS`), the
//! stub code and its register frame, the syscall-restart fix-up. The state
//! machine is in `tracee.rs`.

use libc::user_regs_struct;
use nix::errno::Errno;

use super::layout::*;
use super::tracee::{
    ERESTART_RESTARTBLOCK, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS, FRAME_MAGIC,
};
use crate::ptrace;

/// The registers the state machine keeps per stop.
pub(crate) type Regs = user_regs_struct;
/// The registers as callers of the injector see them.
pub(crate) type UserRegs = user_regs_struct;

/// `syscall`.
pub(crate) const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
const NR_RESTART_SYSCALL: u64 = 219;
/// `__USER_CS`: a 64-bit user code segment. Anything else is a compat task.
const USER64_CS: u64 = 0x33;

pub(crate) fn zeroed() -> Regs {
    // SAFETY: user_regs_struct is plain integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

pub(crate) fn getregs(tid: i32) -> Result<Regs, (&'static str, Errno)> {
    let mut r = zeroed();
    // SAFETY: the kernel writes one user_regs_struct into `r`, which we own.
    unsafe { ptrace::request(libc::PTRACE_GETREGS, tid, 0, &raw mut r as u64) }
        .map_err(|e| ("PTRACE_GETREGS", e))?;
    Ok(r)
}

pub(crate) fn setregs(tid: i32, r: &Regs) -> Result<(), (&'static str, Errno)> {
    // SAFETY: the kernel reads one user_regs_struct from `r`.
    unsafe { ptrace::request(libc::PTRACE_SETREGS, tid, 0, std::ptr::from_ref(r) as u64) }
        .map(|_| ())
        .map_err(|e| ("PTRACE_SETREGS", e))
}

pub(crate) fn to_user(r: &Regs) -> UserRegs {
    *r
}

pub(crate) fn from_user(r: &UserRegs) -> Result<Regs, String> {
    if r.cs != USER64_CS {
        return Err(format!(
            "registers with code segment {:#x} (only 64-bit threads)",
            r.cs
        ));
    }
    Ok(*r)
}

pub(crate) fn check_mode(r: &Regs) -> Result<(), String> {
    if r.cs != USER64_CS {
        return Err(format!(
            "the thread runs in 32-bit (compat) mode (cs {:#x}); only 64-bit threads can be injected",
            r.cs
        ));
    }
    Ok(())
}

pub(crate) fn ip(r: &Regs) -> u64 {
    r.rip
}

pub(crate) fn set_ip(r: &mut Regs, ip: u64) {
    r.rip = ip;
}

pub(crate) fn sp(r: &Regs) -> u64 {
    r.rsp
}

/// The syscall number at a syscall-enter stop.
pub(crate) fn entry_nr(r: &Regs) -> i64 {
    r.orig_rax as i64
}

/// The return value at a syscall-exit stop.
pub(crate) fn ret(r: &Regs) -> i64 {
    r.rax as i64
}

/// At a syscall-enter stop: make the kernel skip the syscall.
pub(crate) fn skip_syscall(r: &mut Regs) {
    r.orig_rax = u64::MAX;
}

/// `fixed` with RIP at `entry`, the syscall number and arguments loaded,
/// RSP at `sp` and no restart pending.
pub(crate) fn call_regs(fixed: &Regs, entry: u64, sp: u64, nr: i64, args: [u64; 6]) -> Regs {
    let mut r = *fixed;
    r.rip = entry;
    r.rax = nr as u64;
    r.orig_rax = u64::MAX;
    r.rdi = args[0];
    r.rsi = args[1];
    r.rdx = args[2];
    r.r10 = args[3];
    r.r8 = args[4];
    r.r9 = args[5];
    r.rsp = sp;
    r
}

/// Address of the first `syscall` in `code` (mapped at `at`).
pub(crate) fn find_syscall_insn(code: &[u8], at: u64) -> Option<u64> {
    code.windows(2)
        .position(|w| w == SYSCALL_INSN)
        .map(|i| at + i as u64)
}

// Offsets of the registers in a frame slot; the stubs load from these.
const F_RAX: usize = 0;
const F_RBX: usize = 8;
const F_RCX: usize = 16;
const F_RDX: usize = 24;
const F_RSI: usize = 32;
const F_RDI: usize = 40;
const F_RBP: usize = 48;
const F_R8: usize = 56;
const F_R9: usize = 64;
const F_R10: usize = 72;
const F_R11: usize = 80;
const F_R12: usize = 88;
const F_R13: usize = 96;
const F_R14: usize = 104;
const F_R15: usize = 112;
const F_RFLAGS: usize = 120;
const F_RSP: usize = 128;
const F_RIP: usize = 136;
const F_OWNER: usize = 144;
const F_MAGIC: usize = 152;

/// (x86 register number, frame offset) of every register the stub loads
/// with `mov reg, [rip+disp32]` (all but RSP, which comes last).
const STUB_REGS: [(u8, usize); 15] = [
    (0, F_RAX),
    (3, F_RBX),
    (1, F_RCX),
    (2, F_RDX),
    (6, F_RSI),
    (7, F_RDI),
    (5, F_RBP),
    (8, F_R8),
    (9, F_R9),
    (10, F_R10),
    (11, F_R11),
    (12, F_R12),
    (13, F_R13),
    (14, F_R14),
    (15, F_R15),
];

/// The stub of slot `k`, at `STUB_OFF + k * STUB_STRIDE` of the area:
///
/// ```text
///     syscall                      ; the injected syscall (RIP points here)
///     push  qword [rip + rflags_k] ; reached only if nobody restored the
///     popfq                        ; registers: the tracer died
///     mov   rax, [rip + rax_k]     ; ... every general register but RSP
///     mov   rsp, [rip + rsp_k]
///     jmp   qword [rip + rip_k]    ; back to the (fixed-up) original RIP
/// ```
///
/// Only `push` touches memory (the thread's own stack, at the injected RSP,
/// 256 bytes below the original one); no instruction after `popfq` changes
/// flags; the FPU is never touched.
fn stub_code(k: usize) -> Vec<u8> {
    let at = STUB_OFF + k * STUB_STRIDE;
    let frame = FRAMES_OFF + k * FRAME_STRIDE;
    let mut c: Vec<u8> = Vec::with_capacity(STUB_STRIDE);
    // disp32 from the end of the instruction being emitted (`len` bytes,
    // the displacement being its last 4) to `frame + off`.
    fn rel(c: &[u8], at: usize, len: usize, target: usize) -> [u8; 4] {
        let next = at + c.len() + len;
        // Both lie in one STUB_STRIDE-sized stub and frame area.
        i32::try_from(target as i64 - next as i64)
            .expect("a stub's displacement fits 32 bits")
            .to_le_bytes()
    }
    c.extend_from_slice(&[0x0f, 0x05]); // syscall
    let d = rel(&c, at, 6, frame + F_RFLAGS);
    c.extend_from_slice(&[0xff, 0x35]); // push qword [rip+disp32]
    c.extend_from_slice(&d);
    c.push(0x9d); // popfq
    for (reg, off) in STUB_REGS {
        let rex = 0x48 | if reg >= 8 { 0x04 } else { 0 };
        let modrm = ((reg & 7) << 3) | 0b101; // mod=00 rm=101: [rip+disp32]
        let d = rel(&c, at, 7, frame + off);
        c.extend_from_slice(&[rex, 0x8b, modrm]); // mov r64, [rip+disp32]
        c.extend_from_slice(&d);
    }
    let d = rel(&c, at, 7, frame + F_RSP);
    c.extend_from_slice(&[0x48, 0x8b, 0x25]); // mov rsp, [rip+disp32]
    c.extend_from_slice(&d);
    let d = rel(&c, at, 6, frame + F_RIP);
    c.extend_from_slice(&[0xff, 0x25]); // jmp qword [rip+disp32]
    c.extend_from_slice(&d);
    assert!(c.len() <= STUB_STRIDE);
    c.resize(STUB_STRIDE, 0xcc); // int3 padding
    c
}

/// The batch stub (at `BATCH_OFF`), for a thread that dies with its
/// tracer (see `Injector::syscall_batch`): RBX points at the table, R12
/// holds the number of entries.
///
/// ```text
/// loop: test r12, r12 ; jz done
///       mov  rax, [rbx]        ; number
///       mov  rdi, [rbx+8] ... mov r9, [rbx+48]
///       mov  r14, [rbx+56]     ; "may fail"
///       syscall
///       mov  [rbx+56], rax     ; the result
///       add  rbx, 64 ; dec r12
///       test r14, r14 ; jnz loop
///       cmp  rax, -4095 ; jb loop   ; not an error: go on
/// done: int3                   ; the tracer takes over here
/// ```
pub(crate) const BATCH_CODE: [u8; 0x3f] = [
    0x4d, 0x85, 0xe4, 0x74, 0x39, 0x48, 0x8b, 0x03, 0x48, 0x8b, 0x7b, 0x08, 0x48, 0x8b, 0x73, 0x10,
    0x48, 0x8b, 0x53, 0x18, 0x4c, 0x8b, 0x53, 0x20, 0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b, 0x30,
    0x4c, 0x8b, 0x73, 0x38, 0x0f, 0x05, 0x48, 0x89, 0x43, 0x38, 0x48, 0x83, 0xc3, 0x40, 0x49, 0xff,
    0xcc, 0x4d, 0x85, 0xf6, 0x75, 0xca, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x72, 0xc2, 0xcc,
];

/// Where the PC is at the batch stub's final trap (`int3` reports the
/// address after it).
pub(crate) const BATCH_TRAP_PC: usize = BATCH_CODE.len();

/// `fixed` with the PC at the batch stub `entry`, its table at `table`
/// (`count` entries), RSP at `sp` and no restart pending.
pub(crate) fn batch_regs(fixed: &Regs, entry: u64, sp: u64, table: u64, count: u64) -> Regs {
    let mut r = *fixed;
    r.rip = entry;
    r.orig_rax = u64::MAX;
    r.rbx = table;
    r.r12 = count;
    r.rsp = sp;
    r
}

/// The batch stub's table cursor: the entry after the last one that ran.
pub(crate) fn batch_cursor(r: &Regs) -> u64 {
    r.rbx
}

/// The first page of every scratch area: header, name, stubs (int3 between
/// them), the batch stub. It does not depend on where the area is mapped.
pub(crate) fn code_page() -> Vec<u8> {
    super::tracee::code_page_with(&[0xcc], stub_code, &BATCH_CODE)
}

/// The register frame of a slot: `fixed` (what the stub restores) and the
/// owner's tid. Needs nothing from the thread on x86_64.
pub(crate) fn frame(fixed: &Regs, _tid: i32, owner: u64) -> Result<Vec<u8>, (&'static str, Errno)> {
    let mut f = vec![0u8; FRAME_STRIDE];
    let x = fixed;
    for (v, off) in [
        (x.rax, F_RAX),
        (x.rbx, F_RBX),
        (x.rcx, F_RCX),
        (x.rdx, F_RDX),
        (x.rsi, F_RSI),
        (x.rdi, F_RDI),
        (x.rbp, F_RBP),
        (x.r8, F_R8),
        (x.r9, F_R9),
        (x.r10, F_R10),
        (x.r11, F_R11),
        (x.r12, F_R12),
        (x.r13, F_R13),
        (x.r14, F_R14),
        (x.r15, F_R15),
        (x.eflags, F_RFLAGS),
        (x.rsp, F_RSP),
        (x.rip, F_RIP),
        (owner, F_OWNER),
        (FRAME_MAGIC, F_MAGIC),
    ] {
        f[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    Ok(f)
}

fn word(f: &[u8], o: usize) -> u64 {
    f.get(o..o + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// (magic, owner tid) of a frame read back.
pub(crate) fn frame_owner(f: &[u8]) -> (u64, u64) {
    (word(f, F_MAGIC), word(f, F_OWNER))
}

/// The registers a stub would restore from frame `f` (the rest from `like`);
/// they are already fixed up: no restart pending.
pub(crate) fn regs_from_frame(f: &[u8], like: &Regs) -> Regs {
    let mut o = *like;
    for (field, off) in [
        (&mut o.rax, F_RAX),
        (&mut o.rbx, F_RBX),
        (&mut o.rcx, F_RCX),
        (&mut o.rdx, F_RDX),
        (&mut o.rsi, F_RSI),
        (&mut o.rdi, F_RDI),
        (&mut o.rbp, F_RBP),
        (&mut o.r8, F_R8),
        (&mut o.r9, F_R9),
        (&mut o.r10, F_R10),
        (&mut o.r11, F_R11),
        (&mut o.r12, F_R12),
        (&mut o.r13, F_R13),
        (&mut o.r14, F_R14),
        (&mut o.r15, F_R15),
        (&mut o.eflags, F_RFLAGS),
        (&mut o.rsp, F_RSP),
        (&mut o.rip, F_RIP),
    ] {
        *field = word(f, off);
    }
    o.orig_rax = u64::MAX;
    o
}

/// `orig` with the kernel's syscall-restart fix-up applied.
pub(crate) fn fixup(orig: &Regs) -> Regs {
    let mut f = *orig;
    if (orig.orig_rax as i64) >= 0 {
        match -(orig.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                f.rax = orig.orig_rax;
                f.rip = orig.rip.wrapping_sub(2);
            }
            ERESTART_RESTARTBLOCK => {
                f.rax = NR_RESTART_SYSCALL;
                f.rip = orig.rip.wrapping_sub(2);
            }
            _ => {}
        }
    }
    f.orig_rax = u64::MAX;
    f
}

pub(crate) fn same_user_state(a: &Regs, b: &Regs) -> bool {
    [
        a.rax, a.rbx, a.rcx, a.rdx, a.rsi, a.rdi, a.rbp, a.rsp, a.r8, a.r9, a.r10, a.r11, a.r12,
        a.r13, a.r14, a.r15, a.rip, a.eflags,
    ] == [
        b.rax, b.rbx, b.rcx, b.rdx, b.rsi, b.rdi, b.rbp, b.rsp, b.r8, b.r9, b.r10, b.r11, b.r12,
        b.r13, b.r14, b.r15, b.rip, b.eflags,
    ]
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::inject::proc;
    use crate::inject::tracee::{
        PtracePeeksiginfoArgs, PtraceRseqConfiguration, PtraceSyscallInfo,
    };

    #[test]
    fn uapi_struct_sizes() {
        assert_eq!(std::mem::size_of::<PtraceSyscallInfo>(), 88);
        assert_eq!(std::mem::size_of::<PtraceRseqConfiguration>(), 24);
        assert_eq!(std::mem::size_of::<PtracePeeksiginfoArgs>(), 16);
        assert_eq!(std::mem::size_of::<Regs>(), 27 * 8);
    }

    #[test]
    fn code_page_layout() {
        let p = code_page();
        assert_eq!(p.len(), crate::usize_of(PAGE));
        assert!(proc::header_is_ours(&p));
        assert_eq!(&p[NAME_OFF..NAME_OFF + NAME.len()], NAME);
        for k in 0..SLOTS {
            let at = STUB_OFF + k * STUB_STRIDE;
            assert_eq!(&p[at..at + 2], &[0x0f, 0x05]);
        }
        const { assert!(FRAMES_OFF + SLOTS * FRAME_STRIDE <= DATA_OFF) };
        const { assert!(STUB_OFF + SLOTS * STUB_STRIDE <= crate::usize_of(PAGE)) };
    }

    #[test]
    fn fixup_rules() {
        // SAFETY: plain integers.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.rip = 0x1002;
        r.orig_rax = 0;
        r.rax = (-ERESTARTSYS) as u64;
        let f = fixup(&r);
        assert_eq!((f.rip, f.rax, f.orig_rax), (0x1000, 0, u64::MAX));
        r.orig_rax = 35;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        let f = fixup(&r);
        assert_eq!((f.rip, f.rax), (0x1000, NR_RESTART_SYSCALL));
        r.rax = (-4i64) as u64; // EINTR: nothing to do
        let f = fixup(&r);
        assert_eq!((f.rip, f.rax as i64), (0x1002, -4));
        r.orig_rax = u64::MAX; // not in a syscall
        r.rax = (-ERESTARTNOHAND) as u64;
        assert_eq!(fixup(&r).rip, 0x1002);
    }
}
