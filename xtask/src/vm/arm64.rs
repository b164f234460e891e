//! The arm64 lane (`cargo xtask vm-test arm64`): tern on Debian trixie's
//! arm64 kernel (6.12: PAGEMAP_SCAN and uffd-wp, no soft-dirty, pointer
//! authentication) under qemu TCG on `-cpu max,pauth-impdef=on` (a CPU with
//! the PAC keys; the implementation-defined algorithm is the fast one to
//! emulate).
//!
//! Everything it fetches or builds stays under `target/vm/arm64/`:
//! - the guest's Debian packages (`linux-image-arm64` and `busybox-static`,
//!   arm64) come through an apt configuration of the lane's own
//!   (`apt/`: sources list, state, cache; signatures checked against the
//!   Debian archive keyring): the machine's apt sources are not touched;
//! - tern and `hotloop` are cross-built statically (`+crt-static`) for
//!   `aarch64-unknown-linux-gnu`, so the initramfs needs no libraries;
//! - `pacloop` (xtask/vm/pacloop.c) is the pointer-authentication workload:
//!   it runs with a non-default enabled-keys mask and exits 3 (or dies on a
//!   failed return-address authentication) when its keys or mask change.
//!
//! The guest's /init runs `tern check`, then on `hotloop` and on `pacloop`
//! three uffd-wp pre-dumps, `dump --verify` and `restore --detach`, checks
//! that the restored processes run (pacloop: with the same keys and mask),
//! and restores the hotloop image once more with its PAC keys removed (an
//! image written before tern saved them). Then it runs the `sys` crate's
//! kernel tests (injector, regsets, PAC keys, rseq, seccomp, signals, vDSO,
//! fds) and the memory-oracle scenarios with uffd-wp, cross-built the same
//! way. This side checks every step and reports all of them, failed ones
//! included.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{boot, elf_interpreter, initramfs_with, parse_steps};
use crate::{debian, util};

const HOST_PACKAGES: &[(&str, &str)] = &[
    (
        "xz-utils",
        "decompressing the guest kernel's socket-diag modules",
    ),
    (
        "qemu-system-arm",
        "booting the arm64 test kernel (qemu-system-aarch64, TCG)",
    ),
    (
        "gcc-aarch64-linux-gnu",
        "linking the aarch64 cross build, compiling pacloop",
    ),
    (
        "libc6-dev-arm64-cross",
        "the aarch64 C library the static binaries link",
    ),
    ("cpio", "packing the test guest's initramfs"),
];

const TARGET: &str = "aarch64-unknown-linux-gnu";

/// The Debian release the guest's packages come from.
const SUITE: &str = "trixie";

/// Boot to power-off (180 to 235 s here: TCG, 2 vCPUs on 2 host cores; the
/// scenarios take 150 to 190 s of it).
const DEADLINE: Duration = Duration::from_secs(420);

/// The fixed pointer pacloop signs (xtask/vm/pacloop.c `POINTER`).
const PAC_POINTER: u64 = 0x0000_aaaa_1234_5670;
/// `PR_PAC_APIAKEY | PR_PAC_APIBKEY | PR_PAC_APDAKEY`: pacloop disables APDB.
const PAC_MASK: u64 = 0b0111;

