//! The final, stop-the-world dump (`tern dump`): freeze every thread, copy
//! the pages written since the parent image (all populated pages without
//! one), capture everything else the kernel holds for the process into
//! `process.json`, optionally verify the chain against the frozen memory,
//! then kill the target (CRIU's default) or let it run on.
//!
//! # Never lose the process
//!
//! Everything from the freeze to the kill runs in a forked guardian child of
//! tern, in a session of its own (see `session::guardian` for why). The
//! target is killed only after the image is complete on disk (inventory
//! written last), and only if the tern that asked for it is still alive: a
//! tern killed at any moment leaves the target running, untraced. Any
//! failure detaches every thread (the target resumes exactly where it was)
//! and removes what tracking left in it (userfaultfd, scratch area).
//!
//! # Frozen time
//!
//! `frozen_ms` runs from the first thread stopped to the target resumed
//! (`--leave-running`) or killed: it includes writing the image, because a
//! target may only die once its image is safe. To keep it short, the final
//! image stores its pages uncompressed unless asked otherwise, and signal
//! handlers are read with injected `rt_sigaction` calls only for the
//! signals /proc says are caught or ignored, and SIGCHLD (the others are
//! SIG_DFL with no flags: what the kernel gives a fresh process; flags or a
//! mask on them would be replaced whole by the next sigaction installing a
//! handler, and mean nothing before, except SIGCHLD's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use images::process::{Creds, FdImage, ITimer, MmState, ProcessImage, Rlimit, ThreadImage};
use images::state::{FdKindState, FdState};
use images::{ImageKind, Inventory, MmRecord, ParentRef, TrackingState};
use serde::{Deserialize, Serialize};
use sys::inject::Injector;

use crate::backend::TrackMode;
use crate::maps::VmaPolicy;
use crate::session::{Cause, SessionOptions, TrackerError, TrackingSession};

/// Options of one `tern dump`.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub track: TrackMode,
    pub compress: bool,
    pub leave_running: bool,
    /// Deadline of every wait on the target.
    pub timeout: Duration,
    /// The live pre-copy before the freeze (only when the dump continues
    /// tracked pre-dumps).
    pub live: crate::session::LivePolicy,
    /// Report success only once the image and its parents are on stable
    /// storage (`tern dump` without `--no-fsync`).
    pub fsync: bool,
    /// A migration's end: once the image is written the target stays
    /// frozen until tern decides (see `hold`); `leave_running` is then
    /// ignored.
    pub hold: Option<crate::hold::HoldGate>,
}

/// `--verify`: every dumped page compared with the frozen process (see
/// `restorer::verify`).
pub use restorer::verify::VerifyReport;

/// The JSON of one `tern dump`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpReport {
    pub pid: i32,
    pub frozen_ms: f64,
    pub duration_ms: f64,
    pub pages_written: u64,
    pub bytes_written: u64,
    pub threads: usize,
    pub vmas: usize,
    pub verify: Option<VerifyReport>,
    /// Extra fields (not in the minimal contract):
    pub backend: String,
    pub full_copy: bool,
    pub pages_zero: u64,
    pub pages_hole: u64,
    /// From the freeze until the state was captured and the pages copied.
    pub capture_ms: f64,
    /// Writing the image (while still frozen).
    pub write_ms: f64,
    pub killed: bool,
    pub images_dir: String,
    pub parent: Option<String>,
    /// The live pre-copy before the freeze: one entry per round.
    #[serde(default)]
    pub live_rounds: Vec<crate::session::LiveRound>,
    /// Its image (`DIR/live`), the parent of the final one.
    #[serde(default)]
    pub live_image: Option<String>,
    #[serde(default)]
    pub live_ms: f64,
    /// Rounds copied into the final image right before the freeze, while
    /// the target still ran (a dump with live rounds: see
    /// `TrackingSession::catch_up`).
    #[serde(default)]
    pub catch_up_rounds: Vec<crate::session::LiveRound>,
    /// Putting the image on stable storage, after the target was killed
    /// (or resumed): part of `duration_ms`, not of `frozen_ms`.
    #[serde(default)]
    pub fsync_ms: f64,
    /// Where `frozen_ms` went, part by part.
    #[serde(default)]
    pub frozen_parts: FrozenParts,
}

/// The frozen window of a final dump, part by part, in milliseconds. The
/// parts run one after the other on the dumping thread and add up to
/// `frozen_ms`, except `state_ms` and `checks_ms`: the threads' state is
/// captured, and the restorability checked again, on threads of their own
/// beside the scan and the copy; the main thread waits for them only
/// `state_wait_ms`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FrozenParts {
    /// Stopping every thread (until the last one reports its stop).
    pub freeze_ms: f64,
    /// The scratch area and the VMA list.
    pub vmas_ms: f64,
    /// The threads' registers: stack pointers, signal-handler runs.
    pub registers_ms: f64,
    /// The final scan for the pages written since the last round.
    pub scan_ms: f64,
    /// Copying those pages into the page file.
    pub copy_ms: f64,
    /// Waiting for the state capture (and the checks) once the copy was
    /// done.
    pub state_wait_ms: f64,
    /// The pages below each thread's stack pointer that the injected calls
    /// wrote, copied after the state (and a second scan if a signal handler
    /// ran meanwhile).
    pub stacks_ms: f64,
    /// Identities of the files mapped since the check before the freeze.
    pub files_ms: f64,
    /// VmFlags of VMAs that changed since they were read before the freeze.
    pub vm_flags_ms: f64,
    /// The image's metadata: process state, page map, inventory.
    pub metadata_ms: f64,
    /// `--verify`: comparing the image with the frozen memory.
    pub verify_ms: f64,
    /// The kill (or, with `--leave-running`, the detach).
    pub end_ms: f64,
    /// The threads' state by injected system calls, beside the scan and copy.
    pub state_ms: f64,
    /// Checking again, frozen, that the process can be restored (/proc
    /// only), beside the scan and copy.
    pub checks_ms: f64,
}

impl FrozenParts {
    /// The parts on the dumping thread, in the order they ran (they add up
    /// to the frozen time), by name without the `_ms`.
    pub fn sequential(&self) -> [(&'static str, f64); 12] {
        [
            ("freeze", self.freeze_ms),
            ("vmas", self.vmas_ms),
            ("registers", self.registers_ms),
            ("scan", self.scan_ms),
            ("copy", self.copy_ms),
            ("state_wait", self.state_wait_ms),
            ("stacks", self.stacks_ms),
            ("files", self.files_ms),
            ("vm_flags", self.vm_flags_ms),
            ("metadata", self.metadata_ms),
            ("verify", self.verify_ms),
            ("end", self.end_ms),
        ]
    }
}

/// Times the parts of the frozen window: each `next` returns the time since
/// the previous one (or the freeze's start) and logs the point reached.
struct Laps {
    pid: i32,
    start: Instant,
    last: std::cell::Cell<Instant>,
}

impl Laps {
    fn new(pid: i32, start: Instant) -> Self {
        Laps {
            pid,
            start,
            last: std::cell::Cell::new(start),
        }
    }

    fn next(&self, what: &str) -> f64 {
        let now = Instant::now();
        let ms = now.duration_since(self.last.replace(now)).as_secs_f64() * 1e3;
        tracing::debug!(
            pid = self.pid,
            "dump: {what} at {:.2} ms (+{ms:.2})",
            now.duration_since(self.start).as_secs_f64() * 1e3
        );
        ms
    }

    /// From the start to the last `next`.
    fn total_ms(&self) -> f64 {
        self.last.get().duration_since(self.start).as_secs_f64() * 1e3
    }
}

/// Catch-up rounds at most, right before the freeze (see
/// `TrackingSession::catch_up`).
const CATCH_UP_ROUNDS: usize = 4;
/// Live rounds of at most this many pages (32 MiB) get catch-up rounds
/// whether or not they saw a quiet moment.
const CATCH_UP_MAX_PAGES: u64 = 8192;

/// What the frozen round (and the catch-up rounds before it) will likely
/// write, in bytes, to write ahead (as zeros) into the page file before the
/// freeze: the frozen copy then overwrites cached pages of the file, about
/// three times cheaper than filling new ones (a full dump of 4 GiB: 1.7 s
/// frozen against 5.2 s with 256 MiB written ahead). About what the largest
/// live round copied, for each catch-up round and twice more, else what
/// the parent image (the last pre-dump) holds, twice for margin; with
/// neither, the resident memory (a full dump). At most a quarter of the
/// memory available now, so that the zeros do not push the system's own
/// memory out (the rest is then filled while frozen, as before).
fn predicted_frozen_bytes(
    pid: i32,
    live_pages: Option<u64>,
    catch_up_rounds: usize,
    parent: Option<&Path>,
) -> u64 {
    let parent_pages = || {
        let img = images::Image::open(parent?).ok()?;
        Some(
            img.pagemap
                .entries
                .iter()
                .filter(|e| e.kind == images::PageKind::Data)
                .map(|e| u64::from(e.nr_pages))
                .sum::<u64>(),
        )
    };
    let predicted = match live_pages {
        Some(pages) => (pages * (2 + catch_up_rounds as u64) * images::PAGE_SIZE).max(1 << 20),
        None => match parent_pages() {
            Some(pages) => (pages * 2 * images::PAGE_SIZE).max(1 << 20),
            None => resident_bytes(pid),
        },
    };
    let available = {
        use procfs::Current;
        procfs::Meminfo::current()
            .ok()
            .and_then(|m| m.mem_available)
            .unwrap_or(0)
    };
    predicted.min(available / 4)
}

/// Resident memory of `pid` (/proc/PID/statm), 0 if unknown.
fn resident_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |p| p * images::PAGE_SIZE)
}

