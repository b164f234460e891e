//! The destination end (`tern receive`): one migration's images written
//! under DIR, its process restored and held until the source is gone, then
//! let run, its pages filled from the local chain (and, post-copy, from the
//! source's page server).
//!
//! Everything the source sends is checked as hostile input, whatever key
//! it holds: image and file names from a fixed set (nothing is written
//! outside DIR, no link followed: `images::ImageDir`), each image's parent
//! the image received before it, an image never written twice. The key
//! itself is as powerful as root here: a peer holding it can have any
//! process image restored, as one holding root's images could.
//!
//! While the copy is held for the go, and while the fill's end is told, a
//! connection the source lost is accepted again (same key, same
//! migration); other clients are refused and logged all along.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use wire::{Channel, Key, ReplayGuard, WireError};

use crate::proto::{self, FINAL, Hello, Ready, Switch};

#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub listen: String,
    pub key: Key,
    pub dir: PathBuf,
    /// Deadline of each wait on the restored process and of the handshake
    /// of a connection.
    pub timeout: Duration,
    /// How long the held copy waits for the source's go after a lost
    /// connection (as long as the source tries).
    pub retry_for: Duration,
    pub prefetch: restorer::lazy::Prefetch,
}

/// The JSON of `tern receive`.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiveReport {
    pub pid: i32,
    /// From the switch message to the process running (restore and the
    /// go's round trip).
    pub restore_ms: f64,
    pub lazy: restorer::service::LazyStats,
    pub dir: String,
    pub source: String,
    pub post_copy: bool,
    pub images: usize,
    pub bytes_received: u64,
    /// Pages fetched from the source's page server after the process ran.
    pub post_copy_pages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir}: {why}")]
    Dir { dir: PathBuf, why: String },
    #[error("the source {peer}: {why}")]
    Source { peer: String, why: String },
    #[error("the source {peer} abandoned the migration (it runs the process on): {why}")]
    Abandoned { peer: String, why: String },
    #[error("restoring PID {pid} from {dir}: {why}")]
    Restore { pid: i32, dir: PathBuf, why: String },
    #[error("the page service of PID {pid}: {source}")]
    Lazy {
        pid: i32,
        #[source]
        source: restorer::lazy::LazyError,
    },
}

/// The control connection from the source, and the listener its
/// reconnects (and others) come to.
struct Inbound {
    listener: TcpListener,
    key: Key,
    replay: ReplayGuard,
    ch: Option<Channel>,
    hello: Hello,
    peer: String,
    timeout: Duration,
    received: u64,
}

enum Wait {
    /// A lost connection ends it.
    Connected,
    /// A lost connection is waited for again until then.
    Reconnect(Instant),
}

