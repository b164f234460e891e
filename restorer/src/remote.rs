//! Pages over the network: `tern page-server` serves the page files of one
//! image chain to any number of restores at once, each page as often as it
//! is asked for; a restore given `--page-server` opens the chain's images
//! from its own directory (inventory, VMAs, page maps, process state: all
//! checked as ever) and reads their page bytes from the server, checking
//! every blob's CRC against its own page map.
//!
//! Images are matched by their page map's SHA-256, so a server holding
//! another image (or another version of it) is refused by name, not read.
//! Everything crosses a [`wire::Channel`]: both ends prove they hold the
//! key, and the stream is encrypted.
//!
//! The protocol, one message each way per request:
//! - `H` + version: the server answers with JSON, its images' digests and
//!   page-file lengths;
//! - `R` + image (u32) + offset (u64) + length (u32), big-endian: the
//!   server answers `D` + the bytes, or `E` + why not.
//!
//! A connection lost in the middle is made again with the same key, for up
//! to [`RemoteOptions::retry_for`]: a lazy restore's faulting threads wait
//! meanwhile, they never read zeros.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use images::{RemoteChain, RemotePages};
use serde::{Deserialize, Serialize};
use wire::{AsyncChannel, Channel, Key, ReplayGuard, WireError};

use crate::chain::{ChainError, ImageChain};

const VERSION: &[u8] = b"tern-pages 1";
/// The largest read one request may ask for.
const MAX_READ: u32 = 16 << 20;
/// A request's size: tag, image, offset, length.
const REQUEST: usize = 1 + 4 + 8 + 4;
/// How long an unauthenticated peer may take to shake hands.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("page server {addr}: {why}")]
    Protocol { addr: String, why: String },
    #[error("page server: cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("page server: {0}")]
    Runtime(std::io::Error),
}

#[derive(Debug, Serialize, Deserialize)]
struct ServedImage {
    /// SHA-256 of its page map, hex.
    digest: String,
    pages_len: u64,
    /// Its directory on the server, for messages.
    dir: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    images: Vec<ServedImage>,
}

/// How a client reaches its page server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub addr: String,
    pub key: Key,
    /// Deadline of each connection, handshake and request.
    pub timeout: Duration,
    /// How long a lost server is retried before a read fails.
    pub retry_for: Duration,
}

/// The client: a page server's images, and a pool of connections to it
/// (one per thread that reads at once).
#[derive(Debug)]
pub struct RemoteSource {
    opts: RemoteOptions,
    images: Vec<ServedImage>,
    pool: Mutex<Vec<Channel>>,
    bytes: AtomicU64,
    requests: AtomicU64,
    reconnects: AtomicU64,
    prefetch: Arc<Prefetcher>,
}

impl RemoteSource {
    /// Connect, prove the key, and learn which images the server holds.
    pub fn connect(opts: RemoteOptions) -> Result<Arc<RemoteSource>, RemoteError> {
        let mut ch = Channel::connect(&opts.addr, &opts.key, opts.timeout)?;
        let images = hello(&mut ch, &opts.addr)?;
        Ok(Arc::new(RemoteSource {
            opts,
            images,
            pool: Mutex::new(vec![ch]),
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            prefetch: Arc::new(Prefetcher::default()),
        }))
    }

