//! The self-checking workloads `ck_seccomp`, `ck_rseq`, `ck_vdso` and
//! `ck_files` (tests/src/bin) judge themselves right: left alone (and
//! frozen for a while with SIGSTOP, as a dump freezes them) they say PASS;
//! with `--break` they damage their own state after `ready` the way a broken
//! restore would, and say FAIL naming what differed.

use std::time::Duration;
use tern_tests::ck::CkProcess;

const START: Duration = Duration::from_secs(10);
const VERDICT: Duration = Duration::from_secs(10);

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

/// Run ~300 ms, frozen (SIGSTOP) for 400 ms of it; the verdict must be PASS.
fn passes(name: &str) {
    let mut p = start(name, &[]);
    std::thread::sleep(Duration::from_millis(150));
    signal(p.pid, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(400));
    signal(p.pid, libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(150));
    let v = verdict(&mut p);
    assert_eq!(v, "PASS", "ck_{name}; stderr: {}", p.stderr());
}

/// With `--break` the verdict is a FAIL line containing every `must` text.
fn fails_when_broken(name: &str, must: &[&str]) -> String {
    let mut p = start(name, &["--break"]);
    std::thread::sleep(Duration::from_millis(300));
    let v = verdict(&mut p);
    assert!(v.starts_with("FAIL "), "ck_{name} --break: {v}");
    for m in must {
        assert!(
            v.contains(m),
            "ck_{name} --break: the verdict does not name {m:?}: {v}"
        );
    }
    v
}

#[test]
fn seccomp_passes() {
    passes("seccomp");
}

#[test]
fn seccomp_break_fails() {
    // Thread A got one filter more: its count and uname() differ.
    fails_when_broken(
        "seccomp",
        &[
            "A (tid",
            "\"Seccomp_filters: 3\", expected \"Seccomp_filters: 2\"",
            "uname() gave EACCES, expected success",
        ],
    );
}

#[test]
fn rseq_passes() {
    passes("rseq");
}

#[test]
fn rseq_break_fails() {
    // Thread w1 lost its registration.
    fails_when_broken(
        "rseq",
        &[
            "w1 (tid",
            "cpu_id -1",
            "was not registered (registering it again succeeded)",
        ],
    );
}

#[test]
fn vdso_passes() {
    passes("vdso");
}

#[test]
fn vdso_break_fails() {
    let cs =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    if cs.trim() == "tsc" {
        fails_when_broken(
            "vdso",
            &["[vvar_vclock] in /proc/self/maps: missing, was 0x"],
        );
    } else {
        fails_when_broken("vdso", &["[vdso] in /proc/self/maps: 0x"]);
    }
}

#[test]
fn files_passes() {
    passes("files");
}

#[test]
fn files_break_fails() {
    fails_when_broken("files", &["/data): offset 0, was 12345"]);
}
