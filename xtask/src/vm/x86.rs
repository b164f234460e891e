//! The x86_64 lane: Debian bookworm's `linux-image-amd64` (6.1: soft-dirty
//! yes, PAGEMAP_SCAN no) under TCG (`cargo xtask vm-test x86-softdirty`),
//! and CRIU side by side on it (`cargo xtask bench vm-criu`).
//!
//! One guest boot runs the whole lane, in three parts:
//! 1. `tern check`, three `--track soft-dirty` pre-dumps of `hotloop`,
//!    `dump --verify` and `restore --detach` (the restored hotloop must run);
//! 2. the CRIU-vs-tern workload of `bench vm-criu` ([`INIT_CRIU_VS_TERN`]:
//!    CRIU 3.17.1 from the host's Debian and tern, three pre-dumps and a
//!    dump each), printed side by side;
//! 3. the `#[ignore]`d soft-dirty tests of the `tern-tests` crate
//!    (`tests/tests/precision.rs`: 1 GiB, 2% dirty, the eBPF recall of
//!    pre-dump and of `tern track`, a track between two pre-dumps;
//!    `tests/tests/scenarios.rs`: the memory oracle after each way a process
//!    changes its memory), run with `--ignored`: on this host they cannot
//!    run (no soft-dirty), in the guest each test binary must exit 0 and
//!    pass as many tests as it lists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{GUEST_DEADLINE, boot, debian_kernel, initramfs, parse_steps, tail};
use crate::util;

const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "booting the x86 test kernel (TCG)"),
    ("busybox-static", "the test guest's shell and tools"),
    ("cpio", "packing the test guest's initramfs"),
    ("criu", "CRIU, run side by side with tern in the 6.1 guest"),
];

/// Boot to power-off of the lane's guest (400 to 520 s here: TCG, one vCPU,
/// see [`boot_x86`]; the precision tests take 150 s of it, the scenarios
/// 200 to 300 s). Room for both test binaries to run into their
/// [`TEST_TIMEOUT_S`] and the lane still to report.
const LANE_DEADLINE: Duration = Duration::from_secs(960);

/// Each test binary's limit in the guest (`timeout`): a hung test fails its
/// binary, with what it printed so far.
const TEST_TIMEOUT_S: u32 = 420;

/// The test binaries of `tern-tests` the lane runs (`cargo test --test`).
const TEST_BINS: [&str; 2] = ["precision", "scenarios"];

/// Every guest's /init starts with this (after [`super::INIT_PREAMBLE`]):
/// every step prints its output, then `TERN-STEP name rc`; a timed command
/// prints `TERN-TIME name start end` (seconds of uptime, 10 ms resolution).
const INIT_BEGIN: &str = r#"echo "TERN-BEGIN $(uname -r)"
up() { cut -d' ' -f1 /proc/uptime; }
T0=$(up)
"#;

/// Part 1 of the lane: `tern check`, soft-dirty pre-dumps, dump --verify and
/// restore of `hotloop`.
const INIT_HOTLOOP: &str = r#"tern check --json; echo "TERN-STEP check $?"
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
  watch_loops $P; echo "TERN-STEP runs 0"
  kill -9 $P
else
  echo "the dump left the original running"; echo "TERN-STEP dump-killed 1"
  kill -9 $P
fi
rm -rf /tmp/p1 /tmp/p2 /tmp/p3 /tmp/d
"#;

/// What CRIU needs in the guest: loopback, /run, and the modules its
/// kerndat checks load (socket diag, nf_tables, tun, veth; busybox modprobe).
const INIT_CRIU_SETUP: &str = r#"mkdir -p /run; mount -t tmpfs run /run
ip link set lo up
mkdir -p /sbin; ln -sf /bin/modprobe /sbin/modprobe
echo /sbin/modprobe > /proc/sys/kernel/modprobe
depmod
for m in unix_diag netlink_diag af_packet_diag tcp_diag udp_diag nf_tables tun veth; do modprobe $m; done
"#;

