//! seccomp state of a thread: its mode, its filter chain with each
//! filter's flags, and the plan a restore follows to install the chains
//! again.
//!
//! # Capture
//!
//! [`mode`] reads `Seccomp:`/`Seccomp_filters:` from
//! /proc/PID/task/TID/status. [`filters`] reads the chain of a
//! ptrace-stopped thread with `PTRACE_SECCOMP_GET_FILTER` and
//! `PTRACE_SECCOMP_GET_METADATA` (Linux 4.4 / 4.16, both need
//! `CONFIG_CHECKPOINT_RESTORE`). The kernel hands these out only to a
//! tracer that has `CAP_SYS_ADMIN` and is not seccomp-confined itself; the
//! target needs no privilege (an unprivileged, `no_new_privs` process with
//! a filter is read the same way). The kernel identifies filters only by
//! their position (0 is the oldest, whatever ptrace(2) says), so every thread of the process must be
//! stopped while its chain is read: a `SECCOMP_FILTER_FLAG_TSYNC` install
//! in a running thread would shift the positions.
//!
//! Threads can have different chains: a filter installed without TSYNC
//! applies to the installing thread and to threads it creates later. So
//! chains are read per thread and kept per TID, oldest filter first, and
//! [`group`] turns them back into an ordered list of installs.
//!
//! What a filter's metadata carries is only `SECCOMP_FILTER_FLAG_LOG`;
//! TSYNC is reconstructed from the chains, `SPEC_ALLOW` is a property of
//! the task's speculation state (PR_GET_SPECULATION_CTRL), not of the
//! filter, and a `NEW_LISTENER` filter is read back like any other (its
//! listener fd belongs to whoever got it; without one,
//! `SECCOMP_RET_USER_NOTIF` makes the syscall fail with ENOSYS).
//!
//! # Restore
//!
//! Filters go in last, after every other injected syscall (with
//! `PTRACE_O_SUSPEND_SECCOMP` on the injectors), through an injected
//! `seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog)` per [`InstallStep`]: the
//! program ([`SeccompFilter::insn_bytes`]) and its `struct sock_fprog`
//! ([`sock_fprog_bytes`]) are written into the target's memory first.

use nix::errno::Errno;

// Requests of include/uapi/linux/ptrace.h.
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;

/// `BPF_MAXINSNS` (include/uapi/linux/bpf_common.h): the kernel refuses a
/// classic program longer than this, so no stored filter is longer.
pub const BPF_MAXINSNS: usize = 4096;

// include/uapi/linux/seccomp.h
pub const SECCOMP_MODE_DISABLED: u32 = 0;
pub const SECCOMP_MODE_STRICT: u32 = 1;
pub const SECCOMP_MODE_FILTER: u32 = 2;

pub const SECCOMP_SET_MODE_STRICT: u32 = 0;
pub const SECCOMP_SET_MODE_FILTER: u32 = 1;

pub const SECCOMP_FILTER_FLAG_TSYNC: u64 = 1 << 0;
pub const SECCOMP_FILTER_FLAG_LOG: u64 = 1 << 1;
pub const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u64 = 1 << 2;
pub const SECCOMP_FILTER_FLAG_NEW_LISTENER: u64 = 1 << 3;
pub const SECCOMP_FILTER_FLAG_TSYNC_ESRCH: u64 = 1 << 4;
pub const SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV: u64 = 1 << 5;

pub const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const SECCOMP_RET_KILL_THREAD: u32 = 0x0000_0000;
pub const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
pub const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
pub const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
pub const SECCOMP_RET_TRACE: u32 = 0x7ff0_0000;
pub const SECCOMP_RET_LOG: u32 = 0x7ffc_0000;
pub const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
pub const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;
pub const SECCOMP_RET_DATA: u32 = 0x0000_ffff;

/// `struct seccomp_metadata` (include/uapi/linux/ptrace.h): the request
/// and reply of `PTRACE_SECCOMP_GET_METADATA`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SeccompMetadata {
    /// In: the filter's position, 0 = the oldest (see [`filters`]).
    pub filter_off: u64,
    /// Out: `SECCOMP_FILTER_FLAG_*` the kernel keeps for it.
    pub flags: u64,
}

/// `struct sock_filter` (include/uapi/linux/filter.h): one classic BPF
/// instruction.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl SockFilter {
    /// The instruction as stored in [`SeccompFilter::insns`]: its 8 bytes
    /// in memory order, read as a native-endian u64.
    pub fn to_insn(self) -> u64 {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.code.to_ne_bytes());
        b[2] = self.jt;
        b[3] = self.jf;
        b[4..8].copy_from_slice(&self.k.to_ne_bytes());
        u64::from_ne_bytes(b)
    }

    /// The inverse of [`SockFilter::to_insn`].
    pub fn from_insn(insn: u64) -> Self {
        let b = insn.to_ne_bytes();
        SockFilter {
            code: u16::from_ne_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// `struct sock_fprog` (include/uapi/linux/filter.h) of a 64-bit process:
/// `unsigned short len` then, aligned, `struct sock_filter *filter`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SockFprog {
    pub len: u16,
    pub filter: u64,
}

/// `struct sock_fprog` as bytes, for writing into a (64-bit) target before
/// an injected `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)`: `len`
/// instructions at `filter_addr` in the target.
pub fn sock_fprog_bytes(filter_addr: u64, len: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[std::mem::offset_of!(SockFprog, len)..][..2].copy_from_slice(&len.to_ne_bytes());
    b[std::mem::offset_of!(SockFprog, filter)..][..8].copy_from_slice(&filter_addr.to_ne_bytes());
    b
}

/// A thread's seccomp mode, from /proc/PID/task/TID/status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    Disabled,
    /// `SECCOMP_MODE_STRICT`: only read, write, _exit and sigreturn.
    Strict,
    /// `SECCOMP_MODE_FILTER` with this many filters (`Seccomp_filters:`,
    /// Linux 5.9+; 0 if the kernel does not report it: a thread in filter
    /// mode always has at least one).
    Filter {
        filters: u32,
    },
}

/// One classic-BPF filter program and its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompFilter {
    /// Each `struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}` as its 8
    /// bytes in native order (see [`SockFilter::to_insn`]).
    pub insns: Vec<u64>,
    /// `SECCOMP_FILTER_FLAG_*` from `PTRACE_SECCOMP_GET_METADATA` (the
    /// kernel reports only `SECCOMP_FILTER_FLAG_LOG`).
    pub flags: u64,
}

impl SeccompFilter {
    /// A filter from its instructions.
    pub fn from_sock_filters(prog: &[SockFilter], flags: u64) -> Self {
        SeccompFilter {
            insns: prog.iter().map(|i| i.to_insn()).collect(),
            flags,
        }
    }

    /// The program as the kernel takes it (`struct sock_filter[]`).
    pub fn insn_bytes(&self) -> Vec<u8> {
        self.insns.iter().flat_map(|i| i.to_ne_bytes()).collect()
    }

