//! The injector's ptrace state machine, scratch area and slots, shared by
//! the architectures; what differs (registers, the stub code, the frame a
//! stub restores from, syscall-restart rules) is in `arch` (`x86_64.rs`,
//! `aarch64.rs`). Everything here runs on the injector's tracer thread.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use libc::c_uint;
use nix::errno::Errno;

use super::arch::{self, Regs};
use super::layout::*;
use super::{DEFAULT_TIMEOUT, InjectError, proc};
use crate::ptrace;

// Kernel-internal syscall return values (include/linux/errno.h, the same on
// both architectures) that a tracer can see when a thread stopped inside an
// interrupted syscall.
pub(crate) const ERESTARTSYS: i64 = 512;
pub(crate) const ERESTARTNOINTR: i64 = 513;
pub(crate) const ERESTARTNOHAND: i64 = 514;
pub(crate) const ERESTART_RESTARTBLOCK: i64 = 516;
/// The injected stack pointer is this far below the original one (past the
/// x86 red zone).
pub(crate) const STACK_GAP: u64 = 256;

const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_PEEKSIGINFO: c_uint = 0x4209;
const PTRACE_GET_SYSCALL_INFO: c_uint = 0x420e;
const PTRACE_GET_RSEQ_CONFIGURATION: c_uint = 0x420f;
const PTRACE_SYSCALL_INFO_ENTRY: u8 = 1;
const PTRACE_SYSCALL_INFO_EXIT: u8 = 2;
const PR_SET_VMA: u64 = 0x5356_4d41;
const PR_SET_VMA_ANON_NAME: u64 = 0;
/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;
/// Marks a valid register frame in a slot ("tern-frm"); the arch module puts
/// it (and the owner's tid) where its stub does not look.
pub(crate) const FRAME_MAGIC: u64 = u64::from_le_bytes(*b"tern-frm");

/// `struct ptrace_syscall_info` (include/uapi/linux/ptrace.h). `data` is the
/// union: entry `{nr, args[6]}`, exit `{rval, is_error}`, seccomp `{...}`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct PtraceSyscallInfo {
    op: u8,
    reserved: u8,
    flags: u16,
    arch: u32,
    instruction_pointer: u64,
    stack_pointer: u64,
    data: [u64; 8],
}

/// `struct ptrace_rseq_configuration` (include/uapi/linux/ptrace.h).
#[repr(C)]
#[derive(Default)]
pub(crate) struct PtraceRseqConfiguration {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// `struct ptrace_peeksiginfo_args` (include/uapi/linux/ptrace.h).
#[repr(C)]
pub(crate) struct PtracePeeksiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// The first page of a scratch area: the header ([`super::layout`]), the
/// VMA name, and `stub(k)` for every slot, padded with `fill` (a trapping
/// instruction).
pub(crate) fn code_page_with(
    fill: &[u8],
    stub: impl Fn(usize) -> Vec<u8>,
    batch: &[u8],
) -> Vec<u8> {
    let mut p: Vec<u8> = fill
        .iter()
        .copied()
        .cycle()
        .take(crate::usize_of(PAGE))
        .collect();
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC);
    // Layout constants, all far below 2^32 (asserted at compile time in
    // layout).
    #[allow(clippy::cast_possible_truncation)]
    for v in [VERSION, PAGE as u32] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&(LEN as u64).to_le_bytes());
    for v in [
        SLOTS,
        STUB_OFF,
        STUB_STRIDE,
        FRAMES_OFF,
        FRAME_STRIDE,
        DATA_OFF,
        DATA_STRIDE,
        NAME_OFF,
    ] {
        #[allow(clippy::cast_possible_truncation)] // as above
        h.extend_from_slice(&(v as u32).to_le_bytes());
    }
    assert_eq!(h.len(), HEADER_LEN);
    p[..HEADER_LEN].copy_from_slice(&h);
    p[NAME_OFF..NAME_OFF + NAME.len()].copy_from_slice(NAME);
    p[NAME_OFF + NAME.len()..STUB_OFF].fill(0);
    for k in 0..SLOTS {
        let at = STUB_OFF + k * STUB_STRIDE;
        let code = stub(k);
        assert!(code.len() <= STUB_STRIDE);
        p[at..at + code.len()].copy_from_slice(&code);
    }
    assert!(BATCH_OFF + batch.len() <= crate::usize_of(PAGE));
    p[BATCH_OFF..BATCH_OFF + batch.len()].copy_from_slice(batch);
    p
}

/// Slots of scratch areas used by injectors of this process, per (pid, area).
static CLAIMS: Mutex<BTreeMap<(i32, u64), u32>> = Mutex::new(BTreeMap::new());

fn claims() -> std::sync::MutexGuard<'static, BTreeMap<(i32, u64), u32>> {
    CLAIMS.lock().unwrap_or_else(|p| p.into_inner())
}

/// One slot of one scratch area, held by one injector; released on drop.
struct SlotClaim {
    pid: i32,
    base: u64,
    slot: usize,
}

impl Drop for SlotClaim {
    fn drop(&mut self) {
        let mut c = claims();
        if let Some(bits) = c.get_mut(&(self.pid, self.base)) {
            *bits &= !(1 << self.slot);
            if *bits == 0 {
                c.remove(&(self.pid, self.base));
            }
        }
    }
}

struct Scratch {
    base: u64,
    claim: SlotClaim,
    /// The slot's frame does not hold the current fixed-up registers yet.
    frame_dirty: bool,
    data_used: usize,
    /// A syscall ran since the last `scratch_data`: start the area afresh.
    data_reset: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopKind {
    /// A stop inside the kernel's signal path (`PTRACE_EVENT_STOP`:
    /// interrupt or group-stop); the syscall-restart fix-up comes after it.
    Jobctl,
    /// The exit stop of an injected syscall.
    SyscallExit,
}

/// What the thread's registers hold right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegsState {
    /// `orig`, exactly.
    Orig,
    /// `fixed` (orig with the restart fix-up applied, orig_rax = -1).
    Fixed,
    /// Anything else (injected, or a stub state we recovered from).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Enter,
    Exit,
}

#[derive(Debug)]
enum Stop {
    /// Syscall-enter or -exit stop (SIGTRAP | 0x80).
    Syscall,
    /// `PTRACE_EVENT_STOP` with this signal (SIGTRAP: interrupt; a stop
    /// signal: group-stop).
    Jobctl(i32),
    /// Signal-delivery-stop.
    Signal(i32),
    /// Another `PTRACE_EVENT_*` (none is enabled; tolerated).
    Event(i32),
    /// The thread exited or was killed.
    Exited(String),
}

#[cfg(all(test, target_arch = "x86_64"))]
#[derive(Debug, Clone)]
pub(crate) struct DebugState {
    pub orig_rip: u64,
    pub orig_rax: i64,
    pub orig_orig_rax: i64,
    pub fixed_rip: u64,
    pub fixed_rax: i64,
    pub recovered: bool,
    pub slot: Option<usize>,
    pub raw_syscall: Option<u64>,
    pub delivered: u32,
    pub rseq_aborted: bool,
}

pub(crate) struct Tracee {
    pid: i32,
    tid: i32,
    /// /proc/PID/task/TID/mem, written from the tracer thread (the kernel
    /// allows FOLL_FORCE writes to read-only pages to the tracer).
    mem: File,
    timeout: Duration,
    seccomp_suspended: bool,
    attached: bool,
    /// Released to the kernel: the tracer thread ends and exit_ptrace()
    /// detaches the thread wherever it is.
    abandoned: bool,
    stop: StopKind,
    regs: RegsState,
    /// Registers at the last stop in the signal path, unmodified (after the
    /// rseq abort fix-up, or rebuilt from a stub frame).
    orig: Regs,
    /// `orig` with the syscall-restart fix-up applied and orig_rax = -1:
    /// what the thread must hold when it returns to user mode.
    fixed: Regs,
    raw_syscall: Option<u64>,
    scratch: Option<Scratch>,
    /// Where a new scratch area must go (0: where the kernel likes).
    scratch_hint: u64,
    have_syscall_info: bool,
    recovered: bool,
    /// The PC at the stop, when the thread was stopped inside one of our
    /// stubs (see [`Tracee::claim_slot`]).
    stopped_in_stub: Option<u64>,
    /// Signals delivered on the original registers during injection.
    delivered: u32,
    /// Other times the thread ran its own code while we held it (a signal
    /// delivered on the way to a stop).
    ran_code: u32,
    rseq_aborted: bool,
    /// The thread belongs to a process tern is building (a restore): it is
    /// traced with `PTRACE_O_EXITKILL`, and dropping the tracee without
    /// [`Tracee::detach`] kills it instead of letting it run.
    owned: bool,
    /// Signals that came while an owned thread was being built: never
    /// delivered half-way (a handler would run on a process not yet
    /// whole), sent again once it is let go.
    held_signals: Vec<i32>,
}

