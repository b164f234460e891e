//! A restore is all or nothing (README, "Trust and permissions"): `tern
//! restore` SIGKILLed, SIGTERMed or SIGINTed at 30 random moments leaves
//! either no process, which died of SIGKILL (no SIGSEGV, no core), or a
//! whole one that passes its own checks.
//!
//! This test binary makes itself a child subreaper, so that the processes a
//! killed tern leaves are reparented here and their exit is seen. It sets
//! the signals' dispositions itself (a shell that started the suite in the
//! background left SIGINT and SIGQUIT ignored, and tern inherits that).

use std::path::Path;
use std::time::{Duration, Instant};

use tern_tests::ck::CkProcess;
use tern_tests::{
    dump_args, pre_dump, proc, restore_detached, spawn_tern, tempdir, tern, wait_deadline,
};

const READY: Duration = Duration::from_secs(30);

/// Make this process a child subreaper and give `signals` the disposition
/// `how` (inherited by the terns it starts when SIG_IGN or SIG_DFL).
fn set_up(signals: &[i32], how: libc::sighandler_t) {
    // SAFETY: prctl and signal(2) on this process.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), 0);
        for &s in signals {
            libc::signal(s, how);
        }
    }
}

#[test]
fn tern_killed_at_random_moments_of_a_restore_leaves_nothing_or_everything() {
    set_up(&[libc::SIGTERM, libc::SIGINT], libc::SIG_DFL);
    let mut ck = CkProcess::start("memory", &["--mib", "96"], READY).unwrap();
    let pid = ck.pid;
    let root = tempdir();
    let p1 = root.path().join("p1");
    pre_dump(pid, &p1, None, &[]);
    let d = root.path().join("dump");
    let p1s = p1.display().to_string();
    tern(&dump_args(pid, &d, &["--prev-images-dir", &p1s])).json();
    ck.release();
    // One whole restore, to time it.
    let t = Instant::now();
    let v = restore_detached(&d, pid);
    let full = t.elapsed();
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
    let st = proc::reap_orphan(pid, Duration::from_secs(10))
        .expect("the restored process is our orphan");
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "status {st:#x}"
    );
    eprintln!(
        "a whole restore takes {full:?} ({} ms in tern)",
        v["restore_ms"]
    );

    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ std::process::id() as u64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n.max(1)
    };
    let span = (u64::try_from(full.as_micros()).unwrap() * 6 / 5).max(1000);
    let (mut none, mut whole) = (0, 0);
    for i in 0..30 {
        let sig = [libc::SIGKILL, libc::SIGTERM, libc::SIGINT][i % 3];
        let delay = Duration::from_micros(rnd(span));
        // Both ways of the eager fill, which is most of a restore.
        let fill = ["uffd", "write"][(i / 3) % 2];
        let mut t = spawn_tern(&["restore", "-D", &d.display().to_string(), "--fill", fill]);
        std::thread::sleep(delay);
        // SAFETY: kill(2) of the tern we started.
        unsafe { libc::kill(t.id() as i32, sig) };
        let st = wait_deadline(&mut t, Duration::from_secs(30)).expect("tern did not end");
        let out = t.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let when = format!(
            "round {i}: signal {sig} {delay:?} into the restore --fill {fill} (tern: {st}; {stderr})"
        );
        assert!(
            !stderr.contains("by signal 11") && !stderr.contains("panicked"),
            "{when}"
        );
        // Give a process that survived a moment to be reparented, then see.
        std::thread::sleep(Duration::from_millis(20));
        if proc::alive(pid) && proc::state(pid) != Some('Z') {
            // It must be whole: its own checks pass.
            let v = ck.verdict(READY).unwrap_or_else(|e| panic!("{when}: {e}"));
            assert_eq!(v, "PASS", "{when}");
            let st = proc::reap_orphan(pid, Duration::from_secs(10));
            if let Some(st) = st {
                assert!(
                    libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                    "{when}: the whole process exited with status {st:#x}"
                );
            }
            whole += 1;
        } else {
            if let Some(st) = proc::reap_orphan(pid, Duration::from_secs(10)) {
                assert!(
                    libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
                    "{when}: the half-built process ended with status {st:#x}, not by SIGKILL"
                );
                assert!(!libc::WCOREDUMP(st), "{when}: it dumped core");
            }
            none += 1;
        }
        // Clean the result file for the next round's verdict.
        let _ = std::fs::write(&ck.out, format!("ready {pid}\n"));
        assert!(
            proc::wait_until(Duration::from_secs(5), || !Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()),
            "{when}: PID {pid} is still taken"
        );
    }
    eprintln!("30 interrupted restores: {none} left no process, {whole} a whole one");
}
