//! rseq (restartable sequences) state of a thread: its registration, read
//! with `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13+, `CONFIG_RSEQ`), and
//! the abort fixup of a thread stopped inside a critical section.
//!
//! glibc 2.35+ registers a `struct rseq` in every thread (in its TLS, with
//! signature 0x53053053 on x86_64) and the kernel writes the current CPU
//! into it on every return to user space. A dump records each thread's
//! registration (area, size, signature) so that a restore registers the
//! same area again in the same thread (an injected `rseq(2)`); a thread
//! restored without it reads stale CPU numbers, and one restored with it
//! still pointing at an area that no longer exists is killed.
//!
//! A thread that is stopped while inside a critical section (its IP in
//! `[start_ip, start_ip + post_commit_offset)` of the descriptor its area
//! points at) must not resume there: the kernel moves such a thread to the
//! section's abort handler whenever it is preempted, migrated or gets a
//! signal, and a restored thread would otherwise finish a section whose
//! per-CPU data it no longer owns. [`abort_fixup`] applies the kernel's
//! rules to a captured IP.

use nix::errno::Errno;

/// Request of include/uapi/linux/ptrace.h.
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

/// `rseq(2)` flag (include/uapi/linux/rseq.h): unregister the area.
pub const RSEQ_FLAG_UNREGISTER: u32 = 1;
/// The size of the original `struct rseq` (kernel/rseq.c `ORIG_RSEQ_SIZE`);
/// the smallest a registration can have.
pub const ORIG_RSEQ_SIZE: u32 = 32;
/// The signature glibc registers with (sysdeps/unix/sysv/linux/*/bits/rseq.h).
#[cfg(target_arch = "x86_64")]
pub const GLIBC_RSEQ_SIG: u32 = 0x5305_3053;
#[cfg(target_arch = "aarch64")]
pub const GLIBC_RSEQ_SIG: u32 = 0xd428_bc00;

/// `struct ptrace_rseq_configuration` (include/uapi/linux/ptrace.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PtraceRseqConfiguration {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// `struct rseq` (include/uapi/linux/rseq.h), the fields of its original
/// 32 bytes (`end[]` marks where later kernels may add more).
#[repr(C, align(32))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rseq {
    pub cpu_id_start: u32,
    pub cpu_id: u32,
    /// Address of the current critical section's `struct rseq_cs`, or 0.
    pub rseq_cs: u64,
    pub flags: u32,
    pub node_id: u32,
    pub mm_cid: u32,
}

impl Rseq {
    /// From the area's bytes, in native order.
    pub fn from_bytes(b: &[u8; 32]) -> Rseq {
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut q = [0u8; 8];
        q.copy_from_slice(&b[8..16]);
        Rseq {
            cpu_id_start: u32_at(0),
            cpu_id: u32_at(4),
            rseq_cs: u64::from_ne_bytes(q),
            flags: u32_at(16),
            node_id: u32_at(20),
            mm_cid: u32_at(24),
        }
    }
}

/// Offset of `rseq_cs` in [`Rseq`].
pub const RSEQ_CS_OFFSET: u64 = std::mem::offset_of!(Rseq, rseq_cs) as u64;

/// `struct rseq_cs` (include/uapi/linux/rseq.h): a critical section.
#[repr(C, align(32))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RseqCs {
    /// 0; the kernel rejects anything else.
    pub version: u32,
    pub flags: u32,
    pub start_ip: u64,
    /// The section is `[start_ip, start_ip + post_commit_offset)`.
    pub post_commit_offset: u64,
    /// Preceded by the 4-byte signature the thread registered.
    pub abort_ip: u64,
}

impl RseqCs {
    /// From the descriptor's bytes, in native order.
    pub fn from_bytes(b: &[u8; 32]) -> RseqCs {
        let u64_at = |o: usize| {
            let mut q = [0u8; 8];
            q.copy_from_slice(&b[o..o + 8]);
            u64::from_ne_bytes(q)
        };
        RseqCs {
            version: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            flags: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            start_ip: u64_at(8),
            post_commit_offset: u64_at(16),
            abort_ip: u64_at(24),
        }
    }

