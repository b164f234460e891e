//! `tern check`: functional probes of the kernel features tern relies on.
//! Each probe exercises the feature on a scratch object of tern's own (a page
//! of its memory, a short-lived child) rather than reading kernel config.

use crate::anon::AnonRegion;
use crate::pagemap_scan::{Pagemap, ScanQuery, entry};
use crate::uffd::{self, WpUffd};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Probes {
    pub uffd: bool,
    pub uffd_wp: bool,
    pub uffd_wp_async: bool,
    pub pagemap_scan: bool,
    pub soft_dirty: bool,
    pub ebpf_tracepoints: bool,
    /// The x86 page-fault tracepoints (absent on arm64: the stream then has
    /// address-space and thread events but no dirty pages).
    pub ebpf_fault_tracepoints: bool,
    pub pidfd_getfd: bool,
    pub suspend_seccomp: bool,
    pub clone3_set_tid: bool,
    pub rseq_config: bool,
}

/// What each feature is for, in `tern check`'s human output.
pub const USES: &[(&str, &str)] = &[
    ("uffd", "userfaultfd(2): write-protect tracking"),
    ("uffd_wp", "userfaultfd write-protect mode"),
    (
        "uffd_wp_async",
        "async write-protect: track writes without stopping the target (Linux 6.7+)",
    ),
    (
        "pagemap_scan",
        "PAGEMAP_SCAN: find written pages and re-protect them in one call (Linux 6.7+)",
    ),
    (
        "soft_dirty",
        "soft-dirty bits: the tracking backend of kernels 3.11-6.6 (x86 only)",
    ),
    (
        "ebpf_tracepoints",
        "eBPF on fault/syscall/sched tracepoints: dirty-rate telemetry, hot pages",
    ),
    (
        "ebpf_fault_tracepoints",
        "exceptions:page_fault_* tracepoints (x86): the eBPF dirty-page stream",
    ),
    (
        "pidfd_getfd",
        "pidfd_getfd(2): take the userfaultfd created inside the target",
    ),
    (
        "suspend_seccomp",
        "PTRACE_O_SUSPEND_SECCOMP: inject syscalls a target's seccomp filter blocks",
    ),
    (
        "clone3_set_tid",
        "clone3 set_tid: restore with the same PID and TIDs",
    ),
    (
        "rseq_config",
        "PTRACE_GET_RSEQ_CONFIGURATION: save rseq registrations",
    ),
];

impl Probes {
    /// Every probe.
    pub fn all() -> Probes {
        let mut p = Probes::tracking();
        p.ebpf_tracepoints = crate::ebpf::DirtyStream::probe().is_ok();
        p.ebpf_fault_tracepoints = p.ebpf_tracepoints
            && crate::ebpf::DirtyStream::fault_tracepoints_available().unwrap_or(false);
        p.suspend_seccomp = probe_ptrace_child(|pid| {
            let opts = libc::PTRACE_O_SUSPEND_SECCOMP as u64;
            sys::ptrace::plain(libc::PTRACE_SEIZE, pid, 0, opts).is_ok()
        });
        p.rseq_config = probe_ptrace_child(|pid| {
            if sys::ptrace::plain(libc::PTRACE_SEIZE, pid, 0, 0).is_err()
                || sys::ptrace::plain(libc::PTRACE_INTERRUPT, pid, 0, 0).is_err()
            {
                return false;
            }
            if nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::__WALL),
            )
            .is_err()
            {
                return false;
            }
            let mut conf = [0u64; 4];
            // PTRACE_GET_RSEQ_CONFIGURATION = 0x420f
            // SAFETY: the kernel writes at most `addr` = size_of_val(&conf)
            // bytes into `conf`, which we own.
            let r = unsafe {
                sys::ptrace::request(
                    0x420f,
                    pid,
                    std::mem::size_of_val(&conf) as u64,
                    conf.as_mut_ptr() as u64,
                )
            };
            r.is_ok_and(|n| n > 0)
        });
        p.clone3_set_tid = probe_clone3_set_tid();
        p
    }

    /// The probes that decide the tracking backend (fast, no children).
    pub fn tracking() -> Probes {
        let mut p = Probes::default();
        if let Ok(fd) = uffd::create_unhandshaken() {
            p.uffd = true;
            // With features 0, UFFDIO_API reports every feature it supports.
            if let Ok((_, features)) = sys::uffd::handshake(fd, &[0]) {
                p.uffd_wp = features & 1 != 0; // UFFD_FEATURE_PAGEFAULT_FLAG_WP
            }
        }
        p.pagemap_scan = probe_pagemap_scan();
        p.uffd_wp_async = p.uffd && p.pagemap_scan && probe_wp_async();
        p.soft_dirty = probe_soft_dirty();
        p.pidfd_getfd = probe_pidfd_getfd();
        p
    }

    /// The backend `--track auto` picks.
    pub fn best_backend(&self) -> crate::backend::TrackMode {
        use crate::backend::TrackMode;
        if self.uffd_wp_async && self.pagemap_scan && self.pidfd_getfd {
            TrackMode::UffdWp
        } else if self.soft_dirty {
            TrackMode::SoftDirty
        } else {
            TrackMode::Full
        }
    }

    pub fn as_pairs(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("uffd", self.uffd),
            ("uffd_wp", self.uffd_wp),
            ("uffd_wp_async", self.uffd_wp_async),
            ("pagemap_scan", self.pagemap_scan),
            ("soft_dirty", self.soft_dirty),
            ("ebpf_tracepoints", self.ebpf_tracepoints),
            ("ebpf_fault_tracepoints", self.ebpf_fault_tracepoints),
            ("pidfd_getfd", self.pidfd_getfd),
            ("suspend_seccomp", self.suspend_seccomp),
            ("clone3_set_tid", self.clone3_set_tid),
            ("rseq_config", self.rseq_config),
        ]
    }
}

