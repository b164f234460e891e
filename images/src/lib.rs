//! The tern image format, shared by the tracker (which writes images) and the
//! restorer (which reads chains of them).
//!
//! One image is one directory:
//!
//! ```text
//! inventory.json   what this image is: format version, id, pid, parent link,
//!                  whether it is full, backend, seal
//! mm.json          the target's VMAs at the time of the image
//! pagemap.img      binary index: which page ranges this image holds and how
//! pages.img        page data, raw or lz4-compressed, one blob per data entry
//! process.json     (final dumps) the rest of the process's state
//! pipes/NAME.bin   (final dumps) the bytes queued in each pipe and unix
//!                  socket, and the data of each memfd or deleted file the
//!                  process holds (`unlinked-DEV-INO.bin`)
//! ```
//!
//! `inventory.json` is written last and atomically (write + rename), so a
//! directory without it is not an image, whatever else it holds. Every file
//! is created and read through [`fsdir`] (no link followed, 0600/0700,
//! bounded sizes) and covered by the inventory's [`seal`] but `pages.img`.
//!
//! A page-map entry says one of three things about a range of pages:
//! - `Data`: the bytes are in `pages.img` (each blob has a CRC32);
//! - `Zero`: the pages were populated but all zero, nothing is stored;
//! - `Hole`: the pages were not populated when the image was taken: they read
//!   as whatever backs the VMA (zeros for anonymous memory, the file for a
//!   private file mapping). A hole overrides older images' data: that is how a
//!   page zapped by `MADV_DONTNEED` comes out right.
//!
//! A page that an image does not mention is unchanged since the parent image.

mod format;
pub mod fsdir;
pub mod fuzz;
mod new_dir;
pub(crate) mod pagemap;
pub mod seal;
mod writer;

pub mod process;
pub mod state;

pub use format::*;
pub use fsdir::{ImageDir, Provenance, ProvenanceKind, sync_image};
pub use new_dir::{NewDirError, NewImageDir};
pub use pagemap::{
    PageEntry, PageKind, PageMap, check_crc, decode_blob, decode_blob_into, decode_blob_to,
};
pub use seal::{SealKey, SealStatus};
pub use writer::{
    BLOB_PAGES, ImageWriter, MAX_BLOB_PAGES, PagePlan, WriteStats, discard_unfinished,
    trim_pages_file,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Lower-case hex of `b` (digests and ids in images and messages).
pub fn hex(b: &[u8]) -> String {
    state::hex_bytes::encode(b)
}

/// Page size of every image (x86_64 and arm64 with 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;

/// The version written into `inventory.json` and `pagemap.img`. A reader
/// refuses any other. (2: inventories say whether the image is full, and
/// carry a seal.)
pub const FORMAT_VERSION: u32 = 2;

/// No user address is at or above this (x86_64 with 5-level page tables:
/// 2^56; arm64: 2^52). Anything an image places higher is refused.
pub const MAX_USER_ADDRESS: u64 = 1 << 57;

/// The `format` field of every inventory.
pub const FORMAT_NAME: &str = "tern-images";

pub const INVENTORY_FILE: &str = "inventory.json";
pub const MM_FILE: &str = "mm.json";
pub const PAGEMAP_FILE: &str = "pagemap.img";
pub const PAGES_FILE: &str = "pages.img";

/// Errors reading or writing an image. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a tern image directory (no {INVENTORY_FILE}); give a directory written by `tern pre-dump` or `tern dump`"
    )]
    NotAnImage { path: PathBuf },
    #[error(
        "{path}: unsupported image format version {found} (this tern reads version {FORMAT_VERSION}); use the tern that wrote it"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: corrupt image: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: its parent image {parent} cannot be used: {reason}")]
    MissingParent {
        path: PathBuf,
        parent: PathBuf,
        reason: String,
    },
    #[error(
        "{path}: parent image {parent} has id {found}, but this image was taken on top of id {expected}; the parent directory was replaced"
    )]
    ParentMismatch {
        path: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: invalid page map: {what}")]
    InvalidPageMap { path: PathBuf, what: String },
    /// A file of an image larger than tern reads from such a file.
    #[error(
        "{path} is {size} bytes, more than the {limit} bytes tern reads from such a file; it was not written by tern as it is (damaged or made by hand): take the image again"
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// A path tern will not read or write through (a link, a directory
    /// others may write).
    #[error("{path} {what}")]
    Unsafe { path: PathBuf, what: String },
}

