//! `bench tracking`: what dirty tracking costs a write-heavy workload.
//!
//! For each resident size, one `dirtier` process runs every mode in turn, so
//! that all of them see the same physical memory layout:
//! untracked windows (the baseline), then `uffd-noebpf`, baseline again,
//! `uffd-ebpf`, baseline, `full`, baseline. A tracked mode is compared with
//! the baseline windows measured right before and right after it.
//!
//! - `uffd-ebpf` / `uffd-noebpf`: `tern pre-dump --track uffd-wp` rounds every
//!   `period` ms (or back to back when a round takes longer), with and
//!   without the eBPF dirty stream; an initial pre-dump (full copy) first;
//! - `full`: `tern pre-dump --track full` rounds (each copies everything).
//!
//! Each mode runs every working-set fraction in turn: a `frac F` command to the
//! workload, one priming round (so the window starts with everything
//! protected), then windows of rounds. Every round is a separate
//! `tern pre-dump --json` invocation chained with `--prev-images-dir`, images
//! in `<out>/tmp`, older ones deleted as we go.
//!
//! Per window: T (window length), C (page writes the workload made in it, from
//! its progress lines), F (first writes that faulted: the sum of the rounds'
//! `pages_written`, since each page written since the previous scan faulted
//! exactly once). With U the untracked throughput (same process and fraction):
//! slowdown = U / (C/T), and the cost per tracked first write
//! = (T - C/U) / F, to compare with the per-fault floor (a first write to an
//! async-WP page, measured here without tern by `crate::uffd`, and 1.15 us when
//! first measured on the build machine with a C probe). The lost time T - C/U is also split into the part while a
//! `tern` invocation ran and the part between invocations.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::mono_ns;
use crate::uffd::{measure_floor, median};

