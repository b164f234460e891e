//! The eBPF dirty stream: tracepoint programs (crate `tracker-ebpf`, built by
//! `build.rs` and embedded here) that record, for one target process,
//!
//! - which pages it write-faults on, user and kernel mode apart, one record
//!   per fault (repeats counted into a hot-page ranking here) —
//!   `exceptions:page_fault_{user,kernel}`, x86 only;
//! - its address-space changes: successful `mmap`, `munmap`, `mremap`, `brk`,
//!   `madvise`, with their arguments and result — `syscalls:sys_{enter,exit}_*`;
//! - its thread creations and exits — `task:task_newtask`, `sched:sched_process_exit`.
//!
//! It is an accelerator and a telemetry source, not the truth (README,
//! Invariants, 2): a fault shows only the *first* write to a page that is not
//! writable at that moment (not present, COW, write-protected by uffd-WP or
//! soft-dirty clearing); writes through an already writable PTE and writes that
//! fault nowhere (GUP, `process_vm_writev`, io_uring, O_DIRECT) do not appear,
//! and the tracepoint fires *before* the store lands.
//!
//! # Draining
//!
//! Faults go to the ring buffer `FAULTS` (32 MiB: 2M faults between two
//! drains), address-space and thread events to `EVENTS`. A drain reads both
//! rings up to their producer position; a fault that races with it is read by
//! the next drain, so none is lost unless a ring fills up, which the programs
//! count. A ring and not a per-page hash map, because the fault path is the
//! target's time: a sequential 16-byte write costs it ~0.25 us per fault here,
//! a hash-table insert into a 1M-bucket table ~0.85 us (preallocated) to
//! ~1.5 us (not preallocated), against ~1.2-2 us for the write-protect fault
//! itself.
//! Counters are monotonic per-CPU values; a drain reports the difference to
//! the previous drain's snapshot, kept in a map so it survives pinning.
//!
//! # Logging
//!
//! A drop (a full ring buffer or `PENDING` map) is counted in
//! [`EbpfRound::lost`] and also logged by the programs with aya-log-ebpf (the
//! 1st, 2nd, 4th, ... drop of each kind on each CPU). A drain forwards those
//! records through aya-log to the `log` facade, which tern's `tracing`
//! subscriber receives: warnings with target `tracker::ebpf`.
//!
//! # Layouts
//!
//! The records, event kinds, counter slots and tracepoint field offsets are
//! written once, in `tracker-common`, used by both sides. The programs read
//! tracepoint records at fixed offsets: before loading them, the offsets are
//! checked against tracefs's `format` files of the running kernel, and a
//! moved field is an [`EbpfError::FormatMismatch`] naming it.
//!
//! # Pinning
//!
//! [`PinMode::Dir`] pins the maps and the tracepoint links in a bpffs
//! directory: the programs keep recording after this process exits, and a
//! later [`DirtyStream::open`] with the same directory and pid reuses them
//! (the ring buffer's consumer position lives in the kernel, so nothing is
//! read twice). [`DirtyStream::close_and_unpin`] removes them.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, links::FdLink},
};
use aya_log::EbpfLogger;
use tracker_common::{
    EVENT_SIZE, Event, FAULT_RECORD_SIZE, KEY_KERNEL, counter, event,
    tracepoint::{self, FieldName, Layout},
};

/// The eBPF object built by `build.rs` from `tracker-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracker-ebpf"));

// ---- layouts shared with tracker-ebpf: crate tracker-common ---------------

const N_COUNTERS: usize = counter::N as usize;

/// `STATE` array slots (userspace only): `[0, N_COUNTERS)` counter baselines.
const S_MAGIC: u32 = 16;
const S_PID: u32 = 17;
const S_START_TIME: u32 = 18;
const S_FLAGS: u32 = 19;
/// Id of [`LOG_PROGRAM`], for attaching aya-log to a reused pinned stream.
const S_LOG_PROGRAM: u32 = 20;
/// "tern-eb2": layout version of the pinned objects.
const STATE_MAGIC: u64 = 0x7465_726e_2d65_6232;
const FLAG_FAULTS: u64 = 1;

/// Twice what the FAULTS ring holds.
const MAX_FAULTS_PER_DRAIN: usize = 1 << 22;

const MAP_NAMES: [&str; 6] = ["TARGET", "FAULTS", "PENDING", "COUNTERS", "EVENTS", "STATE"];

/// The programs: one per tracepoint, named after it.
const PROGRAMS: [Layout; 14] = tracepoint::LAYOUTS;

/// A program that logs (aya-log) and is attached on every kernel: through it
/// a reused pinned stream finds its log ring buffer.
const LOG_PROGRAM: &str = "sys_enter_mmap";

/// Number of entries in [`EbpfRound::hot`].
pub const HOT_PAGES: usize = 64;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const TRACEFS_MAGIC: i64 = 0x7472_6163;

// ---- public API ------------------------------------------------------------

