//! `tern dump` + `tern restore` on self-checking workloads (`tests/src/bin/ck_*`):
//! each sets its state up, is dumped (after 0 or 3 pre-dumps), killed,
//! restored with the same PID, and then checks everything itself on
//! SIGTERM (PASS or FAIL with what differed). `tern restore` waits for the
//! process and exits with its status.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use serde_json::Value;
use tern_tests::ck::CkProcess;
use tern_tests::{num, pre_dump, spawn_tern, tempdir, tern, wait_deadline};

const READY: Duration = Duration::from_secs(30);
const VERDICT: Duration = Duration::from_secs(30);

/// `tern dump --json` (must succeed); returns its JSON.
fn dump(pid: i32, dir: &Path, prev: Option<&Path>, extra: &[&str]) -> Value {
    let mut args: Vec<String> = vec![
        "dump".into(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        dir.display().to_string(),
        "--json".into(),
    ];
    if let Some(p) = prev {
        args.push("--prev-images-dir".into());
        args.push(p.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = tern(&args);
    let v = run.json();
    for f in [
        "pid",
        "frozen_ms",
        "duration_ms",
        "pages_written",
        "bytes_written",
        "threads",
        "vmas",
    ] {
        assert!(v.get(f).is_some(), "dump JSON lacks {f}: {v}");
    }
    assert_eq!(v["pid"].as_i64(), Some(pid as i64));
    v
}

/// Start `tern restore -D DIR --json` (it waits for the process).
fn start_restore(dir: &Path) -> Child {
    spawn_tern(&["restore", "-D", &dir.display().to_string(), "--json"])
}

/// Dump `ck` after `pre_dumps` pre-dumps, restore it, and get its verdict.
fn dump_restore(name: &str, args: &[&str], pre_dumps: usize) -> (String, Value) {
    // One at a time: every workload here spins on the 2 cores, and a dump
    // waits on ptrace stops; in parallel they slowed each other past the
    // deadlines on a loaded machine.
    let _one = serial();
    let mut ck = CkProcess::start(name, args, READY).unwrap_or_else(|e| panic!("{e}"));
    let pid = ck.pid;
    let root = tempdir();
    let mut prev: Option<std::path::PathBuf> = None;
    for i in 0..pre_dumps {
        let d = root.path().join(format!("pre{i}"));
        pre_dump(pid, &d, prev.as_deref(), &[]);
        prev = Some(d);
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = root.path().join("dump");
    let v = dump(pid, &dir, prev.as_deref(), &["--verify"]);
    assert_eq!(v["verify"]["mismatches"].as_u64(), Some(0), "{v}");
    // The original is gone (killed by the dump); reap it so its PID is free.
    ck.release();
    let mut restore = start_restore(&dir);
    // The restore prints its JSON once the process runs again.
    let restored = restored_json(&mut restore);
    assert_eq!(restored["pid"].as_i64(), Some(pid as i64), "{restored}");
    let verdict = match ck.verdict(VERDICT) {
        Ok(l) => l,
        Err(e) => {
            // SAFETY: kill the restored process (it may be running).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = restore.kill();
            let out = restore.wait_with_output().ok();
            panic!(
                "ck_{name} after restore: {e}\n--- tern restore stderr:\n{}",
                out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default()
            );
        }
    };
    let status = wait_deadline(&mut restore, VERDICT)
        .expect("tern restore did not exit after the process did");
    let mut stderr = String::new();
    if let Some(mut e) = restore.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    if verdict == "PASS" {
        assert!(
            status.success(),
            "restored ck_{name} said PASS but tern restore exited {status}:\n{stderr}"
        );
    } else {
        assert!(
            !status.success(),
            "restored ck_{name} said {verdict} but tern restore exited 0"
        );
    }
    (verdict, v)
}

/// The JSON line `tern restore` prints when the process runs (at most 60 s).
fn restored_json(restore: &mut Child) -> Value {
    use std::io::BufRead;
    let out = restore.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) if !line.trim().is_empty() => serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("tern restore printed {line:?}: {e}")),
        _ => {
            let _ = restore.kill();
            let mut err = String::new();
            if let Some(mut e) = restore.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("tern restore printed no JSON:\n{err}");
        }
    }
}

fn assert_pass(name: &str, args: &[&str], pre_dumps: usize) -> Value {
    let (verdict, v) = dump_restore(name, args, pre_dumps);
    assert_eq!(
        verdict, "PASS",
        "ck_{name} after dump ({pre_dumps} pre-dumps) + restore"
    );
    v
}

#[test]
fn memory_after_three_pre_dumps() {
    let v = assert_pass("memory", &["--mib", "64"], 3);
    assert!(num(&v, "pages_written") > 0.0);
}

#[test]
fn memory_without_pre_dump() {
    assert_pass("memory", &["--mib", "16"], 0);
}

#[test]
fn threads() {
    let v = assert_pass("threads", &[], 0);
    assert_eq!(v["threads"].as_u64(), Some(9), "{v}");
}

#[test]
fn signals() {
    assert_pass("signals", &[], 0);
}

#[test]
fn fpu() {
    assert_pass("fpu", &[], 1);
}

#[test]
fn seccomp() {
    assert_pass("seccomp", &[], 0);
}

#[test]
fn rseq() {
    assert_pass("rseq", &[], 0);
}

#[test]
fn vdso() {
    assert_pass("vdso", &[], 0);
}

#[test]
fn files() {
    assert_pass("files", &[], 0);
}

/// Serialises the tests of this file (see the callers).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
