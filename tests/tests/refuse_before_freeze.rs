//! What tern cannot restore it refuses up front, before it freezes (or
//! changes) the target: `tern check -t PID` names every such resource
//! (`kind`, `where`, `reason`) and says the target is not restorable, and
//! `tern pre-dump` / `tern dump` fail with the same kind named, write no
//! image, and leave the process running as before.
//!
//! Each test starts `holder KIND` (one resource of KIND, see
//! `src/bin/holder.rs`); `holder none` is the restorable control.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_tests::{TernRun, proc, tempdir, tern, workload_bin};

/// A running `holder KIND --out DIR/out`, killed and reaped on drop.
struct Holder {
    kind: String,
    pid: i32,
    out: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
}

impl Holder {
    fn start(kind: &str) -> Holder {
        let dir = tempdir();
        let out = dir.path().join("out");
        // Its temporary files go to our directory (removed with it).
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let stdout = std::fs::File::create(dir.path().join("stdout")).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let child = tern_tests::spawn_retrying(
            Command::new(workload_bin("holder"))
                .arg(kind)
                .arg("--out")
                .arg(&out)
                .env("TMPDIR", &tmp)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr),
        )
        .unwrap_or_else(|e| panic!("spawn holder {kind}: {e}"));
        let pid = child.id() as i32;
        let mut h = Holder {
            kind: kind.to_string(),
            pid,
            out,
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let ready = format!("ready {pid}");
        while !h.lines().contains(&ready) {
            if let Ok(Some(st)) = h.child.try_wait() {
                panic!(
                    "holder {kind} exited ({st}) before ready: {:?}; stderr: {}",
                    h.lines(),
                    h.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "holder {kind} (pid {pid}) not ready within 10 s: {:?}; stderr: {}",
                h.lines(),
                h.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if kind == "zombie-leader" {
            // `ready` comes just before the leader exits: wait for that.
            assert!(
                proc::wait_until(Duration::from_secs(10), || {
                    proc::task_state(pid, pid) == Some('Z')
                }),
                "holder zombie-leader: the leader (pid {pid}) is not a zombie: {:?}",
                proc::task_state(pid, pid)
            );
        }
        h
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// The `fd N` lines the holder wrote (the fds that are its resource).
    fn fds(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with("fd "))
            .collect()
    }

    /// The `0x...` start addresses of the mappings that are its resource.
    fn maps(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("map "))
            .map(str::to_string)
            .collect()
    }

    fn alive_values(&self) -> Vec<u64> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("alive "))
            .map(|n| n.parse().unwrap_or_else(|_| panic!("bad alive line {n:?}")))
            .collect()
    }

    /// SIGUSR1 it; its new `alive N` (within 5 s).
    fn ping(&self) -> u64 {
        let before = self.alive_values().len();
        // SAFETY: plain kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(self.pid, libc::SIGUSR1) }, 0);
        let mut got = None;
        let ok = proc::wait_until(Duration::from_secs(5), || {
            got = self.alive_values().get(before).copied();
            got.is_some()
        });
        assert!(
            ok,
            "holder {} (pid {}) did not answer SIGUSR1 within 5 s (state {:?}): {:?}; stderr: {}",
            self.kind,
            self.pid,
            proc::state(self.pid),
            self.lines(),
            self.stderr()
        );
        got.unwrap()
    }

    /// Still running and working: two SIGUSR1s, two increasing counters.
    fn assert_working(&self, when: &str) {
        let a = self.ping();
        let b = self.ping();
        assert!(
            b > a,
            "holder {} {when}: its counter did not move on: alive {a} then {b}",
            self.kind
        );
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The files it left (`holder-KIND-PID`: a lock file, a second link).
        let suffix = format!("-{}", self.pid);
        let tmp =
            std::env::var_os("TMPDIR").map_or_else(|| "/tmp".into(), std::path::PathBuf::from);
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("holder-") && n.ends_with(&suffix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// `tern check -t PID --json`: (exit code, its one JSON object).
fn check_target(pid: i32) -> (TernRun, Value) {
    let run = tern(&["check", "-t", &pid.to_string(), "--json"]);
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "`tern check -t` did not print one JSON object: {e}\n{}",
            run.describe()
        )
    });
    assert!(v.is_object(), "not a JSON object:\n{}", run.describe());
    assert_eq!(v["pid"].as_i64(), Some(pid as i64), "{}", run.describe());
    (run, v)
}

/// The refusals of a `tern check -t` answer: an array of objects with
/// string `kind`, `where`, `reason`.
fn refusals<'a>(v: &'a Value, run: &TernRun) -> &'a Vec<Value> {
    let r = v["refusals"]
        .as_array()
        .unwrap_or_else(|| panic!("no refusals array:\n{}", run.describe()));
    for x in r {
        for f in ["kind", "where", "reason"] {
            assert!(
                x[f].is_string(),
                "refusal without a string {f:?}: {x}\n{}",
                run.describe()
            );
        }
    }
    r
}

/// The image tern would have written to `dir` is not there.
fn assert_no_image(dir: &Path, run: &TernRun) {
    assert!(
        !dir.join(images::INVENTORY_FILE).exists(),
        "the refused run left an image in {}:\n{}",
        dir.display(),
        run.describe()
    );
}

