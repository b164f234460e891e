//! Eager restore (`tern restore`): recreate a dumped process from its image
//! chain — same PID and TIDs, address space, memory, threads, registers,
//! signals, rseq, files, limits, credentials, seccomp — driven from outside
//! with ptrace (no restorer blob runs in the process):
//!
//! 1. Everything is read and checked first (chain, seal, who could have
//!    written it and what it may ask for, process state, pipe data, every
//!    page blob, files to reopen, mm fields, free PIDs/TIDs, same vDSO): a
//!    bad image fails before any process exists.
//! 2. tern forks the future process with `clone3(set_tid = [PID])`; the child
//!    only blocks in `read(2)` on a pipe. tern seizes it with an injector and
//!    creates the other threads from it with injected `clone3(CLONE_THREAD,
//!    set_tid = [TID])`: each new thread resumes where the main thread is
//!    held (the blocked read), blocks there too, and is seized in turn.
//! 3. Through injected syscalls in the main thread: tern's own memory goes
//!    (everything but the scratch area and the vDSO), the vDSO moves to where
//!    the image had it, every VMA is mapped at its address with the mmap
//!    flags its VmFlags say it was made with, filled from the chain
//!    (`process_vm_writev`, or /proc/PID/mem where it is not writable), then
//!    given its madvise state, protection and locks (`MapPlan`); a VMA the
//!    kernel would merge with its neighbour is built elsewhere and moved in
//!    place; seals go on last. `PR_SET_MM_MAP` sets the mm fields (brk,
//!    args, env, auxv, exe).
//! 4. Files, cwd, umask, limits, itimers, handlers; per thread: signal mask,
//!    pending signals re-queued, sigaltstack, robust list, clear_child_tid,
//!    rseq, name, FPU/xsave; then credentials and, last, seccomp filters.
//! 5. The scratch area goes, and every thread is detached with the dumped
//!    registers (the kernel applies its syscall-restart logic to them).
//!
//! All or nothing: the process being built dies with tern. The child sets
//! `PR_SET_PDEATHSIG(SIGKILL)` before anything else (and has it set again
//! after each credential change, which clears it), every thread is traced
//! with `PTRACE_O_EXITKILL`, and SIGTERM, SIGINT, SIGHUP and SIGQUIT sent
//! to tern while it builds kill and reap the child first: a killed or
//! interrupted restore leaves no process, or one that was complete, and the
//! half-built one dies of SIGKILL (no core, no SIGSEGV seen by a
//! supervisor). Any failure before the last step kills it the same way.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fill::{EagerFill, FillMode, FillReport, write_mem};
use images::process::{FdImage, ProcessImage};
use images::state::FdKindState;
use images::{PAGE_SIZE, PageRange, VmaRecord};
use serde::Serialize;
use sys::inject::{InjectError, Injector, Syscall};
use tracing::span::EnteredSpan;

use crate::chain::{BlobCache, ChainError, ImageChain, PageSource};
use crate::trust;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Image(#[from] images::ImageError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("{dir}: {what}")]
    BadImage { dir: PathBuf, what: String },
    /// The image asks for more than it may (see `trust`).
    #[error("{dir}: refused: {why}")]
    Refused { dir: PathBuf, why: String },
    #[error(
        "{dir}: the image was changed after tern wrote it: its seal (made with this host's key) does not match its inventory.json, mm.json, pagemap.img, process.json and pipes/ as they are now; tern restores no altered image{detail}"
    )]
    Altered { dir: PathBuf, detail: String },
    #[error(
        "PID {pid} is taken on this host (by {by}); a restore needs the same PID and TIDs: stop that process, or restore in another PID namespace"
    )]
    PidTaken { pid: i32, by: String },
    #[error("restoring PID {pid}: {step}: {what}")]
    Step {
        pid: i32,
        step: &'static str,
        what: String,
    },
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Deadline of every wait on the restored process.
    pub timeout: Duration,
    /// Leave private anonymous memory out of the build, for a page service
    /// to deliver through userfaultfd (`crate::service`).
    pub lazy: bool,
    /// How the memory built eagerly goes in.
    pub fill: FillMode,
    /// Where the page bytes are, if not in the chain's own page files.
    pub remote: Option<crate::remote::Remote>,
    /// Asked once the process is whole, its threads still held: `Ok` lets
    /// it run, `Err(why)` kills it (a migration's destination runs its
    /// copy only once the source's is gone).
    pub gate: Option<ReleaseGate>,
}

/// See [`RestoreOptions::gate`]: `go` is asked with the PID before the
/// release; `released` is told right after (the process runs).
#[derive(Clone)]
pub struct ReleaseGate {
    pub go: std::sync::Arc<dyn Fn(i32) -> Result<(), String> + Send + Sync>,
    pub released: std::sync::Arc<dyn Fn(i32) + Send + Sync>,
}

impl std::fmt::Debug for ReleaseGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReleaseGate")
    }
}

/// What a restore can do before its image is whole: a migration's
/// destination does it while pre-copy runs, so that the frozen process's
/// restore has only the final image left to open and its process already
/// forked (with its PID) and traced. Used by [`restore_prepared`] on the
/// thread that made it (the placeholder process is traced from it, and
/// dies with it); dropped unused, the placeholder is killed and reaped.
#[derive(Default)]
pub struct Prepared {
    /// Images opened ahead, by their lexical path.
    images: HashMap<PathBuf, images::Image>,
    placeholder: Option<Placeholder>,
    /// The mapped files of the images opened ahead, identified then.
    files: HashMap<String, IdentifiedFile>,
}

/// A mapped file identified ahead ([`check_mapped_files`]): reused at the
/// restore while a `stat` of its path says it is the same file, unchanged
/// (taken before the identity: a change after it shows).
struct IdentifiedFile {
    stat: FileStat,
    identity: sys::mapped_file::FileIdentity,
    inode: (u64, u64),
}

/// What of a `stat` says a file is the one seen before, unchanged.
type FileStat = (u64, u64, u64, i64, i64, i64, i64);

fn file_stat(path: &str) -> Option<FileStat> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Identify the mapped file at `path` now (`None` if it cannot be: it is
/// then identified in the restore).
fn identify(path: &str) -> Option<IdentifiedFile> {
    let stat = file_stat(path)?;
    let (identity, inode) = sys::mapped_file::FileIdentity::of_path(Path::new(path)).ok()??;
    // Replaced between the two: not cached.
    (inode == (stat.0, stat.1)).then_some(IdentifiedFile {
        stat,
        identity,
        inode,
    })
}

/// A process forked with the PID to restore, blocked in its read and
/// traced from the thread that forked it.
struct Placeholder {
    pid: i32,
    wake: Option<OwnedFd>,
    main: Option<Injector>,
}

impl Placeholder {
    fn start(pid: i32, timeout: Duration) -> Result<Placeholder, RestoreError> {
        let (child, wake) = spawn_with_pid(pid)?;
        let mut p = Placeholder {
            pid: child,
            wake: Some(wake),
            main: None,
        };
        if !blocks_in_time(child, None, Instant::now() + timeout) {
            return Err(step::<&str>(pid, "starting the process")(
                "it did not block in time",
            ));
        }
        p.main = Some(Injector::attach_owned_thread_here(child, child, timeout)?);
        Ok(p)
    }
}

impl Drop for Placeholder {
    fn drop(&mut self) {
        // Taken by its restore (its pipe with it): nothing left to do.
        if self.wake.is_none() {
            return;
        }
        // Not used: killed (its injector does when dropped) and reaped.
        drop(self.main.take());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        drop(self.wake.take());
        if !reap(self.pid, Duration::from_secs(5)) {
            tracing::warn!(
                pid = self.pid,
                "the unused placeholder process was not reaped"
            );
        }
    }
}

impl Prepared {
    /// Open the image in `dir` now; the restore takes it as it is if its
    /// chain names it.
    pub fn open_image(&mut self, dir: &Path) -> Result<(), RestoreError> {
        let img = images::Image::open(dir).map_err(|e| bad(dir, e.to_string()))?;
        // Its mapped files, identified now rather than in the restore.
        for v in &img.mm.vmas {
            if let Some(path) = v.backing_file().filter(|_| v.is_private())
                && !self.files.contains_key(path)
                && let Some(f) = identify(path)
            {
                self.files.insert(path.to_string(), f);
            }
        }
        self.images.insert(crate::chain::lexical_path(dir), img);
        Ok(())
    }

    /// Take `img` as the image in `dir` (received whole, not read from
    /// there): the restore's chain uses it as one opened ahead.
    pub fn add_image(&mut self, dir: &Path, img: images::Image) {
        self.images.insert(crate::chain::lexical_path(dir), img);
    }

    /// Fork the process with PID `pid` now and trace it from this thread.
    /// A restore of another PID forks its own (and this one is killed).
    pub fn start_process(&mut self, pid: i32, timeout: Duration) -> Result<(), RestoreError> {
        self.placeholder = None;
        self.placeholder = Some(Placeholder::start(pid, timeout)?);
        Ok(())
    }

    /// The PID of the process started ahead, if any.
    pub fn started(&self) -> Option<i32> {
        self.placeholder.as_ref().map(|p| p.pid)
    }
}

/// The JSON of `tern restore`.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub pid: i32,
    pub restore_ms: f64,
    pub pages_restored: u64,
    pub threads: usize,
    pub vmas: usize,
    /// How the memory went in, and how long it took.
    pub fill: FillReport,
}

/// What a restore leaves running: the process (a child of this one).
pub struct Restored {
    pub report: RestoreReport,
    pub pid: i32,
    /// A lazy restore: what its page service needs (the chain and the
    /// process's userfaultfd).
    pub lazy: Option<(ImageChain, crate::service::Handoff)>,
}

fn step<E: std::fmt::Display>(pid: i32, step: &'static str) -> impl FnOnce(E) -> RestoreError {
    move |e| RestoreError::Step {
        pid,
        step,
        what: e.to_string(),
    }
}

/// Run one step of a restore in a span of its own: with `--log debug` the
/// span's close says how long the step took, and an error it fails with is
/// logged inside it (so the log says which step failed, in which restore).
fn in_step<T>(
    span: tracing::Span,
    f: impl FnOnce() -> Result<T, RestoreError>,
) -> Result<T, RestoreError> {
    span.in_scope(|| {
        let n0 = sys::inject::injected_syscalls();
        let r = f().inspect_err(|e| tracing::debug!(error = %e, "step failed"));
        tracing::trace!(
            injected = sys::inject::injected_syscalls() - n0,
            "syscalls injected"
        );
        r
    })
}

/// Leave the span of the step done and enter the next one's (for steps
/// written inline rather than as one call). The next span is made once the
/// first is left, so that it is its sibling, not its child.
fn next_step(done: EnteredSpan, next: impl FnOnce() -> tracing::Span) -> EnteredSpan {
    drop(done);
    next().entered()
}

/// Checked inputs of a restore.
struct Plan {
    chain: ImageChain,
    process: ProcessImage,
    /// pipe inode -> bytes queued in it.
    pipe_data: BTreeMap<String, Vec<u8>>,
    /// Who could have written the chain: a user's image has its files
    /// opened as the image's user.
    writer: trust::Writer,
    /// The page blobs of file-backed memory, checked; most of them kept.
    blobs: BlobCache,
    /// The pages of the rest, checked.
    fill_source: crate::fill::FillSource,
    /// The credentials of this tern (the child starts with them).
    restorer: trust::Restorer,
    /// Private anonymous memory is left to a page service.
    lazy: bool,
    fill: FillMode,
    /// The files private file mappings take their unwritten pages from,
    /// checked to be those the dump saw: path -> (device, inode) here. The
    /// process's own open of each must find the same inode.
    mapped_inodes: HashMap<String, (u64, u64)>,
    /// The memfds and deleted files, made again in tern.
    unlinked: crate::unlinked::UnlinkedFiles,
}

fn bad(dir: &Path, what: impl Into<String>) -> RestoreError {
    RestoreError::BadImage {
        dir: dir.to_path_buf(),
        what: what.into(),
    }
}

