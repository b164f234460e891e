//! The eBPF dirty stream against real child processes. Needs root and a
//! kernel with the tracepoints (`tern check`: ebpf_tracepoints); these tests FAIL, never skip,
//! when eBPF is unavailable.
//!
//! Children are forked from the (multi-threaded) test harness, so they only
//! make raw system calls until they `_exit`: no allocation, no locks.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tracker::ebpf::{DirtyStream, EbpfError, PinMode, ThreadEventKind, VmaChangeKind};

const PAGE: usize = 4096;

fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        // SAFETY: takes no arguments and cannot fail.
        unsafe { libc::geteuid() },
        0,
        "the eBPF tests need root (they fail rather than skip)"
    );
}

/// A forked child driven over two pipes; killed and reaped on drop.
struct Child {
    pid: i32,
    go_w: i32,
    report_r: i32,
}

fn pipe() -> (i32, i32) {
    let mut p = [0i32; 2];
    // SAFETY: valid out array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (p[0], p[1])
}

/// Async-signal-safe helpers for the child side.
mod child {
    pub fn wait_go(fd: i32) {
        let mut b = [0u8; 1];
        loop {
            // SAFETY: valid buffer.
            let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
            if r == 1 {
                return;
            }
            if r == 0 {
                // Parent gone.
                // SAFETY: ends this (forked) process at once; nothing after it runs.
                unsafe { libc::_exit(3) };
            }
        }
    }

    pub fn report(fd: i32, values: &[u64]) {
        let mut buf = [0u8; 64];
        let n = values.len().min(8);
        for (i, v) in values[..n].iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        // SAFETY: valid buffer; pipe writes <= PIPE_BUF are atomic.
        unsafe { libc::write(fd, buf.as_ptr().cast(), 64) };
    }
}

impl Child {
    /// Fork; the child runs `body(go_r, report_w)` then `_exit(0)`.
    fn spawn(body: impl FnOnce(i32, i32)) -> Child {
        let (go_r, go_w) = pipe();
        let (report_r, report_w) = pipe();
        // SAFETY: the child only makes raw system calls (see the module doc).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            body(go_r, report_w);
            // SAFETY: ends this (forked) process at once; nothing after it runs.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closes an fd this code opened and no longer uses.
        unsafe {
            libc::close(go_r);
            libc::close(report_w);
        }
        Child {
            pid,
            go_w,
            report_r,
        }
    }

    fn go(&self) {
        // SAFETY: valid buffer.
        assert_eq!(
            // SAFETY: the kernel reads at most the given length from the buffer, which we own for the call.
            unsafe { libc::write(self.go_w, b"g".as_ptr().cast(), 1) },
            1
        );
    }

    /// The child's next report (8 u64), with a deadline.
    fn report(&self) -> [u64; 8] {
        let mut pfd = libc::pollfd {
            fd: self.report_r,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 20_000) };
        assert_eq!(r, 1, "child {} did not report within 20 s", self.pid);
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 64 {
            // SAFETY: valid buffer.
            let n = unsafe { libc::read(self.report_r, buf[got..].as_mut_ptr().cast(), 64 - got) };
            assert!(n > 0, "child {} closed its report pipe", self.pid);
            got += n as usize;
        }
        let mut out = [0u64; 8];
        for (i, v) in out.iter_mut().enumerate() {
            *v = u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
        }
        out
    }

    /// Let the child finish and reap it; returns its exit status.
    fn finish(mut self) -> i32 {
        self.go();
        let status = self.wait();
        self.pid = 0;
        status
    }

    fn wait(&self) -> i32 {
        let mut status = 0;
        for _ in 0..2000 {
            // SAFETY: our own child.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r == self.pid {
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("child {} did not exit within 20 s", self.pid);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: our own child; reap it so its pid is free again.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
        // SAFETY: closes an fd this code opened and no longer uses.
        unsafe {
            libc::close(self.go_w);
            libc::close(self.report_r);
        }
    }
}

fn mmap_anon(len: usize) -> usize {
    // SAFETY: anonymous private mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as usize
}

