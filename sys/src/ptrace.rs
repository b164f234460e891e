//! `ptrace(2)`: the one call of it in `sys`. Every module that reads or
//! writes a stopped thread (injection, register sets, signals, seccomp,
//! rseq) and the tracker's feature probes go through [`request`] (requests
//! that pass buffers) or [`plain`] (requests that take integers only).

use libc::{c_long, c_uint, c_void};
use nix::errno::Errno;

/// `ptrace(req, tid, addr, data)`: the kernel's result, or its errno.
///
/// `PTRACE_PEEK*` requests are not supported: their result may be -1
/// without an error, which this wrapper would report as one.
///
/// # Safety
///
/// `addr` and `data` must be what request `req` takes: integers, or
/// addresses of buffers the caller owns for the duration of the call and at
/// least as large as what the kernel reads or writes there for `req`
/// (a buffer the kernel writes must not be aliased).
pub unsafe fn request(req: c_uint, tid: i32, addr: u64, data: u64) -> Result<c_long, Errno> {
    // SAFETY: the caller guarantees `addr` and `data` are valid for `req`.
    let r = unsafe { libc::ptrace(req, tid, addr as *mut c_void, data as *mut c_void) };
    if r == -1 { Err(Errno::last()) } else { Ok(r) }
}

/// The requests whose `addr` and `data` are plain integers (options,
/// signal numbers): the kernel dereferences no pointer for them.
const PLAIN: [c_uint; 9] = [
    libc::PTRACE_SEIZE,
    libc::PTRACE_INTERRUPT,
    libc::PTRACE_SETOPTIONS,
    libc::PTRACE_CONT,
    libc::PTRACE_SYSCALL,
    libc::PTRACE_LISTEN,
    libc::PTRACE_DETACH,
    libc::PTRACE_KILL,
    libc::PTRACE_SINGLESTEP,
];

/// `ptrace(req, tid, addr, data)` for a request that takes no pointer
/// (`PTRACE_SEIZE`, `PTRACE_INTERRUPT`, `PTRACE_SETOPTIONS`, `PTRACE_CONT`,
/// `PTRACE_SYSCALL`, `PTRACE_LISTEN`, `PTRACE_DETACH`, `PTRACE_KILL`,
/// `PTRACE_SINGLESTEP`); any other request is refused with `EINVAL` without
/// reaching the kernel.
pub fn plain(req: c_uint, tid: i32, addr: u64, data: u64) -> Result<c_long, Errno> {
    if !PLAIN.contains(&req) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: the requests in PLAIN read `addr` and `data` as integers.
    unsafe { request(req, tid, addr, data) }
}

/// `PTRACE_GETREGSET` of register set `note` into `buf`: the number of
/// bytes the kernel filled (it cuts a larger set to `buf.len()`).
pub fn get_regset(tid: i32, note: u32, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is borrowed exclusively for the call, so the kernel
    // may write its `len` bytes.
    unsafe {
        regset(
            libc::PTRACE_GETREGSET,
            tid,
            note,
            buf.as_mut_ptr(),
            buf.len(),
        )
    }
}

/// `PTRACE_SETREGSET` of register set `note` from `data`: the number of
/// bytes the kernel took (it ignores what lies beyond its set).
pub fn set_regset(tid: i32, note: u32, data: &[u8]) -> Result<usize, Errno> {
    // SAFETY: SETREGSET only reads the `len` bytes of `data`.
    unsafe {
        regset(
            libc::PTRACE_SETREGSET,
            tid,
            note,
            data.as_ptr().cast_mut(),
            data.len(),
        )
    }
}

/// GETREGSET/SETREGSET through a `struct iovec` of `len` bytes at `base`.
///
/// # Safety
///
/// `base` must point to `len` bytes the kernel may read (SET) or write
/// (GET) for the duration of the call.
pub(crate) unsafe fn regset(
    req: c_uint,
    tid: i32,
    note: u32,
    base: *mut u8,
    len: usize,
) -> Result<usize, Errno> {
    let mut iov = libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    };
    // SAFETY: GETREGSET/SETREGSET take the note type as an integer in
    // `addr` and a `struct iovec` in `data`; the kernel uses at most
    // `iov_len` bytes at `iov_base` (valid, by this function's contract)
    // and writes back `iov_len` into `iov`, our local.
    unsafe { request(req, tid, u64::from(note), &raw mut iov as u64) }?;
    Ok(iov.iov_len.min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_refuses_requests_that_take_buffers() {
        assert_eq!(plain(libc::PTRACE_GETREGSET, 1, 0, 0), Err(Errno::EINVAL));
        // A plain request on a thread we do not trace reaches the kernel.
        assert_eq!(
            plain(libc::PTRACE_INTERRUPT, std::process::id() as i32, 0, 0),
            Err(Errno::ESRCH)
        );
    }
}
