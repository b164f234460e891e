//! Self-checking workload for credentials and the files a restore opens
//! for a process (see `ck.rs` for the protocol).
//!
//! `ck_creds --out FILE [--mode user|root-less-caps]`:
//! - sets up fd 10 on `data` (in its working directory, mode 0644) and
//!   points fds 1 and 2 at /dev/null (a restore must open every fd as the
//!   process's user could, and a harness's output files are root's);
//! - `user` (default): drops to uid and gid 1001, no groups, so no
//!   capabilities left;
//! - `root-less-caps`: stays uid 0 but drops `cap_sys_admin` and
//!   `cap_sys_nice` from its bounding, permitted, effective and
//!   inheritable sets (a daemon that shed privileges: a restore must not
//!   give them back);
//! - records its ids, groups, capability sets and no_new_privs from
//!   /proc/self/status, reports `ready`, and on SIGTERM checks them again,
//!   and that fd 10 is still `data` with its bytes.

use std::time::Duration;

use tern_tests::ck;

const DATA_FD: i32 = 10;
const DATA: &[u8] = b"tern ck_creds data\n";
pub const USER: u32 = 1001;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_NICE: u32 = 23;

fn die(msg: &str) -> ! {
    eprintln!("ck_creds: setup failed: {msg}");
    std::process::exit(3);
}

/// The credential lines of /proc/self/status.
fn creds() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| {
            [
                "Uid:",
                "Gid:",
                "Groups:",
                "CapInh:",
                "CapPrm:",
                "CapEff:",
                "CapBnd:",
                "CapAmb:",
                "NoNewPrivs:",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

fn drop_caps(caps: &[u32]) -> Result<(), String> {
    // SAFETY: prctl/capget/capset on this process with local structs.
    unsafe {
        for &c in caps {
            if libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(format!(
                    "PR_CAPBSET_DROP {c}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        let mut hdr = [0x2008_0522u32, 0];
        let mut data = [0u32; 6];
        if libc::syscall(libc::SYS_capget, hdr.as_mut_ptr(), data.as_mut_ptr()) != 0 {
            return Err(format!("capget: {}", std::io::Error::last_os_error()));
        }
        for &c in caps {
            let (w, b) = ((c / 32) as usize, 1u32 << (c % 32));
            for set in 0..3 {
                data[w * 3 + set] &= !b;
            }
        }
        if libc::syscall(libc::SYS_capset, hdr.as_mut_ptr(), data.as_ptr()) != 0 {
            return Err(format!("capset: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn setup(mode: &str) -> Result<(), String> {
    std::fs::write("data", DATA).map_err(|e| format!("data: {e}"))?;
    // SAFETY: plain fd syscalls on our own fds and local C strings.
    unsafe {
        let fd = libc::open(c"data".as_ptr(), libc::O_RDONLY);
        if fd < 0 || libc::dup2(fd, DATA_FD) != DATA_FD {
            return Err(format!("fd {DATA_FD}: {}", std::io::Error::last_os_error()));
        }
        libc::close(fd);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null < 0 || libc::dup2(null, 1) != 1 || libc::dup2(null, 2) != 2 {
            return Err(format!("/dev/null: {}", std::io::Error::last_os_error()));
        }
        libc::close(null);
    }
    match mode {
        "user" => {
            // Raw syscalls: one thread, and glibc's broadcast is not needed.
            // SAFETY: id-changing syscalls with plain arguments.
            unsafe {
                if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                    || libc::syscall(libc::SYS_setresgid, USER, USER, USER) != 0
                    || libc::syscall(libc::SYS_setresuid, USER, USER, USER) != 0
                {
                    return Err(format!(
                        "dropping to {USER}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            Ok(())
        }
        "root-less-caps" => drop_caps(&[CAP_SYS_ADMIN, CAP_SYS_NICE]),
        other => Err(format!("unknown --mode {other}")),
    }
}

fn check(recorded: &[String], data_link: &str) -> Vec<String> {
    let mut fails = Vec::new();
    let now = creds();
    if now != recorded {
        fails.push(format!("credentials {now:?}, expected {recorded:?}"));
    }
    match std::fs::read_link(format!("/proc/self/fd/{DATA_FD}")) {
        Ok(l) if l.to_string_lossy() == data_link => {}
        other => fails.push(format!("fd {DATA_FD} is {other:?}, expected {data_link}")),
    }
    let mut buf = vec![0u8; 64];
    // SAFETY: pread into a local buffer.
    let n = unsafe { libc::pread(DATA_FD, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 || &buf[..n as usize] != DATA {
        fails.push(format!(
            "fd {DATA_FD} reads {:?}",
            String::from_utf8_lossy(&buf[..n.max(0) as usize])
        ));
    }
    fails
}

fn main() {
    let out = ck::out_path();
    let args: Vec<String> = std::env::args().collect();
    let mode = args
        .iter()
        .position(|a| a == "--mode")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("user")
        .to_string();
    ck::catch_sigterm().unwrap_or_else(|e| die(&e));
    setup(&mode).unwrap_or_else(|e| die(&e));
    let data_link = std::fs::read_link(format!("/proc/self/fd/{DATA_FD}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| die(&format!("fd {DATA_FD}: {e}")));
    let recorded = creds();
    ck::report(&out, &format!("ready {}", std::process::id()));
    if ck::break_requested() {
        // As a restore that reopened fd 10 on another file would leave it.
        // SAFETY: dup2 over our own fd.
        unsafe { libc::dup2(1, DATA_FD) };
    }
    while !ck::terminated() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let fails = check(&recorded, &data_link);
    ck::finish(&out, &fails)
}