    /// Is `ip` inside the section? (The kernel's `in_rseq_cs`: unsigned
    /// distance from the start, so no overflow.)
    pub fn contains(&self, ip: u64) -> bool {
        ip.wrapping_sub(self.start_ip) < self.post_commit_offset
    }
}

/// A thread's rseq registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqRegistration {
    /// Address of the thread's `struct rseq`.
    pub abi_pointer: u64,
    /// The length it was registered with (32 or more).
    pub abi_size: u32,
    /// The signature every abort handler must be preceded by.
    pub signature: u32,
    /// Registration flags (0 today).
    pub flags: u32,
}

impl RseqRegistration {
    /// Address of the area's `rseq_cs` field (8 bytes), which a dump clears
    /// after moving a thread to its abort handler.
    pub fn rseq_cs_addr(&self) -> u64 {
        self.abi_pointer.wrapping_add(RSEQ_CS_OFFSET)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RseqError {
    #[error("PTRACE_GET_RSEQ_CONFIGURATION on thread {tid}: {errno}: {hint}")]
    Ptrace {
        tid: i32,
        errno: Errno,
        hint: &'static str,
    },
    #[error(
        "reading the {what} at {addr:#x} (rseq area {area:#x}): {err}; the kernel would kill this thread with SIGSEGV when it next runs, so it cannot be dumped as it is"
    )]
    Read {
        area: u64,
        what: &'static str,
        addr: u64,
        err: String,
    },
    #[error(
        "the rseq area {area:#x} points at critical-section descriptor {cs:#x} with {what}; the kernel would kill this thread with SIGSEGV when it next runs, so it cannot be dumped as it is"
    )]
    BadDescriptor { area: u64, cs: u64, what: String },
    #[error(
        "rseq critical section {start:#x}..{end:#x} (descriptor {cs:#x}, rseq area {area:#x}): the 4 bytes at {sig_addr:#x}, before its abort handler {abort:#x}, are {found:#010x}, not the registered signature {expected:#010x}; the kernel would kill this thread with SIGSEGV when it next runs, so it cannot be dumped as it is"
    )]
    Signature {
        area: u64,
        cs: u64,
        start: u64,
        end: u64,
        abort: u64,
        sig_addr: u64,
        found: u32,
        expected: u32,
    },
}

/// The registration of thread `tid`, or `None` if it has no rseq area.
/// The thread must be ptrace-stopped by the calling thread.
pub fn registration(tid: i32) -> Result<Option<RseqRegistration>, RseqError> {
    let mut conf = PtraceRseqConfiguration::default();
    // SAFETY: the kernel writes at most `addr` = size_of::<conf>() bytes
    // into `conf`, which we own.
    let r = unsafe {
        crate::ptrace::request(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<PtraceRseqConfiguration>() as u64,
            &raw mut conf as u64,
        )
    };
    if let Err(errno) = r {
        let hint = match errno {
            Errno::EIO => {
                "the kernel does not know this request (it needs Linux 5.13+ built with CONFIG_RSEQ)"
            }
            Errno::ESRCH => {
                "the thread must be ptrace-stopped by the calling thread (seize and interrupt it first); or it has exited"
            }
            _ => "unexpected error",
        };
        return Err(RseqError::Ptrace { tid, errno, hint });
    }
    if conf.rseq_abi_pointer == 0 {
        return Ok(None);
    }
    Ok(Some(RseqRegistration {
        abi_pointer: conf.rseq_abi_pointer,
        abi_size: conf.rseq_abi_size,
        signature: conf.signature,
        flags: conf.flags,
    }))
}

