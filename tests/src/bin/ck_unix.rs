//! `ck_unix --out FILE [--break]`: unix socket pairs (protocol:
//! `tern_tests::ck`). Single-threaded.
//!
//! Setup: three socketpairs, with data queued both ways and left unread:
//! - S1 (SOCK_STREAM): 5000 pattern bytes sent from A to B, 3000 from B to
//!   A; A is O_NONBLOCK and has a dup A2;
//! - S2 (SOCK_DGRAM): "m1", "message two" and 2000 pattern bytes sent from
//!   A to B, "x" from B to A;
//! - S3 (SOCK_SEQPACKET): "p1" and "p22" sent from B to A, then B shut
//!   down for writing;
//! - L1: a stream socket listening on `$TMPDIR/ck_unix.PID/l1.sock`
//!   (backlog 7, its file mode 0640), and a connection to it: the client
//!   C1 sent "hello", the accepted A1 sent "world", both unread;
//! - L2: a seqpacket socket listening on the abstract name
//!   `@ck_unix.PID`, no connection;
//! - G1: a datagram socket bound to `$TMPDIR/ck_unix.PID/g1.sock`,
//!   nothing queued, and D1, an unnamed datagram socket connected to it;
//! - U1: a stream socket neither bound nor connected.
//!
//! On SIGTERM it checks: each socket's type and F_GETFL as at `ready`; A2
//! is A (kcmp); every queued byte and message, in order and with its
//! boundaries, then nothing more (S3's A then reads end-of-file); a new
//! message each way on every pair arrives; S3's B cannot send (EPIPE);
//! L1 and L2 listen under their names (L1's file 0640), accept a new
//! connection and talk on it; A1 is named as L1, C1's peer is L1's name,
//! their bytes arrive, then a new message each way; G1 receives a
//! datagram sent to its path, and one D1 sends (D1's peer is G1's path);
//! U1 has no name and is not connected.
//!
//! `--break`: right after `ready`, S2's B reads its first message and L1's
//! socket file is removed.

use std::time::Duration;

use tern_tests::ck;

const KCMP_FILE: libc::c_long = 0;

fn err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i % 251).to_le_bytes()[0]
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

fn pair(ty: i32) -> Result<(i32, i32), String> {
    let mut sv = [-1; 2];
    // SAFETY: socketpair into a local array.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, sv.as_mut_ptr()) } != 0 {
        return Err(format!("socketpair({ty}): {}", err()));
    }
    Ok((sv[0], sv[1]))
}

fn send(fd: i32, b: &[u8]) -> Result<(), String> {
    // SAFETY: send from a live buffer.
    let n = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
    if n != b.len() as isize {
        return Err(format!(
            "send of {} bytes on fd {fd}: {n} ({})",
            b.len(),
            err()
        ));
    }
    Ok(())
}

/// One non-blocking recv: Some(bytes) (empty at end-of-file), None on
/// EAGAIN.
fn recv(fd: i32) -> Result<Option<Vec<u8>>, String> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: recv into a local buffer.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        if err().raw_os_error() == Some(libc::EAGAIN) {
            return Ok(None);
        }
        return Err(format!("recv on fd {fd}: {}", err()));
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

