//! `tern migrate` and `tern receive` (issue 16): a running process moved
//! from host a to host b, two network namespaces joined by a veth pair,
//! `tern receive` in new PID and mount namespaces on b (PID 1 there, so the
//! process keeps its PID number while the source's is still alive here).
//!
//! - every self-checking workload migrated with `--post-copy never` and
//!   `always`, passing its own checks on host b; the source is gone;
//! - `python3` carrying on its work after the move;
//! - the memory-oracle workload, its regions made, written, zapped, moved
//!   and churned, migrated both ways: every page on host b as it was;
//! - `--post-copy auto` picking post-copy for a process that dirties
//!   faster than the rounds shrink, and not for a quiet one;
//! - at random moments the source's tern killed, the receiver killed
//!   before the switch, the link taken down for a while: afterwards the
//!   process runs exactly once, on one side, and passes its page-for-page
//!   check there;
//! - a migration with another key, and a plaintext client, refused by the
//!   receiver (and logged), which then takes the right one.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_tests::PYTHON_COUNTER as PYTHON;
use tern_tests::ck::CkProcess;
use tern_tests::hosts::TwoHosts;
use tern_tests::proc::{alive, comm, exiting, in_other_namespace, nspid, state};
use tern_tests::{TernOutput, tempdir, tern, tern_bin, wait_deadline};

const READY: Duration = Duration::from_secs(30);
const END: Duration = Duration::from_secs(90);
const PORT: u16 = 7300;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let k = dir.join(name);
    let run = tern(&["keygen", &k.display().to_string(), "--json"]);
    assert!(run.ok(), "{}", run.describe());
    k
}

/// `tern receive` on host b, in new PID and mount namespaces.
struct Receiver {
    child: Child,
    out: Option<TernOutput>,
    addr: String,
}