/// The CRIU-vs-tern workload (after [`INIT_CRIU_SETUP`]): the same hotloop
/// through CRIU (`pre-dump --track-mem` x3, `dump --prev-images-dir`,
/// `--display-stats`) and through tern (3 soft-dirty pre-dumps, dump), each
/// on a fresh `hotloop`; each command timed, image sizes with `du`.
/// Between `TERN-CRIU-BEGIN` and `TERN-CRIU-END`; the images are removed
/// after (the guest's files are in its memory).
const INIT_CRIU_VS_TERN: &str = r#"echo "TERN-CRIU-BEGIN"
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
  a=$(up); criu pre-dump -t $P -D /tmp/c$i $prev --track-mem --display-stats -o pre.log; rc=$?
  echo "TERN-TIME criu-pre-dump-$i $a $(up)"; echo "TERN-STEP criu-pre-dump-$i $rc"
  prev="--prev-images-dir ../c$i"
  sleep 0.1
done
mkdir -p /tmp/cd
a=$(up); criu dump -t $P -D /tmp/cd $prev --track-mem --display-stats -o dump.log; rc=$?
echo "TERN-TIME criu-dump $a $(up)"; echo "TERN-STEP criu-dump $rc"
for d in c1 c2 c3 cd; do echo "TERN-DU $d $(du -sk /tmp/$d | cut -f1)"; done
start tern
prev=""
for i in 1 2 3; do
  a=$(up); tern pre-dump -t $P -D /tmp/t$i $prev --track soft-dirty --json; rc=$?
  echo "TERN-TIME tern-pre-dump-$i $a $(up)"; echo "TERN-STEP tern-pre-dump-$i $rc"
  prev="--prev-images-dir /tmp/t$i"
  sleep 0.1
done
a=$(up); tern dump -t $P -D /tmp/td $prev --track soft-dirty --json; rc=$?
echo "TERN-TIME tern-dump $a $(up)"; echo "TERN-STEP tern-dump $rc"
for d in t1 t2 t3 td; do echo "TERN-DU $d $(du -sk /tmp/$d | cut -f1)"; done
echo "TERN-CRIU-END"
rm -rf /tmp/c1 /tmp/c2 /tmp/c3 /tmp/cd /tmp/t1 /tmp/t2 /tmp/t3 /tmp/td
"#;

/// Part 3 of the lane: the soft-dirty tests of `tern-tests` (`--ignored`),
/// each test binary's libtest output between `TERN-TESTS-BEGIN name` and
/// its step, under a `timeout` (a hung test fails its binary, not the lane's
/// other parts). Transparent huge pages go off first: Debian's 6.1 has them
/// `always`, and soft-dirty marks a whole huge page on one write, which the
/// tests' page-exact counts cannot allow for (they say so when THP is on);
/// the parts above run with the distribution's setting. One test at a time:
/// the guest has one vCPU, and the scenarios two at a time were no faster
/// (230 s to over 300 s, three runs of five killed at 300 s) than one at a
/// time (314 s for all 13).
const INIT_TESTS: &str = r#"echo never > /sys/kernel/mm/transparent_hugepage/enabled
echo "TERN-THP $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
cd /tmp
libtest() {
  n=$1; shift
  echo "TERN-TESTS-BEGIN $n"
  a=$(up); timeout TEST_TIMEOUT_S "$@"; rc=$?
  echo "TERN-TIME test-$n $a $(up)"; echo "TERN-STEP test-$n $rc"
}
libtest precision precision --ignored --test-threads=1 --show-output
libtest scenarios scenarios --ignored --test-threads=1
"#;

const INIT_END: &str = r#"echo "TERN-TIME guest $T0 $(up)"
echo "TERN-END"
poweroff -f
"#;

