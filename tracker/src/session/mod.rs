//! A tracking session on one target: choose and arm a backend, then take
//! pre-dump rounds (images) or telemetry rounds (`tern track`).
//!
//! State that outlives one tern process (so separate `tern pre-dump`
//! invocations chain):
//! - in the target: the userfaultfd, kept open as one fd (uffd-wp backend),
//!   and tern's `[anon:tern-scratch]` page used for syscall injection;
//! - in bpffs: the eBPF maps and links pinned under `/sys/fs/bpf/tern/PID`;
//! - on the host: `/run/tern/PID-STARTTIME.json`, which says which image the
//!   tracked dirty state continues from. A round marks it "in progress"
//!   before it consumes dirty bits, so a tern killed mid-round makes the next
//!   round copy everything instead of silently missing pages.
//!
//! `teardown` (`tern untrack`) removes all of it.
//!
//! This module holds the session itself; [`host`] the host-side state and
//! lock, [`target`] which process a PID names, [`untrack`] the removal of
//! what tern leaves in a target, [`guardian`] the forked child that runs
//! work which must finish even if tern is killed.

use crate::backend::{
    BackendError, DirtySet, DirtyTracker, FullTracker, SoftDirtyTracker, TrackMode, UffdWpTracker,
};
use crate::ebpf::{DirtyStream, PinMode};
use crate::inject::{InjectError, Injector};
use crate::maps::{MapsError, VmaPolicy, read_vmas};
use crate::uffd::{self, UffdError, WpUffd};
use images::{ImageKind, ImageWriter, Inventory, MmRecord, ParentRef, TrackingState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod guardian;
mod host;
mod target;
mod untrack;

pub use guardian::{Cause, GuardianError};
use guardian::{guarded, guardian};
pub use host::{BPF_PIN_ROOT, STATE_DIR, TargetLock, gc_stale_state};
use host::{HostState, load_host_state, lock_target, store_host_state};

pub use target::{alive, alive_now, check_target, start_time};
use untrack::teardown_target;
pub use untrack::{Untracked, find_tracking_uffds, untrack};

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Image(#[from] images::ImageError),
    #[error(transparent)]
    Copy(#[from] crate::copy::CopyError),
    #[error("syscall injection into PID {pid}: {msg}")]
    Injection { pid: i32, msg: String },
    #[error("no process with PID {pid}; check the PID")]
    NoProcess { pid: i32 },
    #[error("PID {pid} exited during the {what}")]
    Exited { pid: i32, what: Cow<'static, str> },
    #[error(
        "backend {backend} is not available on this kernel: {why}; run `tern check` to see what is"
    )]
    Unavailable {
        backend: Cow<'static, str>,
        why: String,
    },
    #[error(
        "{path}: parent image is of PID {found}, not {pid}; give the image directory of this process's previous pre-dump"
    )]
    ParentPid { path: PathBuf, pid: i32, found: i32 },
    #[error("{path}: {what}")]
    State { path: PathBuf, what: String },
    #[error("another tern is working on PID {pid} (lock {path} is held); wait for it or stop it")]
    Busy { pid: i32, path: PathBuf },
    #[error(
        "PID {pid} ({comm}) is a kernel thread: it has no user memory or registers to checkpoint; give the PID of a user process"
    )]
    KernelThread { pid: i32, comm: String },
    #[error("PID {pid} is this tern itself; give the PID of the process to checkpoint")]
    OwnProcess { pid: i32 },
    #[error(transparent)]
    Restorable(#[from] crate::restorable::RestorableError),
    #[error("{}", crate::restorable::describe(*pid, refusals))]
    NotRestorable {
        pid: i32,
        refusals: Vec<crate::restorable::Refusal>,
    },
    #[error(transparent)]
    Guardian(#[from] GuardianError),
    /// An error whose source (an io, errno or ptrace error) does not cross
    /// the guardian's pipe as itself: its message, which names what the
    /// original named.
    #[error("{cause}")]
    Remote { cause: Cause },
}

/// Options of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub track: TrackMode,
    pub ebpf: bool,
    pub compress: bool,
    /// Deadline of every wait on the target (stops, injected syscalls).
    pub timeout: Duration,
    /// Keep the eBPF stream pinned in bpffs after this process (pre-dump
    /// chains); `track` does not pin.
    pub pin_ebpf: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            track: TrackMode::Auto,
            ebpf: true,
            compress: true,
            timeout: Duration::from_secs(5),
            pin_ebpf: true,
        }
    }
}

/// The JSON of one `tern pre-dump`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreDumpReport {
    pub pid: i32,
    pub backend: String,
    pub ebpf: bool,
    pub pages_scanned: u64,
    pub pages_written: u64,
    pub pages_zero: u64,
    pub bytes_written: u64,
    pub frozen_ms: f64,
    pub duration_ms: f64,
    pub ebpf_pages: u64,
    pub vma_changes: u64,
    /// Extra fields (not in the minimal contract):
    pub pages_hole: u64,
    pub full_copy: bool,
    pub armed_vmas: usize,
    pub untracked_vmas: usize,
    pub vanished_pages: u64,
    pub images_dir: String,
    pub parent: Option<String>,
}

