//! What the "Done when" measures: a 1 GiB process dirtying ~2% of
//! its pages between two pre-dumps gets a second pre-dump of that set plus a
//! small margin, nearly unfrozen, memory intact; and the eBPF stream sees at
//! least 99% of the user-mode first writes the kernel reports.
//!
//! The `soft_dirty` tests run the same checks with `--track soft-dirty`. This
//! host's kernel has no soft-dirty, so they are `#[ignore]`d here and run
//! inside Debian's 6.1 kernel by `cargo xtask vm-test x86-softdirty`; run
//! where soft-dirty is missing they fail (tern refuses the backend), they
//! never pass by skipping.

use std::time::{Duration, Instant};
use tern_tests::pattern::frac_set;
use tern_tests::*;

const GIB_PAGES: u64 = 262_144;

#[test]
fn one_gib_two_percent_dirty() {
    two_percent_dirty("uffd-wp", GIB_PAGES);
}

#[test]
#[ignore = "needs a soft-dirty kernel (x86 Linux <= 6.6); run by cargo xtask vm-test x86-softdirty"]
fn one_gib_two_percent_dirty_soft_dirty() {
    two_percent_dirty("soft-dirty", GIB_PAGES);
}

/// `pages` pages filled, a first pre-dump, 2% of the pages rewritten, a
/// second pre-dump with `--track track`: it must write those pages and at
/// most 1% of the region more, with the target frozen only as long as the
/// backend needs, and the chain must equal the target's memory.
fn two_percent_dirty(track: &str, pages: u64) {
    let soft_dirty = track == "soft-dirty";
    if soft_dirty {
        // Soft-dirty is kept per page table entry, and a transparent huge
        // page has one (the PMD): one write marks all 512 of its pages.
        // With THP "always" (Debian's 6.1 default) a 2% random write set
        // touches nearly every huge page, and the precision measured would
        // be the huge page's, not the backend's per-page tracking.
        assert_thp_not_always("soft-dirty's per-page precision");
    }
    let mut w = Workload::start();
    let t = Instant::now();
    w.cmd(&format!("alloc big {pages} light populate"));
    eprintln!("filled {} MiB in {:?}", pages / 256, t.elapsed());
    let pid = w.pid();
    let baseline = proc::Snapshot::take(pid).unwrap();
    let d = tempdir();
    let (d1, d2) = (d.path().join("1"), d.path().join("2"));
    // Uncompressed: lz4 of 1 GiB in a debug build of tern is what would
    // dominate the run time otherwise; compression is covered elsewhere.
    let flags = ["--track", track, "--no-compress"];
    let v1 = pre_dump(pid, &d1, None, &flags);
    eprintln!("pre-dump 1: {v1}");
    assert_eq!(v1["backend"], track, "{v1}");
    assert!(v1["pages_written"].as_u64().unwrap() >= pages, "{v1}");

    let set = frac_set(pages, 0.02, 2024);
    let n = set.len() as u64;
    w.cmd("dirty_frac big 0.02 2024");
    let v2 = pre_dump(pid, &d2, Some(&d1), &flags);
    eprintln!("pre-dump 2 ({n} pages dirtied): {v2}");
    let written = v2["pages_written"].as_u64().unwrap();
    let margin = pages / 100;
    let (frozen, duration) = (num(&v2, "frozen_ms"), num(&v2, "duration_ms"));
    // One line the VM lane prints on the host.
    println!(
        "precision {track}: {} MiB, {n} pages dirtied, second pre-dump wrote {written} (allowed {n}..={}), frozen {frozen:.1} ms of {duration:.1} ms (first pre-dump: {:.1} ms of {:.1} ms), eBPF saw {} pages (ebpf {})",
        pages / 256,
        n + margin,
        num(&v1, "frozen_ms"),
        num(&v1, "duration_ms"),
        v2["ebpf_pages"],
        v2["ebpf"]
    );
    assert!(
        written >= n && written <= n + margin,
        "second pre-dump wrote {written} pages; dirtied {n}, allowed up to {} (+1% of the region): {v2}",
        n + margin
    );
    if soft_dirty {
        // Soft-dirty bits must be read and cleared with no write in
        // between: tern freezes the target for the pagemap read and
        // clear_refs (a walk of every page table of the process), so
        // frozen_ms is not ~0 as with uffd-wp; it is about the same in both
        // rounds, since both walk the whole region. The copy runs with the
        // target live: the first round, which copied all of it, must have
        // been frozen for a small part of its run.
        let (frozen1, duration1) = (num(&v1, "frozen_ms"), num(&v1, "duration_ms"));
        assert!(
            frozen1 > 0.0 && frozen > 0.0,
            "soft-dirty reports no frozen time (it freezes to read and clear the bits): {v1} {v2}"
        );
        assert!(
            frozen1 < duration1 / 10.0,
            "first pre-dump frozen {frozen1} ms of {duration1} ms: the copy of {pages} pages ran frozen? {v1}"
        );
        assert!(
            frozen < duration,
            "second pre-dump frozen {frozen} ms of {duration} ms: {v2}"
        );
    } else {
        assert!(
            frozen < 5.0,
            "frozen_ms {frozen} with uffd-wp (expected near 0): {v2}"
        );
    }
    if v2["ebpf"] == true {
        let e = v2["ebpf_pages"].as_u64().unwrap_or(0);
        assert!(
            e as f64 >= 0.99 * n as f64,
            "eBPF saw {e} of the {n} pages written from user mode (< 99%): {v2}"
        );
    }
    let t = Instant::now();
    let r = assert_oracle(pid, &d2, &format!("{} MiB, second pre-dump", pages / 256));
    eprintln!(
        "oracle over {} pages in {:?}",
        r.pages_compared,
        t.elapsed()
    );
    assert!(r.pages_compared >= pages);
    assert_untracked_exactly(pid, &baseline, &format!("{track} precision test"));
}