fn getfl(fd: i32) -> i32 {
    // SAFETY: fcntl on an fd number.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

fn sock_type(fd: i32) -> i32 {
    let mut v: libc::c_int = -1;
    let mut len: libc::socklen_t = 4;
    // SAFETY: getsockopt into a local int.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    v
}

struct Fds {
    dir: String,
    l1: i32,
    c1: i32,
    a1: i32,
    l2: i32,
    g1: i32,
    d1: i32,
    u1: i32,
    s1a: i32,
    s1a2: i32,
    s1b: i32,
    s2a: i32,
    s2b: i32,
    s3a: i32,
    s3b: i32,
}

fn setup() -> Result<Fds, String> {
    let (s1a, s1b) = pair(libc::SOCK_STREAM | libc::SOCK_CLOEXEC)?;
    send(s1a, &pattern(1, 5000))?;
    send(s1b, &pattern(2, 3000))?;
    // SAFETY: fcntl and dup on our own fds.
    let s1a2 = unsafe {
        libc::fcntl(s1a, libc::F_SETFL, getfl(s1a) | libc::O_NONBLOCK);
        libc::dup(s1a)
    };
    let (s2a, s2b) = pair(libc::SOCK_DGRAM)?;
    send(s2a, b"m1")?;
    send(s2a, b"message two")?;
    send(s2a, &pattern(3, 2000))?;
    send(s2b, b"x")?;
    let (s3a, s3b) = pair(libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC)?;
    send(s3b, b"p1")?;
    send(s3b, b"p22")?;
    // SAFETY: shutdown of our own socket.
    if unsafe { libc::shutdown(s3b, libc::SHUT_WR) } != 0 {
        return Err(format!("shutdown: {}", err()));
    }
    let dir = std::env::temp_dir()
        .join(format!("ck_unix.{}", std::process::id()))
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let l1_path = format!("{dir}/l1.sock");
    let l1 = bound(libc::SOCK_STREAM, l1_path.as_bytes())?;
    // SAFETY: listen on our socket.
    if unsafe { libc::listen(l1, 7) } != 0 {
        return Err(format!("listen: {}", err()));
    }
    std::fs::set_permissions(
        &l1_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .map_err(|e| format!("{l1_path}: {e}"))?;
    let c1 = connect(libc::SOCK_STREAM, l1_path.as_bytes())?;
    // SAFETY: accept on our listener.
    let a1 = unsafe { libc::accept(l1, std::ptr::null_mut(), std::ptr::null_mut()) };
    if a1 < 0 {
        return Err(format!("accept: {}", err()));
    }
    send(c1, b"hello")?;
    send(a1, b"world")?;
    let l2 = bound(libc::SOCK_SEQPACKET, &abstract_name())?;
    // SAFETY: listen on our socket.
    if unsafe { libc::listen(l2, 3) } != 0 {
        return Err(format!("listen: {}", err()));
    }
    let g1 = bound(libc::SOCK_DGRAM, format!("{dir}/g1.sock").as_bytes())?;
    let d1 = connect(libc::SOCK_DGRAM, format!("{dir}/g1.sock").as_bytes())?;
    // SAFETY: socket(2).
    let u1 = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    Ok(Fds {
        dir,
        l1,
        c1,
        a1,
        l2,
        g1,
        d1,
        u1,
        s1a,
        s1a2,
        s1b,
        s2a,
        s2b,
        s3a,
        s3b,
    })
}

fn abstract_name() -> Vec<u8> {
    let mut n = vec![0u8];
    n.extend_from_slice(format!("ck_unix.{}", std::process::id()).as_bytes());
    n
}

fn addr(name: &[u8]) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (d, s) in a.sun_path.iter_mut().zip(name) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    (a, libc::socklen_t::try_from(2 + name.len()).unwrap_or(0))
}

fn bound(ty: i32, name: &[u8]) -> Result<i32, String> {
    // SAFETY: socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
    let (a, len) = addr(name);
    // SAFETY: bind with a sockaddr_un of `len` bytes.
    if fd < 0 || unsafe { libc::bind(fd, (&raw const a).cast(), len) } != 0 {
        return Err(format!(
            "bind {:?}: {}",
            String::from_utf8_lossy(name),
            err()
        ));
    }
    Ok(fd)
}

fn connect(ty: i32, name: &[u8]) -> Result<i32, String> {
    // SAFETY: socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
    let (a, len) = addr(name);
    // SAFETY: connect with a sockaddr_un of `len` bytes.
    if fd < 0 || unsafe { libc::connect(fd, (&raw const a).cast(), len) } != 0 {
        return Err(format!(
            "connect {:?}: {}",
            String::from_utf8_lossy(name),
            err()
        ));
    }
    Ok(fd)
}

/// getsockname (`peer`: getpeername) of `fd`: the name's bytes.
fn name_of(fd: i32, peer: bool) -> Vec<u8> {
    // SAFETY: sockaddr_un is plain data.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(0);
    // SAFETY: into a local sockaddr_un of `len` bytes.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, (&raw mut a).cast(), &mut len)
        } else {
            libc::getsockname(fd, (&raw mut a).cast(), &mut len)
        }
    };
    if r != 0 || len < 2 {
        return b"?".to_vec();
    }
    let n = (len as usize - 2).min(a.sun_path.len());
    let mut out: Vec<u8> = a.sun_path[..n]
        .iter()
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    // A path's name ends at its NUL.
    if out.first() != Some(&0)
        && let Some(z) = out.iter().position(|&b| b == 0)
    {
        out.truncate(z);
    }
    out
}

