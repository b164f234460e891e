//! Dirty-tracking backends behind one trait.
//!
//! A backend answers, once per round and per VMA, two questions: which pages
//! must be copied (written since the previous round, or every populated page
//! when a chain starts or a VMA is new to the tracker), and which pages are
//! holes (not populated: they read as the VMA's backing, and override older
//! images' data — that is how `MADV_DONTNEED` comes out right).
//!
//! - [`UffdWpTracker`]: async userfaultfd write-protect + PAGEMAP_SCAN, which
//!   reports written pages and re-protects them in the same call. The target
//!   is never stopped.
//! - [`SoftDirtyTracker`]: `/proc/PID/clear_refs` 4 + pagemap bit 55. Reading
//!   the bits and clearing them must be atomic with respect to the target's
//!   writes, so the target is frozen for that step (not for the copy).
//! - [`FullTracker`]: every populated page, every round: the baseline.

use crate::maps::Vma;
use crate::pagemap_scan::{self, Pagemap, ScanError, ScanQuery, entry};
use crate::uffd::{UffdError, WpUffd};
use images::{PAGE_SIZE, PageRange};
use std::time::Duration;

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackMode {
    Auto,
    UffdWp,
    SoftDirty,
    Full,
}

impl TrackMode {
    pub fn name(self) -> &'static str {
        match self {
            TrackMode::Auto => "auto",
            TrackMode::UffdWp => "uffd-wp",
            TrackMode::SoftDirty => "soft-dirty",
            TrackMode::Full => "full",
        }
    }
    pub fn parse(s: &str) -> Option<TrackMode> {
        Some(match s {
            "auto" => TrackMode::Auto,
            "uffd-wp" => TrackMode::UffdWp,
            "soft-dirty" => TrackMode::SoftDirty,
            "full" => TrackMode::Full,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("/proc/{pid}/clear_refs: {source}")]
    ClearRefs {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Freeze(#[from] crate::freeze::FreezeError),
}

/// What one round must record, over all dumped VMAs.
#[derive(Debug, Default, Clone)]
pub struct DirtySet {
    /// Pages to copy, sorted and disjoint.
    pub copy: Vec<PageRange>,
    /// Unpopulated pages, sorted, disjoint, and disjoint from `copy`.
    pub holes: Vec<PageRange>,
    /// Pages of dumped VMAs the backend examined.
    pub pages_scanned: u64,
    /// VMAs armed for tracking in this round (new, moved, or first round).
    pub armed_vmas: usize,
    /// VMAs that could not be tracked and were copied whole.
    pub untracked_vmas: usize,
    /// How long the target was stopped by the backend.
    pub frozen: Duration,
}

impl DirtySet {
    pub fn copy_pages(&self) -> u64 {
        self.copy.iter().map(|r| r.pages()).sum()
    }
}

pub trait DirtyTracker {
    /// "uffd-wp", "soft-dirty" or "full".
    fn name(&self) -> &'static str;
    /// Select this round's pages. `full_copy`: a chain starts here, select
    /// every populated page (and re-arm tracking for the next round).
    fn collect(&mut self, vmas: &[Vma], full_copy: bool) -> Result<DirtySet, BackendError>;
    /// The next collect is the last (a final dump): no need to re-arm.
    fn final_round(&mut self) {}
}

/// Append `r` to a sorted list, merging with the last range when adjacent.
pub fn push_range(v: &mut Vec<PageRange>, r: PageRange) {
    if r.is_empty() {
        return;
    }
    if let Some(last) = v.last_mut()
        && last.end >= r.start
    {
        last.end = last.end.max(r.end);
        return;
    }
    v.push(r);
}

/// Union of two sorted disjoint lists.
pub fn union(a: &[PageRange], b: &[PageRange]) -> Vec<PageRange> {
    let mut all: Vec<PageRange> = a.iter().chain(b).copied().collect();
    all.sort();
    let mut out = Vec::with_capacity(all.len());
    for r in all {
        push_range(&mut out, r);
    }
    out
}

/// `a` minus `b`, both sorted and disjoint.
pub fn subtract(a: &[PageRange], b: &[PageRange]) -> Vec<PageRange> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        let mut cur = r.start;
        while j < b.len() && b[j].end <= cur {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < r.end {
            if b[k].start > cur {
                out.push(PageRange::new(cur, b[k].start));
            }
            cur = cur.max(b[k].end);
            k += 1;
        }
        if cur < r.end {
            out.push(PageRange::new(cur, r.end));
        }
    }
    out
}

/// Populated pages of `vma` worth copying (file pages of private file
/// mappings excluded) and the holes, from the classic pagemap, which (unlike
/// PAGEMAP_SCAN) tells uffd-wp markers on unpopulated pages from data.
fn populated_scan(
    pm: &mut Pagemap,
    vma: &Vma,
    entries: &mut Vec<u64>,
) -> Result<(Vec<PageRange>, Vec<PageRange>), ScanError> {
    entries.clear();
    pm.read_entries(vma.start, vma.end, entries)?;
    Ok(select_from_entries(
        vma.start,
        entries,
        vma.file_pages_are_holes(),
        false,
        true,
    ))
}

/// Like [`populated_scan`], for the pages of `ranges` (inside `vma`) only.
fn populated_in(
    pm: &mut Pagemap,
    vma: &Vma,
    ranges: &[PageRange],
    entries: &mut Vec<u64>,
) -> Result<(Vec<PageRange>, Vec<PageRange>), ScanError> {
    let (mut copy, mut holes) = (Vec::new(), Vec::new());
    // Few ranges: one read each. Many (scattered writes): one read of the
    // whole VMA, sliced (each read walks page tables under the mmap lock).
    let whole = ranges.len() > 64;
    if whole {
        entries.clear();
        pm.read_entries(vma.start, vma.end, entries)?;
    }
    let mut part = Vec::new();
    for r in ranges {
        let e: &[u64] = if whole {
            let i = ((r.start - vma.start) / PAGE_SIZE) as usize;
            let n = sys::usize_of(r.pages());
            &entries[i..(i + n).min(entries.len())]
        } else {
            part.clear();
            pm.read_entries(r.start, r.end, &mut part)?;
            &part
        };
        let (c, h) = select_from_entries(r.start, e, vma.file_pages_are_holes(), false, true);
        for x in c {
            push_range(&mut copy, x);
        }
        for x in h {
            push_range(&mut holes, x);
        }
    }
    Ok((copy, holes))
}

/// Select pages from classic pagemap entries of one VMA (soft-dirty and
/// full backends). `entries[i]` describes page `vma_start + i * PAGE_SIZE`.
/// Returns (copy, holes).
pub fn select_from_entries(
    vma_start: u64,
    entries: &[u64],
    file_pages_are_holes: bool,
    use_soft_dirty: bool,
    full_copy: bool,
) -> (Vec<PageRange>, Vec<PageRange>) {
    let (mut copy, mut holes) = (Vec::new(), Vec::new());
    for (i, &e) in entries.iter().enumerate() {
        let a = vma_start + i as u64 * PAGE_SIZE;
        let page = PageRange::new(a, a + PAGE_SIZE);
        if !entry::populated(e) || (file_pages_are_holes && e & entry::FILE_OR_SHARED_ANON != 0) {
            push_range(&mut holes, page);
        } else if full_copy || !use_soft_dirty || e & entry::SOFT_DIRTY != 0 {
            push_range(&mut copy, page);
        }
    }
    (copy, holes)
}

// ---------------------------------------------------------------- uffd-wp

pub struct UffdWpTracker {
    pid: i32,
    uffd: WpUffd,
    pm: Pagemap,
    scratch: Vec<pagemap_scan::PageRegion>,
    entries: Vec<u64>,
    /// Re-protect what a round reports (not in a final dump's round: no
    /// round follows, and re-protecting costs frozen time).
    reprotect: bool,
}

impl UffdWpTracker {
    pub fn new(pid: i32, uffd: WpUffd) -> Result<UffdWpTracker, BackendError> {
        Ok(UffdWpTracker {
            pid,
            uffd,
            pm: Pagemap::open(pid)?,
            scratch: Vec::new(),
            entries: Vec::new(),
            reprotect: true,
        })
    }

    pub fn uffd(&self) -> &WpUffd {
        &self.uffd
    }

    /// Written pages of `vma` (re-protected in the same call); Err if the
    /// VMA is not armed.
    fn written(&mut self, vma: &Vma) -> Result<Vec<PageRange>, ScanError> {
        self.scratch.clear();
        self.pm.scan(
            vma.start,
            vma.end,
            ScanQuery {
                return_mask: pagemap_scan::PAGE_IS_WRITTEN | pagemap_scan::PAGE_IS_FILE,
                flags: if self.reprotect {
                    ScanQuery::WRITTEN_AND_REPROTECT.flags
                } else {
                    pagemap_scan::PM_SCAN_CHECK_WPASYNC
                },
                ..ScanQuery::WRITTEN_AND_REPROTECT
            },
            &mut self.scratch,
        )?;
        let mut out = Vec::new();
        for r in &self.scratch {
            if vma.file_pages_are_holes() && r.categories & pagemap_scan::PAGE_IS_FILE != 0 {
                continue;
            }
            push_range(&mut out, PageRange::new(r.start, r.end));
        }
        Ok(out)
    }
}

impl DirtyTracker for UffdWpTracker {
    fn name(&self) -> &'static str {
        "uffd-wp"
    }

    fn final_round(&mut self) {
        self.reprotect = false;
    }

    fn collect(&mut self, vmas: &[Vma], full_copy: bool) -> Result<DirtySet, BackendError> {
        let mut set = DirtySet::default();
        for vma in vmas.iter().filter(|v| v.is_dumped()) {
            set.pages_scanned += vma.pages();
            // Written pages first, then the pagemap: a page written after
            // the scan is unprotected and shows up next round; a written page
            // that is a hole by the time the pagemap is read was zapped
            // (PAGEMAP_SCAN reports zapped pages of an armed VMA as written)
            // and is recorded as a hole.
            let written = match self.written(vma) {
                Ok(w) => Some(w),
                Err(e) if e.is_not_armed() && !self.reprotect => {
                    // Final round: nothing to arm for; copy what is populated.
                    set.untracked_vmas += 1;
                    None
                }
                Err(e) if e.is_not_armed() => {
                    // New, moved (mremap drops the registration) or never
                    // armed: register and arm. The arming scan reports every
                    // page, holes included, so its answer is not used: the
                    // pagemap read after it says what to copy.
                    match self.uffd.register_wp(vma.start, vma.end) {
                        Ok(()) => {
                            set.armed_vmas += 1;
                            self.written(vma)?;
                        }
                        Err(e) => {
                            tracing::warn!(
                                pid = self.pid,
                                "VMA {:#x}-{:#x} {} cannot be write-protected ({e}); copying it whole every round",
                                vma.start,
                                vma.end,
                                vma.name.as_deref().unwrap_or("")
                            );
                            set.untracked_vmas += 1;
                        }
                    }
                    None
                }
                Err(e) => return Err(e.into()),
            };
            let fresh = written.is_none();
            let (populated, copy, holes) = match written {
                Some(w) if !full_copy => {
                    // Only pages written since the last round can have gone
                    // from populated to hole (a zapped page shows as written)
                    // or back: the pagemap is read for those alone, and the
                    // holes recorded are theirs (older images hold the rest).
                    let (copy, holes) = populated_in(&mut self.pm, vma, &w, &mut self.entries)?;
                    (copy.clone(), copy, holes)
                }
                _ => {
                    let (populated, holes) = populated_scan(&mut self.pm, vma, &mut self.entries)?;
                    let copy = populated.clone();
                    let holes = subtract(&holes, &copy);
                    (populated, copy, holes)
                }
            };
            tracing::debug!(
                "VMA {:#x}-{:#x} {} {}: populated {} copy {} holes {} fresh {fresh}",
                vma.start,
                vma.end,
                vma.perms,
                vma.name.as_deref().unwrap_or(""),
                populated.iter().map(|r| r.pages()).sum::<u64>(),
                copy.iter().map(|r| r.pages()).sum::<u64>(),
                holes.iter().map(|r| r.pages()).sum::<u64>()
            );
            set.copy.extend(copy);
            set.holes.extend(holes);
        }
        Ok(set)
    }
}

// ---------------------------------------------------------------- soft-dirty

pub struct SoftDirtyTracker {
    pid: i32,
    pm: Pagemap,
    freeze_timeout: Duration,
    /// A final dump's round: the target is already held by the dump's
    /// injectors (a second PTRACE_SEIZE fails with EPERM), and no round
    /// follows, so the bits are neither frozen for nor cleared.
    final_round: bool,
}

impl SoftDirtyTracker {
    pub fn new(pid: i32, freeze_timeout: Duration) -> Result<SoftDirtyTracker, BackendError> {
        Ok(SoftDirtyTracker {
            pid,
            pm: Pagemap::open(pid)?,
            freeze_timeout,
            final_round: false,
        })
    }
}

/// Clear the soft-dirty bits of every page of `pid` ("4" > clear_refs).
pub fn clear_soft_dirty(pid: i32) -> Result<(), BackendError> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"4")
        .map_err(|source| BackendError::ClearRefs { pid, source })
}