/// The guest's /init (after [`super::INIT_PREAMBLE`]). Every step prints a
/// JSON line, then `TERN-STEP name rc`; rc 125 means the step could not run
/// because an earlier one failed.
const INIT_ARM64: &str = r#"echo "TERN-BEGIN $(uname -r)"
# Loopback, and the socket-diag modules tern reads sockets with (Debian
# builds them as modules, which a full system loads on demand).
ip link set lo up
for m in inet_diag tcp_diag udp_diag unix_diag; do [ -e /mods/$m.ko ] && insmod /mods/$m.ko; done
step() { echo "TERN-STEP $1 $2"; }
skip() { echo "{\"skipped\": \"$2\"}"; step $1 125; }
# Wait (at most 10 s) until PID $1 is gone: killed, and reaped by this shell (PID 1).
gone() { i=0; while [ -d /proc/$1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ ! -d /proc/$1 ]; }
# Wait (at most 60 s) for `ready` in file $1 while PID $2 lives; print the line.
ready() {
  i=0; while ! grep -q ready $1 && [ -d /proc/$2 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  echo "{\"ready\": \"$(grep ready $1 | head -1)\"}"; grep -q ready $1
}
# Remove the "pac" objects of the (pretty-printed) process.json in image $1,
# as in an image written before tern saved PAC keys, and its seal (tern
# refuses an image changed after it sealed it: this edit is root's own,
# on purpose); step $2.
strip_pac() {
  tr -d '\n' < $1/process.json > /tmp/stripped.json
  had=$(grep -o '"pac": *{' /tmp/stripped.json | wc -l)
  sed -E 's/"pac": *\{[^{}]*(\{[^{}]*\}[^{}]*)?\}/"pac": null/g' /tmp/stripped.json > $1/process.json
  left=$(grep -o '"pac": *{' $1/process.json | wc -l)
  nulls=$(grep -o '"pac": *null' $1/process.json | wc -l)
  tr -d '\n' < $1/inventory.json | sed -E 's/, *"seal": *\{[^{}]*\}//' > /tmp/inventory.json
  cat /tmp/inventory.json > $1/inventory.json
  seals=$(grep -c '"seal"' $1/inventory.json)
  echo "{\"pac_objects_before\": $had, \"pac_objects_after\": $left, \"pac_nulls\": $nulls, \"seals_left\": $seals}"
  [ $had -gt 0 ] && [ $left -eq 0 ] && [ $seals -eq 0 ]; step $2 $?
}
zombie_or_gone() { [ ! -d /proc/$1 ] || grep -q '^State:.*Z' /proc/$1/status; }
# Step $2: does hotloop PID $1 run? Its sleeps (and user time) 1 s apart.
runs() {
  watch_loops $1; [ $(( ${sb:-0} - ${sa:-0} )) -ge MIN_LOOPS ]; step $2 $?
}
# Workload $1 (PID $2): three uffd-wp pre-dumps, dump --verify, restore --detach.
# RESTORED=1 when the restore succeeded.
cycle() {
  n=$1; P=$2; prev=""; RESTORED=0
  for i in 1 2 3; do
    tern pre-dump -t $P -D /tmp/$n-p$i $prev --track uffd-wp --json; rc=$?; step $n-pre-dump-$i $rc
    [ $rc -eq 0 ] && prev="--prev-images-dir /tmp/$n-p$i"
    sleep 0.2
  done
  [ "$n" = pac ] && cp /tmp/pac.status /tmp/pac.before
  tern dump -t $P -D /tmp/$n-d $prev --track uffd-wp --verify --json; rc=$?; step $n-dump $rc
  if [ $rc -ne 0 ]; then
    kill -9 $P; wait $P 2>/dev/null
    skip $n-restore "the dump failed"; return
  fi
  sleep 0.5
  if ! zombie_or_gone $P; then
    echo '{"error": "the dump left the original running"}'; step $n-dump-killed 1
    kill -9 $P; wait $P 2>/dev/null
    skip $n-restore "the dump left the original running"; return
  fi
  wait $P 2>/dev/null
  # A dump that caught pacloop between opening its temporary status file and
  # renaming it has that file open; the restored pacloop renames it away.
  # Files are not in the image (as with CRIU), so keep a copy to put back
  # before the same image is restored again.
  rm -f /tmp/$n.tmp-at-dump
  [ -e /tmp/$n.status.tmp ] && cp /tmp/$n.status.tmp /tmp/$n.tmp-at-dump
  tern restore -D /tmp/$n-d --detach --json; rc=$?; step $n-restore $rc
  [ $rc -eq 0 ] && RESTORED=1
}
T0=$(cut -d' ' -f1 /proc/uptime)
# Log unhandled user faults (the kernel says why a process died).
echo 1 > /proc/sys/debug/exception-trace
tern check --json; step check $?

# A libtest binary as step $1 (its arguments follow): the summary and any
# failure lines on the console (a panic with the message that follows its
# location, up to the backtrace), then a JSON line with the summary.
tests() {
  n=$1; shift
  "$@" > /tmp/$n.out 2>&1; rc=$?
  grep -E "^test .*FAILED" /tmp/$n.out | tail -20
  grep -A8 "panicked at" /tmp/$n.out | grep -v -E "^stack backtrace|^ +[0-9]+: |^ +at |^--$" | head -40
  grep -E "^test result" /tmp/$n.out | tail -1
  sum=$(grep "^test result" /tmp/$n.out | tail -1 | tr -d '"\\')
  echo "{\"summary\": \"$sum\"}"; step $n $rc
}
tests sys-tests systest --test-threads 1
tests scenarios scenarios uffd_wp --test-threads 1

hotloop --mib 64 --hot-mib 4 --sleep-ms 5 > /tmp/hot.out 2>&1 &
P=$!
ready /tmp/hot.out $P; step hot-ready $?
cycle hot $P
if [ $RESTORED = 1 ]; then
  runs $P hot-runs
  kill -9 $P; gone $P
  strip_pac /tmp/hot-d nopac-edit
  tern restore -D /tmp/hot-d --detach --json; rc=$?; step nopac-restore $rc
  if [ $rc -eq 0 ]; then runs $P nopac-runs; kill -9 $P; gone $P; else skip nopac-runs "the restore failed"; fi
else
  skip hot-runs "no restored hotloop"; skip nopac-edit "no hotloop image"
  skip nopac-restore "no hotloop image"; skip nopac-runs "no hotloop image"
fi

pacloop /tmp/pac.status > /tmp/pac.out 2>&1 &
P=$!
ready /tmp/pac.out $P; rc=$?
cat /tmp/pac.out | head -3 | grep -v '^{'
cat /tmp/pac.status 2>/dev/null || echo '{"error": "no status"}'; step pac-setup $rc
if [ $rc -eq 0 ]; then
  cycle pac $P
  if [ $RESTORED = 1 ]; then
    sleep 2
    alive=false; zombie_or_gone $P || alive=true
    grep -v '^{' /tmp/pac.out | tail -3
    echo "{\"alive\": $alive, \"before\": $(cat /tmp/pac.before), \"after\": $(cat /tmp/pac.status)}"
    [ $alive = true ] && grep -q '"ok":true' /tmp/pac.status; step pac-survives $?
    kill -9 $P; gone $P
    # The control: the same image without its keys must not run on unnoticed.
    strip_pac /tmp/pac-d pac-nokeys-edit
    cp /tmp/pac.status /tmp/pac.before
    [ -e /tmp/pac.tmp-at-dump ] && cp /tmp/pac.tmp-at-dump /tmp/pac.status.tmp
    tern restore -D /tmp/pac-d --detach --json; rc=$?; step pac-nokeys-restore $rc
    sleep 2
    alive=false; zombie_or_gone $P || alive=true
    said=$(dmesg | grep "pacloop\[$P\]" | tail -2 | tr -d '"\\' | tr '\n' ' ')
    grep -v '^{' /tmp/pac.out | tail -2
    echo "{\"alive\": $alive, \"kernel_says\": \"$said\", \"before\": $(cat /tmp/pac.before), \"after\": $(cat /tmp/pac.status)}"
    [ $alive = false ] || grep -q '"ok":false' /tmp/pac.status; step pac-nokeys-detected $?
    kill -9 $P 2>/dev/null; gone $P
  else
    skip pac-survives "no restored pacloop"
  fi
else
  kill -9 $P 2>/dev/null; wait $P 2>/dev/null
fi
T1=$(cut -d' ' -f1 /proc/uptime)
echo "{\"tests_s\": $(echo "$T1 $T0" | awk '{print $1 - $2}'), \"uptime_s\": $T1}"; step timing 0
kill -9 -1 2>/dev/null
echo "TERN-END"
poweroff -f
"#;

pub fn run() -> Result<()> {
    prepare(None)?.run()
}

/// The lane fetched, cross-built and packed, its guest not booted yet.
pub struct Arm64Guest {
    t_all: Instant,
    fetch: Duration,
    build: Duration,
    kernel_facts: String,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    log: PathBuf,
}

/// The host's side of the lane: packages, the guest's kernel and busybox,
/// the static cross build (`jobs`: cargo's `-j`, for a build beside a
/// running guest), the initramfs.
pub fn prepare(jobs: Option<usize>) -> Result<Arm64Guest> {
    let t_all = Instant::now();
    crate::setup::ensure_debian_packages(HOST_PACKAGES, false)?;
    ensure_rust_target()?;
    let work = util::target_dir().join("vm").join("arm64");
    std::fs::create_dir_all(&work)?;

    let t = Instant::now();
    let (vmlinuz, busybox) = guest_packages(&work)?;
    let fetch = t.elapsed();
    let kernel_facts = kernel_config(&vmlinuz)?;

    let t = Instant::now();
    let (tern, hotloop) = cross_build(jobs)?;
    let tests = cross_test_bins(jobs)?;
    let pacloop = build_pacloop(&work)?;
    let build = t.elapsed();

    // The test executables go in as `systest` and `scenarios`; the
    // scenarios find tern and the workloads beside themselves, in /bin.
    let mut bins = vec![tern, hotloop, pacloop];
    bins.extend(tests.workloads.iter().cloned());
    let mut extra = vec![
        (tests.systest.clone(), "/bin/systest".to_string()),
        (tests.scenarios.clone(), "/bin/scenarios".to_string()),
    ];
    extra.extend(diag_modules(&vmlinuz, &work)?);
    let init = INIT_ARM64.replace("MIN_LOOPS", &super::MIN_LOOPS.to_string());
    let initrd = initramfs_with(&work, "arm64", &busybox, &bins, &extra, &init)?;
    Ok(Arm64Guest {
        t_all,
        fetch,
        build,
        kernel_facts,
        vmlinuz,
        initrd,
        log: work.join("console.log"),
    })
}

impl Arm64Guest {
    /// Boot the guest (two vCPUs) and report.
    pub fn run(self) -> Result<()> {
        let Arm64Guest {
            t_all,
            fetch,
            build,
            kernel_facts,
            vmlinuz,
            initrd,
            log,
        } = self;
        let mut qemu = Command::new("qemu-system-aarch64");
        // Two vCPUs, unlike the x86 guest (see `x86::boot_x86`): arm64 patches
        // a static key with one instruction written in place, and toggling two
        // syscall tracepoints 2000 times under two `dd bs=1` loops ran clean.
        qemu.args(["-M", "virt", "-cpu", "max,pauth-impdef=on", "-smp", "2"])
            .args(["-m", "2048", "-accel", "tcg", "-nographic", "-no-reboot"])
            .args(["-append", "console=ttyAMA0 panic=-1 quiet"]);
        let t = Instant::now();
        let console = boot(&mut qemu, &vmlinuz, &initrd, &log, DEADLINE)?;
        let guest = t.elapsed();

        let report = Report::new(&console);
        println!(
            "arm64 lane: kernel {}, {}",
            report.value("check", "kernel").as_str().unwrap_or("?"),
            kernel_facts
        );
        println!(
            "  times: packages {:.1} s, cross build {:.1} s, guest boot to TERN-END {:.1} s (tests in the guest {} s), whole lane {:.1} s",
            fetch.as_secs_f64(),
            build.as_secs_f64(),
            guest.as_secs_f64(),
            report.value("timing", "tests_s"),
            t_all.elapsed().as_secs_f64()
        );
        let mut failures = Vec::new();
        report.check(&mut failures);
        println!("  steps:");
        for (name, rc, _) in &report.steps {
            let how = match rc {
                0 => "ok".to_string(),
                125 => "not run".to_string(),
                rc => format!("FAILED (exit {rc})"),
            };
            println!("    {name:<18} {how}");
        }
        super::print_stalls(&console);
        if !failures.is_empty() {
            bail!(
                "arm64 lane: {} problem(s):\n  {}\n--- guest console (last 60 lines; all of it in {}):\n{}",
                failures.len(),
                failures.join("\n  "),
                log.display(),
                super::tail(&console, 60)
            );
        }
        println!("arm64 lane: all steps passed");
        Ok(())
    }
}

/// `rustup target add` for the toolchain that runs us, once.
fn ensure_rust_target() -> Result<()> {
    let installed = util::stdout_of(&mut util::command(
        "rustup",
        ["target", "list", "--installed"],
    ))
    .context("rustup is needed to add the aarch64 target")?;
    if installed.lines().any(|l| l.trim() == TARGET) {
        return Ok(());
    }
    eprintln!("xtask: rustup target add {TARGET}");
    util::run(&mut util::command("rustup", ["target", "add", TARGET]))
}

/// The socket-diag modules of the guest's kernel (inet_diag, tcp_diag,
/// udp_diag, unix_diag), decompressed here (trixie ships them as .ko.xz,
/// which busybox's insmod does not read), for `/mods` in the guest. Those
/// built in (no file) are left out.
fn diag_modules(vmlinuz: &Path, work: &Path) -> Result<Vec<(PathBuf, String)>> {
    let kver = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel image name")?;
    let pkg = vmlinuz
        .parent()
        .and_then(Path::parent)
        .context("kernel package layout")?;
    let dest = work.join("mods");
    std::fs::create_dir_all(&dest)?;
    let mut out = Vec::new();
    for (dir, m) in [
        ("ipv4", "inet_diag"),
        ("ipv4", "tcp_diag"),
        ("ipv4", "udp_diag"),
        ("unix", "unix_diag"),
    ] {
        let xz = ["usr/lib/modules", "lib/modules"]
            .iter()
            .map(|l| {
                pkg.join(l)
                    .join(kver)
                    .join("kernel/net")
                    .join(dir)
                    .join(format!("{m}.ko.xz"))
            })
            .find(|p| p.exists());
        let Some(xz) = xz else { continue };
        let ko = dest.join(format!("{m}.ko"));
        let out_file = std::fs::File::create(&ko)?;
        let st = std::process::Command::new("xz")
            .arg("-dc")
            .arg(&xz)
            .stdout(out_file)
            .status()
            .with_context(|| format!("xz -dc {} (Debian package xz-utils)", xz.display()))?;
        anyhow::ensure!(st.success(), "xz -dc {}: {st}", xz.display());
        out.push((ko, format!("/mods/{m}.ko")));
    }
    Ok(out)
}

/// The trixie arm64 kernel image and busybox, fetched once through the
/// lane's own apt configuration (`work/apt`, arm64 as the only
/// architecture; see `crate::debian`).
fn guest_packages(work: &Path) -> Result<(PathBuf, PathBuf)> {
    let apt = debian::OwnApt::new(&work.join("apt"), SUITE, "arm64", "the arm64 lane")?;
    apt.fetch(|apt| {
        let kernel = debian::kernel(work, "linux-image-arm64", apt)?;
        let pkg = debian::package(work, "busybox-static", apt)?;
        // /usr/bin since trixie's merged /usr; /bin before.
        let busybox = ["usr/bin/busybox", "bin/busybox"]
            .iter()
            .map(|p| pkg.join(p))
            .find(|p| p.is_file())
            .with_context(|| format!("{}: no busybox in the package", pkg.display()))?;
        Ok((kernel, busybox))
    })
}

/// Read the kernel package's `/boot/config-*` and check what the lane
/// needs: pointer authentication, userfaultfd write-protect, the pagemap
/// (PAGEMAP_SCAN, Linux 6.7+) and no soft-dirty. Returns a one-line summary.
fn kernel_config(vmlinuz: &Path) -> Result<String> {
    let name = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel image name")?;
    let path = vmlinuz.with_file_name(format!("config-{name}"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: the kernel package's config", path.display()))?;
    let get = |k: &str| -> &str {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("not set")
    };
    let need = [
        ("CONFIG_ARM64_PTR_AUTH", "y"),
        ("CONFIG_USERFAULTFD", "y"),
        ("CONFIG_HAVE_ARCH_USERFAULTFD_WP", "y"),
        ("CONFIG_PTE_MARKER_UFFD_WP", "y"),
        ("CONFIG_PROC_PAGE_MONITOR", "y"),
        ("CONFIG_MEM_SOFT_DIRTY", "not set"),
        ("CONFIG_CHECKPOINT_RESTORE", "y"),
        ("CONFIG_BPF_SYSCALL", "y"),
        ("CONFIG_BPF_EVENTS", "y"),
    ];
    let mut facts = Vec::new();
    let mut wrong = Vec::new();
    for (k, want) in need {
        let got = get(k);
        facts.push(format!("{k}={got}"));
        if got != want {
            wrong.push(format!("{k} is {got}, the lane needs {want}"));
        }
    }
    let mut nums = name
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    if (nums.next().unwrap_or(0), nums.next().unwrap_or(0)) < (6, 7) {
        wrong.push(format!("kernel {name} predates PAGEMAP_SCAN (Linux 6.7)"));
    }
    let summary = format!("config: {}", facts.join(" "));
    eprintln!("xtask: {}: {summary}", path.display());
    if !wrong.is_empty() {
        bail!("{}: {}", path.display(), wrong.join("; "));
    }
    Ok(summary)
}

/// `cargo` for aarch64, release, statically linked.
fn cross_cargo(jobs: Option<usize>) -> Command {
    let mut c = util::cargo();
    if let Some(j) = jobs {
        c.env("CARGO_BUILD_JOBS", j.to_string());
    }
    c.env(
        "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
        "aarch64-linux-gnu-gcc",
    )
    .env(
        "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    );
    c
}

/// The test executables the guest runs: `systest` (the `sys` crate's unit
/// tests: the injector, register sets with the PAC keys, rseq, seccomp,
/// signals, vDSO, fds against the arm64 kernel) and `scenarios` (the memory
/// oracle after each uffd-wp pre-dump, `tests/tests/scenarios.rs`), with
/// the workload programs `scenarios` starts.
struct TestBins {
    systest: PathBuf,
    scenarios: PathBuf,
    workloads: Vec<PathBuf>,
}

fn cross_test_bins(jobs: Option<usize>) -> Result<TestBins> {
    eprintln!("xtask: cargo test --no-run --release --target {TARGET} (sys, tern-tests; static)");
    let out = util::stdout_of(
        cross_cargo(jobs)
            .args(["test", "--no-run", "--release", "--target", TARGET])
            .args([
                "-p",
                "sys",
                "-p",
                "tern-tests",
                "--lib",
                "--test",
                "scenarios",
            ])
            .args(["--bins", "--message-format=json-render-diagnostics"]),
    )?;
    let (mut systest, mut scenarios) = (None, None);
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if v["profile"]["test"] != true {
            continue;
        }
        match name {
            "sys" => systest = Some(PathBuf::from(exe)),
            "scenarios" => scenarios = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    let dir = util::target_dir().join(TARGET).join("release");
    let workloads = vec![dir.join("workload"), dir.join("selfcheck")];
    for w in &workloads {
        if !w.is_file() {
            bail!("{}: not built by the cross build", w.display());
        }
    }
    Ok(TestBins {
        systest: systest.context("cargo test --no-run: no executable for the sys unit tests")?,
        scenarios: scenarios.context("cargo test --no-run: no executable for tests/scenarios")?,
        workloads,
    })
}

/// tern and hotloop for aarch64, release, statically linked.
fn cross_build(jobs: Option<usize>) -> Result<(PathBuf, PathBuf)> {
    eprintln!("xtask: cargo build --release --target {TARGET} (tern, bench; static)");
    util::run(
        cross_cargo(jobs)
            .args(["build", "--release", "--target", TARGET])
            .args(["-p", "tern", "-p", "bench"]),
    )?;
    let dir = util::target_dir().join(TARGET).join("release");
    let (tern, hotloop) = (dir.join("tern"), dir.join("hotloop"));
    for b in [&tern, &hotloop] {
        if elf_interpreter(b)? {
            bail!(
                "{} is dynamically linked (an ELF interpreter): the static cross build did not take effect (is RUSTFLAGS set? it overrides the target's rustflags)",
                b.display()
            );
        }
    }
    Ok((tern, hotloop))
}

/// xtask/vm/pacloop.c, static, with return-address signing.
fn build_pacloop(work: &Path) -> Result<PathBuf> {
    let src = util::root().join("xtask/vm/pacloop.c");
    let out = work.join("pacloop");
    util::run(
        util::command(
            "aarch64-linux-gnu-gcc",
            ["-O2", "-static", "-Wall", "-Werror"],
        )
        .arg("-mbranch-protection=standard")
        .arg("-o")
        .arg(&out)
        .arg(&src),
    )?;
    Ok(out)
}

/// The guest's steps, and the checks of their JSON.
struct Report {
    steps: Vec<(String, i32, Option<Value>)>,
    /// Per step (same order), the console lines it printed that are not
    /// JSON: a failed tern's error message.
    text: Vec<Vec<String>>,
}

impl Report {
    fn new(console: &str) -> Report {
        let mut text = Vec::new();
        let mut cur = Vec::new();
        for line in console.lines() {
            let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\r');
            if line.starts_with("TERN-STEP ") {
                text.push(std::mem::take(&mut cur));
            } else if !line.is_empty() && !line.contains('{') && !line.starts_with("TERN-") {
                cur.push(line.to_string());
            }
        }
        Report {
            steps: parse_steps(console),
            text,
        }
    }

    /// What step `name` printed besides JSON, its last 3 lines joined.
    fn said(&self, name: &str) -> String {
        let Some(i) = self.steps.iter().position(|s| s.0 == name) else {
            return String::new();
        };
        let lines = self.text.get(i).map_or(&[][..], |v| &v[..]);
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }

    fn step(&self, name: &str) -> Option<&(String, i32, Option<Value>)> {
        self.steps.iter().find(|s| s.0 == name)
    }

    /// Field `key` of step `name`'s JSON (`Null` when absent).
    fn value(&self, name: &str, key: &str) -> Value {
        self.step(name)
            .and_then(|s| s.2.as_ref())
            .map_or(Value::Null, |v| v[key].clone())
    }

    /// Step `name` exited 0 with a JSON line: the JSON; else a failure
    /// (naming the error tern printed, if any) and `None`.
    fn ok(&self, name: &str, failures: &mut Vec<String>) -> Option<&Value> {
        match self.step(name) {
            Some((_, 0, Some(v))) => Some(v),
            Some((_, 0, None)) => {
                failures.push(format!("step {name}: no JSON output"));
                None
            }
            Some((_, 125, v)) => {
                let why = v.as_ref().map_or(Value::Null, |v| v["skipped"].clone());
                failures.push(format!("step {name}: not run ({why})"));
                None
            }
            Some((_, rc, v)) => {
                let json = v.as_ref().map(|v| format!(" {v}")).unwrap_or_default();
                failures.push(format!(
                    "step {name}: exited {rc}{json}: {}",
                    self.said(name)
                ));
                None
            }
            None => {
                failures.push(format!(
                    "step {name}: did not run (missing from the console)"
                ));
                None
            }
        }
    }

    fn check(&self, failures: &mut Vec<String>) {
        if let Some(c) = self.ok("check", failures) {
            let f = &c["features"];
            println!(
                "  tern check: arch {}, backend {}, pagemap_scan {}, uffd_wp_async {}, soft_dirty {}",
                c["arch"], c["backend"], f["pagemap_scan"], f["uffd_wp_async"], f["soft_dirty"]
            );
            println!(
                "  tern check, eBPF: ebpf_tracepoints {} (the syscall/sched stream: VMA and thread events), ebpf_fault_tracepoints {} (exceptions:page_fault_*, x86 only: no dirty pages from eBPF here)",
                f["ebpf_tracepoints"], f["ebpf_fault_tracepoints"]
            );
            if c["arch"] != "aarch64" {
                failures.push(format!("tern check: arch {} (want aarch64)", c["arch"]));
            }
            if c["backend"] != "uffd-wp" {
                failures.push(format!(
                    "tern check: backend {} (want uffd-wp)",
                    c["backend"]
                ));
            }
            if f["pagemap_scan"] != true || f["soft_dirty"] != false {
                failures.push(format!(
                    "tern check: pagemap_scan {}, soft_dirty {} (want true, false)",
                    f["pagemap_scan"], f["soft_dirty"]
                ));
            }
        }
        for (step, what) in [
            (
                "sys-tests",
                "the sys crate's kernel tests (injector, regsets, PAC keys, ...)",
            ),
            (
                "scenarios",
                "the memory oracle after uffd-wp pre-dumps (tests/scenarios)",
            ),
        ] {
            if let Some(v) = self.ok(step, failures) {
                println!("  {what}: {}", v["summary"].as_str().unwrap_or("?"));
            }
        }
        self.ok("hot-ready", failures);
        self.cycle("hot", failures);
        self.runs("hot-runs", "the restored hotloop", failures);
        if let Some(v) = self.ok("nopac-edit", failures) {
            println!(
                "  no-PAC image: {} pac objects removed from process.json",
                v["pac_objects_before"]
            );
        }
        if let Some(v) = self.ok("nopac-restore", failures) {
            println!(
                "  no-PAC image restore: restore_ms {:.1}",
                v["restore_ms"].as_f64().unwrap_or(f64::NAN)
            );
        }
        self.runs(
            "nopac-runs",
            "hotloop restored from the no-PAC image",
            failures,
        );
        if let Some(v) = self.ok("pac-setup", failures) {
            println!(
                "  pacloop: enabled keys {}, APIA {}, APDA {}, APDB (disabled) {}, APGA {}",
                v["mask"], v["apia"], v["apda"], v["apdb"], v["apga"]
            );
            let hex = |k: &str| {
                v[k].as_str()
                    .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            };
            if v["mask"] != PAC_MASK {
                failures.push(format!(
                    "pacloop: enabled keys {} (want {PAC_MASK})",
                    v["mask"]
                ));
            }
            if hex("apdb") != Some(PAC_POINTER) {
                failures.push(format!(
                    "pacloop: pacdb changed the pointer although APDB is disabled: {}",
                    v["apdb"]
                ));
            }
        }
        self.cycle("pac", failures);
        if let Some(v) = self.ok("pac-survives", failures) {
            let (b, a) = (&v["before"], &v["after"]);
            let same = ["pid", "mask", "apia", "apda", "apdb", "apga"]
                .iter()
                .all(|k| b[k] == a[k]);
            let (ib, ia) = (b["iterations"].as_u64(), a["iterations"].as_u64());
            println!(
                "  pacloop after restore: alive {}, iterations {} -> {}, same keys and mask {same}, mismatch {}",
                v["alive"],
                ib.unwrap_or(0),
                ia.unwrap_or(0),
                a["mismatch"]
            );
            if v["alive"] != true || a["ok"] != true || !same {
                failures.push(format!("pacloop did not survive the restore intact: {v}"));
            }
            if !matches!((ib, ia), (Some(b), Some(a)) if a > b) {
                failures.push(format!("pacloop's counter did not advance: {v}"));
            }
        }
        self.ok("pac-nokeys-edit", failures);
        self.ok("pac-nokeys-restore", failures);
        if let Some(v) = self.ok("pac-nokeys-detected", failures) {
            let a = &v["after"];
            let how = if a["ok"] == false {
                format!("it exited 3: {}", a["mismatch"])
            } else {
                format!(
                    "it died without a word (a failed return-address authentication); the kernel: {}",
                    v["kernel_says"]
                )
            };
            println!("  control, pacloop restored without its keys: detected, {how}");
        }
    }

    /// The pre-dumps, dump and restore of workload `n`.
    fn cycle(&self, n: &str, failures: &mut Vec<String>) {
        for i in 1..=3 {
            if let Some(v) = self.ok(&format!("{n}-pre-dump-{i}"), failures) {
                println!(
                    "  {n} pre-dump {i}: backend {}, pages_written {}, ebpf_pages {}, frozen_ms {:.1}, duration_ms {:.1}",
                    v["backend"],
                    v["pages_written"],
                    v["ebpf_pages"],
                    v["frozen_ms"].as_f64().unwrap_or(f64::NAN),
                    v["duration_ms"].as_f64().unwrap_or(f64::NAN)
                );
                if v["backend"] != "uffd-wp" {
                    failures.push(format!("{n} pre-dump {i}: backend {}", v["backend"]));
                }
            }
        }
        if let Some(v) = self.ok(&format!("{n}-dump"), failures) {
            println!(
                "  {n} dump: live rounds {}, pages_written {}, frozen_ms {:.1}, verify: {} pages checked, {} mismatches",
                v["live_rounds"].as_array().map_or(0, |a| a.len()),
                v["pages_written"],
                v["frozen_ms"].as_f64().unwrap_or(f64::NAN),
                v["verify"]["pages_checked"],
                v["verify"]["mismatches"]
            );
            if v["verify"]["mismatches"] != 0 {
                failures.push(format!("{n} dump --verify: {}", v["verify"]));
            }
        }
        if self.step(&format!("{n}-dump-killed")).is_some() {
            failures.push(format!("{n} dump left the original running"));
        }
        if let Some(v) = self.ok(&format!("{n}-restore"), failures) {
            println!(
                "  {n} restore: restore_ms {:.1}, pages_restored {}",
                v["restore_ms"].as_f64().unwrap_or(f64::NAN),
                v["pages_restored"]
            );
        }
    }

    /// A `runs` step: the restored hotloop went through its loop (slept) at
    /// least [`super::MIN_LOOPS`] times in a second.
    fn runs(&self, name: &str, what: &str, failures: &mut Vec<String>) {
        if let Some(v) = self.ok(name, failures) {
            println!("  {what} runs: {}", super::runs_summary(what, v, failures));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed step reports tern's error line; a step that never ran is
    /// named; a restored pacloop whose counter stood still fails.
    #[test]
    fn failures_name_the_step_and_what_tern_said() {
        let status = |it: u64| {
            format!(
                r#"{{"pid":9,"iterations":{it},"mask":7,"apia":"0x0060aaaa12345670","apda":"0x0040aaaa12345670","apdb":"0x0000aaaa12345670","apga":"0x1","ok":true,"mismatch":null}}"#
            )
        };
        let console = format!(
            "TERN-BEGIN 6.12\r\n\
             {{\"arch\":\"aarch64\",\"backend\":\"uffd-wp\",\"features\":{{\"pagemap_scan\":true,\"soft_dirty\":false}}}}\r\n\
             TERN-STEP check 0\r\n\
             Error: pre-dump of PID 148: syscall injection is implemented for x86_64 only\r\n\
             TERN-STEP hot-pre-dump-1 1\r\n\
             {{\"skipped\": \"the dump failed\"}}\r\n\
             TERN-STEP hot-restore 125\r\n\
             {}\r\nTERN-STEP pac-setup 0\r\n\
             {{\"alive\": true, \"before\": {}, \"after\": {}}}\r\nTERN-STEP pac-survives 0\r\n\
             TERN-END\r\n",
            status(5),
            status(70),
            status(70)
        );
        let report = Report::new(&console);
        let mut failures = Vec::new();
        report.check(&mut failures);
        let has = |s: &str| failures.iter().any(|f| f.contains(s));
        assert!(
            has(
                "step hot-pre-dump-1: exited 1: Error: pre-dump of PID 148: syscall injection is implemented for x86_64 only"
            ),
            "{failures:#?}"
        );
        assert!(has("step hot-dump: did not run"), "{failures:#?}");
        assert!(
            has("step hot-restore: not run (\"the dump failed\")"),
            "{failures:#?}"
        );
        assert!(has("pacloop's counter did not advance"), "{failures:#?}");
        assert!(!has("step check"), "{failures:#?}");
        assert!(!has("step pac-setup"), "{failures:#?}");
    }
}
