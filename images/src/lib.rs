//! The tern image format, shared by the tracker (which writes images) and the
//! restorer (which reads chains of them).
//!
//! One image is one directory:
//!
//! ```text
//! inventory.json   what this image is: format version, id, pid, parent link, backend
//! mm.json          the target's VMAs at the time of the image
//! pagemap.img      binary index: which page ranges this image holds and how
//! pages.img        page data, raw or lz4-compressed, one blob per data entry
//! ```
//!
//! `inventory.json` is written last and atomically (write + rename), so a
//! directory without it is not an image, whatever else it holds.
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
mod pagemap;
mod writer;

pub mod process;

pub use format::*;
pub use pagemap::{PageEntry, PageKind, PageMap};
pub use writer::{ImageWriter, WriteStats, trim_pages_file};

use std::path::{Path, PathBuf};

/// Page size of every image (x86_64 and arm64 with 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;

/// The version written into `inventory.json` and `pagemap.img`. A reader
/// refuses any other.
pub const FORMAT_VERSION: u32 = 1;

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
    #[error("{path}: parent image {parent} is missing or unreadable: {reason}")]
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

/// Open one image directory: inventory, VMAs and page map. Page data is read
/// on demand through [`Image::read_entry`].
#[derive(Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub inventory: Inventory,
    pub mm: MmRecord,
    pub pagemap: PageMap,
    /// The rest of the process's state (final dumps only).
    pub process: Option<process::ProcessImage>,
}

impl Image {
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        let inventory = Inventory::load(dir)?;
        let mm = MmRecord::load(dir)?;
        let pagemap = PageMap::load(&dir.join(PAGEMAP_FILE))?;
        let pages_path = dir.join(PAGES_FILE);
        let pages_len = std::fs::metadata(&pages_path)
            .map_err(|e| ImageError::io(&pages_path, e))?
            .len();
        pagemap.check_data_bounds(&pages_path, pages_len)?;
        let process = match inventory.kind {
            ImageKind::Dump => Some(process::ProcessImage::load(dir)?),
            ImageKind::PreDump => None,
        };
        Ok(Image {
            dir: dir.to_path_buf(),
            inventory,
            mm,
            pagemap,
            process,
        })
    }

    /// Read and check the bytes of one `Data` entry: returns exactly
    /// `entry.nr_pages * PAGE_SIZE` bytes.
    pub fn read_entry(&self, entry: &PageEntry) -> Result<Vec<u8>, ImageError> {
        let path = self.dir.join(PAGES_FILE);
        pagemap::read_entry_data(&path, entry)
    }

    /// Read several entries with one open file handle.
    pub fn entry_reader(&self) -> Result<EntryReader, ImageError> {
        let path = self.dir.join(PAGES_FILE);
        let file = std::fs::File::open(&path).map_err(|e| ImageError::io(&path, e))?;
        Ok(EntryReader { path, file })
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

/// Reads `Data` entries of one image through one open `pages.img`.
pub struct EntryReader {
    path: PathBuf,
    file: std::fs::File,
}

impl EntryReader {
    pub fn read(&mut self, entry: &PageEntry) -> Result<Vec<u8>, ImageError> {
        pagemap::read_entry_data_from(&self.path, &mut self.file, entry)
    }
}
