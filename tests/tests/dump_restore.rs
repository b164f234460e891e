//! `tern dump` + `tern restore` on self-checking workloads (`tests/src/bin/ck_*`):
//! each sets its state up, is dumped (after 0 or 3 pre-dumps), killed,
//! restored with the same PID, and then checks everything itself on
//! SIGTERM (PASS or FAIL with what differed). `tern restore` waits for the
//! process and exits with its status. Each restored process must also look
//! from outside as the original did before tern touched it: its maps
//! (smaps, VmFlags included) and fds, line by line (`proc::shape`).
//!
//! `mod lazily`: the same workloads restored with `--lazy-pages`; they run
//! while their memory comes in, and once the fill is over they hold no
//! userfaultfd and no VMA registered with one. `mod written`: the memory
//! and VMA workloads restored with `--fill write` (the eager fill's other
//! way; the rest use `UFFDIO_COPY`, the default).

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use serde_json::Value;
use tern_tests::ck::CkProcess;
use tern_tests::{num, pre_dump, spawn_tern, tempdir, tern, wait_deadline};

const READY: Duration = Duration::from_secs(30);
const VERDICT: Duration = Duration::from_secs(30);

/// `tern dump --json` (must succeed); returns its JSON.
fn dump(pid: i32, dir: &Path, prev: Option<&Path>, extra: &[&str]) -> Value {
    let mut args = tern_tests::dump_args(pid, dir, &[]);
    if let Some(p) = prev {
        args.push("--prev-images-dir".into());
        args.push(p.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = tern(&args);
    let v = run.json();
    for f in [
        "pid",
        "frozen_ms",
        "duration_ms",
        "pages_written",
        "bytes_written",
        "threads",
        "vmas",
    ] {
        assert!(v.get(f).is_some(), "dump JSON lacks {f}: {v}");
    }
    assert_eq!(v["pid"].as_i64(), Some(pid as i64));
    frozen_parts_add_up(&v, extra.contains(&"--verify"));
    v
}

/// `frozen_parts` tells where `frozen_ms` went: every part is there, the
/// parts on the dumping thread add up to it, and the ones every dump has
/// took time (`verify_ms` too when it verified).
fn frozen_parts_add_up(v: &Value, verified: bool) {
    const SEQUENTIAL: [&str; 12] = [
        "freeze_ms",
        "vmas_ms",
        "registers_ms",
        "scan_ms",
        "copy_ms",
        "state_wait_ms",
        "stacks_ms",
        "files_ms",
        "vm_flags_ms",
        "metadata_ms",
        "verify_ms",
        "end_ms",
    ];
    let parts = &v["frozen_parts"];
    let part = |name: &str| {
        let ms = parts[name].as_f64();
        assert!(
            ms.is_some_and(|ms| ms >= 0.0),
            "dump JSON: frozen_parts.{name} missing or negative: {v}"
        );
        ms.unwrap_or_default()
    };
    let sum: f64 = SEQUENTIAL.iter().map(|p| part(p)).sum();
    let frozen = num(v, "frozen_ms");
    assert!(
        (sum - frozen).abs() <= 0.05 + frozen * 1e-3,
        "dump JSON: frozen_parts add up to {sum:.3} ms, frozen_ms is {frozen:.3}: {v}"
    );
    // Beside the scan and copy: they took time, and are not in the sum.
    let mut took_time = vec![
        "freeze_ms",
        "vmas_ms",
        "scan_ms",
        "metadata_ms",
        "state_ms",
        "checks_ms",
    ];
    if verified {
        took_time.push("verify_ms");
    }
    for p in took_time {
        assert!(part(p) > 0.0, "dump JSON: frozen_parts.{p} is 0: {v}");
    }
}

/// Start `tern restore -D DIR --json FLAGS...` (it waits for the process).
fn start_restore(dir: &Path, flags: &[&str]) -> Child {
    let d = dir.display().to_string();
    let mut args = vec!["restore", "-D", &d, "--json"];
    args.extend_from_slice(flags);
    spawn_tern(&args)
}

/// The flags of a lazy restore: memory served through userfaultfd while the
/// process runs, the fill slowed down so that it runs a while lazily.
const LAZY: &[&str] = &["--lazy-pages", "--prefetch-mb-s", "64"];

/// Dump `ck` after `pre_dumps` pre-dumps, restore it (`tern restore` with
/// `restore_flags`), and get its verdict.
fn dump_restore(
    name: &str,
    args: &[&str],
    pre_dumps: usize,
    extra: &[&str],
    restore_flags: &[&str],
) -> (String, Value) {
    // One at a time: every workload here spins on the 2 cores, and a dump
    // waits on ptrace stops; in parallel they slowed each other past the
    // deadlines on a loaded machine.
    let _one = serial();
    let mut ck = CkProcess::start(name, args, READY).unwrap_or_else(|e| panic!("{e}"));
    let pid = ck.pid;
    // Its maps and fds as they were, before tern touched it.
    let before = tern_tests::proc::shape(pid).unwrap_or_else(|e| panic!("{e}"));
    let root = tempdir();
    let mut prev: Option<std::path::PathBuf> = None;
    for i in 0..pre_dumps {
        let d = root.path().join(format!("pre{i}"));
        pre_dump(pid, &d, prev.as_deref(), &[]);
        prev = Some(d);
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = root.path().join("dump");
    let mut dump_args = vec!["--verify"];
    dump_args.extend_from_slice(extra);
    let mut v = dump(pid, &dir, prev.as_deref(), &dump_args);
    // The chain's links, for the callers (the directory goes with `root`).
    let live = dir.join("live");
    v["test_parents"] = serde_json::json!({
        "dump": parent_of(&dir),
        "live": live.exists().then(|| parent_of(&live)),
    });
    assert_eq!(v["verify"]["mismatches"].as_u64(), Some(0), "{v}");
    // The original is gone (killed by the dump); reap it so its PID is free.
    ck.release();
    let mut restore = start_restore(&dir, restore_flags);
    // The restore prints its JSON once the process runs again (lazily: once
    // its fill is over).
    let restored = restored_json(&mut restore);
    assert_eq!(restored["pid"].as_i64(), Some(pid as i64), "{restored}");
    if !restore_flags.contains(&"--lazy-pages") {
        // The eager fill went the way asked, and put the memory in.
        let asked = if restore_flags.windows(2).any(|w| w == ["--fill", "write"]) {
            "write"
        } else {
            "uffd"
        };
        let f = &restored["fill"];
        assert_eq!(f["mode"].as_str(), Some(asked), "ck_{name}: {restored}");
        let (copied, written) = (num(f, "copied_bytes"), num(f, "written_bytes"));
        match asked {
            "uffd" => assert!(copied > 0.0, "ck_{name}: nothing copied: {restored}"),
            _ => assert!(
                copied == 0.0 && written > 0.0,
                "ck_{name}: --fill write copied: {restored}"
            ),
        }
        assert!(
            num(f, "workers") >= 1.0 && num(f, "ms") > 0.0,
            "ck_{name}: {restored}"
        );
    }
    if restore_flags.contains(&"--lazy-pages") {
        let l = &restored["lazy"];
        assert!(
            l["pages"].as_u64() > Some(0) && l["exited"] == false,
            "ck_{name}: lazy restore JSON: {restored}"
        );
        tern_tests::lazy::assert_fill_left_nothing(pid, &format!("ck_{name} after its fill"));
    }
    // Nothing of tern left in it, nothing of the original missing.
    let after = tern_tests::proc::shape(pid).unwrap_or_else(|e| panic!("{e}"));
    let diff = tern_tests::proc::shape_diff(&before, &after);
    if !diff.is_empty() {
        // SAFETY: kill the restored process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = restore.kill();
        panic!(
            "ck_{name} {args:?} after {pre_dumps} pre-dumps: the restored process's maps or fds differ from the original's:{diff}"
        );
    }
    let verdict = match ck.verdict(VERDICT) {
        Ok(l) => l,
        Err(e) => {
            // SAFETY: kill the restored process (it may be running).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = restore.kill();
            let out = restore.wait_with_output().ok();
            panic!(
                "ck_{name} after restore: {e}\n--- tern restore stderr:\n{}",
                out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default()
            );
        }
    };
    let status = wait_deadline(&mut restore, VERDICT)
        .expect("tern restore did not exit after the process did");
    let mut stderr = String::new();
    if let Some(mut e) = restore.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    if verdict == "PASS" {
        assert!(
            status.success(),
            "restored ck_{name} said PASS but tern restore exited {status}:\n{stderr}"
        );
    } else {
        assert!(
            !status.success(),
            "restored ck_{name} said {verdict} but tern restore exited 0"
        );
    }
    (verdict, v)
}

/// The JSON line `tern restore` prints when the process runs (at most 60 s).
fn restored_json(restore: &mut Child) -> Value {
    use std::io::BufRead;
    let out = restore.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) if !line.trim().is_empty() => serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("tern restore printed {line:?}: {e}")),
        _ => {
            let _ = restore.kill();
            let mut err = String::new();
            if let Some(mut e) = restore.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("tern restore printed no JSON:\n{err}");
        }
    }
}

