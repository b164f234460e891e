//! One test per way a process changes its memory between pre-dumps (issue 2,
//! items 6 and 9), each with the uffd-wp, the soft-dirty and the full-copy
//! backend. After every round the oracle must hold; with uffd-wp and
//! soft-dirty the incremental rounds must write what changed and little more.
//! Each scenario then ends with a final `tern dump` on top of its chain and
//! a `tern restore --lazy-pages` of it, whose workload must hold what it
//! held at the dump, page for page, while its pages are still coming in,
//! and carry on once they are all in (see [`restore_lazily`]). The workload
//! talks to the test through FIFOs, which the restore opens again by path
//! ([`Workload::start_restorable`]).
//!
//! The `soft_dirty` variants are `#[ignore]`d: this host's kernel has no
//! soft-dirty, and `cargo xtask vm-test x86-softdirty` runs them (with
//! `--ignored`) in Debian's 6.1 kernel. Where soft-dirty is missing they fail
//! (tern refuses `--track soft-dirty`), they never pass by skipping.

use std::time::Duration;
use tern_tests::pattern::frac_set;
use tern_tests::*;

macro_rules! backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn uffd_wp() {
                super::$name(Some("uffd-wp"))
            }
            #[test]
            #[ignore = "needs a soft-dirty kernel (x86 Linux <= 6.6); run by cargo xtask vm-test x86-softdirty"]
            fn soft_dirty() {
                tern_tests::assert_thp_not_always("the soft-dirty incremental counts");
                super::$name(Some("soft-dirty"))
            }
            #[test]
            fn full() {
                super::$name(Some("full"))
            }
        }
    )*};
}

backends!(
    dirty_sets,
    zap,
    mremap_move_and_grow,
    unmap_and_map_anew,
    kernel_writes_through_read,
    threads,
    forked_child_writes_its_copy,
    process_vm_writev_from_outside,
    mprotect_splits,
    new_regions_between_rounds,
    churn_beside_a_big_region,
    realloc_beside_a_big_region,
    pages_moved_back_next_to_their_region,
);

fn incremental(track: Option<&str>) -> bool {
    track != Some("full")
}

fn check_incremental(track: Option<&str>, v: &serde_json::Value, dirtied: u64, when: &str) {
    if incremental(track) {
        assert_incremental(v, dirtied, when);
    }
}

/// The VMA of `pid` that holds `addr`: (start, end).
fn vma_at(pid: i32, addr: u64) -> (u64, u64) {
    let maps = proc::maps(pid).unwrap_or_else(|e| panic!("{e}"));
    maps.iter()
        .find(|m| m.start <= addr && addr < m.end)
        .map(|m| (m.start, m.end))
        .unwrap_or_else(|| panic!("no VMA of {pid} holds {addr:#x}"))
}

/// The pages an incremental round must write: `dirtied`, and with
/// soft-dirty also the `unwritten` populated pages of the region at `addr`
/// when its VMA (`before` the round) has grown, merged with a new mapping.
///
/// Where soft-dirty and uffd-wp differ: soft-dirty is kept per page, but
/// the kernel also marks a VMA that is created *or expanded* by a mapping
/// (VM_SOFTDIRTY, set by mmap_region: "new (or expanded) vma always get soft
/// dirty status"), and pagemap reports every page of such a VMA dirty. A
/// new mapping next to a region with the same flags (a thread's stack right
/// below it) merges with it, and every populated page of the region comes
/// out dirty. With uffd-wp a registered VMA never merges with an
/// unregistered mapping, and the count stays `dirtied`.
fn with_merges(
    track: Option<&str>,
    pid: i32,
    addr: u64,
    before: (u64, u64),
    dirtied: u64,
    unwritten: u64,
) -> u64 {
    if track == Some("soft-dirty") && vma_at(pid, addr) != before {
        dirtied + unwritten
    } else {
        dirtied
    }
}

