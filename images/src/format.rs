//! The JSON parts of an image: `inventory.json` and `mm.json`.

use crate::fsdir::{ImageDir, MAX_JSON_BYTES};
use crate::seal::Seal;
use crate::{FORMAT_NAME, FORMAT_VERSION, INVENTORY_FILE, ImageError, MM_FILE};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Most VMAs a VMA list may hold (the kernel's default `vm.max_map_count`
/// is 65530).
pub const MAX_VMAS: usize = 1 << 20;

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
    /// The image holds every page of the process (it was taken without a
    /// parent: a first pre-dump, or a dump without one). The oldest image
    /// of a chain must be one: a chain whose parent link was removed from
    /// a middle image is refused, not restored with the older pages missing.
    pub full: bool,
    /// The dirty-tracking backend that selected the pages of this image.
    pub backend: String,
    pub compressed: bool,
    pub page_size: u64,
    pub created_unix_ms: u64,
    #[serde(default)]
    pub tracking: Option<TrackingState>,
    /// Tamper evidence (see `seal`); written last, over everything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<Seal>,
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
            full: true,
            backend: backend.to_string(),
            compressed,
            page_size: crate::PAGE_SIZE,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            tracking: None,
            seal: None,
        }
    }

    /// Read and validate `DIR/inventory.json`.
    pub fn load(dir: &Path) -> Result<Inventory, ImageError> {
        let (d, _) = ImageDir::open(dir)?;
        match d.open_file(INVENTORY_FILE, false)? {
            None => Err(ImageError::NotAnImage {
                path: dir.to_path_buf(),
            }),
            Some(_) => {
                let (text, _) = d.read_file(INVENTORY_FILE, MAX_JSON_BYTES)?;
                Inventory::parse(&d.child(INVENTORY_FILE), &text)
            }
        }
    }

    /// Parse and validate the bytes of `inventory.json` (`path` names it in
    /// errors).
    pub fn parse(path: &Path, text: &[u8]) -> Result<Inventory, ImageError> {
        let path = path.to_path_buf();
        // Check the version before the full schema, so that a future format
        // is reported as such and not as a parse error.
        let value: serde_json::Value = serde_json::from_slice(text)
            .map_err(|e| ImageError::corrupt(&path, format!("not valid JSON: {e}")))?;
        if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
            return Err(ImageError::corrupt(
                &path,
                format!("\"format\" is not \"{FORMAT_NAME}\""),
            ));
        }
        // A version beyond u32 is as unknown as any other too new.
        let version = value
            .get("version")
            .and_then(|v| v.as_u64())
            .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
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
        match (&inv.parent, inv.full) {
            (None, false) => {
                return Err(ImageError::corrupt(
                    &path,
                    "names no parent, but is not a full image: the link to the older images of its chain was removed, and restoring without them would lose their pages",
                ));
            }
            (Some(_), true) => {
                return Err(ImageError::corrupt(
                    &path,
                    "is a full image that names a parent: the two contradict each other",
                ));
            }
            _ => {}
        }
        if let Some(p) = &inv.parent
            && (p.path.is_empty() || p.path.contains('\0'))
        {
            return Err(ImageError::corrupt(&path, "bad parent path"));
        }
        Ok(inv)
    }

    /// The bytes a seal covers: the inventory without its seal.
    pub fn sealed_bytes(&self) -> Vec<u8> {
        let mut plain = self.clone();
        plain.seal = None;
        serde_json::to_vec(&plain).expect("an inventory serializes")
    }

    /// Write `DIR/inventory.json` atomically (temporary file + rename).
    pub fn store(&self, dir: &Path) -> Result<(), ImageError> {
        write_json_atomic(&ImageDir::create(dir)?, INVENTORY_FILE, self)
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
    /// Typed; in JSON `rwxp` / `rw-s` as in /proc/PID/maps (anything else
    /// fails the load).
    pub perms: sys::proc::VmaPerms,
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
    /// For a private file mapping: the mapped file as the final dump saw it
    /// (its pages the process did not write come from the file again at
    /// restore, which refuses another file at that path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<sys::mapped_file::FileIdentity>,
}

