//! Architectures without an injector yet: every call fails with
//! [`InjectError::Unsupported`].

use std::time::Duration;

use super::InjectError;

pub(crate) struct Tracee {
    pid: i32,
    tid: i32,
}

impl Tracee {
    fn unsupported<T>(&self) -> Result<T, InjectError> {
        Err(unsupported(self.pid, self.tid))
    }

    pub fn attach(pid: i32, tid: i32, _timeout: Duration) -> Result<Tracee, InjectError> {
        Err(unsupported(pid, tid))
    }
    pub fn seccomp_suspended(&self) -> bool {
        false
    }
    pub fn released(&self) -> bool {
        true
    }
    pub fn ran_program_code(&self) -> u32 {
        0
    }
    pub fn set_timeout(&mut self, _timeout: Duration) {}
    pub fn ensure_scratch(&mut self, _known: Option<u64>) -> Result<u64, InjectError> {
        self.unsupported()
    }
    pub fn syscall(&mut self, _nr: i64, _args: [u64; 6]) -> Result<i64, InjectError> {
        self.unsupported()
    }
    pub fn scratch_data(&mut self, _bytes: &[u8]) -> Result<u64, InjectError> {
        self.unsupported()
    }
    pub fn batch_data_addr(&mut self) -> Result<u64, InjectError> {
        self.unsupported()
    }
    pub fn syscall_batch(
        &mut self,
        _calls: &[super::Syscall],
        _data: &[u8],
    ) -> Result<Vec<i64>, InjectError> {
        self.unsupported()
    }
    pub fn read_memory(&mut self, _addr: u64, _len: usize) -> Result<Vec<u8>, InjectError> {
        self.unsupported()
    }
    pub fn scratch_base(&self) -> Option<u64> {
        None
    }
    pub fn remove_scratch(&mut self) -> Result<(), InjectError> {
        self.unsupported()
    }
    pub fn remove_leftover_scratch(&mut self) -> Result<Vec<u64>, InjectError> {
        self.unsupported()
    }
    pub fn detach(&mut self) -> Result<(), InjectError> {
        Ok(())
    }
    pub fn release_scratch(&mut self) {}
    pub fn die_with_tracer(&mut self) -> Result<(), InjectError> {
        Err(unsupported(self.pid, self.tid))
    }
    pub fn set_scratch_hint(&mut self, _addr: u64) {}
    pub fn abandon(&mut self) {}
}

fn unsupported(pid: i32, tid: i32) -> InjectError {
    InjectError::Unsupported {
        pid,
        tid,
        reason: format!(
            "syscall injection is implemented for x86_64 only (this build is {}); use a tracking mode that needs no injection",
            std::env::consts::ARCH
        ),
    }
}
