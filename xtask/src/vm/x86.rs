//! The x86_64 lane: Debian bookworm's `linux-image-amd64` (6.1: soft-dirty
//! yes, PAGEMAP_SCAN no) under TCG (`cargo xtask vm-test x86-softdirty`),
//! and CRIU side by side on it (`cargo xtask bench vm-criu`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{GUEST_DEADLINE, boot, debian_kernel, initramfs, parse_steps, tail};
use crate::util;

const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "booting the x86 test kernel (TCG)"),
    ("busybox-static", "the test guest's shell and tools"),
    ("cpio", "packing the test guest's initramfs"),
];

/// The guest's /init (after [`INIT_PREAMBLE`]): every step prints `TERN-STEP name rc` after its output.
const INIT_X86: &str = r#"echo "TERN-BEGIN $(uname -r)"
tern check --json; echo "TERN-STEP check $?"
hotloop --mib 64 --hot-mib 4 --sleep-ms 5 > /tmp/hot.out 2>&1 &
P=$!
while ! grep -q ready /tmp/hot.out; do sleep 0.1; done
prev=""
for i in 1 2 3; do
  tern pre-dump -t $P -D /tmp/p$i $prev --track soft-dirty --json; echo "TERN-STEP pre-dump-$i $?"
  prev="--prev-images-dir /tmp/p$i"
  sleep 0.2
done
tern dump -t $P -D /tmp/d $prev --track soft-dirty --verify --json; echo "TERN-STEP dump $?"
sleep 0.5
if grep -q '^State:.*Z' /proc/$P/status 2>/dev/null || [ ! -d /proc/$P ]; then
  wait $P
  tern restore -D /tmp/d --detach --json; echo "TERN-STEP restore $?"
  sleep 1
  a=$(cut -d' ' -f14 /proc/$P/stat 2>/dev/null)
  sleep 1
  b=$(cut -d' ' -f14 /proc/$P/stat 2>/dev/null)
  echo "{\"utime_before\": ${a:-null}, \"utime_after\": ${b:-null}}"; echo "TERN-STEP runs 0"
  kill -9 $P
else
  echo "the dump left the original running"; echo "TERN-STEP dump-killed 1"
  kill -9 $P
fi
echo "TERN-END"
poweroff -f
"#;

/// The guest's /init for `bench vm-criu` (after [`INIT_PREAMBLE`]): the same workload through CRIU
/// (`pre-dump --track-mem` x3, `dump --prev-images-dir`, `--display-stats`)
/// and through tern (3 soft-dirty pre-dumps, dump), each on a fresh
/// `hotloop`; image sizes with `du`. CRIU's kerndat checks need loopback,
/// the socket-diag and nf_tables modules (loaded with busybox modprobe).
const INIT_CRIU: &str = r#"mkdir -p /run; mount -t tmpfs run /run
ip link set lo up
mkdir -p /sbin; ln -sf /bin/modprobe /sbin/modprobe
echo /sbin/modprobe > /proc/sys/kernel/modprobe
depmod
for m in unix_diag netlink_diag af_packet_diag tcp_diag udp_diag nf_tables tun veth; do modprobe $m; done
echo "TERN-BEGIN $(uname -r)"
start() {
  setsid hotloop --mib 256 --hot-mib 16 --drift-pages-per-ms 0 --sleep-ms 10 < /dev/null > /tmp/$1.out 2>&1 &
  while ! grep -q ready /tmp/$1.out; do sleep 0.1; done
  P=$(sed -n 's/.*ready pid=\([0-9]*\).*/\1/p' /tmp/$1.out)
}
cd /tmp
start criu
prev=""
for i in 1 2 3; do
  mkdir -p /tmp/c$i
  criu pre-dump -t $P -D /tmp/c$i $prev --track-mem --display-stats -o pre.log; echo "TERN-STEP criu-pre-dump-$i $?"
  prev="--prev-images-dir ../c$i"
  sleep 0.1
done
mkdir -p /tmp/cd
criu dump -t $P -D /tmp/cd $prev --track-mem --display-stats -o dump.log; echo "TERN-STEP criu-dump $?"
for d in c1 c2 c3 cd; do echo "TERN-DU $d $(du -sk /tmp/$d | cut -f1)"; done
start tern
prev=""
for i in 1 2 3; do
  tern pre-dump -t $P -D /tmp/t$i $prev --track soft-dirty --json; echo "TERN-STEP tern-pre-dump-$i $?"
  prev="--prev-images-dir /tmp/t$i"
  sleep 0.1
done
tern dump -t $P -D /tmp/td $prev --track soft-dirty --json; echo "TERN-STEP tern-dump $?"
for d in t1 t2 t3 td; do echo "TERN-DU $d $(du -sk /tmp/$d | cut -f1)"; done
echo "TERN-END"
poweroff -f
"#;

