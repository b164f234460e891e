//! POSIX timers (`timer_create`): what /proc/PID/timers lists of each, the
//! `struct sigevent` a restore passes to `timer_create`, and
//! `PR_TIMER_CREATE_RESTORE_IDS`, which makes `timer_create` take the ID it
//! is given (Linux 6.15+).
//!
//! /proc/PID/timers (fs/proc/base.c, `show_timer`), per timer:
//! `ID: %d`, `signal: %d/%px` (signal number and `sigev_value`),
//! `notify: %s/%s.%d` (`signal`, `none`; `tid` when the signal goes to one
//! thread (SIGEV_THREAD_ID), else `pid`; then that thread or process) and
//! `ClockID: %d`. The time left, the interval and the overrun are read by
//! `timer_gettime` and `timer_getoverrun` in the process itself.

/// `prctl(PR_TIMER_CREATE_RESTORE_IDS, ...)` and its arguments
/// (include/uapi/linux/prctl.h).
pub const PR_TIMER_CREATE_RESTORE_IDS: u64 = PR_TIMER_CREATE_RESTORE_IDS_OPTION as u64;
pub const PR_TIMER_CREATE_RESTORE_IDS_OFF: u64 = 0;
pub const PR_TIMER_CREATE_RESTORE_IDS_ON: u64 = 1;
/// `sigev_notify` values (include/uapi/asm-generic/siginfo.h).
pub const SIGEV_SIGNAL: i32 = 0;
pub const SIGEV_NONE: i32 = 1;
pub const SIGEV_THREAD_ID: i32 = 4;
/// Clocks a timer of a restored process may use: REALTIME, MONOTONIC,
/// PROCESS_CPUTIME_ID, BOOTTIME, REALTIME_ALARM, BOOTTIME_ALARM, TAI. Not
/// THREAD_CPUTIME_ID: it counts the thread that created the timer, which
/// /proc does not show; nor another process's CPU clock (a negative ID).
pub const TIMER_CLOCKS: [i32; 7] = [0, 1, 2, 7, 8, 9, 11];
/// `sizeof(struct sigevent)`.
pub const SIGEVENT_LEN: usize = 64;

/// Where a timer's expiry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// SIGEV_NONE: nothing is sent (the process polls `timer_gettime`).
    None,
    /// SIGEV_SIGNAL: the signal goes to the process.
    Signal,
    /// SIGEV_THREAD_ID: the signal goes to this thread (glibc's
    /// SIGEV_THREAD is one of these, to its helper thread).
    Thread(i32),
}

/// One timer as /proc/PID/timers lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PosixTimer {
    pub id: i32,
    pub signo: i32,
    pub sigev_value: u64,
    pub notify: Notify,
    pub clockid: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum PosixTimersError {
    #[error("PID {pid}: reading /proc/{pid}/timers: {source}")]
    Read {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("PID {pid}: /proc/{pid}/timers: cannot parse {what:?}; is /proc a Linux procfs?")]
    Format { pid: i32, what: String },
}

