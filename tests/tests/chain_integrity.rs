//! A damaged chain never restores silently wrong, and every check that can
//! be made before a process exists is made then (README, "Trust and
//! permissions"):
//! - `"parent": null` written into a middle image (the chain cut short) is
//!   refused, naming that image, whether or not it is sealed;
//! - a damaged page blob in any image of the chain, and an mm field the
//!   kernel would refuse (PR_SET_MM_MAP), are refused before any process
//!   with the image's PID exists (the PID is polled all along).

use std::time::Duration;

use serde_json::Value;
use tern_tests::ck::CkProcess;
use tern_tests::{
    copy_dir, dump_args, edit_json, pre_dump, refused, restore_detached, tempdir, tern,
};

const READY: Duration = Duration::from_secs(30);

/// A chain p1 <- p2 <- p3 <- dump of ck_memory, under `root/name`.
struct Chain {
    pid: i32,
    ck: CkProcess,
    root: tempfile::TempDir,
}

impl Chain {
    fn new() -> Chain {
        let mut ck = CkProcess::start("memory", &["--mib", "16"], READY).unwrap();
        let root = tempdir();
        let mut prev = None::<std::path::PathBuf>;
        for i in 1..=3 {
            let d = root.path().join(format!("good/p{i}"));
            pre_dump(ck.pid, &d, prev.as_deref(), &[]);
            prev = Some(d);
            std::thread::sleep(Duration::from_millis(30));
        }
        let d = root.path().join("good/dump");
        let prev = prev.unwrap().display().to_string();
        tern(&dump_args(
            ck.pid,
            &d,
            &["--prev-images-dir", &prev, "--live-rounds", "0"],
        ))
        .json();
        ck.release();
        Chain {
            pid: ck.pid,
            ck,
            root,
        }
    }

    /// A copy of the whole chain, to damage.
    fn copy(&self, name: &str) -> std::path::PathBuf {
        let to = self.root.path().join(name);
        copy_dir(&self.root.path().join("good"), &to);
        to
    }
}

#[test]
fn a_chain_cut_short_is_refused() {
    let c = Chain::new();
    for sealed in [true, false] {
        let base = c.copy(if sealed { "cut-sealed" } else { "cut" });
        let inv = base.join("p2").join(images::INVENTORY_FILE);
        edit_json(&inv, |v| {
            v["parent"] = Value::Null;
            if !sealed {
                v.as_object_mut().unwrap().remove("seal");
            }
        });
        refused(
            &base.join("dump"),
            c.pid,
            &[&inv.display().to_string(), "not a full image"],
            None,
        );
        // `tern show` says the same.
        let run = tern(&["show", &base.join("dump").display().to_string()]);
        run.assert_clear_failure(&["not a full image"]);
    }
    // A parent link to an image of the same chain that is not the one it
    // was taken on: the ids disagree.
    let base = c.copy("skip");
    edit_json(&base.join("p3").join(images::INVENTORY_FILE), |v| {
        v["parent"]["path"] = "../p1".into();
    });
    refused(&base.join("dump"), c.pid, &["p3", "replaced"], None);
}

#[test]
fn damage_found_after_the_start_is_refused_before_any_process_exists() {
    let c = Chain::new();
    // A flipped byte in the data of a middle pre-dump, in a blob the
    // restore takes data from (p2's, or p3's if the workload rewrote all of
    // p2's pages before p3: the lower half of `big` is written once, but a
    // slow machine can stretch the rounds; on a loaded one all of both can
    // be rewritten before the dump, and then the first image's, which holds
    // that lower half, is the one damaged).
    let base = c.copy("blob");
    let chain = restorer::ImageChain::open(&base.join("dump")).unwrap();
    let (middle, used) = ["p2", "p3", "p1"]
        .iter()
        .find_map(|name| {
            let img = images::Image::open(&base.join(name)).unwrap();
            img.pagemap
                .entries
                .iter()
                .find(|e| {
                    e.kind == images::PageKind::Data
                        && matches!(chain.source(e.start), restorer::PageSource::Data { image, .. } if chain.images[image].dir.ends_with(name))
                })
                .copied()
                .map(|e| (*name, e))
        })
        .expect("p1, p2 or p3 provides some page of the final image");
    drop(chain);
    let pages = base.join(middle).join(images::PAGES_FILE);
    let mut b = std::fs::read(&pages).unwrap();
    b[sys::usize_of(used.offset())] ^= 0xff;
    std::fs::write(&pages, &b).unwrap();
    refused(
        &base.join("dump"),
        c.pid,
        &["pages.img", "checksum", &format!("{:#x}", used.start)],
        None,
    );
    // An mm field out of order (seal removed: as its owner edited it).
    let base = c.copy("mm");
    edit_json(
        &base.join("dump").join(images::process::PROCESS_FILE),
        |v| {
            let end = v["mm"]["end_code"].clone();
            v["mm"]["start_code"] = end;
        },
    );
    edit_json(&base.join("dump").join(images::INVENTORY_FILE), |v| {
        v.as_object_mut().unwrap().remove("seal");
    });
    refused(&base.join("dump"), c.pid, &["PR_SET_MM_MAP"], None);
    // The good chain still restores, and passes its checks.
    let mut ck = c.ck;
    restore_detached(&c.root.path().join("good/dump"), c.pid);
    assert_eq!(ck.verdict(READY).unwrap(), "PASS");
}
