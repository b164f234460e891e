//! Copy pages out of a running target into an image: `process_vm_readv` in
//! batches, falling back to `/proc/PID/mem` (which can read PROT_NONE and
//! other unreadable-to-GUP pages) range by range.
//!
//! Reading and writing overlap: one thread (two for a frozen target) reads
//! batches out of the target and plans them (zero pages found, checksums
//! made: [`images::PagePlan`]) while another writes them into the image,
//! through a small pool of batch buffers. The pool is kept
//! between copies ([`Copier`]) and can be touched in advance
//! ([`Copier::prefault`]), so that a copy made while the target is frozen
//! does not spend its time faulting in and zeroing its own buffers.

use images::{ImageError, ImageWriter, PAGE_SIZE, PageRange};
use nix::sys::uio::RemoteIoVec;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

/// Bytes copied per `process_vm_readv` batch.
const BATCH_BYTES: usize = 2 << 20;
/// iovecs per call (IOV_MAX).
const BATCH_IOVS: usize = 1024;
/// Threads reading from a frozen target at once (a running one gets one:
/// its own threads need the cores).
const FROZEN_READERS: usize = 2;
/// Batch buffers in the pool: one being read, the others queued or being
/// written.
const BUFFERS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("PID {pid} exited while its pages were being copied")]
    Exited { pid: i32 },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(
        "the thread writing the image of PID {pid} panicked (a bug in tern): the image is incomplete"
    )]
    WriterPanicked { pid: i32 },
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CopyStats {
    /// Pages that could not be read at all (their VMA was unmapped meanwhile).
    pub vanished_pages: u64,
    /// Time spent in `process_vm_readv` (and the slow path).
    pub read: Duration,
    /// Time spent checking and writing into the image.
    pub write: Duration,
}

/// One batch: the ranges read, how many bytes of them arrived, and the
/// plan of each range that arrived whole.
struct Batch {
    ranges: Vec<PageRange>,
    buf: Vec<u8>,
    got: usize,
    plans: Vec<Option<images::PagePlan>>,
}

impl Batch {
    /// Plan every range that arrived whole (`checksums`: for an
    /// uncompressed image).
    fn plan(&mut self, checksums: bool) {
        let mut off = 0usize;
        self.plans = self
            .ranges
            .iter()
            .map(|r| {
                let len = sys::usize_of(r.len());
                let plan = (off + len <= self.got)
                    .then(|| images::PagePlan::of(&self.buf[off..off + len], checksums));
                off += len;
                plan
            })
            .collect();
    }
}

/// Copies pages into images, keeping its batch buffers between copies.
pub struct Copier {
    pool: Vec<Vec<u8>>,
    readers: usize,
}

impl Default for Copier {
    fn default() -> Self {
        Copier::new()
    }
}

impl Copier {
    /// For a running target: one reader thread (and the writer).
    pub fn new() -> Copier {
        Copier {
            pool: Vec::new(),
            readers: 1,
        }
    }

    /// For a frozen target: every core it leaves idle reads.
    pub fn for_frozen_target() -> Copier {
        Copier {
            pool: Vec::new(),
            readers: FROZEN_READERS,
        }
    }

    /// Allocate and touch every batch buffer now.
    pub fn prefault(&mut self) {
        while self.pool.len() < BUFFERS {
            self.pool.push(Vec::new());
        }
        for b in &mut self.pool {
            if b.len() < BATCH_BYTES {
                // resize writes every byte: the pages are faulted in here.
                b.resize(BATCH_BYTES, 0);
            }
        }
    }