/// Where a thread stopped at `ip` must resume: `Some(abort_ip)` if `ip` is
/// inside the critical section its rseq area points at, else `None`.
/// `read_mem(addr, buf)` reads the thread's memory ([`read_mem_via_proc`]).
///
/// The rules are the kernel's (kernel/rseq.c, `rseq_ip_fixup`): a zero
/// `rseq_cs` means no section; otherwise the descriptor must have version
/// 0, a section that does not wrap around, an abort handler outside the
/// section, and the registered signature in the 4 bytes before the abort
/// handler, whether or not `ip` is inside (the kernel checks all of it
/// before looking at the IP, and kills the thread with SIGSEGV if any of it
/// fails: that is an error here). `ip` must be the IP the thread stopped
/// at, before anything (like a syscall injection) changed it.
///
/// On `Some(abort)` the caller does what the kernel would do when the
/// thread next returns to user space (which a stopped thread always does
/// through the preemption path): set the thread's saved IP to `abort` and
/// write 8 zero bytes at [`RseqRegistration::rseq_cs_addr`], in the live
/// thread's memory before the memory is captured (or in the image), so
/// the restored thread starts in its abort handler with no section armed.
/// Other registers are left as they are; abort handlers expect exactly
/// that. On `None` nothing needs doing (a stale `rseq_cs` with `ip` outside
/// is cleared by the kernel on its own).
///
/// Errors name the addresses but not the thread: callers add the TID.
pub fn abort_fixup(
    read_mem: impl Fn(u64, &mut [u8]) -> Result<(), String>,
    reg: &RseqRegistration,
    ip: u64,
) -> Result<Option<u64>, RseqError> {
    let area = reg.abi_pointer;
    let read = |what: &'static str, addr: u64, buf: &mut [u8]| {
        read_mem(addr, buf).map_err(|err| RseqError::Read {
            area,
            what,
            addr,
            err,
        })
    };
    let mut p = [0u8; 8];
    read("rseq_cs field", reg.rseq_cs_addr(), &mut p)?;
    let cs_addr = u64::from_ne_bytes(p);
    if cs_addr == 0 {
        return Ok(None);
    }
    let mut d = [0u8; 32];
    read("critical-section descriptor", cs_addr, &mut d)?;
    let cs = RseqCs::from_bytes(&d);
    let bad = |what: String| RseqError::BadDescriptor {
        area,
        cs: cs_addr,
        what,
    };
    if cs.version != 0 {
        return Err(bad(format!("version {} (only 0 exists)", cs.version)));
    }
    let Some(end) = cs.start_ip.checked_add(cs.post_commit_offset) else {
        return Err(bad(format!(
            "a section {:#x}+{:#x} that wraps around",
            cs.start_ip, cs.post_commit_offset
        )));
    };
    if cs.contains(cs.abort_ip) {
        return Err(bad(format!(
            "its abort handler {:#x} inside its section {:#x}..{end:#x}",
            cs.abort_ip, cs.start_ip
        )));
    }
    let sig_addr = cs.abort_ip.wrapping_sub(4);
    let mut s = [0u8; 4];
    read("abort handler's signature", sig_addr, &mut s)?;
    let found = u32::from_ne_bytes(s);
    if found != reg.signature {
        return Err(RseqError::Signature {
            area,
            cs: cs_addr,
            start: cs.start_ip,
            end,
            abort: cs.abort_ip,
            sig_addr,
            found,
            expected: reg.signature,
        });
    }
    Ok(cs.contains(ip).then_some(cs.abort_ip))
}

