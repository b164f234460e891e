//! userfaultfd in async write-protect mode, as the dirty-tracking primitive.
//!
//! The userfaultfd must be created *inside the target* (its context holds the
//! creator's mm), so tern injects the `userfaultfd(2)` call and pulls the fd
//! over with `pidfd_getfd(2)`. Everything after that (API handshake,
//! registration) is done from tern on that fd and acts on the target's memory.
//!
//! The `userfaultfd` crate (0.9) registers ranges but does not know
//! `UFFD_FEATURE_WP_ASYNC` / `WP_UNPOPULATED`, so the `UFFDIO_API` handshake is
//! a raw ioctl with the uapi struct written out (include/uapi/linux/userfaultfd.h).

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

/// A userfaultfd armed for async write-protect tracking.
pub struct WpUffd {
    uffd: userfaultfd::Uffd,
}

impl WpUffd {
    /// Take ownership of `fd` (a fresh userfaultfd) and do the API handshake
    /// with `WP_ASYNC | WP_UNPOPULATED` (and shmem/hugetlb WP when offered).
    pub fn handshake(fd: OwnedFd) -> Result<WpUffd, UffdError> {
        let raw = fd.as_raw_fd();
        let base = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: base | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid uffdio_api for the duration of the call.
        let r = unsafe { uffdio_api_ioctl(raw, &mut api) };
        if r.is_err() {
            // Older kernels reject unknown feature bits: retry with the two
            // we cannot do without. The handshake may be done only once per
            // uffd, but a failed one does not count.
            api = UffdioApi {
                api: UFFD_API,
                features: base,
                ioctls: 0,
            };
            // SAFETY: an open userfaultfd of ours; `api` is a local uffdio_api the kernel reads and writes.
            unsafe { uffdio_api_ioctl(raw, &mut api) }.map_err(|errno| UffdError::Api {
                fd: raw,
                features: base,
                errno,
            })?;
        }
        // SAFETY: we own `fd`; Uffd closes it on drop.
        let uffd =
            unsafe { userfaultfd::Uffd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
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
}

/// The crate links another nix version: carry the errno over by number.
fn uffd_errno(e: userfaultfd::Error) -> nix::errno::Errno {
    match e {
        userfaultfd::Error::SystemError(errno) => nix::errno::Errno::from_raw(errno as i32),
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
        let fd =
            // SAFETY: userfaultfd(2) takes integer flags.
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) };
        assert!(
            fd >= 0,
            "userfaultfd(2): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the fd was just returned by the kernel and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) }
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
}
