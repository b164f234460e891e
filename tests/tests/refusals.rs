//! Clear refusals, each error said once:
//! - `tern dump` of its own PID says so (it used to kill itself, exit 137);
//! - PID 2 is a kernel thread, not "No such process" from /proc/2/mem;
//! - a non-root user is told tern needs root (not a permission error on a
//!   lock file);
//! - no error repeats a clause or names the same PID twice;
//! - a second tern on a target another tern works on is refused, naming
//!   the lock; terns working on different targets at once never refuse
//!   each other (each sweeps `/run/tern` of the state of gone processes);
//! - a program rebuilt between its dump and its restore is refused, naming
//!   the file and what differs.

use std::os::unix::process::CommandExt;
use std::process::Command;

use std::time::Duration;

use tern_tests::{TernOutput, TernRun, Workload, proc, spawn_tern, tempdir, tern, tern_bin};

/// No `: `-separated clause twice, and `PID n` at most once.
fn said_once(run: &TernRun) {
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("tern: error:"))
        .unwrap_or_else(|| panic!("no error line:\n{}", run.describe()));
    let clauses: Vec<&str> = line.split(": ").collect();
    for (i, c) in clauses.iter().enumerate() {
        assert!(
            !clauses[i + 1..].contains(c),
            "{c:?} is said twice in: {line}"
        );
    }
    let mut pids: Vec<&str> = line
        .match_indices("PID ")
        .map(|(i, _)| {
            let rest = &line[i + 4..];
            &rest[..rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len())]
        })
        .collect();
    pids.sort();
    let n = pids.len();
    pids.dedup();
    assert_eq!(pids.len(), n, "a PID is named twice in: {line}");
}

#[test]
fn tern_refuses_to_dump_itself() {
    let d = tempdir();
    let dir = d.path().join("self");
    // `exec` keeps the shell's PID: tern is asked to dump its own.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {} dump -t $$ -D {}",
            tern_bin().display(),
            dir.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is this tern itself"), "{stderr}");
    assert!(!dir.exists(), "the refused dump left {}", dir.display());
}

#[test]
fn a_kernel_thread_is_named_as_such() {
    let d = tempdir();
    for verb in ["pre-dump", "dump"] {
        let run = tern(&[
            verb,
            "-t",
            "2",
            "-D",
            &d.path().join(verb).display().to_string(),
        ]);
        run.assert_clear_failure(&["PID 2", "kernel thread"]);
        said_once(&run);
        assert!(
            !run.stderr.contains("No such process"),
            "{}",
            run.describe()
        );
    }
    let run = tern(&["untrack", "-t", "2"]);
    run.assert_clear_failure(&["kernel thread"]);
}

#[test]
fn a_user_who_is_not_root_is_told_what_tern_needs() {
    let mut w = Workload::start();
    w.cmd("alloc a 4 rand");
    let d = tempdir();
    for args in [
        vec![
            "pre-dump".to_string(),
            "-t".into(),
            w.pid().to_string(),
            "-D".into(),
            d.path().join("x").display().to_string(),
        ],
        vec![
            "restore".into(),
            "-D".into(),
            d.path().display().to_string(),
        ],
        vec![
            "track".into(),
            "-t".into(),
            w.pid().to_string(),
            "--rounds".into(),
            "1".into(),
        ],
    ] {
        let mut cmd = Command::new(tern_bin());
        cmd.args(&args);
        // SAFETY: setgid/setuid in the child before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("needs root") && stderr.contains("uid 65534"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("Permission denied"), "{args:?}: {stderr}");
    }
}

#[test]
fn errors_say_each_thing_once() {
    let d = tempdir();
    let missing = proc::unused_pid();
    let m = missing.to_string();
    let dir = |n: &str| d.path().join(n).display().to_string();
    let garbage = d.path().join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    std::fs::write(garbage.join(images::INVENTORY_FILE), "{ not json").unwrap();
    let mut w = Workload::start();
    w.cmd("alloc a 4 rand");
    let pid = w.pid().to_string();
    let pre = d.path().join("pre");
    tern_tests::pre_dump(w.pid(), &pre, None, &[]);
    let runs: Vec<Vec<String>> = vec![
        vec![
            "pre-dump".into(),
            "-t".into(),
            m.clone(),
            "-D".into(),
            dir("a"),
        ],
        vec!["dump".into(), "-t".into(), m.clone(), "-D".into(), dir("b")],
        vec![
            "track".into(),
            "-t".into(),
            m.clone(),
            "--rounds".into(),
            "1".into(),
        ],
        vec!["untrack".into(), "-t".into(), m.clone()],
        vec!["restore".into(), "-D".into(), dir("nothing")],
        vec!["show".into(), dir("nothing")],
        vec!["restore".into(), "-D".into(), pre.display().to_string()],
        vec![
            "pre-dump".into(),
            "-t".into(),
            pid.clone(),
            "-D".into(),
            dir("c"),
            "--prev-images-dir".into(),
            garbage.display().to_string(),
        ],
        vec!["restore".into(), "-D".into(), garbage.display().to_string()],
    ];
    for args in runs {
        let run = tern(&args);
        run.assert_clear_failure(&[]);
        said_once(&run);
    }
    tern_tests::untrack(w.pid());
}

