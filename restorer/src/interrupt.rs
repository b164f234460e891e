//! While a restore builds its process, SIGTERM, SIGINT, SIGHUP and SIGQUIT
//! sent to tern kill (SIGKILL) and reap that process, then end tern: a
//! supervisor stopping a restore sees no half-built process crash.
//!
//! The signals are blocked in the thread that arms the guard (and so in
//! every thread it starts later, the tracer threads included) and taken by
//! a watcher thread with `sigtimedwait`. Disarming stops the watcher and
//! unblocks them: from then on they act as usual (the restored process is
//! whole and no longer dies with tern). A signal tern was started with
//! ignored (`nohup`, or `&` in a script for SIGINT and SIGQUIT) is left
//! alone: blocked, the kernel would queue it for the watcher instead of
//! dropping it, and a restore the caller shielded would be killed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

const SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

fn set_of(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Armed while a restore builds its process.
pub struct BuildGuard {
    child: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
    old_mask: libc::sigset_t,
}

impl BuildGuard {
    /// Block the signals here and start watching for them.
    pub fn arm() -> BuildGuard {
        let watched: Vec<i32> = SIGNALS.into_iter().filter(|&s| !ignored(s)).collect();
        let set = set_of(&watched);
        // SAFETY: pthread_sigmask with valid sets.
        let old_mask = unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        let child = Arc::new(AtomicI32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (child.clone(), stop.clone());
        let watcher = std::thread::Builder::new()
            .name("tern-restore-signals".into())
            .spawn(move || watch(set, c, st))
            .ok();
        BuildGuard {
            child,
            stop,
            watcher,
            old_mask,
        }
    }

    /// The process being built (0: none yet).
    pub fn set_child(&self, pid: i32) {
        self.child.store(pid, Ordering::SeqCst);
    }
}

impl Drop for BuildGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Not joined: the watcher sees `stop` within a tick (50 ms), which
        // a restore must not wait for (it would count in the time until
        // the process runs). A signal it takes after this is passed on.
        drop(self.watcher.take());
        // SAFETY: restoring this thread's mask as it was.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

/// Whether `sig` is ignored (SIG_IGN) in this process.
fn ignored(sig: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the disposition
    // into a local struct.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

fn watch(set: libc::sigset_t, child: Arc<AtomicI32>, stop: Arc<AtomicBool>) {
    let tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: sigtimedwait with a valid set and timeout.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &tick) };
        if sig <= 0 {
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            // Disarmed meanwhile: the signal is for tern as it is now
            // (unblocked again in the other threads), not for the build.
            // SAFETY: kill of our own process with the signal taken.
            unsafe { libc::kill(libc::getpid(), sig) };
            return;
        }
        let pid = child.load(Ordering::SeqCst);
        if pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let end = Instant::now() + Duration::from_secs(5);
            let mut how = String::from("it was not reaped within 5 s");
            while Instant::now() < end {
                use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
                match waitpid(
                    nix::unistd::Pid::from_raw(pid),
                    Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
                ) {
                    Ok(WaitStatus::StillAlive) => {}
                    Ok(WaitStatus::Signaled(_, s, _)) => {
                        how = format!("it ended by signal {}", s as i32);
                        break;
                    }
                    Ok(other) => {
                        how = format!("it ended: {other:?}");
                        break;
                    }
                    Err(_) => {
                        how = "it was already reaped".into();
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            eprintln!(
                "tern: error: restore interrupted by signal {sig}: the process being restored (PID {pid}) was killed ({how}); nothing was left running"
            );
        } else {
            eprintln!(
                "tern: error: restore interrupted by signal {sig} before any process existed"
            );
        }
        // SAFETY: _exit ends tern at once, as the signal would have.
        unsafe { libc::_exit(128 + sig) };
    }
}
