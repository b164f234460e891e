//! An image and its ancestors, newest first.
//!
//! Resolution rule: a page's content is given by the newest image whose page
//! map mentions it (`Data`, `Zero` or `Hole`); a page no image mentions was
//! never populated, and reads like a hole: zeros for anonymous memory, the
//! file's bytes for a private file mapping.

use images::{Image, ImageError, PAGE_SIZE, PageEntry, PageKind, PageRange, VmaRecord};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Longest chain followed: guards against a parent loop built by hand.
const MAX_CHAIN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: the chain of parents loops back to {again}")]
    Loop { path: PathBuf, again: PathBuf },
    #[error("{path}: chain longer than {MAX_CHAIN} images")]
    TooLong { path: PathBuf },
    #[error(
        "{path}: image of PID {found}, but the newer images of its chain are of PID {pid}; a chain is one process's"
    )]
    OtherProcess { path: PathBuf, pid: i32, found: i32 },
    #[error("{path}: VMA {start:#x}-{end:#x} ({name}) reads from {file}: {source}")]
    Backing {
        path: PathBuf,
        start: u64,
        end: u64,
        name: String,
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the bytes of a page come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    /// Stored in image `image` (0 = newest) by `entry`.
    Data {
        image: usize,
        entry: PageEntry,
    },
    Zero,
    /// Not populated: the VMA's backing.
    Hole,
}

/// Pages `[start, end)` whose bytes are in blob `entry` of image `image`
/// (0 = newest) of the chain: what [`ImageChain::data_runs`] resolves.
#[derive(Debug, Clone, Copy)]
pub struct DataRun {
    pub start: u64,
    pub end: u64,
    pub image: usize,
    pub entry: PageEntry,
}

/// Per-image figures for `tern show`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChainImageSummary {
    pub dir: String,
    pub id: String,
    pub kind: images::ImageKind,
    pub pid: i32,
    pub backend: String,
    pub parent: Option<String>,
    pub vmas: usize,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub hole_pages: u64,
    pub bytes_stored: u64,
    /// Whether the image is a full one (the oldest of a chain).
    pub full: bool,
    /// What its seal says, checked with this host's key: `valid`,
    /// `mismatch` (changed since it was written), `foreign` (sealed with
    /// another host's key) or `unsealed`.
    pub seal: &'static str,
}

/// Page data read and checked ahead (see [`ImageChain::verify_pages`]):
/// the stored bytes of compressed blobs, by (image, entry start), up to a
/// memory budget. Kept as read, not decoded: decoded blobs would be fresh
/// memory the kernel must zero page by page, which costs more than decoding
/// them again into one reused buffer; for the same reason an uncompressed
/// blob is not kept but read again (and its CRC checked again) for the
/// fill, from the page cache.
#[derive(Default)]
pub struct BlobCache {
    blobs: HashMap<(usize, u64), Vec<u8>>,
    /// Blobs checked but not kept (over the budget): read again when used.
    pub dropped: u64,
    /// Bytes kept.
    pub kept_bytes: u64,
    /// Blobs checked.
    pub checked: u64,
}

impl BlobCache {
    fn get(&self, image: usize, entry: &PageEntry) -> Option<&[u8]> {
        self.blobs.get(&(image, entry.start)).map(Vec::as_slice)
    }
}

pub struct ImageChain {
    /// Newest first.
    pub images: Vec<Image>,
}

/// `path` with `.` and `..` taken out lexically (`a/b/../c` is `a/c`; a
/// leading `..` stays): what messages name, and what loop detection uses
/// where the path does not exist to canonicalize.
pub(crate) fn lexical_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            c => out.push(c),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