/// The whole contract for `holder KIND`, refused as `expected`.
fn refuses(kind: &str, expected: &str) {
    let h = Holder::start(kind);
    let pid = h.pid;
    let d = tempdir();

    // a. check: not restorable, the resource named.
    let (run, v) = check_target(pid);
    assert_eq!(
        run.status.code(),
        Some(1),
        "`tern check -t` of a target it cannot restore must exit 1:\n{}",
        run.describe()
    );
    assert_eq!(v["restorable"], false, "{}", run.describe());
    let r = refusals(&v, &run);
    assert!(!r.is_empty(), "no refusals:\n{}", run.describe());
    let ours: Vec<&Value> = r.iter().filter(|x| x["kind"] == expected).collect();
    assert!(
        !ours.is_empty(),
        "no refusal of kind {expected:?} for holder {kind}:\n{}",
        run.describe()
    );
    // Where: `fd N` for an fd the holder used, or the start of a mapping
    // it made (memfd: either).
    let fds = h.fds();
    let maps = h.maps();
    if !fds.is_empty() || !maps.is_empty() {
        assert!(
            ours.iter().any(|x| {
                let w = x["where"].as_str().unwrap();
                fds.iter().any(|f| w == f) || maps.iter().any(|m| w.contains(m.as_str()))
            }),
            "no {expected:?} refusal is at one of {fds:?} / mappings {maps:?}:\n{}",
            run.describe()
        );
    }
    h.assert_working("after tern check");

    // b. first pre-dump, c. dump: refused, nothing written.
    let pre = d.path().join("pre");
    let run = tern_tests::pre_dump_run(pid, &pre, None, &[]);
    run.assert_clear_failure(&[&format!("PID {pid}"), expected]);
    assert_no_image(&pre, &run);
    h.assert_working("after a refused pre-dump");

    let full = d.path().join("dump");
    let run = tern(&tern_tests::dump_args(pid, &full, &[]));
    run.assert_clear_failure(&[&format!("PID {pid}"), expected]);
    assert_no_image(&full, &run);

    // d. still alive and working.
    h.assert_working("after a refused dump");
    drop(h);
}

#[test]
fn a_holder_of_nothing_is_restorable() {
    let h = Holder::start("none");
    let (run, v) = check_target(h.pid);
    assert_eq!(run.status.code(), Some(0), "{}", run.describe());
    assert_eq!(v["restorable"], true, "{}", run.describe());
    assert!(
        refusals(&v, &run).is_empty(),
        "refusals for a process holding nothing:\n{}",
        run.describe()
    );
    h.assert_working("after tern check");
}

/// Holders of what tern restores (`socket` is a unix socketpair,
/// `tcp-listen` a TCP listener; memfds and deleted files up to the size
/// tern saves): `tern check` finds nothing to refuse.
#[test]
fn holders_of_event_fds_posix_timers_sockets_memfds_and_deleted_files_are_restorable() {
    for kind in [
        "eventfd",
        "epoll",
        "signalfd",
        "timerfd",
        "posix-timer",
        "socket",
        "tcp-listen",
        "deleted-file",
        "deleted-mapping",
        "memfd",
        "unix-listen",
        "deleted-exe",
    ] {
        let h = Holder::start(kind);
        let (run, v) = check_target(h.pid);
        assert_eq!(run.status.code(), Some(0), "{kind}: {}", run.describe());
        assert_eq!(v["restorable"], true, "{kind}: {}", run.describe());
        h.assert_working("after tern check");
    }
}

/// What a unix socket's queue holds is read only once the process is
/// frozen (a peek would move the running process's peek offset): `tern
/// check` cannot see an fd in flight, the dump finds it, refuses, and the
/// process runs on untouched.
#[test]
fn a_unix_socket_with_an_fd_in_flight_is_refused_by_the_dump_and_runs_on() {
    let h = Holder::start("unix-fd-in-flight");
    let pid = h.pid;
    let (run, v) = check_target(pid);
    assert_eq!(v["restorable"], true, "{}", run.describe());
    let d = tempdir();
    let full = d.path().join("dump");
    let run = tern(&tern_tests::dump_args(pid, &full, &[]));
    run.assert_clear_failure(&[&format!("PID {pid}"), "in flight"]);
    assert_no_image(&full, &run);
    h.assert_working("after a refused dump");
}

macro_rules! refusal_tests {
    ($($name:ident: $kind:literal => $expected:literal,)*) => {
        $(
            #[test]
            fn $name() {
                refuses($kind, $expected);
            }
        )*
    };
}

refusal_tests! {
    refuses_tcp_connection: "tcp-connected" => "socket",
    refuses_a_unix_listener_with_a_connection_waiting: "unix-listen-pending" => "socket",
    refuses_epoll_with_a_closed_target: "epoll-closed-target" => "epoll_closed_target",
    refuses_inotify: "inotify" => "inotify",
    refuses_pidfd: "pidfd" => "pidfd",
    refuses_posix_timer_on_a_thread_clock: "posix-timer-thread-clock" => "posix_timer",
    refuses_child: "child" => "child",
    refuses_zombie_child: "zombie-child" => "child",
    refuses_deleted_cwd: "deleted-cwd" => "deleted_cwd",
    refuses_a_deleted_file_linked_elsewhere: "deleted-file-linked" => "deleted_file",
    refuses_a_memfd_over_the_limit: "memfd-too-big" => "memfd",
    refuses_sysv_shm: "sysv-shm" => "sysv_shm",
    refuses_flock: "flock" => "file_lock",
    refuses_device: "device" => "device",
    refuses_zombie_leader: "zombie-leader" => "zombie_leader",
    refuses_async_io: "async-io" => "async_io",
    refuses_io_uring: "io-uring" => "io_uring",
    refuses_aio: "aio" => "aio",
    refuses_userfaultfd: "userfaultfd" => "userfaultfd",
    refuses_fanotify: "fanotify" => "fanotify",
    refuses_namespace: "namespace" => "namespace",
}