/// Subdirectory of a dump's directory holding its live pre-copy image.
pub const LIVE_DIR: &str = "live";

/// Why a dump failed. Most of it happens in the guardian child (see
/// `session::guardian`), and crosses back to tern typed: every variant but
/// those produced in tern itself serializes (a source error from a kernel
/// interface as a [`Cause`]). Unless said otherwise, the target was left
/// running as it was.
#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
pub enum DumpError {
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(
        "verification failed: {mismatches} of {checked} pages differ between the image chain in {dir} and the frozen PID {pid} (first: {first}); the target was left running"
    )]
    Verify {
        pid: i32,
        dir: PathBuf,
        checked: u64,
        mismatches: u64,
        first: String,
    },
    #[error("verifying {} against PID {pid}: {source}; the target was left running", dir.display())]
    VerifyRead {
        pid: i32,
        dir: PathBuf,
        source: Cause,
    },
    #[error(
        "{source}: the parent images cannot be put on stable storage; nothing was frozen, PID {pid} runs on"
    )]
    #[serde(skip)]
    ParentsNotDurable {
        pid: i32,
        #[source]
        source: images::ImageError,
    },
    #[error(
        "{source}: the image cannot be put on stable storage here; nothing was frozen, PID {pid} runs on"
    )]
    NoStableStorage { pid: i32, source: Cause },
    #[error("PID {pid}: /proc/{pid}/task: {source} (did it exit?)")]
    Tasks { pid: i32, source: Cause },
    #[error(
        "PID {pid} kept creating threads for {timeout:?} while tern was stopping them; try again"
    )]
    ThreadsKeptComing { pid: i32, timeout: Duration },
    #[error("thread {tid} of PID {pid}: dumping is implemented for x86_64 and aarch64 only")]
    UnsupportedArch { pid: i32, tid: i32 },
    #[error("registers of thread {tid} of PID {pid}: {source}")]
    Registers { pid: i32, tid: i32, source: Cause },
    #[error("signal state of thread {tid} of PID {pid}: {source}")]
    Signals { pid: i32, tid: i32, source: Cause },
    #[error("signal handler {signo} of PID {pid}: {source}")]
    Sigaction { pid: i32, signo: u64, source: Cause },
    #[error("rseq registration of thread {tid} of PID {pid}: {source}")]
    Rseq { pid: i32, tid: i32, source: Cause },
    #[error("seccomp state of thread {tid} of PID {pid}: {source}")]
    Seccomp { pid: i32, tid: i32, source: Cause },
    #[error("scheduling state of thread {tid} of PID {pid}: {source}")]
    Sched { pid: i32, tid: i32, source: Cause },
    #[error("{call} injected into thread {tid} of PID {pid} failed: {}", nix::errno::Errno::from_raw(*errno))]
    Syscall {
        pid: i32,
        tid: i32,
        call: String,
        errno: i32,
    },
    #[error("fd table of PID {pid}: {source}")]
    FdTable { pid: i32, source: Cause },
    #[error("fd {fd} of PID {pid}: {source}")]
    Fd { pid: i32, fd: i32, source: Cause },
    #[error("vDSO of PID {pid}: {source}")]
    Vdso { pid: i32, source: Cause },
    #[error("{path}: {what}")]
    ProcParse { path: String, what: String },
    /// A /proc file read through `sys::proc` (its error names the PID and
    /// the file).
    #[error("{source}")]
    Proc { source: Cause },
    #[error("PID {pid}: the state captured is not restorable: {source}")]
    Unrestorable { pid: i32, source: Cause },
    #[error("PID {pid}: the state capture thread panicked; the target was left running")]
    CapturePanicked { pid: i32 },
    #[error("tern ({tern_pid}) ended during the dump of PID {pid}: the target was left running")]
    TernEnded { tern_pid: i32, pid: i32 },
    #[error(
        "{}: {source}; the image is complete in the page cache but may not be on stable storage: copy it elsewhere now (the target {})",
        dir.display(),
        if *killed { "was killed: the image is all there is of it" } else { "still runs" }
    )]
    #[serde(skip)]
    NotDurable {
        dir: PathBuf,
        killed: bool,
        #[source]
        source: images::ImageError,
    },
}

impl DumpError {
    /// Whether the target was killed before the dump failed (its image is
    /// then all there is of it, and must not be removed).
    pub fn target_killed(&self) -> bool {
        matches!(self, DumpError::NotDurable { killed: true, .. })
    }
}

/// fsync every image of the chain that ends at `dir` (parents first
/// reached through their inventories).
fn sync_chain(dir: &Path) -> Result<(), images::ImageError> {
    let mut cur = Some(dir.to_path_buf());
    let mut n = 0;
    while let Some(d) = cur {
        images::sync_image(&d)?;
        n += 1;
        if n > 4096 {
            break;
        }
        cur = images::Inventory::load(&d)?.parent_dir(&d);
    }
    Ok(())
}

impl From<images::ImageError> for DumpError {
    fn from(e: images::ImageError) -> Self {
        DumpError::Tracker(e.into())
    }
}

impl From<sys::inject::InjectError> for DumpError {
    fn from(e: sys::inject::InjectError) -> Self {
        DumpError::Tracker(e.into())
    }
}

