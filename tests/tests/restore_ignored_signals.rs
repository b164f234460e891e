//! A `tern restore` started with SIGHUP, SIGINT or SIGQUIT ignored
//! (`nohup`, `&` in a script) is not stopped by them, though while it builds
//! the process it takes those signals itself (restore_kill.rs): the restore
//! completes and the process is whole.
//!
//! A test binary of its own: signal dispositions are the process's, and
//! restore_kill.rs needs them at their defaults.

use std::time::{Duration, Instant};

use tern_tests::ck::CkProcess;
use tern_tests::{dump_args, proc, spawn_tern, tempdir, tern};

const READY: Duration = Duration::from_secs(30);

/// `nohup tern restore` (SIGHUP ignored) and `tern restore &` in a script
/// (SIGINT and SIGQUIT ignored) go on through those signals, sent over and
/// over while the process is built, and the process comes back whole.
#[test]
fn signals_tern_was_started_ignoring_do_not_stop_a_restore() {
    let ignored = [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];
    let mut ck = CkProcess::start("memory", &["--mib", "96"], READY).unwrap();
    let pid = ck.pid;
    let root = tempdir();
    let d = root.path().join("dump");
    tern(&dump_args(pid, &d, &[])).json();
    ck.release();
    // Only now: the workload and the dump ran with the usual dispositions.
    // SAFETY: prctl and signal(2) on this test process.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), 0);
        for s in ignored {
            libc::signal(s, libc::SIG_IGN);
        }
    }
    for round in 0..3 {
        let mut t = spawn_tern(&[
            "restore",
            "-D",
            &d.display().to_string(),
            "--detach",
            "--json",
        ]);
        let end = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = t.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < end,
                "round {round}: tern restore did not end in 30 s"
            );
            // SAFETY: kill(2) of the tern we started.
            unsafe { libc::kill(t.id() as i32, ignored[round % 3]) };
            std::thread::sleep(Duration::from_micros(500));
        };
        let out = t.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            st.success(),
            "round {round}: tern restore sent signal {} throughout ended {st}: {stderr}",
            ignored[round % 3]
        );
        assert_eq!(ck.verdict(READY).unwrap(), "PASS", "round {round}");
        // SAFETY: ending the restored process (our orphan) for the next round.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        proc::reap_orphan(pid, Duration::from_secs(10));
        let _ = std::fs::write(&ck.out, format!("ready {pid}\n"));
    }
}
