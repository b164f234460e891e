//! The eager fill: an eager restore's anonymous memory put into the
//! restored process at the speed of `UFFDIO_COPY`.
//!
//! Why a userfaultfd in a restore that has no lazy page: writing into fresh
//! anonymous memory (`process_vm_writev`, `/proc/PID/mem`, or the process
//! reading its own pages) faults every page in, and the kernel zeroes each
//! page before the copy overwrites it; `UFFDIO_COPY` allocates the page and
//! copies into it once. Measured on a 2-core VM for 256 MiB in 2 MiB
//! copies: `process_vm_writev` into fresh memory 130–160 ms,
//! `UFFDIO_COPY` 77–83 ms.
//!
//! The chain's data runs are resolved once for the whole restore
//! ([`ImageChain::data_runs`], not page by page), and every blob they take
//! bytes from is checked before the process exists ([`FillSource::check`]:
//! the CRC of an uncompressed blob where it lies in its page file, mapped;
//! a compressed one read, checked and decoded), one worker per core: a
//! damaged image is refused before a process with its PID exists. The
//! fill then cuts the runs into units of about [`UNIT`] bytes; one worker
//! per core takes units in turn and copies each run in straight from the
//! mapped page file (a compressed blob is read, checked and decoded again,
//! into the worker's buffer). With the process stopped, nothing else wants
//! the cores: two workers copy faster than the one-thread `UFFDIO_COPY`
//! floor.
//!
//! The VMAs of a batch are registered with a userfaultfd of the process
//! (missing mode, no events) before the copies and unregistered after, so
//! they end as an eager restore always left them.
//!
//! A VMA the kernel will not register (or a restore without the
//! userfaultfd) gets the same bytes through `process_vm_writev`; one
//! mapped without write permission through `/proc/PID/mem` (FOLL_FORCE),
//! so that it never needs a PROT_WRITE it did not have.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use images::PAGE_SIZE;
use userfaultfd::{IoctlFlags, Uffd};

use sys::file_view::FileView;

use crate::chain::{ChainError, DataRun, ImageChain};
use crate::restore::RestoreError;

/// Bytes of memory per unit of work: a worker checks a unit's blobs, then
/// copies them in while they are in its cache (the copies of a full dump's
/// adjacent blobs merge into copies of up to this size).
const UNIT: u64 = 512 << 10;
/// Workers at most (one per core).
const MAX_WORKERS: usize = 4;
/// `UFFDIO_COPY` fails with EAGAIN while the address space is changing;
/// nothing changes it here (the process is stopped), so a few retries.
const AGAIN_RETRIES: u32 = 1000;

/// How an eager restore puts memory in (`tern restore --fill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FillMode {
    /// `UFFDIO_COPY` where the kernel registers the memory (the fastest
    /// here), `process_vm_writev` elsewhere.
    #[default]
    Uffd,
    /// `process_vm_writev` everywhere (what `uffd` falls back to).
    Write,
}

/// What the eager fill did, for `tern restore --json` (`fill`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FillReport {
    pub mode: FillMode,
    /// Time in the fill (reading, checking and putting pages in).
    pub ms: f64,
    /// Bytes put in with `UFFDIO_COPY`.
    pub copied_bytes: u64,
    /// Bytes written with `process_vm_writev` or through `/proc/PID/mem`.
    pub written_bytes: u64,
    /// Workers (threads) that filled at once.
    pub workers: usize,
}

/// One VMA to fill: the image's pages of `[start, end)`, mapped for now at
/// `at` (a VMA the kernel would merge with its neighbour is filled
/// elsewhere, then moved in place).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub start: u64,
    pub end: u64,
    pub at: u64,
    /// Mapped with PROT_WRITE: else written through `/proc/PID/mem`.
    pub writable: bool,
}

/// How a target's bytes go in.
enum Via {
    Uffd,
    Writev,
    Mem,
}

/// Where a segment's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// In image `image`'s mapped page file, at this offset (an
    /// uncompressed blob, its CRC checked).
    Mapped { image: usize, off: usize },
    /// In the chunk's buffer (a decoded blob).
    Buffer { off: usize },
}

impl Src {
    fn advanced(self, by: usize) -> Src {
        match self {
            Src::Mapped { image, off } => Src::Mapped {
                image,
                off: off + by,
            },
            Src::Buffer { off } => Src::Buffer { off: off + by },
        }
    }
}

/// Contiguous checked bytes for contiguous process memory.
#[derive(Debug, Clone, Copy)]
struct Segment {
    target: usize,
    dst: u64,
    src: Src,
    len: usize,
}

