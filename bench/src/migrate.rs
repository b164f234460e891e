//! `bench migrate`: live migration between two hosts on this machine.
//!
//! Two network namespaces joined by a veth pair; `hotloop` (1 GiB) runs on
//! host a (in its network namespace only: CRIU dumps no process whose mount
//! namespace differs from init's without dumping that namespace), `tern
//! receive` on host b in new PID and mount namespaces, `tern migrate` on a
//! inside the workload's namespaces. Workloads: `busy`
//! (a 1 MiB hot set and a drift of 25 pages per 1 ms loop: ~100 MB/s of
//! pages written) and `quiet` (writes nothing). Links: the veth pair
//! unshaped and with `tc tbf` at 1 Gbit/s and 100 Mbit/s; then 100 Mbit/s
//! with 1 ms delay each way, which this kernel cannot make with tc (no
//! netem, no fq): TUN devices and a relay ([`crate::relay`]) instead. Each
//! link's round trip is measured and kept beside its rows.
//! Each configuration with `--post-copy never`, `always` and `auto`:
//! predicted and measured downtime (source frozen to destination running),
//! total time, bytes sent, rounds, post-copy pages, the destination's fill;
//! each configuration `--repeats` times, the run of median downtime shown.
//!
//! CRIU beside it: `criu dump` on a, the images copied to b over the link
//! (a tar stream), `criu restore` on b in new PID and mount namespaces
//! (CRIU has no pre-copy here: its pre-dump needs soft-dirty); its
//! downtime is all three (once per configuration: it is seconds).

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

