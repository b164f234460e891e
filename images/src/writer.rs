//! Writing one image: page data streams into `pages.img` as it is copied; the
//! page map, VMA list and (last) the inventory are written by `finish`.
//!
//! An image built over several rounds (`tern dump`'s live pre-copy) calls
//! [`ImageWriter::replace_range`] before recording a range again: the newer
//! round's pages win, and what an older round stored for them stays in
//! `pages.img` as dead bytes, referenced by no entry.

use crate::fsdir::ImageDir;
use crate::pagemap::{CODEC_LZ4, CODEC_RAW, PageEntry, PageKind, PageMap};
use crate::process::{PIPES_DIR, PROCESS_FILE, ProcessImage};
use crate::seal::{SealKey, digest};
use crate::{
    INVENTORY_FILE, ImageError, Inventory, MM_FILE, MmRecord, PAGE_SIZE, PAGEMAP_FILE, PAGES_FILE,
    PageRange,
};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Largest run of pages stored as one blob: bounds the memory a reader needs
/// and keeps lz4 blocks small enough to decompress on demand (lazy pages).
pub const MAX_BLOB_PAGES: u64 = 256;

/// Pages per blob this writer makes: a fault on a page not yet in reads,
/// checks and decodes its whole blob, 128 KiB in ~50 us, where 1 MiB took
/// half a millisecond; lz4 finds its matches within 64 KiB anyway, so the
/// ratio is the same.
pub const BLOB_PAGES: u64 = 32;

/// A run of zero pages between data shorter than this is stored in the blob.
const MIN_ZERO_RUN: usize = 8;

/// Totals of what was written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub data_pages: u64,
    pub zero_pages: u64,
    pub hole_pages: u64,
    /// Bytes of page data in `pages.img` (after compression) that the page
    /// map refers to.
    pub bytes_written: u64,
    /// Bytes in `pages.img` that replaced entries left unreferenced.
    pub bytes_dead: u64,
    /// Where the page data in `pages.img` ends (zeros written ahead by
    /// `preallocate` may follow: [`trim_pages_file`] cuts them).
    pub stored_end: u64,
}

/// Cut the zeros `ImageWriter::preallocate` wrote past the page data of
/// the image in `dir` (`stored_end` from its `WriteStats`). The image is
/// valid either way; this only gives the space back.
pub fn trim_pages_file(dir: &Path, stored_end: u64) -> Result<(), ImageError> {
    let (d, _) = ImageDir::open(dir)?;
    let path = d.child(PAGES_FILE);
    let Some((f, _)) = d.open_file(PAGES_FILE, true)? else {
        return Err(ImageError::io(
            &path,
            std::io::Error::from_raw_os_error(libc::ENOENT),
        ));
    };
    let len = f.metadata().map_err(|e| ImageError::io(&path, e))?.len();
    if len > stored_end {
        f.set_len(stored_end)
            .map_err(|e| ImageError::io(&path, e))?;
    }
    Ok(())
}

/// The files of an image, which a new image in the same directory replaces
/// when no inventory says they are a finished image (a killed run's).
const IMAGE_FILES: [&str; 4] = [PAGES_FILE, PAGEMAP_FILE, MM_FILE, PROCESS_FILE];

/// Remove what an unfinished image (no inventory) left in `dir`: its
/// files, temporary files and `pipes/`; an image with an inventory is left
/// alone. Returns whether `dir` is empty afterwards.
pub fn discard_unfinished(dir: &Path) -> Result<bool, ImageError> {
    let (d, _) = ImageDir::open(dir)?;
    if d.exists(INVENTORY_FILE) {
        return Ok(false);
    }
    for f in IMAGE_FILES {
        d.remove_file(f)?;
    }
    d.remove_subdir(PIPES_DIR)?;
    for name in d.list()? {
        if name.contains(".tmp-") {
            d.remove_file(&name)?;
        }
    }
    Ok(d.list()?.is_empty())
}

pub struct ImageWriter {
    dir: ImageDir,
    pages: BufWriter<std::fs::File>,
    offset: u64,
    compress: bool,
    /// By start address.
    entries: BTreeMap<u64, PageEntry>,
    /// Two entries added at the same address (reported by `finish`).
    clash: Option<(PageEntry, PageEntry)>,
    /// Zeros written ahead by `preallocate`.
    preallocated: u64,
    stats: WriteStats,
    /// SHA-256 of each file written that the seal covers.
    digests: Vec<(String, [u8; 32])>,
    seal_key: Option<SealKey>,
    /// Files `finish` (and `store_process`) write, created ahead by
    /// [`ImageWriter::create_outputs`].
    outputs: Vec<crate::fsdir::PendingFile>,
    /// `pipes/`, made ahead by [`ImageWriter::create_outputs`] (removed by
    /// `finish` if no pipe contents went in).
    pipes_dir: Option<ImageDir>,
    /// Files of `pipes/` written ahead ([`ImageWriter::write_ahead`]), with
    /// their digests: `store_process` keeps those its state names.
    ahead: Vec<(String, [u8; 32])>,
}

