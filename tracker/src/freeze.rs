//! Stop every thread of a process with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT)
//! and let them go again. Unlike SIGSTOP this is invisible to the target's
//! parent and leaves its job-control state alone. Every wait has a deadline;
//! dropping a [`Frozen`] detaches every thread, re-delivering any signal that
//! arrived while it was stopped.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("no process with PID {pid}; check the PID")]
    NoProcess { pid: i32 },
    #[error(
        "cannot attach to thread {tid} of PID {pid}: {errno} (is another tracer, e.g. gdb or strace, attached? is ptrace restricted by yama/ptrace_scope?)"
    )]
    Seize { pid: i32, tid: i32, errno: Errno },
    #[error(
        "thread {tid} of PID {pid} did not stop within {timeout:?} (uninterruptible sleep, D state?); the process was left running"
    )]
    Timeout {
        pid: i32,
        tid: i32,
        timeout: Duration,
    },
    #[error("PID {pid} exited while tern was stopping it")]
    Exited { pid: i32 },
}

/// The stopped threads of one process.
pub struct Frozen {
    pid: i32,
    /// tid -> signal to re-deliver on detach.
    threads: BTreeMap<i32, Option<Signal>>,
}

impl Frozen {
    pub fn freeze(pid: i32, timeout: Duration) -> Result<Frozen, FreezeError> {
        let deadline = Instant::now() + timeout;
        let mut f = Frozen {
            pid,
            threads: BTreeMap::new(),
        };
        // Threads may be created while we attach: loop until a pass over
        // /proc/PID/task finds none we do not hold (held ones cannot clone).
        loop {
            let tids = list_tids(pid)?;
            let new: Vec<i32> = tids
                .into_iter()
                .filter(|t| !f.threads.contains_key(t))
                .collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                match ptrace::seize(Pid::from_raw(tid), ptrace::Options::PTRACE_O_TRACESYSGOOD) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => continue, // exited meanwhile
                    Err(errno) => return Err(FreezeError::Seize { pid, tid, errno }),
                }
                if let Err(errno) = ptrace::interrupt(Pid::from_raw(tid)) {
                    let _ = ptrace::detach(Pid::from_raw(tid), None);
                    if errno == Errno::ESRCH {
                        continue;
                    }
                    return Err(FreezeError::Seize { pid, tid, errno });
                }
                let sig = wait_stop(pid, tid, deadline, timeout)?;
                match sig {
                    WaitOutcome::Stopped(sig) => {
                        f.threads.insert(tid, sig);
                    }
                    WaitOutcome::Gone => {}
                }
            }
        }
        if f.threads.is_empty() {
            return Err(FreezeError::Exited { pid });
        }
        Ok(f)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn tids(&self) -> impl Iterator<Item = i32> + '_ {
        self.threads.keys().copied()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for (&tid, &sig) in &self.threads {
            if let Err(e) = ptrace::detach(Pid::from_raw(tid), sig)
                && e != Errno::ESRCH
            {
                tracing::warn!(pid = self.pid, tid, "ptrace detach: {e}");
            }
        }
    }
}

pub(crate) enum WaitOutcome {
    /// Stopped; `Some(sig)` if the stop was a signal-delivery stop whose
    /// signal must be passed on when the thread is let go.
    Stopped(Option<Signal>),
    Gone,
}

/// Wait (polling, with a deadline) for `tid` to report a stop.
pub(crate) fn wait_stop(
    pid: i32,
    tid: i32,
    deadline: Instant,
    timeout: Duration,
) -> Result<WaitOutcome, FreezeError> {
    let mut nap = Duration::from_micros(20);
    loop {
        match waitpid(
            Pid::from_raw(tid),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(WaitStatus::PtraceEvent(_, _, _)) => return Ok(WaitOutcome::Stopped(None)),
            Ok(WaitStatus::Stopped(_, sig)) => {
                // A signal-delivery stop (or group stop) came first. Keep the
                // signal for the detach; the thread is stopped either way.
                let keep = match sig {
                    Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU => {
                        Some(sig)
                    }
                    s => Some(s),
                };
                return Ok(WaitOutcome::Stopped(keep));
            }
            Ok(WaitStatus::PtraceSyscall(_)) => return Ok(WaitOutcome::Stopped(None)),
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => {
                return Ok(WaitOutcome::Gone);
            }
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(_) => return Ok(WaitOutcome::Gone),
        }
        if Instant::now() >= deadline {
            let _ = ptrace::detach(Pid::from_raw(tid), None);
            return Err(FreezeError::Timeout { pid, tid, timeout });
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(2));
    }
}

/// Thread ids of `pid`.
pub fn list_tids(pid: i32) -> Result<Vec<i32>, FreezeError> {
    sys::proc::tids(pid).map_err(|_| FreezeError::NoProcess { pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A multi-threaded child is stopped and resumed; its counter stands
    /// still while frozen and moves again after.
    #[test]
    fn freeze_and_thaw_a_threaded_child() {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("i=0; while :; do i=$((i+1)); done")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::thread::sleep(Duration::from_millis(50));
        let utime = || sys::proc::stat(pid, None).unwrap().utime;
        let state = || sys::proc::stat(pid, None).unwrap().state;
        {
            let f = Frozen::freeze(pid, Duration::from_secs(5)).unwrap();
            assert_eq!(f.tids().count(), 1);
            assert_eq!(state(), 't', "traced-stop while frozen");
            let u = utime();
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(utime(), u, "no CPU time while frozen");
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(state(), 'R');
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(
            Frozen::freeze(i32::MAX - 1, Duration::from_secs(1)),
            Err(FreezeError::NoProcess { .. })
        ));
    }
}