/// The JSON line of one `tern track` interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrackRound {
    pub round: u64,
    /// The dirty-tracking backend that reported `kernel_pages`.
    pub backend: String,
    /// Time the target was frozen in this interval's collection (soft-dirty
    /// freezes it to read and clear the bits; uffd-wp never does).
    pub frozen_ms: f64,
    pub t_ms: f64,
    pub kernel_pages: u64,
    pub ebpf_pages: u64,
    pub both: u64,
    pub kernel_only: u64,
    pub ebpf_only: u64,
    pub dirty_rate_mb_s: f64,
    /// Pages the eBPF stream reported in this interval's drain.
    pub ebpf_raw: u64,
    /// Of those, pages not in the kernel's set yet (written after the scan):
    /// matched against the next round.
    pub ebpf_pending: u64,
    pub hot_pages: Vec<String>,
    pub vma_changes: u64,
}

pub struct TrackingSession {
    pid: i32,
    start_time: u64,
    opts: SessionOptions,
    tracker: Box<dyn DirtyTracker>,
    /// fd number of the tracking userfaultfd inside the target.
    target_uffd: Option<i32>,
    /// The uffd existed before this session (a chain continues, or `track`
    /// must not touch it).
    uffd_preexisting: bool,
    scratch: Option<u64>,
    /// Every scratch area of ours in the target, never recorded in images.
    scratch_areas: Vec<u64>,
    ebpf: Option<DirtyStream>,
    ebpf_pin: Option<PathBuf>,
    /// Time the target (one thread) was stopped while attaching.
    attach_frozen: Duration,
    /// Id of the image written by the previous round of this session.
    last_image: Option<String>,
    /// `track`: eBPF pages not yet matched by the kernel's set.
    ebpf_carry: Vec<u64>,
    /// `track`: pages of the previous drain its kernel set did not have.
    ebpf_pending: Vec<u64>,
    state_path: PathBuf,
    /// Batch buffers kept from round to round.
    copier: crate::copy::Copier,
    /// This host's key: every image written is sealed with it.
    seal_key: Option<images::SealKey>,
    _lock: TargetLock,
}

/// When `tern dump`'s live pre-copy stops and the target is frozen.
#[derive(Debug, Clone, Copy)]
pub struct LivePolicy {
    /// Rounds at most (0: none).
    pub max_rounds: usize,
    /// Done once a round copies at most this many pages: the frozen round
    /// should find about as few.
    pub done_pages: u64,
}

impl Default for LivePolicy {
    fn default() -> Self {
        LivePolicy {
            max_rounds: 10,
            done_pages: 256,
        }
    }
}

/// One round of the live pre-copy (in `tern dump`'s JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveRound {
    /// Pages written by the round (data and zero).
    pub pages: u64,
    pub ms: f64,
}

/// Whether more live rounds are worth it: after three rounds, the last one
/// must have copied clearly less (by a tenth) than the best before it;
/// otherwise the target writes as fast as the rounds copy and more rounds
/// only make the dump longer.
/// Whether the live pre-copy makes another round after `rounds`: while
/// they shrink, until one copied at most `policy.done_pages`, or a quarter
/// of the fewest any round before it did. That is a quiet moment (a writer
/// that works in bursts, between two of them): a round more would likely
/// meet the next burst, and stop there, for not shrinking.
fn another_round(rounds: &[LiveRound], policy: LivePolicy) -> bool {
    let Some((last, before)) = rounds.split_last() else {
        return policy.max_rounds > 0;
    };
    if rounds.len() >= policy.max_rounds || last.pages <= policy.done_pages {
        return false;
    }
    if let Some(fewest) = before.iter().map(|r| r.pages).min()
        && last.pages * 4 <= fewest
    {
        return false;
    }
    converging(rounds)
}

/// Whether the live rounds saw a quiet moment: one copied at most half
/// what another did (a writer in bursts). Then the dump's catch-up rounds
/// (see [`TrackingSession::catch_up`]) may meet one right before the
/// freeze; a steady writer has none, and rounds more would only dirty more
/// of the page cache before the frozen copy.
pub fn bursty(rounds: &[LiveRound]) -> bool {
    let most = rounds.iter().map(|r| r.pages).max().unwrap_or(0);
    let fewest = rounds.iter().map(|r| r.pages).min().unwrap_or(0);
    rounds.len() >= 2 && fewest * 2 <= most
}

fn converging(rounds: &[LiveRound]) -> bool {
    let Some((last, before)) = rounds.split_last() else {
        return true;
    };
    if rounds.len() < 3 {
        return true;
    }
    let best = before.iter().map(|r| r.pages).min().unwrap_or(u64::MAX);
    last.pages * 10 < best * 9
}

/// One round's pages, copied into a writer.
struct RoundCopy {
    set: DirtySet,
    vmas: Vec<crate::maps::Vma>,
    vanished_pages: u64,
}

impl TrackingSession {
    /// Attach to `pid` and arm the chosen backend (creating or reusing the
    /// tracking userfaultfd in the target).
    pub fn attach(pid: i32, opts: SessionOptions) -> Result<TrackingSession, TrackerError> {
        check_target(pid)?;
        let st = start_time(pid)?;
        if !alive(pid, st) {
            return Err(TrackerError::NoProcess { pid });
        }
        Self::attach_inner(pid, st, opts).map_err(|e| {
            if alive(pid, st) {
                e
            } else {
                TrackerError::Exited {
                    pid,
                    what: "attach".into(),
                }
            }
        })
    }