/// Parse /proc/PID/timers; Err(the line) on one it cannot read.
pub fn parse(text: &str) -> Result<Vec<PosixTimer>, String> {
    let mut out: Vec<PosixTimer> = Vec::new();
    for l in text.lines() {
        let bad = || l.to_string();
        let (key, v) = l.split_once(':').ok_or_else(bad)?;
        let v = v.trim();
        if key == "ID" {
            out.push(PosixTimer {
                id: v.parse().map_err(|_| bad())?,
                signo: 0,
                sigev_value: 0,
                notify: Notify::Signal,
                clockid: 0,
            });
            continue;
        }
        let t = out.last_mut().ok_or_else(bad)?;
        match key {
            "signal" => {
                let (s, val) = v.split_once('/').ok_or_else(bad)?;
                t.signo = s.parse().map_err(|_| bad())?;
                t.sigev_value = u64::from_str_radix(val, 16).map_err(|_| bad())?;
            }
            "notify" => {
                let (how, whom) = v.split_once('/').ok_or_else(bad)?;
                let (kind, n) = whom.split_once('.').ok_or_else(bad)?;
                let n: i32 = n.parse().map_err(|_| bad())?;
                t.notify = match (how, kind) {
                    ("none", _) => Notify::None,
                    ("signal", "pid") => Notify::Signal,
                    ("signal", "tid") => Notify::Thread(n),
                    _ => return Err(bad()),
                };
            }
            "ClockID" => t.clockid = v.parse().map_err(|_| bad())?,
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// The POSIX timers of `pid` (none if it has no timers file entries).
pub fn list(pid: i32) -> Result<Vec<PosixTimer>, PosixTimersError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/timers"))
        .map_err(|source| PosixTimersError::Read { pid, source })?;
    parse(&text).map_err(|what| PosixTimersError::Format { pid, what })
}

/// Whether this kernel can give a timer its ID back
/// (`PR_TIMER_CREATE_RESTORE_IDS`, asked with its GET, which changes
/// nothing).
pub fn restore_ids_supported() -> bool {
    const GET: libc::c_ulong = 2;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(PR_TIMER_CREATE_RESTORE_IDS_OPTION, GET, 0, 0, 0) >= 0 }
}

/// The option number as prctl(2) takes it.
const PR_TIMER_CREATE_RESTORE_IDS_OPTION: libc::c_int = 77;

/// `struct sigevent` for `timer_create`: value, signal, notify, thread.
pub fn sigevent_bytes(signo: i32, sigev_value: u64, notify: Notify) -> [u8; SIGEVENT_LEN] {
    let mut b = [0u8; SIGEVENT_LEN];
    let (how, tid) = match notify {
        Notify::None => (SIGEV_NONE, 0),
        Notify::Signal => (SIGEV_SIGNAL, 0),
        Notify::Thread(t) => (SIGEV_THREAD_ID | SIGEV_SIGNAL, t),
    };
    b[0..8].copy_from_slice(&sigev_value.to_ne_bytes());
    b[8..12].copy_from_slice(&signo.to_ne_bytes());
    b[12..16].copy_from_slice(&how.to_ne_bytes());
    b[16..20].copy_from_slice(&tid.to_ne_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs in a child process: the prctl and the timers it creates are
    /// process-wide.
    fn in_child(f: impl FnOnce() -> Result<(), String>) {
        // SAFETY: fork in a test; the child only makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match f() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("child: {e}");
                    1
                }
            };
            // SAFETY: leave the child without running the test harness.
            unsafe { libc::_exit(code) };
        }
        let mut st = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        assert!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "child failed: {st:#x}"
        );
    }

    #[test]
    fn timers_are_listed_and_created_again_with_their_ids() {
        in_child(|| {
            let me = std::process::id() as i32;
            // SAFETY: gettid takes nothing.
            let tid = unsafe { libc::gettid() };
            let want = [
                PosixTimer {
                    id: 0,
                    signo: libc::SIGUSR1,
                    sigev_value: 0x1122_3344,
                    notify: Notify::Signal,
                    clockid: libc::CLOCK_MONOTONIC,
                },
                PosixTimer {
                    id: 1234,
                    signo: libc::SIGRTMIN() + 1,
                    sigev_value: 7,
                    notify: Notify::Thread(tid),
                    clockid: libc::CLOCK_REALTIME,
                },
                PosixTimer {
                    id: 77,
                    signo: libc::SIGALRM,
                    sigev_value: 0,
                    notify: Notify::None,
                    clockid: libc::CLOCK_BOOTTIME,
                },
            ];
            let prctl = |v: u64| {
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(PR_TIMER_CREATE_RESTORE_IDS_OPTION, v, 0, 0, 0) }
            };
            // Before Linux 6.15 the kernel picks the IDs (0, 1, 2 here):
            // what tern then does (refuse every POSIX timer) rests on
            // restore_ids_supported() saying so, checked against the
            // prctl itself; the listing is checked either way.
            let kept = prctl(PR_TIMER_CREATE_RESTORE_IDS_ON) == 0;
            if kept != restore_ids_supported() {
                return Err(format!(
                    "PR_TIMER_CREATE_RESTORE_IDS works: {kept}, restore_ids_supported(): {}",
                    restore_ids_supported()
                ));
            }
            let mut want = want.to_vec();
            if !kept {
                eprintln!(
                    "this kernel ({}) has no PR_TIMER_CREATE_RESTORE_IDS: tern refuses POSIX timers here",
                    std::fs::read_to_string("/proc/sys/kernel/osrelease")
                        .unwrap_or_default()
                        .trim()
                );
                for (i, t) in want.iter_mut().enumerate() {
                    t.id = i32::try_from(i).unwrap_or(0);
                }
            }
            for t in &want {
                let sev = sigevent_bytes(t.signo, t.sigev_value, t.notify);
                let mut id: i32 = t.id;
                // SAFETY: timer_create reads the sigevent, writes the id.
                let r = unsafe {
                    libc::syscall(libc::SYS_timer_create, t.clockid, sev.as_ptr(), &mut id)
                };
                if r != 0 || id != t.id {
                    return Err(format!(
                        "timer_create({t:?}): {r} id {id}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            if kept {
                prctl(PR_TIMER_CREATE_RESTORE_IDS_OFF);
            }
            let mut got = list(me).map_err(|e| e.to_string())?;
            got.sort_by_key(|t| t.id);
            want.sort_by_key(|t| t.id);
            if got != want {
                return Err(format!("listed {got:?}, created {want:?}"));
            }
            Ok(())
        });
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(parse("signal: 10/0\n").is_err());
        assert!(parse("ID: 1\nnotify: thread/pid.4\n").is_err());
        assert!(parse("ID: x\n").is_err());
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn the_sigevent_layout_matches_libc() {
        assert_eq!(SIGEVENT_LEN, std::mem::size_of::<libc::sigevent>());
        let b = sigevent_bytes(10, 0x55, Notify::Thread(99));
        // SAFETY: sigevent is plain data of that size.
        let s: libc::sigevent = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
        assert_eq!(s.sigev_signo, 10);
        assert_eq!(s.sigev_notify, SIGEV_THREAD_ID);
        assert_eq!(s.sigev_value.sival_ptr as u64, 0x55);
        #[cfg(target_env = "gnu")]
        assert_eq!(s.sigev_notify_thread_id, 99);
    }
}
