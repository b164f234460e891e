//! `ck_vdso --out FILE [--break]`: the vDSO and its data pages (protocol:
//! `tern_tests::ck`).
//!
//! glibc resolves the vDSO's functions once at startup and calls them
//! through cached pointers, and the vDSO code finds its data pages
//! (`[vvar]`, `[vvar_vclock]`) at a fixed distance from itself. A restored
//! process therefore needs the same areas at the same addresses, backed by
//! the kernel's live data, not by a copy.
//!
//! At start it records the `[vdso]`, `[vvar]` and `[vvar_vclock]` addresses
//! from /proc/self/maps, getauxval(AT_SYSINFO_EHDR) (must equal the
//! `[vdso]` start) and the addresses of `__vdso_clock_gettime` and
//! `__vdso_getcpu` read from the vDSO's own ELF dynamic symbol table. Main
//! and three threads then loop (1 ms sleep per round) over:
//! clock_gettime for CLOCK_MONOTONIC, _COARSE, _RAW and CLOCK_BOOTTIME (each
//! never below this thread's previous reading); CLOCK_REALTIME around
//! gettimeofday (the latter between the two, to the microsecond),
//! CLOCK_REALTIME_COARSE (at most a second behind, never ahead) and time()
//! (the second of one of the readings, or one behind: it is coarse);
//! __vdso_getcpu called through the pointer resolved at start, and
//! sched_getcpu, against getcpu(2) (retried: the thread may migrate). Every
//! comparison brackets one call between two others, so a freeze of any
//! length between two calls cannot make it fail, and there is no upper
//! bound on clock jumps.
//!
//! On SIGTERM (the handler only sets a flag) every thread, itself: has its
//! TID; made progress after `ready`; runs one more round (monotonic clocks
//! not below the readings before the signal); finds the vDSO's
//! CLOCK_MONOTONIC, _COARSE, CLOCK_BOOTTIME, CLOCK_REALTIME and _COARSE
//! between two clock_gettime(2) syscalls (1 ms slack; a stale copy of the
//! data pages freezes the coarse clocks), time() between two time(2)
//! syscalls, and CLOCK_REALTIME within 2 s of time(2). Main also checks the
//! three areas are at their recorded addresses, AT_SYSINFO_EHDR still equals
//! the `[vdso]` start, the vDSO there is an ELF whose symbols resolve to the
//! recorded addresses, /proc/self/task lists the same TIDs, and no check
//! failed while running.
//!
//! `--break`: right after `ready`, with the TSC clocksource (the vDSO then
//! never reads `[vvar_vclock]`, which holds the paravirt clock pages) it
//! unmaps `[vvar_vclock]`, as a restore that only knows `[vvar]` and
//! `[vdso]` would leave it. With another clocksource that would crash the
//! clock calls, so it shifts its recorded `[vdso]` address by a page
//! instead (a vDSO "restored" at another address).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tern_tests::ck;

/// `Elf64_Dyn` of include/uapi/linux/elf.h (libc has no binding).
#[repr(C)]
#[derive(Clone, Copy)]
struct Elf64Dyn {
    d_tag: i64,
    d_val: u64,
}
const DT_NULL: i64 = 0;
const DT_HASH: i64 = 4;
const DT_STRTAB: i64 = 5;
const DT_SYMTAB: i64 = 6;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;

const SYMBOLS: [&str; 2] = ["__vdso_clock_gettime", "__vdso_getcpu"];
type ClockGettime = unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int;
type Getcpu = unsafe extern "C" fn(*mut u32, *mut u32, *mut libc::c_void) -> libc::c_long;

/// The monotonic clocks each thread checks for going backwards.
const MONO: [(&str, libc::clockid_t); 4] = [
    ("CLOCK_MONOTONIC", libc::CLOCK_MONOTONIC),
    ("CLOCK_MONOTONIC_COARSE", libc::CLOCK_MONOTONIC_COARSE),
    ("CLOCK_MONOTONIC_RAW", libc::CLOCK_MONOTONIC_RAW),
    ("CLOCK_BOOTTIME", libc::CLOCK_BOOTTIME),
];
/// The clocks compared with clock_gettime(2) at the end.
const BRACKETED: [(&str, libc::clockid_t); 5] = [
    ("CLOCK_MONOTONIC", libc::CLOCK_MONOTONIC),
    ("CLOCK_MONOTONIC_COARSE", libc::CLOCK_MONOTONIC_COARSE),
    ("CLOCK_BOOTTIME", libc::CLOCK_BOOTTIME),
    ("CLOCK_REALTIME", libc::CLOCK_REALTIME),
    ("CLOCK_REALTIME_COARSE", libc::CLOCK_REALTIME_COARSE),
];
const SLACK_NS: i128 = 1_000_000;

