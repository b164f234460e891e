//! `bench restore`: eager and lazy restore of `hotloop`, tern beside CRIU.
//!
//! The workload is `hotloop --sleep-ms 0 --hot-at-end --report-ms 5`: a busy
//! loop rewriting a hot set at the *end* of its memory (an address-order
//! prefetch reaches it last), printing its progress (CLOCK_REALTIME
//! stamps, running counts of page writes) and a `resumed` line when it runs
//! again after a stop. Its throughput before the dump is the baseline.
//!
//! tern: 3 pre-dumps (100 ms apart), the final dump, then from the same
//! image `repeats` restores each of: eager (`tern restore --json`), lazy
//! with `--prefetch hot` and lazy with `--prefetch address`
//! (`tern restore --lazy-pages --json`, whose JSON comes once every page is
//! in). CRIU: on a fresh `hotloop` of the same size, a plain `criu dump`
//! (CRIU cannot pre-dump on a kernel without soft-dirty), then `repeats`
//! eager restores (`criu restore -d`) and lazy restores (`criu lazy-pages`
//! started first, then `criu restore -d --lazy-pages`).
//!
//! Per restore, all from the driver's spawn of the restoring command
//! (`t0`, CLOCK_REALTIME: see `crate::real_ns`):
//! - `restore_ms`: the tool's own figure (tern: `restore_ms`; CRIU: the
//!   `Restore time` of `--display-stats`);
//! - `runs_ms`: until the restored hotloop printed `resumed` (it checks
//!   the clock every 64 page writes);
//! - `all_in_ms`: until every page is in (eager: the tool's report; tern
//!   lazy: its JSON, printed after the fill; CRIU lazy: `criu lazy-pages`
//!   exits once it has transferred everything);
//! - `full_speed_ms`: until the start of the first 20 ms (four 5 ms
//!   progress windows) in which every window runs at 80% of the baseline
//!   or more (of the restored process's steady rate, its last 250 ms of
//!   the 500 ms watched after every page is in, if that is lower: other
//!   load on the machine); `slow_ms` = `full_speed_ms - runs_ms`;
//! - `unstalled_ms`: the same at 25%: no longer waiting for its pages
//!   (while a fill runs, it shares the 2 cores with the workload, which
//!   then runs below full speed whatever the prefetch order);
//! - tern lazy only: fault latency p50/p99, fill time and rate.
//!
//! The fill's floor, measured in the same run (`uffdio_copy_floor`):
//! `UFFDIO_COPY` alone into missing memory of this process, in the fill's
//! 128 KiB chunks from a source already in memory (see
//! `uffd::measure_copy_floor`), once while the workload runs (as the fill
//! does: the workload keeps one of the 2 cores) and once with the machine
//! otherwise idle.
//!
//! Results: `target/bench/restore.json` and the table on stdout.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::real_ns;
use crate::run::{
    criu_stat_ms, criu_version, kill, run_deadline, spawn_until_ready, tern_json, wait_deadline,
    wait_gone,
};
use crate::uffd::median;

pub struct Opts {
    pub tern: PathBuf,
    pub bin_dir: PathBuf,
    pub out: PathBuf,
    /// CRIU's command (a script that runs it), or why there is none.
    pub criu: std::result::Result<PathBuf, String>,
    /// (resident MiB, hot MiB)
    pub configs: Vec<(u64, u64)>,
    pub repeats: usize,
}

/// The restores each configuration runs, in this order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    TernEager,
    TernLazyHot,
    TernLazyAddress,
    CriuEager,
    CriuLazy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::TernEager => "tern eager",
            Mode::TernLazyHot => "tern lazy, prefetch hot",
            Mode::TernLazyAddress => "tern lazy, prefetch address",
            Mode::CriuEager => "CRIU eager",
            Mode::CriuLazy => "CRIU lazy-pages",
        }
    }
}

/// The chunk of tern's lazy fill (`FILL_CHUNK` in the page service).
const FILL_CHUNK: usize = 128 << 10;

/// The fill floor over at most this much memory (the rate does not change
/// with size beyond it).
const FLOOR_MIB: u64 = 1024;