    fn attach_inner(
        pid: i32,
        start_time: u64,
        opts: SessionOptions,
    ) -> Result<TrackingSession, TrackerError> {
        gc_stale_state();
        let lock = lock_target(pid)?;
        let state_path = PathBuf::from(format!("{STATE_DIR}/{pid}-{start_time}.json"));
        let backend = resolve_backend(opts.track)?;
        let mut attach_frozen = Duration::ZERO;
        let mut target_uffd = None;
        let mut uffd_preexisting = false;
        let mut scratch = None;
        let tracker: Box<dyn DirtyTracker> = match backend {
            TrackMode::UffdWp => {
                let found = find_tracking_uffds(pid);
                let host = load_host_state(&state_path);
                let keep = host
                    .as_ref()
                    .and_then(|h| h.uffd_fd)
                    .filter(|fd| found.iter().any(|(f, _)| f == fd))
                    .or_else(|| found.iter().find(|(_, feat)| *feat != 0).map(|(f, _)| *f));
                let orphans: Vec<i32> = found
                    .iter()
                    .map(|(f, _)| *f)
                    .filter(|f| Some(*f) != keep)
                    .collect();
                let pidfd = uffd::pidfd_open(pid).map_err(|_| TrackerError::NoProcess { pid })?;
                let need_injection = keep.is_none() || !orphans.is_empty();
                let mut created = None;
                if need_injection {
                    let t = Instant::now();
                    let orphans = orphans.clone();
                    let create = keep.is_none();
                    let timeout = opts.timeout;
                    let (sc, cr): (u64, Option<i32>) = guarded(pid, timeout, move || {
                        let mut inj = Injector::attach(pid, timeout)?;
                        let known = Injector::find_scratch(pid)?.first().copied();
                        let res = (|| -> Result<(u64, Option<i32>), TrackerError> {
                            let sc = inj.ensure_scratch(known)?;
                            let removed = inj.remove_leftover_scratch()?;
                            if !removed.is_empty() {
                                tracing::info!(pid, "removed leftover scratch areas {removed:x?}");
                            }
                            for fd in &orphans {
                                tracing::info!(
                                    pid,
                                    fd,
                                    "closing a leftover tern userfaultfd in the target"
                                );
                                inj.syscall(libc::SYS_close, [*fd as u64, 0, 0, 0, 0, 0])?;
                            }
                            let mut created = None;
                            if create {
                                let flags = (libc::O_CLOEXEC | uffd::UFFD_USER_MODE_ONLY) as u64;
                                let r =
                                    inj.syscall(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
                                if r < 0 {
                                    return Err(TrackerError::Unavailable {
                                        backend: "uffd-wp".into(),
                                        why: format!(
                                            "userfaultfd(2) inside PID {pid} failed: {} (a seccomp filter or vm.unprivileged_userfaultfd?)",
                                            sys::inject::errno_of(r)
                                        ),
                                    });
                                }
                                created = Some(i32::try_from(r).map_err(|_| TrackerError::Unavailable {
                                    backend: "uffd-wp".into(),
                                    why: format!("userfaultfd(2) inside PID {pid} returned {r}, not an fd"),
                                })?);
                            }
                            Ok((sc, created))
                        })();
                        let detached = inj.detach();
                        let r = res?;
                        detached?;
                        Ok(r)
                    })?;
                    scratch = Some(sc);
                    created = cr;
                    attach_frozen = t.elapsed();
                }
                let (fd, preexisting) = match (keep, created) {
                    (Some(fd), _) => (fd, true),
                    (None, Some(fd)) => (fd, false),
                    (None, None) => unreachable!("either kept or created"),
                };
                let local = uffd::pidfd_getfd(&pidfd, pid, fd)?;
                let needs_handshake = uffd::fdinfo_features(pid, fd).unwrap_or(0) == 0;
                let wp = if needs_handshake {
                    WpUffd::handshake(local)?
                } else {
                    WpUffd::adopt(local)
                };
                target_uffd = Some(fd);
                uffd_preexisting = preexisting;
                tracing::debug!(
                    pid,
                    fd,
                    local = wp.as_raw_fd(),
                    preexisting,
                    "tracking userfaultfd"
                );
                Box::new(UffdWpTracker::new(pid, wp)?)
            }
            TrackMode::SoftDirty => Box::new(SoftDirtyTracker::new(pid, opts.timeout)?),
            TrackMode::Full | TrackMode::Auto => Box::new(FullTracker::new(pid)?),
        };
        // Found once: only tern maps scratch areas, and the lock keeps other
        // terns out while this session lives.
        let scratch_areas = Injector::find_scratch(pid)?;
        let scratch = scratch.or(scratch_areas.first().copied());
        let (ebpf, ebpf_pin) = if opts.ebpf {
            let pin = opts
                .pin_ebpf
                .then(|| PathBuf::from(format!("{BPF_PIN_ROOT}/{pid}")));
            let mode = match &pin {
                Some(p) => PinMode::Dir(p.clone()),
                None => PinMode::None,
            };
            match DirtyStream::open(pid, mode) {
                Ok(s) => (Some(s), pin),
                Err(e) => {
                    tracing::warn!(
                        pid,
                        "eBPF dirty stream unavailable, continuing without it: {e}"
                    );
                    (None, None)
                }
            }
        } else {
            (None, None)
        };
        Ok(TrackingSession {
            pid,
            start_time,
            opts,
            tracker,
            target_uffd,
            uffd_preexisting,
            scratch,
            scratch_areas,
            ebpf,
            ebpf_pin,
            attach_frozen,
            last_image: None,
            ebpf_carry: Vec::new(),
            ebpf_pending: Vec::new(),
            state_path,
            copier: crate::copy::Copier::new(),
            seal_key: images::SealKey::host_or_create().unwrap_or_else(|e| {
                tracing::warn!(pid, "images will not be sealed: {e}");
                None
            }),
            _lock: lock,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }
    pub fn backend(&self) -> &'static str {
        self.tracker.name()
    }
    pub fn ebpf_enabled(&self) -> bool {
        self.ebpf.is_some()
    }
    /// The tracking fd in the target, if any, and whether it predates us.
    pub fn target_uffd(&self) -> Option<(i32, bool)> {
        self.target_uffd.map(|fd| (fd, self.uffd_preexisting))
    }

    /// Does the kernel's dirty state continue from image `parent_id`?
    fn continues_from(&self, parent: &Inventory) -> bool {
        if parent.backend != self.tracker.name() || self.tracker.name() == "full" {
            return false;
        }
        if let Some(last) = &self.last_image {
            return *last == parent.id;
        }
        match load_host_state(&self.state_path) {
            Some(h) => {
                !h.in_progress
                    && h.last_image_id.as_deref() == Some(parent.id.as_str())
                    && h.start_time == self.start_time
                    && h.backend == self.tracker.name()
                    && h.uffd_fd == self.target_uffd
            }
            None => false,
        }
    }

    fn save_host_state(
        &self,
        last_image_id: Option<String>,
        in_progress: bool,
    ) -> Result<(), TrackerError> {
        let h = HostState {
            pid: self.pid,
            start_time: self.start_time,
            backend: self.tracker.name().to_string(),
            last_image_id,
            in_progress,
            uffd_fd: self.target_uffd,
            carry: Vec::new(),
        };
        store_host_state(&self.state_path, &h)
    }

    /// One pre-dump round: write an image of the pages changed since
    /// `parent` (every populated page without one) into `dir`.
    pub fn pre_dump(
        &mut self,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<PreDumpReport, TrackerError> {
        let t0 = Instant::now();
        let (parent_inv, full_copy) = self.parent_state(parent)?;
        let mut writer = self.image_writer(dir)?;
        let ebpf_round = match &mut self.ebpf {
            Some(s) => match s.drain() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(pid = self.pid, "eBPF drain failed: {e}");
                    None
                }
            },
            None => None,
        };
        let round = self.first_round(&mut writer, full_copy, "pre-dump")?;
        let (inv, stats) = self.finish_image(writer, &round.vmas, parent, parent_inv.as_ref())?;
        let set = round.set;
        self.last_image = Some(inv.id.clone());
        let frozen = set.frozen + std::mem::take(&mut self.attach_frozen);
        Ok(PreDumpReport {
            pid: self.pid,
            backend: self.tracker.name().to_string(),
            ebpf: self.ebpf.is_some(),
            pages_scanned: set.pages_scanned,
            pages_written: stats.data_pages + stats.zero_pages,
            pages_zero: stats.zero_pages,
            bytes_written: stats.bytes_written,
            frozen_ms: frozen.as_secs_f64() * 1e3,
            duration_ms: t0.elapsed().as_secs_f64() * 1e3,
            ebpf_pages: ebpf_round.as_ref().map_or(0, |r| r.pages.len() as u64),
            vma_changes: ebpf_round
                .as_ref()
                .map_or(0, |r| r.vma_changes.len() as u64),
            pages_hole: stats.hole_pages,
            full_copy,
            armed_vmas: set.armed_vmas,
            untracked_vmas: set.untracked_vmas,
            vanished_pages: round.vanished_pages,
            images_dir: dir.display().to_string(),
            parent: parent.map(|p| p.display().to_string()),
        })
    }

    /// `tern dump`'s live pre-copy, QEMU's iterative phase: rounds while
    /// the target runs, all into the one image `dir` (a later round's pages
    /// replace an earlier one's), until a round copies at most
    /// `policy.done_pages` pages or `policy.max_rounds` were made. The
    /// frozen round that follows then copies only what was written since
    /// the last of them. Returns the rounds made.
    pub fn live_pre_copy(
        &mut self,
        dir: &Path,
        parent: Option<&Path>,
        policy: LivePolicy,
    ) -> Result<Vec<LiveRound>, TrackerError> {
        let (parent_inv, full_copy) = self.parent_state(parent)?;
        let mut writer = self.image_writer(dir)?;
        let mut rounds = Vec::new();
        let t = Instant::now();
        let mut round = self.first_round(&mut writer, full_copy, "dump")?;
        rounds.push(LiveRound {
            pages: round.set.copy_pages(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        });
        while another_round(&rounds, policy) {
            let t = Instant::now();
            let vmas = self.target_vmas()?;
            let set = self
                .tracker
                .collect(&vmas, false)
                .map_err(|e| self.exited_or(e.into(), "dump"))?;
            for r in set.copy.iter().chain(&set.holes) {
                writer.replace_range(*r)?;
            }
            let copied = self.copier.copy_ranges(self.pid, &set.copy, &mut writer)?;
            for h in &set.holes {
                writer.add_hole(*h);
            }
            tracing::debug!(
                pid = self.pid,
                "live round {}: {} pages to copy, {} holes, {:.2} ms",
                rounds.len() + 1,
                set.copy_pages(),
                set.holes.iter().map(|h| h.pages()).sum::<u64>(),
                t.elapsed().as_secs_f64() * 1e3
            );
            rounds.push(LiveRound {
                pages: set.copy_pages(),
                ms: t.elapsed().as_secs_f64() * 1e3,
            });
            round = RoundCopy {
                set,
                vmas,
                vanished_pages: round.vanished_pages + copied.vanished_pages,
            };
        }
        let (inv, _) = self.finish_image(writer, &round.vmas, parent, parent_inv.as_ref())?;
        self.last_image = Some(inv.id);
        Ok(rounds)
    }

    /// Catch-up rounds, in the guardian right before the freeze, into the
    /// frozen image's own `writer` (the frozen round then replaces what it
    /// copies again): everything between the live pre-copy's last round and
    /// the freeze (the live image finished and synced, the page file
    /// written ahead, VmFlags read) is time the target writes in, which the
    /// frozen round would copy. At most `max` rounds. A round whose scan
    /// finds at most `done_pages`, or a quarter of the most any round
    /// copied (`before`, the live rounds, and those made here), met a quiet
    /// moment (a writer in bursts, between two of them): its pages are not
    /// copied but returned, for the frozen round to copy with its own, so
    /// that the freeze follows the scan at once. A steady writer has no
    /// quiet moment: `max` rounds, copied while it runs. Returns the rounds
    /// made and the pages the last one left to the frozen round.
    pub fn catch_up(
        &mut self,
        writer: &mut ImageWriter,
        before: &[LiveRound],
        max: usize,
        done_pages: u64,
    ) -> Result<(Vec<LiveRound>, Option<DirtySet>), TrackerError> {
        let mut rounds: Vec<LiveRound> = Vec::new();
        while rounds.len() < max {
            let t = Instant::now();
            let vmas = self.target_vmas()?;
            let set = self
                .tracker
                .collect(&vmas, false)
                .map_err(|e| self.exited_or(e.into(), "dump"))?;
            let pages = set.copy_pages();
            let most = before
                .iter()
                .chain(&rounds)
                .map(|r| r.pages)
                .max()
                .unwrap_or(0);
            let quiet = pages <= done_pages || pages.saturating_mul(4) <= most;
            if !quiet {
                for r in set.copy.iter().chain(&set.holes) {
                    writer.replace_range(*r)?;
                }
                self.copier.copy_ranges(self.pid, &set.copy, writer)?;
                for h in &set.holes {
                    writer.add_hole(*h);
                }
            }
            rounds.push(LiveRound {
                pages,
                ms: t.elapsed().as_secs_f64() * 1e3,
            });
            tracing::debug!(
                pid = self.pid,
                pages,
                quiet,
                "catch-up round {}",
                rounds.len()
            );
            if quiet {
                return Ok((rounds, Some(set)));
            }
        }
        Ok((rounds, None))
    }

    /// The first round into a fresh image: the pages written since the
    /// parent (all of them if `full_copy`), plus those a `tern track`
    /// consumed meanwhile. Marks the host state in progress.
    fn first_round(
        &mut self,
        writer: &mut ImageWriter,
        full_copy: bool,
        what: &'static str,
    ) -> Result<RoundCopy, TrackerError> {
        let vmas =
            read_target_vmas(self.pid, &self.scratch_areas).map_err(|e| self.exited_or(e, what))?;
        // Pages a `tern track` consumed since the parent (read before the
        // state is marked in progress, which drops them).
        let carry = if full_copy {
            Vec::new()
        } else {
            load_host_state(&self.state_path)
                .map(|h| h.carry)
                .unwrap_or_default()
        };
        self.save_host_state(None, true)?;
        let mut set: DirtySet = self
            .tracker
            .collect(&vmas, full_copy)
            .map_err(|e| self.exited_or(e.into(), what))?;
        if !carry.is_empty() {
            let dumped: Vec<images::PageRange> = vmas
                .iter()
                .filter(|v| v.is_dumped())
                .map(|v| images::PageRange::new(v.start, v.end))
                .collect();
            // Carried pages still inside dumped VMAs; those that are holes
            // now stay holes, the others are copied.
            let carried =
                crate::backend::subtract(&carry, &crate::backend::subtract(&carry, &dumped));
            let to_copy = crate::backend::subtract(&carried, &set.holes);
            set.copy = crate::backend::union(&set.copy, &to_copy);
        }
        let copy_stats = self.copier.copy_ranges(self.pid, &set.copy, writer)?;
        for h in &set.holes {
            writer.add_hole(*h);
        }
        Ok(RoundCopy {
            set,
            vmas,
            vanished_pages: copy_stats.vanished_pages,
        })
    }

    /// Write the page map, VMA list and inventory of a pre-copy image and
    /// record it as the one tracking continues from.
    fn finish_image(
        &mut self,
        writer: ImageWriter,
        vmas: &[crate::maps::Vma],
        parent: Option<&Path>,
        parent_inv: Option<&Inventory>,
    ) -> Result<(Inventory, images::WriteStats), TrackerError> {
        let dir = writer.dir().to_path_buf();
        let mm = MmRecord {
            vmas: vmas.iter().map(|v| v.record()).collect(),
        };
        let mut inv = Inventory::new(
            ImageKind::PreDump,
            self.pid,
            self.tracker.name(),
            self.opts.compress,
        );
        if let (Some(p), Some(pinv)) = (parent, parent_inv) {
            inv.parent = Some(ParentRef {
                path: relative_path(&dir, p),
                id: pinv.id.clone(),
            });
        }
        inv.tracking = Some(TrackingState {
            target_start_time: self.start_time,
            uffd_fd: self.target_uffd,
            scratch_addr: self.scratch,
            ebpf_pin_dir: self.ebpf_pin.as_ref().map(|p| p.display().to_string()),
        });
        // A target that exited during the round leaves an image of nothing
        // (or of part of it): that is a failure, not an empty pre-dump.
        if !alive(self.pid, self.start_time) {
            return Err(TrackerError::Exited {
                pid: self.pid,
                what: "pre-dump".into(),
            });
        }
        let stats = writer.finish(&mm, &inv)?;
        self.save_host_state(Some(inv.id.clone()), false)?;
        Ok((inv, stats))
    }

    /// One telemetry round (`tern track`): pages the kernel saw written
    /// since the previous round, against what the eBPF stream saw.
    pub fn track_round(
        &mut self,
        round: u64,
        t_ms: f64,
        interval: Duration,
    ) -> Result<TrackRound, TrackerError> {
        let vmas = read_target_vmas(self.pid, &self.scratch_areas)
            .map_err(|e| self.exited_or(e, "track"))?;
        // Scan first, then drain: a write fault between the two is in this
        // round's eBPF set and the next round's kernel set, so eBPF pages
        // not matched yet are carried one round before they count as
        // eBPF-only.
        let set = self
            .tracker
            .collect(&vmas, false)
            .map_err(|e| self.exited_or(e.into(), "track"))?;
        self.carry_over(&set.copy)?;
        let ebpf_round = match &mut self.ebpf {
            Some(s) => s.drain().ok(),
            None => None,
        };
        let kernel: Vec<u64> = set
            .copy
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(sys::usize_of(images::PAGE_SIZE)))
            .collect();
        let ebpf: Vec<u64> = ebpf_round
            .as_ref()
            .map(|r| r.pages.clone())
            .unwrap_or_default();
        // The previous drain counts as evidence too: a page written twice
        // in one interval, before and after the scan reached it, faults twice
        // but is one page of the eBPF set.
        let mut pool: Vec<u64> = ebpf.iter().chain(&self.ebpf_carry).copied().collect();
        pool.sort_unstable();
        pool.dedup();
        let both = count_common(&kernel, &pool);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let ko = minus_sorted(&kernel, &pool);
            tracing::debug!(
                round,
                "kernel-only pages (first 40): {:x?}",
                &ko[..ko.len().min(40)]
            );
        }
        // eBPF-only: pages of the previous drain that neither its round's
        // kernel set nor this one has.
        let expired = self.ebpf_pending.len() as u64 - count_common(&self.ebpf_pending, &kernel);
        self.ebpf_pending = minus_sorted(&ebpf, &kernel);
        self.ebpf_carry = ebpf.clone();
        Ok(TrackRound {
            round,
            backend: self.tracker.name().to_string(),
            frozen_ms: set.frozen.as_secs_f64() * 1e3,
            t_ms,
            kernel_pages: kernel.len() as u64,
            // Pages accounted for this round: matched ones and those a
            // round past their write with no kernel counterpart.
            ebpf_pages: both + expired,
            both,
            kernel_only: kernel.len() as u64 - both,
            ebpf_only: expired,
            ebpf_raw: ebpf.len() as u64,
            ebpf_pending: self.ebpf_pending.len() as u64,
            dirty_rate_mb_s: kernel.len() as f64 * images::PAGE_SIZE as f64
                / interval.as_secs_f64().max(1e-9)
                / 1e6,
            hot_pages: ebpf_round
                .as_ref()
                .map(|r| {
                    r.hot
                        .iter()
                        .take(8)
                        .map(|(a, n)| format!("{a:#x}:{n}"))
                        .collect()
                })
                .unwrap_or_default(),
            vma_changes: ebpf_round
                .as_ref()
                .map_or(0, |r| r.vma_changes.len() as u64),
        })
    }