impl ImageWriter {
    /// Create (or reuse, if empty of an inventory) `dir` and start
    /// `pages.img` (see [`ImageDir::create`] for what is refused). An
    /// existing image in `dir` is refused: images are never overwritten in
    /// place, a chain's parent might be the very directory.
    pub fn create(dir: &Path, compress: bool) -> Result<ImageWriter, ImageError> {
        let d = ImageDir::create(dir)?;
        if d.exists(INVENTORY_FILE) {
            return Err(ImageError::Unsafe {
                path: dir.to_path_buf(),
                what: "already holds an image; choose an empty directory".into(),
            });
        }
        // What a killed run left (no inventory: not an image) goes; so does
        // anything planted under those names (a link is removed, never
        // followed).
        for f in IMAGE_FILES {
            d.remove_file(f)?;
        }
        d.remove_subdir(PIPES_DIR)?;
        let file = d.create_file(PAGES_FILE)?;
        Ok(ImageWriter {
            dir: d,
            // Small (compressed) blobs are gathered here; a write of this
            // size or more goes straight to the file, not copied through it.
            pages: BufWriter::with_capacity(sys::usize_of(BLOB_PAGES * PAGE_SIZE), file),
            offset: 0,
            compress,
            entries: BTreeMap::new(),
            clash: None,
            preallocated: 0,
            stats: WriteStats::default(),
            digests: Vec::new(),
            seal_key: None,
            outputs: Vec::new(),
            pipes_dir: None,
            ahead: Vec::new(),
        })
    }

    /// Create now the files `finish` writes (and `process.json` with
    /// `process`), under temporary names: a final dump does this before
    /// it freezes its target, and the creates are not in the frozen
    /// window. Those not written are removed by `finish`.
    pub fn create_outputs(&mut self, process: bool) -> Result<(), ImageError> {
        let mut names = vec![PAGEMAP_FILE, MM_FILE, INVENTORY_FILE];
        if process {
            names.push(PROCESS_FILE);
        }
        for name in names {
            if !self.outputs.iter().any(|p| p.name() == name) {
                let p = self.dir.begin_atomic(name)?;
                self.outputs.push(p);
            }
        }
        if process && self.pipes_dir.is_none() {
            self.pipes_dir = Some(self.dir.create_subdir(PIPES_DIR)?);
        }
        Ok(())
    }

    /// Write `name` whole, through the file created ahead for it if any.
    fn write_output(&mut self, name: &str, bytes: &[u8]) -> Result<(), ImageError> {
        match self.outputs.iter().position(|p| p.name() == name) {
            Some(i) => {
                let p = self.outputs.swap_remove(i);
                self.dir.commit_atomic(p, bytes, false)
            }
            None => self.dir.write_atomic(name, bytes, false),
        }
    }

    /// Seal the image with `key` when it is finished (see `seal`).
    pub fn set_seal_key(&mut self, key: Option<SealKey>) {
        self.seal_key = key;
    }

