//! The harness side of lazy restores (`tern restore --lazy-pages`): start
//! one detached, talk to the `ck_lazy` workload, find the page service,
//! resume it, and check that a finished fill left nothing of tern behind.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ck::CkProcess;
use crate::{proc, tern};

/// `tern restore -D DIR --lazy-pages --detach --json FILL...` (must succeed,
/// bringing back `pid`); its JSON, which names the page service.
pub fn restore_detached(dir: &Path, pid: i32, fill: &[&str]) -> Value {
    let mut args: Vec<String> = vec![
        "restore".into(),
        "-D".into(),
        dir.display().to_string(),
        "--lazy-pages".into(),
        "--detach".into(),
        "--json".into(),
    ];
    args.extend(fill.iter().map(|s| s.to_string()));
    let run = tern(&args);
    let v = run.json();
    assert_eq!(
        v["pid"].as_i64(),
        Some(i64::from(pid)),
        "{}",
        run.describe()
    );
    assert!(
        v["lazy_service"]["pid"].as_i64().is_some_and(|p| p > 0),
        "no lazy_service.pid: {}",
        run.describe()
    );
    v
}

/// The page service's PID from a `restore_detached` JSON.
pub fn service_pid(v: &Value) -> i32 {
    i32::try_from(v["lazy_service"]["pid"].as_i64().expect("lazy_service.pid")).unwrap()
}

/// Make this test process a child subreaper: the restored processes and
/// the page services that `tern restore --detach` leaves become our
/// orphans, and we reap them at once (PID 1 here reaps every ~2 s, and the
/// next restore needs the PID free).
pub fn become_subreaper() {
    // SAFETY: prctl on this process only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        rc,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
}

