//! `ck_rseq --out FILE [--break]`: restartable sequences (protocol:
//! `tern_tests::ck`).
//!
//! glibc 2.36 registers one `struct rseq` per thread at thread pointer +
//! `__rseq_offset` (`__rseq_size` bytes, signature `RSEQ_SIG`). A restored
//! thread must have that same area registered again, or the kernel stops
//! updating its CPU number and stops aborting its critical sections.
//!
//! Main and three more threads each loop: 2000 runs of a real rseq critical
//! section (x86_64 inline asm: a per-CPU counter increment that commits with
//! one store, with an `rseq_cs` descriptor and `RSEQ_SIG` before the abort
//! handler), counting commits and aborts; then a check that the area's
//! `cpu_id` and `cpu_id_start` agree with getcpu(2) (retried: the thread may
//! migrate between the reads); then a 1 ms sleep.
//!
//! On SIGTERM (the handler only sets a flag) every thread stops its loop and
//! checks, itself: its TID and thread pointer are the ones it had, so its
//! area is still at the recorded address; `cpu_id`/`cpu_id_start` agree with
//! getcpu(2) and are not RSEQ_CPU_ID_UNINITIALIZED (-1); pinned with
//! sched_setaffinity to each CPU it may run on in turn, its `cpu_id` follows
//! (so the kernel really updates this area); rseq(2) with the same area,
//! length and signature fails with EBUSY (registered), with another area
//! EINVAL, with another signature EPERM (what kernel/rseq.c answers for a
//! registered thread; nothing is ever unregistered); it ran critical
//! sections after `ready`; and no cpu_id mismatch was seen while running.
//! Main then checks that the per-CPU counters add up to exactly the commits
//! of all threads (an unprotected increment, i.e. a section that was not
//! aborted when it should have been, loses counts), that /proc/self/task
//! lists the same TIDs and that glibc's `__rseq_offset`/`__rseq_size`/
//! `__rseq_flags` are unchanged. Nothing depends on timing, so a freeze of
//! any length is harmless.
//!
//! `--break`: right after `ready`, thread w1 unregisters its rseq area (as a
//! restore that did not register it again would leave it).

use std::arch::asm;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tern_tests::ck;

/// glibc's x86 signature (sys/rseq.h, bits/rseq.h).
const RSEQ_SIG: u32 = 0x5305_3053;
/// include/uapi/linux/rseq.h, `enum rseq_flags`.
const RSEQ_FLAG_UNREGISTER: i32 = 1;
/// include/uapi/linux/rseq.h, `enum rseq_cpu_id_state`.
const RSEQ_CPU_ID_UNINITIALIZED: i32 = -1;

/// `struct rseq` of include/uapi/linux/rseq.h (Linux 6.3+ fields included;
/// `__attribute__((aligned(32)))`).
#[repr(C, align(32))]
struct Rseq {
    cpu_id_start: u32,
    cpu_id: u32,
    rseq_cs: u64,
    flags: u32,
    node_id: u32,
    mm_cid: u32,
}

unsafe extern "C" {
    /// glibc 2.35+: offset of the rseq area from the thread pointer.
    static __rseq_offset: isize;
    /// glibc 2.35+: registered size (0: glibc did not register).
    static __rseq_size: libc::c_uint;
    static __rseq_flags: libc::c_uint;
}

/// One counter per CPU, each on its own cache line.
#[repr(C, align(64))]
struct Line {
    count: u64,
}
const LINES: u32 = 4096;

const THREADS: usize = 4;
const NAMES: [&str; THREADS] = ["main", "w1", "w2", "w3"];
const BREAK_THREAD: usize = 1;
/// The thread whose long critical sections main interrupts with SIGUSR1.
const SIGNALLED: usize = 3;
/// Below this many signals received inside its batches, w3's abort count
/// proves nothing.
const MIN_SIGNALS: u64 = 20;

struct Slot {
    tid: AtomicI32,
    tp: AtomicU64,
    area: AtomicU64,
    commits: AtomicU64,
    aborts: AtomicU64,
    /// Sections skipped because cpu_id was not a CPU (not registered).
    skipped: AtomicU64,
    rounds: AtomicU64,
    at_ready: AtomicU64,
    aborts_at_ready: AtomicU64,
    run_failure: Mutex<Option<String>>,
    result: Mutex<Option<Vec<String>>>,
}