fn assert_pass(name: &str, args: &[&str], pre_dumps: usize) -> Value {
    assert_pass_with(name, args, pre_dumps, &[])
}

fn assert_pass_with(name: &str, args: &[&str], pre_dumps: usize, extra: &[&str]) -> Value {
    assert_pass_restored(name, args, pre_dumps, extra, &[])
}

/// Restored with `--lazy-pages`: the workload runs, and checks itself,
/// while its memory comes in behind it.
fn assert_pass_lazily(name: &str, args: &[&str], pre_dumps: usize) -> Value {
    assert_pass_restored(name, args, pre_dumps, &[], LAZY)
}

fn assert_pass_restored(
    name: &str,
    args: &[&str],
    pre_dumps: usize,
    extra: &[&str],
    restore_flags: &[&str],
) -> Value {
    let (verdict, v) = dump_restore(name, args, pre_dumps, extra, restore_flags);
    assert_eq!(
        verdict, "PASS",
        "ck_{name} after dump ({pre_dumps} pre-dumps) + restore {restore_flags:?}"
    );
    v
}

/// The parent recorded in an image's inventory.
fn parent_of(dir: &Path) -> Option<String> {
    let inv: Value = serde_json::from_slice(
        &std::fs::read(dir.join("inventory.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display())),
    )
    .unwrap();
    inv["parent"]["path"].as_str().map(String::from)
}

/// The mutator thread keeps rewriting and zapping pages all through the
/// dump: the live pre-copy rounds (into DIR/live) copy while it runs, the
/// frozen round what it wrote after the last of them, and the restored
/// process finds every page at its latest generation.
#[test]
fn memory_after_three_pre_dumps() {
    let v = assert_pass("memory", &["--mib", "64"], 3);
    assert!(num(&v, "pages_written") > 0.0);
    let rounds = v["live_rounds"].as_array().expect("live_rounds");
    assert!(!rounds.is_empty() && rounds.len() <= 10, "{v}");
    assert!(rounds.iter().all(|r| r["pages"].as_u64().is_some()), "{v}");
    let dir = Path::new(v["images_dir"].as_str().unwrap()).to_path_buf();
    let live = dir.join("live");
    assert_eq!(
        v["live_image"].as_str(),
        Some(live.to_str().unwrap()),
        "{v}"
    );
    // Live rounds of at most 32 MiB get catch-up rounds into the final
    // image right before the freeze (the restored memory then passes the
    // workload's checks, and `--verify` compared every page).
    let most = rounds.iter().filter_map(|r| r["pages"].as_u64()).max();
    let catch_up = v["catch_up_rounds"].as_array().expect("catch_up_rounds");
    if most.is_some_and(|m| m <= 8192) {
        assert!(
            !catch_up.is_empty() && catch_up.len() <= 4,
            "live rounds of at most 8192 pages, catch-up rounds: {v}"
        );
    }
    assert!(
        catch_up.iter().all(|r| r["pages"].as_u64().is_some()),
        "{v}"
    );
    // The chain: dump -> live -> pre2 -> pre1 -> pre0.
    assert_eq!(v["test_parents"]["dump"], "live", "{v}");
    assert_eq!(v["test_parents"]["live"], "../../pre2", "{v}");
}

/// `--live-rounds 0`: frozen at once, the final image continues the last
/// pre-dump directly.
#[test]
fn memory_after_three_pre_dumps_frozen_at_once() {
    let v = assert_pass_with("memory", &["--mib", "32"], 3, &["--live-rounds", "0"]);
    assert_eq!(v["live_rounds"].as_array().map(|a| a.len()), Some(0), "{v}");
    assert!(v["live_image"].is_null(), "{v}");
    assert!(v["test_parents"]["live"].is_null(), "{v}");
    assert_eq!(v["test_parents"]["dump"], "../pre2", "{v}");
}

#[test]
fn memory_without_pre_dump() {
    assert_pass("memory", &["--mib", "16"], 0);
}

#[test]
fn threads() {
    let v = assert_pass("threads", &[], 0);
    assert_eq!(v["threads"].as_u64(), Some(9), "{v}");
}

#[test]
fn signals() {
    assert_pass("signals", &[], 0);
}

#[test]
fn fpu() {
    assert_pass("fpu", &[], 1);
}

#[test]
fn seccomp() {
    assert_pass("seccomp", &[], 0);
}

#[test]
fn rseq() {
    assert_pass("rseq", &[], 0);
}

#[test]
fn vdso() {
    assert_pass("vdso", &[], 0);
}

#[test]
fn files() {
    assert_pass("files", &[], 0);
}

#[test]
fn vma_state() {
    assert_pass("vma", &[], 0);
}

#[test]
fn vma_state_after_three_pre_dumps() {
    assert_pass("vma", &[], 3);
}

#[test]
fn vma_state_with_process_thp_and_ksm_settings() {
    assert_pass("vma", &["--prctl"], 0);
}

#[test]
fn open_file_descriptions() {
    assert_pass("ofd", &[], 0);
}

#[test]
fn open_file_descriptions_after_three_pre_dumps() {
    assert_pass("ofd", &[], 3);
}

#[test]
fn scheduling() {
    assert_pass("sched", &[], 0);
}

#[test]
fn scheduling_after_three_pre_dumps() {
    assert_pass("sched", &[], 3);
}

/// eventfds, epolls (nested, edge-triggered, a disarmed oneshot), timerfds
/// (relative, absolute, unread ticks, periodic) and a signalfd.
#[test]
fn event_fds() {
    assert_pass("events", &[], 0);
}

#[test]
fn event_fds_after_three_pre_dumps() {
    assert_pass("events", &[], 3);
}

/// Unix socketpairs (stream, datagram, seqpacket) with data queued both
/// ways, a shutdown and a dup.
#[test]
fn unix_socket_pairs() {
    assert_pass("unix", &[], 0);
}

#[test]
fn unix_socket_pairs_after_three_pre_dumps() {
    assert_pass("unix", &[], 3);
}

/// TCP listeners (IPv4 and IPv6) with their options, a bound UDP socket,
/// an unbound TCP socket: same addresses, and they work.
#[test]
fn inet_sockets() {
    assert_pass("inet", &[], 0);
}

#[test]
fn inet_sockets_after_three_pre_dumps() {
    assert_pass("inet", &[], 3);
}

/// memfds (sealed, sparse, mapped shared and privately, only mapped) and
/// files deleted while open or mapped: contents page for page, seals,
/// names, offsets, shared mappings coherent with their fds.
#[test]
fn unlinked_files() {
    assert_pass("unlinked", &[], 0);
}

#[test]
fn unlinked_files_after_three_pre_dumps() {
    assert_pass("unlinked", &[], 3);
}

/// Run from an executable deleted since (an upgraded program): it comes
/// back running the same code, /proc/self/exe `PATH (deleted)`.
#[test]
fn a_deleted_executable() {
    assert_pass("unlinked", &["--deleted-exe"], 0);
}

#[test]
fn a_deleted_executable_after_three_pre_dumps() {
    assert_pass("unlinked", &["--deleted-exe"], 3);
}

/// The same workloads restored with `--lazy-pages`.
mod lazily {
    use super::assert_pass_lazily;

    #[test]
    fn memory_after_three_pre_dumps() {
        assert_pass_lazily("memory", &["--mib", "64"], 3);
    }

    #[test]
    fn threads() {
        assert_pass_lazily("threads", &[], 0);
    }

    #[test]
    fn signals() {
        assert_pass_lazily("signals", &[], 0);
    }

    #[test]
    fn fpu() {
        assert_pass_lazily("fpu", &[], 1);
    }

    #[test]
    fn seccomp() {
        assert_pass_lazily("seccomp", &[], 0);
    }

    #[test]
    fn rseq() {
        assert_pass_lazily("rseq", &[], 0);
    }

    #[test]
    fn vdso() {
        assert_pass_lazily("vdso", &[], 0);
    }

    #[test]
    fn files() {
        assert_pass_lazily("files", &[], 0);
    }

    #[test]
    fn event_fds() {
        assert_pass_lazily("events", &[], 0);
    }

    #[test]
    fn unix_socket_pairs() {
        assert_pass_lazily("unix", &[], 0);
    }

    #[test]
    fn inet_sockets() {
        assert_pass_lazily("inet", &[], 0);
    }

    #[test]
    fn unlinked_files() {
        assert_pass_lazily("unlinked", &[], 0);
    }
}

/// Restored with `--fill write`: every page written with
/// `process_vm_writev` (or through /proc/PID/mem where read-only), the way
/// `--fill uffd` falls back where the kernel will not register memory.
mod written {
    use super::assert_pass_restored;

    const WRITE: &[&str] = &["--fill", "write"];

    #[test]
    fn memory_after_three_pre_dumps() {
        assert_pass_restored("memory", &["--mib", "64"], 3, &[], WRITE);
    }

    #[test]
    fn memory_without_pre_dump() {
        assert_pass_restored("memory", &["--mib", "16"], 0, &[], WRITE);
    }

    #[test]
    fn threads() {
        assert_pass_restored("threads", &[], 0, &[], WRITE);
    }

    #[test]
    fn vma_state() {
        assert_pass_restored("vma", &[], 0, &[], WRITE);
    }

    #[test]
    fn vma_state_after_three_pre_dumps() {
        assert_pass_restored("vma", &[], 3, &[], WRITE);
    }
}

/// Serialises the tests of this file (see the callers).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