/// The chain that ends at `dir`, newest first: `open` each image and then
/// the parent its inventory names, checking each link (the parent has the
/// id the child recorded, is of the same process), until an image without
/// a parent (which `Inventory::parse` accepts only if it is a full one).
/// Generic over how an image is opened, so that the rules can be fuzzed
/// without a file system.
pub fn resolve<T>(
    dir: &Path,
    mut open: impl FnMut(&Path) -> Result<T, ImageError>,
    inventory: impl Fn(&T) -> &images::Inventory,
) -> Result<Vec<(PathBuf, T)>, ChainError> {
    let mut images: Vec<(PathBuf, T)> = Vec::new();
    let mut seen = HashSet::new();
    let mut cur = dir.to_path_buf();
    let mut expected_id: Option<String> = None;
    loop {
        let canon = cur.canonicalize().unwrap_or_else(|_| lexical_path(&cur));
        if !seen.insert(canon) {
            return Err(ChainError::Loop {
                path: dir.to_path_buf(),
                again: cur,
            });
        }
        if images.len() >= MAX_CHAIN {
            return Err(ChainError::TooLong {
                path: dir.to_path_buf(),
            });
        }
        let img = match open(&cur) {
            Ok(i) => i,
            Err(e) => {
                return Err(match images.last() {
                    Some((child, _)) => ImageError::MissingParent {
                        path: child.clone(),
                        parent: cur,
                        reason: e.to_string(),
                    }
                    .into(),
                    None => e.into(),
                });
            }
        };
        let inv = inventory(&img);
        if let Some(exp) = &expected_id
            && *exp != inv.id
        {
            let (child, _) = images.last().expect("a parent has a child");
            return Err(ImageError::ParentMismatch {
                path: child.clone(),
                parent: cur,
                expected: exp.clone(),
                found: inv.id.clone(),
            }
            .into());
        }
        if let Some((_, first)) = images.first()
            && inv.pid != inventory(first).pid
        {
            return Err(ChainError::OtherProcess {
                path: cur,
                pid: inventory(first).pid,
                found: inv.pid,
            });
        }
        let next = inv.parent_dir(&cur).map(|p| lexical_path(&p));
        expected_id = inv.parent.as_ref().map(|p| p.id.clone());
        images.push((cur, img));
        match next {
            Some(p) => cur = p,
            None => break,
        }
    }
    Ok(images)
}

