//! The memory oracle: the image chain, reassembled, must equal the target's
//! memory read while it is stopped (README, Invariants, 3), and the chain's
//! VMA list must match /proc/PID/maps.

use crate::proc::{self, IGNORED_NAMES, MapEntry};
use images::{PAGE_SIZE, PageRange, VmaRecord};
use restorer::{ImageChain, PageSource};
use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

/// Stops a process with SIGSTOP until dropped (then SIGCONT).
pub struct Stopped {
    pid: i32,
}

impl Stopped {
    /// SIGSTOP `pid` and wait until every thread is in state `T`.
    pub fn new(pid: i32) -> Result<Stopped, String> {
        // SAFETY: kill(2) takes integers only.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            return Err(format!(
                "SIGSTOP {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let s = Stopped { pid };
        let ok = proc::wait_until(Duration::from_secs(5), || {
            let tids = proc::tids(pid);
            !tids.is_empty() && tids.iter().all(|&t| proc::task_state(pid, t) == Some('T'))
        });
        if !ok {
            let states: Vec<String> = proc::tids(pid)
                .into_iter()
                .map(|t| format!("{t}:{:?}", proc::task_state(pid, t)))
                .collect();
            return Err(format!(
                "pid {pid} did not stop within 5 s (thread states {states:?})"
            ));
        }
        Ok(s)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill(2) takes integers only.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

#[derive(Debug, Default)]
pub struct OracleReport {
    pub vmas: usize,
    pub pages_compared: u64,
    pub pages_read_from_target: u64,
}

fn ignored(name: &str) -> bool {
    IGNORED_NAMES.contains(&name)
}

/// The maps entries whose memory an image must hold.
fn checked_maps(maps: &[MapEntry]) -> Vec<&MapEntry> {
    maps.iter()
        .filter(|m| !ignored(&m.name) && (m.is_private() || m.is_anon_shared()))
        .collect()
}

fn vma_name(v: &VmaRecord) -> &str {
    v.name.as_deref().unwrap_or("")
}

fn fmt_vma(v: &VmaRecord) -> String {
    format!(
        "{:x}-{:x} {} {:08x} {} {} {}{}",
        v.start,
        v.end,
        v.perms,
        v.offset,
        v.dev,
        v.inode,
        vma_name(v),
        if v.dumped { "" } else { " (not dumped)" }
    )
}

/// Compare the chain's dumped VMAs with the target's maps: every page of a
/// checked maps entry must be covered by dumped chain VMAs with the same
/// permissions and name, and every dumped chain VMA must lie in such entries.
/// `scratch`: tern's scratch areas, ignored on both sides.
pub fn compare_vmas(
    chain_vmas: &[VmaRecord],
    maps: &[MapEntry],
    scratch: &[(u64, u64)],
) -> Vec<String> {
    let mut errs = Vec::new();
    let mut checked = checked_maps(maps);
    checked.retain(|m| !proc::in_areas(scratch, m.start, m.end));
    let dumped: Vec<&VmaRecord> = chain_vmas
        .iter()
        .filter(|v| v.dumped && !ignored(vma_name(v)) && !proc::in_areas(scratch, v.start, v.end))
        .collect();
    for m in &checked {
        let mut at = m.start;
        let overl: Vec<&&VmaRecord> = dumped
            .iter()
            .filter(|v| v.start < m.end && v.end > m.start)
            .collect();
        for v in &overl {
            if v.start > at {
                errs.push(format!(
                    "target VMA {m}: {:#x}-{:#x} not in the chain as a dumped VMA",
                    at, v.start
                ));
            }
            if v.perms.to_string() != m.perms || vma_name(v) != m.name {
                errs.push(format!("target VMA {m}: the chain has {}", fmt_vma(v)));
            }
            at = at.max(v.end);
        }
        if at < m.end {
            let also = chain_vmas
                .iter()
                .find(|v| v.start < m.end && v.end > at)
                .map(|v| format!(" (chain: {})", fmt_vma(v)))
                .unwrap_or_default();
            errs.push(format!(
                "target VMA {m}: {:#x}-{:#x} not in the chain as a dumped VMA{also}",
                at, m.end
            ));
        }
    }
    for v in &dumped {
        let mut at = v.start;
        for m in checked
            .iter()
            .filter(|m| m.start < v.end && m.end > v.start)
        {
            if m.start > at {
                break;
            }
            at = at.max(m.end);
        }
        if at < v.end {
            let now = maps
                .iter()
                .find(|m| m.start < v.end && m.end > at)
                .map(|m| format!(" (target now: {m})"))
                .unwrap_or_else(|| " (unmapped in the target)".into());
            errs.push(format!(
                "chain VMA {}: {:#x}-{:#x} is not private/anon-shared memory of the target{now}",
                fmt_vma(v),
                at,
                v.end
            ));
        }
    }
    errs
}

fn describe_source(chain: &ImageChain, addr: u64) -> String {
    match chain.source(addr) {
        PageSource::Data { image, entry } => format!(
            "data from image {} ({}), entry {:#x}+{} pages",
            image,
            chain.images[image].dir.display(),
            entry.start,
            entry.nr_pages
        ),
        PageSource::Zero => "zero page".into(),
        PageSource::Hole => "hole (not populated)".into(),
    }
}

fn hex16(b: &[u8]) -> String {
    b.iter().take(16).map(|x| format!("{x:02x}")).collect()
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
/// Swap type bits of a swapped entry, and the type of PTE markers (the
/// last one, MAX_SWAPFILES_SHIFT = 5: never a swap device).
const PM_SWAP_TYPE: u64 = 0x1f;
const PM_SWP_PTE_MARKER: u64 = 31;
const CHUNK_PAGES: u64 = 2048; // 8 MiB

/// Stop `pid`, compare its memory with the chain in `dir`, continue it.
pub fn check(pid: i32, dir: &Path) -> Result<OracleReport, String> {
    let chain = ImageChain::open(dir)
        .map_err(|e| format!("oracle: cannot open the chain {}: {e}", dir.display()))?;
    let _stop = Stopped::new(pid)?;
    let maps = proc::maps(pid)?;
    let scratch = proc::scratch_areas(pid, &maps);
    let mut errs = compare_vmas(chain.vmas(), &maps, &scratch);
    let mut report = OracleReport::default();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
    let mut diffs = Vec::new();
    let mut ndiff = 0u64;
    for v in chain
        .vmas()
        .iter()
        .filter(|v| v.dumped && !ignored(vma_name(v)) && !proc::in_areas(&scratch, v.start, v.end))
    {
        // Only what is still mapped the same way: VMA mismatches are reported above.
        let Some(m) = maps.iter().find(|m| m.start <= v.start && m.end >= v.end) else {
            continue;
        };
        report.vmas += 1;
        let mut at = v.start;
        while at < v.end {
            let end = (at + CHUNK_PAGES * PAGE_SIZE).min(v.end);
            let range = PageRange::new(at, end);
            let npages = sys::usize_of(range.pages());
            let expect = chain.read_range(v, range).map_err(|e| {
                format!(
                    "oracle: chain {} cannot reassemble {:#x}-{:#x}: {e}",
                    dir.display(),
                    at,
                    end
                )
            })?;
            let mut actual = vec![0u8; sys::usize_of(range.len())];
            // Private anonymous pages that are neither present nor swapped
            // read as zeros: skip reading them (it would populate them).
            // Nor is a page whose entry is a PTE marker (a uffd-wp marker
            // tern's tracking left on an unpopulated page): it shows as
            // swapped, with swap type SWP_PTE_MARKER, and holds no data.
            // Reading it would fault a zero page in, and the target's next
            // mremap of that region would carry it to a new VMA, whose
            // populated pages a round then copies.
            let mut want_read = vec![true; npages];
            if m.is_private_anon() {
                let mut pm = vec![0u8; npages * 8];
                pagemap
                    .read_exact_at(&mut pm, at / PAGE_SIZE * 8)
                    .map_err(|e| format!("/proc/{pid}/pagemap at {at:#x}: {e}"))?;
                for (i, w) in pm.chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes(w.try_into().unwrap());
                    let marker = e & PM_PRESENT == 0 && e & PM_SWAP_TYPE == PM_SWP_PTE_MARKER;
                    want_read[i] = e & (PM_PRESENT | PM_SWAP) != 0 && !marker;
                }
            }
            let mut i = 0;
            while i < npages {
                if !want_read[i] {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < npages && want_read[j] {
                    j += 1;
                }
                let off = i * sys::usize_of(PAGE_SIZE);
                let len = (j - i) * sys::usize_of(PAGE_SIZE);
                let a = at + off as u64;
                mem.read_exact_at(&mut actual[off..off + len], a)
                    .map_err(|e| format!("/proc/{pid}/mem at {a:#x}+{len:#x} ({m}): {e}"))?;
                report.pages_read_from_target += (j - i) as u64;
                i = j;
            }
            for p in 0..npages {
                let o = p * sys::usize_of(PAGE_SIZE);
                let (x, y) = (
                    &actual[o..o + sys::usize_of(PAGE_SIZE)],
                    &expect[o..o + sys::usize_of(PAGE_SIZE)],
                );
                if x != y {
                    ndiff += 1;
                    if diffs.len() < 16 {
                        let addr = at + o as u64;
                        let first = x.iter().zip(y).position(|(a, b)| a != b).unwrap();
                        diffs.push(format!(
                            "page {addr:#x} ({} +{:#x}): first difference at byte {first:#x}; target {} chain {}; chain source: {}",
                            if m.name.is_empty() { "anon" } else { &m.name },
                            addr - m.start,
                            hex16(&x[first..]),
                            hex16(&y[first..]),
                            describe_source(&chain, addr)
                        ));
                    }
                }
            }
            report.pages_compared += npages as u64;
            at = end;
        }
    }
    if ndiff > 0 {
        let mut s = format!("{ndiff} pages differ between the target and the chain; first ones:");
        for d in diffs {
            let _ = write!(s, "\n    {d}");
        }
        errs.push(s);
    }
    if errs.is_empty() {
        Ok(report)
    } else {
        let mut s = format!("memory oracle for pid {pid} against {}:", dir.display());
        for e in errs.iter().take(30) {
            let _ = write!(s, "\n  {e}");
        }
        if errs.len() > 30 {
            let _ = write!(s, "\n  ... {} more", errs.len() - 30);
        }
        let _ = write!(
            s,
            "\n  target maps:\n{}",
            maps.iter()
                .map(|m| format!("    {m}\n"))
                .collect::<String>()
        );
        let _ = write!(
            s,
            "  chain VMAs:\n{}",
            chain
                .vmas()
                .iter()
                .map(|v| format!("    {}\n", fmt_vma(v)))
                .collect::<String>()
        );
        Err(s)
    }
}

/// Write a full (non-incremental) image of the stopped target by reading
/// /proc/PID/mem, independently of tern: the oracle's own self-test uses it.
pub fn write_reference_image(pid: i32, dir: &Path) -> Result<(), String> {
    use images::{ImageKind, ImageWriter, Inventory, MmRecord};
    let _stop = Stopped::new(pid)?;
    let maps = proc::maps(pid)?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let mut w = ImageWriter::create(dir, true).map_err(|e| e.to_string())?;
    let mut vmas = Vec::new();
    for m in &maps {
        let dumped = !ignored(&m.name) && (m.is_private() || m.is_anon_shared());
        vmas.push(VmaRecord {
            start: m.start,
            end: m.end,
            perms: m.perms.parse().map_err(|e| format!("{m}: {e}"))?,
            offset: m.offset,
            dev: m.dev.clone(),
            inode: m.inode,
            name: (!m.name.is_empty()).then(|| m.name.clone()),
            dumped,
            vm_flags: Vec::new(),
            file: None,
        });
        if dumped {
            let mut buf = vec![0u8; sys::usize_of(m.end - m.start)];
            mem.read_exact_at(&mut buf, m.start)
                .map_err(|e| format!("/proc/{pid}/mem {m}: {e}"))?;
            w.add_pages(m.start, &buf).map_err(|e| e.to_string())?;
        }
    }
    let inv = Inventory::new(ImageKind::PreDump, pid, "reference", true);
    w.finish(&MmRecord { vmas }, &inv)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// What a named page range of a process held: its mappings (clipped to
/// the range), and per page whether it was mapped, whether it was in memory
/// (present or swapped, from /proc/PID/pagemap, before anything was read)
/// and its bytes (zeros where nothing was mapped or read).
#[derive(Debug, Clone)]
pub struct RangeImage {
    pub name: String,
    pub start: u64,
    pub pages: u64,
    /// `start-end perms name` of each mapping overlapping the range, clipped.
    pub maps: Vec<String>,
    pub mapped: Vec<bool>,
    pub in_memory: Vec<bool>,
    pub data: Vec<u8>,
}

impl RangeImage {
    fn page(&self, i: usize) -> &[u8] {
        let p = sys::usize_of(PAGE_SIZE);
        &self.data[i * p..(i + 1) * p]
    }

    /// Pages that were mapped and held something other than zeros.
    pub fn data_pages(&self) -> u64 {
        (0..sys::usize_of(self.pages))
            .filter(|&i| self.mapped[i] && self.page(i).iter().any(|&b| b != 0))
            .count() as u64
    }
}

/// Stop `pid` and read the page ranges `ranges` (name, start, pages).
///
/// `fault_in` false: as the oracle reads a target, private anonymous pages
/// that are not in memory are not read (they read as zeros, and reading
/// would populate them). `fault_in` true: every mapped page is read, as the
/// process's own access would: in a process restored with `--lazy-pages` a
/// page not in yet faults and its userfaultfd service brings it (reading
/// does not wait for the background fill). `in_memory` is taken before
/// anything is read either way.
pub fn read_ranges(
    pid: i32,
    ranges: &[(String, u64, u64)],
    fault_in: bool,
) -> Result<Vec<RangeImage>, String> {
    let _stop = Stopped::new(pid)?;
    let maps = proc::maps(pid)?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| format!("/proc/{pid}/pagemap: {e}"))?;
    let psz = sys::usize_of(PAGE_SIZE);
    let mut out = Vec::new();
    // Every range's pagemap first: nothing read yet.
    let mut entries = Vec::new();
    for (name, start, pages) in ranges {
        let n = sys::usize_of(*pages);
        let mut pm = vec![0u8; n * 8];
        pagemap
            .read_exact_at(&mut pm, start / PAGE_SIZE * 8)
            .map_err(|e| format!("/proc/{pid}/pagemap at {start:#x} ({name}): {e}"))?;
        entries.push(
            pm.chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                .collect::<Vec<u64>>(),
        );
    }
    for ((name, start, pages), pm) in ranges.iter().zip(entries) {
        let (start, n) = (*start, sys::usize_of(*pages));
        let end = start + pages * PAGE_SIZE;
        let mut r = RangeImage {
            name: name.clone(),
            start,
            pages: *pages,
            maps: Vec::new(),
            mapped: vec![false; n],
            in_memory: vec![false; n],
            data: vec![0u8; n * psz],
        };
        for m in maps.iter().filter(|m| m.start < end && m.end > start) {
            let (s, e) = (m.start.max(start), m.end.min(end));
            r.maps.push(format!("{s:x}-{e:x} {} {}", m.perms, m.name));
            let (first, last) = (
                sys::usize_of((s - start) / PAGE_SIZE),
                sys::usize_of((e - start) / PAGE_SIZE),
            );
            for (i, &entry) in pm.iter().enumerate().take(last).skip(first) {
                let marker = entry & PM_PRESENT == 0 && entry & PM_SWAP_TYPE == PM_SWP_PTE_MARKER;
                r.mapped[i] = true;
                r.in_memory[i] = entry & (PM_PRESENT | PM_SWAP) != 0 && !marker;
                if !(fault_in || r.in_memory[i] || !m.is_private_anon()) {
                    continue;
                }
                let a = start + i as u64 * PAGE_SIZE;
                mem.read_exact_at(&mut r.data[i * psz..(i + 1) * psz], a)
                    .map_err(|e| format!("/proc/{pid}/mem at {a:#x} ({name}, {m}): {e}"))?;
            }
        }
        out.push(r);
    }
    Ok(out)
}

/// Compare the ranges read from a process (`actual`) with what they held
/// before (`expect`, the same ranges in the same order): the same mappings,
/// and every page the same bytes. Returns the differences (at most a few
/// pages each), empty if none.
pub fn compare_ranges(expect: &[RangeImage], actual: &[RangeImage]) -> Vec<String> {
    let mut errs = Vec::new();
    if expect.len() != actual.len() {
        errs.push(format!(
            "{} ranges expected, {} read",
            expect.len(),
            actual.len()
        ));
    }
    for (x, y) in expect.iter().zip(actual) {
        let what = format!("{} ({:#x}, {} pages)", x.name, x.start, x.pages);
        if (x.start, x.pages) != (y.start, y.pages) {
            errs.push(format!("{what}: compared with {:#x}+{}", y.start, y.pages));
            continue;
        }
        if x.maps != y.maps {
            errs.push(format!(
                "{what}: mapped as {:?}, expected as {:?}",
                y.maps, x.maps
            ));
        }
        let mut ndiff = 0;
        for i in 0..sys::usize_of(x.pages) {
            let (a, b) = (x.page(i), y.page(i));
            if a == b && x.mapped[i] == y.mapped[i] {
                continue;
            }
            ndiff += 1;
            if ndiff > 8 {
                continue;
            }
            let addr = x.start + i as u64 * PAGE_SIZE;
            let how = if x.mapped[i] != y.mapped[i] {
                format!("mapped {} (expected {})", y.mapped[i], x.mapped[i])
            } else if b.iter().all(|&c| c == 0) {
                format!(
                    "reads as zeros where it held data (in memory before: {}, now: {})",
                    x.in_memory[i], y.in_memory[i]
                )
            } else {
                let first = a.iter().zip(b).position(|(p, q)| p != q).unwrap();
                format!(
                    "first difference at byte {first:#x}: {} where it held {}",
                    hex16(&b[first..]),
                    hex16(&a[first..])
                )
            };
            errs.push(format!("{what}: page {i} ({addr:#x}) {how}"));
        }
        if ndiff > 8 {
            errs.push(format!("{what}: {ndiff} pages differ in all"));
        }
    }
    errs
}