/// Step 1: read and check everything.
fn plan(
    dir: &Path,
    lazy: bool,
    fill: FillMode,
    remote: Option<&crate::remote::Remote>,
    prepared: &mut Prepared,
) -> Result<Plan, RestoreError> {
    let t0 = Instant::now();
    let lap = |what: &str| {
        tracing::debug!(
            "restore plan: {what} at {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        )
    };
    let ahead = &mut prepared.images;
    let chain = match (remote, ahead.is_empty()) {
        (Some(r), true) => ImageChain::open_remote(dir, r)?,
        (None, true) => ImageChain::open(dir)?,
        (r, false) => ImageChain::open_with(dir, ahead, r.map(|r| r as _))?,
    };
    lap("chain opened");
    // The mapped files (a few hundred µs of opens and ELF notes) are
    // checked on another thread while this one checks the rest; those
    // identified ahead need a stat each, done here.
    let ahead = std::mem::take(&mut prepared.files);
    let mapped = if ahead.is_empty() {
        let (dir, vmas) = (dir.to_path_buf(), chain.vmas().to_vec());
        Err(std::thread::spawn(move || {
            check_mapped_files(&dir, &vmas, &ahead)
        }))
    } else {
        Ok(check_mapped_files(dir, chain.vmas(), &ahead))
    };
    let newest = chain.newest();
    let process = newest.process.clone().ok_or_else(|| {
        bad(
            dir,
            "this is a pre-dump image (memory only); restore needs the final image of `tern dump`",
        )
    })?;
    // Who runs this restore (tern's own credentials, read once).
    let restorer = trust::Restorer::current().map_err(|e| bad(dir, e))?;
    // An image altered after tern wrote it here is refused, whoever owns it.
    let key = images::SealKey::host();
    for img in &chain.images {
        if img.seal_status(key.as_ref()) == images::SealStatus::Mismatch {
            // Say what the altered image would have asked for, as the
            // image's own user: that is usually why it was altered.
            let as_user = trust::Writer::User {
                uid: process.creds.uid[0],
                gids: process
                    .creds
                    .gid
                    .iter()
                    .chain(&process.creds.groups)
                    .copied()
                    .collect(),
                because: img.dir.clone(),
            };
            let detail = trust::check_creds(&process, &as_user, &restorer)
                .and_then(|_| trust::check_access(&process, chain.vmas()))
                .err()
                .map(|e| format!(" (as it stands: {e})"))
                .unwrap_or_default();
            return Err(RestoreError::Altered {
                dir: img.dir.clone(),
                detail,
            });
        }
    }
    let writer = trust::chain_verdict(&chain, &process, &restorer, dir).map_err(|why| {
        RestoreError::Refused {
            dir: dir.to_path_buf(),
            why,
        }
    })?;
    for (what, path) in [
        ("working directory", &process.cwd),
        ("root directory", &process.root),
    ] {
        if !Path::new(path).is_dir() {
            return Err(bad(
                dir,
                format!("the process's {what} {path} is not a directory here"),
            ));
        }
    }
    let pipe_data = newest.pipe_data.clone();
    for f in &process.fds {
        if let Some(name) = &f.pipe_data
            && !pipe_data.contains_key(name)
        {
            return Err(bad(
                dir,
                format!(
                    "fd {} refers to pipe data {name}, which is not in the image",
                    f.info.fd
                ),
            ));
        }
        match &f.info.kind {
            FdKindState::File {
                deleted: true,
                dev,
                ino,
                path,
                ..
            } if f.same_as.is_none() && process.unlinked_file((*dev, *ino)).is_none() => {
                return Err(bad(
                    dir,
                    format!(
                        "fd {} is a deleted file ({path}) whose contents are not in the image",
                        f.info.fd
                    ),
                ));
            }
            FdKindState::File {
                path,
                deleted: false,
                ..
            } if !Path::new(path).exists() => {
                return Err(bad(
                    dir,
                    format!(
                        "fd {} refers to {path}, which does not exist here",
                        f.info.fd
                    ),
                ));
            }
            FdKindState::Socket { .. } | FdKindState::Anon { .. } | FdKindState::Other { .. } => {
                return Err(bad(
                    dir,
                    format!(
                        "fd {} is a {:?}, which tern cannot restore yet",
                        f.info.fd, f.info.kind
                    ),
                ));
            }
            _ => {}
        }
    }
    for v in chain.vmas() {
        if let Some(key) = v.unlinked_key()
            && process.unlinked_file(key).is_none()
        {
            return Err(bad(
                dir,
                format!(
                    "VMA {:#x}-{:#x} maps {}, whose contents are not in the image",
                    v.start,
                    v.end,
                    v.name.as_deref().unwrap_or("")
                ),
            ));
        }
    }
    check_host_limits(dir, &process, chain.vmas())?;
    // Same vDSO here (the restored process keeps the one it is forked with).
    let here = sys::vdso::VdsoLayout::of_self()
        .map_err(|e| bad(dir, format!("reading this process's vDSO: {e}")))?;
    sys::vdso::check_compatible(&process.vdso.clone().into(), &here)
        .map_err(|e| bad(dir, e.to_string()))?;
    // PID and TIDs must be free (the PID is ours if started ahead).
    for t in &process.threads {
        let p = PathBuf::from(format!("/proc/{}", t.tid));
        if p.exists() && prepared.started() != Some(t.tid) {
            let by = std::fs::read_to_string(p.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "a task".into());
            return Err(RestoreError::PidTaken { pid: t.tid, by });
        }
    }
    lap("checked");
    let unlinked = crate::unlinked::UnlinkedFiles::make(dir, &process, &pipe_data, &writer)?;
    // Last (the costliest): every page blob the process will get (a lazy
    // restore checks the blobs of lazy memory as it reads them).
    let blobs = chain.verify_pages(blob_budget(), |v| {
        !(eager_copied(v) || lazy && crate::lazy::is_lazy(v))
    })?;
    let eager: Vec<(u64, u64)> = chain
        .vmas()
        .iter()
        .filter(|v| eager_filled(v, lazy))
        .map(|v| (v.start, v.end))
        .collect();
    let mut fill_source = crate::fill::FillSource::open(&chain, &eager);
    let fill_blobs = fill_source.check(&chain)?;
    lap("page blobs checked");
    // Done here (`Ok`) or on its thread (`Err`).
    let mapped_inodes = match mapped {
        Ok(r) => r?,
        Err(t) => t
            .join()
            .map_err(|_| bad(dir, "the check of the mapped files panicked"))??,
    };
    lap("mapped files checked");
    tracing::debug!(
        checked = blobs.checked,
        kept_bytes = blobs.kept_bytes,
        dropped = blobs.dropped,
        fill_blobs,
        "page blobs checked"
    );
    Ok(Plan {
        chain,
        process,
        pipe_data,
        writer,
        blobs,
        fill_source,
        restorer,
        lazy,
        fill,
        mapped_inodes,
        unlinked,
    })
}

/// Every file a private file mapping takes its unwritten pages from is the
/// file the dump saw (`VmaRecord::file`: size, and the ELF build ID or
/// else the modification time): a rebuilt program or an upgraded library
/// at the same path would give the process new code beside its old data.
/// Returns the (device, inode) of each file checked, by path.
fn check_mapped_files(
    dir: &Path,
    vmas: &[VmaRecord],
    ahead: &HashMap<String, IdentifiedFile>,
) -> Result<HashMap<String, (u64, u64)>, RestoreError> {
    let mut seen: HashMap<String, (u64, u64)> = HashMap::new();
    for v in vmas {
        let (Some(path), Some(then)) = (v.backing_file().filter(|_| v.is_private()), &v.file)
        else {
            continue;
        };
        if v.unlinked_key().is_some() {
            continue; // made from the image, not read from a path
        }
        if seen.contains_key(path) {
            continue;
        }
        let known = ahead
            .get(path)
            .filter(|f| file_stat(path) == Some(f.stat))
            .map(|f| (f.identity.clone(), f.inode));
        let (now, inode) = match known {
            Some(k) => Ok(Some(k)),
            None => sys::mapped_file::FileIdentity::of_path(Path::new(path)),
        }
        .map_err(|e| {
                bad(
                    dir,
                    format!(
                        "VMA {:#x}-{:#x} maps {path}, which cannot be read here: {e}",
                        v.start, v.end
                    ),
                )
            })?
            .ok_or_else(|| {
                bad(
                    dir,
                    format!(
                        "VMA {:#x}-{:#x} maps {path}, a regular file at the dump, which is not one here",
                        v.start, v.end
                    ),
                )
            })?;
        if let Some(why) = then.differs(&now) {
            return Err(bad(
                dir,
                format!(
                    "VMA {:#x}-{:#x} maps {path}, which is not the file the dump saw: {why}. The pages the process did not write come from that file, so it would run with new code beside its old data; restore it where {path} is the file it ran with (the same build of that program or library)",
                    v.start, v.end
                ),
            ));
        }
        seen.insert(path.to_string(), inode);
    }
    Ok(seen)
}

/// How much checked page data (as stored, compressed) a restore keeps in
/// memory for the fill: a quarter of what the machine has available, at
/// most 8 GiB. Blobs past it are checked, dropped, and read (and checked)
/// again for the fill.
fn blob_budget() -> u64 {
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(1 << 30, |kb| kb * 1024);
    (avail / 4).min(8 << 30)
}

/// What the kernel here would refuse once the process exists, checked now:
/// the mm fields `PR_SET_MM_MAP` takes, VMAs beyond this machine's address
/// space, resource limits past `fs.nr_open`, robust lists and rseq areas
/// the kernel would not take.
fn check_host_limits(dir: &Path, p: &ProcessImage, vmas: &[VmaRecord]) -> Result<(), RestoreError> {
    let read_u64 =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let task_size = host_task_size();
    let min_addr = read_u64("/proc/sys/vm/mmap_min_addr").unwrap_or(65536);
    for v in vmas.iter().filter(|v| !is_special(v)) {
        if v.end > task_size || v.start < min_addr {
            return Err(bad(
                dir,
                format!(
                    "VMA {:#x}-{:#x} lies outside this machine's user address space ({min_addr:#x}-{task_size:#x})",
                    v.start, v.end
                ),
            ));
        }
    }
    // PR_SET_MM_MAP (kernel/sys.c, validate_prctl_map_addr).
    let m = &p.mm;
    let fields = [
        ("start_code", m.start_code),
        ("end_code", m.end_code),
        ("start_data", m.start_data),
        ("end_data", m.end_data),
        ("start_brk", m.start_brk),
        ("brk", m.brk),
        ("start_stack", m.start_stack),
        ("arg_start", m.arg_start),
        ("arg_end", m.arg_end),
        ("env_start", m.env_start),
        ("env_end", m.env_end),
    ];
    for (name, v) in fields {
        if v >= task_size || v < min_addr {
            return Err(bad(
                dir,
                format!(
                    "mm field {name} = {v:#x} is outside the user address space; the kernel would refuse it (PR_SET_MM_MAP)"
                ),
            ));
        }
    }
    let ordered = m.start_code < m.end_code
        && m.start_data <= m.end_data
        && m.start_brk <= m.brk
        && m.arg_start <= m.arg_end
        && m.env_start <= m.env_end;
    if !ordered {
        return Err(bad(
            dir,
            "mm fields out of order (code, data, brk, args or env ends before it starts); the kernel would refuse them (PR_SET_MM_MAP)",
        ));
    }
    let data_limit = rlimit_cur(nix::sys::resource::Resource::RLIMIT_DATA);
    let data = (m.brk - m.start_brk).saturating_add(m.end_data - m.start_data);
    if data > data_limit {
        return Err(bad(
            dir,
            format!(
                "the data segment and heap ({data} bytes) exceed this tern's RLIMIT_DATA ({data_limit}); the kernel would refuse them (PR_SET_MM_MAP)"
            ),
        ));
    }
    // The kernel keeps as many auxv words as it gives every process here.
    let host_auxv = std::fs::read("/proc/self/auxv").map_or(0, |a| a.len() / 8);
    if host_auxv > 0 && m.auxv.len() > host_auxv {
        return Err(bad(
            dir,
            format!(
                "the auxiliary vector has {} words; this kernel keeps {host_auxv}",
                m.auxv.len()
            ),
        ));
    }
    // (A deleted executable is made from the image.)
    if p.exe_unlinked.is_none() && !Path::new(&p.exe).is_file() {
        return Err(bad(
            dir,
            format!("the process's executable {} is not a file here", p.exe),
        ));
    }
    let nr_open = read_u64("/proc/sys/fs/nr_open").unwrap_or(1 << 20);
    for l in &p.rlimits {
        if l.resource == libc::RLIMIT_NOFILE && l.max != u64::MAX && l.max > nr_open {
            return Err(bad(
                dir,
                format!(
                    "RLIMIT_NOFILE {} exceeds this machine's fs.nr_open ({nr_open})",
                    l.max
                ),
            ));
        }
    }
    if let Some(f) = p.fds.iter().find(|f| f.info.fd as u64 >= nr_open) {
        return Err(bad(
            dir,
            format!(
                "fd {} is past this machine's fs.nr_open ({nr_open})",
                f.info.fd
            ),
        ));
    }
    let writable = |a: u64, len: u64| {
        vmas.iter()
            .any(|v| v.start <= a && a.saturating_add(len) <= v.end && v.perms.write)
    };
    for t in &p.threads {
        if t.robust_list != 0 && t.robust_list_len != 24 {
            return Err(bad(
                dir,
                format!(
                    "thread {}: a robust list head of {} bytes (the kernel takes 24)",
                    t.tid, t.robust_list_len
                ),
            ));
        }
        if let Some(r) = &t.rseq
            && (r.abi_pointer % 32 != 0 || !writable(r.abi_pointer, r.abi_size as u64))
        {
            return Err(bad(
                dir,
                format!(
                    "thread {}: its rseq area {:#x}+{} is not aligned or not in a writable VMA of the image",
                    t.tid, r.abi_pointer, r.abi_size
                ),
            ));
        }
    }
    Ok(())
}

/// The first address past user space here: x86_64 has 47 bits of it
/// (56 with 5-level page tables), arm64 48 (52 with LPA2 or 64 KiB pages).
fn host_task_size() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        let la57 = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .any(|l| l.starts_with("flags") && l.contains(" la57"))
        });
        if la57 {
            (1 << 56) - 4096
        } else {
            (1 << 47) - 4096
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        1 << 52
    }
}

fn rlimit_cur(res: nix::sys::resource::Resource) -> u64 {
    nix::sys::resource::getrlimit(res).map_or(u64::MAX, |(soft, _)| soft)
}

/// Restore the process whose final image is `dir`. Returns once every thread
/// runs; the process is a child of the caller.
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<Restored, RestoreError> {
    restore_prepared(dir, opts, Prepared::default())
}

/// [`restore`] with what was done ahead (see [`Prepared`]).
pub fn restore_prepared(
    dir: &Path,
    opts: &RestoreOptions,
    mut prepared: Prepared,
) -> Result<Restored, RestoreError> {
    let span = tracing::debug_span!("restore", dir = %dir.display(), pid = tracing::field::Empty);
    let _restore = span.enter();
    let t0 = Instant::now();
    // SIGTERM & co. from here until the process is whole kill what was
    // built (see `interrupt`).
    let guard = crate::interrupt::BuildGuard::arm();
    let plan = in_step(tracing::debug_span!("plan"), || {
        plan(
            dir,
            opts.lazy,
            opts.fill,
            opts.remote.as_ref(),
            &mut prepared,
        )
    })?;
    let pid = plan.process.pid;
    span.record("pid", pid);
    let mut main = None;
    let (child, wake) = match prepared.placeholder.take() {
        Some(mut p) if p.pid == pid => {
            main = p.main.take();
            (
                pid,
                p.wake
                    .take()
                    .expect("a placeholder holds its pipe until used"),
            )
        }
        _ => in_step(tracing::debug_span!("fork"), || spawn_with_pid(pid))?,
    };
    guard.set_child(child);
    let n0 = sys::inject::injected_syscalls();
    // The page service's map of the lazy pages is made on the other core
    // while the build waits on the process (it takes milliseconds for a
    // big chain, and the process's first faults would wait for it).
    let (res, map) = std::thread::scope(|sc| {
        let map = opts.lazy.then(|| {
            sc.spawn(|| {
                let t = Instant::now();
                let m = crate::lazy::LazyMap::of(&plan.chain);
                tracing::debug!(
                    runs = m.runs.len(),
                    "lazy map made in {:.1} ms",
                    t.elapsed().as_secs_f64() * 1e3
                );
                (m, crate::service::warm_buffers())
            })
        });
        let res = build(&plan, pid, opts, main);
        // The process runs from here (its threads were let go); the map
        // may still be in the making.
        let runs_at = t0.elapsed();
        (res.map(|r| (r, runs_at)), map.and_then(|h| h.join().ok()))
    });
    let res = res.map(|((pages, fill, handoff), runs_at)| {
        (
            pages,
            fill,
            handoff.map(|mut h| {
                if let Some((map, buffers)) = map {
                    h.map = Some(map);
                    h.buffers = buffers;
                }
                h
            }),
            runs_at,
        )
    });
    tracing::debug!(
        injected = sys::inject::injected_syscalls() - n0,
        "restore: syscalls injected"
    );
    drop(wake);
    match res {
        Ok((pages, fill, handoff, runs_at)) => {
            drop(guard);
            let report = RestoreReport {
                pid,
                restore_ms: runs_at.as_secs_f64() * 1e3,
                pages_restored: pages,
                threads: plan.process.threads.len(),
                vmas: plan.chain.vmas().len(),
                fill,
            };
            Ok(Restored {
                pid,
                report,
                lazy: handoff.map(|h| (plan.chain, h)),
            })
        }
        Err(e) => {
            // No half-restored process: it was killed as its tracers went
            // (PTRACE_O_EXITKILL); make sure, and reap it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Its threads first: one still traced by this tern is a zombie
            // until its tracer reaps it, and the process is not reaped
            // before all its threads are.
            let tids = plan.process.threads.iter().map(|t| t.tid);
            for tid in tids.filter(|&t| t != child).chain(std::iter::once(child)) {
                if !reap(tid, opts.timeout) {
                    tracing::warn!(
                        pid,
                        tid,
                        "the half-built process's thread {tid} was not reaped within {:?}",
                        opts.timeout
                    );
                }
            }
            drop(guard);
            Err(e)
        }
    }
}

/// Reap task `tid` (a thread of a process being killed, or the process)
/// if it is this tern's to reap; false if it is still there at the
/// deadline.
fn reap(tid: i32, timeout: Duration) -> bool {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(
            nix::unistd::Pid::from_raw(tid),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => {}
            // Reaped, or not ours (an untraced thread goes with its
            // process).
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => return true,
            // A stop or event of a traced thread on its way out.
            Ok(_) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Fork a child with PID `pid` that blocks reading a pipe (the returned
/// write end; dropping it would wake the child, which then exits). Its
/// first act is to ask for SIGKILL when tern dies.
/// Who keeps `pid` in use though no task has it: the kernel keeps a PID
/// while it names a process group or session (processes the original left
/// behind in its group or session, such as orphaned children).
fn pid_holder(pid: i32) -> String {
    let mut users = Vec::new();
    if let Ok(all) = procfs::process::all_processes() {
        for p in all.flatten() {
            if let Ok(st) = p.stat()
                && (st.pgrp == pid || st.session == pid)
            {
                users.push(format!(
                    "{} ({}) in its {}",
                    st.pid,
                    st.comm,
                    if st.session == pid {
                        "session"
                    } else {
                        "process group"
                    }
                ));
            }
        }
    }
    if users.is_empty() {
        "another task (it appeared after the check)".into()
    } else {
        format!(
            "no task, but it names the process group or session of {}: end those processes",
            users.join(", ")
        )
    }
}

fn spawn_with_pid(pid: i32) -> Result<(i32, OwnedFd), RestoreError> {
    let tern = nix::unistd::getpid().as_raw();
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step(pid, "pipe"))?;
    let tids = [pid];
    let args = sys::clone::CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork; the child only calls
    // async-signal-safe functions (read, _exit) before it is taken over.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const sys::clone::CloneArgs,
            std::mem::size_of::<sys::clone::CloneArgs>(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EEXIST) => RestoreError::PidTaken {
                pid,
                by: pid_holder(pid),
            },
            Some(libc::EPERM) => step::<String>(pid, "clone3 with set_tid")(
                "not permitted: restoring a PID needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN"
                    .into(),
            ),
            _ => step::<std::io::Error>(pid, "clone3 with set_tid")(e),
        });
    }
    if r == 0 {
        // The child: die with tern (a tern that died before this line
        // is caught by the parent check), then wait to be taken over.
        let mut b = [0u8; 1];
        // Every disposition back to the default (tern ignores SIGPIPE, std
        // catches SIGSEGV and SIGBUS): the restore then sets only the ones
        // the image has that are not the default, instead of injecting all
        // 64. Raw rt_sigaction with an all-zero kernel sigaction: glibc's
        // wrapper would add SA_RESTORER.
        let dfl = [0u64; 4];
        // SAFETY: prctl, getppid, getpid, kill, rt_sigaction from a local
        // buffer, read into a local buffer, _exit: all async-signal-safe.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            // tern gone already (or, below, its end of the pipe closed as it
            // exits, which can come before the parent-death signal): end as
            // that signal would, a half-built process killed.
            if libc::getppid() != tern {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        dfl.as_ptr(),
                        std::ptr::null_mut::<u64>(),
                        8,
                    );
                }
            }
            libc::read(rd.as_raw_fd(), b.as_mut_ptr().cast(), 1);
            libc::kill(libc::getpid(), libc::SIGKILL);
            libc::_exit(127);
        }
    }
    drop(rd);
    Ok((check_int(pid, "clone3 with set_tid", r)?, wr))
}