/// Dump `pid` into `dir` (a final image whose parent is `parent`).
pub fn dump(
    pid: i32,
    dir: &Path,
    parent: Option<&Path>,
    opts: &DumpOptions,
    verify: bool,
) -> Result<DumpReport, DumpError> {
    let t0 = Instant::now();
    // A dump kills its target: one the restore could not bring back is
    // refused now, while it runs untouched (and again once frozen).
    crate::session::check_target(pid)?;
    crate::restorable::ensure(pid)?;
    // Without a parent every page is copied: no tracking to set up.
    let track = if parent.is_some() {
        opts.track
    } else {
        TrackMode::Full
    };
    let mut session = TrackingSession::attach(
        pid,
        SessionOptions {
            track,
            ebpf: false,
            compress: opts.compress,
            timeout: opts.timeout,
            pin_ebpf: false,
        },
    )?;
    // Live pre-copy: while the target runs, copy what was written since the
    // parent, round after round, so that the frozen round finds little.
    // Only a dump continuing tracked pre-dumps has the tracking for it;
    // without a parent the dump is stop-the-world, like CRIU's: setting
    // tracking up here would leave its fd and scratch page in a target
    // whose tern is killed mid-way, and a dump must leave it as it was.
    let mut live_rounds = Vec::new();
    let mut live_image = None;
    let t_live = Instant::now();
    if parent.is_some() && session.backend() != "full" && opts.live.max_rounds > 0 {
        let live_dir = dir.join(LIVE_DIR);
        // Made here, inside -D (whatever is planted under the name goes).
        images::ImageDir::create(dir)
            .and_then(|d| d.create_subdir(LIVE_DIR))
            .map_err(TrackerError::from)?;
        match session.live_pre_copy(&live_dir, parent, opts.live) {
            Ok(r) => {
                live_rounds = r;
                live_image = Some(live_dir);
            }
            Err(e) => {
                drop(session);
                if crate::session::alive_now(pid)
                    && let Err(u) = crate::session::untrack(pid, opts.timeout)
                {
                    tracing::warn!(pid, "removing tracking after the failed dump: {u}");
                }
                return Err(e.into());
            }
        }
    }
    let live_ms = t_live.elapsed().as_secs_f64() * 1e3;
    // Catch-up rounds (see `capture`) where they may meet a quiet moment
    // at little cost: the live rounds saw one, or each costs a live copy
    // of at most CATCH_UP_MAX_PAGES. A large steady writer has no quiet
    // moment, and rounds more would only dirty more page cache before the
    // frozen copy (which then runs slower).
    let most = live_rounds.iter().map(|r| r.pages).max().unwrap_or(0);
    let catch_up = live_image.is_some()
        && (crate::session::bursty(&live_rounds) || most <= CATCH_UP_MAX_PAGES);
    let prealloc = predicted_frozen_bytes(
        pid,
        live_rounds.iter().map(|r| r.pages).max(),
        if catch_up { CATCH_UP_ROUNDS } else { 0 },
        parent,
    );
    let dir_owned = dir.to_path_buf();
    let parent_owned = live_image.clone().or_else(|| parent.map(Path::to_path_buf));
    // The parents are complete: on stable storage before the freeze, so
    // that the frozen image is the only thing left to sync after it, and a
    // file system that cannot sync fails the dump while the target runs.
    if opts.fsync
        && let Some(p) = &parent_owned
        && let Err(e) = sync_chain(p)
    {
        drop(session);
        if crate::session::alive_now(pid)
            && let Err(u) = crate::session::untrack(pid, opts.timeout)
        {
            tracing::warn!(pid, "removing tracking after the failed dump: {u}");
        }
        return Err(DumpError::ParentsNotDurable { pid, source: e });
    }
    let o = opts.clone();
    let parent_pid = std::process::id() as i32;
    let result = session.guarded_run(
        // The whole dump may copy GiBs: allow for it.
        opts.timeout * 8 + Duration::from_secs(600),
        |s| {
            capture(
                s,
                &dir_owned,
                parent_owned.as_deref(),
                &o,
                verify,
                Guard {
                    tern_pid: parent_pid,
                    t0,
                    prealloc,
                    catch_up,
                    live_rounds: live_rounds.clone(),
                },
            )
        },
    );
    match result {
        Ok(mut report) => {
            if report.killed {
                session.forget_target();
                // The eBPF pins and host state of pre-dumps: the target is gone.
                crate::session::gc_stale_state();
            } else {
                // Everything tracking left, eBPF pins included (this session
                // did not open the stream).
                drop(session);
                if let Err(e) = crate::session::untrack(pid, opts.timeout) {
                    tracing::warn!(pid, "removing tracking from the still running target: {e}");
                }
            }
            if opts.fsync {
                let t = Instant::now();
                if let Err(source) = images::sync_image(dir) {
                    return Err(DumpError::NotDurable {
                        dir: dir.to_path_buf(),
                        killed: report.killed,
                        source,
                    });
                }
                report.fsync_ms = t.elapsed().as_secs_f64() * 1e3;
            }
            report.duration_ms = t0.elapsed().as_secs_f64() * 1e3;
            report.parent = parent.map(|p| p.display().to_string());
            report.live_rounds = live_rounds;
            report.live_image = live_image.map(|p| p.display().to_string());
            report.live_ms = live_ms;
            Ok(report)
        }
        Err(e) => {
            // The target runs on: take tracking out of it too.
            drop(session);
            if crate::session::alive_now(pid)
                && let Err(e) = crate::session::untrack(pid, opts.timeout)
            {
                tracing::warn!(pid, "removing tracking after the failed dump: {e}");
            }
            Err(e)
        }
    }
}

/// What the guardian child gets from the tern that forked it.
struct Guard {
    /// That tern: the target is killed only while it lives.
    tern_pid: i32,
    /// When the dump started.
    t0: Instant,
    /// Zeros to write ahead into `pages.img` (see `ImageWriter::preallocate`).
    prealloc: u64,
    /// Catch-up rounds before the freeze (a dump with live rounds that saw
    /// a quiet moment, or were small), after these.
    catch_up: bool,
    live_rounds: Vec<crate::session::LiveRound>,
}

