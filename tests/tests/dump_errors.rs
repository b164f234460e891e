//! Never lose the process, and bad input changes nothing (README,
//! Invariants, 1 and 5) for `tern dump` and `tern restore`:
//! - `dump --leave-running` leaves the target exactly as before;
//! - tern SIGKILLed at any moment of a dump (at set delays, and at random
//!   moments of its frozen window) leaves it running, untraced, with its
//!   maps and fds as before, unless the dump had already completed (then
//!   its image is whole);
//! - a missing PID, a taken PID, a truncated or corrupted image, an unknown
//!   version and a missing parent give a clear error naming the file or PID,
//!   and no process is created.

use std::path::Path;
use std::time::Duration;

use tern_tests::ck::CkProcess;
use tern_tests::{
    assert_exactly_as, assert_running_untraced, copy_dir, dump_args, pre_dump, proc, spawn_tern,
    tempdir, tern, wait_deadline,
};

const READY: Duration = Duration::from_secs(30);

#[test]
fn leave_running_leaves_the_target_as_it_was() {
    let mut ck = CkProcess::start("files", &[], READY).unwrap();
    let before = proc::Snapshot::take(ck.pid).unwrap();
    let root = tempdir();
    let d1 = root.path().join("p1");
    pre_dump(ck.pid, &d1, None, &[]);
    let d = root.path().join("dump");
    let mut a = dump_args(
        ck.pid,
        &d,
        &["--leave-running", "--verify", "--prev-images-dir"],
    );
    a.push(d1.display().to_string());
    let v = tern(&a).json();
    assert_eq!(v["killed"].as_bool(), Some(false), "{v}");
    assert_eq!(v["verify"]["mismatches"].as_u64(), Some(0), "{v}");
    assert_exactly_as(ck.pid, &before, "after dump --leave-running");
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
}

/// Run `tern` with `args` (a dump of `pid` into `dir`), SIGKILL it after
/// `delay_ms` and let its guardian finish. False if the target is gone,
/// which is only acceptable when the dump had completed as the kill landed:
/// then the image in `dir` is whole (the target is never killed before).
fn target_survives_tern_killed(pid: i32, args: &[String], dir: &Path, delay_ms: u64) -> bool {
    let mut t = spawn_tern(args);
    std::thread::sleep(Duration::from_millis(delay_ms));
    let _ = t.kill();
    let _ = t.wait();
    // The guardian finishes on its own (it checks tern is alive before the
    // kill): wait for it to let go.
    std::thread::sleep(Duration::from_millis(300));
    if proc::alive(pid) {
        return true;
    }
    let img = images::Image::open(dir).unwrap_or_else(|e| {
        panic!("target gone after tern was killed {delay_ms} ms into a dump, and no complete image: {e}")
    });
    assert!(
        img.process.is_some(),
        "target gone, image is not a final dump"
    );
    eprintln!("tern killed {delay_ms} ms in: the dump had already completed");
    false
}

#[test]
fn tern_killed_mid_dump_leaves_the_target_running() {
    let mut ck = CkProcess::start("seccomp", &[], READY).unwrap();
    let before = proc::Snapshot::take(ck.pid).unwrap();
    let root = tempdir();
    for (i, delay_ms) in [0u64, 2, 5, 10, 20, 40].into_iter().enumerate() {
        let d = root.path().join(format!("d{i}"));
        if !target_survives_tern_killed(ck.pid, &dump_args(ck.pid, &d, &[]), &d, delay_ms) {
            ck.release();
            return;
        }
        assert_exactly_as(
            ck.pid,
            &before,
            &format!("tern killed {delay_ms} ms into a dump"),
        );
    }
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
}

