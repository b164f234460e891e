//! Memfds and files deleted while open or mapped: which a process holds
//! (through an fd or only a mapping), whether a dump can save them, and
//! their contents saved in a final dump (`images::process::UnlinkedFileState`,
//! data under `pipes/`).
//!
//! Their contents exist only in the kernel, so the final dump reads them
//! while the process is frozen: up to [`LIMIT`] bytes of data each (holes
//! are not data), as CRIU's ghost files. Refused: more data than that, a
//! deleted file that still has a name elsewhere (a copy would split it
//! from that name), a memfd on hugetlbfs.

use std::collections::BTreeMap;

use images::process::{FdImage, UnlinkedFileState};
use images::state::FdKindState;
use sys::proc::Vma;
use sys::unlinked_files::{self as uf, UnlinkedFile};

use crate::maps::VmaPolicy;

/// Most data saved of one such file (the most `pipes/` holds per file).
pub const LIMIT: u64 = images::fsdir::MAX_PIPE_BYTES;

/// Where a process reaches one: an fd, or a VMA that maps it.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    Fd(i32),
    Mapping(u64, u64),
    /// The executable (`/proc/PID/exe`).
    Exe,
}

impl Via {
    fn open(self, pid: i32) -> Result<(std::fs::File, String), uf::UnlinkedFileError> {
        match self {
            Via::Fd(fd) => Ok((uf::open_fd(pid, fd)?, format!("fd {fd} of PID {pid}"))),
            Via::Mapping(s, e) => Ok((
                uf::open_mapping(pid, s, e)?,
                format!("the mapping {s:#x}-{e:#x} of PID {pid}"),
            )),
            Via::Exe => Ok((uf::open_exe(pid)?, format!("the executable of PID {pid}"))),
        }
    }
}

/// A VMA mapping a file that was deleted (or a memfd): not shared
/// anonymous memory (`/dev/zero (deleted)`, SysV), which is dumped as
/// memory.
pub fn maps_unlinked(v: &Vma) -> bool {
    v.is_file()
        && !v.is_shared_anon()
        && v.name.as_deref().is_some_and(|n| n.ends_with(" (deleted)"))
}

/// (device, inode) of what `v` maps, as a `stat` gives them.
pub fn vma_key(v: &Vma) -> (u64, u64) {
    let dev = libc::makedev(v.dev.0.cast_unsigned(), v.dev.1.cast_unsigned());
    (dev, v.inode)
}

/// Why tern cannot save this file, if it cannot. `named` is the path or
/// memfd name as /proc shows it (without ` (deleted)`).
pub fn refusal(pid: i32, via: Via, named: &str) -> Option<(&'static str, String)> {
    let (file, what) = match via.open(pid) {
        Ok(x) => x,
        // Gone meanwhile: nothing to refuse.
        Err(uf::UnlinkedFileError::Open { source, .. })
            if source.raw_os_error() == Some(libc::ENOENT) =>
        {
            return None;
        }
        Err(e) => return Some(("unlinked_file", e.to_string())),
    };
    let info = match uf::inspect(&file, &what) {
        Ok(i) => i,
        Err(e) => return Some(("unlinked_file", e.to_string())),
    };
    let memfd = is_memfd(named, &info);
    let kind = if memfd { "memfd" } else { "deleted_file" };
    if let Some(why) = unsaveable(named, &info) {
        return Some((kind, why));
    }
    match uf::data_extents(&file, &what, info.size) {
        Ok(ext) => {
            let bytes: u64 = ext.iter().map(|e| e.len).sum();
            (bytes > LIMIT).then(|| {
                (
                    kind,
                    format!(
                        "{named} ({}) holds {bytes} bytes of data; tern saves at most {LIMIT} of a file no path reaches",
                        if memfd { "a memfd" } else { "deleted" }
                    ),
                )
            })
        }
        Err(e) => Some((kind, e.to_string())),
    }
}

/// Why a file that is what `info` says cannot be saved, its size apart.
fn unsaveable(named: &str, info: &UnlinkedFile) -> Option<String> {
    if info.hugetlb {
        return Some(format!(
            "{named}: a memfd on hugetlbfs (MFD_HUGETLB): tern cannot restore it yet"
        ));
    }
    (!is_memfd(named, info) && info.nlink > 0).then(|| {
        format!(
            "{named} was deleted but the file keeps {} other name(s): a restore would make a copy apart from them",
            info.nlink
        )
    })
}

fn is_memfd(named: &str, info: &UnlinkedFile) -> bool {
    named.starts_with("/memfd:") && MEMFD_DEV.is_ok_and(|d| d == info.dev)
}

/// The device memfds are on (read once).
static MEMFD_DEV: std::sync::LazyLock<Result<u64, ()>> =
    std::sync::LazyLock::new(|| uf::memfd_device().map_err(|_| ()));

/// What [`capture`] found: the files, and the (device, inode) of the
/// executable if it is one of them.
pub type Captured = (Vec<UnlinkedFileState>, Option<(u64, u64)>);