impl ImageError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn corrupt(path: &Path, what: impl Into<String>) -> Self {
        ImageError::Corrupt {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// A half-open range of page-aligned addresses `[start, end)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PageRange {
    pub start: u64,
    pub end: u64,
}

impl PageRange {
    pub fn new(start: u64, end: u64) -> Self {
        debug_assert!(start <= end);
        PageRange { start, end }
    }
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE_SIZE
    }
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
    pub fn intersect(&self, other: &PageRange) -> Option<PageRange> {
        let s = self.start.max(other.start);
        let e = self.end.min(other.end);
        (s < e).then_some(PageRange { start: s, end: e })
    }
}

/// Open one image directory: inventory, VMAs, page map, and for a final
/// dump the process state and pipe contents. Page data is read on demand
/// through [`Image::read_entry`].
#[derive(Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub inventory: Inventory,
    pub mm: MmRecord,
    pub pagemap: PageMap,
    /// The rest of the process's state (final dumps only).
    pub process: Option<process::ProcessImage>,
    /// The bytes queued in each pipe, by the name `process.json` gives.
    pub pipe_data: BTreeMap<String, Vec<u8>>,
    /// Every directory, link and file read to open this image: who could
    /// have written it.
    pub provenance: Vec<Provenance>,
    /// SHA-256 of each file the seal covers, as read.
    digests: Vec<(String, [u8; 32])>,
    /// `pages.img`, open, or the page server's copy of it.
    pages: Pages,
}

/// The stored page bytes of an image held elsewhere: a page server's copy
/// of the same image (`tern restore --page-server`). What it returns is
/// checked as a local file's bytes are (each blob's CRC, from the page map
/// read here).
pub trait RemotePages: Send + Sync + std::fmt::Debug {
    /// Read `buf.len()` stored bytes at `offset` of the image's page file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Where the bytes come from, for errors.
    fn origin(&self) -> String;
    /// A hint: `len` stored bytes at `offset` will be read soon (fetch
    /// them in the background). May be ignored.
    fn prefetch(&self, _offset: u64, _len: usize) {}
}

/// Finds the remote copy of an image opened here, by its page map's
/// SHA-256: its pages, and the length of its page file.
pub trait RemoteChain: Sync {
    fn pages_of(
        &self,
        dir: &Path,
        pagemap_digest: &[u8; 32],
    ) -> Result<(std::sync::Arc<dyn RemotePages>, u64), String>;
}

#[derive(Debug)]
enum Pages {
    File(std::fs::File),
    Remote(std::sync::Arc<dyn RemotePages>),
    /// Received whole ([`Image::from_files`]).
    Memory(std::sync::Arc<Vec<u8>>),
}

impl Pages {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            Pages::File(f) => f.read_exact_at(buf, offset),
            Pages::Remote(r) => r.read_at(offset, buf),
            Pages::Memory(m) => {
                let end = usize::try_from(offset)
                    .ok()
                    .and_then(|o| o.checked_add(buf.len()).map(|e| (o, e)))
                    .filter(|&(_, e)| e <= m.len());
                match end {
                    Some((o, e)) => {
                        buf.copy_from_slice(&m[o..e]);
                        Ok(())
                    }
                    None => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                }
            }
        }
    }
}

