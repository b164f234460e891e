//! Could this process be dumped and brought back? The list of what a process
//! holds that `tern restore` cannot recreate (or would recreate wrong), read
//! from /proc before anything is frozen.
//!
//! `tern dump` and a first `tern pre-dump` refuse a process for which this
//! list is not empty, naming each item, and leave it running untouched: a
//! dump kills its target, so a dump the restore cannot bring back would lose
//! the process. The final dump reads the list again once the process is
//! frozen (what it holds may have changed meanwhile) and thaws it on a
//! refusal. `tern check -t PID` prints the same list.
//!
//! A unix socket's queue is not read here (a peek moves the socket's peek
//! offset, which the running process would see): fds or credentials in
//! flight, and an empty datagram, are found by the final dump's copy of
//! the queue once the process is frozen, which then thaws it and refuses.
//!
//! Kinds refused, and why:
//! - fds: sockets other than unix sockets connected within the process
//!   (pairs, or an accepted connection and its client), bound (listening
//!   with no connection waiting, or datagram with nothing queued) or
//!   neither, and TCP/UDP sockets without
//!   a connection (established connections, connections waiting to be
//!   accepted, queued datagrams, SO_BINDTODEVICE), anonymous-inode fds other than eventfd, epoll, timerfd
//!   and signalfd (inotify, fanotify, pidfd, userfaultfd, io_uring, ...),
//!   an epoll holding a file through an fd the process has since closed,
//!   an alarm timerfd without CAP_WAKE_ALARM,
//!   namespace and other pseudo-file fds, deleted files and memfds with
//!   more data than tern saves of one (`unlinked::LIMIT`), a deleted file
//!   that keeps another name, a memfd on hugetlbfs, devices other than the stateless ones
//!   (`/dev/null`, `zero`, `full`, `random`, `urandom`) and terminals, a pty
//!   master (reopening `/dev/ptmx` makes a new pty), files with locks held
//!   through them (locks are not re-taken), O_ASYNC fds (their signal
//!   owner is not restored);
//! - mappings: SysV shared memory, memfds and deleted files as for fds, device and I/O
//!   mappings, hugetlbfs, AIO rings, `memfd_secret`, shadow stacks, MTE;
//! - POSIX timers on another process's CPU clock (or any, on a kernel
//!   before 6.15, which cannot give a timer its ID back), child processes (live or zombie: a
//!   restore recreates one process), a deleted cwd or root, a deleted
//!   executable as deleted files are,
//!   namespaces other than tern's (the restored process would land in
//!   tern's), and a thread-group leader that has exited while other
//!   threads run.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use sys::fds::{FdInfo, FdKind};

use crate::maps::VmaPolicy;

/// One thing a process holds that tern cannot restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    /// `socket`, `eventfd`, `eventpoll`, `posix_timer`, `child`, ...
    pub kind: String,
    /// `fd 4`, `0x7f..-0x7f..`, `timer 0`, `child 1234`, `cwd`, `ns/net`.
    #[serde(rename = "where")]
    pub at: String,
    /// What it is and why tern refuses it.
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.at, self.kind, self.reason)
    }
}