/// Why the dirty stream could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this binary was built without the eBPF programs (TERN_SKIP_EBPF_BUILD=1); \
         run `cargo xtask setup` and rebuild"
    )]
    NotBuilt,
    #[error("process {0} does not exist")]
    NoSuchProcess(i32),
    #[error("tracefs is not available ({0}); it is needed to attach tracepoints")]
    Tracefs(String),
    #[error("bpffs is not available at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("tracepoint {0} does not exist on this kernel")]
    MissingTracepoint(String),
    #[error(
        "tracepoint {tracepoint}, field {field}: the eBPF programs read {expected_size} bytes at \
         offset {expected_offset}, but this kernel's tracefs format {}; this kernel lays the \
         record out differently from what tern was built for: run without the eBPF stream \
         (--no-ebpf; the kernel's dirty bits alone are exact)",
        match found {
            Some((offset, size)) => format!("has it at offset {offset} ({size} bytes)"),
            None => "has no such field".to_string(),
        }
    )]
    FormatMismatch {
        /// `category:name`.
        tracepoint: String,
        /// The field's name (`argument I (name)` for a syscall argument).
        field: String,
        expected_offset: usize,
        expected_size: usize,
        /// Offset and size in this kernel's format, if it has the field.
        found: Option<(usize, usize)>,
    },
    #[error(
        "permission denied while {what}: loading and attaching eBPF tracepoint programs needs \
         root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) and a kernel that allows it \
         (kernel.unprivileged_bpf_disabled, lockdown=confidentiality, LSMs): {detail}"
    )]
    Permission { what: String, detail: String },
    #[error("{what}: {detail}")]
    Bpf {
        what: String,
        detail: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "pin directory {} holds the dirty stream of pid {pinned}, not of pid {requested}; \
         close it first or use another directory",
        dir.display()
    )]
    PinnedForOtherTarget {
        dir: PathBuf,
        pinned: i32,
        requested: i32,
    },
    #[error("the TARGET map is full: cannot add pid {0}")]
    MapFull(i32),
}

/// Whether and where [`DirtyStream::open`] pins the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinMode {
    /// The stream lives as long as the [`DirtyStream`].
    None,
    /// Pin maps and links in this directory (on bpffs, e.g. `/sys/fs/bpf/tern/PID`);
    /// the stream outlives this process until [`DirtyStream::close_and_unpin`].
    Dir(PathBuf),
}

/// The conventional pin directory of the stream of `pid`: `/sys/fs/bpf/tern/PID`.
pub fn default_pin_dir(pid: i32) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/tern/{pid}"))
}

/// What changed the target's address space (see [`VmaChange::args`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum VmaChangeKind {
    Mmap,
    Munmap,
    Mremap,
    Brk,
    Madvise,
}

/// One successful address-space syscall of the target (failed calls are not
/// reported; neither is `brk(0)`).
///
/// `args` holds the first four syscall arguments and, in `args[4]`, the
/// return value:
///
/// | kind    | args[0]  | args[1] | args[2] | args[3] | args[4]        |
/// |---------|----------|---------|---------|---------|----------------|
/// | Mmap    | addr     | len     | prot    | flags   | mapped address |
/// | Munmap  | addr     | len     | 0       | 0       | 0              |
/// | Mremap  | old addr | old len | new len | flags   | new address    |
/// | Brk     | new brk  | 0       | 0       | 0       | resulting brk  |
/// | Madvise | addr     | len     | advice  | 0       | 0              |
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmaChange {
    pub kind: VmaChangeKind,
    pub tid: u32,
    pub args: [u64; 5],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ThreadEventKind {
    /// A new thread of the target (`tid` is the new thread's id).
    Created,
    /// A thread of the target exited (`tid == pid`: the main thread).
    Exited,
    /// The target forked a child process (`tid` is the child's pid); the
    /// child is not tracked.
    ChildProcess,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThreadEvent {
    pub kind: ThreadEventKind,
    pub tid: u32,
}

/// Everything recorded between two drains.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EbpfRound {
    /// Sorted unique page addresses written (user and kernel faults).
    pub pages: Vec<u64>,
    /// How many of `pages` took a user-mode write fault.
    pub user_pages: usize,
    /// How many of `pages` took a kernel-mode write fault (`copy_to_user` & co.).
    pub kernel_pages: usize,
    /// Sorted pages that took a kernel-mode write fault.
    pub kernel_fault_pages: Vec<u64>,
    /// Top [`HOT_PAGES`] pages by write-fault count, descending.
    pub hot: Vec<(u64, u32)>,
    /// Total write faults counted (user + kernel).
    pub write_faults: u64,
    pub vma_changes: Vec<VmaChange>,
    pub thread_events: Vec<ThreadEvent>,
    /// Pages or events dropped because a map or the ring buffer was full.
    /// The programs also log drops (aya-log, warnings with target
    /// `tracker::ebpf`), which a drain forwards to the `log`/`tracing` logger.
    pub lost: u64,
}

/// The aya-log reader: forwards what the programs log to the `log` facade
/// (which tern's `tracing` subscriber receives).
type Logger = EbpfLogger<&'static dyn log::Log>;

/// A loaded, attached dirty stream for one target process.
pub struct DirtyStream {
    pid: i32,
    pin_dir: Option<PathBuf>,
    tracks_faults: bool,
    /// Kept for [`PinMode::None`]: the programs own their links.
    _bpf: Option<Ebpf>,
    /// One 8-byte record per write fault (`page | KEY_KERNEL`).
    faults: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    state: Array<MapData, u64>,
    events: RingBuf<MapData>,
    /// What the programs log (drops); `None` only for a reused pinned stream
    /// whose log ring could not be found (warned about at open).
    logger: Option<Logger>,
    page_mask: u64,
}

impl std::fmt::Debug for DirtyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyStream")
            .field("pid", &self.pid)
            .field("pin_dir", &self.pin_dir)
            .field("tracks_faults", &self.tracks_faults)
            .finish_non_exhaustive()
    }
}