/// Wait until the new process (or thread `tid`) sleeps in its read. It gets
/// there within a few hundred microseconds: polled every 10 µs for the first
/// 2 ms (every millisecond of a restore counts, and a doubling nap would
/// overshoot by as much as it waited), then less.
fn blocks_in_time(pid: i32, tid: Option<i32>, deadline: Instant) -> bool {
    let t0 = Instant::now();
    let mut nap = Duration::from_micros(10);
    loop {
        if sys::proc::state(pid, tid) == Some('S') {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(nap);
        if t0.elapsed() > Duration::from_millis(2) {
            nap = (nap * 2).min(Duration::from_millis(1));
        }
    }
}

/// Steps 2-5. Returns the number of pages written, and for a lazy restore
/// what its page service needs.
fn build(
    plan: &Plan,
    pid: i32,
    opts: &RestoreOptions,
    started: Option<Injector>,
) -> Result<(u64, FillReport, Option<crate::service::Handoff>), RestoreError> {
    let p = &plan.process;
    let timeout = opts.timeout;
    let step_span = tracing::debug_span!("attach").entered();
    let mut main = match started {
        Some(m) => m,
        None => {
            // Wait until the child sits in its read (a seize before would
            // interrupt it elsewhere in its startup, also fine, but this
            // is tidier).
            if !blocks_in_time(pid, None, Instant::now() + timeout) {
                return Err(step::<&str>(pid, "starting the process")(
                    "it did not block in time",
                ));
            }
            Injector::attach_owned_thread_here(pid, pid, timeout)?
        }
    };
    // The scratch area goes where the image has nothing (and tern neither).
    let scratch_at = free_area(plan.chain.vmas(), pid, sys::inject::SCRATCH_LEN)?;
    main.set_scratch_hint(scratch_at)?;
    main.ensure_scratch(None)?;
    // The forked child inherited tern's rseq registration: dropped before
    // its memory goes (the first call of `address_space`), or the kernel
    // would write into unmapped memory.
    let inherited_rseq = main
        .on_tracer(sys::rseq::registration)?
        .map_err(step(pid, "reading the inherited rseq registration"))?;

    // Threads: cloned from the main thread, each with its TID.
    let step_span = next_step(step_span, || {
        tracing::debug_span!("threads", count = p.threads.len())
    });
    let mut others: Vec<(usize, Injector)> = Vec::new();
    for (i, t) in p.threads.iter().enumerate() {
        if t.tid == pid {
            continue;
        }
        let tid = clone_thread(&mut main, pid, t.tid)?;
        // It blocks in the read the main thread was held in.
        if !blocks_in_time(pid, Some(tid), Instant::now() + timeout) {
            return Err(step::<String>(pid, "creating a thread")(format!(
                "thread {tid} did not block"
            )));
        }
        others.push((i, Injector::attach_owned_thread_here(pid, tid, timeout)?));
    }

    // A chain a user could have written opens its files as the image's
    // user (see `trust`): groups and filesystem ids are taken now, the
    // rest of the credentials at the end.
    drop(step_span);
    if matches!(plan.writer, trust::Writer::User { .. }) {
        in_step(tracing::debug_span!("filesystem ids"), || {
            fs_ids_of_image(&plan.process.creds, &mut main, pid)
        })?;
    }

    // Address space.
    let t = Instant::now();
    let (pages, fill) = in_step(tracing::debug_span!("address space"), || {
        address_space(plan, &mut main, pid, scratch_at, inherited_rseq)
    })?;
    tracing::debug!(
        pid,
        "restore: address space and memory in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // Process-wide state.
    in_step(tracing::debug_span!("process state"), || {
        process_state(plan, &mut main, pid)
    })?;
    plan.unlinked.seal(pid)?;

    // Lazy: the process's userfaultfd, made now that its fds are in place
    // (and while it still has the credentials to ask for fork events).
    let mut lazy = if plan.lazy {
        Some(in_step(tracing::debug_span!("userfaultfd"), || {
            lazy_uffd(plan, &mut main, pid)
        })?)
    } else {
        None
    };

    // Per thread. The kernel writes each thread's rseq area as soon as it
    // is registered (and reads it on every return to user mode): in a lazy
    // restore, its page comes in now.
    if let Some(h) = &mut lazy {
        for t in &p.threads {
            if let Some(r) = &t.rseq {
                let (a, b) = (
                    r.abi_pointer & !(PAGE_SIZE - 1),
                    (r.abi_pointer + u64::from(r.abi_size)).next_multiple_of(PAGE_SIZE),
                );
                h.already_in.extend(fill_lazy_pages(plan, pid, a, b)?);
            }
        }
    }
    let main_idx = p
        .threads
        .iter()
        .position(|t| t.tid == pid)
        .expect("checked");
    in_step(tracing::debug_span!("thread state", tid = pid), || {
        thread_state(plan, main_idx, &mut main, pid)
    })?;
    for (i, inj) in others.iter_mut() {
        in_step(
            tracing::debug_span!("thread state", tid = p.threads[*i].tid),
            || {
                inj.ensure_scratch(Some(scratch_at))?;
                thread_state(plan, *i, inj, pid)?;
                inj.release_scratch()?;
                Ok(())
            },
        )?;
    }

    // Seccomp filters and credentials last. Filters first when the
    // injected calls bypass them (PTRACE_O_SUSPEND_SECCOMP): installing one
    // needs CAP_SYS_ADMIN or no_new_privs, and the process may have had
    // neither when it installed it as root before dropping privileges.
    let suspended = main.seccomp_suspended() && others.iter().all(|(_, i)| i.seccomp_suspended());
    let seccomp_step = |main: &mut Injector, others: &mut Vec<(usize, Injector)>| {
        in_step(tracing::debug_span!("seccomp"), || {
            seccomp(plan, main, others, pid, scratch_at)
        })
    };
    let creds_step = |main: &mut Injector, others: &mut Vec<(usize, Injector)>| {
        in_step(tracing::debug_span!("credentials"), || {
            creds(plan, main, others, pid, scratch_at)
        })
    };
    if suspended {
        seccomp_step(&mut main, &mut others)?;
        creds_step(&mut main, &mut others)?;
    } else {
        creds_step(&mut main, &mut others)?;
        seccomp_step(&mut main, &mut others)?;
    }

    // Scheduling last among the settings, from outside: a thread made
    // SCHED_IDLE or pinned to a busy CPU would slow the injections above.
    in_step(tracing::debug_span!("scheduling"), || scheduling(plan, pid))?;

    // Registers in; then the pending signals, queued by each thread to
    // itself: one that is not blocked is delivered right away, on the
    // dumped context (as it would have been); then scratch out, and go.
    let step_span = tracing::debug_span!("registers").entered();
    for (_, inj) in others.iter_mut() {
        inj.release_scratch()?;
    }
    let mut all: Vec<(usize, Injector)> = others;
    all.push((main_idx, main));
    for (i, inj) in all.iter_mut() {
        set_regs(&p.threads[*i], inj, pid)?;
    }
    let step_span = next_step(step_span, || tracing::debug_span!("pending signals"));
    for (i, inj) in all.iter_mut() {
        let t = &p.threads[*i];
        inj.ensure_scratch(Some(scratch_at))?;
        for s in &t.pending {
            let a = inj.scratch_data(&s.siginfo)?;
            let r = inj.syscall(
                libc::SYS_rt_tgsigqueueinfo,
                [pid as u64, t.tid as u64, s.signo as u64, a, 0, 0],
            )?;
            check(pid, "re-queueing a thread's pending signal", r)?;
        }
        if t.tid == pid {
            for s in &p.shared_pending {
                let a = inj.scratch_data(&s.siginfo)?;
                let r = inj.syscall(
                    libc::SYS_rt_sigqueueinfo,
                    [pid as u64, s.signo as u64, a, 0, 0, 0],
                )?;
                check(pid, "re-queueing a process-wide pending signal", r)?;
            }
        } else {
            inj.release_scratch()?;
        }
    }
    // Lazy: register the lazy memory last, once nothing of the build
    // touches it any more.
    if let Some(h) = &lazy {
        let _s = tracing::debug_span!("register lazy memory").entered();
        for v in plan.chain.vmas().iter().filter(|v| crate::lazy::is_lazy(v)) {
            let ioctls = h
                .uffd
                .register(v.start as *mut libc::c_void, sys::usize_of(v.end - v.start))
                .map_err(|e| RestoreError::Step {
                    pid,
                    step: "registering lazy memory with userfaultfd",
                    what: format!("{:#x}-{:#x}: {}", v.start, v.end, sys::uffd::uffd_errno(e)),
                })?;
            if !ioctls.contains(userfaultfd::IoctlFlags::COPY | userfaultfd::IoctlFlags::ZEROPAGE) {
                return Err(RestoreError::Step {
                    pid,
                    step: "registering lazy memory with userfaultfd",
                    what: format!(
                        "{:#x}-{:#x}: the kernel offers no UFFDIO_COPY/ZEROPAGE there ({ioctls:?})",
                        v.start, v.end
                    ),
                });
            }
        }
    }
    let step_span = next_step(step_span, || tracing::debug_span!("release"));
    let (_, main) = all.last_mut().expect("main is in the list");
    // Whole now: it no longer dies with tern.
    let r = main.syscall(
        libc::SYS_prctl,
        [libc::PR_SET_PDEATHSIG as u64, 0, 0, 0, 0, 0],
    )?;
    check(pid, "clearing the parent-death signal", r)?;
    main.remove_scratch()?;
    // Last, with nothing left that could fail but the detaches: the
    // process still dies with this tern (its tracers) until let go.
    if let Some(gate) = &opts.gate {
        let _s = tracing::debug_span!("gate").entered();
        (gate.go)(pid).map_err(|what| RestoreError::Step {
            pid,
            step: "waiting for the go to run it",
            what,
        })?;
    }
    // Every thread has its registers: let them all go.
    for (_, inj) in all {
        inj.detach()?;
    }
    if let Some(gate) = &opts.gate {
        (gate.released)(pid);
    }
    drop(step_span);
    Ok((pages, fill, lazy))
}

/// Features of a lazy restore's userfaultfd: the non-cooperative events,
/// so that the service follows fork, mremap, madvise and munmap.
const LAZY_FEATURES: u64 = sys::uffd::UFFD_FEATURE_EVENT_FORK
    | sys::uffd::UFFD_FEATURE_EVENT_REMAP
    | sys::uffd::UFFD_FEATURE_EVENT_REMOVE
    | sys::uffd::UFFD_FEATURE_EVENT_UNMAP;

/// Create the lazy restore's userfaultfd inside the process (its context
/// is the process's memory), keep the process's copy at a high fd number
/// (close-on-exec; see `service` for why it keeps one) and take tern's
/// with `pidfd_getfd`, handshaken for missing faults and the events.
fn lazy_uffd(
    plan: &Plan,
    main: &mut Injector,
    pid: i32,
) -> Result<crate::service::Handoff, RestoreError> {
    // The image's fds are all the process has now: the userfaultfd takes
    // the lowest number they leave free.
    let used: std::collections::BTreeSet<i32> =
        plan.process.fds.iter().map(|f| f.info.fd).collect();
    let fd = (0..).find(|n| !used.contains(n)).unwrap_or(0);
    // The highest fd number under its RLIMIT_NOFILE that the image does
    // not use: out of the way of the numbers a program hands out.
    let nofile = sys::proc::limits(pid)
        .ok()
        .and_then(|l| l.into_iter().find(|l| l.resource == libc::RLIMIT_NOFILE))
        .map_or(1024, |l| l.soft.min(1 << 20));
    let high = (0..i32::try_from(nofile).unwrap_or(1024))
        .rev()
        .find(|n| !used.contains(n) && *n != fd)
        .ok_or_else(|| RestoreError::Step {
            pid,
            step: "placing the userfaultfd",
            what: format!("no free fd number under its RLIMIT_NOFILE ({nofile})"),
        })?;
    let mut b = Batch::new(main)?;
    b.push(
        Syscall::new(
            libc::SYS_userfaultfd,
            [(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64, 0, 0, 0, 0, 0],
        ),
        move |r| {
            let got = check_int(pid, "userfaultfd(2) in the process", r)?;
            expect_fd(pid, "userfaultfd(2) in the process", got, fd)
        },
    );
    let high = if high > fd {
        b.checked(
            Syscall::new(
                libc::SYS_dup3,
                [fd as u64, high as u64, libc::O_CLOEXEC as u64, 0, 0, 0],
            ),
            "moving the userfaultfd to a high fd number",
        );
        b.push(
            Syscall::new(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]).may_fail(),
            |_| Ok(()),
        );
        high
    } else {
        fd
    };
    b.run(main, pid)?;
    let local =
        sys::fds::pidfd_getfd(pid, high).map_err(step(pid, "pidfd_getfd of the userfaultfd"))?;
    let (uffd, _) = sys::uffd::handshake(local, &[LAZY_FEATURES]).map_err(|e| {
        RestoreError::Step {
            pid,
            step: "UFFDIO_API for lazy pages",
            what: format!(
                "{e}: missing-page faults with fork, remap, remove and unmap events need Linux 4.11+ and CAP_SYS_PTRACE"
            ),
        }
    })?;
    Ok(crate::service::Handoff {
        pid,
        uffd,
        fd_in_process: high,
        already_in: Vec::new(),
        resumed: false,
        map: None,
        buffers: Vec::new(),
    })
}

/// Copy the chain's pages of `[start, end)` (page aligned) of lazy memory
/// in now, through /proc/PID/mem (the VMA may be read-only). Returns the
/// pages written.
fn fill_lazy_pages(plan: &Plan, pid: i32, start: u64, end: u64) -> Result<Vec<u64>, RestoreError> {
    use std::os::unix::fs::FileExt;
    let mut done = Vec::new();
    let Some(v) = plan
        .chain
        .vmas()
        .iter()
        .find(|v| v.start <= start && end <= v.end && crate::lazy::is_lazy(v))
    else {
        return Ok(done);
    };
    let data = plan
        .chain
        .read_range_cached(v, PageRange::new(start, end), &plan.blobs)?;
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(step(pid, "opening /proc/PID/mem"))?;
    mem.write_all_at(&data, start)
        .map_err(|e| RestoreError::Step {
            pid,
            step: "writing memory",
            what: format!("{start:#x}+{} through /proc/{pid}/mem: {e}", data.len()),
        })?;
    let mut a = start;
    while a < end {
        done.push(a);
        a += PAGE_SIZE;
    }
    Ok(done)
}

/// Each thread's policy, nice, priority, CPU affinity and I/O priority,
/// and the process's OOM score adjustment and core dump filter, set from
/// outside (tern may; `trust` has checked that a user's image asks for
/// nothing its user could not set). CPUs this host does not have leave the
/// thread free to run on any (a warning), as after a migration to a
/// smaller machine.
fn scheduling(plan: &Plan, pid: i32) -> Result<(), RestoreError> {
    for t in &plan.process.threads {
        let Some(s) = &t.sched else { continue };
        match sys::sched::apply(t.tid, &s.clone().into()) {
            Ok(()) => {}
            Err(e @ sys::sched::SchedError::NoCpus { .. }) => {
                tracing::warn!(pid, "restore: {e}");
            }
            Err(e) => return Err(step(pid, "setting a thread's scheduling")(e)),
        }
    }
    let p = &plan.process;
    if let Some(v) = p.oom_score_adj {
        write_proc(pid, "oom_score_adj", &v.to_string())?;
    }
    if let Some(v) = p.coredump_filter {
        write_proc(pid, "coredump_filter", &format!("{v:#x}"))?;
    }
    Ok(())
}

/// Write `value` to /proc/PID/NAME of the process being built.
fn write_proc(pid: i32, name: &'static str, value: &str) -> Result<(), RestoreError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/{pid}/{name}");
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| step(pid, name)(format!("writing {value} to {path}: {e}")))
}

/// Put bytes that point into themselves into the injector's scratch data
/// area: `build(addr)` makes them for the address they will have.
fn put(inj: &mut Injector, build: impl Fn(u64) -> Vec<u8>) -> Result<u64, RestoreError> {
    let at = inj.scratch_data(&[])?;
    let got = inj.scratch_data(&build(at))?;
    debug_assert_eq!(got, at);
    Ok(got)
}

/// A negative syscall result as the error it stands for.
fn os_error(r: i64) -> std::io::Error {
    match i32::try_from(-r) {
        Ok(errno) => std::io::Error::from_raw_os_error(errno),
        Err(_) => std::io::Error::other(format!("result {r}, no errno")),
    }
}

/// [`check`], then the result as an int (an fd, PID or TID).
fn check_int(pid: i32, what: &'static str, r: i64) -> Result<i32, RestoreError> {
    let r = check(pid, what, r)?;
    i32::try_from(r).map_err(|_| RestoreError::Step {
        pid,
        step: what,
        what: format!("the kernel returned {r}, not an int"),
    })
}

fn check(pid: i32, what: &'static str, r: i64) -> Result<i64, RestoreError> {
    if r < 0 {
        Err(RestoreError::Step {
            pid,
            step: what,
            what: format!("errno {} ({})", -r, os_error(r)),
        })
    } else {
        Ok(r)
    }
}

/// Syscalls injected together ([`Injector::syscall_batch`]: one ptrace
/// stop for all of them in the process being built, instead of two per
/// syscall), each with what to make of its result.
struct Batch<'c> {
    pid: i32,
    base: u64,
    calls: Vec<Syscall>,
    checks: Vec<ResultCheck<'c>>,
    data: Vec<u8>,
}

/// What a batched syscall's result means: an error, a warning, nothing.
type ResultCheck<'c> = Box<dyn FnOnce(i64) -> Result<(), RestoreError> + 'c>;

/// Data a batch carries at most (the rest of the slot's data area holds
/// its table).
const BATCH_DATA: usize = 4096;

impl<'c> Batch<'c> {
    fn new(inj: &mut Injector) -> Result<Batch<'c>, RestoreError> {
        Ok(Batch {
            pid: inj.pid(),
            base: inj.batch_data_addr()?,
            calls: Vec::new(),
            checks: Vec::new(),
            data: Vec::new(),
        })
    }

    /// Whether `len` more bytes of data fit (else [`Batch::run`] first).
    fn fits(&self, len: usize) -> bool {
        self.data.len().next_multiple_of(16) + len <= BATCH_DATA
    }

    /// Put `bytes` in the batch's data; their address in the process.
    fn data(&mut self, bytes: &[u8]) -> u64 {
        let off = self.data.len().next_multiple_of(16);
        self.data.resize(off, 0);
        self.data.extend_from_slice(bytes);
        self.base + off as u64
    }

    /// `s` NUL-terminated in the batch's data; its address.
    fn cstr(&mut self, s: &str) -> u64 {
        let mut c = s.as_bytes().to_vec();
        c.push(0);
        self.data(&c)
    }

    /// Add `call`; `check` turns its result into an error (or a warning,
    /// for a call marked may-fail).
    fn push(&mut self, call: Syscall, check: impl FnOnce(i64) -> Result<(), RestoreError> + 'c) {
        self.calls.push(call);
        self.checks.push(Box::new(check));
    }

    /// Add `call`; a failure is the error of step `what`.
    fn checked(&mut self, call: Syscall, what: &'static str) {
        let pid = self.pid;
        self.push(call, move |r| check(pid, what, r).map(|_| ()));
    }

    /// Run what was added, check each result; the batch is then empty
    /// (its data too). Returns the results.
    fn run(&mut self, inj: &mut Injector, pid: i32) -> Result<Vec<i64>, RestoreError> {
        let calls = std::mem::take(&mut self.calls);
        let checks = std::mem::take(&mut self.checks);
        let data = std::mem::take(&mut self.data);
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let nrs: Vec<i64> = calls.iter().map(|c| c.nr).collect();
        let n = calls.len();
        let results = inj.syscall_batch(calls, data)?;
        for (check, &r) in checks.into_iter().zip(&results) {
            check(r)?;
        }
        if results.len() < n {
            // The check of the call that ended the batch did not say why.
            let k = results.len().saturating_sub(1);
            return Err(RestoreError::Step {
                pid,
                step: "injecting a batch of syscalls",
                what: format!(
                    "syscall {} failed: {}",
                    nrs[k],
                    os_error(results.last().copied().unwrap_or(0))
                ),
            });
        }
        Ok(results)
    }
}

