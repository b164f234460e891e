//! `ck_unlinked --out FILE [--break]`: memfds and files deleted while open
//! or mapped (protocol: `tern_tests::ck`). Single-threaded.
//!
//! Setup:
//! - M1: memfd "ck-data", 16 MiB, data at page 0 and at 8 MiB (the rest
//!   holes), sealed against shrinking and growing, its fd at offset 4113
//!   and a dup; mapped shared read-write (pages 0..4), one word written
//!   through the mapping;
//! - M2: memfd "ck-mapped-only", 3 pages, mapped shared, its fd closed;
//! - M3: memfd "ck-sealed", 1 page, sealed against writing, shrinking,
//!   growing and more seals, mode 0640,
//!   opened a second time read-only through /proc/self/fd (its own open
//!   file description);
//! - M4: memfd "ck-private", 2 pages mapped privately, page 1 written in
//!   the private copy;
//! - D1: a file in a fresh directory, 3 pages + 100 bytes, opened O_RDWR |
//!   O_APPEND, deleted; also mapped shared;
//! - D2: a file mapped privately and executable-less (as a library would
//!   be), closed and deleted.
//!
//! On SIGTERM it checks: each fd's link (`/memfd:NAME (deleted)`, `PATH
//! (deleted)`), size, mode, seals, offset and status flags; every byte
//! page for page; the dup shares M1's offset, M3's second open does not;
//! shared mappings and fds see each other's writes both ways; M3 refuses
//! writes and M1 refuses to grow (seals hold); M4's written page is its
//! own and its other page the file's; D1 appends at its end.
//!
//! `--deleted-exe`: it first re-executes itself from a copy in its
//! directory and deletes the copy (an upgraded program still running);
//! the check then also wants `/proc/self/exe` to read `COPY (deleted)`.
//!
//! `--break`: right after `ready`, a byte of M2's mapping changes.

use std::ffi::CString;
use std::time::Duration;

use tern_tests::ck;

const PAGE: usize = 4096;
const M1_SIZE: usize = 16 << 20;
const KCMP_FILE: libc::c_long = 0;
/// M3's seals: its contents and size cannot change (tern reads such a
/// memfd before the freeze).
const M3_SEALS: i32 =
    libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

fn err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i % 253).to_le_bytes()[0]
                .wrapping_mul(17)
                .wrapping_add(seed)
        })
        .collect()
}

fn memfd(name: &str, flags: u32) -> Result<i32, String> {
    let c = CString::new(name).unwrap();
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(format!("memfd_create({name}): {}", err()));
    }
    Ok(fd)
}

fn pwrite(fd: i32, b: &[u8], off: usize) -> Result<(), String> {
    // SAFETY: pwrite from a live buffer.
    let n = unsafe { libc::pwrite(fd, b.as_ptr().cast(), b.len(), off as i64) };
    if n != b.len() as isize {
        return Err(format!(
            "pwrite of {} bytes on fd {fd}: {n} ({})",
            b.len(),
            err()
        ));
    }
    Ok(())
}

fn pread(fd: i32, len: usize, off: usize) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; len];
    // SAFETY: pread into a live buffer.
    let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), len, off as i64) };
    if n < 0 {
        return Err(format!("pread on fd {fd}: {}", err()));
    }
    b.truncate(n as usize);
    Ok(b)
}

fn map(fd: i32, len: usize, prot: i32, flags: i32) -> Result<*mut u8, String> {
    // SAFETY: a new mapping of a file we hold.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap of fd {fd}: {}", err()));
    }
    Ok(p.cast())
}

fn seek(fd: i32, off: i64, whence: i32) -> i64 {
    // SAFETY: lseek on an fd number.
    unsafe { libc::lseek(fd, off, whence) }
}

fn fcntl(fd: i32, cmd: i32, arg: i32) -> i32 {
    // SAFETY: fcntl with an int argument.
    unsafe { libc::fcntl(fd, cmd, arg) }
}

fn fstat(fd: i32) -> Result<libc::stat, String> {
    // SAFETY: fstat into a zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(format!("fstat of fd {fd}: {}", err()));
    }
    Ok(st)
}

fn slice(p: *mut u8, len: usize) -> &'static mut [u8] {
    // SAFETY: p is a live mapping of at least len bytes, used by this
    // single thread only.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

struct Setup {
    m1: i32,
    m1_dup: i32,
    m1_map: *mut u8,
    m2_map: *mut u8,
    m3: i32,
    m3_ro: i32,
    m4_map: *mut u8,
    d1: i32,
    d1_path: String,
    d1_map: *mut u8,
    d2_map: *mut u8,
    d2_path: String,
}