fn refusal(kind: &str, at: impl Into<String>, reason: impl Into<String>) -> Refusal {
    Refusal {
        kind: kind.into(),
        at: at.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestorableError {
    #[error("no process with PID {pid} (it exited, or never existed); check the PID")]
    NoProcess { pid: i32 },
    #[error(transparent)]
    Read(sys::proc::ProcError),
    #[error(transparent)]
    Fds(#[from] sys::fds::FdsError),
}

/// `VmFlags` by VMA, as [`crate::maps::vm_flags`] reads them.
pub type VmFlagsByVma = std::collections::BTreeMap<(u64, u64), Vec<String>>;

/// Refusals of `pid`, in a stable order (process-wide, fds, mappings).
pub fn refusals(pid: i32) -> Result<Vec<Refusal>, RestorableError> {
    refusals_with(pid, None)
}

/// [`refusals`] with the VmFlags already read (a frozen process: smaps is
/// slow to read); mappings missing from them are judged by name only.
pub fn refusals_with(
    pid: i32,
    flags: Option<&VmFlagsByVma>,
) -> Result<Vec<Refusal>, RestorableError> {
    let mut out = Vec::new();
    let status = sys::proc::status(pid, None).map_err(|e| match e {
        sys::proc::ProcError::NoProcess { pid } => RestorableError::NoProcess { pid },
        e => RestorableError::Read(e),
    })?;
    let threads = status.threads;
    if status.state.starts_with('Z') {
        if threads > 1 {
            out.push(refusal(
                "zombie_leader",
                format!("thread {pid}"),
                format!(
                    "the thread-group leader has exited while {} other threads run; tern restores a process from its leader",
                    threads - 1
                ),
            ));
        }
        // A zombie (leader) has no fds or mappings left to read.
        return Ok(out);
    }
    process_wide(pid, &mut out);
    // tern's own tracking userfaultfd (pre-dumps) is not the process's.
    let tracking: Vec<i32> = crate::session::find_tracking_uffds(pid)
        .into_iter()
        .map(|(fd, _)| fd)
        .collect();
    let table = sys::fds::fd_table(pid)?;
    let socket_inos: BTreeSet<u64> = table
        .iter()
        .filter_map(|f| match f.kind {
            FdKind::Socket { ino } => Some(ino),
            _ => None,
        })
        .collect();
    let unix = if socket_inos.is_empty() {
        Ok(Default::default())
    } else {
        sys::unix_sockets::all()
    };
    let inet = if socket_inos.is_empty() {
        Ok(Default::default())
    } else {
        inet_sockets_of(pid, &table, &unix)
    };
    for f in table {
        if tracking.contains(&f.fd) {
            continue;
        }
        let r = match &f.kind {
            FdKind::Socket { ino } => {
                socket_refusal(pid, &f, *ino, &unix, &socket_inos).and_then(|unix_refusal| {
                    // Not a unix socket: a TCP or UDP one, maybe.
                    match &inet {
                        Ok(m) if m.contains_key(ino) => inet_refusal(pid, &f, &m[ino]),
                        Err(e) if !unix_listed(&unix, *ino) => {
                            Some(refusal("socket", format!("fd {}", f.fd), e.to_string()))
                        }
                        _ => Some(unix_refusal),
                    }
                })
            }
            _ => fd_refusal(pid, &f),
        };
        if let Some(r) = r {
            out.push(r);
        }
    }
    mappings(pid, flags, &mut out);
    Ok(out)
}

/// Children, POSIX timers, cwd/root/exe, namespaces.
fn process_wide(pid: i32, out: &mut Vec<Refusal>) {
    // Children of every thread (CONFIG_PROC_CHILDREN), else a scan of /proc.
    let mut children: Vec<i32> = Vec::new();
    let mut have_children_files = false;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                have_children_files = true;
                children.extend(s.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
            }
        }
    }
    if !have_children_files && let Ok(all) = procfs::process::all_processes() {
        for p in all.flatten() {
            if p.stat().is_ok_and(|s| s.ppid == pid) {
                children.push(p.pid);
            }
        }
    }
    children.sort_unstable();
    children.dedup();
    for c in children {
        let stat = procfs::process::Process::new(c).and_then(|p| p.stat());
        let (comm, zombie) = stat
            .map(|s| (s.comm, s.state == 'Z'))
            .unwrap_or_else(|_| ("?".into(), false));
        out.push(refusal(
            "child",
            format!("child {c}"),
            format!(
                "{} child process {c} ({comm}): tern restores one process, not a tree; a dump would leave it orphaned",
                if zombie { "a zombie" } else { "a live" }
            ),
        ));
    }
    posix_timers(pid, out);
    for (what, kind) in [
        ("cwd", "deleted_cwd"),
        ("root", "deleted_root"),
        ("exe", "deleted_exe"),
    ] {
        if let Ok(l) = std::fs::read_link(format!("/proc/{pid}/{what}")) {
            let l = l.to_string_lossy();
            if let Some(p) = l.strip_suffix(" (deleted)")
                && !std::path::Path::new(&*l).exists()
            {
                // A deleted executable (an upgraded program) is saved as
                // the deleted files it maps are.
                let why = if what == "exe" {
                    match crate::unlinked::refusal(pid, crate::unlinked::Via::Exe, p) {
                        Some((_, why)) => why,
                        None => continue,
                    }
                } else {
                    format!("{p} was deleted: a restore has no path to reopen it by")
                };
                out.push(refusal(kind, what, why));
            }
        }
    }
    for ns in ["pid", "mnt", "net", "ipc", "uts", "user", "cgroup", "time"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        if let (Ok(t), Ok(o)) = (theirs, ours)
            && t != o
        {
            out.push(refusal(
                "namespace",
                format!("ns/{ns}"),
                format!(
                    "the process is in another {ns} namespace ({}) than tern ({}); tern restores into its own namespaces: run tern inside the process's namespaces",
                    t.display(),
                    o.display()
                ),
            ));
        }
    }
}

/// Whether a unix socket is one tern restores, else why not: stream,
/// datagram or seqpacket, and
/// - connected to another socket of the process, both unnamed (a
///   socketpair) or one of them a connection accepted from a listener of
///   the process (named as that listener) and the other its unnamed client;
/// - listening, bound to an absolute path or an abstract name, with no
///   connection waiting; its socket file still at that path;
/// - bound and not connected (a datagram server), or neither;
/// - an unnamed datagram socket connected to a bound, unconnected one of
///   the process.
///
/// (What is queued is checked apart: `peek_queue`.)
pub(crate) fn restorable_unix(
    u: &sys::unix_sockets::UnixSocket,
    all: &HashMap<u64, sys::unix_sockets::UnixSocket>,
    socket_inos: &BTreeSet<u64>,
) -> Result<(), String> {
    use sys::unix_sockets::{STATE_CONNECTED, STATE_LISTEN};
    if ![1, 2, 5].contains(&u.sock_type) {
        return Err(format!("a unix socket of type {}", u.sock_type));
    }
    if let Some(n) = &u.name
        && n.first() != Some(&0)
        && n.first() != Some(&b'/')
    {
        return Err(format!(
            "a unix socket bound to the relative path {}: the directory it is relative to is not known",
            sys::unix_sockets::shown_name(n)
        ));
    }
    let listener_named = |n: &Vec<u8>| {
        all.iter().any(|(ino, l)| {
            l.state == STATE_LISTEN
                && l.name.as_ref() == Some(n)
                && l.sock_type == u.sock_type
                && socket_inos.contains(ino)
        })
    };
    if u.state == STATE_LISTEN {
        let Some(n) = &u.name else {
            return Err("a listening unix socket with no name".into());
        };
        if u.rqueue > 0 {
            return Err(format!(
                "a unix socket listening on {} with {} connection(s) waiting to be accepted: they would be lost",
                sys::unix_sockets::shown_name(n),
                u.rqueue
            ));
        }
        return socket_file_in_place(u, n);
    }
    let Some(peer) = u.peer.filter(|_| u.state == STATE_CONNECTED) else {
        // Not connected: bound (a datagram server) or not even that.
        return match &u.name {
            Some(n) => socket_file_in_place(u, n),
            None => Ok(()),
        };
    };
    if !socket_inos.contains(&peer) {
        return Err(format!(
            "a unix socket connected to socket:[{peer}], which another process holds: tern restores connections within the process only"
        ));
    }
    let Some(p) = all.get(&peer) else {
        return Err(format!(
            "a unix socket whose peer socket:[{peer}] sock_diag does not list"
        ));
    };
    // An unnamed datagram socket connected to a bound, unconnected one
    // (a client of a datagram server of the process).
    if p.peer.is_none() && u.sock_type == 2 && p.sock_type == 2 && p.name.is_some() {
        return match &u.name {
            None => Ok(()),
            Some(n) => Err(format!(
                "a datagram socket bound to {} and connected to another: not restored yet",
                sys::unix_sockets::shown_name(n)
            )),
        };
    }
    if p.peer != Some(u.ino) {
        return Err(format!(
            "a unix socket connected to socket:[{peer}]{}, which is connected elsewhere: not restored",
            p.name
                .as_ref()
                .map(|n| format!(" ({})", sys::unix_sockets::shown_name(n)))
                .unwrap_or_default()
        ));
    }
    match (&u.name, &p.name) {
        (None, None) => Ok(()),
        (Some(n), None) | (None, Some(n)) if u.sock_type != 2 && listener_named(n) => Ok(()),
        (Some(n), _) | (_, Some(n)) => Err(format!(
            "a unix connection under the name {}, which no listener of the process has (its listener was closed): not restored",
            sys::unix_sockets::shown_name(n)
        )),
    }
}

/// A socket bound to a path still has its socket file there (a restore
/// binds that path again).
fn socket_file_in_place(u: &sys::unix_sockets::UnixSocket, n: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if n.first() == Some(&0) {
        return Ok(());
    }
    use std::os::unix::ffi::OsStrExt;
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(n));
    match std::fs::symlink_metadata(path) {
        Ok(m) if u.file == Some((m.dev(), m.ino())) => Ok(()),
        _ => Err(format!(
            "a unix socket bound to {}, whose socket file is no longer there (removed or replaced): a restore would bind a name the process had given up",
            sys::unix_sockets::shown_name(n)
        )),
    }
}