impl DirtyStream {
    /// Load + attach for target `pid` (mount tracefs at /sys/kernel/tracing
    /// and bpffs at /sys/fs/bpf if missing; do not fail on RLIMIT_MEMLOCK).
    /// PinMode::Dir: pin maps and links there so the stream keeps recording
    /// after this process exits, and on a later call reuse the pinned ones
    /// instead of loading anew (this is how separate `tern pre-dump`
    /// invocations share one stream). A directory left by a target that no
    /// longer exists (pid gone or reused) is cleaned and loaded anew; one that
    /// belongs to another live pid is an error.
    pub fn open(pid: i32, pin: PinMode) -> Result<DirtyStream, EbpfError> {
        check_built()?;
        let start_time = process_start_time(pid)?;
        let tracefs = ensure_tracefs()?;
        raise_memlock();
        match pin {
            PinMode::None => Self::load(pid, start_time, &tracefs, None),
            PinMode::Dir(dir) => {
                ensure_bpffs(&dir)?;
                if dir.join("STATE").exists() {
                    match Self::reuse(pid, start_time, &dir)? {
                        Some(stream) => return Ok(stream),
                        None => remove_pins(&dir)?,
                    }
                } else {
                    // Leftovers of an open that died half-way.
                    remove_pins(&dir)?;
                }
                Self::load(pid, start_time, &tracefs, Some(dir))
            }
        }
    }

    /// Everything recorded since the previous drain (or open), then reset.
    pub fn drain(&mut self) -> Result<EbpfRound, EbpfError> {
        // Events first: they are ordered, and cheap.
        let mut vma_changes = Vec::new();
        let mut thread_events = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(ev) = decode_event(&item) {
                match ev {
                    Decoded::Vma(v) => vma_changes.push(v),
                    Decoded::Thread(t) => thread_events.push(t),
                }
            }
        }

        // Then the fault log, up to where it was when we started: records
        // that arrive while we read belong to the next round.
        // The cap keeps a drain finite even against a producer as fast as
        // the reader; what is left stays for the next drain.
        let mut entries = Vec::new();
        while entries.len() < MAX_FAULTS_PER_DRAIN
            && let Some(item) = self.faults.next()
        {
            if let Ok(bytes) = <[u8; FAULT_RECORD_SIZE]>::try_from(&item[..]) {
                entries.push((u64::from_ne_bytes(bytes), 1));
            }
        }

        // Counters: difference to the previous drain's snapshot.
        let mut now = [0u64; N_COUNTERS];
        for (i, slot) in (0u32..).zip(now.iter_mut()) {
            let values = self
                .counters
                .get(&i, 0)
                .map_err(|e| bpf_err("reading the COUNTERS map", e))?;
            *slot = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
        let mut delta = [0u64; N_COUNTERS];
        for (i, (d, n)) in (0u32..).zip(delta.iter_mut().zip(now)) {
            let before = self
                .state
                .get(&i, 0)
                .map_err(|e| bpf_err("reading the STATE map", e))?;
            *d = n.wrapping_sub(before);
            self.state
                .set(i, n, 0)
                .map_err(|e| bpf_err("updating the STATE map", e))?;
        }

        let mut round = build_round(entries, self.page_mask);
        round.vma_changes = vma_changes;
        round.thread_events = thread_events;
        let d = |slot: u32| delta[slot as usize];
        round.write_faults = d(counter::USER_WRITE_FAULTS) + d(counter::KERNEL_WRITE_FAULTS);
        round.lost = d(counter::PAGES_LOST) + d(counter::EVENTS_LOST) + d(counter::PENDING_LOST);
        // Last: the warnings of the drops counted above.
        self.flush_log();
        Ok(round)
    }

