//! TCP and UDP sockets (IPv4 and IPv6): what `sock_diag(7)` says of each
//! (state, addresses, queues; include/uapi/linux/inet_diag.h), the options
//! a restore sets again (read through a duplicate of the socket), and the
//! socket made again: options, bind, listen.
//!
//! tern restores the sockets that carry no connection: listening TCP
//! sockets with no connection waiting, TCP sockets that are only bound (or
//! not even), unconnected UDP sockets with nothing queued. An established
//! connection needs TCP_REPAIR (not done).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;
/// IPPROTO_TCP, IPPROTO_UDP.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
/// AF_INET, AF_INET6 as sock_diag's one-byte family.
pub const INET: u8 = 2;
pub const INET6: u8 = 10;
const _: () = assert!(libc::AF_INET == INET as i32 && libc::AF_INET6 == INET6 as i32);
/// `sizeof(struct inet_diag_msg)`.
const DIAG_MSG_LEN: usize = 72;

/// One TCP or UDP socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSocket {
    pub ino: u64,
    pub family: u8,
    pub protocol: u8,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Listening: connections waiting to be accepted; else bytes queued.
    pub rqueue: u32,
    /// Listening: the backlog; else bytes not yet sent.
    pub wqueue: u32,
}

/// The options tern sets again on a restored socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketOptions {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    /// TCP_NODELAY (TCP only).
    pub nodelay: bool,
    /// IPV6_V6ONLY (IPv6 only).
    pub v6only: bool,
    /// SO_BINDTODEVICE is set (not restored: refused).
    pub bound_to_device: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InetSocketsError {
    #[error("sock_diag for TCP/UDP sockets: {what}: {source}")]
    Diag {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("fd {fd} of PID {pid}: {what}: {source}")]
    Fd {
        pid: i32,
        fd: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Every TCP and UDP socket (IPv4 and IPv6) of tern's network namespace,
/// by inode.
pub fn all() -> Result<HashMap<u64, InetSocket>, InetSocketsError> {
    let mut out = HashMap::new();
    for family in [INET, INET6] {
        for protocol in [TCP, UDP] {
            // struct inet_diag_req_v2: family, protocol, ext, pad, states,
            // then a zeroed inet_diag_sockid (48 bytes).
            let mut req = vec![family, protocol, 0, 0];
            req.extend_from_slice(&u32::MAX.to_ne_bytes());
            req.extend_from_slice(&[0u8; 48]);
            let answers = crate::sock_diag::dump(&req)
                .map_err(|(what, source)| InetSocketsError::Diag { what, source })?;
            for m in answers {
                if let Some(s) = parse_msg(&m, protocol) {
                    out.insert(s.ino, s);
                }
            }
        }
    }
    Ok(out)
}

/// struct inet_diag_msg: family, state, timer, retrans, the sockid (ports
/// big-endian, addresses as four big-endian words, the interface), then
/// expires, rqueue, wqueue, uid, inode.
fn parse_msg(b: &[u8], protocol: u8) -> Option<InetSocket> {
    if b.len() < DIAG_MSG_LEN {
        return None;
    }
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let scope = u32_at(40);
    let addr = |o: usize, p: u16| -> SocketAddr {
        if b[0] == INET {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]),
                p,
            ))
        } else {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[o..o + 16]);
            let ip = Ipv6Addr::from(a);
            // Only link-local addresses carry a scope.
            let sc = if ip.segments()[0] & 0xffc0 == 0xfe80 {
                scope
            } else {
                0
            };
            SocketAddr::V6(SocketAddrV6::new(ip, p, 0, sc))
        }
    };
    Some(InetSocket {
        family: b[0],
        protocol,
        state: b[1],
        local: addr(8, port(4)),
        remote: addr(24, port(6)),
        rqueue: u32_at(56),
        wqueue: u32_at(60),
        ino: u64::from(u32_at(68)),
    })
}

/// `pid`'s socket `fd`, here (the same socket).
fn duplicate(pid: i32, fd: i32) -> Result<OwnedFd, InetSocketsError> {
    crate::fds::pidfd_getfd(pid, fd).map_err(|e| InetSocketsError::Fd {
        pid,
        fd,
        what: "pidfd_getfd",
        source: std::io::Error::other(e.to_string()),
    })
}

/// A socket of `pid` that sock_diag does not list (`fd`, inode `ino`): a
/// TCP or UDP socket never bound (the kernel hashes a socket when it is
/// bound or connected), told by SO_DOMAIN and SO_PROTOCOL on a duplicate.
/// None if it is of another kind.
pub fn unlisted(pid: i32, fd: i32, ino: u64) -> Result<Option<InetSocket>, InetSocketsError> {
    let err = |what: &'static str| {
        move |source| InetSocketsError::Fd {
            pid,
            fd,
            what,
            source,
        }
    };
    let dup = duplicate(pid, fd)?;
    let d = dup.as_raw_fd();
    let domain =
        crate::sockopt::get_int(d, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(err("SO_DOMAIN"))?;
    let protocol = crate::sockopt::get_int(d, libc::SOL_SOCKET, libc::SO_PROTOCOL)
        .map_err(err("SO_PROTOCOL"))?;
    let (family, any) = match domain {
        libc::AF_INET => (INET, SocketAddr::from(([0, 0, 0, 0], 0))),
        libc::AF_INET6 => (INET6, SocketAddr::from(([0u16; 8], 0))),
        _ => return Ok(None),
    };
    let protocol = match protocol {
        libc::IPPROTO_TCP => TCP,
        libc::IPPROTO_UDP => UDP,
        _ => return Ok(None),
    };
    Ok(Some(InetSocket {
        ino,
        family,
        protocol,
        state: TCP_CLOSE,
        local: any,
        remote: any,
        rqueue: 0,
        wqueue: 0,
    }))
}

