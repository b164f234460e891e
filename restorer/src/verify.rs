//! `tern dump --verify`: every page of every dumped VMA, as the image chain
//! rebuilds it, compared with the frozen process's memory
//! (/proc/PID/mem). Here because it is the chain reader's answer that is
//! checked: what a restore would put back.

use crate::{ChainError, ImageChain};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What `--verify` found (in `tern dump`'s JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub pages_checked: u64,
    pub mismatches: u64,
    /// The first few mismatching pages, `0xADDR: why`.
    pub first_mismatches: Vec<String>,
}

/// Why the comparison could not be made (a mismatch is not an error: it is
/// in the report).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("/proc/{pid}/mem: {source}")]
    Mem {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {start:#x}-{end:#x} of PID {pid}: {source}")]
    Read {
        pid: i32,
        start: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Compare the chain ending at `dir` with the memory of `pid` (frozen by
/// the caller).
pub fn verify_chain(pid: i32, dir: &Path) -> Result<VerifyReport, VerifyError> {
    let chain = ImageChain::open(dir)?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|source| VerifyError::Mem { pid, source })?;
    let mut report = VerifyReport::default();
    let page = images::PAGE_SIZE;
    for v in chain.vmas().iter().filter(|v| v.dumped) {
        let mut a = v.start;
        while a < v.end {
            let end = (a + (4 << 20)).min(v.end);
            let want = chain.read_range(v, images::PageRange::new(a, end))?;
            let mut have = vec![0u8; want.len()];
            mem.read_exact_at(&mut have, a)
                .map_err(|source| VerifyError::Read {
                    pid,
                    start: a,
                    end,
                    source,
                })?;
            for (k, (w, h)) in want
                .chunks(sys::usize_of(page))
                .zip(have.chunks(sys::usize_of(page)))
                .enumerate()
            {
                report.pages_checked += 1;
                if w != h {
                    report.mismatches += 1;
                    if report.first_mismatches.len() < 8 {
                        let off = w.iter().zip(h).position(|(x, y)| x != y).unwrap_or(0);
                        report.first_mismatches.push(format!(
                            "{:#x}: byte {off} differs (image {:#04x}, process {:#04x}) in {}",
                            a + k as u64 * page,
                            w[off],
                            h[off],
                            v.name.as_deref().unwrap_or("[anon]")
                        ));
                    }
                }
            }
            a = end;
        }
    }
    Ok(report)
}