/// `cargo xtask bench vm-criu`: CRIU and tern side by side on Debian's 6.1
/// kernel (soft-dirty) under TCG; writes `target/bench/vm-criu.json`.
pub fn bench_criu() -> Result<()> {
    let mut pkgs = HOST_PACKAGES.to_vec();
    pkgs.push(("criu", "CRIU, run side by side with tern in the 6.1 guest"));
    let (work, vmlinuz) = prepare_x86(&pkgs)?;
    let kver = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel image name")?
        .to_string();
    let modules = vmlinuz
        .parent()
        .and_then(Path::parent)
        .context("kernel package layout")?
        .join("lib/modules")
        .join(&kver);
    let dest = format!("/lib/modules/{kver}");
    let mut extra: Vec<(PathBuf, String)> = ["net", "lib", "crypto"]
        .iter()
        .map(|d| (modules.join("kernel").join(d), format!("{dest}/kernel/{d}")))
        .collect();
    for m in ["tun.ko", "veth.ko"] {
        extra.push((
            modules.join("kernel/drivers/net").join(m),
            format!("{dest}/kernel/drivers/net/{m}"),
        ));
    }
    for f in ["modules.order", "modules.builtin"] {
        extra.push((modules.join(f), format!("{dest}/{f}")));
    }
    let release = util::target_dir().join("release");
    let initrd = initramfs(
        &work,
        "criu",
        &[
            release.join("tern"),
            release.join("hotloop"),
            PathBuf::from("/usr/sbin/criu"),
        ],
        &extra,
        INIT_CRIU,
    )?;
    let t = Instant::now();
    let console = boot_x86(
        3072,
        &vmlinuz,
        &initrd,
        &work.join("criu-console.log"),
        Duration::from_secs(600),
    )?;
    let wall = t.elapsed();
    let steps = parse_steps(&console);
    let failed: Vec<String> = steps
        .iter()
        .filter(|s| s.1 != 0)
        .map(|s| format!("{} exited {}", s.0, s.1))
        .collect();
    if !failed.is_empty() || steps.len() < 8 {
        bail!(
            "vm-criu: {} (of {} steps); console tail:\n{}",
            failed.join(", "),
            steps.len(),
            tail(&console, 40)
        );
    }
    // CRIU's --display-stats, in the order the steps ran.
    let criu_frozen: Vec<f64> = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Frozen time: "))
        .filter_map(|v| v.trim().trim_end_matches("us").trim().parse::<f64>().ok())
        .map(|us| us / 1e3)
        .collect();
    let du: std::collections::BTreeMap<String, u64> = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TERN-DU "))
        .filter_map(|r| {
            let mut w = r.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect();
    let tern_frozen: Vec<f64> = [
        "tern-pre-dump-1",
        "tern-pre-dump-2",
        "tern-pre-dump-3",
        "tern-dump",
    ]
    .iter()
    .map(|n| {
        steps
            .iter()
            .find(|s| s.0 == *n)
            .and_then(|s| s.2.as_ref())
            .and_then(|v| v["frozen_ms"].as_f64())
            .unwrap_or(f64::NAN)
    })
    .collect();
    if criu_frozen.len() != 4 {
        bail!(
            "vm-criu: expected 4 CRIU stats blocks, found {}",
            criu_frozen.len()
        );
    }
    println!(
        "vm-criu: kernel {kver} under TCG (emulated: compare the columns, not with native figures), guest run {:.1} s",
        wall.as_secs_f64()
    );
    println!("  hotloop 256 MiB, 16 MiB rewritten every 10 ms; 3 pre-dumps then the dump");
    println!(
        "  {:<12} {:>16} {:>16} {:>14} {:>14}",
        "step", "CRIU frozen ms", "tern frozen ms", "CRIU KiB", "tern KiB"
    );
    let names = ["pre-dump 1", "pre-dump 2", "pre-dump 3", "dump"];
    let cdirs = ["c1", "c2", "c3", "cd"];
    let tdirs = ["t1", "t2", "t3", "td"];
    let mut rows = Vec::new();
    for i in 0..4 {
        println!(
            "  {:<12} {:>16.1} {:>16.1} {:>14} {:>14}",
            names[i],
            criu_frozen[i],
            tern_frozen[i],
            du.get(cdirs[i]).copied().unwrap_or(0),
            du.get(tdirs[i]).copied().unwrap_or(0)
        );
        rows.push(serde_json::json!({
            "step": names[i],
            "criu_frozen_ms": criu_frozen[i],
            "tern_frozen_ms": tern_frozen[i],
            "criu_kib": du.get(cdirs[i]),
            "tern_kib": du.get(tdirs[i]),
        }));
    }
    let out = util::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let report = serde_json::json!({
        "benchmark": "vm-criu",
        "kernel": kver,
        "emulation": "qemu TCG, -smp 2, 3 GiB",
        "criu": "Debian bookworm 3.17.1",
        "guest_run_s": wall.as_secs_f64(),
        "rows": rows,
    });
    let path = out.join("vm-criu.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

pub fn softdirty() -> Result<()> {
    let (work, vmlinuz) = prepare_x86(HOST_PACKAGES)?;
    let release = util::target_dir().join("release");
    let initrd = initramfs(
        &work,
        "softdirty",
        &[release.join("tern"), release.join("hotloop")],
        &[],
        INIT_X86,
    )?;
    let t = Instant::now();
    let console = boot_x86(
        2048,
        &vmlinuz,
        &initrd,
        &work.join("console.log"),
        GUEST_DEADLINE,
    )?;
    let wall = t.elapsed();
    let steps = parse_steps(&console);
    let fail = |why: String| -> anyhow::Error {
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!(
            "x86-softdirty lane: {why}\n--- guest console (last 40 lines; all of it in {}):\n{}",
            work.join("console.log").display(),
            tail.join("\n")
        )
    };
    let step = |name: &str| -> Result<&Value> {
        match steps.iter().find(|s| s.0 == name) {
            Some((_, 0, Some(v))) => Ok(v),
            Some((_, rc, _)) => Err(fail(format!("step {name} exited {rc}"))),
            None => Err(fail(format!("step {name} did not run"))),
        }
    };
    let check = step("check")?;
    if check["backend"] != "soft-dirty" || check["features"]["soft_dirty"] != true {
        return Err(fail(format!(
            "tern check picked {} (want soft-dirty)",
            check["backend"]
        )));
    }
    let mut pre = Vec::new();
    for i in 1..=3 {
        let v = step(&format!("pre-dump-{i}"))?;
        if v["backend"] != "soft-dirty" {
            return Err(fail(format!("pre-dump {i} used {}", v["backend"])));
        }
        pre.push(v.clone());
    }
    let dump = step("dump")?;
    if dump["verify"]["mismatches"] != 0 {
        return Err(fail(format!(
            "dump --verify found mismatches: {}",
            dump["verify"]
        )));
    }
    let restore = step("restore")?;
    let runs = step("runs")?;
    let (a, b) = (runs["utime_before"].as_u64(), runs["utime_after"].as_u64());
    if !matches!((a, b), (Some(a), Some(b)) if b > a) {
        return Err(fail(format!("the restored hotloop does not run: {runs}")));
    }
    println!(
        "x86-softdirty lane: kernel {}, guest run {:.1} s (TCG)",
        check["kernel"].as_str().unwrap_or("?"),
        wall.as_secs_f64()
    );
    println!(
        "  tern check: backend {}, pagemap_scan {}, uffd_wp_async {}",
        check["backend"], check["features"]["pagemap_scan"], check["features"]["uffd_wp_async"]
    );
    for (i, v) in pre.iter().enumerate() {
        println!(
            "  pre-dump {}: pages_written {}, ebpf_pages {}, frozen_ms {:.1}, duration_ms {:.1}",
            i + 1,
            v["pages_written"],
            v["ebpf_pages"],
            v["frozen_ms"].as_f64().unwrap_or(f64::NAN),
            v["duration_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "  dump: live rounds {}, pages_written {}, frozen_ms {:.1} (with --verify of {} pages, 0 mismatches)",
        dump["live_rounds"].as_array().map_or(0, |a| a.len()),
        dump["pages_written"],
        dump["frozen_ms"].as_f64().unwrap_or(f64::NAN),
        dump["verify"]["pages_checked"]
    );
    println!(
        "  restore: restore_ms {:.1}, pages_restored {}; the restored hotloop runs (utime {} -> {})",
        restore["restore_ms"].as_f64().unwrap_or(f64::NAN),
        restore["pages_restored"],
        a.unwrap_or(0),
        b.unwrap_or(0)
    );
    Ok(())
}

/// Host packages, the release build (tern, hotloop) and Debian's x86
/// kernel: the work directory and the kernel image.
fn prepare_x86(packages: &[(&str, &str)]) -> Result<(PathBuf, PathBuf)> {
    crate::setup::ensure_debian_packages(packages, false)?;
    eprintln!("xtask: cargo build --release (tern, bench)");
    util::run(util::cargo().args(["build", "--release", "-p", "tern", "-p", "bench"]))?;
    let work = util::target_dir().join("vm").join("x86");
    std::fs::create_dir_all(&work)?;
    let vmlinuz = debian_kernel(&work, "linux-image-amd64")?;
    Ok((work, vmlinuz))
}

/// [`boot`] on an emulated x86 machine (q35, TCG, 2 CPUs, `mem_mib`).
fn boot_x86(
    mem_mib: u32,
    kernel: &Path,
    initrd: &Path,
    log: &Path,
    deadline: Duration,
) -> Result<String> {
    let mem = mem_mib.to_string();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2",
    ])
    .args(["-m", &mem, "-nographic", "-no-reboot"])
    .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    boot(&mut qemu, kernel, initrd, log, deadline)
}
