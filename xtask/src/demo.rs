//! `cargo xtask demo`: checkpoint a running workload with incremental
//! `tern pre-dump` rounds until its dirty set converges.
//!
//! Steps (each a function, so that dump and restore can be appended):
//! 1. build release (`tern`, and the `hotloop` workload of the bench crate),
//! 2. start `hotloop`: N MiB resident, a hot set dirtied every millisecond and
//!    a slow drift through the rest; it never exits until killed,
//! 3. `tern pre-dump` rounds, each a separate invocation chained with
//!    `--prev-images-dir`, images under `target/demo/<round>`, until
//!    `pages_written` stops shrinking or falls under a threshold,
//! 4. `tern show` of the chain,
//! 5. the final `tern dump --verify` (the workload is killed by it) and
//!    `tern restore --detach` of the same process, which must run again; then
//!    it is stopped,
//! 6. the same image restored lazily (`tern restore --lazy-pages --detach`:
//!    the process runs at once, a `tern lazy-pages` daemon brings its memory
//!    in behind it); it must run, and the daemon's figures are read from
//!    `DIR/lazy-stats.json` once every page is in; then it is stopped,
//! 7. a summary table,
//! 8. a fresh workload migrated between two network namespaces (`tern
//!    migrate` / `tern receive`, see `demo_migrate`): rounds, downtime, and
//!    the process running on the other side only.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::util;

#[derive(Args)]
pub struct DemoArgs {
    /// Resident memory of the workload, MiB.
    #[arg(long, default_value_t = 512)]
    mib: u64,
    /// Hot set the workload rewrites every millisecond, MiB.
    #[arg(long, default_value_t = 8)]
    hot_mib: u64,
    /// Most pre-dump rounds.
    #[arg(long, default_value_t = 8)]
    max_rounds: u32,
    /// Converged once a round writes at most this many pages.
    #[arg(long, default_value_t = 64)]
    threshold_pages: u64,
    /// Pause between rounds, ms (the workload keeps dirtying meanwhile).
    #[arg(long, default_value_t = 300)]
    interval_ms: u64,
    /// Extra arguments for every `tern pre-dump` (e.g. `--no-ebpf`).
    #[arg(long, allow_hyphen_values = true)]
    pre_dump_arg: Vec<String>,
}

/// The workload, killed and reaped when dropped (also on errors); tracking is
/// removed first if it was set up.
struct Workload {
    child: Child,
    tern: PathBuf,
    tracked: bool,
}