    /// Forward what the programs logged since the last flush to the `log`
    /// facade (`tracing`, in tern). [`DirtyStream::drain`] does it too.
    pub fn flush_log(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// Detach and remove the pinned objects (teardown). For an unpinned
    /// stream this just detaches.
    pub fn close_and_unpin(mut self) -> Result<(), EbpfError> {
        self.flush_log();
        let dir = self.pin_dir.clone();
        drop(self);
        if let Some(dir) = dir {
            remove_pins(&dir)?;
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(EbpfError::Io {
                        what: format!("removing the pin directory {}", dir.display()),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// For `tern check`: can tracepoint programs be loaded and attached here?
    /// Loads every program (so the verifier accepts them on this kernel),
    /// checks the tracepoint field layouts, attaches and detaches one syscall
    /// and (where it exists) one fault tracepoint, with no target: nothing is
    /// recorded and nothing stays loaded. The only lasting effect: tracefs is
    /// mounted if it was not. `Ok` even without the x86-only fault tracepoints
    /// (see [`DirtyStream::fault_tracepoints_available`]).
    pub fn probe() -> Result<(), EbpfError> {
        check_built()?;
        let tracefs = ensure_tracefs()?;
        raise_memlock();
        let faults = fault_tracepoints_exist(&tracefs);
        check_formats(&tracefs, faults)?;
        let mut bpf = load_object()?;
        load_programs(&mut bpf)?;
        for name in ["sys_enter_munmap", "page_fault_user"] {
            if name == "page_fault_user" && !faults {
                continue;
            }
            let (cat, tp) = PROGRAMS
                .iter()
                .find(|p| p.name == name)
                .map(|p| (p.category, p.name))
                .ok_or_else(|| missing(&format!("program {name}")))?;
            let prog = tracepoint(&mut bpf, name)?;
            let id = prog
                .attach(cat, tp)
                .map_err(|e| bpf_err(&format!("attaching to {cat}:{tp}"), e))?;
            prog.detach(id)
                .map_err(|e| bpf_err(&format!("detaching from {cat}:{tp}"), e))?;
        }
        Ok(())
    }

    /// Does this kernel have the write-fault tracepoints
    /// (`exceptions:page_fault_user`, x86 only)? Without them a stream still
    /// reports address-space and thread events, but no pages.
    pub fn fault_tracepoints_available() -> Result<bool, EbpfError> {
        let tracefs = ensure_tracefs()?;
        Ok(fault_tracepoints_exist(&tracefs))
    }

    /// The target process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Where the stream is pinned, if it is.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Whether pages are recorded (false where the fault tracepoints do not exist).
    pub fn tracks_faults(&self) -> bool {
        self.tracks_faults
    }

    fn load(
        pid: i32,
        start_time: u64,
        tracefs: &Path,
        pin_dir: Option<PathBuf>,
    ) -> Result<DirtyStream, EbpfError> {
        let faults = fault_tracepoints_exist(tracefs);
        check_formats(tracefs, faults)?;
        let mut bpf = load_object()?;
        // Takes the programs' log ring buffer (AYA_LOGS) out of `bpf`.
        let logger =
            EbpfLogger::init(&mut bpf).map_err(|e| bpf_err("opening the eBPF log (aya-log)", e))?;
        load_programs(&mut bpf)?;
        let log_program = tracepoint(&mut bpf, LOG_PROGRAM)?
            .info()
            .map_err(|e| bpf_err(&format!("reading the id of program {LOG_PROGRAM}"), e))?
            .id();

        let mut state = bpf.take_map("STATE").ok_or_else(|| missing("STATE map"))?;
        let mut target = bpf
            .take_map("TARGET")
            .ok_or_else(|| missing("TARGET map"))?;
        {
            let mut state: Array<&mut MapData, u64> =
                Array::try_from(&mut state).map_err(|e| bpf_err("opening the STATE map", e))?;
            let meta = [
                (S_MAGIC, STATE_MAGIC),
                (S_PID, pid as u64),
                (S_START_TIME, start_time),
                (S_FLAGS, if faults { FLAG_FAULTS } else { 0 }),
                (S_LOG_PROGRAM, u64::from(log_program)),
            ];
            for (slot, value) in meta {
                state
                    .set(slot, value, 0)
                    .map_err(|e| bpf_err("initialising the STATE map", e))?;
            }
            let mut target: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(&mut target)
                .map_err(|e| bpf_err("opening the TARGET map", e))?;
            target.insert(pid as u32, 1, 0).map_err(|e| {
                if is_errno(&e, libc::E2BIG) {
                    EbpfError::MapFull(pid)
                } else {
                    bpf_err("adding the target to the TARGET map", e)
                }
            })?;
        }

        let result =
            Self::attach_and_finish(pid, faults, bpf, state, target, logger, pin_dir.clone());
        if result.is_err()
            && let Some(dir) = &pin_dir
        {
            let _ = remove_pins(dir);
        }
        result
    }

    fn attach_and_finish(
        pid: i32,
        faults: bool,
        mut bpf: Ebpf,
        state: Map,
        target: Map,
        logger: Logger,
        pin_dir: Option<PathBuf>,
    ) -> Result<DirtyStream, EbpfError> {
        for Layout {
            category: cat,
            name,
            fault,
            ..
        } in PROGRAMS
        {
            if fault && !faults {
                continue;
            }
            let tp = name;
            let prog = tracepoint(&mut bpf, name)?;
            let id = prog
                .attach(cat, tp)
                .map_err(|e| bpf_err(&format!("attaching to tracepoint {cat}:{tp}"), e))?;
            if let Some(dir) = &pin_dir {
                let link = prog
                    .take_link(id)
                    .map_err(|e| bpf_err("taking a tracepoint link", e))?;
                let link = FdLink::try_from(link).map_err(|e| {
                    bpf_err(
                        "this kernel cannot pin tracepoint links (BPF perf links need Linux 5.15+)",
                        e,
                    )
                })?;
                let path = dir.join(link_pin_name(name));
                link.pin(&path)
                    .map_err(|e| bpf_err(&format!("pinning {}", path.display()), e))?;
            }
        }

        let fault_log: Map = bpf
            .take_map("FAULTS")
            .ok_or_else(|| missing("FAULTS map"))?;
        let pending: Map = bpf
            .take_map("PENDING")
            .ok_or_else(|| missing("PENDING map"))?;
        let counters: Map = bpf
            .take_map("COUNTERS")
            .ok_or_else(|| missing("COUNTERS map"))?;
        let events: Map = bpf
            .take_map("EVENTS")
            .ok_or_else(|| missing("EVENTS map"))?;

        if let Some(dir) = &pin_dir {
            let pin = |name: &str, r: Result<(), aya::pin::PinError>| {
                r.map_err(|e| bpf_err(&format!("pinning {}", dir.join(name).display()), e))
            };
            pin("TARGET", target.pin(dir.join("TARGET")))?;
            pin("FAULTS", fault_log.pin(dir.join("FAULTS")))?;
            pin("PENDING", pending.pin(dir.join("PENDING")))?;
            pin("COUNTERS", counters.pin(dir.join("COUNTERS")))?;
            pin("EVENTS", events.pin(dir.join("EVENTS")))?;
            // Last: its presence marks a complete pin directory.
            pin("STATE", state.pin(dir.join("STATE")))?;
        }

        Ok(DirtyStream {
            pid,
            tracks_faults: faults,
            _bpf: if pin_dir.is_some() { None } else { Some(bpf) },
            pin_dir,
            faults: RingBuf::try_from(fault_log)
                .map_err(|e| bpf_err("opening the FAULTS map", e))?,
            counters: PerCpuArray::try_from(counters)
                .map_err(|e| bpf_err("opening the COUNTERS map", e))?,
            state: Array::try_from(state).map_err(|e| bpf_err("opening the STATE map", e))?,
            events: RingBuf::try_from(events).map_err(|e| bpf_err("opening the EVENTS map", e))?,
            logger: Some(logger),
            page_mask: !(page_size() - 1),
        })
    }

    /// `Ok(None)`: the directory is stale (its target is gone) or incomplete.
    fn reuse(pid: i32, start_time: u64, dir: &Path) -> Result<Option<DirtyStream>, EbpfError> {
        let state: Array<MapData, u64> = match from_pin(dir, "STATE") {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        let get = |slot| state.get(&slot, 0).unwrap_or(0);
        if get(S_MAGIC) != STATE_MAGIC {
            return Ok(None);
        }
        // A value that is no PID is a damaged pin: load anew.
        let Ok(pinned) = i32::try_from(get(S_PID)) else {
            return Ok(None);
        };
        if pinned != pid {
            if process_start_time(pinned).ok() == Some(get(S_START_TIME)) {
                return Err(EbpfError::PinnedForOtherTarget {
                    dir: dir.to_path_buf(),
                    pinned,
                    requested: pid,
                });
            }
            return Ok(None);
        }
        if get(S_START_TIME) != start_time {
            // Same pid, another process.
            return Ok(None);
        }
        let faults = get(S_FLAGS) & FLAG_FAULTS != 0;
        let complete = MAP_NAMES.iter().all(|m| dir.join(m).exists())
            && PROGRAMS
                .iter()
                .filter(|p| faults || !p.fault)
                .all(|p| dir.join(link_pin_name(p.name)).exists());
        if !complete {
            return Ok(None);
        }
        let target: BpfHashMap<MapData, u32, u32> = from_pin(dir, "TARGET")?;
        if target.get(&(pid as u32), 0).is_err() {
            return Ok(None);
        }
        // The log ring buffer is not pinned: the pinned programs hold it,
        // and aya-log finds it through one of them.
        // No program has id 0: a damaged slot only loses the programs' logs.
        let log_program = u32::try_from(get(S_LOG_PROGRAM)).unwrap_or(0);
        let logger = match EbpfLogger::init_from_id(log_program) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!(
                    "pinned eBPF stream in {}: cannot read what its programs log \
                     (program {LOG_PROGRAM}, id {log_program}): {e}; drops are still counted",
                    dir.display()
                );
                None
            }
        };
        Ok(Some(DirtyStream {
            pid,
            pin_dir: Some(dir.to_path_buf()),
            tracks_faults: faults,
            _bpf: None,
            faults: from_pin(dir, "FAULTS")?,
            counters: from_pin(dir, "COUNTERS")?,
            state,
            events: from_pin(dir, "EVENTS")?,
            logger,
            page_mask: !(page_size() - 1),
        }))
    }
}

// ---- helpers ---------------------------------------------------------------

enum Decoded {
    Vma(VmaChange),
    Thread(ThreadEvent),
}

fn decode_event(raw: &[u8]) -> Option<Decoded> {
    let raw = raw.get(..EVENT_SIZE)?;
    // SAFETY: `raw` holds EVENT_SIZE == size_of::<Event>() bytes, read
    // unaligned, and `Event` is `aya::Pod` (integers only, no padding): every
    // bit pattern is a valid `Event`.
    let Event { kind, tid, args } = unsafe { raw.as_ptr().cast::<Event>().read_unaligned() };
    let vma = |kind| Some(Decoded::Vma(VmaChange { kind, tid, args }));
    let thread = |kind| Some(Decoded::Thread(ThreadEvent { kind, tid }));
    match kind {
        event::MMAP => vma(VmaChangeKind::Mmap),
        event::MUNMAP => vma(VmaChangeKind::Munmap),
        event::MREMAP => vma(VmaChangeKind::Mremap),
        event::BRK => vma(VmaChangeKind::Brk),
        event::MADVISE => vma(VmaChangeKind::Madvise),
        event::THREAD_CREATED => thread(ThreadEventKind::Created),
        event::THREAD_EXITED => thread(ThreadEventKind::Exited),
        event::CHILD_PROCESS => thread(ThreadEventKind::ChildProcess),
        _ => None,
    }
}

/// Turn drained `(key, count)` pairs into a round (pages, counts, hot list).
fn build_round(entries: Vec<(u64, u64)>, page_mask: u64) -> EbpfRound {
    let mut items: Vec<(u64, u64, bool)> = entries
        .into_iter()
        .map(|(key, count)| (key & !0xfff & page_mask, count, key & KEY_KERNEL != 0))
        .collect();
    items.sort_unstable_by_key(|i| i.0);
    let mut round = EbpfRound::default();
    let mut counts: Vec<(u64, u64)> = Vec::with_capacity(items.len());
    let (mut last_user, mut last_kernel) = (None, None);
    for (page, count, kernel) in items {
        match counts.last_mut() {
            Some(last) if last.0 == page => last.1 += count,
            _ => counts.push((page, count)),
        }
        if kernel {
            if last_kernel != Some(page) {
                round.kernel_fault_pages.push(page);
                last_kernel = Some(page);
            }
        } else if last_user != Some(page) {
            round.user_pages += 1;
            last_user = Some(page);
        }
    }
    round.kernel_pages = round.kernel_fault_pages.len();
    let mut hot: Vec<(u64, u32)> = counts
        .iter()
        .map(|&(p, c)| (p, u32::try_from(c).unwrap_or(u32::MAX)))
        .collect();
    let by_heat = |a: &(u64, u32), b: &(u64, u32)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    if hot.len() > HOT_PAGES {
        hot.select_nth_unstable_by(HOT_PAGES - 1, by_heat);
        hot.truncate(HOT_PAGES);
    }
    hot.sort_unstable_by(by_heat);
    round.hot = hot;
    round.pages = counts.into_iter().map(|c| c.0).collect();
    round
}

fn check_built() -> Result<(), EbpfError> {
    if OBJECT.is_empty() {
        Err(EbpfError::NotBuilt)
    } else {
        Ok(())
    }
}

fn load_object() -> Result<Ebpf, EbpfError> {
    Ebpf::load(OBJECT).map_err(|e| bpf_err("loading the eBPF object", e))
}

fn tracepoint<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut TracePoint, EbpfError> {
    let prog = bpf
        .program_mut(name)
        .ok_or_else(|| missing(&format!("program {name}")))?;
    prog.try_into()
        .map_err(|e| bpf_err(&format!("program {name} is not a tracepoint"), e))
}

fn load_programs(bpf: &mut Ebpf) -> Result<(), EbpfError> {
    for Layout { name, .. } in PROGRAMS {
        tracepoint(bpf, name)?
            .load()
            .map_err(|e| bpf_err(&format!("loading eBPF program {name}"), e))?;
    }
    Ok(())
}

fn from_pin<M>(dir: &Path, name: &str) -> Result<M, EbpfError>
where
    M: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    let what = || format!("opening the pinned map {}", path.display());
    let data = MapData::from_pin(&path).map_err(|e| bpf_err(&what(), e))?;
    let map = Map::from_map_data(data).map_err(|e| bpf_err(&what(), e))?;
    M::try_from(map).map_err(|e| bpf_err(&what(), e))
}

fn link_pin_name(program: &str) -> String {
    format!("link_{program}")
}

/// Remove every object of ours from `dir` (not the directory).
fn remove_pins(dir: &Path) -> Result<(), EbpfError> {
    let names = PROGRAMS
        .iter()
        .map(|p| link_pin_name(p.name))
        .chain(MAP_NAMES.iter().map(|m| m.to_string()));
    for name in names {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(EbpfError::Io {
                    what: format!("removing the pinned object {}", path.display()),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

fn missing(what: &str) -> EbpfError {
    EbpfError::Bpf {
        what: format!("the embedded eBPF object has no {what}"),
        detail: "tracker and tracker-ebpf are out of sync".into(),
        source: "missing object".into(),
    }
}

/// Wrap an aya error; permission problems get their own variant.
fn bpf_err<E: std::error::Error + Send + Sync + 'static>(what: &str, e: E) -> EbpfError {
    let mut detail = e.to_string();
    let mut denied = false;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            denied = true;
        }
        if let Some(src) = err.source() {
            let s = src.to_string();
            if !detail.contains(&s) {
                detail.push_str(": ");
                detail.push_str(&s);
            }
        }
        cur = err.source();
    }
    if denied {
        EbpfError::Permission {
            what: what.to_string(),
            detail,
        }
    } else {
        EbpfError::Bpf {
            what: what.to_string(),
            detail,
            source: Box::new(e),
        }
    }
}

fn is_errno(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(errno)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let s = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if s > 0 { s as u64 } else { 4096 }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks): tells a process
/// from a later one with the same pid.
fn process_start_time(pid: i32) -> Result<u64, EbpfError> {
    if pid <= 0 {
        return Err(EbpfError::NoSuchProcess(pid));
    }
    sys::proc::stat(pid, None)
        .map(|st| st.starttime)
        .map_err(|_| EbpfError::NoSuchProcess(pid))
}

fn raise_memlock() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Kernels >= 5.11 account BPF memory to the memcg and ignore this limit;
    // older ones need it raised. Failing to raise it is not an error.
    let inf = libc::RLIM_INFINITY;
    if setrlimit(Resource::RLIMIT_MEMLOCK, inf, inf).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK)
    {
        let _ = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard);
    }
}

/// The file system type (`f_type` of statfs(2)) of what `path` is on.
fn fs_magic(path: &Path) -> Option<i64> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    #[allow(clippy::useless_conversion)] // __fsword_t is i64 on the 64-bit targets, not everywhere
    Some(i64::from(st.filesystem_type().0))
}

