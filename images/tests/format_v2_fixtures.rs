//! Images written by an earlier tern still load, and this tern writes the
//! same JSON back.
//!
//! `fixtures/v2/ck_signals/` holds the JSON files of a real `tern dump` of
//! the `ck_signals` workload (2 threads, queued signals, alternate stacks,
//! rseq, scheduling, a pipe), written by tern at format version 2 before
//! the image got state types of its own; only the paths of the host it
//! was taken on were rewritten (`/opt/tern/bin`, `/var/tmp/ck`).
//! `fixtures/v2/every-field.process.json` was written by that same tern
//! from a process state made up to use every field and every variant (all
//! fd kinds, seccomp filters, arm64 PAC keys, SCHED_DEADLINE, ...).
//!
//! Parsing a fixture and serializing it again must give the file back byte
//! for byte: any change to the image representation shows up here (and
//! then needs a new format version that still reads these files).

use std::path::{Path, PathBuf};

use images::process::ProcessImage;
use images::{ImageKind, Inventory, MmRecord};

fn fixture(name: &str) -> (PathBuf, Vec<u8>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v2")
        .join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, bytes)
}

fn assert_same_text(path: &Path, original: &[u8], written: Vec<u8>) {
    if written != original {
        let (a, b) = (
            String::from_utf8_lossy(original),
            String::from_utf8_lossy(&written),
        );
        let line = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(a.lines().count().min(b.lines().count()));
        panic!(
            "{}: written back differently from line {}:\n  was:   {:?}\n  now:   {:?}",
            path.display(),
            line + 1,
            a.lines().nth(line),
            b.lines().nth(line)
        );
    }
}

#[test]
fn inventory_of_a_version_2_dump_loads_and_is_written_back_identically() {
    let (path, text) = fixture("ck_signals/inventory.json");
    let inv = Inventory::parse(&path, &text).unwrap();
    assert_eq!(inv.version, 2);
    assert_eq!(inv.kind, ImageKind::Dump);
    assert!(inv.full && inv.parent.is_none());
    assert!(inv.seal.is_some());
    assert_same_text(&path, &text, serde_json::to_vec_pretty(&inv).unwrap());
}

#[test]
fn vma_list_of_a_version_2_dump_loads_and_is_written_back_identically() {
    let (path, text) = fixture("ck_signals/mm.json");
    let mm = MmRecord::parse(&path, &text).unwrap();
    assert!(
        mm.vmas
            .iter()
            .any(|v| v.name.as_deref() == Some("[vdso]") && !v.dumped)
    );
    assert!(
        mm.vmas
            .iter()
            .any(|v| v.name.as_deref() == Some("[stack]") && v.dumped)
    );
    assert_same_text(&path, &text, serde_json::to_vec_pretty(&mm).unwrap());
}

#[test]
fn process_state_of_a_version_2_dump_loads_and_is_written_back_identically() {
    let (path, text) = fixture("ck_signals/process.json");
    let p = ProcessImage::parse(&path, &text).unwrap();
    // What ck_signals set up (see its documentation).
    assert_eq!(p.comm, "ck_signals");
    assert_eq!(p.threads.len(), 2);
    let shared: Vec<(i32, i32)> = p.shared_pending.iter().map(|s| (s.signo, s.code)).collect();
    // SIGUSR1, SIGRTMIN+1 three times, SIGRTMIN+3, all sigqueue'd.
    assert_eq!(shared, [(10, -1), (35, -1), (35, -1), (35, -1), (37, -1)]);
    let own: Vec<Vec<i32>> = p
        .threads
        .iter()
        .map(|t| t.pending.iter().map(|s| s.signo).collect())
        .collect();
    assert_eq!(own, [vec![39], vec![38]]);
    assert_eq!(p.threads[0].altstack.size, 64 << 10);
    assert_eq!(p.threads[1].altstack.size, 48 << 10);
    assert_eq!(p.threads[1].altstack.flags, i32::MIN, "SS_AUTODISARM");
    let usr1 = p.sigactions.iter().find(|a| a.signo == 10).unwrap();
    assert_eq!(usr1.mask, 1 << (12 - 1), "SIGUSR1's handler blocks SIGUSR2");
    assert!(p.threads.iter().all(|t| t.rseq.is_some()));
    assert!(p.threads.iter().all(|t| t.sched.is_some()));
    assert!(p.fds.iter().any(|f| f.pipe_data.is_some()));
    assert_same_text(&path, &text, serde_json::to_vec_pretty(&p).unwrap());
}

#[test]
fn every_field_and_variant_of_a_version_2_process_state_loads_and_is_written_back_identically() {
    let (path, text) = fixture("every-field.process.json");
    let p = ProcessImage::parse(&path, &text).unwrap();
    assert_eq!(p.fds.len(), 11, "one fd of each kind");
    assert_eq!(p.seccomp_filters.len(), 2);
    assert!(p.threads[1].regs.pac.is_some());
    assert_same_text(&path, &text, serde_json::to_vec_pretty(&p).unwrap());
}
