//! Signal state of a thread: the blocked mask (`PTRACE_GETSIGMASK` /
//! `PTRACE_SETSIGMASK`), the pending signals of its private and of its
//! process's shared queue with their full siginfo (`PTRACE_PEEKSIGINFO`), a
//! `/proc` cross-check, and the byte layouts of the kernel's `struct
//! sigaction` and `stack_t`.
//!
//! Dispositions and the alternate signal stack have no ptrace interface:
//! tern reads and sets them with injected `rt_sigaction` / `sigaltstack`
//! calls, so what matters for [`KernelSigaction`] and [`StackT`] is their
//! exact byte layout (the injector writes [`KernelSigaction::to_bytes`]
//! into the target's memory). [`SigAction`] and [`AltStack`] are their
//! image forms.
//!
//! The ptrace functions must be called from the thread that ptrace-attached
//! `tid`, while `tid` is in a ptrace stop (the kernel answers `ESRCH`
//! otherwise). Signal masks are 64-bit: bit `signo - 1` stands for signal
//! `signo` (the kernel's `sigset_t` on x86_64 and aarch64).

use libc::c_uint;
use nix::errno::Errno;

/// Size of `siginfo_t` (`SI_MAX_SIZE`, include/uapi/asm-generic/siginfo.h).
pub const SIGINFO_SIZE: usize = 128;
/// Size of the kernel's `sigset_t` on x86_64 and aarch64 (`_NSIG / 8`).
pub const SIGSET_SIZE: usize = 8;
/// `PTRACE_PEEKSIGINFO_SHARED` (include/uapi/linux/ptrace.h): read the
/// process-wide queue instead of the thread's own.
pub const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
const PTRACE_GETSIGMASK: c_uint = 0x420a;
const PTRACE_SETSIGMASK: c_uint = 0x420b;
const PTRACE_PEEKSIGINFO: c_uint = 0x4209;

// sa_flags, include/uapi/asm-generic/signal-defs.h (SA_RESTORER:
// arch/x86/include/uapi/asm/signal.h and arch/arm64/include/uapi/asm/signal.h,
// same value on both).
pub const SA_NOCLDSTOP: u64 = 0x0000_0001;
pub const SA_NOCLDWAIT: u64 = 0x0000_0002;
pub const SA_SIGINFO: u64 = 0x0000_0004;
pub const SA_UNSUPPORTED: u64 = 0x0000_0400;
pub const SA_EXPOSE_TAGBITS: u64 = 0x0000_0800;
pub const SA_RESTORER: u64 = 0x0400_0000;
pub const SA_ONSTACK: u64 = 0x0800_0000;
pub const SA_RESTART: u64 = 0x1000_0000;
pub const SA_NODEFER: u64 = 0x4000_0000;
pub const SA_RESETHAND: u64 = 0x8000_0000;
/// `SIG_DFL` / `SIG_IGN` handler values.
pub const SIG_DFL: u64 = 0;
pub const SIG_IGN: u64 = 1;

// ss_flags, include/uapi/linux/signal.h.
pub const SS_ONSTACK: i32 = 1;
pub const SS_DISABLE: i32 = 2;
pub const SS_AUTODISARM: i32 = 1 << 31;

// si_code values, include/uapi/asm-generic/siginfo.h.
pub const SI_USER: i32 = 0;
pub const SI_QUEUE: i32 = -1;
pub const SI_TKILL: i32 = -6;

/// The mask bit of signal `signo` (1..=64); 0 for anything else.
pub fn sigmask_bit(signo: i32) -> u64 {
    if (1..=64).contains(&signo) {
        1u64 << (signo - 1)
    } else {
        0
    }
}

/// The signal numbers in `mask`, ascending.
pub fn signals_in(mask: u64) -> Vec<i32> {
    (1..=64).filter(|&s| mask & sigmask_bit(s) != 0).collect()
}

/// Everything that can go wrong. Variants name the thread (and process,
/// for /proc) and say what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    #[error("{op} on thread {tid}: {errno}; {}", errno_hint(*.errno))]
    Ptrace {
        tid: i32,
        op: &'static str,
        errno: Errno,
    },
    #[error(
        "thread {tid}: PTRACE_PEEKSIGINFO returned {n} entries for a batch of {batch}; this kernel behaves unexpectedly (report it with the kernel version)"
    )]
    PeekCount { tid: i32, n: i64, batch: usize },
    #[error(
        "thread {tid}: more than {max} pending signals in its {queue:?} queue (signals keep arriving while it is stopped?); stop the senders and retry"
    )]
    TooMany { tid: i32, queue: Queue, max: usize },
    #[error(
        "reading /proc/{pid}/task/{tid}/status (process {pid}, thread {tid}): {source}; check that the thread exists"
    )]
    Proc {
        pid: i32,
        tid: i32,
        source: crate::proc::ProcError,
    },
    #[error(
        "{what}: {len} bytes, expected {expected}; the image or target memory holding it is corrupt"
    )]
    Bytes {
        what: &'static str,
        len: usize,
        expected: usize,
    },
}

