//! `failfs MOUNTPOINT`: an in-memory FUSE file system on which fsync(2) of a
//! file or of a directory always fails with EIO, for tests of tern's
//! durability: `tern dump` must refuse, before it freezes its target, to
//! write images where they cannot be made durable.
//!
//! Everything else is a small, ordinary tree: files (sparse reads as zeros;
//! fallocate mode 0 and KEEP_SIZE, EOPNOTSUPP for punching holes),
//! directories, symlinks, hard links, mknod, rename with or without
//! replacing. Writes are visible at once. New nodes belong to the caller's
//! uid/gid (a setgid directory's gid) with the mode the kernel passes (umask
//! applied). Mounted by mount(2) itself (root only, no fusermount) with
//! default_permissions, so the kernel enforces the modes, and allow_other,
//! so every user reaches it.
//!
//! Prints `ready` once the mount answers; serves until stdin reaches EOF or
//! SIGTERM/SIGINT, then detaches the mount (MNT_DETACH) and exits 0.

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session, TimeOrNow,
};
use libc::{EEXIST, EINVAL, EIO, EISDIR, ENOENT, ENOSPC, ENOTDIR, ENOTEMPTY, EOPNOTSUPP, c_int};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = fuser::FUSE_ROOT_ID;
/// Largest file: it lives in memory.
const MAX_SIZE: u64 = 4 << 30;

type Res<T> = Result<T, c_int>;

struct Node {
    attr: FileAttr,
    /// A regular file's bytes (always `attr.size` long).
    data: Vec<u8>,
    /// A symlink's target.
    link: OsString,
    /// A directory's entries, and its parent (for `..`).
    children: BTreeMap<OsString, u64>,
    parent: u64,
    /// References the kernel holds (entries replied minus forgets).
    lookups: u64,
}

impl Node {
    fn new(ino: u64, kind: FileType, perm: u32, uid: u32, gid: u32, parent: u64) -> Node {
        let now = SystemTime::now();
        let attr = FileAttr {
            ino,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm: (perm & 0o7777) as u16,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        let (data, link, children) = (Vec::new(), OsString::new(), BTreeMap::new());
        Node {
            attr,
            data,
            link,
            children,
            parent,
            lookups: 1,
        }
    }

    fn is_dir(&self) -> bool {
        self.attr.kind == FileType::Directory
    }

    /// mtime and ctime to now.
    fn touch(&mut self) {
        self.attr.mtime = SystemTime::now();
        self.attr.ctime = self.attr.mtime;
    }

    fn resize(&mut self, size: u64) -> Res<()> {
        if self.attr.kind != FileType::RegularFile {
            return Err(if self.is_dir() { EISDIR } else { EINVAL });
        }
        if size > MAX_SIZE {
            return Err(ENOSPC);
        }
        self.data.resize(sys::usize_of(size), 0);
        self.attr.size = size;
        self.attr.blocks = size.div_ceil(512);
        Ok(())
    }
}

struct FailFs {
    nodes: HashMap<u64, Node>,
    next: u64,
}

impl FailFs {
    fn get(&mut self, ino: u64) -> Res<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(ENOENT)
    }

    fn dir(&mut self, ino: u64) -> Res<&mut Node> {
        let n = self.get(ino)?;
        if n.is_dir() { Ok(n) } else { Err(ENOTDIR) }
    }

    fn child(&mut self, parent: u64, name: &OsStr) -> Res<u64> {
        self.dir(parent)?.children.get(name).copied().ok_or(ENOENT)
    }

    /// The node at `name` in `parent`, counted as looked up (it is replied).
    fn lookup_(&mut self, parent: u64, name: &OsStr) -> Res<&mut Node> {
        let n = self.child(parent, name).and_then(|ino| self.get(ino))?;
        n.lookups += 1;
        Ok(n)
    }

    /// A new node `name` in `parent`, counted as looked up.
    fn make(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        kind: FileType,
        mode: u32,
    ) -> Res<&mut Node> {
        let ino = self.next;
        let p = self.dir(parent)?;
        if p.children.contains_key(name) {
            return Err(EEXIST);
        }
        let setgid = u32::from(p.attr.perm) & libc::S_ISGID != 0;
        let gid = if setgid { p.attr.gid } else { req.gid() };
        let dir = kind == FileType::Directory;
        let mode = if setgid && dir {
            mode | libc::S_ISGID
        } else {
            mode
        };
        p.children.insert(name.to_owned(), ino);
        p.touch();
        p.attr.nlink += dir as u32;
        self.next += 1;
        let node = Node::new(ino, kind, mode, req.uid(), gid, parent);
        Ok(self.nodes.entry(ino).or_insert(node))
    }

