//! ptrace register sets (PTRACE_GETREGSET / PTRACE_SETREGSET): general
//! registers, FPU / xsave, and on aarch64 the pointer-authentication keys.
//! (Being written.)