/// Part of one run inside one target: pages `[start, end)`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    target: usize,
    run: usize,
    start: u64,
    end: u64,
}

/// The chain's data runs of the memory an eager restore fills, and the
/// page files they come from, mapped: made and checked before the process
/// exists.
pub(crate) struct FillSource {
    runs: Vec<DataRun>,
    /// Each image's page file, mapped (None where it cannot be: its blobs
    /// are read into buffers instead).
    views: Vec<Option<FileView>>,
    /// Every blob of `runs` was checked ([`FillSource::check`]).
    checked: bool,
}

impl FillSource {
    /// `ranges` (sorted, disjoint, image addresses): the memory to fill.
    pub fn open(chain: &ImageChain, ranges: &[(u64, u64)]) -> FillSource {
        let views = chain
            .images
            .iter()
            .map(|img| {
                // Remote pages (a page server's) are read, not mapped.
                let file = img.pages_file()?;
                // SAFETY: a page file is written once, before its image's
                // inventory (and seal) is; the chain checked who could have
                // written it. Its CRCs guard against damage (a disk, a
                // copy cut short), not against its writer, who could write
                // bytes with matching CRCs as well: bytes someone rewrites
                // between the check and the copy change only the memory of
                // a process an image of theirs restores. One who truncates
                // it kills tern with SIGBUS, and with it the half-built
                // process (it dies with its parent until it is whole).
                unsafe { FileView::map(file) }
                    .inspect_err(|e| {
                        tracing::debug!(dir = %img.dir.display(), error = %e, "page file not mapped")
                    })
                    .ok()
            })
            .collect();
        FillSource {
            runs: chain.data_runs(ranges),
            views,
            checked: false,
        }
    }

    /// Check every blob the fill will take bytes from (its CRC, and its
    /// decoding if compressed), one worker per core: a damaged blob is
    /// refused before any process exists.
    pub fn check(&mut self, chain: &ImageChain) -> Result<u64, ChainError> {
        let mut blobs: Vec<(usize, images::PageEntry)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for r in &self.runs {
            if seen.insert((r.image, r.entry.start)) {
                blobs.push((r.image, r.entry));
            }
        }
        let workers = workers().min(blobs.len().max(1));
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        // Blobs per turn: enough that taking turns costs nothing.
        const TURN: usize = 16;
        let views = &self.views;
        let check = || -> Result<(), ChainError> {
            let (mut scratch, mut decoded) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let from = next.fetch_add(TURN, Ordering::Relaxed);
                if from >= blobs.len() {
                    break;
                }
                for (image, e) in &blobs[from..(from + TURN).min(blobs.len())] {
                    let img = &chain.images[*image];
                    let path = img.dir.join(images::PAGES_FILE);
                    let need = e.nr_pages as usize * sys::usize_of(PAGE_SIZE);
                    let mapped = images::Image::is_raw(e)
                        .then(|| views[*image].as_ref())
                        .flatten()
                        .and_then(|v| v.get(e.offset(), need));
                    let r = match mapped {
                        Some(stored) => images::check_crc(&path, e, stored),
                        None => img.read_stored_into(e, &mut scratch).and_then(|()| {
                            images::check_crc(&path, e, &scratch)?;
                            images::decode_blob_into(&path, e, &scratch, &mut decoded)
                        }),
                    };
                    if let Err(err) = r {
                        stop.store(true, Ordering::Relaxed);
                        return Err(err.into());
                    }
                }
            }
            Ok(())
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = (1..workers).map(|_| scope.spawn(check)).collect();
            let mut r = check();
            for h in others {
                let theirs = h.join().unwrap_or(Ok(()));
                if r.is_ok() {
                    r = theirs;
                }
            }
            r
        })?;
        self.checked = true;
        Ok(blobs.len() as u64)
    }
}

/// One worker per core, up to [`MAX_WORKERS`].
fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS)
}

/// The userfaultfd of the process being restored, and the pages to put in.
pub(crate) struct EagerFill<'a> {
    pid: i32,
    uffd: Option<Uffd>,
    source: &'a FillSource,
    /// Each worker's decode buffer, kept from batch to batch.
    spare: Vec<Vec<u8>>,
    /// What it did so far.
    pub report: FillReport,
}

fn step_err(pid: i32, step: &'static str, what: String) -> RestoreError {
    RestoreError::Step { pid, step, what }
}

