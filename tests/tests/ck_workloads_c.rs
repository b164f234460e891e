//! The self-checking workloads `ck_sched` (each thread's policy, nice,
//! CPU affinity, I/O priority; the process's OOM score adjustment and core
//! dump filter), `ck_vma` (VMA ranges and flags: madvise
//! state, locking, sealing, MAP_DROPPABLE, MAP_GROWSDOWN, a shared file
//! mapping that may become writable, separate adjacent VMAs; with
//! `--prctl` the THP-disable and memory-merge process flags) and `ck_ofd`
//! (open file descriptions: shared and separate descriptions, their flags
//! and offsets, pipe and FIFO contents) and `ck_events` (eventfd counters,
//! epoll interest lists and readiness, timerfds, a signalfd, POSIX
//! timers) and `ck_unix` (socketpairs with data queued both ways,
//! shutdown, a dup) and `ck_inet` (TCP listeners, a bound UDP socket, an
//! unbound TCP socket) and `ck_unlinked` (memfds with seals and shared
//! and private mappings, files deleted while open or mapped) judge
//! themselves right: left alone
//! (and frozen for a while with SIGSTOP, as a dump freezes them) they say
//! PASS; with `--break` they damage their own state right after `ready`,
//! the way a broken restore would, and say FAIL naming what differed.

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
fn vma_passes() {
    passes("vma", &[]);
}

#[test]
fn vma_break_fails() {
    // MADV_DODUMP on `dd`: the region check and the smaps comparison fail.
    fails_when_broken(
        "vma",
        &[],
        &[
            "(region dd): VmFlags found",
            "region dd (",
            "expected to contain \"dd\"",
        ],
    );
}

#[test]
fn vma_prctl_passes() {
    passes("vma", &["--prctl"]);
}

#[test]
fn vma_prctl_break_fails() {
    fails_when_broken(
        "vma",
        &["--prctl"],
        &["(region dd): VmFlags found", "expected to contain \"dd\""],
    );
}

#[test]
fn ofd_passes() {
    passes("ofd", &[]);
}

#[test]
fn ofd_break_fails() {
    // O_NONBLOCK set on R (0x800 on x86_64).
    fails_when_broken(
        "ofd",
        &[],
        &["fd R (pipe read end)", "F_GETFL found 0x800, expected 0x0"],
    );
}

#[test]
fn sched_passes() {
    passes("sched", &[]);
}

#[test]
fn sched_break_fails() {
    // cks-batch back at nice 0: its thread line names both values.
    fails_when_broken("sched", &[], &["thread cks-batch", "nice 9", "nice 0 "]);
}

#[test]
fn events_passes() {
    passes("events", &[]);
}

#[test]
fn events_break_fails() {
    // A's counter read, P out of E's interest list, TL disarmed.
    fails_when_broken(
        "events",
        &[],
        &[
            "eventfd A: read",
            "epoll E: ready",
            "timerfd TL",
            "/proc/self/timers",
        ],
    );
}

#[test]
fn unix_passes() {
    passes("unix", &[]);
}

#[test]
fn unix_break_fails() {
    // S2's first datagram read, L1's socket file removed.
    fails_when_broken("unix", &[], &["S2 B (datagrams from A)", "L1's file"]);
}

#[test]
fn inet_passes() {
    passes("inet", &[]);
}

#[test]
fn inet_break_fails() {
    // L4 replaced by a listener on another port.
    fails_when_broken("inet", &[], &["L4 (fd"]);
}

#[test]
fn unlinked_passes() {
    passes("unlinked", &[]);
}

#[test]
fn unlinked_break_fails() {
    // A byte of M2's shared mapping changes.
    fails_when_broken("unlinked", &[], &["M2 mapping: byte 77"]);
}
