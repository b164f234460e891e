//! The page service of a lazy restore: answers the restored process's
//! missing-page faults from the image chain and pushes the rest of its lazy
//! memory in the background, each page exactly once, until every page is in.
//!
//! Who holds the userfaultfd: it was created inside the restored process
//! (its context is that process's memory), which keeps a copy at a high fd
//! number (close-on-exec) for as long as pages are lazy: closing the last
//! reference to a userfaultfd makes the kernel fill missing pages with
//! zeros, so a service that dies leaves faulting threads waiting, never
//! reading zeros, until `tern lazy-pages --resume` takes the fd back with
//! `pidfd_getfd` and finishes. The service holds a copy of its own.
//!
//! Two threads share one state under a lock:
//! - the fault thread polls every userfaultfd (the process's and those of
//!   its children, which fork events hand over) and answers each message:
//!   a fault with `UFFDIO_COPY` of its page (or `UFFDIO_ZEROPAGE` where the
//!   image has no data, or the range was since emptied), an event by
//!   updating where each range of the image now lives (`Space`);
//! - the fill thread copies page blobs in chunks under it, in prefetch
//!   order; a reader thread of its own reads, checks and decodes them
//!   outside the lock, well ahead of the copies, into a cache the fault
//!   thread looks in first (with the hot pages first in the fill's order,
//!   a fault on one mostly finds its blob decoded already). Both follow
//!   the faults: after one, the reader decodes the blobs of the next
//!   runs and the copies put them in before going on in their own order,
//!   so a thread sweeping through its memory finds the pages after the
//!   one it faulted on in, or at least decoded.
//!
//! The kernel fails a copy with EAGAIN while an event is unread; reading
//! and applying events under the lock that copies hold closes the rest of
//! the window: no copy is computed from a view older than an event the
//! kernel has already completed. So no image page lands in a range the
//! process has since unmapped, emptied or replaced, and a moved range is
//! served at its new address.
//!
//! When every page is in, the service unregisters the process's ranges,
//! closes the copy inside the process (and copies its children inherited)
//! and drops its own: the process then has the maps and fds of an eager
//! restore. A blob that turns unreadable (its file removed, replaced or
//! rewritten) kills the process: it never runs on with wrong memory.
//!
//! The events that change where image pages live are also appended to a
//! journal (`/run/tern/lazy-PID-STARTTIME.journal`) so that a resumed
//! service knows what a killed one learned; which pages are in it reads
//! from `/proc/PID/pagemap`.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use images::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use userfaultfd::{Event, Uffd};

use crate::chain::ImageChain;
use crate::lazy::{LazyError, LazyMap, PageSet, Prefetch, Run};

/// Bytes a fill copy moves under the lock: a fault waits at most for one.
const FILL_CHUNK: u64 = 32 * PAGE_SIZE;
/// Decoded blobs kept for faults. Few: a fault that decodes a blob puts
/// the rest of its pages in at once, so a blob is seldom wanted twice; an
/// evicted one's buffer is decoded into next.
const BLOB_CACHE_BYTES: usize = 4 << 20;
/// Blobs the fill's reader decodes ahead of its copies. Far enough that a
/// fault on the pages the fill goes to next finds them decoded (the reader
/// decodes a 128 KiB blob in ~5 µs, the copies move it in ~40 µs).
const FILL_AHEAD: usize = 32;
/// How far past a fault the fill goes next, bytes of image addresses: a
/// thread that faulted mostly goes on to the pages after, so those are
/// copied before it gets there (or decoded, when it gets there first).
const FOLLOW_BYTES: u64 = 1 << 20;
/// Spare decode buffers kept, faulted in (a fresh buffer costs a page
/// fault per page: twice the read and check of a blob).
const FREE_BUFFERS: usize = 2 * FILL_AHEAD + 8;
/// Spare buffers kept for faults, made before the first one: as many as
/// the faults' cache holds blobs, and some (the fill's reader decodes the
/// blobs after a fault into it; until the cache is full, nothing is
/// evicted to decode into).
const WARM_BUFFERS: usize = BLOB_CACHE_BYTES / sys::usize_of(images::BLOB_PAGES * PAGE_SIZE) + 8;
/// Runs ahead of the fill's reader whose blobs a page server is asked for
/// in the background.
const PREFETCH_RUNS: usize = 8;
/// How often a page file is checked for removal or replacement, ns (a stat
/// of the open file and one of its path: 2-5 µs, too much for every blob).
const CHANGED_CHECK_NS: u64 = 1_000_000;

#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub prefetch: Prefetch,
    /// Limit of the background fill, MB/s (0: none).
    pub rate_mb_s: u64,
    /// Deadline of every wait on the process (injections).
    pub timeout: Duration,
    /// Where the page bytes are, if not in the chain's own page files
    /// (a resumed service opens the chain again).
    pub remote: Option<crate::remote::Remote>,
}

/// The `lazy` object of the JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LazyStats {
    /// Pages delivered with data (on fault or pushed).
    pub pages: u64,
    /// Faults answered (data or zeros).
    pub faults: u64,
    /// Time from reading a fault to its page being in, microseconds.
    pub fault_us_p50: f64,
    pub fault_us_p99: f64,
    /// Pages pushed by the background fill.
    pub prefetched: u64,
    /// From the start of the service until every page was in.
    pub fill_ms: f64,
    /// Faults answered with a zero page (no data in the image, or the
    /// range emptied since).
    pub zero_pages: u64,
    /// Children (forks) whose own userfaultfd was served too.
    pub children: u64,
    /// Pages already in when the service started (a resumed fill).
    pub already_in: u64,
    /// Image pages never delivered because the process unmapped or
    /// emptied their range first.
    pub dropped: u64,
    /// The process exited before its fill ended.
    pub exited: bool,
    /// Background fill rate while it ran, MB/s.
    pub fill_mb_s: f64,
}

/// What the restore hands to the service.
pub struct Handoff {
    pub pid: i32,
    /// tern's copy of the process's userfaultfd (handshake done).
    pub uffd: Uffd,
    /// Where the process keeps its own copy.
    pub fd_in_process: i32,
    /// Image pages already in (filled eagerly because the kernel writes
    /// them during the build: rseq areas).
    pub already_in: Vec<u64>,
    /// Pages came in before this service: learn which from pagemap.
    pub resumed: bool,
    /// The chain's lazy pages, if made already (`LazyMap::of`).
    pub map: Option<LazyMap>,
    /// Decode buffers for faults, if made already ([`warm_buffers`]).
    pub buffers: Vec<Vec<u8>>,
}

/// Buffers for the faults to decode blobs into, faulted in: a fault
/// decoding into fresh memory waits for a page fault and a zeroing per
/// page, ~100 us more. Made by the restore beside the build, before the
/// process runs.
pub fn warm_buffers() -> Vec<Vec<u8>> {
    (0..WARM_BUFFERS)
        .map(|_| {
            let mut v = vec![1u8; sys::usize_of(images::BLOB_PAGES * PAGE_SIZE)];
            v.clear();
            v
        })
        .collect()
}

/// Where an image range lives now in one address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Mapping {
    start: u64,
    end: u64,
    /// Image address of `start`; None: the range was emptied (reads zeros).
    image: Option<u64>,
}

/// One address space served: the process's, or a child's.
struct Space {
    uffd: Arc<Uffd>,
    main: bool,
    /// By address, disjoint.
    maps: Vec<Mapping>,
    /// Lazy data pages in, or gone (never to come).
    done: PageSet,
    dead: bool,
}

/// A journaled event (the JSON lines of the journal).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Change {
    Unmap { start: u64, end: u64 },
    Remove { start: u64, end: u64 },
    Remap { from: u64, to: u64, len: u64 },
}