fn setup() -> Result<Setup, String> {
    let sealing = libc::MFD_ALLOW_SEALING;
    // M1
    let m1 = memfd("ck-data", sealing)?;
    // SAFETY: ftruncate of our memfd.
    if unsafe { libc::ftruncate(m1, M1_SIZE as i64) } != 0 {
        return Err(format!("ftruncate: {}", err()));
    }
    pwrite(m1, &pattern(1, 2 * PAGE), 0)?;
    pwrite(m1, &pattern(2, PAGE + 7), 8 << 20)?;
    if fcntl(
        m1,
        libc::F_ADD_SEALS,
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
    ) != 0
    {
        return Err(format!("F_ADD_SEALS: {}", err()));
    }
    seek(m1, 4113, libc::SEEK_SET);
    // SAFETY: dup of our fd.
    let m1_dup = unsafe { libc::dup(m1) };
    let m1_map = map(
        m1,
        4 * PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )?;
    slice(m1_map, 4 * PAGE)[3 * PAGE..3 * PAGE + 8].copy_from_slice(b"via-map!");
    // M2
    let m2 = memfd("ck-mapped-only", 0)?;
    pwrite(m2, &pattern(3, 3 * PAGE), 0)?;
    let m2_map = map(
        m2,
        3 * PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )?;
    // SAFETY: closing our fd (the mapping keeps the file).
    unsafe { libc::close(m2) };
    // M3
    let m3 = memfd("ck-sealed", sealing)?;
    pwrite(m3, &pattern(4, PAGE), 0)?;
    // SAFETY: fchmod of our memfd.
    unsafe { libc::fchmod(m3, 0o640) };
    if fcntl(m3, libc::F_ADD_SEALS, M3_SEALS) != 0 {
        return Err(format!("F_ADD_SEALS (write): {}", err()));
    }
    let p = CString::new(format!("/proc/self/fd/{m3}")).unwrap();
    // SAFETY: open of a NUL-terminated path.
    let m3_ro = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY) };
    if m3_ro < 0 {
        return Err(format!("reopening M3: {}", err()));
    }
    // M4
    let m4 = memfd("ck-private", 0)?;
    pwrite(m4, &pattern(5, 2 * PAGE), 0)?;
    let m4_map = map(
        m4,
        2 * PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE,
    )?;
    slice(m4_map, 2 * PAGE)[PAGE..PAGE + 6].copy_from_slice(b"mine!!");
    // SAFETY: closing our fd.
    unsafe { libc::close(m4) };
    // D1 and D2, in a directory of their own (left behind empty).
    let dir = std::env::temp_dir().join(format!("ck_unlinked.{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let d1_path = dir.join("d1.log").to_string_lossy().into_owned();
    std::fs::write(&d1_path, pattern(6, 3 * PAGE + 100)).map_err(|e| format!("{d1_path}: {e}"))?;
    let c = CString::new(d1_path.clone()).unwrap();
    // SAFETY: open of a NUL-terminated path.
    let d1 = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_APPEND) };
    if d1 < 0 {
        return Err(format!("{d1_path}: {}", err()));
    }
    let d1_map = map(
        d1,
        3 * PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )?;
    std::fs::remove_file(&d1_path).map_err(|e| format!("{d1_path}: {e}"))?;
    seek(d1, 1000, libc::SEEK_SET);
    let d2_path = dir.join("libgone.so").to_string_lossy().into_owned();
    std::fs::write(&d2_path, pattern(7, 2 * PAGE)).map_err(|e| format!("{d2_path}: {e}"))?;
    let c = CString::new(d2_path.clone()).unwrap();
    // SAFETY: open of a NUL-terminated path.
    let d2 = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
    let d2_map = map(d2, 2 * PAGE, libc::PROT_READ, libc::MAP_PRIVATE)?;
    // SAFETY: closing our fd.
    unsafe { libc::close(d2) };
    std::fs::remove_file(&d2_path).map_err(|e| format!("{d2_path}: {e}"))?;
    Ok(Setup {
        m1,
        m1_dup,
        m1_map,
        m2_map,
        m3,
        m3_ro,
        m4_map,
        d1,
        d1_path,
        d1_map,
        d2_map,
        d2_path,
    })
}

fn link(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("<{e}>"))
}

fn same_file(a: i32, b: i32) -> bool {
    let me = std::process::id() as libc::c_long;
    // SAFETY: kcmp of two of our fds.
    unsafe { libc::syscall(libc::SYS_kcmp, me, me, KCMP_FILE, a, b) == 0 }
}

