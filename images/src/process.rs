//! `process.json`: everything a final dump captures besides memory — threads
//! and their registers, signals, seccomp, rseq, credentials, mm fields, the
//! vDSO's placement, limits, the fd table — and `pipes/INODE.bin`, the bytes
//! queued in the process's pipes. Written before the inventory (which is
//! written last and marks the image complete).
//!
//! The kernel-facing parts (register sets, siginfo, filters, ...) are the
//! image's own state types ([`crate::state`]), converted to and from the
//! `sys` crate's live types where capture and restore meet the kernel.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ImageError;
use crate::state::{
    AltStackState, FdKindState, FdState, PendingSignalState, RegsState, RseqState, SchedState,
    SeccompFilterState, SigActionState, VdsoState,
};

pub const PROCESS_FILE: &str = "process.json";
pub const PIPES_DIR: &str = "pipes";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProcessImage {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    /// /proc/PID/exe at dump time.
    pub exe: String,
    /// A deleted executable (` (deleted)` ends `exe`): its (device, inode),
    /// one of [`ProcessImage::unlinked_files`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_unlinked: Option<(u64, u64)>,
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub personality: u64,
    /// PR_GET_DUMPABLE (a uid change resets it).
    #[serde(default)]
    pub dumpable: Option<u32>,
    /// PR_GET_THP_DISABLE when not 0: 1 (THP off), 3 (off except where
    /// MADV_HUGEPAGE asks for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thp_disable: Option<u32>,
    /// PR_GET_MEMORY_MERGE: KSM for every VMA (PR_SET_MEMORY_MERGE).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_merge: bool,
    /// /proc/PID/oom_score_adj (-1000..=1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    /// /proc/PID/coredump_filter (which mappings a core dump holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coredump_filter: Option<u32>,
    pub creds: Creds,
    pub mm: MmState,
    pub vdso: VdsoState,
    /// Signals 1..=64 except SIGKILL and SIGSTOP.
    pub sigactions: Vec<SigActionState>,
    /// The process-wide (shared) pending queue, in order.
    pub shared_pending: Vec<PendingSignalState>,
    pub itimers: Vec<ITimer>,
    /// Its POSIX timers (`timer_create`), each to be made again with its ID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub posix_timers: Vec<PosixTimerState>,
    pub rlimits: Vec<Rlimit>,
    /// Distinct seccomp filters; threads refer to them by index.
    pub seccomp_filters: Vec<SeccompFilterState>,
    pub threads: Vec<ThreadImage>,
    pub fds: Vec<FdImage>,
    /// Files no path reaches (memfds, files deleted while open or mapped)
    /// that its fds or VMAs refer to, each with its contents in `pipes/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unlinked_files: Vec<UnlinkedFileState>,
}