/// Runs in the guardian child: freeze, copy, capture, write, verify, end.
fn capture(
    session: &mut TrackingSession,
    dir: &Path,
    parent: Option<&Path>,
    opts: &DumpOptions,
    verify: bool,
    guard: Guard,
) -> Result<DumpReport, DumpError> {
    let Guard {
        tern_pid,
        t0,
        prealloc,
        ..
    } = guard;
    let pid = session.pid();
    if let Some(g) = &opts.hold {
        g.enter_guardian();
    }
    let (parent_inv, full_copy) = session.parent_state(parent)?;
    let mut writer = session.image_writer(dir)?;
    if opts.fsync {
        // Before the freeze: can this file system make the image durable?
        // Asked of the empty page file: after the zeros written ahead, the
        // sync would put them all on disk, only for the frozen copy to
        // overwrite them (256 MiB: ~0.4 s of the dump's wall time).
        writer
            .sync_pages()
            .map_err(|e| DumpError::NoStableStorage {
                pid,
                source: Cause::of(&e),
            })?;
    }
    if !opts.compress {
        writer.preallocate(prealloc)?;
    }
    // VmFlags (smaps) are slow to read (a page-table walk per VMA): read them
    // before the freeze; VMAs that change meanwhile get theirs after.
    let flags_before = crate::maps::vm_flags(pid).unwrap_or_default();
    // Likewise the identities of the files it maps (the restore checks
    // them): files mapped meanwhile are read while frozen.
    let files_before = crate::maps::read_vmas(pid)
        .map(|v| crate::maps::file_identities(pid, &v, &Default::default()))
        .unwrap_or_default();
    // The image's files made now, written while frozen.
    writer.create_outputs(true)?;
    // What cannot change until the freeze (a deleted executable, sealed
    // memfds): read and written now.
    let mut unlinked_ahead: Vec<images::process::UnlinkedFileState> = Vec::new();
    for (state, data) in crate::unlinked::read_stable(pid, &link(pid, "exe")) {
        tracing::debug!(
            pid,
            bytes = data.len(),
            "{} cannot change: read before the freeze",
            state.describe()
        );
        writer.write_ahead(&state.data, &data)?;
        unlinked_ahead.push(state);
    }
    // Batch buffers touched now, not while the target is frozen.
    let mut copier = crate::copy::Copier::for_frozen_target();
    copier.prefault();
    // The live pre-copy's last round is tens of milliseconds behind by now:
    // a writer in bursts has likely written a burst since. Catch up, into
    // this image, and freeze right after a quiet round.
    let (catch_up, pending) = if guard.catch_up {
        session.catch_up(
            &mut writer,
            &guard.live_rounds,
            CATCH_UP_ROUNDS,
            opts.live.done_pages,
        )?
    } else {
        (Vec::new(), None)
    };
    let caught_up = !catch_up.is_empty();

    let t_freeze = Instant::now();
    let frozen_at_ns = crate::hold::monotonic_ns();
    let laps = Laps::new(pid, t_freeze);
    let mut parts = FrozenParts::default();
    let mut created_scratch = false;
    let mut threads = freeze_all(pid, opts.timeout)?;
    parts.freeze_ms = laps.next("frozen");
    type Captured = (
        ProcessImage,
        Vec<images::VmaRecord>,
        images::WriteStats,
        f64,
        f64,
    );
    let res = (|| -> Result<Captured, DumpError> {
        // The scratch area first (reused from the pre-dumps when there is
        // one): the VMA list read next must not change under the capture.
        let mut scratch = Injector::find_scratch(pid)?;
        let mut known = scratch.first().copied();
        if known.is_none() {
            created_scratch = true;
            known = Some(threads[0].ensure_scratch(None)?);
            scratch = Injector::find_scratch(pid)?;
        }
        // A scratch area is not the target's memory.
        let mut vmas = crate::session::read_target_vmas(pid, &scratch)?;
        parts.vmas_ms = laps.next("VMAs read");
        let ran_before = ran_program_code(&mut threads)?;
        // The state (injected syscalls, on the tracer threads) and the pages
        // (scan and copy, here) are captured side by side. Injected calls
        // write below each thread's stack pointer (the stub's pushes): those
        // pages are copied once the state is in.
        let windows = stack_windows(&mut threads, &vmas)?;
        parts.registers_ms = laps.next("registers read");
        let uffd = session.target_uffd().map(|u| u.0);
        let flags_before = &flags_before;
        let (state, pages, checks) = std::thread::scope(|s| {
            // What it holds may have changed since the check before the
            // freeze: the frozen process is the one the image must bring
            // back. Checked again beside the scan (it reads /proc only).
            let checks = s.spawn(move || {
                let t = Instant::now();
                let r = crate::restorable::refusals_with(pid, Some(flags_before));
                (r, t.elapsed().as_secs_f64() * 1e3)
            });
            let threads = &mut threads;
            let vmas_now = &vmas;
            let unlinked_ahead = &unlinked_ahead;
            let state = s.spawn(move || {
                let t = Instant::now();
                let state = capture_state(pid, threads, vmas_now, unlinked_ahead, uffd, known);
                (state, t.elapsed().as_secs_f64() * 1e3)
            });
            let pages = (|| -> Result<crate::backend::DirtySet, DumpError> {
                let mut set = session.collect_final(&vmas, full_copy)?;
                if let Some(p) = &pending {
                    // The last catch-up scan's pages, not copied then: the
                    // newer word wins (written since: copied; emptied since:
                    // a hole), inside the VMAs there are now.
                    let dumped: Vec<images::PageRange> = vmas
                        .iter()
                        .filter(|v| v.is_dumped())
                        .map(|v| images::PageRange::new(v.start, v.end))
                        .collect();
                    let inside = |r: &[images::PageRange]| {
                        crate::backend::subtract(r, &crate::backend::subtract(r, &dumped))
                    };
                    let copy = crate::backend::subtract(&inside(&p.copy), &set.holes);
                    let holes = crate::backend::subtract(&inside(&p.holes), &set.copy);
                    set.copy = crate::backend::union(&set.copy, &copy);
                    set.holes = crate::backend::union(&set.holes, &holes);
                }
                parts.scan_ms = laps.next("dirty pages found");
                set.copy = crate::backend::subtract(&set.copy, &windows);
                set.holes = crate::backend::subtract(&set.holes, &windows);
                if caught_up {
                    // What the catch-up rounds copied of these is older.
                    for r in set.copy.iter().chain(&set.holes).chain(&windows) {
                        writer.replace_range(*r)?;
                    }
                }
                copier
                    .copy_ranges(pid, &set.copy, &mut writer)
                    .map_err(TrackerError::from)?;
                parts.copy_ms = laps.next("pages copied");
                Ok(set)
            })();
            let state = match state.join() {
                Ok((state, ms)) => {
                    parts.state_ms = ms;
                    state
                }
                Err(_) => Err(DumpError::CapturePanicked { pid }),
            };
            (state, pages, checks.join())
        });
        // A refusal first: it says why the rest cannot be.
        match checks {
            Ok((Ok(refused), ms)) => {
                parts.checks_ms = ms;
                if !refused.is_empty() {
                    return Err(TrackerError::NotRestorable {
                        pid,
                        refusals: refused,
                    }
                    .into());
                }
            }
            Ok((Err(e), _)) => return Err(TrackerError::from(e).into()),
            Err(_) => return Err(DumpError::CapturePanicked { pid }),
        }
        let (process, pipes) = state?;
        let mut set = pages?;
        parts.state_wait_ms = laps.next("state captured");
        if ran_program_code(&mut threads)? != ran_before {
            // A signal handler ran during an injection: memory and VMAs may
            // have changed after the scan. The final scan does not re-arm,
            // so scanning again finds every page written since the last
            // round, these included: copy them (again).
            tracing::info!(
                pid,
                "a signal handler ran during the dump: scanning its memory again"
            );
            vmas = crate::session::read_target_vmas(pid, &scratch)?;
            let again = session.collect_final(&vmas, full_copy)?;
            let copy = crate::backend::subtract(&again.copy, &windows);
            let holes = crate::backend::subtract(&again.holes, &windows);
            for r in copy.iter().chain(&holes) {
                writer.replace_range(*r)?;
            }
            copier
                .copy_ranges(pid, &copy, &mut writer)
                .map_err(TrackerError::from)?;
            set.holes = holes;
        }
        copier
            .copy_ranges(pid, &windows, &mut writer)
            .map_err(TrackerError::from)?;
        for h in &set.holes {
            writer.add_hole(*h);
        }
        parts.stacks_ms = laps.next("stack pages copied");
        // tern's scratch area is not the target's: the restored process
        // must not get one.
        let files = crate::maps::file_identities(pid, &vmas, &files_before);
        let mut records: Vec<images::VmaRecord> = vmas
            .iter()
            .filter(|v| v.name.as_deref() != Some(crate::maps::SCRATCH_NAME))
            .map(|v| {
                let mut r = v.record();
                if v.is_private() && v.is_file() {
                    r.file = files.get(&(v.dev, v.inode)).cloned();
                }
                r
            })
            .collect();
        parts.files_ms = laps.next("mapped files identified");
        let mut flags = flags_before.clone();
        if records
            .iter()
            .any(|r| !flags.contains_key(&(r.start, r.end)))
        {
            flags = crate::maps::vm_flags(pid).unwrap_or_default();
        }
        for r in &mut records {
            if let Some(f) = flags.get(&(r.start, r.end)) {
                r.vm_flags = f.clone();
            }
        }
        parts.vm_flags_ms = laps.next("VmFlags");
        let capture_ms = t_freeze.elapsed().as_secs_f64() * 1e3;
        let tw = Instant::now();
        writer.store_process(&process, &pipes)?;
        let mut inv = Inventory::new(ImageKind::Dump, pid, session.backend(), opts.compress);
        if let (Some(p), Some(pinv)) = (parent, &parent_inv) {
            inv.parent = Some(ParentRef {
                path: crate::session::relative_path(dir, p),
                id: pinv.id.clone(),
            });
        }
        inv.tracking = Some(TrackingState {
            target_start_time: session.start_time(),
            uffd_fd: None,
            scratch_addr: None,
            ebpf_pin_dir: None,
        });
        let mm = MmRecord {
            vmas: records.clone(),
        };
        let stats = writer.finish(&mm, &inv)?;
        let write_ms = tw.elapsed().as_secs_f64() * 1e3;
        parts.metadata_ms = laps.next("image written");
        Ok((process, records, stats, capture_ms, write_ms))
    })();
    let (process, records, stats, capture_ms, write_ms) = match res {
        Ok(v) => v,
        Err(e) => {
            drop(threads); // detach: the target resumes
            return Err(e);
        }
    };

    let verify = if verify {
        let r = restorer::verify::verify_chain(pid, dir).map_err(|e| DumpError::VerifyRead {
            pid,
            dir: dir.to_path_buf(),
            source: Cause::of(&e),
        })?;
        if r.mismatches > 0 {
            drop(threads);
            return Err(DumpError::Verify {
                pid,
                dir: dir.to_path_buf(),
                checked: r.pages_checked,
                mismatches: r.mismatches,
                first: r.first_mismatches.first().cloned().unwrap_or_default(),
            });
        }
        Some(r)
    } else {
        None
    };
    parts.verify_ms = laps.next("verified");

    // The end: resume, or kill if the tern that asked is still there. A
    // tern that died meanwhile gets nothing: the target runs on as before
    // (no scratch area of ours that was not there) and the image is
    // marked incomplete.
    if nix::unistd::getppid().as_raw() != tern_pid {
        if created_scratch {
            let leader = &mut threads[0];
            let removed = leader
                .ensure_scratch(Injector::find_scratch(pid)?.first().copied())
                .and_then(|_| leader.remove_scratch());
            if let Err(e) = removed {
                tracing::warn!(pid, "removing the scratch area after tern died: {e}");
            }
        }
        if let Ok(d) = images::ImageDir::create(dir) {
            let _ = d.remove_file(images::INVENTORY_FILE);
        }
        drop(threads);
        return Err(DumpError::TernEnded { tern_pid, pid });
    }
    let killed;
    let frozen_ms;
    let kill_target = || {
        // The frozen target: a failure means it is gone already.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    let end = match &opts.hold {
        Some(g) => {
            // The image is sent on from here: without the zeros written
            // ahead.
            if let Err(e) = images::trim_pages_file(dir, stats.stored_end) {
                tracing::warn!(pid, "cutting the zeros written ahead: {e}");
            }
            let doom = || {
                threads.iter_mut().all(|t| match t.die_with_tracer() {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(pid, "binding thread {} to its tracer: {e}", t.tid());
                        false
                    }
                })
            };
            let d = g.hold(frozen_at_ns, doom, kill_target);
            if d == crate::hold::Decision::Resume {
                tracing::info!(pid, "the migration did not go through: PID {pid} resumes");
            }
            Some(d)
        }
        None => None,
    };
    if end == Some(crate::hold::Decision::Kill) {
        parts.end_ms = laps.next("killed");
        frozen_ms = laps.total_ms();
        killed = true;
        for t in threads.drain(..) {
            t.abandon();
        }
    } else if opts.leave_running || end.is_some() {
        drop(threads);
        parts.end_ms = laps.next("resumed");
        frozen_ms = laps.total_ms();
        killed = false;
    } else {
        kill_target();
        parts.end_ms = laps.next("killed");
        frozen_ms = laps.total_ms();
        killed = true;
        for t in threads.drain(..) {
            t.abandon();
        }
    }
    if let Err(e) = images::trim_pages_file(dir, stats.stored_end) {
        tracing::warn!(pid, "cutting the zeros written ahead: {e}");
    }
    Ok(DumpReport {
        pid,
        frozen_ms,
        duration_ms: t0.elapsed().as_secs_f64() * 1e3,
        pages_written: stats.data_pages + stats.zero_pages,
        bytes_written: stats.bytes_written,
        threads: process.threads.len(),
        vmas: records.len(),
        verify,
        backend: session.backend().to_string(),
        full_copy,
        pages_zero: stats.zero_pages,
        pages_hole: stats.hole_pages,
        capture_ms,
        write_ms,
        killed,
        images_dir: dir.display().to_string(),
        parent: parent.map(|p| p.display().to_string()),
        live_rounds: Vec::new(),
        live_image: None,
        live_ms: 0.0,
        catch_up_rounds: catch_up,
        fsync_ms: 0.0,
        frozen_parts: parts,
    })
}

