//! The guardian fork: work on a target that must finish even if tern is
//! killed (a thread left mid-way in an injected syscall would crash) runs in
//! a forked child of tern in a session of its own, which reports its result
//! back through a pipe.
//!
//! Errors cross the pipe typed: the child serializes its error (serde, as
//! JSON) and the parent gets the same error type back, so callers match on
//! variants as they would in one process. What cannot cross as itself is the
//! source error of a kernel interface (an `io::Error`, an errno, a ptrace
//! wrapper's error): it crosses as a [`Cause`], its message and its sources'.

use super::{TrackerError, alive, start_time};
use crate::restorable::Refusal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The message of an error (with those of its sources it does not already
/// carry), standing in for the error itself where it must cross the
/// guardian's pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(transparent)]
#[error("{0}")]
pub struct Cause(String);

impl Cause {
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Cause {
        let mut out = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            let m = s.to_string();
            if !out.contains(&m) {
                out.push_str(": ");
                out.push_str(&m);
            }
            src = s.source();
        }
        Cause(out)
    }

    /// A cause that is only a message (a kernel call's errno, a parse).
    pub fn msg(m: impl Into<String>) -> Cause {
        Cause(m.into())
    }
}

/// Why the guardian gave no result.
#[derive(Debug, thiserror::Error)]
pub enum GuardianError {
    #[error(
        "creating the pipe to a guardian process for PID {pid}: {source}; is tern out of file descriptors?"
    )]
    Pipe {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "forking a guardian process for PID {pid}: {source}; is the system out of processes or memory?"
    )]
    Fork {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "guardian process {child} working on PID {pid} did not finish within {deadline:?} and was killed; raise --timeout-ms if the target is slow to stop"
    )]
    Deadline {
        child: i32,
        pid: i32,
        deadline: Duration,
    },
    #[error(
        "guardian process {child} ended without a result ({status}) while working on PID {pid}"
    )]
    NoResult {
        child: i32,
        pid: i32,
        status: String,
    },
    #[error(
        "guardian process {child} working on PID {pid} sent a result tern cannot read: {source}"
    )]
    BadResult {
        child: i32,
        pid: i32,
        #[source]
        source: serde_json::Error,
    },
}

/// How a [`TrackerError`] crosses the pipe: its variants with their data;
/// those that hold a source error (maps, backend, injection, image...) as
/// `Remote`, their message.
#[derive(Serialize, Deserialize)]
enum TrackerWire {
    NoProcess { pid: i32 },
    Exited { pid: i32, what: String },
    Unavailable { backend: String, why: String },
    ParentPid { path: PathBuf, pid: i32, found: i32 },
    State { path: PathBuf, what: String },
    Busy { pid: i32, path: PathBuf },
    KernelThread { pid: i32, comm: String },
    OwnProcess { pid: i32 },
    NotRestorable { pid: i32, refusals: Vec<Refusal> },
    Injection { pid: i32, msg: String },
    Remote { cause: Cause },
}

impl From<&TrackerError> for TrackerWire {
    fn from(e: &TrackerError) -> TrackerWire {
        use TrackerError as E;
        match e {
            E::NoProcess { pid } => TrackerWire::NoProcess { pid: *pid },
            E::Exited { pid, what } => TrackerWire::Exited {
                pid: *pid,
                what: what.to_string(),
            },
            E::Unavailable { backend, why } => TrackerWire::Unavailable {
                backend: backend.to_string(),
                why: why.clone(),
            },
            E::ParentPid { path, pid, found } => TrackerWire::ParentPid {
                path: path.clone(),
                pid: *pid,
                found: *found,
            },
            E::State { path, what } => TrackerWire::State {
                path: path.clone(),
                what: what.clone(),
            },
            E::Busy { pid, path } => TrackerWire::Busy {
                pid: *pid,
                path: path.clone(),
            },
            E::KernelThread { pid, comm } => TrackerWire::KernelThread {
                pid: *pid,
                comm: comm.clone(),
            },
            E::OwnProcess { pid } => TrackerWire::OwnProcess { pid: *pid },
            E::NotRestorable { pid, refusals } => TrackerWire::NotRestorable {
                pid: *pid,
                refusals: refusals.clone(),
            },
            E::Injection { pid, msg } => TrackerWire::Injection {
                pid: *pid,
                msg: msg.clone(),
            },
            E::Remote { cause } => TrackerWire::Remote {
                cause: cause.clone(),
            },
            E::Maps(_)
            | E::Backend(_)
            | E::Uffd(_)
            | E::Inject(_)
            | E::Image(_)
            | E::Copy(_)
            | E::Restorable(_)
            | E::Guardian(_) => TrackerWire::Remote {
                cause: Cause::of(e),
            },
        }
    }
}

