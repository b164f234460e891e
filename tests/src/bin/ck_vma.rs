//! `ck_vma --out FILE [--prctl] [--break]`: VMA attributes (protocol:
//! `tern_tests::ck`). Single-threaded.
//!
//! A restore must give every mapping back not only its bytes but its exact
//! range and its VMA flags (madvise state, locking, sealing, growth, ...).
//! This workload sets up one VMA of each kind and, on SIGTERM, compares
//! /proc/self/smaps with a snapshot taken right before `ready`.
//!
//! Setup: every region is a private anonymous mapping of a few pages (unless
//! said otherwise), placed MAP_FIXED inside a PROT_NONE arena with a
//! PROT_NONE page between regions (so no two regions can merge), every page
//! filled with a pattern derived from region index and page index:
//! - `dd` MADV_DONTDUMP, `dc` MADV_DONTFORK, `wf` MADV_WIPEONFORK,
//!   `hg` MADV_HUGEPAGE (4 MiB), `nh` MADV_NOHUGEPAGE, `mg` MADV_MERGEABLE,
//!   `sr` MADV_SEQUENTIAL, `rr` MADV_RANDOM, `nr` MAP_NORESERVE;
//! - `dp` MAP_DROPPABLE (content: each page the pattern or zeros, as the
//!   kernel may drop it);
//! - `lo` mlock; `lf` mlock2(MLOCK_ONFAULT) with only its first half touched
//!   (the rest must read as zeros);
//! - `adjA`/`adjB`: two adjacent rw regions kept as two VMAs (B was mapped
//!   elsewhere, filled, and mremap'ed with MREMAP_FIXED to A's end);
//! - `shfile`: MAP_SHARED, PROT_READ, of `ck_vma.data` (created in the cwd)
//!   opened O_RDWR, so VmFlags have `mw`;
//! - `gd`: 4 pages MAP_GROWSDOWN with at least 8 MiB free below it;
//! - `sl`: sealed with mseal(2), last, right before `ready`;
//! - with `--prctl`: PR_SET_THP_DISABLE and PR_SET_MEMORY_MERGE.
//!
//! Between `ready` and the verdict it allocates nothing (the smaps buffers
//! are reserved before, the `ready` line is written from prebuilt bytes, the
//! stack was grown in advance), so its own maps do not change.
//!
//! On SIGTERM: snapshot /proc/self/smaps; touch 256 KiB below `gd` (it must
//! grow; a SIGSEGV there is a FAIL); then compare the two snapshots VMA by
//! VMA (header: range, perms, offset, dev, inode except for shared anonymous
//! `/dev/zero (deleted)`/`/SYSV` lines, name; fields Size, KernelPageSize,
//! MMUPageSize, THPeligible, ProtectionKey, VmFlags without `sd`, `um`,
//! `uw`, `ui`); check that each region is exactly one VMA with exactly its
//! range and the expected VmFlags; check every region's content; make
//! `shfile` writable with mprotect and check that a write through it reaches
//! the file; with `--prctl`, PR_GET_THP_DISABLE, PR_GET_MEMORY_MERGE and
//! `THP_enabled:` in /proc/self/status. FAIL names the region/VMA, the
//! field, found and expected. A feature missing on this kernel is a FAIL at
//! setup, never a skip.
//!
//! `--break`: right after `ready`, MADV_DODUMP on `dd`.

use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::time::Duration;

use tern_tests::ck;