/// Times any held thread ran its own code (see `Injector::ran_program_code`).
fn ran_program_code(threads: &mut [Injector]) -> Result<u32, DumpError> {
    let mut n = 0;
    for t in threads {
        n += t.ran_program_code()?;
    }
    Ok(n)
}

/// Pages injected calls may write: from a little below each thread's stack
/// pointer (the stub runs 256 bytes below it, past the red zone) up to the
/// page holding it, and each thread's rseq area (the kernel updates its
/// `cpu_id` whenever an injected call returns to user mode on another
/// CPU); within dumped VMAs. Sorted, merged.
fn stack_windows(
    threads: &mut [Injector],
    vmas: &[crate::maps::Vma],
) -> Result<Vec<images::PageRange>, DumpError> {
    let ps = images::PAGE_SIZE;
    let dumped: Vec<images::PageRange> = vmas
        .iter()
        .filter(|v| v.is_dumped())
        .map(|v| images::PageRange::new(v.start, v.end))
        .collect();
    let mut out = Vec::new();
    for t in threads {
        let sp = stack_pointer(t)?;
        let mut w = vec![images::PageRange::new(
            sp.saturating_sub(1024) & !(ps - 1),
            (sp & !(ps - 1)) + ps,
        )];
        let tid = t.tid();
        let rseq = t
            .on_tracer(sys::rseq::registration)?
            .map_err(|e| DumpError::Rseq {
                pid: t.pid(),
                tid,
                source: Cause::of(&e),
            })?;
        if let Some(r) = rseq {
            let end = r.abi_pointer.saturating_add(r.abi_size as u64);
            w.push(images::PageRange::new(
                r.abi_pointer & !(ps - 1),
                end.next_multiple_of(ps),
            ));
            w.sort_by_key(|r| r.start);
            let merged = crate::backend::union(&w[..1], &w[1..]);
            w = merged;
        }
        let inside = crate::backend::subtract(&w, &crate::backend::subtract(&w, &dumped));
        out = crate::backend::union(&out, &inside);
    }
    Ok(out)
}

#[cfg(target_arch = "x86_64")]
fn stack_pointer(t: &mut Injector) -> Result<u64, DumpError> {
    Ok(t.original_regs()?.rsp)
}

#[cfg(target_arch = "aarch64")]
fn stack_pointer(t: &mut Injector) -> Result<u64, DumpError> {
    Ok(t.original_regs()?.sp)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn stack_pointer(t: &mut Injector) -> Result<u64, DumpError> {
    Err(DumpError::UnsupportedArch {
        pid: t.pid(),
        tid: t.tid(),
    })
}

/// Stop every thread of `pid`, each held by an injector (leader first).
/// Threads created meanwhile are caught by repeating until a pass over
/// /proc/PID/task finds no new one (stopped threads cannot clone).
fn freeze_all(pid: i32, timeout: Duration) -> Result<Vec<Injector>, DumpError> {
    let deadline = Instant::now() + timeout;
    let mut held: BTreeMap<i32, Injector> = BTreeMap::new();
    loop {
        let tids = sys::proc::tids(pid).map_err(|e| DumpError::Tasks {
            pid,
            source: Cause::of(&e),
        })?;
        let new: Vec<i32> = tids.into_iter().filter(|t| !held.contains_key(t)).collect();
        if new.is_empty() {
            break;
        }
        for tid in new {
            match Injector::attach_thread(pid, tid, timeout) {
                Ok(inj) => {
                    held.insert(tid, inj);
                }
                Err(sys::inject::InjectError::Exited { .. }) => {}
                Err(e) if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => {
                    tracing::debug!(pid, tid, "thread gone while freezing: {e}");
                }
                Err(e) => return Err(e.into()),
            }
        }
        if Instant::now() > deadline {
            return Err(DumpError::ThreadsKeptComing { pid, timeout });
        }
    }
    if held.is_empty() {
        return Err(TrackerError::Exited {
            pid,
            what: "dump".into(),
        }
        .into());
    }
    let mut out: Vec<Injector> = Vec::with_capacity(held.len());
    if let Some(leader) = held.remove(&pid) {
        out.push(leader);
    }
    out.extend(held.into_values());
    Ok(out)
}

// ---- state capture ---------------------------------------------------------

/// A thread's registers that could not be read.
fn registers<E: std::error::Error + 'static>(pid: i32, tid: i32) -> impl FnOnce(E) -> DumpError {
    move |e| DumpError::Registers {
        pid,
        tid,
        source: Cause::of(&e),
    }
}

/// A thread's signal state (mask, pending, alternate stack) that could not
/// be read.
fn signals<E: std::error::Error + 'static>(pid: i32, tid: i32) -> impl FnOnce(E) -> DumpError {
    move |e| DumpError::Signals {
        pid,
        tid,
        source: Cause::of(&e),
    }
}

/// A /proc file `sys::proc` could not read or parse.
fn proc_err(e: sys::proc::ProcError) -> DumpError {
    DumpError::Proc {
        source: Cause::of(&e),
    }
}

/// One injected read's room in the scratch data area (the largest read,
/// a kernel sigaction, is 32 bytes).
const SLOT: usize = 32;
/// Slots of a thread's own reads ([`thread_calls`]).
const THREAD_SLOTS: usize = 2;

/// The reads only a thread itself can do, into zeroed slots at `base`: its
/// alternate signal stack (slot 0) and its clear-child-tid address (slot 1).
fn thread_calls(base: u64) -> Vec<sys::inject::Syscall> {
    const PR_GET_TID_ADDRESS: u64 = 40;
    vec![
        sys::inject::Syscall::new(libc::SYS_sigaltstack, [0, base, 0, 0, 0, 0]),
        // Without CONFIG_CHECKPOINT_RESTORE it fails: 0 is kept.
        sys::inject::Syscall::new(
            libc::SYS_prctl,
            [PR_GET_TID_ADDRESS, base + SLOT as u64, 0, 0, 0, 0],
        )
        .may_fail(),
    ]
}

/// What [`thread_calls`] read: `results` their return values, `out` their
/// slots.
fn thread_results(
    pid: i32,
    tid: i32,
    results: &[i64],
    out: &[u8],
) -> Result<(sys::signals::AltStack, u64), DumpError> {
    let r = results.first().copied().unwrap_or(-1);
    if r < 0 {
        return Err(DumpError::Syscall {
            pid,
            tid,
            call: "sigaltstack".into(),
            errno: sys::inject::errno_of(r) as i32,
        });
    }
    let altstack: sys::signals::AltStack =
        sys::signals::StackT::from_bytes(out.get(..24).unwrap_or_default())
            .map_err(signals(pid, tid))?
            .into();
    let clear_child_tid = match results.get(1) {
        Some(0) => u64::from_ne_bytes(
            out.get(SLOT..SLOT + 8)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 8]),
        ),
        _ => 0,
    };
    Ok((altstack, clear_child_tid))
}