/// Sum the track lines; returns (kernel, ebpf, both).
fn track_totals(lines: &[serde_json::Value]) -> (u64, u64, u64) {
    let mut t = (0, 0, 0);
    for l in lines {
        t.0 += l["kernel_pages"].as_u64().unwrap();
        t.1 += l["ebpf_pages"].as_u64().unwrap();
        t.2 += l["both"].as_u64().unwrap();
    }
    t
}

#[test]
fn track_ebpf_sees_user_first_writes() {
    track_ebpf_sees_user_first_writes_with("uffd-wp");
}

#[test]
#[ignore = "needs a soft-dirty kernel (x86 Linux <= 6.6); run by cargo xtask vm-test x86-softdirty"]
fn track_ebpf_sees_user_first_writes_soft_dirty() {
    // A THP write-protected by clear_refs faults once for its 512 pages
    // (see ebpf_pages_cover_user_writes).
    assert_thp_not_always("tern track's eBPF recall with soft-dirty");
    track_ebpf_sees_user_first_writes_with("soft-dirty");
}

/// `tern track --track backend` over 1 s of a workload writing 5% of 64 MiB
/// every 20 ms: the kernel's set is large, the eBPF stream saw at least 99%
/// of it, and the target is left exactly as found.
fn track_ebpf_sees_user_first_writes_with(backend: &str) {
    let mut w = Workload::start();
    w.cmd("alloc big 16384 light"); // 64 MiB
    // Every 20 ms, one write to each page of a fresh random 5% of the region.
    w.cmd("bg big 0.05 7 20");
    let pid = w.pid();
    std::thread::sleep(Duration::from_millis(50));
    let baseline = proc::Snapshot::take(pid).unwrap();
    let run = tern(&[
        "track",
        "-t",
        &pid.to_string(),
        "--interval-ms",
        "200",
        "--rounds",
        "5",
        "--track",
        backend,
        "--json",
    ]);
    assert!(run.ok(), "{}", run.describe());
    let lines = run.json_lines();
    assert_eq!(lines.len(), 5, "one line per round:\n{}", run.describe());
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["backend"], backend, "track line {i}: {l}");
        for f in [
            "round",
            "frozen_ms",
            "t_ms",
            "kernel_pages",
            "ebpf_pages",
            "both",
            "kernel_only",
            "ebpf_only",
            "dirty_rate_mb_s",
        ] {
            assert!(l.get(f).is_some(), "track line {i} lacks {f:?}: {l}");
        }
        let (k, b, ko) = (
            l["kernel_pages"].as_u64().unwrap(),
            l["both"].as_u64().unwrap(),
            l["kernel_only"].as_u64().unwrap(),
        );
        assert_eq!(k, b + ko, "kernel_pages = both + kernel_only: {l}");
        let (e, eo) = (
            l["ebpf_pages"].as_u64().unwrap(),
            l["ebpf_only"].as_u64().unwrap(),
        );
        assert_eq!(e, b + eo, "ebpf_pages = both + ebpf_only: {l}");
    }
    let (k, _e, b) = track_totals(&lines);
    eprintln!("track: kernel {k}, both {b}; lines: {}", run.stdout.trim());
    assert!(
        k > 2000,
        "the kernel saw only {k} dirtied pages in 1 s of writing ~800 pages every 20 ms"
    );
    assert!(
        b as f64 >= 0.99 * k as f64,
        "eBPF saw {b} of the {k} pages the kernel reported written (< 99%):\n{}",
        run.stdout
    );
    let rate: f64 =
        lines.iter().map(|l| num(l, "dirty_rate_mb_s")).sum::<f64>() / lines.len() as f64;
    assert!(
        rate > 1.0,
        "dirty rate {rate} MB/s while writing ~160 MB/s of pages"
    );
    // Telemetry only: the target is exactly as found.
    assert_exactly_as(pid, &baseline, "after tern track");
    w.cmd("bg_stop");
}

