//! The end of a migration's dump: the target stays frozen, its image
//! written, until the tern that asked says whether the destination runs it.
//!
//! The dump's end runs in the guardian child (see `session::guardian`); the
//! decision is made in the tern that forked it, which talks to the
//! destination. Two pipes join them, made before the fork ([`hold_pipes`]):
//! the guardian says `W` and the moment of the freeze once the image is
//! written, then reads one decision:
//!
//! - `K`: the target is doomed (the destination's copy is ready to run):
//!   each of its threads is bound to die with the guardian's tracer thread
//!   (`PTRACE_O_EXITKILL`), then `k` is acknowledged, so that the
//!   destination is told to run only when this copy never will again. The
//!   SIGKILL itself follows when tern lets go of its ends (it has the
//!   destination's word that its copy runs, or it ended) or after
//!   [`KILL_WITHIN`]: the exit of a big process frees its memory, tens of
//!   milliseconds of a CPU per GiB, which would otherwise compete with the
//!   copy's start. Threads that could not be bound are killed at once.
//! - `R`, or the end of the pipe (a tern killed, a migration abandoned):
//!   resume it, exactly where it was.
//!
//! The target is not kept frozen long past the decision (a post-copy
//! serves the frozen round's pages from the image): a guardian that died
//! later, at its deadline or to the OOM killer, would let it run again
//! beside the destination's copy were it not bound to die with it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a doomed target waits for tern to let go before its kill.
pub const KILL_WITHIN: Duration = Duration::from_secs(5);

/// The guardian's ends (in [`crate::dump::DumpOptions::hold`]).
#[derive(Debug, Clone)]
pub struct HoldGate {
    to_tern: Arc<OwnedFd>,
    from_tern: Arc<OwnedFd>,
    /// tern's own ends, closed in the guardian: a tern gone must read as
    /// the end of the pipe there.
    tern_ends: [i32; 2],
}

/// tern's ends: waits for the image, sends the decision.
#[derive(Debug)]
pub struct HoldControl {
    from_guardian: std::fs::File,
    to_guardian: std::fs::File,
}

/// What the guardian decided, from its own end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Kill,
    Resume,
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("making the pipes to the dump's guardian: {0}")]
    Pipe(#[source] std::io::Error),
    #[error("the dump of PID {pid} ended before its image was written (its own error says why)")]
    Ended { pid: i32 },
    #[error("the dump of PID {pid} did not write its image within {waited:?}")]
    TimedOut { pid: i32, waited: Duration },
    #[error(
        "the guardian holding PID {pid} did not confirm the {what} within {waited:?} (it ended: the target resumed)"
    )]
    NoAck {
        pid: i32,
        what: &'static str,
        waited: Duration,
    },
    #[error("telling the guardian holding PID {pid} to {what}: {source}")]
    Tell {
        pid: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Make the two pipes (close-on-exec: no program tern starts holds them).
pub fn hold_pipes() -> Result<(HoldGate, HoldControl), HoldError> {
    let p =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| HoldError::Pipe(e.into()));
    let (g_rd, t_wr) = p()?;
    let (t_rd, g_wr) = p()?;
    let tern_ends = [t_rd.as_raw_fd(), t_wr.as_raw_fd()];
    Ok((
        HoldGate {
            to_tern: Arc::new(g_wr),
            from_tern: Arc::new(g_rd),
            tern_ends,
        },
        HoldControl {
            from_guardian: t_rd.into(),
            to_guardian: t_wr.into(),
        },
    ))
}

/// CLOCK_MONOTONIC in ns (the clock of `Instant`, shared by every process
/// of the host).
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
}

impl HoldGate {
    /// In the guardian, first: let go of tern's ends.
    pub(crate) fn enter_guardian(&self) {
        for fd in self.tern_ends {
            // SAFETY: in the forked guardian, these numbers are its copies
            // of tern's ends, owned by nothing else there that will use them.
            unsafe { libc::close(fd) };
        }
    }

    /// In the guardian, with the image written: say so, and wait for the
    /// decision. On `K`, `doom` binds the target's threads to the guardian
    /// (false if it could not bind them all: `kill` then runs before the
    /// acknowledgement), and `kill` sends the SIGKILL once tern lets go.
    pub(crate) fn hold(
        &self,
        frozen_at_ns: u64,
        doom: impl FnOnce() -> bool,
        kill: impl FnOnce(),
    ) -> Decision {
        let mut out =
            std::fs::File::from(self.to_tern.try_clone().expect("dup of a pipe end we hold"));
        let mut inp = std::fs::File::from(
            self.from_tern
                .try_clone()
                .expect("dup of a pipe end we hold"),
        );
        let mut msg = vec![b'W'];
        msg.extend_from_slice(&frozen_at_ns.to_le_bytes());
        if out.write_all(&msg).is_err() {
            return Decision::Resume;
        }
        let mut b = [0u8; 1];
        match inp.read(&mut b) {
            Ok(1) if b[0] == b'K' => {
                if !doom() {
                    kill();
                    let _ = out.write_all(b"k");
                    return Decision::Kill;
                }
                let _ = out.write_all(b"k");
                wait_for_end(&mut inp, KILL_WITHIN);
                kill();
                Decision::Kill
            }
            _ => Decision::Resume,
        }
    }
}