fn own_pid() -> i32 {
    std::process::id() as i32
}

fn probe_pagemap_scan() -> bool {
    let Some(page) = AnonRegion::new(1) else {
        return false;
    };
    page.write(0, 0, 1);
    let Ok(mut pm) = Pagemap::open(own_pid()) else {
        return false;
    };
    let mut out = Vec::new();
    pm.scan(page.start(), page.end(), ScanQuery::POPULATED, &mut out)
        .is_ok()
        && out.len() == 1
}

/// Register a page for async WP, protect it, write it: the scan must say
/// written exactly once.
fn probe_wp_async() -> bool {
    let Ok(fd) = uffd::create_unhandshaken() else {
        return false;
    };
    let Ok(wp) = WpUffd::handshake(fd) else {
        return false;
    };
    let Some(page) = AnonRegion::new(1) else {
        return false;
    };
    page.write(0, 0, 1);
    if wp.register_wp(page.start(), page.end()).is_err() {
        return false;
    }
    let Ok(mut pm) = Pagemap::open(own_pid()) else {
        return false;
    };
    let mut out = Vec::new();
    let r = (|| {
        let range = (page.start(), page.end());
        pm.scan(range.0, range.1, ScanQuery::WRITTEN_AND_REPROTECT, &mut out)
            .ok()?;
        out.clear();
        pm.scan(range.0, range.1, ScanQuery::WRITTEN_AND_REPROTECT, &mut out)
            .ok()?;
        let clean = out.is_empty();
        page.write(0, 0, 2);
        pm.scan(range.0, range.1, ScanQuery::WRITTEN_AND_REPROTECT, &mut out)
            .ok()?;
        Some(clean && out.len() == 1)
    })()
    .unwrap_or(false);
    let _ = wp.unregister(page.start(), page.end());
    r
}

/// Clear our soft-dirty bits, then write a page: bit 55 must come back.
fn probe_soft_dirty() -> bool {
    let Some(page) = AnonRegion::new(1) else {
        return false;
    };
    page.write(0, 0, 1);
    let Ok(pm) = Pagemap::open(own_pid()) else {
        return false;
    };
    if crate::backend::clear_soft_dirty(own_pid()).is_err() {
        return false;
    }
    let mut e = Vec::new();
    if pm.read_entries(page.start(), page.end(), &mut e).is_err() || e.len() != 1 {
        return false;
    }
    let cleared = e[0] & entry::SOFT_DIRTY == 0;
    page.write(0, 0, 2);
    e.clear();
    if pm.read_entries(page.start(), page.end(), &mut e).is_err() || e.len() != 1 {
        return false;
    }
    cleared && e[0] & entry::SOFT_DIRTY != 0
}

fn probe_pidfd_getfd() -> bool {
    let Ok(pidfd) = uffd::pidfd_open(own_pid()) else {
        return false;
    };
    uffd::pidfd_getfd(&pidfd, own_pid(), 0).is_ok()
        || uffd::pidfd_getfd(&pidfd, own_pid(), 2).is_ok()
}

/// Run `f` on a forked child that sleeps, then kill and reap the child.
fn probe_ptrace_child(f: impl FnOnce(i32) -> bool) -> bool {
    use nix::unistd::ForkResult;
    // SAFETY: the child only calls pause(2), async-signal-safe, until we
    // kill it.
    let pid = match unsafe { nix::unistd::fork() } {
        Err(_) => return false,
        Ok(ForkResult::Child) => loop {
            nix::unistd::pause();
        },
        Ok(ForkResult::Parent { child }) => child,
    };
    let ok = f(pid.as_raw());
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WALL));
    ok
}

use sys::clone::CloneArgs;

/// Create a child with a chosen, currently free PID. The candidates start
/// a little past the last PID handed out and wrap around below it (PIDs
/// wrap at pid_max, past the 300 the kernel reserves), and a PID another
/// process takes meanwhile (EEXIST) moves on to the next one: the probe
/// says whether the kernel honours set_tid, not whether a PID race was won.
fn probe_clone3_set_tid() -> bool {
    let last: i32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1000);
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let start = (last + 500).clamp(301, max - 1);
    let candidates = (start..max).chain(301..start);
    let free = candidates.filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists());
    for want in free.take(20) {
        match clone_with_pid(want) {
            Ok(got) => return got == want,
            Err(libc::EEXIST) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// clone3 a child that exits at once, asking for PID `want`; the PID it
/// got, or the errno.
fn clone_with_pid(want: i32) -> Result<i32, i32> {
    let tid = [want as libc::pid_t];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: fork-like clone3 (no CLONE_VM); the child exits at once.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r == 0 {
        // SAFETY: the child only exits.
        unsafe { libc::_exit(0) };
    }
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    let child = i32::try_from(r).map_err(|_| libc::EINVAL)?;
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
    Ok(child)
}

/// The kernel release, from uname(2).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On our machines (Linux 6.18, no CONFIG_MEM_SOFT_DIRTY) the probes must
    /// say exactly this; other machines run this in the VM lanes.
    #[test]
    fn probes_are_truthful_here() {
        let p = Probes::tracking();
        assert!(
            p.uffd && p.uffd_wp && p.uffd_wp_async && p.pagemap_scan && p.pidfd_getfd,
            "{p:?}"
        );
        assert!(!p.soft_dirty, "this kernel has no soft-dirty: {p:?}");
        assert_eq!(p.best_backend(), crate::backend::TrackMode::UffdWp);
    }
}
