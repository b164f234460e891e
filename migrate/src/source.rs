//! The source end (`tern migrate`): pre-copy rounds while the process runs,
//! the switch-over, and (post-copy) the pages served until pulled.
//!
//! # Rounds
//!
//! Each round is a pre-dump (the pages written since the previous one, lz4)
//! into a private work directory, sent whole to the receiver and
//! acknowledged there: the round's time is the copy plus the transfer, its
//! pages are what the process dirtied during the previous round. From two
//! consecutive rounds come the dirty rate, and from the transfers the
//! link's throughput; together they predict the frozen round: the pages
//! dirtied from the last scan until the freeze, copied and (without
//! post-copy) sent. Rounds go on while they shrink; they stop once the
//! prediction fits `--downtime-ms` and a round more would not cut it by a
//! quarter, or once they stop shrinking (the process dirties as fast as
//! the link carries), or at the round limit.
//!
//! # Switch-over: never both running, never lost
//!
//! The final dump holds the frozen source in its guardian (see
//! `tracker::hold`) once its image is written. The receiver restores it
//! and holds its copy too, then says `R`. Only then is the source killed,
//! and only then is the receiver told `G`. Before `R` any failure
//! resumes the source; a tern killed meanwhile resumes it too (its
//! guardian reads the end of the pipe), and the receiver drops its copy.
//! After the kill, `G` is delivered through reconnects with the same key
//! for `--retry-s`; the receiver waits for it as long.
//!
//! # Post-copy
//!
//! The frozen round's pages are written to the work directory (page
//! cache, not the link), not sent: the receiver's copy runs with every
//! page it holds from the rounds and fetches the rest from a `tern
//! page-server` started here on that image. The source process itself is
//! killed at the switch as without post-copy (a frozen process held for
//! longer would run again if its holder died); the server outlives this
//! tern (one killed after the switch leaves the pages served) and exits
//! once no client has come for a while.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use wire::{Channel, Key, WireError};

use crate::proto::{self, FINAL, Hello, Ready, Switch};

/// `--post-copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PostCopy {
    /// Post-copy when the rest, sent frozen, would not fit the downtime,
    /// or would freeze the process a quarter longer than post-copy.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub pid: i32,
    /// The receiver, `ADDR:PORT`.
    pub to: String,
    pub key: Key,
    /// The key's file (the post-copy page server reads it).
    pub key_file: PathBuf,
    pub downtime: Duration,
    pub post_copy: PostCopy,
    pub track: tracker::backend::TrackMode,
    pub ebpf: bool,
    /// Where the rounds are written (a private directory made under it).
    pub work_dir: PathBuf,
    /// Deadline of every wait on the target and of each message.
    pub timeout: Duration,
    /// How long a lost connection is tried again once the switch is
    /// committed (and how long the receiver waits for it).
    pub retry_for: Duration,
    pub max_rounds: usize,
    /// tern itself (the post-copy page server is `tern page-server`).
    pub tern: PathBuf,
}

/// One pre-copy round.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// Pages copied (written since the previous round).
    pub pages: u64,
    /// Bytes sent for it (compressed pages and the image's metadata).
    pub bytes: u64,
    /// Copy and transfer.
    pub ms: f64,
    /// Pages dirtied per second since the previous round's scan, MB/s.
    pub dirty_rate_mb_s: f64,
    pub copy_ms: f64,
    pub send_ms: f64,
    /// The link's throughput as measured so far, MB/s.
    pub link_mb_s: f64,
    /// The connection's round-trip time on an idle link, ms.
    pub rtt_ms: f64,
    /// The frozen round predicted after this one, ms.
    pub predicted_downtime_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Destination {
    pub pid: i32,
    /// The receiver's lazy fill (post-copy: once every page is in).
    pub lazy: Option<serde_json::Value>,
}

