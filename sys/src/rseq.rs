//! rseq registration of a stopped thread (PTRACE_GET_RSEQ_CONFIGURATION) and
//! the abort fixup of an IP inside a critical section. (Being written.)
