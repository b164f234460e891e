//! Fuzz entry point of the chain resolver (see `images::fuzz` for the
//! others and for how they are run).

use std::path::{Path, PathBuf};

use images::{ImageError, Inventory};

/// What separates the images of a fuzz input.
pub const SEPARATOR: &[u8] = b"\n\0@image@\0\n";

/// Images `/fz/0`, `/fz/1`, ... whose `inventory.json` are the parts of
/// `data` between [`SEPARATOR`]s; the chain is resolved from `/fz/0`. What
/// resolves is a whole chain: each link to the id its child recorded, one
/// process, ending at a full image without a parent.
pub fn chain(data: &[u8]) {
    let parts: Vec<&[u8]> = split(data, SEPARATOR).take(8).collect();
    let open = |p: &Path| -> Result<Inventory, ImageError> {
        let lex = crate::chain::lexical_path(p);
        let idx = lex
            .strip_prefix("/fz")
            .ok()
            .and_then(|r| r.to_str()?.parse::<usize>().ok())
            .filter(|&i| i < parts.len());
        match idx {
            Some(i) => Inventory::parse(&p.join("inventory.json"), parts[i]),
            None => Err(ImageError::NotAnImage {
                path: p.to_path_buf(),
            }),
        }
    };
    let Ok(chain) = crate::chain::resolve(Path::new("/fz/0"), open, |i| i) else {
        return;
    };
    let (_, oldest) = chain.last().expect("a resolved chain has an image");
    assert!(oldest.parent.is_none() && oldest.full);
    for w in chain.windows(2) {
        let (child, parent) = (&w[0].1, &w[1].1);
        assert_eq!(child.parent.as_ref().map(|p| &p.id), Some(&parent.id));
        assert_eq!(child.pid, parent.pid);
        assert!(!child.full);
    }
    let dirs: Vec<&PathBuf> = chain.iter().map(|(d, _)| d).collect();
    assert!(dirs.len() <= parts.len().max(1));
}

fn split<'a>(data: &'a [u8], sep: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                rest = Some(&r[i + sep.len()..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}
