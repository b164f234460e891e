//! Deterministic page contents and page sets, shared by the workload programs
//! (which write them) and the tests (which predict them).

pub const PAGE: usize = 4096;

/// splitmix64: a tiny, good-enough PRNG step.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A seeded PRNG.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed ^ 0x5eed))
    }
    /// Seeded from the clock and the pid: for the random delays of kill tests.
    pub fn from_time() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap())
            .unwrap_or(0);
        Rng::new(t ^ ((std::process::id() as u64) << 40))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// How a region's pages are filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Every byte pseudo-random: incompressible, catches any misplaced byte.
    Rand,
    /// A 16-byte header (index, generation) then one repeated byte:
    /// compresses well, still unique per page and generation.
    Light,
    /// Touched (populated) but all zeros.
    Zero,
    /// Not touched at all.
    None,
}

impl Content {
    pub fn parse(s: &str) -> Option<Content> {
        Some(match s {
            "rand" => Content::Rand,
            "light" => Content::Light,
            "zero" => Content::Zero,
            "none" => Content::None,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Content::Rand => "rand",
            Content::Light => "light",
            Content::Zero => "zero",
            Content::None => "none",
        }
    }
}

/// Fill one page (`page.len() == PAGE`) for page index `idx` and generation
/// `gen` of a region seeded with `seed`.
pub fn fill_page(page: &mut [u8], content: Content, seed: u64, generation: u64, idx: u64) {
    match content {
        Content::Rand => {
            let mut s = mix(seed ^ mix(generation ^ mix(idx)));
            for chunk in page.chunks_exact_mut(8) {
                s = mix(s);
                chunk.copy_from_slice(&s.to_le_bytes());
            }
        }
        Content::Light => {
            let b = mix(seed ^ generation ^ (idx << 20)).to_le_bytes()[0] | 1;
            page.fill(b);
            page[0..8].copy_from_slice(&idx.to_le_bytes());
            page[8..16].copy_from_slice(&(generation ^ (seed << 32)).to_le_bytes());
        }
        Content::Zero => page.fill(0),
        Content::None => {}
    }
}

/// The pages of a `pages`-page region selected by fraction `frac` with `seed`:
/// each page independently with probability `frac`. The workload's
/// `dirty_frac` command dirties exactly this set.
pub fn frac_set(pages: u64, frac: f64, seed: u64) -> Vec<u64> {
    // A fraction of the u64 range; float-to-int `as` saturates.
    #[allow(clippy::cast_possible_truncation)]
    let threshold = (frac.clamp(0.0, 1.0) * (u64::MAX as f64)) as u64;
    (0..pages)
        .filter(|&i| mix(seed.wrapping_mul(0x100_0000_01b3) ^ mix(i)) <= threshold)
        .collect()
}

/// Parse an index list: `3,5,10-20` (ranges inclusive).
pub fn parse_indices(s: &str) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: u64 = a.parse().map_err(|_| format!("bad index {a:?}"))?;
            let b: u64 = b.parse().map_err(|_| format!("bad index {b:?}"))?;
            if b < a {
                return Err(format!("bad range {part:?}"));
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| format!("bad index {part:?}"))?);
        }
    }
    Ok(out)
}

/// FNV-1a over bytes: the workload's `sum` command.
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