#[test]
fn one_tern_per_target_and_none_refused_by_terns_on_other_targets() {
    let d = tempdir();
    let mut w = Workload::start();
    w.cmd("alloc a 4 rand");
    let pid = w.pid().to_string();
    // A `tern track` holds the target's lock until its last round.
    let mut track = spawn_tern(&[
        "track",
        "-t",
        &pid,
        "--interval-ms",
        "100",
        "--rounds",
        "30",
        "--json",
    ]);
    let mut out = TernOutput::of(&mut track);
    out.json(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("tern track: {e}: {}", out.stderr()));
    let run = tern(&[
        "pre-dump",
        "-t",
        &pid,
        "-D",
        &d.path().join("second").display().to_string(),
        "--json",
    ]);
    run.assert_clear_failure(&["another tern is working on PID", "/run/tern/"]);
    said_once(&run);
    let _ = track.kill();
    let _ = track.wait();
    tern_tests::untrack(w.pid());

    // Three targets pre-dumped at the same time, round after round: each
    // tern sweeps /run/tern as it starts, and no sweep may ever make
    // another tern see its own target's lock held.
    let mut ws: Vec<Workload> = (0..3)
        .map(|_| {
            let mut w = Workload::start();
            w.cmd("alloc a 1 rand");
            w
        })
        .collect();
    for round in 0..8 {
        let runs: Vec<_> = ws
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let dir = d.path().join(format!("w{i}-{round}"));
                let pid = w.pid();
                std::thread::spawn(move || {
                    tern(&[
                        "pre-dump".to_string(),
                        "-t".into(),
                        pid.to_string(),
                        "-D".into(),
                        dir.display().to_string(),
                        "--track".into(),
                        "full".into(),
                        "--json".into(),
                    ])
                })
            })
            .collect();
        for r in runs {
            let r = r.join().unwrap();
            assert!(r.ok(), "round {round}:\n{}", r.describe());
        }
    }
    for w in &mut ws {
        tern_tests::untrack(w.pid());
    }
}

/// A program rebuilt between its dump and its restore: the restore takes
/// the pages the process did not write from the file at the same path, so
/// it would run new code beside its old data (a rebuilt `hotloop` restored
/// that way died of SIGABRT at once). The restore refuses, naming the file
/// and what differs, and no process with the PID appears; the program put
/// back as it was (another mtime, the same build ID) restores and runs.
#[test]
fn a_program_rebuilt_since_the_dump_is_refused() {
    let d = tempdir();
    let prog = d.path().join("prog");
    std::fs::copy("/usr/bin/sleep", &prog).unwrap();
    let original = std::fs::read(&prog).unwrap();
    let id = sys::mapped_file::FileIdentity::of(&std::fs::File::open(&prog).unwrap())
        .unwrap()
        .build_id
        .expect("/usr/bin/sleep has an ELF build ID (Debian builds with one)");
    // Retried on ETXTBSY: another test thread's child may still hold the
    // copy's write fd.
    let mut child = tern_tests::spawn_retrying(
        Command::new(&prog)
            .arg("1000")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    assert!(
        proc::wait_until(Duration::from_secs(5), || proc::maps(pid)
            .is_ok_and(|m| m.iter().any(|v| v.name.ends_with("/prog")))),
        "{} did not start",
        prog.display()
    );
    let img = d.path().join("img");
    let img_s = img.display().to_string();
    let v = tern(&["dump", "-t", &pid.to_string(), "-D", &img_s, "--json"]).json();
    assert_eq!(v["killed"], true, "{v}");
    child.wait().unwrap();

    // The same size, another build ID: one byte of the note changed.
    let id_bytes: Vec<u8> = (0..id.len() / 2)
        .map(|i| u8::from_str_radix(&id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let at = original
        .windows(id_bytes.len())
        .position(|w| w == id_bytes)
        .expect("the build ID's bytes in the file");
    let mut rebuilt = original.clone();
    rebuilt[at] ^= 0xff;
    std::fs::write(&prog, &rebuilt).unwrap();
    let run = tern(&["restore", "-D", &img_s, "--json"]);
    run.assert_clear_failure(&[
        &prog.display().to_string(),
        "not the file the dump saw",
        "ELF build ID",
    ]);
    said_once(&run);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "a process with PID {pid} exists after the refused restore"
    );

    // Put back: another mtime, the same build ID.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&prog, &original).unwrap();
    let v = tern(&["restore", "-D", &img_s, "--detach", "--json"]).json();
    assert_eq!(v["pid"].as_i64(), Some(i64::from(pid)), "{v}");
    let state = proc::state(pid);
    // SAFETY: kill(2) takes integers only.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        matches!(state, Some('S' | 'R')),
        "the restored program is not running: state {state:?}"
    );
}
