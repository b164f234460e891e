//! The directory of an image about to be written (`tern pre-dump -D`,
//! `tern dump -D`): checked and created before the target is touched, and
//! cleaned up if the command fails, so a failed run leaves neither a partial
//! image nor the directories it created. Here rather than in the CLI because
//! it is the image format that says which files a partial image consists of
//! (see [`crate::discard_unfinished`]).

use crate::{INVENTORY_FILE, ImageDir, ImageError, discard_unfinished};
use std::path::{Path, PathBuf};

/// Why a directory cannot receive a new image.
#[derive(Debug, thiserror::Error)]
pub enum NewDirError {
    #[error("images dir: {source}")]
    Unusable {
        #[source]
        source: ImageError,
    },
    #[error("images dir {}: already holds an image; give an empty directory", path.display())]
    Occupied { path: PathBuf },
    #[error("images dir {}: not writable: {source}", path.display())]
    NotWritable {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
}

/// The `-D` of a new image: checked and created (see [`ImageDir::create`]:
/// no symlink, no directory others may write), with nothing in it yet. If
/// the command fails (this is dropped without [`NewImageDir::keep`]), what
/// it left there goes, and so do the directories it created if they are
/// empty again.
pub struct NewImageDir {
    path: PathBuf,
    /// Directories this run created, outermost first.
    created: Vec<PathBuf>,
    done: bool,
}

impl NewImageDir {
    pub fn prepare(dir: &Path) -> Result<NewImageDir, NewDirError> {
        let mut created = Vec::new();
        let mut p = dir;
        while p.symlink_metadata().is_err() {
            created.push(p.to_path_buf());
            match p.parent() {
                Some(q) if !q.as_os_str().is_empty() => p = q,
                _ => break,
            }
        }
        created.reverse();
        let mut me = NewImageDir {
            path: dir.to_path_buf(),
            created,
            done: false,
        };
        let d = ImageDir::create(dir).map_err(|source| NewDirError::Unusable { source })?;
        if d.exists(INVENTORY_FILE) {
            me.done = true; // not ours to clean
            return Err(NewDirError::Occupied {
                path: dir.to_path_buf(),
            });
        }
        // Writable? A probe created O_EXCL | O_NOFOLLOW, then removed.
        let probe = format!(".tern-probe-{}", std::process::id());
        let not_writable = |source| NewDirError::NotWritable {
            path: dir.to_path_buf(),
            source,
        };
        d.create_file(&probe).map_err(not_writable)?;
        d.remove_file(&probe).map_err(not_writable)?;
        Ok(me)
    }

    /// The command succeeded: keep what it wrote.
    pub fn keep(mut self) {
        self.done = true;
    }
}

impl Drop for NewImageDir {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match discard_unfinished(&self.path) {
            Ok(true) => {
                for d in self.created.iter().rev() {
                    if std::fs::remove_dir(d).is_err() {
                        break;
                    }
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("cleaning up {}: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_leaves_no_partial_image_nor_the_directories_it_created() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("a/b/img");
        let new = NewImageDir::prepare(&dir).unwrap();
        std::fs::write(dir.join(crate::PAGES_FILE), b"partial").unwrap();
        drop(new);
        assert!(!t.path().join("a").exists(), "created directories remain");
    }

    #[test]
    fn a_kept_image_stays() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        let new = NewImageDir::prepare(&dir).unwrap();
        std::fs::write(dir.join(crate::PAGES_FILE), b"data").unwrap();
        new.keep();
        assert!(dir.join(crate::PAGES_FILE).exists());
    }

    #[test]
    fn a_directory_holding_an_image_is_refused_and_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("img");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(INVENTORY_FILE), b"{}").unwrap();
        let e = NewImageDir::prepare(&dir).err().expect("refused");
        assert!(matches!(e, NewDirError::Occupied { .. }), "{e}");
        assert!(e.to_string().contains("give an empty directory"), "{e}");
        assert!(dir.join(INVENTORY_FILE).exists());
    }
}
