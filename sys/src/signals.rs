//! Signal state of a stopped thread: blocked mask, pending signals with their
//! siginfo (private and shared queues), and the uapi layouts of
//! `struct kernel_sigaction` and `stack_t` for injected calls. (Being written.)
