//! Who may restore what: an image never gives a process more than the
//! dumped process had, nor more than whoever could have written the image
//! could give it, nor more than the user running `tern restore` has.
//!
//! An image is as trustworthy as the least trusted user who could have
//! written it. [`chain_writer`] finds that user from what opening the chain
//! went through ([`images::Provenance`]):
//!
//! - every directory on the path of every image (from `/` down), the image
//!   directories, every symlink followed, and every file read: a non-root
//!   owner of any of them could have replaced or edited the image;
//! - a directory that group or others may write without the sticky bit, or
//!   a file group or others may write, lets anyone change the image: such a
//!   chain is refused;
//! - two different non-root owners: refused (neither could have given the
//!   other's part).
//!
//! Then [`check_creds`]: a chain only root could have written ("made by
//! root") may ask for anything the restoring user has; one that user U
//! could have written may ask only for what U could give: U's uid, U's
//! groups, no capabilities, no chroot; and the files it opens are opened
//! as the image's user (checked first by [`check_access`]). The seal (see
//! `images::seal`) is checked before all this: an image changed after
//! tern wrote it on this host is refused whoever owns it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use images::process::{Creds, ProcessImage};
use images::{ProvenanceKind, VmaRecord};

use crate::chain::ImageChain;

/// Who could have written an image chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// Only root: the chain is trusted as tern wrote it.
    Root,
    /// User `uid` (besides root), because they own `because`.
    User {
        uid: u32,
        /// The groups `uid` is in (their passwd group, the groups the
        /// system lists for them, and the groups of files they own in the
        /// chain): the gids they could give a process.
        gids: BTreeSet<u32>,
        because: PathBuf,
    },
}

impl Writer {
    /// The owner a file the restore makes for the process gets (a memfd,
    /// a deleted file, a socket file): `uid`:`gid` as dumped for an image
    /// only root could have written; else the writer's uid, and `gid` only
    /// if it is one of theirs (`egid`, the process's, if not).
    pub fn owner_given(&self, uid: u32, gid: u32, egid: u32) -> (u32, u32) {
        match self {
            Writer::Root => (uid, gid),
            Writer::User { uid: w, gids, .. } => (*w, if gids.contains(&gid) { gid } else { egid }),
        }
    }

    /// The permission bits such a file gets: setuid and setgid only for
    /// an image only root could have written.
    pub fn mode_given(&self, mode: u32) -> u32 {
        match self {
            Writer::Root => mode & 0o7777,
            Writer::User { .. } => mode & 0o1777,
        }
    }
}

/// The user running `tern restore`.
#[derive(Debug, Clone)]
pub struct Restorer {
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_prm: u64,
    pub cap_eff: u64,
}

const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;

