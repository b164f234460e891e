//! `ck_ofd --out FILE [--break]`: open file descriptions (protocol:
//! `tern_tests::ck`). Single-threaded.
//!
//! A restore must give back not only each fd but which fds share one open
//! file description (offset and status flags are per description) and which
//! do not. Setup, in the cwd:
//! - `ck_ofd.data` (64 KiB pattern) opened twice: fd A O_RDWR at offset 1000,
//!   fd B O_RDONLY|O_NONBLOCK at offset 5000; fd C = dup(A); fd D opened
//!   O_WRONLY|O_APPEND;
//! - a pipe (pipe2, no flags): read end R (blocking), a second description
//!   of it E = open("/proc/self/fd/R", O_RDONLY|O_NONBLOCK), write end W and
//!   W2 = dup(W); O_NONBLOCK then set on W (so on W2 too); 3000 pattern
//!   bytes written into it;
//! - a FIFO `ck_ofd.fifo`: reader FR opened O_RDONLY|O_NONBLOCK, then made
//!   blocking with F_SETFL; writer FW opened O_WRONLY; 5000 pattern bytes
//!   left in it.
//!
//! F_GETFL of every fd and the offsets of A, B, D are recorded before
//! `ready`. On SIGTERM it checks: F_GETFL of each fd unchanged; the offsets
//! of A, B, D unchanged; A and C one description (kcmp KCMP_FILE == 0, and
//! lseek on A moves C), A and B two, R and E two (but one pipe), W and W2
//! one; the pipe holds exactly its 3000 bytes (FIONREAD, then read via E,
//! non-blocking, then empty) and the FIFO exactly its 5000 bytes (FIONREAD,
//! then read via the blocking FR under alarm(5): a hang is FAIL "FIFO read
//! blocked").
//!
//! `--break`: right after `ready`, O_NONBLOCK is set on R (the F_GETFL check
//! names R).

use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Duration;

use tern_tests::ck;

const DATA: &str = "ck_ofd.data";
const FIFO: &str = "ck_ofd.fifo";
const DATA_LEN: usize = 64 * 1024;
const A_OFF: i64 = 1000;
const B_OFF: i64 = 5000;
const PIPE_LEN: usize = 3000;
const FIFO_LEN: usize = 5000;
const KCMP_FILE: libc::c_long = 0;

/// The result file as a C string for the SIGALRM handler (leaked).
static OUT_C: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_alarm(_: i32) {
    let p = OUT_C.load(Ordering::SeqCst);
    let line = b"FAIL FIFO read blocked (FR: 5 s without its 5000 bytes)\n";
    // SAFETY: plain syscalls on a leaked C string; async-signal-safe.
    unsafe {
        if !p.is_null() {
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
        libc::_exit(1);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let i = u32::try_from(i).unwrap();
            i.wrapping_mul(197)
                .wrapping_add(u32::from(seed) * 29 + (i >> 9))
                .to_le_bytes()[0]
        })
        .collect()
}

fn err() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn setup_fail(out: &Path, what: String) -> ! {
    ck::finish(out, &[format!("setup: {what}")]);
}

fn open(path: &str, flags: i32) -> Result<i32, String> {
    let c = CString::new(path).unwrap();
    // SAFETY: open of a C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return Err(format!("open {path} (flags {flags:#x}): {}", err()));
    }
    Ok(fd)
}

fn getfl(fd: i32) -> i32 {
    // SAFETY: fcntl on an fd number.
    unsafe { libc::fcntl(fd, libc::F_GETFL) }
}

fn setfl(fd: i32, flags: i32) -> Result<(), String> {
    // SAFETY: fcntl on an fd number.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } != 0 {
        return Err(format!("F_SETFL {flags:#x} on fd {fd}: {}", err()));
    }
    Ok(())
}

fn offset(fd: i32) -> i64 {
    // SAFETY: lseek on an fd number.
    unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) }
}

fn write_all(fd: i32, buf: &[u8]) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: write from a live buffer.
        let n = unsafe { libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done) };
        if n <= 0 {
            return Err(format!("write to fd {fd}: {}", err()));
        }
        done += n as usize;
    }
    Ok(())
}

fn kcmp(a: i32, b: i32) -> Result<i64, String> {
    let pid = std::process::id() as libc::c_long;
    // SAFETY: kcmp compares two of our own fds.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    if r < 0 {
        return Err(format!("kcmp(KCMP_FILE, fd {a}, fd {b}): {}", err()));
    }
    Ok(r)
}

fn fionread(fd: i32) -> Result<i32, String> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD into a local int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
        return Err(format!("FIONREAD on fd {fd}: {}", err()));
    }
    Ok(n)
}