fn errno_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ESRCH => {
            "the thread does not exist, is not traced by this tracer thread, or is not in a ptrace stop: PTRACE_SEIZE and PTRACE_INTERRUPT it from this same thread and wait for the stop first"
        }
        Errno::EINVAL => "the kernel rejected the request (too old a kernel?)",
        Errno::EPERM => "not permitted: run tern as root or with CAP_SYS_PTRACE",
        _ => "unexpected error from the kernel",
    }
}

/// The blocked-signal mask of the stopped thread `tid`.
pub fn blocked_mask(tid: i32) -> Result<u64, SignalsError> {
    let mut mask = 0u64;
    // SAFETY: addr is the sigset size (8); the kernel writes that many
    // bytes into `mask`, which we own.
    unsafe {
        crate::ptrace::request(
            PTRACE_GETSIGMASK,
            tid,
            SIGSET_SIZE as u64,
            &raw mut mask as u64,
        )
    }
    .map_err(|errno| SignalsError::Ptrace {
        tid,
        op: "PTRACE_GETSIGMASK",
        errno,
    })?;
    Ok(mask)
}

/// Set the blocked-signal mask of the stopped thread `tid`. The kernel
/// silently drops SIGKILL and SIGSTOP from it.
pub fn set_blocked_mask(tid: i32, mask: u64) -> Result<(), SignalsError> {
    // SAFETY: addr is the sigset size (8); the kernel reads that many
    // bytes from `mask`, a local.
    unsafe {
        crate::ptrace::request(
            PTRACE_SETSIGMASK,
            tid,
            SIGSET_SIZE as u64,
            &raw const mask as u64,
        )
    }
    .map_err(|errno| SignalsError::Ptrace {
        tid,
        op: "PTRACE_SETSIGMASK",
        errno,
    })?;
    Ok(())
}

/// `struct ptrace_peeksiginfo_args` (include/uapi/linux/ptrace.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PtracePeeksiginfoArgs {
    /// Index of the first entry to copy.
    pub off: u64,
    /// 0 or [`PTRACE_PEEKSIGINFO_SHARED`].
    pub flags: u32,
    /// How many entries to copy at most.
    pub nr: i32,
}

/// The start of `siginfo_t` (include/uapi/asm-generic/siginfo.h, 64-bit,
/// not MIPS) with the `_rt` / `_kill` members of the union, which is what
/// queued signals carry: `si_pid`, `si_uid`, and `si_value` (also the
/// `_timer` member's `si_value` offset). The rest of the 128 bytes are
/// kept as-is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiginfoRt {
    pub si_signo: i32,
    pub si_errno: i32,
    pub si_code: i32,
    /// The union is 8-byte aligned (it holds pointers).
    pub pad: i32,
    pub si_pid: i32,
    pub si_uid: u32,
    /// `sigval_t`: `sival_int` / `sival_ptr`.
    pub si_value: u64,
    pub rest: [u64; 12],
}