/// Final registers (general via the injector, which puts them back at
/// detach; FPU/xsave and the rest through the regsets), then detach.
fn set_regs(
    t: &images::process::ThreadImage,
    inj: &mut Injector,
    pid: i32,
) -> Result<(), RestoreError> {
    let regs = sys::regs::ThreadRegs::from(t.regs.clone());
    #[cfg(target_arch = "x86_64")]
    let gp = regs.gp_x86();
    #[cfg(target_arch = "aarch64")]
    let gp = regs.gp_arm64();
    inj.on_tracer(move |tid| regs.apply(tid))?
        .map_err(step(pid, "setting FPU/xsave registers"))?;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let gp: Option<()> = None;
    let gp = gp.ok_or_else(|| {
        step::<String>(pid, "general registers")(format!(
            "thread {}: the image holds {} registers; this tern restores {} ones",
            t.tid,
            t.regs.arch,
            std::env::consts::ARCH
        ))
    })?;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    inj.set_original_regs(gp)?;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = gp;
    Ok(())
}

/// clone3(CLONE_VM | CLONE_THREAD | ..., set_tid = [tid]) in the main thread.
fn clone_thread(main: &mut Injector, pid: i32, tid: i32) -> Result<i32, RestoreError> {
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    // struct clone_args (include/uapi/linux/sched.h, 88 bytes), then the
    // one-element set_tid array it points at.
    let addr = put(main, |at| {
        let mut b = sys::clone::CloneArgs {
            flags,
            set_tid: at + sys::clone::CloneArgs::SIZE as u64,
            set_tid_size: 1,
            ..Default::default()
        }
        .to_bytes();
        b.extend_from_slice(&tid.to_ne_bytes());
        b
    })?;
    let r = main.syscall(
        libc::SYS_clone3,
        [addr, sys::clone::CloneArgs::SIZE as u64, 0, 0, 0, 0],
    )?;
    if r == -(libc::EEXIST as i64) {
        return Err(RestoreError::PidTaken {
            pid: tid,
            by: "another task".into(),
        });
    }
    check(pid, "clone3 of a thread", r)?;
    if r != i64::from(tid) {
        return Err(step::<String>(pid, "clone3 of a thread")(format!(
            "got TID {r}, wanted {tid}"
        )));
    }
    Ok(tid)
}

/// An address range of the scratch area's size free in the image and in the
/// child now.
fn free_area(vmas: &[VmaRecord], pid: i32, len: u64) -> Result<u64, RestoreError> {
    let mut taken: Vec<(u64, u64)> = vmas.iter().map(|v| (v.start, v.end)).collect();
    let maps = sys::proc::map_ranges(pid).map_err(step(pid, "reading maps"))?;
    taken.extend(maps);
    taken.sort_unstable();
    // Below the lowest mapping above 4 GiB, a gap of 1 MiB on each side.
    let gap = 1 << 20;
    let mut cand = 0x1_0000_0000u64;
    for &(a, b) in &taken {
        if b + gap <= cand {
            continue;
        }
        if cand + len + gap <= a {
            return Ok(cand);
        }
        cand = cand.max((b + gap + 0xfff) & !0xfff);
    }
    if cand + len < 0x7fff_0000_0000 {
        return Ok(cand);
    }
    Err(step::<&str>(pid, "choosing a scratch address")(
        "no free address range",
    ))
}

fn is_special(v: &VmaRecord) -> bool {
    matches!(
        v.name.as_deref(),
        Some("[vdso]") | Some("[vvar]") | Some("[vvar_vclock]") | Some("[vsyscall]")
    )
}

/// tern's scratch area, recorded by dumps made before it was left out.
fn is_scratch(v: &VmaRecord) -> bool {
    v.name.as_deref() == Some("[anon:tern-scratch]")
}

/// VmFlags that say nothing about how a VMA was made or advised: soft-dirty
/// and userfaultfd registrations (tern's own tracking, undone by a restore).
fn transient_flag(f: &str) -> bool {
    matches!(f, "sd" | "um" | "uw" | "ui")
}

/// How one VMA is recreated from its VmFlags (`/proc/PID/smaps`).
#[derive(Debug, Clone, Default)]
struct MapPlan {
    /// Protection at mmap: the final one, plus PROT_WRITE where the
    /// original was accounted writable (`ac`: written or writable once,
    /// then made read-only) or where the legacy image has no flags.
    map_prot: u64,
    /// Protection at the end.
    prot: u64,
    /// MAP_GROWSDOWN, MAP_NORESERVE, MAP_DROPPABLE (instead of MAP_PRIVATE).
    map_flags: u64,
    /// madvise advice to apply, in order.
    advice: Vec<(i32, &'static str)>,
    /// mlock2 flags when the VMA was locked (`lo`; MLOCK_ONFAULT for `lf`).
    mlock: Option<u64>,
    seal: bool,
    /// A shared file mapping that could be made writable (`mw`): its file
    /// is opened read-write.
    may_write_shared: bool,
}

/// MAP_DROPPABLE (Linux 6.11), a mapping type of its own.
const MAP_DROPPABLE: u64 = 0x08;
/// PROT_BTI (arm64 branch target identification, `bt`).
#[cfg(target_arch = "aarch64")]
const PROT_BTI: u64 = 0x10;

impl MapPlan {
    fn of(v: &VmaRecord) -> MapPlan {
        let has = |f: &str| v.vm_flags.iter().any(|g| g == f);
        #[allow(unused_mut)]
        let mut prot = u64::from(v.perms.prot().cast_unsigned());
        #[cfg(target_arch = "aarch64")]
        if has("bt") {
            prot |= PROT_BTI;
        }
        let w = libc::PROT_WRITE as u64;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let map_prot = if v.vm_flags.is_empty() {
            // An image without VmFlags: as before, writable for the fill.
            if v.is_private() || v.dumped { rw } else { prot }
        } else if v.is_private() {
            if has("ac") { prot | w } else { prot }
        } else if v.dumped {
            // Shared anonymous memory is filled through the mapping
            // (FOLL_FORCE does not write into shared mappings).
            prot | w
        } else {
            prot
        };
        let mut map_flags = 0;
        if has("gd") {
            map_flags |= libc::MAP_GROWSDOWN as u64;
        }
        if has("nr") {
            map_flags |= libc::MAP_NORESERVE as u64;
        }
        let mut advice = Vec::new();
        for (flag, adv, name) in [
            ("dd", libc::MADV_DONTDUMP, "MADV_DONTDUMP"),
            ("dc", libc::MADV_DONTFORK, "MADV_DONTFORK"),
            ("wf", libc::MADV_WIPEONFORK, "MADV_WIPEONFORK"),
            ("hg", libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
            ("nh", libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"),
            ("mg", libc::MADV_MERGEABLE, "MADV_MERGEABLE"),
            ("sr", libc::MADV_SEQUENTIAL, "MADV_SEQUENTIAL"),
            ("rr", libc::MADV_RANDOM, "MADV_RANDOM"),
        ] {
            if has(flag) {
                advice.push((adv, name));
            }
        }
        MapPlan {
            map_prot,
            prot,
            map_flags,
            advice,
            mlock: has("lo").then_some(if has("lf") {
                1 /* MLOCK_ONFAULT */
            } else {
                0
            }),
            seal: has("sl"),
            may_write_shared: !v.is_private() && has("mw"),
        }
        .droppable(has("dp"))
    }

    fn droppable(mut self, dp: bool) -> MapPlan {
        if dp {
            self.map_flags |= MAP_DROPPABLE;
        }
        self
    }

    fn map_type(&self, v: &VmaRecord) -> u64 {
        if self.map_flags & MAP_DROPPABLE != 0 {
            0
        } else if v.is_private() {
            libc::MAP_PRIVATE as u64
        } else {
            libc::MAP_SHARED as u64
        }
    }
}

/// Whether the kernel would merge `v`, mapped right after `prev`, into it:
/// the original kept them as two VMAs (another anon_vma, another page
/// offset), which a plain mmap does not reproduce.
fn would_merge(prev: &VmaRecord, v: &VmaRecord) -> bool {
    if prev.end != v.start || !prev.is_private() || !v.is_private() || prev.perms != v.perms {
        return false;
    }
    fn flags(r: &VmaRecord) -> Vec<&str> {
        let mut f: Vec<&str> = r
            .vm_flags
            .iter()
            .map(String::as_str)
            .filter(|f| !transient_flag(f))
            .collect();
        f.sort_unstable();
        f
    }
    if flags(prev) != flags(v) || v.vm_flags.iter().any(|f| f == "gd") {
        return false;
    }
    match (prev.backing_file(), v.backing_file()) {
        (None, None) => prev.name == v.name,
        (Some(a), Some(b)) => a == b && prev.offset + (prev.end - prev.start) == v.offset,
        _ => false,
    }
}

/// The files the VMAs map, opened in the target once each (a library maps
/// four or five VMAs of one file): path and open mode -> fd there.
#[derive(Default)]
struct MappedFiles(HashMap<(String, i32), i32>);

impl MappedFiles {
    /// Open every file of `wanted` (path, mode), in as few batches as their
    /// paths fit in.
    fn open<'a>(
        main: &mut Injector,
        pid: i32,
        wanted: impl Iterator<Item = (Cow<'a, str>, i32)>,
    ) -> Result<MappedFiles, RestoreError> {
        let mut keys: Vec<(String, i32)> = Vec::new();
        for (path, mode) in wanted {
            if !keys.iter().any(|(p, m)| *p == path && *m == mode) {
                keys.push((path.into_owned(), mode));
            }
        }
        let mut files = MappedFiles::default();
        let mut b = Batch::new(main)?;
        let mut queued: Vec<(String, i32)> = Vec::new();
        for (k, (path, mode)) in keys.iter().enumerate() {
            let a = b.cstr(path);
            let p = path.clone();
            b.push(
                Syscall::new(
                    libc::SYS_openat,
                    [
                        libc::AT_FDCWD as u64,
                        a,
                        (mode | libc::O_CLOEXEC) as u64,
                        0,
                        0,
                        0,
                    ],
                ),
                move |r| opened(pid, "opening a file", &p, r).map(|_| ()),
            );
            queued.push((path.clone(), *mode));
            let last = k + 1 == keys.len();
            if last || !b.fits(keys[k + 1].0.len() + 1) {
                let fds = b.run(main, pid)?;
                for (key, fd) in queued.drain(..).zip(fds) {
                    files.0.insert(key, check_int(pid, "opening a file", fd)?);
                }
            }
        }
        Ok(files)
    }

    fn fd(&self, path: &str, mode: i32) -> Option<i32> {
        self.0.get(&(path.to_string(), mode)).copied()
    }

    /// Each file the process opened is the inode the plan checked
    /// (`checked`: path -> (device, inode)): a path replaced in between
    /// would slip another file past [`check_mapped_files`].
    fn same_inodes(
        &self,
        pid: i32,
        checked: &HashMap<String, (u64, u64)>,
    ) -> Result<(), RestoreError> {
        use std::os::unix::fs::MetadataExt;
        for ((path, _), fd) in &self.0 {
            let Some(&want) = checked.get(path) else {
                continue;
            };
            let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .map_err(|e| step::<String>(pid, "mapping")(format!("{path} (fd {fd}): {e}")))?;
            if (m.dev(), m.ino()) != want {
                return Err(step::<String>(pid, "mapping")(format!(
                    "{path} was replaced while the process was being built (another inode than the one checked against the dump); restore again"
                )));
            }
        }
        Ok(())
    }

    /// Close them all in the target.
    fn close(self, main: &mut Injector) -> Result<(), RestoreError> {
        let calls = self
            .0
            .into_values()
            .map(|fd| (libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]))
            .collect();
        main.syscalls(calls)?;
        Ok(())
    }
}

/// The file `v` maps and the mode to open it with (the access the
/// original mapping had); None for anonymous memory.
fn mapped_file<'v>(
    plan: &Plan,
    pid: i32,
    v: &'v VmaRecord,
    m: &MapPlan,
) -> Result<Option<(Cow<'v, str>, i32)>, RestoreError> {
    // A memfd or deleted file: the one made again, through tern's fd.
    let file = match v.unlinked_key() {
        Some(key) => Some(Cow::Owned(
            plan.unlinked.path(key).map(str::to_string).ok_or_else(|| {
                step::<String>(pid, "mapping")(format!(
                    "VMA {:#x}-{:#x}: {:?} was not made again",
                    v.start, v.end, v.name
                ))
            })?,
        )),
        None => v
            .backing_file()
            .filter(|_| !v.dumped || v.is_private())
            .map(Cow::Borrowed),
    };
    match (v.is_private(), file) {
        (true, Some(path)) => Ok(Some((path, libc::O_RDONLY))),
        (_, None) if v.is_private() || v.dumped => Ok(None),
        (false, Some(path)) => {
            let mode = if v.perms.write || m.may_write_shared {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            Ok(Some((path, mode)))
        }
        (_, None) => Err(step::<String>(pid, "mapping")(format!(
            "VMA {:#x}-{:#x} ({:?}) is shared with no backing in the image",
            v.start, v.end, v.name
        ))),
    }
}

/// Add to `b` the mmap of `v` at `at` as `m` says, from its file opened in
/// `files` (see [`mapped_file`]).
fn map_vma(
    plan: &Plan,
    b: &mut Batch<'_>,
    files: &MappedFiles,
    pid: i32,
    v: &VmaRecord,
    m: &MapPlan,
    at: u64,
) -> Result<(), RestoreError> {
    let len = v.end - v.start;
    let flags = m.map_type(v) | m.map_flags | libc::MAP_FIXED as u64;
    let args = match mapped_file(plan, pid, v, m)? {
        Some((path, mode)) => {
            let fd = files
                .fd(&path, mode)
                .ok_or_else(|| step::<String>(pid, "mapping")(format!("{path} was not opened")))?;
            [at, len, m.map_prot, flags, fd as u64, v.offset]
        }
        None => [
            at,
            len,
            m.map_prot,
            flags | libc::MAP_ANONYMOUS as u64,
            u64::MAX,
            0,
        ],
    };
    let what = format!(
        "{:#x}-{:#x} {} {} {:?}",
        v.start,
        v.end,
        v.perms,
        v.name.as_deref().unwrap_or(""),
        v.vm_flags
    );
    b.push(Syscall::new(libc::SYS_mmap, args), move |r| {
        if r as u64 == at {
            return Ok(());
        }
        Err(RestoreError::Step {
            pid,
            step: "mapping the image's VMAs",
            what: format!(
                "{what}: {}",
                if r < 0 {
                    os_error(r).to_string()
                } else {
                    format!("mapped at {r:#x}")
                }
            ),
        })
    });
    Ok(())
}

/// Give the VMA at `at` an anon_vma without leaving a page in it: write a
/// zero byte into its first page (FOLL_FORCE) now, and add to `b` the
/// madvise that drops the page.
fn give_anon_vma(b: &mut Batch<'_>, pid: i32, at: u64) -> Result<(), RestoreError> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(step(pid, "opening /proc/PID/mem"))?;
    let mut byte = [0u8; 1];
    // A file-backed page reads from the file first: write back what is there.
    let _ = mem.read_exact_at(&mut byte, at);
    mem.write_all_at(&byte, at).map_err(step(
        pid,
        "touching a VMA to keep it apart from its neighbour",
    ))?;
    b.checked(
        Syscall::new(
            libc::SYS_madvise,
            [at, PAGE_SIZE, libc::MADV_DONTNEED as u64, 0, 0, 0],
        ),
        "dropping the page that kept a VMA apart",
    );
    Ok(())
}

fn check_vma(pid: i32, v: &VmaRecord, what: &str, r: i64) -> Result<(), RestoreError> {
    if r < 0 {
        return Err(RestoreError::Step {
            pid,
            step: "re-applying a VMA's state",
            what: format!(
                "{what} on {:#x}-{:#x} {} {}: {}",
                v.start,
                v.end,
                v.perms,
                v.name.as_deref().unwrap_or(""),
                os_error(r)
            ),
        });
    }
    Ok(())
}

/// Add to `b` what gives `v` its madvise state, final protection, locks
/// and name (`b` runs first if the name does not fit in it).
fn finish_vma<'c>(
    b: &mut Batch<'c>,
    main: &mut Injector,
    pid: i32,
    v: &'c VmaRecord,
    m: &MapPlan,
) -> Result<(), RestoreError> {
    let len = v.end - v.start;
    for &(adv, name) in &m.advice {
        b.push(
            Syscall::new(libc::SYS_madvise, [v.start, len, adv as u64, 0, 0, 0]),
            move |r| check_vma(pid, v, name, r),
        );
    }
    if m.map_prot != m.prot {
        b.push(
            Syscall::new(libc::SYS_mprotect, [v.start, len, m.prot, 0, 0, 0]),
            move |r| check_vma(pid, v, "mprotect", r),
        );
    }
    if let Some(flags) = m.mlock {
        b.push(
            Syscall::new(libc::SYS_mlock2, [v.start, len, flags, 0, 0, 0]),
            move |r| check_vma(pid, v, "mlock2", r),
        );
    }
    if let Some(name) = anon_name(v) {
        // PR_SET_VMA / PR_SET_VMA_ANON_NAME (include/uapi/linux/prctl.h).
        const PR_SET_VMA: u64 = 0x5356_4d41;
        if !b.fits(name.len() + 1) {
            b.run(main, pid)?;
        }
        let a = b.cstr(name);
        b.push(
            Syscall::new(libc::SYS_prctl, [PR_SET_VMA, 0, v.start, len, a, 0]).may_fail(),
            move |r| {
                if r == -i64::from(libc::EINVAL) {
                    // A kernel without CONFIG_ANON_VMA_NAME: the mapping is
                    // whole, only its name in /proc/PID/maps is missing.
                    tracing::warn!(
                        pid,
                        "restore: {:#x}-{:#x} cannot be named {name:?} here (PR_SET_VMA_ANON_NAME: this kernel lacks CONFIG_ANON_VMA_NAME)",
                        v.start,
                        v.end
                    );
                    return Ok(());
                }
                check_vma(pid, v, "PR_SET_VMA_ANON_NAME", r)
            },
        );
    }
    Ok(())
}

/// The name userspace gave an anonymous VMA (`[anon:NAME]`, or
/// `[anon_shmem:NAME]` for shared anonymous memory).
fn anon_name(v: &VmaRecord) -> Option<&str> {
    let n = v.name.as_deref()?;
    n.strip_prefix("[anon:")
        .or_else(|| n.strip_prefix("[anon_shmem:"))?
        .strip_suffix(']')
}

/// Add to `b` the process's THP and KSM settings (prctl).
fn process_mm_flags(b: &mut Batch<'_>, p: &ProcessImage) {
    const PR_SET_THP_DISABLE: u64 = 41;
    const PR_THP_DISABLE_EXCEPT_ADVISED: u64 = 1 << 1;
    const PR_SET_MEMORY_MERGE: u64 = 67;
    if let Some(t) = p.thp_disable {
        let flags = if t & 2 != 0 {
            PR_THP_DISABLE_EXCEPT_ADVISED
        } else {
            0
        };
        b.checked(
            Syscall::new(libc::SYS_prctl, [PR_SET_THP_DISABLE, 1, flags, 0, 0, 0]),
            "PR_SET_THP_DISABLE",
        );
    }
    if p.memory_merge {
        b.checked(
            Syscall::new(libc::SYS_prctl, [PR_SET_MEMORY_MERGE, 1, 0, 0, 0, 0]),
            "PR_SET_MEMORY_MERGE",
        );
    }
}

/// Write all of `data` at once into the pipe or FIFO `fd`, sized for it
/// beforehand (`what` prefixes the error: the FIFO's path).
fn refill(
    pid: i32,
    step: &'static str,
    what: &str,
    fd: &impl std::os::fd::AsFd,
    data: &[u8],
) -> Result<(), RestoreError> {
    match nix::unistd::write(fd, data) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(n) => Err(RestoreError::Step {
            pid,
            step,
            what: format!("{what}wrote {n} of {} bytes", data.len()),
        }),
        Err(e) => Err(RestoreError::Step {
            pid,
            step,
            what: format!("{what}writing {} bytes: {e}", data.len()),
        }),
    }
}

