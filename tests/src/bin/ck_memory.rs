//! Self-checking workload (protocol: `tern_tests::ck`): memory.
//!
//! `ck_memory [--mib N]` (default 64): a big private anonymous region whose
//! every page is self-describing (index, generation, checksum, and a payload
//! derived from both), rewritten all the time by a mutator thread (pages 16
//! and up); a read-only region; a read-write region with a PROT_NONE page in
//! its middle; a private mapping of a file it wrote, two pages of which it
//! modified (copy-on-write); a shared anonymous region.
//!
//! On SIGTERM: the mutator pauses, then every page of every region is
//! verified (content, protections from /proc/self/maps, the file's own bytes
//! unchanged), and the mutator must have made progress after `ready`.
//!
//! `--break`: a byte of page 3 (which the mutator never touches) is flipped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_tests::ck::{break_requested, out_path, report};

const PAGE: usize = 4096;
static TERM: AtomicBool = AtomicBool::new(false);
static PAUSE: AtomicBool = AtomicBool::new(false);
static PAUSED: AtomicBool = AtomicBool::new(false);
static REWRITES: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn mmap(len: usize, prot: i32, flags: i32, fd: i32) -> *mut u8 {
    // SAFETY: a fresh mapping.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

fn word(index: u64, generation: u64, k: u64) -> u64 {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ generation.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ k;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// Write page `i` of generation `generation`: payload first, header last.
fn write_page(p: *mut u64, i: u64, generation: u64) {
    // SAFETY: p points at one page of our region.
    unsafe {
        for k in 3..(PAGE / 8) as u64 {
            p.add(k as usize).write_volatile(word(i, generation, k));
        }
        p.write_volatile(i);
        p.add(1).write_volatile(generation);
        p.add(2).write_volatile(word(i, generation, 0));
    }
}

fn check_page(p: *const u64, i: u64) -> Result<(), String> {
    // SAFETY: p points at one page of our region.
    unsafe {
        let (idx, generation, sum) = (
            p.read_volatile(),
            p.add(1).read_volatile(),
            p.add(2).read_volatile(),
        );
        if idx != i || sum != word(i, generation, 0) {
            return Err(format!(
                "page {i}: header ({idx}, generation {generation}, sum {sum:#x}) is wrong"
            ));
        }
        for k in 3..(PAGE / 8) as u64 {
            let w = p.add(k as usize).read_volatile();
            if w != word(i, generation, k) {
                return Err(format!(
                    "page {i} generation {generation}: word {k} is {w:#x}, expected {:#x}",
                    word(i, generation, k)
                ));
            }
        }
    }
    Ok(())
}

fn perms_of(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for l in maps.lines() {
        let mut w = l.split_whitespace();
        let (Some(r), Some(p)) = (w.next(), w.next()) else {
            continue;
        };
        if let Some((a, b)) = r.split_once('-') {
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap_or(0),
                usize::from_str_radix(b, 16).unwrap_or(0),
            );
            if (a..b).contains(&addr) {
                return p.to_string();
            }
        }
    }
    "unmapped".into()
}

struct Ptr(*mut u8);
unsafe impl Send for Ptr {}

fn main() {
    let out = out_path();
    // SAFETY: a handler that stores an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as usize) };
    let pid = std::process::id();
    let pages = arg("--mib", 64) * 256;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let priv_anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let big = mmap(pages * PAGE, rw, priv_anon, -1);
    for i in 0..pages {
        // SAFETY: inside `big`.
        write_page(unsafe { big.add(i * PAGE) }.cast(), i as u64, 0);
    }
    // Read-only region.
    let ro = mmap(4 * PAGE, rw, priv_anon, -1);
    // SAFETY: inside `ro`, then made read-only.
    unsafe {
        std::ptr::write_bytes(ro, 0xA5, 4 * PAGE);
        libc::mprotect(ro.cast(), 4 * PAGE, libc::PROT_READ);
    }
    // Read-write with a PROT_NONE page in the middle.
    let holed = mmap(5 * PAGE, rw, priv_anon, -1);
    // SAFETY: inside `holed`.
    unsafe {
        for k in 0..5 {
            std::ptr::write_bytes(holed.add(k * PAGE), 0x10 + k as u8, PAGE);
        }
        libc::mprotect(holed.add(2 * PAGE).cast(), PAGE, libc::PROT_NONE);
    }
    // A private file mapping, two pages modified.
    let file_bytes: Vec<u8> = (0..16 * PAGE).map(|i| (i % 253) as u8).collect();
    std::fs::write("mapped", &file_bytes).expect("write the mapped file");
    let f = std::fs::File::open("mapped").unwrap();
    use std::os::fd::AsRawFd;
    let fmap = mmap(16 * PAGE, rw, libc::MAP_PRIVATE, f.as_raw_fd());
    drop(f);
    // SAFETY: inside `fmap`.
    unsafe {
        std::ptr::write_bytes(fmap.add(2 * PAGE), 0xEE, PAGE);
        std::ptr::write_bytes(fmap.add(5 * PAGE + 100), 0xDD, 10);
    }
    // Shared anonymous.
    let shared = mmap(8 * PAGE, rw, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1);
    // SAFETY: inside `shared`.
    unsafe {
        for k in 0..8 {
            std::ptr::write_bytes(shared.add(k * PAGE), 0x60 + k as u8, PAGE);
        }
    }

    let bigp = Ptr(big);
    std::thread::spawn(move || {
        let big = bigp;
        let mut x: u64 = 0x1234_5678;
        let mut gens = vec![0u64; pages];
        loop {
            if PAUSE.load(Ordering::SeqCst) {
                PAUSED.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = 16 + (x as usize % (pages - 16));
                gens[i] += 1;
                // SAFETY: inside `big`.
                write_page(unsafe { big.0.add(i * PAGE) }.cast(), i as u64, gens[i]);
            }
            REWRITES.fetch_add(64, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    report(&out, &format!("ready {pid}"));
    let at_ready = REWRITES.load(Ordering::SeqCst);
    if break_requested() {
        // SAFETY: inside `big`, page 3.
        unsafe { *big.add(3 * PAGE + 1000) ^= 0xFF };
    }
    while !TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut bad = Vec::new();
    let t0 = Instant::now();
    while REWRITES.load(Ordering::SeqCst) <= at_ready + 64 && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    if REWRITES.load(Ordering::SeqCst) <= at_ready + 64 {
        bad.push("the mutator made no progress".to_string());
    }
    PAUSE.store(true, Ordering::SeqCst);
    while !PAUSED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in 0..pages {
        // SAFETY: inside `big`.
        if let Err(e) = check_page(unsafe { big.add(i * PAGE) }.cast(), i as u64) {
            bad.push(e);
            if bad.len() > 5 {
                break;
            }
        }
    }
    // SAFETY: reading our own regions.
    unsafe {
        if std::slice::from_raw_parts(ro, 4 * PAGE)
            .iter()
            .any(|&b| b != 0xA5)
        {
            bad.push("read-only region content".into());
        }
        for k in [0usize, 1, 3, 4] {
            if std::slice::from_raw_parts(holed.add(k * PAGE), PAGE)
                .iter()
                .any(|&b| b != 0x10 + k as u8)
            {
                bad.push(format!("holed region page {k} content"));
            }
        }
        let fm = std::slice::from_raw_parts(fmap, 16 * PAGE);
        let mut want = file_bytes.clone();
        want[2 * PAGE..3 * PAGE].fill(0xEE);
        want[5 * PAGE + 100..5 * PAGE + 110].fill(0xDD);
        if let Some(o) = fm.iter().zip(&want).position(|(a, b)| a != b) {
            bad.push(format!(
                "file mapping byte {o}: {:#x}, expected {:#x}",
                fm[o], want[o]
            ));
        }
        for k in 0..8 {
            if std::slice::from_raw_parts(shared.add(k * PAGE), PAGE)
                .iter()
                .any(|&b| b != 0x60 + k as u8)
            {
                bad.push(format!("shared region page {k} content"));
            }
        }
    }
    if std::fs::read("mapped").ok().as_deref() != Some(&file_bytes[..]) {
        bad.push("the mapped file itself changed".into());
    }
    for (what, addr, want) in [
        ("big", big as usize, "rw-p"),
        ("read-only", ro as usize, "r--p"),
        ("holed", holed as usize, "rw-p"),
        ("holed hole", holed as usize + 2 * PAGE, "---p"),
        ("holed tail", holed as usize + 3 * PAGE, "rw-p"),
        ("file", fmap as usize, "rw-p"),
        ("shared", shared as usize, "rw-s"),
    ] {
        let p = perms_of(addr);
        if p != want {
            bad.push(format!("{what} region at {addr:#x}: {p}, expected {want}"));
        }
    }
    if bad.is_empty() {
        report(&out, "PASS");
        std::process::exit(0);
    }
    report(&out, &format!("FAIL {}", bad.join("; ")));
    std::process::exit(1);
}