    /// Bytes read from the server so far, requests made, connections
    /// made again after one was lost.
    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.reconnects.load(Ordering::Relaxed),
        )
    }

    fn take(&self) -> Option<Channel> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give(&self, ch: Channel) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(ch);
    }

    fn read(&self, image: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|&l| l <= MAX_READ)
            .ok_or_else(|| std::io::Error::other(format!("a read of {} bytes", buf.len())))?;
        let deadline = Instant::now() + self.opts.retry_for;
        let mut wait = Duration::from_millis(10);
        loop {
            let attempt = match self.take() {
                Some(ch) => Ok(ch),
                None => Channel::connect(&self.opts.addr, &self.opts.key, self.opts.timeout),
            }
            .and_then(|mut ch| {
                let mut req = Vec::with_capacity(REQUEST);
                req.push(b'R');
                req.extend_from_slice(&image.to_be_bytes());
                req.extend_from_slice(&offset.to_be_bytes());
                req.extend_from_slice(&len.to_be_bytes());
                ch.send(&req)?;
                let resp = ch.recv(buf.len() + 1)?;
                Ok((ch, resp))
            });
            match attempt {
                Ok((ch, resp)) => {
                    self.give(ch);
                    return match resp.split_first() {
                        Some((b'D', data)) if data.len() == buf.len() => {
                            buf.copy_from_slice(data);
                            self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                            self.requests.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        }
                        Some((b'E', why)) => Err(std::io::Error::other(format!(
                            "page server {}: {}",
                            self.opts.addr,
                            String::from_utf8_lossy(why)
                        ))),
                        _ => Err(std::io::Error::other(format!(
                            "page server {}: an answer that is not the {} bytes asked for",
                            self.opts.addr,
                            buf.len()
                        ))),
                    };
                }
                // A peer that no longer holds the key will not hold it
                // on the next try either.
                Err(e) if e.is_refusal() => return Err(std::io::Error::other(e.to_string())),
                Err(e) => {
                    if Instant::now() + wait > deadline {
                        return Err(std::io::Error::other(format!(
                            "{e}; gave up after retrying for {} s",
                            self.opts.retry_for.as_secs()
                        )));
                    }
                    tracing::warn!(server = %self.opts.addr, "page server connection lost ({e}); connecting again");
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

fn hello(ch: &mut Channel, addr: &str) -> Result<Vec<ServedImage>, RemoteError> {
    let mut m = vec![b'H'];
    m.extend_from_slice(VERSION);
    ch.send(&m)?;
    let resp = ch.recv(4 << 20)?;
    let proto = |why: String| RemoteError::Protocol {
        addr: addr.into(),
        why,
    };
    match resp.split_first() {
        Some((b'I', json)) => serde_json::from_slice::<Hello>(json)
            .map(|h| h.images)
            .map_err(|e| proto(format!("its list of images does not parse: {e}"))),
        Some((b'E', why)) => Err(proto(String::from_utf8_lossy(why).into_owned())),
        _ => Err(proto("an answer that is not a list of images".into())),
    }
}

/// Reads a hint asked for that may be fetched ahead at once (each on a
/// connection of its own), and the fetched ones kept until read.
const PREFETCH_SLOTS: usize = 16;
/// Threads fetching hinted reads.
const PREFETCH_WORKERS: usize = 4;

/// A read fetched ahead: (image, offset, length).
type SlotKey = (u32, u64, usize);

#[derive(Debug)]
enum Slot {
    Queued,
    Fetching,
    Ready(Vec<u8>),
    /// The fetch failed: the reader asks again itself (and gets the error).
    Failed,
}

/// Background fetches of the reads a restore said it will make next
/// ([`RemotePages::prefetch`]): several requests in flight instead of one
/// round trip per blob.
#[derive(Debug, Default)]
struct Prefetcher {
    slots: Mutex<(HashMap<SlotKey, Slot>, VecDeque<SlotKey>)>,
    changed: Condvar,
    started: AtomicBool,
}

impl Prefetcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<SlotKey, Slot>, VecDeque<SlotKey>)> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `key` unless known; when full, the oldest fetched and unread
    /// read makes room (a hint the restore did not follow).
    fn hint(&self, key: SlotKey) -> bool {
        let mut g = self.lock();
        if g.0.contains_key(&key) {
            return false;
        }
        if g.0.len() >= PREFETCH_SLOTS {
            let old =
                g.1.iter()
                    .position(|k| matches!(g.0.get(k), Some(Slot::Ready(_) | Slot::Failed)));
            match old.and_then(|i| g.1.remove(i)) {
                Some(k) => {
                    g.0.remove(&k);
                }
                None => return false,
            }
        }
        g.0.insert(key, Slot::Queued);
        g.1.push_back(key);
        self.changed.notify_all();
        true
    }

    /// The bytes of `key` if fetched ahead (waiting for a fetch under way);
    /// `None`: not hinted, or its fetch failed.
    fn take(&self, key: SlotKey, wait: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + wait;
        let mut g = self.lock();
        loop {
            match g.0.get(&key) {
                None => return None,
                Some(Slot::Queued) => {
                    // Not started: the reader fetches it itself.
                    g.0.remove(&key);
                    g.1.retain(|k| *k != key);
                    return None;
                }
                Some(Slot::Fetching) => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    g = self
                        .changed
                        .wait_timeout(g, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                Some(Slot::Ready(_) | Slot::Failed) => {
                    g.1.retain(|k| *k != key);
                    return match g.0.remove(&key) {
                        Some(Slot::Ready(b)) => Some(b),
                        _ => None,
                    };
                }
            }
        }
    }

    /// A worker: fetch queued reads until the source is gone.
    fn work(self: Arc<Self>, src: std::sync::Weak<RemoteSource>) {
        loop {
            let key = {
                let mut g = self.lock();
                loop {
                    let next =
                        g.1.iter()
                            .copied()
                            .find(|k| matches!(g.0.get(k), Some(Slot::Queued)));
                    if let Some(k) = next {
                        g.0.insert(k, Slot::Fetching);
                        break Some(k);
                    }
                    if src.strong_count() == 0 {
                        break None;
                    }
                    g = self
                        .changed
                        .wait_timeout(g, Duration::from_millis(500))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            };
            let Some(key) = key else { return };
            let Some(s) = src.upgrade() else { return };
            let mut buf = vec![0u8; key.2];
            let slot = match s.read(key.0, key.1, &mut buf) {
                Ok(()) => Slot::Ready(buf),
                Err(e) => {
                    tracing::debug!(
                        "page server: a read ahead failed ({e}); the reader asks again"
                    );
                    Slot::Failed
                }
            };
            drop(s);
            let mut g = self.lock();
            if let Some(v) = g.0.get_mut(&key) {
                *v = slot;
            }
            self.changed.notify_all();
        }
    }
}

/// One image's pages at the server.
#[derive(Debug)]
struct RemoteImage {
    src: Arc<RemoteSource>,
    index: u32,
}

impl RemotePages for RemoteImage {
    fn prefetch(&self, offset: u64, len: usize) {
        if len == 0 || len > MAX_READ as usize {
            return;
        }
        let p = &self.src.prefetch;
        if p.hint((self.index, offset, len)) && !p.started.swap(true, Ordering::SeqCst) {
            for i in 0..PREFETCH_WORKERS {
                let (p, src) = (p.clone(), Arc::downgrade(&self.src));
                let spawned = std::thread::Builder::new()
                    .name(format!("tern-prefetch-{i}"))
                    .spawn(move || p.work(src));
                if let Err(e) = spawned {
                    tracing::debug!("page server: no read-ahead thread: {e}");
                }
            }
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let wait = self.src.opts.retry_for + self.src.opts.timeout;
        if let Some(b) = self
            .src
            .prefetch
            .take((self.index, offset, buf.len()), wait)
        {
            buf.copy_from_slice(&b);
            return Ok(());
        }
        // Reads longer than a request takes go in pieces.
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_READ as usize);
            self.src
                .read(self.index, offset + done as u64, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn origin(&self) -> String {
        format!("page server {}", self.src.opts.addr)
    }
}

/// The server's images, found by digest.
#[derive(Debug, Clone)]
pub struct Remote(pub Arc<RemoteSource>);

impl RemoteChain for Remote {
    fn pages_of(
        &self,
        dir: &Path,
        digest: &[u8; 32],
    ) -> Result<(Arc<dyn RemotePages>, u64), String> {
        let h = images::hex(digest);
        let (i, img) = self
            .0
            .images
            .iter()
            .enumerate()
            .find(|(_, s)| s.digest == h)
            .ok_or_else(|| {
                format!(
                    "the page server {} does not hold this image ({} is not the image it serves: its page map differs from all {} of its images)",
                    self.0.opts.addr,
                    dir.display(),
                    self.0.images.len()
                )
            })?;
        let index = u32::try_from(i).map_err(|e| e.to_string())?;
        Ok((
            Arc::new(RemoteImage {
                src: self.0.clone(),
                index,
            }),
            img.pages_len,
        ))
    }
}

/// What a running page server reports once it listens.
#[derive(Debug, Clone, Serialize)]
pub struct Listening {
    pub listen: SocketAddr,
    pub images: usize,
    pub dir: PathBuf,
}

/// Serve the chain in `dir` on `listen` until the process is killed.
/// `ready` is called once the socket listens; `before_open`, if any, right
/// after (the chain is opened once it returns: a migration starts its
/// server before the image is written, clients wait in the backlog).
pub fn serve_pages(
    dir: &Path,
    listen: &str,
    key: Key,
    idle_exit: Option<Duration>,
    before_open: Option<Box<dyn FnOnce()>>,
    ready: impl FnOnce(&Listening),
) -> Result<(), RemoteError> {
    let chain = match before_open {
        None => Some(Arc::new(ImageChain::open(dir)?)),
        Some(_) => None,
    };
    let std_listener = std::net::TcpListener::bind(listen).map_err(|e| RemoteError::Listen {
        addr: listen.into(),
        source: e,
    })?;
    let local = std_listener.local_addr().map_err(RemoteError::Runtime)?;
    ready(&Listening {
        listen: local,
        images: chain.as_ref().map_or(0, |c| c.images.len()),
        dir: dir.to_path_buf(),
    });
    if let Some(wait) = before_open {
        wait();
    }
    let chain = match chain {
        Some(c) => c,
        None => Arc::new(ImageChain::open(dir)?),
    };
    let served: Vec<ServedImage> = chain
        .images
        .iter()
        .map(|img| ServedImage {
            digest: images::hex(&img.pagemap_digest()),
            pages_len: img
                .pages_file()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len()),
            dir: img.dir.display().to_string(),
        })
        .collect();
    let hello = {
        let mut m = vec![b'I'];
        m.extend(
            serde_json::to_vec(&Hello { images: served })
                .map_err(|e| RemoteError::Runtime(e.into()))?,
        );
        Arc::new(m)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RemoteError::Runtime)?;
    rt.block_on(async move {
        std_listener
            .set_nonblocking(true)
            .map_err(RemoteError::Runtime)?;
        let l = tokio::net::TcpListener::from_std(std_listener).map_err(RemoteError::Runtime)?;
        let key = Arc::new(key);
        let replay = Arc::new(ReplayGuard::new());
        // `--exit-idle-s`: the clients connected now, and since when none.
        let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut idle_since = Instant::now();
        loop {
            let accepted = match idle_exit {
                None => l.accept().await,
                Some(idle) => {
                    match tokio::time::timeout(Duration::from_millis(100), l.accept()).await {
                        Ok(r) => r,
                        Err(_) => {
                            if clients.load(Ordering::SeqCst) > 0 {
                                idle_since = Instant::now();
                            } else if idle_since.elapsed() >= idle {
                                tracing::info!(
                                    "page server: no client for {} s: exiting",
                                    idle.as_secs_f64()
                                );
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of fds and the like: wait, do not spin.
                    tracing::warn!("page server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (chain, key, replay, hello) =
                (chain.clone(), key.clone(), replay.clone(), hello.clone());
            let connected = ClientCount::new(clients.clone());
            tokio::spawn(async move {
                let _connected = connected;
                let peer = peer.to_string();
                let ch = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    AsyncChannel::respond(stream, peer.clone(), &key, &replay),
                )
                .await;
                let mut ch = match ch {
                    Ok(Ok(ch)) => ch,
                    Ok(Err(e)) => {
                        tracing::warn!("page server: refused {peer}: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(
                            "page server: refused {peer}: no handshake within {} s",
                            HANDSHAKE_TIMEOUT.as_secs()
                        );
                        return;
                    }
                };
                tracing::info!("page server: {peer} connected");
                if let Err(e) = serve_client(&mut ch, &chain, &hello).await {
                    match e {
                        WireError::Closed { .. } => tracing::info!("page server: {peer} left"),
                        e => tracing::warn!("page server: {peer}: {e}"),
                    }
                }
            });
        }
    })
}

/// One client counted while its task lives (for `--exit-idle-s`).
struct ClientCount(Arc<std::sync::atomic::AtomicUsize>);

impl ClientCount {
    fn new(n: Arc<std::sync::atomic::AtomicUsize>) -> ClientCount {
        n.fetch_add(1, Ordering::SeqCst);
        ClientCount(n)
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_client(
    ch: &mut AsyncChannel<tokio::net::TcpStream>,
    chain: &Arc<ImageChain>,
    hello: &[u8],
) -> Result<(), WireError> {
    loop {
        let req = ch.recv(64).await?;
        match req.split_first() {
            Some((b'H', v)) if v == VERSION => ch.send(hello).await?,
            Some((b'H', v)) => {
                ch.send(&refusal(&format!(
                    "this server speaks {}, the client {}",
                    String::from_utf8_lossy(VERSION),
                    String::from_utf8_lossy(v)
                )))
                .await?
            }
            Some((b'R', body)) if body.len() == REQUEST - 1 => {
                let image = u32::from_be_bytes(body[0..4].try_into().unwrap_or_default());
                let offset = u64::from_be_bytes(body[4..12].try_into().unwrap_or_default());
                let len = u32::from_be_bytes(body[12..16].try_into().unwrap_or_default());
                let chain = chain.clone();
                let answer =
                    tokio::task::spawn_blocking(move || read_for(&chain, image, offset, len))
                        .await
                        .unwrap_or_else(|e| Err(format!("the read failed: {e}")));
                match answer {
                    Ok(m) => ch.send(&m).await?,
                    Err(why) => ch.send(&refusal(&why)).await?,
                }
            }
            _ => {
                ch.send(&refusal("a request this server does not know"))
                    .await?
            }
        }
    }
}

/// The answer `E` + why.
fn refusal(why: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + why.len());
    m.push(b'E');
    m.extend_from_slice(why.as_bytes());
    m
}

/// `D` + the bytes asked for, or why not.
fn read_for(chain: &ImageChain, image: u32, offset: u64, len: u32) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let img = chain
        .images
        .get(image as usize)
        .ok_or_else(|| format!("no image {image} (this chain has {})", chain.images.len()))?;
    if len > MAX_READ {
        return Err(format!("a read of {len} bytes (at most {MAX_READ})"));
    }
    let f = img
        .pages_file()
        .ok_or_else(|| "the server's own pages are remote".to_string())?;
    let path = img.dir.join(images::PAGES_FILE);
    let size = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > size)
    {
        return Err(format!(
            "{} bytes at {offset} are past the end of {} ({size} bytes)",
            len,
            path.display()
        ));
    }
    let mut m = vec![0u8; 1 + len as usize];
    m[0] = b'D';
    f.read_exact_at(&mut m[1..], offset)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(m)
}