static SLOTS: [Slot; THREADS] = [const {
    Slot {
        tid: AtomicI32::new(0),
        tp: AtomicU64::new(0),
        area: AtomicU64::new(0),
        commits: AtomicU64::new(0),
        aborts: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        rounds: AtomicU64::new(0),
        at_ready: AtomicU64::new(0),
        aborts_at_ready: AtomicU64::new(0),
        run_failure: Mutex::new(None),
        result: Mutex::new(None),
    }
}; THREADS];

static TERM: AtomicBool = AtomicBool::new(false);
static CHECK: AtomicBool = AtomicBool::new(false);
static READY: AtomicBool = AtomicBool::new(false);
static BREAK_NOW: AtomicBool = AtomicBool::new(false);
static CHECKED: AtomicUsize = AtomicUsize::new(0);
static COUNTERS: AtomicU64 = AtomicU64::new(0);
/// w3 is running its batch of long critical sections.
static IN_BATCH: AtomicBool = AtomicBool::new(false);
/// SIGUSR1s that w3 received during a batch, and the count at ready.
static SIGNALS: AtomicU64 = AtomicU64::new(0);
static SIGNALS_AT_READY: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(e: i32) -> String {
    match e {
        0 => "success".into(),
        libc::EBUSY => "EBUSY".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EPERM => "EPERM".into(),
        libc::EFAULT => "EFAULT".into(),
        e => format!("errno {e}"),
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid(2) takes no arguments.
    unsafe { i32::try_from(libc::syscall(libc::SYS_gettid)).unwrap() }
}

/// The x86_64 thread pointer (the TCB's self pointer at %fs:0).
fn thread_pointer() -> u64 {
    let tp: u64;
    // SAFETY: reads the first word of this thread's TCB, which glibc keeps
    // pointing at itself.
    unsafe {
        asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    tp
}

/// `ORIG_RSEQ_SIZE` of kernel/rseq.c: the smallest length rseq(2) takes.
const ORIG_RSEQ_SIZE: u32 = 32;

/// The length glibc registered: `__rseq_size` is the size of the features
/// in use (20 in Debian's 2.36 with the 2.40 fix backported), but glibc
/// registers at least ORIG_RSEQ_SIZE bytes, and rseq(2) compares lengths.
fn registered_len() -> u32 {
    glibc_rseq().1.max(ORIG_RSEQ_SIZE)
}

/// glibc's (offset, size, flags) of the rseq registration.
fn glibc_rseq() -> (isize, u32, u32) {
    // SAFETY: constants glibc exports and never changes after startup.
    unsafe { (__rseq_offset, __rseq_size, __rseq_flags) }
}

fn this_area() -> *mut Rseq {
    (thread_pointer() as i64 + glibc_rseq().0 as i64) as u64 as *mut Rseq
}

/// The area's (cpu_id_start, cpu_id).
fn area_cpu(area: *const Rseq) -> (u32, u32) {
    // SAFETY: `area` is the calling thread's glibc rseq area, valid for the
    // thread's lifetime; the kernel writes it, hence volatile reads.
    unsafe {
        (
            std::ptr::read_volatile(&raw const (*area).cpu_id_start),
            std::ptr::read_volatile(&raw const (*area).cpu_id),
        )
    }
}

fn getcpu() -> u32 {
    let mut cpu: u32 = u32::MAX;
    // SAFETY: getcpu(2) writes one u32; the other pointers are NULL.
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

fn sys_rseq(area: *mut Rseq, len: u32, flags: i32, sig: u32) -> i32 {
    // SAFETY: rseq(2) with an area that is either this thread's glibc area
    // or (expected to be refused) a local; the kernel validates the rest.
    let rc = unsafe { libc::syscall(libc::SYS_rseq, area, len, flags, sig) };
    if rc < 0 { errno() } else { 0 }
}

/// One rseq critical section: increment `counters[cpu_id]`, after spinning
/// `spin` + 1 iterations inside the section. Returns 0 on
/// commit, 1 when the kernel aborted it (preemption, migration, signal),
/// 2 when `cpu_id` is not a CPU below `LINES` (rseq not registered).
#[inline(never)]
fn percpu_inc(area: *mut Rseq, counters: *mut Line, spin: u64) -> u64 {
    let ret: u64;
    // SAFETY: `area` is this thread's registered rseq area; the asm stores
    // the address of a static `struct rseq_cs` (include/uapi/linux/rseq.h:
    // u32 version, u32 flags, u64 start_ip, u64 post_commit_offset,
    // u64 abort_ip; 32-byte aligned) in area->rseq_cs (offset 8), reads
    // area->cpu_id (offset 4), and increments counters[cpu] (64-byte lines,
    // bounds-checked against LINES). The commit is the single store before
    // label 5; the abort handler at 6 is preceded by RSEQ_SIG (as the last
    // 4 bytes of a `ud1` instruction) as the kernel requires.
    unsafe {
        asm!(
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "3:",
            ".long 0, 0",
            ".quad 4f, (5f - 4f), 6f",
            ".popsection",
            ".pushsection __rseq_failure, \"ax\"",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long 0x53053053",
            "6:",
            "mov {ret:e}, 1",
            "jmp 7f",
            ".popsection",
            "lea {tmp}, [rip + 3b]",
            "mov qword ptr [{area} + 8], {tmp}",
            "4:",
            "mov {cpu:e}, dword ptr [{area} + 4]",
            "cmp {cpu:e}, {lines:e}",
            "jae 8f",
            "shl {cpu}, 6",
            "add {cpu}, {counters}",
            // Stay in the section a while (w3: so that signals land in it).
            "9:",
            "sub {spin}, 1",
            "jae 9b",
            "mov {tmp}, qword ptr [{cpu}]",
            "add {tmp}, 1",
            "mov qword ptr [{cpu}], {tmp}",
            "5:",
            "xor {ret:e}, {ret:e}",
            "jmp 7f",
            "8:",
            "mov {ret:e}, 2",
            "7:",
            area = in(reg) area,
            counters = in(reg) counters,
            lines = in(reg) LINES,
            spin = inout(reg) spin => _,
            cpu = out(reg) _,
            tmp = out(reg) _,
            ret = out(reg) ret,
            options(nostack),
        );
    }
    ret
}

/// cpu_id and cpu_id_start agree with getcpu(2); retried because the
/// thread may migrate between the reads.
fn cpu_agrees(who: &str, area: *const Rseq) -> Result<(), String> {
    let mut last = (0, 0, 0);
    for _ in 0..500 {
        let (s1, c1) = area_cpu(area);
        let g = getcpu();
        let (s2, c2) = area_cpu(area);
        if c1 == g && c2 == g && s1 == g && s2 == g {
            return Ok(());
        }
        last = (s2, c2, g);
        if c2 as i32 == RSEQ_CPU_ID_UNINITIALIZED {
            break;
        }
    }
    Err(format!(
        "{who}: rseq area cpu_id {} cpu_id_start {} but getcpu() says {} (-1 = unregistered)",
        last.1 as i32, last.0 as i32, last.2
    ))
}

/// Pin the thread to each CPU it may use in turn: cpu_id must follow.
fn cpu_follows_migration(who: &str, area: *const Rseq, out: &mut Vec<String>) {
    // SAFETY: sched_{get,set}affinity on the calling thread with a local
    // cpu_set_t.
    unsafe {
        let mut orig: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&orig), &mut orig) != 0 {
            out.push(format!(
                "{who}: sched_getaffinity: {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
        for cpu in 0..libc::CPU_SETSIZE as usize {
            if !libc::CPU_ISSET(cpu, &orig) {
                continue;
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) != 0 {
                out.push(format!(
                    "{who}: sched_setaffinity(cpu {cpu}): {}",
                    std::io::Error::last_os_error()
                ));
                continue;
            }
            let (s, c) = area_cpu(area);
            if c as usize != cpu || s as usize != cpu {
                out.push(format!(
                    "{who}: pinned to cpu {cpu}, the rseq area says cpu_id {} cpu_id_start {}",
                    c as i32, s as i32
                ));
            }
        }
        if libc::sched_setaffinity(0, std::mem::size_of_val(&orig), &orig) != 0 {
            out.push(format!(
                "{who}: restoring the affinity: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// The final check of thread `idx`, in that thread (its loop has stopped).
fn final_check(idx: usize) -> Vec<String> {
    let s = &SLOTS[idx];
    let who = format!("{} (tid {})", NAMES[idx], s.tid.load(Ordering::SeqCst));
    let mut out = Vec::new();
    let tid = gettid();
    if tid != s.tid.load(Ordering::SeqCst) {
        out.push(format!("{who}: gettid() is now {tid}"));
    }
    let tp = thread_pointer();
    if tp != s.tp.load(Ordering::SeqCst) {
        out.push(format!(
            "{who}: thread pointer {tp:#x}, was {:#x}",
            s.tp.load(Ordering::SeqCst)
        ));
    }
    let area = this_area();
    let recorded = s.area.load(Ordering::SeqCst);
    if area as u64 != recorded {
        out.push(format!("{who}: rseq area at {area:p}, was {recorded:#x}"));
        return out;
    }
    // Before any rseq(2) call: a call that registers the area again would
    // hide a lost registration.
    if let Err(e) = cpu_agrees(&who, area) {
        out.push(e);
    }
    cpu_follows_migration(&who, area, &mut out);
    let size = registered_len();
    match sys_rseq(area, size, 0, RSEQ_SIG) {
        libc::EBUSY => {
            let mut other = Rseq {
                cpu_id_start: 0,
                cpu_id: RSEQ_CPU_ID_UNINITIALIZED as u32,
                rseq_cs: 0,
                flags: 0,
                node_id: 0,
                mm_cid: 0,
            };
            let e = sys_rseq(&mut other, size, 0, RSEQ_SIG);
            if e != libc::EINVAL {
                out.push(format!(
                    "{who}: rseq(2) with another area gave {}, expected EINVAL (registered elsewhere)",
                    errno_name(e)
                ));
            }
            let e = sys_rseq(area, size, 0, RSEQ_SIG ^ 1);
            if e != libc::EPERM {
                out.push(format!(
                    "{who}: rseq(2) with another signature gave {}, expected EPERM (registered with RSEQ_SIG)",
                    errno_name(e)
                ));
            }
        }
        0 => out.push(format!(
            "{who}: rseq area {area:p} was not registered (registering it again succeeded)"
        )),
        e => out.push(format!(
            "{who}: rseq(2) with the same area ({area:p}, {size} bytes, RSEQ_SIG) gave {}, expected EBUSY",
            errno_name(e)
        )),
    }
    // SAFETY: this thread's glibc rseq area.
    let flags = unsafe { std::ptr::read_volatile(&raw const (*area).flags) };
    if flags != 0 {
        out.push(format!("{who}: rseq area flags {flags:#x}, expected 0"));
    }
    let (r, at) = (
        s.rounds.load(Ordering::SeqCst),
        s.at_ready.load(Ordering::SeqCst),
    );
    if r <= at {
        out.push(format!(
            "{who}: ran no critical sections after ready ({r} rounds, {at} at ready)"
        ));
    }
    if idx == SIGNALLED {
        let sigs = SIGNALS.load(Ordering::SeqCst) - SIGNALS_AT_READY.load(Ordering::SeqCst);
        let aborts = s.aborts.load(Ordering::SeqCst) - s.aborts_at_ready.load(Ordering::SeqCst);
        if sigs >= MIN_SIGNALS && aborts == 0 {
            out.push(format!(
                "{who}: {sigs} signals arrived during its critical sections after ready, none aborted one"
            ));
        }
    }
    let skipped = s.skipped.load(Ordering::SeqCst);
    if skipped > 0 {
        out.push(format!(
            "{who}: {skipped} critical sections found cpu_id out of range (not registered)"
        ));
    }
    if let Some(f) = lock(&s.run_failure).clone() {
        out.push(format!("while running: {f}"));
    }
    out
}

fn nap(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn thread_main(idx: usize) {
    let s = &SLOTS[idx];
    s.tid.store(gettid(), Ordering::SeqCst);
    s.tp.store(thread_pointer(), Ordering::SeqCst);
    let area = this_area();
    s.area.store(area as u64, Ordering::SeqCst);
    let counters = COUNTERS.load(Ordering::SeqCst) as *mut Line;
    let (mut commits, mut aborts, mut skipped) = (0u64, 0u64, 0u64);
    let mut broke = false;
    loop {
        if idx == 0 && TERM.load(Ordering::SeqCst) {
            CHECK.store(true, Ordering::SeqCst);
        }
        if CHECK.load(Ordering::SeqCst) {
            let r = final_check(idx);
            *lock(&s.result) = Some(r);
            CHECKED.fetch_add(1, Ordering::SeqCst);
            if idx == 0 {
                return;
            }
            loop {
                nap(1000);
            }
        }
        if idx == BREAK_THREAD && !broke && BREAK_NOW.load(Ordering::SeqCst) {
            broke = true;
            let e = sys_rseq(area, registered_len(), RSEQ_FLAG_UNREGISTER, RSEQ_SIG);
            if e != 0 {
                eprintln!("ck_rseq: --break: unregistering failed: {}", errno_name(e));
            }
        }
        let (batch, spin) = if idx == SIGNALLED {
            (300, 5000)
        } else {
            (2000, 0)
        };
        if idx == SIGNALLED {
            IN_BATCH.store(true, Ordering::SeqCst);
        }
        for _ in 0..batch {
            match percpu_inc(area, counters, spin) {
                0 => commits += 1,
                1 => aborts += 1,
                _ => skipped += 1,
            }
        }
        if idx == SIGNALLED {
            IN_BATCH.store(false, Ordering::SeqCst);
        }
        if idx == 0 && IN_BATCH.load(Ordering::SeqCst) {
            // SAFETY: tgkill(2) to our own thread w3.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    SLOTS[SIGNALLED].tid.load(Ordering::SeqCst),
                    libc::SIGUSR1,
                )
            };
        }
        s.commits.store(commits, Ordering::SeqCst);
        s.aborts.store(aborts, Ordering::SeqCst);
        s.skipped.store(skipped, Ordering::SeqCst);
        if let Err(e) = cpu_agrees(NAMES[idx], area) {
            let mut f = lock(&s.run_failure);
            if f.is_none() {
                *f = Some(e);
            }
        }
        let r = s.rounds.fetch_add(1, Ordering::SeqCst) + 1;
        if READY.load(Ordering::SeqCst) && s.at_ready.load(Ordering::SeqCst) == 0 {
            s.aborts_at_ready.store(aborts, Ordering::SeqCst);
            if idx == SIGNALLED {
                SIGNALS_AT_READY.store(SIGNALS.load(Ordering::SeqCst), Ordering::SeqCst);
            }
            s.at_ready.store(r, Ordering::SeqCst);
        }
        nap(1);
    }
}

extern "C" fn on_term(_sig: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr1(_sig: libc::c_int) {
    if IN_BATCH.load(Ordering::SeqCst) {
        SIGNALS.fetch_add(1, Ordering::SeqCst);
    }
}

fn die(msg: &str) -> ! {
    eprintln!("ck_rseq: setup failed: {msg}");
    std::process::exit(3);
}

pub(crate) fn main() {
    let out = ck::out_path();
    let brk = ck::break_requested();
    let (offset, size, flags) = glibc_rseq();
    if size == 0 {
        die("glibc did not register rseq (__rseq_size is 0; glibc.pthread.rseq=0 tunable?)");
    }
    for (sig, handler) in [
        (libc::SIGTERM, on_term as extern "C" fn(libc::c_int)),
        (libc::SIGUSR1, on_usr1),
    ] {
        // SAFETY: installs a handler that only touches atomics.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                die(&format!("sigaction({sig})"));
            }
        }
    }
    let lines: &'static mut [Line] =
        Vec::leak((0..LINES).map(|_| Line { count: 0 }).collect::<Vec<_>>());
    COUNTERS.store(lines.as_mut_ptr() as u64, Ordering::SeqCst);
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
    let setup: Vec<String> = SLOTS
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            lock(&s.run_failure)
                .clone()
                .map(|f| format!("{}: {f}", NAMES[i]))
        })
        .collect();
    if !setup.is_empty() {
        die(&setup.join("; "));
    }
    let tids: Vec<i32> = {
        // Main records itself in thread_main; do it here too for the list.
        SLOTS[0].tid.store(gettid(), Ordering::SeqCst);
        SLOTS.iter().map(|s| s.tid.load(Ordering::SeqCst)).collect()
    };
    READY.store(true, Ordering::SeqCst);
    // Say ready once every worker noted its round count at ready (main
    // notes its own in its first round).
    while SLOTS[1..]
        .iter()
        .any(|s| s.at_ready.load(Ordering::SeqCst) == 0)
    {
        nap(1);
    }
    ck::report(&out, &format!("ready {}", std::process::id()));
    if brk {
        BREAK_NOW.store(true, Ordering::SeqCst);
    }
    thread_main(0);

    let mut fails = lock(&SLOTS[0].result).clone().unwrap_or_default();
    let t0 = Instant::now();
    while CHECKED.load(Ordering::SeqCst) < THREADS && t0.elapsed() < Duration::from_secs(10) {
        nap(2);
    }
    let mut all_done = true;
    for (idx, s) in SLOTS.iter().enumerate().skip(1) {
        match lock(&s.result).clone() {
            Some(r) => fails.extend(r),
            None => {
                all_done = false;
                fails.push(format!(
                    "{} (tid {}) did not run its check within 10 s",
                    NAMES[idx], tids[idx]
                ));
            }
        }
    }
    let commits: u64 = SLOTS.iter().map(|s| s.commits.load(Ordering::SeqCst)).sum();
    let aborts: u64 = SLOTS.iter().map(|s| s.aborts.load(Ordering::SeqCst)).sum();
    // SAFETY: every thread has left its loop (all_done), nothing writes the
    // counters any more.
    let counted: u64 = lines
        .iter()
        .map(|l| unsafe { std::ptr::read_volatile(&l.count) })
        .sum();
    if all_done && counted != commits {
        fails.push(format!(
            "per-CPU counters add up to {counted}, the threads committed {commits} ({aborts} aborts): a critical section was not aborted"
        ));
    }
    if commits == 0 {
        fails.push("no critical section ever committed".into());
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
    if glibc_rseq() != (offset, size, flags) {
        fails.push(format!(
            "glibc's (__rseq_offset, __rseq_size, __rseq_flags) is {:?}, was {:?}",
            glibc_rseq(),
            (offset, size, flags)
        ));
    }
    eprintln!(
        "ck_rseq: {commits} commits, {aborts} aborts, {} SIGUSR1 in w3's sections ({} after ready)",
        SIGNALS.load(Ordering::SeqCst),
        SIGNALS.load(Ordering::SeqCst) - SIGNALS_AT_READY.load(Ordering::SeqCst)
    );
    if fails.is_empty() {
        ck::report(&out, "PASS");
        std::process::exit(0);
    }
    let mut line = format!(
        "FAIL {} [{commits} commits, {aborts} aborts]",
        fails.join("; ")
    );
    line.truncate(line.floor_char_boundary(4000));
    ck::report(&out, &line);
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// include/uapi/linux/rseq.h: struct rseq is 32 bytes, aligned 32.
    #[test]
    fn rseq_layout() {
        assert_eq!(std::mem::size_of::<Rseq>(), 32);
        assert_eq!(std::mem::align_of::<Rseq>(), 32);
        assert_eq!(std::mem::offset_of!(Rseq, cpu_id_start), 0);
        assert_eq!(std::mem::offset_of!(Rseq, cpu_id), 4);
        assert_eq!(std::mem::offset_of!(Rseq, rseq_cs), 8);
        assert_eq!(std::mem::offset_of!(Rseq, flags), 16);
        assert_eq!(std::mem::offset_of!(Rseq, node_id), 20);
        assert_eq!(std::mem::offset_of!(Rseq, mm_cid), 24);
        assert_eq!(std::mem::size_of::<Line>(), 64);
    }
}
