//! ptrace register sets (`PTRACE_GETREGSET` / `PTRACE_SETREGSET`) of one
//! ptrace-stopped thread: general registers, FPU / xsave state, and on
//! aarch64 the TLS register and the pointer-authentication keys.
//!
//! `tern dump` calls [`ThreadRegs::capture`] on each frozen thread and
//! stores the result in the image; `tern restore` calls
//! [`ThreadRegs::apply`] on the matching thread of the recreated process.
//! Register sets are kept as the raw bytes the kernel gave (the regset
//! layout *is* the image format), with typed accessors on top, so nothing is
//! lost in translation and a newer kernel's additions survive a round trip.
//!
//! Every function here must be called from the thread that ptrace-attached
//! `tid`, while `tid` is in a ptrace stop (the kernel answers `ESRCH`
//! otherwise).
//!
//! Byte order: both supported architectures are little-endian; the
//! accessors decode the bytes as little-endian so that an image can be
//! inspected on either machine.
//!
//! Not covered (yet): arm64 SVE/SME state beyond the FPSIMD view
//! (`NT_ARM_SVE`, `NT_ARM_ZA`), the arm64 syscall number
//! (`NT_ARM_SYSTEM_CALL`), debug registers, 32-bit (compat) threads.

use nix::errno::Errno;

// Note types, from include/uapi/linux/elf.h (checked against the 6.1 system
// headers and the cross aarch64 headers).
/// General registers (`struct user_regs_struct` / `struct user_pt_regs`).
pub const NT_PRSTATUS: u32 = 1;
/// FPU registers (x86: `struct user_i387_struct`, the FXSAVE area;
/// aarch64: `struct user_fpsimd_state`).
pub const NT_PRFPREG: u32 = 2;
/// x86 extended state in the standard (non-compacted) XSAVE format.
pub const NT_X86_XSTATE: u32 = 0x202;
/// arm64 TLS register (`tpidr_el0`, and `tpidr2_el0` on SME kernels).
pub const NT_ARM_TLS: u32 = 0x401;
/// arm64 pointer-authentication address keys (`struct user_pac_address_keys`).
pub const NT_ARM_PACA_KEYS: u32 = 0x407;
/// arm64 pointer-authentication generic key (`struct user_pac_generic_keys`).
pub const NT_ARM_PACG_KEYS: u32 = 0x408;
/// arm64 mask of enabled address keys (`PR_PAC_SET_ENABLED_KEYS`), a u64.
pub const NT_ARM_PAC_ENABLED_KEYS: u32 = 0x40a;

/// `ThreadRegs::arch` of an x86_64 thread.
pub const ARCH_X86_64: &str = "x86_64";
/// `ThreadRegs::arch` of an aarch64 thread.
pub const ARCH_AARCH64: &str = "aarch64";
/// The architecture tern runs on, spelled as in [`ThreadRegs::arch`].
pub const HOST_ARCH: &str = std::env::consts::ARCH;

/// All four arm64 address keys enabled (`PR_PAC_APIAKEY | PR_PAC_APIBKEY |
/// PR_PAC_APDAKEY | PR_PAC_APDBKEY`, include/uapi/linux/prctl.h): what a
/// kernel without `NT_ARM_PAC_ENABLED_KEYS` implicitly has.
pub const PAC_ALL_ADDRESS_KEYS: u64 = 0xf;

/// Offsets into `struct user_regs_struct` (arch/x86/include/asm/user_64.h;
/// the 27 u64 registers in kernel order). Checked against
/// `libc::user_regs_struct` by a test.
pub mod x86_gp {
    pub const LEN: usize = 27 * 8;
    pub const R12: usize = 24;
    pub const RAX: usize = 80;
    pub const ORIG_RAX: usize = 120;
    pub const RIP: usize = 128;
    pub const RSP: usize = 152;
    pub const FS_BASE: usize = 168;
    pub const GS_BASE: usize = 176;
}

/// Offsets into `struct user_pt_regs` (arch/arm64/include/uapi/asm/ptrace.h:
/// `regs[31], sp, pc, pstate`).
pub mod arm64_gp {
    pub const LEN: usize = 34 * 8;
    pub const X0: usize = 0;
    pub const SP: usize = 31 * 8;
    pub const PC: usize = 32 * 8;
    pub const PSTATE: usize = 33 * 8;
    /// `struct user_fpsimd_state`: 32 128-bit V registers, fpsr, fpcr, 2
    /// reserved u32.
    pub const FPSIMD_LEN: usize = 32 * 16 + 16;
}

/// Offsets in the x86 standard-format XSAVE area (Intel SDM vol. 1 ch. 13,
/// `struct fxregs_state` / `struct xregs_state` in
/// arch/x86/include/asm/fpu/types.h).
pub mod xsave {
    /// The legacy FXSAVE region (also all of `NT_PRFPREG` on x86_64).
    pub const LEGACY_LEN: usize = 512;
    /// MXCSR (u32).
    pub const MXCSR: usize = 24;
    /// XMM0..XMM15, 16 bytes each.
    pub const XMM0: usize = 160;
    /// Bytes 464..512 are left to software. In the ptrace / core-dump
    /// layout (`struct user_xstateregs`, arch/x86/include/asm/user.h:
    /// `i387.xstate_fx_sw[USER_XSTATE_XCR0_WORD]`) Linux stores there, as
    /// the first u64, its user XCR0: the features the area's layout covers.
    /// (Signal frames use the same bytes differently, as `struct
    /// _fpx_sw_bytes`; that format does not apply here.)
    pub const XCR0: usize = 464;
    pub const HEADER: usize = 512;
    pub const XSTATE_BV: usize = 512;
    pub const XCOMP_BV: usize = 520;
    /// Legacy region plus header: the smallest valid XSAVE area.
    pub const MIN_LEN: usize = 576;
    /// XSAVE feature numbers (bits of XCR0 / XSTATE_BV).
    pub const FEATURE_SSE: u32 = 1;
    pub const FEATURE_AVX: u32 = 2;
}

/// The XSAVE header (Intel SDM vol. 1 13.4.2; `struct xstate_header` in
/// arch/x86/include/asm/fpu/types.h), at offset 512 of the area.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XstateHeader {
    /// XSTATE_BV: components not in their initial state.
    pub xfeatures: u64,
    /// XCOMP_BV: 0 in the standard format ptrace uses.
    pub xcomp_bv: u64,
    pub reserved: [u64; 6],
}

impl XstateHeader {
    pub const SIZE: usize = 64;

    /// Read from a whole XSAVE area.
    pub fn from_xsave(area: &[u8]) -> Option<XstateHeader> {
        let b = area.get(xsave::HEADER..xsave::HEADER + Self::SIZE)?;
        let mut reserved = [0u64; 6];
        for (i, r) in reserved.iter_mut().enumerate() {
            *r = le_u64(b, 16 + 8 * i)?;
        }
        Some(XstateHeader {
            xfeatures: le_u64(b, 0)?,
            xcomp_bv: le_u64(b, 8)?,
            reserved,
        })
    }
}

/// `struct user_pac_address_keys` (arch/arm64/include/uapi/asm/ptrace.h):
/// four `__uint128_t`, each stored here as two u64 in memory order (element
/// 0 is the low half on little-endian arm64).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UserPacAddressKeys {
    pub apiakey: [u64; 2],
    pub apibkey: [u64; 2],
    pub apdakey: [u64; 2],
    pub apdbkey: [u64; 2],
}

/// `struct user_pac_generic_keys` (arch/arm64/include/uapi/asm/ptrace.h).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UserPacGenericKeys {
    pub apgakey: [u64; 2],
}

fn le_u128_words(b: &[u8], off: usize) -> Option<[u64; 2]> {
    Some([le_u64(b, off)?, le_u64(b, off + 8)?])
}

impl UserPacAddressKeys {
    pub const SIZE: usize = 64;