    /// fsync what `pages.img` holds so far (the zeros of `preallocate`: a
    /// final dump checks before the freeze that the file system can make
    /// its image durable).
    pub fn sync_pages(&mut self) -> Result<(), ImageError> {
        let path = self.dir.child(PAGES_FILE);
        self.pages
            .flush()
            .and_then(|_| self.pages.get_ref().sync_all())
            .map_err(|e| ImageError::io(&path, e))?;
        self.dir.sync()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Write `bytes` of zeros into `pages.img` now, to be overwritten by
    /// the pages added later (the file is cut to what was used by
    /// [`trim_pages_file`]). Page data then lands in page-cache pages that already
    /// exist: on ext4 writing 16 MiB into a new file takes 8-12 ms here,
    /// into a pre-written one about 3. A final dump does this before the
    /// freeze. Only before any page was added.
    pub fn preallocate(&mut self, bytes: u64) -> Result<(), ImageError> {
        use std::io::{Seek, SeekFrom};
        let path = self.dir.child(PAGES_FILE);
        if self.offset != 0 || bytes == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let f = self.pages.get_mut();
        let mut at = 0u64;
        while at < bytes {
            let n = sys::usize_of((bytes - at).min(zeros.len() as u64));
            f.write_all(&zeros[..n])
                .map_err(|e| ImageError::io(&path, e))?;
            at += n as u64;
        }
        f.seek(SeekFrom::Start(0))
            .map_err(|e| ImageError::io(&path, e))?;
        self.preallocated = bytes;
        Ok(())
    }

    /// Record `bytes` as the contents of the pages starting at `start`.
    /// Runs of all-zero pages become `Zero` entries and are not stored,
    /// unless they are short and between data (a page in eight left zero
    /// would otherwise double the entries, and the page map is read whole
    /// before a restore starts): those go into the blob, where lz4 makes
    /// almost nothing of them.
    pub fn add_pages(&mut self, start: u64, bytes: &[u8]) -> Result<(), ImageError> {
        let plan = PagePlan::of(bytes, !self.compress);
        self.add_planned(start, bytes, &plan)
    }

    /// [`Self::add_pages`] with the work that needs no writer done ahead,
    /// on another thread: the copy of a frozen target has its readers plan
    /// each batch so that the writer only writes. A plan made for another
    /// length, or without checksums for an uncompressed image, is made
    /// again here.
    pub fn add_planned(
        &mut self,
        start: u64,
        bytes: &[u8],
        plan: &PagePlan,
    ) -> Result<(), ImageError> {
        assert!(start.is_multiple_of(PAGE_SIZE) && (bytes.len() as u64).is_multiple_of(PAGE_SIZE));
        let ps = sys::usize_of(PAGE_SIZE);
        if plan.pages != bytes.len() / ps || (!self.compress && plan.crcs.is_none()) {
            return self.add_planned(start, bytes, &PagePlan::of(bytes, !self.compress));
        }
        let mut crcs = plan.crcs.as_deref().unwrap_or_default().iter().copied();
        for &(a, b, z) in &plan.runs {
            let addr = start + a as u64 * PAGE_SIZE;
            if z {
                self.add_marker(
                    PageKind::Zero,
                    PageRange::new(addr, addr + ((b - a) * ps) as u64),
                );
                continue;
            }
            self.write_run(addr, &bytes[a * ps..b * ps], &mut crcs)?;
        }
        Ok(())
    }

    /// Record `range` as not populated (reads as the VMA's backing).
    pub fn add_hole(&mut self, range: PageRange) {
        if !range.is_empty() {
            self.add_marker(PageKind::Hole, range);
        }
    }

    fn add_marker(&mut self, kind: PageKind, range: PageRange) {
        // An entry counts at most u32::MAX pages (16 TiB): a larger range
        // takes several.
        let most = u64::from(u32::MAX);
        if range.pages() > most {
            let mid = range.start + most * PAGE_SIZE;
            self.add_marker(kind, PageRange::new(range.start, mid));
            self.add_marker(kind, PageRange::new(mid, range.end));
            return;
        }
        self.count_marker(kind, range);
        // Merge with the marker of the same kind just below, when adjacent.
        if let Some((_, last)) = self.entries.range_mut(..range.start).next_back()
            && last.kind == kind
            && last.end() == range.start
            && let Ok(merged) = u32::try_from(u64::from(last.nr_pages) + range.pages())
        {
            last.nr_pages = merged;
            return;
        }
        self.insert(PageEntry::marker(kind, range));
    }

    fn insert(&mut self, e: PageEntry) {
        if let Some(old) = self.entries.insert(e.start, e)
            && self.clash.is_none()
        {
            self.clash = Some((old, e));
        }
    }

    /// Forget what was recorded for `range`, so that it can be recorded
    /// anew (a later round's pages replace an earlier round's). An entry
    /// reaching past `range` keeps its other pages: a marker is cut, a data
    /// blob is read back and its surviving pages stored again.
    pub fn replace_range(&mut self, range: PageRange) -> Result<(), ImageError> {
        if range.is_empty() {
            return Ok(());
        }
        // Entries do not overlap: walk down from the last one starting
        // below `range.end` until one ends at or below `range.start`.
        let hit: Vec<u64> = self
            .entries
            .range(..range.end)
            .rev()
            .take_while(|(_, e)| e.end() > range.start)
            .map(|(k, _)| *k)
            .collect();
        for k in hit {
            let Some(e) = self.entries.remove(&k) else {
                continue;
            };
            self.uncount(&e);
            let left = PageRange::new(e.start, range.start.max(e.start).min(e.end()));
            let right = PageRange::new(range.end.max(e.start).min(e.end()), e.end());
            match e.kind {
                PageKind::Data => {
                    self.stats.bytes_dead += e.stored_len;
                    let path = self.dir.child(PAGES_FILE);
                    self.pages
                        .flush()
                        .map_err(|err| ImageError::io(&path, err))?;
                    let data = if left.is_empty() && right.is_empty() {
                        None
                    } else {
                        Some(crate::pagemap::read_entry_data_from(
                            &path,
                            self.pages.get_ref(),
                            &e,
                        )?)
                    };
                    // The dead bytes give their space back (a live
                    // pre-copy that copies a hot set again every round would
                    // otherwise grow the file by the set each round).
                    self.punch(e.offset, e.stored_len);
                    let Some(data) = data else { continue };
                    for part in [left, right] {
                        if !part.is_empty() {
                            let at = sys::usize_of(part.start - e.start);
                            let bytes = &data[at..at + sys::usize_of(part.len())];
                            self.write_blob(part.start, bytes)?;
                        }
                    }
                }
                kind => {
                    for part in [left, right] {
                        if !part.is_empty() {
                            self.count_marker(kind, part);
                            self.insert(PageEntry::marker(kind, part));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Free the file's space for `len` bytes at `offset` (they read as
    /// zeros after); best effort: a file system without hole punching keeps
    /// them.
    fn punch(&mut self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return;
        }
        // SAFETY: fallocate(2) on our own open file, no memory involved.
        unsafe {
            libc::fallocate(
                self.pages.get_ref().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            );
        }
    }

    fn count_marker(&mut self, kind: PageKind, range: PageRange) {
        match kind {
            PageKind::Zero => self.stats.zero_pages += range.pages(),
            PageKind::Hole => self.stats.hole_pages += range.pages(),
            PageKind::Data => {}
        }
    }

    fn uncount(&mut self, e: &PageEntry) {
        let n = e.nr_pages as u64;
        match e.kind {
            PageKind::Zero => self.stats.zero_pages -= n,
            PageKind::Hole => self.stats.hole_pages -= n,
            PageKind::Data => {
                self.stats.data_pages -= n;
                self.stats.bytes_written -= e.stored_len;
            }
        }
    }

    /// Store a run of pages as blobs of at most [`BLOB_PAGES`] pages.
    /// Uncompressed, the blobs lie back to back in the file exactly as the
    /// run lies in memory: one write puts the whole run there (a frozen
    /// dump's copy spends its time here: no copy through the buffer, one
    /// system call per run instead of per blob).
    /// `crcs`: the checksums of the run's blobs (uncompressed), in order,
    /// from its [`PagePlan`].
    fn write_run(
        &mut self,
        addr: u64,
        run: &[u8],
        crcs: &mut impl Iterator<Item = u32>,
    ) -> Result<(), ImageError> {
        let blob = sys::usize_of(BLOB_PAGES * PAGE_SIZE);
        if self.compress {
            for (i, chunk) in run.chunks(blob).enumerate() {
                self.write_blob(addr + (i * blob) as u64, chunk)?;
            }
            return Ok(());
        }
        let path = self.dir.child(PAGES_FILE);
        self.pages
            .write_all(run)
            .map_err(|e| ImageError::io(&path, e))?;
        for (i, chunk) in run.chunks(blob).enumerate() {
            let crc = crcs.next().unwrap_or_else(|| crc32fast::hash(chunk));
            self.record_blob(addr + (i * blob) as u64, chunk, CODEC_RAW, chunk.len(), crc)?;
        }
        Ok(())
    }

    fn write_blob(&mut self, addr: u64, chunk: &[u8]) -> Result<(), ImageError> {
        let (codec, stored): (u8, std::borrow::Cow<[u8]>) = if self.compress {
            let c = lz4_flex::block::compress(chunk);
            if c.len() < chunk.len() {
                (CODEC_LZ4, c.into())
            } else {
                (CODEC_RAW, chunk.into())
            }
        } else {
            (CODEC_RAW, chunk.into())
        };
        let path = self.dir.child(PAGES_FILE);
        self.pages
            .write_all(&stored)
            .map_err(|e| ImageError::io(&path, e))?;
        self.record_blob(addr, chunk, codec, stored.len(), crc32fast::hash(&stored))
    }

    /// The page map entry of a blob just written at the current offset:
    /// `chunk` the pages; `stored_len` bytes went into the file, whose
    /// checksum is `crc`.
    fn record_blob(
        &mut self,
        addr: u64,
        chunk: &[u8],
        codec: u8,
        stored_len: usize,
        crc: u32,
    ) -> Result<(), ImageError> {
        let path = self.dir.child(PAGES_FILE);
        let nr = u32::try_from(chunk.len() as u64 / PAGE_SIZE).map_err(|_| {
            ImageError::InvalidPageMap {
                path: path.clone(),
                what: format!(
                    "a chunk of {} bytes, more pages than an entry counts",
                    chunk.len()
                ),
            }
        })?;
        self.insert(PageEntry {
            start: addr,
            nr_pages: nr,
            kind: PageKind::Data,
            codec,
            offset: self.offset,
            stored_len: stored_len as u64,
            crc,
        });
        self.offset += stored_len as u64;
        self.stats.stored_end = self.offset;
        self.stats.data_pages += nr as u64;
        self.stats.bytes_written += stored_len as u64;
        Ok(())
    }

    /// Write `pipes/NAME` now, before the state that names it (contents
    /// that cannot change until then, read before a freeze: a deleted
    /// executable). `store_process` drops it if the state does not name it.
    pub fn write_ahead(&mut self, name: &str, data: &[u8]) -> Result<(), ImageError> {
        if !crate::process::valid_pipe_name(name) || self.ahead.iter().any(|(n, _)| n == name) {
            return Err(ImageError::corrupt(
                &self.dir.child(PIPES_DIR),
                format!("{name:?} written ahead twice or not a valid name"),
            ));
        }
        let sub = match self.pipes_dir.take() {
            Some(d) => d,
            None => self.dir.create_subdir(PIPES_DIR)?,
        };
        let path = sub.child(name);
        let r = sub
            .create_file(name)
            .and_then(|mut f| f.write_all(data).map_err(|e| ImageError::io(&path, e)));
        self.pipes_dir = Some(sub);
        r?;
        self.ahead.push((name.to_string(), digest(data)));
        Ok(())
    }

    /// Write the state of a final dump: `process.json` and the bytes
    /// queued in each pipe (`pipes/NAME`, as `process` names them).
    pub fn store_process(
        &mut self,
        process: &ProcessImage,
        pipes: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), ImageError> {
        // Written ahead: kept if named, else removed.
        let named = process.blob_names();
        let mut kept = std::collections::BTreeSet::new();
        for (name, d) in std::mem::take(&mut self.ahead) {
            if named.contains(&name) {
                self.digests.push((format!("{PIPES_DIR}/{name}"), d));
                kept.insert(name);
            } else if let Some(sub) = &self.pipes_dir {
                sub.remove_file(&name)?;
            }
        }
        if !kept.is_empty() {
            // In use: `finish` leaves it.
            self.pipes_dir.take();
        }
        let pipes: Vec<(&String, &Vec<u8>)> =
            pipes.iter().filter(|(n, _)| !kept.contains(*n)).collect();
        if !pipes.is_empty() {
            let sub = match self.pipes_dir.take() {
                Some(d) => d,
                None => self.dir.create_subdir(PIPES_DIR)?,
            };
            for (name, data) in pipes {
                let path = sub.child(name);
                let mut f = sub.create_file(name)?;
                f.write_all(data).map_err(|e| ImageError::io(&path, e))?;
                self.digests
                    .push((format!("{PIPES_DIR}/{name}"), digest(data)));
            }
        }
        let text = serde_json::to_vec_pretty(process).expect("process state serializes");
        self.write_output(PROCESS_FILE, &text)?;
        self.digests.push((PROCESS_FILE.to_string(), digest(&text)));
        Ok(())
    }

    /// Write the page map, the VMA list and, last, the inventory (sealed
    /// if a key was given; `full` set from whether it names a parent).
    /// Entries may have been added in any order but must not overlap.
    pub fn finish(
        mut self,
        mm: &MmRecord,
        inventory: &Inventory,
    ) -> Result<WriteStats, ImageError> {
        let pages_path = self.dir.child(PAGES_FILE);
        // No fsync here: `sync_image` makes an image durable, when asked
        // (a dump does by default, pre-dumps with --fsync).
        self.pages
            .flush()
            .map_err(|e| ImageError::io(&pages_path, e))?;
        let pm_path = self.dir.child(PAGEMAP_FILE);
        if let Some((a, b)) = self.clash {
            return Err(ImageError::InvalidPageMap {
                path: pm_path,
                what: format!(
                    "entries {:#x}+{} ({:?}) and {:#x}+{} ({:?}) overlap",
                    a.start, a.nr_pages, a.kind, b.start, b.nr_pages, b.kind
                ),
            });
        }
        let entries: Vec<PageEntry> = std::mem::take(&mut self.entries).into_values().collect();
        for w in entries.windows(2) {
            if w[0].end() > w[1].start {
                return Err(ImageError::InvalidPageMap {
                    path: pm_path,
                    what: format!(
                        "entries {:#x}+{} ({:?}) and {:#x}+{} ({:?}) overlap",
                        w[0].start, w[0].nr_pages, w[0].kind, w[1].start, w[1].nr_pages, w[1].kind
                    ),
                });
            }
        }
        let map = PageMap { entries }.encode();
        self.write_output(PAGEMAP_FILE, &map)?;
        self.digests.push((PAGEMAP_FILE.to_string(), digest(&map)));
        let mm_text = serde_json::to_vec_pretty(mm).expect("a VMA list serializes");
        self.write_output(MM_FILE, &mm_text)?;
        self.digests.push((MM_FILE.to_string(), digest(&mm_text)));
        let mut inv = inventory.clone();
        inv.full = inv.parent.is_none();
        inv.seal = None;
        if let Some(k) = &self.seal_key {
            inv.seal = Some(k.seal(&inv.sealed_bytes(), &self.digests));
        }
        let text = serde_json::to_vec_pretty(&inv).expect("an inventory serializes");
        // Begun but not written (no process state): not left behind.
        let unused: Vec<_> = self
            .outputs
            .extract_if(.., |p| p.name() != INVENTORY_FILE)
            .collect();
        for p in unused {
            self.dir.abandon_atomic(p);
        }
        if self.pipes_dir.take().is_some() {
            self.dir.remove_subdir(PIPES_DIR)?;
        }
        self.write_output(INVENTORY_FILE, &text)?;
        Ok(self.stats)
    }

    /// Whether pages are stored lz4-compressed.
    pub fn compressed(&self) -> bool {
        self.compress
    }

    pub fn stats(&self) -> WriteStats {
        self.stats
    }
}

/// How [`ImageWriter::add_planned`] stores a run of pages: which pages are
/// zero runs (not stored) and which data, and, for an uncompressed image,
/// the checksum of each blob of data. Made by [`PagePlan::of`] on any
/// thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagePlan {
    pages: usize,
    /// (first page, end page, zero), merged as `add_pages` says.
    runs: Vec<(usize, usize, bool)>,
    /// CRC32 of each blob of the data runs, in order (uncompressed).
    crcs: Option<Vec<u32>>,
}

impl PagePlan {
    /// The plan for `bytes` (whole pages); with `checksums`, the CRCs of
    /// its blobs as an uncompressed image stores them.
    pub fn of(bytes: &[u8], checksums: bool) -> PagePlan {
        let ps = sys::usize_of(PAGE_SIZE);
        let npages = bytes.len() / ps;
        // Runs of zero / non-zero pages: (first, end, zero).
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        for i in 0..npages {
            let z = is_zero(&bytes[i * ps..(i + 1) * ps]);
            match runs.last_mut() {
                Some(last) if last.2 == z => last.1 = i + 1,
                _ => runs.push((i, i + 1, z)),
            }
        }
        let last = runs.len().saturating_sub(1);
        let mut merged: Vec<(usize, usize, bool)> = Vec::with_capacity(runs.len());
        for (k, &(a, b, z)) in runs.iter().enumerate() {
            let z = z && (k == 0 || k == last || b - a >= MIN_ZERO_RUN);
            match merged.last_mut() {
                Some(m) if m.2 == z => m.1 = b,
                _ => merged.push((a, b, z)),
            }
        }
        let crcs = checksums.then(|| {
            let blob = sys::usize_of(BLOB_PAGES * PAGE_SIZE);
            merged
                .iter()
                .filter(|r| !r.2)
                .flat_map(|&(a, b, _)| bytes[a * ps..b * ps].chunks(blob).map(crc32fast::hash))
                .collect()
        });
        PagePlan {
            pages: npages,
            runs: merged,
            crcs,
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    // Compare in u64 words; the compiler vectorizes this.
    // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned middle of the slice.
    let (pre, mid, post) = unsafe { page.align_to::<u64>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{INVENTORY_FILE, Image, ImageKind, MM_FILE, VmaRecord};

    fn mm() -> MmRecord {
        MmRecord {
            vmas: vec![VmaRecord::anonymous(0x10000, 0x20000)],
        }
    }

    #[test]
    fn files_made_ahead_take_their_names_and_the_unused_go() {
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        // Made ahead, no process state written: no temporary file left.
        let dir = tempfile::tempdir().unwrap();
        let mut w = ImageWriter::create(dir.path(), true).unwrap();
        w.create_outputs(true).unwrap();
        // Four files under temporary names, pages.img and pipes/.
        assert_eq!(names(dir.path()).len(), 6, "{:?}", names(dir.path()));
        w.add_pages(0x10000, &[5u8; 4096]).unwrap();
        let inv = Inventory::new(ImageKind::PreDump, 1, "full", true);
        w.finish(&mm(), &inv).unwrap();
        assert_eq!(
            names(dir.path()),
            [INVENTORY_FILE, MM_FILE, PAGEMAP_FILE, PAGES_FILE]
        );
        let img = Image::open(dir.path()).unwrap();
        assert_eq!(
            img.read_entry(&img.pagemap.entries[0]).unwrap(),
            vec![5u8; 4096]
        );
        // With the process state: every file under its name.
        let dir = tempfile::tempdir().unwrap();
        let mut w = ImageWriter::create(dir.path(), true).unwrap();
        w.create_outputs(true).unwrap();
        let text = include_str!("../tests/fixtures/v2/every-field.process.json");
        let process: ProcessImage = serde_json::from_str(text).unwrap();
        w.store_process(&process, &BTreeMap::new()).unwrap();
        let inv = Inventory::new(ImageKind::Dump, 1, "full", true);
        w.finish(&mm(), &inv).unwrap();
        assert_eq!(
            names(dir.path()),
            [
                INVENTORY_FILE,
                MM_FILE,
                PAGEMAP_FILE,
                PAGES_FILE,
                PROCESS_FILE
            ]
        );
        // With pipe contents: in the pipes/ made ahead.
        let dir = tempfile::tempdir().unwrap();
        let mut w = ImageWriter::create(dir.path(), true).unwrap();
        w.create_outputs(true).unwrap();
        let pipes = BTreeMap::from([("7.bin".to_string(), b"queued".to_vec())]);
        w.store_process(&process, &pipes).unwrap();
        w.finish(&mm(), &inv).unwrap();
        assert_eq!(names(&dir.path().join(PIPES_DIR)), ["7.bin"]);
        assert_eq!(
            std::fs::read(dir.path().join(PIPES_DIR).join("7.bin")).unwrap(),
            b"queued"
        );
    }

    #[test]
    fn roundtrip_data_zero_hole() {
        for compress in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut w = ImageWriter::create(dir.path(), compress).unwrap();
            // Page 0 data, 1-8 zero (a run long enough to be kept),
            // 9 data, 10-11 zero (short, between data: stored), 12 data,
            // 13 zero (at the end: kept).
            let mut bytes = vec![0u8; 14 * 4096];
            bytes[0] = 7;
            bytes[9 * 4096 + 100] = 9;
            bytes[12 * 4096 + 5] = 3;
            w.add_pages(0x10000, &bytes).unwrap();
            w.add_hole(PageRange::new(0x1e000, 0x20000));
            let inv = Inventory::new(ImageKind::PreDump, 1, "full", compress);
            let st = w.finish(&mm(), &inv).unwrap();
            assert_eq!((st.data_pages, st.zero_pages, st.hole_pages), (5, 9, 2));
            let img = Image::open(dir.path()).unwrap();
            let kinds: Vec<_> = img
                .pagemap
                .entries
                .iter()
                .map(|e| (e.start, e.nr_pages, e.kind))
                .collect();
            assert_eq!(
                kinds,
                vec![
                    (0x10000, 1, PageKind::Data),
                    (0x11000, 8, PageKind::Zero),
                    (0x19000, 4, PageKind::Data),
                    (0x1d000, 1, PageKind::Zero),
                    (0x1e000, 2, PageKind::Hole)
                ]
            );
            let d = img.read_entry(&img.pagemap.entries[2]).unwrap();
            assert_eq!(d, bytes[9 * 4096..13 * 4096]);
            // Decoded into a slice of a larger buffer, in place; a slice of
            // another length is refused.
            let e = img.pagemap.entries[2];
            let stored = img.read_stored(&e).unwrap();
            let path = dir.path().join(crate::PAGES_FILE);
            let mut big = vec![0xaau8; 6 * 4096];
            crate::decode_blob_to(&path, &e, &stored, &mut big[4096..5 * 4096]).unwrap();
            assert_eq!(big[4096..5 * 4096], bytes[9 * 4096..13 * 4096]);
            assert!(
                big[..4096]
                    .iter()
                    .chain(&big[5 * 4096..])
                    .all(|&b| b == 0xaa)
            );
            assert!(crate::decode_blob_to(&path, &e, &stored, &mut big[..4096]).is_err());
        }
    }

    #[test]
    fn overlapping_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ImageWriter::create(dir.path(), false).unwrap();
        w.add_pages(0x10000, &[1u8; 8192]).unwrap();
        w.add_hole(PageRange::new(0x11000, 0x12000));
        let inv = Inventory::new(ImageKind::PreDump, 1, "full", false);
        assert!(matches!(
            w.finish(&mm(), &inv),
            Err(ImageError::InvalidPageMap { .. })
        ));
        // Nothing that looks like an image was left behind.
        assert!(matches!(
            Image::open(dir.path()),
            Err(ImageError::NotAnImage { .. })
        ));
    }

    #[test]
    fn corruption_is_detected_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ImageWriter::create(dir.path(), true).unwrap();
        w.add_pages(0x10000, &[3u8; 8192]).unwrap();
        let inv = Inventory::new(ImageKind::PreDump, 1, "full", true);
        w.finish(&mm(), &inv).unwrap();
        // Flip a byte of the page data: the CRC catches it.
        let pages = dir.path().join(PAGES_FILE);
        let mut b = std::fs::read(&pages).unwrap();
        b[0] ^= 0xff;
        std::fs::write(&pages, &b).unwrap();
        let img = Image::open(dir.path()).unwrap();
        let err = img
            .read_entry(&img.pagemap.entries[0])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pages.img") && err.contains("checksum"),
            "{err}"
        );
        // Truncate the data file: refused at open.
        std::fs::write(&pages, &b[..b.len() - 1]).unwrap();
        let err = Image::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        // Truncate the page map.
        let pm = dir.path().join(PAGEMAP_FILE);
        let b = std::fs::read(&pm).unwrap();
        std::fs::write(&pm, &b[..b.len() - 3]).unwrap();
        let err = Image::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("pagemap.img") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_file_of_an_image_is_refused_naming_it() {
        // A final dump: inventory, VMA list, page map and process state.
        let dir = tempfile::tempdir().unwrap();
        let mut w = ImageWriter::create(dir.path(), false).unwrap();
        w.add_pages(0x10000, &[3u8; 4096]).unwrap();
        let text = include_bytes!("../tests/fixtures/v2/every-field.process.json");
        let p = ProcessImage::parse(Path::new("every-field.process.json"), text).unwrap();
        let pipes: BTreeMap<String, Vec<u8>> = p
            .fds
            .iter()
            .filter_map(|f| Some((f.pipe_data.clone()?, b"queued".to_vec())))
            .collect();
        w.store_process(&p, &pipes).unwrap();
        let inv = Inventory::new(ImageKind::Dump, p.pid, "full", false);
        w.finish(&mm(), &inv).unwrap();
        assert!(Image::open(dir.path()).unwrap().process.is_some());
        for (name, limit) in [
            (INVENTORY_FILE, crate::fsdir::MAX_JSON_BYTES),
            (MM_FILE, crate::fsdir::MAX_JSON_BYTES),
            (PAGEMAP_FILE, crate::fsdir::MAX_PAGEMAP_BYTES),
            (PROCESS_FILE, crate::fsdir::MAX_JSON_BYTES),
        ] {
            let path = dir.path().join(name);
            let keep = std::fs::read(&path).unwrap();
            // One byte over the limit (sparse: nothing is written).
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(limit + 1).unwrap();
            let err = Image::open(dir.path()).unwrap_err();
            match &err {
                ImageError::TooLarge {
                    path: p,
                    size,
                    limit: l,
                } => assert_eq!((p, *size, *l), (&path, limit + 1, limit)),
                other => panic!("{name}: {other:?}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains(&path.display().to_string())
                    && msg.contains(&format!("{} bytes", limit + 1))
                    && msg.contains(&limit.to_string()),
                "{msg}"
            );
            if name == INVENTORY_FILE {
                let e = Inventory::load(dir.path()).unwrap_err();
                assert!(matches!(e, ImageError::TooLarge { .. }), "{e:?}");
            }
            if name == MM_FILE {
                let e = MmRecord::load(dir.path()).unwrap_err();
                assert!(matches!(e, ImageError::TooLarge { .. }), "{e:?}");
            }
            std::fs::write(&path, keep).unwrap();
            assert!(Image::open(dir.path()).is_ok(), "{name} put back");
        }
    }

    #[test]
    fn future_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let w = ImageWriter::create(dir.path(), true).unwrap();
        let mut inv = Inventory::new(ImageKind::PreDump, 1, "full", true);
        w.finish(&mm(), &inv).unwrap();
        std::fs::remove_file(dir.path().join(crate::INVENTORY_FILE)).unwrap();
        inv.version = 99;
        inv.store(dir.path()).unwrap();
        let err = Image::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, ImageError::Version { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn long_runs_are_split_into_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ImageWriter::create(dir.path(), true).unwrap();
        let n = sys::usize_of(BLOB_PAGES) * 2 + 3;
        let bytes: Vec<u8> = (0..n * 4096)
            .map(|i| (i / 4096 % 251 + 1).to_le_bytes()[0])
            .collect();
        w.add_pages(0x100000, &bytes).unwrap();
        let inv = Inventory::new(ImageKind::PreDump, 1, "full", true);
        w.finish(&mm(), &inv).unwrap();
        let img = Image::open(dir.path()).unwrap();
        assert_eq!(img.pagemap.entries.len(), 3);
        let mut all = Vec::new();
        for e in &img.pagemap.entries {
            all.extend(img.read_entry(e).unwrap());
        }
        assert_eq!(all, bytes);
    }

    /// Rounds over the same pages, each replacing what it records: the
    /// image holds, page for page, what the last round said (data, zero or
    /// hole), whether blobs are cut on the left, the right or both sides.
    #[test]
    fn later_rounds_replace_earlier_pages() {
        const BASE: u64 = 0x40_0000;
        const PAGES: u64 = 300; // > BLOB_PAGES: blobs are split too
        for compress in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut w = ImageWriter::create(dir.path(), compress).unwrap();
            // Model: None = nothing recorded, Some(None) = hole, Some(Some(b)) = bytes.
            let mut model: Vec<Option<Option<Vec<u8>>>> = vec![None; sys::usize_of(PAGES)];
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let mut rnd = |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            for round in 0..40u8 {
                let first = rnd(PAGES);
                let count = 1 + rnd((PAGES - first).min(if round == 0 { PAGES } else { 40 }));
                let r =
                    PageRange::new(BASE + first * PAGE_SIZE, BASE + (first + count) * PAGE_SIZE);
                w.replace_range(r).unwrap();
                if rnd(4) == 0 {
                    w.add_hole(r);
                    for p in first..first + count {
                        model[sys::usize_of(p)] = Some(None);
                    }
                } else {
                    let mut bytes = vec![0u8; sys::usize_of(count * PAGE_SIZE)];
                    for p in 0..count {
                        // Some pages all zero, the others marked with round and page.
                        if rnd(3) != 0 {
                            let at = sys::usize_of(p * PAGE_SIZE);
                            bytes[at..at + 4096]
                                .fill(round.wrapping_mul(7) ^ p.to_le_bytes()[0] | 1);
                        }
                    }
                    w.add_pages(r.start, &bytes).unwrap();
                    for p in 0..count {
                        let at = sys::usize_of(p * PAGE_SIZE);
                        model[sys::usize_of(first + p)] = Some(Some(bytes[at..at + 4096].to_vec()));
                    }
                }
            }
            let expect = w.stats();
            let inv = Inventory::new(ImageKind::PreDump, 1, "full", compress);
            let st = w.finish(&mm(), &inv).unwrap();
            assert_eq!(st, expect);
            let img = Image::open(dir.path()).unwrap();
            let mut seen = vec![None; sys::usize_of(PAGES)];
            for e in &img.pagemap.entries {
                let data = (e.kind == PageKind::Data).then(|| img.read_entry(e).unwrap());
                for i in 0..e.nr_pages as u64 {
                    let p = sys::usize_of((e.start - BASE) / PAGE_SIZE + i);
                    assert!(seen[p].is_none(), "page {p} in two entries");
                    seen[p] = Some(match (e.kind, &data) {
                        (PageKind::Hole, _) => None,
                        (PageKind::Zero, _) => Some(vec![0u8; 4096]),
                        (_, Some(d)) => Some(d[sys::usize_of(i * PAGE_SIZE)..][..4096].to_vec()),
                        _ => unreachable!(),
                    });
                }
            }
            for p in 0..sys::usize_of(PAGES) {
                assert_eq!(seen[p], model[p], "page {p} (compress {compress})");
            }
            let data: u64 = model
                .iter()
                .filter(|m| matches!(m, Some(Some(b)) if b.iter().any(|&x| x != 0)))
                .count() as u64;
            // Short zero runs between data are stored as data.
            let recorded = model.iter().filter(|m| matches!(m, Some(Some(_)))).count() as u64;
            assert!(st.data_pages >= data, "{} < {data}", st.data_pages);
            assert_eq!(st.data_pages + st.zero_pages, recorded);
            assert!(st.bytes_dead > 0);
            // The dead bytes' space was given back: what the file occupies
            // is about what the page map refers to (blocks round up).
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(dir.path().join(PAGES_FILE)).unwrap();
            let allocated = md.blocks() * 512;
            let slack = 4096 * (img.pagemap.entries.len() as u64 + 1) * 2;
            assert!(
                allocated <= st.bytes_written + slack,
                "pages.img occupies {allocated} bytes for {} live ({} dead)",
                st.bytes_written,
                st.bytes_dead
            );
        }
    }

    /// Pages added with a plan made elsewhere (as the copier's readers do)
    /// make the very image `add_pages` makes, compressed or not; a plan of
    /// other pages (another length) is not trusted.
    #[test]
    fn planned_pages_make_the_same_image() {
        // Data, a long zero run, data, a short zero run inside data.
        let mut bytes = vec![0u8; 80 * 4096];
        for (i, b) in bytes.iter_mut().enumerate() {
            let page = i / 4096;
            if !(10..30).contains(&page) && page != 50 {
                *b = (i % 251).to_le_bytes()[0] + 1;
            }
        }
        for compress in [false, true] {
            let image = |how: &dyn Fn(&mut ImageWriter)| {
                let dir = tempfile::tempdir().unwrap();
                let mut w = ImageWriter::create(dir.path(), compress).unwrap();
                how(&mut w);
                let inv = Inventory::new(ImageKind::PreDump, 1, "full", compress);
                let mut m = mm();
                m.vmas[0].end = 0x10000 + 80 * 4096;
                w.finish(&m, &inv).unwrap();
                let img = Image::open(dir.path()).unwrap();
                let pages = std::fs::read(dir.path().join(PAGES_FILE)).unwrap();
                for e in &img.pagemap.entries {
                    if e.kind == PageKind::Data {
                        img.read_entry(e).unwrap();
                    }
                }
                (img.pagemap.entries, pages)
            };
            let plain = image(&|w| w.add_pages(0x10000, &bytes).unwrap());
            let plan = PagePlan::of(&bytes, !compress);
            let planned = image(&|w| w.add_planned(0x10000, &bytes, &plan).unwrap());
            assert_eq!(plain, planned, "compress {compress}");
            let other = PagePlan::of(&bytes[..4096], true);
            let mistrusted = image(&|w| w.add_planned(0x10000, &bytes, &other).unwrap());
            assert_eq!(plain, mistrusted, "compress {compress}");
            assert!(plain.0.iter().any(|e| e.kind == PageKind::Zero));
        }
    }

    #[test]
    fn preallocated_file_is_cut_to_its_pages() {
        for (pre, pages) in [(1u64 << 20, 3usize), (8192, 5)] {
            let dir = tempfile::tempdir().unwrap();
            let mut w = ImageWriter::create(dir.path(), false).unwrap();
            w.preallocate(pre).unwrap();
            let bytes: Vec<u8> = (0..pages * 4096)
                .map(|i| (i % 253).to_le_bytes()[0] + 1)
                .collect();
            w.add_pages(0x10000, &bytes).unwrap();
            let inv = Inventory::new(ImageKind::PreDump, 1, "full", false);
            let mut m = mm();
            m.vmas[0].end = 0x10000 + pages as u64 * 4096;
            let st = w.finish(&m, &inv).unwrap();
            let len = || {
                std::fs::metadata(dir.path().join(PAGES_FILE))
                    .unwrap()
                    .len()
            };
            assert_eq!(len(), pre.max((pages * 4096) as u64));
            // Valid with the zeros behind, and after they are cut.
            let img = Image::open(dir.path()).unwrap();
            assert_eq!(img.read_entry(&img.pagemap.entries[0]).unwrap(), bytes);
            trim_pages_file(dir.path(), st.stored_end).unwrap();
            assert_eq!(len(), (pages * 4096) as u64);
            let img = Image::open(dir.path()).unwrap();
            assert_eq!(img.read_entry(&img.pagemap.entries[0]).unwrap(), bytes);
        }
    }
}
