//! Which process a PID names: whether it is one tern may work on, and
//! whether it is still the process a session started with (PIDs are reused).

use super::TrackerError;
use std::path::Path;

/// Whether `pid` exists and is not a zombie.
pub fn alive_now(pid: i32) -> bool {
    start_time(pid).is_ok_and(|st| alive(pid, st))
}

/// `pid` is still the process that started at `start_time`, and not a
/// zombie (a zombie has no memory left to dump).
pub fn alive(pid: i32, start_time: u64) -> bool {
    match procfs::process::Process::new(pid).and_then(|p| p.stat()) {
        Ok(s) => s.starttime == start_time && !matches!(s.state, 'Z' | 'X' | 'x'),
        Err(_) => false,
    }
}

/// Field 22 of /proc/PID/stat: tells a PID's process from a later one.
pub fn start_time(pid: i32) -> Result<u64, TrackerError> {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .map(|s| s.starttime)
        .map_err(|_| TrackerError::NoProcess { pid })
}

/// A PID this tern may work on: a user process, not tern itself.
pub fn check_target(pid: i32) -> Result<(), TrackerError> {
    if pid <= 0 {
        return Err(TrackerError::NoProcess { pid });
    }
    if pid == nix::unistd::getpid().as_raw()
        || Path::new(&format!("/proc/self/task/{pid}")).exists()
    {
        return Err(TrackerError::OwnProcess { pid });
    }
    let p = procfs::process::Process::new(pid).map_err(|_| TrackerError::NoProcess { pid })?;
    let stat = p.stat().map_err(|_| TrackerError::NoProcess { pid })?;
    const PF_KTHREAD: u32 = 0x0020_0000;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(TrackerError::KernelThread {
            pid,
            comm: stat.comm,
        });
    }
    Ok(())
}
