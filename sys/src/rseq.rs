//! rseq registration of a stopped thread (PTRACE_GET_RSEQ_CONFIGURATION,
//! Linux 5.13+) and the abort fixup of an IP inside a critical section.
//!
//! A dump records each thread's registration (area, length, signature) so a
//! restore can register the same area again in the same thread: glibc 2.35+
//! registers one in every thread and the kernel writes the current CPU into
//! it on every return to user space. A thread stopped inside a critical
//! section must resume at the section's abort handler (the kernel's own rule
//! on preemption); [`abort_fixup`] says where that is.

use serde::{Deserialize, Serialize};

const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

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

/// `struct rseq_cs` (include/uapi/linux/rseq.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RseqCs {
    pub version: u32,
    pub flags: u32,
    pub start_ip: u64,
    pub post_commit_offset: u64,
    pub abort_ip: u64,
}

/// Offset of `rseq_cs` in `struct rseq` (after `cpu_id_start`, `cpu_id`).
pub const RSEQ_CS_OFFSET: u64 = 8;

/// A thread's rseq registration, as recorded in an image.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqRegistration {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub signature: u32,
    pub flags: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RseqError {
    #[error(
        "PTRACE_GET_RSEQ_CONFIGURATION on thread {tid}: {errno} (the thread must be ptrace-stopped by this thread; the kernel needs 5.13+ with CONFIG_RSEQ)"
    )]
    Ptrace { tid: i32, errno: nix::errno::Errno },
    #[error("reading the rseq area of a thread at {addr:#x}: {what}")]
    Read { addr: u64, what: String },
    #[error(
        "rseq critical section {start:#x}+{len:#x}: the 4 bytes before its abort handler {abort:#x} are {found:#x}, not the registered signature {sig:#x}; the thread would be killed by the kernel here too"
    )]
    Signature {
        start: u64,
        len: u64,
        abort: u64,
        found: u32,
        sig: u32,
    },
}

