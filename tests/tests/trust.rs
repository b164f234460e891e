//! Images cannot escalate privileges (README, "Trust and permissions"):
//! a restore gives a process nothing its image's writer could not give,
//! nothing the restoring user lacks, and nothing the dumped process did not
//! have; an image changed after tern wrote it on this host is refused.
//!
//! The workload is `ck_creds`: a process of uid 1001 holding fd 10 on a
//! file of its own, or a root process that dropped two capabilities.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tern_tests::ck::CkProcess;
use tern_tests::{
    copy_dir, dump_args, edit_json, refused, restore_detached, strip_seal, tempdir, tern,
    workload_bin,
};

const READY: Duration = Duration::from_secs(30);
const USER: u32 = 1001;

fn start(mode: &str) -> CkProcess {
    CkProcess::start_program("creds", &workload_bin("ck_creds"), &["--mode", mode], READY)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Dump `ck` (killed) into `root/dump` after one pre-dump; the chain's
/// directories.
fn dump(ck: &mut CkProcess, root: &Path) -> (PathBuf, PathBuf) {
    let p1 = root.join("p1");
    tern_tests::pre_dump(ck.pid, &p1, None, &[]);
    let d = root.join("dump");
    let p1s = p1.display().to_string();
    tern(&dump_args(ck.pid, &d, &["--prev-images-dir", &p1s])).json();
    ck.release();
    (p1, d)
}

fn chown_tree(dir: &Path, uid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            chown_tree(&p, uid);
        } else {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
        }
    }
}

/// A copy of the chain `p1`, `dump` under `root/name` (the dump's parent
/// link is relative: it follows).
fn copy_chain(p1: &Path, d: &Path, root: &Path, name: &str) -> PathBuf {
    let base = root.join(name);
    copy_dir(p1, &base.join("p1"));
    copy_dir(d, &base.join("dump"));
    base.join("dump")
}

/// `/proc/PID/status` field `name`, whitespace-normalized.
fn status(pid: i32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(name).map(|v| {
                v.trim_start_matches(':')
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
        })
        .unwrap_or_default()
}

/// The maps and fds of `pid` (see `proc::shape`).
fn shape(pid: i32) -> Vec<String> {
    tern_tests::proc::shape(pid).unwrap_or_else(|e| panic!("{e}"))
}

/// Restore `dir` detached; the process must come back with the maps and
/// fds it had (`before`), nothing of tern's, and pass its checks.
fn restores(dir: &Path, ck: &mut CkProcess, before: &[String], what: &str) {
    restore_detached(dir, ck.pid);
    let diff = tern_tests::proc::shape_diff(before, &shape(ck.pid));
    assert!(
        diff.is_empty(),
        "{what}: the restored process's maps or fds differ from the original's:{diff}"
    );
    assert_eq!(ck.verdict(READY).unwrap(), "PASS", "{what}");
}

#[test]
fn an_fd_edited_to_name_etc_shadow_is_refused() {
    let root = tempdir();
    let mut ck = start("user");
    let pid = ck.pid;
    let before = shape(pid);
    let (p1, d) = dump(&mut ck, root.path());
    // Edited in place (as root: the files stay root's): the seal says so.
    let edit = |dump: &Path| {
        edit_json(&dump.join(images::process::PROCESS_FILE), |v| {
            for f in v["fds"].as_array_mut().unwrap() {
                if f["info"]["fd"] == 10 {
                    f["info"]["kind"]["File"]["path"] = "/etc/shadow".into();
                }
            }
        })
    };
    let sealed = copy_chain(&p1, &d, root.path(), "sealed");
    edit(&sealed);
    refused(
        &sealed,
        pid,
        &["changed after tern wrote it", "fd 10 (/etc/shadow)"],
        None,
    );
    // Edited by the process's user, in a copy they own, seal removed: the
    // file is opened as that user would, and uid 1001 cannot.
    let theirs = copy_chain(&p1, &d, root.path(), "theirs");
    edit(&theirs);
    strip_seal(&theirs);
    strip_seal(&theirs.parent().unwrap().join("p1"));
    chown_tree(theirs.parent().unwrap(), USER);
    refused(
        &theirs,
        pid,
        &["fd 10 (/etc/shadow)", "uid 1001", "cannot open"],
        None,
    );
    // The unedited image in the user's hands restores, as uid 1001, fd 10
    // on its own file.
    let good = copy_chain(&p1, &d, root.path(), "good");
    chown_tree(good.parent().unwrap(), USER);
    restores(&good, &mut ck, &before, "the user's unedited image");
}

