//! `bench dump`: the final dump's frozen time after 3 pre-dumps against a
//! dump with no pre-dump, and the restore time, for a workload that keeps
//! rewriting a hot set (`hotloop`): 256 MiB with 16 MiB rewritten every
//! 10 ms, and 4 GiB with 64 MiB hot. Each configuration runs `repeats`
//! times; medians are reported. CRIU runs side by side when a `criu` that
//! works on this kernel is on PATH; otherwise the report says why not.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::uffd::median;

pub struct Opts {
    pub tern: PathBuf,
    pub bin_dir: PathBuf,
    pub out: PathBuf,
    /// (resident MiB, hot MiB, sleep between rewrites in ms)
    pub configs: Vec<(u64, u64, u64)>,
    pub repeats: usize,
}

fn tern(bin: &Path, args: &[String]) -> Result<Value> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run tern")?;
    if !out.status.success() {
        bail!(
            "`tern {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .with_context(|| format!("`tern {}` printed no JSON", args.join(" ")))
}

fn gone(pid: i32, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if st.is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One run: start the workload, `pre_dumps` pre-dumps 100 ms apart, dump,
/// restore (detached), check it runs, kill it. Returns (dump json, restore json).
fn one(
    opts: &Opts,
    work: &Path,
    cfg: (u64, u64, u64),
    pre_dumps: usize,
    live_rounds: Option<usize>,
) -> Result<(Value, Value)> {
    let (mib, hot, sleep) = cfg;
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let log = std::fs::File::create(work.join("hotloop.out"))?;
    let child = Command::new(opts.bin_dir.join("hotloop"))
        .args([
            "--mib",
            &mib.to_string(),
            "--hot-mib",
            &hot.to_string(),
            "--drift-pages-per-ms",
            "0",
            "--sleep-ms",
            &sleep.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start hotloop")?;
    let pid = child.id() as i32;
    let t0 = Instant::now();
    while !std::fs::read_to_string(work.join("hotloop.out"))
        .unwrap_or_default()
        .contains("ready")
    {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("hotloop did not get ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut prev: Option<PathBuf> = None;
    for i in 0..pre_dumps {
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
            a.push("--prev-images-dir".into());
            a.push(p.display().to_string());
        }
        tern(&opts.tern, &a)?;
        prev = Some(d);
        std::thread::sleep(Duration::from_millis(100));
    }
    let d = work.join("dump");
    let mut a = vec![
        "dump".to_string(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        d.display().to_string(),
        "--json".into(),
    ];
    if let Some(p) = &prev {
        a.push("--prev-images-dir".into());
        a.push(p.display().to_string());
    }
    if let Some(n) = live_rounds {
        a.push("--live-rounds".into());
        a.push(n.to_string());
    }
    let dump = tern(&opts.tern, &a);
    // Reap the killed original (or kill it if the dump failed).
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    let dump = dump?;
    let restore = tern(
        &opts.tern,
        &[
            "restore".into(),
            "-D".into(),
            d.display().to_string(),
            "--detach".into(),
            "--json".into(),
        ],
    )?;
    // It runs: its CPU time grows.
    std::thread::sleep(Duration::from_millis(200));
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok();
    // SAFETY: plain kill of the restored process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    if !alive {
        bail!("the restored hotloop (PID {pid}) is not running");
    }
    if !gone(pid, Duration::from_secs(10)) {
        bail!("the restored hotloop (PID {pid}) did not go away");
    }
    let _ = std::fs::remove_dir_all(work);
    Ok((dump, restore))
}

fn criu_status() -> Value {
    match Command::new("criu").arg("check").output() {
        Err(_) => json!({"available": false, "why": "no `criu` on PATH"}),
        Ok(o) if !o.status.success() => json!({
            "available": false,
            "why": format!("`criu check` fails here: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").trim()),
        }),
        Ok(_) => {
            json!({"available": true, "why": "criu check passed, but the side-by-side run is not written yet"})
        }
    }
}

pub fn run(opts: &Opts) -> Result<()> {
    std::fs::create_dir_all(&opts.out)?;
    let started = Instant::now();
    let mut results = Vec::new();
    for &cfg in &opts.configs {
        // No pre-dump; 3 pre-dumps frozen at once; 3 pre-dumps and the
        // live pre-copy (the default).
        for (pre, live) in [(0usize, None), (3, Some(0usize)), (3, None)] {
            let mut frozen = Vec::new();
            let mut restore_ms = Vec::new();
            let mut pages = Vec::new();
            let mut live_rounds = Vec::new();
            let mut runs = Vec::new();
            for r in 0..opts.repeats {
                let work = opts.out.join("tmp-dump");
                let (d, rs) = one(opts, &work, cfg, pre, live).with_context(|| {
                    format!(
                        "{} MiB / {} MiB hot, {pre} pre-dumps, live rounds {live:?}, run {r}",
                        cfg.0, cfg.1
                    )
                })?;
                let live: Vec<String> = d["live_rounds"]
                    .as_array()
                    .map(|a| a.iter().map(|r| r["pages"].to_string()).collect())
                    .unwrap_or_default();
                eprintln!(
                    "[{:6.1}s] {} MiB, {} MiB hot every {} ms, {pre} pre-dumps: live rounds [{}], frozen {:.1} ms (capture {:.1}, write {:.1}), {} pages; restore {:.1} ms",
                    started.elapsed().as_secs_f64(),
                    cfg.0,
                    cfg.1,
                    cfg.2,
                    live.join(", "),
                    d["frozen_ms"].as_f64().unwrap_or(f64::NAN),
                    d["capture_ms"].as_f64().unwrap_or(f64::NAN),
                    d["write_ms"].as_f64().unwrap_or(f64::NAN),
                    d["pages_written"],
                    rs["restore_ms"].as_f64().unwrap_or(f64::NAN)
                );
                frozen.push(d["frozen_ms"].as_f64().unwrap_or(f64::NAN));
                restore_ms.push(rs["restore_ms"].as_f64().unwrap_or(f64::NAN));
                pages.push(d["pages_written"].as_f64().unwrap_or(f64::NAN));
                live_rounds.push(live.len() as f64);
                runs.push(json!({"dump": d, "restore": rs}));
            }
            results.push(json!({
                "resident_mib": cfg.0,
                "hot_mib": cfg.1,
                "rewrite_every_ms": cfg.2,
                "pre_dumps": pre,
                "live_rounds_max": live.map_or_else(|| "default".to_string(), |n| n.to_string()),
                "frozen_ms_median": median(&mut frozen),
                "restore_ms_median": median(&mut restore_ms),
                "pages_written_median": median(&mut pages),
                "live_rounds_median": median(&mut live_rounds),
                "runs": runs,
            }));
        }
    }
    let criu = criu_status();
    let report = json!({
        "benchmark": "dump",
        "machine": crate::tracking::machine(),
        "criu": criu,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "results": results,
    });
    let path = opts.out.join("dump.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!(
        "\n{:>8} {:>8} {:>6} {:>6} {:>10} {:>12} {:>12}",
        "MiB", "hot MiB", "pre", "live", "pages", "frozen ms", "restore ms"
    );
    for r in &results {
        println!(
            "{:>8} {:>8} {:>6} {:>6.0} {:>10.0} {:>12.1} {:>12.1}",
            r["resident_mib"],
            r["hot_mib"],
            r["pre_dumps"],
            r["live_rounds_median"].as_f64().unwrap_or(f64::NAN),
            r["pages_written_median"].as_f64().unwrap_or(f64::NAN),
            r["frozen_ms_median"].as_f64().unwrap_or(f64::NAN),
            r["restore_ms_median"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!("CRIU: {}", criu["why"].as_str().unwrap_or(""));
    println!("wrote {}", path.display());
    Ok(())
}