fn pages_in(pages: &[u64], lo: usize, len: usize) -> usize {
    pages
        .iter()
        .filter(|&&p| p >= lo as u64 && p < (lo + len) as u64)
        .count()
}

#[test]
fn probe_succeeds() {
    require_root();
    DirtyStream::probe().expect("eBPF tracepoints must be usable on this machine");
    assert!(
        DirtyStream::fault_tracepoints_available().unwrap(),
        "this x86 test machine must have exceptions:page_fault_user"
    );
}

#[test]
fn recall_of_first_writes_and_empty_second_drain() {
    require_root();
    const N: usize = 1000;
    let region = mmap_anon(N * PAGE);
    let child = Child::spawn(move |go, rep| {
        child::wait_go(go);
        for i in 0..N {
            // SAFETY: inside the (untouched, so not yet present) region.
            unsafe { std::ptr::write_volatile((region + i * PAGE) as *mut u8, 1) };
        }
        child::report(rep, &[1]);
        child::wait_go(go);
    });
    let mut stream = DirtyStream::open(child.pid, PinMode::None).expect("open");
    assert!(stream.tracks_faults());
    child.go();
    child.report();
    let round = stream.drain().expect("drain");
    let seen = pages_in(&round.pages, region, N * PAGE);
    eprintln!(
        "recall: {seen}/{N} pages; {} pages in total, {} user, {} kernel, {} write faults, lost {}",
        round.pages.len(),
        round.user_pages,
        round.kernel_pages,
        round.write_faults,
        round.lost
    );
    assert!(seen * 100 >= N * 99, "recall {seen}/{N} below 99%");
    assert!(
        round.pages.windows(2).all(|w| w[0] < w[1]),
        "pages sorted, unique"
    );
    assert!(round.user_pages >= seen);
    assert!(round.write_faults >= seen as u64);
    assert_eq!(round.lost, 0);
    assert!(!round.hot.is_empty() && round.hot.len() <= 64);
    assert!(round.hot.windows(2).all(|w| w[0].1 >= w[1].1), "hot sorted");

    let again = stream.drain().expect("second drain");
    assert!(again.pages.is_empty(), "second drain: {:?}", again.pages);
    assert!(again.vma_changes.is_empty(), "{:?}", again.vma_changes);
    assert!(again.thread_events.is_empty(), "{:?}", again.thread_events);
    assert_eq!(again.write_faults, 0);
    assert_eq!(again.lost, 0);
    assert_eq!(child.finish(), 0);
    // SAFETY: unmaps only a region this code mapped, which nothing references any more.
    unsafe { libc::munmap(region as *mut _, N * PAGE) };
}

#[test]
fn kernel_write_shows_as_kernel_fault() {
    require_root();
    const LEN: usize = 4 * PAGE;
    let (data_r, data_w) = pipe();
    let child = Child::spawn(move |go, rep| {
        let buf = mmap_anon(LEN);
        child::report(rep, &[buf as u64]);
        child::wait_go(go);
        let mut got = 0;
        while got < LEN {
            // SAFETY: read(2) into the fresh buffer: copy_to_user faults.
            let n = unsafe { libc::read(data_r, (buf + got) as *mut _, LEN - got) };
            if n <= 0 {
                // SAFETY: ends this (forked) process at once; nothing after it runs.
                unsafe { libc::_exit(4) };
            }
            got += n as usize;
        }
        child::report(rep, &[1]);
        child::wait_go(go);
    });
    // SAFETY: closes an fd this code opened and no longer uses.
    unsafe { libc::close(data_r) };
    let buf = sys::usize_of(child.report()[0]);
    let mut stream = DirtyStream::open(child.pid, PinMode::None).expect("open");
    child.go();
    let data = vec![7u8; LEN];
    // SAFETY: valid buffer; 16 KiB fits in the pipe.
    assert_eq!(
        // SAFETY: the kernel reads at most the given length from the buffer, which we own for the call.
        unsafe { libc::write(data_w, data.as_ptr().cast(), LEN) },
        LEN as isize
    );
    child.report();
    let round = stream.drain().expect("drain");
    let kernel = pages_in(&round.kernel_fault_pages, buf, LEN);
    eprintln!(
        "kernel fault pages in the read buffer: {kernel}/4; kernel_pages {}",
        round.kernel_pages
    );
    assert!(kernel >= 1, "no kernel fault page: {round:?}");
    assert!(round.kernel_pages >= kernel);
    for p in &round.kernel_fault_pages {
        assert!(round.pages.binary_search(p).is_ok());
    }
    assert_eq!(child.finish(), 0);
    // SAFETY: closes an fd this code opened and no longer uses.
    unsafe { libc::close(data_w) };
}