    fn maybe_free(&mut self, ino: u64) {
        let Some(n) = self.nodes.get(&ino) else {
            return;
        };
        if ino != ROOT && n.attr.nlink == 0 && n.lookups == 0 {
            self.nodes.remove(&ino);
        }
    }

    /// Remove the entry `name` of `parent`, which must be a directory iff `dir`.
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        let n = self.child(parent, name).and_then(|ino| self.get(ino))?;
        match (dir, n.is_dir()) {
            (true, false) => return Err(ENOTDIR),
            (false, true) => return Err(EISDIR),
            (true, true) if !n.children.is_empty() => return Err(ENOTEMPTY),
            _ => {}
        }
        n.attr.ctime = SystemTime::now();
        n.attr.nlink = if dir { 0 } else { n.attr.nlink - 1 };
        let ino = n.attr.ino;
        let p = self.get(parent)?;
        p.children.remove(name);
        p.touch();
        p.attr.nlink -= dir as u32;
        self.maybe_free(ino);
        Ok(())
    }

    fn rename_(&mut self, parent: u64, name: &OsStr, np: u64, nn: &OsStr, flags: u32) -> Res<()> {
        const NOREPLACE: u32 = 1;
        if flags & !NOREPLACE != 0 {
            return Err(EINVAL); // RENAME_EXCHANGE, RENAME_WHITEOUT
        }
        let src = self.child(parent, name)?;
        let dir = self.get(src)?.is_dir();
        if let Some(&dst) = self.dir(np)?.children.get(nn) {
            if flags & NOREPLACE != 0 {
                return Err(EEXIST);
            }
            if dst == src {
                return Ok(());
            }
            self.remove(np, nn, dir)?;
        }
        let p = self.get(parent)?;
        p.children.remove(name);
        p.touch();
        p.attr.nlink -= dir as u32;
        let q = self.get(np)?;
        q.children.insert(nn.to_owned(), src);
        q.touch();
        q.attr.nlink += dir as u32;
        let s = self.get(src)?;
        s.attr.ctime = SystemTime::now();
        s.parent = np;
        Ok(())
    }

    fn link_(&mut self, ino: u64, np: u64, nn: &OsStr) -> Res<&mut Node> {
        if self.get(ino)?.is_dir() {
            return Err(libc::EPERM);
        }
        let p = self.dir(np)?;
        if p.children.contains_key(nn) {
            return Err(EEXIST);
        }
        p.children.insert(nn.to_owned(), ino);
        p.touch();
        let n = self.get(ino)?;
        n.attr.nlink += 1;
        n.attr.ctime = SystemTime::now();
        n.lookups += 1;
        Ok(n)
    }
}

fn entry(r: Res<&mut Node>, reply: ReplyEntry) {
    match r {
        Ok(n) => reply.entry(&TTL, &n.attr, 0),
        Err(e) => reply.error(e),
    }
}

