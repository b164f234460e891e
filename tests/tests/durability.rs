//! Durable when it says so (README, "Trust and permissions"): on a file
//! system whose fsync fails (`failfs`, FUSE), `tern dump` fails before the
//! freeze and the target runs on as it was; `--no-fsync` dumps there (the
//! image complete in the page cache) and restores; `pre-dump --fsync`
//! fails there; on a real disk a dump reports its `fsync_ms`.

use std::time::Duration;

use tern_tests::ck::CkProcess;
use tern_tests::failfs::FailFs;
use tern_tests::{
    assert_exactly_as, dump_args, pre_dump, pre_dump_run, proc, restore_detached, tempdir, tern,
};

const READY: Duration = Duration::from_secs(30);

#[test]
fn a_dump_onto_a_disk_that_cannot_fsync_leaves_the_target_running() {
    let root = tempdir();
    let fs = FailFs::mount(&root.path().join("mnt")).unwrap_or_else(|e| panic!("{e}"));
    let mut ck = CkProcess::start("files", &[], READY).unwrap();
    let pid = ck.pid;
    let before = proc::Snapshot::take(pid).unwrap();
    // Without a parent (stop-the-world) and after a pre-dump on a real disk
    // (its parents are synced before the freeze, the new image cannot be).
    let d = fs.path().join("dump");
    let run = tern(&dump_args(pid, &d, &[]));
    run.assert_clear_failure(&["stable storage", "nothing was frozen"]);
    assert_exactly_as(pid, &before, "after a dump that could not fsync");
    let p1 = root.path().join("p1");
    pre_dump(pid, &p1, None, &[]);
    let d = fs.path().join("dump2");
    let p1s = p1.display().to_string();
    let run = tern(&dump_args(pid, &d, &["--prev-images-dir", &p1s]));
    run.assert_clear_failure(&["stable storage"]);
    tern_tests::assert_running_untraced(pid, "after a dump that could not fsync");
    assert!(
        images::Image::open(&d).is_err(),
        "the failed dump left an image in {}",
        d.display()
    );
    // A pre-dump with --fsync there fails too.
    let run = pre_dump_run(pid, &fs.path().join("pre"), Some(&p1), &["--fsync"]);
    run.assert_clear_failure(&["Input/output error"]);
    tern_tests::untrack(pid);
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
}

#[test]
fn no_fsync_dumps_to_the_page_cache_and_fsync_is_reported() {
    let root = tempdir();
    let fs = FailFs::mount(&root.path().join("mnt")).unwrap_or_else(|e| panic!("{e}"));
    let mut ck = CkProcess::start("files", &[], READY).unwrap();
    let pid = ck.pid;
    let d = fs.path().join("dump");
    let v = tern(&dump_args(pid, &d, &["--no-fsync"])).json();
    assert_eq!(v["killed"], true, "{v}");
    assert_eq!(v["fsync_ms"].as_f64(), Some(0.0), "{v}");
    ck.release();
    // It restores from there (reads need no fsync).
    restore_detached(&d, pid);
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
    drop(fs);
    // On a real disk the fsync is done and timed.
    let mut ck = CkProcess::start("files", &[], READY).unwrap();
    let d = root.path().join("real");
    let v = tern(&dump_args(ck.pid, &d, &["--leave-running"])).json();
    assert!(v["fsync_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["fsync_ms"].as_f64().unwrap() < v["duration_ms"].as_f64().unwrap(),
        "{v}"
    );
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
}
