//! Classic `/proc/PID/pagemap` entries: what a page of another process
//! holds (present, swapped, a uffd-wp marker, soft-dirty) without touching
//! it. The tracker's PAGEMAP_SCAN wrapper is `tracker::pagemap_scan`.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bits of a classic pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
pub mod entry {
    pub const PRESENT: u64 = 1 << 63;
    pub const SWAPPED: u64 = 1 << 62;
    pub const FILE_OR_SHARED_ANON: u64 = 1 << 61;
    pub const EXCLUSIVE: u64 = 1 << 56;
    pub const SOFT_DIRTY: u64 = 1 << 55;
    pub const UFFD_WP: u64 = 1 << 57;
    /// Swap type field (bits 0-4) of a swapped entry.
    pub const SWAP_TYPE_MASK: u64 = 0x1f;
    /// `SWP_PTE_MARKER`: the last swap type (MAX_SWAPFILES_SHIFT = 5), never
    /// a swap device. A marker (uffd-wp on an unpopulated page, a guard
    /// region, a poisoned page) holds no data: the page is a hole.
    pub const SWP_PTE_MARKER: u64 = 31;
    pub fn is_marker(e: u64) -> bool {
        e & PRESENT == 0 && e & SWAPPED != 0 && e & SWAP_TYPE_MASK == SWP_PTE_MARKER
    }
    /// The page holds data: present, or swapped out to a real swap device.
    /// PAGEMAP_SCAN cannot tell this apart: after an arming scan it reports
    /// uffd-wp markers on unpopulated pages as present and written.
    pub fn populated(e: u64) -> bool {
        e & PRESENT != 0 || (e & SWAPPED != 0 && !is_marker(e))
    }
}

/// The pagemap entries of `pages` pages from `start` (page-aligned) into
/// `out` (resized).
pub fn read_entries(
    pagemap: &File,
    start: u64,
    pages: usize,
    out: &mut Vec<u64>,
) -> std::io::Result<()> {
    let mut raw = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut raw, start / 4096 * 8)?;
    out.clear();
    out.extend(
        raw.chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes"))),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_pages_are_populated_untouched_are_not() {
        let region = crate::anon::AnonRegion::new(8).expect("mmap");
        region.write(3, 0, 1);
        let f = File::open("/proc/self/pagemap").unwrap();
        let mut e = Vec::new();
        read_entries(&f, region.start(), 8, &mut e).unwrap();
        let populated: Vec<bool> = e.iter().map(|&x| entry::populated(x)).collect();
        assert_eq!(
            populated,
            [false, false, false, true, false, false, false, false]
        );
    }
}
