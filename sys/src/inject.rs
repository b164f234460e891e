//! Syscall injection into one thread of a running process (like CRIU's
//! compel), without debug registers and without touching the target's own
//! code or data.
//!
//! # How it works
//!
//! Described for x86_64; aarch64 works the same way with the differences
//! listed in its own section below. The ptrace state machine is shared
//! (`inject/tracee.rs`); registers, stub code and frames are per
//! architecture (`inject/x86_64.rs`, `inject/aarch64.rs`).
//!
//! * [`Injector::attach`] `PTRACE_SEIZE`s one thread (the leader if alive),
//!   with `PTRACE_O_TRACESYSGOOD` and, when the kernel allows it,
//!   `PTRACE_O_SUSPEND_SECCOMP`, then `PTRACE_INTERRUPT`s it. The other
//!   threads keep running. The registers seen at that stop are the
//!   *original* registers. A signal that races with the interrupt (a
//!   signal-delivery-stop) is delivered to the program as the kernel would
//!   have, and the thread is stopped again.
//! * A syscall is injected by loading the number and arguments into the
//!   registers, pointing RIP at a `syscall` instruction, setting `orig_rax`
//!   to -1 (so the kernel applies no syscall-restart logic to injected
//!   registers), and resuming with `PTRACE_SYSCALL` to the syscall-enter and
//!   then the syscall-exit stop, where RAX holds the result.
//! * **Scratch area.** Only the first injection, the `mmap` of the scratch
//!   area, runs the `syscall` found in the target's `[vdso]` (read from
//!   `/proc/PID/mem`; any other executable mapping if there is no vDSO).
//!   The area ([`SCRATCH_LEN`] bytes, `MADV_DONTFORK`) starts with a magic
//!   header and is named `[anon:tern-scratch]` with `PR_SET_VMA_ANON_NAME`
//!   where the kernel has `CONFIG_ANON_VMA_NAME` (the build machine's 6.18
//!   kernel does not; there it stays unnamed and [`Injector::find_scratch`]
//!   recognises it by the header). Its first page (r-x, written through
//!   `/proc/PID/task/TID/mem` from the tracer thread with FOLL_FORCE) holds
//!   [`SLOTS`] stubs; each stub is a `syscall` followed by code that
//!   restores every general register and RFLAGS from the register frame of
//!   its slot (second page, rw-) and jumps back to the original RIP. The
//!   remaining rw- pages are one data area per slot. Each injector claims
//!   one slot (so several threads can be injected at the same time) and
//!   writes its thread's *fixed-up* original registers (see below) into the
//!   slot's frame before injecting. All later injections run the stub's
//!   `syscall`.
//! * **Tracer death.** All ptrace work for one [`Injector`] happens on a
//!   dedicated thread, the tracer. If tern is SIGKILLed (or that thread
//!   gives up on a thread that will not stop, see [`InjectError::Stuck`]),
//!   the kernel detaches the target thread wherever it is: it completes the
//!   injected syscall, runs the rest of the stub and resumes exactly where
//!   it was stopped (general registers, RFLAGS, RSP, RIP from the frame; the
//!   FPU/SSE/AVX state is never touched by injection at all). The stub uses
//!   the thread's own stack only for `push`/`popfq`, at
//!   `(original RSP - 256) & !15`, well below the 128-byte red zone.
//!   **Windows that remain:** the `mmap` that creates the scratch area and
//!   the `munmap` that removes it ([`Injector::remove_scratch`]) run the
//!   vDSO's `syscall`; if tern dies between loading the injected registers
//!   for one of those two calls and restoring them (two ptrace stops), the
//!   thread returns into the vDSO with foreign registers and will most
//!   likely crash. Between injections the thread holds its (fixed-up)
//!   original registers, never injected ones.
//! * **Batches** ([`Injector::syscall_batch`]), in a process tern is
//!   building only (traced with `PTRACE_O_EXITKILL`: it never runs
//!   untraced). The first page also holds a batch stub that walks a table
//!   of syscalls in the slot's data area (number, arguments, a "may fail"
//!   word the result overwrites), stops at the first failure, and ends in
//!   `int3` (`brk #0` on aarch64): one stop for the whole batch instead of
//!   an enter and an exit stop per syscall. Signals that come meanwhile are
//!   held and sent again after it.
//! * **Syscall restart.** If the thread was stopped inside an interrupted
//!   syscall (`orig_rax >= 0`, RAX one of -ERESTARTSYS, -ERESTARTNOINTR,
//!   -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK) the kernel would fix the
//!   registers up after the stop (RIP -= 2, RAX = `orig_rax` or
//!   `__NR_restart_syscall`). That fix-up does not run when the thread
//!   returns from an injected syscall's exit stop, so the registers written
//!   into the stub frame and restored after each injection are the fixed-up
//!   ones. At [`Injector::detach`] the thread is stopped once more in the
//!   kernel's signal path (`PTRACE_INTERRUPT` + `PTRACE_CONT`, a stop that
//!   comes before any user instruction) and the *unmodified* original
//!   registers are put back there, so the kernel applies its own restart
//!   logic exactly as if nothing had been injected (including returning
//!   EINTR instead of restarting when a handler runs for a signal that
//!   arrived meanwhile).
//! * **Signals during injection** (a signal-delivery-stop before the injected
//!   syscall starts): the original registers are put back and the signal is
//!   delivered right away on the original context (the kernel does the
//!   restart handling and builds the handler frame from them); the thread
//!   is then interrupted again, the new registers become the original ones
//!   and the injection is retried. No signal is lost or delayed beyond one
//!   stop. Faults caused by the injection itself (SIGSYS from a seccomp
//!   filter that was not suspended, SIGSEGV in the stub) are suppressed and
//!   reported as [`InjectError::Fault`].
//! * **rseq.** If the thread was stopped inside an rseq critical section,
//!   its original RIP is moved to the section's abort handler, as the kernel
//!   itself does when it preempts such a thread (otherwise the kernel would
//!   forget the section while the thread runs the injected code).
//! * Every wait has a deadline ([`Injector::set_timeout`], default
//!   [`DEFAULT_TIMEOUT`]); waits poll `waitpid(__WALL | WNOHANG)`.
//!
//! # aarch64
//!
//! * Registers are `NT_PRSTATUS` plus the syscall number
//!   (`NT_ARM_SYSTEM_CALL`, cleared where x86 sets `orig_rax` to -1); the
//!   syscall is `svc #0` with the number in x8 and arguments in x0-x5.
//! * The stub after `svc` cannot jump back without a free register, so it
//!   points SP at its slot's frame, a `struct rt_sigframe` (registers,
//!   FPSIMD state, signal mask), and calls `rt_sigreturn`, which restores
//!   everything exactly (the frame is 4.7 KiB, so a slot's frame takes 8 KiB).
//! * The kernel applies its syscall-restart fix-up *before* the signal-path
//!   stop, so the registers seen there are already fixed up. The
//!   `-ERESTART_RESTARTBLOCK` case (x8 = `restart_syscall` after the stop)
//!   is lost for a thread that was injected: it restarts the original
//!   syscall with its original arguments.
//! * x7 cannot be set at a syscall stop (arm64 uses it as the entry/exit
//!   marker and puts back its own copy), so the final registers are always
//!   set at a signal-path stop.
//! * A thread recovered from inside a stub is injected through another
//!   slot's stub: resuming through the `svc` it was stopped at would make
//!   the kernel turn the injection into `restart_syscall`.
//!
//! # Using it
//!
//! ```no_run
//! # use sys::inject::Injector;
//! # fn f(pid: i32) -> Result<(), sys::inject::InjectError> {
//! let mut inj = Injector::attach(pid, std::time::Duration::from_secs(5))?;
//! let known = Injector::find_scratch(pid)?.first().copied();
//! inj.ensure_scratch(known)?;
//! // userfaultfd(O_CLOEXEC | UFFD_USER_MODE_ONLY) inside the target:
//! let fd = inj.syscall(libc::SYS_userfaultfd, [(libc::O_CLOEXEC | 1) as u64, 0, 0, 0, 0, 0])?;
//! assert!(fd >= 0, "errno {}", -fd);
//! // ... pidfd_getfd it, then later close it in the target:
//! inj.syscall(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
//! inj.remove_scratch()?; // or keep it for the next invocation
//! inj.detach()?;
//! # Ok(()) }
//! ```
//!
//! Within one tern process, never call `waitpid(-1, __WALL)` (or on the
//! target's pid) while an [`Injector`] is alive: it would steal the ptrace
//! stops the injector waits for.
//!
//! # Limits
//!
//! * The two vDSO windows above (creating and removing a scratch area).
//!   Reusing an area left by an earlier run ([`Injector::find_scratch`] +
//!   [`Injector::ensure_scratch`]) avoids the first one.
//! * A thread that a dead tern left blocked inside an injected syscall is
//!   recognised by the next attach (its RIP is in one of our stubs) and
//!   resumed from the stub frame; that syscall is then abandoned. Not
//!   recognised: such a thread that is running a signal handler whose frame
//!   returns into the stub; a later injector may overwrite that slot's frame.
//! * Two tern *processes* injecting into the same target at once are not
//!   supported (slots are coordinated within one process only).
//! * If `PTRACE_O_SUSPEND_SECCOMP` is refused, a filter that kills on the
//!   injected syscall kills the target; trap and errno results are reported.
//!   Syscall user dispatch (`PR_SET_SYSCALL_USER_DISPATCH`) is not handled.
//! * 64-bit threads only (a compat thread gets [`InjectError::Unsupported`]);
//!   x86_64 and aarch64 only.
//! * If the thread's stack pointer is within 264 bytes of the end of its
//!   stack mapping, the stub's `push` would fault; this matters only on the
//!   tracer-death path.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod proc;
#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod test_support;
#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
#[cfg(all(test, target_arch = "aarch64"))]
mod tests_aarch64;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod tracee;
pub use tracee::errno_of;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod unsupported;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
use self::aarch64 as arch;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use self::tracee as machine;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
use self::unsupported as machine;
#[cfg(target_arch = "x86_64")]
use self::x86_64 as arch;

