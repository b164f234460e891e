//! A process's file descriptor table from /proc, and the bytes queued in its
//! pipes, read without consuming them (tee). (Being written.)
