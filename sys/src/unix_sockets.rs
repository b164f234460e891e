//! Unix domain sockets: what `sock_diag(7)` says of each (type, state,
//! peer, bound name, shutdown) and the messages queued to one, copied
//! without consuming them.
//!
//! The sockets are listed with one `sock_diag` dump request for `AF_UNIX`
//! (include/uapi/linux/unix_diag.h, see [`crate::sock_diag`]), which sees the sockets of
//! tern's network namespace: a process in another one is refused before
//! (see `tracker::restorable`).
//!
//! A queue is read through a duplicate of the socket (`pidfd_getfd`), the
//! same socket: `SO_PEEK_OFF` set to 0 makes each `MSG_PEEK` read on from
//! where the last one stopped (a whole datagram at a time on datagram and
//! seqpacket sockets), and is put back as it was after. A message with
//! ancillary data (fds or credentials in flight) is reported, its fds
//! closed at once (a peek installs them here).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `udiag_show` bits and attribute types (include/uapi/linux/unix_diag.h).
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_VFS: u32 = 0x2;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
/// `sk_shutdown` bits: RCV_SHUTDOWN, SEND_SHUTDOWN (include/net/sock.h).
pub const RCV_SHUTDOWN: u8 = 1;
pub const SEND_SHUTDOWN: u8 = 2;
/// `TCP_ESTABLISHED`, the state of a connected unix socket.
pub const STATE_CONNECTED: u8 = 1;
/// `TCP_LISTEN`, a listening one.
pub const STATE_LISTEN: u8 = 10;
/// The longest name `sockaddr_un` holds.
pub const MAX_NAME: usize = 108;
/// `AF_UNIX` (1) as sock_diag's one-byte family field.
const AF_UNIX_U8: u8 = 1;
const _: () = assert!(libc::AF_UNIX == AF_UNIX_U8 as i32);
/// Largest message tern copies out of a queue.
const MAX_MESSAGE: usize = 4 << 20;

/// One unix socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    pub ino: u64,
    /// SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5.
    pub sock_type: u8,
    /// TCP_ESTABLISHED (1) when connected, TCP_LISTEN (10), TCP_CLOSE (7).
    pub state: u8,
    /// The inode of the socket at the other end, if connected.
    pub peer: Option<u64>,
    /// The address it is bound to (a path, or `\0` and an abstract name).
    pub name: Option<Vec<u8>>,
    /// Bytes (stream, seqpacket) or the first datagram's length queued to
    /// be read; for a listener, the connections waiting to be accepted.
    pub rqueue: u32,
    /// For a listener, its backlog.
    pub wqueue: u32,
    /// For a socket bound to a path: the socket file's (device, inode),
    /// as `stat` gives them.
    pub file: Option<(u64, u64)>,
    /// RCV_SHUTDOWN | SEND_SHUTDOWN.
    pub shutdown: u8,
}

/// What is queued to be read from one socket, message by message (a
/// stream's bytes are one message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queue {
    pub messages: Vec<Vec<u8>>,
    /// A message carries ancillary data (fds, credentials).
    pub ancillary: bool,
    /// A datagram of no bytes is queued (what follows it is not read).
    pub empty_datagram: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UnixSocketsError {
    #[error("sock_diag (NETLINK_SOCK_DIAG) for unix sockets: {what}: {source}")]
    Diag {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("sock_diag answered with a malformed message ({what})")]
    Format { what: &'static str },
    #[error("fd {fd} of PID {pid}: {what}: {source}")]
    Fd {
        pid: i32,
        fd: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "fd {fd} of PID {pid}: a queued message of more than {MAX_MESSAGE} bytes (tern copies up to that)"
    )]
    TooLarge { pid: i32, fd: i32 },
}