const THREADS: usize = 4;
const NAMES: [&str; THREADS] = ["main", "t1", "t2", "t3"];

/// What was recorded at start (addresses; 0: absent).
#[derive(Clone, Debug, PartialEq, Default)]
struct Layout {
    vdso: (u64, u64),
    vvar: (u64, u64),
    vvar_vclock: (u64, u64),
    auxv: u64,
    symbols: Vec<u64>,
}

struct Slot {
    tid: AtomicI32,
    rounds: AtomicU64,
    at_ready: AtomicU64,
    run_failure: Mutex<Option<String>>,
    result: Mutex<Option<Vec<String>>>,
}

static SLOTS: [Slot; THREADS] = [const {
    Slot {
        tid: AtomicI32::new(0),
        rounds: AtomicU64::new(0),
        at_ready: AtomicU64::new(0),
        run_failure: Mutex::new(None),
        result: Mutex::new(None),
    }
}; THREADS];

static CHECK: AtomicBool = AtomicBool::new(false);
static READY: AtomicBool = AtomicBool::new(false);
static CHECKED: AtomicUsize = AtomicUsize::new(0);
static CLOCK_GETTIME: AtomicU64 = AtomicU64::new(0);
static GETCPU: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn gettid() -> i32 {
    // SAFETY: gettid(2) takes no arguments.
    unsafe { i32::try_from(libc::syscall(libc::SYS_gettid)).unwrap() }
}

