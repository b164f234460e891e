//! `pagemap.img`: the binary index of an image's page ranges.
//!
//! Little-endian. Header (24 bytes): magic `TERNPMAP`, version u32, entry
//! count u32, CRC32 of the entry bytes u32, reserved u32. Then one 40-byte
//! entry per range: start u64, nr_pages u32, kind u8, codec u8, reserved u16,
//! data offset u64, stored length u64, CRC32 of the stored bytes u32,
//! reserved u32.

use crate::writer::MAX_BLOB_PAGES;
use crate::{FORMAT_VERSION, ImageError, MAX_USER_ADDRESS, PAGE_SIZE, PageRange};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"TERNPMAP";
const HEADER_LEN: usize = 24;
const ENTRY_LEN: usize = 40;

/// What an entry says about its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// Bytes stored in `pages.img`.
    Data,
    /// Populated, all zero, not stored.
    Zero,
    /// Not populated: reads as the VMA's backing (zeros or the file).
    Hole,
}

impl PageKind {
    fn to_u8(self) -> u8 {
        match self {
            PageKind::Data => 1,
            PageKind::Zero => 2,
            PageKind::Hole => 3,
        }
    }
    fn from_u8(v: u8) -> Option<PageKind> {
        match v {
            1 => Some(PageKind::Data),
            2 => Some(PageKind::Zero),
            3 => Some(PageKind::Hole),
            _ => None,
        }
    }
}

/// How a `Data` entry's bytes are stored.
pub(crate) const CODEC_RAW: u8 = 0;
pub(crate) const CODEC_LZ4: u8 = 1;

/// The most bytes lz4 can make of `n` (lz4's worst case for incompressible
/// input, with margin): a stored blob larger than this is not an lz4 block.
pub(crate) fn lz4_bound(n: u64) -> u64 {
    n + n / 255 + 64
}

/// One range of pages in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    pub start: u64,
    pub nr_pages: u32,
    pub kind: PageKind,
    pub(crate) codec: u8,
    pub(crate) offset: u64,
    pub(crate) stored_len: u64,
    pub(crate) crc: u32,
}

impl PageEntry {
    pub fn range(&self) -> PageRange {
        PageRange::new(self.start, self.end())
    }
    pub fn end(&self) -> u64 {
        self.start + self.nr_pages as u64 * PAGE_SIZE
    }
    /// Bytes this entry occupies in `pages.img`.
    pub fn stored_len(&self) -> u64 {
        self.stored_len
    }
    /// Where in `pages.img` they start.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// A marker entry for `range`, which must count at most `u32::MAX`
    /// pages (the writer splits larger ones); a larger one is cut there.
    pub(crate) fn marker(kind: PageKind, range: PageRange) -> PageEntry {
        PageEntry {
            start: range.start,
            nr_pages: u32::try_from(range.pages()).unwrap_or(u32::MAX),
            kind,
            codec: CODEC_RAW,
            offset: 0,
            stored_len: 0,
            crc: 0,
        }
    }
}

/// All entries of one image, sorted by address, not overlapping.
#[derive(Debug, Clone, Default)]
pub struct PageMap {
    pub entries: Vec<PageEntry>,
}

impl PageMap {
    /// The entry that holds `addr`, if this image says anything about it.
    pub fn find(&self, addr: u64) -> Option<&PageEntry> {
        let i = self.entries.partition_point(|e| e.end() <= addr);
        self.entries.get(i).filter(|e| e.start <= addr)
    }