    pub fn from_bytes(b: &[u8]) -> Option<UserPacAddressKeys> {
        if b.len() != Self::SIZE {
            return None;
        }
        Some(UserPacAddressKeys {
            apiakey: le_u128_words(b, 0)?,
            apibkey: le_u128_words(b, 16)?,
            apdakey: le_u128_words(b, 32)?,
            apdbkey: le_u128_words(b, 48)?,
        })
    }

    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        let words = [self.apiakey, self.apibkey, self.apdakey, self.apdbkey];
        for (i, w) in words.iter().flatten().enumerate() {
            out[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

impl UserPacGenericKeys {
    pub const SIZE: usize = 16;

    pub fn from_bytes(b: &[u8]) -> Option<UserPacGenericKeys> {
        if b.len() != Self::SIZE {
            return None;
        }
        Some(UserPacGenericKeys {
            apgakey: le_u128_words(b, 0)?,
        })
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.apgakey[0].to_le_bytes());
        out[8..].copy_from_slice(&self.apgakey[1].to_le_bytes());
        out
    }
}

/// Everything that can go wrong. Variants name the thread and the register
/// set involved and say what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("{op} of {} on thread {tid}: {errno}; {}", note_name(*.note), errno_hint(*.errno))]
    Ptrace {
        tid: i32,
        op: &'static str,
        note: u32,
        errno: Errno,
    },
    #[error(
        "thread {tid}: the kernel returned {len} bytes for {}, expected {expected}; this kernel's register layout is not one tern knows (report it with the kernel version)",
        note_name(*.note)
    )]
    KernelLayout {
        tid: i32,
        note: u32,
        len: usize,
        expected: String,
    },
    #[error(
        "thread {tid}: {} is larger than {max} bytes; this kernel's register set is not one tern knows (report it with the kernel version)",
        note_name(*.note)
    )]
    TooLarge { tid: i32, note: u32, max: usize },
    #[error(
        "thread {tid}: the kernel took only {consumed} of the image's {len} bytes of {} and the rest is not zero; this kernel or CPU lacks register state the image has: restore on a machine with the same CPU features and a kernel at least as new",
        note_name(*.note)
    )]
    PartialSet {
        tid: i32,
        note: u32,
        consumed: usize,
        len: usize,
    },
    #[error(
        "thread {tid}: the image holds {image} registers but this machine is {host}; restore it on an {image} machine"
    )]
    ArchMismatch {
        tid: i32,
        image: String,
        host: &'static str,
    },
    #[error(
        "thread {tid}: the image's xsave area uses CPU state components {missing:#x} that this machine does not enable (image XCR0 {image_xcr0:#x}, this CPU/kernel {cpu_xcr0:#x}); restore on a machine with the same CPU features (same CPU model, or a VM exposing the same CPU flags)"
    )]
    XstateFeatures {
        tid: i32,
        image_xcr0: u64,
        cpu_xcr0: u64,
        missing: u64,
    },
    #[error(
        "thread {tid}: the image's xsave area is {image} bytes but this CPU/kernel's is {cpu} bytes (image XCR0 {image_xcr0:#x}, this machine {cpu_xcr0:#x}); restore on a machine with the same CPU features (same CPU model, or a VM exposing the same CPU flags)"
    )]
    XstateSize {
        tid: i32,
        image: usize,
        cpu: usize,
        image_xcr0: u64,
        cpu_xcr0: u64,
    },
    #[error(
        "thread {tid}: the image has {what} but this CPU/kernel does not provide it ({errno}); restore on a machine with the same CPU features"
    )]
    Unavailable {
        tid: i32,
        what: &'static str,
        errno: Errno,
    },
    #[error(
        "thread {tid}: invalid register image: {what}; the image is corrupt or was written by an incompatible tern version"
    )]
    Invalid { tid: i32, what: String },
    #[error(
        "invalid register image: {what}; the image is corrupt or was written by an incompatible tern version"
    )]
    Malformed { what: String },
}

/// Symbolic name of a note type, for messages.
pub fn note_name(note: u32) -> &'static str {
    match note {
        NT_PRSTATUS => "NT_PRSTATUS (general registers)",
        NT_PRFPREG => "NT_PRFPREG (FPU registers)",
        NT_X86_XSTATE => "NT_X86_XSTATE (xsave area)",
        NT_ARM_TLS => "NT_ARM_TLS",
        NT_ARM_PACA_KEYS => "NT_ARM_PACA_KEYS (PAC address keys)",
        NT_ARM_PACG_KEYS => "NT_ARM_PACG_KEYS (PAC generic key)",
        NT_ARM_PAC_ENABLED_KEYS => "NT_ARM_PAC_ENABLED_KEYS",
        _ => "an unknown register set",
    }
}

fn errno_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::ESRCH => {
            "the thread does not exist, is not traced by this tracer thread, or is not in a ptrace stop: PTRACE_SEIZE and PTRACE_INTERRUPT it from this same thread and wait for the stop first"
        }
        Errno::EINVAL | Errno::ENODEV => {
            "this kernel or CPU does not provide that register set, or rejected its size"
        }
        Errno::EFAULT | Errno::EIO => {
            "the kernel rejected the buffer: wrong size or invalid contents (e.g. an xsave area from a CPU with other features)"
        }
        Errno::EPERM => "not permitted: run tern as root or with CAP_SYS_PTRACE",
        _ => "unexpected error from the kernel",
    }
}

fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

fn put_u64(b: &mut [u8], off: usize, v: u64) -> bool {
    match off.checked_add(8).and_then(|end| b.get_mut(off..end)) {
        Some(s) => {
            s.copy_from_slice(&v.to_le_bytes());
            true
        }
        None => false,
    }
}

/// `PTRACE_GETREGSET`: the register set `note` of the stopped thread `tid`,
/// exactly the bytes the kernel filled (at most `max_len`). `max_len` must
/// be a multiple of the set's element size (16 is always enough: PAC keys
/// are 16-byte elements) or the kernel answers `EINVAL`. A set larger than
/// `max_len` is silently cut by the kernel; [`get_regset_whole`] grows the
/// buffer until it fits.
pub fn get_regset(tid: i32, note: u32, max_len: usize) -> Result<Vec<u8>, RegsError> {
    let mut buf = vec![0u8; max_len];
    // The kernel only ever shrinks iov_len (to what it filled); get_regset
    // caps it at the buffer's length.
    let filled =
        crate::ptrace::get_regset(tid, note, &mut buf).map_err(|errno| RegsError::Ptrace {
            tid,
            op: "PTRACE_GETREGSET",
            note,
            errno,
        })?;
    buf.truncate(filled);
    Ok(buf)
}

/// [`get_regset`] with a buffer that starts at `start` bytes and doubles
/// (up to 1 MiB) until the kernel no longer fills it completely, so a set
/// whose size depends on the CPU (the xsave area) is never cut short.
pub fn get_regset_whole(tid: i32, note: u32, start: usize) -> Result<Vec<u8>, RegsError> {
    const MAX: usize = 1 << 20;
    let mut len = start.max(16).next_multiple_of(16);
    loop {
        let v = get_regset(tid, note, len)?;
        if v.len() < len {
            return Ok(v);
        }
        if len >= MAX {
            return Err(RegsError::TooLarge {
                tid,
                note,
                max: MAX,
            });
        }
        len *= 2;
    }
}

/// `PTRACE_SETREGSET`: write `data` as register set `note` of the stopped
/// thread `tid`. If the kernel's set is smaller than `data` (it takes only
/// what it knows), the ignored tail must be all zero, otherwise register
/// state would be dropped silently: [`RegsError::PartialSet`].
pub fn set_regset(tid: i32, note: u32, data: &[u8]) -> Result<(), RegsError> {
    let consumed =
        crate::ptrace::set_regset(tid, note, data).map_err(|errno| RegsError::Ptrace {
            tid,
            op: "PTRACE_SETREGSET",
            note,
            errno,
        })?;
    if data[consumed..].iter().any(|&b| b != 0) {
        return Err(RegsError::PartialSet {
            tid,
            note,
            consumed,
            len: data.len(),
        });
    }
    Ok(())
}

