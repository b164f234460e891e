//! seccomp filters of a stopped thread (PTRACE_SECCOMP_GET_FILTER,
//! PTRACE_SECCOMP_GET_METADATA; CONFIG_CHECKPOINT_RESTORE, CAP_SYS_ADMIN)
//! and the plan a restore follows to install them again.
//!
//! Threads can have different chains (a filter installed without TSYNC
//! applies to the installing thread and its later children only), so chains
//! are read per thread, keyed by TID, oldest filter first. A restore installs
//! each filter once per thread that has it, in order, and with
//! `SECCOMP_FILTER_FLAG_TSYNC` when every thread has exactly the same chain
//! up to that filter (then one install covers all of them, as TSYNC did).

use serde::{Deserialize, Serialize};

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;

pub const SECCOMP_SET_MODE_FILTER: u32 = 1;
pub const SECCOMP_FILTER_FLAG_TSYNC: u64 = 1 << 0;
pub const SECCOMP_FILTER_FLAG_LOG: u64 = 1 << 1;
pub const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u64 = 1 << 2;
pub const SECCOMP_FILTER_FLAG_NEW_LISTENER: u64 = 1 << 3;
pub const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const SECCOMP_RET_KILL_THREAD: u32 = 0;
pub const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
pub const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
pub const SECCOMP_RET_LOG: u32 = 0x7ffc_0000;
pub const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// `struct seccomp_metadata` (include/uapi/linux/ptrace.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SeccompMetadata {
    pub filter_off: u64,
    pub flags: u64,
}

/// A thread's seccomp mode, from /proc/PID/task/TID/status.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    Disabled,
    Strict,
    Filter { filters: u32 },
}

/// One classic-BPF filter program and its flags.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SeccompFilter {
    /// Each `struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}` as its 8
    /// bytes in native order.
    pub insns: Vec<u64>,
    /// SECCOMP_FILTER_FLAG_* the kernel kept for it (only LOG is reported).
    pub flags: u64,
}

impl SeccompFilter {
    /// The program as the kernel takes it (`struct sock_filter[]`).
    pub fn insn_bytes(&self) -> Vec<u8> {
        self.insns.iter().flat_map(|i| i.to_ne_bytes()).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("{path}: {what}")]
    Status { path: String, what: String },
    #[error("{op} on thread {tid}, filter {index}: {errno}{hint}")]
    Ptrace {
        op: &'static str,
        tid: i32,
        index: u64,
        errno: nix::errno::Errno,
        hint: &'static str,
    },
}

pub fn mode(pid: i32, tid: i32) -> Result<SeccompMode, SeccompError> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| SeccompError::Status {
        path: path.clone(),
        what: e.to_string(),
    })?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    match field("Seccomp") {
        Some("0") => Ok(SeccompMode::Disabled),
        Some("1") => Ok(SeccompMode::Strict),
        Some("2") => Ok(SeccompMode::Filter {
            filters: field("Seccomp_filters")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }),
        other => Err(SeccompError::Status {
            path,
            what: format!("unexpected Seccomp field {other:?} (a kernel without CONFIG_SECCOMP?)"),
        }),
    }
}

fn ptrace_err(op: &'static str, tid: i32, index: u64) -> SeccompError {
    let errno = nix::errno::Errno::last();
    let hint = match errno {
        nix::errno::Errno::EACCES | nix::errno::Errno::EPERM => {
            " (the tracer needs CAP_SYS_ADMIN and must not be seccomp-confined itself)"
        }
        nix::errno::Errno::EMEDIUMTYPE => " (the thread is in strict mode, not filter mode)",
        nix::errno::Errno::EINVAL => " (a kernel without CONFIG_CHECKPOINT_RESTORE?)",
        nix::errno::Errno::ESRCH => " (the thread must be ptrace-stopped by this thread)",
        _ => "",
    };
    SeccompError::Ptrace {
        op,
        tid,
        index,
        errno,
        hint,
    }
}

/// The filter chain of ptrace-stopped thread `tid`, oldest first.
pub fn filters(tid: i32) -> Result<Vec<SeccompFilter>, SeccompError> {
    let mut out = Vec::new();
    for index in 0u64.. {
        // SAFETY: a NULL buffer asks for the instruction count only.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index,
                std::ptr::null_mut::<u8>(),
            )
        };
        if n < 0 {
            if nix::errno::Errno::last() == nix::errno::Errno::ENOENT {
                break;
            }
            return Err(ptrace_err("PTRACE_SECCOMP_GET_FILTER", tid, index));
        }
        let mut insns = vec![0u64; n as usize];
        // SAFETY: the buffer holds `n` sock_filter entries of 8 bytes.
        let r = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, insns.as_mut_ptr()) };
        if r < 0 {
            return Err(ptrace_err("PTRACE_SECCOMP_GET_FILTER", tid, index));
        }
        insns.truncate(r as usize);
        let mut md = SeccompMetadata {
            filter_off: index,
            flags: 0,
        };
        // SAFETY: the kernel reads filter_off and writes flags.
        let r = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_METADATA,
                tid,
                std::mem::size_of::<SeccompMetadata>(),
                &mut md as *mut SeccompMetadata,
            )
        };
        if r < 0 {
            return Err(ptrace_err("PTRACE_SECCOMP_GET_METADATA", tid, index));
        }
        out.push(SeccompFilter {
            insns,
            flags: md.flags,
        });
    }
    out.reverse();
    Ok(out)
}