#[test]
fn an_image_edited_to_uid_0_is_refused() {
    let root = tempdir();
    let mut ck = start("user");
    let pid = ck.pid;
    let before = shape(pid);
    let (p1, d) = dump(&mut ck, root.path());
    let to_root = |dump: &Path| {
        edit_json(&dump.join(images::process::PROCESS_FILE), |v| {
            v["creds"]["uid"] = serde_json::json!([0, 0, 0, 0]);
        })
    };
    let sealed = copy_chain(&p1, &d, root.path(), "sealed");
    to_root(&sealed);
    refused(&sealed, pid, &["changed after tern wrote it"], None);
    let theirs = copy_chain(&p1, &d, root.path(), "theirs");
    to_root(&theirs);
    strip_seal(&theirs);
    chown_tree(theirs.parent().unwrap(), USER);
    refused(
        &theirs,
        pid,
        &["uid 1001", "[0, 0, 0, 0]", "cannot give"],
        None,
    );
    // Capabilities written into a user's image: refused too.
    let caps = copy_chain(&p1, &d, root.path(), "caps");
    edit_json(&caps.join(images::process::PROCESS_FILE), |v| {
        v["creds"]["cap_prm"] = (1u64 << 21).into();
        v["creds"]["cap_eff"] = (1u64 << 21).into();
    });
    strip_seal(&caps);
    chown_tree(caps.parent().unwrap(), USER);
    refused(&caps, pid, &["cap_sys_admin", "uid 1001"], None);
    // A user-owned copy of an image of a root process: the user could not
    // have made it, so it is refused although nothing in it was changed.
    let mut rootck = start("root-less-caps");
    let rootpid = rootck.pid;
    let r = tempdir();
    let (rp1, rd) = dump(&mut rootck, r.path());
    let stolen = copy_chain(&rp1, &rd, r.path(), "stolen");
    chown_tree(stolen.parent().unwrap(), USER);
    refused(&stolen, rootpid, &["uid 1001", "[0, 0, 0, 0]"], None);
    // The untouched image still restores.
    restores(&d, &mut ck, &before, "the untouched image");
}

/// Drop CAP_SYS_NICE from this process's every set (run in the child tern
/// is started as, before exec).
fn without_cap_sys_nice() -> std::io::Result<()> {
    // SAFETY: prctl and capget/capset on this (single-threaded) child.
    unsafe {
        if libc::prctl(libc::PR_CAPBSET_DROP, 23, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut hdr = [0x2008_0522u32, 0];
        let mut data = [0u32; 6];
        if libc::syscall(libc::SYS_capget, hdr.as_mut_ptr(), data.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for word in data.iter_mut().take(3) {
            *word &= !(1 << 23);
        }
        if libc::syscall(libc::SYS_capset, hdr.as_mut_ptr(), data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn capabilities_come_back_exactly_and_never_beyond_the_restoring_user() {
    let root = tempdir();
    // A root process that shed cap_sys_admin and cap_sys_nice.
    let mut ck = start("root-less-caps");
    let pid = ck.pid;
    let before = (
        status(pid, "CapEff"),
        status(pid, "CapPrm"),
        status(pid, "CapBnd"),
    );
    let shape_before = shape(pid);
    let (_, d) = dump(&mut ck, root.path());
    let mut full = ck;
    let img: Value =
        serde_json::from_slice(&std::fs::read(d.join(images::process::PROCESS_FILE)).unwrap())
            .unwrap();
    let prm = img["creds"]["cap_prm"].as_u64().unwrap();
    assert_eq!(
        prm & (1 << 23 | 1 << 21),
        0,
        "the workload kept what it dropped: {prm:#x}"
    );
    // An image asking for cap_sys_nice (root's own edit, so unsealed),
    // restored by a tern that lacks it: refused.
    // (A sibling of the dump: its parent link, ../p1, still resolves.)
    let asks = root.path().join("asks");
    copy_dir(&d, &asks);
    edit_json(&asks.join(images::process::PROCESS_FILE), |v| {
        v["creds"]["cap_prm"] = (prm | 1 << 23).into();
        v["creds"]["cap_eff"] = (prm | 1 << 23).into();
    });
    strip_seal(&asks);
    refused(
        &asks,
        pid,
        &["cap_sys_nice", "does not hold"],
        Some(without_cap_sys_nice),
    );
    // The real image, restored by root: the process gets exactly its sets
    // back (not root's full ones), and its maps and fds.
    restore_detached(&d, pid);
    let diff = tern_tests::proc::shape_diff(&shape_before, &shape(pid));
    assert!(
        diff.is_empty(),
        "the restored process's maps or fds differ from the original's:{diff}"
    );
    let after = (
        status(pid, "CapEff"),
        status(pid, "CapPrm"),
        status(pid, "CapBnd"),
    );
    assert_eq!(
        after, before,
        "capabilities (eff, prm, bnd) after the restore"
    );
    assert_eq!(full.verdict(READY).unwrap(), "PASS");
}

#[test]
fn a_user_written_restore_opens_files_as_the_user() {
    // The file system ids a restore takes for a user's image: the
    // restored process's own view of the kernel (its fd table opened as
    // uid 1001) matches, and a file only root may read, named by a fd,
    // stops the restore before the process exists.
    let root = tempdir();
    let mut ck = start("user");
    let pid = ck.pid;
    let (p1, d) = dump(&mut ck, root.path());
    let secret = root.path().join("root-only");
    std::fs::write(&secret, b"secret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let theirs = copy_chain(&p1, &d, root.path(), "theirs");
    let secret_s = secret.display().to_string();
    edit_json(&theirs.join(images::process::PROCESS_FILE), |v| {
        for f in v["fds"].as_array_mut().unwrap() {
            if f["info"]["fd"] == 10 {
                f["info"]["kind"]["File"]["path"] = secret_s.clone().into();
            }
        }
    });
    strip_seal(&theirs);
    chown_tree(theirs.parent().unwrap(), USER);
    // The directory above the chain is root's and 0700: uid 1001 cannot
    // even reach the file.
    refused(&theirs, pid, &["fd 10", &secret_s], None);
    drop(ck);
}