/// The fd an injected open of `path` returned, or the error naming it.
fn opened(pid: i32, step: &'static str, path: &str, r: i64) -> Result<i32, RestoreError> {
    if r < 0 {
        return Err(RestoreError::Step {
            pid,
            step,
            what: format!("{path}: {}", os_error(r)),
        });
    }
    check_int(pid, step, r)
}

/// Whether the bytes of `v` are the chain's data pages alone (no file
/// beneath its holes): the eager fill puts them in (see `fill`).
pub(crate) fn eager_copied(v: &VmaRecord) -> bool {
    !(v.is_private() && v.backing_file().is_some())
}

/// Whether the eager fill puts the pages of `v` in (see `fill`).
fn eager_filled(v: &VmaRecord, lazy: bool) -> bool {
    !is_special(v)
        && !is_scratch(v)
        && v.dumped
        && eager_copied(v)
        && !(lazy && crate::lazy::is_lazy(v))
}

/// Fill each VMA of `items`, mapped at its address, from the image (not
/// its lazy pages); the pages each got.
fn fill_vmas(
    plan: &Plan,
    eager: &mut EagerFill,
    pid: i32,
    items: &[(&VmaRecord, &MapPlan, u64)],
) -> Result<Vec<u64>, RestoreError> {
    let mut pages = vec![0u64; items.len()];
    let mut targets = Vec::new();
    let mut which = Vec::new();
    for (k, &(v, m, at)) in items.iter().enumerate() {
        if !v.dumped || (plan.lazy && crate::lazy::is_lazy(v)) {
            continue;
        }
        let writable = m.map_prot & libc::PROT_WRITE as u64 != 0;
        if eager_copied(v) {
            targets.push(crate::fill::Target {
                start: v.start,
                end: v.end,
                at,
                writable,
            });
            which.push(k);
            continue;
        }
        // Per VMA: at trace level, not to flood a debug log.
        pages[k] = in_step(tracing::trace_span!("fill", start = v.start), || {
            fill(plan, v, pid, at, writable)
        })?;
    }
    let got = eager.fill(&plan.chain, &targets)?;
    for (k, n) in which.into_iter().zip(got) {
        pages[k] = n;
    }
    Ok(pages)
}

/// Fill the VMAs `batch` (indices in `vmas`), mapped in place; the pages
/// written. The kernel drops VM_ACCOUNT when an anonymous VMA without an
/// anon_vma (no page ever in it) is made read-only: one the original had
/// written (`ac`), left empty here (lazy, or holes only), gets its anon_vma
/// before `finish` takes PROT_WRITE away.
fn fill_mapped(
    plan: &Plan,
    eager: &mut EagerFill,
    finish: &mut Batch<'_>,
    pid: i32,
    vmas: &[&VmaRecord],
    plans: &[MapPlan],
    batch: &[usize],
) -> Result<u64, RestoreError> {
    let items: Vec<(&VmaRecord, &MapPlan, u64)> = batch
        .iter()
        .map(|&i| (vmas[i], &plans[i], vmas[i].start))
        .collect();
    let filled = fill_vmas(plan, eager, pid, &items)?;
    for (&(v, m, _), &n) in items.iter().zip(&filled) {
        let keeps_account = m.map_prot != m.prot && v.is_private() && v.backing_file().is_none();
        if n == 0 && keeps_account {
            give_anon_vma(finish, pid, v.start)?;
        }
    }
    Ok(filled.iter().sum())
}

/// A userfaultfd of process `pid`'s memory for the eager fill: made inside
/// the process (its context is the process's memory), taken with
/// `pidfd_getfd` and closed there. None (logged) where the kernel will not:
/// the fill then writes every page with `process_vm_writev`.
fn fill_uffd(main: &mut Injector, pid: i32) -> Result<Option<userfaultfd::Uffd>, RestoreError> {
    let r = main.syscall(
        libc::SYS_userfaultfd,
        [(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64, 0, 0, 0, 0, 0],
    )?;
    let Ok(fd) = i32::try_from(r) else {
        tracing::debug!(pid, error = %os_error(r), "no userfaultfd for the fill");
        return Ok(None);
    };
    if fd < 0 {
        tracing::debug!(pid, error = %os_error(r), "no userfaultfd for the fill");
        return Ok(None);
    }
    let local = sys::fds::pidfd_getfd(pid, fd);
    let r = main.syscall(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
    check(pid, "closing the fill's userfaultfd in the process", r)?;
    let local = local.map_err(step(pid, "pidfd_getfd of the fill's userfaultfd"))?;
    match sys::uffd::handshake(local, &[0]) {
        Ok((uffd, _)) => Ok(Some(uffd)),
        Err(e) => {
            tracing::debug!(pid, error = %e, "no userfaultfd for the fill");
            Ok(None)
        }
    }
}

/// Step 3: tern's memory out, the image's in. Returns pages written.
fn address_space(
    plan: &Plan,
    main: &mut Injector,
    pid: i32,
    scratch: u64,
    inherited_rseq: Option<sys::rseq::RseqRegistration>,
) -> Result<(u64, FillReport), RestoreError> {
    let p = &plan.process;
    // 1. Unmap everything but the scratch area and the vDSO areas.
    let here = sys::vdso::VdsoLayout::of_pid(pid).map_err(step(pid, "reading the vDSO"))?;
    let keep: Vec<(u64, u64)> = [here.vdso, here.vvar, here.vvar_vclock]
        .into_iter()
        .flatten()
        .chain(std::iter::once((
            scratch,
            scratch + sys::inject::SCRATCH_LEN,
        )))
        .collect();
    let maps = sys::proc::map_ranges(pid).map_err(step(pid, "reading maps"))?;
    let unmap = unmap_ranges(
        maps.into_iter().filter(|&(a, _)| a < 0xffff_ffff_ff60_0000),
        &keep,
    );
    let mut b = Batch::new(main)?;
    if let Some(reg) = inherited_rseq {
        b.checked(
            Syscall::new(
                libc::SYS_rseq,
                [
                    reg.abi_pointer,
                    reg.abi_size as u64,
                    1, /* RSEQ_FLAG_UNREGISTER */
                    reg.signature as u64,
                    0,
                    0,
                ],
            ),
            "unregistering the inherited rseq area",
        );
    }
    for &(a, e) in &unmap {
        b.checked(
            Syscall::new(libc::SYS_munmap, [a, e - a, 0, 0, 0, 0]),
            "unmapping tern's memory",
        );
    }
    // 2. The vDSO where the image had it.
    let moves = sys::vdso::placement_moves(&here, &p.vdso.clone().into())
        .map_err(step(pid, "placing the vDSO"))?;
    for m in moves {
        b.checked(
            Syscall::new(
                libc::SYS_mremap,
                [
                    m.from,
                    m.len,
                    m.len,
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    m.to,
                    0,
                ],
            ),
            "moving the vDSO",
        );
    }
    b.run(main, pid)?;
    // 3. Every VMA, as the kernel had it: mapped with the flags it was made
    //    with, filled, then given its madvise state, protection, locks and
    //    seal (see `MapPlan`).
    let mut pages = 0u64;
    let vmas: Vec<&VmaRecord> = plan
        .chain
        .vmas()
        .iter()
        .filter(|v| !is_special(v) && !is_scratch(v))
        .collect();
    let plans: Vec<MapPlan> = vmas.iter().map(|v| MapPlan::of(v)).collect();
    let uffd = if vmas.iter().all(|v| !eager_filled(v, plan.lazy)) || plan.fill == FillMode::Write {
        None
    } else {
        fill_uffd(main, pid)?
    };
    let mut eager = EagerFill::new(pid, uffd, &plan.fill_source);
    let wanted = vmas
        .iter()
        .zip(&plans)
        .map(|(v, m)| mapped_file(plan, pid, v, m))
        .collect::<Result<Vec<_>, _>>()?;
    // The executable too, for PR_SET_MM_MAP (often one of them already).
    let exe_path = match p.exe_unlinked {
        Some(k) => plan.unlinked.path(k).ok_or_else(|| {
            step::<String>(pid, "PR_SET_MM_MAP")(format!("{} was not made again", p.exe))
        })?,
        None => p.exe.as_str(),
    };
    let exe = (exe_path, libc::O_RDONLY);
    let files = MappedFiles::open(
        main,
        pid,
        wanted
            .into_iter()
            .flatten()
            .chain(std::iter::once((Cow::Borrowed(exe.0), exe.1))),
    )?;
    files.same_inodes(pid, &plan.mapped_inodes)?;
    // The mmaps go in batches; each VMA is filled once its mmap ran. What
    // comes after the last fill (madvise, protection, locks, names, seals)
    // is one more batch.
    let mut maps = Batch::new(main)?;
    let mut mapped: Vec<usize> = Vec::new();
    let mut finish = Batch::new(main)?;
    for (k, v) in vmas.iter().enumerate() {
        let m = &plans[k];
        // A neighbour the kernel would merge it with, though the original
        // kept them apart: map and fill it elsewhere, then move it in place
        // (its anon_vma and page offset then keep it apart).
        let prev = k.checked_sub(1).map(|i| vmas[i]);
        if !prev.is_some_and(|p| would_merge(p, v)) {
            map_vma(plan, &mut maps, &files, pid, v, m, v.start)?;
            mapped.push(k);
            continue;
        }
        maps.run(main, pid)?;
        pages += fill_mapped(plan, &mut eager, &mut finish, pid, &vmas, &plans, &mapped)?;
        mapped.clear();
        let at = free_area(plan.chain.vmas(), pid, v.end - v.start)?;
        let mut one = Batch::new(main)?;
        map_vma(plan, &mut one, &files, pid, v, m, at)?;
        one.run(main, pid)?;
        let filled = fill_vmas(plan, &mut eager, pid, &[(v, m, at)])?[0];
        pages += filled;
        if filled == 0 {
            give_anon_vma(&mut one, pid, at)?;
        }
        let len = v.end - v.start;
        one.checked(
            Syscall::new(
                libc::SYS_mremap,
                [
                    at,
                    len,
                    len,
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    v.start,
                    0,
                ],
            ),
            "moving a VMA next to its neighbour",
        );
        one.run(main, pid)?;
    }
    maps.run(main, pid)?;
    pages += fill_mapped(plan, &mut eager, &mut finish, pid, &vmas, &plans, &mapped)?;
    tracing::debug!(pid, fill = ?eager.report, "memory filled");
    let fill = eager.report.clone();
    drop(eager);
    for (v, m) in vmas.iter().zip(&plans) {
        finish_vma(&mut finish, main, pid, v, m)?;
    }
    if p.thp_disable.is_some() || p.memory_merge {
        process_mm_flags(&mut finish, p);
    }
    // Seals last: nothing may change a sealed VMA afterwards.
    for (v, m) in vmas.iter().zip(&plans) {
        if m.seal {
            const SYS_MSEAL: i64 = 462;
            let v: &VmaRecord = v;
            finish.push(
                Syscall::new(SYS_MSEAL, [v.start, v.end - v.start, 0, 0, 0, 0]),
                move |r| check_vma(pid, v, "mseal", r),
            );
        }
    }
    // 4. mm fields: PR_SET_MM_MAP (struct prctl_mm_map, include/uapi/linux/prctl.h).
    let mm = &p.mm;
    let exe_fd = files
        .fd(exe.0, exe.1)
        .ok_or_else(|| step::<String>(pid, "PR_SET_MM_MAP")(format!("{} was not opened", p.exe)))?;
    let auxv: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if !finish.fits(auxv.len() + 16 + 104) {
        finish.run(main, pid)?;
    }
    let auxv_at = finish.data(&auxv);
    let mut map = Vec::with_capacity(104);
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_at,
    ] {
        map.extend_from_slice(&w.to_ne_bytes());
    }
    // The image's auxv is at most 256 words (checked when it was read).
    map.extend_from_slice(&u32::try_from(auxv.len()).unwrap_or(u32::MAX).to_ne_bytes());
    map.extend_from_slice(&(exe_fd as u32).to_ne_bytes());
    let map_at = finish.data(&map);
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    finish.checked(
        Syscall::new(
            libc::SYS_prctl,
            [PR_SET_MM, PR_SET_MM_MAP, map_at, map.len() as u64, 0, 0],
        ),
        "PR_SET_MM_MAP (brk, args, env, auxv, exe)",
    );
    finish.run(main, pid)?;
    files.close(main)?;
    Ok((pages, fill))
}

/// The ranges to unmap to remove every one of `maps` (sorted) but those
/// inside `keep`: neighbours merged across the gaps between them (unmapping
/// a gap does nothing), so that a few munmaps remove what the forked child
/// inherited from tern, not one per VMA.
fn unmap_ranges(maps: impl Iterator<Item = (u64, u64)>, keep: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in maps {
        if keep.iter().any(|&(s, e)| a >= s && b <= e) {
            continue;
        }
        match out.last_mut() {
            // No kept area between the last range and this one.
            Some(last) if !keep.iter().any(|&(s, _)| s >= last.1 && s < a) => last.1 = b,
            _ => out.push((a, b)),
        }
    }
    out
}

/// Write the chain's pages of `v` into the target, `v` being mapped at `at`
/// for now (runs of populated pages; holes stay unpopulated or read from
/// the mapped file). A VMA mapped without write permission is written
/// through /proc/PID/mem (FOLL_FORCE, copy-on-write of a private mapping),
/// so that it never needs PROT_WRITE it did not have (which would also
/// account it, VM_ACCOUNT, where the original was not).
fn fill(
    plan: &Plan,
    v: &VmaRecord,
    pid: i32,
    at: u64,
    writable: bool,
) -> Result<u64, RestoreError> {
    let file_backed = v.is_private() && v.backing_file().is_some();
    let mem = if writable {
        None
    } else {
        Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{pid}/mem"))
                .map_err(step(pid, "opening /proc/PID/mem"))?,
        )
    };
    let mut pages = 0;
    let mut addr = v.start;
    while addr < v.end {
        let wanted = |a: u64| match plan.chain.source(a) {
            PageSource::Data { .. } => true,
            PageSource::Zero => file_backed,
            PageSource::Hole => false,
        };
        if !wanted(addr) {
            addr += PAGE_SIZE;
            continue;
        }
        let start = addr;
        while addr < v.end && wanted(addr) && addr - start < (8 << 20) {
            addr += PAGE_SIZE;
        }
        let range = PageRange::new(start, addr);
        let data = plan.chain.read_range_cached(v, range, &plan.blobs)?;
        let to = at + (start - v.start);
        match &mem {
            None => write_mem(pid, to, &data)?,
            Some(f) => {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&data, to).map_err(|e| RestoreError::Step {
                    pid,
                    step: "writing memory",
                    what: format!("{to:#x}+{} through /proc/{pid}/mem: {e}", data.len()),
                })?;
            }
        }
        pages += range.pages();
    }
    Ok(pages)
}