impl Space {
    fn new(uffd: Arc<Uffd>, map: &LazyMap) -> Space {
        Space {
            uffd,
            main: true,
            maps: map
                .vmas
                .iter()
                .map(|&(s, e)| Mapping {
                    start: s,
                    end: e,
                    image: Some(s),
                })
                .collect(),
            done: PageSet::new(map.pages),
            dead: false,
        }
    }

    /// The mapping holding `addr`.
    fn at(&self, addr: u64) -> Option<&Mapping> {
        let i = self.maps.partition_point(|m| m.end <= addr);
        self.maps.get(i).filter(|m| m.start <= addr)
    }

    /// Where image page range `[ia, ib)` lives now: `(current start, len)`
    /// pieces (an image range is in one place at most, possibly split).
    fn current(&self, ia: u64, ib: u64, out: &mut Vec<(u64, u64, u64)>) {
        out.clear();
        for m in &self.maps {
            let Some(img) = m.image else { continue };
            let (ms, me) = (img, img + (m.end - m.start));
            let (s, e) = (ia.max(ms), ib.min(me));
            if s < e {
                out.push((m.start + (s - img), s, e));
            }
        }
    }

    /// Take `[s, e)` out of the mappings and return what was there; with
    /// `dropped`, the image pages that lived there are gone for good (marked
    /// done, counted); without, they move (a remap) and are still to come.
    fn cut(&mut self, s: u64, e: u64, map: &LazyMap, dropped: Option<&mut u64>) -> Vec<Mapping> {
        let mut out = Vec::new();
        let mut removed = Vec::new();
        for m in self.maps.drain(..) {
            if m.end <= s || m.start >= e {
                out.push(m);
                continue;
            }
            let img_at = |a: u64| m.image.map(|i| i + (a - m.start));
            if m.start < s {
                out.push(Mapping {
                    start: m.start,
                    end: s,
                    image: m.image,
                });
            }
            let (cs, ce) = (m.start.max(s), m.end.min(e));
            removed.push(Mapping {
                start: cs,
                end: ce,
                image: img_at(cs),
            });
            if m.end > e {
                out.push(Mapping {
                    start: e,
                    end: m.end,
                    image: img_at(e),
                });
            }
        }
        self.maps = out;
        let Some(dropped) = dropped else {
            return removed;
        };
        for r in &removed {
            if let Some(img) = r.image {
                let mut a = img;
                while a < img + (r.end - r.start) {
                    if let Some(i) = map.index(a)
                        && self.done.insert(i)
                    {
                        *dropped += 1;
                    }
                    a += PAGE_SIZE;
                }
            }
        }
        removed
    }

    fn insert(&mut self, m: Mapping) {
        let i = self.maps.partition_point(|x| x.start < m.start);
        self.maps.insert(i, m);
    }

    fn apply(&mut self, c: Change, map: &LazyMap, dropped: &mut u64) {
        match c {
            Change::Unmap { start, end } => {
                self.cut(start, end, map, Some(dropped));
            }
            Change::Remove { start, end } => {
                // Emptied: still registered, reads zeros from now on.
                for r in self.cut(start, end, map, Some(dropped)) {
                    self.insert(Mapping { image: None, ..r });
                }
            }
            Change::Remap { from, to, len } => {
                // Whatever was at the destination was unmapped first (its
                // own event). The old range, if it stays (MREMAP_DONTUNMAP),
                // is empty.
                // The moved pages are still to come, at their new place
                // (marking them done would leave a fault there answered
                // "already in" for ever).
                let moved = self.cut(from, from + len, map, None);
                for r in &moved {
                    self.insert(Mapping { image: None, ..*r });
                }
                self.cut(to, to + len, map, Some(dropped));
                for r in moved {
                    self.insert(Mapping {
                        start: r.start - from + to,
                        end: r.end - from + to,
                        image: r.image,
                    });
                }
            }
        }
    }
}

/// A blob: (image, its first page's address).
type BlobKey = (usize, u64);
/// A blob's decoded pages.
type BlobBytes = Arc<Vec<u8>>;

/// Decoded page blobs, shared by the threads: those a fault decoded
/// (oldest dropped first), and those the fill's reader decoded ahead,
/// until the fill has copied them.
struct Blobs {
    /// Blob (image, offset in its image's address space) -> its decoded
    /// pages, and whether the fill's reader decoded it (the fill drops it).
    map: HashMap<BlobKey, (BlobBytes, bool)>,
    /// The blobs faults decoded, oldest first.
    order: VecDeque<BlobKey>,
    bytes: usize,
    /// Buffers to decode into, already faulted in.
    free: Vec<Vec<u8>>,
    /// The same, kept for faults (the fill's reader takes every spare one
    /// it finds, and a fault decoding into fresh memory waits 30-90 µs
    /// more).
    fault_free: Vec<Vec<u8>>,
}

struct Shared {
    pid: i32,
    chain: ImageChain,
    map: LazyMap,
    state: Mutex<State>,
    blobs: Mutex<Blobs>,
    /// Per image: when its page file was last found unchanged (ns from
    /// `t0`).
    checked: Vec<std::sync::atomic::AtomicU64>,
    t0: Instant,
    stop: AtomicBool,
    /// The fault thread wants the state: the fill lets it go first.
    fault_waiting: AtomicBool,
    /// The last fault answered from a run: the fill's reader decodes the
    /// runs after it, its copies go on from there, before their own order.
    follow: Mutex<Follow>,
    failure: Mutex<Option<LazyError>>,
}

/// Where the last fault answered from a run was.
#[derive(Default, Clone, Copy)]
struct Follow {
    /// Counts faults: a reader of this knows whether it saw the last.
    faults: u64,
    space: usize,
    run: usize,
}

impl Shared {
    /// The runs after the last fault of space `space` (up to
    /// [`FOLLOW_BYTES`] past it), if there was one since the fault `seen`
    /// (which becomes that one).
    fn after_fault(&self, space: usize, seen: &mut u64) -> Option<&[Run]> {
        let f = *lock(&self.follow);
        if f.faults == *seen {
            return None;
        }
        *seen = f.faults;
        if f.space != space {
            return None;
        }
        let runs = &self.map.runs;
        let limit = runs.get(f.run)?.end.saturating_add(FOLLOW_BYTES);
        let n = runs[f.run + 1..].partition_point(|r| r.start < limit);
        Some(&runs[f.run + 1..f.run + 1 + n])
    }

    /// Whether `run` has all its pages in space `space` (or the space is
    /// gone); None if the state is busy.
    fn all_in(&self, space: usize, run: &Run) -> Option<bool> {
        let st = self.state.try_lock().ok()?;
        Some(match st.spaces.get(space) {
            Some(sp) if !sp.dead => {
                (run.first..run.first + run.pages()).all(|i| sp.done.contains(i))
            }
            _ => true,
        })
    }

    fn faults_seen(&self) -> u64 {
        lock(&self.follow).faults
    }
}

