//! seccomp filters of a stopped thread (PTRACE_SECCOMP_GET_FILTER,
//! PTRACE_SECCOMP_GET_METADATA). (Being written.)
