//! A private anonymous mapping of tern's own, for the feature probes of
//! `tern check` and the kernel-interface unit tests: unmapped on drop.

pub(crate) struct AnonRegion {
    ptr: *mut u8,
    len: usize,
}

impl AnonRegion {
    /// Map `pages` read-write pages; None if mmap fails.
    pub(crate) fn new(pages: usize) -> Option<AnonRegion> {
        let len = pages * 4096;
        // SAFETY: a fresh private anonymous mapping, owned by the value.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(AnonRegion {
            ptr: p as *mut u8,
            len,
        })
    }
    pub(crate) fn start(&self) -> u64 {
        self.ptr as u64
    }
    pub(crate) fn end(&self) -> u64 {
        self.start() + self.len as u64
    }
    /// Write `v` at byte `off` of page `page` (a first write populates it).
    pub(crate) fn write(&self, page: usize, off: usize, v: u8) {
        assert!(page * 4096 + off < self.len);
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_volatile(self.ptr.add(page * 4096 + off), v) }
    }
    /// Page indices (from the start) covered by `regions`.
    #[cfg(test)]
    pub(crate) fn page_indices(&self, regions: &[crate::pagemap_scan::PageRegion]) -> Vec<u64> {
        regions
            .iter()
            .flat_map(|r| {
                (r.start..r.end)
                    .step_by(4096)
                    .map(|a| (a - self.start()) / 4096)
            })
            .collect()
    }
}

impl Drop for AnonRegion {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}
