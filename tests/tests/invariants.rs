//! Invariants 1, 4 and 5 (README) on real processes: tern SIGKILLed at
//! random moments of a pre-dump or a track leaves the target running
//! correctly and untraced, with only the documented state (one scratch page,
//! one userfaultfd fd) left, which the next tern reuses and `tern untrack`
//! removes; a target that exits mid pre-dump and bad input give clear errors.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tern_tests::pattern::Rng;
use tern_tests::*;

const KILL_ITERATIONS: usize = 40;

fn kill_loop(what: &str) {
    let mut w = Workload::selfcheck(16);
    let pid = w.pid();
    w.self_check("at start");
    let baseline = proc::Snapshot::take(pid).unwrap();
    let d = tempdir();
    let mut rng = Rng::from_time();
    let seed = rng.next_u64();
    let mut rng = Rng::new(seed);
    let mut prev_ok: Option<PathBuf> = None;
    let mut finished = 0;
    let mut left_state = 0;
    // How long one whole run takes, to spread some kills over all of it.
    let whole = {
        let t = Instant::now();
        let run = match what {
            "pre-dump" => pre_dump_run(pid, &d.path().join("whole"), None, &[]),
            _ => tern(&[
                "track",
                "-t",
                &pid.to_string(),
                "--interval-ms",
                "5",
                "--rounds",
                "3",
                "--json",
            ]),
        };
        assert!(run.ok(), "an uninterrupted run failed:\n{}", run.describe());
        if what == "pre-dump" {
            prev_ok = Some(d.path().join("whole"));
        }
        t.elapsed()
    };
    let t0 = Instant::now();
    for i in 0..KILL_ITERATIONS {
        // Mostly 0-50 ms (in microseconds, so that short delays vary too);
        // every fourth kill anywhere in a whole run.
        // (at most 3 s: a loaded machine makes whole runs slow.)
        let span = if i % 4 == 3 {
            whole.as_micros().clamp(50_000, 3_000_000) as u64
        } else {
            50_000
        };
        let delay = Duration::from_micros(rng.below(span + 1));
        let dir = d.path().join(format!("{i}"));
        let mut args: Vec<String> = match what {
            "pre-dump" => vec![
                "pre-dump".into(),
                "-t".into(),
                pid.to_string(),
                "-D".into(),
                dir.display().to_string(),
            ],
            _ => vec![
                "track".into(),
                "-t".into(),
                pid.to_string(),
                "--interval-ms".into(),
                "5".into(),
                "--rounds".into(),
                "100000".into(),
            ],
        };
        if let Some(p) = &prev_ok {
            args.push("--prev-images-dir".into());
            args.push(p.display().to_string());
        }
        args.push("--json".into());
        let mut child = spawn_tern(&args);
        std::thread::sleep(delay);
        let _ = child.kill();
        let st = child.wait().unwrap();
        let ctx = format!(
            "iteration {i} (seed {seed:#x}): tern {what} SIGKILLed after {delay:?} (status {st})"
        );
        if st.success() {
            finished += 1;
            if what == "pre-dump" {
                prev_ok = Some(dir);
            }
        }
        assert_running_untraced(pid, &ctx);
        let now = proc::Snapshot::take(pid).unwrap();
        if now != baseline {
            left_state += 1;
        }
        let diff = proc::Snapshot::diff(&baseline, &now, true);
        assert!(
            diff.is_empty(),
            "{ctx}: the target changed beyond the documented state:\n  {}",
            diff.join("\n  ")
        );
        if i % 8 == 7 {
            w.self_check(&ctx);
        }
    }
    eprintln!(
        "{what}: {KILL_ITERATIONS} kills in {:?}; a whole run takes {whole:?}; {finished} runs finished before the kill, \
         {left_state} times tracking state was present after the kill; seed {seed:#x}",
        t0.elapsed()
    );
    w.self_check("after all kills");
    // The next tern works on the same target...
    let fin = d.path().join("final");
    let run = pre_dump_run(pid, &fin, None, &[]);
    assert!(
        run.ok(),
        "a pre-dump after the kills failed:\n{}",
        run.describe()
    );
    let diff = proc::Snapshot::diff(&baseline, &proc::Snapshot::take(pid).unwrap(), true);
    assert!(
        diff.is_empty(),
        "after the final pre-dump:\n  {}",
        diff.join("\n  ")
    );
    // ...and untrack restores the target exactly.
    assert_untracked_exactly(pid, &baseline, "after the kills");
    w.self_check("at the end");
    w.terminate_and_check();
}

#[test]
fn kill_during_pre_dump() {
    kill_loop("pre-dump");
}

#[test]
fn kill_during_track() {
    kill_loop("track");
}

#[test]
fn target_exits_mid_pre_dump() {
    // Big enough that copying takes far longer than the delays below.
    for (i, delay_ms) in [0u64, 5, 30, 120, 400, 1000].into_iter().enumerate() {
        let mut w = Workload::start();
        w.cmd("alloc big 32768 rand"); // 128 MiB, incompressible
        let pid = w.pid();
        let d = tempdir();
        let dir = d.path().join("img");
        w.cmd(&format!("exit_after {delay_ms}"));
        let t = Instant::now();
        let run = pre_dump_run(pid, &dir, None, &[]);
        let st = w.wait_exit(Duration::from_secs(10));
        assert!(st.is_some(), "the target did not exit");
        // (with 100 ms of slack: the workload's exit thread may oversleep
        // on a loaded machine, and tern finishing first is then right)
        if run.ok() && run.elapsed < Duration::from_millis(delay_ms + 100) {
            // tern was done before the target went: a success is right.
            eprintln!(
                "exit after {delay_ms} ms: tern finished first, in {:?}",
                run.elapsed
            );
            continue;
        }
        if run.ok() {
            panic!(
                "case {i}: target exited {delay_ms} ms into a pre-dump that took {:?}, yet tern reported success:\n{}",
                t.elapsed(),
                run.describe()
            );
        }
        run.assert_clear_failure(&[&pid.to_string()]);
        eprintln!("exit after {delay_ms} ms: {}", run.stderr.trim());
        assert!(
            restorer::ImageChain::open(&dir).is_err(),
            "case {i}: a failed pre-dump left what reads as a complete image in {}",
            dir.display()
        );
    }
}

