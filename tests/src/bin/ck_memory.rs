//! `ck_memory --out FILE [--mib N] [--break]`: memory (protocol:
//! `tern_tests::ck`).
//!
//! A restored process must find every page of every mapping exactly as it
//! was when it was frozen, with the same protections, the same file backing
//! and the same sharing. This workload sets up one of each kind and, on
//! SIGTERM, verifies all of it from the inside.
//!
//! Regions (all private anonymous unless said):
//! - `big` (`--mib N`, default 64): every page is self-describing: word 0 is
//!   its index, word 1 its generation, word 2 a checksum of the other 511
//!   words, words 3.. a payload derived from (index, generation). A mutator
//!   thread rewrites random pages of the upper half all the time (new
//!   generation, new payload, new checksum) and zaps some with
//!   MADV_DONTNEED (the page must then read as zeros); it records each
//!   page's current generation (or "zapped") in a table. The lower half is
//!   written once at start (generation 0). A page can be verified without
//!   knowing when it was written, and a stale copy (valid checksum, older
//!   generation) is caught by the table.
//! - `sparse`: 256 pages of which only every 4th was ever written; the
//!   others must still read as zeros.
//! - `ro` (r--), `rx` (r-x): filled, then mprotect'ed.
//! - `holed`: 9 rw- pages whose pages 3..6 were made PROT_NONE after being
//!   filled (three VMAs); the hidden content is checked too.
//! - `stack`: a stack-like region without MAP_GROWSDOWN: a PROT_NONE guard
//!   page at the bottom, 63 rw- pages of which only the top 6 were written
//!   (top down); the rest must read as zeros.
//! - `file`: MAP_PRIVATE rw- mapping of `ck_memory.data`, a file it creates
//!   in its cwd; three of its 16 pages were modified in memory (copy on
//!   write), the others must equal the file; `file-ro`: a second, read-only
//!   private mapping of the same file at file offset 4 pages.
//! - `shared`: MAP_SHARED|MAP_ANONYMOUS, 8 pages.
//!
//! On SIGTERM: the mutator must have made progress after the signal (a
//! generous, freeze-tolerant budget), then it is paused (atomic flag, it
//! acknowledges) and every page of every region is checked: content
//! (index, checksum, payload and generation against the table for `big`),
//! protections and sharing flag per page range from /proc/self/maps, the
//! file mappings' path and file offset, the file's own bytes unchanged on
//! disk. Prints `PASS` or `FAIL` with the first differences (region, page,
//! word or byte, found and expected).
//!
//! `--break`: right after `ready`, one byte of `big` page 3 (lower half: the
//! mutator never rewrites it) is flipped without updating its checksum.
//!
//! Being frozen (a dump) does not matter: no check depends on time, and the
//! progress wait only counts time during which the process ran.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_tests::ck::{break_requested, out_path, report};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Generation table entry of a page the mutator zapped (MADV_DONTNEED).
const ZAPPED: u64 = 1 << 63;
const FILE_NAME: &str = "ck_memory.data";
const FILE_PAGES: usize = 16;
/// Failures reported at most (the first ones).
const MAX_REPORTED: usize = 12;

static TERM: AtomicBool = AtomicBool::new(false);
static PAUSE: AtomicBool = AtomicBool::new(false);
static PAUSED: AtomicBool = AtomicBool::new(false);
static REWRITES: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

/// Wait until `cond` holds, at most `budget` of time during which this
/// process ran: a step that took much longer than asked (the process was
/// frozen) counts as a short one.
fn wait_running(budget: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let mut used = Duration::ZERO;
    while used < budget {
        if cond() {
            return true;
        }
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        used += t.elapsed().min(Duration::from_millis(50));
    }
    cond()
}

fn mib_arg() -> usize {
    let a: Vec<String> = std::env::args().collect();
    match a.iter().position(|x| x == "--mib") {
        None => 64,
        Some(i) => match a.get(i + 1).and_then(|v| v.parse::<usize>().ok()) {
            Some(n) if n >= 1 => n,
            _ => {
                eprintln!("ck_memory: --mib needs a number of MiB >= 1");
                std::process::exit(2);
            }
        },
    }
}