    /// Arm without writing an image (first `track` round).
    pub fn arm(&mut self) -> Result<(), TrackerError> {
        let vmas = read_target_vmas(self.pid, &self.scratch_areas)
            .map_err(|e| self.exited_or(e, "track"))?;
        if let Some(s) = &mut self.ebpf {
            let _ = s.drain();
        }
        let set = self
            .tracker
            .collect(&vmas, false)
            .map_err(|e| self.exited_or(e.into(), "track"))?;
        self.carry_over(&set.copy)?;
        // Faults after the arming scan belong to round 1's kernel set.
        if let Some(s) = &mut self.ebpf
            && let Ok(r) = s.drain()
        {
            self.ebpf_pending = r.pages.clone();
            self.ebpf_carry = r.pages;
        }
        Ok(())
    }

    /// Does this session consume the dirty state a pre-dump chain (`h`)
    /// relies on? uffd-wp: when it adopted the chain's fd. soft-dirty: the
    /// bits are the process's own, so whenever a soft-dirty chain exists.
    fn shares_chain_state(&self, h: &HostState) -> bool {
        match self.tracker.name() {
            "uffd-wp" => self.uffd_preexisting,
            "soft-dirty" => h.backend == "soft-dirty" && h.start_time == self.start_time,
            _ => false,
        }
    }

