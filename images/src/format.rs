//! The JSON parts of an image: `inventory.json` and `mm.json`.

use crate::{FORMAT_NAME, FORMAT_VERSION, INVENTORY_FILE, ImageError, MM_FILE};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What kind of image a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageKind {
    /// Memory only, taken while the target ran.
    PreDump,
    /// Final, stop-the-world image.
    Dump,
}

/// The link from an image to the one it was taken on top of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// As given on the command line, made relative to this image's directory
    /// when possible so that a chain can be moved as a whole.
    pub path: String,
    /// The parent's `id`: a replaced parent directory is detected.
    pub id: String,
}

/// How the next tern invocation finds the tracking state that outlives this
/// one (see the README, "Tracking between invocations").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingState {
    /// The target's start time (field 22 of /proc/PID/stat): a different value
    /// means the PID now belongs to another process.
    pub target_start_time: u64,
    /// File descriptor number, in the target, of the userfaultfd that keeps
    /// write-protect tracking armed (uffd-wp backend).
    pub uffd_fd: Option<i32>,
    /// Address of tern's scratch page in the target (`[anon:tern-scratch]`).
    pub scratch_addr: Option<u64>,
    /// bpffs directory holding the pinned eBPF maps and links, if pinned.
    pub ebpf_pin_dir: Option<String>,
}

/// `inventory.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub format: String,
    pub version: u32,
    /// Random id of this image; children record it in their `ParentRef`.
    pub id: String,
    pub kind: ImageKind,
    pub pid: i32,
    pub parent: Option<ParentRef>,
    /// The dirty-tracking backend that selected the pages of this image.
    pub backend: String,
    pub compressed: bool,
    pub page_size: u64,
    pub created_unix_ms: u64,
    #[serde(default)]
    pub tracking: Option<TrackingState>,
}

impl Inventory {
    pub fn new(kind: ImageKind, pid: i32, backend: &str, compressed: bool) -> Inventory {
        Inventory {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            id: new_id(),
            kind,
            pid,
            parent: None,
            backend: backend.to_string(),
            compressed,
            page_size: crate::PAGE_SIZE,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            tracking: None,
        }
    }

    /// Read and validate `DIR/inventory.json`.
    pub fn load(dir: &Path) -> Result<Inventory, ImageError> {
        let path = dir.join(INVENTORY_FILE);
        if !dir.is_dir() {
            return Err(ImageError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such image directory"),
            ));
        }
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotAnImage {
                    path: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(ImageError::io(&path, e)),
        };
        // Check the version before the full schema, so that a future format
        // is reported as such and not as a parse error.
        let value: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| ImageError::corrupt(&path, format!("not valid JSON: {e}")))?;
        if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
            return Err(ImageError::corrupt(
                &path,
                format!("\"format\" is not \"{FORMAT_NAME}\""),
            ));
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if version != FORMAT_VERSION {
            return Err(ImageError::Version {
                path,
                found: version,
            });
        }
        let inv: Inventory = serde_json::from_value(value)
            .map_err(|e| ImageError::corrupt(&path, format!("bad inventory: {e}")))?;
        if inv.page_size != crate::PAGE_SIZE {
            return Err(ImageError::corrupt(
                &path,
                format!("page size {} is not {}", inv.page_size, crate::PAGE_SIZE),
            ));
        }
        Ok(inv)
    }

    /// Write `DIR/inventory.json` atomically (temporary file + rename).
    pub fn store(&self, dir: &Path) -> Result<(), ImageError> {
        write_json_atomic(&dir.join(INVENTORY_FILE), self)
    }

    /// The parent directory, resolved against this image's directory.
    pub fn parent_dir(&self, dir: &Path) -> Option<PathBuf> {
        self.parent.as_ref().map(|p| {
            let pp = Path::new(&p.path);
            if pp.is_absolute() {
                pp.to_path_buf()
            } else {
                dir.join(pp)
            }
        })
    }
}

/// One VMA of the target as `/proc/PID/maps` showed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmaRecord {
    pub start: u64,
    pub end: u64,
    /// `rwxp` / `rw-s` as in /proc/PID/maps.
    pub perms: String,
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `[anon:name]`), if any.
    pub name: Option<String>,
    /// Whether tern recorded this VMA's pages (private and anonymous-shared
    /// memory); others (file-shared, `[vvar]`, `[vvar_vclock]`, `[vdso]`)
    /// read from elsewhere.
    pub dumped: bool,
    /// `VmFlags` from /proc/PID/smaps (`gd` grows down, `dd` dont-dump, ...);
    /// recorded by the final dump only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vm_flags: Vec<String>,
}

impl VmaRecord {
    pub fn range(&self) -> crate::PageRange {
        crate::PageRange::new(self.start, self.end)
    }
    pub fn is_private(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b'p')
    }
    /// File-backed: the holes of this VMA read from `name` at `offset`.
    pub fn backing_file(&self) -> Option<&str> {
        if self.inode == 0 {
            return None;
        }
        self.name.as_deref().filter(|n| n.starts_with('/'))
    }
}

/// `mm.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmRecord {
    pub vmas: Vec<VmaRecord>,
}

impl MmRecord {
    pub fn load(dir: &Path) -> Result<MmRecord, ImageError> {
        let path = dir.join(MM_FILE);
        let text = std::fs::read(&path).map_err(|e| ImageError::io(&path, e))?;
        let mm: MmRecord = serde_json::from_slice(&text)
            .map_err(|e| ImageError::corrupt(&path, format!("bad VMA list: {e}")))?;
        let mut prev_end = 0;
        for v in &mm.vmas {
            if v.start >= v.end
                || v.start % crate::PAGE_SIZE != 0
                || v.end % crate::PAGE_SIZE != 0
                || v.start < prev_end
            {
                return Err(ImageError::corrupt(
                    &path,
                    format!(
                        "VMA {:#x}-{:#x} is empty, unaligned or out of order",
                        v.start, v.end
                    ),
                ));
            }
            prev_end = v.end;
        }
        Ok(mm)
    }
    pub fn store(&self, dir: &Path) -> Result<(), ImageError> {
        write_json_atomic(&dir.join(MM_FILE), self)
    }
    pub fn find(&self, addr: u64) -> Option<&VmaRecord> {
        let i = self.vmas.partition_point(|v| v.end <= addr);
        self.vmas.get(i).filter(|v| v.start <= addr)
    }
}

pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), ImageError> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).expect("image metadata serializes");
    let mut f = std::fs::File::create(&tmp).map_err(|e| ImageError::io(&tmp, e))?;
    f.write_all(&text).map_err(|e| ImageError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ImageError::io(path, e))
}

/// 128 random bits as hex, from the kernel's random pool.
fn new_id() -> String {
    let mut buf = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_ok();
    if !ok {
        // Not fatal: time and pid are unique enough to tell images apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        buf[..16].copy_from_slice(&(t ^ (std::process::id() as u128) << 64).to_le_bytes());
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
