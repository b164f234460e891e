//! The fuzz targets (`images::fuzz`, `restorer::fuzz`) run for a fixed
//! number of iterations on inputs mutated from real ones: the page-map
//! decoder, the process-state loader (and the other JSON files of an
//! image) and the chain resolver. No input may panic, and none may make
//! them allocate more than 64 MiB at once (the inputs are at most a few
//! hundred KiB). `TERN_FUZZ_ITERS` sets the iterations per target (default
//! 100000); `cargo fuzz` (in `fuzz/`) runs the same targets with libFuzzer.
//!
//! A failing input is written to `target/fuzz-failures/` and named in the
//! panic message.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use images::{ImageKind, ImageWriter, Inventory, MmRecord, PageRange, ParentRef, VmaRecord};
use serde_json::Value;

/// The allocator of this test binary: the system's, noting the largest
/// single allocation.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to System with the same arguments, so the GlobalAlloc contract holds as System keeps it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_ALLOC: usize = 64 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        sys::usize_of(self.next() % n.max(1) as u64)
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
    4096,
];

/// Byte-level mutations (flips, interesting values, inserts, deletes,
/// copies, splices from another seed).
fn mutate_bytes(r: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + r.below(4) {
        let len = data.len();
        match r.below(7) {
            0 if len > 0 => {
                let i = r.below(len);
                data[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.below(len);
                data[i] = (INTERESTING[r.below(INTERESTING.len())]).to_le_bytes()[0];
            }
            2 if len >= 8 => {
                let i = r.below(len - 7);
                let v = INTERESTING[r.below(INTERESTING.len())];
                data[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            3 => {
                let i = r.below(len + 1);
                let n = 1 + r.below(64);
                let b: Vec<u8> = (0..n).map(|_| r.next().to_le_bytes()[0]).collect();
                data.splice(i..i, b);
            }
            4 if len > 0 => {
                let i = r.below(len);
                let n = 1 + r.below((len - i).min(256));
                data.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = r.below(len);
                let n = 1 + r.below((len - i).min(512));
                let chunk = data[i..i + n].to_vec();
                let at = r.below(len + 1);
                data.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                let i = r.below(other.len());
                let n = 1 + r.below((other.len() - i).min(512));
                let at = r.below(len + 1);
                let end = (at + n).min(len);
                data.splice(at..end, other[i..i + n].iter().copied());
            }
            _ => {}
        }
    }
}

/// JSON-aware mutations: leaves replaced by extreme or wrong-typed
/// values, keys removed, arrays cut, duplicated or emptied.
fn mutate_json(r: &mut Rng, v: &mut Value) {
    let mut paths: Vec<Vec<PathPart>> = Vec::new();
    collect(v, &mut Vec::new(), &mut paths);
    for _ in 0..1 + r.below(3) {
        let Some(path) = paths.get(r.below(paths.len())).cloned() else {
            return;
        };
        let Some(node) = at(v, &path) else { continue };
        let new = match r.below(9) {
            0 => Value::from(INTERESTING[r.below(INTERESTING.len())]),
            1 => Value::from(-(r.below(1 << 20) as i64) - 1),
            2 => Value::from("../".repeat(r.below(8)) + &"x".repeat(r.below(300))),
            3 => Value::Null,
            4 => Value::Bool(r.below(2) == 0),
            5 => match node.take() {
                Value::Array(mut a) if !a.is_empty() => {
                    let i = r.below(a.len());
                    let dup = a[i].clone();
                    a.push(dup);
                    Value::Array(a)
                }
                other => other,
            },
            6 => match node.take() {
                Value::Array(mut a) => {
                    a.truncate(r.below(a.len() + 1));
                    Value::Array(a)
                }
                Value::Object(mut o) => {
                    if let Some(k) = o.keys().nth(r.below(o.len().max(1))).cloned() {
                        o.remove(&k);
                    }
                    Value::Object(o)
                }
                other => other,
            },
            7 => match node.as_u64() {
                Some(n) => Value::from(n.wrapping_add(1 + r.below(4096) as u64)),
                None => node.take(),
            },
            _ => Value::Array(vec![]),
        };
        *node = new;
    }
}

#[derive(Clone)]
enum PathPart {
    Key(String),
    Index(usize),
}

fn collect(v: &Value, here: &mut Vec<PathPart>, out: &mut Vec<Vec<PathPart>>) {
    out.push(here.clone());
    match v {
        Value::Object(o) => {
            for (k, c) in o {
                here.push(PathPart::Key(k.clone()));
                collect(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate().take(64) {
                here.push(PathPart::Index(i));
                collect(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[PathPart]) -> Option<&'a mut Value> {
    let mut cur = v;
    for p in path {
        cur = match p {
            PathPart::Key(k) => cur.get_mut(k)?,
            PathPart::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

fn iterations() -> usize {
    std::env::var("TERN_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// How a target's inputs are mutated.
type Mutator = fn(&mut Rng, &mut Vec<u8>, &[u8]);

fn bytes_only(r: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    mutate_bytes(r, input, other);
}

/// JSON-aware half the time (when the input still parses), bytes else.
fn json_or_bytes(r: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    if r.below(2) == 0
        && let Ok(mut v) = serde_json::from_slice::<Value>(input)
    {
        mutate_json(r, &mut v);
        *input = serde_json::to_vec(&v).unwrap();
        return;
    }
    mutate_bytes(r, input, other);
}

/// One image of a chain input at a time (see `restorer::fuzz::chain`).
fn one_inventory(r: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    let sep = restorer::fuzz::SEPARATOR;
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut rest: &[u8] = input;
    while let Some(i) = rest.windows(sep.len()).position(|w| w == sep) {
        parts.push(rest[..i].to_vec());
        rest = &rest[i + sep.len()..];
    }
    parts.push(rest.to_vec());
    match r.below(8) {
        // Reorder or drop whole images now and then.
        0 if parts.len() > 1 => {
            let i = r.below(parts.len());
            let p = parts.remove(i);
            if r.below(2) == 0 {
                let at = r.below(parts.len() + 1);
                parts.insert(at, p);
            }
        }
        _ => {
            let i = r.below(parts.len());
            json_or_bytes(r, &mut parts[i], other);
        }
    }
    *input = parts.join(sep);
}

/// Run `target` on `iters` inputs: the seeds, then mutants of them.
fn run(name: &str, seeds: &[Vec<u8>], mutate: Mutator, target: fn(&[u8])) {
    let iters = iterations();
    let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let started = std::time::Instant::now();
    let mut corpus: Vec<Vec<u8>> = seeds.to_vec();
    for i in 0..iters {
        let base = &corpus[r.below(corpus.len())];
        let other = &seeds[r.below(seeds.len())];
        let mut input = base.clone();
        if i >= seeds.len() {
            mutate(&mut r, &mut input, other);
        }
        LARGEST.store(0, Ordering::Relaxed);
        let res = std::panic::catch_unwind(|| target(&input));
        let largest = LARGEST.load(Ordering::Relaxed);
        if res.is_err() || largest > MAX_ALLOC {
            let dir = tern_tests::bin_dir().join("../fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let f = dir.join(format!("{name}-{i}.bin"));
            let _ = std::fs::write(&f, &input);
            panic!(
                "fuzz target {name}, iteration {i}: {} (input saved as {})",
                if res.is_err() {
                    "panicked".to_string()
                } else {
                    format!("allocated {largest} bytes at once")
                },
                f.display()
            );
        }
        // Keep some mutants as bases (a crude corpus that drifts).
        if r.below(64) == 0 && corpus.len() < 256 {
            corpus.push(input);
        }
    }
    eprintln!(
        "fuzz {name}: {iters} inputs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A chain of three small images (newest `0`), written for real.
fn seed_chain(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut prev: Option<(std::path::PathBuf, Inventory)> = None;
    let mut dirs = Vec::new();
    for (i, name) in ["2", "1", "0"].iter().enumerate() {
        let dir = root.join(name);
        let mut w = ImageWriter::create(&dir, i % 2 == 0).unwrap();
        let base = 0x7f00_0000_0000u64;
        let mut bytes = vec![0u8; 300 * 4096];
        for (p, chunk) in bytes.chunks_mut(4096).enumerate() {
            if p % 3 != 0 {
                chunk.fill((p + i).to_le_bytes()[0]);
            }
        }
        w.add_pages(base, &bytes).unwrap();
        w.add_hole(PageRange::new(base + 400 * 4096, base + 410 * 4096));
        let mut inv = Inventory::new(ImageKind::PreDump, 4242, "uffd-wp", i % 2 == 0);
        if let Some((_, p)) = &prev {
            inv.parent = Some(ParentRef {
                path: format!("../{}", ["2", "1", "0"][i - 1]),
                id: p.id.clone(),
            });
        }
        w.finish(
            &MmRecord {
                vmas: vec![VmaRecord::anonymous(base, base + 512 * 4096)],
            },
            &inv,
        )
        .unwrap();
        prev = Some((dir.clone(), images::Inventory::load(&dir).unwrap()));
        dirs.push(dir);
    }
    dirs.reverse(); // newest first
    dirs
}

#[test]
fn fuzz_the_page_map_decoder() {
    let root = tern_tests::tempdir();
    let seeds: Vec<Vec<u8>> = seed_chain(root.path())
        .iter()
        .map(|d| std::fs::read(d.join(images::PAGEMAP_FILE)).unwrap())
        .collect();
    run("pagemap", &seeds, bytes_only, images::fuzz::pagemap);
}

#[test]
fn fuzz_the_process_state_loader() {
    let root = tern_tests::tempdir();
    let dirs = seed_chain(root.path());
    let mut seeds = vec![include_bytes!("../../restorer/tests/data/process-min.json").to_vec()];
    seeds.push(std::fs::read(dirs[0].join(images::INVENTORY_FILE)).unwrap());
    seeds.push(std::fs::read(dirs[0].join(images::MM_FILE)).unwrap());
    run(
        "process_state",
        &seeds,
        json_or_bytes,
        images::fuzz::process_state,
    );
}

#[test]
fn fuzz_the_chain_resolver() {
    let root = tern_tests::tempdir();
    let dirs = seed_chain(root.path());
    let invs: Vec<Vec<u8>> = dirs
        .iter()
        .map(|d| std::fs::read(d.join(images::INVENTORY_FILE)).unwrap())
        .collect();
    let mut whole = Vec::new();
    for (i, inv) in invs.iter().enumerate() {
        if i > 0 {
            whole.extend_from_slice(restorer::fuzz::SEPARATOR);
        }
        whole.extend_from_slice(inv);
    }
    // The seeds resolve (the target's checks run on a real chain).
    restorer::fuzz::chain(&whole);
    let seeds = vec![whole, invs[2].clone()];
    run("chain", &seeds, one_inventory, restorer::fuzz::chain);
}