    /// Telemetry consumed the dirty state of a pre-dump chain (its tracking
    /// fd's protections, or the soft-dirty bits): record the pages for the
    /// chain's next pre-dump.
    fn carry_over(&self, pages: &[images::PageRange]) -> Result<(), TrackerError> {
        if pages.is_empty() {
            return Ok(());
        }
        let Some(mut h) = load_host_state(&self.state_path) else {
            return Ok(()); // no chain to continue: the next pre-dump copies all
        };
        if !self.shares_chain_state(&h) {
            return Ok(());
        }
        h.carry = crate::backend::union(&h.carry, pages);
        store_host_state(&self.state_path, &h)
    }

    /// End a `tern track`: leave the target as it was found. Tracking that a
    /// pre-dump chain had armed stays (with the pages track consumed carried
    /// over to the next pre-dump); what track created is removed.
    pub fn finish_track(self) -> Result<(), TrackerError> {
        let chain = load_host_state(&self.state_path).is_some_and(|h| self.shares_chain_state(&h));
        if self.uffd_preexisting || chain {
            Ok(())
        } else {
            self.teardown()
        }
    }

    /// End this process's part, leaving tracking armed in the target for the
    /// next `tern pre-dump` (the tracking fd, the scratch page, eBPF pins).
    pub fn detach(self) {}

