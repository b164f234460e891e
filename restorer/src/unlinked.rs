//! The memfds and deleted files of an image, made again in tern before the
//! process is built: a memfd with its name, a deleted file deleted again
//! where it was (`sys::unlinked_files::make_deleted`: its name free for a
//! moment, else unnamed in that directory; a memfd where that directory is
//! gone or reached through a link), each with its size, data runs, mode and owner. The process
//! opens them through `/proc/TERN/fd/N` (its fds, with their own flags and
//! offsets; its mappings, shared or private), and a memfd's seals are
//! added once the process is done with them ([`UnlinkedFiles::seal`]).
//!
//! Nothing in the file system is replaced or reached through a link, and a
//! name given is taken away at once, before the file has its contents. What the image's writer could not have given
//! (another owner, setuid or setgid bits) is not given.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use images::process::{ProcessImage, UnlinkedFileState};
use sys::unlinked_files as uf;

use crate::restore::RestoreError;
use crate::trust::Writer;

struct Made {
    fd: OwnedFd,
    /// `/proc/TERN/fd/N`.
    path: String,
    seals: u32,
    what: String,
}

/// (device, inode) as dumped -> the file made again.
#[derive(Default)]
pub(crate) struct UnlinkedFiles(HashMap<(u64, u64), Made>);

impl UnlinkedFiles {
    /// Make every unlinked file of `p` (data from `pipe_data`); `dir`
    /// names the image in errors.
    pub(crate) fn make(
        dir: &Path,
        p: &ProcessImage,
        pipe_data: &BTreeMap<String, Vec<u8>>,
        writer: &Writer,
    ) -> Result<UnlinkedFiles, RestoreError> {
        let mut out = UnlinkedFiles::default();
        for u in &p.unlinked_files {
            let what = u.describe();
            let bad = |why: String| RestoreError::BadImage {
                dir: dir.to_path_buf(),
                what: format!("{what}: {why}"),
            };
            let data = pipe_data
                .get(&u.data)
                .ok_or_else(|| bad(format!("its data {} is not in the image", u.data)))?;
            let stored: u64 = u.extents.iter().map(|e| e.1).sum();
            if stored != data.len() as u64 {
                return Err(bad(format!(
                    "its data runs hold {stored} bytes, its data file {}",
                    data.len()
                )));
            }
            let fd = make_one(u).map_err(|e| RestoreError::Step {
                pid: p.pid,
                step: "making memfds and deleted files",
                what: e.to_string(),
            })?;
            let owner = writer.owner_given(u.uid, u.gid, p.creds.gid[1]);
            let mode = writer.mode_given(u.mode);
            let extents: Vec<uf::Extent> = u
                .extents
                .iter()
                .map(|&(offset, len)| uf::Extent { offset, len })
                .collect();
            uf::fill(&fd, &what, u.size, &extents, data, mode, Some(owner)).map_err(|e| {
                RestoreError::Step {
                    pid: p.pid,
                    step: "filling memfds and deleted files",
                    what: e.to_string(),
                }
            })?;
            // The executable: sealed now and held read-only (the kernel
            // refuses an executable someone may write: PR_SET_MM_MAP's
            // exe_fd, and a write open while it is one).
            let (fd, seals) = if p.exe_unlinked == Some((u.dev, u.ino)) {
                let ro = uf::add_seals(&fd, &what, u.seals)
                    .and_then(|()| uf::read_only(&fd, &what))
                    .map_err(|e| RestoreError::Step {
                        pid: p.pid,
                        step: "making the deleted executable",
                        what: e.to_string(),
                    })?;
                (ro, 0)
            } else {
                (fd, u.seals)
            };
            out.0.insert(
                (u.dev, u.ino),
                Made {
                    path: format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()),
                    fd,
                    seals,
                    what,
                },
            );
        }
        Ok(out)
    }

    /// The path the process opens the file of `key` by.
    pub(crate) fn path(&self, key: (u64, u64)) -> Option<&str> {
        self.0.get(&key).map(|m| m.path.as_str())
    }

    /// Add each memfd's seals (after the process's opens and mappings: a
    /// write seal would refuse its writable shared mappings).
    pub(crate) fn seal(&self, pid: i32) -> Result<(), RestoreError> {
        for m in self.0.values() {
            uf::add_seals(&m.fd, &m.what, m.seals).map_err(|e| RestoreError::Step {
                pid,
                step: "sealing memfds",
                what: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// A new memfd, or an unnamed file where the deleted one was (a memfd if
/// that directory is gone or takes no unnamed files).
fn make_one(u: &UnlinkedFileState) -> Result<OwnedFd, uf::UnlinkedFileError> {
    if let Some(name) = &u.memfd {
        return uf::make_memfd(name);
    }
    uf::make_deleted(Path::new(&u.path)).or_else(|e| {
        tracing::info!("{} ({e}); a memfd stands in for it", u.describe());
        let base = Path::new(&u.path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("deleted");
        uf::make_memfd(&base.chars().take(uf::MEMFD_NAME_MAX).collect::<String>())
    })
}