/// tern SIGKILLed at random moments of the frozen window (from the moment
/// its log says the target is frozen to the window's length, learned from a
/// whole dump of the same process): the target is as it was, unless the
/// dump had completed (then its image is whole).
#[test]
fn tern_killed_at_random_moments_of_the_frozen_window_leaves_the_target_as_it_was() {
    use std::io::BufRead;
    let mut ck = CkProcess::start("memory", &["--mib", "48"], READY).unwrap();
    let pid = ck.pid;
    let root = tempdir();
    let whole = root.path().join("whole");
    let v = tern(&dump_args(pid, &whole, &["--leave-running"])).json();
    let window = Duration::from_secs_f64(v["frozen_ms"].as_f64().expect("frozen_ms") / 1e3);
    let window_us = u64::try_from(window.as_micros()).unwrap();
    assert!(window_us > 0, "{v}");
    let before = proc::Snapshot::take(pid).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n.max(1)
    };
    for i in 0..12 {
        let d = root.path().join(format!("d{i}"));
        let mut t = std::process::Command::new(tern_tests::tern_bin())
            .args(dump_args(pid, &d, &[]))
            .env("RUST_LOG", "tracker=debug")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The log line that follows the freeze of every thread.
        let mut err = std::io::BufReader::new(t.stderr.take().unwrap());
        let mut log = String::new();
        let mut line = String::new();
        while err.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("dump: frozen at") {
            log.push_str(&line);
            line.clear();
        }
        assert!(
            line.contains("dump: frozen at"),
            "round {i}: tern never said the target was frozen:\n{log}"
        );
        // Up to 10% past the window (the kill may land after the end).
        let delay = Duration::from_micros(rnd(window_us * 11 / 10));
        std::thread::sleep(delay);
        let _ = t.kill();
        let _ = t.wait();
        drop(err);
        let when =
            format!("round {i}: tern SIGKILLed {delay:?} into a frozen window of ~{window_us} us");
        // Its guardian lets the target go on its own.
        std::thread::sleep(Duration::from_millis(300));
        if !proc::alive(pid) {
            let img = images::Image::open(&d)
                .unwrap_or_else(|e| panic!("{when}: target gone, and no complete image: {e}"));
            assert!(
                img.process.is_some(),
                "{when}: target gone, image is not a final dump"
            );
            eprintln!("{when}: the dump had already completed");
            ck.release();
            return;
        }
        assert_exactly_as(pid, &before, &when);
    }
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
}

/// The same during the live pre-copy of a dump that continues a pre-dump
/// (its mutator keeps writing, so the rounds take a while): the target keeps
/// what the pre-dump left in it (tracking fd, scratch page) and nothing
/// else, and the next dump of it works.
#[test]
fn tern_killed_during_the_live_pre_copy_leaves_the_target_running() {
    let mut ck = CkProcess::start("memory", &["--mib", "64"], READY).unwrap();
    let root = tempdir();
    let p1 = root.path().join("p1");
    pre_dump(ck.pid, &p1, None, &[]);
    let before = proc::Snapshot::take(ck.pid).unwrap();
    for (i, delay_ms) in [5u64, 20, 50, 100].into_iter().enumerate() {
        let d = root.path().join(format!("d{i}"));
        let mut a = dump_args(ck.pid, &d, &["--prev-images-dir"]);
        a.push(p1.display().to_string());
        if !target_survives_tern_killed(ck.pid, &a, &d, delay_ms) {
            ck.release();
            return;
        }
        // As the pre-dump left it (its tracking stays, as between pre-dumps).
        let when = format!("tern killed {delay_ms} ms into a dump with live rounds");
        assert_running_untraced(ck.pid, &when);
        let now = proc::Snapshot::take(ck.pid).unwrap();
        let diff = proc::Snapshot::diff(&before, &now, false);
        assert!(
            diff.is_empty(),
            "{when}: differs from before:\n  {}",
            diff.join("\n  ")
        );
    }
    // Tracking state interrupted mid-round: the next dump copies what it
    // must (everything the interrupted rounds may have consumed) and is whole.
    let d = root.path().join("last");
    let mut a = dump_args(
        ck.pid,
        &d,
        &["--verify", "--leave-running", "--prev-images-dir"],
    );
    a.push(p1.display().to_string());
    let v = tern(&a).json();
    assert_eq!(v["verify"]["mismatches"].as_u64(), Some(0), "{v}");
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
}

