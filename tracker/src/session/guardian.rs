//! The guardian fork: work on a target that must finish even if tern is
//! killed (a thread left mid-way in an injected syscall would crash) runs in
//! a forked child of tern in a session of its own, which reports its result
//! back through a pipe.

use super::{TrackerError, alive, start_time};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Run `f` (a whole injection session) in a forked child of tern in a
/// session of its own, and return its result. Why: a tern SIGKILLed while a
/// target thread runs an injected syscall from the vDSO (mapping or
/// unmapping the scratch area: the two steps the scratch stub cannot cover)
/// would leave that thread to crash. The child is not killed with tern: it
/// finishes the session, restores the thread and detaches. Callers must be
/// single-threaded here (they are: the eBPF stream opens later, or is closed).
pub(super) fn guarded<T, F>(pid: i32, timeout: Duration, f: F) -> Result<T, TrackerError>
where
    T: Serialize + for<'de> Deserialize<'de>,
    F: FnOnce() -> Result<T, TrackerError>,
{
    // The child's every wait has a deadline of `timeout`; bound the whole.
    let deadline = timeout * 8 + Duration::from_secs(5);
    let r = guardian(pid, deadline, move || {
        let st = start_time(pid).unwrap_or(0);
        f().map_err(|e| {
            // A target that dies under the injector: say so, not how ptrace failed.
            let e = if alive(pid, st) {
                e
            } else {
                TrackerError::Exited {
                    pid,
                    what: "syscall injection",
                }
            };
            serde_json::json!({
                "msg": e.to_string(),
                "unavailable": matches!(e, TrackerError::Unavailable { .. }),
                "exited": matches!(e, TrackerError::Exited { .. } | TrackerError::NoProcess { .. }),
            })
        })
    })?;
    r.map_err(|v| {
        let msg = v["msg"].as_str().unwrap_or("unknown error").to_string();
        if v["exited"].as_bool() == Some(true) {
            TrackerError::Exited {
                pid,
                what: "syscall injection",
            }
        } else if v["unavailable"].as_bool() == Some(true) {
            TrackerError::Unavailable {
                backend: "uffd-wp",
                why: msg,
            }
        } else {
            TrackerError::Injection { pid, msg }
        }
    })
}

/// Run `f` in a forked child of tern in a session of its own and return its
/// result (sent back as JSON through a pipe), waiting at most `deadline`
/// (then the child is killed). The child runs only `f` and `_exit`s.
pub(super) fn guardian<T, F>(
    pid: i32,
    deadline: Duration,
    f: F,
) -> Result<Result<T, serde_json::Value>, TrackerError>
where
    T: Serialize + for<'de> Deserialize<'de>,
    F: FnOnce() -> Result<T, serde_json::Value>,
{
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(TrackerError::State {
            path: "pipe".into(),
            what: std::io::Error::last_os_error().to_string(),
        });
    }
    let (rd, wr) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: the child only runs `f` (ptrace work on its own threads) and
    // exits with _exit, running no destructor of the parent's state.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(TrackerError::State {
            path: "fork".into(),
            what: std::io::Error::last_os_error().to_string(),
        });
    }
    if child == 0 {
        drop(rd);
        unsafe { libc::setsid() };
        let msg = match f() {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => serde_json::json!({ "err": e }),
        };
        let mut wr = wr;
        let _ = wr.write_all(msg.to_string().as_bytes());
        unsafe { libc::_exit(0) };
    }
    drop(wr);
    let deadline = Instant::now() + deadline;
    let mut rd = rd;
    let mut buf = Vec::new();
    let mut pfd = libc::pollfd {
        fd: fds[0],
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            unsafe { libc::kill(child, libc::SIGKILL) };
            break;
        }
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        if n > 0 {
            let mut chunk = [0u8; 65536];
            match rd.read(&mut chunk) {
                Ok(0) => break,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    let mut st = 0;
    unsafe { libc::waitpid(child, &mut st, 0) };
    let v: serde_json::Value = serde_json::from_slice(&buf).map_err(|_| TrackerError::State {
        path: format!("guardian process {child}").into(),
        what: format!("ended without a result (wait status {st:#x}) while working on PID {pid}"),
    })?;
    if let Some(ok) = v.get("ok") {
        return serde_json::from_value(ok.clone())
            .map(Ok)
            .map_err(|e| TrackerError::State {
                path: format!("guardian process {child}").into(),
                what: e.to_string(),
            });
    }
    Ok(Err(v
        .get("err")
        .cloned()
        .unwrap_or(serde_json::Value::Null)))
}