impl Inbound {
    /// Accept connections until one starts a migration.
    fn first(listener: TcpListener, key: Key, timeout: Duration) -> Inbound {
        let replay = ReplayGuard::new();
        loop {
            let Ok((stream, peer)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            match greet(stream, &key, &replay, timeout, None) {
                Ok((ch, hello)) => {
                    let mut inb = Inbound {
                        listener,
                        key,
                        replay,
                        ch: Some(ch),
                        hello,
                        peer: peer.to_string(),
                        timeout,
                        received: 0,
                    };
                    let _ = inb.send(&proto::msg(b'A', b""));
                    return inb;
                }
                Err(e) => tracing::warn!("receive: refused {peer}: {e}"),
            }
        }
    }

    fn send(&mut self, m: &[u8]) -> Result<(), WireError> {
        match &mut self.ch {
            Some(ch) => ch.send(m),
            None => Err(WireError::Closed {
                peer: self.peer.clone(),
            }),
        }
    }

    fn lost(&self, why: impl std::fmt::Display) -> ReceiveError {
        ReceiveError::Source {
            peer: self.peer.clone(),
            why: format!("the connection was lost: {why}"),
        }
    }

    /// The next message from the source.
    fn next(&mut self, wait: Wait) -> Result<Vec<u8>, ReceiveError> {
        loop {
            if let Some(m) = self.poll_once(&wait)? {
                return Ok(m);
            }
        }
    }

    /// Wait up to 200 ms for a message (taking a reconnect meanwhile).
    fn poll_once(&mut self, wait: &Wait) -> Result<Option<Vec<u8>>, ReceiveError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let (ch_ready, l_ready) = {
            let mut fds = vec![PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            if let Some(ch) = &self.ch {
                fds.push(PollFd::new(ch.as_fd(), PollFlags::POLLIN));
            }
            let _ = poll(&mut fds, PollTimeout::from(200u16));
            let ev = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            (ev(1), ev(0))
        };
        if l_ready {
            self.accept_again();
        }
        if ch_ready && let Some(ch) = &mut self.ch {
            match ch.recv(proto::MAX_MSG) {
                Ok(m) => {
                    self.received += m.len() as u64;
                    return Ok(Some(m));
                }
                Err(e) => {
                    tracing::warn!(peer = %self.peer, "receive: {e}");
                    self.ch = None;
                    if matches!(wait, Wait::Connected) {
                        return Err(self.lost(e));
                    }
                }
            }
        }
        if let Wait::Reconnect(until) = wait
            && self.ch.is_none()
            && Instant::now() >= *until
        {
            return Err(self.lost("and the source did not come back in time"));
        }
        Ok(None)
    }

    /// A connection while one is open: the source coming back is taken,
    /// anyone else refused.
    fn accept_again(&mut self) {
        let Ok((stream, peer)) = self.listener.accept() else {
            return;
        };
        // A slow client must not hold the migration up for long.
        let hs = self.timeout.min(Duration::from_secs(2));
        match greet(
            stream,
            &self.key,
            &self.replay,
            hs,
            Some(&self.hello.migration),
        ) {
            Ok((mut ch, _)) => {
                if ch.send(&proto::msg(b'A', b"")).is_ok() {
                    tracing::info!(%peer, "receive: the source connected again");
                    self.peer = peer.to_string();
                    self.ch = Some(ch);
                }
            }
            Err(e) => tracing::warn!("receive: refused {peer}: {e}"),
        }
    }
}

/// Handshake, and the hello: a new migration (`resume_of` None) or the
/// one under way coming back.
fn greet(
    stream: std::net::TcpStream,
    key: &Key,
    replay: &ReplayGuard,
    timeout: Duration,
    resume_of: Option<&str>,
) -> Result<(Channel, Hello), String> {
    let _ = stream.set_nonblocking(false);
    let mut ch = Channel::respond(stream, key, replay, timeout).map_err(|e| e.to_string())?;
    let m = ch.recv(64 << 10).map_err(|e| e.to_string())?;
    let refuse = |ch: &mut Channel, why: String| {
        let _ = ch.send(&proto::msg(b'E', why.as_bytes()));
        Err(why)
    };
    let hello: Hello = match m.split_first() {
        Some((b'M', p)) => match proto::parse(p, "hello") {
            Ok(h) => h,
            Err(why) => return refuse(&mut ch, why),
        },
        _ => return refuse(&mut ch, "no migration hello".into()),
    };
    if hello.version != proto::VERSION {
        return refuse(
            &mut ch,
            format!(
                "this receiver speaks version {}, the source {}",
                proto::VERSION,
                hello.version
            ),
        );
    }
    let ok = match resume_of {
        None if hello.resume => Err("no migration of that name is under way here".to_string()),
        None => Ok(()),
        Some(id) if hello.resume && hello.migration == id => Ok(()),
        Some(_) => Err("busy with another migration".to_string()),
    };
    if let Err(why) = ok {
        return refuse(&mut ch, why);
    }
    ch.keepalive(Duration::from_secs(5), Duration::from_secs(2), 4)
        .map_err(|e| e.to_string())?;
    Ok((ch, hello))
}

/// A final image up to this size is kept in memory as it comes and
/// restored from there, while a thread writes it under DIR: neither the
/// writing nor the reading back is in the frozen window. A larger one is
/// written first, as the others are.
const FINAL_IN_MEMORY: u64 = 16 << 20;

/// The images being written: which exist, which are complete.
struct Writing {
    root: images::ImageDir,
    dir: PathBuf,
    open: BTreeMap<String, std::fs::File>,
    complete: Vec<String>,
    /// The final image's files by name, while they fit in
    /// [`FINAL_IN_MEMORY`] and come in order (`None` once one did not:
    /// then on disk).
    held: Option<BTreeMap<String, Vec<u8>>>,
    held_bytes: u64,
}

impl Writing {
    fn err(&self, why: impl std::fmt::Display) -> ReceiveError {
        ReceiveError::Dir {
            dir: self.dir.clone(),
            why: why.to_string(),
        }
    }

