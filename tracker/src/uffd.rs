//! userfaultfd in async write-protect mode, as the dirty-tracking primitive
//! (the generic layer, handshake and adoption of a userfaultfd made inside
//! the target, is `sys::uffd`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

pub use sys::uffd::{
    UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_UNPOPULATED,
    UFFD_USER_MODE_ONLY, create_unhandshaken, fdinfo_features, uffd_errno,
};

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
        let base = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        // Older kernels reject unknown feature bits: then the two we cannot
        // do without.
        let (uffd, _) = sys::uffd::handshake(fd, &[base | UFFD_FEATURE_WP_HUGETLBFS_SHMEM, base])
            .map_err(|e| UffdError::Api {
            fd: e.fd,
            features: e.features,
            errno: e.errno,
        })?;
        Ok(WpUffd { uffd })
    }

    /// Adopt a userfaultfd whose handshake was already done (a later tern
    /// invocation taking the target's tracking fd back).
    pub fn adopt(fd: OwnedFd) -> WpUffd {
        WpUffd {
            uffd: sys::uffd::adopt(fd),
        }
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

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, UffdError> {
    sys::fds::pidfd_open(pid).map_err(|errno| UffdError::PidfdOpen { pid, errno })
}

/// `pidfd_getfd(2)`: a duplicate of the target's fd `fd`.
pub fn pidfd_getfd(pidfd: &OwnedFd, pid: i32, fd: i32) -> Result<OwnedFd, UffdError> {
    sys::fds::pidfd_getfd_from(pidfd, fd).map_err(|errno| UffdError::GetFd { pid, fd, errno })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anon::PageIndices;

    fn own_uffd() -> OwnedFd {
        create_unhandshaken().expect("userfaultfd(2)")
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