    /// The instructions, decoded.
    pub fn sock_filters(&self) -> Vec<SockFilter> {
        self.insns
            .iter()
            .map(|&i| SockFilter::from_insn(i))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("thread {tid}: {source} (has the thread exited?)")]
    StatusRead {
        tid: i32,
        source: crate::proc::ProcError,
    },
    #[error("thread {tid}: {path}: {what}")]
    StatusFormat {
        tid: i32,
        path: String,
        what: String,
    },
    #[error(
        "thread {tid} is in seccomp strict mode (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT)): it may only read, write and exit, so it has no filters to read and cannot be restored with syscalls injected into it"
    )]
    Strict { tid: i32 },
    #[error("{op} on thread {tid}, filter {index} (0 = the oldest): {errno}: {hint}")]
    Ptrace {
        op: &'static str,
        tid: i32,
        index: u64,
        errno: Errno,
        hint: &'static str,
    },
    #[error(
        "PTRACE_SECCOMP_GET_FILTER on thread {tid}, filter {index}: the kernel reported {count} instructions; a classic BPF program has 1 to {BPF_MAXINSNS}"
    )]
    BadCount { tid: i32, index: u64, count: i64 },
}

/// The thread's mode from its status file's `Seccomp:` value and
/// `Seccomp_filters:` text.
fn mode_from(
    tid: i32,
    path: &str,
    mode: Option<u32>,
    filters: Option<&str>,
) -> Result<SeccompMode, SeccompError> {
    let bad = |what: String| SeccompError::StatusFormat {
        tid,
        path: path.to_string(),
        what,
    };
    match mode {
        // No line at all: a kernel without CONFIG_SECCOMP, where no thread
        // can be confined.
        None | Some(0) => Ok(SeccompMode::Disabled),
        Some(1) => Ok(SeccompMode::Strict),
        Some(2) => {
            let filters = match filters {
                None => 0,
                Some(v) => v.parse().map_err(|_| {
                    bad(format!(
                        "unreadable `Seccomp_filters:` value {v:?} (expected a count)"
                    ))
                })?,
            };
            Ok(SeccompMode::Filter { filters })
        }
        Some(other) => Err(bad(format!(
            "unknown `Seccomp:` mode {other:?} (0, 1 or 2 expected; a newer kernel?)"
        ))),
    }
}

fn mode_at(pid: i32, tid: i32) -> Result<SeccompMode, SeccompError> {
    let path = format!("{}/status", crate::proc::dir(pid, Some(tid)));
    let st = crate::proc::status_file(pid, Some(tid))
        .map_err(|source| SeccompError::StatusRead { tid, source })?;
    mode_from(tid, &path, st.parsed.seccomp, st.field("Seccomp_filters"))
}

/// The seccomp mode of thread `tid` of process `pid`, from
/// /proc/PID/task/TID/status (needs no ptrace).
pub fn mode(pid: i32, tid: i32) -> Result<SeccompMode, SeccompError> {
    mode_at(pid, tid)
}

fn ptrace_err(op: &'static str, tid: i32, index: u64, errno: Errno) -> SeccompError {
    let hint = match errno {
        Errno::EACCES | Errno::EPERM => {
            "the tracer needs CAP_SYS_ADMIN and must not itself be confined by seccomp (run tern as root, outside any seccomp sandbox such as a container runtime's default profile)"
        }
        Errno::EMEDIUMTYPE => {
            "the filter is not a classic BPF program, so the kernel has no copy of it to hand out"
        }
        Errno::EINVAL => {
            "the thread is in filter mode, so the kernel lacks CONFIG_CHECKPOINT_RESTORE (needed to read filters back)"
        }
        Errno::ESRCH => {
            "the thread must be ptrace-stopped by the calling thread (seize and interrupt it first); or it has exited"
        }
        Errno::EIO => {
            "the kernel does not know this request (PTRACE_SECCOMP_GET_FILTER needs Linux 4.4, PTRACE_SECCOMP_GET_METADATA 4.16)"
        }
        _ => "unexpected error",
    };
    SeccompError::Ptrace {
        op,
        tid,
        index,
        errno,
        hint,
    }
}

/// The filter chain of thread `tid`, oldest first (the order a restore
/// installs them in). The thread must be ptrace-stopped by the calling
/// thread, and so must every other thread of its process (see the module
/// doc). A thread without filters gives an empty chain; a thread in strict
/// mode gives [`SeccompError::Strict`].
pub fn filters(tid: i32) -> Result<Vec<SeccompFilter>, SeccompError> {
    // The kernel copies a whole program into the buffer whatever its size
    // (a NULL buffer only asks for the count), so a buffer sized from an
    // earlier count call would overflow if the filter at that position
    // changed in between. A buffer for the largest possible program cannot.
    let mut buf = vec![0u64; BPF_MAXINSNS];
    // Position 0 is the *oldest* filter: get_nth_filter() in
    // kernel/seccomp.c walks `count - filter_off - 1` steps back from the
    // newest (ptrace(2) says the opposite; the tests pin the real order).
    let mut out = Vec::new();
    for index in 0u64.. {
        // SAFETY: `addr` is the filter's index; `buf` holds BPF_MAXINSNS
        // 8-byte sock_filters, the most the kernel writes.
        let r = unsafe {
            crate::ptrace::request(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index,
                buf.as_mut_ptr() as u64,
            )
        };
        let n = match r {
            Ok(n) => n,
            Err(Errno::ENOENT) => break,
            Err(Errno::EINVAL) => {
                // Also what a thread not in filter mode gets: tell apart.
                match mode_at(tid, tid)? {
                    SeccompMode::Disabled if index == 0 => break,
                    SeccompMode::Strict => return Err(SeccompError::Strict { tid }),
                    _ => {
                        return Err(ptrace_err(
                            "PTRACE_SECCOMP_GET_FILTER",
                            tid,
                            index,
                            Errno::EINVAL,
                        ));
                    }
                }
            }
            Err(e) => return Err(ptrace_err("PTRACE_SECCOMP_GET_FILTER", tid, index, e)),
        };
        let len = match usize::try_from(n) {
            Ok(len) if (1..=BPF_MAXINSNS).contains(&len) => len,
            _ => {
                return Err(SeccompError::BadCount {
                    tid,
                    index,
                    count: n,
                });
            }
        };
        let mut md = SeccompMetadata {
            filter_off: index,
            flags: 0,
        };
        // SAFETY: the kernel reads `filter_off` and writes at most `addr` =
        // size_of::<SeccompMetadata>() bytes into `md`, which we own.
        unsafe {
            crate::ptrace::request(
                PTRACE_SECCOMP_GET_METADATA,
                tid,
                std::mem::size_of::<SeccompMetadata>() as u64,
                &raw mut md as u64,
            )
        }
        .map_err(|e| ptrace_err("PTRACE_SECCOMP_GET_METADATA", tid, index, e))?;
        out.push(SeccompFilter {
            insns: buf[..len].to_vec(),
            flags: md.flags,
        });
    }
    Ok(out)
}

/// One install of a restore: filter `filter` (an index into
/// [`SeccompPlan::filters`]) goes into threads `threads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallStep {
    pub filter: usize,
    /// TIDs. With `tsync`, all threads of the process.
    pub threads: Vec<i32>,
    /// Install once, in any one of `threads` (the first), with
    /// `SECCOMP_FILTER_FLAG_TSYNC`: every thread has the same chain at
    /// this point, and TSYNC gives the new one to all of them. Without
    /// it, install in each of `threads`, in any order.
    pub tsync: bool,
}