    fn chunk(&mut self, c: proto::FileChunk<'_>) -> Result<(), ReceiveError> {
        if self.complete.iter().any(|i| i == c.image) {
            return Err(self.err(format!("image {} was sent again", c.image)));
        }
        if c.image == FINAL
            && let Some(held) = &mut self.held
        {
            let len = c.bytes.len() as u64;
            let at = held.get(c.file).map_or(0, |b| b.len() as u64);
            if c.offset == at && self.held_bytes + len <= FINAL_IN_MEMORY {
                held.entry(c.file.to_string())
                    .or_default()
                    .extend_from_slice(c.bytes);
                self.held_bytes += len;
                return Ok(());
            }
            // Too big, or not in order: on disk from here, what came first too.
            for (file, bytes) in self.held.take().unwrap_or_default() {
                self.write(FINAL, &file, 0, &bytes)?;
            }
        }
        self.write(c.image, c.file, c.offset, c.bytes)
    }

    fn write(
        &mut self,
        image: &str,
        file: &str,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), ReceiveError> {
        use std::os::unix::fs::FileExt;
        let key = format!("{image}/{file}");
        if !self.open.contains_key(&key) {
            if offset != 0 {
                return Err(self.err(format!("{key} starts at {}", offset)));
            }
            let img = self.root.create_subdir(image).map_err(|e| self.err(e))?;
            let f = create_in(&img, file).map_err(|e| self.err(e))?;
            self.open.insert(key.clone(), f);
        }
        let f = &self.open[&key];
        let end = offset.checked_add(bytes.len() as u64);
        if end.is_none_or(|e| e > 1 << 44) {
            return Err(self.err(format!("{key}: a write past 16 TiB")));
        }
        f.write_all_at(bytes, offset)
            .map_err(|e| self.err(format!("writing {key}: {e}")))
    }

    /// Image `name` is complete: its inventory must be there, of the right
    /// kind, its parent the image before it.
    fn complete(&mut self, name: &str) -> Result<(), ReceiveError> {
        proto::image_name(name).map_err(|e| self.err(e))?;
        if self.complete.iter().any(|i| i == name) {
            return Err(self.err(format!("image {name} was sent again")));
        }
        self.open.retain(|k, _| !k.starts_with(&format!("{name}/")));
        let dir = self.dir.join(name);
        let inv = match &self.held {
            Some(held) if name == FINAL => {
                let path = dir.join(images::INVENTORY_FILE);
                let bytes = held
                    .get(images::INVENTORY_FILE)
                    .ok_or_else(|| self.err(format!("image {name} came without its inventory")))?;
                images::Inventory::parse(&path, bytes)
            }
            _ => images::Inventory::load(&dir),
        }
        .map_err(|e| self.err(e))?;
        let want_kind = if name == FINAL {
            images::ImageKind::Dump
        } else {
            images::ImageKind::PreDump
        };
        if inv.kind != want_kind {
            return Err(self.err(format!("image {name} is a {:?}", inv.kind)));
        }
        let parent = inv.parent.as_ref().map(|p| p.path.clone());
        let want = self.complete.last().map(|p| format!("../{p}"));
        if parent != want {
            return Err(self.err(format!(
                "image {name} names {parent:?} as its parent, not {want:?} (the image received before it)"
            )));
        }
        if let Some(p) = self.complete.last()
            && images::Inventory::load(&self.dir.join(p))
                .is_ok_and(|pi| Some(pi.id) != inv.parent.as_ref().map(|r| r.id.clone()))
        {
            return Err(self.err(format!("image {name}'s parent is not the {p} received")));
        }
        self.complete.push(name.to_string());
        Ok(())
    }

