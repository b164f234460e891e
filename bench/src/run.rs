//! Running the programs a benchmark measures (tern, CRIU) to their end
//! within a deadline, and waiting for the processes they leave.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Run tern with `args`, return its last JSON line.
pub fn tern_json(tern: &Path, args: &[String]) -> Result<Value> {
    let out = Command::new(tern)
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
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .with_context(|| format!("`tern {}` printed no JSON", args.join(" ")))
}

/// Start a workload (`hotloop`) in a session of its own (CRIU dumps a
/// session leader without `--shell-job`) and wait, at most `deadline`, until
/// its output in `log` says `ready`; it is killed if it does not. Its PID
/// beside it.
pub fn spawn_until_ready(
    cmd: &mut Command,
    log: &Path,
    deadline: Duration,
) -> Result<(Child, i32)> {
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", cmd.get_program().to_string_lossy()))?;
    let pid = i32::try_from(child.id()).context("PID out of range")?;
    let t0 = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("ready")
    {
        if t0.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} (PID {pid}) did not print `ready` within {deadline:?}",
                cmd.get_program().to_string_lossy()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, pid))
}

/// Run a command to its end within `deadline` (killed then); its output.
pub fn run_deadline(
    cmd: &mut Command,
    what: &str,
    deadline: Duration,
) -> Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    // Drain both pipes beside the wait so that a chatty command cannot block.
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let ho = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let he = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = wait_deadline(&mut child, deadline)
        .with_context(|| format!("{what} did not finish within {deadline:?} (killed)"))?;
    Ok(std::process::Output {
        status,
        stdout: ho.join().unwrap_or_default(),
        stderr: he.join().unwrap_or_default(),
    })
}

/// Wait for a child with a deadline; kill it at the deadline.
pub fn wait_deadline(child: &mut Child, deadline: Duration) -> Result<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if t0.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("PID {} still running after {deadline:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Wait until PID `pid` is gone: reaped by us (a restored process whose
/// restorer exited is reparented to us, the subreaper) or by its parent.
pub fn wait_gone(pid: i32, deadline: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        // SAFETY: waitpid on a specific PID with WNOHANG; ECHILD (not ours)
        // is fine.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(());
        }
        if t0.elapsed() > deadline {
            bail!(
                "PID {pid} is still taken {deadline:?} after it was killed: a restore needs it free"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn kill(pid: i32) {
    // SAFETY: plain kill of a restored workload.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// A time CRIU's `--display-stats` printed, in ms: `criu_stat_ms(text,
/// "Restore time")`, `"Frozen time"`, `"Memory dump time"`...
pub fn criu_stat_ms(text: &str, name: &str) -> Option<f64> {
    // "Restore time: 0.12 ms", "Frozen time: 52917 us", "... 1.5 s".
    let line = text.lines().find(|l| {
        l.trim_start()
            .strip_prefix(name)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
    })?;
    let rest = line.split(':').nth(1)?.trim();
    let mut w = rest.split_whitespace();
    let v: f64 = w.next()?.parse().ok()?;
    Some(match w.next() {
        Some("s") => v * 1e3,
        Some("us") => v / 1e3,
        _ => v,
    })
}

/// CRIU's version line.
pub fn criu_version(criu: &Path) -> String {
    Command::new(criu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "version unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_stats() {
        assert_eq!(
            criu_stat_ms("Restore time: 2.5 ms\n", "Restore time"),
            Some(2.5)
        );
        assert_eq!(
            criu_stat_ms("x\n  Restore time: 0.5 s\n", "Restore time"),
            Some(500.0)
        );
        let dump = "Displaying dump stats:\nFreezing time: 0 us\nFrozen time: 52917 us\nMemory dump time: 35431 us\n";
        assert_eq!(criu_stat_ms(dump, "Frozen time"), Some(52.917));
        assert_eq!(criu_stat_ms(dump, "Freezing time"), Some(0.0));
        assert_eq!(criu_stat_ms(dump, "Memory dump time"), Some(35.431));
        assert_eq!(criu_stat_ms("nothing", "Restore time"), None);
    }
}
