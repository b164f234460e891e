//! `cargo xtask vm-test LANE`: tern on kernels this machine does not run,
//! booted under qemu with software emulation (TCG, no KVM needed).
//!
//! `x86-softdirty` (`x86.rs`): Debian bookworm's `linux-image-amd64` (6.1:
//! soft-dirty yes, PAGEMAP_SCAN no): tern's soft-dirty backend end to end,
//! its precision and memory-oracle tests, and CRIU side by side.
//!
//! `arm64` (`arm64.rs`): Debian trixie's arm64 kernel (6.12: uffd-wp,
//! PAGEMAP_SCAN, pointer authentication) with a static cross build of tern:
//! uffd-wp pre-dumps, dump and restore of a PAC-protected loop, the `sys`
//! crate's kernel tests.
//!
//! This module holds what the lanes share (`crate::debian` fetches their
//! Debian packages): assembling an initramfs around busybox, booting qemu with a
//! deadline (a guest that fails or hangs is killed, its console's tail
//! printed), and reading the `TERN-STEP` lines the guests print.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util;

mod arm64;
mod x86;

/// The whole guest run, boot to power-off.
pub(crate) const GUEST_DEADLINE: Duration = Duration::from_secs(300);

/// What every guest's /init starts with (the lane's script follows).
pub(crate) const INIT_PREAMBLE: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts
# How often PID $1 went to sleep on its own: hotloop sleeps once a loop.
switches() { sed -n 's/^voluntary_ctxt_switches:[[:space:]]*//p' /proc/$1/status 2>/dev/null; }
# PID $1 watched for a second, as the JSON of a `runs` step (sets sa, sb).
watch_loops() {
  a=$(cut -d' ' -f14 /proc/$1/stat 2>/dev/null); sa=$(switches $1); sleep 1
  b=$(cut -d' ' -f14 /proc/$1/stat 2>/dev/null); sb=$(switches $1)
  echo "{\"pid\": $1, \"utime_before\": ${a:-null}, \"utime_after\": ${b:-null}, \"switches_before\": ${sa:-null}, \"switches_after\": ${sb:-null}}"
}
"#;

/// A restored `hotloop` runs when it went to sleep at least this often in
/// the second it was watched (it sleeps 5 ms a loop: 100 to 200 times a
/// second under TCG). Its user time is no measure: a loop costs well under a
/// 4 ms tick, and a working restore showed `utime 3 -> 3`.
pub(crate) const MIN_LOOPS: u64 = 10;

/// The loops a restored `hotloop` made in a second, from a `runs` step's
/// JSON (`switches_before`, `switches_after`): `None` unless at least
/// [`MIN_LOOPS`].
fn loops_in_a_second(runs: &Value) -> Option<u64> {
    let (a, b) = (
        runs["switches_before"].as_u64()?,
        runs["switches_after"].as_u64()?,
    );
    b.checked_sub(a).filter(|n| *n >= MIN_LOOPS)
}

/// `N sleeps in 1 s (utime a -> b)` for a `runs` step's JSON; a failure
/// naming `what` when it made fewer than [`MIN_LOOPS`] loops.
pub(crate) fn runs_summary(what: &str, runs: &Value, failures: &mut Vec<String>) -> String {
    let loops = loops_in_a_second(runs);
    if loops.is_none() {
        failures.push(format!(
            "{what} does not run (fewer than {MIN_LOOPS} sleeps in a second): {runs}"
        ));
    }
    format!(
        "{} sleeps in 1 s (utime {} -> {})",
        loops.map_or("?".into(), |n| n.to_string()),
        runs["utime_before"],
        runs["utime_after"]
    )
}

pub fn run(lane: &str) -> Result<()> {
    match lane {
        "x86-softdirty" => x86::softdirty(),
        "arm64" => arm64::run(),
        other => bail!("unknown VM lane `{other}`; known: x86-softdirty, arm64"),
    }
}

pub use x86::bench_criu;

/// Both lanes, as `cargo xtask test` runs them: the x86 lane is built on
/// both cores, then its guest (one vCPU, one core) runs while the arm64
/// lane's cross build takes the other core (`-j1`), then the arm64 guest
/// (two vCPUs) runs alone. Each lane runs even if the other failed; the
/// names of those that failed, each with its error printed.
pub fn run_all() -> Vec<&'static str> {
    let mut failed = Vec::new();
    let fail = |lane: &'static str, e: anyhow::Error, failed: &mut Vec<&'static str>| {
        eprintln!("xtask: vm-test {lane} failed: {e:#}");
        failed.push(lane);
    };
    eprintln!("xtask: vm-test x86-softdirty");
    let x86 = match x86::prepare_softdirty() {
        Ok(guest) => Some(std::thread::spawn(move || guest.run())),
        Err(e) => {
            fail("x86-softdirty", e, &mut failed);
            None
        }
    };
    eprintln!("xtask: vm-test arm64 (built beside the x86 guest, one job)");
    let arm64 = arm64::prepare(x86.as_ref().map(|_| 1));
    if let Some(h) = x86 {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fail("x86-softdirty", e, &mut failed),
            Err(_) => fail(
                "x86-softdirty",
                anyhow::anyhow!("the thread that ran its guest panicked"),
                &mut failed,
            ),
        }
    }
    match arm64.and_then(arm64::Arm64Guest::run) {
        Ok(()) => {}
        Err(e) => fail("arm64", e, &mut failed),
    }
    failed
}