/// The TCP and UDP sockets `pid` holds (of its fd table `table`), by
/// inode: those sock_diag lists, and those never bound, which it does not.
pub(crate) fn inet_sockets_of(
    pid: i32,
    table: &[FdInfo],
    unix: &Result<HashMap<u64, sys::unix_sockets::UnixSocket>, sys::unix_sockets::UnixSocketsError>,
) -> Result<HashMap<u64, sys::inet_sockets::InetSocket>, sys::inet_sockets::InetSocketsError> {
    let mut all = sys::inet_sockets::all()?;
    for f in table {
        if let FdKind::Socket { ino } = f.kind
            && !all.contains_key(&ino)
            && !unix_listed(unix, ino)
            && let Some(s) = sys::inet_sockets::unlisted(pid, f.fd, ino)?
        {
            all.insert(ino, s);
        }
    }
    all.retain(|ino, _| table.iter().any(|f| f.kind == FdKind::Socket { ino: *ino }));
    Ok(all)
}

fn unix_listed(
    unix: &Result<HashMap<u64, sys::unix_sockets::UnixSocket>, sys::unix_sockets::UnixSocketsError>,
    ino: u64,
) -> bool {
    unix.as_ref().is_ok_and(|m| m.contains_key(&ino))
}

/// Whether a TCP or UDP socket is one tern restores: no connection (a
/// listener with none waiting, a bound or unbound TCP socket, an
/// unconnected UDP socket with nothing queued); else why not.
pub(crate) fn restorable_inet(s: &sys::inet_sockets::InetSocket) -> Result<(), String> {
    use sys::inet_sockets::{TCP, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN};
    let proto = if s.protocol == TCP { "TCP" } else { "UDP" };
    match (s.protocol, s.state) {
        (TCP, TCP_LISTEN) if s.rqueue > 0 => Err(format!(
            "a TCP socket listening on {} with {} connection(s) waiting to be accepted: they would be lost",
            s.local, s.rqueue
        )),
        (TCP, TCP_LISTEN) | (TCP, TCP_CLOSE) => Ok(()),
        (_, TCP_CLOSE) if s.rqueue > 0 => Err(format!(
            "a UDP socket on {} with {} bytes of datagrams queued: tern does not save them yet",
            s.local, s.rqueue
        )),
        (_, TCP_CLOSE) => Ok(()),
        (TCP, TCP_ESTABLISHED) => Err(format!(
            "an established TCP connection {} -> {}: tern cannot restore connections yet (TCP_REPAIR)",
            s.local, s.remote
        )),
        (_, TCP_ESTABLISHED) => Err(format!(
            "a connected UDP socket {} -> {}: tern cannot restore it yet",
            s.local, s.remote
        )),
        (_, st) => Err(format!(
            "a {proto} socket on {} in state {st} (a connection opening or closing): tern cannot restore it",
            s.local
        )),
    }
}

