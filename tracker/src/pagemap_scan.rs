//! `PAGEMAP_SCAN` (Linux 6.7+): ask the kernel which pages of a range are
//! written / present / swapped, and optionally write-protect the written ones
//! in the same call. Also the classic 64-bit `/proc/PID/pagemap` entries used
//! by the soft-dirty and full backends.
//!
//! The uapi is in `include/uapi/linux/fs.h`; the system headers here (6.1)
//! lack it, so the structs and constants are written out below.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// Write-protect the pages that match (needs async uffd-WP on the VMAs).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM if a VMA in range is not registered for async uffd-WP.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

// _IOWR('f', 16, struct pm_scan_arg)
nix::ioctl_readwrite!(pagemap_scan_ioctl, b'f', 16, PmScanArg);

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PAGEMAP_SCAN on {path} [{start:#x}, {end:#x}): {errno}{hint}")]
    Ioctl {
        path: PathBuf,
        start: u64,
        end: u64,
        errno: nix::errno::Errno,
        hint: &'static str,
    },
}

impl ScanError {
    /// EPERM from `PM_SCAN_CHECK_WPASYNC`: a VMA in range is not armed.
    pub fn is_not_armed(&self) -> bool {
        matches!(
            self,
            ScanError::Ioctl {
                errno: nix::errno::Errno::EPERM,
                ..
            }
        )
    }
}

/// What to ask one scan for.
#[derive(Debug, Clone, Copy)]
pub struct ScanQuery {
    pub flags: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

impl ScanQuery {
    /// Pages written since they were last protected; protect them again in
    /// the same call.
    ///
    /// `category_mask = return_mask = PAGE_IS_WRITTEN`, nothing else, is
    /// the kernel's fast path for this question (`pagemap_scan_pmd_entry`):
    /// it tests each PTE's uffd-wp bit and nothing more. Any other mask
    /// (an anyof mask included) takes the general path, which works out
    /// every page's categories, a `struct page` lookup per present page:
    /// 4.5 ms of a 16 ms frozen window at 256 MiB resident, against well
    /// under 1 ms. The fast path also reports an unpopulated PTE as written
    /// on every kernel with PAGEMAP_SCAN; the general path did so only from
    /// kernel commit 07b4377bdbe7.
    pub const WRITTEN_AND_REPROTECT: ScanQuery = ScanQuery {
        flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        category_inverted: 0,
        category_mask: PAGE_IS_WRITTEN,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_WRITTEN,
    };
    /// [`Self::WRITTEN_AND_REPROTECT`] without the protecting: a final
    /// dump's round, which no round follows.
    pub const WRITTEN: ScanQuery = ScanQuery {
        flags: PM_SCAN_CHECK_WPASYNC,
        ..Self::WRITTEN_AND_REPROTECT
    };
    /// Populated pages (present or swapped), reporting which are file pages.
    pub const POPULATED: ScanQuery = ScanQuery {
        flags: 0,
        category_inverted: 0,
        category_mask: 0,
        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE | PAGE_IS_PFNZERO,
    };
}

impl ScanQuery {
    /// Pages holding data of their own: populated, and neither the shared
    /// zero page (a read of an untouched page) nor, with `file_is_hole`, a
    /// page-cache page of a private file mapping. An anonymous page is
    /// found only where a write faulted one in, which gave its VMA an
    /// anon_vma. A uffd-wp marker left on an unpopulated page counts
    /// (PAGEMAP_SCAN reports it as swapped).
    pub fn data(file_is_hole: bool) -> ScanQuery {
        let not = PAGE_IS_PFNZERO | if file_is_hole { PAGE_IS_FILE } else { 0 };
        ScanQuery {
            flags: 0,
            category_inverted: not,
            category_mask: not,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        }
    }
}

/// An open `/proc/PID/pagemap`, for PAGEMAP_SCAN and for classic reads.
pub struct Pagemap {
    file: File,
    path: PathBuf,
    buf: Vec<PageRegion>,
    ioctls: u64,
}

impl Pagemap {
    pub fn open(pid: i32) -> Result<Pagemap, ScanError> {
        let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
        let file = File::open(&path).map_err(|source| ScanError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Pagemap {
            file,
            path,
            buf: vec![PageRegion::default(); 4096],
            ioctls: 0,
        })
    }

    /// PAGEMAP_SCAN calls made so far (diagnostics, tests).
    pub fn ioctls(&self) -> u64 {
        self.ioctls
    }

    /// Run `query` over `[start, end)`, appending matching regions (merged
    /// by the kernel where contiguous with equal categories) to `out`.
    /// Loops until the whole range is walked.
    pub fn scan(
        &mut self,
        start: u64,
        end: u64,
        query: ScanQuery,
        out: &mut Vec<PageRegion>,
    ) -> Result<(), ScanError> {
        let mut cur = start;
        while cur < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: query.flags,
                start: cur,
                end,
                walk_end: 0,
                vec: self.buf.as_mut_ptr() as u64,
                vec_len: self.buf.len() as u64,
                max_pages: 0,
                category_inverted: query.category_inverted,
                category_mask: query.category_mask,
                category_anyof_mask: query.category_anyof_mask,
                return_mask: query.return_mask,
            };
            // SAFETY: `arg` describes `self.buf`, which outlives the call;
            // the kernel writes at most `vec_len` regions into it.
            let n = unsafe { pagemap_scan_ioctl(self.file.as_raw_fd(), &mut arg) }.map_err(
                |errno| ScanError::Ioctl {
                    path: self.path.clone(),
                    start: cur,
                    end,
                    errno,
                    hint: match errno {
                        nix::errno::Errno::ENOTTY | nix::errno::Errno::EINVAL => {
                            " (PAGEMAP_SCAN needs Linux 6.7 or newer; use --track soft-dirty or full)"
                        }
                        nix::errno::Errno::EPERM => " (a VMA in range is not armed for async write-protect)",
                        _ => "",
                    },
                },
            )? as usize;
            out.extend_from_slice(&self.buf[..n]);
            self.ioctls += 1;
            // The kernel stops early only when our vector is full (we set no
            // max_pages). Otherwise it walked to `end`, even if `walk_end`
            // says less: on 6.18 a walk that crossed one of the kernel's
            // internal 512-region chunks returns the walk_end of that chunk
            // while it has reported (and re-protected) regions past it.
            // Resuming from there would re-report whatever was written again
            // meanwhile and re-protect it once more.
            if n < self.buf.len() {
                break;
            }
            if arg.walk_end <= cur {
                break; // defensive: the kernel made no progress
            }
            cur = arg.walk_end;
        }
        Ok(())
    }

    /// Whether any page of `[start, end)` matches `query`: one call that
    /// stops at the first such page (`max_pages` 1). `query` must not
    /// write-protect anything.
    pub fn any(&mut self, start: u64, end: u64, query: ScanQuery) -> Result<bool, ScanError> {
        debug_assert_eq!(query.flags & PM_SCAN_WP_MATCHING, 0);
        let mut region = PageRegion::default();
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: query.flags,
            start,
            end,
            walk_end: 0,
            vec: &mut region as *mut PageRegion as u64,
            vec_len: 1,
            max_pages: 1,
            category_inverted: query.category_inverted,
            category_mask: query.category_mask,
            category_anyof_mask: query.category_anyof_mask,
            return_mask: query.return_mask,
        };
        // SAFETY: `arg` describes `region`, which outlives the call; the
        // kernel writes at most one region (vec_len 1) into it.
        let n =
            unsafe { pagemap_scan_ioctl(self.file.as_raw_fd(), &mut arg) }.map_err(|errno| {
                ScanError::Ioctl {
                    path: self.path.clone(),
                    start,
                    end,
                    errno,
                    hint: "",
                }
            })?;
        self.ioctls += 1;
        Ok(n > 0)
    }

    /// Read classic 64-bit pagemap entries for `[start, end)`.
    pub fn read_entries(&self, start: u64, end: u64, out: &mut Vec<u64>) -> Result<(), ScanError> {
        use std::os::unix::fs::FileExt;
        let n = ((end - start) / 4096) as usize;
        let base = out.len();
        out.resize(base + n, 0);
        // SAFETY: viewing the u64 slice as bytes; any byte pattern is a valid u64.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(out[base..].as_mut_ptr() as *mut u8, n * 8) };
        let mut done = 0;
        while done < bytes.len() {
            match self
                .file
                .read_at(&mut bytes[done..], (start / 4096) * 8 + done as u64)
            {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ScanError::Open {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        out.truncate(base + done / 8);
        Ok(())
    }
}

/// Bits of a classic pagemap entry (in `sys`: the restorer reads them too).
pub use sys::pagemap::entry;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anon::PageIndices;

    #[test]
    fn struct_layout_matches_uapi() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        // _IOWR('f', 16, 96 bytes)
        assert_eq!(
            nix::request_code_readwrite!(b'f', 16, std::mem::size_of::<PmScanArg>()),
            0xc060_6610
        );
    }

    /// Against the real kernel, on our own memory: populated pages are found
    /// exactly, and unpopulated ones are not.
    #[test]
    fn scan_finds_populated_pages_of_own_memory() {
        let region = crate::anon::AnonRegion::new(64).unwrap();
        for i in [0usize, 5, 6, 7, 63] {
            region.write(i, 0, 1);
        }
        let mut pm = Pagemap::open(std::process::id() as i32).unwrap();
        let mut out = Vec::new();
        pm.scan(region.start(), region.end(), ScanQuery::POPULATED, &mut out)
            .expect("PAGEMAP_SCAN must work on this kernel (Linux 6.7+)");
        assert_eq!(region.page_indices(&out), vec![0, 5, 6, 7, 63]);
        let mut ents = Vec::new();
        pm.read_entries(region.start(), region.end(), &mut ents)
            .unwrap();
        assert_eq!(ents.len(), 64);
        assert!(entry::populated(ents[5]) && !entry::populated(ents[4]));
    }

    /// `any` with the data query: zero pages (read faults) and unpopulated
    /// pages are not data, a written page is.
    #[test]
    fn any_data_ignores_zero_pages() {
        let region = crate::anon::AnonRegion::new(16).unwrap();
        let (start, end) = (region.start(), region.end());
        let mut pm = Pagemap::open(std::process::id() as i32).unwrap();
        assert!(!pm.any(start, end, ScanQuery::data(false)).unwrap());
        for i in [2usize, 9] {
            // SAFETY: a page of our own mapping.
            let _ = unsafe { std::ptr::read_volatile((start + i as u64 * 4096) as *const u8) };
        }
        let mut out = Vec::new();
        pm.scan(start, end, ScanQuery::POPULATED, &mut out).unwrap();
        assert_eq!(
            region.page_indices(&out),
            vec![2, 9],
            "read faults map the zero page"
        );
        assert!(out.iter().all(|r| r.categories & PAGE_IS_PFNZERO != 0));
        assert!(!pm.any(start, end, ScanQuery::data(false)).unwrap());
        region.write(13, 0, 1);
        assert!(pm.any(start, end, ScanQuery::data(false)).unwrap());
        assert_eq!(pm.ioctls(), 4);
    }

    /// More regions than the kernel's internal chunk of 512: one call covers
    /// them all and reports every page exactly once (6.18 returns a walk_end
    /// short of the last region; resuming there re-reports pages).
    #[test]
    fn scan_across_the_kernels_chunks_reports_each_page_once() {
        const N: usize = 1400;
        let region = crate::anon::AnonRegion::new(N).unwrap();
        for i in (0..N).step_by(2) {
            region.write(i, 0, 1);
        }
        let mut pm = Pagemap::open(std::process::id() as i32).unwrap();
        let mut out = Vec::new();
        pm.scan(region.start(), region.end(), ScanQuery::POPULATED, &mut out)
            .unwrap();
        assert_eq!(pm.ioctls(), 1, "a scan with room to spare is one call");
        let pages = region.page_indices(&out);
        assert_eq!(pages, (0..N as u64).step_by(2).collect::<Vec<_>>());
    }
}
