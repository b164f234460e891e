//! `ck_unix --out FILE [--break]`: unix socket pairs (protocol:
//! `tern_tests::ck`). Single-threaded.
//!
//! Setup: three socketpairs, with data queued both ways and left unread:
//! - S1 (SOCK_STREAM): 5000 pattern bytes sent from A to B, 3000 from B to
//!   A; A is O_NONBLOCK and has a dup A2;
//! - S2 (SOCK_DGRAM): "m1", "message two" and 2000 pattern bytes sent from
//!   A to B, "x" from B to A;
//! - S3 (SOCK_SEQPACKET): "p1" and "p22" sent from B to A, then B shut
//!   down for writing.
//!
//! On SIGTERM it checks: each socket's type and F_GETFL as at `ready`; A2
//! is A (kcmp); every queued byte and message, in order and with its
//! boundaries, then nothing more (S3's A then reads end-of-file); a new
//! message each way on every pair arrives; S3's B cannot send (EPIPE).
//!
//! `--break`: right after `ready`, S2's B reads its first message.

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
    Ok(Fds {
        s1a,
        s1a2,
        s1b,
        s2a,
        s2b,
        s3a,
        s3b,
    })
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
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut bad = Vec::new();
    check(&f, &named, &mut bad);
    ck::finish(&out, &bad);
}