fn check(f: &Setup, flags: &[(i32, i32)], bad: &mut Vec<String>) {
    let mut expect = |what: &str, ok: bool, got: String| {
        if !ok {
            bad.push(format!("{what}: {got}"));
        }
    };
    for &(fd, fl) in flags {
        let now = fcntl(fd, libc::F_GETFL, 0);
        expect(
            &format!("fd {fd} F_GETFL"),
            now == fl,
            format!("{now:#o}, was {fl:#o}"),
        );
    }
    // M1
    let l = link(f.m1);
    expect("M1 link", l == "/memfd:ck-data (deleted)", l);
    match fstat(f.m1) {
        Ok(st) => expect(
            "M1 size",
            st.st_size == M1_SIZE as i64,
            st.st_size.to_string(),
        ),
        Err(e) => expect("M1 fstat", false, e),
    }
    let seals = fcntl(f.m1, libc::F_GET_SEALS, 0);
    expect(
        "M1 seals",
        seals == libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        format!("{seals:#x}"),
    );
    let off = seek(f.m1, 0, libc::SEEK_CUR);
    expect("M1 offset", off == 4113, off.to_string());
    expect(
        "M1 dup shares its open file",
        same_file(f.m1, f.m1_dup),
        "kcmp differs".into(),
    );
    let mut want = pattern(1, 2 * PAGE);
    want.resize(4 * PAGE, 0);
    want[3 * PAGE..3 * PAGE + 8].copy_from_slice(b"via-map!");
    match pread(f.m1, 4 * PAGE, 0) {
        Ok(b) => expect(
            "M1 pages 0-3 through the fd",
            b == want,
            first_diff(&b, &want),
        ),
        Err(e) => expect("M1 read", false, e),
    }
    let m = slice(f.m1_map, 4 * PAGE);
    expect("M1 mapping", m[..] == want[..], first_diff(m, &want));
    let mut hi = pattern(2, PAGE + 7);
    hi.resize(2 * PAGE, 0);
    match pread(f.m1, 2 * PAGE, 8 << 20) {
        Ok(b) => expect("M1 data at 8 MiB", b == hi, first_diff(&b, &hi)),
        Err(e) => expect("M1 read at 8 MiB", false, e),
    }
    match pread(f.m1, PAGE, 12 << 20) {
        Ok(b) => expect(
            "M1 hole at 12 MiB",
            b.iter().all(|&x| x == 0),
            "not zeros".into(),
        ),
        Err(e) => expect("M1 read at 12 MiB", false, e),
    }
    // Shared both ways, after the restore.
    m[100..104].copy_from_slice(b"new1");
    let r = pread(f.m1, 4, 100).unwrap_or_default();
    expect(
        "M1 write through the mapping seen by the fd",
        r == b"new1",
        format!("{r:?}"),
    );
    let _ = pwrite(f.m1, b"new2", 200);
    expect(
        "M1 write through the fd seen in the mapping",
        &m[200..204] == b"new2",
        format!("{:?}", &m[200..204]),
    );
    // SAFETY: ftruncate of our memfd, which its seals refuse.
    let grow = unsafe { libc::ftruncate(f.m1, 2 * M1_SIZE as i64) };
    expect("M1 cannot grow", grow != 0, "ftruncate succeeded".into());
    // M2
    let m2 = slice(f.m2_map, 3 * PAGE);
    let w2 = pattern(3, 3 * PAGE);
    expect("M2 mapping", m2[..] == w2[..], first_diff(m2, &w2));
    // M3
    let l = link(f.m3);
    expect("M3 link", l == "/memfd:ck-sealed (deleted)", l);
    let seals = fcntl(f.m3, libc::F_GET_SEALS, 0);
    expect("M3 seals", seals == M3_SEALS, format!("{seals:#x}"));
    match fstat(f.m3) {
        Ok(st) => expect(
            "M3 mode",
            st.st_mode & 0o7777 == 0o640,
            format!("{:o}", st.st_mode),
        ),
        Err(e) => expect("M3 fstat", false, e),
    }
    expect(
        "M3 refuses writes",
        pwrite(f.m3, b"x", 0).is_err(),
        "pwrite succeeded".into(),
    );
    let w3 = pattern(4, PAGE);
    match pread(f.m3_ro, PAGE, 0) {
        Ok(b) => expect("M3 contents", b == w3, first_diff(&b, &w3)),
        Err(e) => expect("M3 read", false, e),
    }
    expect(
        "M3's second open is its own",
        !same_file(f.m3, f.m3_ro),
        "kcmp same".into(),
    );
    // M4
    let m4 = slice(f.m4_map, 2 * PAGE);
    let mut w4 = pattern(5, 2 * PAGE);
    w4[PAGE..PAGE + 6].copy_from_slice(b"mine!!");
    expect("M4 private mapping", m4[..] == w4[..], first_diff(m4, &w4));
    // D1
    let l = link(f.d1);
    expect("D1 link", l == format!("{} (deleted)", f.d1_path), l);
    let off = seek(f.d1, 0, libc::SEEK_CUR);
    expect("D1 offset", off == 1000, off.to_string());
    let w1 = pattern(6, 3 * PAGE + 100);
    match pread(f.d1, 3 * PAGE + 200, 0) {
        Ok(b) => expect("D1 contents", b == w1, first_diff(&b, &w1)),
        Err(e) => expect("D1 read", false, e),
    }
    let d1m = slice(f.d1_map, 3 * PAGE);
    expect(
        "D1 mapping",
        d1m[..] == w1[..3 * PAGE],
        first_diff(d1m, &w1[..3 * PAGE]),
    );
    d1m[5..9].copy_from_slice(b"D1D1");
    let r = pread(f.d1, 4, 5).unwrap_or_default();
    expect(
        "D1 write through the mapping seen by the fd",
        r == b"D1D1",
        format!("{r:?}"),
    );
    // O_APPEND: a write goes to the end.
    // SAFETY: write from a live buffer.
    unsafe { libc::write(f.d1, b"tail".as_ptr().cast(), 4) };
    let r = pread(f.d1, 4, 3 * PAGE + 100).unwrap_or_default();
    expect("D1 appends at its end", r == b"tail", format!("{r:?}"));
    // D2
    let d2 = slice(f.d2_map, 2 * PAGE);
    let w2 = pattern(7, 2 * PAGE);
    expect("D2 private mapping", d2[..] == w2[..], first_diff(d2, &w2));
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    expect(
        "D2 named in maps",
        maps.contains(&format!("{} (deleted)", f.d2_path)) || maps.contains("(deleted)"),
        "no deleted mapping listed".into(),
    );
}

