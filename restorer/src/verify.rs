//! `tern dump --verify`: every page of every dumped VMA, as the image chain
//! rebuilds it, compared with the frozen process's memory
//! (/proc/PID/mem). Here because it is the chain reader's answer that is
//! checked: what a restore would put back.
//!
//! A page of private anonymous memory that pagemap shows neither present
//! nor swapped holds zeros and is compared with zeros, not read: reading it
//! would fault the zero page into the process, and a process whose threads
//! came and went carries hundreds of MiB of untouched malloc arenas (a
//! dump of one spent 30 s reading them under emulation).

use crate::{ChainError, ImageChain};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What `--verify` found (in `tern dump`'s JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub pages_checked: u64,
    pub mismatches: u64,
    /// The first few mismatching pages, `0xADDR: why`.
    pub first_mismatches: Vec<String>,
}

/// Why the comparison could not be made (a mismatch is not an error: it is
/// in the report).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("/proc/{pid}/mem: {source}")]
    Mem {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {start:#x}-{end:#x} of PID {pid}: {source}")]
    Read {
        pid: i32,
        start: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Compare the chain ending at `dir` with the memory of `pid` (frozen by
/// the caller).
pub fn verify_chain(pid: i32, dir: &Path) -> Result<VerifyReport, VerifyError> {
    let chain = ImageChain::open(dir)?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|source| VerifyError::Mem { pid, source })?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|source| VerifyError::Mem { pid, source })?;
    let mut report = VerifyReport::default();
    let page = images::PAGE_SIZE;
    let psz = sys::usize_of(page);
    let mut entries = Vec::new();
    for v in chain.vmas().iter().filter(|v| v.dumped) {
        let anon_private = v.is_private() && v.backing_file().is_none();
        let mut a = v.start;
        while a < v.end {
            let end = (a + (4 << 20)).min(v.end);
            let want = chain.read_range(v, images::PageRange::new(a, end))?;
            let mut have = vec![0u8; want.len()];
            let read = |at: u64, buf: &mut [u8]| {
                mem.read_exact_at(buf, at)
                    .map_err(|source| VerifyError::Read {
                        pid,
                        start: at,
                        end: at + buf.len() as u64,
                        source,
                    })
            };
            if anon_private {
                let pages = have.len() / psz;
                sys::pagemap::read_entries(&pagemap, a, pages, &mut entries).map_err(|source| {
                    VerifyError::Read {
                        pid,
                        start: a,
                        end,
                        source,
                    }
                })?;
                // Runs of populated pages read; the rest stays zero.
                let mut i = 0;
                while i < pages {
                    if !sys::pagemap::entry::populated(entries[i]) {
                        i += 1;
                        continue;
                    }
                    let j = (i..pages)
                        .find(|&j| !sys::pagemap::entry::populated(entries[j]))
                        .unwrap_or(pages);
                    read(a + (i * psz) as u64, &mut have[i * psz..j * psz])?;
                    i = j;
                }
            } else {
                read(a, &mut have)?;
            }
            for (k, (w, h)) in want.chunks(psz).zip(have.chunks(psz)).enumerate() {
                report.pages_checked += 1;
                if w != h {
                    report.mismatches += 1;
                    if report.first_mismatches.len() < 8 {
                        let off = w.iter().zip(h).position(|(x, y)| x != y).unwrap_or(0);
                        report.first_mismatches.push(format!(
                            "{:#x}: byte {off} differs (image {:#04x}, process {:#04x}) in {}",
                            a + k as u64 * page,
                            w[off],
                            h[off],
                            v.name.as_deref().unwrap_or("[anon]")
                        ));
                    }
                }
            }
            a = end;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use images::{ImageKind, ImageWriter, Inventory, MmRecord, VmaRecord};

    /// The check finds a page the image holds that the process emptied
    /// (read as zeros from pagemap, not from memory) and a page the process
    /// wrote that the image says is zero.
    #[test]
    fn emptied_and_written_pages_are_mismatches() {
        let page = sys::usize_of(images::PAGE_SIZE);
        let region = sys::anon::AnonRegion::new(4).expect("mmap");
        let (start, len) = (region.start(), region.len());
        let data = vec![0x5au8; 2 * page];
        for (k, &b) in data.iter().enumerate() {
            region.write(k / page, k % page, b);
        }
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("img");
        let mut w = ImageWriter::create(&dir, true).unwrap();
        w.add_pages(start, &data).unwrap();
        let inv = Inventory::new(ImageKind::PreDump, 1, "full", true);
        let mm = MmRecord {
            vmas: vec![VmaRecord::anonymous(start, start + len as u64)],
        };
        w.finish(&mm, &inv).unwrap();
        let pid = std::process::id() as i32;

        let r = verify_chain(pid, &dir).unwrap();
        assert_eq!((r.pages_checked, r.mismatches), (4, 0), "{r:?}");

        region.madvise(1, 1, libc::MADV_DONTNEED).unwrap();
        region.write(3, 0, 1);
        let r = verify_chain(pid, &dir).unwrap();
        assert_eq!(r.mismatches, 2, "{r:?}");
        let at = |k: usize| format!("{:#x}:", start + (k * page) as u64);
        assert!(r.first_mismatches[0].starts_with(&at(1)), "{r:?}");
        assert!(r.first_mismatches[1].starts_with(&at(3)), "{r:?}");
        // The emptied page was not faulted in by the check.
        let f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut e = Vec::new();
        sys::pagemap::read_entries(&f, start, 4, &mut e).unwrap();
        assert!(!sys::pagemap::entry::populated(e[1]), "{:#x}", e[1]);
    }
}
