//! What tern's eBPF programs (`tracker-ebpf`, built for `bpfel-unknown-none`)
//! and their userspace loader (`tracker::ebpf`) agree on, written once:
//!
//! - the record of the `EVENTS` ring buffer ([`Event`]) and its kinds
//!   ([`event`]);
//! - the record of the `FAULTS` ring buffer (a page address, [`KEY_KERNEL`]);
//! - the slots of the per-CPU `COUNTERS` array ([`counter`]);
//! - the tracepoints the programs read and the offset and size of every field
//!   they read in each record ([`tracepoint`]). The programs read fixed
//!   offsets; `tracker` checks them against tracefs's `format` files of the
//!   running kernel before it loads the programs ([`tracepoint::LAYOUTS`]).
//!
//! `no_std`, no dependencies on the eBPF side; the `user` feature (tracker)
//! adds `aya::Pod` for the records so that userspace can read them out of maps.
#![no_std]

/// Bit 0 of a `FAULTS` record (`page address | KEY_KERNEL`): the write fault
/// was taken in kernel mode (`copy_to_user` & co. on the target's behalf).
pub const KEY_KERNEL: u64 = 1;

/// Size of one `FAULTS` record: the page address, with [`KEY_KERNEL`].
pub const FAULT_RECORD_SIZE: usize = core::mem::size_of::<u64>();

/// One record of the `EVENTS` ring buffer: an address-space change or a
/// thread event of the target. `args` depends on `kind`:
///
/// | kind                  | tid              | args[0..4]              | args[4]          |
/// |-----------------------|------------------|-------------------------|------------------|
/// | `MMAP` .. `MADVISE`   | calling thread   | first 4 syscall args (0 past the syscall's count) | return value |
/// | `THREAD_CREATED`      | the new thread   | creator tid, clone flags, 0, 0 | 0         |
/// | `CHILD_PROCESS`       | the child's pid  | creator tid, clone flags, 0, 0 | 0         |
/// | `THREAD_EXITED`       | the exiting thread | 0                     | 0                |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// One of the [`event`] kinds.
    pub kind: u32,
    pub tid: u32,
    pub args: [u64; 5],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers only, no padding (4 + 4 + 5 * 8 bytes, checked
// below): every bit pattern is a valid `Event`.
unsafe impl aya::Pod for Event {}

/// Size of one `EVENTS` record.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();
const _: () = assert!(EVENT_SIZE == 48, "Event has padding");

/// The `kind` of an [`Event`].
pub mod event {
    /// `mmap` succeeded.
    pub const MMAP: u32 = 1;
    /// `munmap` succeeded.
    pub const MUNMAP: u32 = 2;
    /// `mremap` succeeded.
    pub const MREMAP: u32 = 3;
    /// `brk` moved the break (not `brk(0)`).
    pub const BRK: u32 = 4;
    /// `madvise` succeeded.
    pub const MADVISE: u32 = 5;
    /// A target thread created a thread (`CLONE_THREAD`).
    pub const THREAD_CREATED: u32 = 16;
    /// A target thread exited.
    pub const THREAD_EXITED: u32 = 17;
    /// A target thread forked a child process.
    pub const CHILD_PROCESS: u32 = 18;

    /// What a kind is called in messages.
    pub const fn name(kind: u32) -> &'static str {
        match kind {
            MMAP => "mmap",
            MUNMAP => "munmap",
            MREMAP => "mremap",
            BRK => "brk",
            MADVISE => "madvise",
            THREAD_CREATED => "thread created",
            THREAD_EXITED => "thread exited",
            CHILD_PROCESS => "child process",
            _ => "unknown",
        }
    }
}

/// Slots of the per-CPU `COUNTERS` array (monotonic, summed over CPUs by
/// userspace).
pub mod counter {
    /// Write faults taken in user mode.
    pub const USER_WRITE_FAULTS: u32 = 0;
    /// Write faults taken in kernel mode.
    pub const KERNEL_WRITE_FAULTS: u32 = 1;
    /// Write faults dropped: the `FAULTS` ring buffer was full.
    pub const PAGES_LOST: u32 = 2;
    /// Events written to the `EVENTS` ring buffer.
    pub const EVENTS: u32 = 3;
    /// Events dropped: the `EVENTS` ring buffer was full.
    pub const EVENTS_LOST: u32 = 4;
    /// Syscalls not followed: the `PENDING` map was full.
    pub const PENDING_LOST: u32 = 5;
    /// Number of slots of `COUNTERS`.
    pub const N: u32 = 8;
}