fn inet_refusal(pid: i32, f: &FdInfo, s: &sys::inet_sockets::InetSocket) -> Option<Refusal> {
    let at = format!("fd {}", f.fd);
    if let Err(why) = restorable_inet(s) {
        return Some(refusal("socket", at, format!("socket:[{}]: {why}", s.ino)));
    }
    match sys::inet_sockets::options(pid, f.fd, s) {
        Ok(o) if o.bound_to_device => Some(refusal(
            "socket",
            at,
            format!(
                "socket:[{}]: bound to a network device (SO_BINDTODEVICE): not restored",
                s.ino
            ),
        )),
        Ok(_) => file_locks(pid, f),
        Err(e) => Some(refusal("socket", at, e.to_string())),
    }
}

/// A socket tern could not bring back (see [`restorable_unix`]).
fn socket_refusal(
    pid: i32,
    f: &FdInfo,
    ino: u64,
    unix: &Result<HashMap<u64, sys::unix_sockets::UnixSocket>, sys::unix_sockets::UnixSocketsError>,
    socket_inos: &BTreeSet<u64>,
) -> Option<Refusal> {
    let at = format!("fd {}", f.fd);
    let unix = match unix {
        Ok(u) => u,
        Err(e) => return Some(refusal("socket", at, e.to_string())),
    };
    let Some(u) = unix.get(&ino) else {
        return Some(refusal(
            "socket",
            at,
            format!(
                "socket:[{ino}]: neither a unix, TCP nor UDP socket (netlink, packet, ...): tern cannot restore it"
            ),
        ));
    };
    if let Err(why) = restorable_unix(u, unix, socket_inos) {
        return Some(refusal("socket", at, format!("socket:[{ino}]: {why}")));
    }
    // Datagrams queued to an unconnected socket came from senders tern
    // does not know. (What else a queue holds, fds or credentials in
    // flight, is only read once the process is frozen, by the dump's own
    // copy of the queue: a peek moves the socket's peek offset, which a
    // running process, or a second peek beside it, would see.)
    if u.peer.is_none() && u.sock_type == 2 && u.rqueue > 0 {
        return Some(refusal(
            "socket",
            at,
            format!(
                "socket:[{ino}]: a unix datagram socket with datagrams queued from senders tern does not know: not restored yet"
            ),
        ));
    }
    file_locks(pid, f)
}