impl DirtyTracker for SoftDirtyTracker {
    fn name(&self) -> &'static str {
        "soft-dirty"
    }

    fn final_round(&mut self) {
        self.final_round = true;
    }

    fn collect(&mut self, vmas: &[Vma], full_copy: bool) -> Result<DirtySet, BackendError> {
        let mut set = DirtySet::default();
        // Reading the bits and clearing them must not race with writes:
        // freeze for that step only; the copy runs with the target live (a
        // page written after the clear is dirty again next round).
        let frozen = if self.final_round {
            None
        } else {
            Some(crate::freeze::Frozen::freeze(
                self.pid,
                self.freeze_timeout,
            )?)
        };
        let t0 = std::time::Instant::now();
        let mut entries = Vec::new();
        for vma in vmas.iter().filter(|v| v.is_dumped()) {
            entries.clear();
            self.pm.read_entries(vma.start, vma.end, &mut entries)?;
            let (copy, holes) = select_from_entries(
                vma.start,
                &entries,
                vma.file_pages_are_holes(),
                true,
                full_copy,
            );
            set.pages_scanned += vma.pages();
            set.copy.extend(copy);
            set.holes.extend(holes);
        }
        if !self.final_round {
            clear_soft_dirty(self.pid)?;
            set.frozen = t0.elapsed();
        }
        drop(frozen);
        Ok(set)
    }
}

