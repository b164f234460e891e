//! Separate `tern` invocations chain through the tracking state left in the
//! target (one userfaultfd fd, one `[anon:tern-scratch]` page), `tern show`
//! describes a chain, `tern untrack` removes the state, `tern track` leaves
//! a pre-dump chain's tracking intact.

use serde_json::Value;
use std::path::Path;
use tern_tests::*;

/// The tern state in the target: (scratch areas, userfaultfd fds).
fn tern_state(pid: i32) -> (Vec<(u64, u64)>, Vec<i32>) {
    let maps = proc::maps(pid).unwrap();
    let fds = proc::fds(pid).unwrap();
    (
        proc::scratch_areas(pid, &maps),
        fds.into_iter()
            .filter(|(_, t)| t == proc::UFFD_LINK)
            .map(|(n, _)| n)
            .collect(),
    )
}

#[test]
fn images_exclude_the_scratch_area() {
    let mut w = Workload::start();
    w.cmd("alloc a 64 rand");
    let pid = w.pid();
    let d = tempdir();
    let (d1, d2) = (d.path().join("1"), d.path().join("2"));
    pre_dump(pid, &d1, None, &[]);
    pre_dump(pid, &d2, Some(&d1), &[]);
    let (scratch, _) = tern_state(pid);
    assert!(scratch.len() <= 1, "scratch areas {scratch:x?}");
    let inv = images::Inventory::load(&d2).unwrap();
    if let Some(&(s, e)) = scratch.first() {
        let rec = inv.tracking.as_ref().and_then(|t| t.scratch_addr);
        assert_eq!(
            rec,
            Some(s),
            "inventory.json tracking.scratch_addr vs the scratch area at {s:#x}"
        );
        // tern's own scratch area is not the program's memory: a restore
        // from this chain must not recreate it.
        let chain = restorer::ImageChain::open(&d2).unwrap();
        let inside: Vec<String> = chain
            .vmas()
            .iter()
            .filter(|v| v.dumped && v.start < e && v.end > s)
            .map(|v| format!("{:#x}-{:#x} {} dumped", v.start, v.end, v.perms))
            .collect();
        assert!(
            inside.is_empty(),
            "the image records tern's scratch area {s:#x}-{e:#x} as target memory: {inside:?}"
        );
    }
    untrack(pid);
}

#[test]
fn separate_invocations_reuse_the_tracking_state() {
    let mut w = Workload::start();
    w.cmd("alloc a 256 rand");
    let pid = w.pid();
    let baseline = proc::Snapshot::take(pid).unwrap();
    let mut c = Chain::new(pid, Some("uffd-wp"), &[]);
    c.round("start");
    let (scratch1, uffd1) = tern_state(pid);
    assert!(
        scratch1.len() <= 1 && uffd1.len() == 1,
        "after one pre-dump: scratch {scratch1:?}, uffd fds {uffd1:?}"
    );
    assert_running_untraced(pid, "between invocations");
    for i in 0..3 {
        w.cmd(&format!("dirty a {}-{}", i * 10, i * 10 + 9));
        let v = c.round("dirty 10 pages");
        assert_incremental(&v, 10, "separate invocation");
        let (scratch, uffd) = tern_state(pid);
        assert_eq!(
            uffd, uffd1,
            "invocation {i}: the tracking fd was not reused"
        );
        assert!(
            scratch.len() <= 1,
            "invocation {i}: {} scratch areas",
            scratch.len()
        );
        if !scratch1.is_empty() && !scratch.is_empty() {
            assert_eq!(
                scratch, scratch1,
                "invocation {i}: a new scratch area instead of reusing the first"
            );
        }
        let d = proc::Snapshot::diff(&baseline, &proc::Snapshot::take(pid).unwrap(), true);
        assert!(
            d.is_empty(),
            "invocation {i}: more than the documented state changed:\n  {}",
            d.join("\n  ")
        );
    }
    assert_untracked_exactly(pid, &baseline, "after 4 invocations");
    // Untracking twice is harmless.
    assert_untracked_exactly(pid, &baseline, "second untrack");
}

/// Every string value in a JSON tree.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// The JSON objects of a tree that carry `key`.
fn objects_with<'a>(v: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| objects_with(x, key, out)),
        Value::Object(o) => {
            if o.contains_key(key) {
                out.push(v);
            }
            o.values().for_each(|x| objects_with(x, key, out));
        }
        _ => {}
    }
}

fn inventory_id(dir: &Path) -> String {
    images::Inventory::load(dir).unwrap().id
}