#[test]
fn track_between_pre_dumps_keeps_the_chain_right() {
    track_between_pre_dumps("uffd-wp");
}

#[test]
#[ignore = "needs a soft-dirty kernel (x86 Linux <= 6.6); run by cargo xtask vm-test x86-softdirty"]
fn track_between_soft_dirty_pre_dumps_keeps_the_chain_right() {
    assert_thp_not_always("the pages of a soft-dirty chain around a tern track");
    track_between_pre_dumps("soft-dirty");
}

/// A `tern track` between two pre-dumps consumes the dirty state the chain
/// relies on (re-protected pages, cleared soft-dirty bits): the pages
/// written before it and after it must all be in the next image, and only
/// those.
fn track_between_pre_dumps(backend: &str) {
    let mut w = Workload::start();
    w.cmd("alloc a 256 rand");
    let pid = w.pid();
    let mut c = Chain::new(pid, Some(backend), &[]);
    c.round("start");
    w.cmd("dirty a 0-9");
    let run = tern(&[
        "track",
        "-t",
        &pid.to_string(),
        "--interval-ms",
        "50",
        "--rounds",
        "2",
        "--track",
        backend,
        "--json",
    ]);
    assert!(run.ok(), "{}", run.describe());
    let lines = run.json_lines();
    assert_eq!(lines.len(), 2, "one line per round:\n{}", run.describe());
    assert_eq!(lines[0]["backend"], backend, "{}", run.stdout);
    w.cmd("dirty a 100-109");
    // Pages dirtied before and after the track must both be in the next image.
    let v = c.round("dirty, track, dirty");
    assert_incremental(&v, 20, &format!("writes around a tern track ({backend})"));
    untrack(pid);
}

#[test]
fn pre_dump_ebpf_pages_cover_user_writes() {
    ebpf_pages_cover_user_writes(None);
}

#[test]
#[ignore = "needs a soft-dirty kernel (x86 Linux <= 6.6); run by cargo xtask vm-test x86-softdirty"]
fn pre_dump_ebpf_pages_cover_user_writes_soft_dirty() {
    ebpf_pages_cover_user_writes(Some("soft-dirty"));
}