#[test]
fn address_space_changes_are_reported() {
    require_root();
    let child = Child::spawn(|go, rep| {
        child::wait_go(go);
        let a = mmap_anon(16 * PAGE);
        // SAFETY: all on the child's own fresh mapping / heap.
        unsafe {
            libc::munmap((a + 4 * PAGE) as *mut _, 4 * PAGE);
            let b = libc::mremap(a as *mut _, 4 * PAGE, 8 * PAGE, libc::MREMAP_MAYMOVE) as usize;
            libc::madvise(b as *mut _, 8 * PAGE, libc::MADV_DONTNEED);
            // A failing call is not reported.
            libc::munmap(3 as *mut _, PAGE);
            let cur = usize::try_from(libc::syscall(libc::SYS_brk, 0)).unwrap();
            let nb = usize::try_from(libc::syscall(libc::SYS_brk, cur + 16 * PAGE)).unwrap();
            child::report(rep, &[a as u64, b as u64, cur as u64, nb as u64]);
        }
        child::wait_go(go);
    });
    let mut stream = DirtyStream::open(child.pid, PinMode::None).expect("open");
    child.go();
    let [a, b, cur, nb, ..] = child.report();
    let round = stream.drain().expect("drain");
    let p = PAGE as u64;
    let got: Vec<(VmaChangeKind, [u64; 5])> = round
        .vma_changes
        .iter()
        .inspect(|v| assert_eq!(v.tid, child.pid as u32))
        .map(|v| (v.kind, v.args))
        .collect();
    let want = vec![
        (
            VmaChangeKind::Mmap,
            [
                0,
                16 * p,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                a,
            ],
        ),
        (VmaChangeKind::Munmap, [a + 4 * p, 4 * p, 0, 0, 0]),
        (
            VmaChangeKind::Mremap,
            [a, 4 * p, 8 * p, libc::MREMAP_MAYMOVE as u64, b],
        ),
        (
            VmaChangeKind::Madvise,
            [b, 8 * p, libc::MADV_DONTNEED as u64, 0, 0],
        ),
        (VmaChangeKind::Brk, [cur + 16 * p, 0, 0, 0, nb]),
    ];
    assert_eq!(got, want);
    assert_eq!(round.lost, 0);
    assert_eq!(child.finish(), 0);
}

extern "C" fn thread_body(_arg: *mut libc::c_void) -> libc::c_int {
    0
}

