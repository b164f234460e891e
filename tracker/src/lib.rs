//! The capture side of tern: attach to a running process, track which pages
//! it writes, and write incremental images of them.