/// `CLONE_THREAD` (linux/sched.h): a `task_newtask` with it is a thread.
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// The tracepoints the programs attach to and the record fields they read.
///
/// A tracepoint record is laid out by the kernel, and its layout is part of
/// no ABI: each offset here is checked against
/// `/sys/kernel/tracing/events/<category>/<name>/format` before the programs
/// are loaded (tracker's `check_formats`).
pub mod tracepoint {
    /// `exceptions:page_fault_{user,kernel}` (x86 only): the faulting address.
    pub const FAULT_ADDRESS: usize = 8;
    /// `exceptions:page_fault_{user,kernel}`: the hardware error code (bit 1: write).
    pub const FAULT_ERROR_CODE: usize = 24;
    /// `syscalls:sys_enter_*`: the first argument; argument `i` is at
    /// `SYSCALL_ARGS + 8 * i`.
    pub const SYSCALL_ARGS: usize = 16;
    /// `syscalls:sys_exit_*`: the return value.
    pub const SYSCALL_RET: usize = 16;
    /// `task:task_newtask`: the new task's pid (`pid_t`).
    pub const NEWTASK_PID: usize = 8;
    /// `task:task_newtask`: the `clone` flags (u64).
    pub const NEWTASK_CLONE_FLAGS: usize = 32;

    /// A field the programs read: where, and how many bytes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Field {
        pub name: FieldName,
        pub offset: usize,
        pub size: usize,
    }

    /// How a field is found in a `format` file.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum FieldName {
        /// By its name.
        Named(&'static str),
        /// The `i`-th syscall argument of a `sys_enter_*` tracepoint: the
        /// `i`-th field after `__syscall_nr` (their names differ between
        /// syscalls and kernel versions, their order does not).
        SyscallArg(usize),
    }

    /// One tracepoint of the programs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Layout {
        pub category: &'static str,
        pub name: &'static str,
        /// The fault tracepoints exist on x86 only; without them the stream
        /// records events but no pages.
        pub fault: bool,
        pub fields: &'static [Field],
    }

    const fn named(name: &'static str, offset: usize, size: usize) -> Field {
        Field {
            name: FieldName::Named(name),
            offset,
            size,
        }
    }

    const fn arg(i: usize) -> Field {
        Field {
            name: FieldName::SyscallArg(i),
            offset: SYSCALL_ARGS + 8 * i,
            size: 8,
        }
    }

    const FAULT: &[Field] = &[
        named("address", FAULT_ADDRESS, 8),
        named("error_code", FAULT_ERROR_CODE, 8),
    ];
    const EXIT: &[Field] = &[named("ret", SYSCALL_RET, 8)];

    const fn tp(
        category: &'static str,
        name: &'static str,
        fault: bool,
        fields: &'static [Field],
    ) -> Layout {
        Layout {
            category,
            name,
            fault,
            fields,
        }
    }

    /// How many arguments the `sys_enter_*` program of each syscall reads
    /// (at most [`MAX_SYSCALL_ARGS`]).
    pub const MMAP_ARGS: usize = 4;
    pub const MUNMAP_ARGS: usize = 2;
    pub const MREMAP_ARGS: usize = 4;
    pub const BRK_ARGS: usize = 1;
    pub const MADVISE_ARGS: usize = 3;
    /// Arguments an [`Event`](crate::Event) carries.
    pub const MAX_SYSCALL_ARGS: usize = 4;

    const ARGS: &[Field] = &[arg(0), arg(1), arg(2), arg(3)];
    const _: () = assert!(ARGS.len() == MAX_SYSCALL_ARGS);

    const fn enter(name: &'static str, nargs: usize) -> Layout {
        tp("syscalls", name, false, ARGS.split_at(nargs).0)
    }

    /// Every tracepoint the programs attach to, with the fields they read.
    /// The program attached to each has the tracepoint's name.
    pub const LAYOUTS: [Layout; 14] = [
        tp("exceptions", "page_fault_user", true, FAULT),
        tp("exceptions", "page_fault_kernel", true, FAULT),
        enter("sys_enter_mmap", MMAP_ARGS),
        tp("syscalls", "sys_exit_mmap", false, EXIT),
        enter("sys_enter_munmap", MUNMAP_ARGS),
        tp("syscalls", "sys_exit_munmap", false, EXIT),
        enter("sys_enter_mremap", MREMAP_ARGS),
        tp("syscalls", "sys_exit_mremap", false, EXIT),
        enter("sys_enter_brk", BRK_ARGS),
        tp("syscalls", "sys_exit_brk", false, EXIT),
        enter("sys_enter_madvise", MADVISE_ARGS),
        tp("syscalls", "sys_exit_madvise", false, EXIT),
        tp(
            "task",
            "task_newtask",
            false,
            &[
                named("pid", NEWTASK_PID, 4),
                named("clone_flags", NEWTASK_CLONE_FLAGS, 8),
            ],
        ),
        tp("sched", "sched_process_exit", false, &[]),
    ];
}