/// The registration of ptrace-stopped thread `tid`, if any.
pub fn registration(tid: i32) -> Result<Option<RseqRegistration>, RseqError> {
    let mut conf = PtraceRseqConfiguration::default();
    // SAFETY: the kernel writes at most `size_of` bytes into `conf`.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<PtraceRseqConfiguration>(),
            &mut conf as *mut PtraceRseqConfiguration,
        )
    };
    if r < 0 {
        return Err(RseqError::Ptrace {
            tid,
            errno: nix::errno::Errno::last(),
        });
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

/// Where a thread at `ip` must resume: `Some(abort_ip)` if `ip` is inside
/// the critical section its rseq area currently points at, else `None`.
/// `read_mem(addr, buf)` reads the thread's memory. The caller moves the IP
/// and clears `rseq_cs` in the area (as the kernel does).
pub fn abort_fixup(
    read_mem: impl Fn(u64, &mut [u8]) -> Result<(), String>,
    reg: &RseqRegistration,
    ip: u64,
) -> Result<Option<u64>, RseqError> {
    let read = |addr: u64, buf: &mut [u8]| {
        read_mem(addr, buf).map_err(|what| RseqError::Read { addr, what })
    };
    let mut p = [0u8; 8];
    read(reg.abi_pointer + RSEQ_CS_OFFSET, &mut p)?;
    let cs_ptr = u64::from_ne_bytes(p);
    if cs_ptr == 0 {
        return Ok(None);
    }
    let mut d = [0u8; 32];
    read(cs_ptr, &mut d)?;
    let w = |k: usize| u64::from_ne_bytes(d[k..k + 8].try_into().expect("8 bytes"));
    let (start, len, abort) = (w(8), w(16), w(24));
    if ip < start || ip >= start.wrapping_add(len) {
        return Ok(None);
    }
    let mut s = [0u8; 4];
    read(abort.wrapping_sub(4), &mut s)?;
    let found = u32::from_ne_bytes(s);
    if found != reg.signature {
        return Err(RseqError::Signature {
            start,
            len,
            abort,
            found,
            sig: reg.signature,
        });
    }
    Ok(Some(abort))
}

/// A `read_mem` for [`abort_fixup`] over /proc/PID/mem.
pub fn read_mem_via_proc(pid: i32) -> impl Fn(u64, &mut [u8]) -> Result<(), String> {
    move |addr, buf| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
        f.read_exact_at(buf, addr).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn layouts() {
        assert_eq!(std::mem::size_of::<PtraceRseqConfiguration>(), 24);
        assert_eq!(std::mem::size_of::<RseqCs>(), 32);
    }

    fn mem(m: BTreeMap<u64, u8>) -> impl Fn(u64, &mut [u8]) -> Result<(), String> {
        move |a, buf| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *m
                    .get(&(a + i as u64))
                    .ok_or(format!("{:#x} unmapped", a + i as u64))?;
            }
            Ok(())
        }
    }

    fn put(m: &mut BTreeMap<u64, u8>, a: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            m.insert(a + i as u64, *b);
        }
    }

    #[test]
    fn fixup_rules() {
        let reg = RseqRegistration {
            abi_pointer: 0x1000,
            abi_size: 32,
            signature: 0x5305_3053,
            flags: 0,
        };
        let mut m = BTreeMap::new();
        put(&mut m, 0x1000, &[0u8; 32]);
        assert_eq!(abort_fixup(mem(m.clone()), &reg, 0x5000).unwrap(), None);
        put(&mut m, 0x1008, &0x2000u64.to_ne_bytes());
        let mut cs = vec![0u8; 8];
        cs.extend_from_slice(&0x5000u64.to_ne_bytes());
        cs.extend_from_slice(&0x20u64.to_ne_bytes());
        cs.extend_from_slice(&0x6004u64.to_ne_bytes());
        put(&mut m, 0x2000, &cs);
        put(&mut m, 0x6000, &0x5305_3053u32.to_ne_bytes());
        assert_eq!(
            abort_fixup(mem(m.clone()), &reg, 0x5010).unwrap(),
            Some(0x6004)
        );
        assert_eq!(abort_fixup(mem(m.clone()), &reg, 0x5020).unwrap(), None);
        assert_eq!(abort_fixup(mem(m.clone()), &reg, 0x4fff).unwrap(), None);
        put(&mut m, 0x6000, &0xdead_beefu32.to_ne_bytes());
        assert!(matches!(
            abort_fixup(mem(m), &reg, 0x5000),
            Err(RseqError::Signature { .. })
        ));
    }

    /// glibc registers rseq in every thread: a forked, seized child has one.
    #[test]
    fn glibc_registration_of_a_child() {
        // SAFETY: the child only sleeps.
        let child = unsafe { libc::fork() };
        if child == 0 {
            loop {
                unsafe { libc::pause() };
            }
        }
        let res = (|| {
            // SAFETY: plain ptrace calls on our child.
            unsafe {
                if libc::ptrace(libc::PTRACE_SEIZE, child, 0, 0) != 0 {
                    return Err(format!("seize: {}", std::io::Error::last_os_error()));
                }
                libc::ptrace(libc::PTRACE_INTERRUPT, child, 0, 0);
                let mut st = 0;
                let t0 = std::time::Instant::now();
                while libc::waitpid(child, &mut st, libc::WNOHANG | libc::__WALL) == 0 {
                    if t0.elapsed() > std::time::Duration::from_secs(5) {
                        return Err("child did not stop".into());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            registration(child).map_err(|e| e.to_string())
        })();
        // SAFETY: kill and reap our child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        let reg = res
            .unwrap()
            .expect("glibc 2.35+ registers rseq in every thread");
        assert_eq!(reg.signature, 0x5305_3053);
        assert!(reg.abi_size >= 32, "{reg:?}");
        assert_ne!(reg.abi_pointer, 0);
    }
}