// ---------------------------------------------------------------- full

pub struct FullTracker {
    pm: Pagemap,
}

impl FullTracker {
    pub fn new(pid: i32) -> Result<FullTracker, BackendError> {
        Ok(FullTracker {
            pm: Pagemap::open(pid)?,
        })
    }
}

impl DirtyTracker for FullTracker {
    fn name(&self) -> &'static str {
        "full"
    }

    fn collect(&mut self, vmas: &[Vma], _full_copy: bool) -> Result<DirtySet, BackendError> {
        let mut set = DirtySet::default();
        let mut entries = Vec::new();
        for vma in vmas.iter().filter(|v| v.is_dumped()) {
            let (copy, holes) = populated_scan(&mut self.pm, vma, &mut entries)?;
            set.pages_scanned += vma.pages();
            set.copy.extend(copy);
            set.holes.extend(holes);
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const P: u64 = PAGE_SIZE;

    fn r(a: u64, b: u64) -> PageRange {
        PageRange::new(a * P, b * P)
    }

    #[test]
    fn range_algebra() {
        assert_eq!(
            subtract(&[r(0, 10)], &[r(2, 3), r(5, 7)]),
            vec![r(0, 2), r(3, 5), r(7, 10)]
        );
        assert_eq!(
            subtract(&[r(0, 4), r(6, 8)], &[r(3, 7)]),
            vec![r(0, 3), r(7, 8)]
        );
        assert_eq!(subtract(&[r(0, 4)], &[]), vec![r(0, 4)]);
        assert_eq!(
            union(&[r(0, 2), r(5, 6)], &[r(2, 3), r(9, 10)]),
            vec![r(0, 3), r(5, 6), r(9, 10)]
        );
    }

    /// The soft-dirty selection, on entries as the kernel writes them.
    #[test]
    fn soft_dirty_selection() {
        use entry::*;
        let anon_dirty = PRESENT | SOFT_DIRTY | EXCLUSIVE;
        let anon_clean = PRESENT | EXCLUSIVE;
        let swapped_dirty = SWAPPED | SOFT_DIRTY;
        let file_page = PRESENT | FILE_OR_SHARED_ANON;
        let file_dirty = PRESENT | FILE_OR_SHARED_ANON | SOFT_DIRTY;
        // A uffd-wp marker on an unpopulated page: "swapped", type 31.
        let none = SWAPPED | UFFD_WP | (1 << 5) | SWP_PTE_MARKER;
        assert!(!populated(none) && populated(swapped_dirty) && !populated(0));
        let e = [
            anon_dirty,
            anon_clean,
            swapped_dirty,
            none,
            file_page,
            file_dirty,
            anon_dirty,
        ];
        // Anonymous VMA: shmem-like file bit still means data to copy.
        let (copy, holes) = select_from_entries(0, &e, false, true, false);
        assert_eq!(copy, vec![r(0, 1), r(2, 3), r(5, 7)]);
        assert_eq!(holes, vec![r(3, 4)]);
        // Private file mapping: page-cache pages are holes (read from file).
        let (copy, holes) = select_from_entries(0, &e, true, true, false);
        assert_eq!(copy, vec![r(0, 1), r(2, 3), r(6, 7)]);
        assert_eq!(holes, vec![r(3, 6)]);
        // First round: every populated page, dirty or not.
        let (copy, _) = select_from_entries(0, &e, false, true, true);
        assert_eq!(copy, vec![r(0, 3), r(4, 7)]);
        // A fresh VMA has VM_SOFTDIRTY: the kernel reports all its pages dirty.
        let (copy, holes) = select_from_entries(10 * P, &[anon_dirty; 3], false, true, false);
        assert_eq!((copy, holes), (vec![r(10, 13)], vec![]));
    }

    #[test]
    fn parse_modes() {
        for m in [
            TrackMode::Auto,
            TrackMode::UffdWp,
            TrackMode::SoftDirty,
            TrackMode::Full,
        ] {
            assert_eq!(TrackMode::parse(m.name()), Some(m));
        }
        assert_eq!(TrackMode::parse("x"), None);
    }
}