/// Read `inp` until its end, for at most `within`.
fn wait_for_end(inp: &mut std::fs::File, within: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let until = Instant::now() + within;
    let mut b = [0u8; 16];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let wait = PollTimeout::from(u16::try_from(left.as_millis().min(1000)).unwrap_or(1000));
        match poll(&mut [PollFd::new(inp.as_fd(), PollFlags::POLLIN)], wait) {
            Ok(n) if n > 0 => match inp.read(&mut b) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            },
            _ => {}
        }
    }
}

impl HoldControl {
    /// Wait until the image is written and the target frozen: the moment
    /// of the freeze (CLOCK_MONOTONIC ns).
    pub fn wait_written(&mut self, pid: i32, timeout: Duration) -> Result<u64, HoldError> {
        let mut m = [0u8; 9];
        self.read_within(&mut m, timeout).map_err(|e| match e {
            Some(waited) => HoldError::TimedOut { pid, waited },
            None => HoldError::Ended { pid },
        })?;
        if m[0] != b'W' {
            return Err(HoldError::Ended { pid });
        }
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&m[1..]);
        Ok(u64::from_le_bytes(ns))
    }

    /// Doom the held target: returns once it can never run again (bound
    /// to die with its guardian, or killed). The SIGKILL follows when this
    /// control is dropped (or [`KILL_WITHIN`] after).
    pub fn kill(&mut self, pid: i32, timeout: Duration) -> Result<(), HoldError> {
        self.tell(pid, b'K', "kill it")?;
        self.ack(pid, b'k', "kill", timeout)
    }

    /// Resume the target (the migration is abandoned).
    pub fn resume(mut self, pid: i32) -> Result<(), HoldError> {
        self.tell(pid, b'R', "resume it")
    }

    fn tell(&mut self, pid: i32, b: u8, what: &'static str) -> Result<(), HoldError> {
        self.to_guardian
            .write_all(&[b])
            .map_err(|source| HoldError::Tell { pid, what, source })
    }

    fn ack(
        &mut self,
        pid: i32,
        want: u8,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(), HoldError> {
        let mut b = [0u8; 1];
        match self.read_within(&mut b, timeout) {
            Ok(()) if b[0] == want => Ok(()),
            _ => Err(HoldError::NoAck {
                pid,
                what,
                waited: timeout,
            }),
        }
    }

    /// Fill `buf`; `Err(Some(waited))` at the deadline, `Err(None)` at
    /// the end of the pipe.
    fn read_within(&mut self, buf: &mut [u8], timeout: Duration) -> Result<(), Option<Duration>> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let until = Instant::now() + timeout;
        let mut got = 0;
        while got < buf.len() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Some(timeout));
            }
            let wait = PollTimeout::from(u16::try_from(left.as_millis().min(1000)).unwrap_or(1000));
            let ready = poll(
                &mut [PollFd::new(self.from_guardian.as_fd(), PollFlags::POLLIN)],
                wait,
            );
            if !ready.is_ok_and(|n| n > 0) {
                continue;
            }
            match self.from_guardian.read(&mut buf[got..]) {
                Ok(0) => return Err(None),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(None),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guardian's side run on a thread (the pipes are what a fork
    /// shares): each decision reaches it, each acknowledgement comes back.
    #[test]
    fn decisions_cross_the_pipes() {
        for (decide, want) in [
            ("K", Decision::Kill),
            ("R", Decision::Resume),
            ("", Decision::Resume),
        ] {
            let (gate, mut ctl) = hold_pipes().unwrap();
            let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let k = killed.clone();
            let g = std::thread::spawn(move || {
                gate.hold(
                    42,
                    || true,
                    || k.store(true, std::sync::atomic::Ordering::SeqCst),
                )
            });
            assert_eq!(ctl.wait_written(1, Duration::from_secs(5)).unwrap(), 42);
            match decide {
                "K" => {
                    ctl.kill(1, Duration::from_secs(5)).unwrap();
                    // Doomed, not yet killed: that waits for tern to let go.
                    std::thread::sleep(Duration::from_millis(50));
                    assert!(!killed.load(std::sync::atomic::Ordering::SeqCst));
                    drop(ctl);
                }
                "R" => ctl.resume(1).unwrap(),
                _ => drop(ctl),
            }
            let got = g.join().unwrap();
            assert_eq!(got, want, "decision {decide:?}");
            assert_eq!(
                killed.load(std::sync::atomic::Ordering::SeqCst),
                want == Decision::Kill
            );
        }
    }
}