/// `cargo xtask bench vm-criu`: CRIU and tern side by side on Debian's 6.1
/// kernel (soft-dirty) under TCG; writes `target/bench/vm-criu.json`.
pub fn bench_criu() -> Result<()> {
    let (work, vmlinuz) = prepare_x86(HOST_PACKAGES, "release")?;
    let (kver, modules) = criu_guest_files(&vmlinuz)?;
    let release = util::profile_dir("release");
    let init = [INIT_BEGIN, INIT_CRIU_SETUP, INIT_CRIU_VS_TERN, INIT_END].concat();
    let initrd = initramfs(
        &work,
        "criu",
        &[
            release.join("tern"),
            release.join("hotloop"),
            PathBuf::from("/usr/sbin/criu"),
        ],
        &modules,
        &init,
    )?;
    let t = Instant::now();
    let console = boot_x86(
        3072,
        &vmlinuz,
        &initrd,
        &work.join("criu-console.log"),
        GUEST_DEADLINE,
    )?;
    let wall = t.elapsed();
    let rows = criu_comparison(&console, &parse_steps(&console))
        .map_err(|e| anyhow::anyhow!("vm-criu: {e:#}; console tail:\n{}", tail(&console, 40)))?;
    println!(
        "vm-criu: kernel {kver} under TCG (emulated: compare the columns, not with native figures), guest run {:.1} s",
        wall.as_secs_f64()
    );
    print_comparison(&rows);
    let out = util::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let report = serde_json::json!({
        "benchmark": "vm-criu",
        "kernel": kver,
        "emulation": "qemu TCG, -smp 1, 3 GiB",
        "criu": "Debian bookworm 3.17.1",
        "guest_run_s": wall.as_secs_f64(),
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
    });
    let path = out.join("vm-criu.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// `cargo xtask vm-test x86-softdirty`: the three parts of the module doc in
/// one boot; every part is reported, failed ones included, and the command
/// fails if any did.
pub fn softdirty() -> Result<()> {
    prepare_softdirty()?.run()
}

/// The lane built and packed, its guest not booted yet.
pub struct SoftdirtyGuest {
    t_all: Instant,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    log: PathBuf,
    tests: Vec<TestBin>,
}

/// The host's side of the lane (packages, the build, the kernel,
/// the initramfs): everything the guest needs, on both cores.
pub fn prepare_softdirty() -> Result<SoftdirtyGuest> {
    let t_all = Instant::now();
    let (work, vmlinuz) = prepare_x86(HOST_PACKAGES, util::TEST_PROFILE)?;
    let tests = build_tests(&work)?;
    let (_, modules) = criu_guest_files(&vmlinuz)?;
    let built = util::profile_dir(util::TEST_PROFILE);
    let mut bins = vec![
        built.join("tern"),
        built.join("hotloop"),
        built.join("workload"),
        PathBuf::from("/usr/sbin/criu"),
    ];
    bins.extend(tests.iter().map(|t| t.exe.clone()));
    let init = [
        INIT_BEGIN,
        INIT_HOTLOOP,
        INIT_CRIU_SETUP,
        INIT_CRIU_VS_TERN,
        INIT_TESTS,
        INIT_END,
    ]
    .concat()
    .replace("TEST_TIMEOUT_S", &TEST_TIMEOUT_S.to_string());
    let initrd = initramfs(&work, "softdirty", &bins, &modules, &init)?;
    Ok(SoftdirtyGuest {
        t_all,
        vmlinuz,
        initrd,
        log: work.join("console.log"),
        tests,
    })
}

impl SoftdirtyGuest {
    /// Boot the guest (one vCPU: one core of the host) and report.
    pub fn run(self) -> Result<()> {
        let SoftdirtyGuest {
            t_all,
            vmlinuz,
            initrd,
            log,
            tests,
        } = self;
        let log = &log;
        let t = Instant::now();
        let console = boot_x86(4096, &vmlinuz, &initrd, log, LANE_DEADLINE)?;
        let guest = t.elapsed();
        let steps = parse_steps(&console);
        let times = timings(&console);
        let mut failures = Vec::new();

        let kernel = console
            .lines()
            .find_map(|l| l.split("TERN-BEGIN ").nth(1))
            .map_or("?", str::trim);
        println!("x86-softdirty lane: kernel {kernel} under TCG");
        hotloop_report(&steps, &mut failures);
        println!("  CRIU and tern side by side (part of `cargo xtask bench vm-criu`):");
        match criu_comparison(&console, &steps) {
            Ok(rows) => print_comparison(&rows),
            Err(e) => failures.push(format!("CRIU-vs-tern workload: {e:#}")),
        }
        let thp = console
            .lines()
            .find_map(|l| l.trim().strip_prefix("TERN-THP "))
            .unwrap_or("?");
        println!("  soft-dirty tests of tern-tests (--ignored; transparent_hugepage: {thp}):");
        for t in &tests {
            test_report(&console, &steps, &times, t, &mut failures);
        }
        println!(
            "  times: guest boot to power-off {:.1} s (its /init {:.1} s), whole lane {:.1} s",
            guest.as_secs_f64(),
            times.get("guest").copied().unwrap_or(f64::NAN) / 1e3,
            t_all.elapsed().as_secs_f64()
        );
        super::print_stalls(&console);
        if !failures.is_empty() {
            bail!(
                "x86-softdirty lane: {} problem(s):\n  {}\n--- guest console (last 40 lines; all of it in {}):\n{}",
                failures.len(),
                failures.join("\n  "),
                log.display(),
                tail(&console, 40)
            );
        }
        println!("x86-softdirty lane: all parts passed");
        Ok(())
    }
}

/// A step's JSON when it exited 0; else a failure is recorded.
fn ok_step<'a>(
    steps: &'a [(String, i32, Option<Value>)],
    name: &str,
    failures: &mut Vec<String>,
) -> Option<&'a Value> {
    match steps.iter().find(|s| s.0 == name) {
        Some((_, 0, Some(v))) => Some(v),
        Some((_, 0, None)) => {
            failures.push(format!("step {name} printed no JSON"));
            None
        }
        Some((_, rc, _)) => {
            failures.push(format!("step {name} exited {rc}"));
            None
        }
        None => {
            failures.push(format!("step {name} did not run"));
            None
        }
    }
}