fn mount(fstype: &str, target: &Path) -> io::Result<()> {
    let src = if fstype == "bpf" { "bpf" } else { "nodev" };
    nix::mount::mount(
        Some(src),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Where tracefs is; mounts it at /sys/kernel/tracing if it is nowhere.
fn ensure_tracefs() -> Result<PathBuf, EbpfError> {
    let candidates = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    for c in candidates {
        let p = Path::new(c);
        if p.join("events").is_dir() {
            return Ok(p.to_path_buf());
        }
    }
    let p = Path::new(candidates[0]);
    if !p.is_dir() {
        return Err(EbpfError::Tracefs(format!(
            "{} does not exist: is the kernel built with CONFIG_TRACING?",
            p.display()
        )));
    }
    match mount("tracefs", p) {
        Ok(()) if fs_magic(p) == Some(TRACEFS_MAGIC) && p.join("events").is_dir() => {
            Ok(p.to_path_buf())
        }
        Ok(()) => Err(EbpfError::Tracefs(format!(
            "mounted tracefs at {} but it has no events/ directory",
            p.display()
        ))),
        Err(e) => Err(EbpfError::Tracefs(format!(
            "not mounted, and `mount -t tracefs nodev {}` failed: {e}",
            p.display()
        ))),
    }
}

/// Make `dir` exist on a bpffs; mounts bpffs at /sys/fs/bpf first if `dir`
/// is under it and it is not mounted.
fn ensure_bpffs(dir: &Path) -> Result<(), EbpfError> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && fs_magic(root) != Some(BPF_FS_MAGIC) {
        mount("bpf", root).map_err(|e| EbpfError::Bpffs {
            path: root.to_path_buf(),
            reason: format!(
                "not mounted, and `mount -t bpf bpf {}` failed: {e}",
                root.display()
            ),
        })?;
    }
    fs::create_dir_all(dir).map_err(|e| EbpfError::Bpffs {
        path: dir.to_path_buf(),
        reason: format!("cannot create the directory: {e}"),
    })?;
    if fs_magic(dir) != Some(BPF_FS_MAGIC) {
        return Err(EbpfError::Bpffs {
            path: dir.to_path_buf(),
            reason: "not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)"
                .into(),
        });
    }
    Ok(())
}

fn fault_tracepoints_exist(tracefs: &Path) -> bool {
    ["page_fault_user", "page_fault_kernel"]
        .iter()
        .all(|n| tracefs.join("events/exceptions").join(n).is_dir())
}

/// One field of a tracepoint's `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FormatField {
    name: String,
    offset: usize,
    size: usize,
}

