//! A read-only view of a whole file, mapped shared: a restore copies image
//! pages into the restored process straight from the page cache, without a
//! copy of its own in between.

use std::fs::File;
use std::os::fd::AsRawFd;

/// A file's bytes as of now and as the page cache changes, mapped
/// `PROT_READ`, `MAP_SHARED`; unmapped on drop.
pub struct FileView {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a read-only mapping; nothing in tern writes through it.
unsafe impl Send for FileView {}
// SAFETY: as above: shared reads only.
unsafe impl Sync for FileView {}

impl FileView {
    /// Map all of `file` (its length now).
    ///
    /// # Safety
    /// The bytes are read as they are in the page cache: the caller makes
    /// sure that no one writes the file while the view lives (or accepts
    /// reading bytes that change under it), and that no one truncates it
    /// (a read past the new end is a SIGBUS).
    pub unsafe fn map(file: &File) -> std::io::Result<FileView> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Ok(FileView {
                ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(),
                len: 0,
            });
        }
        // SAFETY: a fresh read-only mapping of an open file, owned by the
        // value.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileView { ptr: p.cast(), len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `[off, off + len)`, None past the end.
    pub fn get(&self, off: u64, len: usize) -> Option<&[u8]> {
        let off = usize::try_from(off).ok()?;
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: inside the mapping, which lives as long as `self`.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) })
    }
}

impl Drop for FileView {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: our own mapping, unmapped once.
            unsafe { libc::munmap(self.ptr.cast_mut().cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_view_reads_the_file_and_stops_at_its_end() {
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..3 * 4096 + 10).map(|i| (i % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        // SAFETY: our own temporary file, neither written nor truncated
        // while the view lives.
        let v = unsafe { FileView::map(&f) }.unwrap();
        assert_eq!(v.len(), bytes.len());
        assert_eq!(v.get(0, bytes.len()).unwrap(), &bytes[..]);
        assert_eq!(v.get(4096, 5).unwrap(), &bytes[4096..4101]);
        assert!(v.get(3 * 4096, 11).is_none());
        assert!(v.get(u64::MAX, 1).is_none());
        let empty = tempfile::tempfile().unwrap();
        // SAFETY: as above.
        let e = unsafe { FileView::map(&empty) }.unwrap();
        assert!(e.is_empty() && e.get(0, 0).is_some() && e.get(0, 1).is_none());
    }
}