fn empty(r: Res<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for FailFs {
    fn lookup(&mut self, _: &Request, parent: u64, name: &OsStr, reply: ReplyEntry) {
        entry(self.lookup_(parent, name), reply);
    }

    fn forget(&mut self, _: &Request, ino: u64, nlookup: u64) {
        if let Ok(n) = self.get(ino) {
            n.lookups = n.lookups.saturating_sub(nlookup);
            self.maybe_free(ino);
        }
    }

    fn getattr(&mut self, _: &Request, ino: u64, _: Option<u64>, reply: ReplyAttr) {
        match self.get(ino) {
            Ok(n) => reply.attr(&TTL, &n.attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _: &Request,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _: Option<u64>,
        _: Option<SystemTime>,
        _: Option<SystemTime>,
        _: Option<SystemTime>,
        _: Option<u32>,
        reply: ReplyAttr,
    ) {
        let r = self.get(ino).and_then(|n| {
            if let Some(size) = size {
                n.resize(size)?;
                n.attr.mtime = SystemTime::now();
            }
            n.attr.perm = mode.map_or(n.attr.perm, |m| (m & 0o7777) as u16);
            n.attr.uid = uid.unwrap_or(n.attr.uid);
            n.attr.gid = gid.unwrap_or(n.attr.gid);
            n.attr.atime = atime.map_or(n.attr.atime, time);
            n.attr.mtime = mtime.map_or(n.attr.mtime, time);
            n.attr.ctime = ctime.unwrap_or_else(SystemTime::now);
            Ok(n.attr)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _: &Request, ino: u64, reply: ReplyData) {
        match self.get(ino) {
            Ok(n) if n.attr.kind == FileType::Symlink => reply.data(n.link.as_bytes()),
            Ok(_) => reply.error(EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &mut self,
        r: &Request,
        p: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => FileType::RegularFile,
            libc::S_IFIFO => FileType::NamedPipe,
            libc::S_IFSOCK => FileType::Socket,
            libc::S_IFCHR => FileType::CharDevice,
            libc::S_IFBLK => FileType::BlockDevice,
            _ => return reply.error(EINVAL),
        };
        let mut n = self.make(r, p, name, kind, mode & !umask);
        if let Ok(n) = &mut n {
            n.attr.rdev = rdev;
        }
        entry(n, reply);
    }

    fn mkdir(&mut self, r: &Request, p: u64, name: &OsStr, mode: u32, umask: u32, re: ReplyEntry) {
        let n = self.make(r, p, name, FileType::Directory, mode & !umask);
        entry(n, re);
    }

    fn unlink(&mut self, _: &Request, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(self.remove(parent, name, false), reply);
    }

    fn rmdir(&mut self, _: &Request, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        empty(self.remove(parent, name, true), reply);
    }

    fn symlink(&mut self, r: &Request, p: u64, name: &OsStr, target: &Path, reply: ReplyEntry) {
        let mut n = self.make(r, p, name, FileType::Symlink, 0o777);
        if let Ok(n) = &mut n {
            n.link = target.as_os_str().to_owned();
            n.attr.size = n.link.len() as u64;
        }
        entry(n, reply);
    }

    fn rename(
        &mut self,
        _: &Request,
        p: u64,
        name: &OsStr,
        np: u64,
        nn: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        empty(self.rename_(p, name, np, nn, flags), reply);
    }

    fn link(&mut self, _: &Request, ino: u64, np: u64, nn: &OsStr, reply: ReplyEntry) {
        entry(self.link_(ino, np, nn), reply);
    }

    fn open(&mut self, _: &Request, ino: u64, _: i32, reply: ReplyOpen) {
        match self.get(ino) {
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _: &Request,
        ino: u64,
        _: u64,
        off: i64,
        size: u32,
        _: i32,
        _: Option<u64>,
        reply: ReplyData,
    ) {
        match self.get(ino) {
            Ok(n) if n.is_dir() => reply.error(EISDIR),
            Ok(n) => {
                let start = usize::try_from(off.max(0)).unwrap().min(n.data.len());
                let end = start.saturating_add(size as usize).min(n.data.len());
                reply.data(&n.data[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _: &Request,
        ino: u64,
        _: u64,
        off: i64,
        data: &[u8],
        _: u32,
        _: i32,
        _: Option<u64>,
        reply: ReplyWrite,
    ) {
        let r = self.get(ino).and_then(|n| {
            let (start, end) = (
                usize::try_from(off.max(0)).unwrap(),
                usize::try_from(off.max(0)).unwrap() + data.len(),
            );
            if end > n.data.len() {
                n.resize(end as u64)?;
            }
            n.data[start..end].copy_from_slice(data);
            n.touch();
            Ok(())
        });
        match r {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap()),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _: &Request, _: u64, _: u64, _: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    /// The point of this file system: nothing ever reaches stable storage.
    /// (ENOSYS would not do: the kernel would stop asking and report success.)
    fn fsync(&mut self, _: &Request, _: u64, _: u64, _: bool, reply: ReplyEmpty) {
        reply.error(EIO);
    }

    fn fsyncdir(&mut self, _: &Request, _: u64, _: u64, _: bool, reply: ReplyEmpty) {
        reply.error(EIO);
    }

    fn opendir(&mut self, _: &Request, ino: u64, _: i32, reply: ReplyOpen) {
        match self.dir(ino) {
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&mut self, _: &Request, ino: u64, _: u64, off: i64, mut reply: ReplyDirectory) {
        let d = match self.dir(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let mut list = vec![(ino, OsString::from(".")), (d.parent, OsString::from(".."))];
        list.extend(d.children.iter().map(|(k, v)| (*v, k.clone())));
        for (i, (ino, name)) in list
            .into_iter()
            .enumerate()
            .skip(usize::try_from(off.max(0)).unwrap())
        {
            let kind = self
                .nodes
                .get(&ino)
                .map_or(FileType::RegularFile, |n| n.attr.kind);
            if reply.add(ino, i as i64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _: &Request, _: u64, reply: ReplyStatfs) {
        let used = self
            .nodes
            .values()
            .map(|n| n.data.len() as u64)
            .sum::<u64>()
            / 4096;
        let (blocks, files) = (MAX_SIZE / 4096 * 4, 1 << 20);
        let free = blocks.saturating_sub(used);
        let ffree = files - (self.nodes.len() as u64).min(files);
        reply.statfs(blocks, free, free, files, ffree, 4096, 255, 4096);
    }

    fn access(&mut self, _: &Request, ino: u64, _: i32, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the modes itself.
        empty(self.get(ino).map(|_| ()), reply);
    }

    fn create(
        &mut self,
        r: &Request,
        p: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        // The kernel has looked `name` up first (O_EXCL); this is for a race.
        let n = match self.child(p, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => Err(EEXIST),
            Ok(_) => self.lookup_(p, name),
            Err(ENOENT) => self.make(r, p, name, FileType::RegularFile, mode & !umask),
            Err(e) => Err(e),
        };
        match n {
            Ok(n) if n.is_dir() => reply.error(EISDIR),
            Ok(n) => reply.created(&TTL, &n.attr, 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &mut self,
        _: &Request,
        ino: u64,
        _: u64,
        off: i64,
        len: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.get(ino).and_then(|n| match mode {
            0 if (off + len) as u64 > n.attr.size => {
                n.resize((off + len) as u64)?;
                n.attr.ctime = SystemTime::now();
                Ok(())
            }
            0 | libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(EOPNOTSUPP), // punching holes and the like: callers take it as best effort
        });
        empty(r, reply);
    }
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.len() != 1 {
        eprintln!("usage: failfs MOUNTPOINT");
        std::process::exit(2);
    }
    match run(Path::new(&args[0])) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("failfs: {e}");
            std::process::exit(1);
        }
    }
}

fn run(mnt: &Path) -> Result<i32, String> {
    // SAFETY: takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: failfs mounts with mount(2) itself (there is no fusermount)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing: no FUSE here (modprobe fuse, or add the device)".into());
    }
    let mnt = mnt
        .canonicalize()
        .map_err(|e| format!("mountpoint {}: {e}", mnt.display()))?;
    if !mnt.is_dir() {
        return Err(format!("mountpoint {}: not a directory", mnt.display()));
    }
    let dev_before = std::fs::metadata(&mnt)
        .map_err(|e| format!("{}: {e}", mnt.display()))?
        .dev();

    // SIGTERM and SIGINT are blocked in every thread; one thread takes them.
    // SAFETY: a plain C struct; all-zero is a valid value.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset operations on a local set; pthread_sigmask reads it and writes no old mask (null).
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }

    let opts = [
        MountOption::FSName("failfs".into()),
        MountOption::DefaultPermissions,
        MountOption::AllowOther,
        MountOption::RW,
    ];
    let mut fs = FailFs {
        nodes: HashMap::new(),
        next: ROOT + 1,
    };
    fs.nodes.insert(
        ROOT,
        Node::new(ROOT, FileType::Directory, 0o755, 0, 0, ROOT),
    );
    let mut session = Session::new(fs, &mnt, &opts).map_err(|e| {
        let m = mnt.display();
        format!("mount(2) of fuse at {m}: {e} (when mount(2) is refused, fuser tries fusermount)")
    })?;

    // Every reason to stop arrives here, with the exit code.
    let (tx, rx) = std::sync::mpsc::channel::<(String, i32)>();
    let t = tx.clone();
    std::thread::spawn(move || {
        let _ = t.send(match session.run() {
            Ok(()) => ("unmounted from outside".into(), 0),
            Err(e) => (format!("session failed: {e}"), 1),
        });
    });
    let t = tx.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = t.send((String::new(), 0));
    });
    std::thread::spawn(move || {
        let mut sig: c_int = 0;
        // SAFETY: sigwait(3) reads a local set and writes one int into a local.
        unsafe { libc::sigwait(&set, &mut sig) };
        let _ = tx.send((String::new(), 0));
    });

    // The first request waits for FUSE_INIT: an answer means the mount serves.
    let (why, code) = match std::fs::metadata(&mnt) {
        Ok(m) if m.dev() != dev_before => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ready").and_then(|_| out.flush());
            drop(out);
            rx.recv().unwrap_or((String::new(), 0))
        }
        Ok(_) => (format!("{}: no new mount appeared", mnt.display()), 1),
        Err(e) => (
            format!("{}: the new mount does not answer: {e}", mnt.display()),
            1,
        ),
    };
    if !why.is_empty() {
        eprintln!("failfs: {why}");
    }
    // Detach even while files are open: never hang here.
    let c = std::ffi::CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: the path is a NUL-terminated CString that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(EINVAL) {
            eprintln!("failfs: umount {}: {e}", mnt.display());
        }
    }
    Ok(code)
}