/// Every memfd and deleted file `fds`, `vmas` and the executable (`exe`
/// as /proc shows it) refer to, once each, with its data put in `pipes`
/// (the process is frozen); and the (device, inode) of a deleted
/// executable.
pub fn capture(
    pid: i32,
    fds: &[FdImage],
    vmas: &[Vma],
    exe: &str,
    ahead: &[UnlinkedFileState],
    pipes: &mut BTreeMap<String, Vec<u8>>,
) -> Result<Captured, String> {
    let mut wanted: Vec<((u64, u64), Via, String)> = Vec::new();
    let mut exe_key = None;
    if let Some(path) = exe.strip_suffix(" (deleted)")
        && !std::path::Path::new(exe).exists()
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(format!("/proc/{pid}/exe"))
            .map_err(|e| format!("the executable of PID {pid}: {e}"))?;
        exe_key = Some((m.dev(), m.ino()));
        wanted.push(((m.dev(), m.ino()), Via::Exe, path.to_string()));
    }
    for f in fds.iter().filter(|f| f.same_as.is_none()) {
        if let FdKindState::File {
            deleted: true,
            dev,
            ino,
            path,
            ..
        } = &f.info.kind
        {
            wanted.push(((*dev, *ino), Via::Fd(f.info.fd), path.clone()));
        }
    }
    for v in vmas.iter().filter(|v| maps_unlinked(v)) {
        let name = v.name.as_deref().unwrap_or("");
        let named = name.strip_suffix(" (deleted)").unwrap_or(name);
        wanted.push((vma_key(v), Via::Mapping(v.start, v.end), named.to_string()));
    }
    let mut out: Vec<UnlinkedFileState> = Vec::new();
    for ((dev, ino), via, named) in wanted {
        if out.iter().any(|u| (u.dev, u.ino) == (dev, ino)) {
            continue;
        }
        // Its contents read before the freeze (they cannot have changed
        // since); what can (mode, owner, more seals) is read now.
        if let Some(u) = ahead.iter().find(|u| (u.dev, u.ino) == (dev, ino)) {
            let (file, what) = via.open(pid).map_err(|e| e.to_string())?;
            let info = uf::inspect(&file, &what).map_err(|e| e.to_string())?;
            out.push(UnlinkedFileState {
                mode: info.mode,
                uid: info.uid,
                gid: info.gid,
                seals: if u.memfd.is_some() {
                    info.seals.unwrap_or(u.seals)
                } else {
                    0
                },
                ..u.clone()
            });
            continue;
        }
        let (state, data) = read_one(pid, via, named, (dev, ino))?;
        pipes.insert(state.data.clone(), data);
        out.push(state);
    }
    Ok((out, exe_key))
}

/// The state and contents of one such file.
fn read_one(
    pid: i32,
    via: Via,
    named: String,
    (dev, ino): (u64, u64),
) -> Result<(UnlinkedFileState, Vec<u8>), String> {
    let (file, what) = via.open(pid).map_err(|e| e.to_string())?;
    let info = uf::inspect(&file, &what).map_err(|e| e.to_string())?;
    // What `refusal` says, on this one open (the size by the read itself).
    if let Some(why) = unsaveable(&named, &info) {
        return Err(why);
    }
    let (extents, data) =
        uf::read_contents(&file, &what, info.size, LIMIT).map_err(|e| e.to_string())?;
    let memfd = is_memfd(&named, &info);
    let name = format!("unlinked-{dev}-{ino}.bin");
    Ok((
        UnlinkedFileState {
            dev,
            ino,
            memfd: memfd.then(|| named.trim_start_matches("/memfd:").to_string()),
            path: if memfd { String::new() } else { named },
            size: info.size,
            mode: info.mode,
            uid: info.uid,
            gid: info.gid,
            seals: if memfd { info.seals.unwrap_or(0) } else { 0 },
            data: name,
            extents: extents.into_iter().map(|e| (e.offset, e.len)).collect(),
        },
        data,
    ))
}

/// Before a freeze: the files of `pid` that cannot change until it, and
/// their contents: its deleted executable (`exe` as /proc shows it: the
/// kernel refuses to write a file that is some process's executable, and
/// refused the exec while anyone could write it) and memfds sealed
/// against writing, shrinking and growing. What is read now is what a
/// frozen read would find, and the freeze does not wait for it. Files that
/// cannot be told stable, are refused or cannot be read are left to the
/// frozen capture.
pub fn read_stable(pid: i32, exe: &str) -> Vec<(UnlinkedFileState, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<(UnlinkedFileState, Vec<u8>)> = Vec::new();
    if let Some(path) = exe.strip_suffix(" (deleted)")
        && !std::path::Path::new(exe).exists()
        && let Ok(m) = std::fs::metadata(format!("/proc/{pid}/exe"))
        && let Ok(x) = read_one(pid, Via::Exe, path.to_string(), (m.dev(), m.ino()))
    {
        out.push(x);
    }
    // Sealed memfds, through an fd or a mapping.
    const SEALED: u32 = uf::F_SEAL_WRITE | uf::F_SEAL_SHRINK | uf::F_SEAL_GROW;
    let mut candidates: Vec<(Via, String)> = Vec::new();
    for f in sys::fds::fd_table(pid).unwrap_or_default() {
        if let sys::fds::FdKind::File {
            path,
            deleted: true,
            ..
        } = f.kind
            && path.starts_with("/memfd:")
        {
            candidates.push((Via::Fd(f.fd), path));
        }
    }
    for v in crate::maps::read_vmas(pid).unwrap_or_default() {
        if maps_unlinked(&v)
            && let Some(n) = v.name.as_deref().and_then(|n| n.strip_suffix(" (deleted)"))
            && n.starts_with("/memfd:")
        {
            candidates.push((Via::Mapping(v.start, v.end), n.to_string()));
        }
    }
    for (via, named) in candidates {
        let Ok((file, what)) = via.open(pid) else {
            continue;
        };
        let Ok(info) = uf::inspect(&file, &what) else {
            continue;
        };
        let key = (info.dev, info.ino);
        if !is_memfd(&named, &info)
            || info.seals.is_none_or(|s| s & SEALED != SEALED)
            || out.iter().any(|(u, _)| (u.dev, u.ino) == key)
        {
            continue;
        }
        if let Ok(x) = read_one(pid, via, named, key) {
            out.push(x);
        }
    }
    out
}
