//! `tern check` tells the truth about this machine (issue 2, item 2): Linux
//! 6.18 without soft-dirty, with async uffd write-protect and PAGEMAP_SCAN.

use tern_tests::*;

const FEATURES: [&str; 10] = [
    "uffd",
    "uffd_wp",
    "uffd_wp_async",
    "pagemap_scan",
    "soft_dirty",
    "ebpf_tracepoints",
    "pidfd_getfd",
    "suspend_seccomp",
    "clone3_set_tid",
    "rseq_config",
];

/// Independent probe: does the kernel keep soft-dirty bits? Dirty a page of
/// a workload after clearing its bits and look at pagemap bit 55.
fn soft_dirty_works() -> bool {
    let mut w = Workload::start();
    let a = addr_of(&w.cmd("alloc p 4 light"));
    std::fs::write(format!("/proc/{}/clear_refs", w.pid()), "4").expect("clear_refs");
    w.cmd("dirty p 1");
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{}/pagemap", w.pid())).unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, (a / 4096 + 1) * 8).unwrap();
    u64::from_le_bytes(e) & (1 << 55) != 0
}

#[test]
fn check_json_is_truthful_here() {
    let run = tern(&["check", "--json"]);
    let v = run.json();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let k = v["kernel"]
        .as_str()
        .unwrap_or_else(|| panic!("no kernel string: {v}"));
    assert!(
        k.contains(kernel.trim()),
        "kernel {k:?}, uname -r says {:?}",
        kernel.trim()
    );
    let f = &v["features"];
    for name in FEATURES {
        assert!(
            f[name].is_boolean(),
            "features.{name} is not a boolean: {v}"
        );
    }
    // What this machine's kernel (6.18, x86_64) has: README, "Kernels and
    // architectures".
    assert_eq!(
        f["soft_dirty"], false,
        "soft-dirty is not compiled in here: {v}"
    );
    assert!(
        !soft_dirty_works(),
        "the independent probe found soft-dirty working; tern check says {v}"
    );
    for name in ["uffd", "uffd_wp", "uffd_wp_async", "pagemap_scan"] {
        assert_eq!(f[name], true, "{name} works here: {v}");
    }
    for name in [
        "ebpf_tracepoints",
        "pidfd_getfd",
        "suspend_seccomp",
        "rseq_config",
        "clone3_set_tid",
    ] {
        assert_eq!(
            f[name], true,
            "{name} works on this machine's kernel (README, Kernels and architectures): {v}"
        );
    }
    assert_eq!(v["backend"], "uffd-wp", "{v}");
}

#[test]
fn check_human_output_names_every_feature() {
    let run = tern(&["check"]);
    assert!(run.ok(), "{}", run.describe());
    let out = run.stdout.to_lowercase();
    for name in FEATURES {
        let alt = name.replace('_', "-");
        assert!(
            out.contains(name) || out.contains(&alt),
            "human output does not mention {name}:\n{}",
            run.describe()
        );
    }
    assert!(
        run.stdout.lines().filter(|l| !l.trim().is_empty()).count() >= FEATURES.len(),
        "expected one line per feature:\n{}",
        run.describe()
    );
}