/// A `read_mem` for [`abort_fixup`] over /proc/PID/mem (opened once; the
/// caller must be allowed to ptrace `pid`, as its tracer is).
pub fn read_mem_via_proc(pid: i32) -> impl Fn(u64, &mut [u8]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let path = format!("/proc/{pid}/mem");
    let file = std::fs::File::open(&path).map_err(|e| format!("opening {path}: {e}"));
    move |addr, buf| {
        let f = file.as_ref().map_err(Clone::clone)?;
        f.read_exact_at(buf, addr)
            .map_err(|e| format!("{path} at {addr:#x}, {} bytes: {e}", buf.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seccomp::test_child::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering::SeqCst;

    #[test]
    fn uapi_layouts() {
        use std::mem::{align_of, offset_of, size_of};
        // include/uapi/linux/ptrace.h
        assert_eq!(size_of::<PtraceRseqConfiguration>(), 24);
        assert_eq!(offset_of!(PtraceRseqConfiguration, rseq_abi_pointer), 0);
        assert_eq!(offset_of!(PtraceRseqConfiguration, rseq_abi_size), 8);
        assert_eq!(offset_of!(PtraceRseqConfiguration, signature), 12);
        assert_eq!(offset_of!(PtraceRseqConfiguration, flags), 16);
        assert_eq!(offset_of!(PtraceRseqConfiguration, pad), 20);
        // include/uapi/linux/rseq.h: aligned(4 * sizeof(__u64))
        assert_eq!(size_of::<Rseq>(), ORIG_RSEQ_SIZE as usize);
        assert_eq!(align_of::<Rseq>(), 32);
        assert_eq!(offset_of!(Rseq, cpu_id_start), 0);
        assert_eq!(offset_of!(Rseq, cpu_id), 4);
        assert_eq!(offset_of!(Rseq, rseq_cs), 8);
        assert_eq!(offset_of!(Rseq, flags), 16);
        assert_eq!(offset_of!(Rseq, node_id), 20);
        assert_eq!(offset_of!(Rseq, mm_cid), 24);
        assert_eq!(RSEQ_CS_OFFSET, 8);
        assert_eq!(size_of::<RseqCs>(), 32);
        assert_eq!(align_of::<RseqCs>(), 32);
        assert_eq!(offset_of!(RseqCs, version), 0);
        assert_eq!(offset_of!(RseqCs, flags), 4);
        assert_eq!(offset_of!(RseqCs, start_ip), 8);
        assert_eq!(offset_of!(RseqCs, post_commit_offset), 16);
        assert_eq!(offset_of!(RseqCs, abort_ip), 24);
    }

    /// The byte decoders read what the repr(C) structs hold.
    #[test]
    fn decoders_match_the_structs() {
        let cs = RseqCs {
            version: 0,
            flags: 7,
            start_ip: 0x1111,
            post_commit_offset: 0x22,
            abort_ip: 0x3333,
        };
        // SAFETY: RseqCs is repr(C), 32 bytes, no padding.
        let b: [u8; 32] = unsafe { std::mem::transmute(cs) };
        assert_eq!(RseqCs::from_bytes(&b), cs);
        let r = Rseq {
            cpu_id_start: 1,
            cpu_id: 2,
            rseq_cs: 0x4444,
            flags: 3,
            node_id: 4,
            mm_cid: 5,
        };
        let mut b = [0u8; 32];
        // SAFETY: copies the 28 bytes of fields (the rest is padding).
        unsafe {
            std::ptr::copy_nonoverlapping(&r as *const Rseq as *const u8, b.as_mut_ptr(), 28)
        };
        assert_eq!(Rseq::from_bytes(&b), r);
    }

    // --------------------------------------------- synthetic memory

    struct Mem(BTreeMap<u64, u8>);

    impl Mem {
        fn put(&mut self, a: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                self.0.insert(a + i as u64, *b);
            }
        }
        fn reader(&self) -> impl Fn(u64, &mut [u8]) -> Result<(), String> + '_ {
            move |a, buf| {
                for (i, b) in buf.iter_mut().enumerate() {
                    let at = a.wrapping_add(i as u64);
                    *b = *self.0.get(&at).ok_or(format!("{at:#x} unmapped"))?;
                }
                Ok(())
            }
        }
    }

    const AREA: u64 = 0x1000;
    const CS: u64 = 0x2000;
    const SIG: u32 = 0x5305_3053;

    fn reg() -> RseqRegistration {
        RseqRegistration {
            abi_pointer: AREA,
            abi_size: 32,
            signature: SIG,
            flags: 0,
        }
    }

    fn desc(version: u32, start: u64, len: u64, abort: u64) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&version.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        for v in [start, len, abort] {
            d.extend_from_slice(&v.to_ne_bytes());
        }
        d
    }

    /// Area at AREA pointing at a section 0x5000..0x5020 with its abort
    /// handler at 0x6004 (signature at 0x6000).
    fn armed() -> Mem {
        let mut m = Mem(BTreeMap::new());
        m.put(AREA, &[0u8; 32]);
        m.put(AREA + 8, &CS.to_ne_bytes());
        m.put(CS, &desc(0, 0x5000, 0x20, 0x6004));
        m.put(0x6000, &SIG.to_ne_bytes());
        m
    }

    #[test]
    fn fixup_no_section() {
        let mut m = Mem(BTreeMap::new());
        m.put(AREA, &[0u8; 32]);
        assert_eq!(abort_fixup(m.reader(), &reg(), 0x5010).unwrap(), None);
    }

    #[test]
    fn fixup_inside_and_outside() {
        let m = armed();
        for ip in [0x5000, 0x5010, 0x501f] {
            assert_eq!(
                abort_fixup(m.reader(), &reg(), ip).unwrap(),
                Some(0x6004),
                "{ip:#x}"
            );
        }
        // start + post_commit_offset is the first byte after the section.
        for ip in [0x4fff, 0x5020, 0x6004, 0] {
            assert_eq!(
                abort_fixup(m.reader(), &reg(), ip).unwrap(),
                None,
                "{ip:#x}"
            );
        }
    }

    #[test]
    fn fixup_wrong_signature_is_an_error_naming_the_addresses() {
        let mut m = armed();
        m.put(0x6000, &0xdead_beefu32.to_ne_bytes());
        let e = abort_fixup(m.reader(), &reg(), 0x5008).unwrap_err();
        assert!(
            matches!(
                e,
                RseqError::Signature {
                    found: 0xdead_beef,
                    expected: SIG,
                    abort: 0x6004,
                    sig_addr: 0x6000,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        for s in ["0x5000", "0x5020", "0x6004", "0x6000", "0x2000", "0x1000"] {
            assert!(msg.contains(s), "{s} missing from {msg}");
        }
        // The kernel checks the descriptor whatever the IP: so do we.
        assert!(matches!(
            abort_fixup(m.reader(), &reg(), 0x7000),
            Err(RseqError::Signature { .. })
        ));
    }

    #[test]
    fn fixup_descriptors_the_kernel_rejects() {
        for (d, what) in [
            (desc(1, 0x5000, 0x20, 0x6004), "version 1"),
            (desc(0, u64::MAX - 4, 0x20, 0x6004), "wraps around"),
            (desc(0, 0x5000, 0x20, 0x5010), "inside its section"),
        ] {
            let mut m = armed();
            m.put(CS, &d);
            let e = abort_fixup(m.reader(), &reg(), 0x5008).unwrap_err();
            assert!(matches!(e, RseqError::BadDescriptor { .. }), "{e:?}");
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[test]
    fn fixup_unreadable_memory() {
        // The area itself.
        let m = Mem(BTreeMap::new());
        let e = abort_fixup(m.reader(), &reg(), 0x5008).unwrap_err();
        assert!(matches!(e, RseqError::Read { addr: 0x1008, .. }), "{e:?}");
        // The descriptor.
        let mut m = Mem(BTreeMap::new());
        m.put(AREA, &[0u8; 32]);
        m.put(AREA + 8, &CS.to_ne_bytes());
        let e = abort_fixup(m.reader(), &reg(), 0x5008).unwrap_err();
        assert!(matches!(e, RseqError::Read { addr: CS, .. }), "{e:?}");
        // The signature.
        let mut m = armed();
        m.0.retain(|a, _| *a < 0x6000);
        let e = abort_fixup(m.reader(), &reg(), 0x5008).unwrap_err();
        assert!(matches!(e, RseqError::Read { addr: 0x6000, .. }), "{e:?}");
        assert!(e.to_string().contains("signature"), "{e}");
    }

    // ------------------------------------------------ real processes

    unsafe extern "C" {
        /// glibc 2.35+: the offset of a thread's `struct rseq` from its
        /// thread pointer, and the size glibc reports for it.
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }

    /// The calling thread's glibc rseq area.
    fn own_rseq_area() -> u64 {
        let tp: u64;
        // SAFETY: reads the thread pointer (x86_64: the TCB's self pointer
        // at fs:0; aarch64: TPIDR_EL0).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly))
        };
        #[cfg(target_arch = "aarch64")]
        // SAFETY: reads TPIDR_EL0, the thread pointer; no memory access.
        unsafe {
            std::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(nostack, nomem))
        };
        // SAFETY: a constant glibc exports.
        tp.wrapping_add_signed(unsafe { __rseq_offset } as i64)
    }

    const STOP: usize = 0;
    const FAIL: usize = 1;

    /// glibc registers rseq in every thread: both threads of a forked
    /// child report their own TLS area, the glibc signature, a live area
    /// (the kernel keeps cpu_id current in it); a thread that unregistered
    /// reports none.
    #[test]
    fn glibc_registration_in_every_thread() {
        // SAFETY: a constant glibc exports.
        assert_ne!(
            // SAFETY: an extern static glibc sets before main and never writes again.
            unsafe { __rseq_size },
            0,
            "glibc did not register rseq (GLIBC_TUNABLES=glibc.pthread.rseq=0, or a kernel without rseq?)"
        );
        let page = shared_page();
        const MAIN_AREA: usize = 2;
        const T_TID: usize = 3;
        const T_AREA: usize = 4;
        const U_TID: usize = 5;
        const U_AREA: usize = 6;
        let mut child = Child::fork(move || {
            page[MAIN_AREA].store(own_rseq_area(), SeqCst);
            let ok = spawn(move || {
                page[T_AREA].store(own_rseq_area(), SeqCst);
                page[T_TID].store(gettid() as u64, SeqCst);
                idle_until_stop(page);
            });
            let ok2 = spawn(move || {
                let area = own_rseq_area();
                // SAFETY: unregisters this thread's own area, with the
                // length and signature it was registered with.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_rseq,
                        area,
                        ORIG_RSEQ_SIZE.max(__rseq_size),
                        RSEQ_FLAG_UNREGISTER,
                        GLIBC_RSEQ_SIG,
                    )
                };
                if r != 0 {
                    page[FAIL].store(
                        std::io::Error::last_os_error().raw_os_error().unwrap_or(1) as u64,
                        SeqCst,
                    );
                }
                page[U_AREA].store(area, SeqCst);
                page[U_TID].store(gettid() as u64, SeqCst);
                idle_until_stop(page);
            });
            if !ok || !ok2 {
                return 2;
            }
            idle_until_stop(page);
            0
        });
        let pid = child.pid;
        wait_until("the child's threads", || {
            page[T_TID].load(SeqCst) != 0 && page[U_TID].load(SeqCst) != 0
        });
        assert_eq!(page[FAIL].load(SeqCst), 0, "rseq unregister failed (errno)");
        let tid = i32::try_from(page[T_TID].load(SeqCst)).unwrap();
        let utid = i32::try_from(page[U_TID].load(SeqCst)).unwrap();
        let mem = read_mem_via_proc(pid);
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get() as u64;
        let conf_cpus = {
            // SAFETY: plain sysconf.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            (n.max(1) as u64).max(cpus)
        };
        let mut areas = Vec::new();
        for (t, slot) in [(pid, MAIN_AREA), (tid, T_AREA)] {
            child.seize(t).unwrap();
            let reg = registration(t)
                .unwrap()
                .unwrap_or_else(|| panic!("thread {t} has no rseq registration"));
            assert_eq!(reg.signature, GLIBC_RSEQ_SIG, "thread {t}");
            assert!(reg.abi_size >= ORIG_RSEQ_SIZE, "thread {t}: {reg:?}");
            assert_eq!(reg.flags, 0);
            assert_eq!(
                reg.abi_pointer,
                page[slot].load(SeqCst),
                "thread {t}: the area is thread pointer + __rseq_offset"
            );
            assert_eq!(reg.abi_pointer % 32, 0, "struct rseq is 32-byte aligned");
            // Inside a writable mapping of the child.
            let inside = maps.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (Some(range), Some(perms)) = (f.next(), f.next()) else {
                    return false;
                };
                let Some((a, b)) = range.split_once('-') else {
                    return false;
                };
                let (a, b) = (
                    u64::from_str_radix(a, 16).unwrap_or(0),
                    u64::from_str_radix(b, 16).unwrap_or(0),
                );
                perms.starts_with("rw") && a <= reg.abi_pointer && reg.abi_pointer + 32 <= b
            });
            assert!(
                inside,
                "thread {t}: area {:#x} not in a rw mapping",
                reg.abi_pointer
            );
            // Live: the kernel wrote the CPU the thread last ran on.
            let mut b = [0u8; 32];
            mem(reg.abi_pointer, &mut b).unwrap();
            let area = Rseq::from_bytes(&b);
            assert_eq!(area.cpu_id, area.cpu_id_start, "thread {t}: {area:?}");
            assert!((area.cpu_id as u64) < conf_cpus, "thread {t}: {area:?}");
            // And nothing armed while it sleeps.
            assert_eq!(abort_fixup(&mem, &reg, 0).unwrap(), None);
            areas.push(reg.abi_pointer);
        }
        assert_ne!(areas[0], areas[1], "each thread has its own area");
        child.seize(utid).unwrap();
        assert_eq!(registration(utid).unwrap(), None, "unregistered thread");
        // The unregistered area is marked so by the kernel.
        let mut b = [0u8; 32];
        mem(page[U_AREA].load(SeqCst), &mut b).unwrap();
        assert_eq!(
            Rseq::from_bytes(&b).cpu_id,
            u32::MAX,
            "RSEQ_CPU_ID_UNINITIALIZED"
        );
        for t in [pid, tid, utid] {
            child.detach(t).unwrap();
        }
        page[STOP].store(1, SeqCst);
        assert_eq!(child.wait(), 0);
    }

    #[test]
    fn registration_of_an_untraced_thread_says_what_to_do() {
        let page = shared_page();
        let mut child = Child::fork(move || {
            idle_until_stop(page);
            0
        });
        let e = registration(child.pid).unwrap_err();
        assert!(
            matches!(e, RseqError::Ptrace { errno: Errno::ESRCH, tid, .. } if tid == child.pid),
            "{e:?}"
        );
        assert!(e.to_string().contains("ptrace-stopped"), "{e}");
        page[STOP].store(1, SeqCst);
        assert_eq!(child.wait(), 0);
    }

    /// A thread spinning inside a real critical section (armed in glibc's
    /// area by the thread itself) is stopped there; `abort_fixup` on its
    /// stopped IP gives the section's abort handler; doing what the caller
    /// must (IP to the handler, rseq_cs cleared) lets it run on.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn thread_stopped_inside_a_critical_section() {
        use std::os::unix::fs::FileExt;
        let page = shared_page();
        // Slots: 2 tid, 3 start, 4 length, 5 abort, 6 loop counter,
        // 7 aborts, 8 armed; the descriptor at 32..36 (byte 256, so
        // 32-byte aligned).
        const TID: usize = 2;
        const START: usize = 3;
        const LEN: usize = 4;
        const ABORT: usize = 5;
        const COUNTER: usize = 6;
        const ABORTS: usize = 7;
        const ARMED: usize = 8;
        const DESC: usize = 32;
        let mut child = Child::fork(move || {
            let ok = spawn(move || {
                page[TID].store(gettid() as u64, SeqCst);
                let base = page.as_ptr() as u64;
                // SAFETY: a constant glibc exports.
                let off = unsafe { __rseq_offset } as i64;
                // SAFETY: writes only the rseq_cs field of this thread's
                // own registered area (how a section is entered), the
                // shared page, and the declared clobbers. The abort label
                // is preceded by the signature glibc registered.
                unsafe {
                    std::arch::asm!(
                        // The descriptor: version/flags 0, start, length, abort.
                        "mov qword ptr [{b} + 256], 0",
                        "lea rax, [rip + 3f]",
                        "mov [{b} + 264], rax",
                        "mov [{b} + 24], rax",
                        "lea rcx, [rip + 4f]",
                        "sub rcx, rax",
                        "mov [{b} + 272], rcx",
                        "mov [{b} + 32], rcx",
                        "lea rax, [rip + 6f]",
                        "mov [{b} + 280], rax",
                        "mov [{b} + 40], rax",
                        // Arm: rseq_cs = &descriptor.
                        "2:",
                        "lea rax, [{b} + 256]",
                        "mov qword ptr fs:[{off} + 8], rax",
                        "mov qword ptr [{b} + 64], 1",
                        // The section: count until told to stop.
                        "3:",
                        "add qword ptr [{b} + 48], 1",
                        "cmp qword ptr [{b}], 0",
                        "je 3b",
                        "4:",
                        "mov qword ptr fs:[{off} + 8], 0",
                        "jmp 7f",
                        ".long 0x53053053",
                        "6:",
                        "add qword ptr [{b} + 56], 1",
                        "jmp 2b",
                        "7:",
                        b = in(reg) base,
                        off = in(reg) off,
                        out("rax") _,
                        out("rcx") _,
                    );
                }
            });
            if !ok {
                return 2;
            }
            idle_until_stop(page);
            // Let the spinning thread leave its section.
            sleep_ms(20);
            0
        });
        let pid = child.pid;
        wait_until("the thread to spin in its section", || {
            page[ARMED].load(SeqCst) == 1 && page[COUNTER].load(SeqCst) > 10_000
        });
        let tid = i32::try_from(page[TID].load(SeqCst)).unwrap();
        let (start, len, abort) = (
            page[START].load(SeqCst),
            page[LEN].load(SeqCst),
            page[ABORT].load(SeqCst),
        );
        assert!(len > 0 && !(start..start + len).contains(&abort));
        let desc_addr = page[DESC..].as_ptr() as u64;
        let mem = read_mem_via_proc(pid);
        let mut caught = 0;
        for _ in 0..50 {
            child.seize(tid).unwrap();
            // SAFETY: user_regs_struct is plain integers; all-zero is valid.
            let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
            // SAFETY: the kernel fills `regs`, which we own.
            let r = unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs) };
            assert_eq!(r, 0, "PTRACE_GETREGS");
            let reg = registration(tid).unwrap().expect("glibc's registration");
            let mut p = [0u8; 8];
            mem(reg.rseq_cs_addr(), &mut p).unwrap();
            let armed = u64::from_ne_bytes(p);
            let got = abort_fixup(&mem, &reg, regs.rip).unwrap();
            if !(start..start + len).contains(&regs.rip) {
                // Between the abort handler and re-arming: nothing to do.
                assert_eq!(got, None, "rip {:#x} outside {start:#x}+{len:#x}", regs.rip);
                child.detach(tid).unwrap();
                sleep_ms(2);
                continue;
            }
            assert_eq!(armed, desc_addr, "rseq_cs points at the descriptor");
            assert_eq!(
                got,
                Some(abort),
                "rip {:#x} inside {start:#x}+{len:#x}",
                regs.rip
            );
            caught += 1;
            // What the caller does: resume at the handler, section cleared.
            regs.rip = abort;
            // SAFETY: writes the registers we read, with rip changed.
            let r = unsafe { libc::ptrace(libc::PTRACE_SETREGS, tid, 0, &regs) };
            assert_eq!(r, 0, "PTRACE_SETREGS");
            std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{pid}/mem"))
                .unwrap()
                .write_all_at(&[0u8; 8], reg.rseq_cs_addr())
                .unwrap();
            mem(reg.rseq_cs_addr(), &mut p).unwrap();
            assert_eq!(abort_fixup(&mem, &reg, abort).unwrap(), None);
            let aborts = page[ABORTS].load(SeqCst);
            child.detach(tid).unwrap();
            let n = page[COUNTER].load(SeqCst);
            wait_until("the thread to run its abort handler and go on", || {
                page[ABORTS].load(SeqCst) > aborts && page[COUNTER].load(SeqCst) > n + 1000
            });
            if caught >= 5 {
                break;
            }
        }
        assert!(
            caught > 0,
            "the thread was never stopped inside its section"
        );
        page[STOP].store(1, SeqCst);
        assert_eq!(child.wait(), 0, "the child died after the fixups");
    }
}
