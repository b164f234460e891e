//! Tamper evidence for images made on this host.
//!
//! Every image tern writes as root carries a seal in its inventory: an
//! HMAC-SHA256, under a key only root on this host can read
//! (`/var/lib/tern/seal.key`, made on first use), of the inventory itself
//! and of the SHA-256 of `mm.json`, `pagemap.img`, `process.json` and the
//! pipe contents. What the restore does with it:
//!
//! - made with this host's key and matching: the image is as tern wrote it;
//! - made with this host's key and not matching: the process state, VMA
//!   list or page map was changed after tern wrote it, by whoever could
//!   write the files (root included): the restore refuses the image;
//! - made elsewhere (another host's key) or not sealed: nothing is known
//!   from the seal; who may have written the files decides (the restorer's
//!   trust rules).
//!
//! `pages.img` is not covered (hashing it would cost the dump's frozen
//! time); its blobs carry CRC32s, which catch damage, not forgery: the
//! ownership rules are what keep a forged `pages.img` from reaching a
//! process with more privileges than its writer.

use crate::state::hex_bytes;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;

/// Where this host's key lives.
pub const KEY_DIR: &str = "/var/lib/tern";
pub const KEY_FILE: &str = "seal.key";
const KEY_LEN: usize = 32;
const DOMAIN: &[u8] = b"tern-image-seal-v1\0";

/// The seal of one image, in its `inventory.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// Which key made it: a hash of the key (not secret).
    pub key_id: String,
    /// HMAC-SHA256 over the inventory (without this field) and the file
    /// digests, hex.
    pub mac: String,
}

/// What an image's seal says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealStatus {
    /// Made with this host's key, and the image is as it was sealed.
    Valid,
    /// Made with this host's key, and something it covers changed since.
    Mismatch,
    /// Made with another key (another host, or a key since replaced).
    Foreign,
    /// No seal (written without root, or by a tern that could not read the
    /// key), or no key on this host to check it with.
    Unsealed,
}

/// A key to seal and check images with.
#[derive(Clone)]
pub struct SealKey {
    key: [u8; KEY_LEN],
    id: String,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey").field("id", &self.id).finish()
    }
}

impl SealKey {
    pub fn from_bytes(key: [u8; KEY_LEN]) -> SealKey {
        let mut h = Sha256::new();
        h.update(b"tern-seal-key-id\0");
        h.update(key);
        let id = hex_bytes::encode(&h.finalize()[..8]);
        SealKey { key, id }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn key_path() -> PathBuf {
        Path::new(KEY_DIR).join(KEY_FILE)
    }

    /// This host's key, if tern may trust it: a 32-byte regular file owned
    /// by root, readable by nobody else, in a root-owned directory nobody
    /// else may write. None otherwise (not root, no key yet, or a key file
    /// someone else could have planted: a warning says so).
    pub fn host() -> Option<SealKey> {
        let path = Self::key_path();
        let dir = std::fs::symlink_metadata(KEY_DIR).ok()?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ok()?;
        let md = f.metadata().ok()?;
        let safe = dir.is_dir()
            && dir.uid() == 0
            && dir.mode() & 0o022 == 0
            && md.is_file()
            && md.uid() == 0
            && md.mode() & 0o077 == 0
            && md.len() == KEY_LEN as u64;
        if !safe {
            tracing::warn!(
                "{} is not a root-only {KEY_LEN}-byte file in a root-only directory: images are neither sealed nor checked with it",
                path.display()
            );
            return None;
        }
        let mut key = [0u8; KEY_LEN];
        std::io::Read::read_exact(&mut &f, &mut key).ok()?;
        Some(SealKey::from_bytes(key))
    }

    /// This host's key, made now if there is none (root only; None for
    /// another user, who cannot read it either).
    pub fn host_or_create() -> Result<Option<SealKey>, ImageError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        if let Some(k) = Self::host() {
            return Ok(Some(k));
        }
        let path = Self::key_path();
        if path.symlink_metadata().is_ok() {
            // There, but not trustworthy (host() said why): do not replace
            // it behind the administrator's back.
            return Ok(None);
        }
        let dir = Path::new(KEY_DIR);
        std::fs::create_dir_all(dir).map_err(|e| ImageError::io(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ImageError::io(dir, e))?;
        let mut key = [0u8; KEY_LEN];
        let mut got = 0;
        while got < KEY_LEN {
            // SAFETY: getrandom into the rest of a local buffer.
            let n = unsafe { libc::getrandom(key[got..].as_mut_ptr().cast(), KEY_LEN - got, 0) };
            if n <= 0 {
                return Err(ImageError::io(&path, std::io::Error::last_os_error()));
            }
            got += n as usize;
        }
        // A temporary file renamed into place: two terns making the key at
        // once end with one of the two, whole.
        let tmp = dir.join(format!("{KEY_FILE}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, &path).or_else(|e| {
                // Someone else made it first: theirs stands.
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        };
        let r = write();
        let _ = std::fs::remove_file(&tmp);
        r.map_err(|e| ImageError::io(&path, e))?;
        Ok(Self::host())
    }

    /// The MAC of an inventory (serialized without its seal) and the
    /// digests of the files it covers.
    pub fn mac(&self, inventory: &[u8], files: &[(String, [u8; 32])]) -> String {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        m.update(DOMAIN);
        let mut files: Vec<&(String, [u8; 32])> = files.iter().collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, digest) in files {
            m.update(&(name.len() as u64).to_le_bytes());
            m.update(name.as_bytes());
            m.update(digest);
        }
        m.update(&(inventory.len() as u64).to_le_bytes());
        m.update(inventory);
        hex_bytes::encode(&m.finalize().into_bytes())
    }

    pub fn seal(&self, inventory: &[u8], files: &[(String, [u8; 32])]) -> Seal {
        Seal {
            key_id: self.id.clone(),
            mac: self.mac(inventory, files),
        }
    }

    pub fn check(&self, seal: &Seal, inventory: &[u8], files: &[(String, [u8; 32])]) -> SealStatus {
        if seal.key_id != self.id {
            return SealStatus::Foreign;
        }
        let want = self.mac(inventory, files);
        // Constant time is not needed against an attacker who can read
        // neither the key nor the MAC's inputs' secret: the MAC is public.
        if want == seal.mac {
            SealStatus::Valid
        } else {
            SealStatus::Mismatch
        }
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_input_does_not_match() {
        let k = SealKey::from_bytes([7; 32]);
        let files = vec![("mm.json".to_string(), digest(b"a"))];
        let s = k.seal(b"{inv}", &files);
        assert_eq!(k.check(&s, b"{inv}", &files), SealStatus::Valid);
        assert_eq!(k.check(&s, b"{inv2}", &files), SealStatus::Mismatch);
        let other = vec![("mm.json".to_string(), digest(b"b"))];
        assert_eq!(k.check(&s, b"{inv}", &other), SealStatus::Mismatch);
        let renamed = vec![("process.json".to_string(), digest(b"a"))];
        assert_eq!(k.check(&s, b"{inv}", &renamed), SealStatus::Mismatch);
        let k2 = SealKey::from_bytes([8; 32]);
        assert_eq!(k2.check(&s, b"{inv}", &files), SealStatus::Foreign);
    }
}