/// POSIX timers a restore could not make again: on another process's CPU
/// clock, on an alarm clock without CAP_WAKE_ALARM, or any timer on a
/// kernel that cannot create one with a given ID.
fn posix_timers(pid: i32, out: &mut Vec<Refusal>) {
    use sys::posix_timers as pt;
    let timers = match pt::list(pid) {
        Ok(t) => t,
        Err(pt::PosixTimersError::Read { source, .. })
            if source.raw_os_error() == Some(libc::ENOENT) =>
        {
            return;
        }
        Err(e) => {
            out.push(refusal("posix_timer", "timers", e.to_string()));
            return;
        }
    };
    if timers.is_empty() {
        return;
    }
    let restore_ids = pt::restore_ids_supported();
    let cap_eff = sys::proc::status(pid, None).map(|s| s.capeff).unwrap_or(0);
    for t in timers {
        let at = format!("timer {}", t.id);
        let why = if !restore_ids {
            Some("a POSIX timer: this kernel cannot create a timer with a given ID (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.15+), so the process would find its timer IDs changed".to_string())
        } else if !pt::TIMER_CLOCKS.contains(&t.clockid) {
            Some(format!(
                "a POSIX timer on clock {} (a thread's CPU clock, whose thread /proc does not name, or another process's): tern cannot bind it again",
                t.clockid
            ))
        } else if sys::event_fds::ALARM_CLOCKS.contains(&t.clockid) && cap_eff & (1 << 35) == 0 {
            Some(format!(
                "a POSIX timer on alarm clock {} in a process without CAP_WAKE_ALARM",
                t.clockid
            ))
        } else {
            None
        };
        if let Some(why) = why {
            out.push(refusal("posix_timer", at, why));
        }
    }
}

