//! The restore side of tern: [`ImageChain`], which opens an image and its
//! parents, checks the links between them, and answers "what did page X
//! hold" for any address of the newest image's address space; and
//! [`restore`], which recreates the dumped process from it; [`verify`],
//! which compares a chain with the memory of the frozen process it is of;
//! [`remote`], which serves a chain's pages over the network and reads
//! them back.

pub mod chain;
pub mod fill;
pub mod fuzz;
mod interrupt;
pub mod lazy;
pub mod remote;
pub mod restore;
pub mod service;
mod socket_file;
pub mod trust;
mod unlinked;
pub mod verify;

pub use chain::{BlobCache, ChainError, ChainImageSummary, ImageChain, PageSource};