/// The images of the chain that ends at `dir`, opened on two threads: this
/// one opens `dir`, then its parents from the newest; another reads the
/// inventories to find the parents (a few tens of µs each), then opens them
/// from the oldest, which is the biggest (a full image's page map: ~1.4 MB
/// per 4 GiB, milliseconds to read, hash and decode). What a restore waits
/// for before its process runs drops by about the oldest image's share.
/// Only a prefetch: [`resolve`] asks for each image in order, with every
/// check, and one it asks for that is not here (an inventory changed in
/// between) is opened then.
fn open_ahead(dir: &Path) -> HashMap<PathBuf, Result<Image, ImageError>> {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    // Parents still to open, newest first, and whether the walk is over.
    let todo: Mutex<(VecDeque<PathBuf>, bool)> = Mutex::new((VecDeque::new(), false));
    let done: Mutex<HashMap<PathBuf, Result<Image, ImageError>>> = Mutex::new(HashMap::new());
    let put = |p: PathBuf, i: Result<Image, ImageError>| {
        lock(&done).insert(p, i);
    };
    std::thread::scope(|sc| {
        let walker = std::thread::Builder::new()
            .name("tern-chain".into())
            .spawn_scoped(sc, || {
                let mut seen = HashSet::new();
                let mut cur = lexical_path(dir);
                seen.insert(cur.clone());
                while seen.len() < MAX_CHAIN {
                    let Ok(inv) = Image::inventory_of(&cur) else {
                        break;
                    };
                    let Some(p) = inv.parent_dir(&cur).map(|p| lexical_path(&p)) else {
                        break;
                    };
                    if !seen.insert(p.clone()) {
                        break;
                    }
                    lock(&todo).0.push_back(p.clone());
                    cur = p;
                }
                lock(&todo).1 = true;
                // The oldest first from here.
                while let Some(p) = lock(&todo).0.pop_back() {
                    let i = Image::open(&p);
                    put(p, i);
                }
            });
        let newest = Image::open(dir);
        put(lexical_path(dir), newest);
        if walker.is_err() {
            return;
        }
        loop {
            let (next, walked) = {
                let mut t = lock(&todo);
                (t.0.pop_front(), t.1)
            };
            match next {
                Some(p) => {
                    let i = Image::open(&p);
                    put(p, i);
                }
                None if walked => break,
                // The walk is still finding the parents.
                None => std::thread::yield_now(),
            }
        }
    });
    done.into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ImageChain {
    /// Open `dir` and every parent it names. Fails before anything else on a
    /// missing, replaced, corrupt or unsupported image, a loop, a parent of
    /// another process, and a chain cut short (its oldest image not a full
    /// one).
    pub fn open(dir: &Path) -> Result<ImageChain, ChainError> {
        let mut opened = open_ahead(dir);
        let images = resolve(
            dir,
            |p| {
                opened
                    .remove(&lexical_path(p))
                    .unwrap_or_else(|| Image::open(p))
            },
            |i| &i.inventory,
        )?
        .into_iter()
        .map(|(_, i)| i)
        .collect();
        Ok(ImageChain { images })
    }

    /// [`ImageChain::open`] taking the images it finds in `ahead` (by
    /// [`lexical_path`]) rather than opening them again: a migration's
    /// destination opens each pre-copy image as it arrives, so that the
    /// frozen process's restore opens only the final one. Every check of
    /// [`resolve`] applies to them as to the others; those it opens are
    /// opened from `remote` when given.
    pub fn open_with(
        dir: &Path,
        ahead: &mut HashMap<PathBuf, Image>,
        remote: Option<&dyn images::RemoteChain>,
    ) -> Result<ImageChain, ChainError> {
        let images = resolve(
            dir,
            |p| match ahead.remove(&lexical_path(p)) {
                Some(i) => Ok(i),
                None => match remote {
                    Some(r) => Image::open_remote(p, r),
                    None => Image::open(p),
                },
            },
            |i| &i.inventory,
        )?
        .into_iter()
        .map(|(_, i)| i)
        .collect();
        Ok(ImageChain { images })
    }

    /// [`ImageChain::open`] with the page bytes at `remote` (a page
    /// server): `dir` and its parents hold everything else.
    pub fn open_remote(
        dir: &Path,
        remote: &dyn images::RemoteChain,
    ) -> Result<ImageChain, ChainError> {
        let images = resolve(dir, |p| Image::open_remote(p, remote), |i| &i.inventory)?
            .into_iter()
            .map(|(_, i)| i)
            .collect();
        Ok(ImageChain { images })
    }

    pub fn newest(&self) -> &Image {
        &self.images[0]
    }

    /// The VMAs of the newest image: the address space the chain describes.
    pub fn vmas(&self) -> &[VmaRecord] {
        &self.newest().mm.vmas
    }

    /// The data pages of `ranges` (sorted, disjoint), resolved once for
    /// the whole chain: each image's entries, newest first, take the pages
    /// no newer image mentioned. By address; a page in no run is a hole or
    /// a zero page.
    pub fn data_runs(&self, ranges: &[(u64, u64)]) -> Vec<DataRun> {
        let entries: usize = self.images.iter().map(|i| i.pagemap.entries.len()).sum();
        let mut runs = Vec::with_capacity(entries.min(1 << 20));
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut pieces = Vec::new();
        for (image, img) in self.images.iter().enumerate() {
            for e in &img.pagemap.entries {
                if e.kind != PageKind::Data {
                    continue;
                }
                let (es, ee) = (e.start, e.end());
                let i = ranges.partition_point(|&(_, end)| end <= es);
                for &(vs, ve) in &ranges[i..] {
                    if vs >= ee {
                        break;
                    }
                    pieces.clear();
                    subtract(es.max(vs), ee.min(ve), &covered, &mut pieces);
                    for &(s, t) in &pieces {
                        runs.push(DataRun {
                            start: s,
                            end: t,
                            image,
                            entry: *e,
                        });
                    }
                }
            }
            if image + 1 == self.images.len() {
                // The oldest (usually the biggest): nothing older to cover.
                break;
            }
            let mine: Vec<(u64, u64)> = img
                .pagemap
                .entries
                .iter()
                .map(|e| (e.start, e.end()))
                .collect();
            covered = union(&covered, &mine);
        }
        // Each image's runs are in address order already: a stable sort
        // merges those few sorted stretches.
        runs.sort_by_key(|r| r.start);
        runs
    }

    /// Where page `addr` comes from.
    pub fn source(&self, addr: u64) -> PageSource {
        for (i, img) in self.images.iter().enumerate() {
            if let Some(e) = img.pagemap.find(addr) {
                return match e.kind {
                    PageKind::Data => PageSource::Data {
                        image: i,
                        entry: *e,
                    },
                    PageKind::Zero => PageSource::Zero,
                    PageKind::Hole => PageSource::Hole,
                };
            }
        }
        PageSource::Hole
    }

    /// Read and check, before anything uses them, every page blob the
    /// newest image's dumped VMAs take data from (CRC and decompression),
    /// (those of the VMAs `wanted` accepts),
    /// keeping the decoded bytes of up to `budget` bytes of them for
    /// [`ImageChain::read_range_cached`]. A damaged blob anywhere in the
    /// chain fails here.
    pub fn verify_pages(
        &self,
        budget: u64,
        wanted: impl Fn(&VmaRecord) -> bool,
    ) -> Result<BlobCache, ChainError> {
        let mut cache = BlobCache::default();
        let mut seen: HashSet<(usize, u64)> = HashSet::new();
        let mut scratch = Vec::new();
        for v in self.vmas().iter().filter(|v| v.dumped && wanted(v)) {
            let mut addr = v.start;
            while addr < v.end {
                match self.source(addr) {
                    PageSource::Data { image, entry } => {
                        if seen.insert((image, entry.start)) {
                            let img = &self.images[image];
                            let path = img.dir.join(images::PAGES_FILE);
                            let stored = img.read_stored(&entry)?;
                            images::check_crc(&path, &entry, &stored)?;
                            images::decode_blob_into(&path, &entry, &stored, &mut scratch)?;
                            cache.checked += 1;
                            // Kept only if compressed: keeping an
                            // uncompressed blob costs as much fresh memory
                            // as it holds (zeroed by the kernel page by
                            // page, then copied out again), more than
                            // reading it again from the page cache.
                            let compressed = stored.len() < scratch.len();
                            if compressed && cache.kept_bytes + stored.len() as u64 <= budget {
                                cache.kept_bytes += stored.len() as u64;
                                cache.blobs.insert((image, entry.start), stored);
                            } else {
                                cache.dropped += 1;
                            }
                        }
                        // Nothing shadows the newest image: its blob's other
                        // pages come from it too.
                        addr = if image == 0 {
                            entry.end().min(v.end)
                        } else {
                            addr + PAGE_SIZE
                        };
                    }
                    _ => addr += PAGE_SIZE,
                }
            }
        }
        Ok(cache)
    }

    /// Reassemble the memory of `range` (inside one VMA of the newest image)
    /// as the restored process will see it.
    pub fn read_range(&self, vma: &VmaRecord, range: PageRange) -> Result<Vec<u8>, ChainError> {
        self.read_range_cached(vma, range, &BlobCache::default())
    }

    /// [`ImageChain::read_range`], taking blobs from `cache` when it has
    /// them (others are read and checked now).
    pub fn read_range_cached(
        &self,
        vma: &VmaRecord,
        range: PageRange,
        cache: &BlobCache,
    ) -> Result<Vec<u8>, ChainError> {
        assert!(range.start >= vma.start && range.end <= vma.end);
        let mut out = vec![0u8; sys::usize_of(range.len())];
        // The last decoded blob (consecutive pages usually share it), in a
        // buffer reused from blob to blob.
        let mut cached: Option<(usize, u64)> = None;
        let mut blob: Vec<u8> = Vec::new();
        let mut backing: Option<std::fs::File> = None;
        let mut addr = range.start;
        while addr < range.end {
            let off = sys::usize_of(addr - range.start);
            let page = &mut out[off..off + sys::usize_of(PAGE_SIZE)];
            match self.source(addr) {
                PageSource::Data { image, entry } => {
                    if cached != Some((image, entry.start)) {
                        let img = &self.images[image];
                        match cache.get(image, &entry) {
                            // Checked when it was read (and in our memory since).
                            Some(stored) => images::decode_blob_into(
                                &img.dir.join(images::PAGES_FILE),
                                &entry,
                                stored,
                                &mut blob,
                            )?,
                            None => blob = img.read_entry(&entry)?,
                        }
                        cached = Some((image, entry.start));
                    }
                    let o = sys::usize_of(addr - entry.start);
                    page.copy_from_slice(&blob[o..o + sys::usize_of(PAGE_SIZE)]);
                }
                PageSource::Zero => {}
                PageSource::Hole => {
                    let newest = self.newest();
                    let unlinked = vma.unlinked_key().and_then(|k| {
                        let u = newest.process.as_ref()?.unlinked_file(k)?;
                        Some((u, newest.pipe_data.get(&u.data)?))
                    });
                    if let Some((u, data)) = unlinked.filter(|_| vma.is_private()) {
                        // A memfd or deleted file: its saved contents.
                        u.read_at(data, vma.offset + (addr - vma.start), page);
                    } else if let Some(file) = vma.backing_file().filter(|_| vma.is_private()) {
                        let f = match &mut backing {
                            Some(f) => f,
                            slot => slot.insert(
                                std::fs::File::open(file)
                                    .map_err(|e| self.backing_err(vma, file, e))?,
                            ),
                        };
                        let foff = vma.offset + (addr - vma.start);
                        read_at_most(f, foff, page).map_err(|e| self.backing_err(vma, file, e))?;
                    }
                }
            }
            addr += PAGE_SIZE;
        }
        Ok(out)
    }

    fn backing_err(&self, vma: &VmaRecord, file: &str, source: std::io::Error) -> ChainError {
        ChainError::Backing {
            path: self.newest().dir.clone(),
            start: vma.start,
            end: vma.end,
            name: vma.name.clone().unwrap_or_default(),
            file: file.to_string(),
            source,
        }
    }

    pub fn summary(&self) -> Vec<ChainImageSummary> {
        let key = images::SealKey::host();
        self.images
            .iter()
            .map(|img| ChainImageSummary {
                dir: img.dir.display().to_string(),
                id: img.inventory.id.clone(),
                kind: img.inventory.kind,
                pid: img.inventory.pid,
                backend: img.inventory.backend.clone(),
                parent: img.inventory.parent.as_ref().map(|p| p.path.clone()),
                vmas: img.mm.vmas.len(),
                data_pages: img.total_pages(PageKind::Data),
                zero_pages: img.total_pages(PageKind::Zero),
                hole_pages: img.total_pages(PageKind::Hole),
                bytes_stored: img
                    .pagemap
                    .entries
                    .iter()
                    .filter(|e| e.kind == PageKind::Data)
                    .map(|e| e.stored_len())
                    .sum(),
                full: img.inventory.full,
                seal: match img.seal_status(key.as_ref()) {
                    images::SealStatus::Valid => "valid",
                    images::SealStatus::Mismatch => "mismatch",
                    images::SealStatus::Foreign => "foreign",
                    images::SealStatus::Unsealed => "unsealed",
                },
            })
            .collect()
    }
}

/// Sorted disjoint ranges minus `covered` (sorted, disjoint).
fn subtract(a: u64, b: u64, covered: &[(u64, u64)], out: &mut Vec<(u64, u64)>) {
    let mut at = a;
    let i = covered.partition_point(|&(_, e)| e <= a);
    for &(s, e) in &covered[i..] {
        if s >= b {
            break;
        }
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
        if at >= b {
            return;
        }
    }
    if at < b {
        out.push((at, b));
    }
}

/// Union of two sorted lists of disjoint ranges.
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Read `buf.len()` bytes at `off`; past the end of the file the rest stays
/// zero (as a mapping past EOF would read within its last page).
fn read_at_most(f: &std::fs::File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use images::{ImageKind, ImageWriter, Inventory, MmRecord, ParentRef};

    fn anon(start: u64, end: u64) -> MmRecord {
        MmRecord {
            vmas: vec![VmaRecord::anonymous(start, end)],
        }
    }

    fn write(
        dir: &Path,
        parent: Option<(&str, &Inventory)>,
        f: impl FnOnce(&mut ImageWriter),
    ) -> Inventory {
        let mut w = ImageWriter::create(dir, true).unwrap();
        f(&mut w);
        let mut inv = Inventory::new(ImageKind::PreDump, 1, "full", true);
        inv.parent = parent.map(|(p, pi)| ParentRef {
            path: p.into(),
            id: pi.id.clone(),
        });
        w.finish(&anon(0x10000, 0x14000), &inv).unwrap();
        inv
    }

    #[test]
    fn subtract_and_union_of_ranges() {
        let mut out = Vec::new();
        subtract(0, 100, &[(10, 20), (30, 40), (90, 120)], &mut out);
        assert_eq!(out, vec![(0, 10), (20, 30), (40, 90)]);
        out.clear();
        subtract(12, 18, &[(10, 20)], &mut out);
        assert!(out.is_empty());
        assert_eq!(
            union(&[(0, 10), (20, 30)], &[(5, 22), (40, 50)]),
            vec![(0, 30), (40, 50)]
        );
    }

    #[test]
    fn paths_are_normalized_lexically() {
        let l = |p: &str| lexical_path(Path::new(p)).display().to_string();
        assert_eq!(l("/a/dump/../p3/../p2"), "/a/p2");
        assert_eq!(l("dump/live/../../p1"), "p1");
        assert_eq!(l("../x/./y"), "../x/y");
        assert_eq!(l("/../a"), "/a");
        assert_eq!(l("a/.."), ".");
    }

    #[test]
    fn newest_entry_wins_and_holes_override() {
        let root = tempfile::tempdir().unwrap();
        let (d1, d2, d3) = (
            root.path().join("1"),
            root.path().join("2"),
            root.path().join("3"),
        );
        let i1 = write(&d1, None, |w| {
            w.add_pages(0x10000, &[1u8; 4 * 4096]).unwrap()
        });
        let i2 = write(&d2, Some(("../1", &i1)), |w| {
            w.add_pages(0x11000, &[2u8; 4096]).unwrap()
        });
        write(&d3, Some(("../2", &i2)), |w| {
            w.add_hole(PageRange::new(0x12000, 0x13000))
        });
        let chain = ImageChain::open(&d3).unwrap();
        assert_eq!(chain.images.len(), 3);
        let vma = chain.vmas()[0].clone();
        let mem = chain.read_range(&vma, vma.range()).unwrap();
        let firsts: Vec<u8> = mem.chunks(4096).map(|p| p[0]).collect();
        assert_eq!(firsts, vec![1, 2, 0, 1]);
    }

    #[test]
    fn an_image_received_whole_reads_as_the_same_image_on_disk() {
        let root = tempfile::tempdir().unwrap();
        let (d1, d2) = (root.path().join("1"), root.path().join("2"));
        let i1 = write(&d1, None, |w| {
            w.add_pages(0x10000, &[1u8; 4 * 4096]).unwrap()
        });
        let mut noise = vec![0u8; 2 * 4096];
        noise
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = u8::try_from(i * 7 % 251).unwrap_or(0));
        write(&d2, Some(("../1", &i1)), |w| {
            w.add_pages(0x12000, &noise).unwrap()
        });
        let files: std::collections::BTreeMap<String, std::sync::Arc<Vec<u8>>> =
            std::fs::read_dir(&d2)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let bytes = std::fs::read(e.path()).unwrap();
                    (
                        e.file_name().into_string().unwrap(),
                        std::sync::Arc::new(bytes),
                    )
                })
                .collect();
        let (_, provenance) = images::ImageDir::open(root.path()).unwrap();
        let held = Image::from_files(&d2, files.clone(), provenance, None).unwrap();
        let on_disk = Image::open(&d2).unwrap();
        assert_eq!(held.pagemap_digest(), on_disk.pagemap_digest());
        assert_eq!(held.mm.vmas, on_disk.mm.vmas);
        assert_eq!(held.inventory.id, on_disk.inventory.id);
        // As the newest of a chain whose parent is on disk: page for page
        // what the chain on disk holds.
        let mut ahead = HashMap::from([(lexical_path(&d2), held)]);
        let chain = ImageChain::open_with(&d2, &mut ahead, None).unwrap();
        let vma = chain.vmas()[0].clone();
        let mem = chain.read_range(&vma, vma.range()).unwrap();
        let want = ImageChain::open(&d2)
            .unwrap()
            .read_range(&vma, vma.range())
            .unwrap();
        assert_eq!(mem, want);
        assert_eq!(&mem[2 * 4096..], &noise[..]);
        assert_eq!(mem[0], 1);
        // Without its page file and with no page server: refused.
        let mut no_pages = files.clone();
        no_pages.remove(images::PAGES_FILE);
        let (_, provenance) = images::ImageDir::open(root.path()).unwrap();
        assert!(Image::from_files(&d2, no_pages, provenance, None).is_err());
        // A page map that names bytes past the page file: refused.
        let mut short = files;
        short.insert(
            images::PAGES_FILE.into(),
            std::sync::Arc::new(vec![0u8; 16]),
        );
        let (_, provenance) = images::ImageDir::open(root.path()).unwrap();
        assert!(Image::from_files(&d2, short, provenance, None).is_err());
    }

    #[test]
    fn missing_or_replaced_parent_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let (d1, d2) = (root.path().join("1"), root.path().join("2"));
        let i1 = write(&d1, None, |w| w.add_pages(0x10000, &[1u8; 4096]).unwrap());
        write(&d2, Some(("../1", &i1)), |_| {});
        // Replace the parent with another image.
        std::fs::remove_dir_all(&d1).unwrap();
        write(&d1, None, |_| {});
        let err = ImageChain::open(&d2).err().unwrap().to_string();
        assert!(err.contains("replaced"), "{err}");
        std::fs::remove_dir_all(&d1).unwrap();
        let err = ImageChain::open(&d2).err().unwrap().to_string();
        assert!(err.contains("parent image") && err.contains("1"), "{err}");
    }
}
