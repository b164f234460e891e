//! `ck_inet --out FILE [--break]`: TCP and UDP sockets without a
//! connection (protocol: `tern_tests::ck`). Single-threaded.
//!
//! Setup: L4, a TCP listener on 127.0.0.1 (port picked by the kernel,
//! SO_REUSEADDR, TCP_NODELAY, O_NONBLOCK, backlog 7); L6, a TCP listener
//! on [::1] (IPV6_V6ONLY, SO_KEEPALIVE); U, a UDP socket bound to
//! 127.0.0.1; T, a TCP socket neither bound nor connected.
//!
//! On SIGTERM it checks: each socket's local address (getsockname), type,
//! SO_ACCEPTCONN, the options and F_GETFL as at `ready`; a connection to L4
//! and to L6 is accepted (and carries a byte); a datagram U sends itself
//! arrives; T can still connect to L4.
//!
//! `--break`: right after `ready`, L4 is closed and a new listener takes
//! its fd number on another port.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::Duration;

use tern_tests::ck;

fn err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn get(fd: i32, level: i32, opt: i32) -> i32 {
    sys::sockopt::get_int(fd, level, opt).unwrap_or(-1)
}

fn set(fd: i32, level: i32, opt: i32, v: i32) -> Result<(), String> {
    sys::sockopt::set_int(fd, level, opt, v)
        .map_err(|e| format!("setsockopt({level}, {opt}) on fd {fd}: {e}"))
}

fn getfl(fd: i32) -> i32 {
    // SAFETY: fcntl on an fd number.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

/// Everything the check compares for one socket.
fn shape(fd: i32) -> String {
    let addr = {
        // SAFETY: the fd is ours; ManuallyDrop keeps it open.
        let s = std::mem::ManuallyDrop::new(unsafe { UdpSocket::from_raw_fd(fd) });
        s.local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|e| format!("? {e}"))
    };
    format!(
        "{addr} type {} acceptconn {} reuseaddr {} keepalive {} nodelay {} v6only {} flags {:#x}",
        get(fd, libc::SOL_SOCKET, libc::SO_TYPE),
        get(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN),
        get(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR),
        get(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        get(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY),
        get(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
        getfl(fd)
    )
}

/// A TCP socket with `opts` set, bound to `addr`, listening with `backlog`.
fn listener(addr: &str, backlog: i32, opts: &[(i32, i32)]) -> Result<i32, String> {
    let a: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let fam = if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with integer arguments.
    let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", err()));
    }
    for &(level, opt) in opts {
        set(fd, level, opt, 1)?;
    }
    let (ss, len) = sys::sockopt::sockaddr(a);
    // SAFETY: bind and listen on our socket with a filled sockaddr.
    unsafe {
        if libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) != 0 {
            return Err(format!("bind {a}: {}", err()));
        }
        if libc::listen(fd, backlog) != 0 {
            return Err(format!("listen: {}", err()));
        }
    }
    Ok(fd)
}

struct Fds {
    l4: i32,
    l6: i32,
    u: i32,
    t: i32,
}

fn setup() -> Result<Fds, String> {
    let l4 = listener(
        "127.0.0.1:0",
        7,
        &[
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY),
        ],
    )?;
    // SAFETY: fcntl on our own fd.
    unsafe { libc::fcntl(l4, libc::F_SETFL, getfl(l4) | libc::O_NONBLOCK) };
    let l6 = listener(
        "[::1]:0",
        5,
        &[
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        ],
    )?;
    let u = UdpSocket::bind("127.0.0.1:0")
        .map_err(|e| format!("UDP bind: {e}"))?
        .into_raw_fd();
    // SAFETY: socket(2) with integer arguments.
    let t = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if t < 0 {
        return Err(format!("socket: {}", err()));
    }
    Ok(Fds { l4, l6, u, t })
}