/// SIGKILL the page service `service` (our orphan) and reap it. Returns
/// whether it was still serving (killed by our signal) rather than already
/// finished (its exit status, from the fill's end).
pub fn kill_service(service: i32, timeout: Duration) -> Result<bool, String> {
    // SAFETY: kill(2) of the service we started (our orphan: its PID cannot
    // be reused until we reap it).
    unsafe { libc::kill(service, libc::SIGKILL) };
    let end = Instant::now() + timeout;
    loop {
        let mut st = 0;
        // SAFETY: waitpid on our orphan.
        let r = unsafe { libc::waitpid(service, &mut st, libc::__WALL | libc::WNOHANG) };
        if r == service {
            if libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL {
                return Ok(true);
            }
            if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
                return Ok(false);
            }
            return Err(format!(
                "the page service (PID {service}) ended with status {st:#x} before it was killed"
            ));
        }
        if r < 0 {
            return Err(format!(
                "waitpid of the page service (PID {service}): {} (not our orphan: make the test a subreaper)",
                std::io::Error::last_os_error()
            ));
        }
        if Instant::now() > end {
            return Err(format!(
                "the page service (PID {service}) did not die within {timeout:?} of SIGKILL"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Wait (at most `timeout`) for the orphan `pid` to end; its wait status.
pub fn reap(pid: i32, timeout: Duration) -> Result<i32, String> {
    let end = Instant::now() + timeout;
    loop {
        let mut st = 0;
        // SAFETY: waitpid on our orphan.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::__WALL | libc::WNOHANG) };
        if r == pid {
            return Ok(st);
        }
        if r < 0 {
            return Err(format!(
                "waitpid({pid}): {} (not our orphan?)",
                std::io::Error::last_os_error()
            ));
        }
        if Instant::now() > end {
            return Err(format!("PID {pid} still runs after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// DIR/lazy-stats.json, once the detached service has written it (at most
/// `timeout`).
pub fn wait_stats(dir: &Path, timeout: Duration) -> Result<Value, String> {
    let p = dir.join("lazy-stats.json");
    let end = Instant::now() + timeout;
    loop {
        if let Ok(b) = std::fs::read(&p)
            && let Ok(v) = serde_json::from_slice::<Value>(&b)
        {
            return Ok(v);
        }
        if Instant::now() > end {
            return Err(format!(
                "{} not written within {timeout:?}; log: {}",
                p.display(),
                std::fs::read_to_string(dir.join("lazy-pages.log")).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// After a fill: the process holds no userfaultfd (fd links in
/// /proc/PID/fd) and no VMA is still registered with one (`um`, `uw`, `ui`
/// in the VmFlags of /proc/PID/smaps): it is as an eager restore leaves it.
pub fn assert_fill_left_nothing(pid: i32, when: &str) {
    let fds = proc::fds(pid).unwrap_or_else(|e| panic!("{when}: {e}"));
    let uffds: Vec<String> = fds
        .iter()
        .filter(|(_, l)| l.as_str() == proc::UFFD_LINK)
        .map(|(fd, l)| format!("fd {fd} -> {l}"))
        .collect();
    assert!(
        uffds.is_empty(),
        "{when}: PID {pid} still holds a userfaultfd after its fill: {uffds:?}"
    );
    let reg = proc::uffd_registered_vmas(pid).unwrap_or_else(|e| panic!("{when}: {e}"));
    assert!(
        reg.is_empty(),
        "{when}: PID {pid} still has VMAs registered with userfaultfd after its fill:\n  {}",
        reg.join("\n  ")
    );
}

/// Of the `pages` pages at `addr` in `pid`, how many are not in memory
/// (neither present nor swapped, from /proc/PID/pagemap: read from outside,
/// it faults nothing in).
pub fn missing_pages(pid: i32, addr: u64, pages: u64) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
    let mut b = vec![0u8; usize::try_from(pages).unwrap() * 8];
    f.read_exact_at(&mut b, addr / 4096 * 8)
        .map_err(|e| format!("/proc/{pid}/pagemap at {addr:#x}: {e}"))?;
    Ok(b.chunks_exact(8)
        .filter(|w| u64::from_le_bytes((*w).try_into().unwrap()) & (3 << 62) == 0)
        .count() as u64)
}

/// Start `ck_lazy` with `--cmd {dir}/cmd` and `args`.
pub fn start_ck_lazy(args: &[&str]) -> CkProcess {
    let mut a = vec!["--cmd", "{dir}/cmd"];
    a.extend_from_slice(args);
    CkProcess::start("lazy", &a, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

/// Send `cmd` to a `ck_lazy` (ours or restored) through its command FIFO;
/// the text of its reply (`PASS ...` or `FAIL ...`), at most `timeout`.
pub fn ck_cmd(ck: &CkProcess, cmd: &str, timeout: Duration) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    static SEQ: AtomicU64 = AtomicU64::new(1);
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    let fifo = ck.dir.path().join("cmd");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .map_err(|e| format!("{}: {e} (is ck_lazy {} alive?)", fifo.display(), ck.pid))?;
    writeln!(f, "{seq} {cmd}").map_err(|e| format!("{}: {e}", fifo.display()))?;
    let prefix = format!("reply {seq} ");
    let end = Instant::now() + timeout;
    loop {
        if let Some(l) = ck.lines().iter().find_map(|l| l.strip_prefix(&prefix)) {
            return Ok(l.to_string());
        }
        if Instant::now() > end {
            return Err(format!(
                "ck_lazy {} gave no reply to {cmd:?} within {timeout:?} (state {:?}); result file: {:?}",
                ck.pid,
                proc::state(ck.pid),
                ck.lines()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The `READ-FAIL` lines of a `ck_lazy`: pages its readers found wrong.
pub fn read_fails(ck: &CkProcess) -> Vec<String> {
    ck.lines()
        .into_iter()
        .filter(|l| l.starts_with("READ-FAIL") || l.starts_with("child FAIL"))
        .collect()
}

/// Kills (SIGKILL) and reaps the listed orphans when dropped: a failing
/// test leaves no restored process waiting on its pages, nor its service.
pub struct KillOnDrop(pub Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let mut st = 0;
            // SAFETY: waitpid without blocking: 0 only for a child or
            // orphan of ours still running (one already reaped gives
            // ECHILD, and its PID may belong to someone else by now).
            let r = unsafe { libc::waitpid(pid, &mut st, libc::__WALL | libc::WNOHANG) };
            if r == 0 {
                // SAFETY: kill(2) of our unreaped orphan.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = reap(pid, Duration::from_secs(5));
            }
        }
    }
}