/// Stateless character devices a restore may reopen: (major, minor) of
/// null, zero, full, random, urandom.
const STATELESS_DEVICES: &[(u32, u32)] = &[(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)];

fn fd_refusal(pid: i32, f: &FdInfo) -> Option<Refusal> {
    let at = format!("fd {}", f.fd);
    if f.flags & libc::O_ASYNC != 0 {
        return Some(refusal(
            "async_io",
            at,
            "O_ASYNC (signal-driven I/O): its owner and signal (F_SETOWN, F_SETSIG) are not restored",
        ));
    }
    let r = match &f.kind {
        FdKind::Socket { ino } => refusal(
            "socket",
            at,
            format!("socket:[{ino}]: tern cannot restore this socket"),
        ),
        FdKind::Anon { what } if sys::event_fds::kind_of_link(what).is_some() => {
            return event_fd_refusal(pid, f).or_else(|| file_locks(pid, f));
        }
        FdKind::Anon { what } => {
            let kind = match what.as_str() {
                "[eventfd]" => "eventfd",
                "[eventpoll]" => "eventpoll",
                "[signalfd]" => "signalfd",
                "[timerfd]" => "timerfd",
                "inotify" => "inotify",
                "[fanotify]" => "fanotify",
                "[pidfd]" => "pidfd",
                "[userfaultfd]" => "userfaultfd",
                "[io_uring]" => "io_uring",
                _ => "anon_inode",
            };
            let why = if kind == "userfaultfd" {
                // tern's lazy restore leaves one in the process until its
                // fill ends: say so, that is the likeliest reason.
                format!(
                    "anon_inode:{what}: tern cannot restore this kind of fd yet (a process tern restored with --lazy-pages keeps one until its pages are all in: dump it once `tern restore` or `tern lazy-pages` has finished)"
                )
            } else {
                format!("anon_inode:{what}: tern cannot restore this kind of fd yet")
            };
            refusal(kind, at, why)
        }
        FdKind::Other { link } => {
            let kind = if link.starts_with("pidfd:") {
                "pidfd"
            } else {
                "other_fd"
            };
            refusal(
                kind,
                at,
                format!("{link}: tern cannot restore this kind of fd"),
            )
        }
        FdKind::File {
            path,
            deleted: true,
            ..
        } => match crate::unlinked::refusal(pid, crate::unlinked::Via::Fd(f.fd), path) {
            Some((kind, why)) => refusal(kind, at, why),
            None => return file_locks(pid, f),
        },
        FdKind::CharDev { path, rdev } => {
            let dev = (libc::major(*rdev), libc::minor(*rdev));
            if STATELESS_DEVICES.contains(&dev) {
                return file_locks(pid, f);
            }
            refusal(
                "device",
                at,
                format!(
                    "{path} (device {}:{}): reopening a device does not bring back its state",
                    dev.0, dev.1
                ),
            )
        }
        FdKind::Tty { path, .. } if path == "/dev/ptmx" || path.starts_with("/dev/pts/ptmx") => {
            refusal(
                "device",
                at,
                format!("{path}: a pty master; reopening it would make a new terminal"),
            )
        }
        _ => return file_locks(pid, f),
    };
    Some(r)
}

