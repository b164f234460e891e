//! `tern restore --lazy-pages` (issue 14): a process that runs before its
//! memory is in. The `ck_lazy` workload (tests/src/bin/ck_lazy.rs) reads
//! its self-describing pages all the time and reports at once any page
//! that reads zero or wrong; on command it changes its memory or forks.
//!
//! - one scenario per memory change the page service must follow (munmap,
//!   mremap, MADV_DONTNEED, mmap over, brk, mprotect), each made while all
//!   of its range is still lazy (`--prefetch none`; the workload says how
//!   many of its pages were missing, from pagemap);
//! - a fork while pages are lazy: the child's copy is served, never zeros;
//! - the page service SIGKILLed at 20 random moments of a fill, each time
//!   resumed with `tern lazy-pages --resume`, memory checked page for page;
//! - a page file removed or overwritten in the middle of a fill: the
//!   process is killed, the error names the address and the file, and no
//!   thread ever read a zero page.
//!
//! While a service serves, a second one for the same process is refused.
//! After every finished fill the process holds no userfaultfd and no VMA
//! is registered with one. A `--prefetch none` fill ends only when every
//! page was touched, so those scenarios finish it by killing the service
//! and resuming it with a prefetching one (which also makes the resumed
//! service learn the changes from the killed one's journal).
//!
//! The test binary is a child subreaper: the restored processes and the
//! detached page services are its orphans, reaped at once (PID 1 here
//! reaps every ~2 s, and the next restore needs the PID free).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_tests::ck::CkProcess;
use tern_tests::lazy::{self, ck_cmd, read_fails};
use tern_tests::pattern::Rng;
use tern_tests::{dump_args, pre_dump, proc, tempdir, tern};

const CMD: Duration = Duration::from_secs(60);
const END: Duration = Duration::from_secs(30);

/// Start `ck_lazy ARGS`, pre-dump it into ROOT/p1 (if `pre`), dump it into
/// ROOT/dump; the original is reaped.
fn checkpointed(args: &[&str], pre: bool) -> (CkProcess, tempfile::TempDir, PathBuf) {
    let mut ck = lazy::start_ck_lazy(args);
    let root = tempdir();
    let mut extra = Vec::new();
    let p1 = root.path().join("p1");
    if pre {
        pre_dump(ck.pid, &p1, None, &[]);
        std::thread::sleep(Duration::from_millis(100));
        extra = vec!["--prev-images-dir".to_string(), p1.display().to_string()];
    }
    let dir = root.path().join("dump");
    let e: Vec<&str> = extra.iter().map(String::as_str).collect();
    let v = tern(&dump_args(ck.pid, &dir, &e)).json();
    assert_eq!(v["killed"], true, "{v}");
    ck.release();
    (ck, root, dir)
}

/// `tern lazy-pages --resume -t PID -D DIR --json FILL...` to its end; its
/// JSON (`{pid, lazy}`).
fn resume(pid: i32, dir: &Path, fill: &[&str]) -> Value {
    let mut args: Vec<String> = vec![
        "lazy-pages".into(),
        "--resume".into(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        dir.display().to_string(),
        "--json".into(),
    ];
    args.extend(fill.iter().map(|s| s.to_string()));
    let run = tern(&args);
    let v = run.json();
    assert_eq!(
        v["pid"].as_i64(),
        Some(i64::from(pid)),
        "{}",
        run.describe()
    );
    assert_eq!(v["lazy"]["exited"], false, "{}", run.describe());
    v
}

/// The fill is over: nothing of it left in the process, all memory right
/// (page for page, the workload's own check), no reader ever saw a wrong
/// page; then the verdict (PASS) and the exit (0).
fn check_and_end(ck: &mut CkProcess, when: &str) {
    let pid = ck.pid;
    lazy::assert_fill_left_nothing(pid, when);
    let r = ck_cmd(ck, "check", CMD).unwrap_or_else(|e| panic!("{when}: {e}"));
    assert!(r.starts_with("PASS"), "{when}: check: {r}");
    let fails = read_fails(ck);
    assert!(fails.is_empty(), "{when}: {fails:#?}");
    let v = ck.verdict(END).unwrap_or_else(|e| panic!("{when}: {e}"));
    assert_eq!(v, "PASS", "{when}");
    let st = lazy::reap(pid, END).unwrap_or_else(|e| panic!("{when}: {e}"));
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "{when}: exit status {st:#x}"
    );
    // For the next restore of the same image: a fresh result file.
    std::fs::write(&ck.out, format!("ready {pid}\n")).unwrap();
}

/// Kill the `--prefetch none` service of `v` (it must still be serving),
/// finish the fill with a resumed one, and check everything.
fn finish_by_resume(ck: &mut CkProcess, v: &Value, dir: &Path, when: &str) {
    let serving =
        lazy::kill_service(lazy::service_pid(v), END).unwrap_or_else(|e| panic!("{when}: {e}"));
    assert!(
        serving,
        "{when}: the --prefetch none service ended by itself"
    );
    let r = resume(ck.pid, dir, &["--prefetch", "hot"]);
    assert!(r["lazy"]["already_in"].as_u64() > Some(0), "{when}: {r}");
    check_and_end(ck, when);
}

