//! `bench migrate`: live migration between two hosts on this machine.
//!
//! Two network namespaces joined by a veth pair; `hotloop` (1 GiB) runs on
//! host a, `tern receive` on host b in new PID and mount namespaces, `tern
//! migrate` on a inside the workload's namespaces. Workloads: `busy`
//! (a 1 MiB hot set and a drift of 25 pages per 1 ms loop: ~100 MB/s of
//! pages written) and `quiet` (writes nothing). Links: unshaped, and `tc
//! tbf` at 1 Gbit/s and 100 Mbit/s. A link delay needs netem, which this
//! kernel lacks (`CONFIG_NET_SCH_NETEM` is not set): the report says so.
//! Each configuration with `--post-copy never`, `always` and `auto`:
//! predicted and measured downtime (source frozen to destination running),
//! total time, bytes sent, rounds, post-copy pages, the destination's fill;
//! each configuration `--repeats` times, the run of median downtime shown.
//!
//! CRIU beside it is not measured yet: the report says so.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const NS_A: &str = "tern-bench-a";
const NS_B: &str = "tern-bench-b";
const ADDR_A: &str = "10.233.0.1";
const ADDR_B: &str = "10.233.0.2";
const PORT: u16 = 7400;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("ip (iproute2) cannot run")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn remove_hosts() {
    for ns in [NS_A, NS_B] {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    crate::run::kill(p);
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// The two hosts, removed when dropped.
struct Hosts;

impl Hosts {
    fn new() -> Result<Hosts> {
        remove_hosts();
        ip(&["netns", "add", NS_A])?;
        ip(&["netns", "add", NS_B])?;
        ip(&[
            "link", "add", "tbench-a", "netns", NS_A, "type", "veth", "peer", "name", "tbench-b",
            "netns", NS_B,
        ])?;
        for (ns, dev, addr) in [(NS_A, "tbench-a", ADDR_A), (NS_B, "tbench-b", ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(Hosts)
    }

    /// `rate` both ways (tc tbf), or none.
    fn shape(&self, rate: Option<&str>) -> Result<()> {
        for (ns, dev) in [(NS_A, "tbench-a"), (NS_B, "tbench-b")] {
            let _ = Command::new("tc")
                .args(["-n", ns, "qdisc", "del", "dev", dev, "root"])
                .stderr(Stdio::null())
                .status();
            if let Some(rate) = rate {
                let st = Command::new("tc")
                    .args(["-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf"])
                    .args(["rate", rate, "burst", "256kb", "latency", "100ms"])
                    .status()
                    .context("tc")?;
                if !st.success() {
                    bail!("tc tbf rate {rate} on {dev} failed");
                }
            }
        }
        Ok(())
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        remove_hosts();
    }
}

/// One migration: the source's and the destination's JSON.
fn migrate_once(
    tern: &Path,
    bin_dir: &Path,
    work: &Path,
    workload: &[&str],
    mode: &str,
) -> Result<(Value, Value)> {
    let key = work.join("key");
    if !key.exists() {
        crate::run::tern_json(
            tern,
            &["keygen".into(), key.display().to_string(), "--json".into()],
        )?;
    }
    let received = work.join("received");
    let _ = std::fs::remove_dir_all(&received);
    let log = work.join("hotloop.log");
    let (mut w, pid) = crate::run::spawn_until_ready(
        Command::new("ip")
            .args(["netns", "exec", NS_A])
            .arg(bin_dir.join("hotloop"))
            .args(workload)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?),
        &log,
        Duration::from_secs(60),
    )?;
    // The workload settles (its pages all written once).
    std::thread::sleep(Duration::from_secs(1));
    let to = format!("{ADDR_B}:{PORT}");
    let mut recv = Command::new("ip")
        .args([
            "netns",
            "exec",
            NS_B,
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
        ])
        .arg(tern)
        .args(["receive", "--listen", &to, "--key"])
        .arg(&key)
        .arg("-D")
        .arg(&received)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(work.join("receive.log"))?)
        .spawn()
        .context("tern receive")?;
    let out = recv.stdout.take().expect("piped");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let res = (|| -> Result<(Value, Value)> {
        let m = crate::run::run_deadline(
            Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "-m", "--"])
                .arg(tern)
                .args(["migrate", "-t", &pid.to_string(), "--to", &to, "--key"])
                .arg(&key)
                .arg("--work-dir")
                .arg(work)
                .args(["--post-copy", mode, "--json"]),
            "tern migrate",
            Duration::from_secs(600),
        )?;
        if !m.status.success() {
            bail!(
                "tern migrate failed: {}",
                String::from_utf8_lossy(&m.stderr).trim()
            );
        }
        let src = String::from_utf8_lossy(&m.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .context("tern migrate printed no JSON")?;
        let end = Instant::now() + Duration::from_secs(600);
        let dst = loop {
            let line = lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .context("tern receive printed no JSON")?;
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                break v;
            }
        };
        Ok((src, dst))
    })();
    // The receiver is PID 1 of its namespace: killing it ends the process.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", NS_B]).output() {
        for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(p) = p.parse::<i32>() {
                crate::run::kill(p);
            }
        }
    }
    let _ = recv.kill();
    let _ = recv.wait();
    crate::run::kill(pid);
    let _ = w.wait();
    res
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Run every configuration; JSON to `out/migrate.json`, a table to stdout.
pub fn run(tern: &Path, bin_dir: &Path, out: &Path, mib: u64, repeats: usize) -> Result<Value> {
    std::fs::create_dir_all(out)?;
    let work = out.join("tmp-migrate");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let hosts = Hosts::new()?;
    let mib_s = mib.to_string();
    let workloads: [(&str, Vec<&str>); 2] = [
        (
            "busy",
            vec![
                "--mib",
                &mib_s,
                "--hot-mib",
                "1",
                "--drift-pages-per-ms",
                "25",
            ],
        ),
        (
            "quiet",
            vec![
                "--mib",
                &mib_s,
                "--hot-mib",
                "0",
                "--drift-pages-per-ms",
                "0",
                "--sleep-ms",
                "100",
            ],
        ),
    ];
    let links = [
        ("unshaped", None),
        ("1gbit", Some("1gbit")),
        ("100mbit", Some("100mbit")),
    ];
    let mut rows = Vec::new();
    println!(
        "{:<6} {:<9} {:<6} {:>6} {:>10} {:>9} {:>9} {:>9} {:>12} {:>9} {:>9}",
        "load",
        "link",
        "mode",
        "rounds",
        "predicted",
        "downtime",
        "ratio",
        "total",
        "sent",
        "postcopy",
        "fill_ms"
    );
    for (link, rate) in links {
        hosts.shape(rate)?;
        for (load, args) in &workloads {
            for mode in ["never", "always", "auto"] {
                let mut runs = Vec::new();
                for _ in 0..repeats.max(1) {
                    runs.push(
                        migrate_once(tern, bin_dir, &work, args, mode)
                            .with_context(|| format!("{load} over {link}, --post-copy {mode}"))?,
                    );
                }
                // The run of median downtime stands for the configuration;
                // every run is kept.
                runs.sort_by(|a, b| f(&a.0["downtime_ms"]).total_cmp(&f(&b.0["downtime_ms"])));
                let downtimes: Vec<f64> = runs.iter().map(|r| f(&r.0["downtime_ms"])).collect();
                let all: Vec<Value> = runs
                    .iter()
                    .map(|(s, d)| json!({ "source": s, "destination": d }))
                    .collect();
                let (s, d) = runs.swap_remove(runs.len() / 2);
                let row = json!({
                    "downtimes_ms": downtimes,
                    "runs": all,
                    "workload": load,
                    "workload_args": args,
                    "link": link,
                    "mode": mode,
                    "post_copy": s["post_copy"],
                    "rounds": s["rounds"].as_array().map_or(0, |a| a.len()),
                    "stop": s["stop"],
                    "predicted_downtime_ms": s["predicted_downtime_ms"],
                    "downtime_ms": s["downtime_ms"],
                    "downtime_over_predicted": f(&s["downtime_ms"]) / f(&s["predicted_downtime_ms"]),
                    "total_ms": s["total_ms"],
                    "bytes_sent": s["bytes_sent"],
                    "final_pages": s["final_pages"],
                    "post_copy_pages": d["post_copy_pages"],
                    "destination_restore_ms": d["restore_ms"],
                    "fill_ms": d["lazy"]["fill_ms"],
                });
                println!(
                    "{:<6} {:<9} {:<6} {:>6} {:>10.1} {:>9.1} {:>9.2} {:>9.0} {:>12} {:>9} {:>9.0}",
                    load,
                    link,
                    mode,
                    row["rounds"],
                    f(&row["predicted_downtime_ms"]),
                    f(&row["downtime_ms"]),
                    f(&row["downtime_over_predicted"]),
                    f(&row["total_ms"]),
                    row["bytes_sent"],
                    row["post_copy_pages"],
                    f(&row["fill_ms"]),
                );
                rows.push(row);
            }
        }
    }
    drop(hosts);
    let _ = std::fs::remove_dir_all(&work);
    let report = json!({
        "benchmark": "migrate",
        "machine": crate::tracking::machine(),
        "mib": mib,
        "repeats": repeats,
        "rows": rows,
        "not_measured": {
            "100mbit with 1 ms delay": "a delay needs netem (this kernel: CONFIG_NET_SCH_NETEM is not set) or a delaying relay, not built yet",
            "criu": "CRIU beside tern (dump --lazy-pages with lazy-pages --page-server, or dump, copy, restore between the namespaces) is not built yet",
        },
    });
    std::fs::write(
        out.join("migrate.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    println!("\nJSON: {}", out.join("migrate.json").display());
    Ok(report)
}