/// Part 1: check what tern printed for the hotloop steps and print it.
fn hotloop_report(steps: &[(String, i32, Option<Value>)], failures: &mut Vec<String>) {
    let Some(check) = ok_step(steps, "check", failures) else {
        return;
    };
    if check["backend"] != "soft-dirty" || check["features"]["soft_dirty"] != true {
        failures.push(format!(
            "tern check picked {} (want soft-dirty)",
            check["backend"]
        ));
    }
    println!(
        "  tern check: backend {}, pagemap_scan {}, uffd_wp_async {}, ebpf_fault_tracepoints {}",
        check["backend"],
        check["features"]["pagemap_scan"],
        check["features"]["uffd_wp_async"],
        check["features"]["ebpf_fault_tracepoints"]
    );
    for i in 1..=3 {
        let Some(v) = ok_step(steps, &format!("pre-dump-{i}"), failures) else {
            continue;
        };
        if v["backend"] != "soft-dirty" {
            failures.push(format!("pre-dump {i} used {}", v["backend"]));
        }
        println!(
            "  hotloop pre-dump {i}: pages_written {}, ebpf_pages {}, frozen_ms {:.1}, duration_ms {:.1}",
            v["pages_written"],
            v["ebpf_pages"],
            v["frozen_ms"].as_f64().unwrap_or(f64::NAN),
            v["duration_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(dump) = ok_step(steps, "dump", failures) {
        if dump["verify"]["mismatches"] != 0 {
            failures.push(format!(
                "dump --verify found mismatches: {}",
                dump["verify"]
            ));
        }
        println!(
            "  hotloop dump: live rounds {}, pages_written {}, frozen_ms {:.1} (with --verify of {} pages, {} mismatches)",
            dump["live_rounds"].as_array().map_or(0, |a| a.len()),
            dump["pages_written"],
            dump["frozen_ms"].as_f64().unwrap_or(f64::NAN),
            dump["verify"]["pages_checked"],
            dump["verify"]["mismatches"]
        );
    }
    let restore = ok_step(steps, "restore", failures);
    if let Some(runs) = ok_step(steps, "runs", failures) {
        let summary = super::runs_summary("the restored hotloop", runs, failures);
        if let Some(r) = restore {
            println!(
                "  hotloop restore: restore_ms {:.1}, pages_restored {}; the restored hotloop runs: {summary}",
                r["restore_ms"].as_f64().unwrap_or(f64::NAN),
                r["pages_restored"],
            );
        }
    }
}

/// Host packages, a build of tern and the bench programs (the profile's
/// directory holds them) and Debian's x86 kernel: the work directory and the
/// kernel image.
///
/// The softdirty lane builds [`util::TEST_PROFILE`] as `cargo xtask test`
/// does, for the whole workspace, so after the host suite nothing is rebuilt
/// (a narrower `-p` selection unifies features differently and rebuilds half
/// the tree); `bench vm-criu` builds release, tern and bench only.
fn prepare_x86(packages: &[(&str, &str)], profile: &str) -> Result<(PathBuf, PathBuf)> {
    crate::setup::ensure_debian_packages(packages, false)?;
    let mut cmd = util::cargo();
    cmd.args(["build", "--profile", profile]);
    if profile != util::TEST_PROFILE {
        cmd.args(["-p", "tern", "-p", "bench"]);
    }
    eprintln!("xtask: {}", util::show(&cmd));
    util::run(&mut cmd)?;
    let work = util::target_dir().join("vm").join("x86");
    std::fs::create_dir_all(&work)?;
    let vmlinuz = debian_kernel(&work, "linux-image-amd64")?;
    Ok((work, vmlinuz))
}

/// One test binary of `tern-tests` for the guest.
struct TestBin {
    /// `precision`, `scenarios`: its name in the guest and its step's.
    name: &'static str,
    /// A copy under that name (the build's has a hash in it).
    exe: PathBuf,
    /// How many tests `--ignored` selects (libtest's `--list` on this host):
    /// the guest must pass that many.
    ignored: usize,
}

/// [`TEST_BINS`] as `cargo xtask test` builds them (the same command, so
/// nothing is rebuilt after the host suite; cargo builds a package's binaries,
/// the workload programs, with its integration tests), copied into
/// `work/tests/` under their test names.
fn build_tests(work: &Path) -> Result<Vec<TestBin>> {
    let mut cmd = util::cargo();
    cmd.args(["test", "--profile", util::TEST_PROFILE, "--no-run"]);
    eprintln!("xtask: {} (for {})", util::show(&cmd), TEST_BINS.join(", "));
    cmd.args(["--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit());
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", util::show(&cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", util::show(&cmd), out.status);
    }
    let mut exes = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        // Integration tests only: a workspace has other targets of these names.
        let integration_test = v["target"]["kind"] == serde_json::json!(["test"]);
        if let (Some(name), Some(exe), true) = (
            v["target"]["name"].as_str(),
            v["executable"].as_str(),
            v["profile"]["test"] == true && integration_test,
        ) {
            exes.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let dir = work.join("tests");
    std::fs::create_dir_all(&dir)?;
    let mut bins = Vec::new();
    for name in TEST_BINS {
        let built = exes
            .get(name)
            .with_context(|| format!("cargo test --no-run: no executable for tests/{name}.rs"))?;
        let exe = dir.join(name);
        std::fs::copy(built, &exe)
            .with_context(|| format!("copying {} to {}", built.display(), exe.display()))?;
        let list = util::stdout_of(&mut util::command(
            built.to_str().context("non-UTF-8 target path")?,
            ["--ignored", "--list"],
        ))?;
        let ignored = list.lines().filter(|l| l.ends_with(": test")).count();
        if ignored == 0 {
            bail!(
                "{}: no #[ignore]d tests to run in the guest",
                built.display()
            );
        }
        bins.push(TestBin { name, exe, ignored });
    }
    Ok(bins)
}

/// Part 3: one test binary's result (exit 0 and all its ignored tests
/// passed); prints libtest's summary, the lines the tests print for the
/// lane (`precision ...`, `eBPF recall ...`), and any failed test's name.
fn test_report(
    console: &str,
    steps: &[(String, i32, Option<Value>)],
    times: &BTreeMap<String, f64>,
    t: &TestBin,
    failures: &mut Vec<String>,
) {
    let step = format!("test-{}", t.name);
    let out = section(
        console,
        &format!("TERN-TESTS-BEGIN {}", t.name),
        &format!("TERN-STEP {step} "),
    );
    let summary = out
        .iter()
        .rev()
        .find(|l| l.starts_with("test result:"))
        .copied();
    let passed = summary
        .and_then(|s| s.split("; ").next())
        .and_then(|s| s.rsplit(' ').nth(1))
        .and_then(|n| n.parse::<usize>().ok());
    println!(
        "    {} ({:.1} s): {}",
        t.name,
        times.get(&step).copied().unwrap_or(f64::NAN) / 1e3,
        summary.unwrap_or("no libtest summary")
    );
    for l in &out {
        if l.starts_with("precision ") || l.starts_with("eBPF recall ") {
            println!("      {l}");
        }
        if l.starts_with("test ") && l.ends_with("FAILED") {
            println!("      {l}");
        }
    }
    match steps.iter().find(|s| s.0 == step) {
        Some((_, 0, _)) if passed == Some(t.ignored) => {}
        Some((_, 0, _)) => failures.push(format!(
            "{}: {} tests passed, {} listed with --ignored",
            t.name,
            passed.map_or("?".into(), |n| n.to_string()),
            t.ignored
        )),
        Some((_, rc, _)) => {
            let failed: Vec<&str> = out
                .iter()
                .filter(|l| l.starts_with("test ") && l.ends_with("FAILED"))
                .copied()
                .collect();
            failures.push(format!(
                "{} exited {rc}{} ({}); its output:\n{}",
                t.name,
                if *rc == 143 {
                    format!(" (killed at {TEST_TIMEOUT_S} s)")
                } else {
                    String::new()
                },
                failed.join(", "),
                out[out.len().saturating_sub(60)..].join("\n")
            ));
        }
        None => failures.push(format!("{} did not run", t.name)),
    }
}

/// The console lines from the one after `begin` to the one before the
/// first line that starts with `end` (CR and surrounding spaces trimmed).
fn section<'a>(console: &'a str, begin: &str, end: &str) -> Vec<&'a str> {
    console
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c == '\r'))
        .skip_while(|l| *l != begin)
        .skip(1)
        .take_while(|l| !l.starts_with(end))
        .collect()
}