/// Restore lazily with nothing prefetched, make change `kind` on a range
/// still wholly lazy, check it (the workload), finish, check everything.
fn change(kind: &str) {
    let _one = serial();
    lazy::become_subreaper();
    let (mut ck, _root, dir) = checkpointed(&["--mib", "4"], true);
    let v = lazy::restore_detached(&dir, ck.pid, &["--prefetch", "none"]);
    let _cleanup = lazy::KillOnDrop(vec![ck.pid, lazy::service_pid(&v)]);
    let r = ck_cmd(&ck, &format!("change {kind}"), CMD).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r, "PASS lazy 64/64",
        "{kind} of a lazy range: the workload says {r:?} (expected all 64 pages still lazy and all right)"
    );
    // A second service of the same process is refused while this one
    // serves: two readers of one userfaultfd would each see half of the
    // events.
    let second = tern(&[
        "lazy-pages",
        "--resume",
        "-t",
        &ck.pid.to_string(),
        "-D",
        &dir.display().to_string(),
    ]);
    second.assert_clear_failure(&["another page service serves it"]);
    // A dump before the fill ends is refused before it touches the
    // process (which the checks after the resume see unharmed).
    let early = dir.with_file_name("dumped-while-lazy");
    let dump = tern(&[
        "dump",
        "-t",
        &ck.pid.to_string(),
        "-D",
        &early.display().to_string(),
        "--leave-running",
    ]);
    dump.assert_clear_failure(&["userfaultfd", "--lazy-pages"]);
    assert!(!early.exists(), "the refused dump left {}", early.display());
    finish_by_resume(&mut ck, &v, &dir, &format!("after {kind} of a lazy range"));
}

#[test]
fn munmap_of_a_lazy_range() {
    change("unmap");
}

#[test]
fn mremap_of_a_lazy_range() {
    change("remap");
}

#[test]
fn madvise_dontneed_of_a_lazy_range() {
    change("dontneed");
}

#[test]
fn mmap_over_a_lazy_range() {
    change("mapover");
}

#[test]
fn brk_shrunk_over_a_lazy_range() {
    change("brk");
}

#[test]
fn mprotect_of_a_lazy_range() {
    change("mprotect");
}

/// A child forked while most pages are lazy checks its whole copy: every
/// page served, none zero where the parent had data.
#[test]
fn fork_while_pages_are_lazy() {
    let _one = serial();
    lazy::become_subreaper();
    // Slow readers: most of `main` is still lazy at the fork.
    let (mut ck, _root, dir) = checkpointed(&["--mib", "16", "--pace", "20000"], false);
    let v = lazy::restore_detached(&dir, ck.pid, &["--prefetch", "none"]);
    let _cleanup = lazy::KillOnDrop(vec![ck.pid, lazy::service_pid(&v)]);
    let r = ck_cmd(&ck, "fork", CMD).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.starts_with("PASS"), "the forked child: {r}");
    let lazy_at_fork: u64 = r
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {r:?}"));
    assert!(
        lazy_at_fork >= 1024,
        "only {lazy_at_fork} of 4096 pages were lazy at the fork: the test shows little ({r})"
    );
    finish_by_resume(&mut ck, &v, &dir, "after a fork while lazy");
}

/// Rate of the fills the kill test interrupts: ~26 MiB in ~1.5 s.
const KILL_FILL: &[&str] = &["--prefetch-mb-s", "18"];

#[test]
fn service_killed_at_20_random_moments_then_resumed() {
    let _one = serial();
    lazy::become_subreaper();
    let (mut ck, _root, dir) = checkpointed(&["--mib", "24", "--pace", "2000"], true);
    let pid = ck.pid;
    // One whole fill, detached, to time it.
    let v = lazy::restore_detached(&dir, pid, KILL_FILL);
    let stats = lazy::wait_stats(&dir, CMD).unwrap_or_else(|e| panic!("{e}"));
    let st = lazy::reap(lazy::service_pid(&v), END).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "the page service: status {st:#x}; {stats}"
    );
    let l = &stats["lazy"];
    assert!(
        l["pages"].as_u64() > Some(4096) && l["exited"] == false,
        "lazy-stats.json: {stats}"
    );
    let fill_ms = l["fill_ms"].as_f64().unwrap();
    check_and_end(&mut ck, "after a whole detached fill");
    let mut rng = Rng::from_time();
    // Microseconds: 80% of the fill.
    let span = u64::try_from(Duration::from_secs_f64(fill_ms * 0.8e-3).as_micros()).unwrap();
    let mut already = Vec::new();
    for round in 0..20 {
        let _ = std::fs::remove_file(dir.join("lazy-stats.json"));
        let v = lazy::restore_detached(&dir, pid, KILL_FILL);
        let _cleanup = lazy::KillOnDrop(vec![pid, lazy::service_pid(&v)]);
        let delay = Duration::from_micros(rng.below(span.max(1)));
        std::thread::sleep(delay);
        let when = format!("round {round}: service killed {delay:?} into a {fill_ms:.0} ms fill");
        let serving = lazy::kill_service(lazy::service_pid(&v), END)
            .unwrap_or_else(|e| panic!("{when}: {e}"));
        assert!(serving, "{when}: the fill had already ended");
        assert!(
            proc::alive(pid),
            "{when}: the process died with its service"
        );
        // Left without a service a moment: threads wait on missing pages.
        std::thread::sleep(Duration::from_micros(rng.below(100_000)));
        let order = if round % 2 == 0 { "hot" } else { "address" };
        let r = resume(pid, &dir, &["--prefetch", order]);
        already.push(r["lazy"]["already_in"].as_u64().unwrap_or(0));
        check_and_end(&mut ck, &when);
    }
    eprintln!("20 killed fills of {fill_ms:.0} ms; pages already in at the resumes: {already:?}");
}

