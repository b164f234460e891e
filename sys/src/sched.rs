//! A thread's scheduling state: its policy, nice value, real-time priority
//! and deadline parameters (`sched_getattr(2)` / `sched_setattr(2)`), its
//! CPU affinity (`sched_getaffinity(2)`) and its I/O priority
//! (`ioprio_get(2)`).
//!
//! All of it belongs to each thread, and all of it can be read and set from
//! outside by TID, without injecting anything: a dump reads it while the
//! process is frozen, a restore sets it on each thread it has built. A
//! process that was reniced, pinned to CPUs, put in `SCHED_IDLE` or
//! `SCHED_FIFO`, or given an I/O class comes back so.

use nix::errno::Errno;

/// `struct sched_attr` (include/uapi/linux/sched/types.h), as of
/// `SCHED_ATTR_SIZE_VER1` (56 bytes, with the utilization clamps).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedAttr {
    pub size: u32,
    pub sched_policy: u32,
    pub sched_flags: u64,
    /// SCHED_NORMAL, SCHED_BATCH
    pub sched_nice: i32,
    /// SCHED_FIFO, SCHED_RR
    pub sched_priority: u32,
    /// SCHED_DEADLINE (ns)
    pub sched_runtime: u64,
    pub sched_deadline: u64,
    pub sched_period: u64,
    /// Utilization clamps (SCHED_FLAG_UTIL_CLAMP_*; not kept).
    pub sched_util_min: u32,
    pub sched_util_max: u32,
}

/// include/uapi/linux/sched/types.h
pub const SCHED_ATTR_SIZE_VER1: u32 = 56;
/// Policies (include/uapi/linux/sched.h).
pub const SCHED_NORMAL: u32 = 0;
pub const SCHED_FIFO: u32 = 1;
pub const SCHED_RR: u32 = 2;
pub const SCHED_BATCH: u32 = 3;
pub const SCHED_IDLE: u32 = 5;
pub const SCHED_DEADLINE: u32 = 6;
/// `sched_flags` bit: children get SCHED_NORMAL and nice 0 back.
pub const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// `ioprio_get(2)` / `ioprio_set(2)` `which` (include/uapi/linux/ioprio.h):
/// one thread, by TID.
pub const IOPRIO_WHO_PROCESS: i32 = 1;
/// I/O priority classes (the top 3 of the 16 bits).
pub const IOPRIO_CLASS_SHIFT: u16 = 13;
pub const IOPRIO_CLASS_NONE: u16 = 0;
pub const IOPRIO_CLASS_RT: u16 = 1;
pub const IOPRIO_CLASS_BE: u16 = 2;
pub const IOPRIO_CLASS_IDLE: u16 = 3;

/// The number of CPUs a `cpu_set_t` covers (glibc's CPU_SETSIZE).
const CPU_SETSIZE: usize = 1024;

/// What a restore sets on a thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduling {
    /// `SCHED_*`.
    pub policy: u32,
    /// `SCHED_FLAG_RESET_ON_FORK`.
    pub reset_on_fork: bool,
    /// The nice value (kept for every policy: a real-time thread keeps it
    /// for when it goes back to a fair one).
    pub nice: i32,
    /// The real-time priority (SCHED_FIFO, SCHED_RR; else 0).
    pub priority: u32,
    /// SCHED_DEADLINE parameters (ns; else 0).
    pub runtime_ns: u64,
    pub deadline_ns: u64,
    pub period_ns: u64,
    /// The CPUs the thread may run on.
    pub cpus: Vec<u32>,
    /// The raw I/O priority (class << 13 | level); class NONE (0) follows
    /// the nice value.
    pub ioprio: u16,
}

impl Scheduling {
    /// The I/O priority class (`IOPRIO_CLASS_*`).
    pub fn io_class(&self) -> u16 {
        self.ioprio >> IOPRIO_CLASS_SHIFT
    }

    /// Whether the policy is a real-time one (FIFO, RR) or DEADLINE.
    pub fn is_realtime(&self) -> bool {
        matches!(self.policy, SCHED_FIFO | SCHED_RR | SCHED_DEADLINE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("thread {tid}: {call}: {err}")]
    Call {
        tid: i32,
        call: &'static str,
        err: Errno,
    },
    #[error(
        "thread {tid}: none of its CPUs {cpus:?} is available here (sched_setaffinity: {err}); it would run on any CPU"
    )]
    NoCpus {
        tid: i32,
        cpus: Vec<u32>,
        err: Errno,
    },
}

fn call(tid: i32, call: &'static str, r: libc::c_long) -> Result<libc::c_long, SchedError> {
    if r < 0 {
        return Err(SchedError::Call {
            tid,
            call,
            err: Errno::last(),
        });
    }
    Ok(r)
}