struct State {
    spaces: Vec<Space>,
    stats: LazyStats,
    fault_us: Vec<f64>,
    journal: Option<std::fs::File>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Outcome of one copy or zeropage.
enum Put {
    /// All of it.
    Done,
    /// The first n bytes (the next page is already there or failed).
    Partial(u64),
    /// Already there.
    Exists,
    /// An event is pending: apply it, then try again.
    Again,
    /// The range is not registered any more.
    Gone,
    /// The address space is gone (the process exited or exec'd).
    NoMm,
    Failed(nix::errno::Errno),
}

fn put_result(r: Result<usize, userfaultfd::Error>, len: u64) -> Put {
    use nix::errno::Errno;
    match r {
        Ok(n) if n as u64 >= len => Put::Done,
        Ok(n) => Put::Partial(n as u64),
        Err(userfaultfd::Error::PartiallyCopied(n)) if (n as u64) < len && n > 0 => {
            Put::Partial(n as u64)
        }
        Err(userfaultfd::Error::PartiallyCopied(_)) => Put::Again,
        Err(e) => match sys::uffd::uffd_errno(e) {
            Errno::EEXIST => Put::Exists,
            Errno::EAGAIN => Put::Again,
            Errno::ENOENT | Errno::EINVAL => Put::Gone,
            Errno::ESRCH => Put::NoMm,
            e => Put::Failed(e),
        },
    }
}

fn copy(uffd: &Uffd, src: &[u8], dst: u64) -> Put {
    // SAFETY: `src` is readable for its length; the destination is in the
    // other process's registered memory, which the kernel checks.
    let r = unsafe {
        uffd.copy(
            src.as_ptr().cast(),
            dst as *mut libc::c_void,
            src.len(),
            true,
        )
    };
    put_result(r, src.len() as u64)
}

fn zeropage(uffd: &Uffd, dst: u64, len: u64) -> Put {
    // SAFETY: as above; no memory of ours is touched.
    let r = unsafe { uffd.zeropage(dst as *mut libc::c_void, sys::usize_of(len), true) };
    put_result(r, len)
}

impl Shared {
    /// Read, check (CRC) and decode the blob of `run` into `out`, through
    /// `stored` (both buffers reused from call to call: fresh memory for
    /// every blob would cost a page fault and a zeroing per page). Returns
    /// which of the two holds the pages (an uncompressed blob is used as
    /// read).
    fn decode<'b>(
        &self,
        run: &Run,
        addr: u64,
        stored: &'b mut Vec<u8>,
        out: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], LazyError> {
        let img = &self.chain.images[run.image];
        let file = img.dir.join(images::PAGES_FILE);
        let unreadable = |what: String| LazyError::Unreadable {
            pid: self.pid,
            addr,
            file: file.clone(),
            what,
        };
        let now = u64::try_from(self.t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let last = &self.checked[run.image];
        if now.saturating_sub(last.load(Ordering::Relaxed)) > CHANGED_CHECK_NS {
            if let Some(why) = img.pages_file_changed() {
                return Err(unreadable(format!(
                    "the file {why} after the restore began"
                )));
            }
            last.store(now, Ordering::Relaxed);
        }
        img.read_stored_into(&run.entry, stored)
            .map_err(|e| unreadable(e.to_string()))?;
        images::check_crc(&file, &run.entry, stored).map_err(|e| unreadable(e.to_string()))?;
        if images::Image::is_raw(&run.entry) {
            return Ok(stored);
        }
        images::decode_blob_into(&file, &run.entry, stored, out)
            .map_err(|e| unreadable(e.to_string()))?;
        Ok(out)
    }

    /// [`Shared::decode`] with buffers it takes: (the buffer holding the
    /// pages, the other one, free again).
    fn decode_owned(
        &self,
        run: &Run,
        addr: u64,
        mut stored: Vec<u8>,
        mut out: Vec<u8>,
    ) -> Result<(Vec<u8>, Vec<u8>), LazyError> {
        let raw = {
            let d = self.decode(run, addr, &mut stored, &mut out)?;
            std::ptr::eq(d.as_ptr(), stored.as_ptr())
        };
        Ok(if raw { (stored, out) } else { (out, stored) })
    }

    /// The decoded bytes of the blob of `run` (for faults: kept a while,
    /// neighbouring faults come from the same blob). Decoded into buffers
    /// of blobs evicted before: a fresh buffer costs a page fault per page,
    /// as much as the decoding itself.
    fn blob(&self, run: &Run, addr: u64) -> Result<Arc<Vec<u8>>, LazyError> {
        let key = (run.image, run.entry.start);
        let (stored, out) = {
            let mut c = lock(&self.blobs);
            if let Some((b, _)) = c.map.get(&key) {
                return Ok(b.clone());
            }
            let mut take = || {
                c.fault_free
                    .pop()
                    .or_else(|| c.free.pop())
                    .unwrap_or_default()
            };
            (take(), take())
        };
        let (data, spare) = self.decode_owned(run, addr, stored, out)?;
        let mut c = lock(&self.blobs);
        c.fault_free.push(spare);
        // Decoded meanwhile by another thread (a fault, the fill's reader
        // or its copies following one): that one, and the buffer back.
        if let Some((b, _)) = c.map.get(&key) {
            let b = b.clone();
            c.fault_free.push(data);
            c.fault_free.truncate(WARM_BUFFERS);
            return Ok(b);
        }
        let data = Arc::new(data);
        c.bytes += data.len();
        c.map.insert(key, (data.clone(), false));
        c.order.push_back(key);
        while c.bytes > BLOB_CACHE_BYTES
            && let Some(old) = c.order.pop_front()
        {
            match c.map.remove(&old) {
                Some((b, false)) => {
                    c.bytes -= b.len();
                    if let Ok(v) = Arc::try_unwrap(b) {
                        c.fault_free.push(v);
                    }
                }
                // The fill's since (its reader took a fault's): the fill
                // drops it.
                Some(fill) => {
                    c.map.insert(old, fill);
                }
                None => {}
            }
        }
        c.fault_free.truncate(WARM_BUFFERS);
        Ok(data)
    }

    /// The fill's reader: the decoded blob of `run`, from the cache (a
    /// fault decoded it) or decoded now into a spare buffer and cached
    /// for faults until the fill has copied it ([`Shared::copied`]).
    fn blob_ahead(&self, run: &Run) -> Result<Arc<Vec<u8>>, LazyError> {
        let key = (run.image, run.entry.start);
        let (stored, out) = {
            let mut c = lock(&self.blobs);
            if let Some((b, fill)) = c.map.get_mut(&key) {
                // A fault's: the fill drops it once copied.
                *fill = true;
                let b = b.clone();
                if let Some(i) = c.order.iter().position(|k| *k == key) {
                    c.order.remove(i);
                    c.bytes -= b.len();
                }
                return Ok(b);
            }
            (
                c.free.pop().unwrap_or_default(),
                c.free.pop().unwrap_or_default(),
            )
        };
        let (data, spare) = self.decode_owned(run, run.start, stored, out)?;
        let data = Arc::new(data);
        let mut c = lock(&self.blobs);
        c.free.push(spare);
        c.map.entry(key).or_insert_with(|| (data.clone(), true));
        Ok(data)
    }

    /// The fill has copied blob `key` (`data`): out of the cache, its
    /// buffer decoded into next.
    fn copied(&self, key: BlobKey, data: BlobBytes) {
        let mut c = lock(&self.blobs);
        if let Some((b, true)) = c.map.get(&key)
            && Arc::ptr_eq(b, &data)
        {
            c.map.remove(&key);
        }
        if let Ok(v) = Arc::try_unwrap(data)
            && c.free.len() < FREE_BUFFERS
        {
            c.free.push(v);
        }
    }

    fn fail(&self, e: LazyError) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The lock one page service of a process holds while it serves:
/// `/run/tern/lazy-PID-STARTTIME.lock`, flocked. A second service (a
/// resume while the first still runs) is refused: two readers of one
/// userfaultfd would each see half of the events.
pub struct ServiceLock {
    name: String,
    _file: std::fs::File,
}

impl Drop for ServiceLock {
    fn drop(&mut self) {
        // Removed while still held: a service starting now finds it gone
        // and makes a new one.
        if let Some(d) = state_dir() {
            let _ = d.remove_file(&self.name);
        }
    }
}

fn lock_name(pid: i32) -> Result<String, LazyError> {
    let st = sys::proc::stat(pid, None).map_err(|e| LazyError::Service {
        pid,
        what: format!("reading /proc/{pid}/stat: {e}"),
    })?;
    Ok(format!("lazy-{pid}-{}.lock", st.starttime))
}

/// How long a starting service waits for the lock: [`ServiceLock::held`]
/// (a `tern restore --detach` waiting for its service) holds it for a
/// moment at a time; only a service that keeps it is another service.
const LOCK_WAIT: Duration = Duration::from_millis(200);

impl ServiceLock {
    pub fn take(pid: i32) -> Result<ServiceLock, LazyError> {
        let name = lock_name(pid)?;
        let err = |what: String| LazyError::Service { pid, what };
        let d = state_dir().ok_or_else(|| err("cannot use /run/tern".into()))?;
        match d.lock_file(&name, LOCK_WAIT) {
            Ok(Some(file)) => Ok(ServiceLock { name, _file: file }),
            Ok(None) => Err(err(
                "another page service serves it (tern lazy-pages or a tern restore --lazy-pages still running); stop it first"
                    .into(),
            )),
            Err(e) => Err(err(format!("locking /run/tern/{name}: {e}"))),
        }
    }

    /// Whether some page service holds the lock of `pid`.
    pub fn held(pid: i32) -> bool {
        let Ok(name) = lock_name(pid) else {
            return false;
        };
        let Some(d) = state_dir() else { return false };
        let Ok(f) = d.open_or_create_file(&name) else {
            return false;
        };
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock) {
            Ok(_) => false,
            Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
        }
    }
}

/// `tern lazy-pages --resume -t PID -D DIR`: take the userfaultfd back
/// from a process restored lazily from `dir` whose service is gone, learn
/// which pages are in, and finish its fill.
pub fn resume(pid: i32, dir: &Path, opts: &ServiceOptions) -> Result<LazyStats, LazyError> {
    let chain = match &opts.remote {
        Some(r) => ImageChain::open_remote(dir, r)?,
        None => ImageChain::open(dir)?,
    };
    let inv = &chain.newest().inventory;
    if inv.pid != pid {
        return Err(LazyError::NotLazy {
            pid,
            what: format!("{} is an image of PID {}", dir.display(), inv.pid),
        });
    }
    let key = images::SealKey::host();
    if let Some(img) = chain
        .images
        .iter()
        .find(|i| i.seal_status(key.as_ref()) == images::SealStatus::Mismatch)
    {
        return Err(LazyError::Service {
            pid,
            what: format!(
                "{}: the image was changed after tern wrote it (its seal does not match); tern serves no altered image",
                img.dir.display()
            ),
        });
    }
    let lock = ServiceLock::take(pid)?;
    // The process's copy: the highest-numbered userfaultfd it holds.
    let fd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| LazyError::NotLazy {
            pid,
            what: format!("reading /proc/{pid}/fd: {e}"),
        })?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&fd| sys::uffd::is_userfaultfd(pid, fd))
        .max()
        .ok_or_else(|| LazyError::NotLazy {
            pid,
            what: "it holds no userfaultfd".into(),
        })?;
    let local = sys::fds::pidfd_getfd(pid, fd).map_err(|e| LazyError::Service {
        pid,
        what: format!("pidfd_getfd of its userfaultfd (fd {fd}): {e}"),
    })?;
    let features = sys::uffd::fdinfo_features(pid, fd).unwrap_or(0);
    let want = sys::uffd::UFFD_FEATURE_EVENT_FORK
        | sys::uffd::UFFD_FEATURE_EVENT_REMAP
        | sys::uffd::UFFD_FEATURE_EVENT_REMOVE
        | sys::uffd::UFFD_FEATURE_EVENT_UNMAP;
    if features & want != want {
        return Err(LazyError::NotLazy {
            pid,
            what: format!(
                "its userfaultfd (fd {fd}) has features {features:#x}, not those of a lazy restore"
            ),
        });
    }
    let h = Handoff {
        pid,
        uffd: sys::uffd::adopt(local),
        fd_in_process: fd,
        already_in: Vec::new(),
        resumed: true,
        map: None,
        buffers: Vec::new(),
    };
    let r = serve_locked(chain, h, opts);
    drop(lock);
    r
}

