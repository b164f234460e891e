//! Socket options as ints and socket addresses as the kernel takes them:
//! the small layer `unix_sockets` and `inet_sockets` share (and the
//! socket workloads of the tests).

use std::net::SocketAddr;

/// `AF_INET`/`AF_INET6` as `sa_family_t`, the sizes of `sockaddr_in`/`_in6`.
const AF_INET_T: libc::sa_family_t = 2;
const AF_INET6_T: libc::sa_family_t = 10;
const SIN_LEN: libc::socklen_t = 16;
const SIN6_LEN: libc::socklen_t = 28;
const _: () = assert!(
    libc::AF_INET == AF_INET_T as i32
        && libc::AF_INET6 == AF_INET6_T as i32
        && std::mem::size_of::<libc::sockaddr_in>() == SIN_LEN as usize
        && std::mem::size_of::<libc::sockaddr_in6>() == SIN6_LEN as usize
);
/// `sizeof(int)` as a socklen_t.
const INT_LEN: libc::socklen_t = 4;
const _: () = assert!(std::mem::size_of::<libc::c_int>() == INT_LEN as usize);

/// getsockopt(fd, level, opt) of an int option.
pub fn get_int(fd: i32, level: i32, opt: i32) -> std::io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = INT_LEN;
    // SAFETY: getsockopt into a local int.
    let r = unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut i32).cast(), &mut len) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// setsockopt(fd, level, opt, v) of an int option.
pub fn set_int(fd: i32, level: i32, opt: i32, v: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt from a local int.
    let r = unsafe { libc::setsockopt(fd, level, opt, (&v as *const i32).cast(), INT_LEN) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `a` as a `sockaddr_in`/`sockaddr_in6` in a `sockaddr_storage`, and its
/// length (for bind, connect).
pub fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed plain struct.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v) => {
            let sin = libc::sockaddr_in {
                sin_family: AF_INET_T,
                sin_port: v.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            (ss, SIN_LEN)
        }
        SocketAddr::V6(v) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: AF_INET6_T,
                sin6_port: v.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v.ip().octets(),
                },
                sin6_scope_id: v.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            (ss, SIN6_LEN)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_addresses_reach_the_kernel() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let fd = s.as_raw_fd();
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).unwrap();
        assert_eq!(
            get_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap(),
            1
        );
        // connect() to our own address through the storage: getpeername agrees.
        let me = s.local_addr().unwrap();
        let (ss, len) = sockaddr(me);
        // SAFETY: connect with a filled sockaddr of that length.
        let r = unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        assert_eq!(s.peer_addr().unwrap(), me);
        let v6: SocketAddr = "[::1]:4242".parse().unwrap();
        assert_eq!(sockaddr(v6).1, SIN6_LEN);
    }
}