impl SiginfoRt {
    pub fn to_bytes(&self) -> [u8; SIGINFO_SIZE] {
        let mut b = [0u8; SIGINFO_SIZE];
        b[0..4].copy_from_slice(&self.si_signo.to_le_bytes());
        b[4..8].copy_from_slice(&self.si_errno.to_le_bytes());
        b[8..12].copy_from_slice(&self.si_code.to_le_bytes());
        b[12..16].copy_from_slice(&self.pad.to_le_bytes());
        b[16..20].copy_from_slice(&self.si_pid.to_le_bytes());
        b[20..24].copy_from_slice(&self.si_uid.to_le_bytes());
        b[24..32].copy_from_slice(&self.si_value.to_le_bytes());
        for (i, w) in self.rest.iter().enumerate() {
            b[32 + 8 * i..40 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<SiginfoRt, SignalsError> {
        let b: &[u8; SIGINFO_SIZE] = b.try_into().map_err(|_| SignalsError::Bytes {
            what: "siginfo_t",
            len: b.len(),
            expected: SIGINFO_SIZE,
        })?;
        let i32_at = |o: usize| i32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let mut rest = [0u64; 12];
        for (i, w) in rest.iter_mut().enumerate() {
            *w = u64_at(32 + 8 * i);
        }
        Ok(SiginfoRt {
            si_signo: i32_at(0),
            si_errno: i32_at(4),
            si_code: i32_at(8),
            pad: i32_at(12),
            si_pid: i32_at(16),
            si_uid: i32_at(20) as u32,
            si_value: u64_at(24),
            rest,
        })
    }
}

/// Which pending queue [`pending`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// The thread's own queue (`tgkill`, `rt_tgsigqueueinfo`, faults).
    Thread,
    /// The process's shared queue (`kill`, `sigqueue`).
    Process,
}

/// One queued signal, as `PTRACE_PEEKSIGINFO` reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingSignal {
    pub signo: i32,
    /// `si_code` (e.g. [`SI_QUEUE`], [`SI_TKILL`], [`SI_USER`]).
    pub code: i32,
    /// The 128-byte `siginfo_t` as the kernel gave it.
    pub siginfo: Vec<u8>,
}

impl PendingSignal {
    fn rt(&self) -> Option<SiginfoRt> {
        SiginfoRt::from_bytes(&self.siginfo).ok()
    }

    /// `si_value` (meaningful for `SI_QUEUE`, timers and message queues).
    pub fn value(&self) -> Option<u64> {
        self.rt().map(|r| r.si_value)
    }

    /// `si_pid` of the sender (meaningful for `si_code <= 0`).
    pub fn sender_pid(&self) -> Option<i32> {
        self.rt().map(|r| r.si_pid)
    }