fn copy_floor(mib: u64) -> Result<Value> {
    let mib = usize::try_from(mib.min(FLOOR_MIB))?;
    let f = crate::uffd::measure_copy_floor(mib, FILL_CHUNK, 3)
        .context("measuring the UFFDIO_COPY floor")?;
    Ok(json!({
        "mib": f.mib, "chunk_kib": f.chunk_kib, "reps": f.reps,
        "mb_s": f.mb_s, "min_mb_s": f.min_mb_s, "max_mb_s": f.max_mb_s,
    }))
}

/// The progress report interval of hotloop, ms.
const REPORT_MS: u64 = 5;
/// Full speed: this many consecutive progress windows...
const FULL_WINDOWS: usize = 4;
/// ...each at this fraction of the baseline or more.
const FULL_FRACTION: f64 = 0.8;
/// No longer stalled on missing pages: four consecutive windows at this
/// fraction of the reference or more. While a background fill runs, the
/// fill and the workload share this machine's 2 cores (with whatever else
/// runs), which holds the workload well below its full speed whatever the
/// prefetch order; this threshold says when the pages it uses are in.
const UNSTALLED_FRACTION: f64 = 0.25;
/// How long a restored hotloop is watched after every page is in...
const WATCH_AFTER: Duration = Duration::from_millis(500);
/// ...the last part of which gives its steady rate.
const STEADY_NS: u64 = 250_000_000;
/// Deadline for a restore (4 GiB eager: a few seconds) and for CRIU's dump.
const DEADLINE: Duration = Duration::from_secs(120);

/// What hotloop printed: `(t_ns, page writes)` progress points and the
/// `resumed` stamps.
#[derive(Default)]
struct Progress {
    points: Vec<(u64, u64)>,
    resumed: Vec<u64>,
}

impl Progress {
    fn parse(text: &str) -> Progress {
        let mut p = Progress::default();
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["progress", t, _sweeps, pages] => {
                    if let (Ok(t), Ok(n)) = (t.parse(), pages.parse()) {
                        p.points.push((t, n));
                    }
                }
                ["resumed", t, _gap] => {
                    if let Ok(t) = t.parse() {
                        p.resumed.push(t);
                    }
                }
                _ => {}
            }
        }
        p
    }

    /// Page writes per second of each window between two points in
    /// `[from, to]`: `(window start, rate)`.
    fn rates(&self, from: u64, to: u64) -> Vec<(u64, f64)> {
        let pts: Vec<_> = self
            .points
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .collect();
        pts.windows(2)
            .filter(|w| w[1].0 > w[0].0 && w[1].1 >= w[0].1)
            .map(|w| {
                let dt = (w[1].0 - w[0].0) as f64 / 1e9;
                (w[0].0, (w[1].1 - w[0].1) as f64 / dt)
            })
            .collect()
    }
}

