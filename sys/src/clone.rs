//! `clone3(2)`'s argument block, shared by `tern check` (probing `set_tid`)
//! and the restore (the process and its threads with their dumped ids).

/// `struct clone_args` (include/uapi/linux/sched.h), version 2 (88 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

impl CloneArgs {
    pub const SIZE: usize = 88;

    /// The block as the kernel reads it (for an injected call).
    pub fn to_bytes(&self) -> Vec<u8> {
        [
            self.flags,
            self.pidfd,
            self.child_tid,
            self.parent_tid,
            self.exit_signal,
            self.stack,
            self.stack_size,
            self.tls,
            self.set_tid,
            self.set_tid_size,
            self.cgroup,
        ]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn layout() {
        assert_eq!(
            std::mem::size_of::<super::CloneArgs>(),
            super::CloneArgs::SIZE
        );
        let a = super::CloneArgs {
            set_tid: 7,
            ..Default::default()
        };
        assert_eq!(&a.to_bytes()[64..72], &7u64.to_ne_bytes());
    }
}
