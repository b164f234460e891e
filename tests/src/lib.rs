//! Support for tern's integration tests: find the binaries, own the workload
//! processes (and always reap them: PID 1 reaps slowly here), run `tern` with
//! a deadline, and check image chains against the live target
//! ([`oracle::check`]).

pub mod ck;
pub mod failfs;
pub mod hosts;
pub mod lazy;
pub mod oracle;
pub mod pattern;
pub mod proc;

use serde_json::Value;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries: the target directory of
/// the running test executable (`target/ci/deps/x-hash` -> `target/ci`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The `tern` binary. `TERN_BIN` overrides.
pub fn tern_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TERN_BIN") {
        return PathBuf::from(p);
    }
    let p = bin_dir().join("tern");
    if !p.is_file() {
        panic!(
            "no tern binary at {}: build it first: cargo build --workspace (cargo xtask test does)",
            p.display()
        );
    }
    p
}

/// `cmd.spawn()`, tried again for a while on ETXTBSY: the binary is a copy
/// this test process wrote (see [`workload_bin`]), and a child another test
/// thread forks while the copy's write fd is open holds that fd until it
/// execs; executing the copy meanwhile fails with "Text file busy".
pub fn spawn_retrying(cmd: &mut Command) -> std::io::Result<Child> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// A workload binary of this crate (`workload`, `selfcheck`), copied once
/// per test process to a private directory: a rebuild of the workspace while
/// the tests run must not delete the file that a target's mappings (and an
/// image's file-backed VMAs) read from.
pub fn workload_bin(name: &str) -> PathBuf {
    static COPIES: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!(
            "no {name} binary at {}: build it first: cargo build --workspace (cargo xtask test does)",
            p.display()
        );
    }
    let mut dir = COPIES.lock().unwrap_or_else(|e| e.into_inner());
    let dir = dir.get_or_insert_with(|| {
        let base = std::env::temp_dir().join("tern-tests-bin");
        let _ = std::fs::create_dir_all(&base);
        // Remove the copies of test processes that are gone.
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let pid: i32 = e.file_name().to_string_lossy().parse().unwrap_or(0);
                if pid > 0 && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = base.join(std::process::id().to_string());
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        d
    });
    let copy = dir.join(name);
    if !copy.is_file() {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::copy(&p, &tmp)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", p.display(), tmp.display()));
        std::fs::rename(&tmp, &copy).unwrap();
    }
    copy
}

/// Wait for `child` at most `timeout`; SIGKILL and reap it past that.
/// Returns None on timeout.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A running workload program that answers one JSON line per command. It is
/// our child (dropping it kills and reaps it), or, once adopted after a
/// restore ([`Workload::adopt`]), the child of the `tern restore` that
/// brought it back (dropping it kills it, and reaps that tern).
pub struct Workload {
    child: Option<Child>,
    /// `tern restore` waiting for the adopted process.
    restore: Option<Child>,
    /// Our write end of its stdin.
    stdin: Option<File>,
    /// Our read end of its stdout, and what was read of it past the last line.
    stdout: File,
    buf: Vec<u8>,
    /// With [`Workload::start_restorable`]: the directory of the FIFOs its
    /// stdin and stdout are, and of its stderr file.
    fifos: Option<tempfile::TempDir>,
    pid: i32,
    name: String,
}

impl Workload {
    /// Start the `workload` program.
    pub fn start() -> Workload {
        Workload::spawn("workload", &[])
    }

    /// Start the `workload` program so that a restore of it can keep
    /// talking to us: its stdin and stdout are named pipes (FIFOs) in a
    /// directory of its own, which `tern restore` opens again by path
    /// (a pipe to us could not be recreated). We keep the FIFOs open (the
    /// write end of its stdin, its stdout read-write), so that neither end
    /// sees an end of file while the process is dumped and restored, and
    /// its stderr is a file there (shown when it fails).
    pub fn start_restorable() -> Workload {
        Workload::spawn_with("workload", &[], true)
    }

    /// [`Workload::start_restorable`] run through `wrapper` (a program and
    /// its arguments that exec the workload: `ip netns exec NS`).
    pub fn start_restorable_in(wrapper: &[&str]) -> Workload {
        Workload::spawn_in(wrapper, "workload", &[], true)
    }

