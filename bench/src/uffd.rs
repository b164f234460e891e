//! The per-fault floor: what a first write to an async-write-protected page
//! costs on this machine, without tern. A userfaultfd in this process, with
//! `UFFD_FEATURE_WP_ASYNC`, registered in WP mode over a populated region;
//! every repetition write-protects the region, times one write per page, then
//! times the same sweep again (no faults now). The difference per page is the
//! floor that tern's tracking is compared against.
//!
//! The fill floor ([`measure_copy_floor`]): how fast `UFFDIO_COPY` alone
//! fills missing memory here, in the chunks tern's lazy fill uses, from a
//! source already in memory (no read, no check, no decoding).
//!
//! uapi values from include/uapi/linux/userfaultfd.h (Linux 6.7+; the system
//! headers here are 6.1 and lack WP_ASYNC).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{Region, mono_ns};

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);
const UFFDIO_COPY: u64 = iowr(0x03, 40);

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: arg is the struct the request expects.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A userfaultfd of this process, handshaken with `features`.
fn userfaultfd(features: u64) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(raw).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(&fd, UFFDIO_API, &mut api)?;
    Ok(fd)
}

/// A userfaultfd with async write-protect over one region.
pub struct AsyncWp {
    fd: OwnedFd,
    start: u64,
    len: u64,
}

impl AsyncWp {
    pub fn new(region: &Region) -> io::Result<AsyncWp> {
        AsyncWp::over(region.addr() as u64, region.len() as u64)
    }

    /// Register `[start, start + len)`, which must be a private anonymous
    /// mapping of this process.
    pub fn over(start: u64, len: u64) -> io::Result<AsyncWp> {
        let fd = userfaultfd(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)?;
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_REGISTER, &mut reg)?;
        Ok(AsyncWp { fd, start, len })
    }

    pub fn protect(&self) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: self.start,
                len: self.len,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut wp)
    }
}

/// One floor measurement.
pub struct Floor {
    pub pages: usize,
    /// Median over repetitions of (protected sweep - plain sweep) / pages.
    pub fault_ns: f64,
    /// The smallest of the repetitions (the least disturbed by other load).
    pub fault_min_ns: f64,
    /// Median plain write per page.
    pub plain_ns: f64,
    pub reps: usize,
}

/// Measure the floor over `mib` MiB, `reps` repetitions.
pub fn measure_floor(mib: usize, reps: usize) -> io::Result<Floor> {
    let region = Region::new(mib << 20)?;
    region.fill(0);
    let wp = AsyncWp::new(&region)?;
    let pages = region.pages();
    let sweep = |tag: u64| {
        let t = mono_ns();
        for p in 0..pages {
            region.write(p, 8, tag);
        }
        (mono_ns() - t) as f64
    };
    sweep(0);
    let mut faults = Vec::new();
    let mut plains = Vec::new();
    for r in 0..reps {
        wp.protect()?;
        let protected = sweep(r as u64 * 2 + 1);
        let plain = sweep(r as u64 * 2 + 2);
        faults.push((protected - plain) / pages as f64);
        plains.push(plain / pages as f64);
    }
    let fault_min_ns = faults.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Floor {
        pages,
        fault_min_ns,
        fault_ns: median(&mut faults),
        plain_ns: median(&mut plains),
        reps,
    })
}

/// One fill-floor measurement: `UFFDIO_COPY` rates, MB/s.
pub struct CopyFloor {
    pub mib: usize,
    pub chunk_kib: usize,
    pub reps: usize,
    pub mb_s: f64,
    pub min_mb_s: f64,
    pub max_mb_s: f64,
}

/// Fill `mib` MiB of missing anonymous memory with `UFFDIO_COPY` in
/// `chunk`-byte copies from a 4 MiB populated source, `reps` times (a fresh
/// region each time); one thread, whatever else runs on the machine.
pub fn measure_copy_floor(mib: usize, chunk: usize, reps: usize) -> io::Result<CopyFloor> {
    let src = Region::new(4 << 20)?;
    src.fill(0);
    let len = mib << 20;
    let mut rates = Vec::new();
    for _ in 0..reps {
        let dst = Region::missing(len)?;
        let fd = userfaultfd(0)?;
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: dst.addr() as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_REGISTER, &mut reg)?;
        let t = mono_ns();
        let mut off = 0;
        while off < len {
            let n = chunk.min(len - off);
            let mut c = UffdioCopy {
                dst: (dst.addr() + off) as u64,
                src: (src.addr() + off % src.len()) as u64,
                len: n as u64,
                mode: 0,
                copy: 0,
            };
            ioctl(&fd, UFFDIO_COPY, &mut c)?;
            if c.copy != n as i64 {
                return Err(io::Error::other(format!(
                    "UFFDIO_COPY copied {} of {n} bytes",
                    c.copy
                )));
            }
            off += n;
        }
        let ns = (mono_ns() - t) as f64;
        // The copies are there, page for page (sampled: every 97th page).
        for p in (0..dst.pages()).step_by(97) {
            let at = p * crate::PAGE;
            // SAFETY: both in bounds of their mappings, now populated.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts((dst.addr() + at) as *const u8, crate::PAGE),
                    std::slice::from_raw_parts(
                        (src.addr() + at % src.len()) as *const u8,
                        crate::PAGE,
                    ),
                )
            };
            if a != b {
                return Err(io::Error::other(format!(
                    "page {p} differs from its source after UFFDIO_COPY"
                )));
            }
        }
        rates.push(len as f64 / ns * 1e3);
    }
    let min_mb_s = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max_mb_s = rates.iter().copied().fold(0.0, f64::max);
    Ok(CopyFloor {
        mib,
        chunk_kib: chunk >> 10,
        reps,
        mb_s: median(&mut rates),
        min_mb_s,
        max_mb_s,
    })
}

pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn floor_is_measurable() {
        // Needs userfaultfd (root or vm.unprivileged_userfaultfd) and a 6.7+
        // kernel for WP_ASYNC; skip quietly elsewhere.
        match super::measure_floor(4, 3) {
            Ok(f) => {
                assert!(f.fault_ns > 0.0, "a protected write is slower");
                assert_eq!(f.pages, 1024);
            }
            Err(e) => eprintln!("skipped: {e}"),
        }
    }

    #[test]
    fn copy_floor_fills_missing_memory() {
        let f = super::measure_copy_floor(8, 128 << 10, 2).expect("UFFDIO_COPY floor");
        assert!(
            f.mb_s > 10.0 && f.min_mb_s <= f.mb_s && f.mb_s <= f.max_mb_s,
            "implausible UFFDIO_COPY rate {} MB/s",
            f.mb_s
        );
    }

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(super::UFFDIO_API, 0xC018_AA3F);
        assert_eq!(super::UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(super::UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(super::UFFDIO_COPY, 0xC028_AA03);
    }
}
