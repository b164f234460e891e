//! userfaultfd in async write-protect mode, as the dirty-tracking primitive.
//!
//! The userfaultfd must be created *inside the target* (its context holds the
//! creator's mm), so tern injects the `userfaultfd(2)` call and pulls the fd
//! over with `pidfd_getfd(2)`. Everything after that (API handshake,
//! registration) is done from tern on that fd and acts on the target's memory.
//!
//! The `userfaultfd` crate (0.9) does everything after the handshake:
//! [`userfaultfd::Uffd`] registers and unregisters ranges, and has the copy,
//! zeropage, wake, write-protect and event-reading calls (what a lazy-pages
//! server needs; [`WpUffd::uffd`] and [`handshake`] hand it out). Raw code
//! stays only where the crate lacks the feature, each place saying which:
//!
//! - the `UFFDIO_API` handshake ([`handshake`]): the crate does it only inside
//!   `UffdBuilder::create`, on a userfaultfd it opens itself in this process,
//!   while tern's is created inside the target; its `FeatureFlags` has no
//!   `UFFD_FEATURE_WP_ASYNC`, `WP_UNPOPULATED` or `WP_HUGETLBFS_SHMEM`; and
//!   it drops the features the kernel reports. The uapi struct is written out
//!   (include/uapi/linux/userfaultfd.h);
//! - a userfaultfd of our own without the handshake ([`create_unhandshaken`],
//!   for probes and tests): `UffdBuilder::create` always does the handshake,
//!   and a userfaultfd takes only one.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const UFFD_API: u64 = 0xAA;
pub const UFFD_USER_MODE_ONLY: i32 = 1;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

// UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)
nix::ioctl_readwrite!(uffdio_api_ioctl, 0xAA, 0x3F, UffdioApi);

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "UFFDIO_API on userfaultfd (fd {fd}) asking for features {features:#x}: {errno}; async write-protect needs Linux 6.7+ (use --track soft-dirty or full)"
    )]
    Api {
        fd: RawFd,
        features: u64,
        errno: nix::errno::Errno,
    },
    #[error("registering [{start:#x}, {end:#x}) for write-protect: {errno}")]
    Register {
        start: u64,
        end: u64,
        errno: nix::errno::Errno,
    },
    #[error("pidfd_getfd(pid {pid}, fd {fd}): {errno}")]
    GetFd {
        pid: i32,
        fd: i32,
        errno: nix::errno::Errno,
    },
    #[error("pidfd_open(pid {pid}): {errno}")]
    PidfdOpen { pid: i32, errno: nix::errno::Errno },
}

/// The `UFFDIO_API` handshake on `fd`, a fresh userfaultfd (possibly
/// created inside another process), asking for each feature set of
/// `attempts` in turn until the kernel accepts one (a kernel rejects feature
/// bits it does not know; a failed handshake does not count, a successful
/// one is the only one). Returns the crate's handle, which owns `fd`, and the
/// features the kernel reported.
///
/// Raw: the crate has no handshake on a userfaultfd it did not create, nor
/// names for the write-protect features (see the module doc).
pub fn handshake(fd: OwnedFd, attempts: &[u64]) -> Result<(userfaultfd::Uffd, u64), UffdError> {
    let raw = fd.as_raw_fd();
    let mut last = (0, nix::errno::Errno::EINVAL);
    for &features in attempts {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid uffdio_api for the duration of the call.
        match unsafe { uffdio_api_ioctl(raw, &mut api) } {
            Ok(_) => {
                // SAFETY: we own `fd`; Uffd closes it on drop.
                let uffd = unsafe {
                    userfaultfd::Uffd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
                };
                return Ok((uffd, api.features));
            }
            Err(errno) => last = (features, errno),
        }
    }
    Err(UffdError::Api {
        fd: raw,
        features: last.0,
        errno: last.1,
    })
}