    /// Start the `selfcheck` program with a `mib` MiB checked region.
    pub fn selfcheck(mib: usize) -> Workload {
        Workload::spawn("selfcheck", &[&mib.to_string()])
    }

    pub fn spawn(name: &str, args: &[&str]) -> Workload {
        Workload::spawn_with(name, args, false)
    }

    fn spawn_with(name: &str, args: &[&str], fifos: bool) -> Workload {
        Workload::spawn_in(&[], name, args, fifos)
    }

    fn spawn_in(wrapper: &[&str], name: &str, args: &[&str], fifos: bool) -> Workload {
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(workload_bin(name));
                c
            }
            None => Command::new(workload_bin(name)),
        };
        cmd.args(args);
        let mut dir = None;
        let mut ours: Option<(File, File)> = None;
        if fifos {
            let d = tempfile::Builder::new()
                .prefix("tern-workload-")
                .tempdir()
                .expect("tempdir");
            let (cmd_path, out_path) = (d.path().join("stdin"), d.path().join("stdout"));
            for p in [&cmd_path, &out_path] {
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: mkfifo(3) of a NUL-terminated path.
                let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
                assert_eq!(
                    rc,
                    0,
                    "mkfifo {}: {}",
                    p.display(),
                    std::io::Error::last_os_error()
                );
            }
            // Each read end first, without blocking, then the write ends
            // (which then do not block either).
            let its_stdin = open_fifo(&cmd_path, libc::O_RDONLY | libc::O_NONBLOCK);
            let our_stdin = open_fifo(&cmd_path, libc::O_WRONLY);
            let our_stdout = open_fifo(&out_path, libc::O_RDWR);
            let its_stdout = open_fifo(&out_path, libc::O_WRONLY);
            set_blocking(&its_stdin);
            let stderr = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(d.path().join("stderr"))
                .expect("stderr file");
            cmd.stdin(its_stdin).stdout(its_stdout).stderr(stderr);
            ours = Some((our_stdin, our_stdout));
            dir = Some(d);
        } else {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
        }
        let mut child = spawn_retrying(&mut cmd).unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        drop(cmd);
        let pid = child.id() as i32;
        let (stdin, stdout) = match ours {
            Some((i, o)) => (i, o),
            None => (
                File::from(std::os::fd::OwnedFd::from(child.stdin.take().unwrap())),
                File::from(std::os::fd::OwnedFd::from(child.stdout.take().unwrap())),
            ),
        };
        let mut w = Workload {
            child: Some(child),
            restore: None,
            stdin: Some(stdin),
            stdout,
            buf: Vec::new(),
            fifos: dir,
            pid,
            name: name.to_string(),
        };
        let ready = w
            .read_reply(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
        assert_eq!(ready["ready"], true, "{name}: {ready}");
        w.settle().unwrap_or_else(|e| panic!("{e}"));
        w
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Its stderr (a [`Workload::start_restorable`] one's; empty otherwise).
    pub fn stderr(&self) -> String {
        self.fifos
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("stderr")).ok())
            .unwrap_or_default()
    }

    /// Why it gave no answer: whether it is gone, and how.
    fn describe_state(&mut self) -> String {
        let st = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        let rst = self
            .restore
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        format!(
            "exit status {st:?}, state {:?}{}{}",
            proc::state(self.pid),
            rst.map(|s| format!(", the tern restore that holds it exited {s}"))
                .unwrap_or_default(),
            Some(self.stderr())
                .filter(|s| !s.is_empty())
                .map(|s| format!("; its stderr:\n{s}"))
                .unwrap_or_default()
        )
    }

    /// The next line of its stdout, at most `timeout`; an error at once if
    /// it ends (end of file, or the process gone).
    fn read_line(&mut self, timeout: Duration) -> Result<String, String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let now = Instant::now();
            if now >= end {
                return Err(format!("no answer within {timeout:?}"));
            }
            let wait = (end - now).min(Duration::from_millis(50));
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.stdout),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(wait.as_millis()).unwrap_or(50).max(1);
            // SAFETY: poll(2) on one pollfd we own.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll of its stdout: {e}"));
            }
            if r == 0 {
                // We hold a FIFO stdout read-write (no end of file): see
                // whether the process is still there.
                if !proc::alive(self.pid) {
                    return Err("the process is gone".into());
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            match self.stdout.read(&mut chunk) {
                Ok(0) => return Err("its stdout was closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read of its stdout: {e}")),
            }
        }
    }

    fn read_reply(&mut self, timeout: Duration) -> Result<Value, String> {
        let line = match self.read_line(timeout) {
            Ok(l) => l,
            Err(e) => {
                let state = self.describe_state();
                return Err(format!(
                    "{} (pid {}) gave no answer: {e}; {state}",
                    self.name, self.pid
                ));
            }
        };
        serde_json::from_str(&line).map_err(|e| format!("{}: bad reply {line:?}: {e}", self.name))
    }

    /// Send a command, return the reply (whatever it says), once the
    /// program is idle again.
    pub fn try_cmd(&mut self, line: &str) -> Result<Value, String> {
        self.send(line)?;
        let v = self.read_reply(Duration::from_secs(120))?;
        self.settle()?;
        Ok(v)
    }

    /// Wait until the main thread is blocked in read(2) on stdin again: the
    /// reply arrives before the program finished handling the command, and
    /// its memory must not change while a test compares it with an image.
    pub fn settle(&self) -> Result<(), String> {
        let path = format!("/proc/{0}/task/{0}/syscall", self.pid);
        let mut last = String::new();
        let ok = proc::wait_until(Duration::from_secs(10), || {
            last = std::fs::read_to_string(&path).unwrap_or_default();
            // "0 0x0 ..." = read(0, ...) (63 on arm64), blocked (state S).
            last.starts_with(&format!("{} 0x0 ", libc::SYS_read))
                && proc::task_state(self.pid, self.pid) == Some('S')
        });
        if !ok && proc::alive(self.pid) {
            return Err(format!(
                "{} (pid {}) did not go back to reading stdin: {path}: {last:?}",
                self.name, self.pid
            ));
        }
        // Blocked once is not settled for good: look again a moment later.
        std::thread::sleep(Duration::from_millis(1));
        Ok(())
    }

    /// Send a line without waiting for the answer.
    pub fn send(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("{} (pid {}): write {line:?}: {e}", self.name, self.pid))
    }

    /// Send a command, which must succeed (`"ok": true`); return the reply.
    pub fn cmd(&mut self, line: &str) -> Value {
        let v = self
            .try_cmd(line)
            .unwrap_or_else(|e| panic!("workload command {line:?}: {e}"));
        if v["ok"] != true {
            panic!("workload command {line:?} failed: {v}");
        }
        v
    }

    /// `workload`: the regions it made, as `(name, address, pages)`.
    pub fn regions(&mut self) -> Vec<(String, u64, u64)> {
        self.cmd("regions")["regions"]
            .as_array()
            .expect("regions")
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_string(),
                    r["addr"].as_u64().unwrap(),
                    r["pages"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// `selfcheck`: run its self-check; panic with its detail unless PASS.
    pub fn self_check(&mut self, when: &str) {
        let v = self
            .try_cmd("check")
            .unwrap_or_else(|e| panic!("self-check {when}: {e}"));
        assert_eq!(v["result"], "PASS", "self-check {when} failed: {v}");
    }

    /// `selfcheck`: SIGTERM it, it must print PASS and exit 0.
    pub fn terminate_and_check(mut self) {
        // SAFETY: kill(2) takes integers only.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let v = self.read_reply(Duration::from_secs(10));
        let st = self.wait_exit(Duration::from_secs(10));
        let v = v.unwrap_or_else(|e| panic!("selfcheck after SIGTERM: {e}; exit {st:?}"));
        assert_eq!(v["result"], "PASS", "selfcheck after SIGTERM: {v}");
        assert!(
            st.is_some_and(|s| s.success()),
            "selfcheck exit status {st:?} ({v})"
        );
    }

    /// Wait for the process to exit by itself (at most `timeout`); SIGKILL
    /// it past that (None). An adopted process's status is the one its
    /// `tern restore` exits with (a signal `N` as exit code 128 + N).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match (self.child.as_mut(), self.restore.as_mut()) {
            (Some(c), _) => wait_deadline(c, timeout),
            (None, Some(r)) => {
                let st = wait_deadline(r, timeout);
                if st.is_none() {
                    // The restore is reaped; the process dies with it (its
                    // parent death signal) or by ours.
                    // SAFETY: kill(2) takes integers only.
                    unsafe { libc::kill(self.pid, libc::SIGKILL) };
                }
                self.restore = None;
                st
            }
            (None, None) => None,
        }
    }

    /// Kill and reap now.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut r) = self.restore.take() {
            // The adopted process is not reaped while its tern restore
            // runs: its PID is still its own.
            if r.try_wait().ok().flatten().is_none() {
                // SAFETY: kill(2) takes integers only.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
            }
            if wait_deadline(&mut r, Duration::from_secs(10)).is_none() {
                eprintln!("tern restore of PID {} did not end: killed", self.pid);
            }
        }
    }

    /// The process was killed by a `tern dump`: reap it (at most
    /// `timeout`), so that its PID is free for the restore. Its status.
    pub fn reap_dumped(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let c = self.child.as_mut().ok_or("not our child")?;
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > end {
                return Err(format!(
                    "{} (pid {}) still runs {timeout:?} after its dump (state {:?})",
                    self.name,
                    self.pid,
                    proc::state(self.pid)
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Take over the process `restore` (a running `tern restore`, not
    /// detached) brought back with this PID: commands go to it through the
    /// same FIFOs ([`Workload::start_restorable`]), and `restore` reaps it.
    /// It must be running, untraced, and waiting for a command.
    pub fn adopt(&mut self, restore: Child) -> Result<(), String> {
        if self.fifos.is_none() {
            return Err("only a workload started with start_restorable can be adopted".into());
        }
        if self.child.is_some() {
            return Err("the original is not reaped yet (reap_dumped)".into());
        }
        self.restore = Some(restore);
        self.buf.clear();
        assert_running_untraced(self.pid, "the restored workload");
        self.settle()
    }

    /// The `tern restore` that holds an adopted process.
    pub fn restore_mut(&mut self) -> Option<&mut Child> {
        self.restore.as_mut()
    }
}

/// Open the FIFO `path` with `flags` (and O_CLOEXEC).
fn open_fifo(path: &Path, flags: i32) -> File {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: open(2) of a NUL-terminated path; the fd is ours.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open {} ({flags:#o}): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd that nothing else owns.
    File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Clear O_NONBLOCK on `f`'s open file description.
fn set_blocking(f: &File) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    // SAFETY: fcntl(2) on our own fd.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stdin.take();
        // Let it go on its own for a moment (it kills and reaps its own child).
        if let Some(c) = self.child.as_mut()
            && wait_deadline(c, Duration::from_millis(0)).is_none()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill();
    }
}

/// Output of one tern run.
#[derive(Debug)]
pub struct TernRun {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl TernRun {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    pub fn describe(&self) -> String {
        format!(
            "`tern {}` -> {} in {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args.join(" "),
            self.status,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
    /// Must have exited 0; stdout parsed as one JSON value.
    pub fn json(&self) -> Value {
        assert!(self.ok(), "tern failed:\n{}", self.describe());
        parse_json(&self.stdout).unwrap_or_else(|e| panic!("{e}\n{}", self.describe()))
    }
    /// One JSON value per non-empty stdout line.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("not a JSON line {l:?}: {e}\n{}", self.describe()))
            })
            .collect()
    }
    /// Must have failed (non-zero exit, not killed by a signal), with a
    /// non-empty stderr.
    pub fn assert_clear_failure(&self, must_mention: &[&str]) {
        assert!(
            self.status.code().is_some_and(|c| c != 0),
            "expected a non-zero exit:\n{}",
            self.describe()
        );
        assert!(
            !self.stderr.trim().is_empty(),
            "failed without a message on stderr:\n{}",
            self.describe()
        );
        for m in must_mention {
            assert!(
                self.stderr.contains(m),
                "the error does not name {m:?}:\n{}",
                self.describe()
            );
        }
        assert!(
            !self.stderr.contains("panicked at") && !self.stderr.contains("RUST_BACKTRACE"),
            "tern panicked instead of reporting an error:\n{}",
            self.describe()
        );
    }
}

fn parse_json(s: &str) -> Result<Value, String> {
    if let Ok(v) = serde_json::from_str(s.trim()) {
        return Ok(v);
    }
    // Tolerate a log line before the object: take the last line that parses.
    s.lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l.trim())
                .ok()
                .filter(|v| v.is_object())
        })
        .ok_or_else(|| "stdout is not a JSON object".to_string())
}

/// Default deadline for one tern run (invariant 4: never hang).
pub const TERN_TIMEOUT: Duration = Duration::from_secs(120);

/// Start `tern ARGS` with piped output (for tests that kill it).
pub fn spawn_tern<S: AsRef<str>>(args: &[S]) -> Child {
    Command::new(tern_bin())
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn tern: {e}"))
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// The output of a running `tern` (spawned with [`spawn_tern`]) read in
/// the background: stdout line by line, stderr whole.
pub struct TernOutput {
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl TernOutput {
    /// Take `child`'s stdout and stderr.
    pub fn of(child: &mut Child) -> TernOutput {
        use std::io::BufRead;
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        TernOutput {
            lines: rx,
            stderr: child.stderr.take().map(drain),
        }
    }

    /// The next non-empty stdout line as JSON, at most `timeout`.
    pub fn json(&self, timeout: Duration) -> Result<Value, String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|e| format!("no JSON line on stdout within {timeout:?} ({e})"))?;
            if !line.trim().is_empty() {
                return serde_json::from_str(line.trim())
                    .map_err(|e| format!("stdout line {line:?}: {e}"));
            }
        }
    }

    /// All of stderr; only once the tern ended (else it waits for it).
    pub fn stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

/// Run `tern ARGS` to completion, at most `timeout` (a hang fails the test).
pub fn tern_with_timeout<S: AsRef<str>>(args: &[S], timeout: Duration) -> TernRun {
    let t0 = Instant::now();
    let mut child = spawn_tern(args);
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    let status = wait_deadline(&mut child, timeout);
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let Some(status) = status else {
        panic!(
            "`tern {}` did not finish within {timeout:?} (killed; README invariant 4: never hang)\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
            args.join(" ")
        );
    };
    TernRun {
        args,
        status,
        stdout,
        stderr,
        elapsed: t0.elapsed(),
    }
}

pub fn tern<S: AsRef<str>>(args: &[S]) -> TernRun {
    tern_with_timeout(args, TERN_TIMEOUT)
}

/// `tern pre-dump -t PID -D DIR [--prev-images-dir PREV] EXTRA... --json`;
/// must succeed; returns its JSON.
pub fn pre_dump(pid: i32, dir: &Path, prev: Option<&Path>, extra: &[&str]) -> Value {
    let run = pre_dump_run(pid, dir, prev, extra);
    let v = run.json();
    check_pre_dump_json(&v, pid, &run);
    v
}

pub fn pre_dump_run(pid: i32, dir: &Path, prev: Option<&Path>, extra: &[&str]) -> TernRun {
    let mut args: Vec<String> = vec![
        "pre-dump".into(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        dir.display().to_string(),
    ];
    if let Some(p) = prev {
        args.push("--prev-images-dir".into());
        args.push(p.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--json".into());
    tern(&args)
}

/// The fields the pre-dump JSON must carry (issue 2, item 6).
pub const PRE_DUMP_FIELDS: [&str; 11] = [
    "pid",
    "backend",
    "ebpf",
    "pages_scanned",
    "pages_written",
    "pages_zero",
    "bytes_written",
    "frozen_ms",
    "duration_ms",
    "ebpf_pages",
    "vma_changes",
];

fn check_pre_dump_json(v: &Value, pid: i32, run: &TernRun) {
    for f in PRE_DUMP_FIELDS {
        assert!(
            v.get(f).is_some(),
            "pre-dump JSON lacks {f:?}: {v}\n{}",
            run.describe()
        );
    }
    assert_eq!(
        v["pid"].as_i64(),
        Some(pid as i64),
        "pre-dump JSON pid: {v}"
    );
    for f in [
        "pages_scanned",
        "pages_written",
        "pages_zero",
        "bytes_written",
    ] {
        assert!(v[f].is_u64(), "pre-dump JSON {f:?} is not a count: {v}");
    }
    for f in ["frozen_ms", "duration_ms"] {
        assert!(v[f].is_number(), "pre-dump JSON {f:?} is not a number: {v}");
    }
}

/// A JSON number as f64 (panics with the object otherwise).
pub fn num(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field:?} is not a number in {v}"))
}

/// Run the oracle and panic with its report on a mismatch.
pub fn assert_oracle(pid: i32, dir: &Path, when: &str) -> oracle::OracleReport {
    oracle::check(pid, dir).unwrap_or_else(|e| panic!("{when}: {e}"))
}

/// The target must be alive, untraced and not stopped.
pub fn assert_running_untraced(pid: i32, when: &str) {
    assert!(
        proc::alive(pid),
        "{when}: target {pid} is gone (state {:?}; exit status in /proc/{pid}/stat: {:?})",
        proc::state(pid),
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(' ').next().map(|x| x.trim().to_string()))
    );
    // Detach happens when the tracer exits, but give the kernel a moment.
    let mut traced = Vec::new();
    let mut stopped = Vec::new();
    let ok = proc::wait_until(Duration::from_secs(2), || {
        traced = proc::traced_threads(pid);
        stopped = proc::stopped_threads(pid);
        traced.is_empty() && stopped.is_empty()
    });
    assert!(
        ok,
        "{when}: target {pid} traced threads (tid, tracer) {traced:?}, stopped threads {stopped:?}"
    );
}

/// `tern untrack -t PID`; must succeed.
pub fn untrack(pid: i32) -> TernRun {
    let run = tern(&["untrack", "-t", &pid.to_string(), "--json"]);
    assert!(run.ok(), "tern untrack failed:\n{}", run.describe());
    run
}

/// Untrack, then the target must be exactly as in `baseline`: maps, fds,
/// no userfaultfd-registered VMA, no pinned eBPF objects, untraced.
pub fn assert_untracked_exactly(pid: i32, baseline: &proc::Snapshot, when: &str) {
    let run = untrack(pid);
    assert_exactly_as(
        pid,
        baseline,
        &format!("{when}, after `tern untrack` ({})", run.stdout.trim()),
    );
}

/// The target is exactly as in `baseline`, with no tern state left.
pub fn assert_exactly_as(pid: i32, baseline: &proc::Snapshot, when: &str) {
    assert_running_untraced(pid, when);
    let now = proc::Snapshot::take(pid).unwrap();
    let d = proc::Snapshot::diff(baseline, &now, false);
    assert!(
        d.is_empty(),
        "{when}: target {pid} differs from before:\n  {}",
        d.join("\n  ")
    );
    let reg = proc::uffd_registered_vmas(pid).unwrap();
    assert!(
        reg.is_empty(),
        "{when}: VMAs still registered with userfaultfd:\n  {}",
        reg.join("\n  ")
    );
    let pin = proc::bpf_pin_dir(pid);
    assert!(!pin.exists(), "{when}: {} still exists", pin.display());
}

/// `tern restore -D dir` (with `pre_exec` run before exec) must fail,
/// naming every one of `mention`, and no process with `pid` may appear at
/// any moment of it (it is polled all along).
pub fn refused(
    dir: &Path,
    pid: i32,
    mention: &[&str],
    pre_exec: Option<fn() -> std::io::Result<()>>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let p = format!("/proc/{pid}");
            while !stop.load(Ordering::SeqCst) {
                if Path::new(&p).exists() {
                    seen.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let mut cmd = std::process::Command::new(tern_bin());
    cmd.args(["restore", "-D", &dir.display().to_string(), "--json"]);
    if let Some(f) = pre_exec {
        // SAFETY: the closure only makes raw syscalls.
        unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, f) };
    }
    // `--detach`: a restore that wrongly succeeds returns (and is then
    // killed) instead of waiting for the restored process.
    cmd.arg("--detach")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run tern");
    let err = drain(child.stderr.take().unwrap());
    let _out = drain(child.stdout.take().unwrap());
    let status = wait_deadline(&mut child, TERN_TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let stderr = err.join().unwrap();
    let status = status.unwrap_or_else(|| {
        panic!(
            "`tern restore -D {}` did not end within {TERN_TIMEOUT:?}: {stderr}",
            dir.display()
        )
    });
    if status.success() {
        // SAFETY: kill(2) of what the wrong restore brought back.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(
        status.code().is_some_and(|c| c != 0),
        "restore of {} succeeded: {stderr}",
        dir.display()
    );
    for m in mention {
        assert!(
            stderr.contains(m),
            "the refusal does not name {m:?}: {stderr}"
        );
    }
    assert!(
        !seen.load(Ordering::SeqCst),
        "a process with PID {pid} existed during the refused restore ({stderr})"
    );
    assert!(!proc::alive(pid), "PID {pid} left behind: {stderr}");
}

/// Copy the directory `from` (files and subdirectories) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Rewrite the JSON file `path` with `f` applied (as its owner would edit
/// it: owner and mode stay).
pub fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Remove the seal from the image in `dir` (an edit by someone without
/// this host's key would leave none, or a wrong one).
pub fn strip_seal(dir: &Path) {
    edit_json(&dir.join(images::INVENTORY_FILE), |v| {
        v.as_object_mut().unwrap().remove("seal");
    });
}

/// `dump -t PID -D DIR --json EXTRA...`.
pub fn dump_args(pid: i32, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "dump".into(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        dir.display().to_string(),
        "--json".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `tern restore -D DIR --detach --json` (must succeed, bringing back
/// `pid`); its JSON.
pub fn restore_detached(dir: &Path, pid: i32) -> Value {
    let v = tern(&[
        "restore",
        "-D",
        &dir.display().to_string(),
        "--detach",
        "--json",
    ])
    .json();
    assert_eq!(
        v["pid"].as_i64(),
        Some(pid as i64),
        "restore of {}: {v}",
        dir.display()
    );
    v
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tern-test-")
        .tempdir()
        .expect("tempdir")
}

/// Data pages of the newest image in `dir` (from the page map).
pub fn image_pages(dir: &Path, kind: images::PageKind) -> u64 {
    let img =
        images::Image::open(dir).unwrap_or_else(|e| panic!("open image {}: {e}", dir.display()));
    img.total_pages(kind)
}

/// Write `bytes` at `addr` in `pid` with process_vm_writev(2) (a remote,
/// GUP-based write that no user page fault of the target shows).
pub fn process_vm_write(pid: i32, addr: u64, bytes: &[u8]) {
    let local = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: local points at a buffer we own of iov_len bytes; the kernel checks the remote range.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "process_vm_writev({pid}, {addr:#x}, {}): {}",
        bytes.len(),
        std::io::Error::last_os_error()
    );
}

/// Address of a workload reply (`"addr"`).
pub fn addr_of(v: &Value) -> u64 {
    v["addr"]
        .as_u64()
        .unwrap_or_else(|| panic!("no addr in {v}"))
}

/// A chain of pre-dumps of one target, each checked with the oracle.
pub struct Chain {
    pub pid: i32,
    pub root: tempfile::TempDir,
    pub prev: Option<PathBuf>,
    pub rounds: usize,
    pub extra: Vec<String>,
    /// The backend the JSON must name, if any.
    pub expect_backend: Option<String>,
}

impl Chain {
    /// `track`: the `--track` value (None: tern's default); `extra`: more flags.
    pub fn new(pid: i32, track: Option<&str>, extra: &[&str]) -> Chain {
        let mut e: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(t) = track {
            e.push("--track".into());
            e.push(t.into());
        }
        let expect_backend = match track {
            Some("auto") | None => Some("uffd-wp".to_string()),
            Some(t) => Some(t.to_string()),
        };
        Chain {
            pid,
            root: tempdir(),
            prev: None,
            rounds: 0,
            extra: e,
            expect_backend,
        }
    }

    /// One pre-dump on top of the previous one; the oracle must hold after it.
    pub fn round(&mut self, what: &str) -> Value {
        self.rounds += 1;
        let dir = self.root.path().join(format!("round-{}", self.rounds));
        let extra: Vec<&str> = self.extra.iter().map(|s| s.as_str()).collect();
        let v = pre_dump(self.pid, &dir, self.prev.as_deref(), &extra);
        if let Some(b) = &self.expect_backend {
            assert_eq!(
                v["backend"].as_str(),
                Some(b.as_str()),
                "round {} backend: {v}",
                self.rounds
            );
        }
        assert_oracle(
            self.pid,
            &dir,
            &format!(
                "round {} (after: {what}; flags {:?}); tern said {v}",
                self.rounds, self.extra
            ),
        );
        self.prev = Some(dir);
        v
    }

    pub fn dir(&self) -> &Path {
        self.prev.as_deref().expect("no round yet")
    }
}

/// Pages a workload's own command handling may dirty (stack, heap, stdio,
/// libc data) on top of what a command asked for.
pub const NOISE_PAGES: u64 = 64;

/// `pages_written` of an incremental round: at least `dirtied`, at most
/// `dirtied + NOISE_PAGES`.
pub fn assert_incremental(v: &Value, dirtied: u64, when: &str) {
    let w = v["pages_written"].as_u64().unwrap();
    assert!(
        w >= dirtied && w <= dirtied + NOISE_PAGES,
        "{when}: pages_written {w}, expected {dirtied}..={} (the dirtied pages plus a little noise): {v}",
        dirtied + NOISE_PAGES
    );
}

/// Fail unless transparent huge pages are off for the workload's memory
/// (`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` or `never`;
/// the workload never asks for them). Soft-dirty is one bit per page table
/// entry, and a huge page's entry is the PMD: one write marks its 512 pages,
/// which page-exact expectations (`what`) cannot allow for.
pub fn assert_thp_not_always(what: &str) {
    let path = "/sys/kernel/mm/transparent_hugepage/enabled";
    // A kernel without THP has no such file: nothing to turn off.
    let Ok(mode) = std::fs::read_to_string(path) else {
        return;
    };
    assert!(
        !mode.contains("[always]"),
        "{path} is {:?}: a write to a transparent huge page makes all 512 of its pages soft-dirty, \
         and {what} is checked page by page; echo madvise > {path} (the x86-softdirty VM lane does)",
        mode.trim()
    );
}

/// A `python3` program for the ck protocol (`--out`): a large dict, a
/// thread ticking, and a counter it keeps rewriting in `count` beside its
/// result file; on SIGTERM it checks the dict and that the thread still
/// ticks, and says PASS or FAIL.
pub const PYTHON_COUNTER: &str = r#"
import os, signal, sys, threading, time
out = sys.argv[sys.argv.index('--out') + 1]
here = os.path.dirname(out)
N = 300000
d = {i: str(i) * 3 for i in range(N)}
ticks = [0]
def worker():
    while True:
        ticks[0] += 1
        d[-1] = ticks[0]
        time.sleep(0.001)
threading.Thread(target=worker, daemon=True).start()
def on_term(sig, frame):
    ok = all(d[i] == str(i) * 3 for i in range(N))
    t0 = ticks[0]
    time.sleep(0.3)
    ok = ok and ticks[0] > t0
    with open(out, 'a') as f:
        f.write('PASS\n' if ok else 'FAIL dict or thread\n')
    os._exit(0 if ok else 1)
signal.signal(signal.SIGTERM, on_term)
with open(out, 'a') as f:
    f.write('ready %d\n' % os.getpid())
n = 0
while True:
    n += 1
    with open(os.path.join(here, 'count.tmp'), 'w') as f:
        f.write(str(n))
    os.rename(os.path.join(here, 'count.tmp'), os.path.join(here, 'count'))
    time.sleep(0.01)
"#;