/// [`get_regset_whole`], with "this kernel/CPU has no such set" (`ENODEV`,
/// `EINVAL`) turned into `None`.
fn get_optional(tid: i32, note: u32, start: usize) -> Result<Option<Vec<u8>>, RegsError> {
    match get_regset_whole(tid, note, start) {
        Ok(v) => Ok(Some(v)),
        Err(RegsError::Ptrace {
            errno: Errno::ENODEV | Errno::EINVAL,
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// arm64 pointer-authentication state of a thread. Every part is optional:
/// address and generic authentication are separate CPU features, and the
/// enabled-keys regset appeared in Linux 5.13.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PacKeys {
    /// `struct user_pac_address_keys`.
    pub address: Option<PacAddressKeys>,
    /// `struct user_pac_generic_keys`: the APGA key, two u64 in memory order.
    pub generic: Option<[u64; 2]>,
    /// `NT_ARM_PAC_ENABLED_KEYS`: `PR_PAC_AP*KEY` bits of the enabled keys.
    pub enabled_keys: Option<u64>,
}

/// The four address keys, each a `__uint128_t` as two u64 in memory order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacAddressKeys {
    pub apia: [u64; 2],
    pub apib: [u64; 2],
    pub apda: [u64; 2],
    pub apdb: [u64; 2],
}

impl From<UserPacAddressKeys> for PacAddressKeys {
    fn from(k: UserPacAddressKeys) -> Self {
        PacAddressKeys {
            apia: k.apiakey,
            apib: k.apibkey,
            apda: k.apdakey,
            apdb: k.apdbkey,
        }
    }
}

impl From<PacAddressKeys> for UserPacAddressKeys {
    fn from(k: PacAddressKeys) -> Self {
        UserPacAddressKeys {
            apiakey: k.apia,
            apibkey: k.apib,
            apdakey: k.apda,
            apdbkey: k.apdb,
        }
    }
}

/// The register state of one thread. Byte blobs are the kernel's regsets
/// verbatim (an image keeps them as they are: `images::state::RegsState`).
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadRegs {
    /// `"x86_64"` or `"aarch64"` ([`ARCH_X86_64`], [`ARCH_AARCH64`]).
    pub arch: String,
    /// `NT_PRSTATUS`.
    pub gp: Vec<u8>,
    /// `NT_PRFPREG`.
    pub fp: Option<Vec<u8>>,
    /// x86 `NT_X86_XSTATE` (standard XSAVE format); `None` without XSAVE.
    pub xstate: Option<Vec<u8>>,
    /// arm64 `NT_ARM_TLS`.
    pub tls: Option<Vec<u8>>,
    /// arm64 pointer-authentication keys; `None` on x86, on CPUs/kernels
    /// without PAC, and in images written before PAC support.
    pub pac: Option<PacKeys>,
}

impl ThreadRegs {
    /// Read every register set the architecture has from the stopped
    /// thread `tid` (x86_64: general, FPU, xsave; aarch64: general, FPSIMD,
    /// TLS, PAC keys when the CPU and kernel have them).
    pub fn capture(tid: i32) -> Result<ThreadRegs, RegsError> {
        #[cfg(target_arch = "x86_64")]
        {
            capture_x86_64(tid)
        }
        #[cfg(target_arch = "aarch64")]
        {
            capture_aarch64(tid)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Err(RegsError::ArchMismatch {
                tid,
                image: String::from("(none)"),
                host: HOST_ARCH,
            })
        }
    }

    /// Set all the register sets of this image into the stopped thread
    /// `tid`. Everything that can be checked is checked before the first
    /// write (architecture, sizes, x86 xsave features, arm64 PAC
    /// availability), so a refused image leaves the thread unchanged.
    pub fn apply(&self, tid: i32) -> Result<(), RegsError> {
        if self.arch != HOST_ARCH {
            return Err(RegsError::ArchMismatch {
                tid,
                image: self.arch.clone(),
                host: HOST_ARCH,
            });
        }
        self.validate()
            .map_err(|what| RegsError::Invalid { tid, what })?;
        #[cfg(target_arch = "x86_64")]
        {
            apply_x86_64(self, tid)
        }
        #[cfg(target_arch = "aarch64")]
        {
            apply_aarch64(self, tid)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Err(RegsError::ArchMismatch {
                tid,
                image: self.arch.clone(),
                host: HOST_ARCH,
            })
        }
    }

    /// Check the sizes of the blobs against the architecture's layouts.
    /// Returns what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let expect = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(format!(
                    "{} {what} is {got} bytes, expected {want}",
                    self.arch
                ))
            }
        };
        match self.arch.as_str() {
            ARCH_X86_64 => {
                expect("NT_PRSTATUS", self.gp.len(), x86_gp::LEN)?;
                if let Some(fp) = &self.fp {
                    expect("NT_PRFPREG", fp.len(), xsave::LEGACY_LEN)?;
                }
                if let Some(x) = &self.xstate
                    && (x.len() < xsave::MIN_LEN || !x.len().is_multiple_of(8))
                {
                    return Err(format!(
                        "NT_X86_XSTATE is {} bytes, expected a multiple of 8 of at least {}",
                        x.len(),
                        xsave::MIN_LEN
                    ));
                }
                if self.tls.is_some() || self.pac.is_some() {
                    return Err("x86_64 registers with arm64 TLS or PAC state".into());
                }
            }
            ARCH_AARCH64 => {
                expect("NT_PRSTATUS", self.gp.len(), arm64_gp::LEN)?;
                if let Some(fp) = &self.fp {
                    expect("NT_PRFPREG", fp.len(), arm64_gp::FPSIMD_LEN)?;
                }
                if let Some(t) = &self.tls
                    && (t.is_empty() || !t.len().is_multiple_of(8))
                {
                    return Err(format!(
                        "NT_ARM_TLS is {} bytes, expected a non-zero multiple of 8",
                        t.len()
                    ));
                }
                if self.xstate.is_some() {
                    return Err("aarch64 registers with an x86 xsave area".into());
                }
            }
            other => return Err(format!("unknown architecture {other:?}")),
        }
        Ok(())
    }

    fn gp_offset(&self, x86: usize, arm64: usize) -> Option<usize> {
        match self.arch.as_str() {
            ARCH_X86_64 if self.gp.len() == x86_gp::LEN => Some(x86),
            ARCH_AARCH64 if self.gp.len() == arm64_gp::LEN => Some(arm64),
            _ => None,
        }
    }

    fn set_gp(&mut self, x86: usize, arm64: usize, v: u64, what: &str) -> Result<(), RegsError> {
        let off = self
            .gp_offset(x86, arm64)
            .ok_or_else(|| RegsError::Malformed {
                what: format!(
                    "cannot set {what}: {} general registers of {} bytes",
                    self.arch,
                    self.gp.len()
                ),
            })?;
        put_u64(&mut self.gp, off, v);
        Ok(())
    }

    /// Instruction pointer (x86 RIP, arm64 PC). `None` if the general
    /// registers do not have the architecture's size.
    pub fn ip(&self) -> Option<u64> {
        le_u64(&self.gp, self.gp_offset(x86_gp::RIP, arm64_gp::PC)?)
    }

    /// Stack pointer (x86 RSP, arm64 SP).
    pub fn sp(&self) -> Option<u64> {
        le_u64(&self.gp, self.gp_offset(x86_gp::RSP, arm64_gp::SP)?)
    }

    pub fn set_ip(&mut self, ip: u64) -> Result<(), RegsError> {
        self.set_gp(x86_gp::RIP, arm64_gp::PC, ip, "the instruction pointer")
    }

    pub fn set_sp(&mut self, sp: u64) -> Result<(), RegsError> {
        self.set_gp(x86_gp::RSP, arm64_gp::SP, sp, "the stack pointer")
    }

    /// Syscall return value / first argument register (x86 RAX, arm64 X0).
    pub fn return_value(&self) -> Option<u64> {
        le_u64(&self.gp, self.gp_offset(x86_gp::RAX, arm64_gp::X0)?)
    }

    /// x86: `orig_rax`, the number of the syscall the thread is in (or was
    /// interrupted in), -1 outside a syscall. `None` on arm64, where the
    /// number is not part of `NT_PRSTATUS` (it is `NT_ARM_SYSTEM_CALL`).
    pub fn syscall_nr(&self) -> Option<i64> {
        if self.arch != ARCH_X86_64 {
            return None;
        }
        le_u64(&self.gp, self.gp_offset(x86_gp::ORIG_RAX, 0)?).map(|v| v as i64)
    }

    /// x86: set `orig_rax` (e.g. -1 so that the kernel applies no syscall
    /// restart logic to these registers).
    pub fn set_syscall_nr(&mut self, nr: i64) -> Result<(), RegsError> {
        if self.arch != ARCH_X86_64 {
            return Err(RegsError::Malformed {
                what: format!("{} registers have no syscall number field", self.arch),
            });
        }
        self.set_gp(x86_gp::ORIG_RAX, 0, nr as u64, "orig_rax")
    }

    /// x86: the FS base (glibc's thread pointer).
    pub fn fs_base(&self) -> Option<u64> {
        if self.arch != ARCH_X86_64 {
            return None;
        }
        le_u64(&self.gp, self.gp_offset(x86_gp::FS_BASE, 0)?)
    }

    /// x86: the GS base.
    pub fn gs_base(&self) -> Option<u64> {
        if self.arch != ARCH_X86_64 {
            return None;
        }
        le_u64(&self.gp, self.gp_offset(x86_gp::GS_BASE, 0)?)
    }

    /// arm64: `tpidr_el0` (glibc's thread pointer), the first word of
    /// `NT_ARM_TLS`.
    pub fn tpidr(&self) -> Option<u64> {
        le_u64(self.tls.as_deref()?, 0)
    }

    /// x86: the user XCR0 of the kernel that produced the xsave area (the
    /// features its layout covers), from bytes 464..472.
    pub fn xstate_xcr0(&self) -> Option<u64> {
        le_u64(self.xstate.as_deref()?, xsave::XCR0)
    }

    /// x86: XSTATE_BV, the components the area actually holds (the others
    /// are in their initial state).
    pub fn xstate_bv(&self) -> Option<u64> {
        XstateHeader::from_xsave(self.xstate.as_deref()?).map(|h| h.xfeatures)
    }

    /// The general registers as `libc::user_regs_struct`, decoded field by
    /// field. `None` for other architectures or a wrong size.
    #[cfg(target_arch = "x86_64")]
    pub fn gp_x86(&self) -> Option<libc::user_regs_struct> {
        if self.arch != ARCH_X86_64 || self.gp.len() != x86_gp::LEN {
            return None;
        }
        let w: Vec<u64> = self
            .gp
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let [
            r15,
            r14,
            r13,
            r12,
            rbp,
            rbx,
            r11,
            r10,
            r9,
            r8,
            rax,
            rcx,
            rdx,
            rsi,
            rdi,
            orig_rax,
            rip,
            cs,
            eflags,
            rsp,
            ss,
            fs_base,
            gs_base,
            ds,
            es,
            fs,
            gs,
        ] = <[u64; 27]>::try_from(w).ok()?;
        Some(libc::user_regs_struct {
            r15,
            r14,
            r13,
            r12,
            rbp,
            rbx,
            r11,
            r10,
            r9,
            r8,
            rax,
            rcx,
            rdx,
            rsi,
            rdi,
            orig_rax,
            rip,
            cs,
            eflags,
            rsp,
            ss,
            fs_base,
            gs_base,
            ds,
            es,
            fs,
            gs,
        })
    }

    /// Replace the general registers (x86_64 images only).
    #[cfg(target_arch = "x86_64")]
    pub fn set_gp_x86(&mut self, r: &libc::user_regs_struct) -> Result<(), RegsError> {
        if self.arch != ARCH_X86_64 {
            return Err(RegsError::Malformed {
                what: format!("x86_64 general registers set into {} registers", self.arch),
            });
        }
        let words = [
            r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx,
            r.rdx, r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base,
            r.gs_base, r.ds, r.es, r.fs, r.gs,
        ];
        self.gp = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        Ok(())
    }

    /// The general registers as `libc::user_regs_struct` (arm64 layout).
    #[cfg(target_arch = "aarch64")]
    pub fn gp_arm64(&self) -> Option<libc::user_regs_struct> {
        if self.arch != ARCH_AARCH64 || self.gp.len() != arm64_gp::LEN {
            return None;
        }
        let mut regs = [0u64; 31];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = le_u64(&self.gp, 8 * i)?;
        }
        Some(libc::user_regs_struct {
            regs,
            sp: le_u64(&self.gp, arm64_gp::SP)?,
            pc: le_u64(&self.gp, arm64_gp::PC)?,
            pstate: le_u64(&self.gp, arm64_gp::PSTATE)?,
        })
    }

    /// Replace the general registers (aarch64 images only).
    #[cfg(target_arch = "aarch64")]
    pub fn set_gp_arm64(&mut self, r: &libc::user_regs_struct) -> Result<(), RegsError> {
        if self.arch != ARCH_AARCH64 {
            return Err(RegsError::Malformed {
                what: format!("aarch64 general registers set into {} registers", self.arch),
            });
        }
        self.gp = r
            .regs
            .iter()
            .chain([r.sp, r.pc, r.pstate].iter())
            .flat_map(|w| w.to_le_bytes())
            .collect();
        Ok(())
    }
}

