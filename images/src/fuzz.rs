//! Fuzz entry points: each takes arbitrary bytes, must never panic, hang
//! or allocate more than a small multiple of its input, and checks what
//! must hold of anything its parser accepts. Run by the in-tree harness
//! (`tests/tests/fuzz.rs`, a fixed number of iterations in `cargo xtask
//! test`) and by `cargo fuzz` (`fuzz/`).

use std::path::Path;

use crate::process::ProcessImage;
use crate::{Inventory, MmRecord, PAGE_SIZE, PageKind, PageMap};

/// `pagemap.img`: entries accepted are sorted, disjoint, in user space,
/// Data blobs bounded; encoding them gives the same entries back.
pub fn pagemap(data: &[u8]) {
    let path = Path::new("fuzz/pagemap.img");
    let Ok(map) = PageMap::decode(path, data) else {
        return;
    };
    let mut prev_end = 0;
    for e in &map.entries {
        assert!(e.start >= prev_end && e.start.is_multiple_of(PAGE_SIZE) && e.nr_pages > 0);
        assert!(e.end() <= crate::MAX_USER_ADDRESS);
        if e.kind == PageKind::Data {
            assert!(e.nr_pages as u64 <= crate::MAX_BLOB_PAGES);
            assert!(e.stored_len() <= crate::pagemap::lz4_bound(e.nr_pages as u64 * PAGE_SIZE));
        }
        prev_end = e.end();
    }
    let again = PageMap::decode(path, &map.encode()).expect("an accepted map re-encodes");
    assert_eq!(again.entries, map.entries);
    // A lookup of every entry's first and last page finds it.
    for e in &map.entries {
        assert_eq!(map.find(e.start), Some(e));
        assert_eq!(map.find(e.end() - PAGE_SIZE), Some(e));
    }
}

/// `process.json` (and the other JSON files of an image, which share the
/// reader): a state accepted is valid and survives a round trip.
pub fn process_state(data: &[u8]) {
    let path = Path::new("fuzz/process.json");
    if let Ok(p) = ProcessImage::parse(path, data) {
        assert!(p.validate().is_ok());
        let text = serde_json::to_vec(&p).expect("a process image serializes");
        ProcessImage::parse(path, &text).expect("an accepted state re-parses");
    }
    if let Ok(inv) = Inventory::parse(Path::new("fuzz/inventory.json"), data) {
        assert_eq!(inv.parent.is_none(), inv.full);
        let text = serde_json::to_vec(&inv).expect("an inventory serializes");
        Inventory::parse(Path::new("fuzz/inventory.json"), &text).expect("re-parses");
    }
    if let Ok(mm) = MmRecord::parse(Path::new("fuzz/mm.json"), data) {
        let mut prev = 0;
        for v in &mm.vmas {
            assert!(v.start < v.end && v.start >= prev);
            prev = v.end;
        }
    }
}