    /// `si_uid` of the sender (meaningful for `si_code <= 0`).
    pub fn sender_uid(&self) -> Option<u32> {
        self.rt().map(|r| r.si_uid)
    }
}

/// Entries per `PTRACE_PEEKSIGINFO` call.
const PEEK_BATCH: usize = 32;
/// Upper bound on entries read from one queue (RLIMIT_SIGPENDING is far
/// lower in practice); guards against a queue that keeps growing.
const PEEK_MAX: usize = 1 << 20;

/// The signals pending in `tid`'s own queue or in its process's shared
/// queue, in queue order (the order they will be delivered in, within one
/// signal number), read in batches until the kernel returns none.
pub fn pending(tid: i32, queue: Queue) -> Result<Vec<PendingSignal>, SignalsError> {
    pending_batched(tid, queue, PEEK_BATCH)
}

fn pending_batched(
    tid: i32,
    queue: Queue,
    batch: usize,
) -> Result<Vec<PendingSignal>, SignalsError> {
    let flags = match queue {
        Queue::Thread => 0,
        Queue::Process => PTRACE_PEEKSIGINFO_SHARED,
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; batch * SIGINFO_SIZE];
    loop {
        let mut args = PtracePeeksiginfoArgs {
            off: out.len() as u64,
            flags,
            nr: i32::try_from(batch).unwrap_or(i32::MAX),
        };
        // SAFETY: the kernel reads `args` and writes at most `nr`
        // siginfos (batch * 128 bytes = buf, which we own).
        let n = unsafe {
            crate::ptrace::request(
                PTRACE_PEEKSIGINFO,
                tid,
                &raw mut args as u64,
                buf.as_mut_ptr() as u64,
            )
        }
        .map_err(|errno| SignalsError::Ptrace {
            tid,
            op: "PTRACE_PEEKSIGINFO",
            errno,
        })?;
        if n == 0 {
            return Ok(out);
        }
        let Some(n) = usize::try_from(n).ok().filter(|&n| n <= batch) else {
            return Err(SignalsError::PeekCount { tid, n, batch });
        };
        for si in buf[..n * SIGINFO_SIZE].chunks_exact(SIGINFO_SIZE) {
            let head = SiginfoRt::from_bytes(si)?;
            out.push(PendingSignal {
                signo: head.si_signo,
                code: head.si_code,
                siginfo: si.to_vec(),
            });
        }
        if out.len() > PEEK_MAX {
            return Err(SignalsError::TooMany {
                tid,
                queue,
                max: PEEK_MAX,
            });
        }
    }
}

/// `(SigPnd, ShdPnd, SigBlk)` of thread `tid` of process `pid` from
/// `/proc/PID/task/TID/status`: the signals pending for the thread, for the
/// process, and the blocked mask. Needs no ptrace; a cross-check for the
/// ptrace view.
pub fn pending_from_status(pid: i32, tid: i32) -> Result<(u64, u64, u64), SignalsError> {
    let st = crate::proc::status(pid, Some(tid)).map_err(|source| SignalsError::Proc {
        pid,
        tid,
        source,
    })?;
    Ok((st.sigpnd, st.shdpnd, st.sigblk))
}

/// The kernel's `struct sigaction` as `rt_sigaction(2)` takes it with
/// `sigsetsize` 8 (include/linux/signal_types.h; the uapi spelling is in
/// include/uapi/asm-generic/signal.h and arch/x86/include/uapi/asm/signal.h).
/// Same layout on x86_64 and aarch64: arm64's uapi defines `SA_RESTORER`
/// ("required for AArch32 compatibility"), which gives its `struct
/// sigaction` the `sa_restorer` member (`__ARCH_HAS_SA_RESTORER`), and
/// `sa_mask` comes last on both. Not glibc's `struct sigaction` (128-byte
/// mask, other order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelSigaction {
    /// `sa_handler` / `sa_sigaction`, or [`SIG_DFL`] / [`SIG_IGN`].
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

impl KernelSigaction {
    pub const SIZE: usize = 32;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        for (i, w) in [self.handler, self.flags, self.restorer, self.mask]
            .iter()
            .enumerate()
        {
            b[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<KernelSigaction, SignalsError> {
        let w = words::<4>(b, "struct sigaction (kernel)")?;
        Ok(KernelSigaction {
            handler: w[0],
            flags: w[1],
            restorer: w[2],
            mask: w[3],
        })
    }
}

/// `N` little-endian u64 from exactly `N * 8` bytes.
fn words<const N: usize>(b: &[u8], what: &'static str) -> Result<[u64; N], SignalsError> {
    if b.len() != N * 8 {
        return Err(SignalsError::Bytes {
            what,
            len: b.len(),
            expected: N * 8,
        });
    }
    let mut out = [0u64; N];
    for (o, c) in out.iter_mut().zip(b.chunks_exact(8)) {
        *o = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
    Ok(out)
}

/// A signal's disposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigAction {
    pub signo: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

impl SigAction {
    pub fn from_kernel(signo: i32, k: &KernelSigaction) -> SigAction {
        SigAction {
            signo,
            handler: k.handler,
            flags: k.flags,
            restorer: k.restorer,
            mask: k.mask,
        }
    }

    pub fn to_kernel(&self) -> KernelSigaction {
        KernelSigaction {
            handler: self.handler,
            flags: self.flags,
            restorer: self.restorer,
            mask: self.mask,
        }
    }

    /// Neither the default action nor ignored.
    pub fn has_handler(&self) -> bool {
        self.handler != SIG_DFL && self.handler != SIG_IGN
    }
}

/// `stack_t` (include/uapi/asm-generic/signal.h, x86's in
/// arch/x86/include/uapi/asm/signal.h): `void *ss_sp; int ss_flags;
/// size_t ss_size;` with the padding written out.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StackT {
    pub ss_sp: u64,
    pub ss_flags: i32,
    pub pad: i32,
    pub ss_size: u64,
}

impl StackT {
    pub const SIZE: usize = 24;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.ss_sp.to_le_bytes());
        b[8..12].copy_from_slice(&self.ss_flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.pad.to_le_bytes());
        b[16..24].copy_from_slice(&self.ss_size.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<StackT, SignalsError> {
        let w = words::<3>(b, "stack_t")?;
        Ok(StackT {
            ss_sp: w[0],
            // The low and high halves of the second word, on purpose.
            #[allow(clippy::cast_possible_truncation)]
            ss_flags: w[1] as u32 as i32,
            pad: (w[1] >> 32) as u32 as i32,
            ss_size: w[2],
        })
    }
}

/// A thread's alternate signal stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    /// `SS_*` flags as `sigaltstack` reports them ([`SS_DISABLE`] when none
    /// is set up, [`SS_ONSTACK`] while running on it, [`SS_AUTODISARM`]).
    pub flags: i32,
    pub size: u64,
}

impl From<StackT> for AltStack {
    fn from(s: StackT) -> Self {
        AltStack {
            sp: s.ss_sp,
            flags: s.ss_flags,
            size: s.ss_size,
        }
    }
}

impl From<AltStack> for StackT {
    fn from(a: AltStack) -> Self {
        StackT {
            ss_sp: a.sp,
            ss_flags: a.flags,
            pad: 0,
            ss_size: a.size,
        }
    }
}

#[cfg(test)]
mod layout_tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn siginfo_is_128_bytes_with_the_rt_members_where_the_kernel_puts_them() {
        assert_eq!(size_of::<libc::siginfo_t>(), SIGINFO_SIZE);
        assert_eq!(size_of::<SiginfoRt>(), SIGINFO_SIZE);
        assert_eq!(
            offset_of!(SiginfoRt, si_signo),
            offset_of!(libc::siginfo_t, si_signo)
        );
        assert_eq!(
            offset_of!(SiginfoRt, si_errno),
            offset_of!(libc::siginfo_t, si_errno)
        );
        assert_eq!(
            offset_of!(SiginfoRt, si_code),
            offset_of!(libc::siginfo_t, si_code)
        );
        assert_eq!(offset_of!(SiginfoRt, si_pid), 16);
        assert_eq!(offset_of!(SiginfoRt, si_uid), 20);
        assert_eq!(offset_of!(SiginfoRt, si_value), 24);
        // libc's accessors read the same bytes.
        let si = SiginfoRt {
            si_signo: 40,
            si_errno: 0,
            si_code: SI_QUEUE,
            pad: 0,
            si_pid: 1234,
            si_uid: 567,
            si_value: 0xfeed_beef_0000_0001,
            rest: [0; 12],
        };
        let b = si.to_bytes();
        assert_eq!(SiginfoRt::from_bytes(&b).unwrap(), si);
        // SAFETY: siginfo_t is plain data, 128 bytes, all bit patterns valid.
        let l: libc::siginfo_t = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
        // SAFETY: the _rt union members are what these accessors read.
        unsafe {
            assert_eq!(
                (l.si_signo, l.si_code, l.si_pid(), l.si_uid()),
                (40, -1, 1234, 567)
            );
            assert_eq!(l.si_value().sival_ptr as u64, 0xfeed_beef_0000_0001);
        }
        assert!(SiginfoRt::from_bytes(&b[..127]).is_err());
    }