/// Default deadline for each wait on the target during an injection.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Syscalls injected by this process so far, every target together: the
/// restore logs how many each of its steps made (each one costs a few
/// ptrace stops, the bulk of a restore's time).
static INJECTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The number of syscalls injected by this process so far.
pub fn injected_syscalls() -> u64 {
    INJECTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Layout of the scratch area (see the module docs); only the frames differ
/// between the architectures.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) mod layout {
    pub const PAGE: u64 = 4096;
    /// First 16 bytes of the area.
    pub const MAGIC: [u8; 16] = *b"\x7ftern-scratch\0\0\0";
    /// Bump when the layout or the stub code changes.
    pub const VERSION: u32 = 1;
    /// Header: magic, version, and the numbers below, at offset 0.
    pub const HEADER_LEN: usize = 64;
    /// The VMA name, given to `PR_SET_VMA_ANON_NAME` from the area itself.
    pub const NAME_OFF: usize = 64;
    pub const NAME: &[u8] = b"tern-scratch\0";
    pub const MAPS_NAME: &str = "[anon:tern-scratch]";
    /// Stubs, one per slot, in the first (r-x) page.
    pub const SLOTS: usize = 8;
    pub const STUB_OFF: usize = 0x100;
    pub const STUB_STRIDE: usize = 128;
    /// The batch stub ([`super::Injector::syscall_batch`]), after the slots'
    /// stubs in the first page; shared by all slots (it works on the table
    /// its registers point at).
    pub const BATCH_OFF: usize = STUB_OFF + SLOTS * STUB_STRIDE;
    /// One entry of a batch table: number, six arguments, and a word that
    /// holds the "may fail" flag going in and the result coming out.
    pub const BATCH_ENTRY: usize = 64;
    /// Register frames, one per slot, from the second page on (rw-).
    pub const FRAMES_OFF: usize = 4096;
    /// x86_64: the general registers the stub loads.
    #[cfg(not(target_arch = "aarch64"))]
    pub const FRAME_STRIDE: usize = 256;
    /// aarch64: a `struct rt_sigframe` for the stub's `rt_sigreturn`
    /// (4.7 KiB with its FPSIMD record).
    #[cfg(target_arch = "aarch64")]
    pub const FRAME_STRIDE: usize = 8192;
    /// Data areas for [`super::Injector::scratch_data`], one per slot (rw-).
    pub const DATA_OFF: usize =
        (FRAMES_OFF + SLOTS * FRAME_STRIDE).next_multiple_of(crate::usize_of(PAGE));
    pub const DATA_STRIDE: usize = 8192;
    pub const LEN: usize = DATA_OFF + SLOTS * DATA_STRIDE;
    // The header stores these as u32: every one fits.
    const _: () = assert!(LEN < 1 << 32 && PAGE < 1 << 32);
}