/// The errno of a failed injected syscall's result (-4095..=-1).
pub fn errno_of(ret: i64) -> Errno {
    i32::try_from(-ret).map_or(Errno::UnknownErrno, Errno::from_raw)
}

fn decode(status: i32) -> Option<Stop> {
    if libc::WIFSTOPPED(status) {
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        Some(if sig == libc::SIGTRAP | 0x80 {
            Stop::Syscall
        } else if event == PTRACE_EVENT_STOP {
            Stop::Jobctl(sig)
        } else if event != 0 {
            Stop::Event(event)
        } else {
            Stop::Signal(sig)
        })
    } else if libc::WIFEXITED(status) {
        Some(Stop::Exited(format!(
            "exited with status {}",
            libc::WEXITSTATUS(status)
        )))
    } else if libc::WIFSIGNALED(status) {
        Some(Stop::Exited(format!(
            "killed by signal {}",
            libc::WTERMSIG(status)
        )))
    } else {
        None
    }
}

fn is_restart_code(ret: i64) -> bool {
    matches!(
        -ret,
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
    )
}

impl Tracee {
    // ---------------------------------------------------------------- attach

    pub fn attach(
        pid: i32,
        tid: i32,
        timeout: Duration,
        owned: bool,
    ) -> Result<Tracee, InjectError> {
        // A process tern made itself has no tracer but tern (and a seize
        // of a traced thread fails anyway): the status read is spared.
        if !owned {
            let tracer = proc::status(pid, Some(tid))?.tracerpid;
            if tracer != 0 {
                return Err(InjectError::AlreadyTraced { pid, tid, tracer });
            }
        }
        let path = format!("/proc/{pid}/task/{tid}/mem");
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    InjectError::Exited {
                        pid,
                        tid,
                        status: "it exited before it could be seized".into(),
                    }
                } else {
                    InjectError::Proc { pid, path, source }
                }
            })?;
        // Seccomp is suspended only while the thread is stopped (set after
        // the stop, cleared before anything lets it run its own code): a
        // thread running with PTRACE_O_SUSPEND_SECCOMP would bypass its
        // filters.
        let opts = Self::base_options(owned);
        ptrace::plain(libc::PTRACE_SEIZE, tid, 0, opts).map_err(|errno| InjectError::Attach {
            pid,
            tid,
            errno,
        })?;
        let seccomp_suspended = false;
        let zero = arch::zeroed();
        let mut t = Tracee {
            pid,
            tid,
            mem,
            timeout: DEFAULT_TIMEOUT,
            seccomp_suspended,
            attached: true,
            // Until the thread stops we cannot detach it; an early error
            // releases it to the kernel (the tracer thread exits).
            abandoned: true,
            stop: StopKind::Jobctl,
            regs: RegsState::Orig,
            orig: zero,
            fixed: zero,
            raw_syscall: None,
            scratch: None,
            scratch_hint: 0,
            have_syscall_info: true,
            recovered: false,
            stopped_in_stub: None,
            delivered: 0,
            ran_code: 0,
            rseq_aborted: false,
            owned,
            held_signals: Vec::new(),
        };
        t.interrupt()?;
        t.wait_jobctl(timeout, "stopping the thread (PTRACE_INTERRUPT)")?;
        t.abandoned = false;
        t.suspend_seccomp(true);
        if !t.seccomp_suspended {
            let mode = proc::status(pid, Some(tid)).ok().and_then(|s| s.seccomp);
            if mode == Some(2) {
                tracing::warn!(
                    "thread {tid} of process {pid} has a seccomp filter and PTRACE_O_SUSPEND_SECCOMP was refused (needs CAP_SYS_ADMIN): injected syscalls go through the filter"
                );
            }
        }
        t.capture_original()?;
        Ok(t)
    }

    /// The options every seize and SETOPTIONS carries.
    fn base_options(owned: bool) -> u64 {
        let mut opts = libc::PTRACE_O_TRACESYSGOOD as u64;
        if owned {
            opts |= libc::PTRACE_O_EXITKILL as u64;
        }
        opts
    }

    /// Turn PTRACE_O_SUSPEND_SECCOMP on (only while stopped) or off.
    fn suspend_seccomp(&mut self, on: bool) {
        let mut opts = Self::base_options(self.owned);
        if on {
            opts |= libc::PTRACE_O_SUSPEND_SECCOMP as u64;
        }
        match ptrace::plain(libc::PTRACE_SETOPTIONS, self.tid, 0, opts) {
            Ok(_) => self.seccomp_suspended = on,
            Err(_) if on => self.seccomp_suspended = false,
            Err(e) => tracing::warn!(
                "thread {} of process {}: clearing PTRACE_O_SUSPEND_SECCOMP: {e}",
                self.tid,
                self.pid
            ),
        }
    }

    /// From now on the thread dies with its tracer (`PTRACE_O_EXITKILL`)
    /// and is killed, not let go, if dropped: it must never run again (a
    /// migrated process's source, whose copy runs elsewhere).
    pub fn die_with_tracer(&mut self) -> Result<(), InjectError> {
        let mut opts = Self::base_options(true);
        if self.seccomp_suspended {
            opts |= libc::PTRACE_O_SUSPEND_SECCOMP as u64;
        }
        ptrace::plain(libc::PTRACE_SETOPTIONS, self.tid, 0, opts)
            .map_err(|e| self.pt_err("PTRACE_SETOPTIONS", e))?;
        self.owned = true;
        Ok(())
    }

    pub fn seccomp_suspended(&self) -> bool {
        self.seccomp_suspended
    }

    pub fn released(&self) -> bool {
        !self.attached || self.abandoned
    }

    /// How many times the thread ran its own code while held (signal
    /// handlers run during injection): its memory may have changed.
    pub fn ran_program_code(&self) -> u32 {
        self.delivered + self.ran_code
    }

    /// Leave the thread to the kernel without restoring anything (it was
    /// killed): the tracer thread ends and exit_ptrace() lets it go.
    pub fn abandon(&mut self) {
        self.abandoned = true;
        self.scratch = None;
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The thread's registers as they were when it stopped (with an rseq
    /// critical section already moved to its abort handler), before any
    /// syscall restart fix-up: what a dump records.
    pub fn original_regs(&self) -> arch::UserRegs {
        arch::to_user(&self.orig)
    }

    /// Make `r` the registers the thread resumes with at detach (a restore
    /// sets the dumped registers this way). The kernel applies its syscall
    /// restart logic to them at the final stop, as for real originals.
    pub fn set_original_regs(&mut self, r: arch::UserRegs) -> Result<(), InjectError> {
        let r = arch::from_user(&r).map_err(|reason| InjectError::Unsupported {
            pid: self.pid,
            tid: self.tid,
            reason,
        })?;
        self.orig = r;
        self.fixed = arch::fixup(&r);
        self.regs = RegsState::Other;
        if let Some(s) = self.scratch.as_mut() {
            s.frame_dirty = true;
        }
        Ok(())
    }

    /// Map a new scratch area exactly at `addr` (MAP_FIXED_NOREPLACE), e.g.
    /// where a restored address space will have nothing.
    pub fn set_scratch_hint(&mut self, addr: u64) {
        self.scratch_hint = addr;
    }

    /// Give the scratch slot back (the area stays mapped); the next
    /// injection claims one again. Lets more threads than there are slots be
    /// injected in turn while all of them stay stopped.
    pub fn release_scratch(&mut self) {
        self.scratch = None;
    }

    pub fn scratch_base(&self) -> Option<u64> {
        self.scratch.as_ref().map(|s| s.base)
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    pub fn debug_state(&self) -> DebugState {
        DebugState {
            orig_rip: self.orig.rip,
            orig_rax: self.orig.rax as i64,
            orig_orig_rax: self.orig.orig_rax as i64,
            fixed_rip: self.fixed.rip,
            fixed_rax: self.fixed.rax as i64,
            recovered: self.recovered,
            slot: self.scratch.as_ref().map(|s| s.claim.slot),
            raw_syscall: self.raw_syscall,
            delivered: self.delivered,
            rseq_aborted: self.rseq_aborted,
        }
    }

    // ------------------------------------------------------- ptrace plumbing

    fn pt_err(&self, op: &'static str, errno: Errno) -> InjectError {
        InjectError::Ptrace {
            pid: self.pid,
            tid: self.tid,
            op,
            errno,
        }
    }

    fn getregs(&self) -> Result<Regs, InjectError> {
        arch::getregs(self.tid).map_err(|(op, e)| self.pt_err(op, e))
    }

    fn setregs(&self, r: &Regs) -> Result<(), InjectError> {
        arch::setregs(self.tid, r).map_err(|(op, e)| self.pt_err(op, e))
    }

    fn set_orig(&mut self) -> Result<(), InjectError> {
        if self.regs != RegsState::Orig {
            self.setregs(&self.orig)?;
            self.regs = RegsState::Orig;
        }
        Ok(())
    }

    fn set_fixed(&mut self) -> Result<(), InjectError> {
        if self.regs != RegsState::Fixed {
            self.setregs(&self.fixed)?;
            self.regs = RegsState::Fixed;
        }
        Ok(())
    }

    fn resume(&self, req: c_uint, sig: i32) -> Result<(), InjectError> {
        let op = if req == libc::PTRACE_SYSCALL {
            "PTRACE_SYSCALL"
        } else {
            "PTRACE_CONT"
        };
        ptrace::plain(req, self.tid, 0, sig as u64)
            .map(|_| ())
            .map_err(|e| self.pt_err(op, e))
    }

    fn interrupt(&self) -> Result<(), InjectError> {
        ptrace::plain(libc::PTRACE_INTERRUPT, self.tid, 0, 0)
            .map(|_| ())
            .map_err(|e| self.pt_err("PTRACE_INTERRUPT", e))
    }

    /// Next ptrace event of the thread, or None at `deadline`. Polls
    /// `waitpid(__WALL | WNOHANG)`: yields first, then sleeps up to 1 ms.
    fn wait(&self, deadline: Instant) -> Option<Stop> {
        let mut polls = 0u32;
        let mut nap = Duration::from_micros(20);
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes one int through the pointer.
            let r = unsafe { libc::waitpid(self.tid, &mut status, libc::__WALL | libc::WNOHANG) };
            if r == self.tid {
                if let Some(s) = decode(status) {
                    return Some(s);
                }
                continue;
            }
            if r < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    e => return Some(Stop::Exited(format!("waitpid: {e} (it is gone)"))),
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            polls += 1;
            if polls < 200 {
                thread::yield_now();
            } else {
                thread::sleep(nap);
                // Short naps for the first few milliseconds (a thread
                // stopping after a wake-up usually takes tens of µs, and a
                // doubling nap overshoots by as much as it waited), then
                // longer ones.
                if polls > 400 {
                    nap = (nap * 2).min(Duration::from_millis(1));
                }
            }
        }
    }

    fn exited(&mut self, status: String) -> InjectError {
        self.attached = false;
        InjectError::Exited {
            pid: self.pid,
            tid: self.tid,
            status,
        }
    }

    /// Give the thread back to the kernel: our tracer thread ends and the
    /// kernel detaches the thread from whatever stop or syscall it is in.
    fn protocol(&mut self, detail: String) -> InjectError {
        tracing::error!(
            "thread {} of process {}: {detail}; releasing it",
            self.tid,
            self.pid
        );
        self.abandoned = true;
        InjectError::Protocol {
            pid: self.pid,
            tid: self.tid,
            detail,
        }
    }

    /// A wait for `what` ran out after `after`: the thread is released to
    /// the kernel.
    fn give_up(&mut self, what: String, after: Duration) -> InjectError {
        self.abandoned = true;
        InjectError::Timeout {
            pid: self.pid,
            tid: self.tid,
            what,
            after,
        }
    }

    /// Wait for a `PTRACE_EVENT_STOP` (an interrupt must be pending).
    /// Signal-delivery-stops on the way are delivered on the original
    /// registers (or suppressed if our injection caused them). Returns
    /// whether the thread ran program code meanwhile (then its registers
    /// changed). On timeout the thread is released to the kernel.
    fn wait_jobctl(&mut self, budget: Duration, what: &str) -> Result<bool, InjectError> {
        let deadline = Instant::now() + budget;
        let mut ran = false;
        loop {
            match self.wait(deadline) {
                None => return Err(self.give_up(what.to_string(), budget)),
                Some(Stop::Jobctl(sig)) => {
                    if sig != libc::SIGTRAP {
                        tracing::debug!(
                            "thread {} of process {}: group-stop ({sig})",
                            self.tid,
                            self.pid
                        );
                    }
                    self.stop = StopKind::Jobctl;
                    if ran {
                        self.ran_code += 1;
                    }
                    return Ok(ran);
                }
                Some(Stop::Signal(sig)) => {
                    let ours = self.fault_if_ours(sig);
                    self.set_orig()?;
                    if let Some((code, addr)) = ours {
                        tracing::warn!(
                            "thread {} of process {}: suppressed signal {sig} (si_code {code}, address {addr:#x}) caused by an injected syscall",
                            self.tid,
                            self.pid
                        );
                        self.resume(libc::PTRACE_CONT, 0)?;
                    } else {
                        self.resume(libc::PTRACE_CONT, sig)?;
                        ran = true;
                    }
                }
                Some(Stop::Event(ev)) => {
                    tracing::debug!(
                        "thread {} of process {}: ptrace event {ev}",
                        self.tid,
                        self.pid
                    );
                    self.resume(libc::PTRACE_CONT, 0)?
                }
                Some(Stop::Syscall) => {
                    return Err(
                        self.protocol("syscall stop while waiting for an interrupt stop".into())
                    );
                }
                Some(Stop::Exited(s)) => return Err(self.exited(s)),
            }
        }
    }

    /// A synchronous signal caused by our own code (fault in the stub, or
    /// SIGSYS from a seccomp filter on an injected syscall)?
    fn fault_if_ours(&self, sig: i32) -> Option<(i32, u64)> {
        if ![
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGSYS,
            libc::SIGTRAP,
        ]
        .contains(&sig)
        {
            return None;
        }
        // SAFETY: siginfo_t is plain data; all-zero is valid.
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes one siginfo_t into `si`, which we own.
        unsafe { ptrace::request(libc::PTRACE_GETSIGINFO, self.tid, 0, &raw mut si as u64) }
            .ok()?;
        if si.si_code <= 0 {
            return None; // sent by a process, not raised by an instruction
        }
        // SAFETY: for these signals with si_code > 0 the kernel fills the
        // fault address (`call_addr` for SIGSYS, at the same offset).
        let addr = unsafe { si.si_addr() } as u64;
        let rip = self.getregs().map(|r| arch::ip(&r)).unwrap_or(0);
        (self.is_our_code(addr) || self.is_our_code(rip)).then_some((si.si_code, addr))
    }

    fn is_our_code(&self, a: u64) -> bool {
        self.raw_syscall
            .is_some_and(|r| a.wrapping_sub(r) <= arch::SYSCALL_INSN.len() as u64)
            || self
                .scratch
                .as_ref()
                .is_some_and(|s| a.wrapping_sub(s.base) < PAGE)
    }

    // ------------------------------------------------------ original state

    /// Read the registers at a signal-path stop: they become the original
    /// ones (after the rseq abort fix-up, or rebuilt from a stub frame if
    /// the thread was left inside one of our stubs by a dead tracer).
    fn capture_original(&mut self) -> Result<(), InjectError> {
        let r = self.getregs()?;
        if let Err(reason) = arch::check_mode(&r) {
            return Err(InjectError::Unsupported {
                pid: self.pid,
                tid: self.tid,
                reason,
            });
        }
        self.orig = r;
        self.regs = RegsState::Orig;
        self.recovered = false;
        self.stopped_in_stub = None;
        // A thread of a process tern builds never ran one of its stubs
        // untraced (it dies with tern): no maps to read for one.
        if self.owned || !self.recover_from_stub()? {
            self.rseq_fixup();
        }
        self.fixed = arch::fixup(&self.orig);
        if let Some(s) = self.scratch.as_mut() {
            s.frame_dirty = true;
        }
        Ok(())
    }

    /// If RIP is in a stub of one of our scratch areas (a tern died while
    /// injecting), the thread's real state is that stub's frame: adopt it.
    fn recover_from_stub(&mut self) -> Result<bool, InjectError> {
        let rip = arch::ip(&self.orig);
        let maps = proc::read_maps(self.pid)?;
        let Some(v) = maps.iter().find(|v| (v.start..v.end).contains(&rip)) else {
            return Ok(false);
        };
        if !v.perms.exec || (v.name_or_empty() != MAPS_NAME && !(v.name.is_none() && v.inode == 0))
        {
            return Ok(false);
        }
        let bases = proc::scratch_in_maps(self.pid, &maps);
        let Some(&base) = bases.iter().find(|&&b| rip.wrapping_sub(b) < PAGE) else {
            return Ok(false);
        };
        let off = crate::usize_of(rip - base);
        if !(STUB_OFF..STUB_OFF + SLOTS * STUB_STRIDE).contains(&off) {
            return Ok(false);
        }
        let slot = (off - STUB_OFF) / STUB_STRIDE;
        let mut f = vec![0u8; FRAME_STRIDE];
        self.read_mem(base + (FRAMES_OFF + slot * FRAME_STRIDE) as u64, &mut f)?;
        let (magic, owner) = arch::frame_owner(&f);
        if magic != FRAME_MAGIC || owner != self.tid as u64 {
            return Err(InjectError::ScratchInUse {
                pid: self.pid,
                tid: self.tid,
                addr: base,
                by: format!(
                    "the thread is inside stub {slot} at {rip:#x}, whose frame belongs to thread {}; it cannot be resumed safely by tern",
                    owner as i64
                ),
            });
        }
        // The frame holds already fixed-up registers: no restart pending.
        self.orig = arch::regs_from_frame(&f, &self.orig);
        self.regs = RegsState::Other;
        self.recovered = true;
        self.stopped_in_stub = Some(rip);
        tracing::info!(
            "thread {} of process {}: was inside tern stub {slot} of {base:#x} (an earlier tern died while injecting); resuming it from the stub frame",
            self.tid,
            self.pid
        );
        Ok(true)
    }

    /// If the thread was stopped inside an rseq critical section, move RIP
    /// to its abort handler, as the kernel does for a preempted thread.
    fn rseq_fixup(&mut self) {
        let mut conf = PtraceRseqConfiguration::default();
        // SAFETY: the kernel writes at most `addr` = size_of::<conf>()
        // bytes into `conf`, which we own.
        let r = unsafe {
            ptrace::request(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.tid,
                std::mem::size_of::<PtraceRseqConfiguration>() as u64,
                &raw mut conf as u64,
            )
        };
        if r.is_err() || conf.rseq_abi_pointer == 0 {
            return;
        }
        let mut b = [0u8; 8];
        if self.read_mem(conf.rseq_abi_pointer + 8, &mut b).is_err() {
            return;
        }
        let cs = u64::from_le_bytes(b);
        if cs == 0 {
            return;
        }
        // struct rseq_cs { u32 version, flags; u64 start_ip, post_commit_offset, abort_ip }
        let mut d = [0u8; 32];
        if self.read_mem(cs, &mut d).is_err() {
            return;
        }
        let q = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap());
        let (start, len, abort) = (q(8), q(16), q(24));
        if arch::ip(&self.orig).wrapping_sub(start) >= len {
            return;
        }
        let mut sig = [0u8; 4];
        if self.read_mem(abort.wrapping_sub(4), &mut sig).is_err()
            || u32::from_le_bytes(sig) != conf.signature
        {
            return; // the kernel would kill the thread here; leave it be
        }
        tracing::debug!(
            "thread {} of process {}: stopped in an rseq critical section at {:#x}; resuming at its abort handler {abort:#x}",
            self.tid,
            self.pid,
            arch::ip(&self.orig)
        );
        arch::set_ip(&mut self.orig, abort);
        self.regs = RegsState::Other;
        self.rseq_aborted = true;
    }

    // ------------------------------------------------------------ injection

    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
        if self.scratch.is_none() {
            return Err(InjectError::NoScratch {
                pid: self.pid,
                tid: self.tid,
            });
        }
        let r = self.inject(nr, args, false);
        if let Some(s) = self.scratch.as_mut() {
            s.data_reset = true;
        }
        r
    }

    pub fn batch_data_addr(&mut self) -> Result<u64, InjectError> {
        let (pid, tid) = (self.pid, self.tid);
        let s = self
            .scratch
            .as_ref()
            .ok_or(InjectError::NoScratch { pid, tid })?;
        Ok(s.base + (DATA_OFF + s.claim.slot * DATA_STRIDE) as u64)
    }

    /// See `Injector::syscall_batch`.
    pub fn syscall_batch(
        &mut self,
        calls: &[super::Syscall],
        data: &[u8],
    ) -> Result<Vec<i64>, InjectError> {
        let (pid, tid) = (self.pid, self.tid);
        let base = self.batch_data_addr()?;
        let table_off = data.len().next_multiple_of(BATCH_ENTRY);
        let room = DATA_STRIDE.saturating_sub(table_off) / BATCH_ENTRY;
        if data.len() > DATA_STRIDE || (room == 0 && !calls.is_empty()) {
            return Err(InjectError::ScratchFull {
                pid,
                tid,
                requested: table_off + BATCH_ENTRY,
                available: DATA_STRIDE,
                capacity: DATA_STRIDE,
            });
        }
        if !data.is_empty() {
            self.write_mem(base, data, "")?;
        }
        if let Some(s) = self.scratch.as_mut() {
            // Data written with `scratch_data` before is overwritten.
            s.data_reset = true;
        }
        let failed = |c: &super::Syscall, r: i64| !c.may_fail && (-4095..0).contains(&r);
        let mut out = Vec::with_capacity(calls.len());
        if !self.owned {
            for c in calls {
                let r = self.inject(c.nr, c.args, false)?;
                out.push(r);
                if failed(c, r) {
                    break;
                }
            }
            return Ok(out);
        }
        let table = base + table_off as u64;
        for chunk in calls.chunks(room.max(1)) {
            let mut t = Vec::with_capacity(chunk.len() * BATCH_ENTRY);
            for c in chunk {
                t.extend_from_slice(&c.nr.to_ne_bytes());
                for a in c.args {
                    t.extend_from_slice(&a.to_ne_bytes());
                }
                t.extend_from_slice(&u64::from(c.may_fail).to_ne_bytes());
            }
            self.write_mem(table, &t, "")?;
            let ran = self.run_batch(table, chunk.len())?;
            self.read_mem(table, &mut t[..ran * BATCH_ENTRY])?;
            for (k, e) in t[..ran * BATCH_ENTRY].chunks_exact(BATCH_ENTRY).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(&e[56..64]);
                let r = i64::from_ne_bytes(w);
                out.push(r);
                if failed(&chunk[k], r) {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Run the batch stub over the `count` entries at `table` and wait for
    /// its trap; returns how many entries ran.
    fn run_batch(&mut self, table: u64, count: usize) -> Result<usize, InjectError> {
        if self.released() {
            return Err(InjectError::Released {
                pid: self.pid,
                tid: self.tid,
            });
        }
        let Some(entry) = self.scratch.as_ref().map(|s| s.base + BATCH_OFF as u64) else {
            return Err(InjectError::NoScratch {
                pid: self.pid,
                tid: self.tid,
            });
        };
        let deadline = Instant::now() + self.timeout;
        let sp = arch::sp(&self.orig).wrapping_sub(STACK_GAP) & !15;
        let r = arch::batch_regs(&self.fixed, entry, sp, table, count as u64);
        self.setregs(&r)?;
        self.regs = RegsState::Other;
        self.resume(libc::PTRACE_CONT, 0)?;
        // Signals that came during the batch: sent again after it.
        let mut held = Vec::new();
        let at = loop {
            match self.wait(deadline) {
                // A thread of a process tern builds: it dies with the
                // injector (see Drop), never resumed half-way.
                None => {
                    let after = self.timeout;
                    return Err(
                        self.give_up(format!("a batch of {count} injected syscalls"), after)
                    );
                }
                Some(Stop::Signal(sig)) => {
                    let regs = self.getregs()?;
                    if sig == libc::SIGTRAP && arch::ip(&regs) == entry + arch::BATCH_TRAP_PC as u64
                    {
                        break regs;
                    }
                    if let Some((code, addr)) = self.fault_if_ours(sig) {
                        return Err(self.suppress_fault(sig, code, addr));
                    }
                    held.push(sig);
                    self.resume(libc::PTRACE_CONT, 0)?;
                }
                Some(Stop::Jobctl(_) | Stop::Event(_)) => self.resume(libc::PTRACE_CONT, 0)?,
                Some(Stop::Syscall) => {
                    return Err(self.protocol("a syscall stop during a batch of syscalls".into()));
                }
                Some(Stop::Exited(s)) => return Err(self.exited(s)),
            }
        };
        // Not a stop before user code with the registers it returns with:
        // detach stops it once more first, as after a syscall.
        self.stop = StopKind::SyscallExit;
        self.set_fixed()?;
        // Sent again once the thread is let go: now it would only stop the
        // next injection.
        for sig in held {
            tracing::debug!(
                "thread {} of process {}: signal {sig} came during a batch of injected syscalls; held until the thread is let go",
                self.tid,
                self.pid
            );
            self.held_signals.push(sig);
        }
        let done = arch::batch_cursor(&at).wrapping_sub(table) / BATCH_ENTRY as u64;
        match usize::try_from(done) {
            Ok(n) if n >= 1 && n <= count => Ok(n),
            _ => Err(self.protocol(format!(
                "the batch stub's cursor {:#x} is outside its table at {table:#x} ({count} entries)",
                arch::batch_cursor(&at)
            ))),
        }
    }

    fn stub_entry(&mut self) -> Result<u64, InjectError> {
        let Some(s) = self.scratch.as_ref() else {
            return Err(InjectError::NoScratch {
                pid: self.pid,
                tid: self.tid,
            });
        };
        let (base, slot, dirty) = (s.base, s.claim.slot, s.frame_dirty);
        if dirty {
            let f = arch::frame(&self.fixed, self.tid, self.tid as u64)
                .map_err(|(op, e)| self.pt_err(op, e))?;
            self.write_mem(base + (FRAMES_OFF + slot * FRAME_STRIDE) as u64, &f, "")?;
            if let Some(s) = self.scratch.as_mut() {
                s.frame_dirty = false;
            }
        }
        Ok(base + (STUB_OFF + slot * STUB_STRIDE) as u64)
    }

    /// Inject one syscall through the stub (`raw` = false) or the `syscall`
    /// found in the vDSO (`raw` = true). Leaves the thread at the exit stop
    /// holding the fixed-up original registers.
    fn inject(&mut self, nr: i64, args: [u64; 6], raw: bool) -> Result<i64, InjectError> {
        if self.released() {
            return Err(InjectError::Released {
                pid: self.pid,
                tid: self.tid,
            });
        }
        let deadline = Instant::now() + self.timeout;
        'retry: loop {
            let entry = if raw {
                self.raw_syscall_addr()?
            } else {
                self.stub_entry()?
            };
            let sp = arch::sp(&self.orig).wrapping_sub(STACK_GAP) & !15;
            let r = arch::call_regs(&self.fixed, entry, sp, nr, args);
            self.setregs(&r)?;
            self.regs = RegsState::Other;
            self.resume(libc::PTRACE_SYSCALL, 0)?;
            // Up to the syscall-enter stop the thread is in the signal path
            // or about to execute `syscall`.
            loop {
                match self.wait(deadline) {
                    None => return Err(self.abort_running(nr, Phase::Enter, raw)),
                    Some(Stop::Syscall) => break,
                    Some(Stop::Jobctl(_) | Stop::Event(_)) => {
                        self.resume(libc::PTRACE_SYSCALL, 0)?;
                    }
                    Some(Stop::Signal(sig)) => {
                        if let Some((code, addr)) = self.fault_if_ours(sig) {
                            return Err(self.suppress_fault(sig, code, addr));
                        }
                        self.deliver_on_original(sig)?;
                        continue 'retry;
                    }
                    Some(Stop::Exited(s)) => return Err(self.exited(s)),
                }
            }
            self.verify_stop(PTRACE_SYSCALL_INFO_ENTRY, nr, entry)?;
            self.resume(libc::PTRACE_SYSCALL, 0)?;
            match self.wait(deadline) {
                None => return Err(self.abort_running(nr, Phase::Exit, raw)),
                Some(Stop::Syscall) => {}
                Some(Stop::Exited(s)) => return Err(self.exited(s)),
                Some(other) => {
                    return Err(self.protocol(format!(
                        "{other:?} while the injected syscall {nr} was running"
                    )));
                }
            }
            self.stop = StopKind::SyscallExit;
            let ret = self.verify_stop(PTRACE_SYSCALL_INFO_EXIT, nr, entry)?;
            self.set_fixed()?;
            if is_restart_code(ret) {
                // Interrupted by a signal: it shows up as a
                // signal-delivery-stop on the way to the next attempt.
                if Instant::now() < deadline {
                    continue 'retry;
                }
                return Err(InjectError::Timeout {
                    pid: self.pid,
                    tid: self.tid,
                    what: format!("the injected syscall {nr} (kept being interrupted by signals)"),
                    after: self.timeout,
                });
            }
            if ret == nr && !self.seccomp_suspended {
                // A seccomp RET_TRAP rolls RAX back to the syscall number
                // and queues SIGSYS.
                if let Some(addr) = self.pending_seccomp_sigsys(entry) {
                    self.drain_own_signal(deadline)?;
                    return Err(InjectError::Fault {
                        pid: self.pid,
                        tid: self.tid,
                        sig: libc::SIGSYS,
                        code: SYS_SECCOMP,
                        addr,
                        hint: " (the target's seccomp filter trapped the injected syscall; PTRACE_O_SUSPEND_SECCOMP is not in effect)",
                    });
                }
            }
            return Ok(ret);
        }
    }

    /// Check the syscall stop we are at (entry: our syscall at our
    /// address; exit), return the exit value.
    fn verify_stop(&mut self, op: u8, nr: i64, entry: u64) -> Result<i64, InjectError> {
        let insn = arch::SYSCALL_INSN.len() as u64;
        if self.have_syscall_info {
            let mut info = PtraceSyscallInfo::default();
            // SAFETY: the kernel writes at most `addr` = size_of::<info>()
            // bytes into `info`, which we own.
            let r = unsafe {
                ptrace::request(
                    PTRACE_GET_SYSCALL_INFO,
                    self.tid,
                    std::mem::size_of::<PtraceSyscallInfo>() as u64,
                    &raw mut info as u64,
                )
            };
            match r {
                Ok(_) => {
                    let ok = info.op == op
                        && (op != PTRACE_SYSCALL_INFO_ENTRY
                            || (info.data[0] == nr as u64
                                && info.instruction_pointer == entry + insn));
                    if !ok {
                        return Err(self.protocol(format!(
                            "expected the {} stop of syscall {nr} at {:#x}, got op {} nr {} at {:#x}",
                            if op == PTRACE_SYSCALL_INFO_ENTRY { "enter" } else { "exit" },
                            entry + insn,
                            info.op,
                            info.data[0] as i64,
                            info.instruction_pointer
                        )));
                    }
                    return Ok(info.data[0] as i64);
                }
                Err(Errno::EIO | Errno::EINVAL) => self.have_syscall_info = false,
                Err(e) => return Err(self.pt_err("PTRACE_GET_SYSCALL_INFO", e)),
            }
        }
        let r = self.getregs()?;
        let (at_nr, ip) = (arch::entry_nr(&r), arch::ip(&r));
        if op == PTRACE_SYSCALL_INFO_ENTRY && (at_nr != nr || ip != entry + insn) {
            return Err(self.protocol(format!(
                "expected the enter stop of syscall {nr} at {:#x}, got syscall {at_nr} at {ip:#x}",
                entry + insn,
            )));
        }
        Ok(arch::ret(&r))
    }

    /// A signal arrived before our syscall started: put the original
    /// registers back, let the kernel deliver the signal on them (it does the
    /// restart handling and builds any handler frame from them), then stop
    /// the thread again; its new registers become the original ones.
    fn deliver_on_original(&mut self, sig: i32) -> Result<(), InjectError> {
        if self.owned {
            // A process being built runs none of its code: the signal is
            // dropped here (the caller resumes with none) and sent again
            // when the thread is let go.
            tracing::debug!(
                "thread {} of process {}: signal {sig} came while it is built; held until it is let go",
                self.tid,
                self.pid
            );
            self.held_signals.push(sig);
            return Ok(());
        }
        self.set_orig()?;
        // Its handler runs: under its own filters.
        let was = self.seccomp_suspended;
        if was {
            self.suspend_seccomp(false);
        }
        let r = self.resume(libc::PTRACE_CONT, sig);
        if was {
            // Re-armed once it is stopped again (below).
            self.seccomp_suspended = false;
        }
        r?;
        self.delivered += 1;
        self.interrupt()?;
        self.wait_jobctl(
            self.timeout,
            "stopping the thread again after delivering a signal",
        )?;
        if was {
            self.suspend_seccomp(true);
        }
        self.capture_original()
    }

    /// The injection itself raised `sig` (we are at its
    /// signal-delivery-stop): drop it, restore, stop at a signal-path stop.
    fn suppress_fault(&mut self, sig: i32, code: i32, addr: u64) -> InjectError {
        let r = (|| {
            self.set_orig()?;
            self.interrupt()?;
            self.resume(libc::PTRACE_CONT, 0)?;
            self.wait_jobctl(self.timeout, "stopping the thread after a fault")?;
            Ok::<(), InjectError>(())
        })();
        if let Err(e) = r {
            return e;
        }
        InjectError::Fault {
            pid: self.pid,
            tid: self.tid,
            sig,
            code,
            addr,
            hint: if sig == libc::SIGSYS && code == SYS_SECCOMP {
                " (the target's seccomp filter trapped the injected syscall; PTRACE_O_SUSPEND_SECCOMP is not in effect)"
            } else {
                ""
            },
        }
    }

    /// Is a SIGSYS raised by seccomp for the syscall at `entry` queued for
    /// the thread? (PTRACE_PEEKSIGINFO on its private queue, no dequeue.)
    fn pending_seccomp_sigsys(&self, entry: u64) -> Option<u64> {
        // SAFETY: siginfo_t is plain data; all-zero is valid.
        let mut buf: [libc::siginfo_t; 8] = unsafe { std::mem::zeroed() };
        let args = PtracePeeksiginfoArgs {
            off: 0,
            flags: 0,
            nr: i32::try_from(buf.len()).unwrap_or(0),
        };
        // SAFETY: the kernel reads `args` and writes at most `nr` =
        // buf.len() siginfos into `buf`, which we own.
        let n = unsafe {
            ptrace::request(
                PTRACE_PEEKSIGINFO,
                self.tid,
                &raw const args as u64,
                buf.as_mut_ptr() as u64,
            )
        }
        .ok()?;
        buf.iter()
            .take(usize::try_from(n).unwrap_or(0))
            .find_map(|si| {
                // SAFETY: SIGSYS with SYS_SECCOMP carries call_addr at si_addr's offset.
                let addr = unsafe { si.si_addr() } as u64;
                (si.si_signo == libc::SIGSYS
                    && si.si_code == SYS_SECCOMP
                    && addr == entry + arch::SYSCALL_INSN.len() as u64)
                    .then_some(addr)
            })
    }

    /// At an exit stop with our SIGSYS queued: let the thread dequeue it
    /// (a signal-delivery-stop, before any user instruction), drop it, and
    /// stop in the signal path.
    fn drain_own_signal(&mut self, deadline: Instant) -> Result<(), InjectError> {
        self.set_fixed()?;
        self.resume(libc::PTRACE_CONT, 0)?;
        loop {
            match self.wait(deadline) {
                None => {
                    self.abandoned = true;
                    return Err(InjectError::Timeout {
                        pid: self.pid,
                        tid: self.tid,
                        what: "dequeuing the SIGSYS caused by an injected syscall".into(),
                        after: self.timeout,
                    });
                }
                Some(Stop::Signal(sig)) => {
                    if self.fault_if_ours(sig).is_some() {
                        self.set_orig()?;
                        self.interrupt()?;
                        self.resume(libc::PTRACE_CONT, 0)?;
                        self.wait_jobctl(self.timeout, "stopping the thread after a fault")?;
                        return Ok(());
                    }
                    self.deliver_on_original(sig)?;
                    self.resume(libc::PTRACE_CONT, 0)?;
                }
                Some(Stop::Jobctl(_) | Stop::Event(_)) => {
                    self.stop = StopKind::Jobctl;
                    self.set_orig()?;
                    self.resume(libc::PTRACE_CONT, 0)?;
                }
                Some(Stop::Syscall) => {
                    return Err(self.protocol("syscall stop while dequeuing a signal".into()));
                }
                Some(Stop::Exited(s)) => return Err(self.exited(s)),
            }
        }
    }

    /// The injected syscall did not reach its enter (or exit) stop in time:
    /// interrupt it and restore; if even that fails, release the thread.
    fn abort_running(&mut self, nr: i64, mut phase: Phase, raw: bool) -> InjectError {
        let timeout_err = InjectError::Timeout {
            pid: self.pid,
            tid: self.tid,
            what: format!("the injected syscall {nr}"),
            after: self.timeout,
        };
        let grace = self
            .timeout
            .max(Duration::from_secs(if raw { 10 } else { 1 }));
        let stuck = |t: &mut Tracee| {
            t.abandoned = true;
            InjectError::Stuck {
                pid: t.pid,
                tid: t.tid,
                nr,
                after: t.timeout + grace,
                outcome: if raw {
                    "will most likely crash when the syscall returns into the vDSO with injected registers"
                } else {
                    "will finish the syscall and resume where it was stopped, through the scratch stub"
                },
            }
        };
        if self.interrupt().is_err() {
            return stuck(self);
        }
        let deadline = Instant::now() + grace;
        loop {
            let step: Result<bool, InjectError> = match self.wait(deadline) {
                None => return stuck(self),
                Some(Stop::Syscall) if phase == Phase::Enter => {
                    // Skip the syscall at the enter stop.
                    (|| {
                        let mut r = self.getregs()?;
                        arch::skip_syscall(&mut r);
                        self.setregs(&r)?;
                        self.resume(libc::PTRACE_SYSCALL, 0)?;
                        Ok(false)
                    })()
                    .inspect(|_| phase = Phase::Exit)
                }
                Some(Stop::Syscall) => {
                    self.stop = StopKind::SyscallExit;
                    self.set_fixed().map(|_| true)
                }
                Some(Stop::Jobctl(_)) if phase == Phase::Enter => {
                    self.stop = StopKind::Jobctl;
                    self.set_orig().map(|_| true)
                }
                Some(Stop::Signal(sig)) if phase == Phase::Enter => {
                    self.deliver_on_original(sig).map(|_| true)
                }
                Some(Stop::Exited(s)) => return self.exited(s),
                Some(other) => {
                    return self.protocol(format!(
                        "{other:?} while interrupting the injected syscall {nr}"
                    ));
                }
            };
            match step {
                Ok(true) => return timeout_err,
                Ok(false) => {}
                Err(e) => {
                    if !self.released() {
                        self.abandoned = true;
                    }
                    return e;
                }
            }
        }
    }

    // -------------------------------------------------------------- memory

    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), InjectError> {
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|source| InjectError::Mem {
                pid: self.pid,
                tid: self.tid,
                op: "reading",
                addr,
                hint: "",
                source,
            })
    }

    fn write_mem(&self, addr: u64, data: &[u8], hint: &'static str) -> Result<(), InjectError> {
        self.mem
            .write_all_at(data, addr)
            .map_err(|source| InjectError::Mem {
                pid: self.pid,
                tid: self.tid,
                op: "writing",
                addr,
                hint,
                source,
            })
    }

    pub fn read_memory(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, InjectError> {
        let mut v = vec![0u8; len];
        self.read_mem(addr, &mut v)?;
        Ok(v)
    }

    /// Address of a `syscall` instruction already in the target: in
    /// `[vdso]`, else in any other executable mapping.
    fn raw_syscall_addr(&mut self) -> Result<u64, InjectError> {
        // Looked up every time (twice per session at most): the vDSO may
        // have moved since (a restore mremaps it).
        if let Some(a) = self.syscall_in_forked_vdso() {
            self.raw_syscall = Some(a);
            return Ok(a);
        }
        let maps = proc::read_maps(self.pid)?;
        let mut cands: Vec<_> = maps
            .iter()
            .filter(|v| {
                v.perms.exec
                    && v.perms.read
                    && v.name_or_empty() != "[vsyscall]"
                    && v.name_or_empty() != MAPS_NAME
                    && !(v.name.is_none() && v.inode == 0)
            })
            .collect();
        cands.sort_by_key(|v| v.name_or_empty() != "[vdso]");
        for v in cands {
            let len = (v.end - v.start).min(4 << 20) as usize;
            let mut buf = vec![0u8; len];
            if self.mem.read_exact_at(&mut buf, v.start).is_err() {
                continue;
            }
            if let Some(a) = arch::find_syscall_insn(&buf, v.start) {
                tracing::debug!(
                    "process {}: using the syscall instruction at {a:#x} ({})",
                    self.pid,
                    v.name_or_empty()
                );
                self.raw_syscall = Some(a);
                return Ok(a);
            }
        }
        Err(InjectError::NoSyscallInstruction {
            pid: self.pid,
            tid: self.tid,
        })
    }

    /// A process tern builds starts as a fork of tern: its vDSO is tern's,
    /// at the address tern's own auxv gives (the target's auxv says the
    /// same). Then the first `syscall` in it is found without reading and
    /// parsing the target's maps (~100 µs of a restore).
    fn syscall_in_forked_vdso(&self) -> Option<u64> {
        if !self.owned {
            return None;
        }
        // SAFETY: getauxval has no preconditions.
        let ours = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
        let auxv = std::fs::read(format!("/proc/{}/auxv", self.pid)).ok()?;
        let theirs = auxv.chunks_exact(16).find_map(|e| {
            let k = u64::from_ne_bytes(e[..8].try_into().ok()?);
            let v = u64::from_ne_bytes(e[8..].try_into().ok()?);
            (k == libc::AT_SYSINFO_EHDR).then_some(v)
        })?;
        if ours == 0 || theirs != ours {
            return None;
        }
        // The vDSO's code pages, as far as they read.
        let mut code = Vec::new();
        for page in 0..4u64 {
            let mut buf = vec![0u8; crate::usize_of(PAGE)];
            if self
                .mem
                .read_exact_at(&mut buf, ours + page * PAGE)
                .is_err()
            {
                break;
            }
            code.extend_from_slice(&buf);
        }
        let a = arch::find_syscall_insn(&code, ours)?;
        tracing::debug!(
            "process {}: using the syscall instruction at {a:#x} (the vDSO it shares with tern)",
            self.pid
        );
        Some(a)
    }

    // ------------------------------------------------------------- scratch

    pub fn ensure_scratch(&mut self, known: Option<u64>) -> Result<u64, InjectError> {
        if let Some(s) = &self.scratch {
            return Ok(s.base);
        }
        if let Some(k) = known {
            match self.validate_scratch(k) {
                Ok(()) => {
                    let claim = self.claim_slot(k)?;
                    self.scratch = Some(Scratch {
                        base: k,
                        claim,
                        frame_dirty: true,
                        data_used: 0,
                        data_reset: false,
                    });
                    return Ok(k);
                }
                Err(why) => tracing::warn!(
                    "process {}: not reusing the scratch area at {k:#x}: {why}; mapping a new one",
                    self.pid
                ),
            }
        }
        self.create_scratch()
    }

    fn validate_scratch(&self, base: u64) -> Result<(), String> {
        let maps = proc::read_maps(self.pid).map_err(|e| e.to_string())?;
        let find = |a: u64| maps.iter().find(|v| (v.start..v.end).contains(&a));
        match find(base) {
            Some(v) if v.perms.read && !v.perms.write && v.perms.exec && v.end >= base + PAGE => {}
            Some(v) => return Err(format!("mapped {} there", v.perms)),
            None => return Err("nothing mapped there".into()),
        }
        match find(base + PAGE) {
            Some(v)
                if v.perms.read && v.perms.write && !v.perms.exec && v.end >= base + LEN as u64 => {
            }
            _ => return Err("its data part is not a writable mapping of the expected size".into()),
        }
        let mut page = vec![0u8; crate::usize_of(PAGE)];
        self.read_mem(base, &mut page).map_err(|e| e.to_string())?;
        if page != arch::code_page() {
            return Err(
                "its header or stub code differs from this tern's (another version?)".into(),
            );
        }
        Ok(())
    }

    /// A free slot of the area at `base`. Not free: slots other injectors
    /// of this process hold, slots other threads are inside, and the slot
    /// this thread itself was stopped in. On arm64, a thread stopped inside
    /// an interrupted syscall resumes through the kernel's restart check
    /// (`pc == restart_addr`, the `svc` it was in): an injection through that
    /// same `svc` would be turned into `restart_syscall`.
    fn claim_slot(&self, base: u64) -> Result<SlotClaim, InjectError> {
        let stubs = base + STUB_OFF as u64;
        let mut taken = 0u32;
        if let Some(pc) = self.stopped_in_stub
            && (stubs..stubs + (SLOTS * STUB_STRIDE) as u64).contains(&pc)
        {
            taken |= 1 << (crate::usize_of(pc - stubs) / STUB_STRIDE);
        }
        for (_, pc) in proc::threads_with_pc_in(
            self.pid,
            self.tid,
            stubs,
            stubs + (SLOTS * STUB_STRIDE) as u64,
        ) {
            taken |= 1 << (crate::usize_of(pc - stubs) / STUB_STRIDE);
        }
        let mut c = claims();
        let bits = c.entry((self.pid, base)).or_insert(0);
        let Some(slot) = (0..SLOTS).find(|k| (*bits | taken) & (1 << k) == 0) else {
            if *bits == 0 {
                c.remove(&(self.pid, base));
            }
            return Err(InjectError::ScratchInUse {
                pid: self.pid,
                tid: self.tid,
                addr: base,
                by: format!(
                    "all {SLOTS} slots are taken by other injectors or by threads inside a stub"
                ),
            });
        };
        *bits |= 1 << slot;
        Ok(SlotClaim {
            pid: self.pid,
            base,
            slot,
        })
    }

    fn create_scratch(&mut self) -> Result<u64, InjectError> {
        let fixed = if self.scratch_hint != 0 {
            libc::MAP_FIXED_NOREPLACE
        } else {
            0
        };
        let ret = self.inject(
            libc::SYS_mmap,
            [
                self.scratch_hint,
                LEN as u64,
                (libc::PROT_READ | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed) as u64,
                u64::MAX,
                0,
            ],
            true,
        )?;
        if (-4095..0).contains(&ret) {
            return Err(InjectError::ScratchCreate {
                pid: self.pid,
                tid: self.tid,
                step: "mmap",
                errno: errno_of(ret),
            });
        }
        let base = ret as u64;
        if let Err(e) = self.write_mem(
            base,
            &arch::code_page(),
            "; the kernel refuses tracer writes to read-only pages through /proc/PID/mem (boot parameter proc_mem.force_override=never?)",
        ) {
            self.unmap_raw(base);
            return Err(e);
        }
        let claim = match self.claim_slot(base) {
            Ok(c) => c,
            Err(e) => {
                self.unmap_raw(base);
                return Err(e);
            }
        };
        self.scratch = Some(Scratch {
            base,
            claim,
            frame_dirty: true,
            data_used: 0,
            data_reset: false,
        });
        let r = self.inject(
            libc::SYS_mprotect,
            [
                base + PAGE,
                LEN as u64 - PAGE,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                0,
                0,
                0,
            ],
            false,
        );
        match r {
            Ok(0) => {}
            Ok(e) => {
                self.scratch = None;
                self.unmap_raw(base);
                return Err(InjectError::ScratchCreate {
                    pid: self.pid,
                    tid: self.tid,
                    step: "mprotect",
                    errno: errno_of(e),
                });
            }
            Err(e) => {
                self.scratch = None;
                if !self.released() {
                    self.unmap_raw(base);
                }
                return Err(e);
            }
        }
        // Named, and kept out of children the target forks (they do not
        // need it); one stop for both in a process tern builds.
        let r = self.syscall_batch(
            &[
                super::Syscall::new(
                    libc::SYS_prctl,
                    [
                        PR_SET_VMA,
                        PR_SET_VMA_ANON_NAME,
                        base,
                        LEN as u64,
                        base + NAME_OFF as u64,
                        0,
                    ],
                )
                .may_fail(),
                super::Syscall::new(
                    libc::SYS_madvise,
                    [base, LEN as u64, libc::MADV_DONTFORK as u64, 0, 0, 0],
                )
                .may_fail(),
            ],
            &[],
        )?;
        if let Some(&named) = r.first()
            && named != 0
        {
            tracing::debug!(
                "process {}: naming the scratch area failed ({}); it is recognised by its header",
                self.pid,
                errno_of(named)
            );
        }
        tracing::debug!("process {}: scratch area at {base:#x}", self.pid);
        Ok(base)
    }

    /// Best-effort munmap through the vDSO's `syscall` (error paths).
    fn unmap_raw(&mut self, base: u64) {
        match self.inject(libc::SYS_munmap, [base, LEN as u64, 0, 0, 0, 0], true) {
            Ok(0) => {}
            Ok(e) => tracing::warn!(
                "process {}: munmap of the scratch area at {base:#x}: {}",
                self.pid,
                errno_of(e)
            ),
            Err(e) => tracing::warn!(
                "process {}: munmap of the scratch area at {base:#x}: {e}",
                self.pid
            ),
        }
    }

    pub fn scratch_data(&mut self, bytes: &[u8]) -> Result<u64, InjectError> {
        let (pid, tid) = (self.pid, self.tid);
        let Some(s) = self.scratch.as_mut() else {
            return Err(InjectError::NoScratch { pid, tid });
        };
        if s.data_reset {
            s.data_used = 0;
            s.data_reset = false;
        }
        let off = s.data_used.next_multiple_of(16);
        if bytes.len() > DATA_STRIDE.saturating_sub(off) {
            return Err(InjectError::ScratchFull {
                pid,
                tid,
                requested: bytes.len(),
                available: DATA_STRIDE.saturating_sub(off),
                capacity: DATA_STRIDE,
            });
        }
        let addr = s.base + (DATA_OFF + s.claim.slot * DATA_STRIDE + off) as u64;
        s.data_used = off + bytes.len();
        self.write_mem(addr, bytes, "")?;
        Ok(addr)
    }

    pub fn remove_scratch(&mut self) -> Result<(), InjectError> {
        let Some(s) = self.scratch.as_ref() else {
            return Ok(());
        };
        let (base, slot) = (s.base, s.claim.slot);
        let others = claims().get(&(self.pid, base)).copied().unwrap_or(0) & !(1 << slot);
        if others != 0 {
            return Err(InjectError::ScratchInUse {
                pid: self.pid,
                tid: self.tid,
                addr: base,
                by: format!("other injectors of this tern process hold slots {others:#b}"),
            });
        }
        if let Some((t, pc)) =
            proc::threads_with_pc_in(self.pid, self.tid, base, base + PAGE).first()
        {
            return Err(InjectError::ScratchInUse {
                pid: self.pid,
                tid: self.tid,
                addr: base,
                by: format!("thread {t} is inside it at {pc:#x}"),
            });
        }
        let ret = self.inject(libc::SYS_munmap, [base, LEN as u64, 0, 0, 0, 0], true)?;
        if ret != 0 {
            return Err(InjectError::ScratchUnmap {
                pid: self.pid,
                tid: self.tid,
                addr: base,
                errno: errno_of(ret),
            });
        }
        self.scratch = None;
        Ok(())
    }

    pub fn remove_leftover_scratch(&mut self) -> Result<Vec<u64>, InjectError> {
        let Some(ours) = self.scratch_base() else {
            return Err(InjectError::NoScratch {
                pid: self.pid,
                tid: self.tid,
            });
        };
        let maps = proc::read_maps(self.pid)?;
        let mut removed = Vec::new();
        for base in proc::scratch_in_maps(self.pid, &maps) {
            if base == ours || claims().get(&(self.pid, base)).is_some_and(|b| *b != 0) {
                continue;
            }
            if let Some((t, _)) = proc::threads_with_pc_in(self.pid, 0, base, base + PAGE).first() {
                tracing::info!(
                    "process {}: keeping the leftover scratch area at {base:#x}: thread {t} is inside it",
                    self.pid
                );
                continue;
            }
            let len = proc::scratch_extent(self.pid, &maps, base);
            let ret = self.syscall(libc::SYS_munmap, [base, len, 0, 0, 0, 0])?;
            if ret == 0 {
                removed.push(base);
            } else {
                tracing::warn!(
                    "process {}: munmap of the leftover scratch area at {base:#x}: {}",
                    self.pid,
                    errno_of(ret)
                );
            }
        }
        Ok(removed)
    }

    // -------------------------------------------------------------- detach

    pub fn detach(&mut self) -> Result<(), InjectError> {
        if self.released() {
            return Ok(());
        }
        let r = self.detach_inner();
        if r.is_err() && !self.released() {
            self.abandoned = true;
        }
        self.scratch = None;
        if r.is_ok() {
            for sig in std::mem::take(&mut self.held_signals) {
                // SAFETY: tgkill(2) with plain integers.
                unsafe { libc::syscall(libc::SYS_tgkill, self.pid, self.tid, sig) };
            }
        }
        r
    }

    fn detach_inner(&mut self) -> Result<(), InjectError> {
        // From here the thread may run its own code: its filters apply.
        if self.seccomp_suspended {
            self.suspend_seccomp(false);
        }
        if self.stop == StopKind::SyscallExit {
            // Stop once more in the signal path, before any user
            // instruction, so the unmodified original registers can go back
            // and the kernel does its own restart handling.
            self.set_fixed()?;
            self.interrupt()?;
            self.resume(libc::PTRACE_CONT, 0)?;
            match self.wait_jobctl(self.timeout, "the stop before detaching") {
                Ok(true) => self.regs = RegsState::Orig, // it ran: its registers are real
                Ok(false) => {
                    let now = self.getregs()?;
                    if !arch::same_user_state(&now, &self.fixed) {
                        tracing::warn!(
                            "thread {} of process {}: registers changed before the final stop; leaving them",
                            self.tid,
                            self.pid
                        );
                        self.regs = RegsState::Orig;
                    }
                }
                Err(InjectError::Timeout { .. }) if self.abandoned => {
                    tracing::warn!(
                        "thread {} of process {}: no stop before detaching; released with its fixed-up registers",
                        self.tid,
                        self.pid
                    );
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        self.set_orig()?;
        ptrace::plain(libc::PTRACE_DETACH, self.tid, 0, 0)
            .map_err(|e| self.pt_err("PTRACE_DETACH", e))?;
        self.attached = false;
        Ok(())
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.owned && !self.released() {
            // A process being built is never let go half-made: kill it
            // (PTRACE_O_EXITKILL would, when this tracer thread ends; this
            // is sooner and does not depend on it).
            // SAFETY: kill(2) of the process we are building.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.abandon();
            return;
        }
        if let Err(e) = self.detach() {
            tracing::warn!(
                "detaching from thread {} of process {}: {e}",
                self.tid,
                self.pid
            );
        }
    }
}