/// The per-fault floor first measured on the build machine (a C probe of
/// uffd-WP and PAGEMAP_SCAN), kept as a fixed reference beside each run's own.
pub const REFERENCE_FLOOR_US: f64 = 1.15;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Mode {
    None,
    /// The workload tracks itself (no tern): the floor for its access pattern.
    KernelWp,
    UffdEbpf,
    UffdNoEbpf,
    /// One `tern track --no-ebpf` (scan and re-protect every period, no
    /// copy, no image): what tracking alone costs, apart from copying.
    UffdTrack,
    Full,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::None,
        Mode::KernelWp,
        Mode::UffdTrack,
        Mode::UffdNoEbpf,
        Mode::UffdEbpf,
        Mode::Full,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::KernelWp => "kernel-wp",
            Mode::UffdEbpf => "uffd-ebpf",
            Mode::UffdNoEbpf => "uffd-noebpf",
            Mode::UffdTrack => "uffd-track",
            Mode::Full => "full",
        }
    }

    fn tern_args(self) -> &'static [&'static str] {
        match self {
            Mode::None | Mode::KernelWp | Mode::UffdTrack => &[],
            Mode::UffdEbpf => &["--track", "uffd-wp"],
            Mode::UffdNoEbpf => &["--track", "uffd-wp", "--no-ebpf"],
            Mode::Full => &["--track", "full", "--no-ebpf"],
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
}

pub struct Opts {
    pub tern: PathBuf,
    pub bin_dir: PathBuf,
    pub out: PathBuf,
    pub sizes_mib: Vec<u64>,
    pub fracs: Vec<f64>,
    pub modes: Vec<Mode>,
    /// Windows per configuration (medians are taken over them).
    pub repeats: usize,
    /// Time between the starts of two rounds.
    pub period_ms: u64,
    /// A window lasts at least this long and `min_rounds` rounds...
    pub window_ms: u64,
    pub min_rounds: usize,
    /// ...and at most `max_rounds` rounds.
    pub max_rounds: usize,
    /// Fewer windows once a fraction has taken this long.
    pub frac_budget_s: f64,
    /// Length of an untracked window.
    pub baseline_ms: u64,
    /// Pass `--no-compress` to tern unless set.
    pub compress: bool,
    /// Raise the priority of the workload and of tern (nice -20, inherited
    /// from this driver), so that other load on the machine disturbs less.
    pub nice: bool,
}

/// The `dirtier` workload process and its progress samples.
struct Dirtier {
    child: Child,
    stdin: ChildStdin,
    samples: Arc<Mutex<Vec<(u64, u64)>>>,
    lines: Receiver<String>,
}

impl Dirtier {
    fn start(bin_dir: &Path, mib: u64) -> Result<Dirtier> {
        let path = bin_dir.join("dirtier");
        let mut cmd = Command::new(&path);
        cmd.args(["--mib", &mib.to_string(), "--frac", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // SAFETY: prctl is async-signal-safe. The workload dies with the
        // driver (which may sit in a session of its own, out of reach of ^C).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let s = samples.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut w = line.split_whitespace();
                if w.next() == Some("p") {
                    let t = w.next().and_then(|x| x.parse().ok());
                    let c = w.next().and_then(|x| x.parse().ok());
                    if let (Some(t), Some(c)) = (t, c) {
                        s.lock().expect("samples").push((t, c));
                    }
                } else if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Dirtier {
            child,
            stdin,
            samples,
            lines,
        };
        let ready = d
            .line(Duration::from_secs(180))
            .context("dirtier did not get ready")?;
        if !ready.starts_with("ready") {
            bail!("dirtier said {ready:?} instead of ready");
        }
        Ok(d)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn line(&mut self, deadline: Duration) -> Result<String> {
        match self.lines.recv_timeout(deadline) {
            Ok(l) => Ok(l),
            Err(_) => {
                if let Ok(Some(st)) = self.child.try_wait() {
                    bail!("dirtier exited ({st})");
                }
                bail!("no answer from dirtier within {deadline:?}")
            }
        }
    }

    /// Switch the working set; returns its size in pages.
    fn set_frac(&mut self, frac: f64) -> Result<u64> {
        writeln!(self.stdin, "frac {frac}")?;
        self.stdin.flush()?;
        let ack = self.line(Duration::from_secs(60))?;
        let pages = ack
            .split_whitespace()
            .nth(3)
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("bad ack {ack:?}"))?;
        Ok(pages)
    }

    /// Page writes made between `t0` and `t1` (CLOCK_MONOTONIC ns),
    /// interpolated between progress samples; waits for a sample past `t1`.
    fn writes_between(&mut self, t0: u64, t1: u64) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let s = self.samples.lock().expect("samples");
                if s.last().is_some_and(|&(t, _)| t >= t1) {
                    return Ok(interpolate(&s, t1) - interpolate(&s, t0));
                }
            }
            if Instant::now() > deadline {
                bail!("the workload stopped reporting progress");
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("dirtier exited ({st})");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// One round of the `kernel-wp` mode: the workload's own PAGEMAP_SCAN.
    fn self_scan(&mut self) -> Result<RoundOut> {
        let t_start = mono_ns();
        writeln!(self.stdin, "scan")?;
        self.stdin.flush()?;
        let reply = self.line(Duration::from_secs(60))?;
        let t_end = mono_ns();
        let mut w = reply.split_whitespace();
        let (Some("scan"), Some(n), Some(ns)) = (w.next(), w.next(), w.next()) else {
            bail!("dirtier answered {reply:?} to scan");
        };
        let (Ok(n), Ok(ns)) = (n.parse::<u64>(), ns.parse::<u64>()) else {
            bail!("dirtier answered {reply:?} to scan");
        };
        Ok(RoundOut {
            t_start,
            t_end,
            json: json!({"pages_written": n, "duration_ms": ns as f64 / 1e6, "frozen_ms": 0.0}),
        })
    }

    fn self_unscan(&mut self) -> Result<()> {
        writeln!(self.stdin, "unscan")?;
        self.stdin.flush()?;
        let reply = self.line(Duration::from_secs(60))?;
        if reply != "unscan" {
            bail!("dirtier answered {reply:?} to unscan");
        }
        Ok(())
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn interpolate(s: &[(u64, u64)], t: u64) -> f64 {
    let i = s.partition_point(|&(ts, _)| ts < t);
    if i == 0 {
        return s.first().map_or(0.0, |&(_, c)| c as f64);
    }
    if i == s.len() {
        return s[i - 1].1 as f64;
    }
    let (ta, ca) = s[i - 1];
    let (tb, cb) = s[i];
    if tb == ta {
        return cb as f64;
    }
    ca as f64 + (cb as f64 - ca as f64) * (t - ta) as f64 / (tb - ta) as f64
}

/// One `tern pre-dump --json` round.
#[derive(Clone)]
struct RoundOut {
    t_start: u64,
    t_end: u64,
    json: Value,
}

impl RoundOut {
    fn num(&self, key: &str) -> f64 {
        self.json
            .get(key)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    }
}

/// Chained `tern pre-dump` invocations on one target.
struct Tern {
    bin: PathBuf,
    dir: PathBuf,
    pid: u32,
    args: Vec<String>,
    round: u32,
    kept: Vec<PathBuf>,
    used: bool,
}

impl Tern {
    fn new(bin: &Path, dir: PathBuf, pid: u32, mode: Mode, compress: bool) -> Result<Tern> {
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        let mut args: Vec<String> = mode.tern_args().iter().map(|s| s.to_string()).collect();
        if !compress {
            args.push("--no-compress".into());
        }
        Ok(Tern {
            bin: bin.to_path_buf(),
            dir,
            pid,
            args,
            round: 0,
            kept: Vec::new(),
            used: false,
        })
    }

    fn pre_dump(&mut self) -> Result<RoundOut> {
        self.round += 1;
        let dir = self.dir.join(self.round.to_string());
        let mut cmd = Command::new(&self.bin);
        cmd.args(["pre-dump", "-t", &self.pid.to_string(), "-D"])
            .arg(&dir);
        if let Some(prev) = self.kept.last() {
            cmd.arg("--prev-images-dir").arg(prev);
        }
        cmd.args(&self.args).arg("--json").stdin(Stdio::null());
        let t_start = mono_ns();
        self.used = true;
        let out = cmd.output().context("cannot run tern")?;
        let t_end = mono_ns();
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                show(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let json = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .find(Value::is_object)
            .or_else(|| serde_json::from_str::<Value>(text.trim()).ok())
            .with_context(|| format!("`{}` printed no JSON: {text:?}", show(&cmd)))?;
        // Keep the new image and its parent; older ones go (bounded disk use).
        self.kept.push(dir);
        while self.kept.len() > 2 {
            let old = self.kept.remove(0);
            let _ = fs::remove_dir_all(old);
        }
        Ok(RoundOut {
            t_start,
            t_end,
            json,
        })
    }

    fn untrack(&mut self) -> Result<()> {
        if !self.used {
            return Ok(());
        }
        self.used = false;
        let out = Command::new(&self.bin)
            .args(["untrack", "-t", &self.pid.to_string()])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "`tern untrack -t {}` failed ({}): {}",
                self.pid,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.untrack();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// One measurement window.
struct Window {
    t_ns: u64,
    writes: f64,
    /// Time and page writes while a `tern pre-dump` invocation ran.
    during_ns: u64,
    during_writes: f64,
    rounds: Vec<RoundOut>,
}

impl Window {
    fn copy(&self) -> Window {
        Window {
            t_ns: self.t_ns,
            writes: self.writes,
            during_ns: self.during_ns,
            during_writes: self.during_writes,
            rounds: self.rounds.clone(),
        }
    }
    fn secs(&self) -> f64 {
        self.t_ns as f64 / 1e9
    }
    fn throughput(&self) -> f64 {
        self.writes / self.secs()
    }
    /// Throughput while tern ran, and between its invocations.
    fn throughput_during(&self) -> f64 {
        self.during_writes / (self.during_ns as f64 / 1e9)
    }
    fn throughput_between(&self) -> f64 {
        (self.writes - self.during_writes) / ((self.t_ns - self.during_ns) as f64 / 1e9)
    }
    fn faults(&self) -> f64 {
        self.rounds
            .iter()
            .map(|r| r.num("pages_written"))
            .fold(0.0, |a, b| a + b)
    }
    fn json(&self) -> Value {
        json!({
            "t_ms": self.t_ns as f64 / 1e6,
            "writes": self.writes,
            "throughput_pws": self.throughput(),
            "during_rounds_ms": self.during_ns as f64 / 1e6,
            "throughput_during_rounds_pws": finite(self.throughput_during()),
            "throughput_between_rounds_pws": finite(self.throughput_between()),
            "first_writes": self.faults(),
            "rounds": self.rounds.iter().map(|r| {
                let mut j = r.json.clone();
                j["wall_ms"] = json!((r.t_end - r.t_start) as f64 / 1e6);
                j
            }).collect::<Vec<_>>(),
        })
    }
}

/// Per fraction: the fraction, its working-set pages, and the windows.
type PerFrac = Vec<(f64, u64, Vec<Window>)>;

/// The measurements of one tracked mode on one workload process.
struct ModeRun {
    mode: Mode,
    initial: Option<Value>,
    per_frac: PerFrac,
    /// Untracked windows per fraction, measured on the same process right
    /// before and right after this mode.
    baseline: Vec<Vec<Window>>,
}

/// Untracked windows for every fraction.
fn baseline(opts: &Opts, w: &mut Dirtier) -> Result<Vec<Vec<Window>>> {
    let mut all = Vec::new();
    for &frac in &opts.fracs {
        w.set_frac(frac)?;
        std::thread::sleep(Duration::from_millis(50));
        let mut windows = Vec::new();
        for _ in 0..opts.repeats {
            let t0 = mono_ns();
            std::thread::sleep(Duration::from_millis(opts.baseline_ms));
            let t1 = mono_ns();
            windows.push(Window {
                t_ns: t1 - t0,
                writes: w.writes_between(t0, t1)?,
                during_ns: 0,
                during_writes: 0.0,
                rounds: Vec::new(),
            });
        }
        all.push(windows);
    }
    Ok(all)
}

/// Run `mode` on the workload: the initial pre-dump (uffd modes), then for
/// every fraction a priming round and windows of rounds. Windows last at least
/// `window_ms` and `min_rounds` rounds, at most `max_rounds`; a fraction gets
/// `repeats` windows, fewer once it has used `frac_budget_s`.
fn run_tracked(
    opts: &Opts,
    w: &mut Dirtier,
    mib: u64,
    mode: Mode,
    log: &mut dyn FnMut(String),
) -> Result<(Option<Value>, PerFrac)> {
    if mode == Mode::UffdTrack {
        return run_track(opts, w, log).map(|p| (None, p));
    }
    let mut tern = if mode == Mode::KernelWp {
        None
    } else {
        Some(Tern::new(
            &opts.tern,
            opts.out.join("tmp").join(format!("{mib}-{}", mode.name())),
            w.pid(),
            mode,
            opts.compress,
        )?)
    };
    let uffd = mode != Mode::Full;
    let mut initial = None;
    if uffd {
        w.set_frac(0.0)?;
        let r = round(&mut tern, w).context("initial pre-dump")?;
        log(format!(
            "  initial pre-dump: pages_written {} duration_ms {:.1} wall_ms {:.1}",
            r.num("pages_written"),
            r.num("duration_ms"),
            (r.t_end - r.t_start) as f64 / 1e6
        ));
        let mut j = r.json.clone();
        j["wall_ms"] = json!((r.t_end - r.t_start) as f64 / 1e6);
        initial = Some(j);
    }
    let big = mib >= 4096;
    let min_rounds = if mode == Mode::Full && big {
        1
    } else {
        opts.min_rounds
    };
    let period = Duration::from_millis(opts.period_ms);
    let window_ns = opts.window_ms * 1_000_000;
    let budget = Duration::from_secs_f64(opts.frac_budget_s);
    let mut per_frac = Vec::new();
    for &frac in &opts.fracs {
        let ws_pages = w.set_frac(frac)?;
        let frac_start = Instant::now();
        // A priming round, so that the first window starts with everything
        // protected (uffd); `full` windows start with their first round.
        let mut t0 = if uffd {
            round(&mut tern, w).context("priming round")?.t_end
        } else {
            mono_ns()
        };
        let mut windows = Vec::new();
        for _ in 0..opts.repeats {
            let mut rs: Vec<RoundOut> = Vec::new();
            let mut next = Instant::now();
            let start = if uffd { t0 } else { mono_ns() };
            loop {
                next += period;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
                rs.push(round(&mut tern, w)?);
                let elapsed = rs.last().expect("a round").t_end - start;
                if rs.len() >= opts.max_rounds || (rs.len() >= min_rounds && elapsed >= window_ns) {
                    break;
                }
            }
            let t_first = if uffd { t0 } else { rs[0].t_start };
            let t1 = rs.last().expect("a round").t_end;
            let writes = w.writes_between(t_first, t1)?;
            let (mut during_ns, mut during_writes) = (0, 0.0);
            for r in &rs {
                during_ns += r.t_end - r.t_start;
                during_writes += w.writes_between(r.t_start, r.t_end)?;
            }
            let win = Window {
                t_ns: t1 - t_first,
                writes,
                during_ns,
                during_writes,
                rounds: rs,
            };
            log(format!(
                "  frac {frac}: {:.1} s, {:.2} M page-writes/s, {} first writes, rounds: {}",
                win.secs(),
                win.throughput() / 1e6,
                win.faults(),
                win.rounds
                    .iter()
                    .map(|r| format!("{}p/{:.0}ms", r.num("pages_written"), r.num("duration_ms")))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            windows.push(win);
            t0 = t1;
            if frac_start.elapsed() > budget {
                break;
            }
        }
        per_frac.push((frac, ws_pages, windows));
        if !w.alive() {
            bail!("the workload died");
        }
    }
    match tern.as_mut() {
        Some(t) => t.untrack()?,
        None => w.self_unscan()?,
    }
    if !w.alive() {
        bail!("the workload died after untrack");
    }
    Ok((initial, per_frac))
}

/// `uffd-track`: for every fraction one `tern track --no-ebpf` with the
/// same period, its first interval priming (everything protected), then
/// windows of `min_rounds` or more intervals (at least `window_ms`). A round
/// is one JSON line, stamped when it arrives; its pages are the kernel's.
fn run_track(opts: &Opts, w: &mut Dirtier, log: &mut dyn FnMut(String)) -> Result<PerFrac> {
    use std::io::BufRead;
    let per_window = opts
        .min_rounds
        .max(usize::try_from(opts.window_ms.div_ceil(opts.period_ms)).unwrap_or(usize::MAX))
        .min(opts.max_rounds);
    let mut per_frac = Vec::new();
    for &frac in &opts.fracs {
        let ws_pages = w.set_frac(frac)?;
        let rounds = 1 + per_window * opts.repeats;
        let mut cmd = Command::new(&opts.tern);
        cmd.args(["track", "-t", &w.pid().to_string(), "--no-ebpf", "--json"])
            .args(["--interval-ms", &opts.period_ms.to_string()])
            .args(["--rounds", &rounds.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("cannot run tern track")?;
        let stdout = child.stdout.take().context("tern track stdout")?;
        let mut lines: Vec<RoundOut> = Vec::new();
        let mut prev = mono_ns();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
                continue;
            };
            let now = mono_ns();
            let json = json!({
                "pages_written": v["kernel_pages"],
                "duration_ms": Value::Null,
                "track": v,
            });
            lines.push(RoundOut {
                t_start: prev,
                t_end: now,
                json,
            });
            prev = now;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() || lines.len() < 2 {
            bail!(
                "`{}` failed ({}), {} lines: {}",
                show(&cmd),
                out.status,
                lines.len(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut it = lines.into_iter();
        let mut t0 = it.next().expect("two lines").t_end;
        let rest: Vec<RoundOut> = it.collect();
        let mut windows = Vec::new();
        for chunk in rest.chunks(per_window) {
            let mut rs: Vec<RoundOut> = Vec::new();
            for r in chunk {
                rs.push(RoundOut {
                    t_start: r.t_end,
                    t_end: r.t_end,
                    json: r.json.clone(),
                });
            }
            let t1 = rs.last().expect("a round").t_end;
            let win = Window {
                t_ns: t1 - t0,
                writes: w.writes_between(t0, t1)?,
                during_ns: 0,
                during_writes: 0.0,
                rounds: rs,
            };
            log(format!(
                "  frac {frac}: {:.1} s, {:.2} M page-writes/s, {} first writes, {} intervals",
                win.secs(),
                win.throughput() / 1e6,
                win.faults(),
                win.rounds.len()
            ));
            windows.push(win);
            t0 = t1;
        }
        per_frac.push((frac, ws_pages, windows));
        if !w.alive() {
            bail!("the workload died");
        }
    }
    Ok(per_frac)
}

/// One round: a `tern pre-dump`, or the workload's own scan (`kernel-wp`).
fn round(tern: &mut Option<Tern>, w: &mut Dirtier) -> Result<RoundOut> {
    match tern {
        Some(t) => t.pre_dump(),
        None => w.self_scan(),
    }
}

/// One workload process per size: baseline, then each tracked mode followed
/// by a baseline again.
fn run_size(
    opts: &Opts,
    mib: u64,
    log: &mut dyn FnMut(String),
    failures: &mut Vec<Value>,
) -> Result<Vec<ModeRun>> {
    let started = Instant::now();
    let mut w = Dirtier::start(&opts.bin_dir, mib)?;
    log(format!(
        "{mib} MiB: workload {} ready in {:.1} s",
        w.pid(),
        started.elapsed().as_secs_f64()
    ));
    let mut before = baseline(opts, &mut w)?;
    log(format!("  baseline: {}", baseline_summary(opts, &before)));
    let mut runs = vec![ModeRun {
        mode: Mode::None,
        initial: None,
        per_frac: opts
            .fracs
            .iter()
            .zip(&before)
            .map(|(&f, _)| (f, 0, Vec::new()))
            .collect(),
        baseline: Vec::new(),
    }];
    let mut all_baselines: Vec<Vec<Window>> = Vec::new();
    for &mode in opts.modes.iter().filter(|&&m| m != Mode::None) {
        log(format!("{mib} MiB, {}", mode.name()));
        let result = run_tracked(opts, &mut w, mib, mode, log);
        if !w.alive() {
            bail!("the workload died during {}", mode.name());
        }
        let after = baseline(opts, &mut w)?;
        log(format!("  baseline: {}", baseline_summary(opts, &after)));
        match result {
            Ok((initial, per_frac)) => {
                let baseline = before
                    .iter()
                    .zip(&after)
                    .map(|(b, a)| b.iter().chain(a).map(Window::copy).collect())
                    .collect();
                runs.push(ModeRun {
                    mode,
                    initial,
                    per_frac,
                    baseline,
                });
            }
            Err(e) => {
                log(format!("  FAILED: {e:#}"));
                failures.push(
                    json!({"resident_mib": mib, "mode": mode.name(), "error": format!("{e:#}")}),
                );
            }
        }
        all_baselines.extend(std::mem::take(&mut before));
        before = after;
    }
    all_baselines.extend(before);
    // The untracked row: every baseline window of each fraction.
    let n = opts.fracs.len();
    let none = &mut runs[0];
    for (i, chunk) in all_baselines.into_iter().enumerate() {
        none.per_frac[i % n].2.extend(chunk);
    }
    let mut none_baseline = Vec::new();
    for (_, _, windows) in &none.per_frac {
        none_baseline.push(windows.iter().map(Window::copy).collect());
    }
    none.baseline = none_baseline;
    Ok(runs)
}

fn baseline_summary(opts: &Opts, b: &[Vec<Window>]) -> String {
    opts.fracs
        .iter()
        .zip(b)
        .map(|(f, ws)| {
            format!(
                "frac {f}: {:.2} M/s",
                med(ws.iter().map(Window::throughput).collect()) / 1e6
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let thp = fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({
        "cpu": cpu,
        "kernel": kernel,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_gib": (mem_kib as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "thp": thp,
    })
}

/// Give the driver, the workload and tern (its children) priority over other
/// load on the machine. With autogroups (`kernel.sched_autogroup_enabled`)
/// nice values only weigh within a session, so the driver starts a session of
/// its own (its autogroup) and sets that group's nice to -20 too. It then no
/// longer gets ^C from the terminal: it dies with its parent instead.
fn raise_priority(log: &mut dyn FnMut(String)) -> Value {
    // SAFETY: plain syscalls on this process.
    let (sid, pdeath, nice) = unsafe {
        let parent = libc::getppid();
        let sid = libc::setsid();
        let pdeath = libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() != parent {
            // The parent died before prctl: go too.
            libc::_exit(1);
        }
        (sid, pdeath, libc::setpriority(libc::PRIO_PROCESS, 0, -20))
    };
    let autogroup = if sid >= 0 {
        fs::write("/proc/self/autogroup", "-20").is_ok()
    } else {
        false
    };
    if nice != 0 || !autogroup {
        log(format!(
            "priority: nice {}, own autogroup at -20: {autogroup} (results may be noisier)",
            if nice == 0 { "-20" } else { "unchanged" }
        ));
    }
    let _ = pdeath;
    json!({"nice": if nice == 0 { -20 } else { 0 }, "autogroup_nice_-20": autogroup})
}

fn med(mut xs: Vec<f64>) -> f64 {
    xs.retain(|x| x.is_finite());
    median(&mut xs)
}

fn round_stat(windows: &[Window], key: &str) -> f64 {
    med(windows
        .iter()
        .flat_map(|w| w.rounds.iter().map(|r| r.num(key)))
        .collect())
}

pub fn run(opts: &Opts) -> Result<()> {
    let started = Instant::now();
    fs::create_dir_all(&opts.out)?;
    let mut log = |s: String| eprintln!("[{:6.1}s] {s}", started.elapsed().as_secs_f64());
    let mut machine = machine();
    if opts.nice {
        machine["priority"] = json!(raise_priority(&mut log));
    }
    machine["loadavg_at_start"] = json!(
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    log(format!("machine: {machine}"));

    let floor = measure_floor(64, 7).context("measuring the async-WP fault floor")?;
    log(format!(
        "floor: first write to an async-WP page {:.3} us median, {:.3} us min (plain write {:.1} ns), {} pages x {} reps",
        floor.fault_ns / 1e3,
        floor.fault_min_ns / 1e3,
        floor.plain_ns,
        floor.pages,
        floor.reps
    ));
    let floor_us = floor.fault_ns / 1e3;

    let mut results = Vec::new();
    let mut initial = Vec::new();
    let mut failures = Vec::new();
    for &mib in &opts.sizes_mib {
        let runs = match run_size(opts, mib, &mut log, &mut failures) {
            Ok(r) => r,
            Err(e) => {
                log(format!("  FAILED: {e:#}"));
                failures.push(json!({"resident_mib": mib, "error": format!("{e:#}")}));
                continue;
            }
        };
        for run in runs {
            let mode = run.mode;
            if let Some(i) = run.initial {
                initial.push(json!({"resident_mib": mib, "mode": mode.name(), "round": i}));
            }
            for ((frac, ws_pages, windows), base_windows) in
                run.per_frac.into_iter().zip(&run.baseline)
            {
                let tput = med(windows.iter().map(Window::throughput).collect());
                let base_tput = med(base_windows.iter().map(Window::throughput).collect());
                let base = Some(base_tput).filter(|u| u.is_finite());
                let costs: Vec<f64> = match base {
                    Some(u) if mode != Mode::None && mode != Mode::Full => windows
                        .iter()
                        .filter(|w| w.faults() > 0.0)
                        .map(|w| (w.secs() - w.writes / u) / w.faults() * 1e6)
                        .collect(),
                    _ => Vec::new(),
                };
                let cost = med(costs);
                // Where the time goes, per round: lost while tern ran, lost between.
                let lost = |during: bool| -> f64 {
                    match base {
                        Some(u) if mode != Mode::None => med(windows
                            .iter()
                            .filter(|w| !w.rounds.is_empty())
                            .map(|w| {
                                let (ns, wr) = if during {
                                    (w.during_ns, w.during_writes)
                                } else {
                                    (w.t_ns - w.during_ns, w.writes - w.during_writes)
                                };
                                (ns as f64 / 1e9 - wr / u) * 1e3 / w.rounds.len() as f64
                            })
                            .collect()),
                        _ => f64::NAN,
                    }
                };
                let tput_during = med(windows.iter().map(Window::throughput_during).collect());
                let tput_between = med(windows.iter().map(Window::throughput_between).collect());
                let ebpf_seen = {
                    let e = round_stat(&windows, "ebpf_pages");
                    let k = round_stat(&windows, "pages_written");
                    if e.is_finite() && k > 0.0 {
                        e / k
                    } else {
                        f64::NAN
                    }
                };
                let r = json!({
                    "resident_mib": mib,
                    "frac": frac,
                    "mode": mode.name(),
                    "working_set_pages": ws_pages,
                    "throughput_pws": tput,
                    "untracked_throughput_pws": finite(base_tput),
                    "slowdown": base.map(|u| u / tput),
                    "slowdown_during_rounds": base.map(|u| finite(u / tput_during)),
                    "slowdown_between_rounds": base.map(|u| finite(u / tput_between)),
                    "lost_ms_per_round_during": finite(lost(true)),
                    "lost_ms_per_round_between": finite(lost(false)),
                    "share_of_time_in_rounds": finite(med(windows.iter().map(|w| w.during_ns as f64 / w.t_ns as f64).collect())),
                    "cost_per_first_write_us": finite(cost),
                    "cost_vs_design_floor": finite(cost / REFERENCE_FLOOR_US),
                    "cost_vs_measured_floor": finite(cost / floor_us),
                    "round_duration_ms": finite(round_stat(&windows, "duration_ms")),
                    "round_frozen_ms": finite(round_stat(&windows, "frozen_ms")),
                    "round_pages_written": finite(round_stat(&windows, "pages_written")),
                    "round_pages_scanned": finite(round_stat(&windows, "pages_scanned")),
                    "round_ebpf_pages": finite(round_stat(&windows, "ebpf_pages")),
                    "ebpf_seen_ratio": finite(ebpf_seen),
                    "round_wall_ms": finite(med(windows.iter().flat_map(|w| w.rounds.iter().map(|r| (r.t_end - r.t_start) as f64 / 1e6)).collect())),
                    "windows": windows.iter().map(Window::json).collect::<Vec<_>>(),
                });
                log(format!(
                    "  => {mib} MiB frac {frac} {}: {:.2} M pw/s, slowdown {}, cost/first write {} us",
                    mode.name(),
                    tput / 1e6,
                    base.map_or("-".into(), |u| format!("{:.2}x", u / tput)),
                    if cost.is_finite() {
                        format!("{cost:.3}")
                    } else {
                        "-".into()
                    }
                ));
                results.push(r);
            }
        }
    }
    let _ = fs::remove_dir_all(opts.out.join("tmp"));
    compare_with_kernel_wp(&mut results);

    let report = json!({
        "benchmark": "tracking",
        "machine": machine,
        "floor": {
            "design_us": REFERENCE_FLOOR_US,
            "measured_us": floor_us,
            "measured_min_us": floor.fault_min_ns / 1e3,
            "plain_write_ns": floor.plain_ns,
            "pages": floor.pages,
            "reps": floor.reps,
        },
        "params": {
            "sizes_mib": opts.sizes_mib,
            "fracs": opts.fracs,
            "modes": opts.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "period_ms": opts.period_ms,
            "window_ms": opts.window_ms,
            "min_rounds": opts.min_rounds,
            "max_rounds": opts.max_rounds,
            "repeats": opts.repeats,
            "frac_budget_s": opts.frac_budget_s,
            "baseline_ms": opts.baseline_ms,
            "tern_args": if opts.compress { "" } else { "--no-compress" },
        },
        "elapsed_s": started.elapsed().as_secs_f64(),
        "loadavg_at_end": fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        "initial_pre_dump": initial,
        "results": results,
        "failures": failures,
    });
    let json_path = opts.out.join("tracking.json");
    fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let svg_path = opts.out.join("tracking.svg");
    fs::write(&svg_path, crate::svg::tracking_plot(&report))?;
    print_table(&report);
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    if !failures.is_empty() {
        bail!(
            "{} configuration(s) failed: see `failures` in {}",
            failures.len(),
            json_path.display()
        );
    }
    Ok(())
}

/// tern's cost against the workload tracking itself (same size, fraction and
/// period, measured in the same run): the ratio that says what tern adds to
/// what the kernel's write-protect faults cost this access pattern anyway.
fn compare_with_kernel_wp(results: &mut [Value]) {
    let floors: Vec<(Value, Value, f64, f64)> = results
        .iter()
        .filter(|r| r["mode"] == Mode::KernelWp.name())
        .map(|r| {
            (
                r["resident_mib"].clone(),
                r["frac"].clone(),
                r["cost_per_first_write_us"].as_f64().unwrap_or(f64::NAN),
                r["slowdown"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    for r in results.iter_mut() {
        let mode = r["mode"].as_str().unwrap_or("");
        if mode != Mode::UffdEbpf.name()
            && mode != Mode::UffdNoEbpf.name()
            && mode != Mode::UffdTrack.name()
        {
            continue;
        }
        let Some((_, _, cost, slowdown)) = floors
            .iter()
            .find(|f| f.0 == r["resident_mib"] && f.1 == r["frac"])
        else {
            continue;
        };
        let mine = r["cost_per_first_write_us"].as_f64().unwrap_or(f64::NAN);
        let my_slowdown = r["slowdown"].as_f64().unwrap_or(f64::NAN);
        r["kernel_wp_cost_per_first_write_us"] = finite(*cost);
        // A floor at or below zero is noise (less lost time than the
        // baselines' spread): no ratio then.
        r["cost_vs_kernel_wp"] = if *cost > 0.0 {
            finite(mine / cost)
        } else {
            Value::Null
        };
        r["slowdown_vs_kernel_wp"] = finite(my_slowdown / slowdown);
    }
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

fn print_table(report: &Value) {
    println!(
        "\n{:>6} {:>5} {:>12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>9} {:>9} {:>8}",
        "MiB",
        "frac",
        "mode",
        "Mpw/s",
        "slowdn",
        "in-rnd",
        "betw",
        "us/1stwr",
        "xfloor",
        "xkern",
        "pages/rnd",
        "dur_ms",
        "frozen"
    );
    let f = |v: &Value, k: &str, p: usize| match v.get(k).and_then(Value::as_f64) {
        Some(x) => format!("{x:.p$}"),
        None => "-".into(),
    };
    for r in report["results"].as_array().into_iter().flatten() {
        println!(
            "{:>6} {:>5} {:>12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>9} {:>9} {:>8}",
            r["resident_mib"].to_string(),
            r["frac"].to_string(),
            r["mode"].as_str().unwrap_or(""),
            r.get("throughput_pws")
                .and_then(Value::as_f64)
                .map_or("-".into(), |x| format!("{:.2}", x / 1e6)),
            f(r, "slowdown", 2),
            f(r, "slowdown_during_rounds", 2),
            f(r, "slowdown_between_rounds", 2),
            f(r, "cost_per_first_write_us", 3),
            f(r, "cost_vs_measured_floor", 2),
            f(r, "cost_vs_kernel_wp", 2),
            f(r, "round_pages_written", 0),
            f(r, "round_duration_ms", 1),
            f(r, "round_frozen_ms", 2),
        );
    }
    println!(
        "xfloor: against the sequential floor; xkern: against kernel-wp, the workload \
         tracking itself with the same period (no tern)"
    );
    println!(
        "floor: {:.3} us measured, {} us first measured here; machine: {}",
        report["floor"]["measured_us"].as_f64().unwrap_or(f64::NAN),
        REFERENCE_FLOOR_US,
        report["machine"]
    );
}
