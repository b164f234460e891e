//! A private anonymous mapping of tern's own, for the feature probes of
//! `tern check` and the kernel-interface unit tests: unmapped on drop.

/// `pages` read-write pages of fresh private anonymous memory.
pub struct AnonRegion {
    ptr: *mut u8,
    len: usize,
}

impl AnonRegion {
    /// Map `pages` read-write pages; None if mmap fails.
    pub fn new(pages: usize) -> Option<AnonRegion> {
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
        (p != libc::MAP_FAILED).then_some(AnonRegion { ptr: p.cast(), len })
    }
    pub fn start(&self) -> u64 {
        self.ptr as u64
    }
    pub fn end(&self) -> u64 {
        self.start() + self.len as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Write `v` at byte `off` of page `page` (a first write populates it).
    pub fn write(&self, page: usize, off: usize, v: u8) {
        assert!(page * 4096 + off < self.len);
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_volatile(self.ptr.add(page * 4096 + off), v) }
    }
    /// `madvise(advice)` of `count` pages from page `first`.
    pub fn madvise(&self, first: usize, count: usize, advice: i32) -> std::io::Result<()> {
        assert!((first + count) * 4096 <= self.len);
        // SAFETY: a range of our own mapping; no reference into it is held.
        let r = unsafe { libc::madvise(self.ptr.add(first * 4096).cast(), count * 4096, advice) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for AnonRegion {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
