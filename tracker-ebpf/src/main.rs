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
//! userspace can report how much it lost. The layouts here are mirrored by
//! `tracker/src/ebpf.rs`; keep them in sync.
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

    /// Bit 0 of a [`FAULTS`] record: the fault was taken in kernel mode.
    const KEY_KERNEL: u64 = 1;

    // Event kinds (the `kind` field of [`Event`]).
    const EV_MMAP: u32 = 1;
    const EV_MUNMAP: u32 = 2;
    const EV_MREMAP: u32 = 3;
    const EV_BRK: u32 = 4;
    const EV_MADVISE: u32 = 5;
    const EV_THREAD_CREATED: u32 = 16;
    const EV_THREAD_EXITED: u32 = 17;
    const EV_CHILD_PROCESS: u32 = 18;

    // Indices into [`COUNTERS`].
    const C_USER_WRITE_FAULTS: u32 = 0;
    const C_KERNEL_WRITE_FAULTS: u32 = 1;
    const C_PAGES_LOST: u32 = 2;
    const C_EVENTS: u32 = 3;
    const C_EVENTS_LOST: u32 = 4;
    const C_PENDING_LOST: u32 = 5;
    const N_COUNTERS: u32 = 8;

    const CLONE_THREAD: u64 = 0x0001_0000;

    /// One ring-buffer record; `args` depends on `kind` (see tracker/src/ebpf.rs).
    #[repr(C)]
    pub struct Event {
        pub kind: u32,
        pub tid: u32,
        pub args: [u64; 5],
    }

    /// A syscall between its enter and exit tracepoints.
    #[repr(C)]
    pub struct Pending {
        pub kind: u32,
        pub pad: u32,
        pub args: [u64; 4],
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

    #[inline(always)]
    fn bump(idx: u32) {
        if let Some(p) = COUNTERS.get_ptr_mut(idx) {
            // Per-CPU slot, and tracepoint programs do not migrate: no atomics needed.
            unsafe { *p += 1 };
        }
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
        // exceptions:page_fault_{user,kernel}: address @8, ip @16, error_code @24.
        let Ok(error_code) = (unsafe { ctx.read_at::<u64>(24) }) else {
            return;
        };
        if error_code & 2 == 0 {
            return;
        }
        let Ok(address) = (unsafe { ctx.read_at::<u64>(8) }) else {
            return;
        };
        if address >> 63 != 0 {
            // A kernel address (not the target's memory).
            return;
        }
        bump(if kernel {
            C_KERNEL_WRITE_FAULTS
        } else {
            C_USER_WRITE_FAULTS
        });
        let key = (address & !0xfff) | if kernel { KEY_KERNEL } else { 0 };
        // No wakeup: nobody polls this ring, userspace drains it each round.
        if FAULTS.output::<u64>(key, BPF_RB_NO_WAKEUP as u64).is_err() {
            bump(C_PAGES_LOST);
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
    fn push(kind: u32, tid: u32, args: [u64; 5]) {
        match EVENTS.reserve::<Event>(0) {
            Some(mut entry) => {
                entry.write(Event { kind, tid, args });
                entry.submit(0);
                bump(C_EVENTS);
            }
            None => bump(C_EVENTS_LOST),
        }
    }

    /// sys_enter_*: `__syscall_nr` @8, then the arguments, 8 bytes each, from @16.
    #[inline(always)]
    fn on_enter(ctx: &TracePointContext, kind: u32, nargs: usize) {
        if !current_is_target() {
            return;
        }
        let mut args = [0u64; 4];
        let mut i = 0;
        while i < nargs && i < 4 {
            args[i] = unsafe { ctx.read_at::<u64>(16 + 8 * i) }.unwrap_or(0);
            i += 1;
        }
        if kind == EV_BRK && args[0] == 0 {
            // brk(0) only asks where the break is.
            return;
        }
        let tid = bpf_get_current_pid_tgid() as u32;
        let pending = Pending { kind, pad: 0, args };
        if PENDING.insert(tid, pending, 0).is_err() {
            bump(C_PENDING_LOST);
        }
    }

    /// sys_exit_*: `__syscall_nr` @8, `ret` @16.
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
        let ret = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1);
        if (-4095..0).contains(&ret) {
            // Failed: the address space did not change.
            return;
        }
        push(kind, tid, [a[0], a[1], a[2], a[3], ret as u64]);
    }

    #[tracepoint]
    pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, EV_MMAP, 4);
        0
    }
    #[tracepoint]
    pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, EV_MMAP);
        0
    }
    #[tracepoint]
    pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, EV_MUNMAP, 2);
        0
    }
    #[tracepoint]
    pub fn sys_exit_munmap(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, EV_MUNMAP);
        0
    }
    #[tracepoint]
    pub fn sys_enter_mremap(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, EV_MREMAP, 4);
        0
    }
    #[tracepoint]
    pub fn sys_exit_mremap(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, EV_MREMAP);
        0
    }
    #[tracepoint]
    pub fn sys_enter_brk(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, EV_BRK, 1);
        0
    }
    #[tracepoint]
    pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, EV_BRK);
        0
    }
    #[tracepoint]
    pub fn sys_enter_madvise(ctx: TracePointContext) -> u32 {
        on_enter(&ctx, EV_MADVISE, 3);
        0
    }
    #[tracepoint]
    pub fn sys_exit_madvise(ctx: TracePointContext) -> u32 {
        on_exit(&ctx, EV_MADVISE);
        0
    }

    /// task:task_newtask, run by the creating task: `pid` @8, `comm[16]` @12,
    /// `clone_flags` @32.
    #[tracepoint]
    pub fn task_newtask(ctx: TracePointContext) -> u32 {
        if !current_is_target() {
            return 0;
        }
        let child = unsafe { ctx.read_at::<i32>(8) }.unwrap_or(0) as u32;
        let flags = unsafe { ctx.read_at::<u64>(32) }.unwrap_or(0);
        let kind = if flags & CLONE_THREAD != 0 {
            EV_THREAD_CREATED
        } else {
            EV_CHILD_PROCESS
        };
        let parent = bpf_get_current_pid_tgid() as u32;
        push(kind, child, [parent as u64, flags, 0, 0, 0]);
        0
    }

    /// sched:sched_process_exit, run by the exiting thread itself.
    #[tracepoint]
    pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
        if !current_is_target() {
            return 0;
        }
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = PENDING.remove(tid);
        push(EV_THREAD_EXITED, tid, [0; 5]);
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
