//! Syscall injection into a stopped thread of another process (placeholder).