const PAGE: usize = 4096;
const FILE_NAME: &str = "ck_vma.data";
const MADV_WIPEONFORK: i32 = 18;
const MADV_DODUMP: i32 = 17;
const MLOCK_ONFAULT: u32 = 1;
const MAP_DROPPABLE: i32 = 0x08;
const SYS_MSEAL: libc::c_long = 462;
const PR_SET_THP_DISABLE: i32 = 41;
const PR_GET_THP_DISABLE: i32 = 42;
const PR_SET_MEMORY_MERGE: i32 = 67;
const PR_GET_MEMORY_MERGE: i32 = 68;
/// Bytes reserved for each smaps snapshot.
const SNAP_CAP: usize = 8 << 20;
/// How far below `gd` the verdict touches.
const GROW: usize = 256 * 1024;
/// smaps fields compared (residency fields are not).
const FIELDS: &[&str] = &[
    "Size",
    "KernelPageSize",
    "MMUPageSize",
    "THPeligible",
    "ProtectionKey",
    "VmFlags",
];
/// VmFlags ignored in the comparison.
const IGNORED_FLAGS: &[&str] = &["sd", "um", "uw", "ui"];

/// The result file as a C string, for the signal handler and the `ready`
/// line (set once at start, leaked).
static OUT_C: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
/// Set while the verdict touches below `gd`.
static GD_TOUCH: AtomicBool = AtomicBool::new(false);

/// Append raw bytes (ending in '\n') to the result file: no allocation,
/// async-signal-safe.
fn raw_report(line: &[u8]) {
    let p = OUT_C.load(Ordering::SeqCst);
    if p.is_null() {
        return;
    }
    // SAFETY: p is a leaked NUL-terminated string; plain syscalls.
    unsafe {
        let fd = libc::open(
            p,
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
            0o666,
        );
        if fd >= 0 {
            libc::write(fd, line.as_ptr().cast(), line.len());
            libc::close(fd);
        }
    }
}

extern "C" fn on_segv(_: i32) {
    if GD_TOUCH.load(Ordering::SeqCst) {
        raw_report(
            b"FAIL gd (MAP_GROWSDOWN): touching 256 KiB below its start raised SIGSEGV, it did not grow\n",
        );
    } else {
        raw_report(b"FAIL unexpected SIGSEGV\n");
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(1) };
}

fn err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Setup failure: a FAIL verdict naming it (never a skip), exit 1.
fn setup_fail(out: &Path, what: String) -> ! {
    ck::finish(out, &[format!("setup: {what}")]);
}

/// Byte `off` of page `page` of region `region`.
fn fill_byte(region: usize, page: usize, off: usize) -> u8 {
    (region * 131 + page * 7 + off % 251 + off / 251).to_le_bytes()[0] ^ 0xA5
}

fn fill(p: *mut u8, region: usize, pages: std::ops::Range<usize>) {
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

/// What a region's pages must hold at the verdict.
#[derive(Clone, Copy, PartialEq)]
enum Content {
    /// Every page the pattern.
    Filled,
    /// The first `n` pages the pattern, the rest zeros.
    FirstFilled(usize),
    /// Each page the pattern or all zeros (MAP_DROPPABLE).
    PatternOrZero,
    /// Not checked here (growsdown, the shared file: checked separately).
    Other,
}

#[derive(Clone, Copy)]
struct Region {
    name: &'static str,
    index: usize,
    addr: usize,
    pages: usize,
    flags: &'static [&'static str],
    content: Content,
}

