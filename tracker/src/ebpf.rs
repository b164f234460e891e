//! The eBPF dirty stream (placeholder).
