//! The file a unix socket bound to a path makes: the stale one the dumped
//! process left (the same inode the dump saw, and a socket) removed before
//! the bind, since a bind needs the name free; anything else at the path
//! is left alone and the restore fails naming it. The new file then gets
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

/// Remove the socket file at `n` if it is the one the dump saw (the
/// dumped process is gone; its file stays until removed).
pub(crate) fn clear_stale(n: &[u8], file: &UnixSocketFile) -> Result<(), String> {
    let p = path(n);
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", p.display())),
        Ok(m) if m.file_type().is_socket() && (m.dev(), m.ino()) == (file.dev, file.ino) => {
            std::fs::remove_file(p).map_err(|e| format!("removing the stale {}: {e}", p.display()))
        }
        Ok(_) => Err(format!(
            "{} is taken by another file than the socket the dump saw: remove it if it is stale, or restore where the name is free",
            p.display()
        )),
    }
}

/// Give the socket file just bound at `n` its owner and mode.
pub(crate) fn give(n: &[u8], owner: (u32, u32), mode: u32) -> Result<(), String> {
    let p = path(n);
    let m = std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !m.file_type().is_socket() {
        return Err(format!("{} is not the socket just bound", p.display()));
    }
    std::os::unix::fs::lchown(p, Some(owner.0), Some(owner.1))
        .map_err(|e| format!("chown of {}: {e}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod of {}: {e}", p.display()))
}