/// The options of `pid`'s socket `fd` (read through a duplicate).
pub fn options(pid: i32, fd: i32, s: &InetSocket) -> Result<SocketOptions, InetSocketsError> {
    let err = |what: &'static str| {
        move |source| InetSocketsError::Fd {
            pid,
            fd,
            what,
            source,
        }
    };
    let dup = duplicate(pid, fd)?;
    let d = dup.as_raw_fd();
    let on = |level, opt, what| {
        crate::sockopt::get_int(d, level, opt)
            .map(|v| v != 0)
            .map_err(err(what))
    };
    let mut dev = [0u8; 16];
    let mut len: libc::socklen_t = 16;
    // SAFETY: getsockopt into a local buffer of IFNAMSIZ.
    let r = unsafe {
        libc::getsockopt(
            d,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_mut_ptr().cast(),
            &mut len,
        )
    };
    Ok(SocketOptions {
        reuseaddr: on(libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?,
        reuseport: on(libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT")?,
        keepalive: on(libc::SOL_SOCKET, libc::SO_KEEPALIVE, "SO_KEEPALIVE")?,
        nodelay: s.protocol == TCP && on(libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY")?,
        v6only: s.family == INET6 && on(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")?,
        bound_to_device: r == 0 && len > 0 && dev[0] != 0,
    })
}

/// A socket made here again: `family`, `protocol`, the options, bound to
/// `addr` unless its port is 0 and its address unspecified, listening with
/// `backlog` if given. Close-on-exec.
pub fn make(
    family: u8,
    protocol: u8,
    addr: SocketAddr,
    opts: SocketOptions,
    backlog: Option<i32>,
) -> std::io::Result<OwnedFd> {
    let ty = if protocol == TCP {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: socket(2) with integer arguments.
    let fd = unsafe { libc::socket(i32::from(family), ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd of ours.
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    let fd = s.as_raw_fd();
    crate::sockopt::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        i32::from(opts.reuseaddr),
    )?;
    crate::sockopt::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEPORT,
        i32::from(opts.reuseport),
    )?;
    crate::sockopt::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        i32::from(opts.keepalive),
    )?;
    if protocol == TCP {
        crate::sockopt::set_int(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            i32::from(opts.nodelay),
        )?;
    }
    if family == INET6 {
        crate::sockopt::set_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            i32::from(opts.v6only),
        )?;
    }
    if addr.port() != 0 || !addr.ip().is_unspecified() {
        let (sa, len) = crate::sockopt::sockaddr(addr);
        // SAFETY: bind with a sockaddr_storage of the given length.
        if unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if let Some(b) = backlog {
        // SAFETY: listen on our socket.
        if unsafe { libc::listen(fd, b) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use std::os::unix::fs::MetadataExt;

    fn ino(fd: i32) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino()
    }

    #[test]
    fn a_listener_is_listed_with_its_address_and_backlog_and_made_again() {
        let l = make(
            INET,
            TCP,
            "127.0.0.1:0".parse().unwrap(),
            SocketOptions {
                reuseaddr: true,
                nodelay: true,
                ..Default::default()
            },
            Some(17),
        )
        .unwrap();
        let all = all().unwrap();
        let s = &all[&ino(l.as_raw_fd())];
        assert_eq!((s.family, s.protocol, s.state), (INET, TCP, TCP_LISTEN));
        assert_eq!(s.local.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_ne!(s.local.port(), 0);
        assert_eq!((s.rqueue, s.wqueue), (0, 17));
        let o = options(std::process::id() as i32, l.as_raw_fd(), s).unwrap();
        assert!(
            o.reuseaddr && o.nodelay && !o.reuseport && !o.bound_to_device,
            "{o:?}"
        );
        // A connection waiting shows in rqueue.
        let _c = std::net::TcpStream::connect(s.local).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(super::all().unwrap()[&s.ino].rqueue, 1);
    }

    #[test]
    fn udp_and_ipv6_sockets_are_listed() {
        let u = make(
            INET6,
            UDP,
            "[::1]:0".parse().unwrap(),
            SocketOptions {
                v6only: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let s = &all().unwrap()[&ino(u.as_raw_fd())];
        assert_eq!((s.family, s.protocol, s.state), (INET6, UDP, TCP_CLOSE));
        assert_eq!(s.local.ip(), "::1".parse::<IpAddr>().unwrap());
        let o = options(std::process::id() as i32, u.as_raw_fd(), s).unwrap();
        assert!(o.v6only, "{o:?}");
    }
}