/// Step 4, process-wide: files, cwd, umask, personality, limits, itimers,
/// handlers, shared pending signals.
fn process_state(plan: &Plan, main: &mut Injector, pid: i32) -> Result<(), RestoreError> {
    let p = &plan.process;
    // fds: first drop whatever the child inherited, then reopen the image's.
    let fds_span = tracing::debug_span!("fds", count = p.fds.len()).entered();
    let close_all = Syscall::new(libc::SYS_close_range, [0, u32::MAX as u64, 0, 0, 0, 0]);
    let has_fifos = p
        .fds
        .iter()
        .any(|f| matches!(f.info.kind, images::state::FdKindState::Fifo { .. }));
    // The FIFOs' helpers are opened between the two; without FIFOs the
    // close goes first in the fds' batch.
    if has_fifos {
        let r = main.syscall(close_all.nr, close_all.args)?;
        check(pid, "closing inherited fds", r)?;
    }
    let fifos = open_fifos(plan, main, pid)?;
    restore_fds(
        plan,
        main,
        pid,
        fifos.iter().map(|(fd, _)| *fd),
        (!has_fifos).then_some(close_all),
    )?;
    let calls = fifos
        .iter()
        .map(|(fd, _)| (libc::SYS_close, [*fd as u64, 0, 0, 0, 0, 0]))
        .collect();
    main.syscalls(calls)?;
    drop(fifos);
    drop(fds_span);
    // Limits, from outside.
    for l in &p.rlimits {
        sys::rlimit::set(pid, l.resource, l.cur, l.max).map_err(|e| {
            step::<String>(pid, "setting a resource limit")(format!("resource {}: {e}", l.resource))
        })?;
    }
    // The rest in one batch: cwd, root (only if it is not /), umask,
    // personality, handlers, itimers, session and group.
    let mut b = Batch::new(main)?;
    let a = b.cstr(&p.cwd);
    b.checked(
        Syscall::new(libc::SYS_chdir, [a, 0, 0, 0, 0, 0]),
        "chdir to the dumped cwd",
    );
    // After every path was opened (they are this host's paths); chroot(2)
    // leaves the cwd where it is, as the dumped process had it.
    if p.root != "/" {
        let a = b.cstr(&p.root);
        b.checked(
            Syscall::new(libc::SYS_chroot, [a, 0, 0, 0, 0, 0]),
            "chroot to the dumped root directory",
        );
    }
    b.push(
        Syscall::new(libc::SYS_umask, [p.umask as u64, 0, 0, 0, 0, 0]).may_fail(),
        |_| Ok(()),
    );
    b.checked(
        Syscall::new(libc::SYS_personality, [p.personality, 0, 0, 0, 0, 0]),
        "personality",
    );
    // Handlers. The child reset every disposition to the default before it
    // blocked (see `spawn_with_pid`); if it shows any other (it could not),
    // every one is set.
    let all_default = sys::proc::status(pid, None).is_ok_and(|s| s.sigign == 0 && s.sigcgt == 0);
    for a in &p.sigactions {
        if a.signo == libc::SIGKILL || a.signo == libc::SIGSTOP {
            continue;
        }
        if all_default && a.handler == 0 && a.flags == 0 && a.restorer == 0 && a.mask == 0 {
            continue;
        }
        let ka = sys::signals::SigAction::from(*a).to_kernel().to_bytes();
        if !b.fits(ka.len()) {
            b.run(main, pid)?;
        }
        let addr = b.data(&ka);
        b.checked(
            Syscall::new(libc::SYS_rt_sigaction, [a.signo as u64, addr, 0, 8, 0, 0]),
            "rt_sigaction",
        );
    }
    // itimers.
    for t in &p.itimers {
        let v = [
            t.interval_us / 1_000_000,
            t.interval_us % 1_000_000,
            t.value_us / 1_000_000,
            t.value_us % 1_000_000,
        ];
        let d: Vec<u8> = v.iter().flat_map(|w| w.to_ne_bytes()).collect();
        if !b.fits(d.len()) {
            b.run(main, pid)?;
        }
        let a = b.data(&d);
        b.checked(
            Syscall::new(libc::SYS_setitimer, [t.which as u64, a, 0, 0, 0, 0]),
            "setitimer",
        );
    }
    // POSIX timers, each with its ID (the threads a timer may signal exist
    // by now).
    if !p.posix_timers.is_empty() {
        use sys::posix_timers as pt;
        b.checked(
            Syscall::new(
                libc::SYS_prctl,
                [
                    pt::PR_TIMER_CREATE_RESTORE_IDS,
                    pt::PR_TIMER_CREATE_RESTORE_IDS_ON,
                    0,
                    0,
                    0,
                    0,
                ],
            ),
            "prctl(PR_TIMER_CREATE_RESTORE_IDS) (Linux 6.15+ gives a POSIX timer its ID back)",
        );
        for t in &p.posix_timers {
            let notify = t.notify().ok_or_else(|| {
                step::<String>(pid, "creating a POSIX timer")(format!(
                    "timer {}: notify {:?}",
                    t.id, t.notify
                ))
            })?;
            if !b.fits(pt::SIGEVENT_LEN + 16 + 32 + 32) {
                b.run(main, pid)?;
            }
            let sev = b.data(&pt::sigevent_bytes(t.signo, t.sigev_value, notify));
            let id = b.data(&t.id.to_ne_bytes());
            let tid = t.id;
            b.push(
                Syscall::new(libc::SYS_timer_create, [t.clockid as u64, sev, id, 0, 0, 0]),
                move |r| {
                    if r == 0 {
                        return Ok(());
                    }
                    Err(RestoreError::Step {
                        pid,
                        step: "creating a POSIX timer",
                        what: format!("timer {tid}: errno {} ({})", -r, os_error(r)),
                    })
                },
            );
            if t.value_ns > 0 {
                let spec = sys::event_fds::itimerspec_bytes(
                    Duration::from_nanos(t.interval_ns),
                    Duration::from_nanos(t.value_ns),
                );
                let a = b.data(&spec);
                b.checked(
                    Syscall::new(libc::SYS_timer_settime, [t.id as u64, 0, a, 0, 0, 0]),
                    "timer_settime",
                );
            }
        }
        b.checked(
            Syscall::new(
                libc::SYS_prctl,
                [
                    pt::PR_TIMER_CREATE_RESTORE_IDS,
                    pt::PR_TIMER_CREATE_RESTORE_IDS_OFF,
                    0,
                    0,
                    0,
                    0,
                ],
            ),
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, OFF)",
        );
    }
    // Session and process group: a session leader gets its own session
    // again; a group leader its own group; joining another process's group
    // works only inside the session tern runs in.
    if p.sid == pid {
        b.push(Syscall::new(libc::SYS_setsid, [0; 6]), move |r| {
            check(pid, "setsid (the process led its session)", r).map(|_| ())
        });
    } else if p.pgid == pid {
        b.push(Syscall::new(libc::SYS_setpgid, [0; 6]), move |r| {
            check(pid, "setpgid (the process led its group)", r).map(|_| ())
        });
    } else {
        let pgid = p.pgid;
        b.push(
            Syscall::new(libc::SYS_setpgid, [0, pgid as u64, 0, 0, 0, 0]).may_fail(),
            move |r| {
                if r < 0 {
                    tracing::warn!(
                        pid,
                        pgid,
                        "cannot rejoin process group {pgid} (it is gone or in another session); the process stays in tern's"
                    );
                }
                Ok(())
            },
        );
    }
    b.run(main, pid)?;
    Ok(())
}

/// O_LARGEFILE as the kernel reports it in fdinfo (libc defines it as 0 on
/// 64-bit targets, where open(2) adds it by itself).
#[cfg(target_arch = "aarch64")]
const KERNEL_O_LARGEFILE: i32 = 0o400000;
#[cfg(not(target_arch = "aarch64"))]
const KERNEL_O_LARGEFILE: i32 = 0o100000;

/// tern's ends of a pipe being refilled, and which of them already went to
/// the process as an open file description of its own.
struct PipeEnds {
    read: OwnedFd,
    write: OwnedFd,
    read_given: bool,
    write_given: bool,
}

/// Every FIFO the process has open, opened first in the process without
/// blocking (read-write, or read-only when it may not write it) and
/// refilled with its saved bytes: its own opens then neither block nor find
/// it empty. Returns the helper fds in the process (closed once its fds are
/// in) with tern's write ends (kept as long).
fn open_fifos(
    plan: &Plan,
    main: &mut Injector,
    pid: i32,
) -> Result<Vec<(i32, Option<std::fs::File>)>, RestoreError> {
    use images::state::FdKindState as FdKind;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let mut done: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for f in &plan.process.fds {
        let FdKind::Fifo { path, .. } = &f.info.kind else {
            continue;
        };
        if done.contains(&path.as_str()) {
            continue;
        }
        done.push(path);
        let nb = libc::O_NONBLOCK | libc::O_CLOEXEC;
        let fd = match open_in_plain(main, pid, path, libc::O_RDWR | nb) {
            Ok(fd) => fd,
            Err(_) => open_in_plain(main, pid, path, libc::O_RDONLY | nb)?,
        };
        // Out of the way of the fd numbers the image restores.
        let above = plan
            .process
            .fds
            .iter()
            .map(|f| f.info.fd)
            .max()
            .unwrap_or(0)
            + 1;
        let high = main.syscall(
            libc::SYS_fcntl,
            [
                fd as u64,
                libc::F_DUPFD_CLOEXEC as u64,
                above as u64,
                0,
                0,
                0,
            ],
        )?;
        check(pid, "moving a FIFO's helper fd", high)?;
        main.syscall(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        let fd = check_int(pid, "moving a FIFO's helper fd", high)?;
        let theirs = sys::fds::pidfd_getfd(pid, fd).map_err(step(pid, "taking a FIFO's fd"))?;
        let file = std::fs::File::from(theirs);
        let md = file.metadata().map_err(step(pid, "stat of a FIFO"))?;
        if !md.file_type().is_fifo() {
            return Err(step::<String>(pid, "reopening a FIFO")(format!(
                "{path} is no longer a FIFO here"
            )));
        }
        // tern's own writer (through the verified object, not the path).
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| {
                step::<String>(pid, "opening a FIFO to refill it")(format!("{path}: {e}"))
            })?;
        let data = f
            .pipe_data
            .as_ref()
            .and_then(|n| plan.pipe_data.get(n))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(file.as_raw_fd(), libc::FIONREAD, &mut queued) };
        if let Some(cap) = f.pipe_capacity {
            // SAFETY: fcntl on our own fd.
            unsafe {
                libc::fcntl(
                    writer.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    i32::try_from(cap).unwrap_or(i32::MAX),
                )
            };
        }
        if !data.is_empty() && queued > 0 {
            tracing::warn!(
                pid,
                "FIFO {path} still holds {queued} bytes (another process keeps it open): its saved {} bytes are not written again",
                data.len()
            );
        } else if !data.is_empty() {
            refill(pid, "refilling a FIFO", &format!("{path}: "), &writer, data)?;
        }
        out.push((fd, Some(writer)));
    }
    Ok(out)
}

/// The fd numbers taken in the process while its fds are restored: an
/// open (or dup, pidfd_open, pidfd_getfd) takes the lowest free one, so
/// each fd a batched call will return is known before it runs (checked
/// when it does).
struct FdTable(std::collections::BTreeSet<i32>);

impl FdTable {
    /// The fd the next open takes.
    fn open(&mut self) -> i32 {
        let mut fd = 0;
        while self.0.contains(&fd) {
            fd += 1;
        }
        self.0.insert(fd);
        fd
    }
}

/// The process's fds, in batches (see [`FdTable`]).
struct FdRestore<'p> {
    pid: i32,
    b: Batch<'p>,
    table: FdTable,
    pipes: BTreeMap<String, PipeEnds>,
    /// tern's fds the process takes with pidfd_getfd when the batch runs.
    held: Vec<OwnedFd>,
    /// tern's ends of the unix socket pairs made so far, by the image's
    /// inode of each (kept until every fd is in).
    sockets: BTreeMap<u64, OwnedFd>,
}

impl<'p> FdRestore<'p> {
    /// Add the open of `path` with `flags`; the fd it will take.
    fn open(
        &mut self,
        main: &mut Injector,
        path: &'p str,
        flags: i32,
    ) -> Result<i32, RestoreError> {
        if !self.b.fits(path.len() + 1) {
            self.run(main)?;
        }
        let a = self.b.cstr(path);
        let fd = self.table.open();
        let pid = self.pid;
        self.b.push(
            Syscall::new(
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, a, flags as u64, 0, 0, 0],
            ),
            move |r| {
                let got = opened(pid, "reopening a file", path, r)?;
                expect_fd(pid, "reopening a file", got, fd)
            },
        );
        Ok(fd)
    }

    fn run(&mut self, main: &mut Injector) -> Result<(), RestoreError> {
        self.b.run(main, self.pid)?;
        self.held.clear();
        Ok(())
    }

    /// The process takes tern's fd `ours` itself (pidfd_open of tern, then
    /// pidfd_getfd): the same open file, flags as tern set them (an open
    /// of /proc/.../fd/N would make another description, or cannot be
    /// done at all for a socket). The fd it will take.
    fn take_from_tern(&mut self, ours: i32, what: &'static str) -> i32 {
        let pid = self.pid;
        let pidfd = self.table.open();
        self.b.push(
            Syscall::new(
                libc::SYS_pidfd_open,
                [std::process::id() as u64, 0, 0, 0, 0, 0],
            ),
            move |x| {
                let got = check_int(pid, "pidfd_open(tern) in the target", x)?;
                expect_fd(pid, "pidfd_open(tern) in the target", got, pidfd)
            },
        );
        let fd = self.table.open();
        self.b.push(
            Syscall::new(
                libc::SYS_pidfd_getfd,
                [pidfd as u64, ours as u64, 0, 0, 0, 0],
            ),
            move |x| {
                let got = check_int(pid, what, x)?;
                expect_fd(pid, what, got, fd)
            },
        );
        self.close(pidfd);
        fd
    }

    fn close(&mut self, fd: i32) {
        self.table.0.remove(&fd);
        self.b.push(
            Syscall::new(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]).may_fail(),
            |_| Ok(()),
        );
    }
}

/// A batched call returned another fd than the table said it would.
fn expect_fd(pid: i32, what: &'static str, got: i32, want: i32) -> Result<(), RestoreError> {
    if got == want {
        return Ok(());
    }
    Err(RestoreError::Step {
        pid,
        step: what,
        what: format!("the kernel gave fd {got} where fd {want} was the lowest free one"),
    })
}

/// Every fd of the image, in as few batches as their paths fit in.
/// `taken`: fds already in the process (the FIFO helpers); `first`: a call
/// to make before (the close of every inherited fd).
fn restore_fds(
    plan: &Plan,
    main: &mut Injector,
    pid: i32,
    taken: impl Iterator<Item = i32>,
    first: Option<Syscall>,
) -> Result<(), RestoreError> {
    let mut r = FdRestore {
        pid,
        b: Batch::new(main)?,
        table: FdTable(taken.collect()),
        pipes: BTreeMap::new(),
        held: Vec::new(),
        sockets: BTreeMap::new(),
    };
    // Unix sockets bound to a name, and the connections accepted from
    // them, first (an fd may come before its listener's).
    bound_unix_sockets(plan, pid, &mut r.sockets)?;
    if let Some(c) = first {
        r.b.checked(c, "closing inherited fds");
    }
    for f in &plan.process.fds {
        restore_fd(plan, f, main, &mut r)?;
    }
    epoll_registrations(plan, main, &mut r)?;
    r.run(main)?;
    Ok(())
}