/// Size in bytes of one scratch area (`munmap(addr, SCRATCH_LEN)` removes it).
pub const SCRATCH_LEN: u64 = layout::LEN as u64;
/// How many threads of one process can be injected at the same time through
/// one scratch area.
pub const SLOTS: usize = layout::SLOTS;
/// Bytes available to [`Injector::scratch_data`] between two syscalls.
pub const SCRATCH_DATA_CAPACITY: usize = layout::DATA_STRIDE;

/// Everything that can go wrong. Every variant names the process and, when
/// one is involved, the thread, and says what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("process {pid} does not exist (it may have exited); check the pid")]
    NoSuchProcess { pid: i32 },
    #[error("{pid} is thread {pid} of process {tgid}, not a process; pass {tgid}")]
    NotAProcess { pid: i32, tgid: i32 },
    #[error("process {pid} has no live thread to inject into (it is exiting or a zombie)")]
    NoLiveThread { pid: i32 },
    #[error(
        "thread {tid} of process {pid} is already traced by pid {tracer} (a debugger, strace, or another tern); detach that first"
    )]
    AlreadyTraced { pid: i32, tid: i32, tracer: i32 },
    #[error(
        "PTRACE_SEIZE of thread {tid} of process {pid}: {errno}; run tern as root (or with CAP_SYS_PTRACE) and check /proc/sys/kernel/yama/ptrace_scope"
    )]
    Attach {
        pid: i32,
        tid: i32,
        errno: nix::errno::Errno,
    },
    #[error(
        "thread {tid} of process {pid}: {what} did not complete within {after:?}; the thread may be in uninterruptible sleep (state D), blocked in the injected syscall, or the machine overloaded. Its registers are intact; retry later or with a longer timeout (Injector::set_timeout)"
    )]
    Timeout {
        pid: i32,
        tid: i32,
        what: String,
        after: Duration,
    },
    #[error(
        "thread {tid} of process {pid}: the injected syscall {nr} neither returned nor could be interrupted within {after:?}; the thread was released to the kernel and {outcome}"
    )]
    Stuck {
        pid: i32,
        tid: i32,
        nr: i64,
        after: Duration,
        outcome: &'static str,
    },
    #[error("thread {tid} of process {pid} went away during injection: {status}")]
    Exited { pid: i32, tid: i32, status: String },
    #[error("{op} on thread {tid} of process {pid}: {errno}")]
    Ptrace {
        pid: i32,
        tid: i32,
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("thread {tid} of process {pid}: {reason}")]
    Unsupported { pid: i32, tid: i32, reason: String },
    #[error(
        "thread {tid} of process {pid}: no `syscall` instruction found in [vdso] or any executable mapping; the target cannot be injected"
    )]
    NoSyscallInstruction { pid: i32, tid: i32 },
    #[error(
        "{op} target memory at {addr:#x} of thread {tid} of process {pid} through /proc: {source}{hint}"
    )]
    Mem {
        pid: i32,
        tid: i32,
        op: &'static str,
        addr: u64,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    ProcFile(crate::proc::ProcError),
    #[error("reading {path} for process {pid}: {source}")]
    Proc {
        pid: i32,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "thread {tid} of process {pid}: no scratch area yet; call Injector::ensure_scratch first"
    )]
    NoScratch { pid: i32, tid: i32 },
    #[error(
        "thread {tid} of process {pid}: injected {step} for the scratch area failed: {errno}; the target is unchanged (check its memory limits / seccomp policy)"
    )]
    ScratchCreate {
        pid: i32,
        tid: i32,
        step: &'static str,
        errno: nix::errno::Errno,
    },
    #[error(
        "thread {tid} of process {pid}: {requested} bytes do not fit in the scratch data area ({available} of {capacity} left until the next syscall); pass less data per syscall"
    )]
    ScratchFull {
        pid: i32,
        tid: i32,
        requested: usize,
        available: usize,
        capacity: usize,
    },
    #[error(
        "thread {tid} of process {pid}: the scratch area at {addr:#x} is in use ({by}); retry once that injection has finished"
    )]
    ScratchInUse {
        pid: i32,
        tid: i32,
        addr: u64,
        by: String,
    },
    #[error(
        "thread {tid} of process {pid}: injected munmap of the scratch area at {addr:#x} failed: {errno}; it stays mapped (find_scratch will report it)"
    )]
    ScratchUnmap {
        pid: i32,
        tid: i32,
        addr: u64,
        errno: nix::errno::Errno,
    },
    #[error(
        "thread {tid} of process {pid}: the injection caused signal {sig} (si_code {code}, address {addr:#x}){hint}; the signal was suppressed and the thread's registers restored"
    )]
    Fault {
        pid: i32,
        tid: i32,
        sig: i32,
        code: i32,
        addr: u64,
        hint: &'static str,
    },
    #[error(
        "thread {tid} of process {pid}: unexpected ptrace stop: {detail}; the thread was released to the kernel (it resumes where it was stopped); attach again"
    )]
    Protocol { pid: i32, tid: i32, detail: String },
    #[error(
        "the injector for thread {tid} of process {pid} is no longer attached (released after an earlier error, or its tracer thread ended); attach again"
    )]
    Released { pid: i32, tid: i32 },
    #[error("starting the tracer thread for process {pid}: {source}")]
    Spawn { pid: i32, source: std::io::Error },
}