fn first_diff(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("{} bytes, want {}", a.len(), b.len());
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(
            "byte {i} (page {}) is {:#x}, want {:#x}",
            i / PAGE,
            a[i],
            b[i]
        ),
        None => "same".into(),
    }
}

/// Where `--deleted-exe` runs from (the same PID across the exec).
fn exe_copy() -> String {
    std::env::temp_dir()
        .join(format!("ck_unlinked.{}", std::process::id()))
        .join("ck_unlinked-copy")
        .to_string_lossy()
        .into_owned()
}

fn main() {
    let deleted_exe = std::env::args().any(|a| a == "--deleted-exe");
    if deleted_exe && std::env::var_os("CK_UNLINKED_COPY").is_none() {
        use std::os::unix::process::CommandExt;
        let copy = exe_copy();
        let made = std::fs::create_dir_all(std::path::Path::new(&copy).parent().unwrap())
            .and_then(|()| std::fs::copy("/proc/self/exe", &copy));
        if let Err(e) = made {
            eprintln!("ck_unlinked: copying itself to {copy}: {e}");
            std::process::exit(2);
        }
        let e = std::process::Command::new(&copy)
            .args(std::env::args_os().skip(1))
            .env("CK_UNLINKED_COPY", "1")
            .exec();
        eprintln!("ck_unlinked: exec {copy}: {e}");
        std::process::exit(2);
    }
    if deleted_exe {
        let _ = std::fs::remove_file(exe_copy());
    }
    let out = ck::out_path();
    let broken = ck::break_requested();
    if let Err(e) = ck::catch_sigterm() {
        ck::finish(&out, &[format!("setup: {e}")]);
    }
    let f = match setup() {
        Ok(f) => f,
        Err(e) => ck::finish(&out, &[format!("setup: {e}")]),
    };
    let flags: Vec<(i32, i32)> = [f.m1, f.m1_dup, f.m3, f.m3_ro, f.d1]
        .iter()
        .map(|&fd| (fd, fcntl(fd, libc::F_GETFL, 0)))
        .collect();
    ck::report(&out, &format!("ready {}", std::process::id()));
    if broken {
        slice(f.m2_map, PAGE)[77] ^= 0xff;
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut bad = Vec::new();
    check(&f, &flags, &mut bad);
    if deleted_exe {
        let exe = std::fs::read_link("/proc/self/exe")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if exe != format!("{} (deleted)", exe_copy()) {
            bad.push(format!("exe: {exe}"));
        }
    }
    ck::finish(&out, &bad);
}