fn ino(fd: i32) -> u64 {
    // SAFETY: fstat into a local buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return 0;
        }
        st.st_ino
    }
}

struct Fds {
    a: i32,
    b: i32,
    c: i32,
    d: i32,
    r: i32,
    e: i32,
    w: i32,
    w2: i32,
    fr: i32,
    fw: i32,
}

fn setup(data: &[u8], pipe_bytes: &[u8], fifo_bytes: &[u8]) -> Result<Fds, String> {
    std::fs::write(DATA, data).map_err(|e| format!("write {DATA}: {e}"))?;
    let a = open(DATA, libc::O_RDWR)?;
    let b = open(DATA, libc::O_RDONLY | libc::O_NONBLOCK)?;
    // SAFETY: lseek/dup/pipe2 on our own fds and a local array.
    let (c, r, w, w2) = unsafe {
        if libc::lseek(a, A_OFF, libc::SEEK_SET) != A_OFF
            || libc::lseek(b, B_OFF, libc::SEEK_SET) != B_OFF
        {
            return Err(format!("lseek: {}", err()));
        }
        let c = libc::dup(a);
        if c < 0 {
            return Err(format!("dup(A): {}", err()));
        }
        let mut p = [0i32; 2];
        if libc::pipe2(p.as_mut_ptr(), 0) != 0 {
            return Err(format!("pipe2: {}", err()));
        }
        let w2 = libc::dup(p[1]);
        if w2 < 0 {
            return Err(format!("dup(W): {}", err()));
        }
        (c, p[0], p[1], w2)
    };
    let d = open(DATA, libc::O_WRONLY | libc::O_APPEND)?;
    let e = open(
        &format!("/proc/self/fd/{r}"),
        libc::O_RDONLY | libc::O_NONBLOCK,
    )?;
    setfl(w, getfl(w) | libc::O_NONBLOCK)?;
    write_all(w, pipe_bytes)?;
    let cf = CString::new(FIFO).unwrap();
    // SAFETY: mkfifo of a C string.
    if unsafe { libc::mkfifo(cf.as_ptr(), 0o644) } != 0 {
        return Err(format!("mkfifo {FIFO}: {}", err()));
    }
    let fr = open(FIFO, libc::O_RDONLY | libc::O_NONBLOCK)?;
    setfl(fr, getfl(fr) & !libc::O_NONBLOCK)?;
    let fw = open(FIFO, libc::O_WRONLY)?;
    write_all(fw, fifo_bytes)?;
    Ok(Fds {
        a,
        b,
        c,
        d,
        r,
        e,
        w,
        w2,
        fr,
        fw,
    })
}

