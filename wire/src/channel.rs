//! The Noise channel: `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` over a byte
//! stream (TCP). Both ends mix the pre-shared key into the first message,
//! so a peer without it fails at once; fresh ephemeral keys on both sides
//! give every connection its own session keys, so a recorded handshake
//! replayed later completes nothing, and a responder also remembers the
//! initiator keys it has seen and refuses one that comes again.
//!
//! On the wire every Noise message is a frame: a 2-byte big-endian length,
//! then that many bytes. A tern message (any length up to the receiver's
//! limit) is a 4-byte length and its bytes, cut into as many frames as it
//! takes. The handshake's two frames have a fixed size: anything else (a
//! plaintext client, another protocol) is refused at its first bytes.
//!
//! [`Channel`] is the blocking end (a restore's page fetches, the tests);
//! [`AsyncChannel`] the tokio one (servers).

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use crate::key::Key;

const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake: a peer speaking another version fails it.
const PROLOGUE: &[u8] = b"tern wire 1";
/// Both handshake messages: an ephemeral key and an empty payload's tag.
const HANDSHAKE_FRAME: usize = 32 + 16;
/// Largest Noise message, and the plaintext one carries.
const MAX_FRAME: usize = 65535;
const TAG: usize = 16;
const MAX_PLAIN: usize = MAX_FRAME - TAG;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{peer}: refused: {why}")]
    Refused { peer: String, why: String },
    #[error("{peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("{peer}: the connection was closed")]
    Closed { peer: String },
    #[error("{peer}: no progress within the deadline (the peer stopped reading or sending)")]
    TimedOut { peer: String },
    #[error("{peer}: a message of {len} bytes, more than the {max} expected here")]
    TooLarge {
        peer: String,
        len: usize,
        max: usize,
    },
    #[error(
        "{peer}: a frame failed to decrypt: the stream was altered or is not from the peer that shook hands"
    )]
    Tampered { peer: String },
    #[error("Noise: {0}")]
    Noise(String),
}

impl WireError {
    fn io(peer: &str, e: std::io::Error) -> WireError {
        use std::io::ErrorKind::{TimedOut, UnexpectedEof, WouldBlock};
        match e.kind() {
            UnexpectedEof => WireError::Closed { peer: peer.into() },
            WouldBlock | TimedOut => WireError::TimedOut { peer: peer.into() },
            _ => WireError::Io {
                peer: peer.into(),
                source: e,
            },
        }
    }

    /// The peer could not prove it holds the key, or spoke another protocol.
    pub fn is_refusal(&self) -> bool {
        matches!(self, WireError::Refused { .. })
    }
}

fn noise(e: snow::Error) -> WireError {
    WireError::Noise(e.to_string())
}

fn builder(key: &Key) -> Result<snow::Builder<'_>, WireError> {
    let params: snow::params::NoiseParams = PATTERN.parse().map_err(noise)?;
    snow::Builder::new(params)
        .prologue(PROLOGUE)
        .map_err(noise)?
        .psk(0, key.bytes())
        .map_err(noise)
}

/// Initiator keys a responder has seen: a handshake that comes again is a
/// replay. Bounded: the oldest are forgotten first (a replay of one that
/// old still completes nothing, it is only not named as such).
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: Mutex<Seen>,
}

/// The keys seen, and the order they came in.
type Seen = (HashSet<[u8; 32]>, VecDeque<[u8; 32]>);

const REPLAY_MEMORY: usize = 1 << 16;

impl ReplayGuard {
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// Whether `first` (the initiator's first handshake frame) is new.
    fn fresh(&self, first: &[u8]) -> bool {
        let mut e = [0u8; 32];
        e.copy_from_slice(&first[..32]);
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !g.0.insert(e) {
            return false;
        }
        g.1.push_back(e);
        if g.1.len() > REPLAY_MEMORY
            && let Some(old) = g.1.pop_front()
        {
            g.0.remove(&old);
        }
        true
    }
}

/// Session keys after the handshake, and the framing of messages.
struct Session {
    t: snow::TransportState,
}