/// The kernel image of Debian package `meta` (a metapackage such as
/// `linux-image-amd64`, resolved to the versioned package it depends on),
/// downloaded into `work` once and unpacked there, with the host's apt.
pub(crate) fn debian_kernel(work: &Path, meta: &str) -> Result<PathBuf> {
    crate::debian::kernel(work, meta, &[])
}

/// An initramfs (`work/NAME.gz`) holding the host's busybox, `bins` in /bin,
/// the shared libraries they link (at the paths `ldd` gives), `extra` trees
/// (source, path in the guest) and `init`.
pub(crate) fn initramfs(
    work: &Path,
    name: &str,
    bins: &[PathBuf],
    extra: &[(PathBuf, String)],
    init: &str,
) -> Result<PathBuf> {
    initramfs_with(work, name, Path::new("/bin/busybox"), bins, extra, init)
}

/// [`initramfs`] with the guest's `busybox` (static) given: a guest of
/// another architecture. Statically linked `bins` bring no libraries (and
/// are not given to the host's `ldd`, which cannot read a foreign binary).
pub(crate) fn initramfs_with(
    work: &Path,
    name: &str,
    busybox: &Path,
    bins: &[PathBuf],
    extra: &[(PathBuf, String)],
    init: &str,
) -> Result<PathBuf> {
    let root = work.join(format!("{name}-root"));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))
        .with_context(|| format!("{} (Debian package busybox-static)", busybox.display()))?;
    for b in bins {
        let name = b.file_name().context("binary without a name")?;
        std::fs::copy(b, root.join("bin").join(name))
            .with_context(|| format!("copying {}", b.display()))?;
        if !elf_interpreter(b)? {
            continue;
        }
        let ldd = util::stdout_of(&mut util::command("ldd", [b]))?;
        for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
            let to = root.join(lib.trim_start_matches('/'));
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
        }
    }
    for (from, to) in extra {
        let dest = root.join(to.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        util::run(util::command("cp", ["-a"]).arg(from).arg(&dest))?;
    }
    let init_path = root.join("init");
    std::fs::write(&init_path, format!("{INIT_PREAMBLE}{init}"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755))?;
    let out = work.join(format!("{name}.gz"));
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$1\"")
        .arg("sh")
        .arg(&out)
        .current_dir(&root)
        .status()
        .context("cannot run cpio")?;
    if !status.success() {
        bail!("packing {} failed ({status})", out.display());
    }
    Ok(out)
}

/// Whether the ELF file `path` names a program interpreter (a
/// `PT_INTERP` program header: dynamically linked). Reads the 64-bit
/// little-endian header (both lanes' binaries) by hand.
pub(crate) fn elf_interpreter(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let not_elf = || anyhow::anyhow!("{}: not a 64-bit little-endian ELF file", path.display());
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(not_elf());
    }
    let u16_at = |o: usize| -> Option<usize> {
        Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?) as usize)
    };
    let u64_at = |o: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?)).ok()
    };
    // e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38; p_type is the
    // first u32 of a program header; PT_INTERP = 3.
    let (phoff, phentsize, phnum) = (
        u64_at(0x20).ok_or_else(not_elf)?,
        u16_at(0x36).ok_or_else(not_elf)?,
        u16_at(0x38).ok_or_else(not_elf)?,
    );
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let p_type = bytes.get(o..o + 4).ok_or_else(not_elf)?;
        if p_type == 3u32.to_le_bytes() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Boot `kernel` + `initrd` with `qemu` (its arguments set), the serial