    /// Remove everything tern left in or for the target: the tracking
    /// userfaultfd (which lifts every write-protection), the scratch page,
    /// the eBPF pins and the host state. The target is left as before tern.
    pub fn teardown(mut self) -> Result<(), TrackerError> {
        // Our own copy of the uffd goes first, so that closing the target's
        // fd releases the context (and with it every protection).
        let pid = self.pid;
        let tracker = std::mem::replace(&mut self.tracker, Box::new(NoTracker));
        drop(tracker);
        if let Some(s) = self.ebpf.take()
            && let Err(e) = s.close_and_unpin()
        {
            tracing::warn!(pid, "removing the eBPF pins: {e}");
        }
        teardown_target(
            pid,
            self.target_uffd.into_iter().collect(),
            self.opts.timeout,
        )?;
        let _ = std::fs::remove_file(&self.state_path);
        Ok(())
    }

    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// A writer for a new image in `dir`, sealed with this host's key.
    pub fn image_writer(&self, dir: &Path) -> Result<ImageWriter, TrackerError> {
        let mut w = ImageWriter::create(dir, self.opts.compress)?;
        w.set_seal_key(self.seal_key.clone());
        Ok(w)
    }

    /// The parent image's inventory (validated as a whole, of this PID) and
    /// whether this round must copy every page (the tracked dirty state does
    /// not continue from it).
    pub fn parent_state(
        &self,
        parent: Option<&Path>,
    ) -> Result<(Option<Inventory>, bool), TrackerError> {
        let parent_inv = match parent {
            Some(p) => {
                let inv = images::Image::open(p)?.inventory;
                if inv.pid != self.pid {
                    return Err(TrackerError::ParentPid {
                        path: p.to_path_buf(),
                        pid: self.pid,
                        found: inv.pid,
                    });
                }
                Some(inv)
            }
            None => None,
        };
        let full_copy = match &parent_inv {
            Some(inv) => !self.continues_from(inv),
            None => true,
        };
        if parent_inv.is_some() && full_copy && self.tracker.name() != "full" {
            tracing::info!(
                pid = self.pid,
                "tracked dirty state does not continue from the parent image (first round of this tracker, or an interrupted round): copying every populated page"
            );
        }
        Ok((parent_inv, full_copy))
    }