impl Session {
    /// The frames (length-prefixed ciphertexts) of one message.
    fn seal(&mut self, msg: &[u8], peer: &str, max: usize) -> Result<Vec<u8>, WireError> {
        let too_large = || WireError::TooLarge {
            peer: peer.into(),
            len: msg.len(),
            max,
        };
        if msg.len() > max {
            return Err(too_large());
        }
        let len = u32::try_from(msg.len()).map_err(|_| too_large())?;
        let mut plain = Vec::with_capacity(4 + msg.len());
        plain.extend_from_slice(&len.to_be_bytes());
        plain.extend_from_slice(msg);
        let frames = plain.len().div_ceil(MAX_PLAIN);
        let mut out = Vec::with_capacity(plain.len() + frames * (2 + TAG));
        let mut buf = vec![0u8; MAX_FRAME];
        for chunk in plain.chunks(MAX_PLAIN) {
            let n = self.t.write_message(chunk, &mut buf).map_err(noise)?;
            out.extend_from_slice(
                &u16::try_from(n)
                    .map_err(|_| WireError::Noise("frame too long".into()))?
                    .to_be_bytes(),
            );
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }

    /// Decrypt one frame into `out`.
    fn open(&mut self, frame: &[u8], out: &mut Vec<u8>, peer: &str) -> Result<(), WireError> {
        let at = out.len();
        out.resize(at + frame.len(), 0);
        let n = self
            .t
            .read_message(frame, &mut out[at..])
            .map_err(|_| WireError::Tampered { peer: peer.into() })?;
        out.truncate(at + n);
        Ok(())
    }
}

/// Reassembles a message from decrypted frames: `Some` once whole.
fn message_done(plain: &[u8], peer: &str, max: usize) -> Result<Option<usize>, WireError> {
    if plain.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
    if len > max {
        return Err(WireError::TooLarge {
            peer: peer.into(),
            len,
            max,
        });
    }
    if plain.len() > 4 + len {
        return Err(WireError::Tampered { peer: peer.into() });
    }
    Ok((plain.len() == 4 + len).then_some(len))
}

fn check_first_frame(len: usize, peer: &str) -> Result<(), WireError> {
    if len != HANDSHAKE_FRAME {
        return Err(WireError::Refused {
            peer: peer.into(),
            why: format!(
                "its first frame is {len} bytes, not a tern handshake ({HANDSHAKE_FRAME}): a plaintext client or another protocol"
            ),
        });
    }
    Ok(())
}

fn wrong_key(peer: &str, side: &str) -> WireError {
    WireError::Refused {
        peer: peer.into(),
        why: format!(
            "the {side}'s handshake does not verify: it holds another key (or is not tern)"
        ),
    }
}

/// The responder's side of the handshake, both ends': check the
/// initiator's first frame (the key, a replay) and make the reply frame.
fn answer(
    first: &[u8; HANDSHAKE_FRAME],
    key: &Key,
    replay: &ReplayGuard,
    peer: &str,
) -> Result<(snow::HandshakeState, Vec<u8>), WireError> {
    let mut hs = builder(key)?.build_responder().map_err(noise)?;
    let mut buf = [0u8; 128];
    hs.read_message(first, &mut buf)
        .map_err(|_| wrong_key(peer, "client"))?;
    if !replay.fresh(first) {
        return Err(WireError::Refused {
            peer: peer.into(),
            why: "a handshake seen before: replayed".into(),
        });
    }
    let n = hs.write_message(&[], &mut buf).map_err(noise)?;
    Ok((hs, frame(&buf[..n])))
}

/// The blocking end of a channel over TCP.
pub struct Channel {
    stream: TcpStream,
    session: Session,
    peer: String,
}

/// The connection's socket, to wait on it (`poll`) beside other fds.
impl std::os::fd::AsFd for Channel {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Channel({})", self.peer)
    }
}

fn read_frame(r: &mut impl Read, peer: &str) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).map_err(|e| WireError::io(peer, e))?;
    let mut f = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut f).map_err(|e| WireError::io(peer, e))?;
    Ok(f)
}

fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(2 + bytes.len());
    f.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_be_bytes());
    f.extend_from_slice(bytes);
    f
}

impl Channel {
    /// Connect to `addr` and shake hands; every read and write of the
    /// connection then has `timeout` as its deadline.
    pub fn connect(addr: &str, key: &Key, timeout: Duration) -> Result<Channel, WireError> {
        let io = |e| WireError::io(addr, e);
        let sa: SocketAddr =
            addr.to_socket_addrs()
                .map_err(io)?
                .next()
                .ok_or_else(|| WireError::Io {
                    peer: addr.into(),
                    source: std::io::Error::other("the address resolves to nothing"),
                })?;
        let stream = TcpStream::connect_timeout(&sa, timeout).map_err(io)?;
        Channel::initiate(stream, addr, key, timeout)
    }

