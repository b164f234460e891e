//! Host-side state of tracking: the per-target record in `/run/tern`
//! (which image the tracked dirty state continues from), the lock that keeps
//! a second tern off a target, and the clean-up of state left for processes
//! that are gone. Kept apart from the session because it outlives every tern
//! process: each function here reads or writes files other terns share.

use super::TrackerError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where host-side tracking state lives.
pub const STATE_DIR: &str = "/run/tern";
/// Where eBPF objects are pinned, one directory per PID.
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/tern";

/// Host-side record of where the target's tracked dirty state stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct HostState {
    pub(super) pid: i32,
    pub(super) start_time: u64,
    pub(super) backend: String,
    /// Id of the last image whose round completed; dirty state since then
    /// is intact in the kernel.
    pub(super) last_image_id: Option<String>,
    /// A round started and has not finished (or tern died in it).
    pub(super) in_progress: bool,
    pub(super) uffd_fd: Option<i32>,
    /// Pages a `tern track` run saw written (and so re-protected) between
    /// two pre-dumps: the next pre-dump copies them too.
    #[serde(default)]
    pub(super) carry: Vec<images::PageRange>,
}

/// Remove eBPF pins and host state left for processes that are gone. Pinned
/// programs of dead targets record nothing, but the kernel allows only 64
/// programs per tracepoint: without this, chains that end with the target's
/// death (instead of `tern untrack`) would eventually exhaust them.
pub fn gc_stale_state() {
    let gone = |pid: i32| {
        procfs::process::Process::new(pid)
            .and_then(|p| p.stat())
            .map(|s| matches!(s.state, 'Z' | 'X' | 'x'))
            .unwrap_or(true)
    };
    if let Ok(rd) = std::fs::read_dir(BPF_PIN_ROOT) {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
                && gone(pid)
            {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => tracing::info!(pid, "removed eBPF pins of a process that is gone"),
                    Err(err) => tracing::warn!(
                        pid,
                        "removing stale eBPF pins {}: {err}",
                        e.path().display()
                    ),
                }
            }
        }
    }
    let Ok(dir) = state_dir() else { return };
    for name in dir.list().unwrap_or_default() {
        // PID.lock, PID-*.json, and the page service's lazy-PID-START.*.
        let pid = name
            .strip_prefix("lazy-")
            .unwrap_or(&name)
            .split(['-', '.'])
            .next()
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(pid) = pid
            && gone(pid)
        {
            let _ = dir.remove_file(&name);
            continue;
        }
        // The lock of a live process is left alone, held or not: a tern
        // taking it now must never find it held by this sweep (it would
        // report a second tern at work), and an unheld one is simply taken
        // by the next tern.
        if name.ends_with(".lock") {
            continue;
        }
        // State an older tern wrote world-readable.
        if let Ok(Some((f, prov))) = dir.open_file(&name, false)
            && prov.mode & 0o077 != 0
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = f.set_permissions(std::fs::Permissions::from_mode(0o600));
        }
    }
}

/// `/run/tern`: root's, 0700, nothing in it followed through a link.
fn state_dir() -> Result<images::ImageDir, TrackerError> {
    let err = |e: images::ImageError| TrackerError::State {
        path: STATE_DIR.into(),
        what: e.to_string(),
    };
    let d = images::ImageDir::create(Path::new(STATE_DIR)).map_err(err)?;
    d.make_private().map_err(err)?;
    Ok(d)
}

pub(super) fn store_host_state(path: &Path, h: &HostState) -> Result<(), TrackerError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("state files have plain names");
    state_dir()?
        .write_atomic(
            name,
            &serde_json::to_vec(h).expect("state serializes"),
            false,
        )
        .map_err(|e| TrackerError::State {
            path: path.to_path_buf(),
            what: e.to_string(),
        })
}

/// The lock that keeps a second tern off a target: `/run/tern/PID.lock`,
/// flocked; removed (while still held) when the session ends.
pub struct TargetLock {
    dir: images::ImageDir,
    name: String,
    file: std::fs::File,
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // Unlink before unlocking: a tern waiting on this file finds it
        // gone and takes a new one (lock_target checks).
        if self.dir.is_same_file(&self.name, &self.file) {
            let _ = self.dir.remove_file(&self.name);
        }
    }
}

/// One tern at a time per target. A holder that lets go within
/// [`LOCK_WAIT`] is waited for: the lock is a second tern's only while that
/// tern works on the target.
pub(super) fn lock_target(pid: i32) -> Result<TargetLock, TrackerError> {
    let name = format!("{pid}.lock");
    let path = PathBuf::from(format!("{STATE_DIR}/{name}"));
    let dir = state_dir()?;
    match dir.lock_file(&name, LOCK_WAIT) {
        Ok(Some(file)) => Ok(TargetLock { dir, name, file }),
        Ok(None) => Err(TrackerError::Busy { pid, path }),
        Err(e) => Err(TrackerError::State {
            path,
            what: e.to_string(),
        }),
    }
}

/// How long a tern waits for the lock of its target before it reports
/// another tern at work there.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

pub(super) fn load_host_state(path: &Path) -> Option<HostState> {
    let (d, _) = images::ImageDir::open(path.parent()?).ok()?;
    let (bytes, _) = d
        .read_file(path.file_name()?.to_str()?, images::fsdir::MAX_JSON_BYTES)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}
