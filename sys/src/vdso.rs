//! The vDSO and vvar areas of a process, the vDSO's exported symbols, and
//! the mremaps that put a restored process's areas where its image had them.
//!
//! This module owns everything tern knows about the vDSO: the dump records a
//! [`VdsoLayout`] (where `[vvar]`, `[vvar_vclock]` and `[vdso]` were, the
//! vDSO's length, crc32 and symbol table); the restore checks that the
//! kernel it runs on has the same vDSO ([`check_compatible`]) and moves the
//! areas it was forked with to the image's addresses ([`placement_moves`]).
//!
//! Why moves and not a fresh map: the vDSO is a kernel special mapping that
//! cannot be mapped again, only moved (mremap), and the restored process's
//! code and stacks hold return addresses into it (signal trampolines, the
//! address glibc cached at startup), so it must sit exactly where it was.
//! The vDSO's code reaches its data pages (`[vvar]`, `[vvar_vclock]`)
//! PC-relatively, so the areas must keep their distances to one another:
//! every area moves to the image's address of that same area.
//!
//! Areas are found by name in /proc/PID/maps, never by size: Linux 6.x split
//! vvar (`[vvar]` 4 pages + `[vvar_vclock]` 2 pages on the build machine;
//! older kernels have one `[vvar]`), and sizes change between builds. The
//! symbols come from the vDSO's own ELF dynamic symbol table, read from
//! /proc/PID/mem and parsed with `object`.
//!
//! For now a restore requires the very same vDSO (same bytes, so the same
//! symbol offsets) and same-sized areas: relinking a different vDSO is not
//! implemented, and [`check_compatible`] says so instead of producing a
//! process that jumps into the middle of unrelated code.

use std::os::unix::fs::FileExt;

use object::{Object, ObjectSegment, ObjectSymbol};

/// The names of the areas in /proc/PID/maps.
pub const VDSO: &str = "[vdso]";
pub const VVAR: &str = "[vvar]";
pub const VVAR_VCLOCK: &str = "[vvar_vclock]";

/// Page size assumed for the placement of temporaries (the areas themselves
/// are taken from maps as they are).
const PAGE: u64 = 4096;

/// One exported (dynamic) symbol of the vDSO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdsoSymbol {
    pub name: String,
    /// From the start of the `[vdso]` mapping.
    pub offset: u64,
    pub size: u64,
}

/// Where a process's vDSO areas are (`(start, end)`, end exclusive) and what
/// its vDSO is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VdsoLayout {
    pub vdso: Option<(u64, u64)>,
    pub vvar: Option<(u64, u64)>,
    pub vvar_vclock: Option<(u64, u64)>,
    /// crc32 of the whole `[vdso]` mapping's bytes (0 without a vDSO).
    pub vdso_crc32: u32,
    /// Length of the `[vdso]` mapping (0 without a vDSO).
    pub vdso_len: u64,
    /// Defined dynamic symbols, sorted by name then offset.
    pub symbols: Vec<VdsoSymbol>,
}

/// One mremap(from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to) that a
/// restorer makes inside the restored process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaMove {
    /// `[vdso]`, `[vvar]` or `[vvar_vclock]`.
    pub name: &'static str,
    pub from: u64,
    pub to: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VdsoError {
    #[error(
        "reading {path} (PID {pid}): {source}; check that the process still exists and that this user may ptrace it"
    )]
    Proc {
        pid: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}; check that the process still exists")]
    ProcMaps(crate::proc::ProcError),
    #[error(
        "PID {pid}: {what} in /proc/{pid}/maps; tern cannot tell which area is the kernel's (was it remapped by the process?)"
    )]
    Maps { pid: i32, what: String },
    #[error(
        "the {VDSO} of PID {pid} at {addr:#x} is not an ELF image tern can read: {what}; report this kernel's version"
    )]
    Elf { pid: i32, addr: u64, what: String },
    #[error(
        "the vDSO of this kernel differs from the image's ({what}): restore on a host running the same kernel build"
    )]
    Incompatible { what: String },
    #[error("cannot plan the moves of the vDSO areas: {what}")]
    Placement { what: String },
}

/// The three areas among the VMAs of /proc/PID/maps.
fn areas_from_maps(pid: i32, maps: &[crate::proc::Vma]) -> Result<VdsoLayout, VdsoError> {
    let mut l = VdsoLayout::default();
    for v in maps.iter().filter(|v| v.start < v.end) {
        let name = v.name.as_deref();
        let slot = match name {
            Some(VDSO) => &mut l.vdso,
            Some(VVAR) => &mut l.vvar,
            Some(VVAR_VCLOCK) => &mut l.vvar_vclock,
            _ => continue,
        };
        if let Some(first) = *slot {
            // The kernel refuses to split these mappings; two of a name
            // means something we do not understand.
            return Err(VdsoError::Maps {
                pid,
                what: format!(
                    "two areas named {} ({:#x}-{:#x} and {:#x}-{:#x})",
                    name.unwrap_or("?"),
                    first.0,
                    first.1,
                    v.start,
                    v.end
                ),
            });
        }
        *slot = Some((v.start, v.end));
    }
    Ok(l)
}