pub(crate) fn ip(args: &[&str]) -> Result<()> {
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

/// How the two hosts are joined.
#[derive(Clone, Copy)]
enum Link {
    /// A veth pair, shaped to `rate` both ways with tc tbf, or not.
    Veth(Option<&'static str>),
    /// TUN devices and a relay ([`crate::relay`]): `rate_bps` and a one-way
    /// delay both ways.
    Delayed { rate_bps: u64, delay: Duration },
}

/// The round trip between the hosts (median of 20 one-byte TCP
/// exchanges, ms), or None if they cannot talk.
fn ping_ms() -> Option<f64> {
    use std::io::{Read, Write};
    let addr = format!("{ADDR_B}:{}", PORT + 1);
    let listener = crate::relay::in_netns(NS_B, {
        let addr = addr.clone();
        move || {
            let l = std::net::TcpListener::bind(&addr)?;
            l.set_nonblocking(true)?;
            let until = Instant::now() + Duration::from_secs(3);
            let mut c = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(_) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            c.set_nonblocking(false)?;
            c.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() {
                c.write_all(&b)?;
            }
            Ok(())
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let times = crate::relay::in_netns(NS_A, move || {
        let mut c = std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(2))?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut t = Vec::new();
        let mut b = [0u8; 1];
        for _ in 0..20 {
            let t0 = Instant::now();
            c.write_all(&[1])?;
            c.read_exact(&mut b)?;
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(t)
    })
    .join()
    .ok()?
    .ok();
    let _ = listener.join();
    let mut t = times?;
    t.sort_by(f64::total_cmp);
    Some(t[t.len() / 2])
}

/// The two hosts, removed when dropped.
struct Hosts {
    relay: Option<crate::relay::DelayLink>,
}

impl Hosts {
    fn new() -> Result<Hosts> {
        remove_hosts();
        ip(&["netns", "add", NS_A])?;
        ip(&["netns", "add", NS_B])?;
        for ns in [NS_A, NS_B] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(Hosts { relay: None })
    }

    /// Join the hosts by `link` (the addresses stay the same).
    fn join(&mut self, link: Link) -> Result<()> {
        self.relay = None;
        for (ns, dev) in [(NS_A, "tbench-a"), (NS_B, "tbench-b")] {
            let _ = Command::new("ip")
                .args(["-n", ns, "link", "del", dev])
                .stderr(Stdio::null())
                .status();
        }
        match link {
            Link::Veth(rate) => {
                ip(&[
                    "link", "add", "tbench-a", "netns", NS_A, "type", "veth", "peer", "name",
                    "tbench-b", "netns", NS_B,
                ])?;
                for (ns, dev, addr) in [(NS_A, "tbench-a", ADDR_A), (NS_B, "tbench-b", ADDR_B)] {
                    ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
                    ip(&["-n", ns, "link", "set", dev, "up"])?;
                }
                self.shape(rate)
            }
            Link::Delayed { rate_bps, delay } => {
                self.relay = Some(crate::relay::DelayLink::new(
                    (NS_A, "tbench-a", ADDR_A),
                    (NS_B, "tbench-b", ADDR_B),
                    rate_bps,
                    delay,
                )?);
                Ok(())
            }
        }
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
        self.relay = None;
        remove_hosts();
    }
}

/// `hotloop WORKLOAD` on host a (its network namespace only), once it
/// has written all its pages.
fn start_hotloop(
    bin_dir: &Path,
    work: &Path,
    workload: &[&str],
) -> Result<(std::process::Child, i32)> {
    let log = work.join("hotloop.log");
    let started = crate::run::spawn_until_ready(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NS_A}"))
            .arg(bin_dir.join("hotloop"))
            .args(workload)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?),
        &log,
        Duration::from_secs(60),
    )?;
    // The workload settles (its pages all written once).
    std::thread::sleep(Duration::from_secs(1));
    Ok(started)
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
    // What the previous runs wrote (gigabytes of images, CRIU's too) goes
    // to disk now, not in the background during this run's switch-over.
    nix::unistd::sync();
    let (mut w, pid) = start_hotloop(bin_dir, work, workload)?;
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

/// Copies `from` (on host a) into `to` (on host b) over the link: a tar
/// stream through one TCP connection, python3 at both ends.
fn copy_over_link(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let port = PORT + 100;
    let mut rx = Command::new("ip")
        .args(["netns", "exec", NS_B, "python3", "-c"])
        .arg(format!(
            "import socket,sys,tarfile\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{ADDR_B}',{port}))\ns.listen(1)\nprint('up',flush=True)\nc,_=s.accept()\ntarfile.open(fileobj=c.makefile('rb'),mode='r|').extractall(sys.argv[1])"
        ))
        .arg(to)
        .stdout(Stdio::piped())
        .spawn()
        .context("python3 on host b")?;
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(rx.stdout.take().expect("piped")).read_line(&mut line)?;
    }
    let tx = Command::new("ip")
        .args(["netns", "exec", NS_A, "python3", "-c"])
        .arg(format!(
            "import socket,sys,tarfile\ns=socket.create_connection(('{ADDR_B}',{port}))\nf=s.makefile('wb')\nt=tarfile.open(fileobj=f,mode='w|')\nt.add(sys.argv[1],arcname='.')\nt.close()\nf.close()\ns.close()"
        ))
        .arg(from)
        .status()
        .context("python3 on host a")?;
    let r = rx.wait()?;
    if !tx.success() || !r.success() {
        bail!(
            "copying {} to {} over the link failed",
            from.display(),
            to.display()
        );
    }
    Ok(())
}

/// CRIU beside tern: `criu dump` on a (in the workload's namespaces), the
/// images copied to b over the link, `criu restore` on b in new PID and
/// mount namespaces. CRIU has no pre-copy here (its pre-dump needs
/// soft-dirty, which this kernel lacks): the process is frozen from the
/// dump until it runs on b.
fn criu_once(criu: &Path, bin_dir: &Path, work: &Path, workload: &[&str]) -> Result<Value> {
    let (mut w, pid) = start_hotloop(bin_dir, work, workload)?;
    let (da, db) = (work.join("criu-a"), work.join("criu-b"));
    for d in [&da, &db] {
        let _ = std::fs::remove_dir_all(d);
    }
    std::fs::create_dir_all(&da)?;
    let res = (|| -> Result<Value> {
        let t0 = Instant::now();
        let out = crate::run::run_deadline(
            Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "--"])
                .arg(criu)
                .args(["dump", "-t", &pid.to_string(), "-D"])
                .arg(&da)
                .args(["-o", "dump.log", "-v2", "--display-stats"]),
            "criu dump",
            Duration::from_secs(600),
        )?;
        if !out.status.success() {
            bail!(
                "criu dump failed: {}; see {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                da.join("dump.log").display()
            );
        }
        let dump_ms = t0.elapsed().as_secs_f64() * 1e3;
        let stats = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let t1 = Instant::now();
        copy_over_link(&da, &db)?;
        let copy_ms = t1.elapsed().as_secs_f64() * 1e3;
        let t2 = Instant::now();
        let mut r = Command::new("ip")
            .args([
                "netns",
                "exec",
                NS_B,
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
            ])
            .arg(criu)
            .args(["restore", "-D"])
            .arg(&db)
            .args(["-o", "restore.log", "-v2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("criu restore")?;
        // Running on b: a process whose PID in its namespace is the
        // workload's, not stopped, using CPU.
        let end = Instant::now() + Duration::from_secs(300);
        let restore_ms = loop {
            if let Some(p) = running_copy(pid) {
                let _ = p;
                break t2.elapsed().as_secs_f64() * 1e3;
            }
            if let Ok(Some(st)) = r.try_wait() {
                bail!(
                    "criu restore exited ({st}); see {}",
                    db.join("restore.log").display()
                );
            }
            if Instant::now() > end {
                let _ = r.kill();
                bail!(
                    "criu restore: nothing ran within 300 s; see {}",
                    db.join("restore.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let _ = r.kill();
        let _ = r.wait();
        Ok(json!({
            "dump_ms": dump_ms,
            "frozen_ms": crate::run::criu_stat_ms(&stats, "Frozen time"),
            "copy_ms": copy_ms,
            "restore_ms": restore_ms,
            "downtime_ms": dump_ms + copy_ms + restore_ms,
            "bytes": dir_bytes(&da),
        }))
    })();
    if let Ok(out) = Command::new("ip").args(["netns", "pids", NS_B]).output() {
        for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(p) = p.parse::<i32>() {
                crate::run::kill(p);
            }
        }
    }
    crate::run::kill(pid);
    let _ = w.wait();
    for d in [&da, &db] {
        let _ = std::fs::remove_dir_all(d);
    }
    res
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A live, not stopped process whose PID in its own namespace is `pid`.
fn running_copy(pid: i32) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if p == pid {
            continue;
        }
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
        let state = st
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .map(str::trim)
            .and_then(|s| s.chars().next());
        let comm = st
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .map(str::trim);
        if ns.len() > 1
            && ns.last() == Some(&pid)
            && matches!(state, Some('R' | 'S'))
            && comm == Some("hotloop")
        {
            return Some(p);
        }
    }
    None
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Run every configuration; JSON to `out/migrate.json`, a table to stdout.
pub fn run(
    tern: &Path,
    bin_dir: &Path,
    out: &Path,
    mib: u64,
    repeats: usize,
    criu: std::result::Result<std::path::PathBuf, String>,
) -> Result<Value> {
    std::fs::create_dir_all(out)?;
    let work = out.join("tmp-migrate");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut hosts = Hosts::new()?;
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
        ("unshaped", Link::Veth(None)),
        ("1gbit", Link::Veth(Some("1gbit"))),
        ("100mbit", Link::Veth(Some("100mbit"))),
        (
            "100mbit+1ms",
            Link::Delayed {
                rate_bps: 100_000_000,
                delay: Duration::from_millis(1),
            },
        ),
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
    for (link, how) in links {
        hosts
            .join(how)
            .with_context(|| format!("joining the hosts by {link}"))?;
        let rtt = ping_ms();
        println!(
            "link {link}: ping {}",
            rtt.map_or("failed".into(), |r| format!("{r:.2} ms"))
        );
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
                    "link_rtt_ms": rtt,
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
            match &criu {
                Ok(c) => {
                    // Once: its downtime is seconds, not milliseconds.
                    let mut runs = vec![
                        criu_once(c, bin_dir, &work, args)
                            .with_context(|| format!("CRIU, {load} over {link}"))?,
                    ];
                    runs.sort_by(|a, b| f(&a["downtime_ms"]).total_cmp(&f(&b["downtime_ms"])));
                    let m = runs[runs.len() / 2].clone();
                    println!(
                        "{:<6} {:<9} {:<6} {:>6} {:>10} {:>9.1} {:>9} {:>9.0} {:>12} {:>9} {:>9}",
                        load,
                        link,
                        "criu",
                        "-",
                        "-",
                        f(&m["downtime_ms"]),
                        "-",
                        f(&m["downtime_ms"]),
                        m["bytes"],
                        "-",
                        "-",
                    );
                    rows.push(json!({
                        "workload": load,
                        "link": link,
                        "mode": "criu dump, copy, restore",
                        "downtime_ms": m["downtime_ms"],
                        "total_ms": m["downtime_ms"],
                        "bytes_sent": m["bytes"],
                        "criu": m,
                        "runs": runs,
                    }));
                }
                Err(why) => println!("{load} {link}: CRIU not run: {why}"),
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
        "criu": criu.as_ref().map(|c| crate::run::criu_version(c)).unwrap_or_else(|why| why.clone()),
        "not_measured": {
            "criu lazy migration": "CRIU's post-copy (dump --lazy-pages with lazy-pages --page-server) is not measured yet; CRIU is measured as dump, copy over the link, restore (its pre-dump needs soft-dirty, which this kernel lacks)",
        },
    });
    std::fs::write(
        out.join("migrate.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    println!("\nJSON: {}", out.join("migrate.json").display());
    Ok(report)
}
