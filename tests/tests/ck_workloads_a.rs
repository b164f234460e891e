//! The self-checking workloads ck_memory, ck_threads, ck_signals and ck_fpu
//! pass on their own and fail when their state is damaged (`--break`), so a
//! PASS after a restore means something.

use std::time::Duration;

use tern_tests::ck::CkProcess;

const T: Duration = Duration::from_secs(30);

fn verdict(name: &str, args: &[&str]) -> String {
    let mut ck = CkProcess::start(name, args, T).unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_millis(300));
    ck.verdict(T).unwrap_or_else(|e| panic!("{e}"))
}

fn passes_and_breaks(name: &str, args: &[&str], must_name: &str) {
    assert_eq!(verdict(name, args), "PASS", "ck_{name} untouched");
    let mut a = args.to_vec();
    a.push("--break");
    let v = verdict(name, &a);
    assert!(
        v.starts_with("FAIL") && v.contains(must_name),
        "ck_{name} --break said {v:?}"
    );
}

#[test]
fn memory() {
    passes_and_breaks("memory", &["--mib", "8"], "page 3");
}

#[test]
fn threads() {
    passes_and_breaks("threads", &[], "broken");
}

#[test]
fn signals() {
    passes_and_breaks("signals", &[], "signal 28");
}

#[test]
fn fpu() {
    passes_and_breaks("fpu", &[], "ymm");
}