/// The fields of a tracepoint `format` file (lines
/// `field:unsigned long address;\toffset:8;\tsize:8;\tsigned:0;`), in order.
/// Lines that do not parse are skipped: a field the programs read and that is
/// not found is reported as missing by [`check_format`].
fn parse_format(text: &str) -> Vec<FormatField> {
    let mut fields = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';');
        let decl = parts.next().unwrap_or("").trim();
        let (mut offset, mut size) = (None, None);
        for part in parts {
            let part = part.trim();
            if let Some(o) = part.strip_prefix("offset:") {
                offset = o.trim().parse().ok();
            } else if let Some(z) = part.strip_prefix("size:") {
                size = z.trim().parse().ok();
            }
        }
        // `unsigned long address`, `char comm[16]`, `const char * name`.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("");
        if let (Some(offset), Some(size), false) = (offset, size, name.is_empty()) {
            fields.push(FormatField {
                name: name.to_string(),
                offset,
                size,
            });
        }
    }
    fields
}

/// Check one tracepoint's `format` text against the fields the programs
/// read in it: each must be where they read it, and as wide.
fn check_format(layout: &Layout, text: &str) -> Result<(), EbpfError> {
    let fields = parse_format(text);
    // Syscall arguments: the fields after `__syscall_nr`.
    let args: Vec<&FormatField> = fields
        .iter()
        .skip_while(|f| f.name != "__syscall_nr")
        .skip(1)
        .collect();
    for want in layout.fields {
        let (label, found) = match want.name {
            FieldName::Named(name) => (format!("`{name}`"), fields.iter().find(|f| f.name == name)),
            FieldName::SyscallArg(i) => {
                let found = args.get(i).copied();
                let label = match found {
                    Some(f) => format!("argument {i} (`{}`)", f.name),
                    None => format!("argument {i}"),
                };
                (label, found)
            }
        };
        let found = found.map(|f| (f.offset, f.size));
        if found != Some((want.offset, want.size)) {
            return Err(EbpfError::FormatMismatch {
                tracepoint: format!("{}:{}", layout.category, layout.name),
                field: label,
                expected_offset: want.offset,
                expected_size: want.size,
                found,
            });
        }
    }
    Ok(())
}