/// Two pre-dumps (`--track track`, tern's default when None) with 10% of a
/// 64 MiB region written between them: the eBPF stream, reloaded by the
/// second invocation from its pins, saw at least 99% of those writes.
fn ebpf_pages_cover_user_writes(track: Option<&str>) {
    if track == Some("soft-dirty") {
        // clear_refs write-protects a transparent huge page as one PMD: the
        // first write to it faults once (one eBPF event) and makes all 512
        // pages writable and soft-dirty. With THP "always" the 6.1 guest
        // measured 84 eBPF pages of 1704 written, and 15925 pages copied.
        assert_thp_not_always("the eBPF recall with soft-dirty");
    }
    let mut w = Workload::start();
    w.cmd("alloc big 16384 light");
    let pid = w.pid();
    let d = tempdir();
    let (d1, d2) = (d.path().join("1"), d.path().join("2"));
    let flags: Vec<&str> = track.map(|t| vec!["--track", t]).unwrap_or_default();
    let v1 = pre_dump(pid, &d1, None, &flags);
    if let Some(t) = track {
        assert_eq!(v1["backend"], t, "{v1}");
    }
    assert_eq!(
        v1["ebpf"], true,
        "eBPF tracepoints work here, the pre-dump should use them: {v1}"
    );
    let n = frac_set(16384, 0.1, 5).len() as u64;
    w.cmd("dirty_frac big 0.1 5");
    let v2 = pre_dump(pid, &d2, Some(&d1), &flags);
    assert_eq!(v2["ebpf"], true, "{v2}");
    let e = v2["ebpf_pages"].as_u64().unwrap();
    println!(
        "eBPF recall ({}): {e} of {n} pages written between two pre-dumps; the second wrote {}",
        v2["backend"], v2["pages_written"]
    );
    assert!(
        e as f64 >= 0.99 * n as f64,
        "separate invocations: eBPF saw {e} of {n} pages written between them (< 99%): {v2}"
    );
    assert_incremental(&v2, n, "10% dirtied");
    assert_oracle(pid, &d2, "after the eBPF round");
    // --no-ebpf: says so.
    let d3 = d.path().join("3");
    let mut no_ebpf = flags.clone();
    no_ebpf.push("--no-ebpf");
    let v3 = pre_dump(pid, &d3, Some(&d2), &no_ebpf);
    assert_eq!(v3["ebpf"], false, "{v3}");
    untrack(pid);
}

/// The big region of the churn tests (issue 13): 256 MiB.
const CHURN_BIG: u64 = 65_536;
/// Pages of it the churn writes per step.
const CHURN_PAGES: u64 = 1300;
const CHURN_ROUNDS: usize = 80;
/// A round may copy at most this many times what was written (plus
/// [`NOISE_PAGES`]): a round that copied the whole big region copied 50 times.
const CHURN_FACTOR: u64 = 3;

#[test]
fn churn_beside_a_big_region_copies_what_was_written() {
    churn_pre_dumps("maps");
}

#[test]
fn realloc_churn_beside_a_big_region_copies_what_was_written() {
    churn_pre_dumps("realloc");
}