/// Serve the process of `h` until every lazy page is in (or it exits).
pub fn serve(chain: ImageChain, h: Handoff, opts: &ServiceOptions) -> Result<LazyStats, LazyError> {
    let lock = ServiceLock::take(h.pid)?;
    let r = serve_locked(chain, h, opts);
    drop(lock);
    r
}

fn serve_locked(
    chain: ImageChain,
    h: Handoff,
    opts: &ServiceOptions,
) -> Result<LazyStats, LazyError> {
    let t0 = Instant::now();
    let pid = h.pid;
    let mut h = h;
    let map = h.map.take().unwrap_or_else(|| LazyMap::of(&chain));
    let buffers = match std::mem::take(&mut h.buffers) {
        b if b.len() >= WARM_BUFFERS => b,
        _ => warm_buffers(),
    };
    let uffd = Arc::new(h.uffd);
    let mut main = Space::new(uffd.clone(), &map);
    let mut stats = LazyStats::default();
    let journal_name = journal_name(pid);
    let mut dropped = 0;
    if h.resumed {
        for c in read_journal(journal_name.as_deref()) {
            main.apply(c, &map, &mut dropped);
        }
        stats.already_in = pages_in(pid, &mut main, &map)?;
    } else {
        for a in &h.already_in {
            if let Some(i) = map.index(*a)
                && main.done.insert(i)
            {
                stats.already_in += 1;
            }
        }
    }
    stats.dropped = dropped;
    let journal = journal_name.as_deref().and_then(open_journal);
    tracing::debug!(
        pid,
        pages = map.pages,
        runs = map.runs.len(),
        vmas = map.vmas.len(),
        already_in = stats.already_in,
        "lazy pages: serving"
    );
    let images_in_chain = chain.images.len();
    let shared = Arc::new(Shared {
        pid,
        chain,
        map,
        state: Mutex::new(State {
            spaces: vec![main],
            stats,
            fault_us: Vec::new(),
            journal,
        }),
        blobs: Mutex::new(Blobs {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            free: Vec::new(),
            // Warm buffers from the start: the first faults come before
            // any blob was evicted (the fill's reader warms its own).
            fault_free: buffers,
        }),
        checked: (0..images_in_chain)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        fault_waiting: AtomicBool::new(false),
        follow: Mutex::new(Follow::default()),
        failure: Mutex::new(None),
    });
    let wake = nix::sys::eventfd::EventFd::from_flags(
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
    )
    .map_err(|e| LazyError::Service {
        pid,
        what: format!("eventfd: {e}"),
    })?;
    let wake = Arc::new(wake);
    let faults = {
        let s = shared.clone();
        let w = wake.clone();
        std::thread::Builder::new()
            .name("tern-faults".into())
            .spawn(move || fault_loop(&s, &w))
            .map_err(|e| LazyError::Service {
                pid,
                what: format!("starting the fault thread: {e}"),
            })?
    };
    let t_fill = Instant::now();
    let order = shared.map.order(opts.prefetch);
    std::thread::scope(|sc| {
        let on_its_own = std::thread::Builder::new()
            .name("tern-fill".into())
            .spawn_scoped(sc, || fill(&shared, &order, opts.rate_mb_s));
        match on_its_own {
            Ok(h) => {
                if h.join().is_err() {
                    shared.fail(LazyError::Service {
                        pid,
                        what: "the fill thread panicked".into(),
                    });
                }
            }
            Err(e) => {
                tracing::debug!(pid, "lazy pages: no fill thread ({e}): filling from here");
                fill(&shared, &order, opts.rate_mb_s);
            }
        }
    });
    let fill_secs = t_fill.elapsed().as_secs_f64();
    // Whatever prefetch left (all of it with --prefetch none) comes on
    // fault: wait until every space has all its pages or is gone.
    while !shared.stop.load(Ordering::SeqCst) {
        let st = lock(&shared.state);
        let left = st
            .spaces
            .iter()
            .any(|s| !s.dead && s.done.len() < shared.map.pages);
        let main_dead = st.spaces.first().is_none_or(|s| s.dead);
        drop(st);
        if !left || main_dead || !alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let fill_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Done (or failed): the process's own copy goes, while the fault
    // thread still answers (a fault on a never-populated page may come
    // until the ranges are unregistered).
    let failure = lock(&shared.failure).take();
    if let Some(e) = failure {
        shared.stop.store(true, Ordering::SeqCst);
        let _ = wake.write(1);
        let _ = faults.join();
        return Err(e);
    }
    let exited = !alive(pid);
    if !exited {
        finish(&shared, &uffd, h.fd_in_process, opts.timeout)?;
    }
    shared.stop.store(true, Ordering::SeqCst);
    let _ = wake.write(1);
    let _ = faults.join();
    if let Some(e) = lock(&shared.failure).take() {
        return Err(e);
    }
    if let Some(name) = &journal_name {
        remove_journal(name);
    }
    let mut st = lock(&shared.state);
    let mut stats = st.stats.clone();
    stats.fill_ms = fill_ms;
    stats.exited = exited;
    stats.fill_mb_s = if fill_secs > 0.0 {
        (stats.prefetched * PAGE_SIZE) as f64 / fill_secs / 1e6
    } else {
        0.0
    };
    let lat = &mut st.fault_us;
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            // Nearest rank: an index within the list.
            #[allow(clippy::cast_possible_truncation)]
            let i = ((lat.len() - 1) as f64 * p).round() as usize;
            lat[i.min(lat.len() - 1)]
        }
    };
    stats.fault_us_p50 = pct(0.5);
    stats.fault_us_p99 = pct(0.99);
    Ok(stats)
}