    fn take_buffer(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    /// Copy `ranges` (sorted) of `pid` into `writer`.
    pub fn copy_ranges(
        &mut self,
        pid: i32,
        ranges: &[PageRange],
        writer: &mut ImageWriter,
    ) -> Result<CopyStats, CopyError> {
        let total: u64 = ranges.iter().map(|r| r.len()).sum();
        let mut batches = batches(ranges);
        if sys::usize_of(total) <= BATCH_BYTES {
            // One batch: no second thread.
            let mut stats = CopyStats::default();
            let mut w = BatchWriter::new(pid, writer);
            if let Some(ranges) = batches.next() {
                let buf = self.take_buffer();
                let b = read_batch(pid, ranges, buf, &mut stats.read)?;
                // One thread: the writer plans as it writes.
                let t = Instant::now();
                let r = w.write(&b);
                stats.write += t.elapsed();
                self.pool.push(b.buf);
                r?;
            }
            stats.vanished_pages = w.vanished;
            tracing::debug!(pid, "copy: read {:?}, image {:?}", stats.read, stats.write);
            return Ok(stats);
        }
        let (full_tx, full_rx) = mpsc::sync_channel::<Batch>(BUFFERS);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 0..BUFFERS {
            let b = self.take_buffer();
            let _ = empty_tx.send(b);
        }
        let all: Vec<Vec<PageRange>> = batches.collect();
        let next = AtomicUsize::new(0);
        let checksums = !writer.compressed();
        let empty_rx = Mutex::new(empty_rx);
        let result = std::thread::scope(|s| {
            let writer_thread = s.spawn(move || -> Result<(u64, Duration), CopyError> {
                let mut w = BatchWriter::new(pid, writer);
                let mut spent = Duration::ZERO;
                for b in full_rx {
                    let t = Instant::now();
                    let r = w.write(&b);
                    spent += t.elapsed();
                    // Give the buffer back even on failure: the readers
                    // stop at their next send, which fails.
                    let _ = empty_tx.send(b.buf);
                    r?;
                }
                Ok((w.vanished, spent))
            });
            // Readers: this thread and `readers - 1` more, taking batches
            // in turn (process_vm_readv pins and copies page by page: two
            // cores move up to twice as much).
            let reader = |full_tx: mpsc::SyncSender<Batch>| -> Result<Duration, CopyError> {
                let mut spent = Duration::ZERO;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(ranges) = all.get(i) else { break };
                    let buf = match empty_rx.lock() {
                        Ok(rx) => match rx.recv() {
                            Ok(b) => b,
                            Err(_) => break,
                        },
                        Err(_) => break,
                    };
                    let mut b = read_batch(pid, ranges.clone(), buf, &mut spent)?;
                    // Here, not in the one writer: the readers are the
                    // threads a frozen copy has more of.
                    b.plan(checksums);
                    if full_tx.send(b).is_err() {
                        // The writer failed: its error is the one to report.
                        break;
                    }
                }
                Ok(spent)
            };
            let helpers: Vec<_> = (1..self.readers)
                .map(|_| {
                    let tx = full_tx.clone();
                    s.spawn(move || reader(tx))
                })
                .collect();
            let mut read = reader(full_tx);
            for h in helpers {
                let r = h.join().unwrap_or(Err(CopyError::WriterPanicked { pid }));
                read = match (read, r) {
                    (Ok(a), Ok(b)) => Ok(a.max(b)),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
            }
            let written = writer_thread
                .join()
                .unwrap_or(Err(CopyError::WriterPanicked { pid }));
            match (read, written) {
                (Err(e), _) => Err(e),
                (Ok(r), Ok((v, w))) => Ok((r, v, w)),
                (Ok(_), Err(e)) => Err(e),
            }
        });
        // Every buffer comes back to the pool.
        if let Ok(rx) = empty_rx.into_inner() {
            while let Ok(b) = rx.try_recv() {
                self.pool.push(b);
            }
        }
        self.pool.truncate(BUFFERS);
        let (read, vanished, write) = result?;
        let stats = CopyStats {
            vanished_pages: vanished,
            read,
            write,
        };
        tracing::debug!(
            pid,
            "copy: read {:?}, image {:?} (overlapped)",
            stats.read,
            stats.write
        );
        Ok(stats)
    }
}

/// Read one batch with `process_vm_readv` into `buf`.
fn read_batch(
    pid: i32,
    ranges: Vec<PageRange>,
    mut buf: Vec<u8>,
    spent: &mut Duration,
) -> Result<Batch, CopyError> {
    let bytes: usize = ranges.iter().map(|r| sys::usize_of(r.len())).sum();
    if buf.len() < bytes {
        buf.resize(bytes, 0);
    }
    let remote: Vec<RemoteIoVec> = ranges
        .iter()
        .map(|r| RemoteIoVec {
            base: sys::usize_of(r.start),
            len: sys::usize_of(r.len()),
        })
        .collect();
    let t = Instant::now();
    let n = nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(pid),
        &mut [std::io::IoSliceMut::new(&mut buf[..bytes])],
        &remote,
    );
    *spent += t.elapsed();
    let got = match n {
        Err(nix::errno::Errno::ESRCH) => return Err(CopyError::Exited { pid }),
        Err(_) => 0,
        Ok(n) => n,
    };
    Ok(Batch {
        ranges,
        buf,
        got,
        plans: Vec::new(),
    })
}

/// Split sorted ranges into batches of at most BATCH_BYTES / BATCH_IOVS.
fn batches(ranges: &[PageRange]) -> impl Iterator<Item = Vec<PageRange>> + '_ {
    let step = BATCH_BYTES as u64;
    let mut pieces = ranges.iter().flat_map(move |r| {
        (r.start..r.end)
            .step_by(sys::usize_of(step))
            .map(move |s| PageRange::new(s, (s + step).min(r.end)))
    });
    std::iter::from_fn(move || {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for p in pieces.by_ref() {
            bytes += sys::usize_of(p.len());
            batch.push(p);
            if bytes >= BATCH_BYTES || batch.len() >= BATCH_IOVS {
                break;
            }
        }
        (!batch.is_empty()).then_some(batch)
    })
}

/// The writing half: whole pieces that were read go straight into the
/// image; the rest (a partial read stops at the first unreadable page) page
/// by page through /proc/PID/mem.
struct BatchWriter<'a> {
    pid: i32,
    writer: &'a mut ImageWriter,
    mem: Option<std::fs::File>,
    vanished: u64,
}

impl<'a> BatchWriter<'a> {
    fn new(pid: i32, writer: &'a mut ImageWriter) -> Self {
        BatchWriter {
            pid,
            writer,
            mem: None,
            vanished: 0,
        }
    }