/// Issue 13: a process that, between two pre-dumps, maps a small region,
/// moves the one it mapped before onto a placeholder beside a 256 MiB
/// region, unmaps and maps a third anew (with `realloc`: also reallocs a
/// large block) and writes 1300 pages of the big region. Over 80 uffd-wp
/// pre-dumps, each must copy at least what the churn wrote and at most
/// [`CHURN_FACTOR`] times that (with an untouched small region armed, the
/// move merged it with the big region, whose registration the kernel then
/// cleared: the round copied all 65,536 pages); the chain must equal the
/// target's memory at the end.
fn churn_pre_dumps(mode: &str) {
    let mut w = Workload::start();
    w.cmd(&format!("alloc big {CHURN_BIG} light populate"));
    let pid = w.pid();
    let d = tempdir();
    let flags = ["--track", "uffd-wp", "--no-compress"];
    let mut prev = d.path().join("0");
    let v = pre_dump(pid, &prev, None, &flags);
    assert!(v["pages_written"].as_u64().unwrap() >= CHURN_BIG, "{v}");
    let mut rows = Vec::new();
    for i in 1..=CHURN_ROUNDS {
        let n = w.cmd(&format!("churn big {CHURN_PAGES} {i} {mode}"))["pages"]
            .as_u64()
            .unwrap();
        let dir = d.path().join(i.to_string());
        let v = pre_dump(pid, &dir, Some(&prev), &flags);
        rows.push((n, v["pages_written"].as_u64().unwrap(), v));
        // The images are not needed past the next round's parent link
        // (kept: the chain is checked whole at the end).
        prev = dir;
    }
    let ratio = |&(n, c, _): &(u64, u64, serde_json::Value)| c as f64 / n as f64;
    let max = rows.iter().map(ratio).fold(0.0, f64::max);
    let min = rows.iter().map(ratio).fold(f64::MAX, f64::min);
    println!(
        "churn ({mode}) beside {} MiB, {CHURN_ROUNDS} uffd-wp pre-dumps: copied/written per round from {min:.3} to {max:.3}; written,copied: {}",
        CHURN_BIG / 256,
        rows.iter()
            .map(|(n, c, _)| format!("{n},{c}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (i, (n, c, v)) in rows.iter().enumerate() {
        assert!(
            *c >= *n && *c <= CHURN_FACTOR * n + NOISE_PAGES,
            "round {} of the churn ({mode}): {n} pages written, {c} copied (allowed {n}..={}): {v}",
            i + 1,
            CHURN_FACTOR * n + NOISE_PAGES
        );
    }
    assert_oracle(
        pid,
        &prev,
        &format!("after {CHURN_ROUNDS} churn rounds ({mode})"),
    );
}

/// The same churn, as the issue saw it: `tern track` rounds every 100 ms
/// while a background thread churns every 50 ms. No round after the first
/// may report more than [`CHURN_FACTOR`] times what the churn can have
/// written in it (each step writes at most `max_step_pages`; the steps a
/// round can hold follow from the time since the previous round).
///
/// The first round is not held to it: until the big region is armed, the
/// small regions moved beside it merge with it (nothing is registered), so
/// its VMA grows and shrinks every step; when it changed while the arming
/// round ran, that round cannot register it (the range it read is no longer
/// one VMA, and registering it would split the target's VMA) and the first
/// round copies it whole. Once armed, nothing unarmed merges with it.
#[test]
fn track_rounds_beside_a_churning_big_region() {
    const PERIOD_MS: f64 = 50.0;
    let mut w = Workload::start();
    w.cmd(&format!("alloc big {CHURN_BIG} light populate"));
    let pid = w.pid();
    w.cmd(&format!("churn_bg big {CHURN_PAGES} 13 {PERIOD_MS} maps"));
    let run = tern(&[
        "track",
        "-t",
        &pid.to_string(),
        "--interval-ms",
        "100",
        "--rounds",
        &CHURN_ROUNDS.to_string(),
        "--track",
        "uffd-wp",
        "--json",
    ]);
    let st = w.cmd("churn_stop");
    assert!(run.ok(), "{}", run.describe());
    let lines = run.json_lines();
    assert_eq!(
        lines.len(),
        CHURN_ROUNDS,
        "one line per round:\n{}",
        run.describe()
    );
    let step = st["max_step_pages"].as_u64().unwrap();
    assert!(st["iterations"].as_u64().unwrap() > 0, "{st}");
    let mut t0 = 0.0;
    let mut worst = (0.0, 0, 0);
    for (i, l) in lines.iter().enumerate() {
        let (t, k) = (num(l, "t_ms"), l["kernel_pages"].as_u64().unwrap());
        if i == 0 {
            t0 = t;
            continue;
        }
        // Steps that can have written in (t0, t]: one per period, and one
        // more at each end.
        #[allow(clippy::cast_possible_truncation)] // a few rounds' worth of 50 ms periods
        let steps = ((t - t0) / PERIOD_MS).ceil() as u64 + 2;
        let allowed = CHURN_FACTOR * steps * step + NOISE_PAGES;
        let r = k as f64 / (steps * step) as f64;
        if r > worst.0 {
            worst = (r, k, i + 1);
        }
        assert!(
            k <= allowed,
            "track round {}: {k} pages reported written in {:.0} ms, while the churn writes at most {step} per {PERIOD_MS} ms step (allowed {allowed}):\n{}",
            i + 1,
            t - t0,
            run.stdout
        );
        t0 = t;
    }
    println!(
        "track beside a churning {} MiB region: {CHURN_ROUNDS} rounds, churn {st}; kernel_pages per round: {}; worst round {} with {} pages ({:.2} of what its steps could write)",
        CHURN_BIG / 256,
        lines
            .iter()
            .map(|l| l["kernel_pages"].to_string())
            .collect::<Vec<_>>()
            .join(" "),
        worst.2,
        worst.1,
        worst.0
    );
}
