//! Live migration between two hosts (`tern migrate`, `tern receive`).
//!
//! The source streams pre-copy rounds into an image chain the receiver
//! writes, freezes the process once the rest fits the downtime, and hands
//! it over so that it never runs on both hosts and is never lost; the
//! receiver restores it lazily from that chain (and, post-copy, from the
//! source's page server). Owns the protocol between the two ends
//! ([`proto`]), the source's rounds and switch-over ([`source`]) and the
//! receiver ([`receiver`]); the pages travel as image files, the channel
//! is `wire`'s.

pub mod proto;
pub mod receiver;
pub mod source;

pub use receiver::{ReceiveError, ReceiveOptions, ReceiveReport, receive};
pub use source::{MigrateError, MigrateOptions, MigrateReport, PostCopy, migrate};