/// Everything but memory, while every thread is stopped, and the bytes
/// queued in each pipe (by the name the state gives them).
fn capture_state(
    pid: i32,
    threads: &mut [Injector],
    vmas: &[sys::proc::Vma],
    unlinked_ahead: &[images::process::UnlinkedFileState],
    tracking_fd: Option<i32>,
    mut scratch: Option<u64>,
) -> Result<(ProcessImage, BTreeMap<String, Vec<u8>>), DumpError> {
    let t0 = Instant::now();
    let lap = |what: &str| {
        tracing::debug!(
            pid,
            "capture: {what} at {:.2} ms",
            t0.elapsed().as_secs_f64() * 1e3
        )
    };
    let status = sys::proc::status(pid, None).map_err(proc_err)?;
    let stat = sys::proc::stat(pid, None).map_err(proc_err)?;
    // The leader (or the first thread if the leader is gone) does the
    // process-wide injected calls.
    let mut thread_images = Vec::with_capacity(threads.len());
    let mut filters: Vec<sys::seccomp::SeccompFilter> = Vec::new();
    let mut shared_pending = Vec::new();
    for (i, inj) in threads.iter_mut().enumerate() {
        let tid = inj.tid();
        let (regs, blocked, pending, shared, rseq, seccomp_chain) =
            inj.on_tracer(move |tid| -> Result<_, DumpError> {
                let regs = sys::regs::ThreadRegs::capture(tid).map_err(registers(pid, tid))?;
                let blocked = sys::signals::blocked_mask(tid).map_err(signals(pid, tid))?;
                let pending = sys::signals::pending(tid, sys::signals::Queue::Thread)
                    .map_err(signals(pid, tid))?;
                let shared = if i == 0 {
                    sys::signals::pending(tid, sys::signals::Queue::Process)
                        .map_err(signals(pid, tid))?
                } else {
                    Vec::new()
                };
                let rseq = sys::rseq::registration(tid).map_err(|e| DumpError::Rseq {
                    pid,
                    tid,
                    source: Cause::of(&e),
                })?;
                let seccomp = |e: sys::seccomp::SeccompError| DumpError::Seccomp {
                    pid,
                    tid,
                    source: Cause::of(&e),
                };
                let chain = match sys::seccomp::mode(pid, tid).map_err(seccomp)? {
                    sys::seccomp::SeccompMode::Filter { .. } => {
                        Some(sys::seccomp::filters(tid).map_err(seccomp)?)
                    }
                    sys::seccomp::SeccompMode::Strict => None,
                    sys::seccomp::SeccompMode::Disabled => Some(Vec::new()),
                };
                Ok((regs, blocked, pending, shared, rseq, chain))
            })??;
        // The injector's view of the registers at the stop: an rseq critical
        // section already moved to its abort handler (the kernel's rule).
        #[cfg(target_arch = "x86_64")]
        let regs = {
            let mut regs = regs;
            regs.set_gp_x86(&inj.original_regs()?)
                .map_err(registers(pid, tid))?;
            regs
        };
        #[cfg(target_arch = "aarch64")]
        let regs = {
            let mut regs = regs;
            regs.set_gp_arm64(&inj.original_regs()?)
                .map_err(registers(pid, tid))?;
            regs
        };
        if i == 0 {
            shared_pending = shared;
        }
        let (seccomp_mode, seccomp) = match seccomp_chain {
            None => (1u8, Vec::new()),
            Some(chain) if chain.is_empty() => (0, Vec::new()),
            Some(chain) => {
                let idx = chain
                    .into_iter()
                    .map(|f| match filters.iter().position(|g| *g == f) {
                        Some(k) => k,
                        None => {
                            filters.push(f);
                            filters.len() - 1
                        }
                    })
                    .collect();
                (2, idx)
            }
        };
        // Per-thread state only the thread itself can read, in one batch
        // (the leader's goes with the process-wide calls below).
        scratch = Some(inj.ensure_scratch(scratch)?);
        let (altstack, clear_child_tid) = if i == 0 {
            // Filled in from the process-wide batch.
            let none = sys::signals::AltStack {
                sp: 0,
                flags: sys::signals::SS_DISABLE,
                size: 0,
            };
            (none, 0)
        } else {
            let base = inj.batch_data_addr()?;
            let results = inj.syscall_batch(thread_calls(base), vec![0u8; THREAD_SLOTS * SLOT])?;
            let out = inj.read_memory(base, THREAD_SLOTS * SLOT)?;
            inj.release_scratch()?;
            thread_results(pid, tid, &results, &out)?
        };
        let (robust_list, robust_list_len) = robust_list(tid);
        let sched = sys::sched::read(tid).map_err(|e| DumpError::Sched {
            pid,
            tid,
            source: Cause::of(&e),
        })?;
        thread_images.push(ThreadImage {
            tid,
            comm: read_trim(&format!("/proc/{pid}/task/{tid}/comm")),
            regs: regs.into(),
            blocked,
            pending: pending.into_iter().map(Into::into).collect(),
            altstack: altstack.into(),
            rseq: rseq.map(Into::into),
            seccomp_mode,
            seccomp,
            clear_child_tid,
            robust_list,
            robust_list_len,
            sched: Some(sched.into()),
        });
    }

    lap("threads");
    let leader = &mut threads[0];
    // Signal dispositions: only those /proc says are not the default (each
    // read by an injected call, all of them with the calls below in one
    // request to the tracer thread).
    let (caught, ignored) = (status.sigcgt, status.sigign);
    let mut sigactions = Vec::new();
    let mut asked: Vec<i32> = Vec::new();
    for signo in 1..=64i32 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        let bit = 1u64 << (signo - 1);
        // A SIG_DFL disposition's flags and mask are replaced whole by the
        // next sigaction that installs a handler, so they matter only for
        // SIGCHLD (SA_NOCLDSTOP, SA_NOCLDWAIT): that one is always read.
        if (caught | ignored) & bit == 0 && signo != libc::SIGCHLD {
            sigactions.push(sys::signals::SigAction {
                signo,
                handler: sys::signals::SIG_DFL,
                flags: 0,
                restorer: 0,
                mask: 0,
            });
        } else {
            asked.push(signo);
        }
    }
    // The leader's own calls first (their slots), then one 32-byte slot
    // per sigaction asked, then one per itimer.
    let base = leader.batch_data_addr()?;
    let own = thread_calls(base);
    let slot = |i: usize| base + ((THREAD_SLOTS + i) * SLOT) as u64;
    let slots = asked.len() + 3;
    // Process-wide memory settings (mm flags): THP disabled (1, or 3 with
    // PR_THP_DISABLE_EXCEPT_ADVISED) and KSM for every VMA.
    const PR_GET_THP_DISABLE: u64 = 42;
    const PR_GET_MEMORY_MERGE: u64 = 68;
    let mut calls: Vec<sys::inject::Syscall> = Vec::with_capacity(own.len() + slots + 4);
    let mut names: Vec<String> = Vec::with_capacity(slots + 4);
    let n_own = own.len();
    calls.extend(own);
    for (i, &signo) in asked.iter().enumerate() {
        calls.push(sys::inject::Syscall::new(
            libc::SYS_rt_sigaction,
            [u64::from(signo.unsigned_abs()), 0, slot(i), 8, 0, 0],
        ));
        names.push(format!("rt_sigaction({signo})"));
    }
    for which in 0..3usize {
        calls.push(sys::inject::Syscall::new(
            libc::SYS_getitimer,
            [which as u64, slot(asked.len() + which), 0, 0, 0, 0],
        ));
        names.push(format!("getitimer({which})"));
    }
    calls.push(sys::inject::Syscall::new(libc::SYS_brk, [0; 6]).may_fail());
    names.push("brk".into());
    calls.push(
        sys::inject::Syscall::new(
            libc::SYS_prctl,
            [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0],
        )
        .may_fail(),
    );
    names.push("prctl(PR_GET_DUMPABLE)".into());
    calls.push(
        sys::inject::Syscall::new(libc::SYS_prctl, [PR_GET_THP_DISABLE, 0, 0, 0, 0, 0]).may_fail(),
    );
    names.push("prctl(PR_GET_THP_DISABLE)".into());
    calls.push(
        sys::inject::Syscall::new(libc::SYS_prctl, [PR_GET_MEMORY_MERGE, 0, 0, 0, 0, 0]).may_fail(),
    );
    names.push("prctl(PR_GET_MEMORY_MERGE)".into());
    let n = calls.len();
    // Every read lands in the zeroed slots (one stop per call: this process
    // is not tern's own, so no batch stub runs in it).
    let all = leader.syscall_batch(calls, vec![0u8; (THREAD_SLOTS + slots) * SLOT])?;
    let out = leader.read_memory(base, (THREAD_SLOTS + slots) * SLOT)?;
    let (own_results, results) = all.split_at(all.len().min(n_own));
    let (altstack, clear_child_tid) =
        thread_results(pid, leader.tid(), own_results, &out[..THREAD_SLOTS * SLOT])?;
    if let Some(t) = thread_images.first_mut() {
        t.altstack = altstack.into();
        t.clear_child_tid = clear_child_tid;
    }
    let out = &out[THREAD_SLOTS * SLOT..];
    // brk and the prctls give their raw results (a failure is kept as
    // such); the reads must have worked. A batch stops after a failed one.
    for (i, call) in names.iter().enumerate().take(slots) {
        let r = results.get(i).copied().unwrap_or(-1);
        if r < 0 {
            return Err(DumpError::Syscall {
                pid,
                tid: leader.tid(),
                call: call.clone(),
                errno: sys::inject::errno_of(r) as i32,
            });
        }
    }
    debug_assert_eq!(all.len(), n);
    for (i, &signo) in asked.iter().enumerate() {
        let ka = sys::signals::KernelSigaction::from_bytes(&out[i * SLOT..(i + 1) * SLOT])
            .map_err(|e| DumpError::Sigaction {
                pid,
                signo: u64::from(signo.unsigned_abs()),
                source: Cause::of(&e),
            })?;
        sigactions.push(sys::signals::SigAction::from_kernel(signo, &ka));
    }
    sigactions.sort_by_key(|a| a.signo);
    let mut itimers = Vec::new();
    for (which, idx) in (0..3i32).zip(0usize..) {
        let b = &out[(asked.len() + idx) * SLOT..(asked.len() + idx + 1) * SLOT];
        let w = |k: usize| u64::from_ne_bytes(b[k * 8..k * 8 + 8].try_into().unwrap_or([0; 8]));
        itimers.push(ITimer {
            which,
            interval_us: w(0) * 1_000_000 + w(1),
            value_us: w(2) * 1_000_000 + w(3),
        });
    }
    let brk = results[slots] as u64;
    let dumpable = results[slots + 1];
    let thp_disable = results[slots + 2];
    let memory_merge = results[slots + 3];
    let posix_timers = posix_timers(leader, pid)?;
    leader.release_scratch()?;

    lap("injected calls");
    let rlimits = read_limits(pid)?;

    let auxv = sys::proc::auxv(pid).map_err(proc_err)?;
    // The fields after startstack exist since Linux 3.3/3.5.
    let mm = MmState {
        start_code: stat.startcode,
        end_code: stat.endcode,
        start_stack: stat.startstack,
        start_data: stat.start_data.unwrap_or(0),
        end_data: stat.end_data.unwrap_or(0),
        start_brk: stat.start_brk.unwrap_or(0),
        brk,
        arg_start: stat.arg_start.unwrap_or(0),
        arg_end: stat.arg_end.unwrap_or(0),
        env_start: stat.env_start.unwrap_or(0),
        env_end: stat.env_end.unwrap_or(0),
        auxv,
    };

    lap("mm");
    let mut fds = Vec::new();
    let mut pipes_done: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut pipes: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let fd_table = sys::fds::fd_table(pid).map_err(|e| DumpError::FdTable {
        pid,
        source: Cause::of(&e),
    })?;
    // Unix sockets: paired within the process, from sock_diag (read once,
    // if the process holds a socket at all).
    let socket_inos: std::collections::BTreeSet<u64> = fd_table
        .iter()
        .filter_map(|f| match f.kind {
            sys::fds::FdKind::Socket { ino } => Some(ino),
            _ => None,
        })
        .collect();
    let (unix, inet) = if socket_inos.is_empty() {
        Default::default()
    } else {
        let table_err = |source| DumpError::FdTable { pid, source };
        let unix = sys::unix_sockets::all();
        let inet = crate::restorable::inet_sockets_of(pid, &fd_table, &unix)
            .map_err(|e| table_err(Cause::of(&e)))?;
        (unix.map_err(|e| table_err(Cause::of(&e)))?, inet)
    };
    for info in fd_table {
        let fd_err = |e: sys::fds::FdsError| DumpError::Fd {
            pid,
            fd: info.fd,
            source: Cause::of(&e),
        };
        if Some(info.fd) == tracking_fd {
            continue; // tern's own
        }
        let mut pipe_data = None;
        let mut pipe_capacity = None;
        // A dup of an earlier fd (same object first, then kcmp).
        let mut same_as = None;
        let kind = match &info.kind {
            sys::fds::FdKind::Anon { what } if sys::event_fds::kind_of_link(what).is_some() => {
                FdKindState::from_event(sys::event_fds::read(pid, info.fd).map_err(|e| {
                    DumpError::Fd {
                        pid,
                        fd: info.fd,
                        source: Cause::of(&e),
                    }
                })?)
            }
            sys::fds::FdKind::Socket { ino } => match unix.get(ino) {
                Some(u) if crate::restorable::restorable_unix(u, &unix, &socket_inos).is_ok() => {
                    let listening = u.state == sys::unix_sockets::STATE_LISTEN;
                    FdKindState::UnixSocket {
                        ino: u.ino,
                        peer: if listening { 0 } else { u.peer.unwrap_or(0) },
                        sock_type: u.sock_type,
                        shutdown: u.shutdown,
                        name: u.name.clone(),
                        listen: listening.then_some(u.wqueue),
                        file: unix_socket_file(u).map_err(|e| DumpError::Fd {
                            pid,
                            fd: info.fd,
                            source: Cause::msg(e),
                        })?,
                    }
                }
                _ => match inet.get(ino) {
                    Some(s) if crate::restorable::restorable_inet(s).is_ok() => {
                        let o = sys::inet_sockets::options(pid, info.fd, s).map_err(|e| {
                            DumpError::Fd {
                                pid,
                                fd: info.fd,
                                source: Cause::of(&e),
                            }
                        })?;
                        FdKindState::InetSocket {
                            family: s.family,
                            protocol: s.protocol,
                            addr: s.local.to_string(),
                            listen: (s.state == sys::inet_sockets::TCP_LISTEN).then_some(s.wqueue),
                            reuseaddr: o.reuseaddr,
                            reuseport: o.reuseport,
                            keepalive: o.keepalive,
                            nodelay: o.nodelay,
                            v6only: o.v6only,
                        }
                    }
                    _ => FdKindState::from(info.kind.clone()),
                },
            },
            k => FdKindState::from(k.clone()),
        };
        for earlier in fds.iter().filter(|e: &&FdImage| e.same_as.is_none()) {
            if same_object(&earlier.info.kind, &kind)
                && sys::fds::same_description(pid, earlier.info.fd, info.fd).map_err(fd_err)?
            {
                same_as = Some(earlier.info.fd);
                break;
            }
        }
        let queue = match info.kind {
            sys::fds::FdKind::Pipe { ino, .. } => Some((0, ino, "")),
            sys::fds::FdKind::Fifo { dev, ino, .. } => Some((dev, ino, "fifo-")),
            _ => None,
        };
        if let Some((dev, ino, prefix)) = queue {
            pipe_capacity = Some(sys::fds::pipe_capacity(pid, info.fd).map_err(fd_err)? as u64);
            let key = (dev, ino);
            let name = match pipes_done.get(&key) {
                Some(n) => n.clone(),
                None => {
                    let data = sys::fds::peek_pipe(pid, info.fd).map_err(fd_err)?;
                    let name = if prefix.is_empty() {
                        format!("{ino}.bin")
                    } else {
                        format!("{prefix}{dev}-{ino}.bin")
                    };
                    pipes.insert(name.clone(), data);
                    pipes_done.insert(key, name.clone());
                    name
                }
            };
            pipe_data = Some(name);
        }
        // What is queued to a unix socket (once per socket, not per dup;
        // a listener has connections, not data, and none waiting).
        let holds_data = match kind {
            FdKindState::UnixSocket {
                listen: None,
                peer,
                sock_type,
                ..
            } => peer != 0 || sock_type == 2,
            _ => false,
        };
        if let FdKindState::UnixSocket { ino, .. } = kind
            && holds_data
        {
            let name = format!("unix-{ino}.bin");
            if pipes.contains_key(&name) {
                pipe_data = Some(name);
            } else if same_as.is_none() {
                // (It is in the map: that is where its kind came from.)
                let q = unix
                    .get(&ino)
                    .map(|u| sys::unix_sockets::peek_queue(pid, info.fd, u))
                    .transpose()
                    .map_err(|e| DumpError::Fd {
                        pid,
                        fd: info.fd,
                        source: Cause::of(&e),
                    })?
                    .unwrap_or_default();
                // Unconnected, or a client connected to a datagram server:
                // what is queued came from senders a restore cannot be.
                let unconnected = match kind {
                    FdKindState::UnixSocket { peer: 0, .. } => true,
                    FdKindState::UnixSocket { peer, .. } => unix.get(&peer).is_some_and(|p| {
                        p.peer.is_none() && p.state != sys::unix_sockets::STATE_LISTEN
                    }),
                    _ => false,
                };
                if unconnected && (!q.messages.is_empty() || q.empty_datagram) {
                    return Err(DumpError::Fd {
                        pid,
                        fd: info.fd,
                        source: Cause::msg(
                            "a unix datagram socket with datagrams queued from senders tern does not know: not restored yet",
                        ),
                    });
                }
                if q.ancillary || q.empty_datagram {
                    return Err(DumpError::Fd {
                        pid,
                        fd: info.fd,
                        source: Cause::msg(if q.ancillary {
                            "a unix socket with fds or credentials in flight (SCM_RIGHTS, SCM_CREDENTIALS): tern does not restore them; dump it once they are read"
                        } else {
                            "a unix datagram socket with an empty datagram queued: what follows it cannot be read without consuming it"
                        }),
                    });
                }
                if !q.messages.is_empty() {
                    pipes.insert(name.clone(), sys::unix_sockets::encode(&q.messages));
                    pipe_data = Some(name);
                }
            }
        }
        let mut info = FdState::from(info);
        info.kind = kind;
        fds.push(FdImage {
            info,
            pipe_data,
            pipe_capacity,
            same_as,
        });
    }

    // Memfds and deleted files: their contents, while frozen.
    let exe = link(pid, "exe");
    let (unlinked_files, exe_unlinked) =
        crate::unlinked::capture(pid, &fds, vmas, &exe, unlinked_ahead, &mut pipes).map_err(
            |why| DumpError::Unrestorable {
                pid,
                source: Cause::msg(why),
            },
        )?;
    lap("unlinked files");

    let process = ProcessImage {
        pid,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        comm: read_trim(&format!("/proc/{pid}/comm")),
        exe,
        exe_unlinked,
        cwd: link(pid, "cwd"),
        root: link(pid, "root"),
        umask: status.umask.unwrap_or(0o022),
        dumpable: u32::try_from(dumpable).ok(),
        thp_disable: u32::try_from(thp_disable).ok().filter(|&v| v > 0),
        memory_merge: memory_merge == 1,
        oom_score_adj: read_trim(&format!("/proc/{pid}/oom_score_adj"))
            .parse()
            .ok(),
        coredump_filter: u32::from_str_radix(
            read_trim(&format!("/proc/{pid}/coredump_filter")).as_str(),
            16,
        )
        .ok(),
        personality: u64::from_str_radix(
            read_trim(&format!("/proc/{pid}/personality")).as_str(),
            16,
        )
        .unwrap_or(0),
        creds: creds(&status)?,
        mm,
        vdso: sys::vdso::VdsoLayout::of_pid(pid)
            .map_err(|e| DumpError::Vdso {
                pid,
                source: Cause::of(&e),
            })?
            .into(),
        sigactions: sigactions.into_iter().map(Into::into).collect(),
        shared_pending: shared_pending.into_iter().map(Into::into).collect(),
        itimers,
        posix_timers,
        rlimits,
        seccomp_filters: filters.into_iter().map(Into::into).collect(),
        threads: thread_images,
        fds,
        unlinked_files,
    };
    // What a restore would refuse is refused here, while the target can
    // still resume.
    process.validate().map_err(|e| DumpError::Unrestorable {
        pid,
        source: Cause::msg(e),
    })?;
    Ok((process, pipes))
}