fn sockopt(fd: i32, opt: i32) -> i32 {
    let mut v: libc::c_int = -1;
    let mut len: libc::socklen_t = 4;
    // SAFETY: getsockopt into a local int.
    unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    v
}

/// L1, L2, A1/C1, G1, U1 as `ready` left them.
fn check_named(f: &Fds, bad: &mut Vec<String>) {
    let l1_path = format!("{}/l1.sock", f.dir);
    let g1_path = format!("{}/g1.sock", f.dir);
    for (n, fd, want, listening) in [
        ("L1", f.l1, l1_path.as_bytes().to_vec(), 1),
        ("L2", f.l2, abstract_name(), 1),
        ("G1", f.g1, g1_path.as_bytes().to_vec(), 0),
        ("A1", f.a1, l1_path.as_bytes().to_vec(), 0),
        ("U1", f.u1, Vec::new(), 0),
    ] {
        let got = name_of(fd, false);
        if got != want {
            bad.push(format!(
                "{n} (fd {fd}): named {:?}, expected {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            ));
        }
        if sockopt(fd, libc::SO_ACCEPTCONN) != listening {
            bad.push(format!(
                "{n} (fd {fd}): SO_ACCEPTCONN {}",
                sockopt(fd, libc::SO_ACCEPTCONN)
            ));
        }
    }
    let peer = name_of(f.c1, true);
    if peer != l1_path.as_bytes() {
        bad.push(format!(
            "C1: peer {:?}, expected L1's name",
            String::from_utf8_lossy(&peer)
        ));
    }
    if sockopt(f.u1, libc::SO_TYPE) != libc::SOCK_STREAM || name_of(f.u1, true) != b"?" {
        bad.push("U1: not an unconnected stream socket".into());
    }
    match std::fs::metadata(&l1_path) {
        Ok(m) if std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777 == 0o640 => {}
        Ok(m) => bad.push(format!(
            "L1's file: mode {:o}",
            std::os::unix::fs::PermissionsExt::mode(&m.permissions())
        )),
        Err(e) => bad.push(format!("L1's file {l1_path}: {e}")),
    }
    let mut expect = |what: &str, got: Result<Option<Vec<u8>>, String>, want: &[u8]| {
        if !matches!(&got, Ok(Some(m)) if m == want) {
            bad.push(format!("{what}: {got:?}"));
        }
    };
    expect("A1 (from C1)", recv(f.a1), b"hello");
    expect("C1 (from A1)", recv(f.c1), b"world");
    let _ = send(f.c1, b"again");
    std::thread::sleep(Duration::from_millis(5));
    expect("A1 (a new message from C1)", recv(f.a1), b"again");
    // The listeners take new connections.
    for (n, l, ty, name) in [
        ("L1", f.l1, libc::SOCK_STREAM, l1_path.as_bytes().to_vec()),
        ("L2", f.l2, libc::SOCK_SEQPACKET, abstract_name()),
    ] {
        let r = connect(ty, &name).and_then(|c| {
            // SAFETY: accept on our listener (the connection is queued).
            let s = unsafe {
                libc::accept4(
                    l,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK,
                )
            };
            if s < 0 {
                return Err(format!("accept: {}", err()));
            }
            send(c, b"new")?;
            std::thread::sleep(Duration::from_millis(5));
            recv(s)
        });
        expect(&format!("{n}: a new connection"), r, b"new");
    }
    // G1 receives at its path.
    let r = (|| {
        // SAFETY: socket(2).
        let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0) };
        let (a, len) = addr(g1_path.as_bytes());
        // SAFETY: sendto with a sockaddr_un of `len` bytes.
        let n = unsafe {
            libc::sendto(
                s,
                b"dgram".as_ptr().cast(),
                5,
                0,
                (&raw const a).cast(),
                len,
            )
        };
        if n != 5 {
            return Err(format!("sendto {g1_path}: {}", err()));
        }
        std::thread::sleep(Duration::from_millis(5));
        recv(f.g1)
    })();
    expect("G1: a datagram to its path", r, b"dgram");
    let peer = name_of(f.d1, true);
    let r = if peer != g1_path.as_bytes() {
        Err(format!(
            "D1: peer {:?}, expected G1's path",
            String::from_utf8_lossy(&peer)
        ))
    } else {
        send(f.d1, b"from D1").and_then(|()| {
            std::thread::sleep(Duration::from_millis(5));
            recv(f.g1)
        })
    };
    expect("G1: a datagram from D1", r, b"from D1");
}