    /// Remove what was written (the migration did not happen).
    fn discard(&self) {
        for name in self
            .root
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| proto::image_name(n).is_ok())
        {
            if let Err(e) = std::fs::remove_dir_all(self.dir.join(&name)) {
                tracing::warn!("removing {}: {e}", self.dir.join(&name).display());
            }
        }
    }
}

/// Receive one migration into `opts.dir`; returns once its process runs
/// and every page is in (the process is a child of the caller).
pub fn receive(
    opts: &ReceiveOptions,
    listening: impl FnOnce(std::net::SocketAddr),
) -> Result<ReceiveReport, ReceiveError> {
    let dir_err = |why: String| ReceiveError::Dir {
        dir: opts.dir.clone(),
        why,
    };
    let root = images::ImageDir::create(&opts.dir).map_err(|e| dir_err(e.to_string()))?;
    let existing: Vec<String> = root
        .list()
        .map_err(|e| dir_err(e.to_string()))?
        .into_iter()
        .filter(|n| proto::image_name(n).is_ok())
        .collect();
    if !existing.is_empty() {
        return Err(dir_err(format!(
            "holds images already ({}): give an empty directory",
            existing.join(", ")
        )));
    }
    let listener = TcpListener::bind(&opts.listen).map_err(|source| ReceiveError::Listen {
        addr: opts.listen.clone(),
        source,
    })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ReceiveError::Listen {
            addr: opts.listen.clone(),
            source,
        })?;
    listening(addr);
    let inb = Inbound::first(listener, opts.key.clone(), opts.timeout);
    // Non-blocking from now on: `accept_again` is called when poll says so.
    let _ = inb.listener.set_nonblocking(true);
    tracing::info!(peer = %inb.peer, pid = inb.hello.pid, "receive: migration of PID {} from {}", inb.hello.pid, inb.peer);
    let mut w = Writing {
        root,
        dir: opts.dir.clone(),
        open: BTreeMap::new(),
        complete: Vec::new(),
        held: Some(BTreeMap::new()),
        held_bytes: 0,
    };
    let inb = Arc::new(Mutex::new(inb));
    let r = run(opts, &inb, &mut w);
    if let Err(e) = &r {
        let mut g = inb.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(e, ReceiveError::Abandoned { .. }) {
            let _ = g.send(&proto::msg(b'E', e.to_string().as_bytes()));
        }
        // Nothing runs here: what was received is of no use.
        if !matches!(e, ReceiveError::Lazy { .. }) {
            w.discard();
        }
    }
    r
}