#[test]
fn thread_creation_and_exit_are_reported() {
    require_root();
    let child = Child::spawn(|go, rep| {
        child::wait_go(go);
        const STACK: usize = 64 * 1024;
        let stack = mmap_anon(STACK + PAGE);
        let ctid = stack as *mut i32; // first word of the mapping, below the stack
        // SAFETY: raw clone of a thread that returns at once (glibc's clone
        // wrapper then calls exit(2) for that thread only).
        let tid = unsafe {
            libc::clone(
                thread_body,
                (stack + STACK + PAGE) as *mut libc::c_void,
                libc::CLONE_VM
                    | libc::CLONE_FS
                    | libc::CLONE_FILES
                    | libc::CLONE_SIGHAND
                    | libc::CLONE_THREAD
                    | libc::CLONE_SYSVSEM
                    | libc::CLONE_PARENT_SETTID
                    | libc::CLONE_CHILD_CLEARTID,
                std::ptr::null_mut(),
                ctid,
                std::ptr::null_mut::<libc::c_void>(),
                ctid,
            )
        };
        // Wait for the kernel to clear ctid at thread exit.
        loop {
            // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
            let v = unsafe { std::ptr::read_volatile(ctid) };
            if v == 0 {
                break;
            }
            // SAFETY: FUTEX_WAIT reads the int at `ctid`, a live word the kernel clears at thread exit; no timeout (null).
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    ctid,
                    libc::FUTEX_WAIT,
                    v,
                    std::ptr::null::<libc::timespec>(),
                )
            };
        }
        // And a child process, which is not a thread.
        // SAFETY: the child calls only async-signal-safe functions (or plain memory accesses of this single-threaded program) before _exit.
        let gc = unsafe { libc::fork() };
        if gc == 0 {
            // SAFETY: ends this (forked) process at once; nothing after it runs.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: waitpid(2) writes at most one int, into a local status (or none for a null pointer).
        unsafe { libc::waitpid(gc, std::ptr::null_mut(), 0) };
        child::report(rep, &[tid as u64, gc as u64]);
        child::wait_go(go);
    });
    let mut stream = DirtyStream::open(child.pid, PinMode::None).expect("open");
    child.go();
    let [tid, gc, ..] = child.report();
    let round = stream.drain().expect("drain");
    let ev: Vec<(ThreadEventKind, u32)> = round
        .thread_events
        .iter()
        .map(|e| (e.kind, e.tid))
        .collect();
    assert_eq!(
        ev,
        vec![
            (ThreadEventKind::Created, u32::try_from(tid).unwrap()),
            (ThreadEventKind::Exited, u32::try_from(tid).unwrap()),
            (ThreadEventKind::ChildProcess, u32::try_from(gc).unwrap()),
        ]
    );
    let pid = child.pid;
    assert_eq!(child.finish(), 0);
    let round = stream.drain().expect("drain after exit");
    assert!(
        round
            .thread_events
            .iter()
            .any(|e| e.kind == ThreadEventKind::Exited && e.tid == pid as u32),
        "main thread exit missing: {:?}",
        round.thread_events
    );
}

const PIN_HELPER_ENV: &str = "TERN_EBPF_PIN_HELPER";

/// Not a test by itself: run in a separate process by `pinned_stream_*`, it
/// opens a pinned stream and exits without closing it.
#[test]
fn pin_helper() {
    let Ok(arg) = std::env::var(PIN_HELPER_ENV) else {
        return;
    };
    let (dir, pid) = arg.rsplit_once(':').expect("DIR:PID");
    let stream =
        DirtyStream::open(pid.parse().unwrap(), PinMode::Dir(PathBuf::from(dir))).expect("open");
    assert_eq!(stream.pin_dir(), Some(Path::new(dir)));
}

