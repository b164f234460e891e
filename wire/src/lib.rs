//! The authenticated, encrypted byte stream between two tern hosts.
//!
//! - [`key`]: pre-shared keys (`tern keygen`), loaded only from files no one
//!   else can read.
//! - [`channel`]: the Noise handshake and the framed, encrypted messages
//!   over TCP, a blocking end and a tokio one.
//!
//! No cryptography is made here: `snow` does the Noise protocol; this crate
//! frames its messages and decides who is refused.

pub mod channel;
pub mod key;

pub use channel::{AsyncChannel, Channel, MAX_MESSAGE, ReplayGuard, WireError};
pub use key::{Key, KeyError};