    /// The target's VMAs, our scratch areas marked as such.
    pub fn target_vmas(&self) -> Result<Vec<crate::maps::Vma>, TrackerError> {
        read_target_vmas(self.pid, &self.scratch_areas).map_err(|e| self.exited_or(e, "dump"))
    }

    /// The final round's dirty set (the target is frozen by the caller).
    /// Marks the host state in progress: the dirty bits are consumed.
    pub fn collect_final(
        &mut self,
        vmas: &[crate::maps::Vma],
        full_copy: bool,
    ) -> Result<DirtySet, TrackerError> {
        self.save_host_state(None, true)?;
        self.tracker.final_round();
        self.tracker
            .collect(vmas, full_copy)
            .map_err(|e| self.exited_or(e.into(), "dump"))
    }

    /// Run `f` on this session in a forked guardian child (see `guarded`),
    /// waiting at most `deadline`; its error comes back typed (see
    /// `guardian`), and so does the guardian's own failure, as `E`.
    pub fn guarded_run<T, E, F>(&mut self, deadline: Duration, f: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: Serialize + DeserializeOwned + From<TrackerError>,
        F: FnOnce(&mut TrackingSession) -> Result<T, E>,
    {
        let pid = self.pid;
        match guardian(pid, deadline, || f(self)) {
            Ok(r) => r,
            Err(e) => Err(TrackerError::from(e).into()),
        }
    }

    /// The target is gone (a dump killed it): drop the host state, nothing
    /// to tear down in it.
    pub fn forget_target(self) {
        let _ = std::fs::remove_file(&self.state_path);
    }

    fn exited_or(&self, e: TrackerError, what: &'static str) -> TrackerError {
        if !alive(self.pid, self.start_time) {
            TrackerError::Exited {
                pid: self.pid,
                what: what.into(),
            }
        } else {
            e
        }
    }
}

struct NoTracker;
impl DirtyTracker for NoTracker {
    fn name(&self) -> &'static str {
        "none"
    }
    fn collect(&mut self, _: &[crate::maps::Vma], _: bool) -> Result<DirtySet, BackendError> {
        Ok(DirtySet::default())
    }
}