/// The eBPF programs read tracepoint records at fixed offsets
/// (`tracker_common::tracepoint`); make sure this kernel lays them out that
/// way, before loading them. `faults`: the fault tracepoints are used.
fn check_formats(tracefs: &Path, faults: bool) -> Result<(), EbpfError> {
    for layout in PROGRAMS.iter().filter(|l| faults || !l.fault) {
        let path = tracefs
            .join("events")
            .join(layout.category)
            .join(layout.name)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|_| {
            EbpfError::MissingTracepoint(format!("{}:{}", layout.category, layout.name))
        })?;
        check_format(layout, &text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_merges_user_and_kernel_and_ranks() {
        let entries = vec![
            (0x1000, 3),
            (0x1000 | KEY_KERNEL, 2),
            (0x5000, 10),
            (0x3000 | KEY_KERNEL, 1),
        ];
        let r = build_round(entries, !0xfff);
        assert_eq!(r.pages, vec![0x1000, 0x3000, 0x5000]);
        assert_eq!(r.user_pages, 2);
        assert_eq!(r.kernel_pages, 2);
        assert_eq!(r.kernel_fault_pages, vec![0x1000, 0x3000]);
        assert_eq!(r.hot, vec![(0x5000, 10), (0x1000, 5), (0x3000, 1)]);
    }

    #[test]
    fn event_decoding() {
        let mut raw = vec![0u8; EVENT_SIZE];
        raw[0..4].copy_from_slice(&event::MREMAP.to_ne_bytes());
        raw[4..8].copy_from_slice(&42u32.to_ne_bytes());
        raw[40..48].copy_from_slice(&0x7000u64.to_ne_bytes());
        match decode_event(&raw) {
            Some(Decoded::Vma(v)) => {
                assert_eq!(v.kind, VmaChangeKind::Mremap);
                assert_eq!(v.tid, 42);
                assert_eq!(v.args[4], 0x7000);
            }
            _ => panic!("not a vma change"),
        }
        raw[0..4].copy_from_slice(&event::THREAD_EXITED.to_ne_bytes());
        assert!(matches!(
            decode_event(&raw),
            Some(Decoded::Thread(ThreadEvent {
                kind: ThreadEventKind::Exited,
                tid: 42
            }))
        ));
        assert!(decode_event(&raw[..8]).is_none());
    }

    /// The format of `category:name` on this kernel (tracefs mounted if
    /// needed: these tests run as root).
    fn real_format(layout: &Layout) -> String {
        let tracefs = ensure_tracefs().expect("tracefs (the unit tests run as root)");
        let path = tracefs
            .join("events")
            .join(layout.category)
            .join(layout.name)
            .join("format");
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn layout(name: &str) -> &'static Layout {
        PROGRAMS.iter().find(|l| l.name == name).expect("a program")
    }

    #[test]
    fn offsets_match_this_kernels_tracefs_formats() {
        // This x86 kernel has the fault tracepoints too: every layout applies.
        for layout in &PROGRAMS {
            let text = real_format(layout);
            let fields = parse_format(&text);
            assert!(
                fields.iter().any(|f| f.name == "common_pid"),
                "{}: format not parsed: {fields:?}",
                layout.name
            );
            check_format(layout, &text)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", layout.category, layout.name));
        }
        let tracefs = ensure_tracefs().unwrap();
        assert!(
            fault_tracepoints_exist(&tracefs),
            "x86: exceptions:page_fault_user"
        );
        check_formats(&tracefs, true).expect("check_formats on this kernel");
        // What the programs read, found by name on this kernel.
        let fault = parse_format(&real_format(layout("page_fault_user")));
        let at = |fields: &[FormatField], name: &str| {
            fields
                .iter()
                .find(|f| f.name == name)
                .map(|f| (f.offset, f.size))
        };
        assert_eq!(at(&fault, "address"), Some((tracepoint::FAULT_ADDRESS, 8)));
        assert_eq!(
            at(&fault, "error_code"),
            Some((tracepoint::FAULT_ERROR_CODE, 8))
        );
        let mmap = parse_format(&real_format(layout("sys_enter_mmap")));
        assert_eq!(at(&mmap, "addr"), Some((tracepoint::SYSCALL_ARGS, 8)));
        assert_eq!(at(&mmap, "flags"), Some((tracepoint::SYSCALL_ARGS + 24, 8)));
        let newtask = parse_format(&real_format(layout("task_newtask")));
        assert_eq!(at(&newtask, "comm").map(|f| f.1), Some(16), "char comm[16]");
    }

    const FAULT_FORMAT: &str = "name: page_fault_user
ID: 122
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long address;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long ip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long error_code;\toffset:24;\tsize:8;\tsigned:0;

print fmt: \"address=%ps ip=%ps error_code=0x%lx\", ...
";

    #[test]
    fn a_moved_field_is_named_with_both_offsets() {
        let fault = layout("page_fault_user");
        check_format(fault, FAULT_FORMAT).expect("the synthetic format as the programs expect");

        // A kernel that put a field before error_code.
        let moved = FAULT_FORMAT.replace("error_code;\toffset:24;", "error_code;\toffset:32;");
        let err = check_format(fault, &moved).unwrap_err();
        match &err {
            EbpfError::FormatMismatch {
                tracepoint,
                field,
                expected_offset,
                expected_size,
                found,
            } => {
                assert_eq!(tracepoint, "exceptions:page_fault_user");
                assert_eq!(field, "`error_code`");
                assert_eq!((*expected_offset, *expected_size), (24, 8));
                assert_eq!(*found, Some((32, 8)));
            }
            other => panic!("not a FormatMismatch: {other}"),
        }
        let msg = err.to_string();
        for part in [
            "exceptions:page_fault_user",
            "error_code",
            "offset 24",
            "offset 32",
            "--no-ebpf",
        ] {
            assert!(msg.contains(part), "{part:?} not in: {msg}");
        }

        // Narrowed, renamed away.
        let narrowed = FAULT_FORMAT.replace(
            "address;\toffset:8;\tsize:8;",
            "address;\toffset:8;\tsize:4;",
        );
        let err = check_format(fault, &narrowed).unwrap_err();
        assert!(
            matches!(&err, EbpfError::FormatMismatch { field, found: Some((8, 4)), .. } if field == "`address`"),
            "{err}"
        );
        let renamed = FAULT_FORMAT.replace(" address;", " addr;");
        let err = check_format(fault, &renamed).unwrap_err();
        assert!(
            matches!(&err, EbpfError::FormatMismatch { field, found: None, .. } if field == "`address`"),
            "{err}"
        );
        assert!(err.to_string().contains("has no such field"), "{err}");
    }

    #[test]
    fn a_moved_syscall_argument_is_named() {
        let munmap = layout("sys_enter_munmap");
        let text = real_format(munmap);
        check_format(munmap, &text).expect("this kernel");
        // A kernel with 8 more bytes of common fields: every argument moves.
        let shifted = text
            .replace("offset:24;", "offset:32;")
            .replace("offset:16;", "offset:24;");
        assert_ne!(shifted, text);
        let err = check_format(munmap, &shifted).unwrap_err();
        match &err {
            EbpfError::FormatMismatch {
                tracepoint,
                field,
                expected_offset,
                found,
                ..
            } => {
                assert_eq!(tracepoint, "syscalls:sys_enter_munmap");
                // Named after this kernel's field, `addr`.
                assert_eq!(field, "argument 0 (`addr`)");
                assert_eq!(*expected_offset, 16);
                assert_eq!(*found, Some((24, 8)));
            }
            other => panic!("not a FormatMismatch: {other}"),
        }
    }

    #[test]
    fn start_time_of_self() {
        let me = std::process::id() as i32;
        assert!(process_start_time(me).unwrap() > 0);
        assert!(matches!(
            process_start_time(-1),
            Err(EbpfError::NoSuchProcess(-1))
        ));
    }
}
