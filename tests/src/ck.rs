//! The protocol of the self-checking workloads (`tests/src/bin/ck_*.rs`) and
//! the harness side of it.
//!
//! A workload is started as `ck_NAME --out FILE [ARGS]` with stdin from
//! /dev/null and stdout/stderr into regular files (so that a restored process
//! needs no pipe to the harness). It sets its state up, then appends
//! `ready PID` to FILE and keeps running. On SIGTERM it checks everything it
//! set up against what the kernel says now, appends `PASS` or
//! `FAIL <what differed>` to FILE and exits 0 on PASS, 1 on FAIL. It opens
//! FILE for each line (append, then close), so the result does not depend on
//! the fd table surviving.
//!
//! `--break` makes a workload damage its own state right after `ready` (as a
//! broken restore would), so that a test can show its checks fail.
//!
//! Writers use [`report`]; the harness uses [`CkProcess`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Workload side: the value after `--out`, or exit 2 with a usage line.
pub fn out_path() -> PathBuf {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--out") {
        Some(i) if i + 1 < args.len() => PathBuf::from(&args[i + 1]),
        _ => {
            eprintln!("usage: {} --out FILE [--break] [ARGS]", args[0]);
            std::process::exit(2);
        }
    }
}

/// Workload side: whether `--break` was given.
pub fn break_requested() -> bool {
    std::env::args().any(|a| a == "--break")
}

/// Workload side: append one line to the result file (open, write, close).
/// Only async-signal-safe calls, so it may run in a signal handler.
pub fn report(path: &Path, line: &str) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: plain syscalls on a valid C string and buffers.
    unsafe {
        let fd = libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
            0o666,
        );
        if fd < 0 {
            return;
        }
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        libc::write(fd, buf.as_ptr().cast(), buf.len());
        libc::close(fd);
    }
}

static TERM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_term(_sig: libc::c_int) {
    TERM.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Workload side: make SIGTERM (the harness's "check yourself now") set
/// the flag [`terminated`] reads (SA_RESTART: blocking calls go on).
pub fn catch_sigterm() -> Result<(), String> {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "sigaction(SIGTERM): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Workload side: whether SIGTERM arrived (see [`catch_sigterm`]).
pub fn terminated() -> bool {
    TERM.load(std::sync::atomic::Ordering::SeqCst)
}

/// Workload side: report `PASS` (exit 0) or `FAIL <what differed>` (the
/// first 4000 bytes; exit 1).
pub fn finish(path: &Path, fails: &[String]) -> ! {
    if fails.is_empty() {
        report(path, "PASS");
        std::process::exit(0);
    }
    let mut line = format!("FAIL {}", fails.join("; "));
    line.truncate(line.floor_char_boundary(4000));
    report(path, &line);
    std::process::exit(1);
}

/// Harness side: a running self-checking workload, killed and reaped on drop.
pub struct CkProcess {
    pub name: String,
    pub pid: i32,
    pub out: PathBuf,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl CkProcess {
    /// Start `ck_NAME --out DIR/result ARGS` and wait (at most `timeout`)
    /// for its `ready` line.
    pub fn start(name: &str, args: &[&str], timeout: Duration) -> Result<CkProcess, String> {
        let bin = crate::bin_dir().join(format!("ck_{name}"));
        if !bin.is_file() {
            return Err(format!(
                "no workload binary at {}: build the workspace first",
                bin.display()
            ));
        }
        Self::start_program(name, &bin, args, timeout)
    }

    /// Like [`CkProcess::start`] for any program that speaks the protocol
    /// (a script, ...): `PROGRAM ARGS --out DIR/result`. In ARGS, `{dir}`
    /// is replaced with the process's directory.
    pub fn start_program(
        name: &str,
        bin: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> Result<CkProcess, String> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ck-{name}-"))
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        // World-writable: some workloads drop to an unprivileged uid.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777));
        let out = dir.path().join("result");
        let stdout = std::fs::File::create(dir.path().join("stdout")).map_err(|e| e.to_string())?;
        let stderr = std::fs::File::create(dir.path().join("stderr")).map_err(|e| e.to_string())?;
        let dir_s = dir.path().display().to_string();
        let child = crate::spawn_retrying(
            Command::new(bin)
                .args(args.iter().map(|a| a.replace("{dir}", &dir_s)))
                .arg("--out")
                .arg(&out)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr),
        )
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id() as i32;
        let mut p = CkProcess {
            name: name.to_string(),
            pid,
            out,
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if p.lines().iter().any(|l| l == &format!("ready {pid}")) {
                return Ok(p);
            }
            if let Some(st) = p.try_wait() {
                return Err(format!(
                    "ck_{name} exited ({st}) before ready; result file: {:?}; stderr: {}",
                    p.lines(),
                    p.stderr()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ck_{name} (pid {pid}) not ready within {timeout:?}; stderr: {}",
                    p.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines of the result file so far.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Forget the child (it was dumped and killed, or a restored process
    /// took its PID and someone else reaps it). Reaps it if it is a zombie.
    pub fn release(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the process with this PID (ours or a restored one), then wait
    /// (at most `timeout`) for `PASS`/`FAIL` in the result file. Returns the
    /// verdict line. Reaps our own child if it is still ours.
    pub fn verdict(&mut self, timeout: Duration) -> Result<String, String> {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines()
                .into_iter()
                .find(|l| l == "PASS" || l.starts_with("FAIL"))
            {
                if let Some(mut c) = self.child.take() {
                    let _ = c.wait();
                }
                return Ok(l);
            }
            if let Some(st) = self.try_wait() {
                self.child = None;
                // It may have written its verdict between the read above
                // and its exit.
                if let Some(l) = self
                    .lines()
                    .into_iter()
                    .find(|l| l == "PASS" || l.starts_with("FAIL"))
                {
                    return Ok(l);
                }
                return Err(format!(
                    "ck_{} exited ({st}) without a verdict; result file: {:?}; stderr: {}",
                    self.name,
                    self.lines(),
                    self.stderr()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ck_{} (pid {}) gave no verdict within {timeout:?}; result file: {:?}",
                    self.name,
                    self.pid,
                    self.lines()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for CkProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