/// Capability names, by number (include/uapi/linux/capability.h).
const CAP_NAMES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// `cap_chown,cap_kill,...` for the bits of `caps`.
pub fn cap_names(caps: u64) -> String {
    (0..64)
        .filter(|b| caps & (1u64 << b) != 0)
        .map(|b| match CAP_NAMES.get(b) {
            Some(n) => format!("cap_{n}"),
            None => format!("cap_{b}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Restorer {
    /// This process's credentials (/proc/self/status).
    pub fn current() -> Result<Restorer, String> {
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| format!("/proc/self/status: {e}"))?;
        let field = |name: &str| -> Option<&str> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let ids = |name: &str| -> Result<[u32; 4], String> {
            let v: Vec<u32> = field(name)
                .unwrap_or("")
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            v.try_into()
                .map_err(|_| format!("/proc/self/status: bad {name} line"))
        };
        let hex = |name: &str| -> Result<u64, String> {
            field(name)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .ok_or_else(|| format!("/proc/self/status: no {name}"))
        };
        Ok(Restorer {
            uid: ids("Uid")?,
            gid: ids("Gid")?,
            groups: field("Groups")
                .unwrap_or("")
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect(),
            cap_prm: hex("CapPrm")?,
            cap_eff: hex("CapEff")?,
        })
    }

    fn has(&self, cap: u32) -> bool {
        self.cap_eff & (1u64 << cap) != 0
    }
}

/// Who could have written `chain` (see the module doc), or why anyone
/// could have.
pub fn chain_writer(chain: &ImageChain) -> Result<Writer, String> {
    let mut owners: BTreeMap<u32, PathBuf> = BTreeMap::new();
    let mut file_gids: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for img in &chain.images {
        for p in &img.provenance {
            if !seen.insert((p.path.clone(), p.kind as u8)) {
                continue;
            }
            let group_or_others = match (p.mode & 0o020 != 0, p.mode & 0o002 != 0) {
                (_, true) => Some("anyone".to_string()),
                (true, false) => Some(format!("group {}", p.gid)),
                _ => None,
            };
            match p.kind {
                ProvenanceKind::Dir => {
                    if let Some(who) = &group_or_others
                        && images::fsdir::replaceable_by_writers(p.mode)
                    {
                        return Err(format!(
                            "{} (mode {:04o}) lets {who} replace what it holds, so {who} could have changed this image; chmod go-w it (or move the images to a directory only root may write)",
                            p.path.display(),
                            p.mode
                        ));
                    }
                }
                ProvenanceKind::File => {
                    if let Some(who) = &group_or_others {
                        return Err(format!(
                            "{} (mode {:04o}) may be written by {who}; chmod go-w it if its contents are to be trusted",
                            p.path.display(),
                            p.mode
                        ));
                    }
                    if p.uid != 0 {
                        file_gids.entry(p.uid).or_default().insert(p.gid);
                    }
                }
                ProvenanceKind::Symlink => {}
            }
            if p.uid != 0 {
                owners.entry(p.uid).or_insert_with(|| p.path.clone());
            }
        }
    }
    let mut it = owners.into_iter();
    let Some((uid, because)) = it.next() else {
        return Ok(Writer::Root);
    };
    if let Some((other, path)) = it.next() {
        return Err(format!(
            "the image chain could have been written by two users: uid {uid} (who owns {}) and uid {other} (who owns {}); neither could give a process what the other's part asks for",
            because.display(),
            path.display()
        ));
    }
    let mut gids = user_groups(uid);
    gids.extend(file_gids.remove(&uid).unwrap_or_default());
    Ok(Writer::User { uid, gids, because })
}

/// The groups the system lists for `uid`: its passwd group and
/// `getgrouplist`.
fn user_groups(uid: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return out;
    };
    out.insert(user.gid.as_raw());
    if let Ok(name) = std::ffi::CString::new(user.name.as_bytes())
        && let Ok(list) = nix::unistd::getgrouplist(&name, user.gid)
    {
        out.extend(list.into_iter().map(|g| g.as_raw()));
    }
    out
}

/// The credentials of `p` are within what the restoring user `r` has, and,
/// for a chain a user could have written, within what that user could give.
pub fn check_creds(p: &ProcessImage, w: &Writer, r: &Restorer) -> Result<(), String> {
    let c = &p.creds;
    let caps = c.cap_prm | c.cap_eff | c.cap_inh | c.cap_amb;
    let lacking = caps & !r.cap_prm;
    if lacking != 0 {
        return Err(format!(
            "PID {} had capabilities this tern does not hold ({}); restore it as a user who has them",
            p.pid,
            cap_names(lacking)
        ));
    }
    if !r.has(CAP_SETUID) && c.uid.iter().any(|u| !r.uid.contains(u)) {
        return Err(format!(
            "PID {} ran as uids {:?}, and this tern (uids {:?}, without cap_setuid) cannot set them",
            p.pid, c.uid, r.uid
        ));
    }
    if !r.has(CAP_SETGID) && (c.gid.iter().any(|g| !r.gid.contains(g)) || c.groups != r.groups) {
        return Err(format!(
            "PID {} ran as gids {:?} with groups {:?}, and this tern (gids {:?}, groups {:?}, without cap_setgid) cannot set them",
            p.pid, c.gid, c.groups, r.gid, r.groups
        ));
    }
    let Writer::User { uid, gids, because } = w else {
        return Ok(());
    };
    let who = format!(
        "uid {uid} owns {} and so could have written this image",
        because.display()
    );
    let remedy = "if you trust the image, make it root's (chown -R root: DIR, for every image of the chain and the directories above them)";
    if c.uid.iter().any(|u| u != uid) {
        return Err(format!(
            "{who}; it asks for a process with uids {:?}, which uid {uid} cannot give; {remedy}",
            c.uid
        ));
    }
    let bad: Vec<u32> = c
        .gid
        .iter()
        .chain(&c.groups)
        .filter(|g| !gids.contains(g))
        .copied()
        .collect();
    if !bad.is_empty() {
        return Err(format!(
            "{who}; it asks for gids {bad:?}, which are not groups of uid {uid} ({gids:?}); {remedy}"
        ));
    }
    if caps != 0 {
        return Err(format!(
            "{who}; it asks for capabilities ({}), which uid {uid} cannot give; {remedy}",
            cap_names(caps)
        ));
    }
    if p.root != "/" {
        return Err(format!(
            "{who}; it asks for the process to be chrooted to {}, which uid {uid} cannot do; {remedy}",
            p.root
        ));
    }
    Ok(())
}

/// What an image a user could have written may not ask of a restore that
/// runs as root: hard resource limits above tern's own (an unprivileged
/// process cannot raise them), more locked memory than its own
/// RLIMIT_MEMLOCK allows (tern locks it before the credentials drop), and
/// KSM for every VMA (PR_SET_MEMORY_MERGE needs CAP_SYS_RESOURCE).
pub fn check_limits(p: &ProcessImage, vmas: &[VmaRecord]) -> Result<(), String> {
    for l in &p.rlimits {
        let Ok((_, our_max)) = sys::rlimit::get(0, l.resource) else {
            continue;
        };
        if l.max > our_max {
            return Err(format!(
                "PID {}: the image asks for a hard limit of {} for resource {}, above this tern's {}; an unprivileged process cannot raise it",
                p.pid, l.max, l.resource, our_max
            ));
        }
    }
    let locked: u64 = vmas
        .iter()
        .filter(|v| v.vm_flags.iter().any(|f| f == "lo"))
        .map(|v| v.end - v.start)
        .sum();
    let memlock = p
        .rlimits
        .iter()
        .find(|l| l.resource == libc::RLIMIT_MEMLOCK)
        .map(|l| l.cur)
        .unwrap_or(0);
    if locked > memlock {
        return Err(format!(
            "PID {}: the image asks for {locked} bytes of locked memory (mlock), above its RLIMIT_MEMLOCK of {memlock}",
            p.pid
        ));
    }
    if p.memory_merge {
        return Err(format!(
            "PID {}: the image asks for KSM on every mapping (PR_SET_MEMORY_MERGE), which needs CAP_SYS_RESOURCE",
            p.pid
        ));
    }
    Ok(())
}

/// What an image a user could have written may not ask of the scheduling
/// tern sets from outside as root (`restore::scheduling`): what the
/// process could not have set itself with the capabilities and limits the
/// image gives it (sched(7), ioprio_set(2), proc(5)). A negative nice value
/// below `20 - RLIMIT_NICE`, a real-time priority above RLIMIT_RTPRIO,
/// SCHED_DEADLINE and the real-time I/O class need CAP_SYS_NICE; a negative
/// OOM score adjustment needs CAP_SYS_RESOURCE.
pub fn check_scheduling(p: &ProcessImage) -> Result<(), String> {
    const CAP_SYS_NICE: u32 = 23;
    const CAP_SYS_RESOURCE: u32 = 24;
    let has = |cap: u32| p.creds.cap_eff & (1 << cap) != 0;
    let limit = |res: libc::__rlimit_resource_t| {
        p.rlimits
            .iter()
            .find(|l| l.resource == res)
            .map_or(0, |l| l.cur)
    };
    let refuse = |what: String, cap: &str| {
        Err(format!(
            "PID {}: the image asks for {what}, which a process without {cap} cannot set; tern will not set it for a user's image",
            p.pid
        ))
    };
    if !has(CAP_SYS_NICE) {
        // Any process may raise its nice value; below 0 (where a process
        // starts) only down to 20 - RLIMIT_NICE.
        let nice_floor =
            (20 - i64::try_from(limit(libc::RLIMIT_NICE).min(40)).unwrap_or(40)).min(0);
        let rtprio = limit(libc::RLIMIT_RTPRIO);
        for t in &p.threads {
            let Some(s) = t.sched.clone().map(sys::sched::Scheduling::from) else {
                continue;
            };
            let tid = t.tid;
            if i64::from(s.nice) < nice_floor {
                return refuse(
                    format!(
                        "nice {} in thread {tid} (RLIMIT_NICE allows {nice_floor})",
                        s.nice
                    ),
                    "CAP_SYS_NICE",
                );
            }
            if s.policy == sys::sched::SCHED_DEADLINE {
                return refuse(format!("SCHED_DEADLINE in thread {tid}"), "CAP_SYS_NICE");
            }
            if s.is_realtime() && u64::from(s.priority) > rtprio {
                return refuse(
                    format!(
                        "real-time priority {} in thread {tid} (RLIMIT_RTPRIO allows {rtprio})",
                        s.priority
                    ),
                    "CAP_SYS_NICE",
                );
            }
            if s.io_class() == sys::sched::IOPRIO_CLASS_RT {
                return refuse(
                    format!("the real-time I/O class in thread {tid}"),
                    "CAP_SYS_NICE",
                );
            }
        }
    }
    if let Some(v) = p.oom_score_adj
        && v < 0
        && !has(CAP_SYS_RESOURCE)
    {
        return refuse(
            format!("an OOM score adjustment of {v}"),
            "CAP_SYS_RESOURCE",
        );
    }
    Ok(())
}

/// A path a restore opens for the process, and how.
struct Access<'a> {
    what: String,
    path: &'a str,
    mode: i32,
}