fn alive(pid: i32) -> bool {
    sys::proc::stat(pid, None).is_ok_and(|s| s.state != 'Z' && s.state != 'X')
}

/// Whether `pid` is alive and stays so: a process killed a moment ago may
/// still be on its way out (it fails our injections before it is a
/// zombie); give it 100 ms to get there.
fn still_alive(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_millis(100);
    while alive(pid) {
        if Instant::now() > deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// The background fill: every space, the process's first, run by run in
/// `order`, chunk by chunk. Reading, checking and decoding the blobs runs on
/// a thread of its own up to [`FILL_AHEAD`] blobs ahead of the copies (the
/// two together on one thread made the fill a third slower than the copies
/// alone), into the cache faults look in first.
fn fill(s: &Shared, order: &[usize], rate_mb_s: u64) {
    let t0 = Instant::now();
    let mut bytes = 0u64;
    let mut pieces = Vec::new();
    let mut space = 0;
    loop {
        {
            let st = lock(&s.state);
            if space >= st.spaces.len() {
                return;
            }
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Decoded>(FILL_AHEAD);
        let ok = std::thread::scope(|sc| {
            sc.spawn(move || decode_ahead(s, space, order, &tx));
            // Owned here: dropped when this returns, early too, so that a
            // reader blocked on a full channel sees it closed and ends
            // (the scope waits for it).
            let rx = rx;
            // The blob being copied, decoded.
            let mut cur: Option<(BlobKey, BlobBytes)> = None;
            let empty = Arc::new(Vec::new());
            let mut seen = s.faults_seen();
            for msg in rx.iter() {
                match follow_fault(s, space, &mut seen, &mut pieces) {
                    Some(n) => bytes += n,
                    None => return false,
                }
                let (ri, data) = match msg {
                    Decoded::Blob(ri, data) => {
                        let run = &s.map.runs[ri];
                        if let Some((key, old)) = cur.replace(((run.image, run.entry.start), data))
                        {
                            s.copied(key, old);
                        }
                        (ri, cur.as_ref().map_or(&empty, |c| &c.1))
                    }
                    Decoded::Same(ri) => (ri, cur.as_ref().map_or(&empty, |c| &c.1)),
                    Decoded::Failed(e) => {
                        // As on a fault: the process must not run on (its
                        // threads would wait forever on their pages).
                        kill(s.pid);
                        s.fail(e);
                        return false;
                    }
                };
                let run = s.map.runs[ri];
                let mut ia = run.start;
                while ia < run.end {
                    if s.stop.load(Ordering::SeqCst) {
                        return false;
                    }
                    let ib = (ia + FILL_CHUNK).min(run.end);
                    bytes += put_chunk(s, space, &run, ia, ib, data, &mut pieces);
                    ia = ib;
                    if rate_mb_s > 0 {
                        let due = Duration::from_secs_f64(bytes as f64 / (rate_mb_s as f64 * 1e6));
                        let el = t0.elapsed();
                        if due > el {
                            std::thread::sleep(due - el);
                        }
                    }
                }
            }
            if let Some((key, data)) = cur {
                s.copied(key, data);
            }
            true
        });
        if !ok {
            return;
        }
        space += 1;
    }
}

/// Each run after the last fault of space `space` (see
/// [`Shared::after_fault`]) that has pages not yet in, given to `each`;
/// again from a newer fault if one comes meanwhile. False if the fill must
/// stop (it was stopped, or `each` said so).
fn after_faults(
    s: &Shared,
    space: usize,
    seen: &mut u64,
    mut each: impl FnMut(&Run) -> bool,
) -> bool {
    'fault: while let Some(runs) = s.after_fault(space, seen) {
        for run in runs {
            if s.stop.load(Ordering::SeqCst) {
                return false;
            }
            if s.faults_seen() != *seen {
                continue 'fault;
            }
            if s.all_in(space, run) == Some(true) {
                continue;
            }
            if !each(run) {
                return false;
            }
        }
    }
    true
}

/// The fill's detour after a fault: the runs after the faulted one copied
/// (decoded through the faults' cache, where the reader put them), before
/// the fill's own order goes on. Returns the bytes copied, or None if the
/// fill must stop.
fn follow_fault(
    s: &Shared,
    space: usize,
    seen: &mut u64,
    pieces: &mut Vec<(u64, u64, u64)>,
) -> Option<u64> {
    let mut moved = 0;
    let go_on = after_faults(s, space, seen, |run| match s.blob(run, run.start) {
        Ok(data) => {
            let mut ia = run.start;
            while ia < run.end {
                let ib = (ia + FILL_CHUNK).min(run.end);
                moved += put_chunk(s, space, run, ia, ib, &data, pieces);
                ia = ib;
            }
            true
        }
        Err(e) => {
            kill(s.pid);
            s.fail(e);
            false
        }
    });
    go_on.then_some(moved)
}

/// The reader's part of following a fault: the blobs of the runs after it
/// decoded into the faults' cache, while the copies are busy with those
/// decoded before (a fault that comes for one finds it decoded).
fn decode_after_fault(s: &Shared, space: usize, seen: &mut u64) {
    // An unreadable blob is reported by whoever needs it.
    after_faults(s, space, seen, |run| {
        let _ = s.blob(run, run.start);
        true
    });
}

enum Decoded {
    /// Run `.0`, whose blob's decoded bytes are `.1`.
    Blob(usize, Arc<Vec<u8>>),
    /// Run `.0`, from the same blob as the run before it.
    Same(usize),
    Failed(LazyError),
}

/// The fill's reader: the blob of every run in `order` with pages still
/// missing in space `space`, decoded, sent to the copies in order.
fn decode_ahead(
    s: &Shared,
    space: usize,
    order: &[usize],
    tx: &std::sync::mpsc::SyncSender<Decoded>,
) {
    let mut last: Option<(usize, u64)> = None;
    let mut seen = s.faults_seen();
    for (k, &ri) in order.iter().enumerate() {
        // The blobs a few runs on, fetched beside this one where the
        // pages come from a page server (a no-op for local files).
        for &next in order.iter().skip(k + 1).take(PREFETCH_RUNS) {
            let r = &s.map.runs[next];
            s.chain.images[r.image].prefetch_stored(&r.entry);
        }
        decode_after_fault(s, space, &mut seen);
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let run = s.map.runs[ri];
        // Skip a run whose pages are all in already (faults put them), if
        // the state is free: waiting for it behind a busy fault thread
        // would leave the copies nothing decoded to copy (they look again).
        if let Ok(st) = s.state.try_lock() {
            let Some(sp) = st.spaces.get(space) else {
                return;
            };
            if sp.dead {
                return;
            }
            if (run.first..run.first + run.pages()).all(|i| sp.done.contains(i)) {
                continue;
            }
        }
        let key = (run.image, run.entry.start);
        let msg = if last == Some(key) {
            Decoded::Same(ri)
        } else {
            match s.blob_ahead(&run) {
                Ok(data) => {
                    last = Some(key);
                    Decoded::Blob(ri, data)
                }
                Err(e) => {
                    let _ = tx.send(Decoded::Failed(e));
                    return;
                }
            }
        };
        // While the copies are behind, follow the faults.
        let mut msg = msg;
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(m)) => {
                    msg = m;
                    decode_after_fault(s, space, &mut seen);
                    std::thread::sleep(Duration::from_micros(20));
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// Copy the pages of `[ia, ib)` (image addresses, inside `run`) not yet in,
/// where they live now in space `space`. Returns the bytes copied.
fn put_chunk(
    s: &Shared,
    space: usize,
    run: &Run,
    ia: u64,
    ib: u64,
    data: &[u8],
    pieces: &mut Vec<(u64, u64, u64)>,
) -> u64 {
    let mut moved = 0;
    loop {
        while s.fault_waiting.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let mut st = lock(&s.state);
        match put_locked(
            s, &mut st, space, run, ia, ib, data, pieces, &mut moved, true,
        ) {
            Held::Finished => return moved,
            // A fault waits for the state: it goes first (its thread is
            // stopped until then), the rest of the chunk after it.
            Held::FaultWaiting => drop(st),
            Held::EventPending => {
                // Let the fault thread apply it first.
                drop(st);
                std::thread::sleep(Duration::from_micros(50));
                if s.stop.load(Ordering::SeqCst) {
                    return moved;
                }
            }
        }
    }
}

/// How [`put_locked`] let go of the state.
enum Held {
    /// Every page of the range is in (or gone).
    Finished,
    /// The kernel refused a copy because an event is unread: the pages not
    /// copied are left to a retry.
    EventPending,
    /// A fault waits for the state (only if the caller yields to faults):
    /// the pages not copied are left to a retry.
    FaultWaiting,
}

/// The most a copy of the fill puts in at once while it holds the state: a
/// fault arriving meanwhile waits for one such copy, not a whole chunk
/// (32 pages took 40-130 us here, which was most of the faults' p99).
const YIELD_BYTES: u64 = 8 * PAGE_SIZE;

/// [`put_chunk`] with the state held. With `yield_to_faults` (the fill),
/// copies are of at most [`YIELD_BYTES`] and it returns between two of them
/// if a fault waits.
#[allow(clippy::too_many_arguments)]
fn put_locked(
    s: &Shared,
    st: &mut State,
    space: usize,
    run: &Run,
    ia: u64,
    ib: u64,
    data: &[u8],
    pieces: &mut Vec<(u64, u64, u64)>,
    moved: &mut u64,
    yield_to_faults: bool,
) -> Held {
    let blob_off = |a: u64| sys::usize_of(a - run.entry.start);
    let State { spaces, stats, .. } = st;
    let sp = &mut spaces[space];
    if sp.dead {
        return Held::Finished;
    }
    let cap = if yield_to_faults {
        YIELD_BYTES
    } else {
        u64::MAX
    };
    let mut copies = 0u32;
    sp.current(ia, ib, pieces);
    for &(cur, s0, s1) in pieces.iter() {
        // Sub-runs of pages not in yet.
        let mut a = s0;
        while a < s1 {
            let idx = |x: u64| run.first + (x - run.start) / PAGE_SIZE;
            if sp.done.contains(idx(a)) {
                a += PAGE_SIZE;
                continue;
            }
            let mut b = a + PAGE_SIZE;
            while b < s1 && !sp.done.contains(idx(b)) {
                b += PAGE_SIZE;
            }
            let dst = cur + (a - s0);
            let mut off = 0;
            // A copy may span two VMAs (the process split the range, e.g.
            // with mprotect): the kernel refuses it as if nothing were
            // mapped. Then page by page, and only a single page refused is
            // gone.
            let mut most = (b - a).min(cap);
            while a + off < b {
                if yield_to_faults && copies > 0 && s.fault_waiting.load(Ordering::Acquire) {
                    return Held::FaultWaiting;
                }
                copies += 1;
                let end = b.min(a + off + most);
                let src = &data[blob_off(a + off)..blob_off(end)];
                let put = copy(&sp.uffd, src, dst + off);
                match put {
                    Put::Done | Put::Partial(_) => {
                        let n = match put {
                            Put::Partial(n) => n - n % PAGE_SIZE,
                            _ => end - (a + off),
                        };
                        for p in (a + off..a + off + n).step_by(sys::usize_of(PAGE_SIZE)) {
                            if sp.done.insert(idx(p)) {
                                stats.prefetched += 1;
                                stats.pages += 1;
                            }
                        }
                        *moved += n;
                        off += n;
                        // The page after: there already, or gone.
                        if a + off < end && n == 0 {
                            sp.done.insert(idx(a + off));
                            off += PAGE_SIZE;
                        }
                    }
                    Put::Exists => {
                        // Put there by a fault answer in between: a
                        // page at a time from here.
                        sp.done.insert(idx(a + off));
                        off += PAGE_SIZE;
                    }
                    Put::Again => return Held::EventPending,
                    Put::Gone if end - (a + off) > PAGE_SIZE => most = PAGE_SIZE,
                    Put::Gone => {
                        // Not registered any more: a child's range it
                        // does not have (MADV_DONTFORK), or unmapped (its
                        // event follows).
                        sp.done.insert(idx(a + off));
                        off += PAGE_SIZE;
                    }
                    Put::NoMm => {
                        sp.dead = true;
                        return Held::Finished;
                    }
                    Put::Failed(e) => {
                        s.fail(LazyError::Service {
                            pid: s.pid,
                            what: format!("UFFDIO_COPY to {:#x}: {e}", dst + off),
                        });
                        return Held::Finished;
                    }
                }
            }
            a = b;
        }
    }
    Held::Finished
}

/// The fault thread: poll every userfaultfd, answer faults, apply events.
fn fault_loop(s: &Shared, wake: &nix::sys::eventfd::EventFd) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    // A faulting thread waits for this one: it runs before the fill (and
    // anything else of ordinary priority) as soon as a fault wakes it.
    let tid = nix::unistd::gettid().as_raw();
    let rt = sys::sched::SchedAttr {
        size: sys::sched::SCHED_ATTR_SIZE_VER1,
        sched_policy: sys::sched::SCHED_FIFO,
        sched_priority: 1,
        ..Default::default()
    };
    if let Err(e) = sys::sched::set_attr(tid, &rt) {
        tracing::debug!(
            pid = s.pid,
            "lazy pages: fault thread stays SCHED_OTHER: {e}"
        );
    }
    loop {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let uffds: Vec<(usize, Arc<Uffd>)> = lock(&s.state)
            .spaces
            .iter()
            .enumerate()
            .filter(|(_, sp)| !sp.dead)
            .map(|(i, sp)| (i, sp.uffd.clone()))
            .collect();
        let ready: Vec<usize> = {
            let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
            for (_, u) in &uffds {
                // SAFETY: the Uffd outlives this poll (we hold an Arc).
                let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(u.as_raw_fd()) };
                fds.push(PollFd::new(bfd, PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    s.fail(LazyError::Service {
                        pid: s.pid,
                        what: format!("poll: {e}"),
                    });
                    return;
                }
            }
            fds[1..]
                .iter()
                .enumerate()
                .filter(|(_, f)| {
                    f.revents()
                        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR))
                })
                .map(|(k, _)| uffds[k].0)
                .collect()
        };
        let t_wake = Instant::now();
        for space in ready {
            if let Err(e) = serve_space(s, space, t_wake) {
                s.fail(e);
                return;
            }
        }
    }
}

/// Read and answer every message waiting on space `space`'s userfaultfd.
fn serve_space(s: &Shared, space: usize, t_wake: Instant) -> Result<(), LazyError> {
    s.fault_waiting.store(true, Ordering::Release);
    let mut st = lock(&s.state);
    s.fault_waiting.store(false, Ordering::Release);
    // Faults refused while an event was unread (EAGAIN): answered once the
    // events that follow them in the queue are applied.
    let mut retry: Vec<u64> = Vec::new();
    let mut rounds = 0;
    loop {
        read_messages(s, &mut st, space, t_wake, &mut retry)?;
        if retry.is_empty() || st.spaces[space].dead {
            return Ok(());
        }
        let mut still = Vec::new();
        for a in retry.drain(..) {
            if !answer_fault(s, &mut st, space, a, t_wake)? {
                still.push(a);
            }
        }
        retry = still;
        if retry.is_empty() {
            return Ok(());
        }
        rounds += 1;
        if rounds > 10_000 {
            return Err(LazyError::Service {
                pid: s.pid,
                what: format!(
                    "the fault at {:#x} could not be answered: the kernel keeps saying an event is pending",
                    retry[0]
                ),
            });
        }
        // The event is being generated (a thread between its mmap change
        // and queueing the event): let it come.
        drop(st);
        std::thread::sleep(Duration::from_micros(20));
        st = lock(&s.state);
    }
}

fn read_messages(
    s: &Shared,
    st: &mut State,
    space: usize,
    t_wake: Instant,
    retry: &mut Vec<u64>,
) -> Result<(), LazyError> {
    loop {
        let uffd = st.spaces[space].uffd.clone();
        let ev = match uffd.read_event() {
            Ok(Some(ev)) => ev,
            Ok(None) => return Ok(()),
            Err(userfaultfd::Error::ReadEof) => {
                st.spaces[space].dead = true;
                return Ok(());
            }
            Err(e) => {
                return Err(LazyError::Service {
                    pid: s.pid,
                    what: format!("reading the userfaultfd: {e}"),
                });
            }
        };
        match ev {
            Event::Pagefault { addr, .. } => {
                let a = (addr as u64) & !(PAGE_SIZE - 1);
                if !answer_fault(s, st, space, a, t_wake)? {
                    retry.push(a);
                }
            }
            Event::Fork { uffd } => {
                let parent = &st.spaces[space];
                let child = Space {
                    uffd: Arc::new(uffd),
                    main: false,
                    maps: parent.maps.clone(),
                    done: parent.done.clone(),
                    dead: false,
                };
                st.spaces.push(child);
                st.stats.children += 1;
            }
            Event::Remap { from, to, len } => change(
                s,
                st,
                space,
                Change::Remap {
                    from: from as u64,
                    to: to as u64,
                    len: len as u64,
                },
            ),
            Event::Remove { start, end } => change(
                s,
                st,
                space,
                Change::Remove {
                    start: start as u64,
                    end: end as u64,
                },
            ),
            Event::Unmap { start, end } => change(
                s,
                st,
                space,
                Change::Unmap {
                    start: start as u64,
                    end: end as u64,
                },
            ),
        }
    }
}

fn change(s: &Shared, st: &mut State, space: usize, c: Change) {
    let State {
        spaces,
        stats,
        journal,
        ..
    } = st;
    let sp = &mut spaces[space];
    if sp.main
        && let Some(j) = journal
    {
        use std::io::Write;
        let mut line = serde_json::to_vec(&c).expect("a change serializes");
        line.push(b'\n');
        if let Err(e) = j.write_all(&line) {
            tracing::warn!(pid = s.pid, "lazy pages: writing the journal: {e}");
        }
    }
    sp.apply(c, &s.map, &mut stats.dropped);
}

/// Answer a fault at page `a` of space `space`. Returns false if the kernel
/// said EAGAIN (an event is unread: try again after reading it).
fn answer_fault(
    s: &Shared,
    st: &mut State,
    space: usize,
    a: u64,
    t_wake: Instant,
) -> Result<bool, LazyError> {
    let sp = &st.spaces[space];
    let uffd = sp.uffd.clone();
    let image = sp.at(a).and_then(|m| m.image.map(|i| i + (a - m.start)));
    let run = image.and_then(|ia| s.map.find_index(ia).map(|ri| (ia, ri, s.map.runs[ri])));
    let put = match run {
        Some((ia, ri, run)) => {
            let idx = run.first + (ia - run.start) / PAGE_SIZE;
            if sp.done.contains(idx) {
                Put::Exists
            } else {
                let data = s.blob(&run, a).inspect_err(|_| kill(s.pid))?;
                let off = sys::usize_of(ia - run.entry.start);
                let r = copy(&uffd, &data[off..off + sys::usize_of(PAGE_SIZE)], a);
                if matches!(r, Put::Done) {
                    let sp = &mut st.spaces[space];
                    if sp.done.insert(idx) {
                        st.stats.pages += 1;
                    }
                    // The thread runs on; its next faults are most likely
                    // its neighbours: the rest of the run goes in now
                    // (the pages not in yet).
                    record_fault(st, t_wake);
                    {
                        let mut f = lock(&s.follow);
                        f.faults += 1;
                        f.space = space;
                        f.run = ri;
                    }
                    let mut moved = 0;
                    put_locked(
                        s,
                        st,
                        space,
                        &run,
                        run.start,
                        run.end,
                        &data,
                        &mut Vec::new(),
                        &mut moved,
                        false,
                    );
                    return Ok(true);
                }
                r
            }
        }
        None => {
            let r = zeropage(&uffd, a, PAGE_SIZE);
            if matches!(r, Put::Done) {
                st.stats.zero_pages += 1;
            }
            r
        }
    };
    match put {
        Put::Done | Put::Partial(_) => {}
        Put::Exists => {
            // In already (the fill got there first): make sure the thread
            // is awake.
            let _ = uffd.wake(a as *mut libc::c_void, sys::usize_of(PAGE_SIZE));
        }
        Put::Again => return Ok(false),
        Put::Gone => {
            // Unmapped meanwhile (its event follows).
        }
        Put::NoMm => st.spaces[space].dead = true,
        Put::Failed(e) => {
            kill(s.pid);
            return Err(LazyError::Service {
                pid: s.pid,
                what: format!("answering the fault at {a:#x}: {e}"),
            });
        }
    }
    record_fault(st, t_wake);
    Ok(true)
}

fn record_fault(st: &mut State, t_wake: Instant) {
    st.stats.faults += 1;
    st.fault_us.push(t_wake.elapsed().as_secs_f64() * 1e6);
}

/// SIGKILL the process: it must not run on with memory tern cannot give.
fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Every page in: unregister the process's ranges, close the copy it keeps
/// (and the copies its children inherited), so that the process has the
/// fds of an eager restore.
fn finish(s: &Shared, uffd: &Uffd, fd_in_process: i32, timeout: Duration) -> Result<(), LazyError> {
    let pid = s.pid;
    let err = |what: String| LazyError::Service { pid, what };
    // Unregister every VMA registered with this userfaultfd: ours, as
    // moved and grown since ("um" in VmFlags). One registered with another
    // userfaultfd (the program's own) refuses: left alone.
    if let Ok(vmas) = sys::proc::vm_flags(pid) {
        for ((start, end), flags) in vmas {
            if flags.iter().any(|f| f == "um") {
                let _ = uffd.unregister(start as *mut libc::c_void, sys::usize_of(end - start));
            }
        }
    }
    let ino = |p: i32, fd: i32| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{p}/fd/{fd}")).map(|m| (m.dev(), m.ino()))
    };
    let ours = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(format!("/proc/self/fd/{}", uffd.as_raw_fd()))
            .map_err(|e| err(format!("reading our userfaultfd: {e}")))?;
        (m.dev(), m.ino())
    };
    let mut procs = vec![pid];
    procs.extend(sys::proc::descendants(pid));
    for p in procs {
        if ino(p, fd_in_process).ok() != Some(ours) {
            continue;
        }
        let r = (|| -> Result<(), sys::inject::InjectError> {
            let mut inj = sys::inject::Injector::attach(p, timeout)?;
            let r = (|| {
                inj.ensure_scratch(None)?;
                inj.syscall(libc::SYS_close, [fd_in_process as u64, 0, 0, 0, 0, 0])?;
                inj.remove_scratch()
            })();
            let d = inj.detach();
            r?;
            d
        })();
        if let Err(e) = r {
            if p == pid && still_alive(pid) {
                return Err(err(format!(
                    "closing its copy of the userfaultfd (fd {fd_in_process}): {e}"
                )));
            }
            tracing::debug!(pid = p, "lazy pages: closing an inherited userfaultfd: {e}");
        }
    }
    Ok(())
}