/// An eventfd, epoll, timerfd or signalfd tern could not bring back: its
/// state unreadable, an epoll holding a file through an fd number the
/// process has since closed (or reused), an alarm timer of a process
/// without CAP_WAKE_ALARM.
fn event_fd_refusal(pid: i32, f: &FdInfo) -> Option<Refusal> {
    use sys::event_fds::{ALARM_CLOCKS, EventFdState};
    let at = format!("fd {}", f.fd);
    let state = match sys::event_fds::read(pid, f.fd) {
        Ok(s) => s,
        // Closed meanwhile: nothing to refuse.
        Err(sys::event_fds::EventFdsError::Read { source, .. })
            if source.raw_os_error() == Some(libc::ENOENT) =>
        {
            return None;
        }
        Err(e) => return Some(refusal("event_fd", at, e.to_string())),
    };
    match state {
        EventFdState::Epoll(targets) => {
            for t in targets {
                match sys::event_fds::epoll_target_is_open(pid, f.fd, t.tfd) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Some(refusal(
                            "epoll_closed_target",
                            at,
                            format!(
                                "the epoll holds a file registered as fd {}, which the process has closed (or reused for another file) since: a restore cannot register it again",
                                t.tfd
                            ),
                        ));
                    }
                    Err(e) => return Some(refusal("eventpoll", at, e.to_string())),
                }
            }
            None
        }
        EventFdState::TimerFd(t) if ALARM_CLOCKS.contains(&t.clockid) => {
            let cap_eff = sys::proc::status(pid, None).map(|s| s.capeff).unwrap_or(0);
            // CAP_WAKE_ALARM (35).
            (cap_eff & (1 << 35) == 0).then(|| {
                refusal(
                    "timerfd",
                    at,
                    format!(
                        "a timerfd on alarm clock {} in a process without CAP_WAKE_ALARM (it was handed one): a restore would have to grant the capability",
                        t.clockid
                    ),
                )
            })
        }
        _ => None,
    }
}

/// A file with locks held through this fd (fdinfo `lock:` lines).
fn file_locks(pid: i32, f: &FdInfo) -> Option<Refusal> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", f.fd)).ok()?;
    let lock = text.lines().find_map(|l| l.strip_prefix("lock:"))?;
    Some(refusal(
        "file_lock",
        format!("fd {}", f.fd),
        format!(
            "holds a file lock ({}): tern does not re-take locks",
            lock.split_whitespace().collect::<Vec<_>>().join(" ")
        ),
    ))
}

/// Mappings a restore cannot recreate.
fn mappings(pid: i32, flags: Option<&VmFlagsByVma>, out: &mut Vec<Refusal>) {
    let Ok(vmas) = crate::maps::read_vmas(pid) else {
        return;
    };
    let read;
    let flags = match flags {
        Some(f) => f,
        None => {
            read = crate::maps::vm_flags(pid).unwrap_or_default();
            &read
        }
    };
    for v in &vmas {
        if v.is_special() {
            continue;
        }
        let at = format!("{:#x}-{:#x}", v.start, v.end);
        let name = v.name.as_deref().unwrap_or("");
        let f = flags.get(&(v.start, v.end));
        let has = |x: &str| f.is_some_and(|f| f.iter().any(|g| g == x));
        let r = if name.starts_with("/SYSV") {
            Some((
                "sysv_shm",
                format!("SysV shared memory {name}: tern cannot restore it yet"),
            ))
        } else if name.starts_with("/[aio]") {
            Some((
                "aio",
                "an AIO ring (io_setup): tern cannot restore it".into(),
            ))
        } else if name.starts_with("/secretmem") {
            Some((
                "secretmem",
                "memfd_secret memory: its pages cannot be read".into(),
            ))
        } else if has("ht") {
            Some((
                "hugetlb",
                format!("a hugetlbfs mapping {name}: tern cannot restore it yet"),
            ))
        } else if has("io") || has("pf") || has("mm") {
            Some((
                "device_mapping",
                format!(
                    "a device or I/O mapping {name}: reopening a device does not bring it back"
                ),
            ))
        } else if has("ss") {
            Some((
                "shadow_stack",
                "a shadow stack: tern cannot restore it".into(),
            ))
        } else if has("mt") {
            Some((
                "mte",
                "memory tagging (PROT_MTE): tern does not save tags".into(),
            ))
        } else if crate::unlinked::maps_unlinked(v) && !std::path::Path::new(name).exists() {
            let named = name.strip_suffix(" (deleted)").unwrap_or(name);
            crate::unlinked::refusal(pid, crate::unlinked::Via::Mapping(v.start, v.end), named)
        } else {
            None
        };
        if let Some((kind, reason)) = r {
            out.push(refusal(kind, at, reason));
        }
    }
}