/// Everything queued on `fd`, message by message, until EAGAIN (or
/// end-of-file, noted as an empty message last).
fn drain(fd: i32) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while let Some(m) = recv(fd)? {
        let eof = m.is_empty();
        out.push(m);
        if eof {
            break;
        }
    }
    Ok(out)
}

fn check(f: &Fds, named: &[(&str, i32, i32, i32)], bad: &mut Vec<String>) {
    check_named(f, bad);
    for &(n, fd, ty, fl) in named {
        if sock_type(fd) != ty || getfl(fd) != fl {
            bad.push(format!(
                "{n} (fd {fd}): type {} flags {:#x}, expected type {ty} flags {fl:#x}",
                sock_type(fd),
                getfl(fd)
            ));
        }
    }
    let pid = std::process::id() as libc::c_long;
    // SAFETY: kcmp of two of our own fds.
    if unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, f.s1a, f.s1a2) } != 0 {
        bad.push("S1 A2 is not the same open file as A".into());
    }
    let stream = |fd: i32| -> Result<Vec<u8>, String> { Ok(drain(fd)?.concat()) };
    let mut expect = |what: &str, got: Result<Vec<Vec<u8>>, String>, want: Vec<Vec<u8>>| match got {
        Ok(g) if g == want => {}
        Ok(g) => bad.push(format!(
            "{what}: read {:?}, expected {:?}",
            g.iter().map(Vec::len).collect::<Vec<_>>(),
            want.iter().map(Vec::len).collect::<Vec<_>>()
        )),
        Err(e) => bad.push(format!("{what}: {e}")),
    };
    expect(
        "S1 B (stream from A)",
        stream(f.s1b).map(|v| vec![v]),
        vec![pattern(1, 5000)],
    );
    expect(
        "S1 A (stream from B)",
        stream(f.s1a).map(|v| vec![v]),
        vec![pattern(2, 3000)],
    );
    expect(
        "S2 B (datagrams from A)",
        drain(f.s2b),
        vec![b"m1".to_vec(), b"message two".to_vec(), pattern(3, 2000)],
    );
    expect("S2 A (datagram from B)", drain(f.s2a), vec![b"x".to_vec()]);
    expect(
        "S3 A (seqpacket from B, then its shutdown)",
        drain(f.s3a),
        vec![b"p1".to_vec(), b"p22".to_vec(), vec![]],
    );
    // Still connected, both ways.
    for (n, from, to) in [
        ("S1 A->B", f.s1a, f.s1b),
        ("S1 B->A", f.s1b, f.s1a),
        ("S2 A->B", f.s2a, f.s2b),
        ("S2 B->A", f.s2b, f.s2a),
        ("S3 A->B", f.s3a, f.s3b),
    ] {
        let r = send(from, b"ping").and_then(|_| {
            std::thread::sleep(Duration::from_millis(5));
            recv(to)
        });
        if !matches!(&r, Ok(Some(m)) if m == b"ping") {
            bad.push(format!("{n}: a new message: {r:?}"));
        }
    }
    // SAFETY: send from a constant buffer.
    let n = unsafe { libc::send(f.s3b, b"no".as_ptr().cast(), 2, libc::MSG_NOSIGNAL) };
    if n >= 0 || err().raw_os_error() != Some(libc::EPIPE) {
        bad.push(format!(
            "S3 B (shut down for writing): send gave {n} ({})",
            err()
        ));
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
    let named: Vec<(&str, i32, i32, i32)> = [
        ("S1 A", f.s1a, libc::SOCK_STREAM),
        ("S1 A2", f.s1a2, libc::SOCK_STREAM),
        ("S1 B", f.s1b, libc::SOCK_STREAM),
        ("S2 A", f.s2a, libc::SOCK_DGRAM),
        ("S2 B", f.s2b, libc::SOCK_DGRAM),
        ("S3 A", f.s3a, libc::SOCK_SEQPACKET),
        ("S3 B", f.s3b, libc::SOCK_SEQPACKET),
    ]
    .iter()
    .map(|&(n, fd, ty)| (n, fd, ty, getfl(fd)))
    .collect();
    ck::report(&out, &format!("ready {}", std::process::id()));
    if broken {
        let _ = recv(f.s2b);
        let _ = std::fs::remove_file(format!("{}/l1.sock", f.dir));
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut bad = Vec::new();
    check(&f, &named, &mut bad);
    let _ = std::fs::remove_dir_all(&f.dir);
    ck::finish(&out, &bad);
}