fn die(what: &str) -> ! {
    eprintln!("ck_memory: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(3);
}

fn mmap(len: usize, prot: i32, flags: i32, fd: i32, off: usize) -> *mut u8 {
    // SAFETY: a new mapping at an address of the kernel's choice.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off as i64) };
    if p == libc::MAP_FAILED {
        die(&format!("mmap of {len} bytes"));
    }
    p.cast()
}

fn mprotect(p: *mut u8, len: usize, prot: i32) {
    // SAFETY: p..p+len is one of our own mappings.
    if unsafe { libc::mprotect(p.cast(), len, prot) } != 0 {
        die(&format!("mprotect({p:?}, {len}, {prot})"));
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Payload word `k` of page `index` at `generation`.
fn payload(index: u64, generation: u64, k: usize) -> u64 {
    mix(index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix(generation) ^ (k as u64) << 40)
}

/// Checksum of a page: its words 0, 1 and 3.. (not the checksum word 2).
fn checksum(words: &[u64]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for (k, w) in words.iter().enumerate() {
        if k != 2 {
            h = (h ^ w).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(5);
        }
    }
    h
}

/// One page of `big` as words.
///
/// # Safety
/// `p` must point at a readable and writable page of `big`, and nothing may
/// write it concurrently.
unsafe fn page_words<'a>(p: *mut u8) -> &'a mut [u64] {
    // SAFETY: the caller guarantees a whole page, page-aligned.
    unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), WORDS) }
}

/// Rewrite a page of `big` with `generation`: payload, index, generation,
/// then the checksum over them.
fn write_page(words: &mut [u64], index: u64, generation: u64) {
    for (k, w) in words.iter_mut().enumerate().skip(3) {
        *w = payload(index, generation, k);
    }
    words[0] = index;
    words[1] = generation;
    words[2] = checksum(words);
}

/// Check a page of `big` against the generation table; the first difference.
fn check_big_page(words: &[u64], index: u64, table: u64) -> Result<(), String> {
    if table & ZAPPED != 0 {
        return match words.iter().position(|&w| w != 0) {
            None => Ok(()),
            Some(k) => Err(format!(
                "big page {index} (zapped with MADV_DONTNEED at generation {}): word {k} found {:#x}, expected 0",
                table & !ZAPPED,
                words[k]
            )),
        };
    }
    if words[0] != index {
        return Err(format!(
            "big page {index}: index word found {:#x}, expected {index:#x} (another page's content?)",
            words[0]
        ));
    }
    let sum = checksum(words);
    let generation = words[1];
    if words[2] != sum {
        let detail = (3..WORDS)
            .find(|&k| words[k] != payload(index, generation, k))
            .map(|k| {
                format!(
                    "; word {k} found {:#x}, expected {:#x}",
                    words[k],
                    payload(index, generation, k)
                )
            })
            .unwrap_or_default();
        return Err(format!(
            "big page {index} generation {generation}: checksum found {:#x}, expected {sum:#x}{detail}",
            words[2]
        ));
    }
    if let Some(k) = (3..WORDS).find(|&k| words[k] != payload(index, generation, k)) {
        return Err(format!(
            "big page {index} generation {generation}: word {k} found {:#x}, expected {:#x}",
            words[k],
            payload(index, generation, k)
        ));
    }
    if generation != table {
        return Err(format!(
            "big page {index}: generation found {generation}, expected {table} (a stale copy of the page)"
        ));
    }
    Ok(())
}

/// Byte `off` of page `page` of a filled small region.
fn fill_byte(region: u8, page: usize, off: usize) -> u8 {
    (region as usize * 131 + page * 7 + off % 251 + off / 251).to_le_bytes()[0] ^ 0x5A
}