/// `TERN-TIME name start end` lines: milliseconds per name.
fn timings(console: &str) -> BTreeMap<String, f64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TERN-TIME "))
        .filter_map(|r| {
            let w: Vec<&str> = r.split_whitespace().collect();
            let (a, b): (f64, f64) = (w.get(1)?.parse().ok()?, w.get(2)?.parse().ok()?);
            Some((w.first()?.to_string(), (b - a) * 1e3))
        })
        .collect()
}

/// Debian's kernel modules CRIU's kerndat checks need (net, lib, crypto, tun,
/// veth) as `initramfs` extras, and the kernel version.
fn criu_guest_files(vmlinuz: &Path) -> Result<(String, Vec<(PathBuf, String)>)> {
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
    Ok((kver, extra))
}

/// One step of the CRIU-vs-tern workload, for both tools.
#[derive(Debug)]
struct Row {
    step: &'static str,
    criu: Side,
    tern: Side,
}

/// One tool's figures for a step: frozen time (CRIU's `--display-stats`,
/// tern's `frozen_ms`), the command's wall time, pages written, image KiB.
#[derive(Debug)]
struct Side {
    frozen_ms: f64,
    wall_ms: f64,
    pages: Option<u64>,
    kib: Option<u64>,
}

impl Row {
    fn json(&self) -> Value {
        serde_json::json!({
            "step": self.step,
            "criu_frozen_ms": self.criu.frozen_ms,
            "tern_frozen_ms": self.tern.frozen_ms,
            "criu_wall_ms": self.criu.wall_ms,
            "tern_wall_ms": self.tern.wall_ms,
            "criu_pages_written": self.criu.pages,
            "tern_pages_written": self.tern.pages,
            "criu_kib": self.criu.kib,
            "tern_kib": self.tern.kib,
        })
    }
}