/// console into `log`; kill it at the deadline. Returns the console.
pub(crate) fn boot(
    qemu: &mut Command,
    kernel: &Path,
    initrd: &Path,
    log: &Path,
    deadline: Duration,
) -> Result<String> {
    let out = std::fs::File::create(log)?;
    eprintln!(
        "xtask: booting {} (TCG; deadline {deadline:?})",
        kernel.display()
    );
    let mut child = qemu
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {}", util::show(qemu)))?;
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            let console = String::from_utf8_lossy(&std::fs::read(log)?).into_owned();
            if !console.contains("TERN-END") {
                bail!(
                    "the guest stopped ({st}) before its tests ended; {}",
                    console_report(&console, log)
                );
            }
            return Ok(console);
        }
        if t.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let console = String::from_utf8_lossy(&std::fs::read(log)?).into_owned();
            bail!(
                "the guest did not finish within {deadline:?} (killed); {}",
                console_report(&console, log)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a failed guest's console shows: the first kernel report (soft
/// lockup, RCU stall, oops, panic; its first 12 lines, which name the CPU,
/// the task and the place) when the tail does not hold it, then the last 40
/// lines, and where the whole console is.
pub(crate) fn console_report(console: &str, log: &Path) -> String {
    const MARKS: [&str; 5] = ["BUG:", "rcu: INFO", "Oops", "Kernel panic", "WARNING:"];
    let lines: Vec<&str> = console.lines().collect();
    let tail_from = lines.len().saturating_sub(40);
    let mut out = String::new();
    if let Some(i) = lines
        .iter()
        .position(|l| MARKS.iter().any(|m| l.contains(m)))
        && i < tail_from
    {
        out += "the kernel reported:\n";
        out += &lines[i..(i + 12).min(tail_from)].join("\n");
        out += "\n...\n";
    }
    out += &format!(
        "console tail (all of it in {}):\n{}",
        log.display(),
        lines[tail_from..].join("\n")
    );
    out
}

/// A lane that passed still says if its guest's kernel reported a stall
/// (soft lockup, RCU stall): under TCG a host that starves qemu for 20 s
/// looks like one, so it is a note for whoever reads the run, not a failure.
pub(crate) fn print_stalls(console: &str) {
    for l in console
        .lines()
        .filter(|l| l.contains("soft lockup") || l.contains("rcu: INFO"))
        .take(3)
    {
        println!("  note: the guest's kernel reported a stall: {}", l.trim());
    }
}

pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `(step, exit code, the last JSON object printed before it)` for every
/// `TERN-STEP name rc` line of the console.
pub(crate) fn parse_steps(console: &str) -> Vec<(String, i32, Option<Value>)> {
    let mut out = Vec::new();
    let mut last: Option<Value> = None;
    for line in console.lines() {
        let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\r');
        if let Some(rest) = line.strip_prefix("TERN-STEP ") {
            let mut w = rest.split_whitespace();
            let name = w.next().unwrap_or("").to_string();
            let rc = w.next().and_then(|r| r.parse().ok()).unwrap_or(-1);
            out.push((name, rc, last.take()));
        } else if let Some(start) = line.find('{')
            && let Ok(v) = serde_json::from_str::<Value>(&line[start..])
        {
            last = Some(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_take_the_json_printed_before_them() {
        let console = "noise\r\n{\"backend\":\"soft-dirty\"}\r\nTERN-STEP check 0\r\nTERN-STEP x 3\r\n\u{1b}c{\"a\":1}\nTERN-STEP y 0\n";
        let s = parse_steps(console);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].0, "check");
        assert_eq!(s[0].2.as_ref().unwrap()["backend"], "soft-dirty");
        assert_eq!((s[1].1, s[1].2.is_none()), (3, true));
        assert_eq!(s[2].2.as_ref().unwrap()["a"], 1);
    }

    /// A lockup scrolled out of the tail by its stack is still shown, from
    /// the line naming the CPU and task.
    #[test]
    fn console_report_keeps_the_kernel_report_header() {
        let mut console = String::from("TERN-BEGIN 6.1\n");
        console += "[ 84.6] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [tern:201]\n";
        for i in 0..60 {
            console += &format!("[ 84.6]  frame{i}+0x1/0x2\n");
        }
        let r = console_report(&console, Path::new("/t/console.log"));
        assert!(r.contains("the kernel reported:"), "{r}");
        assert!(r.contains("CPU#0 stuck for 26s! [tern:201]"), "{r}");
        assert!(r.contains("frame59") && r.contains("/t/console.log"), "{r}");
        // In the tail already: not repeated.
        let short = "x\n[ 1.0] BUG: soft lockup - CPU#1\ny\n";
        let r = console_report(short, Path::new("/c"));
        assert!(
            !r.contains("the kernel reported:") && r.contains("CPU#1"),
            "{r}"
        );
    }

    /// hotloop's sleeps, not its user time, say it runs.
    #[test]
    fn loops_count_the_sleeps() {
        let v = |a: u64, b: u64| serde_json::json!({"utime_before": 3, "utime_after": 3, "switches_before": a, "switches_after": b});
        assert_eq!(loops_in_a_second(&v(516, 706)), Some(190));
        assert_eq!(loops_in_a_second(&v(516, 520)), None);
        assert_eq!(loops_in_a_second(&v(520, 516)), None);
        assert_eq!(
            loops_in_a_second(&serde_json::json!({"utime_before": 1, "utime_after": 9})),
            None
        );
    }
}