    /// Shake hands as the initiator over a connected stream.
    pub fn initiate(
        mut stream: TcpStream,
        peer: &str,
        key: &Key,
        timeout: Duration,
    ) -> Result<Channel, WireError> {
        let io = |e| WireError::io(peer, e);
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let _ = stream.set_nodelay(true);
        let mut hs = builder(key)?.build_initiator().map_err(noise)?;
        let mut buf = [0u8; 128];
        let n = hs.write_message(&[], &mut buf).map_err(noise)?;
        stream.write_all(&frame(&buf[..n])).map_err(io)?;
        let reply = read_frame(&mut stream, peer).map_err(|e| match e {
            // A responder that cannot verify the first message hangs up.
            WireError::Closed { .. } => WireError::Refused {
                peer: peer.into(),
                why: "the server hung up on the handshake: it holds another key (or refuses this client; its log says why)".into(),
            },
            e => e,
        })?;
        check_first_frame(reply.len(), peer)?;
        hs.read_message(&reply, &mut buf)
            .map_err(|_| wrong_key(peer, "server"))?;
        let t = hs.into_transport_mode().map_err(noise)?;
        Ok(Channel {
            stream,
            session: Session { t },
            peer: peer.into(),
        })
    }

    /// Shake hands as the responder over an accepted stream.
    pub fn respond(
        mut stream: TcpStream,
        key: &Key,
        replay: &ReplayGuard,
        timeout: Duration,
    ) -> Result<Channel, WireError> {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "peer".into());
        let io = |e| WireError::io(&peer, e);
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let _ = stream.set_nodelay(true);
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).map_err(io)?;
        check_first_frame(usize::from(u16::from_be_bytes(len)), &peer)?;
        let mut first = [0u8; HANDSHAKE_FRAME];
        stream.read_exact(&mut first).map_err(io)?;
        let (hs, reply) = answer(&first, key, replay, &peer)?;
        stream.write_all(&reply).map_err(io)?;
        let t = hs.into_transport_mode().map_err(noise)?;
        Ok(Channel {
            stream,
            session: Session { t },
            peer,
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Send one message (at most `max` bytes).
    pub fn send(&mut self, msg: &[u8]) -> Result<(), WireError> {
        let out = self.session.seal(msg, &self.peer, MAX_MESSAGE)?;
        self.stream
            .write_all(&out)
            .map_err(|e| WireError::io(&self.peer, e))
    }

    /// Receive one message of at most `max` bytes.
    pub fn recv(&mut self, max: usize) -> Result<Vec<u8>, WireError> {
        let mut plain = Vec::new();
        loop {
            let f = read_frame(&mut self.stream, &self.peer)?;
            self.session.open(&f, &mut plain, &self.peer)?;
            if message_done(&plain, &self.peer, max)?.is_some() {
                plain.drain(..4);
                return Ok(plain);
            }
        }
    }

    /// This end's address (where a peer reaches this host).
    pub fn local_addr(&self) -> Result<SocketAddr, WireError> {
        self.stream
            .local_addr()
            .map_err(|e| WireError::io(&self.peer, e))
    }

    /// The connection's round-trip time on an idle link: the lowest the
    /// kernel measured (`TCP_INFO`'s `tcpi_min_rtt`; the smoothed one
    /// includes the queues a bulk transfer builds), if it has one.
    pub fn rtt(&self) -> Option<Duration> {
        use std::os::fd::AsRawFd;
        // SAFETY: all-zero is a valid `tcp_info` (integers only).
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: getsockopt writes at most `len` bytes into `info`, which
        // is that big, and updates `len`.
        let r = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        let rtt = if info.tcpi_min_rtt > 0 {
            info.tcpi_min_rtt
        } else {
            info.tcpi_rtt
        };
        (r == 0 && rtt > 0).then(|| Duration::from_micros(u64::from(rtt)))
    }

    /// Notice a peer that vanished (a host down, a link cut) while nothing
    /// is sent: TCP keepalive probes after `idle` of silence, every
    /// `interval`, `count` times, then reads and writes fail.
    pub fn keepalive(
        &self,
        idle: Duration,
        interval: Duration,
        count: u32,
    ) -> Result<(), WireError> {
        use nix::sys::socket::{setsockopt, sockopt};
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        let io = |e: nix::Error| WireError::io(&self.peer, e.into());
        setsockopt(&self.stream, sockopt::KeepAlive, &true).map_err(io)?;
        setsockopt(&self.stream, sockopt::TcpKeepIdle, &secs(idle)).map_err(io)?;
        setsockopt(&self.stream, sockopt::TcpKeepInterval, &secs(interval)).map_err(io)?;
        setsockopt(&self.stream, sockopt::TcpKeepCount, &count).map_err(io)?;
        // Unacknowledged data counts too (a write into a cut link).
        let ms = u32::try_from((idle + interval * count).as_millis()).unwrap_or(u32::MAX);
        setsockopt(&self.stream, sockopt::TcpUserTimeout, &ms).map_err(io)
    }

    /// Change the deadline of every read and write from now on.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), WireError> {
        let io = |e| WireError::io(&self.peer, e);
        self.stream.set_read_timeout(Some(timeout)).map_err(io)?;
        self.stream.set_write_timeout(Some(timeout)).map_err(io)
    }
}