    fn write(&mut self, b: &Batch) -> Result<(), CopyError> {
        let mut off = 0usize;
        let mut page = Vec::new();
        for (i, r) in b.ranges.iter().enumerate() {
            let len = sys::usize_of(r.len());
            if off + len <= b.got {
                let bytes = &b.buf[off..off + len];
                match b.plans.get(i) {
                    Some(Some(plan)) => self.writer.add_planned(r.start, bytes, plan)?,
                    _ => self.writer.add_pages(r.start, bytes)?,
                }
            } else {
                let pid = self.pid;
                let mem = match &mut self.mem {
                    Some(f) => f,
                    slot => match std::fs::File::open(format!("/proc/{pid}/mem")) {
                        Ok(f) => slot.insert(f),
                        Err(_) => return Err(CopyError::Exited { pid }),
                    },
                };
                page.resize(sys::usize_of(PAGE_SIZE), 0);
                for addr in (r.start..r.end).step_by(sys::usize_of(PAGE_SIZE)) {
                    match mem.read_exact_at(&mut page, addr) {
                        Ok(()) => self.writer.add_pages(addr, &page)?,
                        Err(_) => self.vanished += 1,
                    }
                }
            }
            off += len;
        }
        Ok(())
    }
}

/// Copy `ranges` (sorted) of `pid` into `writer` with a fresh [`Copier`].
pub fn copy_ranges(
    pid: i32,
    ranges: &[PageRange],
    writer: &mut ImageWriter,
) -> Result<CopyStats, CopyError> {
    Copier::new().copy_ranges(pid, ranges, writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_size_and_iov_limits() {
        let p = PAGE_SIZE;
        // One 5 MiB range: split at 2 MiB.
        let big = [PageRange::new(0x100000, 0x100000 + 5 * (1 << 20))];
        let b: Vec<_> = batches(&big).collect();
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], vec![PageRange::new(0x100000, 0x300000)]);
        assert_eq!(b[2], vec![PageRange::new(0x500000, 0x600000)]);
        // 3000 single pages: at most 1024 iovecs per batch, none lost.
        let many: Vec<_> = (0..3000u64)
            .map(|i| PageRange::new(0x10000000 + 2 * i * p, 0x10000000 + (2 * i + 1) * p))
            .collect();
        let b: Vec<_> = batches(&many).collect();
        assert!(b.iter().all(|x| x.len() <= BATCH_IOVS));
        assert_eq!(b.iter().map(|x| x.len()).sum::<usize>(), 3000);
        assert_eq!(b.concat(), many);
    }

    /// Copy this very process's memory through both paths (one batch and
    /// the overlapped reader/writer) and read it back from the image.
    #[test]
    fn copies_own_memory_exactly() {
        let pid = std::process::id() as i32;
        for pages in [3usize, 2000] {
            let len = pages * sys::usize_of(PAGE_SIZE);
            let mut region = vec![0u8; len + sys::usize_of(PAGE_SIZE)];
            let base = (region.as_ptr() as usize).next_multiple_of(sys::usize_of(PAGE_SIZE));
            let off = base - region.as_ptr() as usize;
            for (i, b) in region[off..off + len].iter_mut().enumerate() {
                // Every third page stays zero.
                *b = if (i / 4096) % 3 == 1 {
                    0
                } else {
                    (i % 251).to_le_bytes()[0] + 1
                };
            }
            let ranges = [
                PageRange::new(base as u64, (base + len / 2) as u64 & !(PAGE_SIZE - 1)),
                PageRange::new(
                    ((base + len / 2) as u64 & !(PAGE_SIZE - 1)) + PAGE_SIZE,
                    (base + len) as u64,
                ),
            ];
            let dir = tempfile::tempdir().unwrap();
            let mut w = ImageWriter::create(dir.path(), false).unwrap();
            let mut c = if pages > 100 {
                Copier::for_frozen_target()
            } else {
                Copier::new()
            };
            c.prefault();
            let st = c.copy_ranges(pid, &ranges, &mut w).unwrap();
            assert_eq!(st.vanished_pages, 0);
            let inv = images::Inventory::new(images::ImageKind::PreDump, pid, "full", false);
            let mm = images::MmRecord { vmas: Vec::new() };
            let ws = w.finish(&mm, &inv).unwrap();
            let expect_pages: u64 = ranges.iter().map(|r| r.pages()).sum();
            assert_eq!(ws.data_pages + ws.zero_pages, expect_pages);
            let img = images::Image::open(dir.path()).unwrap();
            for e in &img.pagemap.entries {
                let data = match e.kind {
                    images::PageKind::Data => img.read_entry(e).unwrap(),
                    _ => vec![0u8; e.nr_pages as usize * sys::usize_of(PAGE_SIZE)],
                };
                let at = sys::usize_of(e.start) - base + off;
                assert_eq!(
                    &data[..],
                    &region[at..at + data.len()],
                    "entry {:#x}",
                    e.start
                );
            }
            assert!(!c.pool.is_empty() && c.pool.len() <= BUFFERS);
        }
    }
}