impl Workload {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn untrack(&mut self) -> Result<()> {
        if !self.tracked {
            return Ok(());
        }
        self.tracked = false;
        let pid = self.pid().to_string();
        let out = util::capture(Command::new(&self.tern).args(["untrack", "-t", &pid]))?;
        if !out.status.success() {
            bail!(
                "`tern untrack -t {pid}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn stop(&mut self) {
        let _ = self.untrack();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One pre-dump round as `tern pre-dump --json` reported it.
struct Round {
    n: u32,
    json: Value,
    wall_ms: f64,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let release = build()?;
    let tern = release.join("tern");
    let images = util::target_dir().join("demo");
    if images.exists() {
        fs::remove_dir_all(&images)
            .with_context(|| format!("cannot clear {}", images.display()))?;
    }
    fs::create_dir_all(&images).with_context(|| format!("cannot create {}", images.display()))?;

    let mut workload = start_workload(&release, &tern, args)?;
    let rounds = pre_dump_rounds(&tern, &mut workload, &images, args)?;
    let last = images.join(rounds.last().expect("at least one round").n.to_string());
    show(&tern, &last)?;
    if !workload.alive() {
        bail!("the workload died during the demo (tern must never lose the process)");
    }
    // Restored processes whose restorer exits become our children (not PID
    // 1's, which reaps slowly here): the lazy restore then finds the PID of
    // the eager one free at once.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let (dump, restore) = dump_and_restore(&tern, &mut workload, &images, &last)?;
    let pid = i32::try_from(workload.pid()).context("workload PID out of range")?;
    let lazy = lazy_restore(&tern, pid, &images.join("dump"))?;
    summary(&rounds, args);
    let live: Vec<String> = dump["live_rounds"]
        .as_array()
        .map(|a| a.iter().map(|r| r["pages"].to_string()).collect())
        .unwrap_or_default();
    println!(
        "final dump: live rounds [{}] pages; {} pages frozen, capture {:.1} ms, frozen {:.1} ms in all with the verification of {} pages ({} mismatches); restore {:.1} ms, PID {} runs again",
        live.join(", "),
        fmt(&dump, "pages_written"),
        dump["capture_ms"].as_f64().unwrap_or(f64::NAN),
        dump["frozen_ms"].as_f64().unwrap_or(f64::NAN),
        fmt(&dump["verify"], "pages_checked"),
        fmt(&dump["verify"], "mismatches"),
        restore["restore_ms"].as_f64().unwrap_or(f64::NAN),
        fmt(&restore, "pid"),
    );
    restores_table(&restore, &lazy);
    crate::demo_migrate::run(&release, &tern, &images, args.mib, args.hot_mib)?;
    Ok(())
}

/// The eager and the lazy restore side by side.
fn restores_table(eager: &Value, lazy: &Value) {
    let stats = &lazy["lazy"];
    let rows = [
        [
            "restore".to_string(),
            "runs_after_ms".into(),
            "pages_at_start".into(),
            "lazy_pages".into(),
            "faults".into(),
            "fault_us_p50/p99".into(),
            "all_in_ms".into(),
            "fill_mb_s".into(),
        ],
        [
            "eager".to_string(),
            fmt(eager, "restore_ms"),
            fmt(eager, "pages_restored"),
            "-".into(),
            "-".into(),
            "-".into(),
            fmt(eager, "restore_ms"),
            "-".into(),
        ],
        [
            "lazy".to_string(),
            fmt(lazy, "restore_ms"),
            fmt(lazy, "pages_restored"),
            fmt(stats, "pages"),
            fmt(stats, "faults"),
            format!(
                "{}/{}",
                fmt(stats, "fault_us_p50"),
                fmt(stats, "fault_us_p99")
            ),
            // tern's own figures: the restore, then the fill behind it.
            match (lazy["restore_ms"].as_f64(), stats["fill_ms"].as_f64()) {
                (Some(r), Some(f)) => format!("{:.1}", r + f),
                _ => "-".into(),
            },
            fmt(stats, "fill_mb_s"),
        ],
    ];
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    println!();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:>w$}"))
            .collect();
        println!("{}", line.join("  "));
    }
}

/// Wait until PID `pid` is free again (reaped: by us, the subreaper, or
/// by its parent), at most `deadline`.
fn wait_pid_free(pid: i32, deadline: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        // SAFETY: waitpid on one PID with WNOHANG; ECHILD (not ours) is fine.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(());
        }
        if t0.elapsed() > deadline {
            bail!("PID {pid} is still taken {deadline:?} after the restored workload was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Process `pid`'s state letter (`R`, `S`, `T`, `Z`, ...), for messages.
fn state(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            st.rsplit(')')
                .next()?
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "gone".into())
}

/// How often process `pid` went to sleep on its own (its
/// `voluntary_ctxt_switches`): the workload sleeps 1 ms a loop, so a running
/// one adds hundreds a second. Not its CPU time: a loop costs it 2% of a
/// core, a tick or less in the half second it is watched, and a restored
/// process starts from 0 (a working restore showed `0 -> 0`).
fn sleeps(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

/// The dump in `dir` restored again, lazily and detached: the process must
/// run (it goes through its loop) while its page service fills it; the service's
/// figures come from `DIR/lazy-stats.json` once every page is in. Returns
/// tern's JSON with `lazy` (the service's figures) added.
fn lazy_restore(tern: &Path, pid: i32, dir: &Path) -> Result<Value> {
    wait_pid_free(pid, Duration::from_secs(10))?;
    let stats_path = dir.join("lazy-stats.json");
    let _ = fs::remove_file(&stats_path);
    let mut cmd = Command::new(tern);
    cmd.args(["restore", "-D"])
        .arg(dir)
        .args(["--lazy-pages", "--detach", "--json"]);
    println!("$ {}", util::show(&cmd));
    let t0 = Instant::now();
    let out = util::capture(&mut cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            util::show(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut restore = parse_last_json(&out.stdout).context("tern restore printed no JSON")?;
    let kill = || {
        // SAFETY: plain kill of the restored process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    };
    let before = sleeps(pid);
    std::thread::sleep(Duration::from_millis(500));
    let after = sleeps(pid);
    if !matches!((before, after), (Some(b), Some(a)) if a > b) {
        kill();
        bail!(
            "the lazily restored workload (PID {pid}) is not running (sleeps {before:?} -> {after:?} in 500 ms, state {})",
            state(pid)
        );
    }
    // The page service writes its figures (or its error) when done.
    let deadline = Duration::from_secs(60);
    let stats = loop {
        if let Ok(text) = fs::read_to_string(&stats_path)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            break v;
        }
        if t0.elapsed() > deadline {
            kill();
            bail!(
                "the page service of PID {pid} wrote no {} within {deadline:?}; see {}",
                stats_path.display(),
                dir.join("lazy-pages.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let all_in_ms = t0.elapsed().as_secs_f64() * 1e3;
    kill();
    wait_pid_free(pid, Duration::from_secs(10))?;
    // The service exits once its figures are written; it is ours to reap.
    if let Some(service) = restore["lazy_service"]["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
    {
        wait_pid_free(service, Duration::from_secs(10))?;
    }
    if stats.get("lazy").is_none() {
        bail!("the page service of PID {pid} failed: {stats}");
    }
    println!(
        "lazy restore: PID {pid} runs after a restore of {:.1} ms; its page service filled the rest in {:.1} ms (figures read {all_in_ms:.0} ms after the start, after the 500 ms check that it runs)",
        restore["restore_ms"].as_f64().unwrap_or(f64::NAN),
        stats["lazy"]["fill_ms"].as_f64().unwrap_or(f64::NAN),
    );
    restore["lazy"] = stats["lazy"].clone();
    Ok(restore)
}

/// `tern dump --verify` after the last pre-dump, then `tern restore
/// --detach`; the restored process must run (it goes through its loop), then it is
/// killed.
fn dump_and_restore(
    tern: &Path,
    workload: &mut Workload,
    images: &Path,
    last: &Path,
) -> Result<(Value, Value)> {
    let pid = workload.pid() as i32;
    let dir = images.join("dump");
    let mut cmd = Command::new(tern);
    cmd.args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(&dir)
        .arg("--prev-images-dir")
        .arg(last)
        .args(["--verify", "--json"]);
    println!("\n$ {}", util::show(&cmd));
    let out = util::capture(&mut cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            util::show(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dump = parse_last_json(&out.stdout).context("tern dump printed no JSON")?;
    // The dump killed it: reap it so that its PID is free again.
    workload.tracked = false;
    workload.stop();
    let mut cmd = Command::new(tern);
    cmd.args(["restore", "-D"])
        .arg(&dir)
        .args(["--detach", "--json"]);
    println!("$ {}", util::show(&cmd));
    let out = util::capture(&mut cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            util::show(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let restore = parse_last_json(&out.stdout).context("tern restore printed no JSON")?;
    let before = sleeps(pid);
    std::thread::sleep(Duration::from_millis(500));
    let after = sleeps(pid);
    let st = state(pid);
    // SAFETY: plain kill of the restored process (not our child any more).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    match (before, after) {
        (Some(b), Some(a)) if a > b => Ok((dump, restore)),
        _ => bail!(
            "the restored workload (PID {pid}) is not running (sleeps {before:?} -> {after:?} in 500 ms, state {st})"
        ),
    }
}

fn build() -> Result<PathBuf> {
    eprintln!("xtask: cargo build --release (tern, bench)");
    util::run(util::cargo().args(["build", "--release", "-p", "tern", "-p", "bench"]))?;
    Ok(util::target_dir().join("release"))
}

fn start_workload(release: &Path, tern: &Path, args: &DemoArgs) -> Result<Workload> {
    let mut cmd = Command::new(release.join("hotloop"));
    cmd.args([
        "--mib",
        &args.mib.to_string(),
        "--hot-mib",
        &args.hot_mib.to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", util::show(&cmd)))?;
    let stdout = child.stdout.take().expect("piped");
    let mut workload = Workload {
        child,
        tern: tern.to_path_buf(),
        tracked: false,
    };
    let line =
        first_line(stdout, Duration::from_secs(60)).context("the workload did not report ready")?;
    if !line.starts_with("ready") {
        workload.stop();
        bail!("unexpected first line from hotloop: {line:?}");
    }
    println!("workload: hotloop pid {} ({line})", workload.pid());
    Ok(workload)
}

/// The first line of `stdout`, waiting at most `deadline`. The rest of the
/// output is drained by the reader thread so the workload never blocks.
fn first_line(stdout: ChildStdout, deadline: Duration) -> Result<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        for _ in lines {}
    });
    match rx.recv_timeout(deadline) {
        Ok(Some(Ok(line))) => Ok(line),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(None) => bail!("it exited without output"),
        Err(_) => bail!("no output within {deadline:?}"),
    }
}

fn pre_dump_rounds(
    tern: &Path,
    workload: &mut Workload,
    images: &Path,
    args: &DemoArgs,
) -> Result<Vec<Round>> {
    let pid = workload.pid().to_string();
    let mut rounds: Vec<Round> = Vec::new();
    for n in 1..=args.max_rounds {
        let dir = images.join(n.to_string());
        let mut cmd = Command::new(tern);
        cmd.args(["pre-dump", "-t", &pid, "-D"]).arg(&dir);
        if n > 1 {
            cmd.arg("--prev-images-dir")
                .arg(images.join((n - 1).to_string()));
        }
        cmd.args(&args.pre_dump_arg).arg("--json");
        println!("round {n}: {}", util::show(&cmd));
        let start = Instant::now();
        let out = util::capture(&mut cmd)?;
        let wall_ms = start.elapsed().as_secs_f64() * 1e3;
        workload.tracked = true;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}):\n{}",
                util::show(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let json = parse_last_json(&out.stdout)
            .with_context(|| format!("round {n}: `tern pre-dump --json` printed no JSON object"))?;
        let written = field_u64(&json, "pages_written");
        println!(
            "round {n}: pages_written {} bytes_written {} duration_ms {} frozen_ms {}",
            fmt(&json, "pages_written"),
            fmt(&json, "bytes_written"),
            fmt(&json, "duration_ms"),
            fmt(&json, "frozen_ms"),
        );
        let prev = rounds
            .last()
            .and_then(|r| field_u64(&r.json, "pages_written"));
        rounds.push(Round { n, json, wall_ms });
        if !workload.alive() {
            bail!("the workload died after round {n}");
        }
        if let (true, Some(w)) = (n > 1, written) {
            if w <= args.threshold_pages {
                println!("converged: {w} pages <= threshold {}", args.threshold_pages);
                break;
            }
            if let Some(p) = prev.filter(|&p| w as f64 >= 0.9 * p as f64) {
                println!("converged: {w} pages, previous round {p} (no longer shrinking)");
                break;
            }
        }
        if n < args.max_rounds {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    Ok(rounds)
}

fn show(tern: &Path, dir: &Path) -> Result<()> {
    let mut cmd = Command::new(tern);
    cmd.arg("show").arg(dir);
    println!("\n$ {}", util::show(&cmd));
    util::run(&mut cmd)
}

/// The last line of `stdout` that parses as a JSON object.
pub fn parse_last_json(stdout: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(stdout);
    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(text.trim()) {
        return Some(v);
    }
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(Value::is_object)
}

fn field_u64(v: &Value, key: &str) -> Option<u64> {
    v.get(key)
        // A float's fraction is dropped on purpose (`as` saturates).
        .and_then(|x| {
            #[allow(clippy::cast_possible_truncation)]
            x.as_u64().or_else(|| x.as_f64().map(|f| f as u64))
        })
}

fn fmt(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::Number(n)) => {
            if let Some(f) = n.as_f64().filter(|_| !n.is_u64() && !n.is_i64()) {
                format!("{f:.1}")
            } else {
                n.to_string()
            }
        }
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn summary(rounds: &[Round], args: &DemoArgs) {
    let backend = rounds
        .first()
        .map(|r| fmt(&r.json, "backend"))
        .unwrap_or_default();
    let ebpf = rounds
        .first()
        .map(|r| fmt(&r.json, "ebpf"))
        .unwrap_or_default();
    println!(
        "\nsummary: hotloop {} MiB resident, {} MiB hot; backend {backend}, ebpf {ebpf}",
        args.mib, args.hot_mib
    );
    let header = [
        "round",
        "pages_written",
        "bytes_written",
        "duration_ms",
        "frozen_ms",
        "ebpf_pages",
        "wall_ms",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rounds {
        rows.push(vec![
            r.n.to_string(),
            fmt(&r.json, "pages_written"),
            fmt(&r.json, "bytes_written"),
            fmt(&r.json, "duration_ms"),
            fmt(&r.json, "frozen_ms"),
            fmt(&r.json, "ebpf_pages"),
            format!("{:.1}", r.wall_ms),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:>w$}"))
            .collect();
        println!("{}", line.join("  "));
    }
}