impl VmaRecord {
    /// A private anonymous read-write VMA whose pages are dumped (what
    /// tests and tools that write images by hand describe).
    pub fn anonymous(start: u64, end: u64) -> VmaRecord {
        VmaRecord {
            start,
            end,
            perms: sys::proc::VmaPerms {
                read: true,
                write: true,
                exec: false,
                shared: false,
            },
            offset: 0,
            dev: "00:00".into(),
            inode: 0,
            name: None,
            dumped: true,
            vm_flags: Vec::new(),
            file: None,
        }
    }

    pub fn range(&self) -> crate::PageRange {
        crate::PageRange::new(self.start, self.end)
    }
    pub fn is_private(&self) -> bool {
        self.perms.is_private()
    }
    /// File-backed: the holes of this VMA read from `name` at `offset`.
    pub fn backing_file(&self) -> Option<&str> {
        if self.inode == 0 {
            return None;
        }
        self.name.as_deref().filter(|n| n.starts_with('/'))
    }

    /// A VMA mapping a memfd or a file deleted since (not shared anonymous
    /// memory, `/dev/zero (deleted)` or SysV, which the image holds as
    /// pages): the (device, inode) its `process::UnlinkedFileState` has.
    pub fn unlinked_key(&self) -> Option<(u64, u64)> {
        let name = self.backing_file()?;
        if !name.ends_with(" (deleted)") || (!self.is_private() && self.dumped) {
            return None;
        }
        let (maj, min) = self.dev.split_once(':')?;
        let maj = u32::from_str_radix(maj, 16).ok()?;
        let min = u32::from_str_radix(min, 16).ok()?;
        Some((libc::makedev(maj, min), self.inode))
    }
}

/// `mm.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmRecord {
    pub vmas: Vec<VmaRecord>,
}

impl MmRecord {
    pub fn load(dir: &Path) -> Result<MmRecord, ImageError> {
        let (d, _) = ImageDir::open(dir)?;
        let (text, _) = d.read_file(MM_FILE, MAX_JSON_BYTES)?;
        MmRecord::parse(&d.child(MM_FILE), &text)
    }

    /// Parse and validate the bytes of `mm.json`.
    pub fn parse(path: &Path, text: &[u8]) -> Result<MmRecord, ImageError> {
        let mm: MmRecord = serde_json::from_slice(text)
            .map_err(|e| ImageError::corrupt(path, format!("bad VMA list: {e}")))?;
        if mm.vmas.len() > MAX_VMAS {
            return Err(ImageError::corrupt(
                path,
                format!("{} VMAs, more than {MAX_VMAS}", mm.vmas.len()),
            ));
        }
        let mut prev_end = 0;
        for v in &mm.vmas {
            // x86_64's legacy vsyscall page sits in the kernel's half; it is
            // listed, never mapped by a restore.
            let vsyscall = v.start == 0xffff_ffff_ff60_0000
                && v.end == v.start + crate::PAGE_SIZE
                && v.name.as_deref() == Some("[vsyscall]")
                && !v.dumped;
            if v.start >= v.end
                || v.start % crate::PAGE_SIZE != 0
                || v.end % crate::PAGE_SIZE != 0
                || v.start < prev_end
                || (v.end > crate::MAX_USER_ADDRESS && !vsyscall)
            {
                return Err(ImageError::corrupt(
                    path,
                    format!(
                        "VMA {:#x}-{:#x} is empty, unaligned, out of order or outside user space",
                        v.start, v.end
                    ),
                ));
            }
            if v.name
                .as_ref()
                .is_some_and(|n| n.len() > 4096 || n.contains('\0'))
                || v.vm_flags.len() > 64
                || v.vm_flags.iter().any(|f| f.len() > 8)
            {
                return Err(ImageError::corrupt(
                    path,
                    format!("VMA {:#x}-{:#x}: bad name or flags", v.start, v.end),
                ));
            }
            prev_end = v.end;
        }
        Ok(mm)
    }

    pub fn store(&self, dir: &Path) -> Result<(), ImageError> {
        write_json_atomic(&ImageDir::create(dir)?, MM_FILE, self)
    }

    pub fn find(&self, addr: u64) -> Option<&VmaRecord> {
        let i = self.vmas.partition_point(|v| v.end <= addr);
        self.vmas.get(i).filter(|v| v.start <= addr)
    }
}

pub(crate) fn write_json_atomic<T: Serialize>(
    dir: &ImageDir,
    name: &str,
    value: &T,
) -> Result<(), ImageError> {
    let text = serde_json::to_vec_pretty(value).expect("image metadata serializes");
    dir.write_atomic(name, &text, false)
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