fn main() {
    let out = ck::out_path();
    let broken = ck::break_requested();
    let out_c = CString::new(out.as_os_str().as_encoded_bytes()).expect("--out without NUL");
    OUT_C.store(out_c.into_raw(), Ordering::SeqCst);
    if let Err(e) = ck::catch_sigterm() {
        setup_fail(&out, e);
    }
    let data = pattern(1, DATA_LEN);
    let pipe_bytes = pattern(2, PIPE_LEN);
    let fifo_bytes = pattern(3, FIFO_LEN);
    let f = match setup(&data, &pipe_bytes, &fifo_bytes) {
        Ok(f) => f,
        Err(e) => setup_fail(&out, e),
    };
    let named: Vec<(&str, i32)> = vec![
        ("A (data O_RDWR)", f.a),
        ("B (data O_RDONLY|O_NONBLOCK)", f.b),
        ("C (dup of A)", f.c),
        ("D (data O_WRONLY|O_APPEND)", f.d),
        ("R (pipe read end)", f.r),
        ("E (pipe read end reopened O_NONBLOCK)", f.e),
        ("W (pipe write end)", f.w),
        ("W2 (dup of W)", f.w2),
        ("FR (FIFO reader)", f.fr),
        ("FW (FIFO writer)", f.fw),
    ];
    let flags: Vec<i32> = named.iter().map(|&(_, fd)| getfl(fd)).collect();
    let offsets: Vec<(&str, i32, i64)> = vec![
        ("A", f.a, offset(f.a)),
        ("B", f.b, offset(f.b)),
        ("D", f.d, offset(f.d)),
    ];
    let mut bad: Vec<String> = Vec::new();
    // Sanity of the setup itself.
    for &(n, _, off) in &offsets {
        let want = match n {
            "A" => A_OFF,
            "B" => B_OFF,
            _ => 0,
        };
        if off != want {
            bad.push(format!("setup: offset of {n} is {off}, expected {want}"));
        }
    }
    if !bad.is_empty() {
        ck::finish(&out, &bad);
    }

    ck::report(&out, &format!("ready {}", std::process::id()));
    if broken {
        let _ = setfl(f.r, getfl(f.r) | libc::O_NONBLOCK);
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(10));
    }

    // Flags and offsets.
    for (&(n, fd), &want) in named.iter().zip(&flags) {
        let found = getfl(fd);
        if found != want {
            bad.push(format!(
                "fd {n}, fd {fd}: F_GETFL found {found:#x}, expected {want:#x}"
            ));
        }
    }
    for &(n, fd, want) in &offsets {
        let found = offset(fd);
        if found != want {
            bad.push(format!(
                "fd {n}, fd {fd}: offset found {found}, expected {want}"
            ));
        }
    }
    // Sharing.
    let pairs: [(&str, i32, i32, bool); 4] = [
        ("A and C", f.a, f.c, true),
        ("A and B", f.a, f.b, false),
        ("R and E", f.r, f.e, false),
        ("W and W2", f.w, f.w2, true),
    ];
    for (n, x, y, same) in pairs {
        match kcmp(x, y) {
            Err(e) => bad.push(e),
            Ok(r) if (r == 0) != same => bad.push(format!(
                "{n} (fds {x}, {y}): kcmp KCMP_FILE found {r}, expected {}",
                if same {
                    "0 (one open file description)"
                } else {
                    "nonzero (two open file descriptions)"
                }
            )),
            Ok(_) => {}
        }
    }
    if ino(f.r) != ino(f.e) {
        bad.push(format!(
            "R and E: not the same pipe (inodes {} and {})",
            ino(f.r),
            ino(f.e)
        ));
    }
    // lseek on A moves C.
    // SAFETY: lseek on our own fd.
    unsafe { libc::lseek(f.a, 4321, libc::SEEK_SET) };
    let c_now = offset(f.c);
    if c_now != 4321 {
        bad.push(format!(
            "A and C: after lseek(A, 4321) C's offset found {c_now}, expected 4321 (not one description)"
        ));
    }
    // SAFETY: as above.
    unsafe { libc::lseek(f.a, A_OFF, libc::SEEK_SET) };
    // The pipe: exactly its bytes, read via E (non-blocking).
    match fionread(f.e) {
        Err(e) => bad.push(e),
        Ok(n) if n as usize != PIPE_LEN => bad.push(format!(
            "pipe: FIONREAD found {n} bytes, expected {PIPE_LEN}"
        )),
        Ok(_) => {}
    }
    let mut buf = vec![0u8; PIPE_LEN + 1000];
    // SAFETY: read into a live buffer.
    let n = unsafe { libc::read(f.e, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        bad.push(format!("pipe: read via E: {}", err()));
    } else if n as usize != PIPE_LEN {
        bad.push(format!(
            "pipe: read via E got {n} bytes, expected {PIPE_LEN}"
        ));
    } else if let Some(i) = (0..PIPE_LEN).find(|&i| buf[i] != pipe_bytes[i]) {
        bad.push(format!(
            "pipe: byte {i} found {:#04x}, expected {:#04x}",
            buf[i], pipe_bytes[i]
        ));
    }
    // The FIFO: exactly its bytes, via the blocking FR under alarm(5).
    match fionread(f.fr) {
        Err(e) => bad.push(e),
        Ok(n) if n as usize != FIFO_LEN => bad.push(format!(
            "FIFO: FIONREAD found {n} bytes, expected {FIFO_LEN}"
        )),
        Ok(_) => {}
    }
    // SAFETY: the handler only writes with syscalls and _exits.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
        libc::alarm(5);
    }
    let mut fbuf = vec![0u8; FIFO_LEN];
    let mut got = 0;
    while got < FIFO_LEN {
        // SAFETY: read into a live buffer.
        let n = unsafe { libc::read(f.fr, fbuf[got..].as_mut_ptr().cast(), FIFO_LEN - got) };
        if n <= 0 {
            bad.push(format!(
                "FIFO: read via FR after {got} bytes: {}",
                if n == 0 {
                    "end of file".to_string()
                } else {
                    err().to_string()
                }
            ));
            break;
        }
        got += n as usize;
    }
    // SAFETY: cancels the alarm.
    unsafe { libc::alarm(0) };
    if got == FIFO_LEN {
        if let Some(i) = (0..FIFO_LEN).find(|&i| fbuf[i] != fifo_bytes[i]) {
            bad.push(format!(
                "FIFO: byte {i} found {:#04x}, expected {:#04x}",
                fbuf[i], fifo_bytes[i]
            ));
        }
        match fionread(f.fr) {
            Ok(0) => {}
            Ok(n) => bad.push(format!(
                "FIFO: {n} more bytes after its {FIFO_LEN}, expected none"
            )),
            Err(e) => bad.push(e),
        }
    }
    ck::finish(&out, &bad);
}
