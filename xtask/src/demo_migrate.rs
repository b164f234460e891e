//! The demo's last step: the workload migrated between two hosts on this
//! machine, each a network namespace (`tern-demo-a`, `tern-demo-b`) joined
//! by a veth pair; `tern receive` runs on b in new PID and mount namespaces
//! (the process keeps its PID number there), `tern migrate` on a inside the
//! workload's namespaces. Made and removed here.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util;

const NS_A: &str = "tern-demo-a";
const NS_B: &str = "tern-demo-b";
const ADDR_A: &str = "10.232.0.1";
const ADDR_B: &str = "10.232.0.2";
const PORT: u16 = 7300;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("ip (iproute2) cannot run: `cargo xtask setup` installs it")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The two namespaces and what runs in them, removed when dropped.
struct Hosts {
    receiver: Option<Child>,
    workload: Option<Child>,
}

impl Hosts {
    fn new() -> Result<Hosts> {
        remove_namespaces();
        ip(&["netns", "add", NS_A])?;
        ip(&["netns", "add", NS_B])?;
        ip(&[
            "link", "add", "tdemo-a", "netns", NS_A, "type", "veth", "peer", "name", "tdemo-b",
            "netns", NS_B,
        ])?;
        for (ns, dev, addr) in [(NS_A, "tdemo-a", ADDR_A), (NS_B, "tdemo-b", ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(Hosts {
            receiver: None,
            workload: None,
        })
    }
}

fn remove_namespaces() {
    for ns in [NS_A, NS_B] {
        // The processes in it first (the receiver is PID 1 of its own).
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    // SAFETY: kill(2).
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        remove_namespaces();
        for c in [self.receiver.take(), self.workload.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The host PIDs of live processes whose PID in their own namespace is
/// `pid` (the migrated copy).
fn copies_of(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(st) = std::fs::read_to_string(format!("/proc/{p}/status")) else {
            continue;
        };
        let ns: Vec<i32> = st
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let zombie = st
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        if ns.len() > 1 && ns.last() == Some(&pid) && p != pid && !zombie {
            found.push(p);
        }
    }
    found
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
        !st.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

/// Migrate a fresh `hotloop` from host a to host b; prints the rounds and
/// the downtime, checks that it runs on b and no longer on a.
pub fn run(release: &Path, tern: &Path, images: &Path, mib: u64, hot_mib: u64) -> Result<Value> {
    println!(
        "\nmigration: hotloop moved from network namespace {NS_A} to {NS_B} (its own PID namespace there)"
    );
    let mut hosts = Hosts::new()?;
    let key = images.join("migrate.key");
    let _ = std::fs::remove_file(&key);
    util::run(Command::new(tern).arg("keygen").arg(&key))?;
    let received = images.join("received");
    let _ = std::fs::remove_dir_all(&received);
    let mut w = Command::new("ip");
    w.args(["netns", "exec", NS_A])
        .arg(release.join("hotloop"))
        .args(["--mib", &mib.to_string(), "--hot-mib", &hot_mib.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let workload = w
        .spawn()
        .with_context(|| format!("cannot start `{}`", util::show(&w)))?;
    let pid = i32::try_from(workload.id()).context("PID")?;
    hosts.workload = Some(workload);
    // It faults its memory in first.
    std::thread::sleep(Duration::from_millis(500 + mib));
    let to = format!("{ADDR_B}:{PORT}");
    let log = std::fs::File::create(images.join("receive.log"))?;
    let mut r = Command::new("ip");
    r.args([
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
    .stderr(log);
    println!("$ {}", util::show(&r));
    let mut receiver = r.spawn().context("cannot start tern receive")?;
    let rx = receiver.stdout.take().expect("piped");
    hosts.receiver = Some(receiver);
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(rx).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut m = Command::new("nsenter");
    m.args(["-t", &pid.to_string(), "-n", "-m", "--"])
        .arg(tern)
        .args(["migrate", "-t", &pid.to_string(), "--to", &to, "--key"])
        .arg(&key)
        .arg("--work-dir")
        .arg(images)
        .arg("--json");
    println!("$ {}", util::show(&m));
    let out = util::capture(&mut m)?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}\n(the receiver's log: {})",
            util::show(&m),
            String::from_utf8_lossy(&out.stderr).trim(),
            images.join("receive.log").display()
        );
    }
    let v = crate::demo::parse_last_json(&out.stdout).context("tern migrate printed no JSON")?;
    let end = Instant::now() + Duration::from_secs(120);
    let dest = loop {
        let left = end.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .context("tern receive printed no JSON (its log: target/demo/receive.log)")?;
        if let Ok(j) = serde_json::from_str::<Value>(&line) {
            break j;
        }
    };
    // Exactly once, and on b.
    if let Some(mut c) = hosts.workload.take() {
        let _ = c.wait();
    }
    let there = copies_of(pid);
    if alive(pid) || there.len() != 1 {
        bail!(
            "after the migration PID {pid} runs {} on host a and {} time(s) on host b",
            if alive(pid) { "still" } else { "no longer" },
            there.len()
        );
    }
    let ns = |p: String| std::fs::read_link(p).map(|l| l.display().to_string());
    let here = ns(format!("/proc/{}/ns/net", there[0]))?;
    let b_ns = std::fs::metadata(format!("/run/netns/{NS_B}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))?;
    if !here.contains(&b_ns.to_string()) {
        bail!("the migrated process is in {here}, not in {NS_B}");
    }
    let ticks = |p: i32| -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        s.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(11)?
            .parse()
            .ok()
    };
    let t0 = ticks(there[0]);
    std::thread::sleep(Duration::from_millis(300));
    if ticks(there[0]) <= t0 {
        bail!("the migrated hotloop (host PID {}) does not run", there[0]);
    }
    println!("\nround  pages     bytes        ms   dirtied MB/s  link MB/s  predicted ms");
    for (i, r) in v["rounds"].as_array().into_iter().flatten().enumerate() {
        println!(
            "{:>5}  {:>8}  {:>10}  {:>7.1}  {:>12.1}  {:>9.0}  {:>12.1}",
            i + 1,
            r["pages"],
            r["bytes"],
            r["ms"].as_f64().unwrap_or(f64::NAN),
            r["dirty_rate_mb_s"].as_f64().unwrap_or(f64::NAN),
            r["link_mb_s"].as_f64().unwrap_or(f64::NAN),
            r["predicted_downtime_ms"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "migrated in {:.0} ms ({}): {} pages frozen, downtime {:.1} ms (predicted {:.1}), post-copy {} ({} pages), {} bytes sent; PID {pid} runs on {NS_B} (host PID {}), running {:.1} ms after the switch, every page in after {:.1} ms",
        v["total_ms"].as_f64().unwrap_or(f64::NAN),
        v["stop"].as_str().unwrap_or("?"),
        v["final_pages"],
        v["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        v["predicted_downtime_ms"].as_f64().unwrap_or(f64::NAN),
        v["post_copy"],
        v["post_copy_pages"],
        v["bytes_sent"],
        there[0],
        dest["restore_ms"].as_f64().unwrap_or(f64::NAN),
        dest["lazy"]["fill_ms"].as_f64().unwrap_or(f64::NAN),
    );
    drop(hosts);
    Ok(serde_json::json!({ "source": v, "destination": dest }))
}
