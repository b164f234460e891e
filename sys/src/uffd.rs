//! userfaultfd: what the `userfaultfd` crate (0.9) lacks, for a userfaultfd
//! that lives in another process.
//!
//! tern's userfaultfds are created *inside* the process they serve (a
//! userfaultfd's context holds its creator's mm): tern injects the
//! `userfaultfd(2)` call and takes a copy with `pidfd_getfd(2)`. Everything
//! after that (API handshake, registration, copy, zeropage, events) is done
//! from tern on that copy and acts on the other process's memory. The
//! crate's [`userfaultfd::Uffd`] does registration, copy, zeropage, wake and
//! event reading; this module keeps the raw code only where the crate lacks
//! the feature:
//!
//! - the `UFFDIO_API` handshake ([`handshake`]): the crate does it only inside
//!   `UffdBuilder::create`, on a userfaultfd it opens itself in this process;
//!   its `FeatureFlags` has no `UFFD_FEATURE_WP_ASYNC`, `WP_UNPOPULATED` or
//!   `WP_HUGETLBFS_SHMEM`; and it drops the features the kernel reports. The
//!   uapi struct is written out (include/uapi/linux/userfaultfd.h);
//! - a userfaultfd of our own without the handshake ([`create_unhandshaken`],
//!   for probes and tests): `UffdBuilder::create` always does the handshake,
//!   and a userfaultfd takes only one;
//! - adopting a userfaultfd whose handshake another process did ([`adopt`]).

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

pub const UFFD_API: u64 = 0xAA;
pub const UFFD_USER_MODE_ONLY: i32 = 1;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
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

/// A refused `UFFDIO_API` handshake: the last feature set asked for.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("UFFDIO_API on userfaultfd (fd {fd}) asking for features {features:#x}: {errno}")]
pub struct ApiError {
    pub fd: RawFd,
    pub features: u64,
    pub errno: nix::errno::Errno,
}

/// The `UFFDIO_API` handshake on `fd`, a fresh userfaultfd (possibly
/// created inside another process), asking for each feature set of
/// `attempts` in turn until the kernel accepts one (a kernel rejects feature
/// bits it does not know; a failed handshake does not count, a successful
/// one is the only one). Returns the crate's handle, which owns `fd`, and the
/// features the kernel reported.
pub fn handshake(fd: OwnedFd, attempts: &[u64]) -> Result<(userfaultfd::Uffd, u64), ApiError> {
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
            Ok(_) => return Ok((adopt(fd), api.features)),
            Err(errno) => last = (features, errno),
        }
    }
    Err(ApiError {
        fd: raw,
        features: last.0,
        errno: last.1,
    })
}

/// The crate's handle on a userfaultfd whose handshake is done (by
/// [`handshake`], or by an earlier tern on the same file description).
pub fn adopt(fd: OwnedFd) -> userfaultfd::Uffd {
    // SAFETY: we own `fd`; the Uffd closes it on drop.
    unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) }
}

/// `userfaultfd(flags)` in this process, without the handshake (raw: the
/// crate's `UffdBuilder::create` always does the handshake).
pub fn create_unhandshaken_with(flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the kernel returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `userfaultfd(O_CLOEXEC | UFFD_USER_MODE_ONLY)` in this process, without
/// the handshake (for probes and tests).
pub fn create_unhandshaken() -> std::io::Result<OwnedFd> {
    create_unhandshaken_with(libc::O_CLOEXEC | UFFD_USER_MODE_ONLY)
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

/// Whether fd `fd` of process `pid` is a userfaultfd.
pub fn is_userfaultfd(pid: i32, fd: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:[userfaultfd]")
}

/// Features a userfaultfd was handshaken with, from `/proc/PID/fdinfo/FD`
/// (`API:\t<api>:<features>:<ioctls>`), or None if `fd` is no userfaultfd.
pub fn fdinfo_features(pid: i32, fd: i32) -> Option<u64> {
    if !is_userfaultfd(pid, fd) {
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

    #[test]
    fn struct_layout_matches_uapi() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(nix::request_code_readwrite!(0xAA, 0x3F, 24), 0xc018_aa3f);
    }

    /// A userfaultfd handshaken here for missing faults, then the crate's
    /// register, zeropage, copy and unregister on it (what a lazy-pages server
    /// does): pages appear with the contents given, without a fault.
    #[test]
    fn crate_copy_and_zeropage_on_a_handshaken_uffd() {
        let (uffd, features) =
            handshake(create_unhandshaken().expect("userfaultfd(2)"), &[0]).expect("UFFDIO_API");
        // Asked for none, the kernel reports every feature it has (what
        // `tern check` reads): async write-protect among them on this kernel.
        assert_ne!(features & UFFD_FEATURE_WP_ASYNC, 0, "{features:#x}");
        let pid = std::process::id() as i32;
        // fdinfo shows what was asked for (none) and the kernel's
        // "initialized" bit: it is a userfaultfd, handshaken.
        assert!(is_userfaultfd(pid, uffd.as_raw_fd()));
        assert!(fdinfo_features(pid, uffd.as_raw_fd()).is_some_and(|f| f != 0));
        assert!(!is_userfaultfd(pid, 0));
        let region = crate::anon::AnonRegion::new(4).expect("mmap");
        let (start, end) = (
            crate::usize_of(region.start()),
            crate::usize_of(region.end()),
        );
        let page = 4096;
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
