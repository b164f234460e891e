//! The file a unix socket bound to a path makes: a stale one (no socket
//! bound to it) removed before the bind, since a bind needs the name free; anything else at the path is
//! left alone and the restore fails naming it. The new file then gets
//! the owner and mode the dumped one had (as far as the image's writer
//! could give them).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use images::state::UnixSocketFile;

fn path(n: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(n))
}

/// Remove the socket file at `n` if it is stale: a socket file no socket
/// of this network namespace is bound to (sock_diag lists none with its
/// inode): the dumped process's, once it is gone, or one an earlier
/// restore that failed left. A bound one is left alone. (Asked of
/// sock_diag, not by connecting: a connect to a frozen process's
/// listener would queue a connection it never made. A process in
/// another network namespace is not seen: a migration's source, frozen
/// on the same file system, loses the name to its copy.)
pub(crate) fn clear_stale(n: &[u8], file: &UnixSocketFile) -> Result<(), String> {
    let p = path(n);
    let m = match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", p.display())),
        Ok(m) => m,
    };
    let key = (m.dev(), m.ino());
    let bound = sys::unix_sockets::all()
        .map_err(|e| format!("{}: {e}", p.display()))?
        .values()
        .any(|s| s.file == Some(key));
    tracing::debug!(
        path = %p.display(),
        dumped = key == (file.dev, file.ino),
        bound,
        "a socket file where a socket is to be bound"
    );
    if m.file_type().is_socket() && !bound {
        return std::fs::remove_file(p)
            .map_err(|e| format!("removing the stale {}: {e}", p.display()));
    }
    Err(format!(
        "{} is taken (by a bound socket, or a file other than a socket): stop what holds it, or restore where the name is free",
        p.display()
    ))
}

/// Give the socket file just bound at `n` its owner and mode.
pub(crate) fn give(n: &[u8], owner: (u32, u32), mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = path(n);
    // The file itself, held without following a link (the name could be
    // swapped for one between the bind and the chmod): chown and chmod
    // go through that handle.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    let m = f.metadata().map_err(|e| format!("{}: {e}", p.display()))?;
    if !m.file_type().is_socket() {
        return Err(format!("{} is not the socket just bound", p.display()));
    }
    let held = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
    std::os::unix::fs::chown(&held, Some(owner.0), Some(owner.1))
        .map_err(|e| format!("chown of {}: {e}", p.display()))?;
    std::fs::set_permissions(&held, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod of {}: {e}", p.display()))
}