fn lock(inb: &Mutex<Inbound>) -> std::sync::MutexGuard<'_, Inbound> {
    inb.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(
    opts: &ReceiveOptions,
    inb: &Arc<Mutex<Inbound>>,
    w: &mut Writing,
) -> Result<ReceiveReport, ReceiveError> {
    // The images, then the switch.
    let mut first_chunk: Option<Instant> = None;
    let mut t_write = Duration::ZERO;
    // The restore's part that needs no final image is done while pre-copy
    // runs: each image opened as it arrives, the process forked (with its
    // PID) and traced from this thread, which restores it.
    let mut prepared = restorer::restore::Prepared::default();
    // The process first (a PID taken here fails the migration now, the
    // source still running), while this receiver holds little memory: the
    // fork's copy of it is unmapped at the switch, in the frozen window
    // (0.3-0.5 ms for the ~20 MiB it holds once an image of 1 GiB is open).
    {
        let pid = lock(inb).hello.pid;
        prepared
            .start_process(pid, opts.timeout)
            .map_err(|e| ReceiveError::Restore {
                pid,
                dir: opts.dir.clone(),
                why: e.to_string(),
            })?;
    }
    let switch: Switch = loop {
        let m = lock(inb).next(Wait::Connected)?;
        if m.first() == Some(&b'F') && first_chunk.is_none() {
            first_chunk = Some(Instant::now());
        }
        let peer = lock(inb).peer.clone();
        let bad = |why: String| ReceiveError::Source {
            peer: peer.clone(),
            why,
        };
        match m.split_first() {
            Some((b'F', p)) => {
                let t = Instant::now();
                w.chunk(proto::parse_chunk(p).map_err(bad)?)?;
                t_write += t.elapsed();
            }
            Some((b'C', name)) => {
                let name = String::from_utf8_lossy(name).to_string();
                w.complete(&name)?;
                tracing::debug!(
                    "receive: image {name} in {:?} (writing {t_write:?})",
                    first_chunk.take().map(|t| t.elapsed()).unwrap_or_default()
                );
                t_write = Duration::ZERO;
                lock(inb)
                    .send(&proto::msg(b'k', name.as_bytes()))
                    .map_err(|e| lock(inb).lost(e))?;
                if name != FINAL {
                    prepare(opts, inb, &mut prepared, &name)?;
                }
            }
            Some((b'S', p)) => break proto::parse(p, "switch").map_err(bad)?,
            Some((b'X', why)) => {
                return Err(ReceiveError::Abandoned {
                    peer,
                    why: String::from_utf8_lossy(why).into(),
                });
            }
            _ => return Err(bad("an unexpected message".into())),
        }
    };
    if w.complete.last().map(String::as_str) != Some(FINAL) {
        return Err(w.err("the switch came before the final image"));
    }
    let final_dir = opts.dir.join(FINAL);
    let post_copy = switch.page_server.is_some();
    let t_switch = Instant::now();
    let remote = match &switch.page_server {
        Some(addr) => Some(restorer::remote::Remote(
            restorer::remote::RemoteSource::connect(restorer::remote::RemoteOptions {
                addr: addr.clone(),
                key: opts.key.clone(),
                timeout: opts.timeout.max(Duration::from_secs(1)),
                retry_for: opts.retry_for,
            })
            .map_err(|e| ReceiveError::Source {
                peer: addr.clone(),
                why: format!("its page server: {e}"),
            })?,
        )),
        None => None,
    };
    // A final image held in memory is restored from there; its copy under
    // DIR is written beside the restore.
    let disk_copy = match w.held.take() {
        Some(held) => {
            let files: BTreeMap<String, Arc<Vec<u8>>> =
                held.into_iter().map(|(f, b)| (f, Arc::new(b))).collect();
            // Who could have written into DIR (the bytes never were on
            // disk here: they came over the authenticated link).
            let (_, provenance) =
                images::ImageDir::open(&opts.dir).map_err(|e| w.err(e.to_string()))?;
            let img = images::Image::from_files(
                &final_dir,
                files.clone(),
                provenance,
                remote.as_ref().map(|r| r as &dyn images::RemoteChain),
            )
            .map_err(|e| ReceiveError::Restore {
                pid: lock(inb).hello.pid,
                dir: final_dir.clone(),
                why: e.to_string(),
            })?;
            prepared.add_image(&final_dir, img);
            let dir = opts.dir.clone();
            Some(std::thread::spawn(move || write_held(&dir, FINAL, &files)))
        }
        None => None,
    };
    let retry_for = opts.retry_for;
    let go_inb = inb.clone();
    let run_inb = inb.clone();
    let ran_at = Arc::new(Mutex::new(None));
    let ran = ran_at.clone();
    // Why the source called it off while the copy was held, if it did.
    let abandoned: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let called_off = abandoned.clone();
    let gate = restorer::restore::ReleaseGate {
        go: Arc::new(move |pid| {
            let mut g = lock(&go_inb);
            g.send(&proto::json(b'R', &Ready { pid }))
                .map_err(|e| format!("telling the source it is ready: {e}"))?;
            // The source kills its copy on our ready, then says go: a lost
            // connection may yet bring the go, for as long as the source
            // tries.
            let until = Instant::now() + retry_for;
            loop {
                let m = g.next(Wait::Reconnect(until)).map_err(|e| e.to_string())?;
                match m.split_first() {
                    Some((b'G', _)) => return Ok(()),
                    Some((b'X', why)) => {
                        let why = String::from_utf8_lossy(why).to_string();
                        *called_off.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                        return Err(format!("the source runs it on: {why}"));
                    }
                    // A source come back asking for the fill's end sends
                    // the go first; anything else is not for now.
                    _ => tracing::warn!("receive: an unexpected message while held"),
                }
            }
        }),
        released: Arc::new(move |pid| {
            *ran.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            let mut g = lock(&run_inb);
            if let Err(e) = g.send(&proto::json(b'U', &Ready { pid })) {
                tracing::warn!(pid, "telling the source it runs: {e} (it asks again)");
            }
        }),
    };
    let restored = restorer::restore::restore_prepared(
        &final_dir,
        &restorer::restore::RestoreOptions {
            timeout: opts.timeout,
            lazy: true,
            fill: restorer::fill::FillMode::default(),
            remote: remote.clone(),
            gate: Some(gate),
        },
        prepared,
    );
    let finish_copy = |h: Option<std::thread::JoinHandle<Result<(), String>>>| {
        let why = match h.map(|h| h.join()) {
            None | Some(Ok(Ok(()))) => return,
            Some(Ok(Err(why))) => why,
            Some(Err(_)) => "its thread panicked".into(),
        };
        tracing::warn!(
            "receive: the copy of the final image under {} is incomplete: {why} (the restore read it from memory)",
            opts.dir.display()
        );
    };
    // A failed restore's images are removed: not while being written.
    let disk_copy = match restored {
        Ok(_) => disk_copy,
        Err(_) => {
            finish_copy(disk_copy);
            None
        }
    };
    let restored = restored.map_err(|e| {
        // Abandoned by the source: say so as such.
        match abandoned.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(why) => ReceiveError::Abandoned {
                peer: lock(inb).peer.clone(),
                why,
            },
            None => ReceiveError::Restore {
                pid: lock(inb).hello.pid,
                dir: final_dir.clone(),
                why: e.to_string(),
            },
        }
    })?;
    let pid = restored.pid;
    let restore_ms = ran_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map_or(restored.report.restore_ms, |t| {
            t.duration_since(t_switch).as_secs_f64() * 1e3
        });
    // A go whose `U` was lost is sent again by the source (after a
    // reconnect): answered while the fill runs.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answering = {
        let (inb, stop) = (inb.clone(), stop.clone());
        std::thread::spawn(move || answer_while_filling(&inb, &stop, pid))
    };
    let lazy = match restored.lazy {
        Some((chain, handoff)) => restorer::service::serve(
            chain,
            handoff,
            &restorer::service::ServiceOptions {
                prefetch: opts.prefetch,
                rate_mb_s: 0,
                timeout: opts.timeout,
                remote: remote.clone(),
            },
        )
        .map_err(|source| ReceiveError::Lazy { pid, source }),
        None => Ok(restorer::service::LazyStats::default()),
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = answering.join();
    finish_copy(disk_copy);
    let lazy = lazy?;
    let post_copy_pages = remote
        .as_ref()
        .map_or(0, |r| r.0.counters().0 / images::PAGE_SIZE);
    tell_filled(inb, &lazy, post_copy_pages, post_copy, retry_for, pid);
    let g = lock(inb);
    Ok(ReceiveReport {
        pid,
        restore_ms,
        lazy,
        dir: opts.dir.display().to_string(),
        source: g.peer.clone(),
        post_copy,
        images: w.complete.len(),
        bytes_received: g.received,
        post_copy_pages,
    })
}