fn fill(p: *mut u8, region: u8, pages: std::ops::Range<usize>) {
    for page in pages {
        for off in 0..PAGE {
            // SAFETY: the caller's region holds these pages, writable.
            unsafe {
                p.add(page * PAGE + off)
                    .write_volatile(fill_byte(region, page, off))
            };
        }
    }
}

/// What a page of a small region must hold.
#[derive(Clone, Copy)]
enum Want {
    Filled(u8),
    Zero,
}

/// The first differing byte of page `page` of region `name` at `p`.
fn check_page(name: &str, p: *const u8, page: usize, want: Want) -> Option<String> {
    for off in 0..PAGE {
        // SAFETY: the page is mapped readable (the caller made sure).
        let b = unsafe { p.add(page * PAGE + off).read_volatile() };
        let w = match want {
            Want::Filled(r) => fill_byte(r, page, off),
            Want::Zero => 0,
        };
        if b != w {
            return Some(format!(
                "{name} page {page} byte {off}: found {b:#04x}, expected {w:#04x}"
            ));
        }
    }
    None
}

/// One line of /proc/self/maps.
struct Vma {
    start: usize,
    end: usize,
    perms: String,
    offset: usize,
    path: String,
}

fn read_maps() -> Vec<Vma> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut v = Vec::new();
    for l in maps.lines() {
        let mut w = l.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let (_dev, _inode) = (w.next(), w.next());
        let path = w.next().unwrap_or("").trim().to_string();
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            usize::from_str_radix(a, 16),
            usize::from_str_radix(b, 16),
            usize::from_str_radix(off, 16),
        ) else {
            continue;
        };
        v.push(Vma {
            start,
            end,
            perms: perms.to_string(),
            offset,
            path,
        });
    }
    v
}