/// Pick the backend for `mode`, checking that it works here.
pub fn resolve_backend(mode: TrackMode) -> Result<TrackMode, TrackerError> {
    let probes = crate::check::Probes::tracking();
    match mode {
        TrackMode::Auto => Ok(probes.best_backend()),
        TrackMode::UffdWp if !(probes.uffd_wp_async && probes.pagemap_scan && probes.pidfd_getfd) => {
            Err(TrackerError::Unavailable {
                backend: "uffd-wp".into(),
                why: format!(
                    "async uffd write-protect {}, PAGEMAP_SCAN {}, pidfd_getfd {} (all three need Linux 6.7+)",
                    yes_no(probes.uffd_wp_async),
                    yes_no(probes.pagemap_scan),
                    yes_no(probes.pidfd_getfd)
                ),
            })
        }
        TrackMode::SoftDirty if !probes.soft_dirty => Err(TrackerError::Unavailable {
            backend: "soft-dirty".into(),
            why: "pagemap bit 55 never sets after clear_refs 4 (CONFIG_MEM_SOFT_DIRTY is off, and arm64 has no soft-dirty); use --track uffd-wp or full".into(),
        }),
        m => Ok(m),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "works" } else { "missing" }
}

/// The target's VMAs, with tern's scratch areas (at `scratch`, as
/// `Injector::find_scratch` found them by their header where the kernel
/// cannot name them) named `[anon:tern-scratch]`, so that they are never
/// recorded in an image.
pub fn read_target_vmas(pid: i32, scratch: &[u64]) -> Result<Vec<crate::maps::Vma>, TrackerError> {
    let mut vmas = read_vmas(pid)?;
    for v in &mut vmas {
        if scratch
            .iter()
            .any(|&a| v.start >= a && v.end <= a + crate::inject::SCRATCH_LEN)
        {
            v.name = Some(crate::maps::SCRATCH_NAME.to_string());
        }
    }
    Ok(vmas)
}

fn count_common(a: &[u64], b: &[u64]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// Sorted `a` minus sorted `b`.
fn minus_sorted(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut j = 0;
    for &x in a {
        while j < b.len() && b[j] < x {
            j += 1;
        }
        if j >= b.len() || b[j] != x {
            out.push(x);
        }
    }
    out
}

/// `target` as seen from directory `from` (relative when both resolve).
pub fn relative_path(from: &Path, target: &Path) -> String {
    let (Ok(f), Ok(t)) = (from.canonicalize(), target.canonicalize()) else {
        return target.display().to_string();
    };
    let fc: Vec<_> = f.components().collect();
    let tc: Vec<_> = t.components().collect();
    let common = fc.iter().zip(&tc).take_while(|(a, b)| a == b).count();
    let mut p = PathBuf::new();
    for _ in common..fc.len() {
        p.push("..");
    }
    for c in &tc[common..] {
        p.push(c);
    }
    p.display().to_string()
}

#[cfg(test)]
mod live_tests {
    use super::*;

    fn rounds(p: &[u64]) -> Vec<LiveRound> {
        p.iter()
            .map(|&pages| LiveRound { pages, ms: 1.0 })
            .collect()
    }

    #[test]
    fn live_rounds_stop_when_they_stop_shrinking() {
        assert!(converging(&rounds(&[4096])));
        assert!(converging(&rounds(&[4096, 4096])));
        assert!(!converging(&rounds(&[4096, 4096, 4096])));
        assert!(converging(&rounds(&[4096, 3000, 1500])));
        assert!(!converging(&rounds(&[4096, 1000, 2000])));
        assert!(!converging(&rounds(&[4096, 1000, 950])));
        assert!(converging(&rounds(&[4096, 1000, 800])));
    }

    #[test]
    fn live_rounds_stop_at_a_quiet_moment() {
        let p = LivePolicy::default();
        assert!(another_round(&rounds(&[]), p));
        assert!(!another_round(
            &rounds(&[]),
            LivePolicy { max_rounds: 0, ..p }
        ));
        // Done: few pages, or the most rounds.
        assert!(!another_round(&rounds(&[4096, 200]), p));
        assert!(!another_round(&rounds(&[9000; 10]), p));
        // Shrinking: on.
        assert!(another_round(&rounds(&[4096, 3000, 1500]), p));
        // A quiet moment (a quarter of the fewest before): frozen at once,
        // though it would still count as converging.
        assert!(!another_round(&rounds(&[4096, 4096, 1000]), p));
        assert!(!another_round(&rounds(&[4096, 900]), p));
        // Steady: done once they stop shrinking.
        assert!(!another_round(&rounds(&[4096, 4096, 4096]), p));
        // Bursty or not.
        assert!(bursty(&rounds(&[4098, 4098, 3720, 479])));
        assert!(!bursty(&rounds(&[16386, 16386, 16000])));
        assert!(!bursty(&rounds(&[4098])));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("chain/1");
        let b = d.path().join("chain/2");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        assert_eq!(relative_path(&b, &a), "../1");
        assert_eq!(count_common(&[1, 3, 5, 7], &[3, 4, 5]), 2);
    }
}