#[test]
fn pinned_stream_outlives_its_opener_and_is_reused() {
    require_root();
    capture_logs();
    const N: usize = 100;
    let r1 = mmap_anon(N * PAGE);
    let r2 = mmap_anon(N * PAGE);
    let r3 = mmap_anon(N * PAGE);
    let child = Child::spawn(move |go, rep| {
        for r in [r1, r2, r3] {
            child::wait_go(go);
            for i in 0..N {
                // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
                unsafe { std::ptr::write_volatile((r + i * PAGE) as *mut u8, 1) };
            }
            child::report(rep, &[1]);
        }
        child::wait_go(go);
    });
    let dir = PathBuf::from(format!("/sys/fs/bpf/tern-test-{}", std::process::id()));
    let _cleanup = RemoveDirOnDrop(dir.clone());

    // 1. Another process opens the pinned stream and exits.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pin_helper", "--test-threads=1", "--nocapture"])
        .env(PIN_HELPER_ENV, format!("{}:{}", dir.display(), child.pid))
        .status()
        .expect("run the pin helper");
    assert!(status.success(), "pin helper failed: {status}");
    assert!(
        dir.join("STATE").exists(),
        "nothing pinned in {}",
        dir.display()
    );

    // 2. With no stream object alive anywhere, the child writes r1.
    child.go();
    child.report();

    // 3. A later open reuses the pins and sees those writes.
    let mut stream = DirtyStream::open(child.pid, PinMode::Dir(dir.clone())).expect("reopen");
    let round = stream.drain().expect("drain");
    let seen = pages_in(&round.pages, r1, N * PAGE);
    assert!(seen * 100 >= N * 99, "recorded while unowned: {seen}/{N}");
    // ... and reads what its programs log (aya-log finds their log ring
    // through the program id kept in the pinned STATE map).
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    assert!(
        !logs.contains(&format!("pinned eBPF stream in {}", dir.display())),
        "{logs}"
    );

    // Another live process cannot take this directory over.
    let me = std::process::id() as i32;
    match DirtyStream::open(me, PinMode::Dir(dir.clone())) {
        Err(EbpfError::PinnedForOtherTarget { pinned, .. }) => assert_eq!(pinned, child.pid),
        other => panic!("expected PinnedForOtherTarget, got {other:?}"),
    }
    drop(stream);

    // 4. Again: writes to r2, seen by a third open, and r1 is not repeated.
    child.go();
    child.report();
    let mut stream = DirtyStream::open(child.pid, PinMode::Dir(dir.clone())).expect("reopen 2");
    let round = stream.drain().expect("drain 2");
    assert!(pages_in(&round.pages, r2, N * PAGE) * 100 >= N * 99);
    assert_eq!(pages_in(&round.pages, r1, N * PAGE), 0);

    // 5. Teardown removes the directory and detaches the programs: keep the
    //    (drained) fault ring alive through a handle of our own, let the
    //    child write r3, and the ring must stay empty.
    let mut faults = aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(
        aya::maps::MapData::from_pin(dir.join("FAULTS")).expect("open the pinned FAULTS ring"),
    ))
    .expect("FAULTS is a ring buffer");
    assert!(faults.next().is_none(), "drained ring not empty");
    stream.close_and_unpin().expect("close_and_unpin");
    assert!(!dir.exists(), "{} still exists", dir.display());
    // The kernel releases an unpinned link asynchronously: give it a moment,
    // and forget what the programs logged meanwhile.
    std::thread::sleep(std::time::Duration::from_millis(200));
    while faults.next().is_some() {}
    child.go();
    child.report();
    assert!(
        faults.next().is_none(),
        "programs still attached after close_and_unpin"
    );
    drop(faults);
    assert_eq!(child.finish(), 0);
    // SAFETY: unmaps only a region this code mapped, which nothing references any more.
    unsafe {
        libc::munmap(r1 as *mut _, N * PAGE);
        libc::munmap(r2 as *mut _, N * PAGE);
        libc::munmap(r3 as *mut _, N * PAGE);
    }
}

/// Removes a pin directory left behind by a failed test.
struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn repeated_faults_rank_a_page_hot() {
    require_root();
    const REPEAT: usize = 20;
    let region = mmap_anon(8 * PAGE);
    let child = Child::spawn(move |go, rep| {
        child::wait_go(go);
        // One first touch each for pages 1..8; page 0 faults REPEAT times:
        // MADV_DONTNEED drops it, so the next write faults again.
        for i in 1..8 {
            // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
            unsafe { std::ptr::write_volatile((region + i * PAGE) as *mut u8, 1) };
        }
        for _ in 0..REPEAT {
            // SAFETY: MADV_DONTNEED on a mapping this program made, to which no Rust reference is alive.
            unsafe {
                std::ptr::write_volatile(region as *mut u8, 1);
                libc::madvise(region as *mut _, PAGE, libc::MADV_DONTNEED);
            }
        }
        child::report(rep, &[1]);
        child::wait_go(go);
    });
    let mut stream = DirtyStream::open(child.pid, PinMode::None).expect("open");
    child.go();
    child.report();
    let round = stream.drain().expect("drain");
    assert_eq!(
        round.hot[0],
        (region as u64, u32::try_from(REPEAT).unwrap()),
        "{:?}",
        round.hot
    );
    assert_eq!(pages_in(&round.pages, region, 8 * PAGE), 8);
    let madvises = round
        .vma_changes
        .iter()
        .filter(|v| v.kind == VmaChangeKind::Madvise)
        .count();
    assert_eq!(madvises, REPEAT);
    assert_eq!(child.finish(), 0);
    // SAFETY: unmaps only a region this code mapped, which nothing references any more.
    unsafe { libc::munmap(region as *mut _, 8 * PAGE) };
}

