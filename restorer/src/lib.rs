//! The restore side of tern. For now: [`ImageChain`], which opens an image and
//! its parents, checks the links between them, and answers "what did page X
//! hold" for any address of the newest image's address space.

mod chain;

pub use chain::{ChainError, ChainImageSummary, ImageChain, PageSource};
