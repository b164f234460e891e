//! `process.json`: everything a final dump captures besides memory — threads
//! and their registers, signals, seccomp, rseq, credentials, mm fields, the
//! vDSO's placement, limits, the fd table — and `pipes/INODE.bin`, the bytes
//! queued in the process's pipes. Written before the inventory (which is
//! written last and marks the image complete).
//!
//! The kernel-facing types (register sets, siginfo, filters, ...) are those
//! of the `sys` crate, which both capture and restore use.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ImageError, write_json_atomic};

pub const PROCESS_FILE: &str = "process.json";
pub const PIPES_DIR: &str = "pipes";

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ProcessImage {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    /// /proc/PID/exe at dump time.
    pub exe: String,
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub personality: u64,
    /// PR_GET_DUMPABLE (a uid change resets it).
    #[serde(default)]
    pub dumpable: Option<u32>,
    pub creds: Creds,
    pub mm: MmState,
    pub vdso: sys::vdso::VdsoLayout,
    /// Signals 1..=64 except SIGKILL and SIGSTOP.
    pub sigactions: Vec<sys::signals::SigAction>,
    /// The process-wide (shared) pending queue, in order.
    pub shared_pending: Vec<sys::signals::PendingSignal>,
    pub itimers: Vec<ITimer>,
    pub rlimits: Vec<Rlimit>,
    /// Distinct seccomp filters; threads refer to them by index.
    pub seccomp_filters: Vec<sys::seccomp::SeccompFilter>,
    pub threads: Vec<ThreadImage>,
    pub fds: Vec<FdImage>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ThreadImage {
    pub tid: i32,
    pub comm: String,
    pub regs: sys::regs::ThreadRegs,
    pub blocked: u64,
    /// The thread's private pending queue, in order.
    pub pending: Vec<sys::signals::PendingSignal>,
    pub altstack: sys::signals::AltStack,
    pub rseq: Option<sys::rseq::RseqRegistration>,
    /// 0 disabled, 1 strict, 2 filter.
    pub seccomp_mode: u8,
    /// Indices into [`ProcessImage::seccomp_filters`], oldest first.
    pub seccomp: Vec<usize>,
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_list_len: u64,
}

/// Fields of the kernel's `mm_struct` a restore sets with `PR_SET_MM_MAP`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct MmState {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// /proc/PID/auxv as (type, value) words, up to and including AT_NULL.
    pub auxv: Vec<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ITimer {
    /// ITIMER_REAL 0, ITIMER_VIRTUAL 1, ITIMER_PROF 2
    pub which: i32,
    pub interval_us: u64,
    pub value_us: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FdImage {
    pub info: sys::fds::FdInfo,
    /// For a pipe: the file under `pipes/` holding its queued bytes (one per
    /// pipe, shared by all its fds).
    pub pipe_data: Option<String>,
    /// For a pipe: its capacity (F_GETPIPE_SZ).
    #[serde(default)]
    pub pipe_capacity: Option<u64>,
}

impl ProcessImage {
    pub fn load(dir: &Path) -> Result<ProcessImage, ImageError> {
        let path = dir.join(PROCESS_FILE);
        let text = std::fs::read(&path).map_err(|e| ImageError::io(&path, e))?;
        let p: ProcessImage = serde_json::from_slice(&text)
            .map_err(|e| ImageError::corrupt(&path, format!("bad process state: {e}")))?;
        if p.threads.is_empty() {
            return Err(ImageError::corrupt(&path, "no threads".to_string()));
        }
        for t in &p.threads {
            if let Some(&bad) = t.seccomp.iter().find(|&&i| i >= p.seccomp_filters.len()) {
                return Err(ImageError::corrupt(
                    &path,
                    format!(
                        "thread {} refers to seccomp filter {bad}, which is not in the image",
                        t.tid
                    ),
                ));
            }
        }
        for f in &p.fds {
            if let Some(name) = &f.pipe_data {
                let data = dir.join(PIPES_DIR).join(name);
                if !data.is_file() || name.contains('/') {
                    return Err(ImageError::corrupt(
                        &path,
                        format!(
                            "fd {} refers to pipe data {}, which is missing",
                            f.info.fd,
                            data.display()
                        ),
                    ));
                }
            }
        }
        Ok(p)
    }

    pub fn store(&self, dir: &Path) -> Result<(), ImageError> {
        write_json_atomic(&dir.join(PROCESS_FILE), self)
    }
}

/// Write one pipe's queued bytes as `pipes/NAME`.
pub fn store_pipe_data(dir: &Path, name: &str, data: &[u8]) -> Result<(), ImageError> {
    let d = dir.join(PIPES_DIR);
    std::fs::create_dir_all(&d).map_err(|e| ImageError::io(&d, e))?;
    let path = d.join(name);
    std::fs::write(&path, data).map_err(|e| ImageError::io(&path, e))
}

pub fn load_pipe_data(dir: &Path, name: &str) -> Result<Vec<u8>, ImageError> {
    let path = dir.join(PIPES_DIR).join(name);
    std::fs::read(&path).map_err(|e| ImageError::io(&path, e))
}