/// The kernel's `sched_attr` of thread `tid`.
pub fn get_attr(tid: i32) -> Result<SchedAttr, SchedError> {
    let mut a = SchedAttr::default();
    // SAFETY: the kernel writes at most `size` (56) bytes into `a`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut a as *mut SchedAttr,
            SCHED_ATTR_SIZE_VER1,
            0,
        )
    };
    call(tid, "sched_getattr", r)?;
    Ok(a)
}

/// `sched_setattr(2)` on thread `tid`.
pub fn set_attr(tid: i32, a: &SchedAttr) -> Result<(), SchedError> {
    let mut a = *a;
    a.size = SCHED_ATTR_SIZE_VER1;
    // SAFETY: the kernel reads `size` bytes of `a`.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &a as *const SchedAttr, 0) };
    call(tid, "sched_setattr", r).map(|_| ())
}

/// The CPUs thread `tid` may run on.
pub fn get_affinity(tid: i32) -> Result<Vec<u32>, SchedError> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes.
    let r =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    call(tid, "sched_getaffinity", r as libc::c_long)?;
    Ok((0..CPU_SETSIZE)
        // SAFETY: CPU_ISSET reads bit `c` of a set of CPU_SETSIZE bits.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .filter_map(|c| u32::try_from(c).ok())
        .collect())
}

/// Let thread `tid` run on `cpus` (those beyond CPU_SETSIZE are ignored).
pub fn set_affinity(tid: i32, cpus: &[u32]) -> Result<(), SchedError> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| (c as usize) < CPU_SETSIZE) {
        // SAFETY: c < CPU_SETSIZE.
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    // SAFETY: the kernel reads size_of::<cpu_set_t>() bytes of `set`.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 {
        let err = Errno::last();
        if err == Errno::EINVAL {
            return Err(SchedError::NoCpus {
                tid,
                cpus: cpus.to_vec(),
                err,
            });
        }
        return Err(SchedError::Call {
            tid,
            call: "sched_setaffinity",
            err,
        });
    }
    Ok(())
}

/// The raw I/O priority of thread `tid`.
pub fn get_ioprio(tid: i32) -> Result<u16, SchedError> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
    call(tid, "ioprio_get", r).and_then(|v| {
        u16::try_from(v).map_err(|_| SchedError::Call {
            tid,
            call: "ioprio_get",
            err: Errno::ERANGE,
        })
    })
}

/// Set the raw I/O priority of thread `tid`.
pub fn set_ioprio(tid: i32, ioprio: u16) -> Result<(), SchedError> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid,
            libc::c_int::from(ioprio),
        )
    };
    call(tid, "ioprio_set", r).map(|_| ())
}

/// The nice value of thread `tid`, whatever its policy (`sched_getattr`
/// reports it for fair policies only). The raw syscall returns `20 - nice`
/// (1..=40), never a negative value that could be mistaken for an error.
pub fn get_nice(tid: i32) -> Result<i32, SchedError> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, tid) };
    // getpriority(2) returns 20 - nice: 1..=40.
    call(tid, "getpriority", r).map(|v| 20 - i32::try_from(v).unwrap_or(20))
}

/// Thread `tid`'s scheduling state.
pub fn read(tid: i32) -> Result<Scheduling, SchedError> {
    let a = get_attr(tid)?;
    // For fair policies the kernel reports the thread's time slice in
    // `sched_runtime` (Linux 6.12+); only a deadline thread's parameters
    // are kept (a slice set back would become a custom one).
    let deadline = a.sched_policy == SCHED_DEADLINE;
    let dl = |v: u64| if deadline { v } else { 0 };
    Ok(Scheduling {
        policy: a.sched_policy,
        reset_on_fork: a.sched_flags & SCHED_FLAG_RESET_ON_FORK != 0,
        nice: get_nice(tid)?,
        priority: a.sched_priority,
        runtime_ns: dl(a.sched_runtime),
        deadline_ns: dl(a.sched_deadline),
        period_ns: dl(a.sched_period),
        cpus: get_affinity(tid)?,
        ioprio: get_ioprio(tid)?,
    })
}