/// Every unix socket of tern's network namespace, by inode.
pub fn all() -> Result<HashMap<u64, UnixSocket>, UnixSocketsError> {
    // struct unix_diag_req (24 bytes).
    let mut req = Vec::with_capacity(24);
    req.push(AF_UNIX_U8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
    req.extend_from_slice(
        &(UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes(),
    );
    req.extend_from_slice(&[0xff; 8]); // udiag_cookie: none
    let mut out = HashMap::new();
    for m in crate::sock_diag::dump(&req)
        .map_err(|(what, source)| UnixSocketsError::Diag { what, source })?
    {
        let s = parse_msg(&m)?;
        out.insert(s.ino, s);
    }
    Ok(out)
}

/// struct unix_diag_msg (16 bytes) and its attributes.
fn parse_msg(b: &[u8]) -> Result<UnixSocket, UnixSocketsError> {
    if b.len() < 16 {
        return Err(UnixSocketsError::Format {
            what: "unix_diag_msg",
        });
    }
    let mut s = UnixSocket {
        sock_type: b[1],
        state: b[2],
        ino: u64::from(u32::from_ne_bytes(b[4..8].try_into().unwrap_or_default())),
        peer: None,
        name: None,
        rqueue: 0,
        wqueue: 0,
        file: None,
        shutdown: 0,
    };
    let mut a = &b[16..];
    while a.len() >= 4 {
        let len = u16::from_ne_bytes([a[0], a[1]]) as usize;
        let kind = u16::from_ne_bytes([a[2], a[3]]) & 0x3fff;
        if len < 4 || len > a.len() {
            return Err(UnixSocketsError::Format { what: "rtattr" });
        }
        let v = &a[4..len];
        match kind {
            UNIX_DIAG_NAME => {
                // A path as the kernel keeps it: up to its NUL (an
                // abstract name, from its leading NUL, is all bytes).
                let n = match v.first() {
                    Some(0) | None => v,
                    _ => &v[..v.iter().position(|&b| b == 0).unwrap_or(v.len())],
                };
                s.name = Some(n.to_vec());
            }
            UNIX_DIAG_PEER if v.len() >= 4 => {
                let p = u32::from_ne_bytes(v[..4].try_into().unwrap_or_default());
                s.peer = (p != 0).then_some(u64::from(p));
            }
            UNIX_DIAG_RQLEN if v.len() >= 8 => {
                s.rqueue = u32::from_ne_bytes(v[..4].try_into().unwrap_or_default());
                s.wqueue = u32::from_ne_bytes(v[4..8].try_into().unwrap_or_default());
            }
            UNIX_DIAG_VFS if v.len() >= 8 => {
                // struct unix_diag_vfs: inode, then the kernel's dev_t
                // (major << 20 | minor).
                let ino = u32::from_ne_bytes(v[..4].try_into().unwrap_or_default());
                let dev = u32::from_ne_bytes(v[4..8].try_into().unwrap_or_default());
                s.file = Some((libc::makedev(dev >> 20, dev & 0xfffff), u64::from(ino)));
            }
            UNIX_DIAG_SHUTDOWN if !v.is_empty() => s.shutdown = v[0],
            _ => {}
        }
        a = &a[len.next_multiple_of(4).min(a.len())..];
    }
    Ok(s)
}

fn sockopt_int(fd: i32, opt: i32) -> std::io::Result<i32> {
    crate::sockopt::get_int(fd, libc::SOL_SOCKET, opt)
}

fn set_sockopt_int(fd: i32, opt: i32, v: i32) -> std::io::Result<()> {
    crate::sockopt::set_int(fd, libc::SOL_SOCKET, opt, v)
}

/// The messages queued to be read from `pid`'s socket `fd` (which is `u`),
/// left queued.
pub fn peek_queue(pid: i32, fd: i32, u: &UnixSocket) -> Result<Queue, UnixSocketsError> {
    let err = |what: &'static str| {
        move |source| UnixSocketsError::Fd {
            pid,
            fd,
            what,
            source,
        }
    };
    let dup = crate::fds::pidfd_getfd(pid, fd)
        .map_err(|e| err("pidfd_getfd")(std::io::Error::other(e.to_string())))?;
    peek_own(dup.as_raw_fd(), u).map_err(|e| match e {
        PeekError::Io(what, source) => UnixSocketsError::Fd {
            pid,
            fd,
            what,
            source,
        },
        PeekError::TooLarge => UnixSocketsError::TooLarge { pid, fd },
    })
}

enum PeekError {
    Io(&'static str, std::io::Error),
    TooLarge,
}

/// [`peek_queue`] on a socket of this process.
fn peek_own(s: i32, u: &UnixSocket) -> Result<Queue, PeekError> {
    let before = sockopt_int(s, libc::SO_PEEK_OFF).map_err(|e| PeekError::Io("SO_PEEK_OFF", e))?;
    set_sockopt_int(s, libc::SO_PEEK_OFF, 0).map_err(|e| PeekError::Io("SO_PEEK_OFF", e))?;
    let r = peek_all(s, u);
    let back = set_sockopt_int(s, libc::SO_PEEK_OFF, before);
    let q = r?;
    back.map_err(|e| PeekError::Io("SO_PEEK_OFF back", e))?;
    Ok(q)
}

fn peek_all(s: i32, u: &UnixSocket) -> Result<Queue, PeekError> {
    let stream = i32::from(u.sock_type) == libc::SOCK_STREAM;
    let seqpacket = i32::from(u.sock_type) == libc::SOCK_SEQPACKET;
    let read_shut = u.shutdown & RCV_SHUTDOWN != 0;
    let mut q = Queue::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut cbuf = [0u8; 512];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: a zeroed msghdr pointing at our buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.len() as _;
        // SAFETY: recvmsg into our buffers.
        let n = unsafe {
            libc::recvmsg(
                s,
                &mut msg,
                libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                break;
            }
            return Err(PeekError::Io("recvmsg(MSG_PEEK)", e));
        }
        let n = n as usize;
        if msg.msg_controllen > 0 {
            q.ancillary = true;
            close_passed_fds(&msg);
        }
        let so_far: usize = q.messages.iter().map(Vec::len).sum();
        // End-of-file once the read side is shut: always on a stream, on
        // seqpacket once every queued byte was seen, on datagrams taken
        // as such (an empty datagram there reads the same).
        if n == 0 && (stream || (read_shut && (!seqpacket || so_far as u64 >= u64::from(u.rqueue))))
        {
            break;
        }
        if n == 0 {
            // A datagram of no bytes: the peek offset cannot move past it,
            // so nothing queued behind it can be seen.
            q.empty_datagram = true;
            break;
        }
        if n > buf.len() || msg.msg_flags & libc::MSG_TRUNC != 0 {
            if n > MAX_MESSAGE {
                return Err(PeekError::TooLarge);
            }
            // A datagram longer than the buffer: again, whole. The peek
            // offset moved on by what was copied: back by that.
            let copied = i32::try_from(buf.len()).unwrap_or(i32::MAX);
            buf.resize(n, 0);
            let off =
                sockopt_int(s, libc::SO_PEEK_OFF).map_err(|e| PeekError::Io("SO_PEEK_OFF", e))?;
            set_sockopt_int(s, libc::SO_PEEK_OFF, off.saturating_sub(copied))
                .map_err(|e| PeekError::Io("SO_PEEK_OFF", e))?;
            continue;
        }
        if stream {
            match q.messages.first_mut() {
                Some(m) => m.extend_from_slice(&buf[..n]),
                None => q.messages.push(buf[..n].to_vec()),
            }
        } else {
            q.messages.push(buf[..n].to_vec());
        }
        if q.messages.iter().map(Vec::len).sum::<usize>() > 64 << 20 {
            return Err(PeekError::TooLarge);
        }
    }
    Ok(q)
}

/// Fds a peek installed here (SCM_RIGHTS): closed.
fn close_passed_fds(msg: &libc::msghdr) {
    // SAFETY: walking the control buffer the kernel filled, with the libc
    // CMSG macros and its lengths.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..n {
                    libc::close(data.add(i).read_unaligned());
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
}

/// A new connected pair of `sock_type` (close-on-exec, non-blocking).
pub fn pair(sock_type: u8) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [-1; 2];
    // SAFETY: socketpair into a local array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            i32::from(sock_type) | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            sv.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two new fds of ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// A socket name as messages show it (`@name` for an abstract one).
pub fn shown_name(n: &[u8]) -> String {
    if n.first() == Some(&0) {
        format!("@{}", String::from_utf8_lossy(&n[1..]))
    } else {
        String::from_utf8_lossy(n).into_owned()
    }
}

/// `name` (a path, or `\0` and an abstract name) as a `sockaddr_un`.
fn sockaddr_un(name: &[u8]) -> std::io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() > MAX_NAME || a.sun_path.len() < name.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    a.sun_family = libc::sa_family_t::from(AF_UNIX_U8);
    for (d, s) in a.sun_path.iter_mut().zip(name) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + name.len();
    Ok((a, libc::socklen_t::try_from(len).unwrap_or(0)))
}

