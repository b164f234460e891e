//! Pre-shared keys: `tern keygen FILE` makes one, both ends of a page server
//! or a migration load it. A key file is 32 random bytes in hex under a
//! header line; it is refused unless it is a regular file owned by this
//! user and neither readable nor writable by anyone else (whoever can read
//! it can pose as either end), and it is never followed through a link.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The first line of every key file.
const HEADER: &str = "tern-key 1";
/// Bytes of a key.
pub const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {why}")]
    Refused { path: PathBuf, why: String },
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no random bytes for a new key: {0}")]
    Random(String),
}

/// A pre-shared key. Its bytes are never printed.
#[derive(Clone)]
pub struct Key([u8; KEY_BYTES]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A new random key.
    pub fn generate() -> Result<Key, KeyError> {
        let mut k = [0u8; KEY_BYTES];
        getrandom::fill(&mut k).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Key(k))
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// Write a new key file at `path` (mode 0600). An existing file, or a
    /// link, is left alone and refused: a key is never overwritten.
    pub fn write_new(path: &Path) -> Result<Key, KeyError> {
        let key = Key::generate()?;
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Refused {
                        path: path.to_path_buf(),
                        why: "already exists; tern keygen never overwrites a key (remove it first)"
                            .into(),
                    }
                } else {
                    io(e)
                }
            })?;
        let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
        f.write_all(format!("{HEADER}\n{hex}\n").as_bytes())
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(key)
    }

    /// Load the key at `path`, refusing a file others could read or write.
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let refuse = |why: String| KeyError::Refused {
            path: path.to_path_buf(),
            why,
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    refuse("is a symbolic link; give the key file itself".into())
                } else {
                    KeyError::Io {
                        path: path.to_path_buf(),
                        source: e,
                    }
                }
            })?;
        let st = nix::sys::stat::fstat(f.as_raw_fd()).map_err(|e| KeyError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(refuse("is not a regular file".into()));
        }
        let me = nix::unistd::geteuid().as_raw();
        if st.st_uid != me {
            return Err(refuse(format!(
                "is owned by UID {}, not by this user (UID {me}); keep keys in files of your own",
                st.st_uid
            )));
        }
        if st.st_mode & 0o077 != 0 {
            return Err(refuse(format!(
                "mode {:o} lets others read or write it; run `chmod 600 {}`",
                st.st_mode & 0o777,
                path.display()
            )));
        }
        let mut text = String::new();
        (&mut f)
            .take(1024)
            .read_to_string(&mut text)
            .map_err(|e| KeyError::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(refuse(format!(
                "does not start with `{HEADER}`: not a key `tern keygen` made"
            )));
        }
        let hex = lines.next().unwrap_or("").trim();
        if hex.len() != KEY_BYTES * 2 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(refuse(format!(
                "its second line is not {} hex digits",
                KEY_BYTES * 2
            )));
        }
        let mut k = [0u8; KEY_BYTES];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16)
                .map_err(|e| refuse(e.to_string()))?;
        }
        Ok(Key(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_key_loads_back_and_is_not_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        let k = Key::write_new(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Key::load(&p).unwrap().bytes(), k.bytes());
        let e = Key::write_new(&p).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(Key::load(&p).unwrap().bytes(), k.bytes());
        assert_ne!(Key::generate().unwrap().bytes(), k.bytes());
    }

    #[test]
    fn keys_others_can_read_links_and_other_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        Key::write_new(&p).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Key::load(&p).unwrap_err().to_string();
            assert!(e.contains("lets others read or write"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        Key::load(&p).unwrap();
        let l = d.path().join("link");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        let e = Key::load(&l).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = Key::write_new(&l).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = Key::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let bad = d.path().join("bad");
        std::fs::write(&bad, "tern-key 1\nzz\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            Key::load(&bad)
                .unwrap_err()
                .to_string()
                .contains("hex digits")
        );
        std::fs::write(&bad, "ssh-rsa AAAA\n").unwrap();
        assert!(
            Key::load(&bad)
                .unwrap_err()
                .to_string()
                .contains("tern keygen")
        );
    }
}