impl<'a> EagerFill<'a> {
    /// `uffd` is a handshaken userfaultfd of process `pid`'s memory (None:
    /// every page through `process_vm_writev`).
    pub fn new(pid: i32, uffd: Option<Uffd>, source: &'a FillSource) -> Self {
        let mode = if uffd.is_some() {
            FillMode::Uffd
        } else {
            FillMode::Write
        };
        EagerFill {
            pid,
            uffd,
            source,
            spare: Vec::new(),
            report: FillReport {
                mode,
                ..FillReport::default()
            },
        }
    }

    /// Put the chain's data pages of each target in; the pages each one
    /// got. Zero and never-populated pages are left to the fresh mapping.
    pub fn fill(
        &mut self,
        chain: &ImageChain,
        targets: &[Target],
    ) -> Result<Vec<u64>, RestoreError> {
        let pid = self.pid;
        let mut pages = vec![0u64; targets.len()];
        if targets.is_empty() {
            return Ok(pages);
        }
        let mut via: Vec<Via> = Vec::with_capacity(targets.len());
        let mut registered: Vec<(u64, u64)> = Vec::new();
        for t in targets {
            let len = t.end - t.start;
            via.push(if !t.writable {
                Via::Mem
            } else if let Some(uffd) = &self.uffd {
                match uffd.register(t.at as *mut libc::c_void, sys::usize_of(len)) {
                    Ok(ioctls) if ioctls.contains(IoctlFlags::COPY) => {
                        registered.push((t.at, len));
                        Via::Uffd
                    }
                    Ok(_) => {
                        let _ = uffd.unregister(t.at as *mut libc::c_void, sys::usize_of(len));
                        Via::Writev
                    }
                    // The kernel does not register every kind of memory:
                    // the slower way, same bytes.
                    Err(e) => {
                        tracing::debug!(
                            pid,
                            at = t.at,
                            errno = %sys::uffd::uffd_errno(e),
                            "not registered for the fill"
                        );
                        Via::Writev
                    }
                }
            } else {
                Via::Writev
            });
        }
        let mem = if via.iter().any(|v| matches!(v, Via::Mem)) {
            Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/{pid}/mem"))
                    .map_err(|e| step_err(pid, "opening /proc/PID/mem", e.to_string()))?,
            )
        } else {
            None
        };
        // Lent to the reader for the batch.
        // Lent to the reader for the batch.
        let (pieces, units) = cut(&self.source.runs, targets);
        let workers = workers().min(units.len().max(1));
        let t0 = std::time::Instant::now();
        self.report.workers = self.report.workers.max(workers);
        while self.spare.len() < workers {
            self.spare.push(Vec::new());
        }
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let work = Work {
            pid,
            chain,
            views: &self.source.views,
            runs: &self.source.runs,
            checked: self.source.checked,
            uffd: self.uffd.as_ref(),
            mem: mem.as_ref(),
            via: &via,
            targets,
            pieces: &pieces,
            units: &units,
            next: &next,
            stop: &stop,
        };
        let buffers = std::mem::take(&mut self.spare);
        let outcomes: Vec<(Vec<u8>, Result<Tally, RestoreError>)> = std::thread::scope(|scope| {
            let work = &work;
            let mut buffers = buffers.into_iter();
            let mine = buffers.next().unwrap_or_default();
            let others: Vec<_> = buffers
                .take(workers - 1)
                .map(|buf| scope.spawn(move || work.run(buf, targets.len())))
                .collect();
            let mut all = vec![work.run(mine, targets.len())];
            for h in others {
                all.push(h.join().unwrap_or_else(|_| {
                    (
                        Vec::new(),
                        Err(step_err(
                            pid,
                            "filling memory",
                            "a fill worker panicked".into(),
                        )),
                    )
                }));
            }
            all
        });
        let mut result = Ok(());
        for (buf, r) in outcomes {
            self.spare.push(buf);
            match r {
                Ok(t) => {
                    self.report.copied_bytes += t.copied;
                    self.report.written_bytes += t.written;
                    for (p, n) in pages.iter_mut().zip(t.pages) {
                        *p += n;
                    }
                }
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        if let Some(uffd) = &self.uffd {
            for &(at, len) in &registered {
                uffd.unregister(at as *mut libc::c_void, sys::usize_of(len))
                    .map_err(|e| {
                        step_err(
                            pid,
                            "unregistering memory from the fill's userfaultfd",
                            format!("{at:#x}+{len}: {}", sys::uffd::uffd_errno(e)),
                        )
                    })?;
            }
        }
        self.report.ms += t0.elapsed().as_secs_f64() * 1e3;
        result?;
        Ok(pages)
    }
}

/// The pieces of `runs` inside `targets`, and the units of work cut from
/// them (ranges of pieces of about [`UNIT`] bytes each).
fn cut(runs: &[DataRun], targets: &[Target]) -> (Vec<Piece>, Vec<std::ops::Range<usize>>) {
    let mut pieces = Vec::new();
    let mut units = Vec::new();
    let (mut from, mut bytes) = (0, 0);
    for (ti, t) in targets.iter().enumerate() {
        let first = runs.partition_point(|r| r.end <= t.start);
        for (i, r) in runs.iter().enumerate().skip(first) {
            if r.start >= t.end {
                break;
            }
            let (start, end) = (r.start.max(t.start), r.end.min(t.end));
            pieces.push(Piece {
                target: ti,
                run: i,
                start,
                end,
            });
            bytes += end - start;
            if bytes >= UNIT {
                units.push(from..pieces.len());
                (from, bytes) = (pieces.len(), 0);
            }
        }
    }
    if from < pieces.len() {
        units.push(from..pieces.len());
    }
    (pieces, units)
}

/// What one worker put in.
struct Tally {
    pages: Vec<u64>,
    copied: u64,
    written: u64,
}

/// A batch's work, shared by its workers.
struct Work<'a> {
    pid: i32,
    chain: &'a ImageChain,
    views: &'a [Option<FileView>],
    runs: &'a [DataRun],
    /// The mapped blobs were checked before the process existed.
    checked: bool,
    uffd: Option<&'a Uffd>,
    mem: Option<&'a std::fs::File>,
    via: &'a [Via],
    targets: &'a [Target],
    pieces: &'a [Piece],
    units: &'a [std::ops::Range<usize>],
    next: &'a AtomicUsize,
    stop: &'a AtomicBool,
}