/// Map `len` bytes at `at` (MAP_FIXED) or anywhere.
fn mmap_at(at: usize, len: usize, prot: i32, flags: i32, fd: i32) -> Result<*mut u8, String> {
    let fixed = if at != 0 { libc::MAP_FIXED } else { 0 };
    // SAFETY: at is inside our own arena (or 0: the kernel chooses).
    let p = unsafe { libc::mmap(at as *mut libc::c_void, len, prot, flags | fixed, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mmap({at:#x}, {len}, prot {prot:#x}, flags {:#x}): {}",
            flags | fixed,
            err()
        ));
    }
    Ok(p.cast())
}

/// Read /proc/self/smaps into `buf` without allocating; the length read.
fn snapshot(buf: &mut [u8]) -> Result<usize, String> {
    // SAFETY: plain syscalls into our own buffer.
    unsafe {
        let fd = libc::open(
            c"/proc/self/smaps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(format!("open /proc/self/smaps: {}", err()));
        }
        let mut len = 0;
        loop {
            if len == buf.len() {
                libc::close(fd);
                return Err(format!(
                    "/proc/self/smaps is larger than {} bytes",
                    buf.len()
                ));
            }
            let n = libc::read(fd, buf.as_mut_ptr().add(len).cast(), buf.len() - len);
            if n < 0 {
                let e = err();
                libc::close(fd);
                return Err(format!("read /proc/self/smaps: {e}"));
            }
            if n == 0 {
                break;
            }
            len += n as usize;
        }
        libc::close(fd);
        Ok(len)
    }
}

/// Grow the main thread's stack in advance, so that neither the signal
/// frame nor the verdict code grows the `[stack]` VMA before the snapshot.
#[inline(never)]
fn pregrow_stack() {
    let mut a = [0u8; 512 * 1024];
    for i in (0..a.len()).step_by(PAGE) {
        // SAFETY: inside the local array.
        unsafe { (a.as_mut_ptr().add(i)).write_volatile(1) };
    }
    std::hint::black_box(&a);
}

/// One VMA of /proc/self/smaps.
#[derive(Debug)]
struct SVma {
    start: usize,
    end: usize,
    perms: String,
    offset: String,
    dev: String,
    inode: String,
    name: String,
    fields: Vec<(String, String)>,
}

impl SVma {
    fn field(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    fn flags(&self) -> Vec<&str> {
        self.field("VmFlags")
            .unwrap_or("")
            .split_whitespace()
            .collect()
    }
    fn range(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

/// Split off the first whitespace-separated token.
fn token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

fn parse_smaps(text: &str) -> Vec<SVma> {
    let mut v: Vec<SVma> = Vec::new();
    for line in text.lines() {
        let (first, rest) = token(line);
        if !first.ends_with(':')
            && let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            let (perms, rest) = token(rest);
            let (offset, rest) = token(rest);
            let (dev, rest) = token(rest);
            let (inode, rest) = token(rest);
            v.push(SVma {
                start,
                end,
                perms: perms.into(),
                offset: offset.into(),
                dev: dev.into(),
                inode: inode.into(),
                name: rest.trim().into(),
                fields: Vec::new(),
            });
        } else if let Some(cur) = v.last_mut()
            && let Some((k, val)) = line.split_once(':')
        {
            let val = if k == "VmFlags" {
                val.split_whitespace()
                    .filter(|f| !IGNORED_FLAGS.contains(f))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                val.split_whitespace().collect::<Vec<_>>().join(" ")
            };
            cur.fields.push((k.trim().to_string(), val));
        }
    }
    v
}

/// A label for the VMA at `start..end`: the regions it overlaps, or its name.
fn label(regions: &[Region], v: &SVma) -> String {
    let names: Vec<&str> = regions
        .iter()
        .filter(|r| r.addr < v.end && v.start < r.addr + r.pages * PAGE)
        .map(|r| r.name)
        .collect();
    let what = if !names.is_empty() {
        format!("region {}", names.join("+"))
    } else if v.name.is_empty() {
        "anonymous".to_string()
    } else {
        v.name.clone()
    };
    format!("VMA {} ({what})", v.range())
}

fn shared_anon(name: &str) -> bool {
    name.starts_with("/dev/zero") || name.starts_with("/SYSV")
}

/// Compare the smaps snapshot before `ready` with the one at the verdict.
fn compare_smaps(regions: &[Region], before: &[SVma], after: &[SVma], bad: &mut Vec<String>) {
    for b in before {
        let Some(a) = after.iter().find(|a| a.start == b.start) else {
            let cover = after
                .iter()
                .find(|a| a.start <= b.start && b.start < a.end)
                .map(|a| format!("{} {} {}", a.range(), a.perms, a.name))
                .unwrap_or_else(|| "nothing".into());
            bad.push(format!(
                "{}: no VMA starts there at the verdict (found {cover} there), expected {} {} {}",
                label(regions, b),
                b.range(),
                b.perms,
                b.name
            ));
            continue;
        };
        let l = label(regions, b);
        let mut header = vec![
            ("range", a.range(), b.range()),
            ("perms", a.perms.clone(), b.perms.clone()),
            ("offset", a.offset.clone(), b.offset.clone()),
            ("dev", a.dev.clone(), b.dev.clone()),
            ("name", a.name.clone(), b.name.clone()),
        ];
        if !(shared_anon(&a.name) && shared_anon(&b.name)) {
            header.push(("inode", a.inode.clone(), b.inode.clone()));
        }
        for (what, found, want) in header {
            if found != want {
                bad.push(format!("{l}: {what} found {found:?}, expected {want:?}"));
            }
        }
        for f in FIELDS {
            let (found, want) = (a.field(f), b.field(f));
            if found != want {
                bad.push(format!(
                    "{l}: {f} found {:?}, expected {:?}",
                    found.unwrap_or("(absent)"),
                    want.unwrap_or("(absent)")
                ));
            }
        }
    }
    for a in after {
        if !before.iter().any(|b| b.start == a.start) {
            bad.push(format!(
                "{}: a VMA that was not there before ready ({} {} {})",
                label(regions, a),
                a.range(),
                a.perms,
                a.name
            ));
        }
    }
}

/// Each region exactly one VMA with its range and the expected flags.
fn check_regions(regions: &[Region], after: &[SVma], bad: &mut Vec<String>) {
    for r in regions {
        let (start, end) = (r.addr, r.addr + r.pages * PAGE);
        let over: Vec<&SVma> = after
            .iter()
            .filter(|v| v.start < end && start < v.end)
            .collect();
        let exact = over.len() == 1 && over[0].start == start && over[0].end == end;
        if !exact {
            let found: Vec<String> = over.iter().map(|v| v.range()).collect();
            bad.push(format!(
                "region {}: VMAs found [{}], expected exactly one {start:x}-{end:x}",
                r.name,
                found.join(", ")
            ));
            continue;
        }
        let flags = over[0].flags();
        for f in r.flags {
            if !flags.contains(f) {
                bad.push(format!(
                    "region {} ({start:x}-{end:x}): VmFlags found {:?}, expected to contain {f:?}",
                    r.name,
                    flags.join(" ")
                ));
            }
        }
    }
}

fn check_content(r: &Region, bad: &mut Vec<String>) {
    for page in 0..r.pages {
        let base = r.addr + page * PAGE;
        let first = |want: &dyn Fn(usize) -> u8| {
            (0..PAGE).find_map(|off| {
                // SAFETY: the page is mapped readable (the maps were checked).
                let b = unsafe { ((base + off) as *const u8).read_volatile() };
                (b != want(off)).then_some((off, b, want(off)))
            })
        };
        let pattern = |off| fill_byte(r.index, page, off);
        let zero = |_| 0u8;
        let diff = match r.content {
            Content::Filled => first(&pattern),
            Content::FirstFilled(n) if page < n => first(&pattern),
            Content::FirstFilled(_) => first(&zero),
            Content::PatternOrZero => {
                if first(&zero).is_none() {
                    None
                } else {
                    first(&pattern)
                }
            }
            Content::Other => None,
        };
        if let Some((off, b, w)) = diff {
            bad.push(format!(
                "region {} page {page} byte {off}: found {b:#04x}, expected {w:#04x}",
                r.name
            ));
            return;
        }
    }
}

fn prctl_checks(bad: &mut Vec<String>) {
    // SAFETY: prctl queries without pointers.
    let thp = unsafe { libc::prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    if thp != 1 {
        bad.push(format!("PR_GET_THP_DISABLE found {thp}, expected 1"));
    }
    // SAFETY: as above.
    let merge = unsafe { libc::prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) };
    if merge != 1 {
        bad.push(format!("PR_GET_MEMORY_MERGE found {merge}, expected 1"));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status.lines().find(|l| l.starts_with("THP_enabled:")) {
        Some(l) if l.split_whitespace().nth(1) == Some("0") => {}
        Some(l) => bad.push(format!(
            "/proc/self/status THP_enabled found {:?}, expected 0",
            l.split_whitespace().nth(1).unwrap_or("")
        )),
        None => bad.push("/proc/self/status has no THP_enabled line".into()),
    }
}

fn main() {
    let out = ck::out_path();
    let broken = ck::break_requested();
    let prctl = std::env::args().any(|a| a == "--prctl");
    let out_c = CString::new(out.as_os_str().as_encoded_bytes()).expect("--out without NUL");
    OUT_C.store(out_c.into_raw(), Ordering::SeqCst);
    if let Err(e) = ck::catch_sigterm() {
        setup_fail(&out, e);
    }
    // SAFETY: the handler only writes with syscalls and _exits.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_segv as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut()) != 0 {
            setup_fail(&out, format!("sigaction(SIGSEGV): {}", err()));
        }
    }
    let pid = std::process::id();
    let ready_line = format!("ready {pid}\n").into_bytes();
    let mut snap_before = vec![0u8; SNAP_CAP];
    let mut snap_after = vec![0u8; SNAP_CAP];

    if prctl {
        // SAFETY: prctl without pointers.
        if unsafe { libc::prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            setup_fail(&out, format!("prctl(PR_SET_THP_DISABLE, 1): {}", err()));
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) } != 0 {
            setup_fail(&out, format!("prctl(PR_SET_MEMORY_MERGE, 1): {}", err()));
        }
    }

    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // (name, pages, mmap flags, madvise advice or -1, expected VmFlags)
    type Spec = (&'static str, usize, i32, i32, &'static [&'static str]);
    let specs: &[Spec] = &[
        ("dd", 4, anon, libc::MADV_DONTDUMP, &["dd"]),
        ("dc", 4, anon, libc::MADV_DONTFORK, &["dc"]),
        ("wf", 4, anon, MADV_WIPEONFORK, &["wf"]),
        ("hg", 1024, anon, libc::MADV_HUGEPAGE, &["hg"]),
        ("nh", 4, anon, libc::MADV_NOHUGEPAGE, &["nh"]),
        ("mg", 4, anon, libc::MADV_MERGEABLE, &["mg"]),
        ("sr", 4, anon, libc::MADV_SEQUENTIAL, &["sr"]),
        ("rr", 4, anon, libc::MADV_RANDOM, &["rr"]),
        ("nr", 4, anon | libc::MAP_NORESERVE, -1, &["nr"]),
        ("dp", 4, MAP_DROPPABLE | libc::MAP_ANONYMOUS, -1, &["dp"]),
        ("lo", 4, anon, -1, &["lo"]),
        ("lf", 8, anon, -1, &["lo", "lf"]),
        ("adjA", 4, anon, -1, &[]),
        ("adjB", 4, anon, -1, &[]),
        ("shfile", 4, libc::MAP_SHARED, -1, &["sh", "mw"]),
        ("sl", 4, anon, -1, &["sl"]),
    ];
    // The arena: every region plus a PROT_NONE page before each one (adjB
    // directly follows adjA, no separator).
    let arena_pages: usize = specs.iter().map(|s| s.1 + 1).sum::<usize>() + 1;
    let arena = match mmap_at(0, arena_pages * PAGE, libc::PROT_NONE, anon, -1) {
        Ok(p) => p as usize,
        Err(e) => setup_fail(&out, format!("arena: {e}")),
    };
    let mut regions: Vec<Region> = Vec::new();
    let mut sh_fd = -1;
    let mut at = arena + PAGE;
    for (index, &(name, pages, flags, advice, want)) in specs.iter().enumerate() {
        let len = pages * PAGE;
        let addr = match name {
            "adjB" => {
                // Map elsewhere, fill, then move it to adjA's end.
                at -= PAGE; // no separator
                let b = match mmap_at(0, len, rw, anon, -1) {
                    Ok(p) => p,
                    Err(e) => setup_fail(&out, format!("adjB: {e}")),
                };
                fill(b, index, 0..pages);
                // SAFETY: b is ours; the target is inside our arena.
                let p = unsafe {
                    libc::mremap(
                        b.cast(),
                        len,
                        len,
                        libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE,
                        at as *mut libc::c_void,
                    )
                };
                if p == libc::MAP_FAILED || p as usize != at {
                    setup_fail(
                        &out,
                        format!("adjB: mremap(MREMAP_FIXED) to {at:#x}: {}", err()),
                    );
                }
                at
            }
            "shfile" => {
                let bytes: Vec<u8> = (0..len)
                    .map(|i| fill_byte(index, i / PAGE, i % PAGE))
                    .collect();
                if let Err(e) = std::fs::write(FILE_NAME, &bytes) {
                    setup_fail(&out, format!("cannot write {FILE_NAME}: {e}"));
                }
                let c = CString::new(FILE_NAME).unwrap();
                // SAFETY: open of a C string; the fd is kept open on purpose.
                let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
                if fd < 0 {
                    setup_fail(&out, format!("open {FILE_NAME} O_RDWR: {}", err()));
                }
                let p = match mmap_at(at, len, libc::PROT_READ, flags, fd) {
                    Ok(p) => p,
                    Err(e) => setup_fail(&out, format!("shfile: {e}")),
                };
                sh_fd = fd;
                p as usize
            }
            _ => {
                let p = match mmap_at(at, len, rw, flags, -1) {
                    Ok(p) => p,
                    Err(e) => setup_fail(
                        &out,
                        format!(
                            "{name}{}: {e}",
                            if name == "dp" { " (MAP_DROPPABLE)" } else { "" }
                        ),
                    ),
                };
                if name == "lf" {
                    fill(p, index, 0..pages / 2);
                } else {
                    fill(p, index, 0..pages);
                }
                p as usize
            }
        };
        if advice >= 0 {
            // SAFETY: our own region.
            if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } != 0 {
                setup_fail(&out, format!("madvise({name}, advice {advice}): {}", err()));
            }
        }
        let locked = match name {
            // SAFETY: our own region.
            "lo" => unsafe { libc::mlock(addr as *const libc::c_void, len) },
            // SAFETY: our own region.
            "lf" => unsafe { libc::mlock2(addr as *const libc::c_void, len, MLOCK_ONFAULT) },
            _ => 0,
        };
        if locked != 0 {
            let call = if name == "lo" {
                "mlock"
            } else {
                "mlock2(MLOCK_ONFAULT)"
            };
            setup_fail(&out, format!("{call} of {name}: {}", err()));
        }
        let content = match name {
            "lf" => Content::FirstFilled(pages / 2),
            "dp" => Content::PatternOrZero,
            "shfile" => Content::Other,
            _ => Content::Filled,
        };
        regions.push(Region {
            name,
            index,
            addr,
            pages,
            flags: want,
            content,
        });
        at = addr + len + PAGE;
    }

    // gd: 4 pages MAP_GROWSDOWN at the top of a 16 MiB hole.
    let hole = 16 << 20;
    let probe = match mmap_at(0, hole, libc::PROT_NONE, anon, -1) {
        Ok(p) => p as usize,
        Err(e) => setup_fail(&out, format!("gd hole: {e}")),
    };
    // SAFETY: our own probe mapping.
    unsafe { libc::munmap(probe as *mut libc::c_void, hole) };
    let gd_len = 4 * PAGE;
    let gd_index = specs.len();
    let gd = match mmap_at(
        probe + hole - gd_len,
        gd_len,
        rw,
        anon | libc::MAP_GROWSDOWN,
        -1,
    ) {
        Ok(p) => p as usize,
        Err(e) => setup_fail(&out, format!("gd (MAP_GROWSDOWN): {e}")),
    };
    fill(gd as *mut u8, gd_index, 0..4);
    regions.push(Region {
        name: "gd",
        index: gd_index,
        addr: gd,
        pages: 4,
        flags: &["gd"],
        content: Content::Filled,
    });

    // Seal `sl` last.
    let sl = regions.iter().find(|r| r.name == "sl").unwrap();
    // SAFETY: mseal of our own region.
    if unsafe { libc::syscall(SYS_MSEAL, sl.addr, sl.pages * PAGE, 0) } != 0 {
        setup_fail(&out, format!("mseal(sl): {}", err()));
    }

    pregrow_stack();
    let before_len = match snapshot(&mut snap_before) {
        Ok(n) => n,
        Err(e) => setup_fail(&out, e),
    };
    raw_report(&ready_line);
    if broken {
        let dd = &regions[0];
        // SAFETY: our own region.
        unsafe { libc::madvise(dd.addr as *mut libc::c_void, dd.pages * PAGE, MADV_DODUMP) };
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(10));
    }

    // The verdict. First the snapshot and the growth test (no allocation
    // before them: a new mapping could land below gd).
    let after_len = snapshot(&mut snap_after);
    GD_TOUCH.store(true, Ordering::SeqCst);
    let below = gd - GROW;
    // SAFETY: below gd: either it grows (then it is ours) or SIGSEGV, whose
    // handler reports FAIL and exits.
    unsafe { (below as *mut u8).write_volatile(0x77) };
    GD_TOUCH.store(false, Ordering::SeqCst);

    let mut bad: Vec<String> = Vec::new();
    let after_len = match after_len {
        Ok(n) => n,
        Err(e) => ck::finish(&out, &[e]),
    };
    let before = parse_smaps(&String::from_utf8_lossy(&snap_before[..before_len]));
    let after = parse_smaps(&String::from_utf8_lossy(&snap_after[..after_len]));
    compare_smaps(&regions, &before, &after, &mut bad);
    check_regions(&regions, &after, &mut bad);
    // gd grew: now one VMA from at most `below` to its old end.
    let now = parse_smaps(&std::fs::read_to_string("/proc/self/smaps").unwrap_or_default());
    match now.iter().find(|v| v.start <= below && below < v.end) {
        Some(v) if v.end == gd + gd_len && v.flags().contains(&"gd") => {}
        Some(v) => bad.push(format!(
            "gd: after touching {below:x} the VMA there is {} {:?}, expected one ending at {:x} with gd",
            v.range(),
            v.flags().join(" "),
            gd + gd_len
        )),
        None => bad.push(format!(
            "gd: after touching {below:x} no VMA covers it (it did not grow)"
        )),
    }
    for r in &regions {
        check_content(r, &mut bad);
    }
    // shfile: content, then writable and a write reaches the file.
    let sh = regions.iter().find(|r| r.name == "shfile").unwrap();
    let sh_len = sh.pages * PAGE;
    let sh_content = Region {
        content: Content::Filled,
        ..*sh
    };
    check_content(&sh_content, &mut bad);
    // SAFETY: our own mapping of our own file.
    if unsafe { libc::mprotect(sh.addr as *mut libc::c_void, sh_len, rw) } != 0 {
        bad.push(format!(
            "shfile: mprotect(PROT_READ|PROT_WRITE): {} (VM_MAYWRITE lost?)",
            err()
        ));
    } else {
        let off = PAGE + 123;
        let v = !fill_byte(sh.index, 1, 123);
        // SAFETY: inside the now writable mapping.
        unsafe { ((sh.addr + off) as *mut u8).write_volatile(v) };
        let mut b = [0u8; 1];
        // SAFETY: pread into a local buffer.
        let n = unsafe { libc::pread(sh_fd, b.as_mut_ptr().cast(), 1, off as i64) };
        if n != 1 {
            bad.push(format!("shfile: pread of {FILE_NAME}: {}", err()));
        } else if b[0] != v {
            bad.push(format!(
                "shfile: a write through the mapping did not reach {FILE_NAME}: byte {off} found {:#04x}, expected {v:#04x}",
                b[0]
            ));
        }
    }
    if prctl {
        prctl_checks(&mut bad);
    }
    ck::finish(&out, &bad);
}