fn dirty_sets(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    w.cmd("alloc a 1024 rand");
    w.cmd("alloc b 1024 light");
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    w.cmd("dirty a 0,1,2,500-510,1023");
    let v = c.round("index list");
    check_incremental(track, &v, 15, "index list");
    let set = frac_set(1024, 0.1, 42);
    w.cmd("dirty_frac b 0.1 42");
    let v = c.round("10% of b");
    check_incremental(track, &v, set.len() as u64, "10% of b");
    // The same pages again, and a superset.
    w.cmd("dirty_frac b 0.1 42");
    w.cmd("dirty a 0-99");
    let v = c.round("again");
    check_incremental(track, &v, set.len() as u64 + 100, "again");
    restore_lazily(&mut w, &c, track);
}

fn zap(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    w.cmd("alloc a 128 rand");
    w.cmd("alloc b 64 light");
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    w.cmd("zap a 10 20");
    let v = c.round("zap a 10..30");
    check_incremental(track, &v, 0, "zap");
    w.cmd("dirty a 15-20");
    c.round("re-dirty zapped pages");
    w.cmd("zap a 0 128");
    w.cmd("zap b 1 1");
    c.round("zap everything of a");
    w.cmd("dirty a 127");
    c.round("one page of a zapped region");
    restore_lazily(&mut w, &c, track);
}

fn mremap_move_and_grow(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    w.cmd("alloc a 64 rand");
    w.cmd("alloc b 32 light");
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    let v = w.cmd("mremap a 64");
    assert_ne!(v["old"], v["addr"], "the region did not move: {v}");
    c.round("a moved");
    w.cmd("dirty a 0-3");
    let v = c.round("moved region dirtied");
    check_incremental(track, &v, 4, "moved region dirtied");
    w.cmd("mremap b 48");
    c.round("b moved and grown");
    w.cmd("dirty b 40-47");
    c.round("grown part of b dirtied");
    w.cmd("grow a 256");
    w.cmd("dirty a 100-110,255");
    c.round("a grown (MAYMOVE)");
    restore_lazily(&mut w, &c, track);
}

fn unmap_and_map_anew(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    w.cmd("alloc a 64 rand");
    let b = addr_of(&w.cmd("alloc b 32 light"));
    w.cmd("alloc keep 16 rand");
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    w.cmd("unmap b");
    let v = c.round("b unmapped");
    check_incremental(track, &v, 0, "unmap");
    // Same address, same size, same permissions: only the contents tell.
    w.cmd("renew a rand");
    c.round("a mapped anew at the same address with new contents");
    w.cmd("renew a none");
    c.round("a mapped anew, untouched (must read as zeros)");
    w.cmd("renew a zero 32");
    c.round("a mapped anew, smaller, zero-filled");
    w.cmd(&format!("alloc c 32 rand at={b:#x}"));
    c.round("c mapped where b was");
    restore_lazily(&mut w, &c, track);
}

fn kernel_writes_through_read(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    let a = addr_of(&w.cmd("alloc a 64 rand"));
    w.cmd("alloc n 32 none");
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    // The pipe's writer is a new thread: its stack, mapped below `n` and
    // `a` (one VMA), merges with them: with soft-dirty all 64 pages of `a`.
    let before = vma_at(w.pid(), a);
    w.cmd("readfill a 0 16 pipe");
    let v = c.round("read(2) from a pipe into a");
    let n = with_merges(track, w.pid(), a, before, 16, 48);
    check_incremental(track, &v, n, "read from a pipe");
    w.cmd("readfill a 20 16 file");
    let v = c.round("read(2) from a file into a");
    check_incremental(track, &v, 16, "read from a file");
    w.cmd("readfill n 0 32 pipe");
    let v = c.round("read(2) into never-touched pages");
    check_incremental(track, &v, 32, "read into untouched pages");
    restore_lazily(&mut w, &c, track);
}

fn threads(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    w.cmd("alloc a 1024 light");
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    w.cmd("threads a 4 all");
    let v = c.round("4 threads wrote every page");
    // Thread stacks come and go: allow for them.
    check_incremental(track, &v, 1024, "4 threads");
    w.cmd("threads a 8 0-100,300-400,1000-1023");
    c.round("8 threads");
    restore_lazily(&mut w, &c, track);
}

