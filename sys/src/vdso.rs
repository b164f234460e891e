//! The vDSO and vvar areas of a process and the vDSO's symbols (ELF parsed
//! with `object`).
//!
//! Areas are found by name in /proc/PID/maps, never by size: newer kernels
//! split vvar (`[vvar]` + `[vvar_vclock]`). A restored process keeps the vDSO
//! of the kernel it runs on, moved (mremap) to where the image had it, so
//! the image's vDSO must be the same code: same length, same bytes (crc),
//! same symbol offsets. Anything else is refused with a clear error for now.

use object::{Object, ObjectSymbol};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VdsoSymbol {
    pub name: String,
    /// From the start of the vDSO.
    pub offset: u64,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct VdsoLayout {
    pub vdso: Option<(u64, u64)>,
    pub vvar: Option<(u64, u64)>,
    pub vvar_vclock: Option<(u64, u64)>,
    pub vdso_crc32: u32,
    pub vdso_len: u64,
    pub symbols: Vec<VdsoSymbol>,
}

/// One mremap a restore makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaMove {
    pub name: &'static str,
    pub from: u64,
    pub to: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VdsoError {
    #[error("{path}: {what}")]
    Read { path: String, what: String },
    #[error("the vDSO of PID {pid} at {addr:#x} is not a valid ELF object: {what}")]
    Elf { pid: i32, addr: u64, what: String },
    #[error(
        "the vDSO of this kernel differs from the image's ({what}): restore on a host running the same kernel build"
    )]
    Incompatible { what: String },
}

fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

impl VdsoLayout {
    pub fn of_pid(pid: i32) -> Result<VdsoLayout, VdsoError> {
        Self::read(&format!("/proc/{pid}"), pid)
    }

    pub fn of_self() -> Result<VdsoLayout, VdsoError> {
        Self::read("/proc/self", std::process::id() as i32)
    }

    fn read(proc_dir: &str, pid: i32) -> Result<VdsoLayout, VdsoError> {
        let path = format!("{proc_dir}/maps");
        let maps = std::fs::read_to_string(&path).map_err(|e| VdsoError::Read {
            path: path.clone(),
            what: e.to_string(),
        })?;
        let mut l = VdsoLayout::default();
        for line in maps.lines() {
            let mut w = line.split_whitespace();
            let range = w.next().and_then(parse_range);
            let name = w.nth(4);
            match (range, name) {
                (Some(r), Some("[vdso]")) => l.vdso = Some(r),
                (Some(r), Some("[vvar]")) => l.vvar = Some(r),
                (Some(r), Some("[vvar_vclock]")) => l.vvar_vclock = Some(r),
                _ => {}
            }
        }
        let Some((start, end)) = l.vdso else {
            return Ok(l);
        };
        let mem = format!("{proc_dir}/mem");
        let mut bytes = vec![0u8; (end - start) as usize];
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(&mem).map_err(|e| VdsoError::Read {
                path: mem.clone(),
                what: e.to_string(),
            })?;
            f.read_exact_at(&mut bytes, start)
                .map_err(|e| VdsoError::Read {
                    path: mem.clone(),
                    what: format!("{start:#x}: {e}"),
                })?;
        }
        l.vdso_len = bytes.len() as u64;
        l.vdso_crc32 = crc32fast::hash(&bytes);
        let file = object::File::parse(&*bytes).map_err(|e| VdsoError::Elf {
            pid,
            addr: start,
            what: e.to_string(),
        })?;
        // The vDSO is linked at 0 (or a base): offsets are relative to the
        // first loadable segment's address.
        let base = file.relative_address_base();
        for s in file.dynamic_symbols() {
            if !s.is_definition() {
                continue;
            }
            let Ok(name) = s.name() else { continue };
            if name.is_empty() {
                continue;
            }
            l.symbols.push(VdsoSymbol {
                name: name.to_string(),
                offset: s.address().wrapping_sub(base),
                size: s.size(),
            });
        }
        l.symbols.sort_by(|a, b| a.name.cmp(&b.name));
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
}

fn len(r: Option<(u64, u64)>) -> Option<u64> {
    r.map(|(a, b)| b - a)
}