/// x86: (offset, size) of XSAVE state component `feature` (>= 2) in the
/// standard format, from CPUID leaf 0xD sub-leaf `feature`. `None` if the
/// CPU does not support the component.
#[cfg(target_arch = "x86_64")]
pub fn xstate_component(feature: u32) -> Option<(usize, usize)> {
    use std::arch::x86_64::__cpuid_count;
    if !(2..64).contains(&feature) {
        return None;
    }
    // Leaf 0 gives the highest basic leaf; leaf 0xD is the XSAVE leaf.
    if __cpuid_count(0, 0).eax < 0xd {
        return None;
    }
    let r = __cpuid_count(0xd, feature);
    (r.eax != 0).then_some((r.ebx as usize, r.eax as usize))
}

#[cfg(target_arch = "x86_64")]
fn capture_x86_64(tid: i32) -> Result<ThreadRegs, RegsError> {
    let gp = get_regset(tid, NT_PRSTATUS, 1024)?;
    if gp.len() != x86_gp::LEN {
        return Err(RegsError::KernelLayout {
            tid,
            note: NT_PRSTATUS,
            len: gp.len(),
            expected: x86_gp::LEN.to_string(),
        });
    }
    let fp = get_regset(tid, NT_PRFPREG, 4096)?;
    if fp.len() != xsave::LEGACY_LEN {
        return Err(RegsError::KernelLayout {
            tid,
            note: NT_PRFPREG,
            len: fp.len(),
            expected: xsave::LEGACY_LEN.to_string(),
        });
    }
    // ENODEV: a CPU without XSAVE; the FXSAVE area is then everything.
    let xstate = get_optional(tid, NT_X86_XSTATE, 16384)?;
    if let Some(x) = &xstate
        && x.len() < xsave::MIN_LEN
    {
        return Err(RegsError::KernelLayout {
            tid,
            note: NT_X86_XSTATE,
            len: x.len(),
            expected: format!("at least {}", xsave::MIN_LEN),
        });
    }
    Ok(ThreadRegs {
        arch: ARCH_X86_64.into(),
        gp,
        fp: Some(fp),
        xstate,
        tls: None,
        pac: None,
    })
}

#[cfg(target_arch = "x86_64")]
fn apply_x86_64(r: &ThreadRegs, tid: i32) -> Result<(), RegsError> {
    // Check the xsave area against this CPU before writing anything. The
    // thread's own current area tells what the kernel accepts here: its
    // bytes 464.. carry the kernel's user XCR0 and its length is the
    // exact size PTRACE_SETREGSET requires.
    if let Some(image) = &r.xstate {
        let image_xcr0 = le_u64(image, xsave::XCR0).unwrap_or(0);
        let header = XstateHeader::from_xsave(image).unwrap_or_default();
        let current = match get_regset_whole(tid, NT_X86_XSTATE, 16384) {
            Ok(c) => c,
            Err(RegsError::Ptrace {
                errno: errno @ (Errno::ENODEV | Errno::EINVAL),
                ..
            }) => {
                return Err(RegsError::Unavailable {
                    tid,
                    what: "an xsave area (NT_X86_XSTATE)",
                    errno,
                });
            }
            Err(e) => return Err(e),
        };
        let cpu_xcr0 = le_u64(&current, xsave::XCR0).ok_or(RegsError::KernelLayout {
            tid,
            note: NT_X86_XSTATE,
            len: current.len(),
            expected: format!("at least {}", xsave::MIN_LEN),
        })?;
        let missing = (image_xcr0 | header.xfeatures) & !cpu_xcr0;
        if missing != 0 {
            return Err(RegsError::XstateFeatures {
                tid,
                image_xcr0,
                cpu_xcr0,
                missing,
            });
        }
        if image.len() != current.len() {
            return Err(RegsError::XstateSize {
                tid,
                image: image.len(),
                cpu: current.len(),
                image_xcr0,
                cpu_xcr0,
            });
        }
        if header.xcomp_bv != 0 {
            return Err(RegsError::Invalid {
                tid,
                what: "the xsave area is in compacted format (XCOMP_BV set); ptrace uses the standard format".into(),
            });
        }
    }
    set_regset(tid, NT_PRSTATUS, &r.gp)?;
    // The FXSAVE area is part of the xsave area; with both, the xsave area
    // (written last) is the one that counts.
    if let Some(fp) = &r.fp {
        set_regset(tid, NT_PRFPREG, fp)?;
    }
    if let Some(x) = &r.xstate {
        set_regset(tid, NT_X86_XSTATE, x)?;
    }
    Ok(())
}