/// crc32, length and symbols of a vDSO image mapped at `addr` in `pid`.
fn parse_vdso(pid: i32, addr: u64, bytes: &[u8], l: &mut VdsoLayout) -> Result<(), VdsoError> {
    let elf = |what: String| VdsoError::Elf { pid, addr, what };
    l.vdso_len = bytes.len() as u64;
    l.vdso_crc32 = crc32fast::hash(bytes);
    let file = object::File::parse(bytes).map_err(|e| elf(e.to_string()))?;
    // The kernel maps the image from its first byte; symbol values are
    // link-time addresses, so the offset of a symbol in the mapping is its
    // value minus the address the segment holding file offset 0 is linked
    // at (0 on x86_64 and arm64, but not assumed).
    let base = file
        .segments()
        .find(|s| s.file_range().0 == 0)
        .map(|s| s.address())
        .ok_or_else(|| elf("no loadable segment starts at file offset 0".into()))?;
    l.symbols.clear();
    for s in file.dynamic_symbols() {
        if !s.is_definition() {
            continue; // undefined, or absolute like the LINUX_2.6 version
        }
        let Ok(name) = s.name() else { continue };
        if name.is_empty() {
            continue;
        }
        let offset = s.address().wrapping_sub(base);
        if offset.checked_add(s.size()).is_none_or(|e| e > l.vdso_len) {
            return Err(elf(format!(
                "symbol {name} at {:#x} (+{}) lies outside the {} bytes of the image",
                s.address(),
                s.size(),
                l.vdso_len
            )));
        }
        l.symbols.push(VdsoSymbol {
            name: name.to_string(),
            offset,
            size: s.size(),
        });
    }
    l.symbols
        .sort_by(|a, b| a.name.cmp(&b.name).then(a.offset.cmp(&b.offset)));
    Ok(())
}

impl VdsoLayout {
    /// The layout of process `pid` (reads its maps and, for the vDSO's
    /// bytes, its mem: needs ptrace access).
    pub fn of_pid(pid: i32) -> Result<VdsoLayout, VdsoError> {
        Self::read(&format!("/proc/{pid}"), pid)
    }

    /// The layout of the calling process.
    pub fn of_self() -> Result<VdsoLayout, VdsoError> {
        Self::read("/proc/self", std::process::id() as i32)
    }

    fn read(proc_dir: &str, pid: i32) -> Result<VdsoLayout, VdsoError> {
        let proc_err = |path: &str| {
            let path = path.to_string();
            move |source| VdsoError::Proc { pid, path, source }
        };
        let maps = crate::proc::maps(pid, None).map_err(VdsoError::ProcMaps)?;
        let mut l = areas_from_maps(pid, &maps)?;
        let Some((start, end)) = l.vdso else {
            return Ok(l); // booted with vdso=0, or unmapped by the process
        };
        let path = format!("{proc_dir}/mem");
        let mut bytes = vec![0u8; crate::usize_of(end - start)];
        let mem = std::fs::File::open(&path).map_err(proc_err(&path))?;
        mem.read_exact_at(&mut bytes, start)
            .map_err(proc_err(&format!("{path} at {start:#x}-{end:#x}")))?;
        parse_vdso(pid, start, &bytes, &mut l)?;
        Ok(l)
    }

    /// Address of symbol `name` in this layout's vDSO.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        let (start, _) = self.vdso?;
        self.symbols
            .iter()
            .find(|s| s.name == name)
            .map(|s| start + s.offset)
    }

    /// The areas present, by name.
    pub fn areas(&self) -> impl Iterator<Item = (&'static str, (u64, u64))> {
        [
            (VVAR, self.vvar),
            (VVAR_VCLOCK, self.vvar_vclock),
            (VDSO, self.vdso),
        ]
        .into_iter()
        .filter_map(|(n, r)| Some((n, r?)))
    }
}

fn len(r: Option<(u64, u64)>) -> Option<u64> {
    r.map(|(a, b)| b - a)
}

fn size_text(r: Option<(u64, u64)>) -> String {
    len(r).map_or("absent".into(), |v| format!("{v:#x} bytes"))
}