/// `userfaultfd(O_CLOEXEC | UFFD_USER_MODE_ONLY)` in this process, without the
/// handshake (for probes and tests; raw: the crate's `UffdBuilder::create`
/// always does the handshake).
pub fn create_unhandshaken() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the kernel returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A userfaultfd armed for async write-protect tracking.
pub struct WpUffd {
    uffd: userfaultfd::Uffd,
}

impl WpUffd {
    /// Take ownership of `fd` (a fresh userfaultfd) and do the API handshake
    /// with `WP_ASYNC | WP_UNPOPULATED` (and shmem/hugetlb WP when offered).
    pub fn handshake(fd: OwnedFd) -> Result<WpUffd, UffdError> {
        let base = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        // Older kernels reject unknown feature bits: then the two we cannot
        // do without.
        let (uffd, _) = handshake(fd, &[base | UFFD_FEATURE_WP_HUGETLBFS_SHMEM, base])?;
        Ok(WpUffd { uffd })
    }

    /// Adopt a userfaultfd whose handshake was already done (a later tern
    /// invocation taking the target's tracking fd back).
    pub fn adopt(fd: OwnedFd) -> WpUffd {
        // SAFETY: as above.
        let uffd =
            unsafe { userfaultfd::Uffd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
        WpUffd { uffd }
    }

    /// Register `[start, end)` of the target for write-protect tracking.
    pub fn register_wp(&self, start: u64, end: u64) -> Result<(), UffdError> {
        self.uffd
            .register_with_mode(
                start as *mut libc::c_void,
                sys::usize_of(end - start),
                userfaultfd::RegisterMode::WRITE_PROTECT,
            )
            .map(|_| ())
            .map_err(|e| UffdError::Register {
                start,
                end,
                errno: uffd_errno(e),
            })
    }

    pub fn unregister(&self, start: u64, end: u64) -> Result<(), UffdError> {
        self.uffd
            .unregister(start as *mut libc::c_void, sys::usize_of(end - start))
            .map_err(|e| UffdError::Register {
                start,
                end,
                errno: uffd_errno(e),
            })
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    /// The crate's handle, for its other calls (write-protect, wake, events).
    pub fn uffd(&self) -> &userfaultfd::Uffd {
        &self.uffd
    }
}

/// The crate links another nix version: carry the errno over by number.
pub fn uffd_errno(e: userfaultfd::Error) -> nix::errno::Errno {
    match e {
        userfaultfd::Error::SystemError(errno)
        | userfaultfd::Error::CopyFailed(errno)
        | userfaultfd::Error::ZeropageFailed(errno) => nix::errno::Errno::from_raw(errno as i32),
        _ => nix::errno::Errno::EINVAL,
    }
}

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, UffdError> {
    sys::fds::pidfd_open(pid).map_err(|errno| UffdError::PidfdOpen { pid, errno })
}

/// `pidfd_getfd(2)`: a duplicate of the target's fd `fd`.
pub fn pidfd_getfd(pidfd: &OwnedFd, pid: i32, fd: i32) -> Result<OwnedFd, UffdError> {
    sys::fds::pidfd_getfd_from(pidfd, fd).map_err(|errno| UffdError::GetFd { pid, fd, errno })
}

/// Features a userfaultfd was handshaken with, from `/proc/PID/fdinfo/FD`
/// (`API:\t<api>:<features>:<ioctls>`), or None if `fd` is no userfaultfd.
pub fn fdinfo_features(pid: i32, fd: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    if link.to_str()? != "anon_inode:[userfaultfd]" {
        return None;
    }
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let api = info.lines().find_map(|l| l.strip_prefix("API:"))?.trim();
    let features = api.split(':').nth(1)?;
    u64::from_str_radix(features, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_uffd() -> OwnedFd {
        create_unhandshaken().expect("userfaultfd(2)")
    }

    #[test]
    fn struct_layout_matches_uapi() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(nix::request_code_readwrite!(0xAA, 0x3F, 24), 0xc018_aa3f);
    }

    /// Real kernel: async WP on our own memory, written pages found by
    /// PAGEMAP_SCAN and re-protected in the same call; fdinfo shows features.
    #[test]
    fn async_wp_tracks_writes() {
        use crate::pagemap_scan::{Pagemap, ScanQuery};
        let uffd = WpUffd::handshake(own_uffd()).expect("async uffd-WP must work here");
        let pid = std::process::id() as i32;
        let feats = fdinfo_features(pid, uffd.as_raw_fd()).unwrap();
        assert_ne!(
            feats & UFFD_FEATURE_WP_ASYNC,
            0,
            "fdinfo features {feats:#x}"
        );
        let region = crate::anon::AnonRegion::new(32).unwrap();
        for i in 0..32 {
            region.write(i, 0, 1);
        }
        let (start, end) = (region.start(), region.end());
        uffd.register_wp(start, end).unwrap();
        let mut pm = Pagemap::open(pid).unwrap();
        let scan = |pm: &mut Pagemap| {
            let mut out = Vec::new();
            pm.scan(start, end, ScanQuery::WRITTEN_AND_REPROTECT, &mut out)
                .unwrap();
            region.page_indices(&out)
        };
        // Arming scan: everything populated counts as written once.
        assert_eq!(scan(&mut pm).len(), 32);
        for i in [3usize, 4, 20] {
            region.write(i, 7, 2);
        }
        assert_eq!(scan(&mut pm), vec![3, 4, 20]);
        assert!(scan(&mut pm).is_empty(), "re-protected in the same call");
        uffd.unregister(start, end).unwrap();
    }

    /// A userfaultfd handshaken here for missing faults, then the crate's
    /// register, zeropage, copy and unregister on it (what a lazy-pages server
    /// does): pages appear with the contents given, without a fault.
    #[test]
    fn crate_copy_and_zeropage_on_a_handshaken_uffd() {
        let (uffd, features) = handshake(own_uffd(), &[0]).expect("UFFDIO_API");
        // Asked for none, the kernel reports every feature it has (what
        // `tern check` reads): async write-protect among them on this kernel.
        assert_ne!(features & UFFD_FEATURE_WP_ASYNC, 0, "{features:#x}");
        let region = crate::anon::AnonRegion::new(4).unwrap();
        let (start, end) = (sys::usize_of(region.start()), sys::usize_of(region.end()));
        let page = (end - start) / 4;
        let ioctls = uffd
            .register(start as *mut libc::c_void, end - start)
            .expect("register for missing faults");
        assert!(
            ioctls.contains(userfaultfd::IoctlFlags::COPY | userfaultfd::IoctlFlags::ZEROPAGE),
            "{ioctls:?}"
        );
        let src = vec![0x5au8; page];
        // SAFETY: `src` is `page` readable bytes; the destination pages are
        // registered and not populated.
        let copied =
            unsafe { uffd.copy(src.as_ptr().cast(), start as *mut libc::c_void, page, false) }
                .map_err(uffd_errno)
                .expect("UFFDIO_COPY");
        assert_eq!(copied, page);
        // SAFETY: as above, pages 1..4.
        let zeroed = unsafe { uffd.zeropage((start + page) as *mut libc::c_void, 3 * page, false) }
            .map_err(uffd_errno)
            .expect("UFFDIO_ZEROPAGE");
        assert_eq!(zeroed, 3 * page);
        // Populated now (a read would otherwise wait for a fault nobody
        // serves), with the contents given.
        let read = |page_index: usize, off: usize| {
            // SAFETY: inside the region, populated above.
            unsafe { std::ptr::read_volatile((start + page_index * page + off) as *const u8) }
        };
        assert_eq!(read(0, 0), 0x5a);
        assert_eq!(read(0, page - 1), 0x5a);
        assert_eq!(read(3, 100), 0);
        // Populating a page again is EEXIST, carried over with its errno.
        // SAFETY: a registered page; the kernel refuses to replace it.
        let again = unsafe { uffd.zeropage(start as *mut libc::c_void, page, false) };
        assert_eq!(
            again.map_err(uffd_errno).unwrap_err(),
            nix::errno::Errno::EEXIST
        );
        uffd.unregister(start as *mut libc::c_void, end - start)
            .expect("unregister");
    }
}