impl From<TrackerWire> for TrackerError {
    fn from(w: TrackerWire) -> TrackerError {
        use TrackerError as E;
        match w {
            TrackerWire::NoProcess { pid } => E::NoProcess { pid },
            TrackerWire::Exited { pid, what } => E::Exited {
                pid,
                what: Cow::Owned(what),
            },
            TrackerWire::Unavailable { backend, why } => E::Unavailable {
                backend: Cow::Owned(backend),
                why,
            },
            TrackerWire::ParentPid { path, pid, found } => E::ParentPid { path, pid, found },
            TrackerWire::State { path, what } => E::State { path, what },
            TrackerWire::Busy { pid, path } => E::Busy { pid, path },
            TrackerWire::KernelThread { pid, comm } => E::KernelThread { pid, comm },
            TrackerWire::OwnProcess { pid } => E::OwnProcess { pid },
            TrackerWire::NotRestorable { pid, refusals } => E::NotRestorable { pid, refusals },
            TrackerWire::Injection { pid, msg } => E::Injection { pid, msg },
            TrackerWire::Remote { cause } => E::Remote { cause },
        }
    }
}

impl Serialize for TrackerError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        TrackerWire::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for TrackerError {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TrackerWire::deserialize(d).map(TrackerError::from)
    }
}

/// Run `f` (a whole injection session) in a forked child of tern in a
/// session of its own, and return its result. Why: a tern SIGKILLed while a
/// target thread runs an injected syscall from the vDSO (mapping or
/// unmapping the scratch area: the two steps the scratch stub cannot cover)
/// would leave that thread to crash. The child is not killed with tern: it
/// finishes the session, restores the thread and detaches. Callers must be
/// single-threaded here (they are: the eBPF stream opens later, or is closed).
pub(super) fn guarded<T, F>(pid: i32, timeout: Duration, f: F) -> Result<T, TrackerError>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> Result<T, TrackerError>,
{
    // The child's every wait has a deadline of `timeout`; bound the whole.
    let deadline = timeout * 8 + Duration::from_secs(5);
    let r = guardian(pid, deadline, move || {
        let st = start_time(pid).unwrap_or(0);
        // A target that dies under the injector: say so, not how ptrace failed.
        f().map_err(|e| if alive(pid, st) { e } else { exited(pid) })
    })?;
    r.map_err(|e| match e {
        TrackerError::Exited { .. } | TrackerError::NoProcess { .. } => exited(pid),
        // How the injection failed (ptrace, the injector): said as such.
        TrackerError::Remote { cause } => TrackerError::Injection {
            pid,
            msg: cause.to_string(),
        },
        e => e,
    })
}

fn exited(pid: i32) -> TrackerError {
    TrackerError::Exited {
        pid,
        what: "syscall injection".into(),
    }
}