/// One install a restore makes: filter `filter` in each of `threads` (or,
/// with `tsync`, once in the first of them for all threads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallStep {
    pub filter: usize,
    pub threads: Vec<i32>,
    pub tsync: bool,
}

/// What a restore installs, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeccompPlan {
    pub filters: Vec<SeccompFilter>,
    pub steps: Vec<InstallStep>,
}

/// Plan the installs for threads' chains (oldest first). Filters shared by
/// every thread at the same position of a common prefix go in with TSYNC;
/// the rest per thread, in chain order.
pub fn group(threads: &[(i32, Vec<SeccompFilter>)]) -> SeccompPlan {
    let mut plan = SeccompPlan::default();
    let index = |plan: &mut SeccompPlan, f: &SeccompFilter| match plan
        .filters
        .iter()
        .position(|g| g == f)
    {
        Some(i) => i,
        None => {
            plan.filters.push(f.clone());
            plan.filters.len() - 1
        }
    };
    if threads.is_empty() {
        return plan;
    }
    // Common prefix of all chains.
    let mut common = 0;
    'outer: loop {
        let Some(first) = threads[0].1.get(common) else {
            break;
        };
        for (_, c) in &threads[1..] {
            if c.get(common) != Some(first) {
                break 'outer;
            }
        }
        common += 1;
    }
    let all: Vec<i32> = threads.iter().map(|t| t.0).collect();
    let tsync = threads.len() > 1;
    for f in &threads[0].1[..common] {
        let i = index(&mut plan, f);
        plan.steps.push(InstallStep {
            filter: i,
            threads: if tsync {
                all.clone()
            } else {
                vec![threads[0].0]
            },
            tsync,
        });
    }
    for (tid, chain) in threads {
        for f in &chain[common..] {
            let i = index(&mut plan, f);
            plan.steps.push(InstallStep {
                filter: i,
                threads: vec![*tid],
                tsync: false,
            });
        }
    }
    plan
}

/// `struct sock_fprog { unsigned short len; struct sock_filter *filter; }`
/// (include/uapi/linux/filter.h) as bytes, for an injected seccomp(2).
pub fn sock_fprog_bytes(filter_addr: u64, len: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&len.to_ne_bytes());
    b[8..16].copy_from_slice(&filter_addr.to_ne_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(k: u64) -> SeccompFilter {
        SeccompFilter {
            insns: vec![k, k + 1],
            flags: 0,
        }
    }

    #[test]
    fn layouts() {
        assert_eq!(std::mem::size_of::<SeccompMetadata>(), 16);
        let b = sock_fprog_bytes(0x1122_3344_5566_7788, 3);
        assert_eq!(&b[0..2], &3u16.to_ne_bytes());
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
    }

    #[test]
    fn plans() {
        // Identical chains: TSYNC installs only.
        let p = group(&[(1, vec![f(1), f(2)]), (2, vec![f(1), f(2)])]);
        assert_eq!(p.steps.len(), 2);
        assert!(p.steps.iter().all(|s| s.tsync && s.threads == vec![1, 2]));
        // A common prefix, then per-thread extras in order.
        let p = group(&[
            (1, vec![f(1), f(3)]),
            (2, vec![f(1)]),
            (3, vec![f(1), f(4), f(5)]),
        ]);
        let v: Vec<(usize, Vec<i32>, bool)> = p
            .steps
            .iter()
            .map(|s| (s.filter, s.threads.clone(), s.tsync))
            .collect();
        assert_eq!(
            v,
            vec![
                (0, vec![1, 2, 3], true),
                (1, vec![1], false),
                (2, vec![3], false),
                (3, vec![3], false)
            ]
        );
        assert_eq!(p.filters, vec![f(1), f(3), f(4), f(5)]);
        // A thread without filters: nothing common, per thread.
        let p = group(&[(1, vec![f(1)]), (2, vec![])]);
        assert_eq!(
            p.steps,
            vec![InstallStep {
                filter: 0,
                threads: vec![1],
                tsync: false
            }]
        );
        // One thread: no TSYNC needed.
        let p = group(&[(1, vec![f(1)])]);
        assert!(!p.steps[0].tsync);
        assert!(group(&[]).steps.is_empty());
    }
}