/// `Ok` when `pid` holds nothing tern cannot restore; otherwise the
/// refusal error that names every item.
pub fn ensure(pid: i32) -> Result<(), crate::session::TrackerError> {
    let refusals = refusals(pid)?;
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(crate::session::TrackerError::NotRestorable { pid, refusals })
    }
}

/// The error text for a refused process: every item, one per line.
pub fn describe(pid: i32, refusals: &[Refusal]) -> String {
    let mut s = format!(
        "PID {pid} holds {} thing{} tern cannot restore, so it was not dumped and runs on untouched:",
        refusals.len(),
        if refusals.len() == 1 { "" } else { "s" }
    );
    for r in refusals {
        s.push_str("\n  ");
        s.push_str(&r.to_string());
    }
    s.push_str("\n(`tern check -t PID --json` lists them)");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test process holds an established TCP connection, a unix
    /// socketpair, a TCP listener, an inotify
    /// fd, an eventfd and an epoll whose one registration outlived its fd
    /// (through a dup), and its own namespaces: the TCP socket, the inotify
    /// fd and the epoll are refused, the pair, the listener and the eventfd
    /// are not.
    #[test]
    fn refuses_a_tcp_socket_an_inotify_fd_and_an_epoll_with_a_closed_target() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // An established connection (both ends here).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_served, _) = l.accept().unwrap();
        let (pa, pb) = std::os::unix::net::UnixStream::pair().unwrap();
        let own = |fd: i32| {
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            // SAFETY: a new fd of ours.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        // SAFETY: plain syscalls creating fds of our own.
        let (ino, efd, ep, gone) = unsafe {
            let ino = own(libc::inotify_init1(libc::IN_CLOEXEC));
            let efd = own(libc::eventfd(0, libc::EFD_CLOEXEC));
            let ep = own(libc::epoll_create1(libc::EPOLL_CLOEXEC));
            let gone = own(libc::eventfd(0, libc::EFD_CLOEXEC));
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 1,
            };
            assert_eq!(
                libc::epoll_ctl(
                    ep.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    gone.as_raw_fd(),
                    &mut ev
                ),
                0
            );
            (ino, efd, ep, gone)
        };
        let pid = std::process::id() as i32;
        let fd = |f: &OwnedFd| format!("fd {}", f.as_raw_fd());
        let r = refusals(pid).unwrap();
        assert!(!r.iter().any(|x| x.at == fd(&ep)), "{r:?}");
        // The registered eventfd closed, a dup keeping it registered.
        // SAFETY: dup of our own fd.
        let kept = own(unsafe { libc::dup(gone.as_raw_fd()) });
        drop(gone);
        let r = refusals(pid).unwrap();
        let sock = format!("fd {}", a.as_raw_fd());
        assert!(
            r.iter().any(|x| x.kind == "socket" && x.at == sock),
            "{r:?}"
        );
        assert!(
            r.iter().any(|x| x.kind == "inotify" && x.at == fd(&ino)),
            "{r:?}"
        );
        assert!(
            r.iter()
                .any(|x| x.kind == "epoll_closed_target" && x.at == fd(&ep)),
            "{r:?}"
        );
        assert!(
            !r.iter().any(|x| x.at == fd(&efd) || x.at == fd(&kept)),
            "{r:?}"
        );
        assert!(!r.iter().any(|x| x.kind == "namespace"), "{r:?}");
        // A socketpair within the process and a listener are not refused.
        for s in [pa.as_raw_fd(), pb.as_raw_fd(), l.as_raw_fd()] {
            assert!(!r.iter().any(|x| x.at == format!("fd {s}")), "{r:?}");
        }
    }
}