#[cfg(target_arch = "aarch64")]
fn capture_aarch64(tid: i32) -> Result<ThreadRegs, RegsError> {
    let gp = get_regset(tid, NT_PRSTATUS, 1024)?;
    if gp.len() != arm64_gp::LEN {
        return Err(RegsError::KernelLayout {
            tid,
            note: NT_PRSTATUS,
            len: gp.len(),
            expected: arm64_gp::LEN.to_string(),
        });
    }
    let fp = get_regset(tid, NT_PRFPREG, 4096)?;
    if fp.len() != arm64_gp::FPSIMD_LEN {
        return Err(RegsError::KernelLayout {
            tid,
            note: NT_PRFPREG,
            len: fp.len(),
            expected: arm64_gp::FPSIMD_LEN.to_string(),
        });
    }
    let tls = get_regset(tid, NT_ARM_TLS, 64)?;
    // PAC: ENODEV/EINVAL mean the CPU or kernel has no pointer
    // authentication (or not this part of it); that is not an error.
    let address = match get_optional(tid, NT_ARM_PACA_KEYS, 256)? {
        Some(b) => Some(PacAddressKeys::from(
            UserPacAddressKeys::from_bytes(&b).ok_or(RegsError::KernelLayout {
                tid,
                note: NT_ARM_PACA_KEYS,
                len: b.len(),
                expected: UserPacAddressKeys::SIZE.to_string(),
            })?,
        )),
        None => None,
    };
    let generic = match get_optional(tid, NT_ARM_PACG_KEYS, 64)? {
        Some(b) => Some(
            UserPacGenericKeys::from_bytes(&b)
                .ok_or(RegsError::KernelLayout {
                    tid,
                    note: NT_ARM_PACG_KEYS,
                    len: b.len(),
                    expected: UserPacGenericKeys::SIZE.to_string(),
                })?
                .apgakey,
        ),
        None => None,
    };
    let enabled_keys = match get_optional(tid, NT_ARM_PAC_ENABLED_KEYS, 64)? {
        Some(b) => Some(le_u64(&b, 0).ok_or(RegsError::KernelLayout {
            tid,
            note: NT_ARM_PAC_ENABLED_KEYS,
            len: b.len(),
            expected: "8".into(),
        })?),
        None => None,
    };
    let pac =
        (address.is_some() || generic.is_some() || enabled_keys.is_some()).then_some(PacKeys {
            address,
            generic,
            enabled_keys,
        });
    Ok(ThreadRegs {
        arch: ARCH_AARCH64.into(),
        gp,
        fp: Some(fp),
        xstate: None,
        tls: Some(tls),
        pac,
    })
}