fn restore_fd<'p>(
    plan: &'p Plan,
    f: &'p FdImage,
    main: &mut Injector,
    r: &mut FdRestore<'p>,
) -> Result<(), RestoreError> {
    use images::state::FdKindState as FdKind;
    let pid = r.pid;
    let info = &f.info;
    // fdinfo flags: access mode, status flags and O_CLOEXEC.
    let open_flags = info.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC);
    let cloexec = info.flags & libc::O_CLOEXEC != 0;
    let dup_flags = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
    // A dup of an earlier fd: the same open file description.
    if let Some(s) = f.same_as {
        r.b.checked(
            Syscall::new(
                libc::SYS_dup3,
                [s as u64, info.fd as u64, dup_flags, 0, 0, 0],
            ),
            "dup3 of a shared open file description",
        );
        r.table.0.insert(info.fd);
        return Ok(());
    }
    let fd = match &info.kind {
        FdKind::File {
            deleted: true,
            dev,
            ino,
            path,
            ..
        } => {
            let Some(made) = plan.unlinked.path((*dev, *ino)) else {
                return Err(step::<String>(pid, "restoring fds")(format!(
                    "fd {}: {path} (deleted) was not made again",
                    info.fd
                )));
            };
            let fd = r.open(main, made, open_flags)?;
            if info.pos != 0 {
                r.b.checked(
                    Syscall::new(
                        libc::SYS_lseek,
                        [fd as u64, info.pos, libc::SEEK_SET as u64, 0, 0, 0],
                    ),
                    "seeking a file",
                );
            }
            fd
        }
        FdKind::File { path, .. }
        | FdKind::Dir { path }
        | FdKind::CharDev { path, .. }
        | FdKind::Tty { path, .. } => {
            let fd = r.open(main, path, open_flags)?;
            if matches!(info.kind, FdKind::File { .. }) && info.pos != 0 {
                r.b.checked(
                    Syscall::new(
                        libc::SYS_lseek,
                        [fd as u64, info.pos, libc::SEEK_SET as u64, 0, 0, 0],
                    ),
                    "seeking a file",
                );
            }
            fd
        }
        FdKind::Pipe { read_end, .. } => {
            let name = f.pipe_data.clone().unwrap_or_default();
            if !r.pipes.contains_key(&name) {
                let (rd, w) = nix::unistd::pipe2(
                    nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK,
                )
                .map_err(step(pid, "creating a pipe"))?;
                let data = plan.pipe_data.get(&name).map(Vec::as_slice).unwrap_or(&[]);
                if !data.is_empty() {
                    // SAFETY: fcntl on our own fd.
                    unsafe {
                        libc::fcntl(
                            w.as_raw_fd(),
                            libc::F_SETPIPE_SZ,
                            i32::try_from(data.len().max(4096)).unwrap_or(i32::MAX),
                        )
                    };
                    refill(pid, "refilling a pipe", "", &w, data)?;
                }
                r.pipes.insert(
                    name.clone(),
                    PipeEnds {
                        read: rd,
                        write: w,
                        read_given: false,
                        write_given: false,
                    },
                );
            }
            let ends = r.pipes.get_mut(&name).expect("inserted above");
            // pipe(2) made the end without O_LARGEFILE, an open of
            // /proc/PID/fd/N with it: each open file description of the
            // original is recreated the way it was made.
            let given = if *read_end {
                &mut ends.read_given
            } else {
                &mut ends.write_given
            };
            let end = if *read_end { &ends.read } else { &ends.write };
            let ours = if !*given && info.flags & KERNEL_O_LARGEFILE == 0 {
                *given = true;
                end.as_raw_fd()
            } else {
                use std::os::unix::fs::OpenOptionsExt;
                let reopened = std::fs::OpenOptions::new()
                    .read(*read_end)
                    .write(!*read_end)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(format!("/proc/self/fd/{}", end.as_raw_fd()))
                    .map_err(step(
                        pid,
                        "opening a pipe again (a second open file description)",
                    ))?;
                let fd = reopened.as_raw_fd();
                // Kept open until the process took it.
                r.held.push(OwnedFd::from(reopened));
                fd
            };
            if let Some(cap) = f.pipe_capacity {
                // SAFETY: fcntl on our own fd.
                unsafe {
                    libc::fcntl(
                        ours,
                        libc::F_SETPIPE_SZ,
                        i32::try_from(cap).unwrap_or(i32::MAX),
                    )
                };
            }
            // The end's status flags (O_NONBLOCK) as dumped.
            let status =
                info.flags & (libc::O_NONBLOCK | libc::O_APPEND | libc::O_ASYNC | libc::O_DIRECT);
            // SAFETY: fcntl on our own fd.
            unsafe { libc::fcntl(ours, libc::F_SETFL, status) };
            // The target takes our end itself (pidfd_getfd): the same open
            // file, flags as set here (an open of /proc/.../fd/N would add
            // O_LARGEFILE).
            r.take_from_tern(ours, "pidfd_getfd of a refilled pipe")
        }
        FdKind::UnixSocket {
            ino,
            peer,
            sock_type,
            ..
        } => {
            if !r.sockets.contains_key(ino) {
                let (a, b) = sys::unix_sockets::pair(*sock_type).map_err(|e| {
                    step::<String>(pid, "making a unix socket pair")(format!(
                        "socket:[{ino}] and socket:[{peer}]: {e}"
                    ))
                })?;
                let (a, b) = unix_pair(plan, pid, *ino, *peer, (a, b))?;
                r.sockets.insert(*ino, a);
                r.sockets.insert(*peer, b);
            }
            let ours = r.sockets[ino].as_raw_fd();
            set_nonblock(pid, ours, info.flags)?;
            r.take_from_tern(ours, "pidfd_getfd of a unix socket")
        }
        FdKind::InetSocket {
            family,
            protocol,
            addr,
            listen,
            reuseaddr,
            reuseport,
            keepalive,
            nodelay,
            v6only,
        } => {
            let a: std::net::SocketAddr = addr.parse().map_err(|_| {
                step::<String>(pid, "making a socket")(format!("fd {}: address {addr:?}", info.fd))
            })?;
            let opts = sys::inet_sockets::SocketOptions {
                reuseaddr: *reuseaddr,
                reuseport: *reuseport,
                keepalive: *keepalive,
                nodelay: *nodelay,
                v6only: *v6only,
                bound_to_device: false,
            };
            let backlog = listen.map(|b| i32::try_from(b).unwrap_or(i32::MAX));
            let s = sys::inet_sockets::make(*family, *protocol, a, opts, backlog).map_err(|e| {
                step::<String>(pid, "making a socket")(format!(
                    "fd {}: {} socket on {addr}{}: {e}{}",
                    info.fd,
                    if *protocol == 6 { "TCP" } else { "UDP" },
                    if listen.is_some() { ", listening" } else { "" },
                    if e.raw_os_error() == Some(libc::EADDRINUSE) {
                        " (another process holds the address here: stop it, or restore where it is free)"
                    } else {
                        ""
                    }
                ))
            })?;
            let ours = s.as_raw_fd();
            set_nonblock(pid, ours, info.flags)?;
            r.held.push(s);
            r.take_from_tern(ours, "pidfd_getfd of a socket")
        }
        FdKind::Fifo { path, .. } => r.open(main, path, open_flags)?,
        FdKind::EventFd { .. }
        | FdKind::Epoll { .. }
        | FdKind::TimerFd { .. }
        | FdKind::SignalFd { .. } => event_fd(f, main, r)?,
        other => {
            return Err(step::<String>(pid, "restoring fds")(format!(
                "fd {}: {other:?} not supported",
                info.fd
            )));
        }
    };
    if fd != info.fd {
        r.b.checked(
            Syscall::new(
                libc::SYS_dup3,
                [fd as u64, info.fd as u64, dup_flags, 0, 0, 0],
            ),
            "dup3 to the dumped fd number",
        );
        r.table.0.insert(info.fd);
        r.close(fd);
    } else {
        let v = if cloexec { libc::FD_CLOEXEC as u64 } else { 0 };
        r.b.checked(
            Syscall::new(
                libc::SYS_fcntl,
                [fd as u64, libc::F_SETFD as u64, v, 0, 0, 0],
            ),
            "F_SETFD",
        );
    }
    Ok(())
}

/// tern's end of a socket gets the O_NONBLOCK the dumped fd had (its
/// other status flags are not a socket's to keep) before the process
/// takes it.
fn set_nonblock(pid: i32, ours: i32, dumped: i32) -> Result<(), RestoreError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(dumped & libc::O_NONBLOCK);
    fcntl(ours, FcntlArg::F_SETFL(flags))
        .map(|_| ())
        .map_err(step(pid, "setting a socket's O_NONBLOCK"))
}

/// The unix sockets of the image bound to a name (listening, datagram, or
/// only bound), bound again in tern, and the connections accepted from
/// those listeners, connected again: into `sockets` by the image's inodes.
fn bound_unix_sockets(
    plan: &Plan,
    pid: i32,
    sockets: &mut BTreeMap<u64, OwnedFd>,
) -> Result<(), RestoreError> {
    use images::state::FdKindState as FdKind;
    let fail = |what: String| step::<String>(pid, "making a unix socket")(what);
    let unique = plan.process.fds.iter().filter(|f| f.same_as.is_none());
    // Not connected: made (and bound, listening) first.
    for f in unique.clone() {
        let FdKind::UnixSocket {
            ino,
            peer: 0,
            sock_type,
            name,
            listen,
            file,
            ..
        } = &f.info.kind
        else {
            continue;
        };
        let shown = name
            .as_deref()
            .map_or_else(|| "no name".to_string(), sys::unix_sockets::shown_name);
        if let Some(file) = file {
            crate::socket_file::clear_stale(name.as_deref().unwrap_or_default(), file)
                .map_err(|e| fail(format!("fd {}: {e}", f.info.fd)))?;
        }
        let backlog = listen.map(|b| i32::try_from(b).unwrap_or(i32::MAX));
        let s = sys::unix_sockets::bound(*sock_type, name.as_deref(), backlog).map_err(|e| {
            fail(format!(
                "fd {}: a unix socket bound to {shown}: {e}{}",
                f.info.fd,
                if e.raw_os_error() == Some(libc::EADDRINUSE) {
                    " (another socket holds the name here: stop its process, or restore where it is free)"
                } else {
                    ""
                }
            ))
        })?;
        if let Some(file) = file {
            let owner = plan
                .writer
                .owner_given(file.uid, file.gid, plan.process.creds.gid[1]);
            crate::socket_file::give(
                name.as_deref().unwrap_or_default(),
                owner,
                plan.writer.mode_given(file.mode),
            )
            .map_err(|e| fail(format!("fd {}: {e}", f.info.fd)))?;
        }
        sockets.insert(*ino, s);
    }
    // Datagram clients: connected to their server again.
    for f in unique.clone() {
        let FdKind::UnixSocket {
            ino,
            peer,
            sock_type: 2,
            name: None,
            ..
        } = &f.info.kind
        else {
            continue;
        };
        let server = plan.process.fds.iter().find_map(|g| match &g.info.kind {
            FdKind::UnixSocket {
                ino: s,
                peer: 0,
                name: Some(n),
                ..
            } if s == peer => Some(n),
            _ => None,
        });
        if let Some(n) = server {
            let c = sys::unix_sockets::connected_to(2, n).map_err(|e| {
                fail(format!(
                    "fd {}: connecting a datagram socket to {}: {e}",
                    f.info.fd,
                    sys::unix_sockets::shown_name(n)
                ))
            })?;
            sockets.insert(*ino, c);
        }
    }
    // Accepted connections: connected to their listener again.
    for f in unique {
        let FdKind::UnixSocket {
            ino,
            peer,
            sock_type,
            name: Some(name),
            listen: None,
            ..
        } = &f.info.kind
        else {
            continue;
        };
        if *peer == 0 || sockets.contains_key(ino) {
            continue;
        }
        let listener = plan.process.fds.iter().find_map(|g| match &g.info.kind {
            FdKind::UnixSocket {
                ino: l,
                name: Some(n),
                listen: Some(_),
                ..
            } if n == name => sockets.get(l),
            _ => None,
        });
        let Some(listener) = listener else {
            return Err(fail(format!(
                "fd {}: a connection accepted from {}, whose listener is not in the image",
                f.info.fd,
                sys::unix_sockets::shown_name(name)
            )));
        };
        let (client, accepted) = sys::unix_sockets::connection(listener, *sock_type, name)
            .map_err(|e| {
                fail(format!(
                    "fd {}: connecting to {} again: {e}",
                    f.info.fd,
                    sys::unix_sockets::shown_name(name)
                ))
            })?;
        let (a, b) = unix_pair(plan, pid, *ino, *peer, (accepted, client))?;
        sockets.insert(*ino, a);
        sockets.insert(*peer, b);
    }
    Ok(())
}

/// The connected sockets `made` again for the image's sockets `ino` and
/// `peer` (a socketpair, or a connection to a listener): what was queued
/// to each sent from the other, then each end's shutdown as it was (after
/// the sends, which it would stop).
fn unix_pair(
    plan: &Plan,
    pid: i32,
    ino: u64,
    peer: u64,
    made: (OwnedFd, OwnedFd),
) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    use images::state::FdKindState as FdKind;
    let end = |i: u64| {
        plan.process.fds.iter().find_map(|f| match &f.info.kind {
            FdKind::UnixSocket {
                ino: x, shutdown, ..
            } if *x == i && f.same_as.is_none() => Some((f, *shutdown)),
            _ => None,
        })
    };
    let (Some((fa, shut_a)), Some((fb, shut_b))) = (end(ino), end(peer)) else {
        return Err(step::<String>(pid, "making a unix socket pair")(format!(
            "socket:[{ino}] and its peer socket:[{peer}] are not both in the image"
        )));
    };
    let queued = |f: &FdImage| -> Result<Vec<Vec<u8>>, RestoreError> {
        let Some(bytes) = f.pipe_data.as_ref().and_then(|n| plan.pipe_data.get(n)) else {
            return Ok(Vec::new());
        };
        sys::unix_sockets::decode(bytes).ok_or_else(|| {
            step::<String>(pid, "refilling a unix socket")(format!(
                "fd {}: its queued messages ({:?}) are not a list of messages",
                f.info.fd, f.pipe_data
            ))
        })
    };
    let fail = |what: &'static str| {
        move |e: std::io::Error| {
            step::<String>(pid, what)(format!("socket:[{ino}] and socket:[{peer}]: {e}"))
        }
    };
    let (a, b) = made;
    sys::unix_sockets::fill(&b, &queued(fa)?).map_err(fail("refilling a unix socket"))?;
    sys::unix_sockets::fill(&a, &queued(fb)?).map_err(fail("refilling a unix socket"))?;
    use sys::unix_sockets::{RCV_SHUTDOWN, SEND_SHUTDOWN};
    for (s, mine, theirs) in [(&a, shut_a, shut_b), (&b, shut_b, shut_a)] {
        // A read side shut by the peer's SHUT_WR comes with that one.
        let read = mine & RCV_SHUTDOWN != 0 && theirs & SEND_SHUTDOWN == 0;
        sys::unix_sockets::shutdown(s, read, mine & SEND_SHUTDOWN != 0)
            .map_err(fail("shutting a unix socket down as it was"))?;
    }
    Ok((a, b))
}

/// An eventfd, epoll, timerfd or signalfd made again in the process, its
/// state set (an epoll's registrations come once every fd is in, see
/// [`epoll_registrations`]); the fd it takes.
fn event_fd<'p>(
    f: &'p FdImage,
    main: &mut Injector,
    r: &mut FdRestore<'p>,
) -> Result<i32, RestoreError> {
    use images::state::FdKindState as FdKind;
    use sys::event_fds as ev;
    let pid = r.pid;
    let info = &f.info;
    let nonblock = (info.flags & libc::O_NONBLOCK) as u64;
    // Room for the largest data below (an itimerspec and a u64).
    if !r.b.fits(64) {
        r.run(main)?;
    }
    let fd = r.table.open();
    let made = move |what: &'static str| {
        move |x: i64| {
            let got = check_int(pid, what, x)?;
            expect_fd(pid, what, got, fd)
        }
    };
    match &info.kind {
        FdKind::EventFd { count, semaphore } => {
            let sem = if *semaphore {
                ev::EFD_SEMAPHORE as u64
            } else {
                0
            };
            r.b.push(
                Syscall::new(libc::SYS_eventfd2, [0, nonblock | sem, 0, 0, 0, 0]),
                made("eventfd2"),
            );
            // The counter may exceed eventfd2's 32-bit initial value.
            if *count > 0 {
                let a = r.b.data(&count.to_ne_bytes());
                r.b.push(
                    Syscall::new(libc::SYS_write, [fd as u64, a, 8, 0, 0, 0]),
                    move |x| match x {
                        8 => Ok(()),
                        _ => Err(RestoreError::Step {
                            pid,
                            step: "setting an eventfd's counter",
                            what: if x < 0 {
                                format!("errno {} ({})", -x, os_error(x))
                            } else {
                                format!("wrote {x} of 8 bytes")
                            },
                        }),
                    },
                );
            }
        }
        FdKind::SignalFd { mask } => {
            let a = r.b.data(&mask.to_ne_bytes());
            r.b.push(
                Syscall::new(libc::SYS_signalfd4, [u64::MAX, a, 8, nonblock, 0, 0]),
                made("signalfd4"),
            );
        }
        FdKind::Epoll { .. } => {
            r.b.push(
                Syscall::new(libc::SYS_epoll_create1, [0; 6]),
                made("epoll_create1"),
            );
            if nonblock != 0 {
                r.b.checked(
                    Syscall::new(
                        libc::SYS_fcntl,
                        [fd as u64, libc::F_SETFL as u64, nonblock, 0, 0, 0],
                    ),
                    "O_NONBLOCK on an epoll fd",
                );
            }
        }
        FdKind::TimerFd {
            clockid,
            settime_flags,
            value_ns,
            interval_ns,
            ticks,
            realtime_deadline_ns,
        } => {
            r.b.push(
                Syscall::new(
                    libc::SYS_timerfd_create,
                    [*clockid as u64, nonblock, 0, 0, 0, 0],
                ),
                made("timerfd_create"),
            );
            let value = Duration::from_nanos(*value_ns);
            if !value.is_zero() {
                // The time left, from now; an absolute timer gets it as
                // a time of its clock (its flags, CANCEL_ON_SET with
                // them, as it had them), a REALTIME one its deadline.
                let value = if let Some(d) = realtime_deadline_ns {
                    Duration::from_nanos(*d)
                } else if settime_flags & ev::TFD_TIMER_ABSTIME != 0 {
                    let now = nix::time::clock_gettime(nix::time::ClockId::from_raw(*clockid))
                        .map_err(step(pid, "reading a timerfd's clock"))?;
                    Duration::from(now) + value
                } else {
                    value
                };
                let spec = ev::itimerspec_bytes(Duration::from_nanos(*interval_ns), value);
                let a = r.b.data(&spec);
                r.b.checked(
                    Syscall::new(
                        libc::SYS_timerfd_settime,
                        [fd as u64, *settime_flags as u64, a, 0, 0, 0],
                    ),
                    "timerfd_settime",
                );
            }
            // After settime, which clears them.
            if *ticks > 0 {
                let a = r.b.data(&ticks.to_ne_bytes());
                r.b.checked(
                    Syscall::new(
                        libc::SYS_ioctl,
                        [fd as u64, ev::TFD_IOC_SET_TICKS, a, 0, 0, 0],
                    ),
                    "TFD_IOC_SET_TICKS (a kernel without CONFIG_CHECKPOINT_RESTORE cannot restore a timerfd's unread expirations)",
                );
            }
        }
        _ => unreachable!("event_fd is called for the four event kinds only"),
    }
    Ok(fd)
}

