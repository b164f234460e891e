//! Multi-round pre-dump chains, one per tracking backend: after every round
//! the chain, reassembled by the test, equals the target's memory read while
//! it is stopped; with uffd-wp each round after the first writes only what
//! was dirtied (plus a little noise).

use tern_tests::pattern::frac_set;
use tern_tests::*;

struct Step {
    cmd: &'static str,
    /// Pages the step writes (for the incremental bound), None: no bound.
    dirtied: Option<u64>,
}

fn steps() -> Vec<Step> {
    vec![
        Step {
            cmd: "dirty a 0,7,100-120",
            dirtied: Some(23),
        },
        Step {
            cmd: "dirty_frac b 0.2 3",
            dirtied: Some(frac_set(256, 0.2, 3).len() as u64),
        },
        Step {
            cmd: "zap a 50 10",
            dirtied: Some(0),
        },
        Step {
            cmd: "dirty n 0-9",
            dirtied: Some(10),
        },
        Step {
            cmd: "dirty s 1-4",
            dirtied: Some(4),
        },
        Step {
            cmd: "dirty z 0-63",
            dirtied: Some(64),
        },
        Step {
            cmd: "ping",
            dirtied: Some(0),
        },
    ]
}

fn multi_round(track: Option<&str>, extra: &[&str]) {
    let mut w = Workload::start();
    w.cmd("alloc a 256 rand");
    w.cmd("alloc b 256 light");
    w.cmd("alloc z 64 zero");
    w.cmd("alloc n 64 none");
    w.cmd("alloc s 32 rand shared");
    let pid = w.pid();
    let baseline = proc::Snapshot::take(pid).unwrap();
    let mut c = Chain::new(pid, track, extra);
    let v = c.round("start");
    // Everything populated is in round 1: 256 + 256 + 32 data pages at least,
    // the 64 zero-filled pages recorded as zero pages.
    let written = v["pages_written"].as_u64().unwrap();
    assert!(
        written >= 544,
        "round 1 wrote {written} pages, populated data is at least 544: {v}"
    );
    assert!(
        v["pages_zero"].as_u64().unwrap() >= 64,
        "round 1: the 64 zero-filled pages are zero pages: {v}"
    );
    let incremental = c.expect_backend.as_deref() != Some("full");
    for s in steps() {
        w.cmd(s.cmd);
        let v = c.round(s.cmd);
        if let Some(d) = s.dirtied {
            if incremental {
                assert_incremental(&v, d, &format!("{:?} after {:?}", track, s.cmd));
            } else {
                assert!(
                    v["pages_written"].as_u64().unwrap() >= 544,
                    "full copy after {:?}: {v}",
                    s.cmd
                );
            }
        }
    }
    assert_untracked_exactly(pid, &baseline, "end of the chain");
}

#[test]
fn chain_uffd_wp() {
    multi_round(Some("uffd-wp"), &[]);
}

#[test]
fn chain_uffd_wp_no_ebpf_no_compress() {
    multi_round(Some("uffd-wp"), &["--no-ebpf", "--no-compress"]);
}

#[test]
fn chain_full() {
    multi_round(Some("full"), &[]);
}

#[test]
fn chain_auto() {
    multi_round(Some("auto"), &[]);
}

#[test]
fn chain_default_backend_is_uffd_wp() {
    let mut w = Workload::start();
    w.cmd("alloc a 64 rand");
    let mut c = Chain::new(w.pid(), None, &[]);
    c.round("start");
    w.cmd("dirty a 1-3");
    let v = c.round("dirty a 1-3");
    assert_incremental(&v, 3, "default backend");
    untrack(w.pid());
}
