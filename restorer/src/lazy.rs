//! Lazy restore: which memory is left out of the eager build, and where each
//! of its pages comes from (the page service, `service`, delivers them).
//!
//! A VMA is served lazily when the kernel lets a userfaultfd register it for
//! missing faults and nothing needs its pages before the process runs:
//! private anonymous memory (the heap, stacks, anonymous mappings), neither
//! locked (`mlock` populates at once), droppable (refused by the kernel) nor
//! wiped on fork (a child's copy must read zeros, which the service would not
//! know). Private file mappings are not: missing-mode registration needs
//! anonymous, shmem or hugetlb memory, so their written pages are copied in
//! eagerly as before.
//!
//! [`LazyMap`] resolves the chain once for those VMAs into runs of pages that
//! share an image and a page blob; a fault or the background fill then finds
//! its bytes with one binary search. The runs also give the prefetch order.

use std::path::PathBuf;

use images::{PAGE_SIZE, PageEntry, VmaRecord};

use crate::chain::ImageChain;

/// In which order the background fill pushes pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// The pages the chain saw written last first: the final dump's, then
    /// the live rounds', then each pre-dump's, newest first; within each,
    /// those written in most rounds first, then by address.
    #[default]
    Hot,
    /// By address.
    Address,
    /// None: pages come only on fault (the fill ends when every page was
    /// asked for; for tests of the fault path).
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error(transparent)]
    Chain(#[from] crate::chain::ChainError),
    #[error(
        "lazy pages of PID {pid}: the page at {addr:#x} cannot be read from {file}: {what}; the process was killed rather than given wrong memory"
    )]
    Unreadable {
        pid: i32,
        addr: u64,
        file: PathBuf,
        what: String,
    },
    #[error("lazy pages of PID {pid}: {what}")]
    Service { pid: i32, what: String },
    #[error(
        "lazy pages of PID {pid}: {what}; is it a process restored with --lazy-pages whose fill has not ended?"
    )]
    NotLazy { pid: i32, what: String },
}

/// Whether `v` is served lazily (see the module doc).
pub fn is_lazy(v: &VmaRecord) -> bool {
    let has = |f: &str| v.vm_flags.iter().any(|g| g == f);
    v.dumped
        && v.is_private()
        && v.backing_file().is_none()
        && !matches!(
            v.name.as_deref(),
            Some("[vdso]")
                | Some("[vvar]")
                | Some("[vvar_vclock]")
                | Some("[vsyscall]")
                | Some("[anon:tern-scratch]")
        )
        && !has("lo")
        && !has("dp")
        && !has("wf")
        && !has("ht")
}

/// Pages `[start, end)` of one lazy VMA whose bytes are in blob `entry` of
/// image `image` (0 = newest) of the chain.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub start: u64,
    pub end: u64,
    pub image: usize,
    pub entry: PageEntry,
    /// Index of the run's first page among all the lazy data pages.
    pub first: u64,
    /// How many images of the chain have pages of this range (1: written
    /// in one round only; a page of the hot set is in every image).
    pub rounds: u16,
}

impl Run {
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE_SIZE
    }
}

/// The lazy VMAs of a chain and the runs of data pages in them. A lazy
/// page in no run reads as zeros (recorded as zero, or never populated).
pub struct LazyMap {
    /// The lazy VMAs, `[start, end)`, by address.
    pub vmas: Vec<(u64, u64)>,
    /// By address.
    pub runs: Vec<Run>,
    /// Data pages in all runs.
    pub pages: u64,
}

impl LazyMap {
    /// Resolve the chain for its lazy VMAs: each image's entries, newest
    /// first, take the pages no newer image mentioned.
    pub fn of(chain: &ImageChain) -> LazyMap {
        let vmas: Vec<(u64, u64)> = chain
            .vmas()
            .iter()
            .filter(|v| is_lazy(v))
            .map(|v| (v.start, v.end))
            .collect();
        let mut runs: Vec<Run> = chain
            .data_runs(&vmas)
            .into_iter()
            .map(|r| Run {
                start: r.start,
                end: r.end,
                image: r.image,
                entry: r.entry,
                first: 0,
                rounds: 1,
            })
            .collect();
        // Rounds: the run's own image, and every older one with pages in
        // its range (entries are sorted and disjoint).
        for r in &mut runs {
            let older = chain.images[r.image + 1..]
                .iter()
                .filter(|img| {
                    let es = &img.pagemap.entries;
                    let i = es.partition_point(|e| e.end() <= r.start);
                    es.get(i).is_some_and(|e| e.start < r.end)
                })
                .count();
            r.rounds = u16::try_from(1 + older).unwrap_or(u16::MAX);
        }
        let mut pages = 0;
        for r in &mut runs {
            r.first = pages;
            pages += r.pages();
        }
        LazyMap { vmas, runs, pages }
    }

    /// The run holding image page `addr`.
    pub fn find(&self, addr: u64) -> Option<&Run> {
        self.find_index(addr).map(|i| &self.runs[i])
    }

    /// Index in `runs` of the run holding image page `addr`.
    pub fn find_index(&self, addr: u64) -> Option<usize> {
        let i = self.runs.partition_point(|r| r.end <= addr);
        self.runs.get(i).filter(|r| r.start <= addr).map(|_| i)
    }

    /// Index (among all lazy data pages) of image page `addr`, if it has data.
    pub fn index(&self, addr: u64) -> Option<u64> {
        self.find(addr)
            .map(|r| r.first + (addr - r.start) / PAGE_SIZE)
    }

    /// Whether `[start, end)` is inside one lazy VMA.
    pub fn in_lazy_vma(&self, start: u64, end: u64) -> bool {
        let i = self.vmas.partition_point(|&(_, e)| e <= start);
        self.vmas
            .get(i)
            .is_some_and(|&(s, e)| s <= start && end <= e)
    }

    /// Run indices in the order the background fill takes them.
    pub fn order(&self, prefetch: Prefetch) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.runs.len()).collect();
        match prefetch {
            // Within an image, the pages written in most rounds first: a
            // final dump holds the hot set and the few pages a round
            // happened to touch; the hot set is in every image before it.
            Prefetch::Hot => idx.sort_by_key(|&i| {
                let r = &self.runs[i];
                (r.image, std::cmp::Reverse(r.rounds), r.start)
            }),
            Prefetch::Address => {}
            Prefetch::None => idx.clear(),
        }
        idx
    }
}

/// A set of page indices.
#[derive(Debug, Clone)]
pub struct PageSet {
    words: Vec<u64>,
    count: u64,
    pages: u64,
}

impl PageSet {
    pub fn new(pages: u64) -> PageSet {
        PageSet {
            words: vec![0; sys::usize_of(pages.div_ceil(64))],
            count: 0,
            pages,
        }
    }
    pub fn contains(&self, i: u64) -> bool {
        self.words
            .get(sys::usize_of(i / 64))
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    /// Add `i`; whether it was new.
    pub fn insert(&mut self, i: u64) -> bool {
        if i >= self.pages {
            return false;
        }
        let Some(w) = self.words.get_mut(sys::usize_of(i / 64)) else {
            return false;
        };
        let bit = 1 << (i % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.count += 1;
        true
    }
    pub fn len(&self) -> u64 {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_set_counts_each_page_once() {
        let mut s = PageSet::new(130);
        assert!(s.insert(129));
        assert!(!s.insert(129));
        assert!(s.insert(0));
        assert!(!s.insert(130), "out of range");
        assert_eq!(s.len(), 2);
        assert!(s.contains(129) && !s.contains(64));
    }
}