#[test]
fn show_describes_the_chain() {
    let mut w = Workload::start();
    w.cmd("alloc a 128 rand");
    w.cmd("alloc z 32 zero");
    let pid = w.pid();
    let mut c = Chain::new(pid, None, &[]);
    let mut dirs = Vec::new();
    let mut out = Vec::new();
    out.push(c.round("start"));
    dirs.push(c.dir().to_path_buf());
    w.cmd("dirty a 0-19");
    out.push(c.round("dirty 20"));
    dirs.push(c.dir().to_path_buf());
    w.cmd("zap a 100 10");
    w.cmd("dirty a 30-34");
    out.push(c.round("zap 10, dirty 5"));
    dirs.push(c.dir().to_path_buf());
    untrack(pid);

    // The pre-dump JSON agrees with what the image holds.
    for (d, v) in dirs.iter().zip(&out) {
        // pages_written counts the data pages, or data and zero pages.
        let (data, zero) = (
            image_pages(d, images::PageKind::Data),
            image_pages(d, images::PageKind::Zero),
        );
        let w = v["pages_written"].as_u64().unwrap();
        assert!(
            w == data || w == data + zero,
            "pages_written {w} vs {data} data + {zero} zero pages in {}: {v}",
            d.display()
        );
        assert_eq!(
            v["pages_zero"].as_u64().unwrap(),
            image_pages(d, images::PageKind::Zero),
            "pages_zero vs zero pages in {}: {v}",
            d.display()
        );
        let stored = std::fs::metadata(d.join(images::PAGES_FILE)).unwrap().len();
        assert_eq!(
            v["bytes_written"].as_u64().unwrap(),
            stored,
            "bytes_written vs pages.img in {}: {v}",
            d.display()
        );
    }

    let newest = dirs.last().unwrap();
    let run = tern(&["show", &newest.display().to_string(), "--json"]);
    let v = run.json();
    let mut s = Vec::new();
    strings(&v, &mut s);
    for d in &dirs {
        let id = inventory_id(d);
        assert!(
            s.iter().any(|x| x == &id),
            "tern show --json does not list image {} (id {id}): {v}",
            d.display()
        );
    }
    // Page counts per image, as the chain reader computes them.
    let chain = restorer::ImageChain::open(newest).unwrap();
    let mut objs = Vec::new();
    objects_with(&v, "data_pages", &mut objs);
    for sum in chain.summary() {
        assert!(
            objs.iter()
                .any(|o| o["data_pages"].as_u64() == Some(sum.data_pages)
                    && o.as_object()
                        .unwrap()
                        .values()
                        .any(|x| x.as_str() == Some(sum.id.as_str()))),
            "tern show --json: no image entry with id {} and data_pages {}: {v}",
            sum.id,
            sum.data_pages
        );
    }
    // The VMAs are listed.
    let first = chain.vmas().iter().find(|x| x.dumped).unwrap();
    let text = v.to_string();
    assert!(
        text.contains(&first.start.to_string()) || text.contains(&format!("{:x}", first.start)),
        "tern show --json does not list the VMAs (no {:#x}): {v}",
        first.start
    );

    let run = tern(&["show", &newest.display().to_string()]);
    assert!(run.ok(), "{}", run.describe());
    for d in &dirs {
        let name = d.file_name().unwrap().to_string_lossy();
        assert!(
            run.stdout.contains(&*name),
            "human tern show does not name {name}:\n{}",
            run.describe()
        );
    }
}

#[test]
fn pre_dump_after_untrack_is_still_right() {
    let mut w = Workload::start();
    w.cmd("alloc a 128 rand");
    let pid = w.pid();
    let d = tempdir();
    let (d1, d2) = (d.path().join("1"), d.path().join("2"));
    pre_dump(pid, &d1, None, &[]);
    untrack(pid);
    w.cmd("dirty a 5-9");
    // Tracking is gone: tern must either copy what it cannot vouch for or
    // refuse clearly; never write an image that misses the writes.
    let run = pre_dump_run(pid, &d2, Some(&d1), &[]);
    if run.ok() {
        assert_oracle(
            pid,
            &d2,
            &format!("chain continued after untrack: {}", run.stdout),
        );
    } else {
        run.assert_clear_failure(&[]);
        eprintln!("refused (acceptable): {}", run.stderr);
    }
    untrack(pid);
}

#[test]
fn parent_image_of_another_process() {
    let mut a = Workload::start();
    a.cmd("alloc x 64 rand");
    let mut b = Workload::start();
    b.cmd("alloc y 64 light");
    let d = tempdir();
    let (d1, d2) = (d.path().join("a1"), d.path().join("b1"));
    pre_dump(a.pid(), &d1, None, &[]);
    let run = pre_dump_run(b.pid(), &d2, Some(&d1), &[]);
    if run.ok() {
        assert_oracle(b.pid(), &d2, "chain on top of another process's image");
    } else {
        run.assert_clear_failure(&[]);
    }
    untrack(a.pid());
    if proc::fds(b.pid())
        .unwrap()
        .values()
        .any(|t| t == proc::UFFD_LINK)
    {
        untrack(b.pid());
    }
}

#[test]
fn untrack_without_state_changes_nothing() {
    let w = Workload::start();
    let baseline = proc::Snapshot::take(w.pid()).unwrap();
    assert_untracked_exactly(w.pid(), &baseline, "untrack of an untracked process");
}