/// The steps of [`INIT_CRIU_VS_TERN`]: (row, CRIU's step and image
/// directory, tern's).
const CRIU_ROWS: [(&str, &str, &str, &str, &str); 4] = [
    (
        "pre-dump 1",
        "criu-pre-dump-1",
        "c1",
        "tern-pre-dump-1",
        "t1",
    ),
    (
        "pre-dump 2",
        "criu-pre-dump-2",
        "c2",
        "tern-pre-dump-2",
        "t2",
    ),
    (
        "pre-dump 3",
        "criu-pre-dump-3",
        "c3",
        "tern-pre-dump-3",
        "t3",
    ),
    ("dump", "criu-dump", "cd", "tern-dump", "td"),
];

/// Read the CRIU-vs-tern workload's figures back from the console; Err if
/// a step failed or did not print what it should.
fn criu_comparison(console: &str, steps: &[(String, i32, Option<Value>)]) -> Result<Vec<Row>> {
    let out = section(console, "TERN-CRIU-BEGIN", "TERN-CRIU-END");
    let mut failed = Vec::new();
    for (_, c, _, t, _) in CRIU_ROWS {
        for name in [c, t] {
            match steps.iter().find(|s| s.0 == name) {
                Some((_, 0, _)) => {}
                Some((_, rc, _)) => failed.push(format!("{name} exited {rc}")),
                None => failed.push(format!("{name} did not run")),
            }
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join(", "));
    }
    // CRIU's `--display-stats` block of each step: `Key: N us` or
    // `Key: N (0xN)`, before the step's TERN-STEP line.
    let mut stats: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    let mut block = BTreeMap::new();
    for l in &out {
        if let Some(rest) = l.strip_prefix("TERN-STEP ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            stats.insert(name, std::mem::take(&mut block));
        } else if let Some((k, v)) = l.split_once(": ")
            && let Some(n) = v.split_whitespace().next().and_then(|n| n.parse().ok())
        {
            block.insert(k, n);
        }
    }
    let du: BTreeMap<&str, u64> = out
        .iter()
        .filter_map(|l| l.strip_prefix("TERN-DU "))
        .filter_map(|r| {
            let mut w = r.split_whitespace();
            Some((w.next()?, w.next()?.parse().ok()?))
        })
        .collect();
    let times = timings(console);
    let mut rows = Vec::new();
    for (step, c, cdir, t, tdir) in CRIU_ROWS {
        let cs = stats.get(c);
        let frozen_us = cs
            .and_then(|s| s.get("Frozen time"))
            .with_context(|| format!("{c}: no `Frozen time` in CRIU's --display-stats"))?;
        let tv = steps
            .iter()
            .find(|s| s.0 == t)
            .and_then(|s| s.2.as_ref())
            .with_context(|| format!("{t}: tern printed no JSON"))?;
        rows.push(Row {
            step,
            criu: Side {
                frozen_ms: frozen_us / 1e3,
                wall_ms: times.get(c).copied().unwrap_or(f64::NAN),
                pages: cs
                    .and_then(|s| s.get("Memory pages written"))
                    // Whole pages; `as` saturates.
                    .map(|&n| {
                        #[allow(clippy::cast_possible_truncation)]
                        let pages = n as u64;
                        pages
                    }),
                kib: du.get(cdir).copied(),
            },
            tern: Side {
                frozen_ms: tv["frozen_ms"].as_f64().unwrap_or(f64::NAN),
                wall_ms: times.get(t).copied().unwrap_or(f64::NAN),
                pages: tv["pages_written"].as_u64(),
                kib: du.get(tdir).copied(),
            },
        });
    }
    Ok(rows)
}

