//! Shared pieces of tern's benchmarks: the workloads' memory region, a
//! monotonic clock both the workloads and the driver read, tiny argument
//! parsing for the workload binaries, and the userfaultfd calls the per-fault
//! floor measurement needs.

pub mod dump;
pub mod migrate;
pub mod relay;
pub mod restore;
pub mod run;
pub mod svg;
pub mod tracking;
pub mod uffd;

use std::io;

pub const PAGE: usize = 4096;

/// CLOCK_MONOTONIC in nanoseconds: the workloads stamp their progress lines
/// with it and the driver stamps the rounds with it, so both share one axis.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_REALTIME in nanoseconds: the axis `hotloop`'s progress lines and
/// the restore benchmark share. Not CLOCK_MONOTONIC: CRIU restores a process
/// into a time namespace whose offsets make its monotonic clock continue
/// from the dump (measured: `monotonic -3 122103594` in
/// `/proc/PID/timens_offsets` of a process restored 3.1 s after its dump),
/// so a restored process's monotonic stamps are not the driver's.
pub fn real_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A private anonymous mapping, unmapped on drop.
pub struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    /// Map `len` bytes (a multiple of the page size), small pages only (so
    /// that page counts mean 4 KiB pages), and populate them.
    pub fn new(len: usize) -> io::Result<Region> {
        let r = Region::missing(len)?;
        // SAFETY: r.ptr..r.ptr+len is our mapping.
        unsafe { libc::madvise(r.ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
        Ok(r)
    }

    /// Map `len` bytes as [`Region::new`] does, but leave them missing
    /// (for a userfaultfd in missing mode to fill).
    pub fn missing(len: usize) -> io::Result<Region> {
        // SAFETY: a fresh anonymous mapping; arguments are valid.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ptr..ptr+len is our mapping.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Ok(Region {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write `value` at byte `offset` (8-aligned) of page `page`.
    #[inline(always)]
    pub fn write(&self, page: usize, offset: usize, value: u64) {
        debug_assert!(page < self.pages() && offset + 8 <= PAGE);
        // SAFETY: in bounds of our mapping, 8-aligned.
        unsafe { std::ptr::write_volatile(self.ptr.add(page * PAGE + offset).cast::<u64>(), value) }
    }

    /// Fill every page with a recognisable non-zero pattern (so no page is a
    /// zero page), except pages whose index is a multiple of `zero_every`
    /// (0: none), which stay populated zeros.
    pub fn fill(&self, zero_every: usize) {
        for p in 0..self.pages() {
            if zero_every != 0 && p % zero_every == 0 {
                continue;
            }
            for off in (0..PAGE).step_by(1024) {
                self.write(p, off, (p as u64) << 16 | off as u64 | 1);
            }
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `--name value` from the process arguments, parsed.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    for w in args.windows(2) {
        if w[0] == name {
            return w[1]
                .parse()
                .unwrap_or_else(|_| panic!("bad value for {name}: {:?}", w[1]));
        }
    }
    default
}

/// Whether `--name` is among the process arguments.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// A cheap deterministic hash of a page index to [0, 1): the workloads pick
/// their working set with it, spread over the whole region.
pub fn unit_hash(i: u64) -> f64 {
    let mut x = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}
