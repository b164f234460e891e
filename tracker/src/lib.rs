//! The capture side of tern: attach to a running process, track which pages
//! it writes, and write incremental images of them.
//!
//! Data path: [`maps`] lists the VMAs, a [`backend::DirtyTracker`] says which
//! pages changed, [`predump`] copies them into an `images::ImageWriter`.
//! Kernel interfaces without a safe wrapper live in one module each:
//! [`pagemap_scan`], [`uffd`], [`inject`] (ptrace syscall injection).

pub mod ebpf;
pub mod inject;
pub mod pagemap_scan;
pub mod uffd;
pub mod backend;
pub mod freeze;
pub mod maps;
pub mod check;
pub mod copy;
pub mod session;
