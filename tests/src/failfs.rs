//! [`FailFs`]: the `failfs` FUSE file system (src/bin/failfs.rs) mounted for
//! one test. Everything works there except fsync(2) of files and directories,
//! which always fails with EIO: a disk that cannot make data durable.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long the mount may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `failfs` may take to unmount and exit once its stdin is closed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A mounted `failfs`. Dropping it closes the server's stdin (it then
/// detaches the mount and exits), kills it after 5 s, and lazily unmounts
/// the directory if a `failfs` mount is still there.
pub struct FailFs {
    child: Child,
    stdin: Option<ChildStdin>,
    dir: PathBuf,
    stderr: mpsc::Receiver<String>,
    exited: Option<Option<ExitStatus>>,
}

impl FailFs {
    /// Mount a fresh, empty `failfs` at `dir` (created if needed), root
    /// directory mode 0755 owned by root. Mounting needs root and /dev/fuse;
    /// the error says what went wrong.
    pub fn mount(dir: &Path) -> Result<FailFs, String> {
        let bin = crate::bin_dir().join("failfs");
        if !bin.is_file() {
            return Err(format!(
                "no failfs binary at {}: build the workspace first: cargo build --workspace \
                 (cargo xtask test does)",
                bin.display()
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut child = Command::new(&bin)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = line_tx.send(line);
            }
            lines.for_each(drop);
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut s);
            let _ = err_tx.send(s);
        });
        let stdin = child.stdin.take();
        let mut fs = FailFs {
            child,
            stdin,
            dir,
            stderr: err_rx,
            exited: None,
        };
        let why = match line_rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) if line == "ready" => return Ok(fs),
            Ok(line) => format!("it printed {line:?} instead of `ready`"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                format!("not ready within {} s", READY_TIMEOUT.as_secs())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => "it exited before `ready`".into(),
        };
        let status = match fs.stop() {
            Some(st) => st.to_string(),
            None => "killed".into(),
        };
        let stderr = fs.stderr.recv_timeout(EXIT_TIMEOUT).unwrap_or_default();
        Err(format!(
            "mount failfs at {}: {why} ({status}); its stderr: {}",
            fs.dir.display(),
            stderr.trim()
        ))
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Close stdin, wait (kill past EXIT_TIMEOUT), then `umount -l` what is
    /// left. Returns the exit status (None: it had to be killed).
    fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(st) = self.exited {
            return st;
        }
        self.stdin.take();
        let st = crate::wait_deadline(&mut self.child, EXIT_TIMEOUT);
        self.exited = Some(st);
        if is_mounted(&self.dir) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        st
    }
}

impl Drop for FailFs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a `failfs` mount sits at `dir` (a canonical path), from
/// /proc/self/mountinfo.
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.as_os_str().as_encoded_bytes();
    info.lines().any(|l| {
        let Some((pre, post)) = l.split_once(" - ") else {
            return false;
        };
        let mut post = post.split(' ');
        let fuse = post.next() == Some("fuse") && post.next() == Some("failfs");
        fuse && pre.split(' ').nth(4).map(unescape).as_deref() == Some(want)
    })
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) if b[i] == b'\\' => {
                out.push(d.iter().fold(0u8, |a, c| a.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}