/// The target is untouched by a refused invocation.
fn refused_without_trace(pid: i32, baseline: &proc::Snapshot, run: &TernRun, names: &[&str]) {
    run.assert_clear_failure(names);
    assert_exactly_as(
        pid,
        baseline,
        &format!("after a refused `tern {}`", run.args.join(" ")),
    );
}

#[test]
fn missing_pid() {
    let pid = proc::unused_pid();
    let d = tempdir();
    let dir = d.path().join("img");
    let run = pre_dump_run(pid, &dir, None, &[]);
    run.assert_clear_failure(&[&pid.to_string()]);
    assert!(
        !dir.join(images::INVENTORY_FILE).exists(),
        "an image was written for a missing pid"
    );
    for args in [
        vec![
            "track".to_string(),
            "-t".into(),
            pid.to_string(),
            "--rounds".into(),
            "1".into(),
        ],
        vec!["untrack".to_string(), "-t".into(), pid.to_string()],
    ] {
        let run = tern(&args);
        run.assert_clear_failure(&[&pid.to_string()]);
    }
}

#[test]
fn images_dir_under_a_regular_file() {
    let mut w = Workload::start();
    w.cmd("alloc a 16 rand");
    let baseline = proc::Snapshot::take(w.pid()).unwrap();
    let d = tempdir();
    let file = d.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let dir = file.join("img");
    let run = pre_dump_run(w.pid(), &dir, None, &[]);
    refused_without_trace(w.pid(), &baseline, &run, &[&file.display().to_string()]);
    // The directory itself being a file.
    let run = pre_dump_run(w.pid(), &file, None, &[]);
    refused_without_trace(w.pid(), &baseline, &run, &[&file.display().to_string()]);
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn images_dir_on_a_read_only_mount() {
    let mut w = Workload::start();
    w.cmd("alloc a 16 rand");
    let baseline = proc::Snapshot::take(w.pid()).unwrap();
    let d = tempdir();
    let mnt = d.path().join("ro");
    std::fs::create_dir(&mnt).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tern-test-ro"])
        .arg(&mnt)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "cannot mount a read-only tmpfs for this test (it needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _m = Mount(mnt.clone());
    for dir in [mnt.join("img"), mnt.clone()] {
        let run = pre_dump_run(w.pid(), &dir, None, &[]);
        refused_without_trace(w.pid(), &baseline, &run, &[&mnt.display().to_string()]);
    }
}

fn prev_cases(root: &Path) -> Vec<(String, PathBuf)> {
    let empty = root.join("empty-dir");
    std::fs::create_dir(&empty).unwrap();
    let file = root.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let garbage = root.join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    std::fs::write(garbage.join(images::INVENTORY_FILE), "{ not json").unwrap();
    let half = root.join("no-inventory");
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join(images::PAGES_FILE), [0u8; 4096]).unwrap();
    vec![
        ("an empty directory".into(), empty),
        ("a missing path".into(), root.join("does-not-exist")),
        ("a regular file".into(), file),
        ("a corrupt inventory".into(), garbage),
        ("a directory without inventory".into(), half),
    ]
}

#[test]
fn prev_images_dir_that_is_not_an_image() {
    let mut w = Workload::start();
    w.cmd("alloc a 16 rand");
    let pid = w.pid();
    let baseline = proc::Snapshot::take(pid).unwrap();
    let d = tempdir();
    for (what, prev) in prev_cases(d.path()) {
        let dir = d.path().join(format!("img-{}", what.replace(' ', "-")));
        let run = pre_dump_run(pid, &dir, Some(&prev), &[]);
        refused_without_trace(pid, &baseline, &run, &[&prev.display().to_string()]);
        assert!(
            !dir.join(images::INVENTORY_FILE).exists(),
            "--prev-images-dir {what}: an image was written anyway"
        );
    }
    // `tern show` on the same: clear errors too.
    for (_, p) in prev_cases(&d.path().join("show").tap_mkdir()) {
        let run = tern(&["show", &p.display().to_string()]);
        run.assert_clear_failure(&[&p.display().to_string()]);
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn soft_dirty_requested_here_is_refused() {
    let mut w = Workload::start();
    w.cmd("alloc a 16 rand");
    let baseline = proc::Snapshot::take(w.pid()).unwrap();
    let d = tempdir();
    let run = pre_dump_run(
        w.pid(),
        &d.path().join("img"),
        None,
        &["--track", "soft-dirty"],
    );
    refused_without_trace(w.pid(), &baseline, &run, &["soft-dirty"]);
}

#[test]
fn existing_image_is_not_overwritten() {
    let mut w = Workload::start();
    w.cmd("alloc a 16 rand");
    let d = tempdir();
    let dir = d.path().join("img");
    pre_dump(w.pid(), &dir, None, &[]);
    let id = images::Inventory::load(&dir).unwrap().id;
    let run = pre_dump_run(w.pid(), &dir, None, &[]);
    run.assert_clear_failure(&[&dir.display().to_string()]);
    assert_eq!(
        images::Inventory::load(&dir).unwrap().id,
        id,
        "the image was replaced"
    );
    untrack(w.pid());
}