impl Receiver {
    fn start(hosts: &TwoHosts, root: &Path, key: &Path, extra: &[&str]) -> Receiver {
        let dir = root.join("received");
        let addr = format!("{}:{PORT}", hosts.b.addr);
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &hosts.b.netns])
            .args(["unshare", "--pid", "--fork", "--mount-proc"])
            .arg(tern_bin())
            .args(["receive", "--listen", &addr, "--key"])
            .arg(key)
            .arg("-D")
            .arg(&dir)
            .args(["--json", "--log", "info"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("ip netns exec unshare tern receive");
        let out = TernOutput::of(&mut child);
        let r = Receiver {
            child,
            out: Some(out),
            addr,
        };
        r.wait_listening();
        r
    }

    /// Until its socket listens (seen in host b's /proc/net/tcp).
    fn wait_listening(&self) {
        let end = Instant::now() + READY;
        while Instant::now() < end {
            if let Some(p) = receive_pid(&self.addr) {
                let tcp = std::fs::read_to_string(format!("/proc/{p}/net/tcp")).unwrap_or_default();
                let port = format!(":{PORT:04X} ");
                if tcp.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && format!("{} ", f[1]).ends_with(&port) && f[3] == "0A"
                }) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "tern receive did not listen on {} within {READY:?}",
            self.addr
        );
    }

    fn json(&self, timeout: Duration) -> Result<Value, String> {
        self.out.as_ref().expect("output").json(timeout)
    }

    /// Its log, once it ended (killed if it had not by `timeout`).
    fn finish(&mut self, timeout: Duration) -> String {
        if wait_deadline(&mut self.child, timeout).is_none() {
            // Its PID 1 holds the pipes: kill that first.
            if let Some(p) = receive_pid(&self.addr) {
                // SAFETY: kill(2).
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.out.take().map(|mut o| o.stderr()).unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Its PID namespace goes with its PID 1: the `unshare` child.
        if let Some(p) = receive_pid(&self.addr) {
            // SAFETY: kill(2).
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host PID of the `tern receive` listening on `addr`: PID 1 of its
/// namespace, found by its command line.
fn receive_pid(addr: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{p}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is = args.first().is_some_and(|a| a.ends_with(b"tern"))
            && args.get(1) == Some(&&b"receive"[..])
            && args
                .windows(2)
                .any(|w| w[0] == b"--listen" && w[1] == addr.as_bytes());
        if is && nspid(p).len() > 1 {
            return Some(p);
        }
    }
    None
}

/// Live processes whose PID in a namespace of their own is `pid`, let run:
/// a copy the receiver still holds (stopped by its tracer, `t`) runs only
/// if the source is gone.
fn migrated_copies(pid: i32) -> Vec<i32> {
    // A copy held by the receiver (`t`) does not run, nor does the
    // receiver's placeholder for it (a fork of `tern receive` waiting in a
    // read to become the copy, made while pre-copy runs).
    in_other_namespace(pid)
        .into_iter()
        .filter(|&p| state(p) != Some('t') && comm(p) != "tern")
        .collect()
}

/// `ck_NAME ARGS` (or any program speaking its protocol) on host a.
fn start_on_a(hosts: &TwoHosts, name: &str, program: &Path, args: &[&str]) -> CkProcess {
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("ip (iproute2) is missing: cargo xtask setup installs it");
    let program = program.display().to_string();
    let mut a = vec!["netns", "exec", hosts.a.netns.as_str(), program.as_str()];
    a.extend_from_slice(args);
    CkProcess::start_program(name, ip, &a, READY).unwrap_or_else(|e| panic!("{e}"))
}

fn start_ck_on_a(hosts: &TwoHosts, name: &str, args: &[&str]) -> CkProcess {
    let bin = tern_tests::bin_dir().join(format!("ck_{name}"));
    start_on_a(hosts, name, &bin, args)
}

/// `tern migrate` on host a, inside the namespaces of the process it moves
/// (`nsenter`): tern dumps only processes that share its own.
fn migrate_cmd(
    hosts: &TwoHosts,
    pid: i32,
    to: &str,
    key: &Path,
    extra: &[&str],
) -> std::process::Command {
    let _ = hosts;
    // The rounds go under the key's directory (the test's), removed with it
    // whatever happens to `tern migrate`.
    let work = key.parent().expect("the key is in the test's directory");
    let mut c = std::process::Command::new("nsenter");
    c.args(["-t", &pid.to_string(), "-n", "-m", "--"])
        .arg(tern_bin());
    c.args(["migrate", "-t", &pid.to_string(), "--to", to, "--key"])
        .arg(key)
        .args(["--json", "--log", "info", "--work-dir"])
        .arg(work)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Run `tern migrate` to the end: its JSON (or its stderr as the error).
fn migrate(
    hosts: &TwoHosts,
    pid: i32,
    to: &str,
    key: &Path,
    extra: &[&str],
) -> Result<Value, String> {
    let mut child = migrate_cmd(hosts, pid, to, key, extra)
        .spawn()
        .expect("tern migrate");
    let mut out = TernOutput::of(&mut child);
    let st = wait_deadline(&mut child, END);
    let err = out.stderr();
    match st {
        Some(s) if s.success() => out
            .json(Duration::from_secs(1))
            .map_err(|e| format!("{e}; stderr: {err}")),
        Some(s) => Err(format!("tern migrate exited {s}: {err}")),
        // An error, so that the caller adds the receiver's log.
        None => Err(format!("tern migrate did not end within {END:?}: {err}")),
    }
}

/// The one place the process runs: here (the source) or on host b (its
/// host PID there). Panics if both or neither.
fn runs_once(pid: i32, when: &str) -> Option<i32> {
    // A frozen source (held by its dump, `t`) does not run: it resumes or
    // dies. Running on both sides at any moment fails at once; otherwise
    // the answer is what three looks 100 ms apart agree on.
    let end = Instant::now() + END;
    let mut agreed = (0, None);
    loop {
        // Nor does a source killed at the switch on its way out (its
        // memory is freed once the copy runs).
        let here = alive(pid) && state(pid) != Some('t') && !exiting(pid);
        let there = migrated_copies(pid);
        assert!(
            there.len() <= 1 && (there.is_empty() || !here),
            "{when}: PID {pid} runs {} here and {} time(s) on host b ({there:?})",
            if here { "once" } else { "not" },
            there.len()
        );
        if here != (there.len() == 1) {
            let now = there.first().copied();
            agreed = if agreed.1 == now && agreed.0 > 0 {
                (agreed.0 + 1, now)
            } else {
                (1, now)
            };
            if agreed.0 >= 3 {
                return now;
            }
        } else {
            agreed = (0, None);
        }
        assert!(
            Instant::now() < end,
            "{when}: PID {pid} runs nowhere (its state here: {:?}) within {END:?}",
            state(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ck_NAME ARGS` moved to host b with `flags`; it must pass its checks
/// there, the source gone.
fn migrates(name: &str, args: &[&str], flags: &[&str]) -> Value {
    let _one = serial();
    let hosts = TwoHosts::new().unwrap_or_else(|e| panic!("two hosts: {e}"));
    let mut ck = start_ck_on_a(&hosts, name, args);
    let root = tempdir();
    let key = keygen(root.path(), "key");
    let mut recv = Receiver::start(&hosts, root.path(), &key, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let v = migrate(&hosts, ck.pid, &recv.addr, &key, flags).unwrap_or_else(|e| {
        panic!(
            "ck_{name} {flags:?}: {e}\n--- receiver:\n{}",
            recv.finish(Duration::ZERO)
        )
    });
    let r = recv
        .json(END)
        .unwrap_or_else(|e| panic!("ck_{name}: the receiver's JSON: {e}"));
    ck.release();
    let there = runs_once(ck.pid, &format!("ck_{name} after the migration"))
        .unwrap_or_else(|| panic!("ck_{name}: it still runs on the source: {v}"));
    assert_eq!(r["pid"].as_i64(), Some(i64::from(ck.pid)), "{r}");
    assert_eq!(v["destination"]["pid"], r["pid"], "{v}\n{r}");
    // Its network namespace is b's.
    let ns = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    assert_eq!(
        ns(&format!("/proc/{there}/ns/net")).unwrap(),
        ns(&format!("/run/netns/{}", hosts.b.netns)).unwrap(),
        "ck_{name}: the migrated process is not in host b's network namespace"
    );
    ck.pid = there;
    let verdict = ck.verdict(END).unwrap_or_else(|e| panic!("ck_{name}: {e}"));
    let log = recv.finish(END);
    assert_eq!(
        verdict, "PASS",
        "ck_{name} {args:?} {flags:?} on host b; receiver:\n{log}"
    );
    // The receiver exits as its process did.
    let rounds = v["rounds"].as_array().expect("rounds");
    assert!(rounds.len() >= 2, "{v}");
    for field in ["pages", "bytes", "ms", "dirty_rate_mb_s"] {
        assert!(rounds.iter().all(|r| r[field].is_number()), "{field}: {v}");
    }
    for field in [
        "predicted_downtime_ms",
        "downtime_ms",
        "bytes_sent",
        "post_copy_pages",
        "total_ms",
    ] {
        assert!(v[field].is_number(), "{field}: {v}");
    }
    assert!(r["restore_ms"].is_number() && r["lazy"].is_object(), "{r}");
    serde_json::json!({ "source": v, "destination": r })
}

fn both_ways(name: &str, args: &[&str]) {
    let v = migrates(name, args, &["--post-copy", "never"]);
    assert_eq!(v["source"]["post_copy"], false, "{v}");
    assert_eq!(v["source"]["post_copy_pages"], 0, "{v}");
    let v = migrates(name, args, &["--post-copy", "always"]);
    assert_eq!(v["source"]["post_copy"], true, "{v}");
    assert_eq!(v["destination"]["post_copy"], true, "{v}");
}

#[test]
fn memory_both_ways() {
    both_ways("memory", &["--mib", "64"]);
}

#[test]
fn threads_both_ways() {
    both_ways("threads", &[]);
}

#[test]
fn signals_both_ways() {
    both_ways("signals", &[]);
}

#[test]
fn fpu_both_ways() {
    both_ways("fpu", &[]);
}

#[test]
fn seccomp_both_ways() {
    both_ways("seccomp", &[]);
}

#[test]
fn rseq_both_ways() {
    both_ways("rseq", &[]);
}

#[test]
fn vdso_both_ways() {
    both_ways("vdso", &[]);
}

#[test]
fn files_both_ways() {
    both_ways("files", &[]);
}

#[test]
fn vma_state_both_ways() {
    both_ways("vma", &[]);
}

#[test]
fn open_file_descriptions_both_ways() {
    both_ways("ofd", &[]);
}

#[test]
fn scheduling_both_ways() {
    both_ways("sched", &[]);
}

#[test]
fn event_fds_both_ways() {
    both_ways("events", &[]);
}

#[test]
fn unix_socket_pairs_both_ways() {
    both_ways("unix", &[]);
}

/// memfds and deleted files, and a deleted executable: their contents
/// travel in the final image.
#[test]
fn unlinked_files_both_ways() {
    both_ways("unlinked", &["--deleted-exe"]);
}

/// The memory-oracle workload moved with `flags`: every page of every
/// region it made is on host b as it was on a (read from outside, without
/// faulting anything in first), and it answers commands there.
fn oracle_migrates(flags: &[&str]) {
    let _one = serial();
    let hosts = TwoHosts::new().unwrap_or_else(|e| panic!("two hosts: {e}"));
    let mut w = tern_tests::Workload::start_restorable_in(&["ip", "netns", "exec", &hosts.a.netns]);
    for c in [
        "alloc a 64 rand",
        "alloc big 2048 light",
        "dirty a 1,5,60",
        "zap a 3 2",
        "move_out a 56 8",
        "dirty a 7",
        "churn big 150 0 maps",
    ] {
        w.cmd(c);
    }
    let regions: Vec<(String, u64, u64)> = w.regions();
    let pid = w.pid();
    let held =
        tern_tests::oracle::read_ranges(pid, &regions, false).unwrap_or_else(|e| panic!("{e}"));
    let root = tempdir();
    let key = keygen(root.path(), "key");
    let mut recv = Receiver::start(&hosts, root.path(), &key, &[]);
    let v =
        migrate(&hosts, pid, &recv.addr, &key, flags).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
    w.reap_dumped(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let there =
        runs_once(pid, "the oracle workload after the migration").expect("it runs on host b");
    let now =
        tern_tests::oracle::read_ranges(there, &regions, true).unwrap_or_else(|e| panic!("{e}"));
    let diffs = tern_tests::oracle::compare_ranges(&held, &now);
    assert!(
        diffs.is_empty(),
        "{flags:?}: the migrated memory differs: {diffs:#?}\n{v}"
    );
    // It carries on: a command through its FIFOs, answered from host b.
    let r = w.cmd("regions");
    assert_eq!(
        r["regions"].as_array().map(Vec::len),
        Some(regions.len()),
        "{r}"
    );
    // SAFETY: kill(2).
    unsafe { libc::kill(there, libc::SIGKILL) };
    recv.finish(END);
}

#[test]
fn the_memory_oracle_workload_migrates_without_post_copy() {
    oracle_migrates(&["--post-copy", "never"]);
}

#[test]
fn the_memory_oracle_workload_migrates_with_post_copy() {
    oracle_migrates(&["--post-copy", "always"]);
}

fn read_counter(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `python3` (a dict, a thread, a counter it keeps writing) moves and
/// carries on counting on host b.
#[test]
fn python_carries_on_on_the_other_host() {
    let _one = serial();
    let py = PathBuf::from("/usr/bin/python3");
    assert!(
        py.is_file(),
        "/usr/bin/python3 is missing: install the Debian package python3 (cargo xtask setup does)"
    );
    let root = tempdir();
    let script = root.path().join("prog.py");
    std::fs::write(&script, PYTHON).unwrap();
    let s = script.display().to_string();
    let hosts = TwoHosts::new().unwrap_or_else(|e| panic!("two hosts: {e}"));
    let mut ck = start_on_a(&hosts, "python3", &py, &[&s]);
    let key = keygen(root.path(), "key");
    let mut recv = Receiver::start(&hosts, root.path(), &key, &[]);
    let v = migrate(&hosts, ck.pid, &recv.addr, &key, &[]).unwrap_or_else(|e| panic!("{e}"));
    ck.release();
    let there = runs_once(ck.pid, "python3 after the migration").expect("python3 runs on host b");
    let count = ck.dir.path().join("count");
    let before = read_counter(&count);
    let end = Instant::now() + Duration::from_secs(20);
    while read_counter(&count) <= before {
        assert!(
            Instant::now() < end,
            "python3 made no progress past {before} on host b: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ck.pid = there;
    assert_eq!(
        ck.verdict(END).unwrap_or_else(|e| panic!("{e}")),
        "PASS",
        "{v}"
    );
    recv.finish(END);
}

/// `auto` leaves the rest to post-copy when sending it frozen would not
/// fit the downtime (1 ms here: never), and sends everything of a quiet
/// process when it fits (the default 300 ms).
#[test]
fn auto_post_copies_what_would_not_fit_and_sends_what_fits() {
    let v = migrates(
        "memory",
        &["--mib", "64"],
        &["--post-copy", "auto", "--downtime-ms", "1"],
    );
    assert_eq!(v["source"]["post_copy"], true, "{v}");
    assert!(v["source"]["post_copy_pages"].as_u64() > Some(0), "{v}");
    assert!(
        v["destination"]["post_copy_pages"].as_u64() > Some(0),
        "{v}"
    );
    let v = migrates("vma", &[], &["--post-copy", "auto"]);
    assert_eq!(v["source"]["post_copy"], false, "a quiet process: {v}");
    assert!(
        v["source"]["predicted_downtime_ms"].as_f64() <= Some(300.0),
        "{v}"
    );
}

/// A migration with another key is refused by the receiver, and so is a
/// plaintext client; both are logged, the source runs on, and the
/// receiver then takes a migration with the right key.
#[test]
fn other_keys_and_plaintext_clients_are_refused() {
    let _one = serial();
    let hosts = TwoHosts::new().unwrap_or_else(|e| panic!("two hosts: {e}"));
    let mut ck = start_ck_on_a(&hosts, "memory", &["--mib", "16"]);
    let root = tempdir();
    let key = keygen(root.path(), "key");
    let other = keygen(root.path(), "other");
    let mut recv = Receiver::start(&hosts, root.path(), &key, &[]);
    let err = migrate(
        &hosts,
        ck.pid,
        &recv.addr,
        &other,
        &["--timeout-ms", "3000"],
    )
    .expect_err("a migration with another key went through");
    assert!(err.contains("another key"), "{err}");
    assert!(
        alive(ck.pid),
        "the source does not run on after a refused migration"
    );
    // Plaintext: a line of text from host a.
    let sent = hosts
        .on(&hosts.a, Path::new("/usr/bin/python3"))
        .args([
            "-c",
            &format!(
                "import socket\ns=socket.create_connection(('{}', {PORT}))\ns.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\ns.settimeout(5)\ntry:\n    print(s.recv(100))\nexcept OSError as e:\n    print(e)",
                hosts.b.addr
            ),
        ])
        .output()
        .expect("python3");
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let v = migrate(&hosts, ck.pid, &recv.addr, &key, &[]).unwrap_or_else(|e| panic!("{e}"));
    ck.release();
    let there = runs_once(ck.pid, "after the right key").expect("it runs on host b");
    ck.pid = there;
    assert_eq!(
        ck.verdict(END).unwrap_or_else(|e| panic!("{e}")),
        "PASS",
        "{v}"
    );
    let log = recv.finish(END);
    assert!(
        log.matches("refused").count() >= 2
            && log.contains("another key")
            && log.contains("plaintext"),
        "the receiver did not log both refusals:\n{log}"
    );
}

/// What a failure test does at its random moment.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL to the source's `tern migrate`.
    KillSource,
    /// SIGKILL to `tern receive` (PID 1 of its namespace) before the
    /// process runs there.
    KillReceiver,
    /// The veth down for 1.5 s, then up again.
    LinkDown,
}

/// `ck_memory` migrated while `fault` strikes `at` after `tern migrate`
/// started; afterwards the process runs exactly once and passes its check.
fn fault_at(fault: Fault, at: Duration, flags: &[&str]) -> &'static str {
    let hosts = TwoHosts::new().unwrap_or_else(|e| panic!("two hosts: {e}"));
    let mut ck = start_ck_on_a(&hosts, "memory", &["--mib", "32"]);
    let root = tempdir();
    let key = keygen(root.path(), "key");
    let mut recv = Receiver::start(
        &hosts,
        root.path(),
        &key,
        &["--retry-s", "4", "--timeout-ms", "4000"],
    );
    let mut args = vec!["--retry-s", "4", "--timeout-ms", "4000"];
    args.extend_from_slice(flags);
    let mut m = migrate_cmd(&hosts, ck.pid, &recv.addr, &key, &args)
        .spawn()
        .expect("tern migrate");
    let mut out = TernOutput::of(&mut m);
    std::thread::sleep(at);
    match fault {
        Fault::KillSource => {
            let _ = m.kill();
        }
        Fault::KillReceiver => {
            if migrated_copies(ck.pid).is_empty()
                && let Some(p) = receive_pid(&recv.addr)
            {
                // SAFETY: kill(2).
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        Fault::LinkDown => {
            hosts.link(false).unwrap_or_else(|e| panic!("{e}"));
            std::thread::sleep(Duration::from_millis(1500));
            hosts.link(true).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let st = wait_deadline(&mut m, END);
    let src_log = out.stderr();
    // The receiver ends (its migration failed) or runs the process.
    let end = Instant::now() + END;
    while receive_pid(&recv.addr).is_some()
        && migrated_copies(ck.pid).is_empty()
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let when = format!("{fault:?} {at:?} {flags:?} (tern migrate: {st:?})");
    let there = runs_once(ck.pid, &when);
    let outcome = if let Some(p) = there {
        ck.release();
        ck.pid = p;
        "moved"
    } else {
        "stayed"
    };
    let verdict = ck.verdict(END).unwrap_or_else(|e| panic!("{when}: {e}"));
    let recv_log = recv.finish(END);
    assert_eq!(
        verdict, "PASS",
        "{when}: {outcome}\n--- tern migrate:\n{src_log}\n--- tern receive:\n{recv_log}"
    );
    outcome
}

/// A pseudo-random moment in `0..max_ms` (seeded by the clock; printed).
fn moment(max_ms: u64) -> Duration {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(ns % max_ms.max(1))
}

/// How long `tern migrate` of the fault tests' workload takes here from
/// its start (a migration without fault): the faults strike within it.
fn migration_span(flags: &[&str]) -> u64 {
    let hosts = TwoHosts::new().unwrap_or_else(|e| panic!("two hosts: {e}"));
    let mut ck = start_ck_on_a(&hosts, "memory", &["--mib", "32"]);
    let root = tempdir();
    let key = keygen(root.path(), "key");
    let mut recv = Receiver::start(&hosts, root.path(), &key, &[]);
    let t = Instant::now();
    migrate(&hosts, ck.pid, &recv.addr, &key, flags).unwrap_or_else(|e| panic!("{e}"));
    let span = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    ck.release();
    if let Some(p) = runs_once(ck.pid, "the migration without fault") {
        ck.pid = p;
    }
    assert_eq!(ck.verdict(END).unwrap_or_else(|e| panic!("{e}")), "PASS");
    recv.finish(END);
    span
}

fn faults(fault: Fault, times: usize) {
    let _one = serial();
    for flags in [
        &["--post-copy", "never"][..],
        &["--post-copy", "always"][..],
    ] {
        let span = migration_span(flags);
        let mut outcomes = Vec::new();
        for _ in 0..times {
            let at = moment(span);
            let o = fault_at(fault, at, flags);
            eprintln!("{fault:?} at {at:?} of {span} ms {flags:?}: {o}");
            outcomes.push(o);
        }
    }
}

#[test]
fn the_source_tern_killed_at_random_moments_leaves_one_process() {
    faults(Fault::KillSource, 4);
}

#[test]
fn the_receiver_killed_at_random_moments_leaves_one_process() {
    faults(Fault::KillReceiver, 4);
}

#[test]
fn the_link_down_at_random_moments_leaves_one_process() {
    faults(Fault::LinkDown, 3);
}