impl Work<'_> {
    /// Take units until none is left (or another worker failed); the
    /// decode buffer back, and what this worker put in.
    fn run(&self, buf: Vec<u8>, targets: usize) -> (Vec<u8>, Result<Tally, RestoreError>) {
        let mut w = Worker {
            buf,
            used: 0,
            scratch: Vec::new(),
            last: None,
            segments: Vec::new(),
        };
        let mut tally = Tally {
            pages: vec![0; targets],
            copied: 0,
            written: 0,
        };
        let r = (|| {
            while !self.stop.load(Ordering::Relaxed) {
                let u = self.next.fetch_add(1, Ordering::Relaxed);
                let Some(unit) = self.units.get(u) else {
                    break;
                };
                self.unit(&mut w, unit.clone(), &mut tally)?;
            }
            Ok(())
        })();
        if r.is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        (w.buf, r.map(|()| tally))
    }

    /// Check (and decode) the blobs of one unit's pieces, then put them in.
    fn unit(
        &self,
        w: &mut Worker,
        unit: std::ops::Range<usize>,
        tally: &mut Tally,
    ) -> Result<(), RestoreError> {
        w.used = 0;
        w.last = None;
        w.segments.clear();
        for p in &self.pieces[unit] {
            let r = &self.runs[p.run];
            let blob = self.blob(w, r)?;
            let t = &self.targets[p.target];
            let seg = Segment {
                target: p.target,
                dst: t.at + (p.start - t.start),
                src: blob.advanced(sys::usize_of(p.start - r.entry.start)),
                len: sys::usize_of(p.end - p.start),
            };
            match w.segments.last_mut() {
                Some(q)
                    if q.target == seg.target
                        && q.dst + q.len as u64 == seg.dst
                        && q.src.advanced(q.len) == seg.src =>
                {
                    q.len += seg.len
                }
                _ => w.segments.push(seg),
            }
        }
        for s in &w.segments {
            let src = match s.src {
                Src::Mapped { image, off } => self.views[image]
                    .as_ref()
                    .and_then(|v| v.get(off as u64, s.len)),
                Src::Buffer { off } => w.buf.get(off..off + s.len),
            }
            .expect("blob() checked the segment's bytes");
            let pid = self.pid;
            match self.via[s.target] {
                Via::Uffd => {
                    self.copy(src, s.dst)?;
                    tally.copied += s.len as u64;
                }
                Via::Writev => {
                    write_mem(pid, s.dst, src)?;
                    tally.written += s.len as u64;
                }
                Via::Mem => {
                    self.mem
                        .expect("opened for Via::Mem")
                        .write_all_at(src, s.dst)
                        .map_err(|e| {
                            step_err(
                                pid,
                                "writing memory",
                                format!("{:#x}+{} through /proc/{pid}/mem: {e}", s.dst, s.len),
                            )
                        })?;
                    tally.written += s.len as u64;
                }
            }
            tally.pages[s.target] += s.len as u64 / PAGE_SIZE;
        }
        Ok(())
    }

    /// Where the checked bytes of `r`'s blob are: in its page file, mapped
    /// (uncompressed), else read (and decoded) into the worker's buffer,
    /// unless the unit's last blob was this one.
    fn blob(&self, w: &mut Worker, r: &DataRun) -> Result<Src, ChainError> {
        let key = (r.image, r.entry.start);
        if let Some((k, at)) = w.last
            && k == key
        {
            return Ok(at);
        }
        let need = r.entry.nr_pages as usize * sys::usize_of(PAGE_SIZE);
        let img = &self.chain.images[r.image];
        let path = img.dir.join(images::PAGES_FILE);
        let raw = images::Image::is_raw(&r.entry);
        let mapped = raw
            .then(|| self.views[r.image].as_ref())
            .flatten()
            .and_then(|v| v.get(r.entry.offset(), need));
        let src = if let Some(stored) = mapped {
            if !self.checked {
                images::check_crc(&path, &r.entry, stored)?;
            }
            Src::Mapped {
                image: r.image,
                off: sys::usize_of(r.entry.offset()),
            }
        } else {
            if w.buf.len() < w.used + need {
                w.buf.resize(w.used + need, 0);
            }
            let at = w.used;
            let dst = &mut w.buf[at..at + need];
            if raw {
                img.read_stored_to(&r.entry, dst)?;
                images::check_crc(&path, &r.entry, dst)?;
            } else {
                img.read_stored_into(&r.entry, &mut w.scratch)?;
                images::check_crc(&path, &r.entry, &w.scratch)?;
                images::decode_blob_to(&path, &r.entry, &w.scratch, dst)?;
            }
            w.used += need;
            Src::Buffer { off: at }
        };
        w.last = Some((key, src));
        Ok(src)
    }

    /// `UFFDIO_COPY` of `src` to `dst` (registered), to the last byte.
    fn copy(&self, src: &[u8], dst: u64) -> Result<(), RestoreError> {
        let uffd = self.uffd.expect("Via::Uffd needs the userfaultfd");
        let mut done = 0usize;
        let mut again = 0;
        while done < src.len() {
            let left = src.len() - done;
            // SAFETY: `src[done..]` is readable for `left` bytes; the
            // destination is in the process's registered memory, which the
            // kernel checks.
            let r = unsafe {
                uffd.copy(
                    src[done..].as_ptr().cast(),
                    (dst + done as u64) as *mut libc::c_void,
                    left,
                    false,
                )
            };
            match r {
                Ok(n) if n > 0 => done += n,
                Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 => done += n,
                Ok(_) | Err(userfaultfd::Error::PartiallyCopied(_)) => again += 1,
                Err(e) => {
                    let errno = sys::uffd::uffd_errno(e);
                    if errno != nix::errno::Errno::EAGAIN {
                        return Err(step_err(
                            self.pid,
                            "copying memory in (UFFDIO_COPY)",
                            format!("{:#x}+{left}: {errno}", dst + done as u64),
                        ));
                    }
                    again += 1;
                }
            }
            if again > AGAIN_RETRIES {
                return Err(step_err(
                    self.pid,
                    "copying memory in (UFFDIO_COPY)",
                    format!(
                        "{:#x}+{left}: the kernel kept answering EAGAIN; is something changing the process's memory?",
                        dst + done as u64
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// One worker's buffers.
struct Worker {
    /// Decoded blobs of the unit (what holds bytes is `used`; its length
    /// is kept from unit to unit: resizing would write it again).
    buf: Vec<u8>,
    used: usize,
    scratch: Vec<u8>,
    /// The blob last checked in this unit, and where its bytes are.
    last: Option<((usize, u64), Src)>,
    segments: Vec<Segment>,
}

/// `process_vm_writev` of `data` to `addr` in process `pid`, to the last
/// byte.
pub(crate) fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<(), RestoreError> {
    let remote = nix::sys::uio::RemoteIoVec {
        base: usize::try_from(addr).unwrap_or(usize::MAX),
        len: data.len(),
    };
    let n = nix::sys::uio::process_vm_writev(
        nix::unistd::Pid::from_raw(pid),
        &[std::io::IoSlice::new(data)],
        &[remote],
    );
    if n != Ok(data.len()) {
        return Err(step_err(
            pid,
            "writing memory",
            format!(
                "{:#x}+{}: {}",
                addr,
                data.len(),
                match n {
                    Err(e) => e.to_string(),
                    Ok(n) => format!("short write {n}"),
                }
            ),
        ));
    }
    Ok(())
}