    #[test]
    fn kernel_sigaction_layout() {
        assert_eq!(size_of::<KernelSigaction>(), KernelSigaction::SIZE);
        assert_eq!(offset_of!(KernelSigaction, handler), 0);
        assert_eq!(offset_of!(KernelSigaction, flags), 8);
        assert_eq!(offset_of!(KernelSigaction, restorer), 16);
        assert_eq!(offset_of!(KernelSigaction, mask), 24);
        let k = KernelSigaction {
            handler: 0x40_1000,
            flags: SA_SIGINFO,
            restorer: 3,
            mask: 1 << 63,
        };
        let b = k.to_bytes();
        assert_eq!(&b[24..32], &(1u64 << 63).to_le_bytes());
        assert_eq!(KernelSigaction::from_bytes(&b).unwrap(), k);
        let e = KernelSigaction::from_bytes(&b[..31]).unwrap_err();
        assert!(e.to_string().contains("31 bytes, expected 32"), "{e}");
        let a = SigAction::from_kernel(10, &k);
        assert_eq!(a.to_kernel(), k);
        assert!(a.has_handler());
    }

    #[test]
    fn stack_t_layout() {
        assert_eq!(size_of::<StackT>(), StackT::SIZE);
        assert_eq!(size_of::<libc::stack_t>(), StackT::SIZE);
        assert_eq!(offset_of!(StackT, ss_sp), offset_of!(libc::stack_t, ss_sp));
        assert_eq!(
            offset_of!(StackT, ss_flags),
            offset_of!(libc::stack_t, ss_flags)
        );
        assert_eq!(offset_of!(StackT, pad), 12);
        assert_eq!(
            offset_of!(StackT, ss_size),
            offset_of!(libc::stack_t, ss_size)
        );
        let s = StackT {
            ss_sp: 0x7000_0000,
            ss_flags: SS_AUTODISARM | SS_ONSTACK,
            pad: 0,
            ss_size: 65536,
        };
        assert_eq!(StackT::from_bytes(&s.to_bytes()).unwrap(), s);
        assert_eq!(StackT::from(AltStack::from(s)), s);
        assert!(StackT::from_bytes(&[0; 16]).is_err());
    }

    #[test]
    fn peeksiginfo_args_layout() {
        assert_eq!(size_of::<PtracePeeksiginfoArgs>(), 16);
        assert_eq!(offset_of!(PtracePeeksiginfoArgs, off), 0);
        assert_eq!(offset_of!(PtracePeeksiginfoArgs, flags), 8);
        assert_eq!(offset_of!(PtracePeeksiginfoArgs, nr), 12);
    }