/// The chains of a process's threads, and how to install them again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeccompPlan {
    /// The distinct filters (same program and flags), in order of first
    /// appearance.
    pub filters: Vec<SeccompFilter>,
    /// Per thread (in the order given to [`group`]): its chain as indices
    /// into `filters`, oldest first.
    pub chains: Vec<(i32, Vec<usize>)>,
    /// The installs, to be made in this order.
    pub steps: Vec<InstallStep>,
}

impl SeccompPlan {
    /// Every thread has exactly the same chain (then every step is a TSYNC
    /// install, unless there is only one thread).
    pub fn identical(&self) -> bool {
        self.chains.windows(2).all(|w| w[0].1 == w[1].1)
    }

    /// The `flags` argument of the `seccomp(SECCOMP_SET_MODE_FILTER, ...)`
    /// that makes `step`: the filter's own LOG flag, plus TSYNC.
    pub fn install_flags(&self, step: &InstallStep) -> u64 {
        let own = self
            .filters
            .get(step.filter)
            .map_or(0, |f| f.flags & SECCOMP_FILTER_FLAG_LOG);
        own | if step.tsync {
            SECCOMP_FILTER_FLAG_TSYNC
        } else {
            0
        }
    }
}

/// Plan the installs that give each thread its chain (oldest filter
/// first), assuming every thread exists and has no filter yet.
///
/// The filters every thread has at the same position at the start of its
/// chain go in with TSYNC, one install each: TSYNC needs every other
/// thread's chain to be an ancestor of the caller's, which holds only while
/// all chains are still equal. The rest goes in per thread, layer by layer
/// (the k-th filter of every chain that still differs, grouped by filter),
/// so each thread gets its filters in order. Example: all threads share
/// A, B and thread 3 added C: A and B with TSYNC, then C in thread 3 only.
/// Equal filters in different threads become separate kernel objects,
/// which behave the same.
pub fn group(threads: &[(i32, Vec<SeccompFilter>)]) -> SeccompPlan {
    let mut plan = SeccompPlan::default();
    for (tid, chain) in threads {
        let idx = chain
            .iter()
            .map(|f| match plan.filters.iter().position(|g| g == f) {
                Some(i) => i,
                None => {
                    plan.filters.push(f.clone());
                    plan.filters.len() - 1
                }
            })
            .collect();
        plan.chains.push((*tid, idx));
    }
    let chains = &plan.chains;
    // A TSYNC install only pays (and only means what the dump saw) with
    // more than one thread.
    let common = match chains.split_first() {
        Some(((_, first), rest)) if !rest.is_empty() => first
            .iter()
            .enumerate()
            .take_while(|&(k, f)| rest.iter().all(|(_, c)| c.get(k) == Some(f)))
            .count(),
        _ => 0,
    };
    let all: Vec<i32> = chains.iter().map(|(t, _)| *t).collect();
    let mut steps = Vec::new();
    if let Some((_, first)) = chains.first() {
        for &filter in &first[..common] {
            steps.push(InstallStep {
                filter,
                threads: all.clone(),
                tsync: true,
            });
        }
    }
    let longest = chains.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
    for depth in common..longest {
        let start = steps.len();
        for (tid, chain) in chains {
            let Some(&filter) = chain.get(depth) else {
                continue;
            };
            match steps[start..].iter_mut().find(|s| s.filter == filter) {
                Some(s) => s.threads.push(*tid),
                None => steps.push(InstallStep {
                    filter,
                    threads: vec![*tid],
                    tsync: false,
                }),
            }
        }
    }
    plan.steps = steps;
    plan
}

/// Helpers for tests that fork real children and trace their threads
/// (also used by the rseq tests).
#[cfg(test)]
pub(crate) mod test_child {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::time::{Duration, Instant};

    pub const T: Duration = Duration::from_secs(10);

