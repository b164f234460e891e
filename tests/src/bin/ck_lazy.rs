//! `ck_lazy --out FILE --cmd FIFO [--mib N] [--readers K] [--pace US]`: memory for
//! lazy restores (protocol: `tern_tests::ck`, plus commands).
//!
//! A process restored with `--lazy-pages` runs before its memory is in: a
//! page it touches must arrive with the image's data, whatever the process
//! did to its address space meanwhile, and never as zeros. This workload
//! makes every page self-describing and reads its memory all the time:
//!
//! - `main` (`--mib N`, default 16): page at address A, generation G holds
//!   A in word 0, G in word 1, and `word(A, G, k)` in every word k >= 2. So
//!   a zero page, a page of another address and a stale copy all show. A
//!   writer thread rewrites random pages of its upper half (seqlock: the
//!   generation table entry is marked busy while the page is written), and
//!   `--readers` threads (default 2) read random pages all the time (one
//!   every `--pace` microseconds each, default 250) and
//!   append `READ-FAIL <what>` to FILE at once when one is wrong (so that a
//!   process killed later still leaves the evidence).
//! - one 64-page region per memory change (`unmap`, `remap`, `dontneed`,
//!   `mapover`, `mprotect`) and 64 pages at the top of the heap (`brk`),
//!   filled at generation 0 and never read until a command changes them:
//!   with `--prefetch none` they are still lazy when the change comes.
//!
//! Commands come as lines `SEQ WORDS...` on the FIFO `--cmd` (created here,
//! held open read-write so that writers never block); each answer is a line
//! `reply SEQ PASS|FAIL ...` appended to FILE:
//! - `change KIND`: make the change on its region (saying first how many of
//!   its pages were still missing, from /proc/self/pagemap), then check what
//!   the region must hold now (see [`change`]);
//! - `fork`: fork a child that checks all memory as it was at the fork (its
//!   own copy, served through its own userfaultfd while pages are lazy) and
//!   exits 0 (PASS) or 1; the parent waits for it (60 s at most);
//! - `check`: pause the writer, check every page of every region, resume.
//!
//! On SIGTERM: `check`, and the readers must have read pages and found none
//! wrong; `PASS` or `FAIL`.
//!
//! `--break`: right after `ready`, word 5 of `main` page 1 is changed
//! without a new generation, as a restore serving a wrong page would.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tern_tests::ck::{break_requested, catch_sigterm, finish, out_path, report, terminated};
use tern_tests::pattern::{Rng, mix};

const PAGE: usize = 4096;
const PAGE64: u64 = 4096;
const WORDS: usize = PAGE / 8;
/// Pages of each change region.
const REGION_PAGES: usize = 64;
/// A generation table entry whose page is being rewritten.
const BUSY: u64 = 1 << 63;
/// Failures reported at most per check (the first ones).
const MAX_REPORTED: usize = 8;
/// READ-FAIL lines the readers append at most.
const MAX_READ_FAILS: u64 = 16;

/// Word `k` (>= 2) of the page at address `addr`, generation `generation`.
fn word(addr: u64, generation: u64, k: usize) -> u64 {
    mix(addr ^ (generation << 48) ^ ((k as u64) << 36))
}

/// What a run of pages must hold.
#[derive(Clone, Copy, Debug)]
enum Content {
    /// The pattern of address `origin` (+ page offset) at `generation`.
    Data { origin: u64, generation: u64 },
    /// Zeros: the range was emptied or mapped anew after the restore.
    Zero,
}

/// A run of pages (outside `main`) and what it must hold.
#[derive(Clone, Debug)]
struct Seg {
    name: &'static str,
    start: u64,
    pages: usize,
    want: Content,
}