    #[test]
    fn mask_bits() {
        assert_eq!(sigmask_bit(1), 1);
        assert_eq!(sigmask_bit(64), 1 << 63);
        assert_eq!((sigmask_bit(0), sigmask_bit(65)), (0, 0));
        assert_eq!(signals_in(sigmask_bit(9) | sigmask_bit(34)), vec![9, 34]);
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;
    use std::time::Duration;

    use super::*;
    use crate::regs::testutil::*;

    fn raw_setmask(mask: u64) -> bool {
        // SAFETY: rt_sigprocmask reads 8 bytes from a live u64.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &mask as *const u64,
                std::ptr::null_mut::<u64>(),
                SIGSET_SIZE,
            ) == 0
        }
    }

    fn raw_getmask() -> Option<u64> {
        let mut m = 0u64;
        // SAFETY: rt_sigprocmask writes 8 bytes into a live u64.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_BLOCK,
                std::ptr::null::<u64>(),
                &mut m as *mut u64,
                SIGSET_SIZE,
            )
        };
        (r == 0).then_some(m)
    }

    /// A child that blocks `mask`, says 'R' and then waits for signals
    /// that never come (they are blocked).
    fn blocking_child(mask: u64) -> (Child, std::os::fd::OwnedFd) {
        let (rd, wr) = pipe();
        let wfd = std::os::fd::AsRawFd::as_raw_fd(&wr);
        let child = fork_child(move || {
            if !raw_setmask(mask) || !child_write(wfd, b"R") {
                return 10;
            }
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            }
        });
        drop(wr);
        read_timeout(&rd, 1, T, "the child's ready byte");
        (child, rd)
    }

    fn sigqueue(pid: i32, sig: i32, value: u64) {
        let v = libc::sigval {
            sival_ptr: crate::usize_of(value) as *mut c_void,
        };
        // SAFETY: plain syscall wrapper.
        let r = unsafe { libc::sigqueue(pid, sig, v) };
        assert_eq!(
            r,
            0,
            "sigqueue({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// rt_tgsigqueueinfo: a thread-directed signal with SI_QUEUE and a value.
    fn tgsigqueue(pid: i32, tid: i32, sig: i32, value: u64) {
        let si = SiginfoRt {
            si_signo: sig,
            si_errno: 0,
            si_code: SI_QUEUE,
            pad: 0,
            si_pid: std::process::id() as i32,
            // SAFETY: getuid has no preconditions.
            si_uid: unsafe { libc::getuid() },
            si_value: value,
            rest: [0; 12],
        };
        let b = si.to_bytes();
        // SAFETY: the kernel reads 128 bytes of siginfo from `b`.
        let r = unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, b.as_ptr()) };
        assert_eq!(
            r,
            0,
            "rt_tgsigqueueinfo: {}",
            std::io::Error::last_os_error()
        );
    }

    fn summary(v: &[PendingSignal]) -> Vec<(i32, i32, u64)> {
        v.iter()
            .map(|p| (p.signo, p.code, p.value().unwrap()))
            .collect()
    }

    #[test]
    fn pending_signals_come_out_per_queue_in_order_with_their_values() {
        let _g = serial();
        let rt = libc::SIGRTMIN();
        let (r1, r2, r3) = (rt + 1, rt + 2, rt + 3);
        let usr1 = libc::SIGUSR1;
        let blocked = sigmask_bit(usr1) | sigmask_bit(r1) | sigmask_bit(r2) | sigmask_bit(r3);
        let (child, _rd) = blocking_child(blocked);
        let pid = child.pid;
        let me = std::process::id() as i32;

        // Process-directed (shared queue). The second SIGUSR1 is merged
        // into the first: non-RT signals are queued once.
        let mut shared = vec![];
        for (sig, v) in [
            (r1, 101),
            (usr1, 1),
            (r2, 201),
            (r1, 102),
            (r3, 301),
            (r1, 103),
        ] {
            sigqueue(pid, sig, v);
            shared.push((sig, SI_QUEUE, v));
        }
        sigqueue(pid, usr1, 2);
        // Enough instances to need several PEEKSIGINFO batches.
        for i in 0..70 {
            sigqueue(pid, r3, 3000 + i);
            shared.push((r3, SI_QUEUE, 3000 + i));
        }
        // Thread-directed (the thread's own queue).
        let mut private = vec![];
        for (sig, v) in [(r2, 1201), (r1, 1101), (r2, 1202)] {
            tgsigqueue(pid, pid, sig, v);
            private.push((sig, SI_QUEUE, v));
        }
        // SAFETY: plain syscall.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, usr1) };
        assert_eq!(r, 0);

        let t = Traced::seize(pid);
        let p = pending(pid, Queue::Process).expect("shared queue");
        assert_eq!(summary(&p), shared);
        assert!(p.iter().all(|s| s.siginfo.len() == SIGINFO_SIZE));
        assert!(p.iter().all(|s| s.sender_pid() == Some(me)), "si_pid");
        // Small batches give the same list.
        let p3 = pending_batched(pid, Queue::Process, 3).unwrap();
        assert_eq!(p3, p);

        let q = pending(pid, Queue::Thread).expect("thread queue");
        let (last, rest) = q.split_last().expect("the thread queue is empty");
        assert_eq!(summary(rest), private);
        assert_eq!(
            (last.signo, last.code, last.sender_pid()),
            (usr1, SI_TKILL, Some(me))
        );

        let (sigpnd, shdpnd, sigblk) = pending_from_status(pid, pid).unwrap();
        assert_eq!(shdpnd, blocked);
        assert_eq!(
            sigpnd,
            sigmask_bit(r1) | sigmask_bit(r2) | sigmask_bit(usr1)
        );
        assert_eq!(sigblk, blocked);
        assert_eq!(blocked_mask(pid).unwrap(), blocked);
        t.detach();
    }

    #[test]
    fn blocked_mask_set_through_ptrace_is_what_the_child_sees() {
        let _g = serial();
        let rt = libc::SIGRTMIN();
        let before = sigmask_bit(libc::SIGUSR2) | sigmask_bit(rt + 5);
        let after = sigmask_bit(libc::SIGUSR1) | sigmask_bit(libc::SIGTERM) | sigmask_bit(rt + 7);
        let (go_rd, go_wr) = pipe();
        let (res_rd, res_wr) = pipe();
        let (gofd, resfd) = (
            std::os::fd::AsRawFd::as_raw_fd(&go_rd),
            std::os::fd::AsRawFd::as_raw_fd(&res_wr),
        );
        let mut child = fork_child(move || {
            if !raw_setmask(before) || !child_write(resfd, b"R") {
                return 10;
            }
            let mut b = [0u8; 1];
            if !child_read(gofd, &mut b) {
                return 11;
            }
            match raw_getmask() {
                Some(m) if child_write(resfd, &m.to_le_bytes()) => 0,
                _ => 12,
            }
        });
        drop(res_wr);
        drop(go_rd);
        read_timeout(&res_rd, 1, T, "the child's ready byte");

        let t = Traced::seize(child.pid);
        assert_eq!(blocked_mask(child.pid).unwrap(), before);
        // SIGKILL and SIGSTOP cannot be blocked: the kernel drops them.
        let unblockable = sigmask_bit(libc::SIGKILL) | sigmask_bit(libc::SIGSTOP);
        set_blocked_mask(child.pid, after | unblockable).unwrap();
        assert_eq!(blocked_mask(child.pid).unwrap(), after);
        assert_eq!(pending_from_status(child.pid, child.pid).unwrap().2, after);
        t.detach();
        assert!(child_write(std::os::fd::AsRawFd::as_raw_fd(&go_wr), b"G"));
        let seen = read_timeout(&res_rd, 8, T, "the mask the child saw");
        assert_eq!(u64::from_le_bytes(seen.try_into().unwrap()), after);
        assert_eq!(child.wait(T), 0);
    }

    extern "C" fn handler(_: i32, _: *mut libc::siginfo_t, _: *mut c_void) {}
    extern "C" fn restorer() {}

    /// rt_sigaction and sigaltstack take our byte layouts and report them
    /// back, and glibc reads the same values. In a child, so the test
    /// process keeps its dispositions.
    #[test]
    fn sigaction_and_stack_t_bytes_are_what_the_kernel_takes() {
        let _g = serial();
        let rt2 = libc::SIGRTMIN() + 2;
        type Handler = extern "C" fn(i32, *mut libc::siginfo_t, *mut c_void);
        let handler_addr = handler as Handler as usize;
        let restorer_addr = restorer as extern "C" fn() as usize;
        let mut child = fork_child(move || {
            let sig = libc::SIGUSR2;
            let flags =
                SA_SIGINFO | SA_ONSTACK | SA_RESTART | SA_NODEFER | SA_RESETHAND | SA_RESTORER;
            let act = KernelSigaction {
                handler: handler_addr as u64,
                flags,
                restorer: restorer_addr as u64,
                mask: sigmask_bit(libc::SIGUSR1) | sigmask_bit(rt2),
            };
            let b = act.to_bytes();
            let mut old = [0u8; KernelSigaction::SIZE];
            // SAFETY: the kernel reads/writes 32 bytes at these buffers.
            unsafe {
                if libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    b.as_ptr(),
                    std::ptr::null::<u8>(),
                    8,
                ) != 0
                {
                    return 1;
                }
                if libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    std::ptr::null::<u8>(),
                    old.as_mut_ptr(),
                    8,
                ) != 0
                {
                    return 2;
                }
            }
            if KernelSigaction::from_bytes(&old).ok() != Some(act) {
                return 3;
            }
            // SAFETY: plain data, all-zero valid; glibc fills it.
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: a null new value changes nothing; the kernel writes the current one into a local.
            if unsafe { libc::sigaction(sig, std::ptr::null(), &mut sa) } != 0 {
                return 4;
            }
            if sa.sa_sigaction != handler_addr {
                return 5;
            }
            let public = SA_SIGINFO | SA_ONSTACK | SA_RESTART | SA_NODEFER | SA_RESETHAND;
            if sa.sa_flags as u32 as u64 & public != public {
                return 6;
            }
            // SAFETY: sigismember reads the glibc sigset.
            let member = |s| unsafe { libc::sigismember(&sa.sa_mask, s) };
            if member(libc::SIGUSR1) != 1 || member(rt2) != 1 || member(libc::SIGTERM) != 0 {
                return 7;
            }

            // SAFETY: a fresh private mapping for the alternate stack.
            let stack = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    65536,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if stack == libc::MAP_FAILED {
                return 8;
            }
            let ss = StackT {
                ss_sp: stack as u64,
                ss_flags: SS_AUTODISARM,
                pad: 0,
                ss_size: 65536,
            };
            let b = ss.to_bytes();
            let mut old = [0u8; StackT::SIZE];
            // SAFETY: the kernel reads/writes 24 bytes at these buffers.
            unsafe {
                if libc::syscall(libc::SYS_sigaltstack, b.as_ptr(), std::ptr::null::<u8>()) != 0 {
                    return 9;
                }
                if libc::syscall(
                    libc::SYS_sigaltstack,
                    std::ptr::null::<u8>(),
                    old.as_mut_ptr(),
                ) != 0
                {
                    return 10;
                }
            }
            if StackT::from_bytes(&old).ok() != Some(ss) {
                return 11;
            }
            // SAFETY: plain data; glibc fills it.
            let mut l: libc::stack_t = unsafe { std::mem::zeroed() };
            // SAFETY: a null new value changes nothing; the kernel writes the current one into a local.
            if unsafe { libc::sigaltstack(std::ptr::null(), &mut l) } != 0 {
                return 12;
            }
            if l.ss_sp as u64 != ss.ss_sp
                || l.ss_size as u64 != ss.ss_size
                || l.ss_flags != SS_AUTODISARM
            {
                return 13;
            }
            let off = StackT {
                ss_flags: SS_DISABLE,
                ..StackT::default()
            };
            // SAFETY: as above.
            unsafe {
                if libc::syscall(
                    libc::SYS_sigaltstack,
                    off.to_bytes().as_ptr(),
                    std::ptr::null::<u8>(),
                ) != 0
                {
                    return 14;
                }
                if libc::syscall(
                    libc::SYS_sigaltstack,
                    std::ptr::null::<u8>(),
                    old.as_mut_ptr(),
                ) != 0
                {
                    return 15;
                }
            }
            match StackT::from_bytes(&old) {
                Ok(s) if s.ss_flags == SS_DISABLE => 0,
                _ => 16,
            }
        });
        let code = child.wait(T);
        assert_eq!(
            code, 0,
            "1-3: rt_sigaction did not round-trip KernelSigaction, 4-7: glibc read other values, 8-16: sigaltstack / StackT mismatch"
        );
    }

    #[test]
    fn errors_name_the_thread_and_the_file() {
        let _g = serial();
        let (mut child, _rd) = blocking_child(0);
        let e = blocked_mask(child.pid).unwrap_err();
        assert!(
            matches!(e, SignalsError::Ptrace { errno: Errno::ESRCH, tid, .. } if tid == child.pid)
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("thread {}", child.pid)) && msg.contains("PTRACE_SEIZE"),
            "{msg}"
        );
        let e = pending(child.pid, Queue::Thread).unwrap_err();
        assert!(e.to_string().contains(&child.pid.to_string()), "{e}");
        let pid = child.pid;
        child.kill();
        std::thread::sleep(Duration::from_millis(1));
        let e = pending_from_status(pid, pid).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("/proc/{pid}/task/{pid}/status")),
            "{e}"
        );
    }
}