/// The JSON of `tern migrate`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    pub pid: i32,
    pub to: String,
    pub rounds: Vec<Round>,
    /// Why the rounds stopped.
    pub stop: String,
    pub post_copy: bool,
    pub predicted_downtime_ms: f64,
    /// From the source frozen to the destination's process running.
    pub downtime_ms: f64,
    /// The source frozen, until it was killed.
    pub frozen_ms: f64,
    pub final_pages: u64,
    pub bytes_sent: u64,
    /// Pages the destination fetched after it ran.
    pub post_copy_pages: u64,
    pub total_ms: f64,
    pub destination: Destination,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("PID {pid} cannot be migrated: {source}")]
    Tracker {
        pid: i32,
        #[source]
        source: tracker::session::TrackerError,
    },
    #[error("the final dump of PID {pid}: {source}")]
    Dump {
        pid: i32,
        #[source]
        source: Box<tracker::dump::DumpError>,
    },
    #[error("migrating PID {pid}: {what}: {source}; PID {pid} runs on here")]
    Link {
        pid: i32,
        what: String,
        #[source]
        source: WireError,
    },
    #[error("the receiver {to} failed: {why}; PID {pid} runs on here")]
    Receiver { pid: i32, to: String, why: String },
    #[error("the receiver {to} {why}; PID {pid} runs on here")]
    Protocol { pid: i32, to: String, why: String },
    #[error("holding PID {pid} frozen: {source}")]
    Hold {
        pid: i32,
        #[source]
        source: tracker::hold::HoldError,
    },
    #[error("the work directory {dir}: {why}")]
    WorkDir { dir: PathBuf, why: String },
    #[error(
        "PID {pid} was killed here for the switch, but the receiver {to} could not be told to run its copy within {waited:?} ({why}); it drops its copy when it stops waiting: restore it on the receiver with `tern restore -D RECEIVE_DIR/final`{pages}"
    )]
    Lost {
        pid: i32,
        to: String,
        waited: Duration,
        why: String,
        pages: String,
    },
    #[error(
        "the receiver {to} runs PID {pid} but did not confirm it holds every page ({why}); the page server (PID {server}) keeps serving {dir} until no client comes for {idle:?}"
    )]
    Unconfirmed {
        pid: i32,
        to: String,
        why: String,
        server: i32,
        dir: PathBuf,
        idle: Duration,
    },
}

/// The control connection to the receiver, made again after a loss.
struct Link {
    ch: Channel,
    to: String,
    key: Key,
    timeout: Duration,
    hello: Hello,
    sent: u64,
    /// File pieces are read into this: made and touched once, not in the
    /// frozen window (4 MiB of fresh pages cost a millisecond or two).
    buf: Vec<u8>,
}

fn keepalive(ch: &Channel, timeout: Duration) -> Result<(), WireError> {
    // A silent peer is noticed within about `timeout`.
    let idle = (timeout / 2).max(Duration::from_secs(1));
    ch.keepalive(idle, (timeout / 8).max(Duration::from_secs(1)), 4)
}