fn access_mode(flags: i32) -> i32 {
    if flags & libc::O_PATH != 0 {
        return libc::F_OK;
    }
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => libc::W_OK,
        libc::O_RDWR => libc::R_OK | libc::W_OK,
        _ => libc::R_OK,
    }
}

/// What the process needs to do with a path, as "cannot ..." ends.
fn needs(mode: i32) -> &'static str {
    match mode {
        libc::F_OK => "reach it",
        libc::X_OK => "enter it",
        m if m == libc::R_OK | libc::X_OK => "open and execute it",
        m if m == libc::R_OK | libc::W_OK => "open it for reading and writing",
        libc::W_OK => "open it for writing",
        _ => "open it for reading",
    }
}

/// Every path the restore opens for `p` (its fds, mapped files, exe, cwd,
/// root) is one the image's user could open that way. Checked in a thread
/// of tern that takes the image's groups and filesystem ids first (they are
/// per thread in the kernel), with `faccessat(AT_EACCESS)`.
pub fn check_access(p: &ProcessImage, vmas: &[VmaRecord]) -> Result<(), String> {
    use images::state::FdKindState as FdKind;
    let mut list: Vec<Access> = Vec::new();
    for f in &p.fds {
        let path = match &f.info.kind {
            // Made from the image for the process, not opened by path.
            FdKind::File { deleted: true, .. } => continue,
            FdKind::File { path, .. }
            | FdKind::Dir { path }
            | FdKind::CharDev { path, .. }
            | FdKind::Tty { path, .. }
            | FdKind::Fifo { path, .. } => path,
            _ => continue,
        };
        list.push(Access {
            what: format!("fd {}", f.info.fd),
            path,
            mode: access_mode(f.info.flags),
        });
    }
    // A socket bound to a path: the restore binds it again, which needs
    // its directory writable.
    for f in &p.fds {
        if let FdKind::UnixSocket {
            name: Some(n),
            file: Some(_),
            ..
        } = &f.info.kind
        {
            let Some((dir, _)) = std::str::from_utf8(n).ok().and_then(|n| n.rsplit_once('/'))
            else {
                return Err(format!(
                    "fd {}: a socket bound to a path tern cannot check ({:?})",
                    f.info.fd,
                    String::from_utf8_lossy(n)
                ));
            };
            let dir = if dir.is_empty() { "/" } else { dir };
            list.push(Access {
                what: format!("the directory of fd {}'s socket", f.info.fd),
                path: dir,
                mode: libc::W_OK | libc::X_OK,
            });
        }
    }
    for v in vmas {
        if let Some(path) = v
            .backing_file()
            .filter(|_| (!v.dumped || v.is_private()) && v.unlinked_key().is_none())
        {
            let mode = if !v.is_private() && v.perms.write {
                libc::R_OK | libc::W_OK
            } else {
                libc::R_OK
            };
            list.push(Access {
                what: format!("the mapping {:#x}-{:#x}", v.start, v.end),
                path,
                mode,
            });
        }
    }
    if p.exe_unlinked.is_none() {
        list.push(Access {
            what: "the executable".into(),
            path: &p.exe,
            mode: libc::R_OK | libc::X_OK,
        });
    }
    list.push(Access {
        what: "the working directory".into(),
        path: &p.cwd,
        mode: libc::X_OK,
    });
    let c = p.creds.clone();
    let items: Vec<(String, String, i32)> = list
        .into_iter()
        .map(|a| (a.what, a.path.to_string(), a.mode))
        .collect();
    std::thread::scope(|s| {
        s.spawn(move || as_user_thread(&c, &items))
            .join()
            .unwrap_or_else(|_| Err("the access check panicked".into()))
    })
}

