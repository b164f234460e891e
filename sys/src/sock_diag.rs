//! `NETLINK_SOCK_DIAG` (sock_diag(7)): one dump request, its answers. The
//! request bodies and answer layouts are each family's
//! ([`crate::unix_sockets`], [`crate::inet_sockets`]); this module owns the
//! netlink framing: `struct nlmsghdr`, `NLMSG_DONE`, `NLMSG_ERROR`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY` (include/uapi/linux/sock_diag.h).
const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_DONE`, `NLMSG_ERROR`; `NLM_F_REQUEST | NLM_F_DUMP`.
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST_DUMP: u16 = 0x1 | 0x300;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;

/// Send `body` (a family's `*_diag_req`) as a dump request of tern's
/// network namespace; the payload of every answer. Err: (the step, why).
pub fn dump(body: &[u8]) -> Result<Vec<Vec<u8>>, (&'static str, std::io::Error)> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(("socket(NETLINK_SOCK_DIAG)", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd of ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = u32::try_from(NLMSG_HDRLEN + body.len()).unwrap_or(u32::MAX);
    let mut req = Vec::with_capacity(len as usize);
    req.extend_from_slice(&len.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    req.extend_from_slice(body);
    // SAFETY: send of a local buffer on our socket (a netlink socket's
    // default destination is the kernel).
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(("send", std::io::Error::last_os_error()));
    }
    let bad = |what: &'static str| (what, std::io::Error::from(std::io::ErrorKind::InvalidData));
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(("recv", std::io::Error::last_os_error()));
        }
        let mut msgs = &buf[..usize::try_from(n).unwrap_or(0)];
        while msgs.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(msgs[4..6].try_into().unwrap_or_default());
            if len < NLMSG_HDRLEN || len > msgs.len() {
                return Err(bad("an answer's nlmsg_len"));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = msgs
                        .get(16..20)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                        .unwrap_or(0);
                    // ENOENT: no handler for the family (its *_diag module
                    // not loaded, and not loadable here).
                    return Err((
                        if errno == -libc::ENOENT {
                            "the kernel's answer (the socket-diag module for this family is not loaded: modprobe unix_diag, tcp_diag, udp_diag)"
                        } else {
                            "the kernel's answer"
                        },
                        std::io::Error::from_raw_os_error(-errno),
                    ));
                }
                SOCK_DIAG_BY_FAMILY => out.push(msgs[NLMSG_HDRLEN..len].to_vec()),
                _ => {}
            }
            msgs = &msgs[len.next_multiple_of(4).min(msgs.len())..];
        }
        if n == 0 {
            return Err(bad("the end of the answers without NLMSG_DONE"));
        }
    }
}
