//! Finding and removing what tern leaves in a target between invocations
//! (tracking userfaultfds, scratch pages, eBPF pins, host state): the
//! `tern untrack` verb and the teardown at the end of a session.

use super::{
    BPF_PIN_ROOT, STATE_DIR, TrackerError, check_target, guarded, lock_target, start_time,
};
use crate::ebpf::{DirtyStream, PinMode};
use crate::inject::Injector;
use crate::uffd;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// What `teardown_target` removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Untracked {
    pub pid: i32,
    pub uffd_fds_closed: Vec<i32>,
    pub scratch_pages_removed: usize,
    pub ebpf_unpinned: bool,
}

/// `tern untrack`: remove every trace of tern from `pid` without knowing
/// its images: tern's userfaultfds, scratch pages, eBPF pins, host state.
pub fn untrack(pid: i32, timeout: Duration) -> Result<Untracked, TrackerError> {
    check_target(pid)?;
    let st = start_time(pid)?;
    let _lock = lock_target(pid)?;
    let fds: Vec<i32> = find_tracking_uffds(pid)
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    let pin = PathBuf::from(format!("{BPF_PIN_ROOT}/{pid}"));
    let mut ebpf_unpinned = false;
    if pin.exists() {
        match DirtyStream::open(pid, PinMode::Dir(pin.clone())).and_then(|s| s.close_and_unpin()) {
            Ok(()) => ebpf_unpinned = true,
            Err(e) => {
                tracing::warn!(
                    pid,
                    "eBPF pins under {}: {e}; removing the directory",
                    pin.display()
                );
                ebpf_unpinned = std::fs::remove_dir_all(&pin).is_ok();
            }
        }
    }
    let scratch = teardown_target(pid, fds.clone(), timeout)?;
    let _ = std::fs::remove_file(format!("{STATE_DIR}/{pid}-{st}.json"));
    Ok(Untracked {
        pid,
        uffd_fds_closed: fds,
        scratch_pages_removed: scratch,
        ebpf_unpinned,
    })
}

/// Close `fds` in the target and unmap every scratch page of ours.
pub(super) fn teardown_target(
    pid: i32,
    fds: Vec<i32>,
    timeout: Duration,
) -> Result<usize, TrackerError> {
    let scratch = Injector::find_scratch(pid)?;
    if fds.is_empty() && scratch.is_empty() {
        return Ok(0);
    }
    let known = scratch.first().copied();
    guarded(pid, timeout, move || {
        let mut inj = Injector::attach(pid, timeout)?;
        let res = (|| -> Result<(), TrackerError> {
            inj.ensure_scratch(known)?;
            inj.remove_leftover_scratch()?;
            for fd in &fds {
                let r = inj.syscall(libc::SYS_close, [*fd as u64, 0, 0, 0, 0, 0])?;
                if r < 0 {
                    tracing::warn!(pid, fd, "close in target: {}", sys::inject::errno_of(r));
                }
            }
            inj.remove_scratch()?;
            Ok(())
        })();
        let d = inj.detach();
        res?;
        d?;
        Ok(())
    })?;
    // Leftovers beyond the one the injector used (several killed runs).
    let rest = Injector::find_scratch(pid)?;
    if !rest.is_empty() {
        tracing::warn!(pid, "scratch pages remain at {rest:x?}");
    }
    Ok(scratch.len())
}

/// tern's tracking userfaultfds in `pid`: (fd, features). Ours are those
/// handshaken with async write-protect, or never handshaken (a tern killed
/// between creating and arming one).
pub fn find_tracking_uffds(pid: i32) -> Vec<(i32, u64)> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut v: Vec<(i32, u64)> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|fd| uffd::fdinfo_features(pid, fd).map(|f| (fd, f)))
        .filter(|(_, f)| {
            *f == 0
                || f & (uffd::UFFD_FEATURE_WP_ASYNC | uffd::UFFD_FEATURE_WP_UNPOPULATED)
                    == (uffd::UFFD_FEATURE_WP_ASYNC | uffd::UFFD_FEATURE_WP_UNPOPULATED)
        })
        .collect();
    v.sort();
    v
}