/// The side-by-side table of [`criu_comparison`]'s rows.
fn print_comparison(rows: &[Row]) {
    println!(
        "  hotloop 256 MiB, 16 MiB rewritten every 10 ms; 3 pre-dumps then the dump (CRIU: --track-mem; tern: --track soft-dirty)"
    );
    println!(
        "  {:<11} {:^19} {:^19} {:^17} {:^19}",
        "step", "frozen ms", "wall ms", "pages written", "image KiB"
    );
    println!(
        "  {:<11} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9}",
        "", "CRIU", "tern", "CRIU", "tern", "CRIU", "tern", "CRIU", "tern"
    );
    let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    for r in rows {
        println!(
            "  {:<11} {:>9.1} {:>9.1} {:>9.0} {:>9.0} {:>8} {:>8} {:>9} {:>9}",
            r.step,
            r.criu.frozen_ms,
            r.tern.frozen_ms,
            r.criu.wall_ms,
            r.tern.wall_ms,
            opt(r.criu.pages),
            opt(r.tern.pages),
            opt(r.criu.kib),
            opt(r.tern.kib)
        );
    }
    println!(
        "  (wall: the command's run in the guest from /proc/uptime, 10 ms resolution; tern compresses its pre-dump pages with lz4, CRIU does not)"
    );
}