fn ns(ts: &libc::timespec) -> i128 {
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// clock_gettime through glibc (the vDSO).
fn clock(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ns(&ts)
}

/// clock_gettime through the `__vdso_clock_gettime` pointer resolved at start.
fn vdso_clock(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let f = CLOCK_GETTIME.load(Ordering::SeqCst);
    // SAFETY: the address of `__vdso_clock_gettime` in this process's vDSO,
    // found in its dynamic symbol table; it writes one timespec.
    unsafe {
        let f: ClockGettime = std::mem::transmute(sys::usize_of(f));
        f(id, &mut ts)
    };
    ns(&ts)
}

/// clock_gettime(2) itself.
fn sys_clock(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the raw syscall writes one timespec.
    unsafe { libc::syscall(libc::SYS_clock_gettime, id, &mut ts) };
    ns(&ts)
}

#[cfg(target_arch = "x86_64")]
fn sys_time() -> i64 {
    // SAFETY: time(2) with a NULL pointer.
    unsafe { libc::syscall(libc::SYS_time, std::ptr::null_mut::<libc::time_t>()) }
}

/// arm64 has no time(2): the seconds of gettimeofday(2).
#[cfg(not(target_arch = "x86_64"))]
fn sys_time() -> i64 {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    // SAFETY: gettimeofday(2) writes one timeval.
    unsafe { libc::syscall(libc::SYS_gettimeofday, &mut tv, std::ptr::null_mut::<u8>()) };
    tv.tv_sec
}

fn sys_getcpu() -> u32 {
    let mut cpu = u32::MAX;
    // SAFETY: getcpu(2) writes one u32.
    unsafe {
        libc::syscall(
            libc::SYS_getcpu,
            &mut cpu as *mut u32,
            std::ptr::null_mut::<u32>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    cpu
}

fn vdso_getcpu() -> u32 {
    let mut cpu = u32::MAX;
    let f = GETCPU.load(Ordering::SeqCst);
    // SAFETY: the address of `__vdso_getcpu` in this process's vDSO; it
    // writes one u32.
    unsafe {
        let f: Getcpu = std::mem::transmute(sys::usize_of(f));
        f(&mut cpu, std::ptr::null_mut(), std::ptr::null_mut())
    };
    cpu
}

/// Start and end of the maps entries named `[vdso]`, `[vvar]`, `[vvar_vclock]`.
fn maps_layout() -> Result<[(u64, u64); 3], String> {
    let maps =
        std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    let mut out = [(0, 0); 3];
    for l in maps.lines() {
        let idx = match l.split_whitespace().last() {
            Some("[vdso]") => 0,
            Some("[vvar]") => 1,
            Some("[vvar_vclock]") => 2,
            _ => continue,
        };
        let range = l.split_whitespace().next().unwrap_or("");
        let (a, b) = range.split_once('-').unwrap_or(("", ""));
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            return Err(format!("/proc/self/maps: bad line {l:?}"));
        };
        out[idx] = (a, b);
    }
    Ok(out)
}

fn rd<T: Copy>(img: &[u8], off: u64) -> Result<T, String> {
    let off = usize::try_from(off).map_err(|_| format!("offset {off:#x}"))?;
    let end = off
        .checked_add(std::mem::size_of::<T>())
        .filter(|&e| e <= img.len())
        .ok_or_else(|| format!("vDSO image: read at {off:#x} past its {} bytes", img.len()))?;
    // SAFETY: [off, end) is inside `img`; T is a plain-data ELF struct.
    Ok(unsafe { std::ptr::read_unaligned(img[off..end].as_ptr().cast::<T>()) })
}

/// Addresses of `SYMBOLS` in the vDSO mapped at `base` (`len` bytes), from
/// its dynamic symbol table (DT_HASH gives the symbol count).
fn resolve(base: u64, len: u64) -> Result<Vec<u64>, String> {
    // SAFETY: [base, base+len) is the readable [vdso] mapping of this
    // process (from /proc/self/maps).
    let img = unsafe { std::slice::from_raw_parts(base as *const u8, sys::usize_of(len)) }.to_vec();
    let eh: libc::Elf64_Ehdr = rd(&img, 0)?;
    if eh.e_ident[..4] != *b"\x7fELF" {
        return Err(format!("no ELF header at the vDSO start {base:#x}"));
    }
    let mut load = None;
    let mut dynamic = None;
    for i in 0..eh.e_phnum as u64 {
        let ph: libc::Elf64_Phdr = rd(&img, eh.e_phoff + i * eh.e_phentsize as u64)?;
        if ph.p_type == PT_LOAD && load.is_none() {
            load = Some(ph);
        }
        if ph.p_type == PT_DYNAMIC {
            dynamic = Some(ph);
        }
    }
    let (Some(load), Some(dynamic)) = (load, dynamic) else {
        return Err("vDSO without PT_LOAD or PT_DYNAMIC".into());
    };
    let off = |vaddr: u64| vaddr.wrapping_sub(load.p_vaddr).wrapping_add(load.p_offset);
    let (mut hash, mut strtab, mut symtab) = (None, None, None);
    let mut i = 0;
    loop {
        let d: Elf64Dyn = rd(&img, dynamic.p_offset + i * 16)?;
        match d.d_tag {
            DT_NULL => break,
            DT_HASH => hash = Some(off(d.d_val)),
            DT_STRTAB => strtab = Some(off(d.d_val)),
            DT_SYMTAB => symtab = Some(off(d.d_val)),
            _ => {}
        }
        i += 1;
    }
    let (Some(hash), Some(strtab), Some(symtab)) = (hash, strtab, symtab) else {
        return Err("vDSO dynamic section lacks DT_HASH, DT_STRTAB or DT_SYMTAB".into());
    };
    let nsyms: u32 = rd(&img, hash + 4)?;
    let mut found = vec![0u64; SYMBOLS.len()];
    for i in 0..nsyms as u64 {
        let sym: libc::Elf64_Sym = rd(&img, symtab + i * 24)?;
        if sym.st_shndx == 0 {
            continue;
        }
        let start = usize::try_from(strtab + sym.st_name as u64).unwrap_or(usize::MAX);
        let Some(name) = img.get(start..) else {
            continue;
        };
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        for (k, want) in SYMBOLS.iter().enumerate() {
            if name == want.as_bytes() {
                found[k] = base + sym.st_value - load.p_vaddr;
            }
        }
    }
    if let Some(k) = found.iter().position(|&a| a == 0) {
        return Err(format!("vDSO at {base:#x} has no symbol {}", SYMBOLS[k]));
    }
    Ok(found)
}

fn layout() -> Result<Layout, String> {
    let [vdso, vvar, vvar_vclock] = maps_layout()?;
    // SAFETY: getauxval(3) reads the saved auxiliary vector.
    let auxv = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    let symbols = if vdso.0 != 0 {
        resolve(vdso.0, vdso.1 - vdso.0)?
    } else {
        Vec::new()
    };
    Ok(Layout {
        vdso,
        vvar,
        vvar_vclock,
        auxv,
        symbols,
    })
}

/// Per-thread memory of the last readings.
struct Thread {
    idx: usize,
    last: [i128; MONO.len()],
}

impl Thread {
    /// One round of checks; failures into `out`.
    fn round(&mut self, out: &mut Vec<String>) {
        let who = NAMES[self.idx];
        for (k, (name, id)) in MONO.iter().enumerate() {
            let v = clock(*id);
            if v < self.last[k] {
                out.push(format!(
                    "{who}: {name} went backwards: {v} ns after {} ns",
                    self.last[k]
                ));
            }
            self.last[k] = v;
        }
        // Bracketed comparisons, retried in case the clock is stepped.
        let mut errs = Vec::new();
        for _ in 0..3 {
            errs.clear();
            let r1 = clock(libc::CLOCK_REALTIME);
            let mut tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            };
            // SAFETY: writes one timeval; no timezone.
            unsafe { libc::gettimeofday(&mut tv, std::ptr::null_mut()) };
            let coarse = clock(libc::CLOCK_REALTIME_COARSE);
            // SAFETY: time(3) with a NULL pointer.
            let t = unsafe { libc::time(std::ptr::null_mut()) } as i128;
            let r2 = clock(libc::CLOCK_REALTIME);
            let tv_ns = tv.tv_sec as i128 * 1_000_000_000 + tv.tv_usec as i128 * 1000;
            if tv_ns + 1000 <= r1 || tv_ns > r2 {
                errs.push(format!(
                    "{who}: gettimeofday {tv_ns} ns is not between CLOCK_REALTIME {r1} and {r2}"
                ));
            }
            if coarse > r2 || coarse < r1 - 1_000_000_000 {
                errs.push(format!(
                    "{who}: CLOCK_REALTIME_COARSE {coarse} ns is not within a second before CLOCK_REALTIME {r1}..{r2}"
                ));
            }
            if t < r1 / 1_000_000_000 - 1 || t > r2 / 1_000_000_000 {
                errs.push(format!(
                    "{who}: time() {t} is not the second of CLOCK_REALTIME {r1}..{r2} ns (or one before)"
                ));
            }
            if errs.is_empty() {
                break;
            }
        }
        out.append(&mut errs);
        let mut last = (0, 0, 0);
        let mut ok = false;
        for _ in 0..200 {
            let s1 = sys_getcpu();
            let v = vdso_getcpu();
            // SAFETY: sched_getcpu(3) takes no arguments.
            let g = unsafe { libc::sched_getcpu() } as u32;
            let s2 = sys_getcpu();
            if s1 == v && v == g && g == s2 {
                ok = true;
                break;
            }
            last = (s1, v, g);
        }
        if !ok {
            out.push(format!(
                "{who}: __vdso_getcpu {} and sched_getcpu {} never agreed with getcpu(2) {} (200 tries)",
                last.1 as i32, last.2 as i32, last.0
            ));
        }
    }

    /// The final check, in this thread.
    fn final_check(&mut self) -> Vec<String> {
        let s = &SLOTS[self.idx];
        let who = format!("{} (tid {})", NAMES[self.idx], s.tid.load(Ordering::SeqCst));
        let mut out = Vec::new();
        let tid = gettid();
        if tid != s.tid.load(Ordering::SeqCst) {
            out.push(format!("{who}: gettid() is now {tid}"));
        }
        let (r, at) = (
            s.rounds.load(Ordering::SeqCst),
            s.at_ready.load(Ordering::SeqCst),
        );
        if r <= at {
            out.push(format!(
                "{who}: no round after ready ({r} rounds, {at} at ready)"
            ));
        }
        self.round(&mut out);
        for (name, id) in BRACKETED {
            let mut last = (0, 0, 0);
            let mut ok = false;
            for _ in 0..3 {
                let s1 = sys_clock(id);
                let v = vdso_clock(id);
                let s2 = sys_clock(id);
                if v + SLACK_NS >= s1 && v <= s2 + SLACK_NS {
                    ok = true;
                    break;
                }
                last = (s1, v, s2);
            }
            if !ok {
                out.push(format!(
                    "{who}: vDSO {name} {} ns is not between clock_gettime(2) {} and {} ns",
                    last.1, last.0, last.2
                ));
            }
        }
        let mut ok = false;
        let mut last = (0, 0, 0, 0);
        for _ in 0..3 {
            let t1 = sys_time();
            // SAFETY: time(3) with a NULL pointer.
            let v = unsafe { libc::time(std::ptr::null_mut()) };
            let rt = i64::try_from(clock(libc::CLOCK_REALTIME) / 1_000_000_000).unwrap();
            let t2 = sys_time();
            if t1 <= v && v <= t2 && rt >= t1 - 2 && rt <= t2 + 2 {
                ok = true;
                break;
            }
            last = (t1, v, rt, t2);
        }
        if !ok {
            out.push(format!(
                "{who}: time(2) said {} then {}; time() {} and CLOCK_REALTIME {} s are not within that (2 s for CLOCK_REALTIME)",
                last.0, last.3, last.1, last.2
            ));
        }
        if let Some(f) = lock(&s.run_failure).clone() {
            out.push(format!("while running: {f}"));
        }
        out
    }
}

fn nap(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn thread_main(idx: usize) {
    let s = &SLOTS[idx];
    s.tid.store(gettid(), Ordering::SeqCst);
    let mut t = Thread {
        idx,
        last: [i128::MIN; MONO.len()],
    };
    loop {
        if idx == 0 && ck::terminated() {
            CHECK.store(true, Ordering::SeqCst);
        }
        if CHECK.load(Ordering::SeqCst) {
            let r = t.final_check();
            *lock(&s.result) = Some(r);
            CHECKED.fetch_add(1, Ordering::SeqCst);
            if idx == 0 {
                return;
            }
            loop {
                nap(1000);
            }
        }
        let mut out = Vec::new();
        t.round(&mut out);
        if let Some(first) = out.into_iter().next() {
            let mut f = lock(&s.run_failure);
            if f.is_none() {
                *f = Some(first);
            }
        }
        let r = s.rounds.fetch_add(1, Ordering::SeqCst) + 1;
        if READY.load(Ordering::SeqCst) && s.at_ready.load(Ordering::SeqCst) == 0 {
            s.at_ready.store(r, Ordering::SeqCst);
        }
        nap(1);
    }
}

fn die(msg: &str) -> ! {
    eprintln!("ck_vdso: setup failed: {msg}");
    std::process::exit(3);
}

/// `--break`: see the module comment. Returns what it did.
fn damage(recorded: &mut Layout) -> String {
    let cs =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    let (a, b) = recorded.vvar_vclock;
    if cs.trim() == "tsc" && a != 0 {
        // SAFETY: unmaps the [vvar_vclock] pages, which the vDSO does not
        // read with the TSC clocksource.
        if unsafe { libc::munmap(a as *mut libc::c_void, sys::usize_of(b - a)) } == 0 {
            return format!("unmapped [vvar_vclock] {a:#x}-{b:#x}");
        }
    }
    recorded.vdso.0 += 4096;
    recorded.vdso.1 += 4096;
    format!("shifted the recorded [vdso] address (clocksource {cs:?})")
}

fn main() {
    let out = ck::out_path();
    let brk = ck::break_requested();
    ck::catch_sigterm().unwrap_or_else(|e| die(&e));
    let mut recorded = layout().unwrap_or_else(|e| die(&e));
    if recorded.vdso.0 == 0 || recorded.vvar.0 == 0 {
        die(&format!(
            "no [vdso] or [vvar] in /proc/self/maps: {recorded:?}"
        ));
    }
    if recorded.auxv != recorded.vdso.0 {
        die(&format!(
            "AT_SYSINFO_EHDR {:#x} is not the [vdso] start {:#x}",
            recorded.auxv, recorded.vdso.0
        ));
    }
    CLOCK_GETTIME.store(recorded.symbols[0], Ordering::SeqCst);
    GETCPU.store(recorded.symbols[1], Ordering::SeqCst);
    for (idx, name) in NAMES.iter().enumerate().skip(1) {
        if let Err(e) = std::thread::Builder::new()
            .name(format!("ck-{name}"))
            .spawn(move || thread_main(idx))
        {
            die(&format!("spawn {name}: {e}"));
        }
    }
    let t0 = Instant::now();
    while SLOTS[1..]
        .iter()
        .any(|s| s.rounds.load(Ordering::SeqCst) == 0)
    {
        if t0.elapsed() > Duration::from_secs(10) {
            die("threads did not start within 10 s");
        }
        nap(1);
    }
    SLOTS[0].tid.store(gettid(), Ordering::SeqCst);
    let setup: Vec<String> = SLOTS
        .iter()
        .filter_map(|s| lock(&s.run_failure).clone())
        .collect();
    if !setup.is_empty() {
        die(&setup.join("; "));
    }
    let tids: Vec<i32> = SLOTS.iter().map(|s| s.tid.load(Ordering::SeqCst)).collect();
    READY.store(true, Ordering::SeqCst);
    while SLOTS[1..]
        .iter()
        .any(|s| s.at_ready.load(Ordering::SeqCst) == 0)
    {
        nap(1);
    }
    ck::report(&out, &format!("ready {}", std::process::id()));
    if brk {
        let what = damage(&mut recorded);
        eprintln!("ck_vdso: --break: {what}");
    }
    thread_main(0);

    let mut fails = lock(&SLOTS[0].result).clone().unwrap_or_default();
    let t0 = Instant::now();
    while CHECKED.load(Ordering::SeqCst) < THREADS && t0.elapsed() < Duration::from_secs(10) {
        nap(2);
    }
    for (idx, s) in SLOTS.iter().enumerate().skip(1) {
        match lock(&s.result).clone() {
            Some(r) => fails.extend(r),
            None => fails.push(format!(
                "{} (tid {}) did not run its check within 10 s",
                NAMES[idx], tids[idx]
            )),
        }
    }
    match layout() {
        Ok(now) => {
            let hex = |r: (u64, u64)| {
                if r.0 == 0 {
                    "missing".to_string()
                } else {
                    format!("{:#x}-{:#x}", r.0, r.1)
                }
            };
            for (name, was, is) in [
                ("[vdso]", recorded.vdso, now.vdso),
                ("[vvar]", recorded.vvar, now.vvar),
                ("[vvar_vclock]", recorded.vvar_vclock, now.vvar_vclock),
            ] {
                if was != is {
                    fails.push(format!(
                        "{name} in /proc/self/maps: {}, was {}",
                        hex(is),
                        hex(was)
                    ));
                }
            }
            if now.auxv != now.vdso.0 {
                fails.push(format!(
                    "AT_SYSINFO_EHDR {:#x} is not the [vdso] start {:#x}",
                    now.auxv, now.vdso.0
                ));
            }
            if now.symbols != recorded.symbols {
                fails.push(format!(
                    "vDSO symbols {SYMBOLS:?} resolve to {:x?}, were {:x?}",
                    now.symbols, recorded.symbols
                ));
            }
        }
        Err(e) => fails.push(format!("reading the vDSO layout: {e}")),
    }
    let mut now: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    now.sort();
    let mut want = tids.clone();
    want.sort();
    if now != want {
        fails.push(format!("/proc/self/task lists {now:?}, expected {want:?}"));
    }
    ck::finish(&out, &fails)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// include/uapi/linux/elf.h: Elf64_Dyn is { Elf64_Sxword d_tag;
    /// union { Elf64_Xword d_val; Elf64_Addr d_ptr; } d_un; }.
    #[test]
    fn elf64_dyn_layout() {
        assert_eq!(std::mem::size_of::<Elf64Dyn>(), 16);
        assert_eq!(std::mem::offset_of!(Elf64Dyn, d_tag), 0);
        assert_eq!(std::mem::offset_of!(Elf64Dyn, d_val), 8);
        assert_eq!(std::mem::size_of::<libc::Elf64_Sym>(), 24);
    }

    /// The symbols resolve in this test process's own vDSO, and calling
    /// them agrees with the syscalls.
    #[test]
    fn resolves_the_live_vdso() {
        let l = layout().expect("layout");
        assert_eq!(l.auxv, l.vdso.0, "{l:?}");
        CLOCK_GETTIME.store(l.symbols[0], Ordering::SeqCst);
        let s1 = sys_clock(libc::CLOCK_MONOTONIC);
        let v = vdso_clock(libc::CLOCK_MONOTONIC);
        let s2 = sys_clock(libc::CLOCK_MONOTONIC);
        assert!(s1 <= v && v <= s2, "{s1} {v} {s2}");
    }
}