/// The largest message either end sends.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The tokio end of a channel (servers).
pub struct AsyncChannel<S> {
    stream: S,
    session: Session,
    peer: String,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> AsyncChannel<S> {
    /// Shake hands as the responder; the caller bounds it with a timeout.
    pub async fn respond(
        mut stream: S,
        peer: String,
        key: &Key,
        replay: &ReplayGuard,
    ) -> Result<AsyncChannel<S>, WireError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let io = |e| WireError::io(&peer, e);
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.map_err(io)?;
        check_first_frame(usize::from(u16::from_be_bytes(len)), &peer)?;
        let mut first = [0u8; HANDSHAKE_FRAME];
        stream.read_exact(&mut first).await.map_err(io)?;
        let (hs, reply) = answer(&first, key, replay, &peer)?;
        stream.write_all(&reply).await.map_err(io)?;
        let t = hs.into_transport_mode().map_err(noise)?;
        Ok(AsyncChannel {
            stream,
            session: Session { t },
            peer,
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub async fn send(&mut self, msg: &[u8]) -> Result<(), WireError> {
        use tokio::io::AsyncWriteExt;
        let out = self.session.seal(msg, &self.peer, MAX_MESSAGE)?;
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| WireError::io(&self.peer, e))
    }

    pub async fn recv(&mut self, max: usize) -> Result<Vec<u8>, WireError> {
        use tokio::io::AsyncReadExt;
        let mut plain = Vec::new();
        loop {
            let mut len = [0u8; 2];
            self.stream
                .read_exact(&mut len)
                .await
                .map_err(|e| WireError::io(&self.peer, e))?;
            let mut f = vec![0u8; usize::from(u16::from_be_bytes(len))];
            self.stream
                .read_exact(&mut f)
                .await
                .map_err(|e| WireError::io(&self.peer, e))?;
            self.session.open(&f, &mut plain, &self.peer)?;
            if message_done(&plain, &self.peer, max)?.is_some() {
                plain.drain(..4);
                return Ok(plain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(ck: Key, sk: Key) -> (Result<Channel, WireError>, Result<Channel, WireError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let guard = ReplayGuard::new();
        std::thread::scope(|s| {
            let srv = s.spawn(|| {
                let (st, _) = l.accept().unwrap();
                Channel::respond(st, &sk, &guard, Duration::from_secs(5))
            });
            let c = Channel::connect(&addr, &ck, Duration::from_secs(5));
            (c, srv.join().unwrap())
        })
    }

    #[test]
    fn messages_of_any_size_cross_both_ways() {
        let k = Key::generate().unwrap();
        let (c, s) = pair(k.clone(), k);
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        for len in [
            0usize,
            1,
            MAX_PLAIN - 4,
            MAX_PLAIN - 3,
            3 * MAX_PLAIN + 17,
            5 << 20,
        ] {
            let m: Vec<u8> = (0..len).map(|i| (i * 7 % 251).to_le_bytes()[0]).collect();
            let t = std::thread::spawn(move || {
                c.send(&m).unwrap();
                (c, m)
            });
            let got = s.recv(MAX_MESSAGE).unwrap();
            let (c2, m) = t.join().unwrap();
            c = c2;
            assert_eq!(got, m, "{len} bytes");
            let t = std::thread::spawn(move || {
                let r = c.recv(MAX_MESSAGE).unwrap();
                (c, r)
            });
            s.send(&got).unwrap();
            let (c2, back) = t.join().unwrap();
            c = c2;
            assert_eq!(back, m);
        }
        // A message above the receiver's limit is refused, not read.
        c.send(&[1u8; 100]).unwrap();
        assert!(matches!(
            s.recv(99),
            Err(WireError::TooLarge { len: 100, .. })
        ));
    }

    /// The kernel's round trip, after an exchange: there, and a loopback's
    /// (well under the 100 ms a lost reading could pass for).
    #[test]
    fn the_round_trip_is_the_kernels() {
        let k = Key::generate().unwrap();
        let (c, s) = pair(k.clone(), k);
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        let t = std::thread::spawn(move || {
            let m = s.recv(MAX_MESSAGE).unwrap();
            s.send(&m).unwrap();
            s
        });
        c.send(b"ping").unwrap();
        assert_eq!(c.recv(MAX_MESSAGE).unwrap(), b"ping");
        let _s = t.join().unwrap();
        let rtt = c
            .rtt()
            .expect("TCP_INFO gives a round trip after an exchange");
        assert!(rtt < Duration::from_millis(100), "{rtt:?} over loopback");
    }

    #[test]
    fn another_key_is_refused_on_both_sides() {
        let (c, s) = pair(Key::generate().unwrap(), Key::generate().unwrap());
        let s = s.unwrap_err();
        assert!(
            s.is_refusal() && s.to_string().contains("another key"),
            "{s}"
        );
        assert!(c.is_err());
    }

    #[test]
    fn a_plaintext_client_is_refused_at_its_first_bytes() {
        let k = Key::generate().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let (st, _) = l.accept().unwrap();
        let e = Channel::respond(st, &k, &ReplayGuard::new(), Duration::from_secs(5)).unwrap_err();
        assert!(e.is_refusal() && e.to_string().contains("plaintext"), "{e}");
    }

    #[test]
    fn a_replayed_handshake_is_refused_and_a_tampered_frame_detected() {
        let k = Key::generate().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let guard = ReplayGuard::new();
        // Record what a real client sends, through a relay.
        let mut hs = builder(&k).unwrap().build_initiator().unwrap();
        let mut buf = [0u8; 128];
        let n = hs.write_message(&[], &mut buf).unwrap();
        let first = frame(&buf[..n]);
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&first).unwrap();
        let (st, _) = l.accept().unwrap();
        let mut s = Channel::respond(st, &k, &guard, Duration::from_secs(5)).unwrap();
        // The replay: the same first frame again.
        let mut c2 = TcpStream::connect(addr).unwrap();
        c2.write_all(&first).unwrap();
        let (st, _) = l.accept().unwrap();
        let e = Channel::respond(st, &k, &guard, Duration::from_secs(5)).unwrap_err();
        assert!(e.is_refusal() && e.to_string().contains("replayed"), "{e}");
        // A frame that is not the session's own fails to decrypt.
        c.write_all(&frame(&[7u8; 40])).unwrap();
        assert!(matches!(
            s.recv(MAX_MESSAGE),
            Err(WireError::Tampered { .. })
        ));
    }

    #[test]
    fn the_tokio_end_speaks_to_the_blocking_one() {
        let k = Key::generate().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let l = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let k2 = k.clone();
        let client = std::thread::spawn(move || {
            let mut c = Channel::connect(&addr, &k2, Duration::from_secs(5)).unwrap();
            c.send(b"ping").unwrap();
            c.recv(1 << 20).unwrap()
        });
        rt.block_on(async {
            let (st, peer) = l.accept().await.unwrap();
            let mut s = AsyncChannel::respond(st, peer.to_string(), &k, &ReplayGuard::new())
                .await
                .unwrap();
            let m = s.recv(1 << 20).await.unwrap();
            assert_eq!(m, b"ping");
            s.send(&vec![9u8; 200_000]).await.unwrap();
        });
        assert_eq!(client.join().unwrap(), vec![9u8; 200_000]);
    }
}