/// Runs in a thread of its own, which it changes for good: the image's
/// groups and filesystem ids, then the checks.
fn as_user_thread(c: &Creds, items: &[(String, String, i32)]) -> Result<(), String> {
    let uid = c.uid[3];
    let gid = c.gid[3];
    // Raw syscalls: glibc's wrappers would change every thread of tern.
    // SAFETY: setgroups reads `groups` (len given); setfsgid/setfsuid take ids.
    unsafe {
        let groups: Vec<libc::gid_t> = c.groups.clone();
        if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
            return Err(format!(
                "taking the image's groups to check its files: {}",
                std::io::Error::last_os_error()
            ));
        }
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
        if libc::syscall(libc::SYS_setfsuid, u32::MAX) != i64::from(uid)
            || libc::syscall(libc::SYS_setfsgid, u32::MAX) != i64::from(gid)
        {
            return Err(format!(
                "cannot take uid {uid} / gid {gid} to check the image's files"
            ));
        }
    }
    for (what, path, mode) in items {
        let Ok(cpath) = std::ffi::CString::new(path.as_bytes()) else {
            return Err(format!("{what}: {path:?} holds a NUL byte"));
        };
        // SAFETY: faccessat on a NUL-terminated path.
        let r = unsafe { libc::faccessat(libc::AT_FDCWD, cpath.as_ptr(), *mode, libc::AT_EACCESS) };
        if r != 0 {
            return Err(format!(
                "{what} ({path}): uid {uid} (gid {gid}, groups {:?}) cannot {}: {}",
                c.groups,
                needs(*mode),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// What the trust rules say of a chain, for a restore: the writer, or why
/// it is refused. `dir` names the chain in messages.
pub fn chain_verdict(
    chain: &ImageChain,
    process: &ProcessImage,
    restorer: &Restorer,
    dir: &Path,
) -> Result<Writer, String> {
    let writer = chain_writer(chain)?;
    check_creds(process, &writer, restorer)?;
    if matches!(writer, Writer::User { .. }) {
        check_access(process, chain.vmas())?;
        check_limits(process, chain.vmas())?;
        check_scheduling(process)?;
    }
    tracing::debug!(dir = %dir.display(), ?writer, "trust");
    Ok(writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        assert_eq!(cap_names(0), "");
        assert_eq!(cap_names(1 << 21 | 1), "cap_chown,cap_sys_admin");
        assert_eq!(cap_names(1 << 40), "cap_checkpoint_restore");
    }

    fn process(uid: u32, caps: u64) -> ProcessImage {
        let text = include_str!("../tests/data/process-min.json");
        let mut p: ProcessImage = serde_json::from_str(text).unwrap();
        p.creds.uid = [uid; 4];
        p.creds.gid = [uid; 4];
        p.creds.cap_prm = caps;
        p.creds.cap_eff = caps;
        p
    }

    #[test]
    fn a_user_written_image_gets_only_what_the_user_could_give() {
        let root = Restorer {
            uid: [0; 4],
            gid: [0; 4],
            groups: vec![],
            cap_prm: (1 << 41) - 1,
            cap_eff: (1 << 41) - 1,
        };
        let user = Writer::User {
            uid: 1001,
            gids: [1001].into(),
            because: "/home/u/img".into(),
        };
        assert!(check_creds(&process(1001, 0), &user, &root).is_ok());
        let e = check_creds(&process(0, 0), &user, &root).unwrap_err();
        assert!(e.contains("uid 1001") && e.contains("[0, 0, 0, 0]"), "{e}");
        let e = check_creds(&process(1001, 1 << 21), &user, &root).unwrap_err();
        assert!(e.contains("cap_sys_admin"), "{e}");
        // Root-made: anything root has.
        assert!(check_creds(&process(0, (1 << 41) - 1), &Writer::Root, &root).is_ok());
        // A restoring user without a capability the process had.
        let weak = Restorer {
            cap_prm: ((1 << 41) - 1) & !(1 << 23),
            ..root.clone()
        };
        let e = check_creds(&process(0, (1 << 41) - 1), &Writer::Root, &weak).unwrap_err();
        assert!(e.contains("cap_sys_nice"), "{e}");
    }

    #[test]
    fn a_user_written_image_locks_no_more_than_its_limit_and_raises_no_hard_limit() {
        let mut p = process(1001, 0);
        p.rlimits = vec![images::process::Rlimit {
            resource: libc::RLIMIT_MEMLOCK,
            cur: 8192,
            max: 8192,
        }];
        let mut v = VmaRecord::anonymous(0x10000, 0x12000);
        v.vm_flags = vec!["rd".into(), "wr".into(), "lo".into()];
        assert!(check_limits(&p, std::slice::from_ref(&v)).is_ok());
        v.end = 0x13000;
        let e = check_limits(&p, &[v]).unwrap_err();
        assert!(e.contains("12288 bytes of locked memory"), "{e}");
        p.memory_merge = true;
        let e = check_limits(&p, &[]).unwrap_err();
        assert!(e.contains("PR_SET_MEMORY_MERGE"), "{e}");
        p.memory_merge = false;
        p.rlimits = vec![images::process::Rlimit {
            resource: libc::RLIMIT_NOFILE,
            cur: 1024,
            max: u64::MAX,
        }];
        let (_, our_max) = sys::rlimit::get(0, libc::RLIMIT_NOFILE).unwrap();
        if our_max != u64::MAX {
            let e = check_limits(&p, &[]).unwrap_err();
            assert!(e.contains("hard limit"), "{e}");
        }
    }

    #[test]
    fn a_user_written_image_asks_for_no_scheduling_its_user_could_not_set() {
        let mut p = process(1001, 0);
        let nice = |n: i32| images::state::SchedState {
            policy: sys::sched::SCHED_NORMAL,
            reset_on_fork: false,
            nice: n,
            priority: 0,
            runtime_ns: 0,
            deadline_ns: 0,
            period_ns: 0,
            cpus: vec![0],
            ioprio: 0,
        };
        let tid = p.threads[0].tid;
        // Raising nice, SCHED_BATCH/IDLE, the idle I/O class: any user may.
        p.threads[0].sched = Some(images::state::SchedState {
            policy: sys::sched::SCHED_IDLE,
            ioprio: sys::sched::IOPRIO_CLASS_IDLE << sys::sched::IOPRIO_CLASS_SHIFT,
            ..nice(19)
        });
        p.oom_score_adj = Some(500);
        assert!(check_scheduling(&p).is_ok());
        p.threads[0].sched = Some(nice(-5));
        let e = check_scheduling(&p).unwrap_err();
        assert!(e.contains(&format!("nice -5 in thread {tid}")), "{e}");
        // ... unless its RLIMIT_NICE allows it (20 - 25 = -5).
        p.rlimits = vec![images::process::Rlimit {
            resource: libc::RLIMIT_NICE,
            cur: 25,
            max: 25,
        }];
        assert!(check_scheduling(&p).is_ok());
        p.threads[0].sched = Some(images::state::SchedState {
            policy: sys::sched::SCHED_FIFO,
            priority: 10,
            ..nice(0)
        });
        let e = check_scheduling(&p).unwrap_err();
        assert!(e.contains("real-time priority 10"), "{e}");
        p.threads[0].sched = Some(images::state::SchedState {
            ioprio: sys::sched::IOPRIO_CLASS_RT << sys::sched::IOPRIO_CLASS_SHIFT,
            ..nice(0)
        });
        let e = check_scheduling(&p).unwrap_err();
        assert!(e.contains("real-time I/O class"), "{e}");
        p.threads[0].sched = Some(nice(0));
        p.oom_score_adj = Some(-1000);
        let e = check_scheduling(&p).unwrap_err();
        assert!(e.contains("-1000") && e.contains("CAP_SYS_RESOURCE"), "{e}");
        // A process holding CAP_SYS_NICE and CAP_SYS_RESOURCE could.
        let mut q = process(1001, 1 << 23 | 1 << 24);
        q.oom_score_adj = Some(-1000);
        q.threads[0].sched = Some(images::state::SchedState {
            policy: sys::sched::SCHED_FIFO,
            priority: 50,
            ..nice(-20)
        });
        assert!(check_scheduling(&q).is_ok());
    }
}
