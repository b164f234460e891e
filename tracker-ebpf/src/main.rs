//! The eBPF half of tern's dirty stream: tracepoint programs, built for
//! `bpfel-unknown-none` by `tracker/build.rs` (aya-build, nightly,
//! `-Z build-std=core`) and embedded into the `tracker` crate.
//!
//! What is recorded, for every thread whose tgid is a key of [`TARGET`]:
//!
//! - `exceptions:page_fault_user` / `exceptions:page_fault_kernel` (x86 only):
//!   every *write* fault (error code bit 1) appends `page address | KEY_KERNEL`
//!   (bit 0 set for faults taken in kernel mode, i.e. `copy_to_user` & co. on
//!   the target's behalf) to the ring buffer [`FAULTS`].
//! - `syscalls:sys_{enter,exit}_{mmap,munmap,mremap,brk,madvise}`: the enter
//!   program parks the arguments in [`PENDING`] (by tid), the exit program pairs
//!   them with the return value and, if the call succeeded, pushes an [`Event`]
//!   into the ring buffer [`EVENTS`].
//! - `task:task_newtask` (creator in the target: a new thread, or a forked
//!   child process, told apart by `CLONE_THREAD`) and `sched:sched_process_exit`
//!   (a target thread exits): [`Event`]s into the same ring buffer.
//!
//! Every drop (a map or a ring buffer full) is counted in [`COUNTERS`], so
//! userspace can report how much it lost, and logged with aya-log (a warning
//! that reaches tern's log when tracker drains the stream): the 1st, 2nd,
//! 4th, 8th, ... drop of each kind on each CPU, so that a full ring does not
//! also flood the log ring.
//!
//! The record layouts, event kinds, counter slots and the tracepoint field
//! offsets read here come from `tracker-common`, which `tracker` uses too
//! (and checks the offsets against the running kernel's tracefs `format`
//! files before loading these programs).
//!
//! On a non-BPF target this crate is an empty binary, so that
//! `cargo build/clippy/test --workspace` work with the stable toolchain.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{BPF_F_NO_PREALLOC, BPF_RB_NO_WAKEUP},
        helpers::bpf_get_current_pid_tgid,
        macros::{map, tracepoint},
        maps::{Array, HashMap, PerCpuArray, RingBuf},
        programs::TracePointContext,
    };
    use aya_log_ebpf::warn;
    use tracker_common::{
        CLONE_THREAD, Event, KEY_KERNEL,
        counter::{
            EVENTS_LOST, KERNEL_WRITE_FAULTS, N as N_COUNTERS, PAGES_LOST, PENDING_LOST,
            USER_WRITE_FAULTS,
        },
        event,
        tracepoint::{
            BRK_ARGS, FAULT_ADDRESS, FAULT_ERROR_CODE, MADVISE_ARGS, MAX_SYSCALL_ARGS, MMAP_ARGS,
            MREMAP_ARGS, MUNMAP_ARGS, NEWTASK_CLONE_FLAGS, NEWTASK_PID, SYSCALL_ARGS, SYSCALL_RET,
        },
    };

    /// A syscall between its enter and exit tracepoints (eBPF side only).
    #[repr(C)]
    pub struct Pending {
        pub kind: u32,
        pub pad: u32,
        pub args: [u64; MAX_SYSCALL_ARGS],
    }

    /// Target tgids (value unused).
    #[map]
    static TARGET: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

    /// One record per write fault: `page | KEY_KERNEL?` (8 bytes, 16 with the
    /// ring's header). A ring rather than a per-page hash map because a
    /// fault then costs a short sequential write instead of a random bucket
    /// and element in a 64 MiB table (measured: ~0.85 us more per fault with
    /// the hash map, ~40% of the whole write-protect fault; ~0.25 us with the
    /// ring). 32 MiB hold 2M
    /// faults between two drains; userspace counts repeats of a page.
    #[map]
    static FAULTS: RingBuf = RingBuf::with_byte_size(1 << 25, 0);

    /// tid -> arguments of an in-flight address-space syscall.
    #[map]
    static PENDING: HashMap<u32, Pending> = HashMap::with_max_entries(1 << 14, BPF_F_NO_PREALLOC);

    /// Monotonic counters, summed over CPUs by userspace.
    #[map]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(N_COUNTERS, 0);

    /// Address-space and thread events, in order.
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

    /// Userspace-only state that must live as long as the (possibly pinned)
    /// stream: counter baselines of the previous drain, target pid, start time.
    #[map]
    static STATE: Array<u64> = Array::with_max_entries(32, 0);

    /// Count one more in slot `idx` of this CPU; the new count (0 if the
    /// slot is missing).
    #[inline(always)]
    fn bump(idx: u32) -> u64 {
        match COUNTERS.get_ptr_mut(idx) {
            Some(p) => {
                // Per-CPU slot, and tracepoint programs do not migrate: no atomics needed.
                unsafe {
                    *p += 1;
                    *p
                }
            }
            None => 0,
        }
    }

    /// Log the `n`-th drop of a kind on this CPU? The 1st, 2nd, 4th, 8th, ...:
    /// a ring that stays full must not flood the log ring too.
    #[inline(always)]
    fn log_drop(n: u64) -> bool {
        n.is_power_of_two()
    }

    #[inline(always)]
    fn current_is_target() -> bool {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        TARGET.get_ptr(tgid).is_some()
    }

    #[inline(always)]
    fn on_fault(ctx: &TracePointContext, kernel: bool) {
        if !current_is_target() {
            return;
        }
        let Ok(error_code) = (unsafe { ctx.read_at::<u64>(FAULT_ERROR_CODE) }) else {
            return;
        };
        if error_code & 2 == 0 {
            return;
        }
        let Ok(address) = (unsafe { ctx.read_at::<u64>(FAULT_ADDRESS) }) else {
            return;
        };
        if address >> 63 != 0 {
            // A kernel address (not the target's memory).
            return;
        }
        bump(if kernel {
            KERNEL_WRITE_FAULTS
        } else {
            USER_WRITE_FAULTS
        });
        let key = (address & !0xfff) | if kernel { KEY_KERNEL } else { 0 };
        // No wakeup: nobody polls this ring, userspace drains it each round.
        if FAULTS.output::<u64>(key, BPF_RB_NO_WAKEUP as u64).is_err() {
            let n = bump(PAGES_LOST);
            if log_drop(n) {
                let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
                warn!(
                    ctx,
                    target: "tracker::ebpf",
                    "eBPF FAULTS ring buffer full: a write fault of pid {} dropped ({} on this CPU since the stream was loaded); drain more often",
                    tgid,
                    n
                );
            }
        }
    }

    #[tracepoint]
    pub fn page_fault_user(ctx: TracePointContext) -> u32 {
        on_fault(&ctx, false);
        0
    }

    #[tracepoint]
    pub fn page_fault_kernel(ctx: TracePointContext) -> u32 {
        on_fault(&ctx, true);
        0
    }

    #[inline(always)]
    fn push(ctx: &TracePointContext, kind: u32, tid: u32, args: [u64; 5]) {
        match EVENTS.reserve::<Event>(0) {
            Some(mut entry) => {
                entry.write(Event { kind, tid, args });
                entry.submit(0);
                bump(tracker_common::counter::EVENTS);
            }
            None => {
                let n = bump(EVENTS_LOST);
                if log_drop(n) {
                    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
                    warn!(
                        ctx,
                        target: "tracker::ebpf",
                        "eBPF EVENTS ring buffer full: event '{}' of pid {} thread {} dropped ({} on this CPU since the stream was loaded); drain more often",
                        event::name(kind),
                        tgid,
                        tid,
                        n
                    );
                }
            }
        }
    }

    /// sys_enter_*: the arguments, 8 bytes each, from `SYSCALL_ARGS`.
    #[inline(always)]
    fn on_enter(ctx: &TracePointContext, kind: u32, nargs: usize) {
        if !current_is_target() {
            return;
        }
        let mut args = [0u64; MAX_SYSCALL_ARGS];
        let mut i = 0;
        while i < nargs && i < MAX_SYSCALL_ARGS {
            args[i] = unsafe { ctx.read_at::<u64>(SYSCALL_ARGS + 8 * i) }.unwrap_or(0);
            i += 1;
        }
        if kind == event::BRK && args[0] == 0 {
            // brk(0) only asks where the break is.
            return;
        }
        let tid = bpf_get_current_pid_tgid() as u32;
        let pending = Pending { kind, pad: 0, args };
        if PENDING.insert(tid, pending, 0).is_err() {
            let n = bump(PENDING_LOST);
            if log_drop(n) {
                let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
                warn!(
                    ctx,
                    target: "tracker::ebpf",
                    "eBPF PENDING map full: {} of pid {} thread {} not followed ({} on this CPU since the stream was loaded)",
                    event::name(kind),
                    tgid,
                    tid,
                    n
                );
            }
        }
    }

    /// sys_exit_*: `ret` at `SYSCALL_RET`.
    #[inline(always)]
    fn on_exit(ctx: &TracePointContext, kind: u32) {
        let tid = bpf_get_current_pid_tgid() as u32;
        let Some(p) = PENDING.get_ptr(tid) else {
            return;
        };
        let (pkind, a) = unsafe { ((*p).kind, (*p).args) };
        let _ = PENDING.remove(tid);
        if pkind != kind || !current_is_target() {
            return;
        }
        let ret = unsafe { ctx.read_at::<i64>(SYSCALL_RET) }.unwrap_or(-1);
        if (-4095..0).contains(&ret) {
            // Failed: the address space did not change.
            return;
        }
        push(ctx, kind, tid, [a[0], a[1], a[2], a[3], ret as u64]);
    }

    #[tracepoint]
    pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, event::MMAP, MMAP_ARGS);
        0
    }
    #[tracepoint]
    pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, event::MMAP);
        0
    }
    #[tracepoint]
    pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, event::MUNMAP, MUNMAP_ARGS);
        0
    }
    #[tracepoint]
    pub fn sys_exit_munmap(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, event::MUNMAP);
        0
    }
    #[tracepoint]
    pub fn sys_enter_mremap(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, event::MREMAP, MREMAP_ARGS);
        0
    }
    #[tracepoint]
    pub fn sys_exit_mremap(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, event::MREMAP);
        0
    }
    #[tracepoint]
    pub fn sys_enter_brk(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, event::BRK, BRK_ARGS);
        0
    }
    #[tracepoint]
    pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, event::BRK);
        0
    }
    #[tracepoint]
    pub fn sys_enter_madvise(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, event::MADVISE, MADVISE_ARGS);
        0
    }
    #[tracepoint]
    pub fn sys_exit_madvise(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, event::MADVISE);
        0
    }

    /// task:task_newtask, run by the creating task: the new task's `pid` and
    /// `clone_flags`.
    #[tracepoint]
    pub fn task_newtask(ctx: TracePointContext) -> u32 {
        if !current_is_target() {
            return 0;
        }
        let child = unsafe { ctx.read_at::<i32>(NEWTASK_PID) }.unwrap_or(0) as u32;
        let flags = unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS) }.unwrap_or(0);
        let kind = if flags & CLONE_THREAD != 0 {
            event::THREAD_CREATED
        } else {
            event::CHILD_PROCESS
        };
        let parent = bpf_get_current_pid_tgid() as u32;
        push(&ctx, kind, child, [parent as u64, flags, 0, 0, 0]);
        0
    }

    /// sched:sched_process_exit, run by the exiting thread itself.
    #[tracepoint]
    pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
        if !current_is_target() {
            return 0;
        }
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = PENDING.remove(tid);
        push(&ctx, event::THREAD_EXITED, tid, [0; 5]);
        0
    }

    #[unsafe(no_mangle)]
    #[unsafe(link_section = "license")]
    pub static LICENSE: [u8; 4] = *b"GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
