//! The test harness checks itself, without tern: a reference image written by
//! the test from /proc/PID/mem passes the oracle, and the oracle catches a
//! changed page, a new mapping and a removed one.

use tern_tests::*;

/// The kernel writes each thread's rseq area (`cpu_id_start`, `cpu_id`)
/// when the thread returns to user mode on another CPU, and a thread blocked
/// in read(2) does so after every SIGSTOP/SIGCONT (the read restarts). These
/// tests take two stops with no tracking between them, so the workload is
/// pinned to one CPU (and answers once there) to keep that page still.
/// (tern's own tests do not need this: the tracker sees the kernel's write.)
fn pin_to_one_cpu(w: &mut Workload) {
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the cpu_set_t is a local of the size passed; the CPU index is below CPU_SETSIZE.
    let r = unsafe { libc::sched_getaffinity(w.pid(), std::mem::size_of_val(&set), &mut set) };
    assert_eq!(
        r,
        0,
        "sched_getaffinity({}): {}",
        w.pid(),
        std::io::Error::last_os_error()
    );
    let cpu = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: the cpu_set_t is a local of the size passed; the CPU index is below CPU_SETSIZE.
        .find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .expect("the workload may run on no CPU");
    // SAFETY: the cpu_set_t is a local of the size passed; the CPU index is below CPU_SETSIZE.
    unsafe { libc::CPU_ZERO(&mut set) };
    // SAFETY: the cpu_set_t is a local of the size passed; the CPU index is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the cpu_set_t is a local of the size passed; the CPU index is below CPU_SETSIZE.
    let r = unsafe { libc::sched_setaffinity(w.pid(), std::mem::size_of_val(&set), &set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity({}, cpu {cpu}): {}",
        w.pid(),
        std::io::Error::last_os_error()
    );
    // Return to user mode once on that CPU, so its rseq area says so.
    w.cmd("ping");
}

fn workload_with_regions() -> Workload {
    let mut w = Workload::start();
    pin_to_one_cpu(&mut w);
    w.cmd("alloc r 64 rand");
    w.cmd("alloc l 64 light");
    w.cmd("alloc z 16 zero");
    w.cmd("alloc n 16 none");
    w.cmd("alloc s 16 rand shared");
    w
}

#[test]
fn reference_image_passes_the_oracle() {
    let w = workload_with_regions();
    let d = tempdir();
    let img = d.path().join("ref");
    oracle::write_reference_image(w.pid(), &img).unwrap();
    let r = assert_oracle(w.pid(), &img, "reference image");
    assert!(r.pages_compared > 200, "{r:?}");
    assert!(proc::alive(w.pid()));
    assert!(
        proc::stopped_threads(w.pid()).is_empty(),
        "oracle left the target stopped"
    );
}

#[test]
fn oracle_catches_a_changed_page() {
    let mut w = workload_with_regions();
    let d = tempdir();
    let img = d.path().join("ref");
    // Any command changes the workload's heap: ask before the image.
    let a = addr_of(&w.cmd("addr r")) + 5 * 4096 + 100;
    oracle::write_reference_image(w.pid(), &img).unwrap();
    process_vm_write(w.pid(), a, b"changed!");
    let e = oracle::check(w.pid(), &img).expect_err("a changed page went unnoticed");
    assert!(e.contains(&format!("{:#x}", a & !4095)), "{e}");
    assert!(e.contains("1 pages differ"), "{e}");
}

#[test]
fn oracle_catches_new_and_removed_mappings() {
    let mut w = workload_with_regions();
    let d = tempdir();
    let img = d.path().join("ref");
    oracle::write_reference_image(w.pid(), &img).unwrap();
    let n = addr_of(&w.cmd("alloc new 8 rand"));
    let e = oracle::check(w.pid(), &img).expect_err("a new mapping went unnoticed");
    assert!(e.contains("not in the chain"), "{e}");
    assert!(e.contains(&format!("{n:x}")), "{e}");
    w.cmd("unmap new");
    let s = addr_of(&w.cmd("unmap s"));
    let e = oracle::check(w.pid(), &img).expect_err("a removed mapping went unnoticed");
    assert!(e.contains(&format!("{s:x}")), "{e}");
}

#[test]
fn zapped_page_differs_from_old_image() {
    let mut w = workload_with_regions();
    let d = tempdir();
    let img = d.path().join("ref");
    oracle::write_reference_image(w.pid(), &img).unwrap();
    let r = addr_of(&w.cmd("addr r"));
    w.cmd("zap r 10 2");
    let e = oracle::check(w.pid(), &img).expect_err("zapped pages went unnoticed");
    // (The commands themselves changed a few heap pages too.)
    for p in [10, 11] {
        assert!(e.contains(&format!("page {:#x}", r + p * 4096)), "{e}");
    }
}

#[test]
fn selfcheck_workload_passes_and_terminates() {
    let mut w = Workload::selfcheck(4);
    w.self_check("at start");
    let before = proc::Snapshot::take(w.pid()).unwrap();
    w.self_check("again");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = proc::Snapshot::take(w.pid()).unwrap();
    let d = proc::Snapshot::diff(&before, &after, false);
    assert!(d.is_empty(), "selfcheck's maps/fds are not stable: {d:?}");
    // Memory changed behind its back is caught.
    let mut w2 = Workload::selfcheck(4);
    w.terminate_and_check();
    let maps = proc::maps(w2.pid()).unwrap();
    let big = maps
        .iter()
        .find(|m| m.end - m.start == 4 << 20 && m.is_private_anon())
        .expect("4 MiB region");
    process_vm_write(w2.pid(), big.start + 4096, b"x");
    let v = w2.try_cmd("check").unwrap();
    assert_eq!(v["result"], "FAIL", "{v}");
}

#[test]
fn missing_binary_message() {
    // The support library names the build command when tern is absent.
    assert!(bin_dir().join("workload").is_file());
}