/// Where [`Image::assemble`] reads an image's files from.
enum Files<'a> {
    Dir(&'a ImageDir),
    /// By name in the image (`pipes/NAME` for pipe contents); each file is
    /// taken out as it is read.
    Memory(&'a mut BTreeMap<String, std::sync::Arc<Vec<u8>>>),
}

impl Files<'_> {
    /// File `name`, at most `limit` bytes; its provenance added.
    fn read(
        &mut self,
        dir: &Path,
        name: &str,
        limit: u64,
        provenance: &mut Vec<Provenance>,
    ) -> Result<Vec<u8>, ImageError> {
        match self {
            Files::Dir(d) => {
                let (bytes, prov) = d.read_file(name, limit)?;
                provenance.push(prov);
                Ok(bytes)
            }
            Files::Memory(m) => {
                let path = dir.join(name);
                let bytes = m.remove(name).ok_or_else(|| {
                    ImageError::io(&path, std::io::Error::from_raw_os_error(libc::ENOENT))
                })?;
                if bytes.len() as u64 > limit {
                    return Err(ImageError::TooLarge {
                        path,
                        size: bytes.len() as u64,
                        limit,
                    });
                }
                Ok(std::sync::Arc::unwrap_or_clone(bytes))
            }
        }
    }

    /// The contents of pipe `name` (in `pipes/`).
    fn read_pipe(
        &mut self,
        dir: &Path,
        name: &str,
        provenance: &mut Vec<Provenance>,
    ) -> Result<Vec<u8>, ImageError> {
        let missing = || {
            ImageError::corrupt(
                &dir.join(process::PROCESS_FILE),
                format!(
                    "pipe data {name} is named, but it is not in {}/",
                    process::PIPES_DIR
                ),
            )
        };
        match self {
            Files::Dir(d) => {
                let (pipes, prov) = d.open_subdir(process::PIPES_DIR)?.ok_or_else(missing)?;
                if !provenance.contains(&prov) {
                    provenance.push(prov);
                }
                let (bytes, prov) = pipes.read_file(name, fsdir::MAX_PIPE_BYTES)?;
                provenance.push(prov);
                Ok(bytes)
            }
            Files::Memory(m) => {
                let key = format!("{}/{name}", process::PIPES_DIR);
                if !m.contains_key(&key) {
                    return Err(missing());
                }
                self.read(dir, &key, fsdir::MAX_PIPE_BYTES, provenance)
            }
        }
    }

    /// `pages.img`, if the image has one here, and its length (what the
    /// page map's bounds are checked against).
    fn pages(
        &mut self,
        dir: &Path,
        provenance: &mut Vec<Provenance>,
    ) -> Result<Option<(Pages, u64)>, ImageError> {
        match self {
            Files::Dir(d) => {
                let Some((f, prov)) = d.open_file(PAGES_FILE, false)? else {
                    return Ok(None);
                };
                provenance.push(prov);
                let len = f
                    .metadata()
                    .map_err(|e| ImageError::io(&dir.join(PAGES_FILE), e))?
                    .len();
                Ok(Some((Pages::File(f), len)))
            }
            Files::Memory(m) => Ok(m.remove(PAGES_FILE).map(|b| {
                let len = b.len() as u64;
                (Pages::Memory(b), len)
            })),
        }
    }
}

/// A page map longer than this is hashed beside its decoding.
const PARALLEL_HASH_BYTES: usize = 256 << 10;