/// [`boot`] on an emulated x86 machine (q35, TCG, one CPU, `mem_mib`).
/// Kernel warnings (level 4) reach the console; a soft lockup is printed,
/// with its stack, but does not stop the guest (the lane's deadline does).
///
/// One vCPU because multi-threaded TCG (qemu 7.2, Debian bookworm's) can
/// livelock a 6.1 guest for good when a tracepoint on the syscall path is
/// switched while another vCPU enters syscalls: both vCPUs spin at the
/// static-key site in `syscall_trace_enter` ("soft lockup - CPU#0 stuck
/// for 26s", RIP `syscall_trace_enter.constprop.0+0xe9`). tern's eBPF
/// attach and detach switch such tracepoints, and a CI run of this lane hung
/// there. Measured by toggling `syscalls/sys_enter_read` and
/// `raw_syscalls/sys_enter` under two `dd bs=1` loops: `-smp 2` locked up
/// within the first 25 toggles; `-accel tcg,thread=single -smp 2` ran
/// but took 0.6 s per toggle (each text-poke IPI waits for the other vCPU's
/// time slice); `-smp 1` ran 2000 toggles in 52 s without a warning.
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
        "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1",
    ])
    .args(["-m", &mem, "-nographic", "-no-reboot"])
    .args(["-append", "console=ttyS0 panic=-1 loglevel=5"]);
    boot(&mut qemu, kernel, initrd, log, deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRIU-vs-tern figures read back from a console as the guest
    /// prints it (CR LF, CRIU's stats blocks, tern's JSON).
    #[test]
    fn comparison_reads_both_tools_figures() {
        let mut console = String::from("TERN-BEGIN 6.1\r\nTERN-CRIU-BEGIN\r\n");
        for (i, (_, c, cdir, t, tdir)) in CRIU_ROWS.iter().enumerate() {
            console += &format!(
                "Displaying dump stats:\r\nFreezing time: 10 us\r\nFrozen time: {} us\r\nMemory pages written: {} (0x10)\r\n",
                1000 * (i + 1),
                100 + i
            );
            console += &format!("TERN-TIME {c} 10.00 10.25\r\nTERN-STEP {c} 0\r\n");
            console += &format!(
                "{{\"frozen_ms\": {}.5, \"pages_written\": {}}}\r\n",
                i,
                200 + i
            );
            console += &format!("TERN-TIME {t} 11.00 11.5\r\nTERN-STEP {t} 0\r\n");
            console += &format!("TERN-DU {cdir} {}\r\nTERN-DU {tdir} {}\r\n", 7 + i, 3 + i);
        }
        console += "TERN-CRIU-END\r\nTERN-END\r\n";
        let rows = criu_comparison(&console, &parse_steps(&console)).unwrap();
        assert_eq!(rows.len(), 4);
        let d = &rows[3];
        assert_eq!(d.step, "dump");
        assert_eq!((d.criu.frozen_ms, d.tern.frozen_ms), (4.0, 3.5));
        assert_eq!((d.criu.pages, d.tern.pages), (Some(103), Some(203)));
        assert_eq!((d.criu.kib, d.tern.kib), (Some(10), Some(6)));
        assert!((d.criu.wall_ms - 250.0).abs() < 1e-6 && (d.tern.wall_ms - 500.0).abs() < 1e-6);
        // A failed step is named.
        let bad = console.replace("TERN-STEP tern-pre-dump-2 0", "TERN-STEP tern-pre-dump-2 1");
        let e = criu_comparison(&bad, &parse_steps(&bad)).unwrap_err();
        assert!(e.to_string().contains("tern-pre-dump-2 exited 1"), "{e}");
    }

    /// A test binary's section: the summary is found, a failed test named.
    #[test]
    fn test_section_and_summary() {
        let console = "x\r\nTERN-TESTS-BEGIN scenarios\r\nrunning 2 tests\r\ntest a::soft_dirty ... ok\r\ntest b::soft_dirty ... FAILED\r\n\r\ntest result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 20 filtered out; finished in 1.00s\r\nTERN-TIME test-scenarios 1.0 2.0\r\nTERN-STEP test-scenarios 101\r\nTERN-END\r\n";
        let s = section(
            console,
            "TERN-TESTS-BEGIN scenarios",
            "TERN-STEP test-scenarios ",
        );
        assert_eq!(s.first(), Some(&"running 2 tests"));
        assert!(s.last().unwrap().starts_with("TERN-TIME"));
        let t = TestBin {
            name: "scenarios",
            exe: PathBuf::new(),
            ignored: 2,
        };
        let mut failures = Vec::new();
        test_report(
            console,
            &parse_steps(console),
            &timings(console),
            &t,
            &mut failures,
        );
        assert_eq!(failures.len(), 1);
        assert!(
            failures[0].contains("scenarios exited 101")
                && failures[0].contains("test b::soft_dirty ... FAILED"),
            "{failures:?}"
        );
        // Exit 0 with fewer passed than listed is a failure too.
        let short = console
            .replace("TERN-STEP test-scenarios 101", "TERN-STEP test-scenarios 0")
            .replace("FAILED. 1 passed; 1 failed", "ok. 1 passed; 0 failed");
        let mut failures = Vec::new();
        test_report(
            &short,
            &parse_steps(&short),
            &timings(&short),
            &t,
            &mut failures,
        );
        assert_eq!(
            failures,
            vec!["scenarios: 1 tests passed, 2 listed with --ignored".to_string()]
        );
    }
}
