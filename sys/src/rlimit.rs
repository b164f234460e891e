//! Resource limits of any process (`prlimit(2)`): nix's `getrlimit` and
//! `setrlimit` act on the calling process only, and a restore sets its
//! child's from outside.

use nix::errno::Errno;

/// `(soft, hard)` limit of `resource` (`RLIMIT_*`) of process `pid` (0: the
/// calling process); `u64::MAX` is unlimited.
pub fn get(pid: i32, resource: u32) -> Result<(u64, u64), Errno> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 reads no new limit (null) and writes one struct
    // rlimit64 into `old`, a local.
    let r = unsafe { libc::prlimit64(pid, resource, std::ptr::null(), &raw mut old) };
    Errno::result(r)?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// Set the limit of `resource` of process `pid` (0: the calling process)
/// to `soft` and `hard`. Raising a hard limit needs CAP_SYS_RESOURCE;
/// another process's limits need the rights to ptrace it.
pub fn set(pid: i32, resource: u32, soft: u64, hard: u64) -> Result<(), Errno> {
    let new = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit64 reads one struct rlimit64 from `new`, a local, and
    // writes no old limit (null).
    let r = unsafe { libc::prlimit64(pid, resource, &raw const new, std::ptr::null_mut()) };
    Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_limits_read_back_as_set() {
        // The core size: nothing else in the tests depends on it.
        let r = libc::RLIMIT_CORE;
        let (soft, hard) = get(0, r).unwrap();
        let me = std::process::id() as i32;
        assert_eq!(get(me, r).unwrap(), (soft, hard));
        let lower = if soft == 0 { 4096.min(hard) } else { 0 };
        set(0, r, lower, hard).unwrap();
        assert_eq!(get(0, r).unwrap(), (lower, hard));
        set(0, r, soft, hard).unwrap();
        assert_eq!(get(0, r).unwrap(), (soft, hard));
        assert_eq!(get(i32::MAX - 1, r), Err(Errno::ESRCH));
    }
}
