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

use crate::maps::{Vma, VmaPolicy};
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
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
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
    /// VMAs armed at the end of the previous round (sorted): tells a VMA
    /// that lost its registration from a new one, for the debug log.
    armed: Vec<PageRange>,
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
            armed: Vec::new(),
        })
    }

    pub fn uffd(&self) -> &WpUffd {
        &self.uffd
    }

    /// Written pages of `vma` (re-protected in the same call); Err if the
    /// VMA is not armed.
    fn written(&mut self, vma: &Vma) -> Result<Vec<PageRange>, ScanError> {
        self.scratch.clear();
        // The kernel's fast path (see `WRITTEN_AND_REPROTECT`): written
        // page-cache pages of a private file mapping come back too, and
        // `populated_in`, which every caller runs on the answer, records
        // them as holes (the file holds them).
        let query = if self.reprotect {
            ScanQuery::WRITTEN_AND_REPROTECT
        } else {
            ScanQuery::WRITTEN
        };
        self.pm.scan(vma.start, vma.end, query, &mut self.scratch)?;
        let mut out = Vec::new();
        for r in &self.scratch {
            push_range(&mut out, PageRange::new(r.start, r.end));
        }
        Ok(out)
    }
}

/// The target's VMA boundaries, read again shortly before registering: a
/// registration of a range that is no longer exactly one VMA would split
/// the target's VMA there (see [`UffdWpTracker::not_armed`]).
struct MapsNow {
    read_at: std::time::Instant,
    ranges: Vec<(u64, u64)>,
}

/// How long a re-read of the maps is trusted for registrations.
const MAPS_FRESH: Duration = Duration::from_millis(2);

/// Pages of `r` inside the sorted disjoint `ranges`.
fn pages_within(ranges: &[PageRange], r: PageRange) -> u64 {
    ranges
        .iter()
        .filter(|x| x.start < r.end && x.end > r.start)
        .map(|x| PageRange::new(x.start.max(r.start), x.end.min(r.end)).pages())
        .sum()
}

/// `r` cut at the boundaries of the sorted disjoint VMA `ranges`: the
/// parts of VMAs inside it and the unmapped gaps between them, in order.
fn pieces(ranges: &[(u64, u64)], r: PageRange) -> Vec<PageRange> {
    let mut out = Vec::new();
    let mut at = r.start;
    for &(s, e) in ranges.iter().filter(|&&(s, e)| s < r.end && e > r.start) {
        if s > at {
            out.push(PageRange::new(at, s));
        }
        let (s, e) = (s.max(at), e.min(r.end));
        out.push(PageRange::new(s, e));
        at = e;
    }
    if at < r.end {
        out.push(PageRange::new(at, r.end));
    }
    out
}

/// What to record for one VMA: pages to copy, holes, and (for the debug
/// log) why a VMA is copied whole.
struct VmaPages {
    /// Index of the VMA among the round's dumped VMAs.
    idx: usize,
    copy: Vec<PageRange>,
    holes: Vec<PageRange>,
    why: Option<String>,
    armed: bool,
}

impl UffdWpTracker {
    /// Every populated page of `vma` to copy, and the rest as holes.
    fn whole(&mut self, vma: &Vma) -> Result<(Vec<PageRange>, Vec<PageRange>), ScanError> {
        let (copy, holes) = populated_scan(&mut self.pm, vma, &mut self.entries)?;
        let holes = subtract(&holes, &copy);
        Ok((copy, holes))
    }

    /// [`Self::whole`] for a VMA that holds no data: its populated pages
    /// (zero pages, page-cache pages) found with one PAGEMAP_SCAN, which
    /// skips empty page tables, instead of a pagemap read of every page.
    fn whole_sparse(&mut self, vma: &Vma) -> Result<(Vec<PageRange>, Vec<PageRange>), ScanError> {
        self.scratch.clear();
        self.pm
            .scan(vma.start, vma.end, ScanQuery::POPULATED, &mut self.scratch)?;
        let mut copy = Vec::new();
        for r in &self.scratch {
            if vma.file_pages_are_holes() && r.categories & pagemap_scan::PAGE_IS_FILE != 0 {
                continue;
            }
            push_range(&mut copy, PageRange::new(r.start, r.end));
        }
        let holes = subtract(&[PageRange::new(vma.start, vma.end)], &copy);
        Ok((copy, holes))
    }