/// Create file `file` of an image (`pipes/NAME` in its pipes directory).
fn create_in(img: &images::ImageDir, file: &str) -> Result<std::fs::File, images::ImageError> {
    match file.strip_prefix("pipes/") {
        Some(p) => img
            .create_subdir(images::process::PIPES_DIR)
            .and_then(|d| d.create_file(p)),
        None => img.create_file(file),
    }
}

/// Write image `name`'s `files` (held in memory) under `dir`, as
/// [`Writing`] would have as they came.
fn write_held(
    dir: &std::path::Path,
    name: &str,
    files: &BTreeMap<String, Arc<Vec<u8>>>,
) -> Result<(), String> {
    use std::io::Write;
    // Behind the restore and the page service on the CPUs (nice 19; a
    // refusal leaves it as it was).
    let _ = sys::sched::set_attr(
        nix::unistd::gettid().as_raw(),
        &sys::sched::SchedAttr {
            sched_policy: sys::sched::SCHED_NORMAL,
            sched_nice: 19,
            ..Default::default()
        },
    );
    let root = images::ImageDir::create(dir).map_err(|e| e.to_string())?;
    let img = root.create_subdir(name).map_err(|e| e.to_string())?;
    for (file, bytes) in files {
        let mut f = create_in(&img, file).map_err(|e| e.to_string())?;
        f.write_all(bytes)
            .map_err(|e| format!("{name}/{file}: {e}"))?;
    }
    Ok(())
}

