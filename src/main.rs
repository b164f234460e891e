//! `tern`: the command-line front. Parses arguments, calls the `tracker`
//! (capture) and `restorer` (read back) libraries, prints one JSON object
//! with `--json` (one per line for `track`), logs to stderr.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use images::NewImageDir;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracker::backend::TrackMode;
use tracker::session::{SessionOptions, TrackingSession};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Checkpoint a running Linux process while it keeps running"
)]
struct Cli {
    /// Log verbosity on stderr (error, warn, info, debug, trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Probe the kernel features tern relies on and say which backend `auto`
    /// picks; with `-t PID`, also whether that process could be dumped and
    /// restored (exit 1 if not, listing what tern cannot restore).
    Check {
        /// A process to judge.
        #[arg(short = 't', long = "tree")]
        pid: Option<i32>,
        #[arg(long)]
        json: bool,
    },
    /// Copy the pages a running process changed since its previous pre-dump.
    PreDump {
        /// Target process.
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// Directory to write the image into (created; must not hold an image).
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// The previous image of this process: write only what changed since.
        #[arg(long)]
        prev_images_dir: Option<PathBuf>,
        /// Dirty-tracking backend.
        #[arg(long, value_enum, default_value_t = Track::Auto)]
        track: Track,
        /// Do not use the eBPF dirty stream.
        #[arg(long)]
        no_ebpf: bool,
        /// Store pages uncompressed.
        #[arg(long)]
        no_compress: bool,
        /// Put the image on stable storage (fsync) before reporting success.
        #[arg(long)]
        fsync: bool,
        /// Deadline, in milliseconds, of every wait on the target.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Final, stop-the-world dump: the last dirty pages and every piece of
    /// the process's state; the target is killed afterwards unless
    /// --leave-running.
    Dump {
        #[arg(short = 't', long = "tree")]
        pid: i32,
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// The last pre-dump of this process: copy only what changed since.
        #[arg(long)]
        prev_images_dir: Option<PathBuf>,
        /// Let the process run on after the dump.
        #[arg(long)]
        leave_running: bool,
        /// Re-read every page of the frozen process and compare it with the
        /// image chain; a mismatch fails the dump and leaves the target running.
        #[arg(long)]
        verify: bool,
        #[arg(long, value_enum, default_value_t = Track::Auto)]
        track: Track,
        /// Compress the final pages (costs frozen time).
        #[arg(long)]
        compress: bool,
        /// With --prev-images-dir: copy rounds while the target still runs
        /// (into DIR/live), at most this many, before freezing it; 0 freezes
        /// at once.
        #[arg(long, default_value_t = 10)]
        live_rounds: usize,
        /// The live rounds stop once one copies at most this many pages.
        #[arg(long, default_value_t = 256)]
        live_done_pages: u64,
        /// Report success once the image is complete in the page cache,
        /// without putting it (and its parents) on stable storage.
        #[arg(long)]
        no_fsync: bool,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Recreate a dumped process (same PID and TIDs) from its image chain.
    Restore {
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// Return once the process runs instead of waiting for it.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Write the restored PID to this file.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Run the process at once and bring its anonymous memory in behind
        /// it through userfaultfd: faults answered first, the rest pushed in
        /// the background (tern stays until every page is in; with
        /// --detach a `tern lazy-pages` daemon does).
        #[arg(long)]
        lazy_pages: bool,
        /// How memory built eagerly goes in: `uffd` (UFFDIO_COPY, falling
        /// back to `write` where the kernel will not register the memory)
        /// or `write` (process_vm_writev, /proc/PID/mem where read-only).
        #[arg(long = "fill", value_enum, default_value_t = FillModeArg::Uffd)]
        fill_mode: FillModeArg,
        #[command(flatten)]
        fill: FillArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// The page service of a lazy restore: with --resume, take over the
    /// fill of a restored process whose service is gone (killed, or
    /// started detached) and finish it.
    LazyPages {
        /// Take over a process restored with --lazy-pages.
        #[arg(long)]
        resume: bool,
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// The image it was restored from.
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        #[command(flatten)]
        fill: FillArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Serve the pages of an image chain over TCP to any number of
    /// restores at once (`tern restore --page-server`), authenticated and
    /// encrypted with a key of `tern keygen`; runs until killed.
    PageServer {
        /// The image (its parents are served with it).
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// Address and port to listen on (port 0: any free one, printed).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// The pre-shared key file (`tern keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Exit once no client has been connected for this many seconds
        /// (0: serve until killed).
        #[arg(long, value_name = "S", default_value_t = 0.0)]
        exit_idle_s: f64,
        /// Listen (and say so) first, open the image once stdin has a line
        /// or ends (`tern migrate` starts its server before the image is
        /// written).
        #[arg(long, hide = true)]
        open_on_stdin: bool,
        /// Print one JSON object once listening.
        #[arg(long)]
        json: bool,
    },
    /// Move a running process to another host (`tern receive` there):
    /// pre-copy rounds while it runs, then a frozen switch-over that fits
    /// --downtime-ms, post-copy if the rest would not.
    Migrate {
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// The receiver, `ADDR:PORT`.
        #[arg(long, value_name = "ADDR:PORT")]
        to: String,
        /// The pre-shared key file (`tern keygen`), the receiver's too.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The frozen time to aim for.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// `auto`: post-copy when the rest, sent frozen, would not fit
        /// --downtime-ms or would freeze it a quarter longer than
        /// post-copy; `always`; `never`.
        #[arg(long, value_enum, default_value_t = PostCopyArg::Auto)]
        post_copy: PostCopyArg,
        #[arg(long, value_enum, default_value_t = Track::Auto)]
        track: Track,
        #[arg(long)]
        no_ebpf: bool,
        /// Pre-copy rounds at most.
        #[arg(long, default_value_t = 30)]
        max_rounds: usize,
        /// Where the rounds are written before they are sent (a private
        /// directory is made in it, removed once the migration is done).
        #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
        work_dir: PathBuf,
        /// Once the source is killed for the switch: how long a lost
        /// connection to the receiver is tried again.
        #[arg(long, default_value_t = 30)]
        retry_s: u64,
        #[arg(long, default_value_t = 10000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Receive one migration (`tern migrate --to` this address) into DIR,
    /// run the process here, and wait for it as `tern restore` does.
    Receive {
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// Return once every page is in instead of waiting for the process.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Write the migrated process's PID to this file once it runs.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// How long the held copy waits for a source whose connection was
        /// lost after it was told the copy is ready.
        #[arg(long, default_value_t = 30)]
        retry_s: u64,
        #[arg(long, value_enum, default_value_t = PrefetchArg::Hot)]
        prefetch: PrefetchArg,
        #[arg(long, default_value_t = 10000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Make a pre-shared key for a page server and its clients (mode 0600;
    /// an existing file is never overwritten).
    Keygen {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Telemetry only: pages dirtied per interval, kernel against eBPF.
    Track {
        #[arg(short = 't', long = "tree")]
        pid: i32,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[arg(long, default_value_t = 5)]
        rounds: u64,
        /// Dirty-tracking backend (`full` tracks nothing, so it is not offered).
        #[arg(long, value_enum, default_value_t = TelemetryTrack::Auto)]
        track: TelemetryTrack,
        #[arg(long)]
        no_ebpf: bool,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Show an image chain: its images, VMAs and page counts.
    Show {
        dir: PathBuf,
        /// Also list every VMA of the newest image.
        #[arg(long)]
        vmas: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove what pre-dumps leave in a target between invocations (the
    /// tracking userfaultfd, the scratch page, eBPF pins).
    Untrack {
        #[arg(short = 't', long = "tree")]
        pid: i32,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
}

/// Where a restore's pages are when they are not in its directory.
#[derive(clap::Args, Clone)]
struct RemoteArgs {
    /// Read the pages from this `tern page-server` (the images directory
    /// holds everything else: copy it without its pages.img files).
    #[arg(long, value_name = "ADDR:PORT", requires = "key")]
    page_server: Option<String>,
    /// The pre-shared key file shared with the page server.
    #[arg(long, value_name = "FILE", requires = "page_server")]
    key: Option<PathBuf>,
    /// How long a lost page server is retried before the restore (or a
    /// lazy restore's process) fails, in seconds.
    #[arg(long, default_value_t = 30, requires = "page_server")]
    page_server_retry_s: u64,
}

impl RemoteArgs {
    fn connect(&self, timeout_ms: u64) -> Result<Option<restorer::remote::Remote>> {
        let (Some(addr), Some(key)) = (&self.page_server, &self.key) else {
            return Ok(None);
        };
        let key = wire::Key::load(key)?;
        let src = restorer::remote::RemoteSource::connect(restorer::remote::RemoteOptions {
            addr: addr.clone(),
            key,
            timeout: Duration::from_millis(timeout_ms.max(1000)),
            retry_for: Duration::from_secs(self.page_server_retry_s),
        })
        .with_context(|| format!("connecting to the page server {addr}"))?;
        Ok(Some(restorer::remote::Remote(src)))
    }

    fn args(&self) -> Vec<String> {
        match (&self.page_server, &self.key) {
            (Some(a), Some(k)) => vec![
                "--page-server".into(),
                a.clone(),
                "--key".into(),
                k.display().to_string(),
                "--page-server-retry-s".into(),
                self.page_server_retry_s.to_string(),
            ],
            _ => Vec::new(),
        }
    }
}

/// How a lazy restore's background fill goes.
#[derive(clap::Args, Clone, Copy)]
struct FillArgs {
    /// Which pages the background fill pushes first.
    #[arg(long, value_enum, default_value_t = PrefetchArg::Hot)]
    prefetch: PrefetchArg,
    /// Limit the background fill to this many MB/s (0: no limit).
    #[arg(long, default_value_t = 0)]
    prefetch_mb_s: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum PostCopyArg {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, ValueEnum)]
enum FillModeArg {
    Uffd,
    Write,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrefetchArg {
    /// The pages written last first: the final dump's, the live rounds',
    /// then each pre-dump's, newest first.
    Hot,
    /// In address order.
    Address,
    /// None: pages come only when the process faults on them.
    None,
}

impl FillArgs {
    fn options(
        self,
        timeout_ms: u64,
        remote: Option<restorer::remote::Remote>,
    ) -> restorer::service::ServiceOptions {
        restorer::service::ServiceOptions {
            remote,
            prefetch: match self.prefetch {
                PrefetchArg::Hot => restorer::lazy::Prefetch::Hot,
                PrefetchArg::Address => restorer::lazy::Prefetch::Address,
                PrefetchArg::None => restorer::lazy::Prefetch::None,
            },
            rate_mb_s: self.prefetch_mb_s,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn args(self) -> Vec<String> {
        vec![
            "--prefetch".into(),
            match self.prefetch {
                PrefetchArg::Hot => "hot",
                PrefetchArg::Address => "address",
                PrefetchArg::None => "none",
            }
            .into(),
            "--prefetch-mb-s".into(),
            self.prefetch_mb_s.to_string(),
        ]
    }
}

/// `--track` of `pre-dump` and `dump`: the dirty-tracking backend.
#[derive(Clone, Copy, ValueEnum)]
enum Track {
    /// The best one this kernel has (`tern check` says which).
    Auto,
    /// Async userfaultfd write-protect with PAGEMAP_SCAN (Linux 6.7+).
    UffdWp,
    /// The kernel's soft-dirty page bits (x86_64 with CONFIG_MEM_SOFT_DIRTY).
    SoftDirty,
    /// No tracking: every round copies every populated page.
    Full,
}

/// `--track` of `track`: `full` tracks nothing, so it is not offered.
#[derive(Clone, Copy, ValueEnum)]
enum TelemetryTrack {
    /// The best one this kernel has (`tern check` says which).
    Auto,
    /// Async userfaultfd write-protect with PAGEMAP_SCAN (Linux 6.7+).
    UffdWp,
    /// The kernel's soft-dirty page bits (x86_64 with CONFIG_MEM_SOFT_DIRTY).
    SoftDirty,
}

impl From<Track> for TrackMode {
    fn from(t: Track) -> TrackMode {
        match t {
            Track::Auto => TrackMode::Auto,
            Track::UffdWp => TrackMode::UffdWp,
            Track::SoftDirty => TrackMode::SoftDirty,
            Track::Full => TrackMode::Full,
        }
    }
}

impl From<TelemetryTrack> for TrackMode {
    fn from(t: TelemetryTrack) -> TrackMode {
        match t {
            TelemetryTrack::Auto => TrackMode::Auto,
            TelemetryTrack::UffdWp => TrackMode::UffdWp,
            TelemetryTrack::SoftDirty => TrackMode::SoftDirty,
        }
    }
}

fn main() {
    // Before any thread: freed memory stays for reuse (a restore's path to
    // a running process is mostly first touches of fresh memory otherwise).
    sys::heap::keep_freed_memory();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A span's close says how long it took: the restore's steps.
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        // A log that can no longer be written (the terminal closed, the
        // reader of a pipe killed) is dropped: the subscriber's own report
        // of it would panic, and a dump's guardian must finish its work on
        // the target whatever became of tern's stderr.
        .log_internal_errors(false)
        .init();
    if let Err(e) = run(cli.cmd) {
        eprintln!("tern: error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each said once: a cause whose text an outer
/// message already carries (most errors print their source) is not
/// repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if out.contains(&m) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&m);
    }
    out
}

/// Whether `text` names `PID pid` (not a longer number starting with it).
fn names_pid(text: &str, pid: i32) -> bool {
    let needle = format!("PID {pid}");
    text.match_indices(&needle).any(|(i, _)| {
        !text[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// `e` with a context saying what failed (`verb`, of which PID, into or
/// from which directory), leaving out what `e` already names: an error
/// says each thing once.
fn failed(
    verb: &str,
    pid: Option<i32>,
    dir: Option<(&str, &Path)>,
    e: impl Into<anyhow::Error>,
) -> anyhow::Error {
    let e = e.into();
    let inner = describe(&e);
    let mut ctx = verb.to_string();
    if let Some(pid) = pid
        && !names_pid(&inner, pid)
    {
        ctx.push_str(&format!(" of PID {pid}"));
    }
    if let Some((prep, d)) = dir
        && !inner.contains(&d.display().to_string())
    {
        ctx.push_str(&format!(" {prep} {}", d.display()));
    }
    e.context(ctx)
}

/// The verbs that act on processes need root: refuse at once otherwise,
/// saying why (not with the first permission error met on the way).
fn require_root(verb: &str) -> Result<()> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!(
            "tern {verb} needs root (this is uid {euid}): it traces other processes (ptrace, with seccomp suspended), keeps its state in /run/tern and its eBPF programs in /sys/fs/bpf, and a restore picks PIDs; run it as root (e.g. with sudo)"
        );
    }
    Ok(())
}

fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).expect("serializable"));
}

fn run(cmd: Cmd) -> Result<()> {
    match &cmd {
        Cmd::PreDump { .. } => require_root("pre-dump")?,
        Cmd::Dump { .. } => require_root("dump")?,
        Cmd::Restore { .. } => require_root("restore")?,
        Cmd::LazyPages { .. } => require_root("lazy-pages")?,
        Cmd::PageServer { .. } => require_root("page-server")?,
        Cmd::Migrate { .. } => require_root("migrate")?,
        Cmd::Receive { .. } => require_root("receive")?,
        Cmd::Track { .. } => require_root("track")?,
        Cmd::Untrack { .. } => require_root("untrack")?,
        Cmd::Check { .. } | Cmd::Show { .. } | Cmd::Keygen { .. } => {}
    }
    match cmd {
        Cmd::Check { pid, json } => check(pid, json),
        Cmd::PreDump {
            pid,
            dir,
            prev_images_dir,
            track,
            no_ebpf,
            no_compress,
            fsync,
            timeout_ms,
            json,
        } => {
            let track = TrackMode::from(track);
            pre_dump(
                pid,
                &dir,
                prev_images_dir.as_deref(),
                track,
                !no_ebpf,
                !no_compress,
                fsync,
                timeout_ms,
                json,
            )
        }
        Cmd::Track {
            pid,
            interval_ms,
            rounds,
            track: mode,
            no_ebpf,
            timeout_ms,
            json,
        } => {
            let mode = TrackMode::from(mode);
            track(pid, interval_ms, rounds, mode, !no_ebpf, timeout_ms, json)
        }
        Cmd::Show { dir, vmas, json } => show(&dir, vmas, json),
        Cmd::Dump {
            pid,
            dir,
            prev_images_dir,
            leave_running,
            verify,
            track,
            compress,
            live_rounds,
            live_done_pages,
            no_fsync,
            timeout_ms,
            json,
        } => {
            let track = TrackMode::from(track);
            dump(
                pid,
                &dir,
                prev_images_dir.as_deref(),
                &tracker::dump::DumpOptions {
                    track,
                    compress,
                    leave_running,
                    timeout: Duration::from_millis(timeout_ms),
                    live: tracker::session::LivePolicy {
                        max_rounds: live_rounds,
                        done_pages: live_done_pages,
                    },
                    fsync: !no_fsync,
                    hold: None,
                },
                verify,
                json,
            )
        }
        Cmd::Restore {
            dir,
            detach,
            pidfile,
            lazy_pages,
            fill_mode,
            fill,
            remote,
            timeout_ms,
            json,
        } => restore(
            &dir,
            detach,
            pidfile.as_deref(),
            lazy_pages.then_some(fill),
            &remote,
            match fill_mode {
                FillModeArg::Uffd => restorer::fill::FillMode::Uffd,
                FillModeArg::Write => restorer::fill::FillMode::Write,
            },
            timeout_ms,
            json,
        ),
        Cmd::LazyPages {
            resume,
            pid,
            dir,
            fill,
            remote,
            timeout_ms,
            json,
        } => {
            if !resume {
                bail!(
                    "tern lazy-pages serves a process restored with --lazy-pages: give --resume -t PID -D DIR (a lazy restore starts its own service)"
                );
            }
            lazy_pages(pid, &dir, fill, &remote, timeout_ms, json)
        }
        Cmd::PageServer {
            dir,
            listen,
            key,
            exit_idle_s,
            open_on_stdin,
            json,
        } => {
            let key = wire::Key::load(&key)?;
            let idle = (exit_idle_s > 0.0)
                .then(|| Duration::try_from_secs_f64(exit_idle_s))
                .transpose()
                .context("--exit-idle-s")?;
            let before_open = open_on_stdin.then(|| {
                Box::new(|| {
                    let mut line = String::new();
                    let _ = std::io::stdin().read_line(&mut line);
                }) as Box<dyn FnOnce()>
            });
            restorer::remote::serve_pages(&dir, &listen, key, idle, before_open, |l| {
                if json {
                    let mut v = serde_json::to_value(l).expect("serializable");
                    v["pid"] = std::process::id().into();
                    print_json(&v);
                } else {
                    eprintln!(
                        "serving the pages of {} ({} images) on {}",
                        l.dir.display(),
                        l.images,
                        l.listen
                    );
                }
            })
            .map_err(|e| failed("page-server", None, Some(("of", &dir)), e))
        }
        Cmd::Migrate {
            pid,
            to,
            key,
            downtime_ms,
            post_copy,
            track,
            no_ebpf,
            max_rounds,
            work_dir,
            retry_s,
            timeout_ms,
            json,
        } => {
            let opts = migrate::MigrateOptions {
                pid,
                to,
                key: wire::Key::load(&key)?,
                key_file: key,
                downtime: Duration::from_millis(downtime_ms),
                post_copy: match post_copy {
                    PostCopyArg::Auto => migrate::PostCopy::Auto,
                    PostCopyArg::Always => migrate::PostCopy::Always,
                    PostCopyArg::Never => migrate::PostCopy::Never,
                },
                track: TrackMode::from(track),
                ebpf: !no_ebpf,
                work_dir,
                timeout: Duration::from_millis(timeout_ms),
                retry_for: Duration::from_secs(retry_s),
                max_rounds,
                tern: std::env::current_exe().context("finding tern's own executable")?,
            };
            migrate_cmd(&opts, json)
        }
        Cmd::Receive {
            listen,
            key,
            dir,
            detach,
            pidfile,
            retry_s,
            prefetch,
            timeout_ms,
            json,
        } => {
            let opts = migrate::ReceiveOptions {
                listen,
                key: wire::Key::load(&key)?,
                dir,
                timeout: Duration::from_millis(timeout_ms),
                retry_for: Duration::from_secs(retry_s),
                prefetch: FillArgs {
                    prefetch,
                    prefetch_mb_s: 0,
                }
                .options(timeout_ms, None)
                .prefetch,
            };
            receive_cmd(&opts, detach, pidfile.as_deref(), json)
        }
        Cmd::Keygen { file, json } => {
            wire::Key::write_new(&file)?;
            if json {
                print_json(&serde_json::json!({ "key_file": file.display().to_string() }));
            } else {
                eprintln!(
                    "wrote a new key to {} (mode 0600): give it to both ends",
                    file.display()
                );
            }
            Ok(())
        }
        Cmd::Untrack {
            pid,
            timeout_ms,
            json,
        } => {
            let u = tracker::session::untrack(pid, Duration::from_millis(timeout_ms))
                .map_err(|e| failed("untrack", Some(pid), None, e))?;
            if json {
                print_json(&u);
            } else {
                println!(
                    "PID {pid}: closed tracking fds {:?}, removed {} scratch page(s), eBPF pins removed: {}",
                    u.uffd_fds_closed, u.scratch_pages_removed, u.ebpf_unpinned
                );
            }
            Ok(())
        }
    }
}

fn check(pid: Option<i32>, json: bool) -> Result<()> {
    let p = tracker::check::Probes::all();
    let backend = p.best_backend().name();
    let kernel = tracker::check::kernel_release();
    if let Some(pid) = pid {
        let fail = |e| failed("check", Some(pid), None, e);
        tracker::session::check_target(pid).map_err(fail)?;
        let refusals = tracker::restorable::refusals(pid)
            .map_err(tracker::session::TrackerError::from)
            .map_err(fail)?;
        let restorable = refusals.is_empty();
        if json {
            print_json(&serde_json::json!({
                "pid": pid,
                "restorable": restorable,
                "refusals": refusals,
                "kernel": kernel,
                "arch": std::env::consts::ARCH,
                "backend": backend,
            }));
        } else if restorable {
            println!("PID {pid} can be dumped and restored (tracking backend {backend})");
        } else {
            println!("{}", tracker::restorable::describe(pid, &refusals));
        }
        if !restorable {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(1);
        }
        return Ok(());
    }
    if json {
        let features: serde_json::Map<String, serde_json::Value> = p
            .as_pairs()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        print_json(&serde_json::json!({
            "kernel": kernel,
            "arch": std::env::consts::ARCH,
            "features": features,
            "backend": backend,
        }));
    } else {
        println!("kernel {kernel} ({})", std::env::consts::ARCH);
        for (name, ok) in p.as_pairs() {
            let what = tracker::check::USES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, w)| *w)
                .unwrap_or("");
            println!("{:<23} {:<4} {what}", name, if ok { "yes" } else { "no" });
        }
        println!("{:<23} {backend}", "backend (auto)");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn pre_dump(
    pid: i32,
    dir: &Path,
    prev: Option<&Path>,
    track: TrackMode,
    ebpf: bool,
    compress: bool,
    fsync: bool,
    timeout_ms: u64,
    json: bool,
) -> Result<()> {
    let fail = |e| failed("pre-dump", Some(pid), Some(("into", dir)), e);
    // Check the cheap things before touching the target.
    if let Some(p) = prev {
        images::Inventory::load(p).with_context(|| format!("--prev-images-dir {}", p.display()))?;
    }
    // The first pre-dump tells early what the final dump would refuse.
    if prev.is_none() {
        tracker::session::check_target(pid).map_err(fail)?;
        tracker::restorable::ensure(pid).map_err(fail)?;
    }
    let new_dir = NewImageDir::prepare(dir)?;
    let opts = SessionOptions {
        track,
        ebpf,
        compress,
        timeout: Duration::from_millis(timeout_ms),
        pin_ebpf: true,
    };
    let mut s = TrackingSession::attach(pid, opts).map_err(fail)?;
    let report = s.pre_dump(dir, prev).map_err(fail)?;
    s.detach();
    if fsync {
        images::sync_image(dir).map_err(|e| {
            failed(
                "pre-dump",
                Some(pid),
                Some(("into", dir)),
                anyhow::Error::from(e).context(
                    "the image is complete, but could not be put on stable storage (--fsync)",
                ),
            )
        })?;
    }
    new_dir.keep();
    if json {
        print_json(&report);
    } else {
        println!(
            "pre-dump of PID {pid} into {} ({}{}): {} pages written ({} zero), {} bytes, {:.1} ms, frozen {:.2} ms",
            dir.display(),
            report.backend,
            if report.ebpf { " + eBPF" } else { "" },
            report.pages_written,
            report.pages_zero,
            report.bytes_written,
            report.duration_ms,
            report.frozen_ms
        );
    }
    Ok(())
}

fn dump(
    pid: i32,
    dir: &Path,
    prev: Option<&Path>,
    opts: &tracker::dump::DumpOptions,
    verify: bool,
    json: bool,
) -> Result<()> {
    if let Some(p) = prev {
        images::Inventory::load(p).with_context(|| format!("--prev-images-dir {}", p.display()))?;
    }
    let new_dir = NewImageDir::prepare(dir)?;
    let report = match tracker::dump::dump(pid, dir, prev, opts, verify) {
        Ok(r) => r,
        Err(e) => {
            if e.target_killed() {
                // The image is all there is of the process now: keep it.
                new_dir.keep();
            } else if let Ok(d) = images::ImageDir::create(dir) {
                // A complete image that failed verification is not usable.
                let _ = d.remove_file(images::INVENTORY_FILE);
            }
            return Err(failed("dump", Some(pid), Some(("into", dir)), e));
        }
    };
    new_dir.keep();
    if json {
        print_json(&report);
    } else {
        if !report.live_rounds.is_empty() {
            let pages: Vec<String> = report
                .live_rounds
                .iter()
                .map(|r| r.pages.to_string())
                .collect();
            println!(
                "live pre-copy of PID {pid}: {} rounds in {:.1} ms, pages per round {}",
                report.live_rounds.len(),
                report.live_ms,
                pages.join(", ")
            );
        }
        println!(
            "dump of PID {pid} into {}: {} threads, {} VMAs, {} pages written, {} bytes, frozen {:.1} ms, {:.1} ms in all{}{}",
            dir.display(),
            report.threads,
            report.vmas,
            report.pages_written,
            report.bytes_written,
            report.frozen_ms,
            report.duration_ms,
            match &report.verify {
                Some(v) => format!(", verified {} pages", v.pages_checked),
                None => String::new(),
            },
            if report.killed {
                "; the process was killed"
            } else {
                "; the process runs on"
            }
        );
        let parts: Vec<String> = report
            .frozen_parts
            .sequential()
            .iter()
            .filter(|(_, ms)| *ms >= 0.05)
            .map(|(name, ms)| format!("{name} {ms:.1}"))
            .collect();
        println!(
            "frozen window (ms): {}; beside the scan and copy, the state capture took {:.1} and the checks {:.1}",
            parts.join(", "),
            report.frozen_parts.state_ms,
            report.frozen_parts.checks_ms
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn restore(
    dir: &Path,
    detach: bool,
    pidfile: Option<&Path>,
    lazy: Option<FillArgs>,
    remote_args: &RemoteArgs,
    fill: restorer::fill::FillMode,
    timeout_ms: u64,
    json: bool,
) -> Result<()> {
    let remote = remote_args.connect(timeout_ms)?;
    let restored = restorer::restore::restore(
        dir,
        &restorer::restore::RestoreOptions {
            timeout: Duration::from_millis(timeout_ms),
            lazy: lazy.is_some(),
            fill,
            remote: remote.clone(),
            gate: None,
        },
    )
    .map_err(|e| failed("restore", None, Some(("from", dir)), e))?;
    let pid = restored.pid;
    if let Some(f) = pidfile {
        write_pidfile(f, pid).with_context(|| format!("--pidfile {}", f.display()))?;
    }
    let report = restored.report;
    let say = |lazy: Option<&restorer::service::LazyStats>| {
        eprintln!(
            "restored PID {pid} from {} in {:.1} ms ({} pages, {} threads){}",
            dir.display(),
            report.restore_ms,
            report.pages_restored,
            report.threads,
            lazy.map(|l| format!(
                "; {} pages lazily in {:.1} ms ({} faults, p50 {:.1} us, p99 {:.1} us, {} pushed)",
                l.pages, l.fill_ms, l.faults, l.fault_us_p50, l.fault_us_p99, l.prefetched
            ))
            .unwrap_or_default()
        );
    };
    match (restored.lazy, lazy) {
        (Some((chain, handoff)), Some(fill)) => {
            if detach {
                // The service becomes a daemon of its own: `tern lazy-pages
                // --resume`, which takes the userfaultfd from the process.
                drop(chain);
                let service = spawn_lazy_daemon(pid, dir, fill, remote_args, timeout_ms)?;
                drop(handoff);
                if json {
                    let mut v = serde_json::to_value(&report).expect("serializable");
                    v["lazy_service"] = serde_json::json!({
                        "pid": service,
                        "stats": dir.join(LAZY_STATS).display().to_string(),
                    });
                    print_json(&v);
                } else {
                    say(None);
                    eprintln!(
                        "lazy pages served by PID {service}; figures in {} when done",
                        dir.join(LAZY_STATS).display()
                    );
                }
                return Ok(());
            }
            let stats = restorer::service::serve(chain, handoff, &fill.options(timeout_ms, remote))
                .map_err(|e| failed("lazy pages", Some(pid), Some(("from", dir)), e))?;
            if json {
                let mut v = serde_json::to_value(&report).expect("serializable");
                v["lazy"] = serde_json::to_value(&stats).expect("serializable");
                print_json(&v);
            } else {
                say(Some(&stats));
            }
        }
        _ => {
            if json {
                print_json(&report);
            } else {
                say(None);
            }
            if detach {
                return Ok(());
            }
        }
    }
    if detach {
        return Ok(());
    }
    // Wait for the process (our child) and exit as it did.
    use nix::sys::wait::{WaitStatus, waitpid};
    let code = match waitpid(nix::unistd::Pid::from_raw(pid), None) {
        Ok(WaitStatus::Exited(_, code)) => code,
        Ok(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
        Ok(_) => 1,
        Err(e) => bail!("waiting for restored PID {pid}: {e}"),
    };
    std::process::exit(code);
}

fn migrate_cmd(opts: &migrate::MigrateOptions, json: bool) -> Result<()> {
    let pid = opts.pid;
    let r = migrate::migrate(opts).map_err(|e| failed("migrate", Some(pid), None, e))?;
    if json {
        print_json(&r);
    } else {
        eprintln!(
            "PID {pid} moved to {} (PID {} there) in {:.0} ms: {} rounds ({}), downtime {:.1} ms (predicted {:.1}), {} bytes sent{}",
            r.to,
            r.destination.pid,
            r.total_ms,
            r.rounds.len(),
            r.stop,
            r.downtime_ms,
            r.predicted_downtime_ms,
            r.bytes_sent,
            if r.post_copy {
                format!(", {} pages post-copy", r.post_copy_pages)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn receive_cmd(
    opts: &migrate::ReceiveOptions,
    detach: bool,
    pidfile: Option<&Path>,
    json: bool,
) -> Result<()> {
    // PID 1 of its namespace: were it to return, the kernel would kill
    // the process with it.
    if detach && std::process::id() == 1 {
        bail!(
            "tern receive runs as PID 1 of its PID namespace: with --detach its exit would kill the migrated process; leave --detach out"
        );
    }
    let r = migrate::receive(opts, |addr| {
        eprintln!(
            "receiving a migration on {addr} into {}",
            opts.dir.display()
        );
    })
    .map_err(|e| failed("receive", None, Some(("into", &opts.dir)), e))?;
    let pid = r.pid;
    if let Some(f) = pidfile {
        write_pidfile(f, pid).with_context(|| format!("--pidfile {}", f.display()))?;
    }
    if json {
        print_json(&r);
    } else {
        eprintln!(
            "PID {pid} runs here ({:.1} ms after the switch); {} pages in after {:.1} ms{}",
            r.restore_ms,
            r.lazy.pages,
            r.lazy.fill_ms,
            if r.post_copy {
                format!(", {} from the source after it ran", r.post_copy_pages)
            } else {
                String::new()
            }
        );
    }
    if detach {
        return Ok(());
    }
    // Wait for the process (our child) and exit as it did; as PID 1 of a
    // namespace, reap whatever else is left to us meanwhile.
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => std::process::exit(code),
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => {
                std::process::exit(128 + sig as i32)
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => bail!("waiting for the migrated PID {pid}: {e}"),
        }
    }
}

/// Where a detached page service leaves its figures (and its error).
const LAZY_STATS: &str = "lazy-stats.json";
/// Its log (stderr).
const LAZY_LOG: &str = "lazy-pages.log";

/// Start `tern lazy-pages --resume` for `pid` as a daemon (its own session,
/// stdio away from ours, stderr into DIR/lazy-pages.log) and wait until it
/// serves (holds the service lock) or fails.
fn spawn_lazy_daemon(
    pid: i32,
    dir: &Path,
    fill: FillArgs,
    remote: &RemoteArgs,
    timeout_ms: u64,
) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let d = images::ImageDir::create(dir)?;
    let log = d.open_or_create_file(LAZY_LOG)?;
    log.set_len(0)?;
    let exe = std::env::current_exe().context("finding tern's own executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["lazy-pages", "--resume", "-t", &pid.to_string(), "-D"])
        .arg(dir)
        .args(fill.args())
        .args(remote.args())
        .args(["--timeout-ms", &timeout_ms.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the page service of PID {pid}"))?;
    let service = i32::try_from(child.id()).context("service PID")?;
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        if restorer::service::ServiceLock::held(pid) {
            return Ok(service);
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join(LAZY_LOG)).unwrap_or_default();
            bail!(
                "the page service of PID {pid} (tern lazy-pages, PID {service}) exited ({status}) before serving: {}; the process waits for its pages: run `tern lazy-pages --resume -t {pid} -D {}`",
                log.trim(),
                dir.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the page service of PID {pid} (tern lazy-pages, PID {service}) did not start serving within {timeout_ms} ms; see {}",
                dir.join(LAZY_LOG).display()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn lazy_pages(
    pid: i32,
    dir: &Path,
    fill: FillArgs,
    remote: &RemoteArgs,
    timeout_ms: u64,
    json: bool,
) -> Result<()> {
    let res = remote.connect(timeout_ms).and_then(|r| {
        Ok(restorer::service::resume(
            pid,
            dir,
            &fill.options(timeout_ms, r),
        )?)
    });
    // The figures (or the error) also go to DIR/lazy-stats.json: a
    // detached service has no one reading its stdout.
    let record = match &res {
        Ok(stats) => serde_json::json!({ "pid": pid, "lazy": stats }),
        Err(e) => serde_json::json!({ "pid": pid, "error": e.to_string() }),
    };
    let written = images::ImageDir::create(dir).and_then(|d| {
        d.write_atomic(
            LAZY_STATS,
            &serde_json::to_vec(&record).expect("serializable"),
            false,
        )
    });
    let stats = res.map_err(|e| failed("lazy pages", Some(pid), Some(("from", dir)), e))?;
    if let Err(e) = written {
        tracing::warn!(pid, "writing {}: {e}", dir.join(LAZY_STATS).display());
    }
    if json {
        print_json(&record);
    } else {
        eprintln!(
            "PID {pid}: {} pages lazily in {:.1} ms ({} faults, p50 {:.1} us, p99 {:.1} us, {} pushed, {} already in)",
            stats.pages,
            stats.fill_ms,
            stats.faults,
            stats.fault_us_p50,
            stats.fault_us_p99,
            stats.prefetched,
            stats.already_in
        );
    }
    Ok(())
}

/// Write `pid` to `file` as a new file renamed over it: never through a
/// link planted there, never truncating a file hard-linked to it.
fn write_pidfile(file: &Path, pid: i32) -> Result<()> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .context("not a file name")?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let d = images::ImageDir::create(parent)?;
    d.write_atomic(name, format!("{pid}\n").as_bytes(), false)?;
    Ok(())
}

fn track(
    pid: i32,
    interval_ms: u64,
    rounds: u64,
    mode: TrackMode,
    ebpf: bool,
    timeout_ms: u64,
    json: bool,
) -> Result<()> {
    let mode =
        tracker::session::resolve_backend(mode).map_err(|e| failed("track", Some(pid), None, e))?;
    if mode == TrackMode::Full {
        anyhow::bail!(
            "track PID {pid}: this kernel has neither async uffd write-protect with PAGEMAP_SCAN (Linux 6.7+) nor soft-dirty bits, so there is no dirty tracking to report (`tern check` lists what it found)"
        );
    }
    let opts = SessionOptions {
        track: mode,
        ebpf,
        compress: false,
        timeout: Duration::from_millis(timeout_ms),
        pin_ebpf: false,
    };
    let mut s =
        TrackingSession::attach(pid, opts).map_err(|e| failed("track", Some(pid), None, e))?;
    let interval = Duration::from_millis(interval_ms.max(1));
    let t0 = Instant::now();
    let res = (|| -> Result<()> {
        s.arm()?;
        let mut last = Instant::now();
        for round in 1..=rounds {
            std::thread::sleep(interval.saturating_sub(last.elapsed()));
            let dt = last.elapsed();
            last = Instant::now();
            let r = s.track_round(round, t0.elapsed().as_secs_f64() * 1e3, dt)?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "round {:>3} t={:>8.1} ms {} kernel {:>8} ebpf {:>8} both {:>8} kernel-only {:>6} ebpf-only {:>6} {:>9.1} MB/s",
                    r.round,
                    r.t_ms,
                    r.backend,
                    r.kernel_pages,
                    r.ebpf_pages,
                    r.both,
                    r.kernel_only,
                    r.ebpf_only,
                    r.dirty_rate_mb_s
                );
            }
        }
        Ok(())
    })();
    // Leave the target exactly as found, whatever happened.
    let torn = s.finish_track();
    res.map_err(|e| failed("track", Some(pid), None, e))?;
    torn.map_err(|e| failed("removing tracking", Some(pid), None, e))?;
    Ok(())
}

fn show(dir: &Path, vmas: bool, json: bool) -> Result<()> {
    let chain =
        restorer::ImageChain::open(dir).map_err(|e| failed("show", None, Some(("of", dir)), e))?;
    let summary = chain.summary();
    let newest = chain.newest();
    if json {
        let v: Vec<_> = newest
            .mm
            .vmas
            .iter()
            .map(|v| {
                let pages = |k| {
                    newest
                        .pagemap
                        .overlapping(v.range())
                        .filter(|e| e.kind == k)
                        .map(|e| e.range().intersect(&v.range()).map_or(0, |r| r.pages()))
                        .sum::<u64>()
                };
                serde_json::json!({
                    "start": format!("{:#x}", v.start), "end": format!("{:#x}", v.end),
                    "perms": v.perms, "name": v.name, "dumped": v.dumped,
                    "pages": (v.end - v.start) / images::PAGE_SIZE,
                    "data_pages": pages(images::PageKind::Data),
                    "zero_pages": pages(images::PageKind::Zero),
                    "hole_pages": pages(images::PageKind::Hole),
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "dir": dir.display().to_string(),
            "images": summary,
            "vmas": v,
        }));
        return Ok(());
    }
    println!("chain of {} image(s), newest first:", summary.len());
    println!(
        "{:<4} {:<10} {:<9} {:>6} {:>10} {:>10} {:>10} {:>12}  dir",
        "#", "kind", "backend", "vmas", "data", "zero", "holes", "stored"
    );
    for (i, s) in summary.iter().enumerate() {
        println!(
            "{:<4} {:<10} {:<9} {:>6} {:>10} {:>10} {:>10} {:>12}  {}",
            i,
            format!("{:?}", s.kind),
            s.backend,
            s.vmas,
            s.data_pages,
            s.zero_pages,
            s.hole_pages,
            s.bytes_stored,
            s.dir
        );
    }
    if vmas {
        println!("VMAs of the newest image:");
        for v in &newest.mm.vmas {
            println!(
                "{:#014x}-{:#014x} {} {:>8} pages {} {}",
                v.start,
                v.end,
                v.perms,
                (v.end - v.start) / images::PAGE_SIZE,
                if v.dumped { "dumped" } else { "      " },
                v.name.as_deref().unwrap_or("")
            );
        }
    }
    Ok(())
}