/// Pages already in (present or swapped) in the process's lazy ranges,
/// marked in `space`: what a resumed service need not deliver.
fn pages_in(pid: i32, space: &mut Space, map: &LazyMap) -> Result<u64, LazyError> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|e| LazyError::Service {
            pid,
            what: format!("opening /proc/{pid}/pagemap: {e}"),
        })?;
    let mut n = 0;
    let maps = space.maps.clone();
    let mut buf = Vec::new();
    for m in maps {
        let Some(img) = m.image else { continue };
        let pages = sys::usize_of((m.end - m.start) / PAGE_SIZE);
        buf.resize(pages * 8, 0);
        f.read_exact_at(&mut buf, m.start / PAGE_SIZE * 8)
            .map_err(|e| LazyError::Service {
                pid,
                what: format!("reading /proc/{pid}/pagemap at {:#x}: {e}", m.start),
            })?;
        for (k, w) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes(w.try_into().expect("8 bytes"));
            if e & (3 << 62) != 0
                && let Some(i) = map.index(img + k as u64 * PAGE_SIZE)
                && space.done.insert(i)
            {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// `lazy-PID-STARTTIME.journal` in /run/tern.
fn journal_name(pid: i32) -> Option<String> {
    let st = sys::proc::stat(pid, None).ok()?;
    Some(format!("lazy-{pid}-{}.journal", st.starttime))
}

fn state_dir() -> Option<images::ImageDir> {
    let d = images::ImageDir::create(Path::new("/run/tern")).ok()?;
    d.make_private().ok()?;
    Some(d)
}

fn open_journal(name: &str) -> Option<std::fs::File> {
    use std::io::Seek;
    let mut f = state_dir()?.open_or_create_file(name).ok()?;
    f.seek(std::io::SeekFrom::End(0)).ok()?;
    Some(f)
}

/// The changes a previous service of this process journaled (a line that
/// does not parse ends the list: a service killed mid-write).
fn read_journal(name: Option<&str>) -> Vec<Change> {
    let Some(name) = name else { return Vec::new() };
    let Some(d) = state_dir() else {
        return Vec::new();
    };
    let Ok((bytes, _)) = d.read_file(name, 64 << 20) else {
        return Vec::new();
    };
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map_while(|l| serde_json::from_slice::<Change>(l).ok())
        .filter(|c| match *c {
            Change::Unmap { start, end } | Change::Remove { start, end } => {
                start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0 && start < end
            }
            Change::Remap { from, to, len } => {
                from % PAGE_SIZE == 0 && to % PAGE_SIZE == 0 && len % PAGE_SIZE == 0
            }
        })
        .collect()
}

fn remove_journal(name: &str) {
    if let Some(d) = state_dir() {
        let _ = d.remove_file(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(maps: Vec<Mapping>) -> Space {
        let (uffd, _) = sys::uffd::handshake(sys::uffd::create_unhandshaken().unwrap(), &[0])
            .expect("userfaultfd");
        Space {
            uffd: Arc::new(uffd),
            main: true,
            maps,
            done: PageSet::new(0),
            dead: false,
        }
    }

    fn empty_map() -> LazyMap {
        LazyMap {
            vmas: vec![],
            runs: vec![],
            pages: 0,
        }
    }

    #[test]
    fn events_move_empty_and_cut_ranges() {
        let p = PAGE_SIZE;
        let map = empty_map();
        let mut d = 0;
        let mut sp = space(vec![Mapping {
            start: 10 * p,
            end: 20 * p,
            image: Some(10 * p),
        }]);
        // madvise(DONTNEED) of pages 12..14: emptied, reads zeros.
        sp.apply(
            Change::Remove {
                start: 12 * p,
                end: 14 * p,
            },
            &map,
            &mut d,
        );
        assert_eq!(sp.at(12 * p).unwrap().image, None);
        assert_eq!(sp.at(14 * p).unwrap().image, Some(14 * p));
        // mremap of pages 14..16 to 40..42: image pages follow.
        sp.apply(
            Change::Remap {
                from: 14 * p,
                to: 40 * p,
                len: 2 * p,
            },
            &map,
            &mut d,
        );
        let m = sp.at(41 * p).unwrap();
        assert_eq!(m.image.map(|i| i + (41 * p - m.start)), Some(15 * p));
        assert_eq!(sp.at(14 * p).unwrap().image, None, "old range empty");
        let mut out = Vec::new();
        sp.current(14 * p, 16 * p, &mut out);
        assert_eq!(out, vec![(40 * p, 14 * p, 16 * p)]);
        // munmap of 16..20: gone.
        sp.apply(
            Change::Unmap {
                start: 16 * p,
                end: 20 * p,
            },
            &map,
            &mut d,
        );
        assert!(sp.at(17 * p).is_none());
        assert_eq!(sp.maps.len(), 4, "{:?}", sp.maps);
    }
}