/// A workload process, our child (killed on drop if still there).
struct Workload {
    child: Child,
    pid: i32,
    log: PathBuf,
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_hotloop(opts: &Opts, work: &Path, mib: u64, hot: u64) -> Result<Workload> {
    let log = work.join("hotloop.out");
    // O_APPEND: every restored hotloop (tern and CRIU restore the file's
    // offset) adds its lines after what earlier runs printed.
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot create {}", log.display()))?;
    let mut cmd = Command::new(opts.bin_dir.join("hotloop"));
    cmd.args([
        "--mib",
        &mib.to_string(),
        "--hot-mib",
        &hot.to_string(),
        "--drift-pages-per-ms",
        "0",
        "--sleep-ms",
        "0",
        "--hot-at-end",
        "--report-ms",
        &REPORT_MS.to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(out.try_clone()?)
    .stderr(out);
    let (child, pid) = spawn_until_ready(&mut cmd, &log, Duration::from_secs(120))?;
    Ok(Workload { child, pid, log })
}

/// The median throughput (page writes/s) of the workload over `window`
/// from now.
fn baseline(log: &Path, window: Duration) -> Result<f64> {
    let from = real_ns();
    std::thread::sleep(window);
    let to = real_ns();
    let text = std::fs::read_to_string(log)?;
    let mut rates: Vec<f64> = Progress::parse(&text)
        .rates(from, to)
        .into_iter()
        .map(|r| r.1)
        .collect();
    if rates.len() < 10 {
        bail!(
            "hotloop reported {} progress windows in {window:?}: it does not run",
            rates.len()
        );
    }
    Ok(median(&mut rates))
}

/// The lines a command prints on stdout, each with the time it arrived.
fn stamped_lines(child: &mut Child) -> mpsc::Receiver<(u64, String)> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((real_ns(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

/// What the driver saw of one restore.
struct Seen {
    t0: u64,
    /// Every page in, by the tool's word.
    all_in: Option<u64>,
    tool: Value,
}

/// One tern restore of `dir` of workload `pid` (its log `log`).
fn tern_restore(opts: &Opts, dir: &Path, pid: i32, mode: Mode, work: &Path) -> Result<Seen> {
    wait_gone(pid, Duration::from_secs(10))?;
    let mut cmd = Command::new(&opts.tern);
    cmd.args(["restore", "-D"]).arg(dir).arg("--json");
    match mode {
        Mode::TernLazyHot => {
            cmd.args(["--lazy-pages", "--prefetch", "hot"]);
        }
        Mode::TernLazyAddress => {
            cmd.args(["--lazy-pages", "--prefetch", "address"]);
        }
        _ => {}
    }
    let errlog = work.join("tern-restore.err");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&errlog)?);
    let t0 = real_ns();
    let mut child = cmd.spawn().context("cannot start tern restore")?;
    let lines = stamped_lines(&mut child);
    let got = lines.recv_timeout(DEADLINE);
    let result = match got {
        Ok((t, line)) => serde_json::from_str::<Value>(line.trim())
            .with_context(|| format!("tern restore printed {line:?}, not JSON"))
            .map(|v| (t, v)),
        Err(_) => Err(anyhow::anyhow!(
            "tern restore -D {} printed nothing within {DEADLINE:?}",
            dir.display()
        )),
    };
    if let Ok((t, _)) = &result {
        let until = Duration::from_nanos(t.saturating_sub(real_ns())) + WATCH_AFTER;
        std::thread::sleep(until);
    }
    // Stop the restored process; tern, which waits for it, exits then.
    kill(pid);
    let status = wait_deadline(&mut child, Duration::from_secs(30));
    let err = std::fs::read_to_string(&errlog).unwrap_or_default();
    let (t, v) = result.with_context(|| format!("tern said: {}", err.trim()))?;
    status.with_context(|| {
        format!("tern restore of PID {pid} did not exit after its process was killed")
    })?;
    Ok(Seen {
        t0,
        all_in: Some(t),
        tool: v,
    })
}

/// One CRIU restore of `dir` (eager or lazy).
fn criu_restore(criu: &Path, dir: &Path, pid: i32, mode: Mode) -> Result<Seen> {
    wait_gone(pid, Duration::from_secs(10))?;
    let mut daemon = None;
    if mode == Mode::CriuLazy {
        let sock = dir.join("lazy-pages.socket");
        let _ = std::fs::remove_file(&sock);
        let d = Command::new(criu)
            .args(["lazy-pages", "-D"])
            .arg(dir)
            .args(["-o", "lazy-pages.log", "-v2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start `criu lazy-pages`")?;
        daemon = Some(d);
        // It listens on DIR/lazy-pages.socket.
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(10) {
                if let Some(mut d) = daemon {
                    let _ = d.kill();
                    let _ = d.wait();
                }
                bail!(
                    "`criu lazy-pages -D {}` made no socket within 10 s; see {}",
                    dir.display(),
                    dir.join("lazy-pages.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut cmd = Command::new(criu);
    cmd.args(["restore", "-D"]).arg(dir).args([
        "-d",
        "--display-stats",
        "-o",
        "restore.log",
        "-v2",
    ]);
    if mode == Mode::CriuLazy {
        cmd.arg("--lazy-pages");
    }
    let t0 = real_ns();
    let out = run_deadline(&mut cmd, "criu restore", DEADLINE);
    let t_exit = real_ns();
    let mut all_in = Some(t_exit);
    let mut problem = None;
    if let Some(mut d) = daemon {
        match wait_deadline(&mut d, DEADLINE) {
            Ok(st) if st.success() => all_in = Some(real_ns()),
            Ok(st) => {
                all_in = None;
                problem = Some(format!(
                    "`criu lazy-pages` failed ({st}); see {}",
                    dir.join("lazy-pages.log").display()
                ));
            }
            Err(e) => {
                all_in = None;
                problem = Some(format!("`criu lazy-pages`: {e:#}"));
            }
        }
    }
    if let Ok(o) = &out
        && o.status.success()
    {
        std::thread::sleep(WATCH_AFTER);
    }
    kill(pid);
    let out = out?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`criu restore -D {}` failed ({}): {} (log: {})",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            dir.join("restore.log").display()
        );
    }
    if let Some(p) = problem {
        bail!("{p}");
    }
    Ok(Seen {
        t0,
        all_in,
        tool: json!({
            "restore_ms": criu_stat_ms(&stdout, "Restore time").or_else(|| criu_stat_ms(&String::from_utf8_lossy(&out.stderr), "Restore time")),
            "wall_ms": (t_exit - t0) as f64 / 1e6,
            "stats": stdout.trim(),
        }),
    })
}

/// Read what the workload printed since `offset`; measure the restore.
fn measure(log: &Path, offset: u64, seen: &Seen, base: f64, mode: Mode) -> Result<Value> {
    let mut f = File::open(log)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let p = Progress::parse(&text);
    let t0 = seen.t0;
    let ms = |t: u64| t.saturating_sub(t0) as f64 / 1e6;
    let resumed = p
        .resumed
        .iter()
        .copied()
        .find(|&t| t >= t0)
        .with_context(|| {
            format!(
                "{}: the restored hotloop never printed `resumed` (see {})",
                mode.name(),
                log.display()
            )
        })?;
    let rates = p.rates(resumed, u64::MAX);
    // The restored process's own steady rate: its windows in the last
    // STEADY of the watch, when every page is in. On this shared 2-core
    // machine other load can hold it below the baseline for the whole
    // watch; full speed is then measured against the lower of the two
    // (the report keeps both).
    let last = rates.last().map_or(0, |r| r.0);
    let mut tail: Vec<f64> = rates
        .iter()
        .filter(|(t, _)| last.saturating_sub(*t) <= STEADY_NS)
        .map(|r| r.1)
        .collect();
    let steady = median(&mut tail);
    let reference = if steady.is_nan() {
        base
    } else {
        base.min(steady)
    };
    let full = rates
        .windows(FULL_WINDOWS)
        .find(|w| w.iter().all(|(_, r)| *r >= FULL_FRACTION * reference))
        .map(|w| w[0].0);
    let unstalled = rates
        .windows(FULL_WINDOWS)
        .find(|w| w.iter().all(|(_, r)| *r >= UNSTALLED_FRACTION * reference))
        .map(|w| w[0].0);
    let tool = &seen.tool;
    let lazy = &tool["lazy"];
    Ok(json!({
        "mode": mode.name(),
        "restore_ms": tool["restore_ms"].as_f64(),
        "runs_ms": ms(resumed),
        "all_in_ms": seen.all_in.map(ms),
        "full_speed_ms": full.map(ms),
        "slow_ms": full.map(|f| ms(f) - ms(resumed)),
        "unstalled_ms": unstalled.map(ms),
        "windows_after": rates.len(),
        "steady_page_writes_s": steady,
        // The first windows after the restore: (ms from t0, M page
        // writes/s), to see where the time below full speed goes.
        "trace": rates.iter().take(80).map(|(t, r)| json!([(ms(*t) * 10.0).round() / 10.0, (r / 1e5).round() / 10.0])).collect::<Vec<_>>(),
        "steady_vs_baseline": steady / base,
        "fault_us_p50": lazy["fault_us_p50"].as_f64(),
        "fault_us_p99": lazy["fault_us_p99"].as_f64(),
        "faults": lazy["faults"].as_u64(),
        "fill_ms": lazy["fill_ms"].as_f64(),
        "fill_mb_s": lazy["fill_mb_s"].as_f64(),
        "tool": tool,
    }))
}

/// Medians of the numeric fields of `runs`.
fn medians(runs: &[Value]) -> Value {
    let mut m = serde_json::Map::new();
    for key in [
        "restore_ms",
        "runs_ms",
        "all_in_ms",
        "full_speed_ms",
        "slow_ms",
        "unstalled_ms",
        "fault_us_p50",
        "fault_us_p99",
        "fill_ms",
        "fill_mb_s",
    ] {
        let mut xs: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
        if !xs.is_empty() {
            m.insert(key.into(), json!(median(&mut xs)));
        }
    }
    Value::Object(m)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// One restore and its measure, logged.
#[allow(clippy::too_many_arguments)]
fn one_restore(
    opts: &Opts,
    dir: &Path,
    pid: i32,
    log: &Path,
    base: f64,
    mode: Mode,
    work: &Path,
    started: Instant,
) -> Result<Value> {
    let offset = file_len(log);
    let seen = match mode {
        Mode::CriuEager | Mode::CriuLazy => {
            let criu = opts.criu.as_ref().expect("CRIU runs only when present");
            criu_restore(criu, dir, pid, mode)?
        }
        _ => tern_restore(opts, dir, pid, mode, work)?,
    };
    let r = measure(log, offset, &seen, base, mode)?;
    let f = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.1}"));
    eprintln!(
        "[{:6.1}s]   {}: restore {} ms, runs {} ms, unstalled {} ms, full speed {} ms, all in {} ms, faults p50/p99 {}/{} us, fill {} MB/s",
        started.elapsed().as_secs_f64(),
        mode.name(),
        f("restore_ms"),
        f("runs_ms"),
        f("unstalled_ms"),
        f("full_speed_ms"),
        f("all_in_ms"),
        f("fault_us_p50"),
        f("fault_us_p99"),
        f("fill_mb_s"),
    );
    Ok(r)
}

/// All restores of one configuration.
fn config(opts: &Opts, mib: u64, hot: u64, started: Instant) -> Result<Value> {
    let work = opts.out.join("tmp-restore");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut cases = Vec::new();

    // tern: 3 pre-dumps, the dump, the restores.
    let w = start_hotloop(opts, &work, mib, hot)?;
    let pid = w.pid;
    let mut prev: Option<PathBuf> = None;
    let mut pre = Vec::new();
    for i in 0..3 {
        let d = work.join(format!("pre{i}"));
        let mut a = vec![
            "pre-dump".to_string(),
            "-t".into(),
            pid.to_string(),
            "-D".into(),
            d.display().to_string(),
            "--json".into(),
        ];
        if let Some(p) = &prev {
            a.extend(["--prev-images-dir".into(), p.display().to_string()]);
        }
        pre.push(tern_json(&opts.tern, &a)?);
        prev = Some(d);
        std::thread::sleep(Duration::from_millis(100));
    }
    let base = baseline(&w.log, Duration::from_millis(500))?;
    // The fill floor beside the running workload.
    let floor_busy = copy_floor(mib)?;
    let dir = work.join("dump");
    let mut a = vec![
        "dump".to_string(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        dir.display().to_string(),
        "--json".into(),
    ];
    if let Some(p) = &prev {
        a.extend(["--prev-images-dir".into(), p.display().to_string()]);
    }
    let dump = tern_json(&opts.tern, &a);
    let log = w.log.clone();
    drop(w); // reaps the killed original
    let dump = dump?;
    eprintln!(
        "[{:6.1}s] {mib} MiB, {hot} MiB hot at the end: baseline {:.1} M page writes/s; 3 pre-dumps, dump of {} pages (frozen {:.1} ms)",
        started.elapsed().as_secs_f64(),
        base / 1e6,
        dump["pages_written"],
        dump["frozen_ms"].as_f64().unwrap_or(f64::NAN)
    );
    for mode in [Mode::TernEager, Mode::TernLazyHot, Mode::TernLazyAddress] {
        let mut runs = Vec::new();
        for _ in 0..opts.repeats {
            runs.push(
                one_restore(opts, &dir, pid, &log, base, mode, &work, started)
                    .with_context(|| format!("{mib} MiB: {}", mode.name()))?,
            );
        }
        cases.push(json!({"mode": mode.name(), "median": medians(&runs), "runs": runs}));
    }
    wait_gone(pid, Duration::from_secs(10))?;
    let floor_idle = copy_floor(mib)?;
    eprintln!(
        "[{:6.1}s] {mib} MiB: UFFDIO_COPY floor (one thread, {} KiB chunks): {:.0} MB/s beside the workload, {:.0} MB/s idle",
        started.elapsed().as_secs_f64(),
        FILL_CHUNK >> 10,
        floor_busy["mb_s"].as_f64().unwrap_or(f64::NAN),
        floor_idle["mb_s"].as_f64().unwrap_or(f64::NAN),
    );
    // The next images need the room.
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    // CRIU: a plain dump of a fresh hotloop, then its restores.
    let mut criu_base = None;
    if let Ok(criu) = &opts.criu {
        let w = start_hotloop(opts, &work, mib, hot)?;
        let pid = w.pid;
        let base = baseline(&w.log, Duration::from_millis(500))?;
        criu_base = Some(base);
        let dir = work.join("criu");
        std::fs::create_dir_all(&dir)?;
        let t = Instant::now();
        let out = run_deadline(
            Command::new(criu)
                .args(["dump", "-t", &pid.to_string(), "-D"])
                .arg(&dir)
                .args(["-o", "dump.log", "-v2", "--display-stats"]),
            "criu dump",
            DEADLINE,
        );
        let dump_ms = t.elapsed().as_secs_f64() * 1e3;
        let log = w.log.clone();
        drop(w);
        let out = out?;
        if !out.status.success() {
            bail!(
                "`criu dump -t {pid}` failed ({}): {}; see {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                dir.join("dump.log").display()
            );
        }
        eprintln!(
            "[{:6.1}s] {mib} MiB: CRIU baseline {:.1} M page writes/s; criu dump (no pre-dump: CRIU's needs soft-dirty, which this kernel lacks) {dump_ms:.0} ms",
            started.elapsed().as_secs_f64(),
            base / 1e6,
        );
        // CRIU checks a regular file's size at restore against the dump's:
        // every restore starts from the dumped length of the log.
        let dumped_len = file_len(&log);
        for mode in [Mode::CriuEager, Mode::CriuLazy] {
            let mut runs = Vec::new();
            for _ in 0..opts.repeats {
                let r = one_restore(opts, &dir, pid, &log, base, mode, &work, started)
                    .with_context(|| format!("{mib} MiB: {}", mode.name()));
                wait_gone(pid, Duration::from_secs(10))?;
                OpenOptions::new()
                    .write(true)
                    .open(&log)?
                    .set_len(dumped_len)?;
                runs.push(r?);
            }
            cases.push(json!({"mode": mode.name(), "median": medians(&runs), "runs": runs}));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(json!({
        "resident_mib": mib,
        "hot_mib": hot,
        "baseline_page_writes_s": base,
        "criu_baseline_page_writes_s": criu_base,
        "pre_dumps": pre,
        "dump": dump,
        "uffdio_copy_floor": {"beside_workload": floor_busy, "idle": floor_idle},
        "cases": cases,
    }))
}

pub fn run(opts: &Opts) -> Result<()> {
    std::fs::create_dir_all(&opts.out)?;
    // Restored processes whose restorer exits (criu restore -d) become our
    // children: we reap them ourselves instead of waiting for PID 1, which
    // is slow here, so that the next restore finds the PID free.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let started = Instant::now();
    let criu_note = match &opts.criu {
        Ok(c) => format!(
            "CRIU: {} ({}); plain dump, no pre-dumps (CRIU pre-dumps need soft-dirty, which this kernel lacks); restore_ms is its --display-stats `Restore time`",
            c.display(),
            criu_version(c)
        ),
        Err(why) => format!("CRIU not run: {why}"),
    };
    eprintln!("{criu_note}");
    let mut results = Vec::new();
    for &(mib, hot) in &opts.configs {
        results.push(
            config(opts, mib, hot, started).with_context(|| format!("{mib} MiB, {hot} MiB hot"))?,
        );
    }
    let report = json!({
        "benchmark": "restore",
        "machine": crate::tracking::machine(),
        "criu": criu_note,
        "repeats": opts.repeats,
        "full_speed": format!("{FULL_WINDOWS} consecutive {REPORT_MS} ms windows at >= {FULL_FRACTION} of the pre-dump throughput (or of the steady rate after the fill, if lower)"),
        "elapsed_s": started.elapsed().as_secs_f64(),
        "results": results,
    });
    let path = opts.out.join("restore.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    print_table(&report);
    println!("{criu_note}");
    println!("wrote {}", path.display());
    Ok(())
}

fn print_table(report: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    println!(
        "\n| workload | restore | tool's restore_ms | runs after (wall) | unstalled after | full speed after | all pages in | fault p50 / p99 us | fill MB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in report["results"].as_array().into_iter().flatten() {
        for c in r["cases"].as_array().into_iter().flatten() {
            let m = &c["median"];
            println!(
                "| {} MiB, {} MiB hot | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
                r["resident_mib"],
                r["hot_mib"],
                c["mode"].as_str().unwrap_or(""),
                f(&m["restore_ms"]),
                f(&m["runs_ms"]),
                f(&m["unstalled_ms"]),
                f(&m["full_speed_ms"]),
                f(&m["all_in_ms"]),
                f(&m["fault_us_p50"]),
                f(&m["fault_us_p99"]),
                f(&m["fill_mb_s"]),
            );
        }
    }
    println!("(times in ms from the spawn of the restoring command; medians)");
    // Ratios, CRIU's figure over tern's (above 1: tern is faster).
    for r in report["results"].as_array().into_iter().flatten() {
        let case = |mode: Mode| {
            r["cases"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["mode"] == mode.name())
                .map(|c| c["median"].clone())
        };
        let ratio = |a: &Option<Value>, b: &Option<Value>, k: &str| match (
            a.as_ref().and_then(|v| v[k].as_f64()),
            b.as_ref().and_then(|v| v[k].as_f64()),
        ) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
            _ => "-".into(),
        };
        let (hot, addr) = (case(Mode::TernLazyHot), case(Mode::TernLazyAddress));
        let (ce, cl, te) = (
            case(Mode::CriuEager),
            case(Mode::CriuLazy),
            case(Mode::TernEager),
        );
        println!(
            "{} MiB: prefetch address / hot: unstalled {}, full speed {}; CRIU lazy / tern lazy hot: runs {}, unstalled {}, full speed {}, all in {}; CRIU eager / tern eager: runs {}",
            r["resident_mib"],
            ratio(&addr, &hot, "unstalled_ms"),
            ratio(&addr, &hot, "full_speed_ms"),
            ratio(&cl, &hot, "runs_ms"),
            ratio(&cl, &hot, "unstalled_ms"),
            ratio(&cl, &hot, "full_speed_ms"),
            ratio(&cl, &hot, "all_in_ms"),
            ratio(&ce, &te, "runs_ms"),
        );
        let floor = &r["uffdio_copy_floor"];
        let fill = |c: &Option<Value>| c.as_ref().and_then(|v| v["fill_mb_s"].as_f64());
        let of = |fill: Option<f64>, k: &str| match (fill, floor[k]["mb_s"].as_f64()) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
            _ => "-".into(),
        };
        println!(
            "{} MiB: UFFDIO_COPY floor {} MB/s beside the workload, {} MB/s idle; fill / floor beside the workload: hot {}, address {}",
            r["resident_mib"],
            floor["beside_workload"]["mb_s"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.0}")),
            floor["idle"]["mb_s"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.0}")),
            of(fill(&hot), "beside_workload"),
            of(fill(&addr), "beside_workload"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_rates_and_resume() {
        let p = Progress::parse(
            "ready pid=1\nprogress 1000000000 1 100\nresumed 2000000000 900000000\nprogress 2005000000 2 200\nprogress 2010000000 3 300\ngarbage\n",
        );
        assert_eq!(p.resumed, vec![2_000_000_000]);
        let r = p.rates(2_000_000_000, u64::MAX);
        assert_eq!(r.len(), 1);
        assert!((r[0].1 - 20_000.0).abs() < 1e-6);
    }
}