fn socket(sock_type: u8) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            i32::from(sock_type) | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new socket of `sock_type`, bound to `name` if given (a path must be
/// free: the caller removes a stale socket file first), listening with
/// `backlog` if given (close-on-exec, non-blocking).
pub fn bound(sock_type: u8, name: Option<&[u8]>, backlog: Option<i32>) -> std::io::Result<OwnedFd> {
    let s = socket(sock_type)?;
    if let Some(name) = name {
        let (a, len) = sockaddr_un(name)?;
        // SAFETY: bind with a sockaddr_un of `len` bytes.
        if unsafe { libc::bind(s.as_raw_fd(), (&raw const a).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if let Some(b) = backlog {
        // SAFETY: listen on our socket.
        if unsafe { libc::listen(s.as_raw_fd(), b) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(s)
}

/// A new unnamed socket of `sock_type` connected to `name`.
pub fn connected_to(sock_type: u8, name: &[u8]) -> std::io::Result<OwnedFd> {
    let s = socket(sock_type)?;
    let (a, len) = sockaddr_un(name)?;
    // SAFETY: connect with a sockaddr_un of `len` bytes.
    if unsafe { libc::connect(s.as_raw_fd(), (&raw const a).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s)
}

/// A connection to `listener` (bound to `name`), both ends: the client
/// (unnamed) and the accepted socket. Connections from anyone else that
/// come first are closed (the listener was just made: a client racing
/// the restore is refused and may retry).
pub fn connection(
    listener: &OwnedFd,
    sock_type: u8,
    name: &[u8],
) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let client = connected_to(sock_type, name)?;
    let me = std::process::id().cast_signed();
    for _ in 0..64 {
        // SAFETY: accept4 on our listener, no address wanted.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new fd of ours.
        let acc = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: SO_PEERCRED into a ucred of the size given.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut clen = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(0);
        // SAFETY: as above.
        let r = unsafe {
            libc::getsockopt(
                acc.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast(),
                &raw mut clen,
            )
        };
        if r == 0 && cred.pid == me {
            return Ok((client, acc));
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
}

/// Queue `messages` to be read from `receiver` by sending them from its
/// peer `sender` (non-blocking: a queue that does not fit is an error, not
/// a wait). The send buffer is raised first (SO_SNDBUFFORCE: root) to hold
/// them all.
pub fn fill(sender: &OwnedFd, messages: &[Vec<u8>]) -> std::io::Result<()> {
    let total: usize = messages.iter().map(|m| m.len() + 1024).sum();
    if total > 0 {
        let want = i32::try_from(total.saturating_mul(2)).unwrap_or(i32::MAX);
        if sockopt_int(sender.as_raw_fd(), libc::SO_SNDBUF)? < want {
            set_sockopt_int(sender.as_raw_fd(), libc::SO_SNDBUFFORCE, want)?;
        }
    }
    for m in messages {
        let mut done = 0;
        loop {
            // SAFETY: send from a live buffer.
            let n = unsafe {
                libc::send(
                    sender.as_raw_fd(),
                    m[done..].as_ptr().cast(),
                    m.len() - done,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            done += n as usize;
            if done >= m.len() {
                break;
            }
        }
    }
    Ok(())
}

/// shutdown(2) of our own socket: its reading side, its writing side.
pub fn shutdown(fd: &OwnedFd, read: bool, write: bool) -> std::io::Result<()> {
    let how = match (read, write) {
        (true, true) => libc::SHUT_RDWR,
        (true, false) => libc::SHUT_RD,
        (false, true) => libc::SHUT_WR,
        (false, false) => return Ok(()),
    };
    // SAFETY: shutdown of our own socket.
    if unsafe { libc::shutdown(fd.as_raw_fd(), how) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The queue's messages as stored in an image: each a 4-byte length
/// (little-endian) and its bytes.
pub fn encode(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        // Messages are at most MAX_MESSAGE bytes (peek_all refuses more).
        out.extend_from_slice(&u32::try_from(m.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// [`encode`]'s messages back; None if the bytes are not such a list.
pub fn decode(mut b: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        out.push(b.get(4..4 + len)?.to_vec());
        b = &b[4 + len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn pair(ty: i32) -> (OwnedFd, OwnedFd) {
        let mut sv = [-1; 2];
        // SAFETY: socketpair into a local array.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        // SAFETY: two new fds of ours.
        unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) }
    }

    fn ino(fd: &OwnedFd) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    }

    fn send(fd: &OwnedFd, b: &[u8]) {
        // SAFETY: send from a live buffer.
        let n = unsafe { libc::send(fd.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) };
        assert_eq!(n, b.len() as isize, "{}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_socketpair_is_listed_with_its_peer_and_queue() {
        let (a, b) = pair(libc::SOCK_STREAM);
        send(&b, b"hello");
        // SAFETY: shutdown of our own socket.
        unsafe { libc::shutdown(b.as_raw_fd(), libc::SHUT_WR) };
        let all = all().unwrap();
        let sa = &all[&ino(&a)];
        assert_eq!(i32::from(sa.sock_type), libc::SOCK_STREAM);
        assert_eq!(sa.state, STATE_CONNECTED);
        assert_eq!(sa.peer, Some(ino(&b)));
        assert_eq!(sa.name, None);
        assert_eq!(sa.rqueue, 5);
        assert_eq!(sa.shutdown, RCV_SHUTDOWN);
        assert_eq!(all[&ino(&b)].shutdown, SEND_SHUTDOWN);
    }

    #[test]
    fn queues_are_copied_and_left_in_place() {
        for ty in [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET] {
            let (a, b) = pair(ty);
            let big = vec![7u8; 100 * 1024];
            for m in [&b"one"[..], b"three", &big] {
                send(&b, m);
            }
            let me = std::process::id() as i32;
            let u = all().unwrap()[&ino(&a)].clone();
            let q = peek_queue(me, a.as_raw_fd(), &u).unwrap();
            let want: Vec<Vec<u8>> = if ty == libc::SOCK_STREAM {
                vec![[&b"onethree"[..], &big].concat()]
            } else {
                vec![b"one".to_vec(), b"three".to_vec(), big.clone()]
            };
            assert_eq!(q.messages.len(), want.len(), "type {ty}");
            assert!(q.messages == want, "type {ty}");
            assert!(!q.ancillary);
            // Still there, and SO_PEEK_OFF as it was (-1: off).
            assert_eq!(sockopt_int(a.as_raw_fd(), libc::SO_PEEK_OFF).unwrap(), -1);
            assert_eq!(peek_queue(me, a.as_raw_fd(), &u).unwrap(), q, "type {ty}");
            let mut buf = [0u8; 8];
            // SAFETY: recv into a local buffer.
            let n = unsafe { libc::recv(a.as_raw_fd(), buf.as_mut_ptr().cast(), 3, 0) };
            assert_eq!(&buf[..n as usize], b"one");
            assert_eq!(decode(&encode(&want)).unwrap(), want);
        }
    }

    #[test]
    fn an_fd_in_flight_is_reported() {
        let (a, b) = pair(libc::SOCK_STREAM);
        let passed = std::fs::File::open("/dev/null").unwrap();
        let fds = [passed.as_raw_fd()];
        let mut cbuf = [0u8; 64];
        let mut byte = [1u8];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: a zeroed msghdr with one SCM_RIGHTS header in our buffer.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            libc::CMSG_DATA(c).cast::<i32>().write_unaligned(fds[0]);
            assert_eq!(libc::sendmsg(b.as_raw_fd(), &msg, 0), 1);
        }
        let u = all().unwrap()[&ino(&a)].clone();
        let q = peek_queue(std::process::id() as i32, a.as_raw_fd(), &u).unwrap();
        assert!(q.ancillary);
        assert_eq!(q.messages, vec![vec![1u8]]);
    }

    #[test]
    fn a_listener_is_listed_with_its_name_backlog_and_file_and_connected_to_again() {
        use std::os::unix::fs::MetadataExt;
        const STREAM: u8 = 1;
        const SEQPACKET: u8 = 5;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let name = path.as_os_str().as_encoded_bytes().to_vec();
        let l = bound(STREAM, Some(&name), Some(9)).unwrap();
        let st = std::fs::symlink_metadata(&path).unwrap();
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
            .unwrap()
            .ino();
        let listed = all().unwrap().remove(&ino).expect("listed");
        assert_eq!(listed.state, STATE_LISTEN);
        assert_eq!(listed.name.as_deref(), Some(&name[..]), "no NUL kept");
        assert_eq!((listed.rqueue, listed.wqueue), (0, 9));
        assert_eq!(listed.file, Some((st.dev(), st.ino())));
        let (client, accepted) = connection(&l, STREAM, &name).unwrap();
        let acc_ino = std::fs::metadata(format!("/proc/self/fd/{}", accepted.as_raw_fd()))
            .unwrap()
            .ino();
        let listed = all().unwrap();
        assert_eq!(listed[&acc_ino].name.as_deref(), Some(&name[..]));
        assert_eq!(listed[&listed[&acc_ino].peer.unwrap()].name, None);
        fill(&client, &[b"to the server".to_vec()]).unwrap();
        let mut buf = [0u8; 32];
        // SAFETY: recv into a local buffer.
        let n = unsafe { libc::recv(accepted.as_raw_fd(), buf.as_mut_ptr().cast(), 32, 0) };
        assert_eq!(&buf[..n as usize], b"to the server");
        // An abstract name too; a taken one is refused.
        let abs = b"\0tern-unit-abstract".to_vec();
        let _a = bound(SEQPACKET, Some(&abs), Some(1)).unwrap();
        let e = bound(SEQPACKET, Some(&abs), Some(1)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn bad_encodings_are_refused() {
        assert_eq!(decode(&[5, 0, 0, 0, 1]), None);
        assert_eq!(decode(&[1, 0]), None);
        assert_eq!(decode(&[]), Some(vec![]));
    }
}