type Job = Box<dyn FnOnce(&mut Option<machine::Tracee>) + Send>;

/// One syscall of a batch ([`Injector::syscall_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syscall {
    pub nr: i64,
    pub args: [u64; 6],
    /// A failure does not end the batch (the caller checks the result).
    pub may_fail: bool,
}

impl Syscall {
    pub fn new(nr: i64, args: [u64; 6]) -> Syscall {
        Syscall {
            nr,
            args,
            may_fail: false,
        }
    }

    /// Let the batch go on if this one fails.
    pub fn may_fail(mut self) -> Syscall {
        self.may_fail = true;
        self
    }
}

/// A thread of another process, stopped under ptrace, into which syscalls
/// can be injected. See the module docs.
///
/// The ptrace work runs on a dedicated tracer thread owned by the injector,
/// so an `Injector` may be moved between threads. Dropping it detaches (best
/// effort, errors are logged); [`Injector::detach`] reports errors. Do not
/// `mem::forget` it: the target thread would stay stopped until tern exits.
pub struct Injector {
    pid: i32,
    tid: i32,
    /// See [`Injector::attach_owned_thread`].
    owned: bool,
    seccomp_suspended: bool,
    tx: Option<mpsc::Sender<Job>>,
    worker: Option<thread::JoinHandle<()>>,
    /// Traced from the thread that attached (see
    /// [`Injector::attach_owned_thread_here`]): the tracee, and that
    /// thread's id.
    here: Option<(Option<machine::Tracee>, i32)>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("pid", &self.pid)
            .field("tid", &self.tid)
            .field("seccomp_suspended", &self.seccomp_suspended)
            .field(
                "attached",
                &(self.worker.is_some() || self.here.as_ref().is_some_and(|h| h.0.is_some())),
            )
            .finish()
    }
}

