//! Kernel interfaces that both sides of tern use, one module per interface,
//! each with its uapi structs written out, typed errors and unit tests
//! against the real kernel:
//!
//! - [`inject`]: ptrace syscall injection into a stopped thread (no debug
//!   registers; a scratch area whose stub survives the tracer's death);
//! - [`regs`]: register sets (general, FPU/xsave, arm64 PAC keys);
//! - [`signals`]: blocked and pending signals, sigaction and sigaltstack layouts;
//! - [`seccomp`]: a thread's filter chain and its flags;
//! - [`posix_timers`]: POSIX timers (/proc/PID/timers, sigevent, IDs kept
//!   at restore);
//! - [`rlimit`]: resource limits of any process (prlimit);
//! - [`rseq`]: rseq registration and critical-section abort fixup;
//! - [`vdso`]: vDSO/vvar placement and vDSO symbols;
//! - [`fds`]: the fd table and pipe contents;
//! - [`inet_sockets`]: TCP and UDP sockets without a connection (sock_diag,
//!   options, made again);
//! - [`sockopt`]: int socket options and socket addresses;
//! - [`sock_diag`]: NETLINK_SOCK_DIAG dump requests;
//! - [`unix_sockets`]: unix sockets from sock_diag, and their queues
//!   copied without consuming them;
//! - [`event_fds`]: eventfd, epoll, timerfd and signalfd state (fdinfo,
//!   kcmp of epoll entries) and the layouts their restore passes;
//! - [`unlinked_files`]: memfds and files deleted while open or mapped:
//!   what they are, their data runs, and such a file made again;
//! - [`file_view`]: a read-only shared mapping of a file (image pages);
//! - [`clone`]: clone3's argument block;
//! - [`proc`]: /proc/PID (status, stat, maps with typed permissions, limits, auxv);
//! - [`ptrace`]: the one `ptrace(2)` wrapper the others use;
//! - [`sched`]: a thread's scheduling policy, nice, CPU affinity and I/O
//!   priority;
//! - [`heap`]: how tern's own heap keeps freed memory (first touches are
//!   dear on a VM).
//!
//! The tracker uses them to capture a process, the restorer to rebuild one;
//! neither reaches into the other.

pub mod anon;
pub mod clone;
pub mod event_fds;
pub mod fds;
pub mod file_view;
pub mod heap;
pub mod inet_sockets;
pub mod inject;
pub mod mapped_file;
pub mod pagemap;
pub mod posix_timers;
pub mod proc;
pub mod ptrace;
pub mod regs;
pub mod rlimit;
pub mod rseq;
pub mod sched;
pub mod seccomp;
pub mod signals;
pub mod sock_diag;
pub mod sockopt;
pub mod uffd;
pub mod unix_sockets;
pub mod unlinked_files;
pub mod vdso;

// tern runs on 64-bit Linux only (x86_64, aarch64): addresses and lengths
// the kernel reports as u64 fit a usize.
const _: () = assert!(usize::BITS == u64::BITS, "tern needs a 64-bit target");

/// `v` as a usize: lossless, usize is 64 bits wide (asserted at compile
/// time above).
#[allow(clippy::cast_possible_truncation)] // usize::BITS == 64, asserted above
pub const fn usize_of(v: u64) -> usize {
    v as usize
}