/// The socket file of a unix socket bound to a path and not connected (an
/// accepted connection shares its listener's): what a restore gives the
/// file it binds again.
fn unix_socket_file(
    u: &sys::unix_sockets::UnixSocket,
) -> Result<Option<images::state::UnixSocketFile>, String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let Some(n) = u.name.as_ref().filter(|n| n.first() == Some(&b'/')) else {
        return Ok(None);
    };
    if u.peer.is_some() && u.state != sys::unix_sockets::STATE_LISTEN {
        return Ok(None);
    }
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(n));
    let m = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if u.file != Some((m.dev(), m.ino())) {
        return Err(format!(
            "{}: no longer the file its socket is bound to",
            path.display()
        ));
    }
    Ok(Some(images::state::UnixSocketFile {
        dev: m.dev(),
        ino: m.ino(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
    }))
}

/// The process's POSIX timers: /proc/PID/timers lists them;
/// `timer_gettime` and `timer_getoverrun`, injected in the process, give
/// each one's time left, interval and overrun (one request to the tracer
/// thread per 64 timers; none without timers).
fn posix_timers(
    leader: &mut Injector,
    pid: i32,
) -> Result<Vec<images::process::PosixTimerState>, DumpError> {
    use sys::posix_timers::Notify;
    const PER_BATCH: usize = 64;
    let listed = sys::posix_timers::list(pid).map_err(|e| DumpError::Proc {
        source: Cause::of(&e),
    })?;
    let mut out = Vec::with_capacity(listed.len());
    for chunk in listed.chunks(PER_BATCH) {
        let base = leader.batch_data_addr()?;
        let mut calls = Vec::with_capacity(chunk.len() * 2);
        for (i, t) in chunk.iter().enumerate() {
            calls.push(sys::inject::Syscall::new(
                libc::SYS_timer_gettime,
                [t.id as u64, base + (i * SLOT) as u64, 0, 0, 0, 0],
            ));
            calls.push(sys::inject::Syscall::new(
                libc::SYS_timer_getoverrun,
                [t.id as u64, 0, 0, 0, 0, 0],
            ));
        }
        let results = leader.syscall_batch(calls, vec![0u8; chunk.len() * SLOT])?;
        let mem = leader.read_memory(base, chunk.len() * SLOT)?;
        for (i, t) in chunk.iter().enumerate() {
            let (got, over) = (results.get(2 * i), results.get(2 * i + 1));
            let (Some(&0), Some(&overrun)) = (got, over) else {
                let (call, r) = match got {
                    Some(&0) => ("timer_getoverrun", over.copied().unwrap_or(-1)),
                    _ => ("timer_gettime", got.copied().unwrap_or(-1)),
                };
                return Err(DumpError::Syscall {
                    pid,
                    tid: leader.tid(),
                    call: format!("{call}({})", t.id),
                    errno: sys::inject::errno_of(r) as i32,
                });
            };
            let w = |k: usize| {
                let o = i * SLOT + k * 8;
                u64::from_ne_bytes(mem[o..o + 8].try_into().unwrap_or([0; 8]))
            };
            let ns = |s: u64, n: u64| s.saturating_mul(1_000_000_000).saturating_add(n);
            let (notify, tid) = match t.notify {
                Notify::None => ("none", None),
                Notify::Signal => ("signal", None),
                Notify::Thread(tid) => ("thread", Some(tid)),
            };
            out.push(images::process::PosixTimerState {
                id: t.id,
                clockid: t.clockid,
                signo: t.signo,
                sigev_value: t.sigev_value,
                notify: notify.into(),
                tid,
                interval_ns: ns(w(0), w(1)),
                value_ns: ns(w(2), w(3)),
                overrun: i32::try_from(overrun).unwrap_or(i32::MAX),
            });
        }
    }
    Ok(out)
}