    /// Pages of `vma` whose page table entry carries a uffd-wp bit (or
    /// marker): left from an earlier registration, never from a new mapping.
    fn wp_bits(&mut self, vma: &Vma) -> Result<u64, ScanError> {
        self.entries.clear();
        self.pm
            .read_entries(vma.start, vma.end, &mut self.entries)?;
        Ok(self
            .entries
            .iter()
            .filter(|&&e| e & entry::UFFD_WP != 0)
            .count() as u64)
    }

    /// Whether `vma` is still exactly one VMA of the target (`now` is read
    /// again when older than [`MAPS_FRESH`]).
    fn still_mapped(&self, vma: &Vma, now: &mut Option<MapsNow>) -> Result<bool, BackendError> {
        if now
            .as_ref()
            .is_none_or(|m| m.read_at.elapsed() > MAPS_FRESH)
        {
            let vmas = crate::maps::read_vmas(self.pid)?;
            *now = Some(MapsNow {
                read_at: std::time::Instant::now(),
                ranges: vmas.iter().map(|v| (v.start, v.end)).collect(),
            });
        }
        let ranges = &now.as_ref().expect("just read").ranges;
        Ok(ranges.binary_search(&(vma.start, vma.end)).is_ok())
    }

    /// A VMA the scan found not armed: new, moved (mremap without
    /// `UFFD_FEATURE_EVENT_REMAP` clears the registration of the moved VMA),
    /// never armed, or one that lost its registration. Its pages cannot be
    /// told apart by the write-protect bits, so every populated page is
    /// copied; it is armed when that is safe and useful.
    ///
    /// How a VMA loses its registration (Linux 6.18, checked on the real
    /// kernel): an mremap of an armed VMA copies it to its new place
    /// (copy_vma), where it merges with an armed neighbour of the same
    /// uffd context, flags and compatible anon_vma; only then does the
    /// kernel clear the registration of the moved VMA, which is now the
    /// merged one (mremap_userfaultfd_prep). The neighbour's pages keep
    /// their write-protect bits, but a write to them in an unregistered VMA
    /// makes the page writable and leaves the bit set: once registered
    /// again, PAGEMAP_SCAN reports such a page as not written. None of
    /// those pages may be trusted, so the whole VMA is copied.
    ///
    /// A moved anonymous VMA that has an anon_vma merges only where its
    /// page offsets line up with its neighbour's and the anon_vma is the
    /// same (pages moved back beside the VMA they were split from). One
    /// without an anon_vma (no write ever faulted a page into it) takes its
    /// page offset from its new address and merges with any neighbour of
    /// the same flags and uffd context: that is how a small VMA armed while
    /// untouched, moved beside a big armed one, took the big one's
    /// registration away. So VMAs without data are left unarmed until they
    /// have some: unarmed, a moved VMA has no uffd context and merges with
    /// no armed VMA.
    fn not_armed(
        &mut self,
        vma: &Vma,
        full_copy: bool,
        maps: &mut Option<MapsNow>,
        set: &mut DirtySet,
        depth: u8,
    ) -> Result<VmaPages, BackendError> {
        let was_armed = pages_within(&self.armed, PageRange::new(vma.start, vma.end));
        let part = |(copy, holes): (Vec<PageRange>, Vec<PageRange>), why: String, armed| VmaPages {
            idx: 0, // set by the caller
            copy,
            holes,
            why: Some(why),
            armed,
        };
        if !self.reprotect {
            // Final round: nothing to arm for; copy what is populated.
            set.untracked_vmas += 1;
            let why = "not armed (final round): every populated page copied".to_string();
            return Ok(part(self.whole(vma)?, why, false));
        }
        // A failed probe arms the VMA, as before this check existed.
        let has_data = self
            .pm
            .any(
                vma.start,
                vma.end,
                ScanQuery::data(vma.file_pages_are_holes()),
            )
            .unwrap_or(true);
        if !has_data {
            let why = "holds no data yet (no page written into it): left unarmed, its pages \
                       copied whole until it has some (all of them new since it was empty); \
                       armed while untouched, an mremap could move it next to an armed VMA, \
                       merge the two and clear the registration of both"
                .to_string();
            return Ok(part(self.whole_sparse(vma)?, why, false));
        }
        // For the log: a VMA that lost its registration still carries the
        // write-protect bits of its pages that were not written (a new
        // mapping has none), whether or not this tracker armed it.
        let stale_bits = if tracing::enabled!(tracing::Level::DEBUG) {
            self.wp_bits(vma)?
        } else {
            0
        };
        if !self.still_mapped(vma, maps)? {
            // The range read at the start of the round now holds other
            // VMAs (or parts of them): one that is armed failed the scan of
            // the whole range. Each part is taken on its own: an armed one's
            // bits are good (an armed VMA never lost its registration since
            // it was last armed and copied); one that is a whole VMA now is
            // handled as any VMA that is not armed (once: `depth`); the
            // others (parts of VMAs reaching out of the range, gaps) are
            // copied whole and not registered this round: registering them
            // would split the target's VMA, and an mremap of a range across
            // the split would fail with EFAULT.
            let now = &maps.as_ref().expect("read by still_mapped").ranges;
            // Each piece, and whether it is a whole VMA now.
            let parts: Vec<(PageRange, bool)> = pieces(now, PageRange::new(vma.start, vma.end))
                .into_iter()
                .map(|p| (p, now.binary_search(&(p.start, p.end)).is_ok()))
                .collect();
            let (mut copy, mut holes) = (Vec::new(), Vec::new());
            let (mut scanned, mut whole, mut armed) = (0, 0, 0);
            for (p, is_vma) in parts {
                let sub = Vma {
                    start: p.start,
                    end: p.end,
                    ..vma.clone()
                };
                let (c, h) = match self.written(&sub) {
                    Ok(w) if !full_copy => {
                        scanned += p.pages();
                        populated_in(&mut self.pm, &sub, &w, &mut self.entries)?
                    }
                    Ok(_) => self.whole(&sub)?,
                    Err(e) if e.is_not_armed() && is_vma && depth == 0 => {
                        let r = self.not_armed(&sub, full_copy, maps, set, depth + 1)?;
                        if r.armed {
                            armed += p.pages();
                        } else {
                            whole += p.pages();
                        }
                        (r.copy, r.holes)
                    }
                    Err(e) if e.is_not_armed() => {
                        whole += p.pages();
                        self.whole(&sub)?
                    }
                    Err(e) => return Err(e.into()),
                };
                copy.extend(c);
                holes.extend(h);
            }
            if whole > 0 {
                set.untracked_vmas += 1;
            }
            let why = format!(
                "changed since this round read the maps: {scanned} of its pages are in VMAs \
                 still armed and were scanned, {armed} in VMAs armed now and {whole} in \
                 ranges left unarmed were copied whole"
            );
            return Ok(part((copy, holes), why, false));
        }
        if let Err(e) = self.uffd.register_wp(vma.start, vma.end) {
            tracing::warn!(
                pid = self.pid,
                "VMA {:#x}-{:#x} {} cannot be write-protected ({e}); copying it whole every round",
                vma.start,
                vma.end,
                vma.name.as_deref().unwrap_or("")
            );
            set.untracked_vmas += 1;
            let why = format!("cannot be armed ({e}): every populated page copied");
            return Ok(part(self.whole(vma)?, why, false));
        }
        set.armed_vmas += 1;
        // The arming scan reports every page, holes included, so its answer
        // is not used: the pagemap read after it says what to copy (a page
        // written between the two is copied, and reported again next round).
        self.written(vma)?;
        let why = if stale_bits > 0 {
            format!(
                "lost its registration: {stale_bits} of its pages still carry write-protect \
                 bits (an mremap moved an armed VMA next to armed pages, the two merged and \
                 the kernel cleared the merged VMA's registration); a write since then left \
                 its page's bit set, so every populated page may have been written and is \
                 copied (armed again)"
            )
        } else if was_armed > 0 {
            "mapped anew (or moved) over pages armed last round: every populated page \
             copied, then armed"
                .to_string()
        } else {
            "new to the tracker (new, moved, grown into an unarmed range, or first round): \
             every populated page copied, then armed"
                .to_string()
        };
        Ok(part(self.whole(vma)?, why, true))
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
        let dumped: Vec<&Vma> = vmas.iter().filter(|v| v.is_dumped()).collect();
        let mut parts = Vec::with_capacity(dumped.len());
        let mut unarmed = Vec::new();
        for (idx, &vma) in dumped.iter().enumerate() {
            set.pages_scanned += vma.pages();
            // Written pages first, then the pagemap: a page written after
            // the scan is unprotected and shows up next round; a written page
            // that is a hole by the time the pagemap is read was zapped
            // (PAGEMAP_SCAN reports zapped pages of an armed VMA as written)
            // and is recorded as a hole.
            let w = match self.written(vma) {
                Ok(w) => w,
                Err(e) if e.is_not_armed() => {
                    unarmed.push(idx);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let (copy, holes) = if full_copy {
                self.whole(vma)?
            } else {
                // Only pages written since the last round can have gone
                // from populated to hole (a zapped page shows as written)
                // or back: the pagemap is read for those alone, and the
                // holes recorded are theirs (older images hold the rest).
                populated_in(&mut self.pm, vma, &w, &mut self.entries)?
            };
            parts.push(VmaPages {
                idx,
                copy,
                holes,
                why: None,
                armed: true,
            });
        }
        // Then the VMAs that are not armed, registered (where they are)
        // with the target's maps read again just before.
        let mut maps = None;
        for idx in unarmed {
            let mut p = self.not_armed(dumped[idx], full_copy, &mut maps, &mut set, 0)?;
            p.idx = idx;
            parts.push(p);
        }
        // In address order: `copy` and `holes` are sorted.
        parts.sort_by_key(|p| p.idx);
        let mut armed = Vec::new();
        for p in parts {
            let vma = dumped[p.idx];
            let pages = |v: &[PageRange]| v.iter().map(|r| r.pages()).sum::<u64>();
            tracing::debug!(
                "VMA {:#x}-{:#x} {} {}: copy {} holes {} fresh {}{}{}",
                vma.start,
                vma.end,
                vma.perms,
                vma.name.as_deref().unwrap_or(""),
                pages(&p.copy),
                pages(&p.holes),
                p.why.is_some(),
                if p.why.is_some() { ": " } else { "" },
                p.why.as_deref().unwrap_or("")
            );
            if p.armed {
                push_range(&mut armed, PageRange::new(vma.start, vma.end));
            }
            set.copy.extend(p.copy);
            set.holes.extend(p.holes);
        }
        self.armed = armed;
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
    fn pieces_cut_at_vma_boundaries() {
        let vmas = [(0, 2 * P), (2 * P, 5 * P), (7 * P, 9 * P), (12 * P, 20 * P)];
        assert_eq!(
            pieces(&vmas, r(1, 14)),
            vec![r(1, 2), r(2, 5), r(5, 7), r(7, 9), r(9, 12), r(12, 14)]
        );
        assert_eq!(pieces(&vmas, r(3, 4)), vec![r(3, 4)]);
        assert_eq!(pieces(&vmas, r(9, 11)), vec![r(9, 11)]);
        assert_eq!(pieces(&[], r(9, 11)), vec![r(9, 11)]);
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