/// Every epoll's registrations, once all fds are in (a registered fd may
/// come after its epoll, or be another epoll).
fn epoll_registrations<'p>(
    plan: &'p Plan,
    main: &mut Injector,
    r: &mut FdRestore<'p>,
) -> Result<(), RestoreError> {
    use images::state::FdKindState as FdKind;
    for f in plan.process.fds.iter().filter(|f| f.same_as.is_none()) {
        let FdKind::Epoll { targets } = &f.info.kind else {
            continue;
        };
        for t in targets {
            let ev = sys::event_fds::epoll_event_bytes(t.events, t.data);
            if !r.b.fits(ev.len()) {
                r.run(main)?;
            }
            let a = r.b.data(&ev);
            let (pid, epfd, tfd) = (r.pid, f.info.fd, t.tfd);
            r.b.push(
                Syscall::new(
                    libc::SYS_epoll_ctl,
                    [epfd as u64, libc::EPOLL_CTL_ADD as u64, tfd as u64, a, 0, 0],
                ),
                move |x| {
                    if x >= 0 {
                        return Ok(());
                    }
                    Err(RestoreError::Step {
                        pid,
                        step: "registering an fd in an epoll",
                        what: format!("epoll fd {epfd}, fd {tfd}: errno {} ({})", -x, os_error(x)),
                    })
                },
            );
        }
    }
    Ok(())
}

fn open_in_plain(
    inj: &mut Injector,
    pid: i32,
    path: &str,
    flags: i32,
) -> Result<i32, RestoreError> {
    let mut c = path.as_bytes().to_vec();
    c.push(0);
    let a = inj.scratch_data(&c)?;
    let r = inj.syscall(
        libc::SYS_openat,
        [libc::AT_FDCWD as u64, a, flags as u64, 0, 0, 0],
    )?;
    opened(pid, "reopening a file", path, r)
}

/// Step 4, per thread.
fn thread_state(plan: &Plan, idx: usize, inj: &mut Injector, pid: i32) -> Result<(), RestoreError> {
    let t = &plan.process.threads[idx];
    let mask = t.blocked;
    inj.on_tracer(move |tid| sys::signals::set_blocked_mask(tid, mask))?
        .map_err(step(pid, "setting a thread's signal mask"))?;
    let mut b = Batch::new(inj)?;
    // sigaltstack
    let ss = sys::signals::StackT::from(sys::signals::AltStack::from(t.altstack));
    let a = b.data(&ss.to_bytes());
    b.checked(
        Syscall::new(libc::SYS_sigaltstack, [a, 0, 0, 0, 0, 0]),
        "sigaltstack",
    );
    // robust list, clear_child_tid
    if t.robust_list != 0 {
        b.checked(
            Syscall::new(
                libc::SYS_set_robust_list,
                [t.robust_list, t.robust_list_len, 0, 0, 0, 0],
            ),
            "set_robust_list",
        );
    }
    b.checked(
        Syscall::new(
            libc::SYS_set_tid_address,
            [t.clear_child_tid, 0, 0, 0, 0, 0],
        ),
        "set_tid_address",
    );
    // rseq
    if let Some(reg) = &t.rseq {
        b.checked(
            Syscall::new(
                libc::SYS_rseq,
                [
                    reg.abi_pointer,
                    reg.abi_size as u64,
                    0,
                    reg.signature as u64,
                    0,
                    0,
                ],
            ),
            "registering rseq",
        );
    }
    // The thread's name: only the thread itself (or its group) may set it.
    let mut name = t.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    let a = b.data(&name);
    b.checked(
        Syscall::new(libc::SYS_prctl, [libc::PR_SET_NAME as u64, a, 0, 0, 0, 0]),
        "PR_SET_NAME",
    );
    b.run(inj, pid)?;
    Ok(())
}

/// Credentials, in every thread (they belong to each thread in the kernel;
/// glibc's setuid changes them in every thread): ids, groups, the
/// capability sets and the bounding set exactly as the dumped process had
/// them (never tern's own: a process that had dropped capabilities gets
/// none back), no_new_privs; then the dumpable flag.
fn creds(
    plan: &Plan,
    main: &mut Injector,
    others: &mut [(usize, Injector)],
    pid: i32,
    scratch: u64,
) -> Result<(), RestoreError> {
    let c = &plan.process.creds;
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    // What the child has now: tern's own sets (it was forked from tern).
    let tern = &plan.restorer;
    creds_in(c, tern, last_cap, main, pid)?;
    for (_, inj) in others.iter_mut() {
        inj.ensure_scratch(Some(scratch))?;
        creds_in(c, tern, last_cap, inj, pid)?;
        inj.release_scratch()?;
    }
    let mut b = Batch::new(main)?;
    // A uid change made the process non-dumpable: put back what it was.
    if let Some(d) = plan.process.dumpable {
        b.checked(
            Syscall::new(
                libc::SYS_prctl,
                [libc::PR_SET_DUMPABLE as u64, d as u64, 0, 0, 0, 0],
            ),
            "PR_SET_DUMPABLE",
        );
    }
    // The credential change cleared the parent-death signal.
    die_with_tern(&mut b);
    b.run(main, pid)?;
    Ok(())
}

/// Add to `b` `PR_SET_PDEATHSIG(SIGKILL)` (for the main thread: see
/// `interrupt` and `spawn_with_pid`; the kernel clears it on every change
/// of euid, egid, fsuid or fsgid).
fn die_with_tern(b: &mut Batch<'_>) {
    b.checked(
        Syscall::new(
            libc::SYS_prctl,
            [
                libc::PR_SET_PDEATHSIG as u64,
                libc::SIGKILL as u64,
                0,
                0,
                0,
                0,
            ],
        ),
        "setting the parent-death signal",
    );
}

/// Take the image's groups and filesystem ids in the main thread, so that
/// the files the restore opens for the process are opened as its user
/// would (a chain a user could have written: see `trust`).
fn fs_ids_of_image(
    c: &images::process::Creds,
    main: &mut Injector,
    pid: i32,
) -> Result<(), RestoreError> {
    let mut b = Batch::new(main)?;
    set_groups(&mut b, &c.groups, "taking the image's groups");
    let any = |_| Ok(());
    b.push(
        Syscall::new(libc::SYS_setfsgid, [c.gid[3] as u64, 0, 0, 0, 0, 0]).may_fail(),
        any,
    );
    b.push(
        Syscall::new(libc::SYS_setfsuid, [c.uid[3] as u64, 0, 0, 0, 0, 0]).may_fail(),
        any,
    );
    // setfsuid/setfsgid say only the old value: ask again.
    b.push(
        Syscall::new(libc::SYS_setfsuid, [u32::MAX as u64, 0, 0, 0, 0, 0]).may_fail(),
        any,
    );
    b.push(
        Syscall::new(libc::SYS_setfsgid, [u32::MAX as u64, 0, 0, 0, 0, 0]).may_fail(),
        any,
    );
    die_with_tern(&mut b);
    let r = b.run(main, pid)?;
    let (u, g) = (r[3], r[4]);
    if u != i64::from(c.uid[3]) || g != i64::from(c.gid[3]) {
        return Err(step::<String>(pid, "taking the image's filesystem ids")(
            format!(
                "fsuid {u}, fsgid {g} instead of {} and {}",
                c.uid[3], c.gid[3]
            ),
        ));
    }
    Ok(())
}

/// Add to `b` `setgroups(2)` of its thread.
fn set_groups(b: &mut Batch<'_>, groups: &[u32], what: &'static str) {
    let g: Vec<u8> = groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let a = b.data(if g.is_empty() { &[0u8; 4] } else { &g });
    b.checked(
        Syscall::new(libc::SYS_setgroups, [groups.len() as u64, a, 0, 0, 0, 0]),
        what,
    );
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Add to `b` `capset(2)` of its thread: header then two data words.
fn capset(b: &mut Batch<'_>, eff: u64, prm: u64, inh: u64, what: &'static str) {
    let mut d = Vec::with_capacity(32);
    d.extend_from_slice(&LINUX_CAPABILITY_VERSION_3.to_ne_bytes());
    d.extend_from_slice(&0i32.to_ne_bytes());
    for half in [0, 32] {
        for set in [eff, prm, inh] {
            // The low and high 32 bits of each set, on purpose.
            #[allow(clippy::cast_possible_truncation)]
            let word = (set >> half) as u32;
            d.extend_from_slice(&word.to_ne_bytes());
        }
    }
    let a = b.data(&d);
    b.checked(Syscall::new(libc::SYS_capset, [a, a + 8, 0, 0, 0, 0]), what);
}

/// The image's credentials in the thread `inj` holds, in one batch.
fn creds_in(
    c: &images::process::Creds,
    tern: &trust::Restorer,
    last_cap: u32,
    inj: &mut Injector,
    pid: i32,
) -> Result<(), RestoreError> {
    let mut b = Batch::new(inj)?;
    let prctl = |b: &mut Batch<'_>, args: [u64; 5], what: &'static str| {
        b.checked(
            Syscall::new(
                libc::SYS_prctl,
                [args[0], args[1], args[2], args[3], args[4], 0],
            ),
            what,
        );
    };
    // The bounding set first, while the thread still has CAP_SETPCAP.
    for cap in 0..=last_cap.min(63) {
        if c.cap_bnd & (1u64 << cap) == 0 {
            prctl(
                &mut b,
                [libc::PR_CAPBSET_DROP as u64, cap as u64, 0, 0, 0],
                "dropping a capability from the bounding set",
            );
        }
    }
    // The inheritable set while the permitted set is still whole (a process
    // may keep inheritable capabilities it no longer permits).
    capset(
        &mut b,
        tern.cap_prm,
        tern.cap_prm,
        c.cap_inh,
        "setting the inheritable capabilities",
    );
    set_groups(&mut b, &c.groups, "setgroups");
    b.checked(
        Syscall::new(
            libc::SYS_setresgid,
            [c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64, 0, 0, 0],
        ),
        "setresgid",
    );
    // setfsuid/setfsgid return the old id, never an error.
    b.push(
        Syscall::new(libc::SYS_setfsgid, [c.gid[3] as u64, 0, 0, 0, 0, 0]).may_fail(),
        |_| Ok(()),
    );
    // A non-root process that kept capabilities: keep them across the uid
    // change (the kernel would clear them).
    let keep = c.uid.iter().any(|&u| u != 0) && c.cap_prm != 0;
    if keep {
        prctl(
            &mut b,
            [libc::PR_SET_KEEPCAPS as u64, 1, 0, 0, 0],
            "PR_SET_KEEPCAPS",
        );
    }
    b.checked(
        Syscall::new(
            libc::SYS_setresuid,
            [c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64, 0, 0, 0],
        ),
        "setresuid",
    );
    b.push(
        Syscall::new(libc::SYS_setfsuid, [c.uid[3] as u64, 0, 0, 0, 0, 0]).may_fail(),
        |_| Ok(()),
    );
    capset(
        &mut b,
        c.cap_eff,
        c.cap_prm,
        c.cap_inh,
        "setting the capabilities",
    );
    prctl(
        &mut b,
        [
            libc::PR_CAP_AMBIENT as u64,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as u64,
            0,
            0,
            0,
        ],
        "clearing the ambient capabilities",
    );
    for cap in 0..64u64 {
        if c.cap_amb & (1 << cap) != 0 {
            prctl(
                &mut b,
                [
                    libc::PR_CAP_AMBIENT as u64,
                    libc::PR_CAP_AMBIENT_RAISE as u64,
                    cap,
                    0,
                    0,
                ],
                "raising an ambient capability",
            );
        }
    }
    if keep {
        prctl(
            &mut b,
            [libc::PR_SET_KEEPCAPS as u64, 0, 0, 0, 0],
            "PR_SET_KEEPCAPS",
        );
    }
    if c.no_new_privs {
        prctl(
            &mut b,
            [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
            "PR_SET_NO_NEW_PRIVS",
        );
    }
    b.run(inj, pid)?;
    Ok(())
}

/// Seccomp filters last, per thread, in the order they were installed.
fn seccomp(
    plan: &Plan,
    main: &mut Injector,
    others: &mut [(usize, Injector)],
    pid: i32,
    scratch: u64,
) -> Result<(), RestoreError> {
    let p = &plan.process;
    if p.threads.iter().all(|t| t.seccomp.is_empty()) {
        return Ok(());
    }
    let chains: Vec<(i32, Vec<sys::seccomp::SeccompFilter>)> = p
        .threads
        .iter()
        .map(|t| {
            (
                t.tid,
                t.seccomp
                    .iter()
                    .map(|&i| p.seccomp_filters[i].clone().into())
                    .collect(),
            )
        })
        .collect();
    let plan_s = sys::seccomp::group(&chains);
    for st in &plan_s.steps {
        let filter = &plan_s.filters[st.filter];
        let flags = filter.flags & sys::seccomp::SECCOMP_FILTER_FLAG_LOG
            | if st.tsync {
                sys::seccomp::SECCOMP_FILTER_FLAG_TSYNC
            } else {
                0
            };
        for &tid in st
            .threads
            .iter()
            .take(if st.tsync { 1 } else { usize::MAX })
        {
            let inj: &mut Injector = if tid == pid {
                &mut *main
            } else {
                match others.iter_mut().find(|(_, i)| i.tid() == tid) {
                    Some((_, i)) => i,
                    // Never silently: the thread would run without its filter.
                    None => {
                        return Err(RestoreError::Step {
                            pid,
                            step: "installing the seccomp filters",
                            what: format!(
                                "the restore holds no thread {tid} (a bug in tern); the process is not left running"
                            ),
                        });
                    }
                }
            };
            inj.ensure_scratch(Some(scratch))?;
            let insns = filter.insn_bytes();
            let n = u16::try_from(filter.insns.len()).map_err(|_| RestoreError::Step {
                pid,
                step: "installing a seccomp filter",
                what: format!(
                    "{} instructions, more than a filter holds",
                    filter.insns.len()
                ),
            })?;
            let off = insns.len().next_multiple_of(16) as u64;
            let base3 = put(inj, |at| {
                let mut b = insns.clone();
                b.resize(sys::usize_of(off), 0);
                b.extend_from_slice(&sys::seccomp::sock_fprog_bytes(at, n));
                b
            })?;
            let r = inj.syscall(
                libc::SYS_seccomp,
                [
                    sys::seccomp::SECCOMP_SET_MODE_FILTER as u64,
                    flags,
                    base3 + off,
                    0,
                    0,
                    0,
                ],
            )?;
            check(pid, "installing a seccomp filter", r)?;
            if tid != pid {
                inj.release_scratch()?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmap_ranges_span_gaps_but_never_a_kept_area() {
        let maps = [
            (0x1000, 0x2000),
            (0x3000, 0x4000),
            (0x5000, 0x6000), // kept
            (0x7000, 0x8000),
            (0x9000, 0xa000),
            (0xc000, 0xd000), // kept
            (0xe000, 0xf000),
        ];
        let keep = [(0x5000, 0x6000), (0xc000, 0xd000), (0xa800, 0xb000)];
        assert_eq!(
            unmap_ranges(maps.into_iter(), &keep),
            vec![(0x1000, 0x4000), (0x7000, 0xa000), (0xe000, 0xf000)]
        );
        assert_eq!(unmap_ranges([(0x5000, 0x6000)].into_iter(), &keep), vec![]);
    }

    #[test]
    fn a_mapped_file_identified_ahead_is_checked_again_once_changed() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("lib.so");
        std::fs::write(&path, b"first build").unwrap();
        let p = path.to_str().unwrap().to_string();
        let mut v = VmaRecord::anonymous(0x10000, 0x12000);
        v.name = Some(p.clone());
        v.inode = 1;
        v.perms = "r-xp".parse().unwrap();
        let (then, _) = sys::mapped_file::FileIdentity::of_path(&path)
            .unwrap()
            .unwrap();
        v.file = Some(then);
        let ahead: HashMap<String, IdentifiedFile> =
            [(p.clone(), identify(&p).expect("a regular file"))].into();
        // Unchanged: taken from what was identified ahead.
        assert!(check_mapped_files(d.path(), std::slice::from_ref(&v), &ahead).is_ok());
        // Rewritten since (same size, new time): identified again, refused.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"other build").unwrap();
        let e = check_mapped_files(d.path(), std::slice::from_ref(&v), &ahead)
            .expect_err("a changed file is refused");
        assert!(e.to_string().contains("not the file the dump saw"), "{e}");
        // Replaced by another file at the path: the same.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"first build").unwrap();
        let ahead: HashMap<String, IdentifiedFile> =
            [(p.clone(), identify(&p).expect("a regular file"))].into();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"third build").unwrap();
        assert!(check_mapped_files(d.path(), std::slice::from_ref(&v), &ahead).is_err());
    }

    #[test]
    fn anonymous_vma_names_are_read_from_the_maps_name() {
        let mut v = VmaRecord::anonymous(0x10000, 0x12000);
        assert_eq!(anon_name(&v), None);
        v.name = Some("[anon:jit code]".into());
        assert_eq!(anon_name(&v), Some("jit code"));
        v.name = Some("[anon_shmem:ring]".into());
        assert_eq!(anon_name(&v), Some("ring"));
        for other in ["[heap]", "[stack]", "/usr/lib/x.so", "[anon:unterminated"] {
            v.name = Some(other.into());
            assert_eq!(anon_name(&v), None, "{other}");
        }
    }
}
