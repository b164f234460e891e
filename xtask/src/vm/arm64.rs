//! The arm64 lane (`cargo xtask vm-test arm64`): not written yet.

use anyhow::{Result, bail};

pub fn run() -> Result<()> {
    bail!("the arm64 VM lane is not written yet")
}