struct State {
    main: u64,
    main_pages: usize,
    /// Generation of each page of `main` (BUSY while being rewritten).
    table: Vec<AtomicU64>,
    out: std::path::PathBuf,
    pause: AtomicBool,
    paused: AtomicBool,
    rewrites: AtomicU64,
    reads: AtomicU64,
    read_fails: AtomicU64,
    /// Regions outside `main`, as they must be now.
    segs: Mutex<Vec<Seg>>,
    /// Change regions by kind: (start, pages) as set up.
    regions: Mutex<Vec<(&'static str, u64)>>,
}

static STATE: OnceLock<State> = OnceLock::new();

fn st() -> &'static State {
    STATE.get().expect("state set up")
}

fn die(what: &str) -> ! {
    eprintln!("ck_lazy: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(3);
}

/// The words of a page, shared with other threads.
///
/// # Safety
/// `addr` must be a mapped, readable page for as long as the slice is used.
unsafe fn words<'a>(addr: u64) -> &'a [AtomicU64] {
    // SAFETY: the caller guarantees a whole readable page; AtomicU64 has
    // the layout of u64, and every access goes through the atomics.
    unsafe { std::slice::from_raw_parts(addr as *const AtomicU64, WORDS) }
}

fn fill(addr: u64, origin: u64, generation: u64) {
    // SAFETY: callers pass pages of their own writable mappings.
    let w = unsafe { words(addr) };
    for (k, x) in w.iter().enumerate().skip(2) {
        x.store(word(origin, generation, k), Ordering::Relaxed);
    }
    w[0].store(origin, Ordering::Relaxed);
    w[1].store(generation, Ordering::Relaxed);
}

/// Read the page at `addr` into `buf`.
fn read_page(addr: u64, buf: &mut [u64; WORDS]) {
    // SAFETY: callers pass mapped readable pages.
    let w = unsafe { words(addr) };
    for (b, x) in buf.iter_mut().zip(w) {
        *b = x.load(Ordering::Relaxed);
    }
}

/// The first difference of `buf` (read at `addr`) from `want`.
fn judge(addr: u64, buf: &[u64; WORDS], want: Content) -> Result<(), String> {
    match want {
        Content::Zero => match buf.iter().position(|&w| w != 0) {
            None => Ok(()),
            Some(k) => Err(format!(
                "page {addr:#x}: word {k} found {:#x}, expected 0 (image data where the memory was emptied or replaced)",
                buf[k]
            )),
        },
        Content::Data { origin, generation } => {
            if buf.iter().all(|&w| w == 0) {
                return Err(format!(
                    "page {addr:#x}: a zero page, expected the data of {origin:#x} generation {generation}"
                ));
            }
            if buf[0] != origin {
                return Err(format!(
                    "page {addr:#x}: holds the page of {:#x}, expected that of {origin:#x}",
                    buf[0]
                ));
            }
            if buf[1] != generation {
                return Err(format!(
                    "page {addr:#x}: generation {}, expected {generation}",
                    buf[1]
                ));
            }
            match (2..WORDS).find(|&k| buf[k] != word(origin, generation, k)) {
                None => Ok(()),
                Some(k) => Err(format!(
                    "page {addr:#x} generation {generation}: word {k} found {:#x}, expected {:#x}",
                    buf[k],
                    word(origin, generation, k)
                )),
            }
        }
    }
}

/// Read and judge page `i` of `main` under the seqlock; None if the writer
/// was rewriting it meanwhile.
fn judge_main(i: usize, buf: &mut [u64; WORDS]) -> Option<Result<(), String>> {
    let s = st();
    let addr = s.main + i as u64 * PAGE64;
    let t1 = s.table[i].load(Ordering::Acquire);
    if t1 & BUSY != 0 {
        return None;
    }
    read_page(addr, buf);
    fence(Ordering::Acquire);
    if s.table[i].load(Ordering::Relaxed) != t1 {
        return None;
    }
    Some(judge(
        addr,
        buf,
        Content::Data {
            origin: addr,
            generation: t1,
        },
    ))
}

fn mmap_anon(len: usize, prot: i32, at: Option<u64>) -> u64 {
    let (addr, extra) = match at {
        Some(a) => (a as *mut libc::c_void, libc::MAP_FIXED_NOREPLACE),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: a new anonymous mapping (never over an existing one: with an
    // address, MAP_FIXED_NOREPLACE).
    let p = unsafe {
        libc::mmap(
            addr,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        die(&format!("mmap of {len} bytes at {at:x?}"));
    }
    p as u64
}

fn setup_main(mib: usize) -> (u64, usize) {
    let pages = mib * 256;
    let main = mmap_anon(pages * PAGE, libc::PROT_READ | libc::PROT_WRITE, None);
    for i in 0..pages {
        let a = main + i as u64 * PAGE64;
        fill(a, a, 0);
    }
    (main, pages)
}

/// The heap's top 64 pages for `brk`: its own break increment, with
/// malloc kept from growing the heap past it (it would be cut by the
/// shrink): a big top pad makes malloc take all it will need now.
fn setup_brk() -> u64 {
    // SAFETY: mallopt and sbrk change this process's heap only; nothing
    // else here calls sbrk.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TOP_PAD, 32 << 20);
        let v: Vec<u8> = Vec::with_capacity(1 << 20);
        drop(std::hint::black_box(v));
        let cur = libc::sbrk(0) as u64;
        let pad = (PAGE64 - cur % PAGE64) % PAGE64;
        let len = isize::try_from(pad + (REGION_PAGES * PAGE) as u64).unwrap();
        let p = libc::sbrk(len);
        if p as isize == -1 {
            die("sbrk");
        }
        cur + pad
    }
}

fn setup() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| -> usize {
        match args.iter().position(|a| a == name) {
            None => default,
            Some(i) => args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    eprintln!("ck_lazy: {name} needs a number");
                    std::process::exit(2)
                }),
        }
    };
    let (main, main_pages) = setup_main(arg("--mib", 16));
    let mut segs = Vec::new();
    let mut regions = Vec::new();
    for name in ["unmap", "remap", "dontneed", "mapover", "mprotect", "brk"] {
        let start = if name == "brk" {
            setup_brk()
        } else {
            mmap_anon(
                REGION_PAGES * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                None,
            )
        };
        for i in 0..REGION_PAGES as u64 {
            let a = start + i * PAGE64;
            fill(a, a, 0);
        }
        segs.push(Seg {
            name,
            start,
            pages: REGION_PAGES,
            want: Content::Data {
                origin: start,
                generation: 0,
            },
        });
        regions.push((name, start));
    }
    let state = State {
        main,
        main_pages,
        table: (0..main_pages).map(|_| AtomicU64::new(0)).collect(),
        out: out_path(),
        pause: AtomicBool::new(false),
        paused: AtomicBool::new(false),
        rewrites: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        read_fails: AtomicU64::new(0),
        segs: Mutex::new(segs),
        regions: Mutex::new(regions),
    };
    if STATE.set(state).is_err() {
        return Err("set up twice".into());
    }
    Ok(())
}

