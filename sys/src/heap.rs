//! How tern's own heap gives memory back (glibc `mallopt`).
//!
//! Memory a process touches for the first time is expensive on the VMs
//! tern runs on: ~4 µs per 4 KiB page here (the hypervisor backs the guest
//! page on first touch; a huge page costs as much per byte), while memory
//! reused from the process's own heap costs nothing. glibc by default maps
//! every allocation above 128 KiB afresh and unmaps it when freed, so a
//! restore reading a 1.4 MB page map, decoding it and building its lazy
//! map pays that price three times over, on the path to the process
//! running. [`keep_freed_memory`] makes allocations up to 32 MiB come from
//! the heap and keeps up to 64 MiB of freed memory there for the next ones.

/// Serve allocations up to 32 MiB from the heap and keep freed memory for
/// reuse (see the module doc). Returns false if glibc refused a setting
/// (the defaults then stay: slower, not wrong).
pub fn keep_freed_memory() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before tern starts any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20) == 1
                && libc::mallopt(libc::M_TOP_PAD, 16 << 20) == 1
        }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_settings_and_reuses_freed_memory() {
        assert!(super::keep_freed_memory(), "mallopt refused a setting");
        // A 4 MiB block freed and asked for again comes back from the heap
        // (by default it would be unmapped and mapped afresh elsewhere).
        let a = vec![1u8; 4 << 20];
        let at = a.as_ptr() as usize;
        drop(a);
        let b = vec![2u8; 4 << 20];
        assert_eq!(b.as_ptr() as usize, at, "the freed block was not reused");
    }
}