    /// 512 counters shared between a test and its forked child.
    pub fn shared_page() -> &'static [AtomicU64; 512] {
        // SAFETY: a fresh shared anonymous page (zero-filled, so valid
        // atomics), never unmapped: leaked for the test's lifetime.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap of a shared page");
            &*(p as *const [AtomicU64; 512])
        }
    }

    pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + T;
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn sleep_ms(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    /// Sleep in 1 ms steps until `page[0]` (the stop flag) is set.
    pub fn idle_until_stop(page: &[AtomicU64; 512]) {
        while page[0].load(SeqCst) == 0 {
            sleep_ms(1);
        }
    }

    /// In a child: start a thread running `f` (raw pthread_create, so
    /// nothing of std's thread bookkeeping runs after fork).
    pub fn spawn(f: impl FnOnce() + Send + 'static) -> bool {
        extern "C" fn tramp(arg: *mut libc::c_void) -> *mut libc::c_void {
            // SAFETY: `arg` is the Box leaked below, taken back once.
            let f = unsafe { Box::from_raw(arg as *mut Box<dyn FnOnce() + Send>) };
            f();
            std::ptr::null_mut()
        }
        let arg: Box<Box<dyn FnOnce() + Send>> = Box::new(Box::new(f));
        let arg = Box::into_raw(arg);
        let mut th: libc::pthread_t = 0;
        // SAFETY: a detached-on-exit thread running `tramp` with our box.
        let r = unsafe { libc::pthread_create(&mut th, std::ptr::null(), tramp, arg.cast()) };
        if r != 0 {
            // SAFETY: the thread was not created; the box is still ours.
            drop(unsafe { Box::from_raw(arg) });
        }
        r == 0
    }

    pub fn gettid() -> i32 {
        // SAFETY: no arguments.
        unsafe { libc::gettid() }
    }

    /// A forked child; its traced threads are detached and it is killed
    /// and reaped on drop.
    pub struct Child {
        pub pid: i32,
        traced: Vec<i32>,
        status: Option<i32>,
    }

    impl Child {
        /// Fork; the child runs `f` and exits with its result (101 if it
        /// panicked). See the inject tests for why that is safe enough
        /// after fork here.
        pub fn fork(f: impl FnOnce() -> i32) -> Child {
            // SAFETY: the child runs `f` and _exit()s, never returning
            // into the test harness.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
                // SAFETY: ends the child.
                unsafe { libc::_exit(code) };
            }
            Child {
                pid,
                traced: Vec::new(),
                status: None,
            }
        }

        /// A handle to trace another thread's child with; never kills it.
        pub fn not_owned(pid: i32) -> Child {
            Child {
                pid,
                traced: Vec::new(),
                status: Some(0),
            }
        }

        /// PTRACE_SEIZE thread `tid`, PTRACE_INTERRUPT it and wait for
        /// the stop (with a deadline).
        pub fn seize(&mut self, tid: i32) -> Result<(), String> {
            // SAFETY: integer-only ptrace requests.
            if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) } != 0 {
                return Err(format!(
                    "PTRACE_SEIZE {tid}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            self.traced.push(tid);
            // SAFETY: as above.
            if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) } != 0 {
                return Err(format!(
                    "PTRACE_INTERRUPT {tid}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let end = Instant::now() + T;
            loop {
                let mut st = 0;
                // SAFETY: waits for our tracee.
                let r = unsafe { libc::waitpid(tid, &mut st, libc::WNOHANG | libc::__WALL) };
                if r == tid {
                    return if libc::WIFSTOPPED(st) {
                        Ok(())
                    } else {
                        Err(format!("thread {tid} ended instead of stopping: {st:#x}"))
                    };
                }
                if r < 0 {
                    return Err(format!(
                        "waitpid {tid}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                if Instant::now() > end {
                    return Err(format!("thread {tid} did not stop within {T:?}"));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }

        /// PTRACE_DETACH a stopped thread.
        pub fn detach(&mut self, tid: i32) -> Result<(), String> {
            // SAFETY: integer-only ptrace request.
            if unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) } != 0 {
                return Err(format!(
                    "PTRACE_DETACH {tid}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            self.traced.retain(|&t| t != tid);
            Ok(())
        }

        /// Exit code (or 128 + signal), within the deadline.
        pub fn wait(&mut self) -> i32 {
            let end = Instant::now() + T;
            loop {
                if let Some(s) = self.try_wait() {
                    return s;
                }
                if Instant::now() > end {
                    self.kill();
                    panic!("child {} did not exit within {T:?}", self.pid);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn try_wait(&mut self) -> Option<i32> {
            if self.status.is_none() {
                for &t in &self.traced {
                    if t != self.pid {
                        let mut st = 0;
                        // SAFETY: reaps an exited traced thread, if any.
                        unsafe { libc::waitpid(t, &mut st, libc::WNOHANG | libc::__WALL) };
                    }
                }
                let mut st = 0;
                // SAFETY: waits for our child.
                let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG | libc::__WALL) };
                if r == self.pid && !libc::WIFSTOPPED(st) {
                    self.status = Some(if libc::WIFEXITED(st) {
                        libc::WEXITSTATUS(st)
                    } else {
                        128 + libc::WTERMSIG(st)
                    });
                } else if r < 0 {
                    self.status = Some(-1);
                }
            }
            self.status
        }

        pub fn kill(&mut self) {
            if self.status.is_some() {
                return;
            }
            for t in self.traced.clone() {
                let _ = self.detach(t);
            }
            // SAFETY: kills our own child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let end = Instant::now() + T;
            while self.try_wait().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_child::*;
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    // ---------------------------------------------------------- layouts

    #[test]
    fn uapi_layouts() {
        use std::mem::{offset_of, size_of};
        // include/uapi/linux/ptrace.h
        assert_eq!(size_of::<SeccompMetadata>(), 16);
        assert_eq!(offset_of!(SeccompMetadata, filter_off), 0);
        assert_eq!(offset_of!(SeccompMetadata, flags), 8);
        // include/uapi/linux/filter.h
        assert_eq!(size_of::<SockFilter>(), 8);
        assert_eq!(offset_of!(SockFilter, code), 0);
        assert_eq!(offset_of!(SockFilter, jt), 2);
        assert_eq!(offset_of!(SockFilter, jf), 3);
        assert_eq!(offset_of!(SockFilter, k), 4);
        assert_eq!(size_of::<SockFprog>(), 16);
        assert_eq!(offset_of!(SockFprog, len), 0);
        assert_eq!(offset_of!(SockFprog, filter), 8);
        // The system's own definitions agree.
        assert_eq!(size_of::<libc::sock_filter>(), size_of::<SockFilter>());
        assert_eq!(size_of::<libc::sock_fprog>(), size_of::<SockFprog>());
    }

    #[test]
    fn constants_match_libc() {
        assert_eq!(SECCOMP_MODE_STRICT, libc::SECCOMP_MODE_STRICT);
        assert_eq!(SECCOMP_MODE_FILTER, libc::SECCOMP_MODE_FILTER);
        assert_eq!(SECCOMP_SET_MODE_FILTER, libc::SECCOMP_SET_MODE_FILTER);
        assert_eq!(SECCOMP_FILTER_FLAG_TSYNC, libc::SECCOMP_FILTER_FLAG_TSYNC);
        assert_eq!(SECCOMP_FILTER_FLAG_LOG, libc::SECCOMP_FILTER_FLAG_LOG);
        assert_eq!(
            SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
        );
        assert_eq!(
            SECCOMP_FILTER_FLAG_NEW_LISTENER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
        );
        assert_eq!(
            SECCOMP_FILTER_FLAG_TSYNC_ESRCH,
            libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH
        );
        assert_eq!(
            SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
            libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
        );
        assert_eq!(SECCOMP_RET_KILL_PROCESS, libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(SECCOMP_RET_KILL_THREAD, libc::SECCOMP_RET_KILL_THREAD);
        assert_eq!(SECCOMP_RET_TRAP, libc::SECCOMP_RET_TRAP);
        assert_eq!(SECCOMP_RET_ERRNO, libc::SECCOMP_RET_ERRNO);
        assert_eq!(SECCOMP_RET_USER_NOTIF, libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(SECCOMP_RET_TRACE, libc::SECCOMP_RET_TRACE);
        assert_eq!(SECCOMP_RET_LOG, libc::SECCOMP_RET_LOG);
        assert_eq!(SECCOMP_RET_ALLOW, libc::SECCOMP_RET_ALLOW);
        assert_eq!(SECCOMP_RET_ACTION_FULL, libc::SECCOMP_RET_ACTION_FULL);
        assert_eq!(SECCOMP_RET_DATA, libc::SECCOMP_RET_DATA);
        assert_eq!(BPF_MAXINSNS, libc::BPF_MAXINSNS as usize);
    }

    #[test]
    fn instruction_packing_is_the_memory_image() {
        let i = SockFilter {
            code: 0x0015,
            jt: 1,
            jf: 2,
            k: 0xdead_beef,
        };
        // SAFETY: SockFilter is repr(C), 8 bytes, no padding.
        let raw: [u8; 8] = unsafe { std::mem::transmute(i) };
        assert_eq!(i.to_insn().to_ne_bytes(), raw);
        assert_eq!(SockFilter::from_insn(i.to_insn()), i);
        let f = SeccompFilter::from_sock_filters(&[i, i], 0);
        assert_eq!(f.insn_bytes(), [raw, raw].concat());
        assert_eq!(f.sock_filters(), vec![i, i]);
    }

    #[test]
    fn sock_fprog_bytes_is_the_struct() {
        let b = sock_fprog_bytes(0x1122_3344_5566_7788, 3);
        let p = SockFprog {
            len: 3,
            filter: 0x1122_3344_5566_7788,
        };
        assert_eq!(&b[0..2], &3u16.to_ne_bytes());
        assert_eq!(&b[2..8], &[0u8; 6]);
        assert_eq!(&b[8..16], &p.filter.to_ne_bytes());
    }

    #[test]
    fn status_parsing() {
        let p = |mode, filters| mode_from(7, "/proc/7/status", mode, filters);
        assert_eq!(p(Some(0), Some("0")).unwrap(), SeccompMode::Disabled);
        assert_eq!(p(Some(1), None).unwrap(), SeccompMode::Strict);
        assert_eq!(
            p(Some(2), Some("3")).unwrap(),
            SeccompMode::Filter { filters: 3 }
        );
        // A kernel before 5.9 has no count.
        assert_eq!(
            p(Some(2), None).unwrap(),
            SeccompMode::Filter { filters: 0 }
        );
        // Without CONFIG_SECCOMP there is no line, and nothing to confine.
        assert_eq!(p(None, None).unwrap(), SeccompMode::Disabled);
        let e = p(Some(9), None).unwrap_err().to_string();
        assert!(e.contains("thread 7") && e.contains('9'), "{e}");
        let e = p(Some(2), Some("x")).unwrap_err().to_string();
        assert!(e.contains("/proc/7/status"), "{e}");
        // The real file of a thread without a filter.
        let me = std::process::id() as i32;
        assert_eq!(mode_at(me, me).unwrap(), SeccompMode::Disabled);
    }

    // --------------------------------------------------------- planning

    fn f(k: u64) -> SeccompFilter {
        SeccompFilter {
            insns: vec![k, k + 1],
            flags: 0,
        }
    }

    fn flat(p: &SeccompPlan) -> Vec<(usize, Vec<i32>, bool)> {
        p.steps
            .iter()
            .map(|s| (s.filter, s.threads.clone(), s.tsync))
            .collect()
    }

    /// Executes a plan under the kernel's rules, from threads without
    /// filters: a TSYNC install needs every thread's chain to be an
    /// ancestor of (here: a prefix of, or equal to) the caller's and gives
    /// everyone the caller's chain plus the new filter; a plain install
    /// extends the installing thread's chain only.
    fn execute(p: &SeccompPlan, tids: &[i32]) -> Result<Vec<(i32, Vec<SeccompFilter>)>, String> {
        let mut ch: Vec<(i32, Vec<SeccompFilter>)> =
            tids.iter().map(|&t| (t, Vec::new())).collect();
        for s in &p.steps {
            let filter = p.filters.get(s.filter).ok_or("bad filter index")?.clone();
            if s.tsync {
                let caller = *s.threads.first().ok_or("TSYNC step without a thread")?;
                let mine = ch
                    .iter()
                    .find(|c| c.0 == caller)
                    .ok_or("unknown tid")?
                    .1
                    .clone();
                if ch.iter().any(|c| !mine.starts_with(&c.1)) {
                    return Err(format!("TSYNC from {caller} fails: chains not ancestors"));
                }
                let mut next = mine;
                next.push(filter);
                for c in &mut ch {
                    c.1 = next.clone();
                }
            } else {
                for t in &s.threads {
                    ch.iter_mut()
                        .find(|c| c.0 == *t)
                        .ok_or("unknown tid")?
                        .1
                        .push(filter.clone());
                }
            }
        }
        Ok(ch)
    }

    fn roundtrip(threads: &[(i32, Vec<SeccompFilter>)]) -> SeccompPlan {
        let p = group(threads);
        let tids: Vec<i32> = threads.iter().map(|t| t.0).collect();
        assert_eq!(
            execute(&p, &tids).unwrap(),
            threads.to_vec(),
            "plan {p:?} does not rebuild the chains"
        );
        // The plan's own view of the chains is the input.
        for ((tid, chain), (ptid, idx)) in threads.iter().zip(&p.chains) {
            assert_eq!(tid, ptid);
            let back: Vec<SeccompFilter> = idx.iter().map(|&i| p.filters[i].clone()).collect();
            assert_eq!(&back, chain);
        }
        p
    }

    #[test]
    fn plan_identical_chains_are_tsync_installs() {
        let p = roundtrip(&[
            (10, vec![f(1), f(2)]),
            (11, vec![f(1), f(2)]),
            (12, vec![f(1), f(2)]),
        ]);
        assert!(p.identical());
        assert_eq!(
            flat(&p),
            vec![(0, vec![10, 11, 12], true), (1, vec![10, 11, 12], true)]
        );
        assert_eq!(p.filters, vec![f(1), f(2)]);
        assert_eq!(
            p.chains,
            vec![(10, vec![0, 1]), (11, vec![0, 1]), (12, vec![0, 1])]
        );
        assert_eq!(p.install_flags(&p.steps[0]), SECCOMP_FILTER_FLAG_TSYNC);
    }

    #[test]
    fn plan_prefix_extension_goes_per_thread_after_the_shared_part() {
        // All threads share A, B (TSYNC); thread 3 added C.
        let p = roundtrip(&[
            (1, vec![f(1), f(2)]),
            (2, vec![f(1), f(2)]),
            (3, vec![f(1), f(2), f(3)]),
        ]);
        assert!(!p.identical());
        assert_eq!(
            flat(&p),
            vec![
                (0, vec![1, 2, 3], true),
                (1, vec![1, 2, 3], true),
                (2, vec![3], false)
            ]
        );
        assert_eq!(p.install_flags(&p.steps[2]), 0);
    }

    #[test]
    fn plan_diverging_chains() {
        let p = roundtrip(&[
            (1, vec![f(1), f(3)]),
            (2, vec![f(1)]),
            (3, vec![f(1), f(4), f(5)]),
            (4, vec![f(1), f(4)]),
        ]);
        assert_eq!(
            flat(&p),
            vec![
                (0, vec![1, 2, 3, 4], true),
                (1, vec![1], false),
                (2, vec![3, 4], false),
                (3, vec![3], false)
            ]
        );
        assert_eq!(p.filters, vec![f(1), f(3), f(4), f(5)]);
        // Nothing in common at all: per thread from the first filter on.
        let p = roundtrip(&[(1, vec![f(1), f(2)]), (2, vec![f(2), f(1)])]);
        assert_eq!(
            flat(&p),
            vec![
                (0, vec![1], false),
                (1, vec![2], false),
                (1, vec![1], false),
                (0, vec![2], false)
            ]
        );
    }

    #[test]
    fn plan_empty_chains() {
        // A thread without filters rules out TSYNC.
        let p = roundtrip(&[(1, vec![f(1)]), (2, vec![]), (3, vec![f(1)])]);
        assert_eq!(flat(&p), vec![(0, vec![1, 3], false)]);
        let p = roundtrip(&[(1, vec![]), (2, vec![])]);
        assert!(p.steps.is_empty() && p.filters.is_empty() && p.identical());
        let p = roundtrip(&[]);
        assert!(p.steps.is_empty() && p.chains.is_empty() && p.identical());
    }

    #[test]
    fn plan_single_thread_needs_no_tsync() {
        let p = roundtrip(&[(5, vec![f(1), f(2), f(1)])]);
        assert!(p.identical());
        assert_eq!(
            flat(&p),
            vec![
                (0, vec![5], false),
                (1, vec![5], false),
                (0, vec![5], false)
            ]
        );
        assert_eq!(p.filters.len(), 2, "equal filters are stored once");
    }

    #[test]
    fn plan_flags_make_filters_distinct() {
        let logged = SeccompFilter {
            flags: SECCOMP_FILTER_FLAG_LOG,
            ..f(1)
        };
        let p = roundtrip(&[(1, vec![f(1)]), (2, vec![logged.clone()])]);
        assert_eq!(p.filters, vec![f(1), logged]);
        assert_eq!(flat(&p), vec![(0, vec![1], false), (1, vec![2], false)]);
        assert_eq!(p.install_flags(&p.steps[1]), SECCOMP_FILTER_FLAG_LOG);
        let p = roundtrip(&[
            (1, vec![p.filters[1].clone()]),
            (2, vec![p.filters[1].clone()]),
        ]);
        assert_eq!(
            p.install_flags(&p.steps[0]),
            SECCOMP_FILTER_FLAG_LOG | SECCOMP_FILTER_FLAG_TSYNC
        );
    }

    #[test]
    fn plan_random_chains_round_trip() {
        // Chains grown the way processes grow them: threads inherit their
        // creator's chain, then add filters of their own.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..500 {
            let mut threads: Vec<(i32, Vec<SeccompFilter>)> = vec![(100, vec![])];
            for _ in 0..rnd(12) {
                let k = crate::usize_of(rnd(threads.len() as u64));
                if rnd(3) == 0 {
                    let chain = threads[k].1.clone();
                    threads.push((100 + i32::try_from(threads.len()).unwrap(), chain));
                } else {
                    threads[k].1.push(f(rnd(4)));
                }
            }
            roundtrip(&threads);
        }
    }

    // ------------------------------------------------- real processes

    /// A filter returning `errno` for syscall `nr` and allowing the rest.
    fn deny(nr: i64, errno: i32) -> Vec<SockFilter> {
        let op = |code: u32| u16::try_from(code).unwrap();
        vec![
            // A = seccomp_data.nr
            SockFilter {
                code: op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS),
                jt: 0,
                jf: 0,
                k: 0,
            },
            SockFilter {
                code: op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K),
                jt: 0,
                jf: 1,
                k: u32::try_from(nr).unwrap(),
            },
            SockFilter {
                code: op(libc::BPF_RET | libc::BPF_K),
                jt: 0,
                jf: 0,
                k: SECCOMP_RET_ERRNO | errno as u32,
            },
            SockFilter {
                code: op(libc::BPF_RET | libc::BPF_K),
                jt: 0,
                jf: 0,
                k: SECCOMP_RET_ALLOW,
            },
        ]
    }

    /// A program ready to install from a forked child: its instructions
    /// and a `struct sock_fprog` pointing at them, both built before the
    /// fork (the child has the same addresses).
    struct Prog {
        filter: SeccompFilter,
        _insns: Vec<u8>,
        fprog: [u8; 16],
    }

    fn prog(insns: Vec<SockFilter>, flags: u64) -> &'static Prog {
        let filter = SeccompFilter::from_sock_filters(&insns, flags);
        let bytes = filter.insn_bytes();
        let fprog = sock_fprog_bytes(bytes.as_ptr() as u64, u16::try_from(insns.len()).unwrap());
        Box::leak(Box::new(Prog {
            filter,
            _insns: bytes,
            fprog,
        }))
    }

    impl Prog {
        /// seccomp(SECCOMP_SET_MODE_FILTER, flags) in the calling thread;
        /// `extra` adds install-only flags (TSYNC).
        fn install(&self, extra: u64) -> i64 {
            // SAFETY: `fprog` is a valid struct sock_fprog for the kernel
            // to read, pointing at our instructions.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    SECCOMP_SET_MODE_FILTER,
                    self.filter.flags | extra,
                    self.fprog.as_ptr(),
                )
            };
            if r < 0 {
                -(std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64)
            } else {
                r as i64
            }
        }
    }

    /// The errno of a raw syscall with no arguments (0 if it succeeded).
    fn errno_of(nr: i64) -> i32 {
        // SAFETY: argument-less, side-effect-free syscalls only.
        let r = unsafe { libc::syscall(nr, 0, 0, 0) };
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    fn no_new_privs() -> bool {
        // SAFETY: plain prctl.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 }
    }

    fn read_chain(child: &mut Child, tid: i32) -> Vec<SeccompFilter> {
        child.seize(tid).unwrap();
        filters(tid).unwrap_or_else(|e| panic!("thread {tid}: {e}"))
    }

    // Shared page slots: 0 stop, 1 fail code, 2.. per test.
    const STOP: usize = 0;
    const FAIL: usize = 1;

    fn fail(page: &[AtomicU64; 512], code: u64) {
        let _ = page[FAIL].compare_exchange(0, code, SeqCst, SeqCst);
    }

    /// Main thread: A (getppid -> EPERM) and B (getpgid -> ENOSYS, LOG);
    /// a thread made before them has none; a thread made after them adds
    /// C (getsid -> EACCES) for itself.
    #[test]
    fn chains_of_threads_with_different_filters() {
        let a = prog(deny(libc::SYS_getppid, libc::EPERM), 0);
        let b = prog(
            deny(libc::SYS_getpgid, libc::ENOSYS),
            SECCOMP_FILTER_FLAG_LOG,
        );
        let c = prog(deny(libc::SYS_getsid, libc::EACCES), 0);
        let page = shared_page();
        const T_EARLY: usize = 2;
        const T_LATE: usize = 3;
        const READY: usize = 4;
        const COUNTER: usize = 5;
        let mut child = Child::fork(move || {
            let ok = spawn(move || {
                page[T_EARLY].store(gettid() as u64, SeqCst);
                while page[STOP].load(SeqCst) == 0 {
                    if errno_of(libc::SYS_getppid) != 0 {
                        fail(page, 10);
                    }
                    sleep_ms(1);
                }
            });
            if !ok || !no_new_privs() || a.install(0) != 0 || b.install(0) != 0 {
                return 2;
            }
            let ok = spawn(move || {
                if c.install(0) != 0 {
                    fail(page, 3);
                }
                page[T_LATE].store(gettid() as u64, SeqCst);
                while page[STOP].load(SeqCst) == 0 {
                    if errno_of(libc::SYS_getsid) != libc::EACCES
                        || errno_of(libc::SYS_getppid) != libc::EPERM
                        || errno_of(libc::SYS_getpgid) != libc::ENOSYS
                    {
                        fail(page, 11);
                    }
                    sleep_ms(1);
                }
            });
            if !ok {
                return 4;
            }
            page[READY].store(1, SeqCst);
            while page[STOP].load(SeqCst) == 0 {
                if errno_of(libc::SYS_getppid) != libc::EPERM
                    || errno_of(libc::SYS_getpgid) != libc::ENOSYS
                    || errno_of(libc::SYS_getsid) != 0
                {
                    fail(page, 12);
                }
                page[COUNTER].fetch_add(1, SeqCst);
                sleep_ms(1);
            }
            i32::try_from(page[FAIL].load(SeqCst)).unwrap()
        });
        let pid = child.pid;
        wait_until("the child's threads", || {
            page[READY].load(SeqCst) == 1
                && page[T_EARLY].load(SeqCst) != 0
                && page[T_LATE].load(SeqCst) != 0
                || page[FAIL].load(SeqCst) != 0
        });
        assert_eq!(page[FAIL].load(SeqCst), 0, "the child's own checks failed");
        let early = i32::try_from(page[T_EARLY].load(SeqCst)).unwrap();
        let late = i32::try_from(page[T_LATE].load(SeqCst)).unwrap();

        assert_eq!(mode(pid, pid).unwrap(), SeccompMode::Filter { filters: 2 });
        assert_eq!(mode(pid, late).unwrap(), SeccompMode::Filter { filters: 3 });
        assert_eq!(mode(pid, early).unwrap(), SeccompMode::Disabled);

        let main_chain = read_chain(&mut child, pid);
        let late_chain = read_chain(&mut child, late);
        let early_chain = read_chain(&mut child, early);
        assert_eq!(main_chain, vec![a.filter.clone(), b.filter.clone()]);
        assert_eq!(
            late_chain,
            vec![a.filter.clone(), b.filter.clone(), c.filter.clone()]
        );
        assert!(early_chain.is_empty());
        assert_eq!(main_chain[1].flags, SECCOMP_FILTER_FLAG_LOG);
        assert_eq!(main_chain[0].flags, 0);

        // The prefix case: A, B for both with TSYNC, then C in `late` only.
        let plan = group(&[(pid, main_chain.clone()), (late, late_chain.clone())]);
        assert_eq!(
            flat(&plan),
            vec![
                (0, vec![pid, late], true),
                (1, vec![pid, late], true),
                (2, vec![late], false)
            ]
        );
        assert_eq!(
            plan.install_flags(&plan.steps[1]),
            SECCOMP_FILTER_FLAG_LOG | SECCOMP_FILTER_FLAG_TSYNC
        );
        // With the filterless thread, nothing can be installed with TSYNC.
        let plan = group(&[(pid, main_chain), (late, late_chain), (early, early_chain)]);
        assert!(plan.steps.iter().all(|s| !s.tsync));

        for t in [pid, late, early] {
            child.detach(t).unwrap();
        }
        let n = page[COUNTER].load(SeqCst);
        wait_until("the child to run on after detach", || {
            page[COUNTER].load(SeqCst) > n + 5
        });
        page[STOP].store(1, SeqCst);
        assert_eq!(
            child.wait(),
            0,
            "the child's filters misbehaved after detach"
        );
    }

    /// One filter installed with TSYNC in a process of three threads.
    #[test]
    fn tsync_filter_reads_back_equal_everywhere() {
        let a = prog(deny(libc::SYS_getppid, libc::EPERM), 0);
        let page = shared_page();
        const INSTALLED: usize = 2;
        const TIDS: usize = 3; // 3, 4
        const OK: usize = 5;
        let mut child = Child::fork(move || {
            if !no_new_privs() {
                return 2;
            }
            for k in 0..2 {
                let ok = spawn(move || {
                    page[TIDS + k].store(gettid() as u64, SeqCst);
                    while page[INSTALLED].load(SeqCst) == 0 {
                        sleep_ms(1);
                    }
                    if errno_of(libc::SYS_getppid) != libc::EPERM {
                        fail(page, 10 + k as u64);
                    }
                    page[OK].fetch_add(1, SeqCst);
                    idle_until_stop(page);
                });
                if !ok {
                    return 3;
                }
            }
            while page[TIDS].load(SeqCst) == 0 || page[TIDS + 1].load(SeqCst) == 0 {
                sleep_ms(1);
            }
            if a.install(SECCOMP_FILTER_FLAG_TSYNC) != 0 {
                return 4;
            }
            page[INSTALLED].store(1, SeqCst);
            if errno_of(libc::SYS_getppid) != libc::EPERM {
                return 5;
            }
            page[OK].fetch_add(1, SeqCst);
            idle_until_stop(page);
            i32::try_from(page[FAIL].load(SeqCst)).unwrap()
        });
        let pid = child.pid;
        wait_until("the filter in all threads", || {
            page[OK].load(SeqCst) == 3 || page[FAIL].load(SeqCst) != 0 || child_gone(pid)
        });
        assert_eq!(page[FAIL].load(SeqCst), 0);
        let tids = [
            pid,
            i32::try_from(page[TIDS].load(SeqCst)).unwrap(),
            i32::try_from(page[TIDS + 1].load(SeqCst)).unwrap(),
        ];
        let mut chains = Vec::new();
        for t in tids {
            assert_eq!(mode(pid, t).unwrap(), SeccompMode::Filter { filters: 1 });
            chains.push((t, read_chain(&mut child, t)));
        }
        for (t, c) in &chains {
            assert_eq!(c, &vec![a.filter.clone()], "thread {t}");
        }
        let plan = group(&chains);
        assert!(plan.identical());
        assert_eq!(plan.filters, vec![a.filter.clone()]);
        assert_eq!(flat(&plan), vec![(0, tids.to_vec(), true)]);
        for t in tids {
            child.detach(t).unwrap();
        }
        page[STOP].store(1, SeqCst);
        assert_eq!(child.wait(), 0);
    }

    fn child_gone(pid: i32) -> bool {
        !std::path::Path::new(&format!("/proc/{pid}/task/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    }

    /// A process that dropped to uid/gid 1000 (no capabilities) and then
    /// installed a filter under no_new_privs; root reads it all the same.
    #[test]
    fn unprivileged_target_is_read_by_root() {
        let a = prog(deny(libc::SYS_getppid, libc::EPERM), 0);
        let page = shared_page();
        const READY: usize = 2;
        let mut child = Child::fork(move || {
            // SAFETY: credential changes of this single-threaded child.
            unsafe {
                if !no_new_privs()
                    || libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(1000, 1000, 1000) != 0
                    || libc::setresuid(1000, 1000, 1000) != 0
                {
                    return 2;
                }
            }
            if a.install(0) != 0 {
                return 3;
            }
            if errno_of(libc::SYS_getppid) != libc::EPERM {
                return 4;
            }
            page[READY].store(1, SeqCst);
            idle_until_stop(page);
            0
        });
        let pid = child.pid;
        wait_until("the child to drop privileges", || {
            page[READY].load(SeqCst) == 1 || child_gone(pid)
        });
        assert_eq!(page[READY].load(SeqCst), 1, "the child failed to set up");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = |n: &str| {
            status
                .lines()
                .find(|l| l.starts_with(n))
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(line("Uid:"), "Uid:\t1000\t1000\t1000\t1000");
        assert_eq!(line("CapEff:"), "CapEff:\t0000000000000000");
        assert_eq!(line("CapPrm:"), "CapPrm:\t0000000000000000");
        assert_eq!(line("NoNewPrivs:"), "NoNewPrivs:\t1");
        assert_eq!(mode(pid, pid).unwrap(), SeccompMode::Filter { filters: 1 });
        assert_eq!(read_chain(&mut child, pid), vec![a.filter.clone()]);
        child.detach(pid).unwrap();
        page[STOP].store(1, SeqCst);
        assert_eq!(child.wait(), 0);
    }

    /// Strict mode is reported as such, not as a kernel problem.
    #[test]
    fn strict_mode_thread_is_reported() {
        let mut fds = [0i32; 2];
        // SAFETY: a fresh pipe.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let mut child = Child::fork(move || {
            // SAFETY: strict mode, then block reading a pipe whose write
            // end this process keeps open: read is allowed in strict mode.
            unsafe {
                if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_STRICT, 0, 0, 0) != 0 {
                    return 2;
                }
                let mut b = [0u8; 1];
                libc::read(fds[0], b.as_mut_ptr().cast(), 1);
                libc::syscall(libc::SYS_exit, 3);
            }
            3
        });
        // SAFETY: our copies of the pipe ends.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        let pid = child.pid;
        wait_until("strict mode", || {
            matches!(mode(pid, pid), Ok(SeccompMode::Strict)) || child_gone(pid)
        });
        assert_eq!(mode(pid, pid).unwrap(), SeccompMode::Strict);
        child.seize(pid).unwrap();
        let e = filters(pid).unwrap_err();
        assert!(
            matches!(e, SeccompError::Strict { tid } if tid == pid),
            "{e}"
        );
        assert!(e.to_string().contains("strict mode"), "{e}");
        child.kill();
    }

    /// A tracer confined by seccomp itself is refused; the error says why.
    #[test]
    fn confined_tracer_gets_a_clear_error() {
        let a = prog(deny(libc::SYS_getppid, libc::EPERM), 0);
        let allow_all = prog(
            vec![SockFilter {
                code: u16::try_from(libc::BPF_RET | libc::BPF_K).unwrap(),
                jt: 0,
                jf: 0,
                k: SECCOMP_RET_ALLOW,
            }],
            0,
        );
        let page = shared_page();
        const READY: usize = 2;
        let mut child = Child::fork(move || {
            if !no_new_privs() || a.install(0) != 0 {
                return 2;
            }
            page[READY].store(1, SeqCst);
            idle_until_stop(page);
            0
        });
        let pid = child.pid;
        wait_until("the child's filter", || {
            page[READY].load(SeqCst) == 1 || child_gone(pid)
        });
        // A thread of ours confines itself (root: no no_new_privs needed;
        // the filter stays with that thread) and traces the child. The
        // kernel detaches the child when that thread ends.
        let r = std::thread::spawn(move || {
            if allow_all.install(0) != 0 {
                return Err("installing the tracer's own filter".to_string());
            }
            let mut tracer = Child::not_owned(pid);
            tracer.seize(pid)?;
            let r = filters(pid);
            tracer.detach(pid)?;
            Ok(r)
        })
        .join()
        .unwrap()
        .unwrap();
        let e = r.unwrap_err();
        assert!(
            matches!(e, SeccompError::Ptrace { errno: Errno::EACCES, tid, .. } if tid == pid),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("CAP_SYS_ADMIN") && msg.contains("confined"),
            "{msg}"
        );
        page[STOP].store(1, SeqCst);
        assert_eq!(child.wait(), 0);
    }

    /// Executes `group`'s plan for `chains` in a real process (its threads
    /// install their own filters, in plan order; TSYNC steps once), then
    /// reads the chains back.
    fn replay(chains: Vec<Vec<&'static Prog>>) {
        let n = chains.len();
        let synthetic: Vec<(i32, Vec<SeccompFilter>)> = chains
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    i32::try_from(i).unwrap(),
                    c.iter().map(|p| p.filter.clone()).collect(),
                )
            })
            .collect();
        let plan = group(&synthetic);
        // The programs of the plan's filters, and the flat list of
        // (thread index, program, flags) installs.
        let progs: Vec<&'static Prog> = plan
            .filters
            .iter()
            .map(|f| {
                *chains
                    .iter()
                    .flatten()
                    .find(|p| &p.filter == f)
                    .expect("a plan filter comes from a chain")
            })
            .collect();
        let mut ops: Vec<(usize, &'static Prog, u64)> = Vec::new();
        for s in &plan.steps {
            let extra = plan.install_flags(s) & SECCOMP_FILTER_FLAG_TSYNC;
            let take = if s.tsync { 1 } else { s.threads.len() };
            for &t in &s.threads[..take] {
                ops.push((t as usize, progs[s.filter], extra));
            }
        }
        let ops: &'static [(usize, &'static Prog, u64)] = Box::leak(ops.into_boxed_slice());
        let page = shared_page();
        const NEXT: usize = 2;
        const STARTED: usize = 3;
        const DONE: usize = 4;
        const TIDS: usize = 16;
        // Each thread waits for all to exist, then makes its installs when
        // their turn comes.
        let run = move |i: usize| {
            page[TIDS + i].store(gettid() as u64, SeqCst);
            page[STARTED].fetch_add(1, SeqCst);
            while page[STARTED].load(SeqCst) < n as u64 {
                sleep_ms(1);
            }
            loop {
                let k = crate::usize_of(page[NEXT].load(SeqCst));
                if k >= ops.len() || page[FAIL].load(SeqCst) != 0 {
                    break;
                }
                let (t, p, extra) = ops[k];
                if t == i {
                    let r = p.install(extra);
                    if r != 0 {
                        fail(page, 1000 + k as u64 * 10 + (-r) as u64);
                    }
                    page[NEXT].store(k as u64 + 1, SeqCst);
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            }
            page[DONE].fetch_add(1, SeqCst);
            idle_until_stop(page);
        };
        let mut child = Child::fork(move || {
            if !no_new_privs() {
                return 2;
            }
            for i in 1..n {
                if !spawn(move || run(i)) {
                    return 3;
                }
            }
            run(0);
            i32::try_from(page[FAIL].load(SeqCst)).unwrap()
        });
        let pid = child.pid;
        wait_until("the plan to run", || {
            page[DONE].load(SeqCst) == n as u64 || page[FAIL].load(SeqCst) != 0 || child_gone(pid)
        });
        assert_eq!(
            page[FAIL].load(SeqCst),
            0,
            "an install failed (1000 + 10 * op + errno), plan {:?}",
            flat(&plan)
        );
        assert_eq!(page[DONE].load(SeqCst), n as u64);
        let tids: Vec<i32> = (0..n)
            .map(|i| i32::try_from(page[TIDS + i].load(SeqCst)).unwrap())
            .collect();
        let mut back = Vec::new();
        for (i, &t) in tids.iter().enumerate() {
            let chain = read_chain(&mut child, t);
            assert_eq!(chain, synthetic[i].1, "thread {i} (tid {t})");
            back.push((t, chain));
        }
        // Reading back and planning again gives the same plan.
        let again = group(&back);
        assert_eq!(again.filters, plan.filters);
        assert_eq!(
            again
                .steps
                .iter()
                .map(|s| (s.filter, s.tsync))
                .collect::<Vec<_>>(),
            plan.steps
                .iter()
                .map(|s| (s.filter, s.tsync))
                .collect::<Vec<_>>()
        );
        for t in tids {
            child.detach(t).unwrap();
        }
        page[STOP].store(1, SeqCst);
        assert_eq!(child.wait(), 0);
    }

    #[test]
    fn executing_the_plan_rebuilds_the_chains() {
        let a = prog(deny(libc::SYS_getppid, libc::EPERM), 0);
        let b = prog(
            deny(libc::SYS_getpgid, libc::ENOSYS),
            SECCOMP_FILTER_FLAG_LOG,
        );
        let c = prog(deny(libc::SYS_getsid, libc::EACCES), 0);
        let d = prog(deny(libc::SYS_getrusage, libc::EPERM), 0);
        let l = prog(
            deny(libc::SYS_getrusage, libc::EPERM),
            SECCOMP_FILTER_FLAG_LOG,
        );
        // A shared prefix (TSYNC), then per-thread extensions.
        replay(vec![vec![a, b, l], vec![a, b, c, d], vec![a, b]]);
        // Nothing shared, an empty chain, the same filter at two depths.
        replay(vec![vec![a], vec![], vec![b, a], vec![b]]);
    }
}