/// Run `f` in a forked child of tern in a session of its own and return its
/// result (sent back through a pipe, see the module documentation), waiting
/// at most `deadline` (then the child is killed). The child runs only `f`
/// and `_exit`s.
pub(super) fn guardian<T, E, F>(
    pid: i32,
    deadline: Duration,
    f: F,
) -> Result<Result<T, E>, GuardianError>
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
    F: FnOnce() -> Result<T, E>,
{
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork, pipe2, setsid};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let (rd, wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| GuardianError::Pipe {
        pid,
        source: e.into(),
    })?;
    let (mut rd, wr) = (std::fs::File::from(rd), std::fs::File::from(wr));
    // SAFETY: the child only runs `f` (ptrace work on its own threads) and
    // exits with _exit, running no destructor of the parent's state.
    let child = match unsafe { fork() } {
        Err(e) => {
            return Err(GuardianError::Fork {
                pid,
                source: e.into(),
            });
        }
        Ok(ForkResult::Child) => {
            drop(rd);
            // The child of a fork is no group leader: setsid cannot fail.
            let _ = setsid();
            // An error that does not serialize leaves the pipe empty: the
            // parent then says the guardian ended without a result.
            if let Ok(msg) = serde_json::to_vec(&f()) {
                let mut wr = wr;
                let _ = wr.write_all(&msg);
            }
            // SAFETY: _exit ends the child without running the parent's
            // destructors or atexit handlers.
            unsafe { libc::_exit(0) };
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(wr);
    let until = Instant::now() + deadline;
    let mut buf = Vec::new();
    let mut timed_out = false;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = kill(child, Signal::SIGKILL);
            timed_out = true;
            break;
        }
        let wait = PollTimeout::from(u16::try_from(left.as_millis().min(1000)).unwrap_or(1000));
        let ready = poll(&mut [PollFd::new(rd.as_fd(), PollFlags::POLLIN)], wait);
        if ready.is_ok_and(|n| n > 0) {
            let mut chunk = [0u8; 65536];
            match rd.read(&mut chunk) {
                Ok(0) => break,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    let status = match waitpid(child, None) {
        Ok(WaitStatus::Exited(_, code)) => format!("exit code {code}"),
        Ok(WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig}"),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("waitpid: {e}"),
    };
    let child = child.as_raw();
    if buf.is_empty() {
        return Err(if timed_out {
            GuardianError::Deadline {
                child,
                pid,
                deadline,
            }
        } else {
            GuardianError::NoResult { child, pid, status }
        });
    }
    serde_json::from_slice(&buf).map_err(|source| GuardianError::BadResult { child, pid, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_errors_cross_the_pipe_as_themselves() {
        let e = TrackerError::NotRestorable {
            pid: 42,
            refusals: vec![Refusal {
                kind: "socket".into(),
                at: "fd 3".into(),
                reason: "a TCP socket".into(),
            }],
        };
        let want = e.to_string();
        let back: TrackerError = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert!(
            matches!(&back, TrackerError::NotRestorable { pid: 42, refusals } if refusals.len() == 1),
            "{back:?}"
        );
        assert_eq!(back.to_string(), want);
        let e = TrackerError::Exited {
            pid: 7,
            what: "dump".into(),
        };
        let back: TrackerError = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert!(matches!(&back, TrackerError::Exited { pid: 7, what } if what == "dump"));
    }

    #[test]
    fn an_error_with_a_kernel_source_crosses_as_its_message() {
        let e = TrackerError::Image(images::ImageError::Io {
            path: "/x/pages.img".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        });
        let want = e.to_string();
        let back: TrackerError = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert!(matches!(&back, TrackerError::Remote { .. }), "{back:?}");
        assert_eq!(back.to_string(), want);
    }

    #[test]
    fn the_guardian_returns_the_childs_typed_result() {
        let r: Result<u32, TrackerError> =
            guardian(1, Duration::from_secs(10), || Ok::<u32, TrackerError>(5)).unwrap();
        assert_eq!(r.unwrap(), 5);
        let r: Result<u32, TrackerError> = guardian(1, Duration::from_secs(10), || {
            Err(TrackerError::Busy {
                pid: 3,
                path: "/run/tern/3.lock".into(),
            })
        })
        .unwrap();
        assert!(matches!(r, Err(TrackerError::Busy { pid: 3, .. })));
    }

    #[test]
    fn a_dumps_error_crosses_the_guardian_typed() {
        use crate::dump::DumpError;
        let r: Result<(), DumpError> = guardian(1, Duration::from_secs(10), || {
            Err(DumpError::Registers {
                pid: 10,
                tid: 11,
                source: Cause::msg("PTRACE_GETREGSET: ESRCH"),
            })
        })
        .unwrap();
        let e = r.unwrap_err();
        assert!(
            matches!(
                &e,
                DumpError::Registers {
                    pid: 10,
                    tid: 11,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "registers of thread 11 of PID 10: PTRACE_GETREGSET: ESRCH"
        );
        let r: Result<(), DumpError> = guardian(1, Duration::from_secs(10), || {
            Err(DumpError::Tracker(TrackerError::Exited {
                pid: 10,
                what: "dump".into(),
            }))
        })
        .unwrap();
        assert!(
            matches!(
                r,
                Err(DumpError::Tracker(TrackerError::Exited { pid: 10, .. }))
            ),
            "{r:?}"
        );
    }

    #[test]
    fn a_guardian_past_its_deadline_is_killed_and_says_so() {
        let r = guardian(
            1,
            Duration::from_millis(200),
            || -> Result<(), TrackerError> {
                std::thread::sleep(Duration::from_secs(30));
                Ok(())
            },
        );
        assert!(matches!(r, Err(GuardianError::Deadline { .. })), "{r:?}");
    }
}