fn forked_child_writes_its_copy(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    w.cmd("alloc a 256 rand");
    w.cmd("alloc b 64 light");
    let pid = w.pid();
    let baseline = proc::Snapshot::take(pid).unwrap();
    let mut c = Chain::new(pid, track, &[]);
    c.round("start");
    // The child rewrites all of its copy of a, and keeps writing for 3 s.
    let child = i32::try_from(w.cmd("fork a 3000")["child"].as_i64().unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let v = c.round("child writing its copy");
    check_incremental(track, &v, 0, "the child's writes are not the parent's");
    w.cmd("dirty a 0-9");
    let v = c.round("parent writes while the child lives (COW)");
    check_incremental(track, &v, 10, "parent COW writes");
    assert!(proc::alive(child), "the child died early");
    assert!(
        proc::traced_threads(child).is_empty(),
        "the child is traced"
    );
    let st = w.cmd("fork_wait");
    assert_eq!(
        st["status"], 0,
        "the forked child saw its memory change: {st}"
    );
    w.cmd("dirty b 0-3");
    c.round("after the child exited");
    assert_untracked_exactly(pid, &baseline, "after fork");
    restore_lazily(&mut w, &c, track);
}

fn process_vm_writev_from_outside(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    let a = addr_of(&w.cmd("alloc a 64 rand"));
    let n = addr_of(&w.cmd("alloc n 16 none"));
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    process_vm_write(w.pid(), a + 3 * 4096, &[0xa5; 4096]);
    process_vm_write(
        w.pid(),
        a + 40 * 4096 + 1000,
        b"written from outside by process_vm_writev",
    );
    process_vm_write(w.pid(), n + 5 * 4096 + 7, b"into a never-touched page");
    let v = c.round("process_vm_writev into 3 pages");
    check_incremental(track, &v, 3, "process_vm_writev");
    process_vm_write(w.pid(), a + 63 * 4096 + 3800, &[1u8; 200]); // crosses nothing, last page
    process_vm_write(w.pid(), a + 10 * 4096 + 4090, &[2u8; 12]); // crosses into page 11
    let v = c.round("process_vm_writev across a page boundary");
    check_incremental(track, &v, 3, "process_vm_writev across pages");
    restore_lazily(&mut w, &c, track);
}

fn mprotect_splits(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    w.cmd("alloc a 64 rand");
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    w.cmd("mprotect a 0 16 r");
    w.cmd("mprotect a 32 8 none");
    c.round("a split by mprotect");
    w.cmd("mprotect a 0 16 rw");
    w.cmd("dirty a 0-3");
    w.cmd("mprotect a 32 8 rw");
    w.cmd("dirty a 33");
    let v = c.round("made writable again and dirtied");
    check_incremental(track, &v, 5, "after mprotect rw");
    restore_lazily(&mut w, &c, track);
}

fn new_regions_between_rounds(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    let a = addr_of(&w.cmd("alloc a 32 rand"));
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    let before = vma_at(w.pid(), a);
    w.cmd("alloc new 128 rand");
    w.cmd("alloc sh 16 light shared");
    w.cmd("alloc nz 16 zero");
    let v = c.round("new private, shared and zero-filled regions");
    // `new` mapped right below `a` merges with it: with soft-dirty, a's
    // 32 pages come out dirty too.
    let n = with_merges(track, w.pid(), a, before, 144, 32);
    check_incremental(track, &v, n, "new regions");
    assert!(
        v["pages_zero"].as_u64().unwrap() >= 16,
        "new zero-filled pages: {v}"
    );
    w.cmd("dirty sh 0-15");
    let v = c.round("shared region dirtied");
    check_incremental(track, &v, 16, "shared dirtied");
    restore_lazily(&mut w, &c, track);
}

/// Issue 13: every round, a small region is mapped (untouched), the one
/// mapped the round before is moved with mremap onto a placeholder right
/// beside the big region and written, and a third is unmapped and mapped
/// anew; 150 pages of the big region are written. The big region's
/// registration must survive (an untouched armed VMA moved beside it
/// merged with it, and the kernel cleared the merged VMA's registration:
/// with uffd-wp every round then copied all of it): each round copies what
/// the churn wrote.
fn churn_beside_a_big_region(track: Option<&str>) {
    churn_rounds(track, "maps");
}

/// The same churn, and glibc realloc growing and shrinking a large
/// (mmapped) block, which moves it when it cannot grow in place.
fn realloc_beside_a_big_region(track: Option<&str>) {
    churn_rounds(track, "realloc");
}

fn churn_rounds(track: Option<&str>, mode: &str) {
    const BIG: u64 = 4096;
    let mut w = Workload::start_restorable();
    let big = addr_of(&w.cmd(&format!("alloc big {BIG} light")));
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    for i in 0..6 {
        let before = vma_at(w.pid(), big);
        let n = w.cmd(&format!("churn big 150 {i} {mode}"))["pages"]
            .as_u64()
            .unwrap();
        let what = format!("churn step {i} ({mode})");
        let v = c.round(&what);
        if track == Some("soft-dirty") && vma_at(w.pid(), big) != before {
            // Nothing is registered: the moved region merges with the big
            // one. A VMA a new mapping expanded is all dirty (VM_SOFTDIRTY),
            // one an mremap merged into may not be: either count is right.
            let written = v["pages_written"].as_u64().unwrap();
            assert!(
                written >= n && written <= n + BIG + NOISE_PAGES,
                "{what}: pages_written {written}, expected {n}..={}: {v}",
                n + BIG + NOISE_PAGES
            );
        } else {
            check_incremental(track, &v, n, &what);
        }
    }
    restore_lazily(&mut w, &c, track);
}

/// The tail of a region moved away and back: back in place, it merges with
/// the rest of the region (same anon_vma, page offsets in line), and the
/// kernel clears the registration of the merged VMA. Pages written after
/// that keep their write-protect bits: were they trusted, these writes
/// would be missed. The oracle must hold; with uffd-wp, the round copies
/// the region whole (nothing tells which of its pages were written).
fn pages_moved_back_next_to_their_region(track: Option<&str>) {
    let mut w = Workload::start_restorable();
    let a = addr_of(&w.cmd("alloc a 64 rand"));
    let mut c = Chain::new(w.pid(), track, &[]);
    c.round("start");
    w.cmd("move_out a 56 8");
    w.cmd("dirty a 1");
    let v = c.round("tail of a moved away");
    check_incremental(track, &v, 9, "tail moved away");
    let before = vma_at(w.pid(), a);
    w.cmd("move_back a");
    let after = vma_at(w.pid(), a);
    assert!(
        after.0 <= a && after.1 >= a + 64 * 4096,
        "the tail did not merge back with a: a's VMA was {before:x?}, is {after:x?}"
    );
    w.cmd("dirty a 5,6,60");
    let v = c.round("tail moved back, a written");
    if track == Some("uffd-wp") {
        assert_incremental(&v, 64, "a lost its registration: copied whole");
    }
    w.cmd("dirty a 7,62");
    let v = c.round("a written again");
    check_incremental(track, &v, 2, "a armed again");
    restore_lazily(&mut w, &c, track);
}

/// The fill of a scenario's restore takes about this long (its rate is
/// set from the chain's lazy pages): long enough that pages are still
/// lazy when the restored workload is first checked, short enough to add
/// little to the test.
const FILL_SECS: f64 = 0.8;
/// Deadline for the restore's process to run, and for its fill to end.
const RESTORE_WAIT: Duration = Duration::from_secs(60);

/// The end of every scenario: a final `tern dump` on top of its chain,
/// `tern restore --lazy-pages` (the fill slowed down), and then:
///
/// - while pages are still lazy (at least one page that held data is not in
///   yet: asserted), the workload answers commands: each of its regions'
///   checksum, computed by the process itself reading its memory (faulting
///   the lazy pages in), is the one of what it held at the dump; then
///   every page of every region it made (its own, a churn's mappings)
///   holds what it held at the dump, read from outside (a missing page is
///   brought by the service), with the same mappings;
/// - once the fill is over (`tern restore` prints its JSON): the process
///   holds no userfaultfd and no VMA registered with one; a new pre-dump
///   chain of the restored process holds the oracle, before and after it
///   dirties pages of each region (uffd-wp: and that round copies what was
///   dirtied); it exits 0 when told, and `tern restore` with it.
///
/// What the workload held at the dump is read (not faulting anything in)
/// just before the dump, while it waits for a command: nothing changes it
/// in between.
fn restore_lazily(w: &mut Workload, c: &Chain, track: Option<&str>) {
    let t_all = std::time::Instant::now();
    let pid = w.pid();
    let regions: Vec<(String, u64, u64)> = w.regions();
    let held = oracle::read_ranges(pid, &regions, false).unwrap_or_else(|e| panic!("{e}"));
    let data_pages: u64 = held.iter().map(|r| r.data_pages()).sum();
    assert!(data_pages > 0, "the regions hold no data: {regions:?}");

    // The final dump, on top of the chain.
    let dir = c.root.path().join("dump");
    let prev = c.dir().display().to_string();
    let mut extra: Vec<&str> = c.extra.iter().map(String::as_str).collect();
    extra.extend(["--prev-images-dir", &prev, "--verify"]);
    let v = tern(&dump_args(pid, &dir, &extra)).json();
    assert_eq!(v["killed"], true, "the dump did not kill the workload: {v}");
    assert_eq!(
        v["verify"]["mismatches"].as_u64(),
        Some(0),
        "the dump's own verification: {v}"
    );
    w.reap_dumped(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let dumped = v;

    // The fill's rate, from the pages it has to bring.
    let chain = restorer::ImageChain::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let lazy_pages = restorer::lazy::LazyMap::of(&chain).pages;
    drop(chain);
    let mb = (lazy_pages * 4096) as f64 / 1e6;
    // Whole MB/s, at least 1.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rate = (mb / FILL_SECS).floor().max(1.0) as u64;
    let pidfile = c.root.path().join("restored.pid");
    let d = dir.display().to_string();
    let p = pidfile.display().to_string();
    let rate_s = rate.to_string();
    let mut restore = spawn_tern(&[
        "restore",
        "-D",
        &d,
        "--lazy-pages",
        "--prefetch-mb-s",
        &rate_s,
        "--json",
        "--pidfile",
        &p,
    ]);
    let mut out = TernOutput::of(&mut restore);
    // The PID file is written once the process runs (before the fill).
    let mut written = None;
    let ran = proc::wait_until(RESTORE_WAIT, || {
        written = std::fs::read_to_string(&pidfile).ok();
        written.as_ref().is_some_and(|s| s.ends_with('\n'))
            || matches!(restore.try_wait(), Ok(Some(_)))
    });
    if !(ran && written.is_some()) {
        let _ = restore.kill();
        let st = restore.wait();
        panic!(
            "tern restore -D {d}: the process did not run within {RESTORE_WAIT:?} (tern: {st:?}):\n{}",
            out.stderr()
        );
    }
    assert_eq!(
        written.as_deref().map(str::trim),
        Some(pid.to_string().as_str()),
        "--pidfile"
    );
    let t_run = std::time::Instant::now();
    w.adopt(restore).unwrap_or_else(|e| panic!("{e}"));

    // While lazy: how many pages that held data are not in yet (nothing
    // faulted in by this look).
    let first = oracle::read_ranges(pid, &regions, false).unwrap_or_else(|e| panic!("{e}"));
    let mut lazy_seen = 0u64;
    for (h, f) in held.iter().zip(&first) {
        for i in 0..f.in_memory.len() {
            let p = &h.data[i * 4096..(i + 1) * 4096];
            if h.mapped[i] && f.mapped[i] && !f.in_memory[i] && p.iter().any(|&b| b != 0) {
                lazy_seen += 1;
            }
        }
    }
    let look_ms = t_run.elapsed().as_secs_f64() * 1e3;
    assert!(
        lazy_seen > 0,
        "no page of the regions was lazy {look_ms:.0} ms after the restored process ran ({lazy_pages} lazy pages in all, filled at {rate} MB/s): this check shows nothing"
    );
    // The process reads its memory itself.
    for (h, (name, _, _)) in held.iter().zip(&regions) {
        if !own_region(name) {
            continue;
        }
        let sum = w.cmd(&format!("sum {name}"))["sum"].as_u64().unwrap();
        assert_eq!(
            sum,
            tern_tests::pattern::fnv(&h.data),
            "region {name}: the restored process's own checksum of its {} pages differs from what it held at the dump",
            h.pages
        );
    }
    // The fill ends.
    let r = out.json(RESTORE_WAIT).unwrap_or_else(|e| {
        w.kill();
        panic!("tern restore -D {d} --lazy-pages: {e}\n{}", out.stderr())
    });
    // Every page, from outside, once the fill has ended: a read of
    // /proc/PID/mem that meets a page not in yet fails with EIO (the
    // kernel's remote access cannot wait for a userfault), it is never
    // served.
    let now = oracle::read_ranges(pid, &regions, true).unwrap_or_else(|e| panic!("{e}"));
    let errs = oracle::compare_ranges(&held, &now);
    assert!(
        errs.is_empty(),
        "the restored workload's memory differs from what it held at the dump ({lazy_seen} pages still lazy at the first look):\n  {}",
        errs.join("\n  ")
    );

    assert_eq!(r["pid"].as_i64(), Some(i64::from(pid)), "{r}");
    let l = &r["lazy"];
    assert_eq!(l["exited"], false, "the restored workload exited: {r}");
    assert!(
        l["pages"].as_u64() >= Some(lazy_seen),
        "{lazy_seen} pages that held data were not in at the first look, but the service brought fewer pages: {r}"
    );
    tern_tests::lazy::assert_fill_left_nothing(pid, "the restored workload after its fill");
    eprintln!(
        "lazy restore of pid {pid}: {lazy_pages} lazy pages at {rate} MB/s; first look {look_ms:.0} ms after it ran: {lazy_seen} of {data_pages} region pages with data not in; service: {l}"
    );

    // It goes on, and can be checkpointed again.
    let mut again = Chain::new(pid, track, &[]);
    again.round("restored, after its fill");
    let mut dirtied = 0;
    for (name, _, pages) in &regions {
        if own_region(name) && *pages > 0 {
            let idx = if *pages > 1 {
                format!("0,{}", pages - 1)
            } else {
                "0".into()
            };
            dirtied += w.cmd(&format!("dirty {name} {idx}"))["pages"]
                .as_u64()
                .unwrap();
        }
    }
    let v = again.round("restored, regions dirtied");
    if track == Some("uffd-wp") {
        assert_incremental(&v, dirtied, "the restored workload, regions dirtied");
    }
    w.send("exit").unwrap_or_else(|e| panic!("{e}"));
    let st = w.wait_exit(Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "the restored workload, told to exit, ended with {st:?}; tern restore:\n{}",
        out.stderr()
    );
    eprintln!(
        "dump, lazy restore and two rounds after it: {:.1} s (the dump: {:.0} ms, frozen {:.0} ms, {} live rounds, {} pages written, {} pages verified)",
        t_all.elapsed().as_secs_f64(),
        dumped["duration_ms"].as_f64().unwrap_or(f64::NAN),
        dumped["frozen_ms"].as_f64().unwrap_or(f64::NAN),
        dumped["live_rounds"].as_array().map_or(0, Vec::len),
        dumped["pages_written"],
        dumped["verify"]["pages_checked"]
    );
}

/// A region the workload allocated by name (not a churn's mapping, nor
/// pages moved out: `churn.*`, `moved_out.*`).
fn own_region(name: &str) -> bool {
    !name.contains('.')
}