#[test]
fn dump_of_a_missing_pid_is_a_clear_error() {
    let root = tempdir();
    let run = tern(&dump_args(999_999, &root.path().join("d"), &[]));
    run.assert_clear_failure(&["999999"]);
}

/// A good image (target killed and reaped) for the restore error tests.
/// The workload's directory (its output files) lives as long as the
/// returned `CkProcess`.
fn good_image(root: &Path) -> (std::path::PathBuf, std::path::PathBuf, i32, CkProcess) {
    let mut ck = CkProcess::start("vdso", &[], READY).unwrap();
    let pid = ck.pid;
    let p1 = root.join("p1");
    pre_dump(pid, &p1, None, &[]);
    let d = root.join("dump");
    let mut a = dump_args(pid, &d, &["--prev-images-dir"]);
    a.push(p1.display().to_string());
    tern(&a).json();
    ck.release();
    (p1, d, pid, ck)
}

fn restore_fails(dir: &Path, pid: i32, mention: &[&str]) {
    let run = tern(&["restore", "-D", &dir.display().to_string(), "--json"]);
    run.assert_clear_failure(mention);
    assert!(!proc::alive(pid), "a failed restore left PID {pid} behind");
}

#[test]
fn restore_refuses_bad_images_before_anything_runs() {
    let root = tempdir();
    let (p1, d, pid, mut ck) = good_image(root.path());

    // Truncated pages of the final image.
    let t = root.path().join("trunc");
    copy_dir(&d, &t);
    let pages = t.join(images::PAGES_FILE);
    let len = std::fs::metadata(&pages).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    restore_fails(&t, pid, &["pages.img"]);

    // Corrupted process state.
    let c = root.path().join("corrupt");
    copy_dir(&d, &c);
    std::fs::write(
        c.join(images::process::PROCESS_FILE),
        b"{\"pid\": 1, \"threads\": [",
    )
    .unwrap();
    restore_fails(&c, pid, &["process.json"]);

    // A format version from the future.
    let v = root.path().join("version");
    copy_dir(&d, &v);
    let inv = v.join(images::INVENTORY_FILE);
    let text = std::fs::read_to_string(&inv).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["version"] = serde_json::json!(999);
    std::fs::write(&inv, j.to_string()).unwrap();
    restore_fails(&v, pid, &["inventory.json"]);

    // The parent is gone (the image names it by a relative path).
    let m = root.path().join("orphan");
    copy_dir(&d, &m);
    let p1_moved = root.path().join("p1-moved");
    std::fs::rename(&p1, &p1_moved).unwrap();
    restore_fails(&m, pid, &["p1"]);
    std::fs::rename(&p1_moved, &p1).unwrap();

    // A pre-dump is not a final image.
    restore_fails(&p1, pid, &["pre-dump"]);

    // And the good one still restores.
    let mut r = spawn_tern(&["restore", "-D", &d.display().to_string(), "--json"]);
    if !proc::wait_until(Duration::from_secs(30), || proc::alive(pid)) {
        let _ = r.kill();
        let out = r.wait_with_output().unwrap();
        panic!(
            "restore did not bring PID {pid} back:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
    let st = wait_deadline(&mut r, Duration::from_secs(30)).expect("tern restore did not exit");
    assert!(st.success(), "restored ck_vdso exited {st}");
}

#[test]
fn restore_over_a_taken_pid_names_it() {
    let root = tempdir();
    let mut ck = CkProcess::start("vdso", &[], READY).unwrap();
    let d = root.path().join("dump");
    tern(&dump_args(ck.pid, &d, &["--leave-running"])).json();
    // The original still runs: its PID is taken.
    let run = tern(&["restore", "-D", &d.display().to_string()]);
    run.assert_clear_failure(&[&ck.pid.to_string(), "taken"]);
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
}