/// Rewrite random pages of `main`'s upper half, a few hundred a second.
fn writer() {
    let s = st();
    let mut rng = Rng::from_time();
    let half = s.main_pages / 2;
    loop {
        if s.pause.load(Ordering::SeqCst) {
            s.paused.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        s.paused.store(false, Ordering::SeqCst);
        let i = half + usize::try_from(rng.below((s.main_pages - half) as u64)).unwrap();
        let a = s.main + i as u64 * PAGE64;
        let g = s.table[i].load(Ordering::Relaxed);
        s.table[i].store(g | BUSY, Ordering::Relaxed);
        fence(Ordering::Release);
        fill(a, a, g + 1);
        s.table[i].store(g + 1, Ordering::Release);
        s.rewrites.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// Read random pages of `main`, one every `pace`; report a wrong one at
/// once. Paced, so that a restore's fill still has pages to bring in when
/// a test interrupts it.
fn reader(n: u64, pace: Duration) {
    let s = st();
    let mut rng = Rng::new(n ^ u64::from(std::process::id()) << 8);
    let mut buf = [0u64; WORDS];
    loop {
        let i = usize::try_from(rng.below(s.main_pages as u64)).unwrap();
        if let Some(Err(e)) = judge_main(i, &mut buf)
            && s.read_fails.fetch_add(1, Ordering::SeqCst) < MAX_READ_FAILS
        {
            report(&s.out, &format!("READ-FAIL reader {n}: {e}"));
        }
        s.reads.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(pace);
    }
}

fn pause_writer(on: bool) {
    let s = st();
    s.pause.store(on, Ordering::SeqCst);
    if on {
        let t = Instant::now();
        while !s.paused.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Every page of `main` and of the regions, against what they must hold.
fn check_all() -> Vec<String> {
    check(None)
}

/// Every page of `main` and of the regions (only region `only` if given:
/// a change must not fault in the other regions, still lazy for theirs).
fn check(only: Option<&str>) -> Vec<String> {
    let s = st();
    let mut fails = Vec::new();
    let mut buf = [0u64; WORDS];
    let mut bad = 0usize;
    for i in 0..if only.is_some() { 0 } else { s.main_pages } {
        match judge_main(i, &mut buf) {
            Some(Err(e)) => {
                bad += 1;
                if fails.len() < MAX_REPORTED {
                    fails.push(format!("main: {e}"));
                }
            }
            Some(Ok(())) => {}
            // Rewritten while read (the writer is paused but for a child's
            // copy made in the middle of a rewrite): not judged.
            None => {}
        }
    }
    let segs = s.segs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for g in segs.iter().filter(|g| only.is_none_or(|o| o == g.name)) {
        for p in 0..g.pages as u64 {
            let addr = g.start + p * PAGE64;
            let want = match g.want {
                Content::Data { origin, generation } => Content::Data {
                    origin: origin + p * PAGE64,
                    generation,
                },
                Content::Zero => Content::Zero,
            };
            read_page(addr, &mut buf);
            if let Err(e) = judge(addr, &buf, want) {
                bad += 1;
                if fails.len() < MAX_REPORTED {
                    fails.push(format!("{}: {e}", g.name));
                }
            }
        }
    }
    if bad > fails.len() {
        fails.push(format!("{} more wrong pages", bad - fails.len()));
    }
    fails
}

fn region(name: &str) -> u64 {
    st().regions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|r| r.0 == name)
        .map(|r| r.1)
        .unwrap_or_else(|| die(&format!("no region {name}")))
}

/// Of `pages` pages at `addr`, how many are not in memory (neither present
/// nor swapped, from /proc/self/pagemap): still lazy after a restore.
fn missing(addr: u64, pages: usize) -> Result<usize, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut b = vec![0u8; pages * 8];
    f.read_exact_at(&mut b, addr / PAGE64 * 8)
        .map_err(|e| format!("/proc/self/pagemap at {addr:#x}: {e}"))?;
    Ok(b.chunks_exact(8)
        .filter(|w| u64::from_le_bytes((*w).try_into().unwrap()) & (3 << 62) == 0)
        .count())
}

/// Replace the segment(s) of `name` with `new`.
fn set_segs(name: &str, new: Vec<Seg>) {
    let mut segs = st().segs.lock().unwrap_or_else(|e| e.into_inner());
    segs.retain(|g| g.name != name);
    segs.extend(new);
}

fn data(name: &'static str, start: u64, pages: usize, origin: u64, generation: u64) -> Seg {
    Seg {
        name,
        start,
        pages,
        want: Content::Data { origin, generation },
    }
}

fn zero(name: &'static str, start: u64, pages: usize) -> Seg {
    Seg {
        name,
        start,
        pages,
        want: Content::Zero,
    }
}

fn sys(what: &str, rc: i64) -> Result<(), String> {
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Make the memory change `kind` on its region (all of whose pages must
/// still be lazy: the reply says how many were), then check all memory.
///
/// Each change touches pages 16..48 of its 64-page region R:
/// - `unmap`: munmap them, then map anonymous memory there anew: it must
///   read zeros (no image page may land in it), the rest of R its data;
/// - `remap`: mremap all of R to a new place, grown to 96 pages: the 64
///   pages hold R's data there, the 32 new ones zeros;
/// - `dontneed`: MADV_DONTNEED them: zeros;
/// - `mapover`: mmap MAP_FIXED anonymous over them: zeros;
/// - `mprotect`: make them read-only and read them (data), pages 0..8
///   PROT_NONE and back, and page 20 written anew (generation 1);
/// - `brk`: the heap shrunk by R's upper half (pages 32..64), then grown
///   back: those read zeros, pages 0..32 their data.
fn change(kind: &str) -> Result<String, String> {
    let r = region(kind);
    let lazy = missing(r, REGION_PAGES)?;
    let p = |i: u64| r + i * PAGE64;
    let mid = 32 * PAGE;
    let name: &'static str = match kind {
        "unmap" => "unmap",
        "remap" => "remap",
        "dontneed" => "dontneed",
        "mapover" => "mapover",
        "mprotect" => "mprotect",
        "brk" => "brk",
        other => return Err(format!("unknown change {other:?}")),
    };
    match kind {
        "unmap" => {
            // SAFETY: a system call on this process's own change region, which nothing else uses.
            sys("munmap", unsafe { libc::munmap(p(16) as _, mid) }.into())?;
            set_segs(
                name,
                vec![data(name, r, 16, r, 0), data(name, p(48), 16, p(48), 0)],
            );
            // The remaining pages first, while the hole is unmapped.
            let f = check(Some(name));
            if !f.is_empty() {
                return Err(format!("after munmap: {}", f.join("; ")));
            }
            mmap_anon(mid, libc::PROT_READ | libc::PROT_WRITE, Some(p(16)));
            set_segs(
                name,
                vec![
                    data(name, r, 16, r, 0),
                    zero(name, p(16), 32),
                    data(name, p(48), 16, p(48), 0),
                ],
            );
        }
        "remap" => {
            // A free place for 96 pages: map it, then let mremap replace it.
            let to = mmap_anon(96 * PAGE, libc::PROT_NONE, None);
            // SAFETY: a system call on this process's own change region, which nothing else uses.
            let got = unsafe {
                libc::mremap(
                    r as _,
                    REGION_PAGES * PAGE,
                    96 * PAGE,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    to as *mut libc::c_void,
                )
            };
            if got == libc::MAP_FAILED {
                return Err(format!("mremap: {}", std::io::Error::last_os_error()));
            }
            let t = got as u64;
            set_segs(
                name,
                vec![
                    data(name, t, REGION_PAGES, r, 0),
                    zero(name, t + (REGION_PAGES * PAGE) as u64, 32),
                ],
            );
            // The old place must be gone: mapping it anew must work.
            let again = mmap_anon(
                REGION_PAGES * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                Some(r),
            );
            let mut g = st().segs.lock().unwrap_or_else(|e| e.into_inner());
            g.push(zero(name, again, REGION_PAGES));
        }
        "dontneed" => {
            sys(
                "madvise",
                // SAFETY: a system call on this process's own change region, which nothing else uses.
                unsafe { libc::madvise(p(16) as _, mid, libc::MADV_DONTNEED) }.into(),
            )?;
            set_segs(
                name,
                vec![
                    data(name, r, 16, r, 0),
                    zero(name, p(16), 32),
                    data(name, p(48), 16, p(48), 0),
                ],
            );
        }
        "mapover" => {
            // SAFETY: a system call on this process's own change region, which nothing else uses.
            let got = unsafe {
                libc::mmap(
                    p(16) as _,
                    mid,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if got as u64 != p(16) {
                return Err(format!("mmap over: {}", std::io::Error::last_os_error()));
            }
            set_segs(
                name,
                vec![
                    data(name, r, 16, r, 0),
                    zero(name, p(16), 32),
                    data(name, p(48), 16, p(48), 0),
                ],
            );
        }
        "mprotect" => {
            sys(
                "mprotect r",
                // SAFETY: a system call on this process's own change region, which nothing else uses.
                unsafe { libc::mprotect(p(16) as _, mid, libc::PROT_READ) }.into(),
            )?;
            sys(
                "mprotect none",
                // SAFETY: a system call on this process's own change region, which nothing else uses.
                unsafe { libc::mprotect(p(0) as _, 8 * PAGE, libc::PROT_NONE) }.into(),
            )?;
            // The read-only pages, read (faulted in) while read-only.
            let f = {
                let mut buf = [0u64; WORDS];
                (16..48)
                    .filter_map(|i| {
                        read_page(p(i), &mut buf);
                        judge(
                            p(i),
                            &buf,
                            Content::Data {
                                origin: p(i),
                                generation: 0,
                            },
                        )
                        .err()
                    })
                    .collect::<Vec<_>>()
            };
            if !f.is_empty() {
                return Err(format!("read-only pages: {}", f.join("; ")));
            }
            sys(
                "mprotect rw",
                // SAFETY: a system call on this process's own change region, which nothing else uses.
                unsafe { libc::mprotect(p(0) as _, 64 * PAGE, libc::PROT_READ | libc::PROT_WRITE) }
                    .into(),
            )?;
            fill(p(20), p(20), 1);
            set_segs(
                name,
                vec![
                    data(name, r, 20, r, 0),
                    data(name, p(20), 1, p(20), 1),
                    data(name, p(21), 43, p(21), 0),
                ],
            );
        }
        "brk" => {
            let end = r + (REGION_PAGES * PAGE) as u64;
            // SAFETY: sbrk(0) only reads the break.
            let now = unsafe { libc::sbrk(0) } as u64;
            if now != end {
                return Err(format!(
                    "the heap's break is {now:#x}, not {end:#x} where this test's pages end: malloc grew the heap past them"
                ));
            }
            let half = isize::try_from(mid).unwrap();
            // SAFETY: a system call on this process's own change region, which nothing else uses.
            if unsafe { libc::sbrk(-half) } as isize == -1 {
                return Err(format!(
                    "sbrk(-{half}): {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: a system call on this process's own change region, which nothing else uses.
            if unsafe { libc::sbrk(half) } as isize == -1 {
                return Err(format!("sbrk({half}): {}", std::io::Error::last_os_error()));
            }
            set_segs(name, vec![data(name, r, 32, r, 0), zero(name, p(32), 32)]);
        }
        _ => unreachable!(),
    }
    let f = check(Some(name));
    if f.is_empty() {
        Ok(format!("lazy {lazy}/{REGION_PAGES}"))
    } else {
        Err(format!("lazy {lazy}/{REGION_PAGES}: {}", f.join("; ")))
    }
}

/// Fork a child that checks all memory (its copy) and exits 0 or 1.
fn fork_check() -> Result<String, String> {
    let s = st();
    let lazy = missing(s.main, s.main_pages)?;
    // SAFETY: the child only reads memory, appends to a file and exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        let f = check_all();
        if !f.is_empty() {
            report(&s.out, &format!("child FAIL {}", f.join("; ")));
        }
        // SAFETY: leave at once, without running the parent's exit handlers.
        unsafe { libc::_exit(i32::from(!f.is_empty())) };
    }
    let t = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            return if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(format!(
                    "child {child}; main pages lazy at the fork: {lazy}"
                ))
            } else {
                Err(format!(
                    "child {child} ended with status {status:#x} (main pages lazy at the fork: {lazy})"
                ))
            };
        }
        if t.elapsed() > Duration::from_secs(60) {
            // SAFETY: kill our own child.
            unsafe { libc::kill(child, libc::SIGKILL) };
            return Err(format!("child {child} did not end within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn command(line: &str) -> Option<(String, Result<String, String>)> {
    let mut w = line.split_whitespace();
    let seq = w.next()?.to_string();
    let res = match (w.next(), w.next()) {
        (Some("change"), Some(kind)) => change(kind),
        (Some("fork"), None) => fork_check(),
        (Some("check"), None) => {
            pause_writer(true);
            let f = check_all();
            pause_writer(false);
            if f.is_empty() {
                Ok(format!("{} reads", st().reads.load(Ordering::Relaxed)))
            } else {
                Err(f.join("; "))
            }
        }
        _ => Err(format!("unknown command {line:?}")),
    };
    Some((seq, res))
}

fn main() {
    let out = out_path();
    if let Err(e) = setup() {
        eprintln!("ck_lazy: {e}");
        std::process::exit(3);
    }
    let cmd_path = {
        let a: Vec<String> = std::env::args().collect();
        match a.iter().position(|x| x == "--cmd") {
            Some(i) if i + 1 < a.len() => a[i + 1].clone(),
            _ => {
                eprintln!("ck_lazy: --cmd FIFO is required");
                std::process::exit(2);
            }
        }
    };
    let c = std::ffi::CString::new(cmd_path.clone()).unwrap();
    // SAFETY: mkfifo and open on a valid C string.
    let fd = unsafe {
        if libc::mkfifo(c.as_ptr(), 0o600) != 0 {
            die(&format!("mkfifo {cmd_path}"));
        }
        libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK)
    };
    if fd < 0 {
        die(&format!("open {cmd_path}"));
    }
    if let Err(e) = catch_sigterm() {
        eprintln!("ck_lazy: {e}");
        std::process::exit(3);
    }
    let num_arg = |name: &str, default: u64| {
        let a: Vec<String> = std::env::args().collect();
        a.iter()
            .position(|x| x == name)
            .and_then(|i| a.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let readers = num_arg("--readers", 2);
    let pace = Duration::from_micros(num_arg("--pace", 250));
    std::thread::Builder::new()
        .name("writer".into())
        .spawn(writer)
        .unwrap();
    for n in 0..readers {
        std::thread::Builder::new()
            .name(format!("reader-{n}"))
            .spawn(move || reader(n, pace))
            .unwrap();
    }
    report(&out, &format!("ready {}", std::process::id()));
    if break_requested() {
        let a = st().main + PAGE64;
        // SAFETY: page 1 of `main`, mapped read-write; the writer never
        // rewrites the lower half.
        let w = unsafe { words(a) };
        w[5].fetch_xor(1, Ordering::Relaxed);
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !terminated() {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll and read on our own FIFO with a buffer we own.
        let n = unsafe {
            if libc::poll(&mut pfd, 1, 50) <= 0 {
                continue;
            }
            libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
        };
        let Ok(n) = usize::try_from(n) else { continue };
        pending.extend_from_slice(&buf[..n]);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some((seq, res)) = command(&line) {
                let mut text = Vec::new();
                let _ = match res {
                    Ok(t) => write!(text, "reply {seq} PASS {t}"),
                    Err(e) => write!(text, "reply {seq} FAIL {e}"),
                };
                report(&out, &String::from_utf8_lossy(&text));
            }
        }
    }
    // The verdict.
    let s = st();
    pause_writer(true);
    let mut fails = check_all();
    let reads = s.reads.load(Ordering::Relaxed);
    let rf = s.read_fails.load(Ordering::SeqCst);
    if rf > 0 {
        fails.push(format!(
            "the readers found {rf} wrong pages (READ-FAIL lines)"
        ));
    }
    if reads == 0 {
        fails.push("the readers read no page".into());
    }
    if readers > 0 && s.rewrites.load(Ordering::Relaxed) == 0 {
        fails.push("the writer rewrote no page".into());
    }
    finish(&out, &fails);
}