/// Give thread `tid` the scheduling state `s`, as far as the caller's
/// privileges let it (tern as root: all of it). The affinity goes first
/// (the kernel refuses SCHED_DEADLINE on a thread that may not run on every
/// CPU of its root domain, and refuses to narrow a deadline thread's CPUs);
/// the nice value is set under a fair policy before a real-time one is
/// set (a real-time thread keeps its nice for later). A [`SchedError::NoCpus`]
/// is returned only after the rest is set: the caller decides whether a
/// thread that may run anywhere is acceptable.
pub fn apply(tid: i32, s: &Scheduling) -> Result<(), SchedError> {
    let affinity = set_affinity(tid, &s.cpus);
    if let Err(e @ SchedError::Call { .. }) = affinity {
        return Err(e);
    }
    let flags = if s.reset_on_fork {
        SCHED_FLAG_RESET_ON_FORK
    } else {
        0
    };
    let fair = SchedAttr {
        sched_policy: if s.is_realtime() {
            SCHED_NORMAL
        } else {
            s.policy
        },
        sched_flags: flags,
        sched_nice: s.nice,
        ..SchedAttr::default()
    };
    set_attr(tid, &fair)?;
    if s.is_realtime() {
        set_attr(
            tid,
            &SchedAttr {
                sched_policy: s.policy,
                sched_flags: flags,
                sched_nice: s.nice,
                sched_priority: s.priority,
                sched_runtime: s.runtime_ns,
                sched_deadline: s.deadline_ns,
                sched_period: s.period_ns,
                ..SchedAttr::default()
            },
        )?;
    }
    if s.io_class() != IOPRIO_CLASS_NONE || get_ioprio(tid)? != s.ioprio {
        set_ioprio(tid, s.ioprio)?;
    }
    affinity
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sched_attr_is_the_kernels_ver1_layout() {
        assert_eq!(
            std::mem::size_of::<SchedAttr>(),
            SCHED_ATTR_SIZE_VER1 as usize
        );
        assert_eq!(std::mem::offset_of!(SchedAttr, sched_nice), 16);
        assert_eq!(std::mem::offset_of!(SchedAttr, sched_runtime), 24);
        assert_eq!(std::mem::offset_of!(SchedAttr, sched_util_min), 48);
    }

    /// A thread of this test process: read, changed with the plain libc
    /// calls a program would use, read again, then set back with `apply`
    /// and checked with those calls.
    #[test]
    fn read_and_apply_round_trip_on_a_real_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: no arguments.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let before = read(tid).unwrap();
        assert_eq!(before.policy, SCHED_NORMAL);
        assert!(!before.cpus.is_empty());
        // As a program would: nice 7, SCHED_BATCH with reset-on-fork, CPU
        // 0 only, I/O class idle.
        // SAFETY: libc calls on our own thread with valid arguments.
        unsafe {
            assert_eq!(libc::setpriority(libc::PRIO_PROCESS, tid as u32, 7), 0);
            let p = libc::sched_param { sched_priority: 0 };
            assert_eq!(
                libc::sched_setscheduler(tid, libc::SCHED_BATCH | libc::SCHED_RESET_ON_FORK, &p),
                0
            );
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
        set_ioprio(tid, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT).unwrap();
        let changed = read(tid).unwrap();
        assert_eq!(
            (changed.policy, changed.reset_on_fork, changed.nice),
            (SCHED_BATCH, true, 7)
        );
        assert_eq!(changed.cpus, vec![0]);
        assert_eq!(changed.io_class(), IOPRIO_CLASS_IDLE);
        // Back to what it was, then to the changed state, with apply.
        apply(tid, &before).unwrap();
        assert_eq!(read(tid).unwrap(), before);
        apply(tid, &changed).unwrap();
        // SAFETY: plain queries of our own thread.
        unsafe {
            assert_eq!(
                libc::sched_getscheduler(tid),
                libc::SCHED_BATCH | libc::SCHED_RESET_ON_FORK
            );
            *libc::__errno_location() = 0;
            assert_eq!(libc::getpriority(libc::PRIO_PROCESS, tid as u32), 7);
        }
        assert_eq!(read(tid).unwrap(), changed);
        // A real-time policy keeps the nice value set before it.
        let fifo = Scheduling {
            policy: SCHED_FIFO,
            priority: 3,
            ..changed.clone()
        };
        apply(tid, &fifo).unwrap();
        // SAFETY: plain query of our own thread.
        assert_eq!(
            // SAFETY: sched_getscheduler(2) takes an integer.
            unsafe { libc::sched_getscheduler(tid) },
            libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK
        );
        assert_eq!(read(tid).unwrap(), fifo);
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn cpus_that_do_not_exist_are_reported_not_fatal() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: no arguments.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let mut s = read(tid).unwrap();
        let before = s.cpus.clone();
        s.cpus = vec![1000];
        s.nice = 3;
        let e = apply(tid, &s).unwrap_err();
        assert!(matches!(e, SchedError::NoCpus { .. }), "{e}");
        assert!(e.to_string().contains("[1000]"), "{e}");
        // The rest was set; the CPUs are left as they were.
        let now = read(tid).unwrap();
        assert_eq!((now.nice, now.cpus), (3, before));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
