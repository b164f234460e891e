//! What root's tern writes lands in the images directory and nowhere else,
//! follows no link, and is private (README, "Trust and permissions"):
//! - a link planted under any name tern writes, in a directory its user
//!   owns, never leads a write to the link's target;
//! - a `-D` that is a link, a link on the way owned by another user, and a
//!   directory others may write while another user owns it, are refused;
//! - under umask 022, image directories are 0700 and files 0600, and so is
//!   tern's state in /run/tern;
//! - a command that fails leaves no directory it created behind.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_tests::ck::CkProcess;
use tern_tests::{Workload, pre_dump, proc, tempdir, tern, untrack};

/// A dump of `pid` into `dir` on top of `prev` that lets it run on.
fn dump_on(pid: i32, dir: &Path, prev: &Path) -> Vec<String> {
    let prev = prev.display().to_string();
    tern_tests::dump_args(pid, dir, &["--prev-images-dir", &prev, "--leave-running"])
}

const USER: u32 = 1001;

/// A root-owned file, and what it must still be afterwards.
struct Victim {
    path: PathBuf,
    bytes: Vec<u8>,
    mode: u32,
}

impl Victim {
    fn new(dir: &Path, name: &str) -> Victim {
        let path = dir.join(name);
        let bytes = format!("precious {name}\n").into_bytes();
        std::fs::write(&path, &bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        Victim {
            path,
            bytes,
            mode: 0o640,
        }
    }

    fn unchanged(&self, when: &str) {
        let now = std::fs::read(&self.path)
            .unwrap_or_else(|e| panic!("{when}: victim {} gone: {e}", self.path.display()));
        assert!(
            now == self.bytes,
            "{when}: {} was written through a link (it holds {} bytes now, starting {:?})",
            self.path.display(),
            now.len(),
            String::from_utf8_lossy(&now[..now.len().min(32)])
        );
        let md = std::fs::symlink_metadata(&self.path).unwrap();
        assert!(md.is_file(), "{when}: {} replaced", self.path.display());
        assert_eq!(md.mode() & 0o7777, self.mode, "{when}: mode changed");
        assert_eq!(md.uid(), 0, "{when}: owner changed");
    }
}

/// `link` -> `target`, the link owned by uid 1001 (as if planted by them).
fn plant(link: &Path, target: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
    std::os::unix::fs::lchown(link, Some(USER), Some(USER)).unwrap();
}

/// A directory uid 1001 owns (0755), for root's tern to write into.
fn user_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(USER), Some(USER)).unwrap();
    d
}

#[test]
fn planted_links_never_redirect_a_write() {
    // ck_files holds pipes with data (pipes/ is written) and runs on
    // through `dump --leave-running` (live/ is written).
    let mut ck = CkProcess::start("files", &[], Duration::from_secs(30)).unwrap();
    let pid = ck.pid;
    let root = tempdir();
    let vdir = root.path().join("victims");
    std::fs::create_dir(&vdir).unwrap();
    let base = root.path().join("base");
    pre_dump(pid, &base, None, &[]);
    let names = [
        "pages.img",
        "pagemap.img",
        "mm.json",
        "process.json",
        "inventory.json",
        ".tern-write-test",
        "mm.json.tmp",
        "inventory.json.tmp",
        "pagemap.img.tmp",
        "process.json.tmp",
        "pipes",
        "live",
    ];
    for (i, name) in names.iter().enumerate() {
        let victim = Victim::new(&vdir, &format!("v{i}"));
        let vd = vdir.join(format!("d{i}"));
        std::fs::create_dir(&vd).unwrap();
        let d = user_dir(root.path(), &format!("dump-{i}"));
        // Directories tern makes are planted as links to a directory.
        let target = if *name == "pipes" || *name == "live" {
            vd.clone()
        } else {
            victim.path.clone()
        };
        plant(&d.join(name), &target);
        let run = tern(&dump_on(pid, &d, &base));
        // First what must never happen, then what the run says.
        victim.unchanged(&format!("a link named {name} in -D"));
        assert_eq!(
            std::fs::read_dir(&vd).unwrap().count(),
            0,
            "a link named {name}: tern wrote into the directory it pointed at"
        );
        if *name == "inventory.json" {
            run.assert_clear_failure(&["already holds an image"]);
        } else {
            let v = run.json();
            assert_eq!(v["killed"], false, "{v}");
            // The image is whole, and it is where it was asked to be.
            images::Image::open(&d).unwrap_or_else(|e| panic!("{name}: {e}"));
            // A name tern writes is its own file now (the link went).
            let written = !name.contains(".tmp") && !name.starts_with('.');
            assert!(
                !written
                    || std::fs::symlink_metadata(d.join(name))
                        .is_ok_and(|m| !m.file_type().is_symlink()),
                "{name} is not tern's own file"
            );
        }
        // The same for a pre-dump (pages.img, mm.json, ...).
        let p = user_dir(root.path(), &format!("pre-{i}"));
        let victim = Victim::new(&vdir, &format!("w{i}"));
        plant(&p.join(name), &victim.path);
        let run = tern_tests::pre_dump_run(pid, &p, Some(&base), &[]);
        victim.unchanged(&format!("a link named {name} in a pre-dump's -D"));
        if *name == "inventory.json" {
            run.assert_clear_failure(&["already holds an image"]);
        } else {
            run.json();
        }
    }
    untrack(pid);
    assert_eq!(ck.verdict(Duration::from_secs(30)).unwrap(), "PASS");
}