/// Whether the image's vDSO can be replaced by the one of `here` (the
/// process the restore runs in, or was forked from): the same code (length,
/// crc, symbol offsets), areas of the same sizes, at the same distances from
/// the vDSO. Every difference is listed in the error.
pub fn check_compatible(image: &VdsoLayout, here: &VdsoLayout) -> Result<(), VdsoError> {
    let mut diffs = Vec::new();
    if image.vdso_len != here.vdso_len || image.vdso_crc32 != here.vdso_crc32 {
        diffs.push(format!(
            "image: {} bytes crc {:#010x}, here: {} bytes crc {:#010x}",
            image.vdso_len, image.vdso_crc32, here.vdso_len, here.vdso_crc32
        ));
    }
    if image.symbols != here.symbols {
        let mut which: Vec<String> = Vec::new();
        for s in &image.symbols {
            match here.symbols.iter().find(|h| h.name == s.name) {
                None => which.push(format!("{} missing here", s.name)),
                Some(h) if h != s => which.push(format!(
                    "{} at {:#x} in the image, {:#x} here",
                    s.name, s.offset, h.offset
                )),
                Some(_) => {}
            }
        }
        for h in &here.symbols {
            if !image.symbols.iter().any(|s| s.name == h.name) {
                which.push(format!("{} only here", h.name));
            }
        }
        let more = which.len().saturating_sub(4);
        which.truncate(4);
        if more > 0 {
            which.push(format!("{more} more"));
        }
        diffs.push(format!("symbols differ: {}", which.join(", ")));
    }
    for (name, a, b) in [
        (VDSO, image.vdso, here.vdso),
        (VVAR, image.vvar, here.vvar),
        (VVAR_VCLOCK, image.vvar_vclock, here.vvar_vclock),
    ] {
        if len(a) != len(b) {
            diffs.push(format!(
                "{name}: {} in the image, {} here",
                size_text(a),
                size_text(b)
            ));
        }
    }
    // The vDSO addresses its data PC-relatively: the distances must match.
    if let (Some(iv), Some(hv)) = (image.vdso, here.vdso) {
        for (name, a, b) in [
            (VVAR, image.vvar, here.vvar),
            (VVAR_VCLOCK, image.vvar_vclock, here.vvar_vclock),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                let da = iv.0 as i128 - a.0 as i128;
                let db = hv.0 as i128 - b.0 as i128;
                if da != db {
                    diffs.push(format!(
                        "{name} starts {da:#x} bytes before {VDSO} in the image, {db:#x} here"
                    ));
                }
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(VdsoError::Incompatible {
            what: diffs.join("; "),
        })
    }
}

/// The temporary address [`placement_moves`] uses: 1 MiB above the highest
/// end of all areas involved (current and target), or, if that would not
/// fit below 2^47, 1 MiB plus the room needed below the lowest start.
pub fn default_scratch(here: &VdsoLayout, image: &VdsoLayout) -> u64 {
    let all: Vec<(u64, u64)> = here.areas().chain(image.areas()).map(|a| a.1).collect();
    let total: u64 = here.areas().map(|(_, r)| r.1 - r.0).sum();
    let gap = 1 << 20;
    let top = all.iter().map(|r| r.1).max().unwrap_or(0);
    let up = (top + gap + PAGE - 1) & !(PAGE - 1);
    if up + total <= 1 << 47 {
        return up;
    }
    let low = all.iter().map(|r| r.0).min().unwrap_or(0);
    low.saturating_sub(gap + total) & !(PAGE - 1)
}

/// The mremaps that put `here`'s areas where `image` had them, in an order
/// that is safe to run one after the other: no move lands on an area that
/// has not moved yet (MREMAP_FIXED would silently unmap it) nor on its own
/// current range (the kernel refuses that with EINVAL). When no such order
/// exists (areas that must swap places, or shift by less than their size)
/// an area goes through a temporary range first, at [`default_scratch`].
///
/// The caller must make sure that the targets, and the temporary range if a
/// move uses it, hold nothing it wants to keep; a restorer that has not
/// unmapped everything else should use [`placement_moves_via`] with a range
/// it knows to be free. Areas already in place are not moved.
pub fn placement_moves(here: &VdsoLayout, image: &VdsoLayout) -> Result<Vec<AreaMove>, VdsoError> {
    placement_moves_via(here, image, default_scratch(here, image))
}

/// [`placement_moves`] with the temporary range starting at `scratch_free`
/// (page aligned; as long as the sum of the areas' lengths; free in the
/// process and apart from every current and target area).
pub fn placement_moves_via(
    here: &VdsoLayout,
    image: &VdsoLayout,
    scratch_free: u64,
) -> Result<Vec<AreaMove>, VdsoError> {
    check_compatible(image, here)?;
    let mut moves = Vec::new();
    for (name, h, i) in [
        (VVAR, here.vvar, image.vvar),
        (VVAR_VCLOCK, here.vvar_vclock, image.vvar_vclock),
        (VDSO, here.vdso, image.vdso),
    ] {
        match (h, i) {
            (Some(h), Some(i)) => moves.push(AreaMove {
                name,
                from: h.0,
                to: i.0,
                len: h.1 - h.0,
            }),
            (None, None) => {}
            // check_compatible compares the lengths: unreachable, but not
            // worth a panic.
            _ => {
                return Err(VdsoError::Placement {
                    what: format!("{name} exists in only one of the layouts"),
                });
            }
        }
    }
    plan(moves, scratch_free)
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Order `moves` (every area of the process, the ones already in place
/// included) into mremaps, going through `scratch` when needed.
fn plan(moves: Vec<AreaMove>, scratch: u64) -> Result<Vec<AreaMove>, VdsoError> {
    let bad = |what: String| Err(VdsoError::Placement { what });
    for (k, m) in moves.iter().enumerate() {
        if [m.from, m.to, m.len]
            .iter()
            .any(|v| !v.is_multiple_of(PAGE))
            || m.len == 0
        {
            return bad(format!(
                "{} {:#x} -> {:#x} ({:#x} bytes) is not page aligned",
                m.name, m.from, m.to, m.len
            ));
        }
        for o in &moves[k + 1..] {
            if overlaps(m.from, m.len, o.from, o.len) {
                return bad(format!(
                    "{} and {} overlap where they are now ({:#x}, {:#x})",
                    m.name, o.name, m.from, o.from
                ));
            }
            if overlaps(m.to, m.len, o.to, o.len) {
                return bad(format!(
                    "{} and {} would overlap at their targets ({:#x}, {:#x})",
                    m.name, o.name, m.to, o.to
                ));
            }
        }
    }
    // Each area has its own slot in the scratch range, so the temporaries
    // never collide either.
    let total: u64 = moves.iter().map(|m| m.len).sum();
    if !scratch.is_multiple_of(PAGE) {
        return bad(format!(
            "the scratch address {scratch:#x} is not page aligned"
        ));
    }
    if let Some(m) = moves
        .iter()
        .find(|m| overlaps(scratch, total, m.from, m.len) || overlaps(scratch, total, m.to, m.len))
    {
        return bad(format!(
            "the scratch range {scratch:#x}+{total:#x} overlaps {} ({:#x} now, {:#x} target)",
            m.name, m.from, m.to
        ));
    }
    struct Pending {
        name: &'static str,
        at: u64,
        to: u64,
        len: u64,
        slot: u64,
        parked: bool,
    }
    let mut slot = scratch;
    let mut pending: Vec<Pending> = Vec::new();
    for m in moves {
        let s = slot;
        slot += m.len;
        if m.from != m.to {
            pending.push(Pending {
                name: m.name,
                at: m.from,
                to: m.to,
                len: m.len,
                slot: s,
                parked: false,
            });
        }
    }
    // Areas already in place never block anyone: image targets are
    // disjoint, checked above.
    let mut out = Vec::new();
    while !pending.is_empty() {
        let free = |i: usize| {
            let p = &pending[i];
            pending.iter().all(|o| !overlaps(p.to, p.len, o.at, o.len))
        };
        if let Some(i) = (0..pending.len()).find(|&i| free(i)) {
            let p = pending.remove(i);
            out.push(AreaMove {
                name: p.name,
                from: p.at,
                to: p.to,
                len: p.len,
            });
            continue;
        }
        // Stuck: every pending target overlaps some pending area (maybe the
        // mover itself). Park one that is not parked yet: it leaves its range
        // and, in the scratch, blocks nobody (the scratch is apart from all
        // targets). One always exists: parked areas are never stuck.
        // Prefer one that blocks its own move, then the one blocking most.
        let blocks = |i: usize| {
            let p = &pending[i];
            pending
                .iter()
                .filter(|o| overlaps(o.to, o.len, p.at, p.len))
                .count()
        };
        let Some(i) = (0..pending.len())
            .filter(|&i| !pending[i].parked)
            .max_by_key(|&i| {
                let p = &pending[i];
                (overlaps(p.to, p.len, p.at, p.len), blocks(i))
            })
        else {
            return bad("no order of moves exists (internal error)".into());
        };
        let p = &mut pending[i];
        out.push(AreaMove {
            name: p.name,
            from: p.at,
            to: p.slot,
            len: p.len,
        });
        p.at = p.slot;
        p.parked = true;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::testutil::{
        Child, T, child_read, child_write, fork_child, pipe, read_timeout,
    };
    use std::os::fd::{AsRawFd, OwnedFd};

    /// The vDSO's `clock_gettime` and the other symbols every kernel of
    /// the architecture exports, with their symbol version.
    #[cfg(target_arch = "x86_64")]
    const CLOCK_GETTIME: &str = "__vdso_clock_gettime";
    #[cfg(target_arch = "x86_64")]
    const SYMBOLS: &[&str] = &[
        "__vdso_clock_gettime",
        "__vdso_gettimeofday",
        "__vdso_time",
        "__vdso_getcpu",
        "__vdso_clock_getres",
    ];
    #[cfg(target_arch = "x86_64")]
    const SYMBOL_VERSION: &str = "LINUX_2.6";
    #[cfg(target_arch = "aarch64")]
    const CLOCK_GETTIME: &str = "__kernel_clock_gettime";
    #[cfg(target_arch = "aarch64")]
    const SYMBOLS: &[&str] = &[
        "__kernel_clock_gettime",
        "__kernel_gettimeofday",
        "__kernel_clock_getres",
        "__kernel_rt_sigreturn",
    ];
    #[cfg(target_arch = "aarch64")]
    const SYMBOL_VERSION: &str = "LINUX_2.6.39";

    /// The ELF of the vDSO as the parent sees it, and the vDSO's view of
    /// the clocks, compared with the parent's.
    #[test]
    fn own_vdso_has_the_clock_symbols() {
        let l = VdsoLayout::of_self().unwrap();
        let (start, end) = l.vdso.expect("this kernel maps a vDSO");
        assert_eq!(l.vdso_len, end - start);
        for &name in SYMBOLS {
            let a = l
                .symbol(name)
                .unwrap_or_else(|| panic!("{name}: {:?}", l.symbols));
            assert!(a >= start && a < end, "{name} at {a:#x}");
        }
        // The symbol table agrees with the loader's: glibc's own lookup.
        let clock_gettime = std::ffi::CString::new(CLOCK_GETTIME).unwrap();
        let vers = std::ffi::CString::new(SYMBOL_VERSION).unwrap();
        let handle = std::ffi::CString::new("linux-vdso.so.1").unwrap();
        // SAFETY: dlopen with RTLD_NOLOAD only looks up the already loaded
        // vDSO; dlvsym reads its symbol table.
        let via_dl = unsafe {
            let h = libc::dlopen(handle.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            assert!(!h.is_null(), "the vDSO is not known to the dynamic loader");
            let p = libc::dlvsym(h, clock_gettime.as_ptr(), vers.as_ptr());
            libc::dlclose(h);
            p as u64
        };
        assert_eq!(l.symbol(CLOCK_GETTIME), Some(via_dl));
        check_compatible(&l, &l).unwrap();
        assert_eq!(
            placement_moves(&l, &l).unwrap(),
            vec![],
            "nothing to move in place"
        );
    }

    /// A process exec'ing another program (its own ASLR layout) has the
    /// same vDSO: compatible, and the plan moves each area to the child's
    /// addresses.
    #[test]
    fn other_process_has_a_compatible_vdso() {
        // A shell that says so once it runs (its exec is complete), then
        // waits on its stdin.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "echo ready; read x"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawning /bin/sh");
        let pid = child.id() as i32;
        let out: OwnedFd = child.stdout.take().unwrap().into();
        let ready = read_timeout(&out, 6, T, "the shell's ready line");
        assert_eq!(ready, b"ready\n");
        let there = VdsoLayout::of_pid(pid);
        let _ = child.kill();
        let _ = child.wait();
        let there = there.unwrap();
        let here = VdsoLayout::of_self().unwrap();
        check_compatible(&there, &here).unwrap();
        assert_eq!(there.vdso_crc32, here.vdso_crc32);
        assert_eq!(there.symbols, here.symbols);
        let moves = placement_moves(&here, &there).unwrap();
        for (name, r) in there.areas() {
            let from = here.areas().find(|a| a.0 == name).unwrap().1.0;
            if from != r.0 {
                assert!(
                    moves.iter().any(|m| m.name == name && m.to == r.0),
                    "{moves:?}"
                );
            }
        }
        let e = VdsoLayout::of_pid(pid).unwrap_err();
        assert!(matches!(&e, VdsoError::ProcMaps(p) if p.is_gone()), "{e}");
        assert!(e.to_string().contains(&pid.to_string()), "{e}");
    }

    #[test]
    fn a_different_vdso_is_refused() {
        let l = VdsoLayout::of_self().unwrap();
        let mut other = l.clone();
        other.vdso_crc32 ^= 1;
        other.vdso_len += 4096;
        let e = check_compatible(&other, &l).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "the vDSO of this kernel differs from the image's (image: {} bytes crc {:#010x}, here: {} bytes crc {:#010x}",
                other.vdso_len, other.vdso_crc32, l.vdso_len, l.vdso_crc32
            )),
            "{e}"
        );
        assert!(
            e.ends_with("restore on a host running the same kernel build"),
            "{e}"
        );
        assert!(placement_moves(&l, &other).is_err());

        let mut other = l.clone();
        other.symbols[0].offset += 16;
        let e = check_compatible(&other, &l).unwrap_err().to_string();
        assert!(e.contains(&other.symbols[0].name), "{e}");

        let mut other = l.clone();
        if let Some(v) = &mut other.vvar {
            v.1 += 4096;
        }
        let e = check_compatible(&other, &l).unwrap_err().to_string();
        assert!(e.contains("[vvar]"), "{e}");

        // An older kernel's single [vvar]: the vclock area is missing
        // (x86_64 6.x has one; arm64 has no [vvar_vclock] at all).
        if let Some((a, b)) = l.vvar_vclock {
            let mut other = l.clone();
            other.vvar_vclock = None;
            let e = check_compatible(&other, &l).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "[vvar_vclock]: absent in the image, {:#x} bytes here",
                    b - a
                )),
                "{e}"
            );
        }

        // The vDSO moved away from its data.
        let mut other = l.clone();
        other.vdso = other.vdso.map(|(a, b)| (a + 0x10000, b + 0x10000));
        let e = check_compatible(&other, &l).unwrap_err().to_string();
        assert!(e.contains("bytes before [vdso]"), "{e}");
    }

    #[test]
    fn maps_parsing() {
        let maps = "\
7f0000000000-7f0000004000 r--p 00000000 00:00 0                          [vvar]
7f0000004000-7f0000006000 r--p 00000000 00:00 0                          [vvar_vclock]
7f0000006000-7f0000008000 r-xp 00000000 00:00 0                          [vdso]
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
55d000000000-55d000001000 r--p 00000000 08:01 1234                       /usr/bin/[vdso]
";
        let vmas = |t: &str| crate::proc::parse_maps(7, t).unwrap();
        let l = areas_from_maps(7, &vmas(maps)).unwrap();
        assert_eq!(l.vvar, Some((0x7f00_0000_0000, 0x7f00_0000_4000)));
        assert_eq!(l.vvar_vclock, Some((0x7f00_0000_4000, 0x7f00_0000_6000)));
        assert_eq!(l.vdso, Some((0x7f00_0000_6000, 0x7f00_0000_8000)));
        let twice = format!("{maps}7f1000000000-7f1000002000 r-xp 00000000 00:00 0 [vdso]\n");
        let e = areas_from_maps(7, &vmas(&twice)).unwrap_err().to_string();
        assert!(
            e.contains("PID 7") && e.contains("two areas named [vdso]"),
            "{e}"
        );
        // Garbage is no reason to panic.
        let mut l = VdsoLayout::default();
        let e = parse_vdso(7, 0x1000, &[0x7f, b'E', b'L', b'F', 2, 1], &mut l).unwrap_err();
        assert!(e.to_string().contains("at 0x1000"), "{e}");
    }

    /// The kernel's own arrangement shifted so that `[vvar]` starts at `at`.
    fn shifted(l: &VdsoLayout, at: u64) -> VdsoLayout {
        let low = l.areas().map(|a| a.1.0).min().unwrap();
        let mut t = l.clone();
        for r in [&mut t.vdso, &mut t.vvar, &mut t.vvar_vclock]
            .into_iter()
            .flatten()
        {
            *r = (r.0 - low + at, r.1 - low + at);
        }
        t
    }

    /// Replays moves on a model of the address space with mremap's rules:
    /// a move must not overlap its own range nor any other tracked area.
    /// Returns the final positions.
    fn replay(start: &[(&'static str, u64, u64)], moves: &[AreaMove]) -> Vec<(&'static str, u64)> {
        let mut at: Vec<(&'static str, u64, u64)> = start.to_vec();
        for m in moves {
            let me = at
                .iter()
                .position(|a| a.0 == m.name && a.1 == m.from)
                .unwrap_or_else(|| panic!("{m:?} moves an area that is not there: {at:?}"));
            assert_eq!(at[me].2, m.len);
            assert!(
                !overlaps(m.from, m.len, m.to, m.len),
                "{m:?} overlaps itself"
            );
            for (k, o) in at.iter().enumerate() {
                assert!(
                    k == me || !overlaps(m.to, m.len, o.1, o.2),
                    "{m:?} lands on {o:?} in {moves:?}"
                );
            }
            at[me].1 = m.to;
        }
        at.iter().map(|a| (a.0, a.1)).collect()
    }

    /// The planner against a model, over many layouts: shifts by every
    /// number of pages around the areas' total size, both ways, and
    /// arbitrary permutations of the three areas.
    #[test]
    fn plans_are_safe_orders() {
        let p = PAGE;
        let names = [VVAR, VVAR_VCLOCK, VDSO];
        let lens = [4 * p, 2 * p, 2 * p];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        fn next(rng: &mut u64) -> u64 {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        }
        // The three areas in a random order with random gaps from `b`.
        let arrange = |rng: &mut u64, b: u64| {
            let mut order = [0usize, 1, 2];
            for i in (1..3).rev() {
                order.swap(i, crate::usize_of(next(rng) % (i as u64 + 1)));
            }
            let mut at = b;
            let mut pos = [0u64; 3];
            for &k in &order {
                at += (next(rng) % 3) * p;
                pos[k] = at;
                at += lens[k];
            }
            pos
        };
        let base = 0x7f00_0000_0000u64;
        let scratch = 0x7f10_0000_0000u64;
        let mut used_scratch = 0;
        for round in 0..4000 {
            let from = arrange(&mut rng, base);
            let to = if round % 2 == 0 {
                // Another arrangement at most 12 pages away.
                let d = (next(&mut rng) % 12) * p;
                arrange(&mut rng, base + d)
            } else {
                // The kernel's arrangement shifted: what restore meets.
                let d = (next(&mut rng) % 25) * p;
                from.map(|f| f + d - 12 * p)
            };
            let moves: Vec<AreaMove> = (0..3)
                .map(|k| AreaMove {
                    name: names[k],
                    from: from[k],
                    to: to[k],
                    len: lens[k],
                })
                .collect();
            let planned = plan(moves, scratch).unwrap();
            if planned.iter().any(|m| m.to >= scratch) {
                used_scratch += 1;
            }
            // Each area moves at most twice and there are no useless moves.
            assert!(planned.len() <= 6, "{planned:?}");
            let start: Vec<_> = (0..3).map(|k| (names[k], from[k], lens[k])).collect();
            let mut end = replay(&start, &planned);
            end.sort();
            let mut want: Vec<_> = (0..3).map(|k| (names[k], to[k])).collect();
            want.sort();
            assert_eq!(end, want, "{planned:?}");
        }
        assert!(used_scratch > 0, "no layout needed the scratch range");
    }

    #[test]
    fn plans_use_scratch_only_when_needed() {
        let l = VdsoLayout::of_self().unwrap();
        let p = PAGE;
        let a = shifted(&l, 0x7e00_0000_0000);
        // Far away: one plain move per area.
        let areas = l.areas().count();
        let far = shifted(&l, 0x7e00_1000_0000);
        let m = placement_moves(&a, &far).unwrap();
        assert_eq!(m.len(), areas, "{m:?}");
        // Up by one page: every area would land on itself; they go
        // through the scratch range.
        let up = shifted(&l, 0x7e00_0000_0000 + p);
        let m = placement_moves_via(&a, &up, 0x7e00_2000_0000).unwrap();
        assert!(m.iter().any(|m| m.to == 0x7e00_2000_0000), "{m:?}");
        // Up by the length of [vvar]: [vvar] lands on the others, which
        // move first; no temporary.
        let vvar_len = a.vvar.map(|r| r.1 - r.0).unwrap();
        let by_vvar = shifted(&l, 0x7e00_0000_0000 + vvar_len);
        let m = placement_moves_via(&a, &by_vvar, 0x7e00_2000_0000).unwrap();
        assert_eq!(m.len(), areas, "{m:?}");
        assert_eq!(m.last().map(|m| m.name), Some(VVAR), "[vvar] last: {m:?}");
        // A scratch range on top of a target is refused.
        let e = placement_moves_via(&a, &far, far.vdso.unwrap().0).unwrap_err();
        assert!(e.to_string().contains("scratch"), "{e}");
        assert!(default_scratch(&a, &far) > far.vdso.unwrap().1);
    }

    /// What a forked child reports after its moves.
    const REPORT: usize = 4 * 8;

    fn report(fd: &OwnedFd) -> [u64; 4] {
        let b = read_timeout(fd, REPORT, T, "the child's report");
        let mut out = [0u64; 4];
        for (k, c) in b.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            out[k] = u64::from_ne_bytes(w);
        }
        out
    }

    /// A reserved, unused range of `pages` pages (PROT_NONE), unmapped on
    /// drop: room to move areas into without hitting anything.
    struct Reserve(u64, u64);

    impl Reserve {
        fn new(pages: u64) -> Reserve {
            let len = pages * PAGE;
            // SAFETY: a fresh anonymous mapping at an address of the kernel's
            // choice; nothing else refers to it.
            let a = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    crate::usize_of(len),
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(
                a,
                libc::MAP_FAILED,
                "mmap: {}",
                std::io::Error::last_os_error()
            );
            Reserve(a as u64, len)
        }
    }

    impl Drop for Reserve {
        fn drop(&mut self) {
            // SAFETY: unmaps only our own reservation.
            unsafe { libc::munmap(self.0 as *mut libc::c_void, crate::usize_of(self.1)) };
        }
    }

    /// In a forked child: unmap the reservation, run the moves with raw
    /// mremap, then call `clock_gettime` through the vDSO at `call` (never
    /// through glibc, which still has the old address cached). Reports
    /// [0, 0, monotonic ns, realtime ns], or [1 + failed move, errno, 0, 0]
    /// or [100 + ret, 0, 0, 0] if the call failed; then waits for a byte on
    /// `go` and exits.
    fn run_moves_child(
        reserve: (u64, u64),
        moves: &[Vec<AreaMove>],
        call: u64,
        rep: i32,
        go: i32,
    ) -> i32 {
        // SAFETY: raw syscalls; the reservation is ours; a child that
        // hangs dies of SIGALRM.
        unsafe {
            libc::alarm(20);
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::munmap(reserve.0 as *mut libc::c_void, crate::usize_of(reserve.1));
        }
        let mut k = 0u64;
        for m in moves.iter().flatten() {
            k += 1;
            // SAFETY: moves the vDSO areas only; nothing in this child uses
            // them until the call below, which goes to their new place.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_mremap,
                    m.from,
                    m.len,
                    m.len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    m.to,
                )
            };
            if r as u64 != m.to {
                let e = nix::errno::Errno::last() as u64;
                child_write(rep, &words([k, e, 0, 0]));
                return 1;
            }
        }
        type ClockGettime = extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int;
        // SAFETY: `call` is __vdso_clock_gettime of the moved vDSO (the
        // parent's symbol table, the same vDSO), which has this signature.
        let f: ClockGettime = unsafe { std::mem::transmute(crate::usize_of(call)) };
        let mut t = [libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        }; 2];
        let r0 = f(libc::CLOCK_MONOTONIC, &mut t[0]);
        let r1 = f(libc::CLOCK_REALTIME, &mut t[1]);
        if r0 != 0 || r1 != 0 {
            child_write(rep, &words([100 + (r0 | r1) as u64, 0, 0, 0]));
            return 1;
        }
        let ns = |t: &libc::timespec| t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
        child_write(rep, &words([0, 0, ns(&t[0]), ns(&t[1])]));
        let mut b = [0u8];
        child_read(go, &mut b);
        0
    }

    fn words(w: [u64; 4]) -> [u8; REPORT] {
        let mut b = [0u8; REPORT];
        for (k, v) in w.iter().enumerate() {
            b[k * 8..k * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    fn now_ns(clock: libc::clockid_t) -> u64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes one timespec we own.
        assert_eq!(unsafe { libc::clock_gettime(clock, &mut t) }, 0);
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }

    /// The restore plan against the real kernel: a forked child moves its
    /// [vvar], [vvar_vclock] and [vdso] (first far away, then by one page,
    /// which needs a temporary), then reads the clocks through the moved
    /// vDSO: the times are the parent's, and /proc shows the areas at the
    /// planned places with the same vDSO.
    #[test]
    fn moved_vdso_still_tells_the_time() {
        let here = VdsoLayout::of_self().unwrap();
        assert!(here.vdso.is_some() && here.vvar.is_some(), "{here:?}");
        let res = Reserve::new(64);
        let a = shifted(&here, res.0 + 16 * PAGE);
        let b = shifted(&here, res.0 + 15 * PAGE);
        let scratch = res.0 + 40 * PAGE;
        let first = placement_moves_via(&here, &a, scratch).unwrap();
        let second = placement_moves_via(&a, &b, scratch).unwrap();
        assert!(
            second.iter().any(|m| m.to == scratch),
            "a 1-page shift parks an area: {second:?}"
        );
        let call = b.symbol(CLOCK_GETTIME).unwrap();
        let (rep_r, rep_w) = pipe();
        let (go_r, go_w) = pipe();
        let t0 = (now_ns(libc::CLOCK_MONOTONIC), now_ns(libc::CLOCK_REALTIME));
        let (rw, gr) = (rep_w.as_raw_fd(), go_r.as_raw_fd());
        let reserve = (res.0, res.1);
        let moves = vec![first, second.clone()];
        let mut child: Child = fork_child(move || {
            let code = run_moves_child(reserve, &moves, call, rw, gr);
            std::mem::forget(moves); // no free() after fork
            code
        });
        let r = report(&rep_r);
        let t1 = (now_ns(libc::CLOCK_MONOTONIC), now_ns(libc::CLOCK_REALTIME));
        assert_eq!(
            r[0],
            0,
            "move {} failed with errno {} ({}); moves {second:?}",
            r[0],
            r[1],
            nix::errno::Errno::from_raw(i32::try_from(r[1]).unwrap())
        );
        assert!(
            t0.0 <= r[2] && r[2] <= t1.0,
            "CLOCK_MONOTONIC via the moved vDSO: {} not in [{}, {}]",
            r[2],
            t0.0,
            t1.0
        );
        assert!(
            r[3] + 1_000_000 >= t0.1 && r[3] <= t1.1 + 1_000_000,
            "CLOCK_REALTIME via the moved vDSO: {} not in [{}, {}]",
            r[3],
            t0.1,
            t1.1
        );
        let there = VdsoLayout::of_pid(child.pid).unwrap();
        assert_eq!(there, b, "the child's areas are where the plan put them");
        check_compatible(&there, &here).unwrap();
        nix::unistd::write(&go_w, b"x").unwrap();
        assert_eq!(child.wait(T), 0);
    }

    /// Why every area moves: a vDSO moved away from its vvar reads its data
    /// from where the vvar is not, and faults.
    #[test]
    fn vdso_moved_without_its_data_faults() {
        let here = VdsoLayout::of_self().unwrap();
        let res = Reserve::new(16);
        let (from, end) = here.vdso.unwrap();
        let only_vdso = vec![vec![AreaMove {
            name: VDSO,
            from,
            to: res.0 + 8 * PAGE,
            len: end - from,
        }]];
        let call = here.symbol(CLOCK_GETTIME).unwrap() - from + res.0 + 8 * PAGE;
        let (_rep_r, rep_w) = pipe();
        let (go_r, _go_w) = pipe();
        let (rw, gr) = (rep_w.as_raw_fd(), go_r.as_raw_fd());
        let reserve = (res.0, res.1);
        let mut child = fork_child(move || {
            let code = run_moves_child(reserve, &only_vdso, call, rw, gr);
            std::mem::forget(only_vdso); // no free() after fork
            code
        });
        let code = child.wait(T);
        assert!(
            code == 128 + libc::SIGSEGV || code == 128 + libc::SIGBUS,
            "the child exited with {code}, expected a fault"
        );
    }
}