/// A memfd or a file deleted while open or mapped: fds (`FdKindState::File`
/// with `deleted`) and VMAs (a name ending in ` (deleted)`) refer to it by
/// its device and inode, as the dump saw them; a restore makes a new one
/// with these contents.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct UnlinkedFileState {
    pub dev: u64,
    pub ino: u64,
    /// A memfd: its name (what `memfd_create` was given). Else the path it
    /// had, without ` (deleted)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memfd: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    pub size: u64,
    /// Permission bits (setuid and setgid kept only for an image root wrote).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A memfd's seals (F_GET_SEALS), added once the restore is done.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seals: u32,
    /// The file under `pipes/` holding its data runs, one after the other.
    pub data: String,
    /// (offset, length) of each run of data, in order; the rest are holes.
    pub extents: Vec<(u64, u64)>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl UnlinkedFileState {
    /// Fill `buf` with the file's bytes at `offset`, from `data` (its
    /// runs, as stored): holes and what lies past its end read as zeros.
    pub fn read_at(&self, data: &[u8], offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        let mut at = 0u64;
        for &(off, len) in &self.extents {
            let (a, b) = (off.max(offset), (off + len).min(end));
            if a < b {
                let from = usize::try_from(at + (a - off)).unwrap_or(usize::MAX);
                let n = usize::try_from(b - a).unwrap_or(usize::MAX);
                let to = usize::try_from(a - offset).unwrap_or(usize::MAX);
                if let Some(src) = data.get(from..from.saturating_add(n)) {
                    buf[to..to + n].copy_from_slice(src);
                }
            }
            at += len;
        }
    }

    /// How the file is named in messages.
    pub fn describe(&self) -> String {
        match &self.memfd {
            Some(n) => format!("memfd:{n}"),
            None => format!("{} (deleted)", self.path),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ThreadImage {
    pub tid: i32,
    pub comm: String,
    pub regs: RegsState,
    pub blocked: u64,
    /// The thread's private pending queue, in order.
    pub pending: Vec<PendingSignalState>,
    pub altstack: AltStackState,
    pub rseq: Option<RseqState>,
    /// 0 disabled, 1 strict, 2 filter.
    pub seccomp_mode: u8,
    /// Indices into [`ProcessImage::seccomp_filters`], oldest first.
    pub seccomp: Vec<usize>,
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_list_len: u64,
    /// Policy, nice, priority, CPU affinity, I/O priority (absent in
    /// images of older terns: the thread keeps what the restore gives it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sched: Option<SchedState>,
}

/// Fields of the kernel's `mm_struct` a restore sets with `PR_SET_MM_MAP`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct MmState {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// /proc/PID/auxv as (type, value) words, up to and including AT_NULL.
    pub auxv: Vec<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ITimer {
    /// ITIMER_REAL 0, ITIMER_VIRTUAL 1, ITIMER_PROF 2
    pub which: i32,
    pub interval_us: u64,
    pub value_us: u64,
}

/// A POSIX timer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PosixTimerState {
    pub id: i32,
    pub clockid: i32,
    pub signo: i32,
    pub sigev_value: u64,
    /// `none`, `signal` (to the process) or `thread` (to `tid`).
    pub notify: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<i32>,
    /// Time left to its next expiry (zero: disarmed) and its interval.
    pub value_ns: u64,
    pub interval_ns: u64,
    /// `timer_getoverrun` at the dump: the overrun of its last signal
    /// (kept for the record; the kernel has no call to set it).
    pub overrun: i32,
}

impl PosixTimerState {
    /// Where its expiry goes, as `timer_create` takes it.
    pub fn notify(&self) -> Option<sys::posix_timers::Notify> {
        use sys::posix_timers::Notify;
        match (self.notify.as_str(), self.tid) {
            ("none", None) => Some(Notify::None),
            ("signal", None) => Some(Notify::Signal),
            ("thread", Some(t)) => Some(Notify::Thread(t)),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FdImage {
    pub info: FdState,
    /// For a pipe: the file under `pipes/` holding its queued bytes (one per
    /// pipe, shared by all its fds).
    pub pipe_data: Option<String>,
    /// For a pipe: its capacity (F_GETPIPE_SZ).
    #[serde(default)]
    pub pipe_capacity: Option<u64>,
    /// The lowest fd sharing this fd's open file description (a dup): the
    /// restore dups that one instead of opening the file again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_as: Option<i32>,
}

/// Bounds of what a process image may hold (the kernel's own limits).
const MAX_THREADS: usize = 1 << 22;
const MAX_FD: i32 = 1 << 30;
const MAX_GROUPS: usize = 65536;
const BPF_MAXINSNS: usize = 4096;
const RLIM_NLIMITS: u32 = 16;
/// `struct siginfo` is 128 bytes on every architecture tern supports.
const SIGINFO_LEN: usize = 128;

/// Whether `name` may name a file under `pipes/`.
pub fn valid_pipe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

impl ProcessImage {
    /// The files under `pipes/` this state names: queued bytes of pipes
    /// and sockets, and unlinked files' data.
    pub fn blob_names(&self) -> std::collections::BTreeSet<&String> {
        self.fds
            .iter()
            .filter_map(|f| f.pipe_data.as_ref())
            .chain(self.unlinked_files.iter().map(|u| &u.data))
            .collect()
    }

    /// The memfd or deleted file of this (device, inode).
    pub fn unlinked_file(&self, key: (u64, u64)) -> Option<&UnlinkedFileState> {
        self.unlinked_files.iter().find(|u| (u.dev, u.ino) == key)
    }

    /// Parse and check the bytes of `process.json` (`path` names it in
    /// errors): everything a restore will hand to the kernel must be in the
    /// kernel's own bounds, so that a damaged image is refused before any
    /// process exists.
    pub fn parse(path: &Path, text: &[u8]) -> Result<ProcessImage, ImageError> {
        let p: ProcessImage = serde_json::from_slice(text)
            .map_err(|e| ImageError::corrupt(path, format!("bad process state: {e}")))?;
        p.validate()
            .map_err(|what| ImageError::corrupt(path, what))?;
        Ok(p)
    }

    /// What is wrong with this process state, if anything.
    pub fn validate(&self) -> Result<(), String> {
        let p = self;
        if p.threads.is_empty() {
            return Err("no threads".into());
        }
        if p.threads.len() > MAX_THREADS {
            return Err(format!("{} threads", p.threads.len()));
        }
        if p.pid <= 0 {
            return Err(format!("PID {}", p.pid));
        }
        let mut tids = BTreeSet::new();
        for t in &p.threads {
            if t.tid <= 0 || !tids.insert(t.tid) {
                return Err(format!("thread {} is not a valid or unique TID", t.tid));
            }
            if let Some(&bad) = t.seccomp.iter().find(|&&i| i >= p.seccomp_filters.len()) {
                return Err(format!(
                    "thread {} refers to seccomp filter {bad}, which is not in the image",
                    t.tid
                ));
            }
            if t.seccomp_mode > 2 || (t.seccomp_mode != 2 && !t.seccomp.is_empty()) {
                return Err(format!("thread {}: seccomp mode {}", t.tid, t.seccomp_mode));
            }
            sys::regs::ThreadRegs::from(t.regs.clone())
                .validate()
                .map_err(|e| format!("thread {}: {e}", t.tid))?;
            for s in &t.pending {
                check_signal(s)?;
            }
            if let Some(r) = &t.rseq
                && (r.abi_size < 32 || r.abi_size > 4096)
            {
                return Err(format!(
                    "thread {}: rseq area of {} bytes",
                    t.tid, r.abi_size
                ));
            }
            if t.comm.len() > 64 || t.comm.contains('\0') {
                return Err(format!("thread {}: bad name", t.tid));
            }
        }
        if !tids.contains(&p.pid) {
            return Err(format!(
                "the main thread {} is not among the threads",
                p.pid
            ));
        }
        for f in &p.seccomp_filters {
            if f.insns.is_empty() || f.insns.len() > BPF_MAXINSNS {
                return Err(format!(
                    "a seccomp filter of {} instructions",
                    f.insns.len()
                ));
            }
        }
        for s in &p.shared_pending {
            check_signal(s)?;
        }
        let mut signos = BTreeSet::new();
        for a in &p.sigactions {
            if !(1..=64).contains(&a.signo) || !signos.insert(a.signo) {
                return Err(format!("signal action for signal {}", a.signo));
            }
        }
        for t in &p.itimers {
            if !(0..=2).contains(&t.which) {
                return Err(format!("interval timer {}", t.which));
            }
            if t.interval_us / 1_000_000 > i64::MAX as u64 / 2
                || t.value_us / 1_000_000 > i64::MAX as u64 / 2
            {
                return Err(format!("interval timer {}: out of range", t.which));
            }
        }
        let mut res = BTreeSet::new();
        for l in &p.rlimits {
            if l.resource >= RLIM_NLIMITS || !res.insert(l.resource) || l.cur > l.max {
                return Err(format!(
                    "resource limit {} ({} / {})",
                    l.resource, l.cur, l.max
                ));
            }
        }
        let mut fds = BTreeSet::new();
        for f in &p.fds {
            if f.info.fd < 0 || f.info.fd >= MAX_FD || !fds.insert(f.info.fd) {
                return Err(format!(
                    "fd {} is not a valid or unique fd number",
                    f.info.fd
                ));
            }
            if let Some(s) = f.same_as
                && !(s < f.info.fd && fds.contains(&s))
            {
                return Err(format!(
                    "fd {} shares the description of fd {s}, which is not an earlier fd of the image",
                    f.info.fd
                ));
            }
            if let Some(name) = &f.pipe_data
                && !valid_pipe_name(name)
            {
                return Err(format!("fd {}: pipe data name {name:?}", f.info.fd));
            }
            if f.pipe_capacity
                .is_some_and(|c| c > crate::fsdir::MAX_PIPE_BYTES)
            {
                return Err(format!(
                    "fd {}: pipe capacity {:?}",
                    f.info.fd, f.pipe_capacity
                ));
            }
        }
        for f in &p.fds {
            check_event_fd(f, &fds, &p.creds)?;
            check_unix_socket(f, &p.fds)?;
            check_inet_socket(f, &p.creds)?;
        }
        check_unlinked_files(p)?;
        if let Some(k) = p.exe_unlinked
            && (p.unlinked_file(k).is_none() || !p.exe.ends_with(" (deleted)"))
        {
            return Err(format!(
                "the executable {} is a deleted file whose contents are not in the image",
                p.exe
            ));
        }
        let mut ids = BTreeSet::new();
        for t in &p.posix_timers {
            check_posix_timer(t, &p.threads, &p.creds)?;
            if !ids.insert(t.id) {
                return Err(format!("POSIX timer {} listed twice", t.id));
            }
        }
        if p.thp_disable.is_some_and(|t| t != 1 && t != 3) {
            return Err(format!("THP disable value {:?}", p.thp_disable));
        }
        if p.umask > 0o777 {
            return Err(format!("umask {:o}", p.umask));
        }
        if p.personality > u32::MAX as u64 {
            return Err(format!("personality {:#x}", p.personality));
        }
        if p.creds.groups.len() > MAX_GROUPS {
            return Err(format!("{} supplementary groups", p.creds.groups.len()));
        }
        let a = &p.mm.auxv;
        if !a.len().is_multiple_of(2) || a.len() > 256 || a.len() < 2 || a[a.len() - 2] != 0 {
            return Err(format!(
                "auxiliary vector of {} words, not (type, value) pairs ending with AT_NULL",
                a.len()
            ));
        }
        for (what, path) in [("cwd", &p.cwd), ("root", &p.root), ("exe", &p.exe)] {
            if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
                return Err(format!("{what} {path:?} is not an absolute path"));
            }
        }
        Ok(())
    }
}

/// Each unlinked file is one the kernel could make (a memfd name it takes,
/// an absolute path, known seals, data runs in order within its size and
/// of at most what `pipes/` holds), listed once. (That every deleted fd
/// has one is the restore's to check: older images hold such fds without.)
fn check_unlinked_files(p: &ProcessImage) -> Result<(), String> {
    let mut keys = BTreeSet::new();
    for u in &p.unlinked_files {
        let what = u.describe();
        if !keys.insert((u.dev, u.ino)) {
            return Err(format!("unlinked file {what} listed twice"));
        }
        match &u.memfd {
            Some(n) if n.len() > sys::unlinked_files::MEMFD_NAME_MAX || n.contains('\0') => {
                return Err(format!("memfd name {n:?}"));
            }
            Some(_) if !u.path.is_empty() => {
                return Err(format!("{what}: both a memfd and a path"));
            }
            None if !u.path.starts_with('/') || u.path.contains('\0') || u.path.len() > 4096 => {
                return Err(format!("unlinked file {:?}: not an absolute path", u.path));
            }
            _ => {}
        }
        if u.size > i64::MAX as u64 || u.mode > 0o7777 {
            return Err(format!("{what}: size {} / mode {:o}", u.size, u.mode));
        }
        if u.seals & !sys::unlinked_files::ALL_SEALS != 0 || (u.seals != 0 && u.memfd.is_none()) {
            return Err(format!("{what}: seals {:#x}", u.seals));
        }
        if !valid_pipe_name(&u.data) {
            return Err(format!("{what}: data name {:?}", u.data));
        }
        let mut end = 0u64;
        let mut bytes = 0u64;
        for &(off, len) in &u.extents {
            if off < end || len == 0 || off.checked_add(len).is_none_or(|e| e > u.size) {
                return Err(format!("{what}: data run {off}+{len}"));
            }
            end = off + len;
            bytes += len;
        }
        if bytes > crate::fsdir::MAX_PIPE_BYTES {
            return Err(format!("{what}: {bytes} bytes of data"));
        }
    }
    Ok(())
}

/// CAP_WAKE_ALARM, CAP_BLOCK_SUSPEND (include/uapi/linux/capability.h).
const CAP_WAKE_ALARM: u32 = 35;
const CAP_BLOCK_SUSPEND: u32 = 36;
/// Registrations one epoll may hold in an image (the kernel's own limit,
/// max_user_watches, is a few million on large hosts).
const MAX_EPOLL_TARGETS: usize = 1 << 20;
/// A timerfd's time as a `struct timespec` can hold it.
const MAX_TIMER_NS: u64 = i64::MAX as u64;

/// An eventfd, epoll, timerfd or signalfd that the kernel would refuse, or
/// that would give the process what it could not have had: an alarm clock
/// or EPOLLWAKEUP without the capability they need.
fn check_event_fd(f: &FdImage, fds: &BTreeSet<i32>, creds: &Creds) -> Result<(), String> {
    use sys::event_fds as ev;
    let fd = f.info.fd;
    let has_cap = |c: u32| creds.cap_eff & (1u64 << c) != 0;
    match &f.info.kind {
        FdKindState::EventFd { count, .. } if *count == u64::MAX => Err(format!(
            "eventfd {fd}: counter {count:#x} above the kernel's maximum"
        )),
        FdKindState::TimerFd {
            clockid,
            settime_flags,
            value_ns,
            interval_ns,
            realtime_deadline_ns,
            ..
        } => {
            if !ev::TIMERFD_CLOCKS.contains(clockid) {
                return Err(format!("timerfd {fd}: clock {clockid}"));
            }
            if ev::ALARM_CLOCKS.contains(clockid) && !has_cap(CAP_WAKE_ALARM) {
                return Err(format!(
                    "timerfd {fd}: an alarm clock ({clockid}) for a process without CAP_WAKE_ALARM"
                ));
            }
            let known = ev::TFD_TIMER_ABSTIME | ev::TFD_TIMER_CANCEL_ON_SET;
            if settime_flags & !known != 0
                || (settime_flags & ev::TFD_TIMER_CANCEL_ON_SET != 0
                    && (settime_flags & ev::TFD_TIMER_ABSTIME == 0 || ![0, 8].contains(clockid)))
            {
                return Err(format!("timerfd {fd}: settime flags {settime_flags:#o}"));
            }
            if *value_ns > MAX_TIMER_NS
                || *interval_ns > MAX_TIMER_NS
                || realtime_deadline_ns.is_some_and(|d| d > MAX_TIMER_NS)
            {
                return Err(format!("timerfd {fd}: time out of range"));
            }
            if realtime_deadline_ns.is_some()
                && (settime_flags & ev::TFD_TIMER_ABSTIME == 0
                    || !ev::REALTIME_CLOCKS.contains(clockid))
            {
                return Err(format!(
                    "timerfd {fd}: a deadline for a timer that is not absolute on a REALTIME clock"
                ));
            }
            Ok(())
        }
        FdKindState::Epoll { targets } => {
            if targets.len() > MAX_EPOLL_TARGETS {
                return Err(format!("epoll {fd}: {} registrations", targets.len()));
            }
            let input = ev::EPOLLET | ev::EPOLLONESHOT | ev::EPOLLEXCLUSIVE | ev::EPOLLWAKEUP;
            // EPOLLIN..EPOLLRDHUP and EPOLLMSG (bits 0-13) and the input flags.
            let known = 0x3fff | input;
            for t in targets {
                if t.tfd == fd || !fds.contains(&t.tfd) {
                    return Err(format!(
                        "epoll {fd}: registered fd {} is not another fd of the image",
                        t.tfd
                    ));
                }
                if t.events & !known != 0 {
                    return Err(format!(
                        "epoll {fd}: events {:#x} for fd {}",
                        t.events, t.tfd
                    ));
                }
                if t.events & ev::EPOLLWAKEUP != 0 && !has_cap(CAP_BLOCK_SUSPEND) {
                    return Err(format!(
                        "epoll {fd}: EPOLLWAKEUP on fd {} for a process without CAP_BLOCK_SUSPEND",
                        t.tfd
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A unix socket whose peer is not the other end of a pair in the image,
/// or of a type or shutdown state that does not exist.
fn check_unix_socket(f: &FdImage, all: &[FdImage]) -> Result<(), String> {
    let FdKindState::UnixSocket {
        ino,
        peer,
        sock_type,
        shutdown,
        name,
        listen,
        file,
    } = &f.info.kind
    else {
        return Ok(());
    };
    let fd = f.info.fd;
    if ![1, 2, 5].contains(sock_type) || *shutdown > 3 || ino == peer {
        return Err(format!(
            "unix socket fd {fd}: type {sock_type}, shutdown {shutdown}, peer {peer}"
        ));
    }
    if let Some(n) = name {
        let path = n.first() != Some(&0);
        if n.is_empty()
            || n.len() > sys::unix_sockets::MAX_NAME
            || (path && (n[0] != b'/' || n.contains(&0)))
        {
            return Err(format!(
                "unix socket fd {fd}: name {:?} (an absolute path or an abstract name)",
                String::from_utf8_lossy(n)
            ));
        }
        if file.is_some() != (path && *peer == 0) || file.is_some_and(|f| f.mode > 0o7777) {
            return Err(format!("unix socket fd {fd}: its socket file {file:?}"));
        }
    } else if file.is_some() {
        return Err(format!("unix socket fd {fd}: a socket file without a name"));
    }
    if *peer == 0 {
        // No peer: a listener (named, not datagram), or a socket bound or
        // not.
        let ok = match (name, listen) {
            (Some(_), Some(_)) => *sock_type != 2,
            (None, Some(_)) => false,
            (_, None) => true,
        };
        if !ok || f.pipe_data.is_some() {
            return Err(format!(
                "unix socket fd {fd}: unconnected, type {sock_type}, named {}, listening {listen:?}, data queued {}",
                name.is_some(),
                f.pipe_data.is_some()
            ));
        }
        return Ok(());
    }
    if listen.is_some() {
        return Err(format!("unix socket fd {fd}: connected and listening"));
    }
    // An unnamed datagram socket connected to a bound, unconnected one;
    // nothing can be queued to it (its peer cannot address it).
    let server = all.iter().any(|g| {
        matches!(&g.info.kind, FdKindState::UnixSocket { ino: i, peer: 0, sock_type: 2, name: Some(_), .. } if i == peer)
    });
    if server && *sock_type == 2 {
        if name.is_some() || f.pipe_data.is_some() {
            return Err(format!(
                "unix socket fd {fd}: a datagram socket connected to a bound one, named or with data queued"
            ));
        }
        return Ok(());
    }
    let other = all.iter().find_map(|g| match &g.info.kind {
        FdKindState::UnixSocket {
            ino: i,
            peer: p,
            sock_type: t,
            name: n,
            ..
        } if i == peer && p == ino && t == sock_type => Some(n),
        _ => None,
    });
    let Some(other_name) = other else {
        return Err(format!(
            "unix socket fd {fd}: its peer socket:[{peer}] is not the other end of a pair in the image"
        ));
    };
    // An accepted connection (named as its listener) has a client end
    // with no name, and that listener is in the image.
    if let Some(n) = name {
        let listener = all.iter().any(|g| {
            matches!(&g.info.kind, FdKindState::UnixSocket { name: Some(m), listen: Some(_), .. } if m == n)
        });
        if other_name.is_some() || !listener || *sock_type == 2 {
            return Err(format!(
                "unix socket fd {fd}: connected under the name of no listener of the image"
            ));
        }
    }
    Ok(())
}

/// CAP_NET_BIND_SERVICE (include/uapi/linux/capability.h).
const CAP_NET_BIND_SERVICE: u32 = 10;

/// A TCP/UDP socket of a family, protocol or address that does not exist,
/// or bound to a privileged port by a process without the capability.
fn check_inet_socket(f: &FdImage, creds: &Creds) -> Result<(), String> {
    let FdKindState::InetSocket {
        family,
        protocol,
        addr,
        listen,
        ..
    } = &f.info.kind
    else {
        return Ok(());
    };
    let fd = f.info.fd;
    let a: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| format!("socket fd {fd}: address {addr:?}"))?;
    if !matches!(
        (family, a),
        (2, std::net::SocketAddr::V4(_)) | (10, std::net::SocketAddr::V6(_))
    ) || ![6, 17].contains(protocol)
        || (listen.is_some() && *protocol != 6)
        || listen.is_some_and(|b| b > 65535)
    {
        return Err(format!(
            "socket fd {fd}: family {family}, protocol {protocol}, {addr}, listen {listen:?}"
        ));
    }
    // The unprivileged port floor's default (net.ipv4.ip_unprivileged_port_start).
    if a.port() != 0 && a.port() < 1024 && creds.cap_eff & (1u64 << CAP_NET_BIND_SERVICE) == 0 {
        return Err(format!(
            "socket fd {fd}: bound to port {} by a process without CAP_NET_BIND_SERVICE",
            a.port()
        ));
    }
    Ok(())
}

/// A POSIX timer the kernel would refuse, or that would give the process
/// what it could not have had (an alarm clock without CAP_WAKE_ALARM, a
/// signal to a thread that is not its own).
fn check_posix_timer(
    t: &PosixTimerState,
    threads: &[ThreadImage],
    creds: &Creds,
) -> Result<(), String> {
    use sys::posix_timers::{Notify, TIMER_CLOCKS};
    let id = t.id;
    if id < 0 {
        return Err(format!("POSIX timer {id}"));
    }
    if !TIMER_CLOCKS.contains(&t.clockid) {
        return Err(format!("POSIX timer {id}: clock {}", t.clockid));
    }
    if sys::event_fds::ALARM_CLOCKS.contains(&t.clockid)
        && creds.cap_eff & (1u64 << CAP_WAKE_ALARM) == 0
    {
        return Err(format!(
            "POSIX timer {id}: an alarm clock ({}) for a process without CAP_WAKE_ALARM",
            t.clockid
        ));
    }
    let notify = t
        .notify()
        .ok_or_else(|| format!("POSIX timer {id}: notify {:?} {:?}", t.notify, t.tid))?;
    if notify != Notify::None && !(1..=64).contains(&t.signo) {
        return Err(format!("POSIX timer {id}: signal {}", t.signo));
    }
    if let Notify::Thread(tid) = notify
        && !threads.iter().any(|th| th.tid == tid)
    {
        return Err(format!(
            "POSIX timer {id}: signals thread {tid}, which is not a thread of the process"
        ));
    }
    if t.value_ns > MAX_TIMER_NS || t.interval_ns > MAX_TIMER_NS {
        return Err(format!("POSIX timer {id}: time out of range"));
    }
    Ok(())
}

fn check_signal(s: &PendingSignalState) -> Result<(), String> {
    if !(1..=64).contains(&s.signo) || s.siginfo.len() != SIGINFO_LEN {
        return Err(format!(
            "pending signal {} with {} bytes of siginfo",
            s.signo,
            s.siginfo.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(extents: Vec<(u64, u64)>) -> UnlinkedFileState {
        UnlinkedFileState {
            dev: 1,
            ino: 7,
            memfd: Some("buf".into()),
            path: String::new(),
            size: 16384,
            mode: 0o600,
            uid: 0,
            gid: 0,
            seals: sys::unlinked_files::F_SEAL_GROW,
            data: "unlinked-1-7.bin".into(),
            extents,
        }
    }

    #[test]
    fn an_unlinked_file_reads_its_runs_and_zeros_between_and_past_them() {
        let u = memfd(vec![(4096, 4), (8192, 2)]);
        let data = b"abcdXY";
        let mut buf = [9u8; 8];
        u.read_at(data, 4094, &mut buf);
        assert_eq!(&buf, b"\0\0abcd\0\0");
        u.read_at(data, 8191, &mut buf);
        assert_eq!(&buf, b"\0XY\0\0\0\0\0");
        u.read_at(data, 20000, &mut buf);
        assert_eq!(buf, [0u8; 8]);
    }

    #[test]
    fn unlinked_files_the_kernel_could_not_make_are_refused() {
        let mut p: ProcessImage =
            serde_json::from_str(include_str!("../tests/fixtures/v2/ck_signals/process.json"))
                .unwrap();
        p.unlinked_files = vec![memfd(vec![(0, 4096)])];
        p.validate().unwrap();
        for (bad, why) in [
            (memfd(vec![(4096, 10), (4000, 10)]), "data run"),
            (memfd(vec![(16000, 4096)]), "data run"),
            (
                UnlinkedFileState {
                    seals: 0x100,
                    ..memfd(vec![])
                },
                "seals",
            ),
            (
                UnlinkedFileState {
                    memfd: None,
                    path: "relative".into(),
                    ..memfd(vec![])
                },
                "absolute",
            ),
            (
                UnlinkedFileState {
                    data: "../x".into(),
                    ..memfd(vec![])
                },
                "data name",
            ),
        ] {
            p.unlinked_files = vec![bad];
            let e = p.validate().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
