//! The self-checking workloads `ck_memory`, `ck_threads`, `ck_signals` and
//! `ck_fpu` (tests/src/bin) judge themselves right: left alone (and frozen
//! for a while with SIGSTOP, as a dump freezes them) they say PASS; with
//! `--break` they damage their own state right after `ready`, the way a
//! broken restore would, and say FAIL naming what differed. So a PASS after
//! a restore means something.

use std::time::Duration;

use tern_tests::ck::CkProcess;

const START: Duration = Duration::from_secs(15);
const VERDICT: Duration = Duration::from_secs(15);

fn start(name: &str, args: &[&str]) -> CkProcess {
    CkProcess::start(name, args, START).unwrap_or_else(|e| panic!("{e}"))
}

fn verdict(p: &mut CkProcess) -> String {
    p.verdict(VERDICT)
        .unwrap_or_else(|e| panic!("ck_{}: {e}", p.name))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) to our own child.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Run ~300 ms, frozen (SIGSTOP) for 400 ms in the middle; the verdict must
/// be PASS.
fn passes(name: &str, args: &[&str]) {
    let mut p = start(name, args);
    std::thread::sleep(Duration::from_millis(150));
    signal(p.pid, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(400));
    signal(p.pid, libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(150));
    let v = verdict(&mut p);
    assert_eq!(v, "PASS", "ck_{name} {args:?}; stderr: {}", p.stderr());
}

/// With `--break` the verdict is a FAIL line containing every `must` text.
fn fails_when_broken(name: &str, args: &[&str], must: &[&str]) {
    let mut a = args.to_vec();
    a.push("--break");
    let mut p = start(name, &a);
    std::thread::sleep(Duration::from_millis(300));
    let v = verdict(&mut p);
    assert!(v.starts_with("FAIL "), "ck_{name} {a:?}: {v}");
    for m in must {
        assert!(
            v.contains(m),
            "ck_{name} {a:?}: the verdict does not name {m:?}: {v}"
        );
    }
}

#[test]
fn memory_passes() {
    passes("memory", &["--mib", "8"]);
}

#[test]
fn memory_break_fails() {
    // A byte of big page 3 flipped without a new checksum (word 100 = byte
    // 800, whose lowest bit flipped).
    fails_when_broken(
        "memory",
        &["--mib", "8"],
        &["big page 3 generation 0: checksum found", "word 100 found"],
    );
}

#[test]
fn threads_passes() {
    passes("threads", &[]);
}

#[test]
fn threads_break_fails() {
    fails_when_broken(
        "threads",
        &[],
        &[
            "thread ckt-3-nap",
            "comm is \"broken\", expected \"ckt-3-nap\"",
        ],
    );
}

#[test]
fn signals_passes() {
    passes("signals", &[]);
}

#[test]
fn signals_break_fails() {
    // SA_NODEFER lost: the read-back differs and the handler runs with its
    // own signal blocked.
    fails_when_broken(
        "signals",
        &[],
        &[
            "SIGWINCH: disposition handler",
            "flags 0x80000000 mask {}, installed handler",
            "SIGWINCH's handler ran with SIGWINCH blocked",
        ],
    );
}

#[test]
fn fpu_passes() {
    passes("fpu", &[]);
}

#[test]
fn fpu_break_fails() {
    fails_when_broken(
        "fpu",
        &[],
        &["in the loop thread ymm3 differed from what the loop put there"],
    );
}