/// The pages file of the chain's older image turns unreadable `how` while
/// the fill still has pages to bring: the process must die of SIGKILL, the
/// service's error must name an address served from that image and the
/// file, and no thread may ever have read a zero page.
fn unreadable(how: &str) {
    let _one = serial();
    lazy::become_subreaper();
    let (ck, root, dir) = checkpointed(&["--mib", "24", "--pace", "2000"], true);
    let pid = ck.pid;
    let p1 = root.path().join("p1");
    let pages = p1.join("pages.img");
    let chain = restorer::ImageChain::open(&dir).unwrap();
    let v = lazy::restore_detached(&dir, pid, &["--prefetch-mb-s", "4"]);
    let _cleanup = lazy::KillOnDrop(vec![pid, lazy::service_pid(&v)]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !dir.join("lazy-stats.json").exists(),
        "the fill ended within 300 ms at 4 MB/s: nothing left to make unreadable"
    );
    match how {
        "removed" => std::fs::remove_file(&pages).unwrap(),
        "overwritten" => {
            // In place, same length: only the CRCs can tell.
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&pages)
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.write_all_at(&vec![0x5a; usize::try_from(len).unwrap()], 0)
                .unwrap();
            f.sync_all().unwrap();
        }
        _ => unreachable!(),
    }
    let t = Instant::now();
    let stats = lazy::wait_stats(&dir, CMD).unwrap_or_else(|e| panic!("{e}"));
    let st = lazy::reap(pid, END).unwrap_or_else(|e| {
        panic!(
            "{} {how}: {e}; the page service said {stats}; threads {:?}",
            pages.display(),
            proc::tids(pid)
                .iter()
                .map(|&t| (t, proc::task_state(pid, t)))
                .collect::<Vec<_>>()
        )
    });
    assert!(
        libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
        "{} {how}: the process ended with status {st:#x}, not by SIGKILL ({:?} later); {stats}",
        pages.display(),
        t.elapsed()
    );
    let err = stats["error"]
        .as_str()
        .unwrap_or_else(|| panic!("lazy-stats.json has no error: {stats}"));
    assert!(
        err.contains(&pages.display().to_string()),
        "the error does not name {}: {err}",
        pages.display()
    );
    if how == "removed" {
        assert!(err.contains("removed"), "{err}");
    }
    let addr = err
        .split("the page at 0x")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_hexdigit()).next())
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("the error names no address (\"the page at 0x...\"): {err}"));
    match chain.source(addr) {
        restorer::PageSource::Data { image, .. } => assert!(
            chain.images[image].dir.ends_with("p1"),
            "the error names {addr:#x}, whose data is in {}, not in {}: {err}",
            chain.images[image].dir.display(),
            p1.display()
        ),
        other => {
            panic!("the error names {addr:#x}, which has no data in the chain ({other:?}): {err}")
        }
    }
    let sst = lazy::reap(lazy::service_pid(&v), END).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        libc::WIFEXITED(sst) && libc::WEXITSTATUS(sst) != 0,
        "the page service exited with status {sst:#x} after failing: {err}"
    );
    let fails = read_fails(&ck);
    assert!(fails.is_empty(), "a reader saw wrong memory: {fails:#?}");
    assert!(
        !ck.lines()
            .iter()
            .any(|l| l == "PASS" || l.starts_with("FAIL")),
        "the workload went on to a verdict: {:?}",
        ck.lines()
    );
}

#[test]
fn page_file_removed_during_the_fill_kills_the_process() {
    unreadable("removed");
}

#[test]
fn page_file_overwritten_during_the_fill_kills_the_process() {
    unreadable("overwritten");
}

/// Serialises the tests of this file: the kill and unreadable tests time
/// their fills, which other workloads spinning on the 2 cores would skew.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