fn addr_of(fd: i32) -> Result<SocketAddr, String> {
    // SAFETY: the fd is ours; ManuallyDrop keeps it open.
    let s = std::mem::ManuallyDrop::new(unsafe { UdpSocket::from_raw_fd(fd) });
    s.local_addr()
        .map_err(|e| format!("getsockname of fd {fd}: {e}"))
}

fn accepts(name: &str, fd: i32) -> Result<(), String> {
    let a = addr_of(fd)?;
    let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(2))
        .map_err(|e| format!("{name}: connect to {a}: {e}"))?;
    std::io::Write::write_all(&mut c, b"!").map_err(|e| e.to_string())?;
    // SAFETY: the fd is ours; ManuallyDrop keeps it open.
    let l = std::mem::ManuallyDrop::new(unsafe { TcpListener::from_raw_fd(fd) });
    l.set_nonblocking(false).map_err(|e| e.to_string())?;
    let (mut s, _) = l.accept().map_err(|e| format!("{name}: accept: {e}"))?;
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut s, &mut b).map_err(|e| format!("{name}: read: {e}"))?;
    Ok(())
}

fn check(f: &Fds, shapes: &[(&str, i32, String)], bad: &mut Vec<String>) {
    for (n, fd, want) in shapes {
        let got = shape(*fd);
        if &got != want {
            bad.push(format!("{n} (fd {fd}): {got}, expected {want}"));
        }
    }
    // SAFETY: fcntl on our own fd (accept below blocks).
    unsafe { libc::fcntl(f.l4, libc::F_SETFL, getfl(f.l4) & !libc::O_NONBLOCK) };
    for (n, fd) in [("L4", f.l4), ("L6", f.l6)] {
        if let Err(e) = accepts(n, fd) {
            bad.push(e);
        }
    }
    let r = (|| -> Result<(), String> {
        // SAFETY: the fd is ours; ManuallyDrop keeps it open.
        let u = std::mem::ManuallyDrop::new(unsafe { UdpSocket::from_raw_fd(f.u) });
        let a = u.local_addr().map_err(|e| e.to_string())?;
        u.send_to(b"dgram", a).map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 16];
        let (n, _) = u.recv_from(&mut b).map_err(|e| format!("recv: {e}"))?;
        if &b[..n] != b"dgram" {
            return Err(format!("received {:?}", &b[..n]));
        }
        Ok(())
    })();
    if let Err(e) = r {
        bad.push(format!("U (UDP) to itself: {e}"));
    }
    let r = (|| -> Result<(), String> {
        let a = addr_of(f.l4)?;
        let (ss, len) = sys::sockopt::sockaddr(a);
        // SAFETY: connect with a filled sockaddr.
        if unsafe { libc::connect(f.t, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
            return Err(format!("connect: {}", err()));
        }
        Ok(())
    })();
    if let Err(e) = r {
        bad.push(format!("T (unbound TCP): {e}"));
    }
}

fn main() {
    let out = ck::out_path();
    let broken = ck::break_requested();
    if let Err(e) = ck::catch_sigterm() {
        ck::finish(&out, &[format!("setup: {e}")]);
    }
    let f = match setup() {
        Ok(f) => f,
        Err(e) => ck::finish(&out, &[format!("setup: {e}")]),
    };
    let shapes: Vec<(&str, i32, String)> = [("L4", f.l4), ("L6", f.l6), ("U", f.u), ("T", f.t)]
        .iter()
        .map(|&(n, fd)| (n, fd, shape(fd)))
        .collect();
    ck::report(&out, &format!("ready {}", std::process::id()));
    if broken {
        // SAFETY: closing our own fd; the next listener takes its number.
        unsafe { libc::close(f.l4) };
        if let Ok(l) = TcpListener::bind("127.0.0.1:0") {
            let fd = l.into_raw_fd();
            // SAFETY: dup2 of our own fd.
            unsafe { libc::dup2(fd, f.l4) };
        }
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut bad = Vec::new();
    check(&f, &shapes, &mut bad);
    ck::finish(&out, &bad);
}