impl Link {
    /// Connect (refused connections are tried again until `timeout`: the
    /// receiver may be starting) and say hello.
    fn open(to: &str, key: &Key, timeout: Duration, hello: Hello) -> Result<Link, WireError> {
        let until = Instant::now() + timeout;
        let ch = loop {
            match Channel::connect(to, key, timeout) {
                Ok(ch) => break ch,
                Err(WireError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < until =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        let mut link = Link {
            ch,
            to: to.into(),
            key: key.clone(),
            timeout,
            hello,
            sent: 0,
            buf: vec![1u8; proto::CHUNK],
        };
        link.greet()?;
        Ok(link)
    }

    fn greet(&mut self) -> Result<(), WireError> {
        keepalive(&self.ch, self.timeout)?;
        let m = proto::json(b'M', &self.hello);
        self.send(&m)?;
        let r = self.ch.recv(proto::MAX_MSG)?;
        match r.split_first() {
            Some((b'A', _)) => Ok(()),
            Some((b'E', why)) => Err(WireError::Refused {
                peer: self.to.clone(),
                why: String::from_utf8_lossy(why).into(),
            }),
            _ => Err(WireError::Refused {
                peer: self.to.clone(),
                why: "it answered the hello with something else".into(),
            }),
        }
    }

    /// Connect again (same key, same migration), until `until`.
    fn reconnect(&mut self, until: Instant) -> Result<(), WireError> {
        self.hello.resume = true;
        let mut wait = Duration::from_millis(50);
        loop {
            let attempt = Channel::connect(&self.to, &self.key, self.timeout).and_then(|ch| {
                self.ch = ch;
                self.greet()
            });
            match attempt {
                Ok(()) => {
                    tracing::info!(to = %self.to, "migration: connected to the receiver again");
                    return Ok(());
                }
                Err(e) if e.is_refusal() || Instant::now() + wait > until => return Err(e),
                Err(e) => tracing::debug!(to = %self.to, "reconnecting: {e}"),
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    fn send(&mut self, m: &[u8]) -> Result<(), WireError> {
        self.sent += m.len() as u64;
        self.ch.send(m)
    }

    fn recv(&mut self) -> Result<Vec<u8>, WireError> {
        self.ch.recv(proto::MAX_MSG)
    }
}

/// The frozen copy of a post-copy (raw, into the page cache: 2.5-3 GB/s
/// here).
const COPY_MB_S: f64 = 2500.0;
/// The rest of the frozen time: freeze, the process state, the
/// destination's restore until its process runs (its earlier images
/// opened and its process forked while pre-copy ran), the round trips
/// (a quiet 1 GiB process over loopback: 9-16 ms, median 12, on the
/// development machine, two cores).
const FIXED_MS: f64 = 12.0;
/// Round trips of the switch once the final image is written: the image
/// and the switch there and acknowledged (TCP's window opens again from
/// its start after the idle wait: more for a bigger image), ready back,
/// go there and running back (`bench migrate` over 100 Mbit/s with 1 ms
/// each way: 5.5-7 round trips more than without the delay).
const ROUND_TRIPS: f64 = 6.0;
/// With post-copy, the receiver's connection to the page server and its
/// handshake as well (7-9 there).
const POST_COPY_ROUND_TRIPS: f64 = 8.0;
/// The post-copy page server opening the image, the receiver connecting
/// to it (the server is started before the freeze).
const PAGE_SERVER_MS: f64 = 3.0;
/// The receiver writing what it receives, MB/s.
const RECEIVER_MB_S: f64 = 1000.0;
/// Fewer pages than this: nothing more to gain from another round.
const DONE_PAGES: u64 = 64;
/// The frozen copy compressing as it goes (sent frozen), MB/s of pages.
const LZ4_COPY_MB_S: f64 = 1200.0;

/// The frozen round's predicted length, for `pages` pages that shrink to
/// `ratio` of their size in lz4.
fn predict(pages: f64, ratio: f64, link_mb_s: f64, rtt_ms: f64, post_copy: bool) -> f64 {
    let mb = pages * images::PAGE_SIZE as f64 / 1e6;
    if post_copy {
        FIXED_MS + PAGE_SERVER_MS + POST_COPY_ROUND_TRIPS * rtt_ms + mb / COPY_MB_S * 1e3
    } else {
        FIXED_MS
            + ROUND_TRIPS * rtt_ms
            + mb / LZ4_COPY_MB_S * 1e3
            + mb * ratio / link_mb_s.max(1.0) * 1e3
            + mb * ratio / RECEIVER_MB_S * 1e3
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Migrate `opts.pid` to the receiver at `opts.to`.
pub fn migrate(opts: &MigrateOptions) -> Result<MigrateReport, MigrateError> {
    let t0 = Instant::now();
    let pid = opts.pid;
    let tracker_err = |source| MigrateError::Tracker { pid, source };
    // What the restore could not bring back is refused before anything.
    tracker::session::check_target(pid).map_err(tracker_err)?;
    tracker::restorable::ensure(pid).map_err(tracker_err)?;
    let work = tempfile::Builder::new()
        .prefix(&format!("tern-migrate-{pid}-"))
        .tempdir_in(&opts.work_dir)
        .map_err(|e| MigrateError::WorkDir {
            dir: opts.work_dir.clone(),
            why: format!("{e}; give a writable directory with --work-dir"),
        })?;
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| MigrateError::WorkDir {
        dir: work.path().into(),
        why: format!("no random bytes for the migration's name: {e}"),
    })?;
    let hello = Hello {
        version: proto::VERSION,
        migration: images::hex(&id),
        pid,
        resume: false,
    };
    let link_err = |what: &str| {
        let what = what.to_string();
        move |source| MigrateError::Link { pid, what, source }
    };
    let mut link = Link::open(&opts.to, &opts.key, opts.timeout, hello)
        .map_err(link_err(&format!("connecting to the receiver {}", opts.to)))?;
    tracing::info!(pid, to = %opts.to, work = %work.path().display(), "migration started");

    let pre = pre_copy(opts, &mut link, work.path());
    let (rounds, prev, stop, post_copy, predicted) = match pre {
        Ok(r) => r,
        Err(e) => {
            let _ = link.send(&proto::msg(b'X', e.to_string().as_bytes()));
            if tracker::session::alive_now(pid)
                && let Err(u) = tracker::session::untrack(pid, opts.timeout)
            {
                tracing::warn!(pid, "removing tracking after the failed migration: {u}");
            }
            return Err(e);
        }
    };
    tracing::info!(
        pid,
        rounds = rounds.len(),
        post_copy,
        "pre-copy done ({stop}); predicted downtime {predicted:.1} ms"
    );

    let (gate, ctl) =
        tracker::hold::hold_pipes().map_err(|source| MigrateError::Hold { pid, source })?;
    let final_dir = work.path().join(FINAL);
    // Post-copy: the page server is started before the dump forks its
    // guardian, which keeps a copy of every fd tern has at that moment: a
    // pipe to the server made meanwhile would stay open in it, and a server
    // that failed would then never be seen to end.
    let starting = post_copy.then(|| {
        let ip = link
            .ch
            .local_addr()
            .map_err(|e| format!("this end's address: {e}"))?
            .ip();
        PageServer::spawn(opts, &final_dir, ip)
    });
    let (dumped, switched) = std::thread::scope(|s| {
        let sw = s.spawn(|| switch(opts, link, ctl, work.path(), starting));
        let dump_opts = tracker::dump::DumpOptions {
            track: opts.track,
            // Sent frozen, the pages go compressed: lz4 while copying costs
            // less than reading them back, packing them for the link, and
            // unpacking and writing them out there. Post-copy they stay raw
            // (the frozen copy is then the shortest).
            compress: !post_copy,
            leave_running: false,
            timeout: opts.timeout,
            live: tracker::session::LivePolicy {
                max_rounds: 0,
                done_pages: DONE_PAGES,
            },
            fsync: false,
            hold: Some(gate),
        };
        let r = tracker::dump::dump(pid, &final_dir, Some(&prev), &dump_opts, false);
        // tern's copies of the guardian's pipe ends: gone, so that the
        // switch sees the end of a dump that never wrote its image.
        drop(dump_opts);
        (r, sw.join())
    });
    let switched = match switched {
        Ok(r) => r,
        Err(_) => Err(MigrateError::Protocol {
            pid,
            to: opts.to.clone(),
            why: "(the switch-over thread panicked)".into(),
        }),
    };
    let dumped = dumped.map_err(|e| MigrateError::Dump {
        pid,
        source: Box::new(e),
    });
    let (sw, dumped) = match (switched, dumped) {
        (Ok(sw), Ok(d)) => (sw, d),
        // The dump's own error says more than the switch's "it ended".
        (Err(_), Err(e)) | (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
            if tracker::session::alive_now(pid)
                && let Err(u) = tracker::session::untrack(pid, opts.timeout)
            {
                tracing::warn!(pid, "removing tracking after the failed migration: {u}");
            }
            if matches!(
                e,
                MigrateError::Lost { .. } | MigrateError::Unconfirmed { .. }
            ) {
                // The work directory holds what the receiver may still need.
                let _ = work.keep();
            }
            return Err(e);
        }
    };
    tracker::session::gc_stale_state();
    let final_pages = dumped.pages_written;
    Ok(MigrateReport {
        pid,
        to: opts.to.clone(),
        rounds,
        stop,
        post_copy,
        predicted_downtime_ms: predicted,
        downtime_ms: sw.downtime_ms,
        frozen_ms: dumped.frozen_ms,
        final_pages,
        bytes_sent: sw.bytes_sent,
        post_copy_pages: sw
            .filled
            .as_ref()
            .and_then(|v| v["post_copy_pages"].as_u64())
            .unwrap_or(if post_copy { final_pages } else { 0 }),
        total_ms: ms(t0.elapsed()),
        destination: Destination {
            pid: sw.dest_pid,
            lazy: sw.filled.map(|mut v| v["lazy"].take()),
        },
    })
}

type PreCopy = (Vec<Round>, PathBuf, String, bool, f64);

/// The rounds: returns them, the last image, why they stopped, whether to
/// post-copy and the predicted downtime.
fn pre_copy(opts: &MigrateOptions, link: &mut Link, work: &Path) -> Result<PreCopy, MigrateError> {
    let pid = opts.pid;
    let mut session = tracker::session::TrackingSession::attach(
        pid,
        tracker::session::SessionOptions {
            track: opts.track,
            ebpf: opts.ebpf,
            compress: true,
            timeout: opts.timeout,
            pin_ebpf: true,
        },
    )
    .map_err(|source| MigrateError::Tracker { pid, source })?;
    let target = opts.downtime.as_secs_f64() * 1e3;
    let mut rounds: Vec<Round> = Vec::new();
    let mut prev: Option<PathBuf> = None;
    let mut prev_scan: Option<Instant> = None;
    let mut link_mb_s = 0.0f64;
    let mut link_sample = 0u64;
    let mut best = u64::MAX;
    let mut stalled = 0;
    let max_rounds = opts.max_rounds.max(2);
    for k in 1..=max_rounds {
        let name = k.to_string();
        let dir = work.join(&name);
        let t_scan = Instant::now();
        let rep = session
            .pre_dump(&dir, prev.as_deref())
            .map_err(|source| MigrateError::Tracker { pid, source })?;
        let copy_ms = ms(t_scan.elapsed());
        let t_send = Instant::now();
        let bytes = send_image(link, work, &name, true, pid, None)?;
        let send_s = t_send.elapsed().as_secs_f64();
        // The largest transfers say most about the link (small ones are
        // round trips).
        if bytes >= link_sample / 2 && send_s > 0.0 {
            link_mb_s = bytes as f64 / send_s / 1e6;
            link_sample = link_sample.max(bytes);
        }
        let dirty_rate = prev_scan.map_or(0.0, |p| {
            rep.pages_written as f64 * images::PAGE_SIZE as f64
                / t_scan.duration_since(p).as_secs_f64()
                / 1e6
        });
        // The frozen round copies what is dirtied from this scan on: at
        // this rate, but a process rewriting a hot set dirties no more
        // than the set, however long (what this round found, with margin).
        let pages = rep.pages_written;
        let next_pages = (dirty_rate * 1e6 * t_scan.elapsed().as_secs_f64()
            / images::PAGE_SIZE as f64)
            .min(1.5 * pages as f64);
        // What pages shrink to on the link (lz4), as this round's did.
        let ratio = if pages > 0 {
            (bytes as f64 / (pages as f64 * images::PAGE_SIZE as f64)).clamp(0.01, 1.0)
        } else {
            1.0
        };
        let rtt_ms = link.ch.rtt().map_or(0.0, ms);
        let never = predict(next_pages, ratio, link_mb_s, rtt_ms, false);
        let post = predict(next_pages, ratio, link_mb_s, rtt_ms, true);
        let post_copy = match opts.post_copy {
            PostCopy::Always => true,
            PostCopy::Never => false,
            // The rest sent frozen would not fit, or would freeze the
            // process a quarter longer than leaving it to post-copy.
            PostCopy::Auto => never > target || never > 1.25 * post,
        };
        let predicted = if post_copy { post } else { never };
        rounds.push(Round {
            pages,
            bytes,
            ms: ms(t_scan.elapsed()),
            dirty_rate_mb_s: dirty_rate,
            copy_ms,
            send_ms: send_s * 1e3,
            link_mb_s,
            rtt_ms,
            predicted_downtime_ms: predicted,
        });
        tracing::info!(
            pid,
            round = k,
            pages,
            bytes,
            "round {k}: {pages} pages, {bytes} bytes in {:.1} ms ({dirty_rate:.1} MB/s dirtied, link {link_mb_s:.0} MB/s); predicted downtime {predicted:.1} ms",
            ms(t_scan.elapsed())
        );
        prev = Some(dir);
        prev_scan = Some(t_scan);
        if k == 1 {
            continue;
        }
        // Shrinking: by a quarter at least against the best so far.
        let shrinking = (pages as f64) < 0.75 * best as f64;
        if shrinking {
            stalled = 0;
        } else {
            stalled += 1;
        }
        best = best.min(pages);
        let stop = if pages <= DONE_PAGES {
            Some("nothing left to copy".to_string())
        } else if predicted <= target && !shrinking {
            Some(format!("the frozen round fits {target:.0} ms"))
        } else if stalled >= 2 {
            Some("rounds stopped shrinking".to_string())
        } else if k == max_rounds {
            Some(format!("{max_rounds} rounds"))
        } else {
            None
        };
        if let Some(stop) = stop {
            session.detach();
            let prev = prev.expect("a round was made");
            return Ok((rounds, prev, stop, post_copy, predicted));
        }
    }
    unreachable!("the last round stops the loop")
}

/// Send the image `name` of `work` (without its page file if not
/// `pages`), inventory last, and wait until the receiver has it. Returns
/// the bytes sent.
fn send_image(
    link: &mut Link,
    work: &Path,
    name: &str,
    pages: bool,
    pid: i32,
    then: Option<&[u8]>,
) -> Result<u64, MigrateError> {
    let dir_err = |why: String| MigrateError::WorkDir {
        dir: work.join(name),
        why,
    };
    tracing::debug!(pid, "image {name}: sending");
    let (d, _) = images::ImageDir::open(&work.join(name)).map_err(|e| dir_err(e.to_string()))?;
    let mut files: Vec<(String, std::fs::File)> = Vec::new();
    let mut names = d.list().map_err(|e| dir_err(e.to_string()))?;
    names.sort_by_key(|n| n == images::INVENTORY_FILE);
    for n in names {
        if n == images::process::PIPES_DIR {
            if let Some((sub, _)) = d.open_subdir(&n).map_err(|e| dir_err(e.to_string()))? {
                for p in sub.list().map_err(|e| dir_err(e.to_string()))? {
                    if let Some((f, _)) = sub
                        .open_file(&p, false)
                        .map_err(|e| dir_err(e.to_string()))?
                    {
                        files.insert(0, (format!("{n}/{p}"), f));
                    }
                }
            }
            continue;
        }
        if (n == images::PAGES_FILE && !pages) || proto::image_file(&format!("{name}/{n}")).is_err()
        {
            continue;
        }
        if let Some((f, _)) = d.open_file(&n, false).map_err(|e| dir_err(e.to_string()))? {
            files.push((n, f));
        }
    }
    tracing::debug!(pid, "image {name}: {} files opened", files.len());
    let before = link.sent;
    let mut buf = std::mem::take(&mut link.buf);
    if buf.len() != proto::CHUNK {
        // Not given back after a failed send.
        buf = vec![0u8; proto::CHUNK];
    }
    let to = link.to.clone();
    let lost = |what: String| move |source| MigrateError::Link { pid, what, source };
    let (mut t_read, mut t_send) = (Duration::ZERO, Duration::ZERO);
    for (file, f) in &files {
        use std::os::unix::fs::FileExt;
        let path = format!("{name}/{file}");
        let mut off = 0u64;
        loop {
            let t = Instant::now();
            let n = f
                .read_at(&mut buf, off)
                .map_err(|e| dir_err(format!("reading {file}: {e}")))?;
            t_read += t.elapsed();
            // Empty files are sent too (one empty chunk).
            if n > 0 || off == 0 {
                let t = Instant::now();
                let r = link.send(&proto::file_chunk(&path, off, &buf[..n]));
                t_send += t.elapsed();
                r.map_err(lost(format!("sending {path}")))?;
            }
            if n == 0 {
                break;
            }
            off += n as u64;
        }
    }
    link.buf = buf;
    tracing::debug!(pid, "image {name}: read {t_read:?}, sent {t_send:?}");
    link.send(&proto::msg(b'C', name.as_bytes()))
        .map_err(lost(format!("sending image {name}")))?;
    // The next message (the switch) goes before the acknowledgement is
    // read: one round trip less.
    if let Some(m) = then {
        link.send(m)
            .map_err(lost(format!("sending what follows image {name}")))?;
    }
    let r = link.recv().map_err(lost(format!(
        "waiting for the receiver to write image {name}"
    )))?;
    match r.split_first() {
        Some((b'k', n)) if n == name.as_bytes() => Ok(link.sent - before),
        Some((b'E', why)) => Err(MigrateError::Receiver {
            pid,
            to,
            why: String::from_utf8_lossy(why).into(),
        }),
        _ => Err(MigrateError::Protocol {
            pid,
            to,
            why: format!("did not acknowledge image {name}"),
        }),
    }
}

struct Switched {
    downtime_ms: f64,
    bytes_sent: u64,
    dest_pid: i32,
    /// The receiver's `D` (post-copy).
    filled: Option<serde_json::Value>,
}

/// A `tern page-server` serving the final image (post-copy).
struct PageServer {
    child: std::process::Child,
    /// A line here (or its end) and the server opens the image.
    stdin: Option<std::process::ChildStdin>,
    addr: String,
    idle: Duration,
}

/// A `tern page-server` started, not yet listening.
struct StartingServer {
    child: std::process::Child,
    dir: PathBuf,
    idle: Duration,
}

impl PageServer {
    /// Start it (it says where it listens on its stdout; see
    /// [`StartingServer::listening`]).
    fn spawn(
        opts: &MigrateOptions,
        dir: &Path,
        ip: std::net::IpAddr,
    ) -> Result<StartingServer, String> {
        use std::os::unix::process::CommandExt;
        let idle = opts.retry_for * 2 + Duration::from_secs(5);
        let log = images::ImageDir::create(dir.parent().unwrap_or(dir))
            .and_then(|d| d.open_or_create_file("page-server.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new(&opts.tern);
        cmd.arg("page-server")
            .arg("-D")
            .arg(dir)
            .arg("--listen")
            .arg(std::net::SocketAddr::new(ip, 0).to_string())
            .arg("--key")
            .arg(&opts.key_file)
            .args([
                "--exit-idle-s",
                &idle.as_secs_f64().to_string(),
                "--json",
                "--open-on-stdin",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe. Its own session: it outlives
        // this tern, serving the pages the destination still needs.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", opts.tern.display()))?;
        Ok(StartingServer {
            child,
            dir: dir.to_path_buf(),
            idle,
        })
    }

    /// The image is written: open it and serve.
    fn open(&mut self) {
        use std::io::Write;
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"open\n");
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl StartingServer {
    /// Its `listen` line, read within `within`.
    fn listening(mut self, within: Duration) -> Result<PageServer, String> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::io::Read;
        use std::os::fd::AsFd;
        let until = Instant::now() + within;
        let mut out = self.child.stdout.take().expect("piped");
        let mut line = Vec::new();
        let addr = loop {
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                break serde_json::from_slice::<serde_json::Value>(&line[..end])
                    .ok()
                    .and_then(|v| v["listen"].as_str().map(String::from))
                    .ok_or("it printed something else than where it listens");
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err("it did not say where it listens in time");
            }
            let wait = PollTimeout::from(u16::try_from(left.as_millis().min(1000)).unwrap_or(1000));
            if !poll(&mut [PollFd::new(out.as_fd(), PollFlags::POLLIN)], wait).is_ok_and(|n| n > 0)
            {
                continue;
            }
            let mut chunk = [0u8; 512];
            match out.read(&mut chunk) {
                Ok(0) | Err(_) => break Err("it ended"),
                Ok(k) => line.extend_from_slice(&chunk[..k]),
            }
        };
        match addr {
            Ok(addr) => Ok(PageServer {
                stdin: self.child.stdin.take(),
                child: self.child,
                addr,
                idle: self.idle,
            }),
            Err(why) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(format!(
                    "the page server did not start: {why} (see {})",
                    self.dir
                        .parent()
                        .unwrap_or(&self.dir)
                        .join("page-server.log")
                        .display()
                ))
            }
        }
    }
}

/// The switch-over (beside the final dump, which holds the source).
fn switch(
    opts: &MigrateOptions,
    mut link: Link,
    mut ctl: tracker::hold::HoldControl,
    work: &Path,
    starting: Option<Result<StartingServer, String>>,
) -> Result<Switched, MigrateError> {
    let pid = opts.pid;
    let to = opts.to.clone();
    let final_dir = work.join(FINAL);
    let post_copy = starting.is_some();
    // Post-copy: the page server, started before the dump, listens while
    // the dump sets up, and opens the image once it is written.
    let started = starting.map(|s| s.and_then(|s| s.listening(opts.timeout)));
    // The whole dump may copy GiBs (as `tern dump` allows for).
    let frozen_at = match ctl.wait_written(pid, opts.timeout * 8 + Duration::from_secs(600)) {
        Ok(t) => t,
        Err(e) => {
            let _ = link.send(&proto::msg(b'X', b"the final dump failed"));
            if let Some(Ok(s)) = started {
                s.stop();
            }
            return Err(MigrateError::Hold { pid, source: e });
        }
    };
    let since = || (tracker::hold::monotonic_ns().saturating_sub(frozen_at)) as f64 / 1e6;
    tracing::debug!(
        pid,
        "switch: the final image is written, {:.1} ms after the freeze",
        since()
    );
    let mut server = None;
    // Before the commit: any failure resumes the source.
    let ready = (|| -> Result<Ready, MigrateError> {
        if let Some(started) = started {
            let mut s = started.map_err(|why| MigrateError::WorkDir {
                dir: final_dir.clone(),
                why,
            })?;
            s.open();
            server = Some(s);
        }
        tracing::debug!(pid, "switch: page server up at {:.1} ms", since());
        let sw = Switch {
            page_server: server.as_ref().map(|s| s.addr.clone()),
        };
        send_image(
            &mut link,
            work,
            FINAL,
            !post_copy,
            pid,
            Some(&proto::json(b'S', &sw)),
        )?;
        tracing::debug!(pid, "switch: final image sent at {:.1} ms", since());
        let lost = |what: &str| {
            let what = what.to_string();
            move |source| MigrateError::Link { pid, what, source }
        };
        let r = link
            .recv()
            .map_err(lost("waiting for the receiver to restore"))?;
        match r.split_first() {
            Some((b'R', p)) => {
                proto::parse::<Ready>(p, "ready").map_err(|why| MigrateError::Protocol {
                    pid,
                    to: to.clone(),
                    why,
                })
            }
            Some((b'E', why)) => Err(MigrateError::Receiver {
                pid,
                to: to.clone(),
                why: String::from_utf8_lossy(why).into(),
            }),
            _ => Err(MigrateError::Protocol {
                pid,
                to: to.clone(),
                why: "answered the switch with something else".into(),
            }),
        }
    })();
    let ready = match ready {
        Ok(r) => r,
        Err(e) => {
            if let Err(r) = ctl.resume(pid) {
                tracing::warn!(pid, "{r}");
            }
            let _ = link.send(&proto::msg(b'X', e.to_string().as_bytes()));
            if let Some(s) = server {
                s.stop();
            }
            return Err(e);
        }
    };
    tracing::debug!(
        pid,
        "switch: the receiver holds PID {} at {:.1} ms",
        ready.pid,
        since()
    );
    // The commit: from here the source never runs again.
    if let Err(e) = ctl.kill(pid, opts.timeout) {
        let _ = link.send(&proto::msg(b'X', e.to_string().as_bytes()));
        if let Some(s) = server {
            s.stop();
        }
        return Err(MigrateError::Hold { pid, source: e });
    }
    // Deliver the go, until the receiver says its copy runs.
    let until = Instant::now() + opts.retry_for;
    let mut why = String::new();
    let mut running = None;
    loop {
        let r = link.send(&proto::msg(b'G', b"")).and_then(|_| link.recv());
        match r {
            Ok(m) if m.first() == Some(&b'U') => {
                running = Some(
                    proto::parse::<Ready>(&m[1..], "running").unwrap_or(Ready { pid: ready.pid }),
                );
                break;
            }
            Ok(m) => {
                why = format!(
                    "it answered the go with {:?}",
                    m.first().map(|&b| b as char)
                )
            }
            Err(e) => why = e.to_string(),
        }
        if Instant::now() >= until || link.reconnect(until).is_err() {
            break;
        }
    }
    let downtime_ms = (tracker::hold::monotonic_ns().saturating_sub(frozen_at)) as f64 / 1e6;
    // The doomed source is killed now (its exit, freeing its memory, was
    // kept out of the copy's start).
    drop(ctl);
    let Some(running) = running else {
        if let Some(s) = &server {
            // The destination may yet run it (it waits as long): its pages
            // stay served.
            tracing::warn!(pid, server = s.pid(), "leaving the page server running");
        }
        return Err(MigrateError::Lost {
            pid,
            to,
            waited: opts.retry_for,
            why,
            pages: if post_copy {
                format!(
                    " (its last pages are in {}, served by PID {})",
                    work.join(FINAL).display(),
                    server.as_ref().map_or(0, |s| s.pid())
                )
            } else {
                String::new()
            },
        });
    };
    tracing::info!(
        pid,
        dest = running.pid,
        "the destination runs it after {downtime_ms:.1} ms"
    );
    let mut filled = None;
    if let Some(server) = server {
        // Post-copy: served until every page is pulled.
        match wait_filled(&mut link, opts) {
            Ok(v) => {
                filled = Some(v);
                server.stop();
            }
            Err(why) => {
                let e = MigrateError::Unconfirmed {
                    pid,
                    to,
                    why,
                    server: server.pid(),
                    dir: work.join(FINAL),
                    idle: server.idle,
                };
                // The server runs on on its own.
                std::mem::forget(server);
                return Err(e);
            }
        }
    }
    Ok(Switched {
        downtime_ms,
        bytes_sent: link.sent,
        dest_pid: running.pid,
        filled,
    })
}

/// Wait for the receiver's `D` (every page in), reconnecting when the
/// connection is lost; the fill itself may take as long as the link
/// needs, so only a connection that cannot be made again ends the wait.
fn wait_filled(link: &mut Link, opts: &MigrateOptions) -> Result<serde_json::Value, String> {
    link.ch
        .set_timeout(Duration::from_secs(24 * 3600))
        .map_err(|e| e.to_string())?;
    loop {
        match link.recv() {
            Ok(m) if m.first() == Some(&b'D') => {
                return serde_json::from_slice(&m[1..])
                    .map_err(|e| format!("a malformed fill report: {e}"));
            }
            Ok(m) if m.first() == Some(&b'E') => {
                return Err(String::from_utf8_lossy(&m[1..]).into());
            }
            Ok(_) => return Err("the receiver sent something else than the fill's end".into()),
            Err(e) => {
                tracing::warn!(
                    pid = opts.pid,
                    "waiting for the fill's end: {e}; connecting again"
                );
                link.reconnect(Instant::now() + opts.retry_for)
                    .map_err(|e2| format!("{e}; then {e2}"))?;
                link.send(&proto::msg(b'Q', b""))
                    .map_err(|e| e.to_string())?;
                link.ch
                    .set_timeout(Duration::from_secs(24 * 3600))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
}