/// Pre-copy image `name` is in: open it for the restore (the process to
/// restore was started at the hello).
fn prepare(
    opts: &ReceiveOptions,
    inb: &Mutex<Inbound>,
    prepared: &mut restorer::restore::Prepared,
    name: &str,
) -> Result<(), ReceiveError> {
    let t = Instant::now();
    let pid = lock(inb).hello.pid;
    let dir = opts.dir.join(name);
    prepared
        .open_image(&dir)
        .map_err(|e| ReceiveError::Restore {
            pid,
            dir: dir.clone(),
            why: e.to_string(),
        })?;
    tracing::debug!(
        pid,
        "receive: image {name} opened ahead in {:?}",
        t.elapsed()
    );
    Ok(())
}

/// While the fill runs: a source that lost the `U` comes back and says
/// go again; it is told the process runs.
fn answer_while_filling(inb: &Mutex<Inbound>, stop: &std::sync::atomic::AtomicBool, pid: i32) {
    // Never gives up: the connection may come back any time.
    let forever = Wait::Reconnect(Instant::now() + Duration::from_secs(100 * 365 * 86400));
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let mut g = lock(inb);
        match g.poll_once(&forever) {
            Ok(Some(m)) if m.first() == Some(&b'G') => {
                let _ = g.send(&proto::json(b'U', &Ready { pid }));
            }
            // `Q`: the fill's end is said when it comes.
            Ok(_) | Err(_) => {}
        }
    }
}

/// Tell the source every page is in (`D`). Post-copy, it waits for that
/// to stop serving its pages: a lost connection is waited for.
fn tell_filled(
    inb: &Mutex<Inbound>,
    lazy: &restorer::service::LazyStats,
    post_copy_pages: u64,
    post_copy: bool,
    retry_for: Duration,
    pid: i32,
) {
    let d = proto::json(
        b'D',
        &serde_json::json!({ "lazy": lazy, "post_copy_pages": post_copy_pages }),
    );
    let mut g = lock(inb);
    if g.send(&d).is_ok() || !post_copy {
        return;
    }
    let until = Instant::now() + retry_for;
    loop {
        match g.next(Wait::Reconnect(until)) {
            Ok(m) if m.first() == Some(&b'G') => {
                let _ = g.send(&proto::json(b'U', &Ready { pid }));
            }
            Ok(m) if m.first() == Some(&b'Q') => {
                if g.send(&d).is_ok() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("receive: could not tell the source the fill ended: {e}");
                return;
            }
        }
    }
}