    /// Entries that intersect `range`, in address order.
    pub fn overlapping(&self, range: PageRange) -> impl Iterator<Item = &PageEntry> {
        let i = self.entries.partition_point(|e| e.end() <= range.start);
        self.entries[i..]
            .iter()
            .take_while(move |e| e.start < range.end)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            body.extend_from_slice(&e.start.to_le_bytes());
            body.extend_from_slice(&e.nr_pages.to_le_bytes());
            body.push(e.kind.to_u8());
            body.push(e.codec);
            body.extend_from_slice(&0u16.to_le_bytes());
            body.extend_from_slice(&e.offset.to_le_bytes());
            body.extend_from_slice(&e.stored_len.to_le_bytes());
            body.extend_from_slice(&e.crc.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // u32::MAX entries would be a 160 GiB page map, never built in
        // memory; were it, the clamped count would make readers refuse
        // the file (its length disagrees), not misread it.
        let count = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parse and check `pagemap.img` (`path` names it in errors).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<PageMap, ImageError> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(ImageError::corrupt(path, "bad magic (not a tern page map)"));
        }
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(ImageError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let count = u32_at(bytes, 12) as usize;
        let crc = u32_at(bytes, 16);
        let body = &bytes[HEADER_LEN..];
        if body.len() != count * ENTRY_LEN {
            return Err(ImageError::corrupt(
                path,
                format!(
                    "truncated: header says {count} entries ({} bytes), file has {} bytes of entries",
                    count * ENTRY_LEN,
                    body.len()
                ),
            ));
        }
        if crc32fast::hash(body) != crc {
            return Err(ImageError::corrupt(
                path,
                "checksum mismatch in the entry table",
            ));
        }
        let mut entries = Vec::with_capacity(count);
        let mut prev_end = 0u64;
        for i in 0..count {
            let b = &body[i * ENTRY_LEN..(i + 1) * ENTRY_LEN];
            let kind = PageKind::from_u8(b[12]).ok_or_else(|| {
                ImageError::corrupt(path, format!("entry {i}: unknown kind {}", b[12]))
            })?;
            let e = PageEntry {
                start: u64_at(b, 0),
                nr_pages: u32_at(b, 8),
                kind,
                codec: b[13],
                offset: u64_at(b, 16),
                stored_len: u64_at(b, 24),
                crc: u32_at(b, 32),
            };
            if !e.start.is_multiple_of(PAGE_SIZE)
                || e.nr_pages == 0
                || e.start < prev_end
                || e.end() > MAX_USER_ADDRESS
            {
                return Err(ImageError::corrupt(
                    path,
                    format!(
                        "entry {i} at {:#x}: unaligned, empty, out of order or outside user space",
                        e.start
                    ),
                ));
            }
            if kind == PageKind::Data {
                let raw = e.nr_pages as u64 * PAGE_SIZE;
                let fits = match e.codec {
                    CODEC_RAW => e.stored_len == raw,
                    CODEC_LZ4 => e.stored_len > 0 && e.stored_len <= lz4_bound(raw),
                    c => {
                        return Err(ImageError::corrupt(
                            path,
                            format!("entry {i}: unknown codec {c}"),
                        ));
                    }
                };
                if e.nr_pages as u64 > MAX_BLOB_PAGES || !fits {
                    return Err(ImageError::corrupt(
                        path,
                        format!(
                            "entry {i} at {:#x}: {} pages stored in {} bytes (at most {MAX_BLOB_PAGES} pages per blob, and no more bytes than its codec can make of them)",
                            e.start, e.nr_pages, e.stored_len
                        ),
                    ));
                }
            } else if e.offset != 0 || e.stored_len != 0 {
                return Err(ImageError::corrupt(
                    path,
                    format!("entry {i} at {:#x}: a {kind:?} entry with data", e.start),
                ));
            }
            prev_end = e.end();
            entries.push(e);
        }
        Ok(PageMap { entries })
    }

    /// Every `Data` entry must lie inside `pages.img`.
    pub(crate) fn check_data_bounds(&self, pages_path: &Path, len: u64) -> Result<(), ImageError> {
        for e in self.entries.iter().filter(|e| e.kind == PageKind::Data) {
            if e.offset
                .checked_add(e.stored_len)
                .is_none_or(|end| end > len)
            {
                return Err(ImageError::corrupt(
                    pages_path,
                    format!(
                        "truncated: data of pages at {:#x} ends at byte {}, file has {len} bytes",
                        e.start,
                        e.offset.saturating_add(e.stored_len)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Read and check the bytes of one `Data` entry from `pages.img` (`f`,
/// named `path` in errors): exactly `nr_pages * PAGE_SIZE` bytes.
pub(crate) fn read_entry_data_from(
    path: &Path,
    f: &std::fs::File,
    e: &PageEntry,
) -> Result<Vec<u8>, ImageError> {
    if e.kind != PageKind::Data {
        return Err(ImageError::corrupt(
            path,
            format!("pages at {:#x} have no stored bytes", e.start),
        ));
    }
    // Bounded by the page map's checks (at most MAX_BLOB_PAGES pages).
    let mut stored = vec![0u8; sys::usize_of(e.stored_len)];
    f.read_exact_at(&mut stored, e.offset)
        .map_err(|err| ImageError::io(path, err))?;
    decode_blob(path, e, stored)
}

/// Check a blob's CRC and decompress it: exactly `nr_pages * PAGE_SIZE`
/// bytes.
pub fn decode_blob(path: &Path, e: &PageEntry, stored: Vec<u8>) -> Result<Vec<u8>, ImageError> {
    check_crc(path, e, &stored)?;
    if e.codec == CODEC_RAW {
        let want = e.nr_pages as usize * sys::usize_of(PAGE_SIZE);
        if stored.len() != want {
            return Err(ImageError::corrupt(
                path,
                format!(
                    "pages at {:#x}: {} bytes of data for {} pages",
                    e.start,
                    stored.len(),
                    e.nr_pages
                ),
            ));
        }
        return Ok(stored);
    }
    let mut out = Vec::new();
    decode_blob_into(path, e, &stored, &mut out)?;
    Ok(out)
}

/// The CRC of a blob's stored bytes is the one its entry recorded.
pub fn check_crc(path: &Path, e: &PageEntry, stored: &[u8]) -> Result<(), ImageError> {
    if crc32fast::hash(stored) != e.crc {
        return Err(ImageError::corrupt(
            path,
            format!("checksum mismatch in the data of pages at {:#x}", e.start),
        ));
    }
    Ok(())
}

/// Decode a blob's stored bytes (CRC checked already) into `out`, which is
/// resized to exactly `nr_pages * PAGE_SIZE` bytes (a buffer reused from
/// blob to blob touches no fresh memory).
pub fn decode_blob_into(
    path: &Path,
    e: &PageEntry,
    stored: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ImageError> {
    out.resize(e.nr_pages as usize * sys::usize_of(PAGE_SIZE), 0);
    decode_blob_to(path, e, stored, out)
}

/// [`decode_blob_into`] into `out`, which must be exactly `nr_pages *
/// PAGE_SIZE` bytes long (a slice of a larger buffer: no copy after).
pub fn decode_blob_to(
    path: &Path,
    e: &PageEntry,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), ImageError> {
    let want = e.nr_pages as usize * sys::usize_of(PAGE_SIZE);
    if out.len() != want {
        return Err(ImageError::corrupt(
            path,
            format!(
                "pages at {:#x}: {} pages decoded into {} bytes",
                e.start,
                e.nr_pages,
                out.len()
            ),
        ));
    }
    let got = match e.codec {
        CODEC_RAW => {
            if stored.len() == want {
                out.copy_from_slice(stored);
            }
            stored.len()
        }
        // liblz4's decoder (`lz4`), not lz4_flex's: a page holding a few
        // bytes and zeros compresses to matches that overlap their own
        // output, which lz4_flex copies a byte at a time (36.8 µs for such
        // a 128 KiB blob here, 3.2 µs with liblz4): the decode was most of
        // a lazy-pages fault. Both read the same block format, and
        // LZ4_decompress_safe is made for untrusted input.
        CODEC_LZ4 => {
            let corrupt = |what: String| {
                ImageError::corrupt(path, format!("pages at {:#x}: lz4: {what}", e.start))
            };
            let size = i32::try_from(want).map_err(|_| corrupt(format!("{want} bytes")))?;
            lz4::block::decompress_to_buffer(stored, Some(size), out)
                .map_err(|err| corrupt(err.to_string()))?
        }
        c => return Err(ImageError::corrupt(path, format!("unknown codec {c}"))),
    };
    if got != want {
        return Err(ImageError::corrupt(
            path,
            format!(
                "pages at {:#x}: {got} bytes of data for {} pages",
                e.start, e.nr_pages
            ),
        ));
    }
    Ok(())
}