impl Image {
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        Image::open_from(dir, None)
    }

    /// Open the image in `dir` (its inventory, VMAs, page map and process
    /// state) with its page bytes at `remote` when `dir` holds no
    /// `pages.img` (one there is read, checked as always).
    pub fn open_remote(dir: &Path, remote: &dyn RemoteChain) -> Result<Image, ImageError> {
        Image::open_from(dir, Some(remote))
    }

    fn open_from(dir: &Path, remote: Option<&dyn RemoteChain>) -> Result<Image, ImageError> {
        let (d, provenance) = ImageDir::open(dir)?;
        if d.open_file(INVENTORY_FILE, false)?.is_none() {
            return Err(ImageError::NotAnImage {
                path: dir.to_path_buf(),
            });
        }
        Image::assemble(dir, Files::Dir(&d), provenance, remote)
    }

    /// The image whose files are `files` (by their names in the image,
    /// `pipes/NAME` for pipe contents), received whole rather than read
    /// from `dir` (a migration's final image, restored before it is
    /// written): parsed and checked as [`Image::open`] does, with the same
    /// size limits. `provenance` says who could have written what the
    /// bytes came through. Without `pages.img` among them, its pages are
    /// at `remote`.
    pub fn from_files(
        dir: &Path,
        mut files: BTreeMap<String, std::sync::Arc<Vec<u8>>>,
        provenance: Vec<Provenance>,
        remote: Option<&dyn RemoteChain>,
    ) -> Result<Image, ImageError> {
        if !files.contains_key(INVENTORY_FILE) {
            return Err(ImageError::NotAnImage {
                path: dir.to_path_buf(),
            });
        }
        Image::assemble(dir, Files::Memory(&mut files), provenance, remote)
    }

    fn assemble(
        dir: &Path,
        mut src: Files<'_>,
        mut provenance: Vec<Provenance>,
        remote: Option<&dyn RemoteChain>,
    ) -> Result<Image, ImageError> {
        let mut digests = Vec::new();
        let mut read = |name: &str, limit: u64| -> Result<Vec<u8>, ImageError> {
            let bytes = src.read(dir, name, limit, &mut provenance)?;
            if name != INVENTORY_FILE && name != PAGEMAP_FILE {
                digests.push((name.to_string(), seal::digest(&bytes)));
            }
            Ok(bytes)
        };
        let inventory = Inventory::parse(
            &dir.join(INVENTORY_FILE),
            &read(INVENTORY_FILE, fsdir::MAX_JSON_BYTES)?,
        )?;
        let mm = MmRecord::parse(&dir.join(MM_FILE), &read(MM_FILE, fsdir::MAX_JSON_BYTES)?)?;
        let pagemap_bytes = read(PAGEMAP_FILE, fsdir::MAX_PAGEMAP_BYTES)?;
        // The page map of a full image is megabytes: hashed on another
        // thread while it is decoded (each ~1 ms per 1.4 MB here; a lazy
        // restore waits for both before its process runs).
        let (pagemap, pagemap_digest) = std::thread::scope(|sc| {
            let h = (pagemap_bytes.len() > PARALLEL_HASH_BYTES)
                .then(|| sc.spawn(|| seal::digest(&pagemap_bytes)));
            let pagemap = PageMap::decode(&dir.join(PAGEMAP_FILE), &pagemap_bytes);
            let digest = match h.map(|h| h.join()) {
                Some(Ok(dg)) => dg,
                _ => seal::digest(&pagemap_bytes),
            };
            (pagemap, digest)
        });
        let pagemap = pagemap?;
        let process = match inventory.kind {
            ImageKind::Dump => Some(process::ProcessImage::parse(
                &dir.join(process::PROCESS_FILE),
                &read(process::PROCESS_FILE, fsdir::MAX_JSON_BYTES)?,
            )?),
            ImageKind::PreDump => None,
        };
        let mut pipe_data = BTreeMap::new();
        if let Some(p) = &process {
            let names = p.blob_names();
            let mut total = 0u64;
            for name in names {
                let bytes = src.read_pipe(dir, name, &mut provenance)?;
                total += bytes.len() as u64;
                if total > 16 * fsdir::MAX_PIPE_BYTES {
                    return Err(ImageError::corrupt(
                        &dir.join(process::PIPES_DIR),
                        "more pipe contents than tern reads for one process",
                    ));
                }
                digests.push((
                    format!("{}/{name}", process::PIPES_DIR),
                    seal::digest(&bytes),
                ));
                pipe_data.insert(name.clone(), bytes);
            }
        }
        // A page file held here is read here, even with a page server: its
        // bytes are checked against the same page map, and a migration's
        // receiver holds every image's but the post-copy one's.
        let pages_path = dir.join(PAGES_FILE);
        let (pages, pages_len) = match (remote, src.pages(dir, &mut provenance)?) {
            (Some(r), None) => {
                let (pages, len) = r
                    .pages_of(dir, &pagemap_digest)
                    .map_err(|why| ImageError::corrupt(&pages_path, why))?;
                (Pages::Remote(pages), len)
            }
            (_, Some(local)) => local,
            (None, None) => {
                return Err(ImageError::io(
                    &pages_path,
                    std::io::Error::from_raw_os_error(libc::ENOENT),
                ));
            }
        };
        pagemap.check_data_bounds(&pages_path, pages_len)?;
        digests.push((PAGEMAP_FILE.to_string(), pagemap_digest));
        Ok(Image {
            dir: dir.to_path_buf(),
            inventory,
            mm,
            pagemap,
            process,
            pipe_data,
            provenance,
            digests,
            pages,
        })
    }

    /// The inventory of the image in `dir` alone, read as [`Image::open`]
    /// reads it: where its parent is, before the image is opened.
    pub fn inventory_of(dir: &Path) -> Result<Inventory, ImageError> {
        let (d, _) = ImageDir::open(dir)?;
        let (bytes, _) = d.read_file(INVENTORY_FILE, fsdir::MAX_JSON_BYTES)?;
        Inventory::parse(&d.child(INVENTORY_FILE), &bytes)
    }

    /// What the image's seal says, checked with `key` (this host's).
    pub fn seal_status(&self, key: Option<&SealKey>) -> SealStatus {
        match (&self.inventory.seal, key) {
            (None, _) => SealStatus::Unsealed,
            (Some(_), None) => SealStatus::Foreign,
            (Some(s), Some(k)) => k.check(s, &self.inventory.sealed_bytes(), &self.digests),
        }
    }

    /// The page file as errors name it: with its page server, if remote.
    fn pages_path(&self) -> PathBuf {
        match &self.pages {
            Pages::File(_) | Pages::Memory(_) => self.dir.join(PAGES_FILE),
            Pages::Remote(r) => PathBuf::from(format!(
                "{} ({})",
                self.dir.join(PAGES_FILE).display(),
                r.origin()
            )),
        }
    }

    /// SHA-256 of this image's page map: how a page server and its client
    /// know they hold the same image.
    pub fn pagemap_digest(&self) -> [u8; 32] {
        self.digests
            .iter()
            .find(|(n, _)| n == PAGEMAP_FILE)
            .map(|(_, d)| *d)
            .unwrap_or_default()
    }

    /// Read and check the bytes of one `Data` entry: returns exactly
    /// `entry.nr_pages * PAGE_SIZE` bytes.
    pub fn read_entry(&self, entry: &PageEntry) -> Result<Vec<u8>, ImageError> {
        let stored = self.read_stored(entry)?;
        pagemap::decode_blob(&self.pages_path(), entry, stored)
    }

    /// Read the stored (maybe compressed) bytes of one `Data` entry,
    /// unchecked: [`decode_blob`] checks and decodes them.
    pub fn read_stored(&self, entry: &PageEntry) -> Result<Vec<u8>, ImageError> {
        if entry.kind != PageKind::Data {
            return Err(ImageError::corrupt(
                &self.pages_path(),
                format!("pages at {:#x} have no stored bytes", entry.start),
            ));
        }
        // Bounded by the page map's checks (at most MAX_BLOB_PAGES pages).
        let mut stored = vec![0u8; sys::usize_of(entry.stored_len())];
        self.pages
            .read_exact_at(&mut stored, entry.offset)
            .map_err(|e| ImageError::io(&self.pages_path(), e))?;
        Ok(stored)
    }

    /// A hint that `entry`'s stored bytes will be read soon: a page
    /// server's are fetched in the background (a reader going through a
    /// chain in order then waits for one round trip in several, not each).
    pub fn prefetch_stored(&self, entry: &PageEntry) {
        if let (Pages::Remote(r), PageKind::Data) = (&self.pages, entry.kind) {
            r.prefetch(entry.offset, sys::usize_of(entry.stored_len()));
        }
    }

    /// Whether `pages.img` is still the file this image opened: `Some(why)`
    /// when it was removed or replaced since (a reader that keeps serving
    /// pages from it long after the open, as a lazy restore does, refuses
    /// to go on with an image that is being taken away or rewritten).
    pub fn pages_file_changed(&self) -> Option<&'static str> {
        use std::os::unix::fs::MetadataExt;
        let Pages::File(f) = &self.pages else {
            return None;
        };
        let open = f.metadata().ok()?;
        if open.nlink() == 0 {
            return Some("was removed");
        }
        match std::fs::symlink_metadata(self.pages_path()) {
            Ok(now) if now.dev() == open.dev() && now.ino() == open.ino() => None,
            Ok(_) => Some("was replaced by another file"),
            Err(_) => Some("was removed"),
        }
    }

    /// [`Image::read_stored`] into `buf` (resized), reused from call to call.
    pub fn read_stored_into(&self, entry: &PageEntry, buf: &mut Vec<u8>) -> Result<(), ImageError> {
        buf.resize(sys::usize_of(entry.stored_len()), 0);
        self.pages
            .read_exact_at(buf, entry.offset)
            .map_err(|e| ImageError::io(&self.pages_path(), e))
    }

    /// [`Image::read_stored`] into `buf`, which must be exactly as long as
    /// the entry's stored bytes.
    pub fn read_stored_to(&self, entry: &PageEntry, buf: &mut [u8]) -> Result<(), ImageError> {
        if buf.len() as u64 != entry.stored_len() {
            return Err(ImageError::corrupt(
                &self.pages_path(),
                format!(
                    "pages at {:#x}: {} bytes stored, read into {}",
                    entry.start,
                    entry.stored_len(),
                    buf.len()
                ),
            ));
        }
        self.pages
            .read_exact_at(buf, entry.offset)
            .map_err(|e| ImageError::io(&self.pages_path(), e))
    }

    /// `pages.img`, as this image opened it (for a reader that maps it);
    /// `None` when its pages are remote.
    pub fn pages_file(&self) -> Option<&std::fs::File> {
        match &self.pages {
            Pages::File(f) => Some(f),
            Pages::Remote(_) | Pages::Memory(_) => None,
        }
    }

    /// Whether `entry` is stored as it is (not compressed).
    pub fn is_raw(entry: &PageEntry) -> bool {
        entry.stored_len() == entry.nr_pages as u64 * PAGE_SIZE
    }

    /// Read several entries (kept for callers that read many).
    pub fn entry_reader(&self) -> Result<EntryReader<'_>, ImageError> {
        Ok(EntryReader { image: self })
    }

    pub fn total_pages(&self, kind: PageKind) -> u64 {
        self.pagemap
            .entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.nr_pages as u64)
            .sum()
    }
}

/// Reads `Data` entries of one image.
pub struct EntryReader<'a> {
    image: &'a Image,
}

impl EntryReader<'_> {
    pub fn read(&mut self, entry: &PageEntry) -> Result<Vec<u8>, ImageError> {
        self.image.read_entry(entry)
    }
}