#[cfg(target_arch = "aarch64")]
fn apply_aarch64(r: &ThreadRegs, tid: i32) -> Result<(), RegsError> {
    // Check PAC availability before writing anything: a process restored
    // without its keys dies on its first authenticated return.
    let pac = r.pac.clone().unwrap_or_default();
    let probe = |note: u32, len: usize, what: &'static str| -> Result<(), RegsError> {
        match get_regset(tid, note, len) {
            Ok(_) => Ok(()),
            Err(RegsError::Ptrace {
                errno: errno @ (Errno::ENODEV | Errno::EINVAL),
                ..
            }) => Err(RegsError::Unavailable { tid, what, errno }),
            Err(e) => Err(e),
        }
    };
    if pac.address.is_some() {
        probe(NT_ARM_PACA_KEYS, 256, "pointer-authentication address keys")?;
    }
    if pac.generic.is_some() {
        probe(NT_ARM_PACG_KEYS, 64, "a pointer-authentication generic key")?;
    }
    // A kernel without the enabled-keys regset has all keys enabled; an
    // image saying exactly that needs nothing more.
    let enabled = pac
        .enabled_keys
        .filter(|&m| m & PAC_ALL_ADDRESS_KEYS != PAC_ALL_ADDRESS_KEYS || pac.address.is_none());
    if enabled.is_some() {
        probe(
            NT_ARM_PAC_ENABLED_KEYS,
            64,
            "a pointer-authentication enabled-keys mask (Linux 5.13+)",
        )?;
    }
    set_regset(tid, NT_PRSTATUS, &r.gp)?;
    if let Some(fp) = &r.fp {
        set_regset(tid, NT_PRFPREG, fp)?;
    }
    if let Some(tls) = &r.tls {
        set_regset(tid, NT_ARM_TLS, tls)?;
    }
    if let Some(k) = pac.address {
        set_regset(
            tid,
            NT_ARM_PACA_KEYS,
            &UserPacAddressKeys::from(k).to_bytes(),
        )?;
    }
    if let Some(k) = pac.generic {
        set_regset(
            tid,
            NT_ARM_PACG_KEYS,
            &UserPacGenericKeys { apgakey: k }.to_bytes(),
        )?;
    }
    if let Some(m) = pac.enabled_keys {
        match set_regset(tid, NT_ARM_PAC_ENABLED_KEYS, &m.to_le_bytes()) {
            Ok(()) => {}
            Err(RegsError::Ptrace {
                errno: Errno::ENODEV | Errno::EINVAL,
                ..
            }) if enabled.is_none() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Helpers shared by the ptrace tests of this crate's register and signal
/// modules: forked children that are always killed and reaped, pipes with
/// deadlines, and a PTRACE_SEIZE guard whose waits all have deadlines.
#[cfg(test)]
pub(crate) mod testutil {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::{Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use nix::sys::ptrace;
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::Pid;

    pub const T: Duration = Duration::from_secs(5);

    static SERIAL: Mutex<()> = Mutex::new(());

    /// Serialises the ptrace tests of this module and `signals` (they fork
    /// and the machine has two cores) and checks for root.
    pub fn serial() -> MutexGuard<'static, ()> {
        assert_eq!(
            // SAFETY: takes no arguments and cannot fail.
            unsafe { libc::geteuid() },
            0,
            "the ptrace tests must run as root"
        );
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A forked child; killed and reaped on drop.
    pub struct Child {
        pub pid: i32,
        status: Option<i32>,
    }

    /// Fork a child that runs `f` and `_exit`s with its result. `f` must
    /// stick to raw syscalls and code that is safe after fork.
    pub fn fork_child(f: impl FnOnce() -> i32) -> Child {
        // SAFETY: the child only runs `f` (see above) and _exit()s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: ends the forked child without running atexit handlers.
            unsafe { libc::_exit(code) };
        }
        Child { pid, status: None }
    }

    impl Child {
        /// Exit code, or 128 + signal.
        pub fn decode(st: i32) -> i32 {
            if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                128 + libc::WTERMSIG(st)
            }
        }

        /// The exit status if the child has ended (-1 if it cannot be
        /// waited for), without blocking.
        pub fn try_wait(&mut self) -> Option<i32> {
            if self.status.is_none() {
                let mut st = 0;
                // SAFETY: waitpid writes one int, into `st`, a local.
                let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
                if r == self.pid {
                    self.status = Some(Self::decode(st));
                } else if r < 0 {
                    self.status = Some(-1);
                }
            }
            self.status
        }

        pub fn alive(&mut self) -> bool {
            self.try_wait().is_none()
        }

        /// Exit code (128 + signal for a kill), waiting at most `timeout`.
        pub fn wait(&mut self, timeout: Duration) -> i32 {
            let end = Instant::now() + timeout;
            loop {
                if let Some(s) = self.try_wait() {
                    return s;
                }
                if Instant::now() > end {
                    self.kill();
                    panic!("child {} did not exit within {timeout:?}", self.pid);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }

        pub fn kill(&mut self) {
            if self.status.is_none() {
                // SAFETY: plain syscalls on our own child.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                let mut st = 0;
                // SAFETY: waitpid(2) writes at most one int, into a local status (or none for a null pointer).
                let r = unsafe { libc::waitpid(self.pid, &mut st, 0) };
                self.status = Some(if r == self.pid { Self::decode(st) } else { -1 });
            }
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            self.kill();
        }
    }

    pub fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().expect("pipe")
    }

    /// In a child: write all of `b` to `fd` with raw write(2). False on error.
    pub fn child_write(fd: i32, mut b: &[u8]) -> bool {
        while !b.is_empty() {
            // SAFETY: writes from a live buffer.
            let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
            if n <= 0 {
                return false;
            }
            b = &b[n as usize..];
        }
        true
    }

    /// In a child: read exactly `b.len()` bytes. False on EOF or error.
    pub fn child_read(fd: i32, b: &mut [u8]) -> bool {
        let mut got = 0;
        while got < b.len() {
            // SAFETY: reads into a live buffer.
            let n = unsafe { libc::read(fd, b[got..].as_mut_ptr().cast(), b.len() - got) };
            if n < 0 && nix::errno::Errno::last() == nix::errno::Errno::EINTR {
                continue;
            }
            if n <= 0 {
                return false;
            }
            got += n as usize;
        }
        true
    }

    /// Read exactly `n` bytes from `fd` within `timeout`; panics naming
    /// `what` otherwise.
    pub fn read_timeout(fd: &OwnedFd, n: usize, timeout: Duration, what: &str) -> Vec<u8> {
        let end = Instant::now() + timeout;
        let mut out = vec![0u8; n];
        let mut got = 0;
        while got < n {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{what}: no data within {timeout:?}");
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, owned here.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32 + 1) };
            if r == 0 || (r < 0 && nix::errno::Errno::last() == nix::errno::Errno::EINTR) {
                continue;
            }
            assert!(r > 0, "{what}: poll: {}", std::io::Error::last_os_error());
            match nix::unistd::read(fd.as_raw_fd(), &mut out[got..]) {
                Ok(0) => panic!("{what}: EOF after {got} of {n} bytes (the child died?)"),
                Ok(k) => got += k,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(e) => panic!("{what}: read: {e}"),
            }
        }
        out
    }

    /// A thread PTRACE_SEIZEd by the calling (test) thread. Detached on
    /// drop (best effort; the child guard kills it anyway).
    pub struct Traced {
        pub tid: i32,
        stopped: bool,
        attached: bool,
    }

    impl Traced {
        /// PTRACE_SEIZE + PTRACE_INTERRUPT, and wait for the stop.
        pub fn seize(tid: i32) -> Traced {
            ptrace::seize(Pid::from_raw(tid), ptrace::Options::empty())
                .unwrap_or_else(|e| panic!("PTRACE_SEIZE {tid}: {e}"));
            let mut t = Traced {
                tid,
                stopped: false,
                attached: true,
            };
            t.interrupt();
            t
        }

        /// PTRACE_INTERRUPT and wait (polling, with a deadline) for the
        /// event stop. A signal-delivery stop that races with it is passed
        /// on to the thread; the interrupt stays pending.
        pub fn interrupt(&mut self) {
            let pid = Pid::from_raw(self.tid);
            ptrace::interrupt(pid).unwrap_or_else(|e| panic!("PTRACE_INTERRUPT {}: {e}", self.tid));
            let end = Instant::now() + T;
            loop {
                match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {
                        assert!(
                            Instant::now() < end,
                            "thread {} did not stop within {T:?}",
                            self.tid
                        );
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Ok(WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP)) => break,
                    Ok(WaitStatus::Stopped(_, sig)) => {
                        ptrace::cont(pid, Some(sig)).expect("PTRACE_CONT with a signal");
                    }
                    other => panic!("thread {}: unexpected wait result {other:?}", self.tid),
                }
            }
            self.stopped = true;
        }

        /// Resume without detaching.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        pub fn cont(&mut self) {
            ptrace::cont(Pid::from_raw(self.tid), None).expect("PTRACE_CONT");
            self.stopped = false;
        }

        pub fn detach(mut self) {
            ptrace::detach(Pid::from_raw(self.tid), None).expect("PTRACE_DETACH");
            self.attached = false;
        }
    }

    impl Drop for Traced {
        fn drop(&mut self) {
            if self.attached {
                if !self.stopped {
                    let _ = ptrace::interrupt(Pid::from_raw(self.tid));
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = ptrace::detach(Pid::from_raw(self.tid), None);
            }
        }
    }

    /// The /proc/PID/maps line of the mapping containing `addr`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn mapping_of(pid: i32, addr: u64) -> Option<String> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        maps.lines()
            .find(|l| {
                let range = l.split_whitespace().next().unwrap_or("");
                let (a, b) = range.split_once('-').unwrap_or(("", ""));
                let a = u64::from_str_radix(a, 16).unwrap_or(u64::MAX);
                let b = u64::from_str_radix(b, 16).unwrap_or(0);
                a <= addr && addr < b
            })
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod layout_tests {
    use std::mem::{align_of, offset_of, size_of};

    use super::*;

    /// `struct xstate_header` (arch/x86/include/asm/fpu/types.h).
    #[test]
    fn xstate_header_layout() {
        assert_eq!(size_of::<XstateHeader>(), XstateHeader::SIZE);
        assert_eq!(offset_of!(XstateHeader, xfeatures), 0);
        assert_eq!(offset_of!(XstateHeader, xcomp_bv), 8);
        assert_eq!(offset_of!(XstateHeader, reserved), 16);
        assert_eq!(xsave::HEADER + XstateHeader::SIZE, xsave::MIN_LEN);
        assert_eq!(xsave::XSTATE_BV, xsave::HEADER);
        assert_eq!(xsave::XCOMP_BV, xsave::HEADER + 8);
        let mut area = vec![0u8; xsave::MIN_LEN];
        put_u64(&mut area, xsave::HEADER, 7);
        put_u64(&mut area, xsave::HEADER + 8, 1 << 63);
        let h = XstateHeader::from_xsave(&area).unwrap();
        assert_eq!((h.xfeatures, h.xcomp_bv), (7, 1 << 63));
        assert_eq!(XstateHeader::from_xsave(&area[..575]), None);
    }

    /// arch/arm64/include/uapi/asm/ptrace.h `struct user_pac_address_keys`
    /// and `struct user_pac_generic_keys` (`__uint128_t` members, 16-byte
    /// aligned).
    #[test]
    fn pac_key_layouts_and_bytes() {
        assert_eq!(size_of::<UserPacAddressKeys>(), 64);
        assert_eq!(align_of::<UserPacAddressKeys>(), 16);
        assert_eq!(offset_of!(UserPacAddressKeys, apiakey), 0);
        assert_eq!(offset_of!(UserPacAddressKeys, apibkey), 16);
        assert_eq!(offset_of!(UserPacAddressKeys, apdakey), 32);
        assert_eq!(offset_of!(UserPacAddressKeys, apdbkey), 48);
        assert_eq!(size_of::<UserPacGenericKeys>(), 16);
        assert_eq!(align_of::<UserPacGenericKeys>(), 16);
        let k = UserPacAddressKeys {
            apiakey: [1, 2],
            apibkey: [3, 4],
            apdakey: [5, 6],
            apdbkey: [7, u64::MAX],
        };
        let b = k.to_bytes();
        assert_eq!(&b[16..24], &3u64.to_le_bytes());
        assert_eq!(UserPacAddressKeys::from_bytes(&b), Some(k));
        assert_eq!(UserPacAddressKeys::from_bytes(&b[..63]), None);
        let g = UserPacGenericKeys { apgakey: [9, 10] };
        assert_eq!(UserPacGenericKeys::from_bytes(&g.to_bytes()), Some(g));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_gp_offsets_match_libc_user_regs_struct() {
        type R = libc::user_regs_struct;
        assert_eq!(size_of::<R>(), x86_gp::LEN);
        assert_eq!(offset_of!(R, r12), x86_gp::R12);
        assert_eq!(offset_of!(R, rax), x86_gp::RAX);
        assert_eq!(offset_of!(R, orig_rax), x86_gp::ORIG_RAX);
        assert_eq!(offset_of!(R, rip), x86_gp::RIP);
        assert_eq!(offset_of!(R, rsp), x86_gp::RSP);
        assert_eq!(offset_of!(R, fs_base), x86_gp::FS_BASE);
        assert_eq!(offset_of!(R, gs_base), x86_gp::GS_BASE);
        assert_eq!(offset_of!(R, gs), x86_gp::LEN - 8);
    }

    #[test]
    fn accessors_decode_and_validate() {
        let mut r = ThreadRegs {
            arch: ARCH_AARCH64.into(),
            gp: vec![0; arm64_gp::LEN],
            fp: None,
            xstate: None,
            tls: Some(0x1234u64.to_le_bytes().to_vec()),
            pac: None,
        };
        r.set_ip(0xdead_beef).unwrap();
        r.set_sp(0x7fff_0000).unwrap();
        assert_eq!(
            &r.gp[arm64_gp::PC..arm64_gp::PC + 8],
            &0xdead_beefu64.to_le_bytes()
        );
        assert_eq!((r.ip(), r.sp()), (Some(0xdead_beef), Some(0x7fff_0000)));
        assert_eq!(
            (r.syscall_nr(), r.fs_base(), r.tpidr()),
            (None, None, Some(0x1234))
        );
        assert!(r.validate().is_ok());
        r.gp.pop();
        assert_eq!(r.ip(), None);
        assert!(r.set_ip(1).is_err());
        assert!(r.validate().unwrap_err().contains("271 bytes"));
        r.arch = "riscv64".into();
        assert!(r.validate().unwrap_err().contains("riscv64"));
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::asm;
    use std::time::{Duration, Instant};

    use super::testutil::*;
    use super::*;

    /// `struct timespec` of 1 ms, for the children's raw nanosleep.
    static ONE_MS: libc::timespec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    };

    const MAGIC: u64 = 0x5eed_0123_4567_89ab;

    /// Keeps `value` in r12 (and a copy in r13) and sleeps 1 ms per
    /// iteration with raw nanosleep (syscalls preserve r12/r13); returns
    /// r12 as soon as it differs from r13.
    fn wait_for_r12_change(value: u64) -> u64 {
        let out: u64;
        // SAFETY: touches only the declared registers and reads ONE_MS.
        unsafe {
            asm!(
                "mov r13, r12",
                "2:",
                "mov eax, 35", // nanosleep
                "mov rdi, r14",
                "xor esi, esi",
                "syscall",
                "cmp r12, r13",
                "je 2b",
                inout("r12") value => out,
                in("r14") &ONE_MS as *const libc::timespec,
                out("r13") _, out("rax") _, out("rcx") _, out("r11") _,
                out("rdi") _, out("rsi") _,
            );
        }
        out
    }

    /// Interrupt `t` until `ready` holds for its registers (the child may
    /// not have reached its loop at the first stop), resuming in between.
    fn capture_when(t: &mut Traced, what: &str, ready: impl Fn(&ThreadRegs) -> bool) -> ThreadRegs {
        let end = Instant::now() + T;
        loop {
            let r = ThreadRegs::capture(t.tid).expect("capture");
            if ready(&r) {
                return r;
            }
            assert!(Instant::now() < end, "{what}: not reached within {T:?}");
            t.cont();
            std::thread::sleep(Duration::from_millis(5));
            t.interrupt();
        }
    }

    #[test]
    fn capture_is_plausible_and_a_written_register_reaches_the_child() {
        let _g = serial();
        let (rd, wr) = pipe();
        let wfd = std::os::fd::AsRawFd::as_raw_fd(&wr);
        let mut child = fork_child(move || {
            let (mut fs, mut gs) = (0u64, 0u64);
            // SAFETY: ARCH_GET_FS/GS write one u64 each.
            unsafe {
                libc::syscall(libc::SYS_arch_prctl, 0x1003, &mut fs as *mut u64);
                libc::syscall(libc::SYS_arch_prctl, 0x1004, &mut gs as *mut u64);
            }
            let mut msg = [0u8; 16];
            msg[..8].copy_from_slice(&fs.to_le_bytes());
            msg[8..].copy_from_slice(&gs.to_le_bytes());
            if !child_write(wfd, &msg) {
                return 10;
            }
            let seen = wait_for_r12_change(MAGIC);
            if child_write(wfd, &seen.to_le_bytes()) {
                0
            } else {
                11
            }
        });
        drop(wr);
        let hello = read_timeout(&rd, 16, T, "the child's fs/gs base");
        let fs = u64::from_le_bytes(hello[..8].try_into().unwrap());
        let gs = u64::from_le_bytes(hello[8..].try_into().unwrap());

        let mut t = Traced::seize(child.pid);
        let mut r = capture_when(&mut t, "the child's r12 loop", |r| {
            r.gp_x86().is_some_and(|g| g.r12 == MAGIC && g.r13 == MAGIC)
        });
        assert_eq!(r.arch, "x86_64");
        assert_eq!(r.gp.len(), 216);
        assert_eq!(r.fp.as_ref().map(Vec::len), Some(512));
        let ip = r.ip().unwrap();
        let sp = r.sp().unwrap();
        let code = mapping_of(child.pid, ip).unwrap_or_default();
        assert!(
            code.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.contains('x')),
            "rip {ip:#x} is not in an executable mapping: {code:?}"
        );
        let stack = mapping_of(child.pid, sp).unwrap_or_default();
        assert!(
            stack
                .split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("rw")),
            "rsp {sp:#x} is not in a writable mapping: {stack:?}"
        );
        // Stopped either in user code or inside the nanosleep.
        let nr = r.syscall_nr().unwrap();
        assert!(nr == -1 || nr == libc::SYS_nanosleep, "orig_rax {nr}");
        assert_eq!(r.fs_base(), Some(fs));
        assert_eq!(r.gs_base(), Some(gs));
        assert!(
            r.xstate_xcr0().is_some(),
            "this CPU has XSAVE; the xstate regset is missing"
        );

        let new = 0x0bad_cafe_f00d_0042u64;
        let mut g = r.gp_x86().unwrap();
        g.r12 = new;
        r.set_gp_x86(&g).unwrap();
        assert_eq!(r.gp_x86().unwrap().r12, new);
        assert_eq!(le_u64(&r.gp, x86_gp::R12), Some(new));
        r.apply(child.pid).expect("apply");
        assert_eq!(
            ThreadRegs::capture(child.pid)
                .unwrap()
                .gp_x86()
                .unwrap()
                .r12,
            new
        );
        t.detach();
        let seen = read_timeout(&rd, 8, T, "the r12 value the child saw");
        assert_eq!(u64::from_le_bytes(seen.try_into().unwrap()), new);
        assert_eq!(child.wait(T), 0);
    }

    #[repr(C, align(32))]
    struct Ymm([u8; 128]);

    static YMM_A: Ymm = {
        let mut p = [0u8; 128];
        let mut i = 0;
        while i < 128 {
            p[i] = i.to_le_bytes()[0].wrapping_mul(29).wrapping_add(3);
            i += 1;
        }
        Ymm(p)
    };

    /// Loads ymm0..ymm3 from `pat` and sleeps 1 ms per iteration until any
    /// of them differs from `pat`, then stores all four into `out`.
    #[target_feature(enable = "avx")]
    fn wait_for_ymm_change(pat: &Ymm, out: &mut Ymm) {
        // SAFETY: reads `pat` and ONE_MS, writes `out` (128 bytes); all
        // vector registers and the syscall's registers are clobbered.
        unsafe {
            asm!(
                "vmovdqu ymm0, [r15]",
                "vmovdqu ymm1, [r15 + 32]",
                "vmovdqu ymm2, [r15 + 64]",
                "vmovdqu ymm3, [r15 + 96]",
                "2:",
                "mov eax, 35",
                "mov rdi, r14",
                "xor esi, esi",
                "syscall",
                "vxorps ymm8, ymm0, [r15]",
                "vptest ymm8, ymm8",
                "jnz 3f",
                "vxorps ymm8, ymm1, [r15 + 32]",
                "vptest ymm8, ymm8",
                "jnz 3f",
                "vxorps ymm8, ymm2, [r15 + 64]",
                "vptest ymm8, ymm8",
                "jnz 3f",
                "vxorps ymm8, ymm3, [r15 + 96]",
                "vptest ymm8, ymm8",
                "jz 2b",
                "3:",
                "vmovdqu [r12], ymm0",
                "vmovdqu [r12 + 32], ymm1",
                "vmovdqu [r12 + 64], ymm2",
                "vmovdqu [r12 + 96], ymm3",
                "vzeroupper",
                in("r15") pat.0.as_ptr(),
                in("r14") &ONE_MS as *const libc::timespec,
                in("r12") out.0.as_mut_ptr(),
                clobber_abi("C"),
            );
        }
    }

    #[target_feature(enable = "xsave")]
    fn xgetbv0() -> u64 {
        // SAFETY: the caller checked that the OS enabled XSAVE.
        unsafe { std::arch::x86_64::_xgetbv(0) }
    }

    fn avx_offset() -> usize {
        assert!(
            std::arch::is_x86_feature_detected!("avx"),
            "this CPU has no AVX; the AVX register test needs it"
        );
        let (off, size) = xstate_component(xsave::FEATURE_AVX)
            .expect("CPUID leaf 0xD has no AVX component although AVX is detected");
        assert_eq!(size, 256);
        off
    }

    #[test]
    fn avx_registers_are_found_in_xstate_and_written_back() {
        let _g = serial();
        let avx = avx_offset();
        let (rd, wr) = pipe();
        let wfd = std::os::fd::AsRawFd::as_raw_fd(&wr);
        let mut child = fork_child(move || {
            let mut out = Ymm([0; 128]);
            // SAFETY: AVX was checked by the parent before forking.
            unsafe { wait_for_ymm_change(&YMM_A, &mut out) };
            if child_write(wfd, &out.0) { 0 } else { 11 }
        });
        drop(wr);
        let a = &YMM_A.0;
        let holds = |x: &[u8], p: &[u8]| {
            (0..4).all(|i| {
                x.get(xsave::XMM0 + 16 * i..xsave::XMM0 + 16 * i + 16)
                    == Some(&p[32 * i..32 * i + 16])
                    && x.get(avx + 16 * i..avx + 16 * i + 16) == Some(&p[32 * i + 16..32 * i + 32])
            })
        };
        let mut t = Traced::seize(child.pid);
        let mut r = capture_when(&mut t, "the child's ymm loop", |r| {
            r.xstate.as_deref().is_some_and(|x| holds(x, a))
        });
        let x = r.xstate.as_mut().unwrap();
        // Bytes 464.. carry the kernel's user XCR0: compare with the CPU's.
        let xcr0 = le_u64(x, xsave::XCR0).unwrap();
        // SAFETY: XSAVE (implied by AVX) is enabled by the OS.
        assert_eq!(xcr0, unsafe { xgetbv0() }, "XCR0 in the xsave area");
        // CPUID 0xD.0 EBX: the XSAVE area size for the features in XCR0.
        let size = std::arch::x86_64::__cpuid_count(0xd, 0).ebx as usize;
        assert_eq!(x.len(), size, "xsave regset length vs CPUID");
        let bv = le_u64(x, xsave::XSTATE_BV).unwrap();
        assert_ne!(
            bv & (1 << xsave::FEATURE_AVX),
            0,
            "XSTATE_BV {bv:#x} lacks AVX while ymm are in use"
        );
        // The FXSAVE regset is the first 512 bytes of the xsave area.
        assert_eq!(
            &r.fp.as_ref().unwrap()[xsave::XMM0..xsave::XMM0 + 64],
            &x[xsave::XMM0..xsave::XMM0 + 64]
        );

        let b: Vec<u8> = (0..128u8).map(|i| i ^ 0xa5).collect();
        for i in 0..4 {
            x[xsave::XMM0 + 16 * i..xsave::XMM0 + 16 * i + 16]
                .copy_from_slice(&b[32 * i..32 * i + 16]);
            x[avx + 16 * i..avx + 16 * i + 16].copy_from_slice(&b[32 * i + 16..32 * i + 32]);
        }
        put_u64(x, xsave::XSTATE_BV, bv | 0b110);
        // Keep the FXSAVE copy consistent (apply writes it first).
        let xmm = x[..512].to_vec();
        r.fp = Some(xmm);
        r.apply(child.pid).expect("apply");
        let back = ThreadRegs::capture(child.pid).unwrap();
        assert!(
            holds(back.xstate.as_deref().unwrap(), &b),
            "the kernel did not keep the new ymm values"
        );
        t.detach();
        let seen = read_timeout(&rd, 128, T, "the ymm values the child saw");
        assert_eq!(seen, b);
        assert_eq!(child.wait(T), 0);
    }

    /// Shared with the round-trip child (MAP_SHARED): [0] iterations,
    /// [1] stop flag.
    fn shared_page() -> &'static [std::sync::atomic::AtomicU64; 2] {
        // SAFETY: a fresh zero-filled shared mapping (valid atomics),
        // leaked for the test's lifetime.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            &*(p as *const [std::sync::atomic::AtomicU64; 2])
        }
    }

    /// Holds constants in r12, r14, r15 and ymm0..3,
    /// counts iterations in `sh[0]`, sleeps 1 ms per iteration, stops when
    /// `sh[1]` is set. 0 when stopped, 1 if a general register changed, 2
    /// if a vector register did.
    #[target_feature(enable = "avx")]
    fn checking_loop(sh: *const u64) -> u64 {
        let result: u64;
        // SAFETY: reads YMM_A and ONE_MS, writes sh[0]; clobbers declared.
        unsafe {
            asm!(
                "vmovdqu ymm0, [rip + {pat}]",
                "vmovdqu ymm1, [rip + {pat} + 32]",
                "vmovdqu ymm2, [rip + {pat} + 64]",
                "vmovdqu ymm3, [rip + {pat} + 96]",
                "mov r12, 0x12121212",
                "mov r14, -0x14141414",
                "mov r15, 0x15151515",
                "2:",
                "mov eax, 35",
                "lea rdi, [rip + {ts}]",
                "xor esi, esi",
                "syscall",
                "cmp r12, 0x12121212",
                "jne 8f",
                "cmp r14, -0x14141414",
                "jne 8f",
                "cmp r15, 0x15151515",
                "jne 8f",
                "vxorps ymm8, ymm0, [rip + {pat}]",
                "vptest ymm8, ymm8",
                "jnz 9f",
                "vxorps ymm8, ymm1, [rip + {pat} + 32]",
                "vptest ymm8, ymm8",
                "jnz 9f",
                "vxorps ymm8, ymm2, [rip + {pat} + 64]",
                "vptest ymm8, ymm8",
                "jnz 9f",
                "vxorps ymm8, ymm3, [rip + {pat} + 96]",
                "vptest ymm8, ymm8",
                "jnz 9f",
                "lock add qword ptr [r13], 1",
                "cmp qword ptr [r13 + 8], 0",
                "je 2b",
                "xor eax, eax",
                "jmp 7f",
                "8:",
                "mov eax, 1",
                "jmp 7f",
                "9:",
                "mov eax, 2",
                "7:",
                "vzeroupper",
                pat = sym YMM_A,
                ts = sym ONE_MS,
                in("r13") sh,
                out("rax") result,
                out("r12") _, out("r14") _, out("r15") _,
                clobber_abi("C"),
            );
        }
        result
    }

    #[test]
    fn apply_of_capture_keeps_the_child_running() {
        use std::sync::atomic::Ordering::SeqCst;
        let _g = serial();
        avx_offset();
        let sh = shared_page();
        let p = sh.as_ptr() as *const u64;
        let p = p as usize;
        let mut child = fork_child(move || {
            // SAFETY: AVX was checked by the parent before forking.
            unsafe { i32::try_from(checking_loop(p as *const u64)).unwrap() }
        });
        let wait_progress = |from: u64| {
            let end = Instant::now() + T;
            while sh[0].load(SeqCst) < from + 3 {
                assert!(
                    Instant::now() < end,
                    "the child made no progress (iterations {})",
                    sh[0].load(SeqCst)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_progress(0);
        let mut t = Traced::seize(child.pid);
        for _ in 0..20u32 {
            let r = ThreadRegs::capture(child.pid).expect("capture");
            r.apply(child.pid).expect("apply(capture())");
            let n = sh[0].load(SeqCst);
            t.cont();
            wait_progress(n);
            t.interrupt();
        }
        t.detach();
        sh[1].store(1, SeqCst);
        assert_eq!(
            child.wait(T),
            0,
            "1: a general register changed, 2: a ymm register changed"
        );
    }

    #[test]
    fn refused_xstate_changes_nothing_and_errors_are_clear() {
        let _g = serial();
        // Not traced: ESRCH, naming the thread.
        let mut idle = fork_child(|| {
            // SAFETY: plain sleep in the child.
            unsafe { libc::sleep(30) };
            0
        });
        let e = get_regset(idle.pid, NT_PRSTATUS, 512).unwrap_err();
        assert!(matches!(e, RegsError::Ptrace { errno: Errno::ESRCH, tid, .. } if tid == idle.pid));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("thread {}", idle.pid)) && msg.contains("PTRACE_SEIZE"),
            "{msg}"
        );
        let e = ThreadRegs::capture(idle.pid).unwrap_err();
        assert!(e.to_string().contains(&idle.pid.to_string()), "{e}");
        idle.kill();

        let (_rd, wr) = pipe();
        let wfd = std::os::fd::AsRawFd::as_raw_fd(&wr);
        let mut child = fork_child(move || {
            let seen = wait_for_r12_change(MAGIC);
            if child_write(wfd, &seen.to_le_bytes()) {
                0
            } else {
                11
            }
        });
        drop(wr);
        let mut t = Traced::seize(child.pid);
        let orig = capture_when(&mut t, "the child's r12 loop", |r| {
            r.gp_x86().is_some_and(|g| g.r12 == MAGIC && g.r13 == MAGIC)
        });
        let cpu_xcr0 = orig.xstate_xcr0().unwrap();
        let absent = [17u32, 18, 19, 5, 6, 7, 9, 11, 12, 3, 4]
            .into_iter()
            .find(|&b| cpu_xcr0 & (1 << b) == 0)
            .expect(
                "this CPU enables every XSAVE feature tern knows; cannot build a foreign image",
            );
        let mut bad = orig.clone();
        let mut g = bad.gp_x86().unwrap();
        g.r12 = 1;
        bad.set_gp_x86(&g).unwrap();
        let x = bad.xstate.as_mut().unwrap();
        put_u64(x, xsave::XCR0, cpu_xcr0 | 1 << absent);
        let e = bad.apply(child.pid).unwrap_err();
        match &e {
            RegsError::XstateFeatures { tid, missing, .. } => {
                assert_eq!((*tid, *missing), (child.pid, 1 << absent));
            }
            other => panic!("expected XstateFeatures, got {other}"),
        }
        assert!(e.to_string().contains("same CPU features"), "{e}");

        let mut short = orig.clone();
        let x = short.xstate.as_mut().unwrap();
        x.truncate(x.len() - 64);
        let e = short.apply(child.pid).unwrap_err();
        assert!(
            matches!(e, RegsError::XstateSize { tid, .. } if tid == child.pid),
            "{e}"
        );

        let mut arm = orig.clone();
        arm.arch = ARCH_AARCH64.into();
        let e = arm.apply(child.pid).unwrap_err();
        assert!(
            e.to_string().contains("restore it on an aarch64 machine"),
            "{e}"
        );

        let mut trunc = orig.clone();
        trunc.gp.truncate(100);
        let e = trunc.apply(child.pid).unwrap_err();
        assert!(
            matches!(e, RegsError::Invalid { tid, .. } if tid == child.pid),
            "{e}"
        );

        // Nothing was written: r12 is still the child's own.
        let now = ThreadRegs::capture(child.pid).unwrap();
        assert_eq!(now.gp_x86().unwrap().r12, MAGIC);
        assert_eq!(now.xstate_xcr0(), Some(cpu_xcr0));
        drop(t);
        child.kill();
    }
}
