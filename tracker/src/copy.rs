//! Copy pages out of a running target into an image: `process_vm_readv` in
//! large batches, falling back to `/proc/PID/mem` (which can read PROT_NONE
//! and other unreadable-to-GUP pages) range by range.

use images::{ImageError, ImageWriter, PAGE_SIZE, PageRange};
use std::os::unix::fs::FileExt;

/// Bytes copied per `process_vm_readv` batch.
const BATCH_BYTES: usize = 8 << 20;
/// iovecs per call (IOV_MAX).
const BATCH_IOVS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("PID {pid} exited while its pages were being copied")]
    Exited { pid: i32 },
    #[error(transparent)]
    Image(#[from] ImageError),
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CopyStats {
    /// Pages that could not be read at all (their VMA was unmapped meanwhile).
    pub vanished_pages: u64,
}

/// Copy `ranges` (sorted) of `pid` into `writer`.
pub fn copy_ranges(
    pid: i32,
    ranges: &[PageRange],
    writer: &mut ImageWriter,
) -> Result<CopyStats, CopyError> {
    let mut stats = CopyStats::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut mem: Option<std::fs::File> = None;
    // Split ranges so that no piece exceeds the batch size.
    let mut pieces = ranges.iter().flat_map(|r| {
        let step = BATCH_BYTES as u64;
        (r.start..r.end)
            .step_by(step as usize)
            .map(move |s| PageRange::new(s, (s + step).min(r.end)))
    });
    let mut batch: Vec<PageRange> = Vec::new();
    let (mut t_read, mut t_write) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    loop {
        batch.clear();
        let mut bytes = 0usize;
        for p in pieces.by_ref() {
            bytes += p.len() as usize;
            batch.push(p);
            if bytes >= BATCH_BYTES || batch.len() >= BATCH_IOVS {
                break;
            }
        }
        if batch.is_empty() {
            break;
        }
        buf.resize(bytes, 0);
        let local = [libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: bytes,
        }];
        let remote: Vec<libc::iovec> = batch
            .iter()
            .map(|r| libc::iovec {
                iov_base: r.start as *mut libc::c_void,
                iov_len: r.len() as usize,
            })
            .collect();
        let t = std::time::Instant::now();
        // SAFETY: `local` covers `buf` exactly; remote addresses are only
        // read by the kernel from the target's address space.
        let n = unsafe {
            libc::process_vm_readv(
                pid,
                local.as_ptr(),
                1,
                remote.as_ptr(),
                remote.len() as u64,
                0,
            )
        };
        t_read += t.elapsed();
        let t = std::time::Instant::now();
        let got = if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(CopyError::Exited { pid });
            }
            0
        } else {
            n as usize
        };
        // Whole pieces that were read go straight into the image; the rest
        // (a partial read stops at the first unreadable page) one by one.
        let mut off = 0usize;
        for r in &batch {
            let len = r.len() as usize;
            if off + len <= got {
                writer.add_pages(r.start, &buf[off..off + len])?;
            } else {
                let f = match &mut mem {
                    Some(f) => f,
                    slot => match std::fs::File::open(format!("/proc/{pid}/mem")) {
                        Ok(f) => slot.insert(f),
                        Err(_) => return Err(CopyError::Exited { pid }),
                    },
                };
                slow_copy(f, *r, &mut buf[off..off + len], writer, &mut stats)?;
            }
            off += len;
        }
        t_write += t.elapsed();
    }
    tracing::debug!(pid, "copy: process_vm_readv {t_read:?}, image {t_write:?}");
    Ok(stats)
}

/// Page by page through /proc/PID/mem.
fn slow_copy(
    mem: &std::fs::File,
    r: PageRange,
    buf: &mut [u8],
    writer: &mut ImageWriter,
    stats: &mut CopyStats,
) -> Result<(), CopyError> {
    let ps = PAGE_SIZE as usize;
    for (i, page) in buf.chunks_mut(ps).enumerate() {
        let addr = r.start + (i * ps) as u64;
        match mem.read_exact_at(page, addr) {
            Ok(()) => writer.add_pages(addr, page)?,
            Err(_) => stats.vanished_pages += 1,
        }
    }
    Ok(())
}