/// An expected stretch of pages in /proc/self/maps: `perms` everywhere,
/// and, for a file mapping, the file (path suffix) and its offset at `addr`.
struct Stretch {
    name: String,
    addr: usize,
    pages: usize,
    perms: &'static str,
    file: Option<(&'static str, usize)>,
}

fn check_stretch(maps: &[Vma], s: &Stretch) -> Option<String> {
    let end = s.addr + s.pages * PAGE;
    let mut at = s.addr;
    while at < end {
        let Some(v) = maps.iter().find(|v| v.start <= at && at < v.end) else {
            return Some(format!(
                "{} page {} ({at:#x}): not mapped in /proc/self/maps, expected {}",
                s.name,
                (at - s.addr) / PAGE,
                s.perms
            ));
        };
        if v.perms != s.perms {
            return Some(format!(
                "{} pages {}..{} ({:#x}-{:#x}): perms found {}, expected {}",
                s.name,
                (at - s.addr) / PAGE,
                (v.end.min(end) - s.addr) / PAGE,
                at,
                v.end.min(end),
                v.perms,
                s.perms
            ));
        }
        if let Some((file, off)) = s.file {
            let want_off = off + (at - s.addr);
            let found_off = v.offset + (at - v.start);
            if !v.path.ends_with(&format!("/{file}")) || found_off != want_off {
                return Some(format!(
                    "{} at {at:#x}: maps {:?} at file offset {found_off:#x}, expected .../{file} at {want_off:#x}",
                    s.name, v.path
                ));
            }
        }
        at = v.end;
    }
    None
}

/// A pointer that the mutator thread may use (the region outlives it).
struct Region(*mut u8);
// SAFETY: the mutator is the only writer of `big` while it runs, and main
// reads it only while the mutator is paused.
unsafe impl Send for Region {}

fn main() {
    let out = out_path();
    let mib = mib_arg();
    // SAFETY: the handler only stores an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as usize) };
    let pid = std::process::id();
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;

    // big: self-describing pages, generation 0.
    let pages = mib * 256;
    let big = mmap(pages * PAGE, rw, anon, -1, 0);
    let table: &'static [AtomicU64] = Box::leak((0..pages).map(|_| AtomicU64::new(0)).collect());
    for i in 0..pages {
        // SAFETY: page i of `big`; the mutator does not run yet.
        write_page(unsafe { page_words(big.add(i * PAGE)) }, i as u64, 0);
    }
    // sparse: every 4th page written.
    let sparse_pages = 256;
    let sparse = mmap(sparse_pages * PAGE, rw, anon, -1, 0);
    for page in (0..sparse_pages).step_by(4) {
        fill(sparse, 2, page..page + 1);
    }
    // ro and rx.
    let ro = mmap(4 * PAGE, rw, anon, -1, 0);
    fill(ro, 3, 0..4);
    mprotect(ro, 4 * PAGE, libc::PROT_READ);
    let rx = mmap(2 * PAGE, rw, anon, -1, 0);
    fill(rx, 4, 0..2);
    mprotect(rx, 2 * PAGE, libc::PROT_READ | libc::PROT_EXEC);
    // holed: pages 3..6 PROT_NONE after filling all 9.
    let holed = mmap(9 * PAGE, rw, anon, -1, 0);
    fill(holed, 5, 0..9);
    // SAFETY: page 3 of `holed`.
    mprotect(unsafe { holed.add(3 * PAGE) }, 3 * PAGE, libc::PROT_NONE);
    // stack: guard page 0, 63 rw pages, top 6 written from the top down.
    let stack_pages = 64;
    let stack = mmap(stack_pages * PAGE, rw, anon | libc::MAP_NORESERVE, -1, 0);
    for page in (stack_pages - 6..stack_pages).rev() {
        fill(stack, 6, page..page + 1);
    }
    mprotect(stack, PAGE, libc::PROT_NONE);
    // file: a private mapping of a file of ours, three pages changed (COW),
    // and a read-only private mapping of pages 4..8.
    let file_bytes: Vec<u8> = (0..FILE_PAGES * PAGE)
        .map(|i| (i % 241).to_le_bytes()[0] ^ (i / PAGE).to_le_bytes()[0])
        .collect();
    if let Err(e) = std::fs::write(FILE_NAME, &file_bytes) {
        eprintln!("ck_memory: cannot write {FILE_NAME} in the cwd: {e}");
        std::process::exit(3);
    }
    let f = match std::fs::File::open(FILE_NAME) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ck_memory: cannot open {FILE_NAME}: {e}");
            std::process::exit(3);
        }
    };
    use std::os::fd::AsRawFd;
    let fmap = mmap(FILE_PAGES * PAGE, rw, libc::MAP_PRIVATE, f.as_raw_fd(), 0);
    let fro = mmap(
        4 * PAGE,
        libc::PROT_READ,
        libc::MAP_PRIVATE,
        f.as_raw_fd(),
        4 * PAGE,
    );
    drop(f);
    let mut file_want = file_bytes.clone();
    file_want[2 * PAGE..3 * PAGE].fill(0xEE);
    file_want[5 * PAGE + 100..5 * PAGE + 110].fill(0xDD);
    file_want[10 * PAGE - 1] ^= 0xFF;
    for (i, (&want, &was)) in file_want.iter().zip(&file_bytes).enumerate() {
        if want != was {
            // SAFETY: inside `fmap` (rw, private).
            unsafe { fmap.add(i).write_volatile(want) };
        }
    }
    // shared anonymous.
    let shared = mmap(8 * PAGE, rw, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0);
    fill(shared, 7, 0..8);

    // The mutator: rewrites or zaps random pages of the upper half of `big`.
    let hot = pages / 2;
    let region = Region(big);
    std::thread::spawn(move || {
        let big = region;
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        loop {
            if PAUSE.load(Ordering::SeqCst) {
                PAUSED.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = hot + (sys::usize_of(x) % (pages - hot));
                let generation = (table[i].load(Ordering::SeqCst) & !ZAPPED) + 1;
                // SAFETY: page i of `big`, which only this thread writes.
                let p = unsafe { big.0.add(i * PAGE) };
                if x.is_multiple_of(8) {
                    // SAFETY: one page of our own private mapping.
                    if unsafe { libc::madvise(p.cast(), PAGE, libc::MADV_DONTNEED) } != 0 {
                        die("madvise(MADV_DONTNEED)");
                    }
                    table[i].store(generation | ZAPPED, Ordering::SeqCst);
                } else {
                    // SAFETY: as above.
                    write_page(unsafe { page_words(p) }, i as u64, generation);
                    table[i].store(generation, Ordering::SeqCst);
                }
            }
            REWRITES.fetch_add(16, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    if !wait_running(Duration::from_secs(10), || {
        REWRITES.load(Ordering::SeqCst) > 0
    }) {
        eprintln!("ck_memory: the mutator did not start");
        std::process::exit(3);
    }

    report(&out, &format!("ready {pid}"));
    if break_requested() {
        // SAFETY: page 3 of `big`: the lower half, never rewritten.
        unsafe {
            let b = big.add(3 * PAGE + 8 * 100);
            b.write_volatile(b.read_volatile() ^ 0x01);
        }
    }
    while !TERM.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(2));
    }

    let mut bad: Vec<String> = Vec::new();
    let at_signal = REWRITES.load(Ordering::SeqCst);
    if !wait_running(Duration::from_secs(10), || {
        REWRITES.load(Ordering::SeqCst) >= at_signal + 64
    }) {
        bad.push(format!(
            "the mutator made no progress after SIGTERM ({} rewrites, {at_signal} at the signal)",
            REWRITES.load(Ordering::SeqCst)
        ));
    }
    PAUSE.store(true, Ordering::SeqCst);
    if !wait_running(Duration::from_secs(10), || PAUSED.load(Ordering::SeqCst)) {
        bad.push("the mutator did not pause".into());
        report(&out, &format!("FAIL {}", bad.join("; ")));
        std::process::exit(1);
    }

    // Protections, sharing and file backing, per stretch of pages.
    let maps = read_maps();
    let stretches = [
        Stretch {
            name: "big".into(),
            addr: big as usize,
            pages,
            perms: "rw-p",
            file: None,
        },
        Stretch {
            name: "sparse".into(),
            addr: sparse as usize,
            pages: sparse_pages,
            perms: "rw-p",
            file: None,
        },
        Stretch {
            name: "ro".into(),
            addr: ro as usize,
            pages: 4,
            perms: "r--p",
            file: None,
        },
        Stretch {
            name: "rx".into(),
            addr: rx as usize,
            pages: 2,
            perms: "r-xp",
            file: None,
        },
        Stretch {
            name: "holed".into(),
            addr: holed as usize,
            pages: 3,
            perms: "rw-p",
            file: None,
        },
        Stretch {
            name: "holed (hole, pages 3..6)".into(),
            addr: holed as usize + 3 * PAGE,
            pages: 3,
            perms: "---p",
            file: None,
        },
        Stretch {
            name: "holed (pages 6..9)".into(),
            addr: holed as usize + 6 * PAGE,
            pages: 3,
            perms: "rw-p",
            file: None,
        },
        Stretch {
            name: "stack (guard page)".into(),
            addr: stack as usize,
            pages: 1,
            perms: "---p",
            file: None,
        },
        Stretch {
            name: "stack".into(),
            addr: stack as usize + PAGE,
            pages: stack_pages - 1,
            perms: "rw-p",
            file: None,
        },
        Stretch {
            name: "file".into(),
            addr: fmap as usize,
            pages: FILE_PAGES,
            perms: "rw-p",
            file: Some((FILE_NAME, 0)),
        },
        Stretch {
            name: "file-ro".into(),
            addr: fro as usize,
            pages: 4,
            perms: "r--p",
            file: Some((FILE_NAME, 4 * PAGE)),
        },
        Stretch {
            name: "shared".into(),
            addr: shared as usize,
            pages: 8,
            perms: "rw-s",
            file: None,
        },
    ];
    bad.extend(stretches.iter().filter_map(|s| check_stretch(&maps, s)));
    if !bad.is_empty() {
        // Reading a region whose protections are wrong could fault.
        report(&out, &format!("FAIL {}", bad.join("; ")));
        std::process::exit(1);
    }

    // big, page by page, against the generation table.
    let mut big_bad = 0usize;
    for (i, t) in table.iter().enumerate() {
        // SAFETY: page i of `big`; the mutator is paused.
        let words = unsafe { page_words(big.add(i * PAGE)) };
        if let Err(e) = check_big_page(words, i as u64, t.load(Ordering::SeqCst)) {
            big_bad += 1;
            if bad.len() < MAX_REPORTED {
                bad.push(e);
            }
        }
    }
    if big_bad > MAX_REPORTED {
        bad.push(format!("{big_bad} pages of big differ in all"));
    }
    // The small regions.
    let mut small: Vec<(&str, *mut u8, usize, Want)> = Vec::new();
    for page in 0..sparse_pages {
        let want = if page % 4 == 0 {
            Want::Filled(2)
        } else {
            Want::Zero
        };
        small.push(("sparse", sparse, page, want));
    }
    small.extend((0..4).map(|p| ("ro", ro, p, Want::Filled(3))));
    small.extend((0..2).map(|p| ("rx", rx, p, Want::Filled(4))));
    // The hole's content is hidden behind PROT_NONE: make it readable.
    // SAFETY: pages 3..6 of `holed`.
    mprotect(unsafe { holed.add(3 * PAGE) }, 3 * PAGE, libc::PROT_READ);
    small.extend((0..9).map(|p| ("holed", holed, p, Want::Filled(5))));
    mprotect(stack, PAGE, libc::PROT_READ);
    for page in 0..stack_pages {
        let want = if page >= stack_pages - 6 {
            Want::Filled(6)
        } else {
            Want::Zero
        };
        small.push(("stack", stack, page, want));
    }
    small.extend((0..8).map(|p| ("shared", shared, p, Want::Filled(7))));
    for (name, p, page, want) in small {
        if let Some(e) = check_page(name, p, page, want)
            && bad.len() < MAX_REPORTED
        {
            bad.push(e);
        }
    }
    // The file mappings: modified pages hold our bytes, the others the file's.
    let check_file = |name: &str, p: *const u8, want: &[u8], first_page: usize| {
        (0..want.len()).find_map(|o| {
            // SAFETY: inside the file mapping, readable.
            let b = unsafe { p.add(o).read_volatile() };
            (b != want[o]).then(|| {
                format!(
                    "{name} page {} byte {}: found {b:#04x}, expected {:#04x} ({})",
                    first_page + o / PAGE,
                    o % PAGE,
                    want[o],
                    if want[o] == file_bytes[first_page * PAGE + o] {
                        "the file's byte"
                    } else {
                        "a byte written in memory (copy on write)"
                    }
                )
            })
        })
    };
    bad.extend(check_file("file", fmap, &file_want, 0));
    bad.extend(check_file(
        "file-ro",
        fro,
        &file_bytes[4 * PAGE..8 * PAGE],
        4,
    ));
    match std::fs::read(FILE_NAME) {
        Ok(now) if now == file_bytes => {}
        Ok(now) => bad.push(format!(
            "{FILE_NAME} on disk changed: {} bytes, first difference at byte {:?} (a private mapping wrote through?)",
            now.len(),
            now.iter().zip(&file_bytes).position(|(a, b)| a != b)
        )),
        Err(e) => bad.push(format!("{FILE_NAME}: cannot read it back: {e}")),
    }

    if bad.is_empty() {
        report(&out, "PASS");
        std::process::exit(0);
    }
    bad.truncate(MAX_REPORTED + 1);
    report(&out, &format!("FAIL {}", bad.join("; ")));
    std::process::exit(1);
}