/// Drain cost at scale (prints; asserts only recall).
#[test]
fn drain_of_many_pages() {
    require_root();
    const N: usize = 200_000;
    let region = mmap_anon(N * PAGE);
    let child = Child::spawn(move |go, rep| {
        child::wait_go(go);
        for i in 0..N {
            // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
            unsafe { std::ptr::write_volatile((region + i * PAGE) as *mut u8, 1) };
        }
        child::report(rep, &[1]);
        child::wait_go(go);
    });
    let mut stream = DirtyStream::open(child.pid, PinMode::None).expect("open");
    child.go();
    child.report();
    let t = std::time::Instant::now();
    let round = stream.drain().expect("drain");
    let took = t.elapsed();
    let seen = pages_in(&round.pages, region, N * PAGE);
    eprintln!(
        "drained {} pages in {took:?} (recall {seen}/{N}, lost {})",
        round.pages.len(),
        round.lost
    );
    assert!(seen * 100 >= N * 99, "recall {seen}/{N}");
    assert_eq!(child.finish(), 0);
    // SAFETY: unmaps only a region this code mapped, which nothing references any more.
    unsafe { libc::munmap(region as *mut _, N * PAGE) };
}

#[test]
fn open_errors_are_clear() {
    require_root();
    let err = DirtyStream::open(i32::MAX, PinMode::None).unwrap_err();
    assert!(matches!(err, EbpfError::NoSuchProcess(_)), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let err =
        DirtyStream::open(std::process::id() as i32, PinMode::Dir(tmp.path().into())).unwrap_err();
    assert!(matches!(err, EbpfError::Bpffs { .. }), "{err}");
    assert!(err.to_string().contains("bpf"), "{err}");
}

/// What reached the `tracing` subscriber, installed as tern installs it
/// (`fmt().init()`, which also bridges the `log` facade aya-log writes to).
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        tracing_subscriber::fmt()
            .with_writer(|| Capture)
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .init()
    });
}

/// A full EVENTS ring (1 MiB: ~18.7k records of 56 bytes with the ring's
/// header) drops events: the drain counts them, and the programs' aya-log
/// warning reaches the `tracing` log, naming the ring and the target.
#[test]
fn full_events_ring_is_counted_and_logged() {
    require_root();
    capture_logs();
    const CALLS: usize = 30_000;
    let page = mmap_anon(PAGE);
    let child = Child::spawn(move |go, rep| {
        child::wait_go(go);
        for _ in 0..CALLS {
            // SAFETY: advice on the child's own (inherited) mapping.
            unsafe { libc::madvise(page as *mut _, PAGE, libc::MADV_NORMAL) };
        }
        child::report(rep, &[1]);
        child::wait_go(go);
    });
    let mut stream = DirtyStream::open(child.pid, PinMode::None).expect("open");
    child.go();
    child.report();
    let round = stream.drain().expect("drain");
    let recorded = round
        .vma_changes
        .iter()
        .filter(|v| v.kind == VmaChangeKind::Madvise)
        .count();
    eprintln!(
        "{CALLS} madvise calls: {recorded} recorded, {} lost",
        round.lost
    );
    assert_eq!(
        recorded,
        round.vma_changes.len(),
        "{:?}",
        round.vma_changes.first()
    );
    assert!(
        (10_000..CALLS).contains(&recorded),
        "the 1 MiB ring holds ~18.7k events, {recorded} recorded"
    );
    assert_eq!(
        recorded as u64 + round.lost,
        CALLS as u64,
        "every call recorded or counted lost"
    );
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned();
    let want = format!(
        "event 'madvise' of pid {} thread {} dropped",
        child.pid, child.pid
    );
    let line = logs
        .lines()
        .find(|l| l.contains("EVENTS ring buffer full") && l.contains(&want))
        .unwrap_or_else(|| panic!("no aya-log warning about the full EVENTS ring in:\n{logs}"));
    assert!(
        line.contains("WARN") && line.contains("tracker::ebpf"),
        "{line}"
    );
    assert_eq!(child.finish(), 0);
    // SAFETY: `page` is the mapping of PAGE bytes this test made, no longer used.
    unsafe { libc::munmap(page as *mut _, PAGE) };
}