impl Injector {
    /// `PTRACE_SEIZE` one live thread of `pid` (the leader if alive, else any
    /// thread in /proc/PID/task) with `PTRACE_O_TRACESYSGOOD` and
    /// `PTRACE_O_SUSPEND_SECCOMP` (without it if the kernel refuses, see
    /// [`Injector::seccomp_suspended`]), interrupt it and wait, at most
    /// `timeout`, for it to stop. Other threads keep running. A signal
    /// racing with the interrupt is delivered, not lost.
    pub fn attach(pid: i32, timeout: Duration) -> Result<Injector, InjectError> {
        let mut last = None;
        // The chosen thread may exit between choosing and seizing it.
        for _ in 0..3 {
            let tid = proc::choose_thread(pid)?;
            match Self::attach_thread_unchecked(pid, tid, timeout, false) {
                Ok(inj) => return Ok(inj),
                Err(e @ InjectError::Exited { .. }) => last = Some(e),
                Err(InjectError::Attach {
                    errno: nix::errno::Errno::ESRCH,
                    ..
                }) => {
                    last = Some(InjectError::Exited {
                        pid,
                        tid,
                        status: "it exited before it could be seized".into(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(InjectError::NoLiveThread { pid }))
    }

    /// Like [`Injector::attach`], for the given thread `tid` of process
    /// `pid`. Several threads of one process can be attached at the same
    /// time (each by its own injector); they share a scratch area through
    /// separate slots.
    pub fn attach_thread(pid: i32, tid: i32, timeout: Duration) -> Result<Injector, InjectError> {
        proc::check_thread(pid, tid)?;
        Self::attach_thread_unchecked(pid, tid, timeout, false)
    }

    /// Like [`Injector::attach_thread`], for a thread of a process tern is
    /// building (a restore): traced with `PTRACE_O_EXITKILL`, so that it
    /// dies with its tracer, and killed, not let go, if the injector is
    /// dropped without [`Injector::detach`].
    pub fn attach_owned_thread(
        pid: i32,
        tid: i32,
        timeout: Duration,
    ) -> Result<Injector, InjectError> {
        proc::check_owned_thread(pid, tid)?;
        Self::attach_thread_unchecked(pid, tid, timeout, true)
    }

    /// Like [`Injector::attach_owned_thread`], traced from the calling
    /// thread itself rather than a tracer thread of its own: every request
    /// then costs no thread switch (two per request otherwise, the larger
    /// part of an injected syscall's cost in a restore). The injector must
    /// stay on this thread: used from another, it refuses
    /// ([`InjectError::Released`]).
    pub fn attach_owned_thread_here(
        pid: i32,
        tid: i32,
        timeout: Duration,
    ) -> Result<Injector, InjectError> {
        proc::check_owned_thread(pid, tid)?;
        let t = machine::Tracee::attach(pid, tid, timeout, true)?;
        Ok(Injector {
            pid,
            tid,
            owned: true,
            seccomp_suspended: t.seccomp_suspended(),
            tx: None,
            worker: None,
            here: Some((Some(t), nix::unistd::gettid().as_raw())),
        })
    }

    fn attach_thread_unchecked(
        pid: i32,
        tid: i32,
        timeout: Duration,
        owned: bool,
    ) -> Result<Injector, InjectError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (rtx, rrx) = mpsc::sync_channel::<Result<bool, InjectError>>(1);
        let worker = thread::Builder::new()
            .name(format!("tern-inject-{tid}"))
            .spawn(
                move || match machine::Tracee::attach(pid, tid, timeout, owned) {
                    Ok(t) => {
                        let _ = rtx.send(Ok(t.seccomp_suspended()));
                        worker_loop(t, rx);
                    }
                    Err(e) => {
                        let _ = rtx.send(Err(e));
                    }
                },
            )
            .map_err(|source| InjectError::Spawn { pid, source })?;
        match rrx.recv() {
            Ok(Ok(seccomp_suspended)) => Ok(Injector {
                pid,
                tid,
                owned,
                seccomp_suspended,
                tx: Some(tx),
                worker: Some(worker),
                here: None,
            }),
            Ok(Err(e)) => {
                let _ = worker.join();
                Err(e)
            }
            Err(_) => {
                let _ = worker.join();
                Err(InjectError::Released { pid, tid })
            }
        }
    }

    /// The target process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The thread the syscalls run in.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Whether `PTRACE_O_SUSPEND_SECCOMP` is in effect. If not and the target
    /// has a seccomp filter, injected syscalls go through that filter: one it
    /// kills for kills the process; inject only what the filter allows.
    pub fn seccomp_suspended(&self) -> bool {
        self.seccomp_suspended
    }

    /// Deadline for each wait during later calls (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), InjectError> {
        self.run(move |t| {
            t.set_timeout(timeout);
            Ok(())
        })
    }

    /// Map the scratch area, or reuse `known` if it points at a valid scratch
    /// area of ours (from [`Injector::find_scratch`], e.g. left by an earlier
    /// invocation). Returns its address. Mapping a new one is the first of
    /// the two injections that run the vDSO's `syscall` (see module docs);
    /// reuse runs none. An invalid `known` is ignored (a warning is logged)
    /// and a new area mapped. Idempotent: returns the current area if there
    /// is one.
    pub fn ensure_scratch(&mut self, known: Option<u64>) -> Result<u64, InjectError> {
        self.run(move |t| t.ensure_scratch(known))
    }

    /// Run one syscall in the stopped thread: `nr` with up to six arguments.
    /// Returns the raw kernel return value (negative errno on failure).
    /// Needs [`Injector::ensure_scratch`] first.
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
        INJECTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.run(move |t| t.syscall(nr, args))
    }

    /// Run several syscalls one after the other, as one batch (see
    /// [`Injector::syscall_batch`]). Returns each one's raw return value; a
    /// syscall that fails in the kernel (negative return) does not stop the
    /// batch: the caller checks the values.
    pub fn syscalls(&mut self, calls: Vec<(i64, [u64; 6])>) -> Result<Vec<i64>, InjectError> {
        let calls = calls
            .into_iter()
            .map(|(nr, args)| Syscall::new(nr, args).may_fail())
            .collect();
        self.syscall_batch(calls, Vec::new())
    }

    /// Where [`Injector::syscall_batch`] puts its `data`: arguments that
    /// point into it are computed from this address. Needs
    /// [`Injector::ensure_scratch`] first.
    pub fn batch_data_addr(&mut self) -> Result<u64, InjectError> {
        self.run(|t| t.batch_data_addr())
    }

    /// Run `calls` in order, with `data` (paths, structs the calls point
    /// at, at most [`SCRATCH_DATA_CAPACITY`] bytes with the table) written
    /// at [`Injector::batch_data_addr`] first. Stops after the first call
    /// that fails (a result in -4095..=-1) unless it is marked
    /// [`Syscall::may_fail`]: the results returned are those of the calls
    /// that ran, so fewer results than calls means the last one failed.
    ///
    /// In a process tern is building ([`Injector::attach_owned_thread`])
    /// the whole batch runs in one stop: the scratch area's batch stub
    /// walks a table of the calls and traps at its end, instead of two
    /// ptrace stops per syscall (15-50 µs each here). Such a thread dies
    /// with tern (`PTRACE_O_EXITKILL`), so the trap is never reached
    /// untraced. A signal that arrives meanwhile is held back and sent
    /// again after the batch; a blocking call it interrupts is restarted
    /// by the kernel. In any other process the calls run one by one, each
    /// with the usual tracer-death safety.
    pub fn syscall_batch(
        &mut self,
        calls: Vec<Syscall>,
        data: Vec<u8>,
    ) -> Result<Vec<i64>, InjectError> {
        let r = self.run(move |t| t.syscall_batch(&calls, &data));
        if let Ok(v) = &r {
            INJECTED.fetch_add(v.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    /// Copy `bytes` (a C string argument, a struct, ...) into this injector's
    /// data area in the scratch area and return their address in the target
    /// (16-byte aligned). Data put there stays valid until the first
    /// `scratch_data` call after the next [`Injector::syscall`], which starts
    /// reusing the area from its beginning. The area is writable, so the
    /// kernel may also return results there (read them with
    /// [`Injector::read_memory`]). At most [`SCRATCH_DATA_CAPACITY`] bytes.
    pub fn scratch_data(&mut self, bytes: &[u8]) -> Result<u64, InjectError> {
        let bytes = bytes.to_vec();
        self.run(move |t| t.scratch_data(&bytes))
    }

    /// Read `len` bytes of the target's memory at `addr` (e.g. a result the
    /// injected syscall wrote into the scratch data area).
    pub fn read_memory(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, InjectError> {
        self.run(move |t| t.read_memory(addr, len))
    }

    /// The current scratch area, if any.
    pub fn scratch(&mut self) -> Result<Option<u64>, InjectError> {
        self.run(|t| Ok(t.scratch_base()))
    }

    /// Unmap the scratch area (last step of a teardown; the second injection
    /// that runs the vDSO's `syscall`). Fails with
    /// [`InjectError::ScratchInUse`] while another injector of this process
    /// or another thread of the target is using it. No-op without one.
    pub fn remove_scratch(&mut self) -> Result<(), InjectError> {
        self.run(|t| t.remove_scratch())
    }

    /// Unmap every other scratch area of ours in the target (leftovers of
    /// killed tern runs), through the current one (no vDSO window). Areas a
    /// thread of the target is still executing a stub of are skipped.
    /// Returns the addresses removed.
    pub fn remove_leftover_scratch(&mut self) -> Result<Vec<u64>, InjectError> {
        self.run(|t| t.remove_leftover_scratch())
    }

    /// The thread's general registers when it stopped (see
    /// `Tracee::original_regs`): what a dump records.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub fn original_regs(&mut self) -> Result<libc::user_regs_struct, InjectError> {
        self.run(|t| Ok(t.original_regs()))
    }

    /// The registers the thread resumes with at [`Injector::detach`]
    /// (a restore puts the dumped ones here).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub fn set_original_regs(&mut self, r: libc::user_regs_struct) -> Result<(), InjectError> {
        self.run(move |t| t.set_original_regs(r))
    }

    /// Free this injector's scratch slot (the thread stays stopped; the next
    /// injection claims a slot again).
    pub fn release_scratch(&mut self) -> Result<(), InjectError> {
        self.run(|t| {
            t.release_scratch();
            Ok(())
        })
    }

    /// Map a new scratch area (in [`Injector::ensure_scratch`]) exactly at
    /// `addr` instead of where the kernel chooses.
    pub fn set_scratch_hint(&mut self, addr: u64) -> Result<(), InjectError> {
        self.run(move |t| {
            t.set_scratch_hint(addr);
            Ok(())
        })
    }

    /// Bind the thread's life to its tracer from now on
    /// (`PTRACE_O_EXITKILL`): if tern ends, it is killed, never let go.
    pub fn die_with_tracer(&mut self) -> Result<(), InjectError> {
        self.run(|t| t.die_with_tracer())
    }

    /// Let the thread go without restoring anything, for a thread that was
    /// killed (the kernel releases it when the tracer thread ends).
    pub fn abandon(mut self) {
        let _ = self.run(|t| {
            t.abandon();
            Ok(())
        });
        self.shutdown();
    }

    /// Run `f(tid)` on the tracer thread, where ptrace requests on this
    /// thread are allowed (PTRACE_GETREGSET, PTRACE_PEEKSIGINFO, ...). `f`
    /// must not resume or detach the thread.
    pub fn on_tracer<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(i32) -> R + Send + 'static,
    ) -> Result<R, InjectError> {
        let tid = self.tid;
        self.run(move |_| Ok(f(tid)))
    }

    /// How many times the thread ran its own code since the attach (a
    /// signal that arrived during an injection is delivered at once, and
    /// its handler runs): anything read from its memory before may be stale.
    pub fn ran_program_code(&mut self) -> Result<u32, InjectError> {
        self.run(|t| Ok(t.ran_program_code()))
    }

    /// Restore the thread's registers exactly and `PTRACE_DETACH`.
    pub fn detach(mut self) -> Result<(), InjectError> {
        let r = self.run(|t| t.detach());
        self.shutdown();
        r
    }

    /// Scratch areas of ours in `pid`'s address space: VMAs named
    /// `[anon:tern-scratch]`, and anonymous r-x mappings starting with our
    /// magic header (when naming failed, e.g. `CONFIG_ANON_VMA_NAME` unset).
    /// Addresses in ascending order. Needs no attach.
    pub fn find_scratch(pid: i32) -> Result<Vec<u64>, InjectError> {
        proc::find_scratch(pid)
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    pub(crate) fn debug_state(&mut self) -> Result<machine::DebugState, InjectError> {
        self.run(|t| Ok(t.debug_state()))
    }

    /// Run `f` on the tracer thread and wait for its result.
    fn run<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut machine::Tracee) -> Result<R, InjectError> + Send + 'static,
    ) -> Result<R, InjectError> {
        let (pid, tid) = (self.pid, self.tid);
        let released = InjectError::Released { pid, tid };
        if let Some((slot, owner)) = self.here.as_mut() {
            if *owner != nix::unistd::gettid().as_raw() {
                return Err(released);
            }
            let Some(t) = slot.as_mut() else {
                return Err(released);
            };
            let r = f(t);
            if t.released() {
                // Dropped now, as the tracer thread would end.
                *slot = None;
            }
            return r;
        }
        let Some(tx) = self.tx.as_ref() else {
            return Err(released);
        };
        let (rtx, rrx) = mpsc::sync_channel::<(Result<R, InjectError>, bool)>(1);
        let job: Job = Box::new(move |slot: &mut Option<machine::Tracee>| {
            let out = match slot.as_mut() {
                Some(t) => {
                    let r = f(t);
                    (r, t.released())
                }
                None => (Err(InjectError::Released { pid, tid }), true),
            };
            let _ = rtx.send(out);
        });
        if tx.send(job).is_err() {
            self.shutdown();
            return Err(released);
        }
        match rrx.recv() {
            Ok((r, finished)) => {
                if finished {
                    // The tracer thread is ending: wait for it, so the kernel
                    // has detached the target by the time the caller sees
                    // the result.
                    self.shutdown();
                }
                r
            }
            Err(_) => {
                self.shutdown();
                Err(released)
            }
        }
    }

    fn shutdown(&mut self) {
        if let Some((slot, _)) = self.here.as_mut() {
            // An owned tracee's drop kills a thread not detached.
            *slot = None;
        }
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        if self.owned {
            // Never let a half-built process run: the tracee's own drop
            // kills it (see `Tracee`'s `owned`).
            self.shutdown();
            return;
        }
        if (self.tx.is_some() || self.here.as_ref().is_some_and(|h| h.0.is_some()))
            && let Err(e) = self.run(|t| t.detach())
        {
            tracing::warn!(
                "detaching from thread {} of process {}: {e}",
                self.tid,
                self.pid
            );
        }
        self.shutdown();
    }
}

fn worker_loop(t: machine::Tracee, rx: mpsc::Receiver<Job>) {
    let mut slot = Some(t);
    while let Ok(job) = rx.recv() {
        job(&mut slot);
        if slot.as_ref().is_none_or(|t| t.released()) {
            break;
        }
    }
    // Dropping the tracee detaches it if still attached; when this thread
    // exits the kernel detaches anything left (exit_ptrace).
    drop(slot);
}