/// /proc/PID/limits (prlimit(2) on another uid's process needs
/// CAP_SYS_RESOURCE; this file does not). Lines are resources 0.. in order,
/// columns formatted "%-25s %-20s %-20s".
/// Whether two fds refer to one object (a file, a pipe, a device...), the
/// precondition of their sharing one open file description.
fn same_object(a: &FdKindState, b: &FdKindState) -> bool {
    use FdKindState as K;
    match (a, b) {
        (
            K::File {
                dev: d1, ino: i1, ..
            },
            K::File {
                dev: d2, ino: i2, ..
            },
        ) => d1 == d2 && i1 == i2,
        (
            K::Pipe {
                ino: a,
                read_end: r1,
            },
            K::Pipe {
                ino: b,
                read_end: r2,
            },
        ) => a == b && r1 == r2,
        (
            K::Fifo {
                dev: d1, ino: i1, ..
            },
            K::Fifo {
                dev: d2, ino: i2, ..
            },
        ) => d1 == d2 && i1 == i2,
        (K::Dir { path: a }, K::Dir { path: b }) => a == b,
        (K::CharDev { rdev: a, .. }, K::CharDev { rdev: b, .. }) => a == b,
        (K::Tty { rdev: a, .. }, K::Tty { rdev: b, .. }) => a == b,
        // One anonymous inode serves them all: kcmp tells.
        (K::UnixSocket { ino: a, .. }, K::UnixSocket { ino: b, .. }) => a == b,
        (K::EventFd { .. }, K::EventFd { .. })
        | (K::Epoll { .. }, K::Epoll { .. })
        | (K::TimerFd { .. }, K::TimerFd { .. })
        | (K::SignalFd { .. }, K::SignalFd { .. }) => true,
        _ => false,
    }
}

fn read_limits(pid: i32) -> Result<Vec<Rlimit>, DumpError> {
    Ok(sys::proc::limits(pid)
        .map_err(proc_err)?
        .into_iter()
        .map(|l| Rlimit {
            resource: l.resource,
            cur: l.soft,
            max: l.hard,
        })
        .collect())
}

fn robust_list(tid: i32) -> (u64, u64) {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list writes one pointer and one size_t.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r == 0 { (head, len as u64) } else { (0, 0) }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches('\n').to_string())
        .unwrap_or_default()
}

fn link(pid: i32, what: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/{what}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn creds(st: &sys::proc::Status) -> Result<Creds, DumpError> {
    Ok(Creds {
        uid: [st.ruid, st.euid, st.suid, st.fuid],
        gid: [st.rgid, st.egid, st.sgid, st.fgid],
        // procfs reads gids as i32 (a gid above i32::MAX fails the whole
        // parse, with an error naming the file): none is negative here.
        groups: st.groups.iter().map(|&g| g.cast_unsigned()).collect(),
        cap_inh: st.capinh,
        cap_prm: st.capprm,
        cap_eff: st.capeff,
        cap_bnd: st.capbnd.ok_or_else(|| DumpError::ProcParse {
            path: format!("/proc/{}/status", st.pid),
            what: "no CapBnd field".into(),
        })?,
        // Since Linux 4.3; before it, no process has ambient capabilities.
        cap_amb: st.capamb.unwrap_or(0),
        no_new_privs: st.nonewprivs == Some(1),
    })
}