/// The image's vDSO can be replaced by `here`'s (the same code, areas of the
/// same sizes).
pub fn check_compatible(image: &VdsoLayout, here: &VdsoLayout) -> Result<(), VdsoError> {
    let mut diffs = Vec::new();
    if image.vdso.is_some() && here.vdso.is_none() {
        diffs.push("this process has no vDSO".to_string());
    }
    if image.vdso_len != here.vdso_len || image.vdso_crc32 != here.vdso_crc32 {
        diffs.push(format!(
            "image: {} bytes crc {:#010x}, here: {} bytes crc {:#010x}",
            image.vdso_len, image.vdso_crc32, here.vdso_len, here.vdso_crc32
        ));
    }
    if image.symbols != here.symbols {
        diffs.push("symbol offsets differ".into());
    }
    for (name, a, b) in [
        ("[vvar]", image.vvar, here.vvar),
        ("[vvar_vclock]", image.vvar_vclock, here.vvar_vclock),
    ] {
        if len(a) != len(b) {
            diffs.push(format!(
                "{name}: image {:?} bytes, here {:?}",
                len(a),
                len(b)
            ));
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

/// The mremaps that put `here`'s areas where `image` had them. Areas that
/// would land on another area not yet moved go through a temporary place:
/// just above the highest address involved.
pub fn placement_moves(here: &VdsoLayout, image: &VdsoLayout) -> Result<Vec<AreaMove>, VdsoError> {
    check_compatible(image, here)?;
    let mut pending: Vec<AreaMove> = [
        ("[vvar]", here.vvar, image.vvar),
        ("[vvar_vclock]", here.vvar_vclock, image.vvar_vclock),
        ("[vdso]", here.vdso, image.vdso),
    ]
    .into_iter()
    .filter_map(|(name, h, i)| {
        let (h, i) = (h?, i?);
        (h.0 != i.0).then_some(AreaMove {
            name,
            from: h.0,
            to: i.0,
            len: h.1 - h.0,
        })
    })
    .collect();
    let overlaps = |a: u64, alen: u64, b: u64, blen: u64| a < b + blen && b < a + alen;
    let mut out = Vec::new();
    // First move every area out of the way to a temporary place above all
    // of them when any destination overlaps a source; then to the target.
    let clash = pending
        .iter()
        .any(|m| pending.iter().any(|o| overlaps(m.to, m.len, o.from, o.len)));
    if clash {
        let top = pending
            .iter()
            .map(|m| (m.from + m.len).max(m.to + m.len))
            .max()
            .unwrap_or(0);
        let mut at = (top + (1 << 20)) & !0xfff;
        for m in &mut pending {
            out.push(AreaMove {
                name: m.name,
                from: m.from,
                to: at,
                len: m.len,
            });
            m.from = at;
            at += m.len;
        }
    }
    out.extend(pending);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_vdso_has_the_clock_symbols() {
        let l = VdsoLayout::of_self().unwrap();
        assert!(l.vdso.is_some());
        assert!(
            l.symbol("__vdso_clock_gettime").is_some(),
            "{:?}",
            l.symbols
        );
        check_compatible(&l, &l).unwrap();
    }

    #[test]
    fn moved_vdso_still_tells_the_time() {
        // A child moves its own vDSO and vvar areas, then calls
        // clock_gettime through the moved vDSO.
        let mut fds = [0i32; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let here = VdsoLayout::of_self().unwrap();
        let sym = here
            .symbols
            .iter()
            .find(|s| s.name == "__vdso_clock_gettime")
            .unwrap()
            .offset;
        // SAFETY: the child only makes raw syscalls and calls into the vDSO.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let mut target = here.clone();
            let shift = 0x10_0000_0000u64;
            for r in [&mut target.vdso, &mut target.vvar, &mut target.vvar_vclock]
                .into_iter()
                .flatten()
            {
                *r = (r.0 - shift, r.1 - shift);
            }
            let mut code = 1u8;
            if let Ok(moves) = placement_moves(&here, &target) {
                let mut ok = true;
                for m in moves {
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
                    ok &= r as u64 == m.to;
                }
                if ok {
                    let f: extern "C" fn(libc::clockid_t, *mut libc::timespec) -> i32 =
                        unsafe { std::mem::transmute((target.vdso.unwrap().0 + sym) as usize) };
                    let mut ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    };
                    if f(libc::CLOCK_REALTIME, &mut ts) == 0 {
                        let now = ts.tv_sec as u64;
                        unsafe { libc::write(fds[1], (&now as *const u64).cast(), 8) };
                        code = 0;
                    }
                }
            }
            unsafe { libc::_exit(code as i32) };
        }
        let mut st = 0;
        unsafe { libc::waitpid(child, &mut st, 0) };
        assert!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "child status {st:#x}"
        );
        let mut b = [0u8; 8];
        assert_eq!(unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 8) }, 8);
        let t = u64::from_ne_bytes(b);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(t) <= 2, "moved vDSO said {t}, now {now}");
    }

    #[test]
    fn a_different_vdso_is_refused() {
        let l = VdsoLayout::of_self().unwrap();
        let mut other = l.clone();
        other.vdso_crc32 ^= 1;
        let e = check_compatible(&other, &l).unwrap_err().to_string();
        assert!(e.contains("same kernel build"), "{e}");
    }
}
