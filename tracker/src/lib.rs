//! The capture side of tern: attach to a running process, track which pages
//! it writes, and write incremental images of them.
//!
//! Data path: [`maps`] lists the VMAs, a [`backend::DirtyTracker`] says which
//! pages changed, [`copy`] copies them into an `images::ImageWriter`, in
//! rounds a [`session::TrackingSession`] drives (pre-dumps, `tern track`) or
//! in the final [`dump`]. How a page travels from a write to a restored
//! process: `docs/architecture.md`.
//! Kernel interfaces without a safe wrapper live in one module each:
//! [`pagemap_scan`], [`uffd`]; those the restorer shares (ptrace syscall
//! injection, register sets, signals, seccomp, rseq, vDSO) are in the `sys` crate.

mod anon;
pub mod backend;
pub mod check;
pub mod copy;
pub mod dump;
pub mod ebpf;
pub mod freeze;
pub mod hold;
/// Syscall injection lives in the `sys` crate (the restorer uses it too).
pub use sys::inject;
pub mod maps;
pub mod pagemap_scan;
pub mod restorable;
pub mod session;
pub mod uffd;
pub mod unlinked;