#[test]
fn unsafe_images_dirs_are_refused() {
    let mut w = Workload::start();
    w.cmd("alloc a 16 rand");
    let pid = w.pid();
    let baseline = proc::Snapshot::take(pid).unwrap();
    let root = tempdir();
    let victim_dir = root.path().join("victim");
    std::fs::create_dir(&victim_dir).unwrap();
    // -D a link (to a directory of root's).
    let link = root.path().join("link");
    plant(&link, &victim_dir);
    let run = tern_tests::pre_dump_run(pid, &link, None, &[]);
    run.assert_clear_failure(&[&link.display().to_string(), "symbolic link"]);
    // A link on the way, owned by uid 1001.
    let run = tern_tests::pre_dump_run(pid, &link.join("img"), None, &[]);
    run.assert_clear_failure(&["uid 1001", "symbolic link"]);
    assert_eq!(std::fs::read_dir(&victim_dir).unwrap().count(), 0);
    // Owned by uid 1001 and writable by others.
    let shared = user_dir(root.path(), "shared");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = tern_tests::pre_dump_run(pid, &shared, None, &[]);
    run.assert_clear_failure(&[&shared.display().to_string(), "others may write"]);
    // World-writable without the sticky bit, even root's.
    let open = root.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = tern_tests::pre_dump_run(pid, &open, None, &[]);
    run.assert_clear_failure(&["others may write"]);
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);
    tern_tests::assert_exactly_as(pid, &baseline, "after the refused pre-dumps");
}

/// Modes of everything under `dir` (relative path, mode).
fn modes(dir: &Path, out: &mut Vec<(PathBuf, u32, bool)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = e.metadata().unwrap();
        out.push((e.path(), md.mode() & 0o7777, md.is_dir()));
        if md.is_dir() {
            modes(&e.path(), out);
        }
    }
}

/// `tern ARGS` under umask 022; must succeed.
fn tern_umask_022(args: &[String]) {
    let out = std::process::Command::new(tern_tests::tern_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .pre_exec_umask()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

trait PreExecUmask {
    fn pre_exec_umask(&mut self) -> &mut Self;
}

impl PreExecUmask for std::process::Command {
    fn pre_exec_umask(&mut self) -> &mut Self {
        // SAFETY: umask is async-signal-safe.
        unsafe {
            self.pre_exec(|| {
                libc::umask(0o022);
                Ok(())
            })
        }
    }
}

#[test]
fn images_and_state_are_private_under_umask_022() {
    let mut ck = CkProcess::start("files", &[], Duration::from_secs(30)).unwrap();
    let pid = ck.pid;
    let root = tempdir();
    let p1 = root.path().join("new/a/p1");
    tern_umask_022(&[
        "pre-dump".into(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        p1.display().to_string(),
    ]);
    // While tracking state exists: /run/tern.
    let run_dir = Path::new("/run/tern");
    let md = std::fs::metadata(run_dir).unwrap();
    assert_eq!(md.mode() & 0o777, 0o700, "{}", run_dir.display());
    assert_eq!(md.uid(), 0);
    let mut state = Vec::new();
    modes(run_dir, &mut state);
    assert!(!state.is_empty(), "no state in {}", run_dir.display());
    for (p, m, _) in &state {
        assert_eq!(*m, 0o600, "{} is {m:o}", p.display());
    }
    assert!(
        !run_dir.join(format!("{pid}.lock")).exists(),
        "the lock file of PID {pid} was left after the pre-dump"
    );
    let d = root.path().join("new/a/dump");
    let mut args = dump_on(pid, &d, &p1);
    args.retain(|a| a != "--json");
    tern_umask_022(&args);
    let mut all = Vec::new();
    modes(&root.path().join("new"), &mut all);
    assert!(
        all.iter().any(|(p, _, _)| p.ends_with("pipes"))
            && all.iter().any(|(p, _, _)| p.ends_with("live")),
        "the dump has no pipes/ or live/: {all:?}"
    );
    for (p, m, is_dir) in &all {
        let want = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(*m, want, "{} is {m:o}", p.display());
    }
    let key = Path::new(images::seal::KEY_DIR).join(images::seal::KEY_FILE);
    assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    untrack(pid);
    assert_eq!(ck.verdict(Duration::from_secs(30)).unwrap(), "PASS");
}

#[test]
fn failed_commands_leave_no_directory_they_made() {
    let root = tempdir();
    let missing = proc::unused_pid();
    let top = root.path().join("made");
    let d = top.join("by/tern");
    let run = tern_tests::pre_dump_run(missing, &d, None, &[]);
    run.assert_clear_failure(&[&missing.to_string()]);
    assert!(!top.exists(), "{} left behind", top.display());
    let run = tern(&[
        "dump",
        "-t",
        &missing.to_string(),
        "-D",
        &d.display().to_string(),
    ]);
    run.assert_clear_failure(&[&missing.to_string()]);
    assert!(!top.exists(), "{} left behind", top.display());
    // A directory that was there stays (empty).
    std::fs::create_dir(&top).unwrap();
    let run = tern_tests::pre_dump_run(missing, &top, None, &[]);
    run.assert_clear_failure(&[&missing.to_string()]);
    assert!(top.is_dir());
    assert_eq!(std::fs::read_dir(&top).unwrap().count(), 0);
}
