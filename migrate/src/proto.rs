//! The messages of a migration, over one `wire::Channel` (authenticated,
//! encrypted). Each message is a tag byte and its payload:
//!
//! | tag | from | payload | meaning |
//! |---|---|---|---|
//! | `M` | source | JSON [`Hello`] | a migration starts (or a lost connection of one comes back: `resume`) |
//! | `A` | receiver | | go on |
//! | `F` | source | name length u8, name, offset u64 LE, bytes | part of an image file (`IMAGE/FILE` or `IMAGE/pipes/FILE`) |
//! | `C` | source | image name | that image is complete (its inventory came last) |
//! | `k` | receiver | image name | it is written |
//! | `S` | source | JSON [`Switch`] | the source is frozen: restore the final image, hold it |
//! | `R` | receiver | JSON [`Ready`] | held, ready to run |
//! | `G` | source | | the source is gone (or committed): run it |
//! | `X` | source | why | abandoned: the source runs on; drop the copy |
//! | `U` | receiver | JSON [`Ready`] | it runs |
//! | `Q` | source | | (after a reconnect) say `D` when the fill is done |
//! | `D` | receiver | JSON: `lazy` (the fill's figures), `post_copy_pages` | every page is in: the source may go |
//! | `E` | receiver | why | the receiver failed: the source runs on |
//!
//! Image and file names are checked on arrival ([`image_file`]): nothing
//! the source sends names a path outside the receiver's directory.

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;

/// Largest piece of a file in one `F` message.
pub const CHUNK: usize = 4 << 20;
/// Largest message the receiver takes.
pub const MAX_MSG: usize = CHUNK + 512;
/// The final image's name (the rounds are `1`, `2`, ...).
pub const FINAL: &str = "final";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Random, names this migration (a reconnect gives it again).
    pub migration: String,
    /// The process, as the source knows it.
    pub pid: i32,
    pub resume: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Switch {
    /// Where the final image's pages are served from (post-copy), or
    /// `None`: they were sent.
    pub page_server: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    pub pid: i32,
}

pub fn msg(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + payload.len());
    m.push(tag);
    m.extend_from_slice(payload);
    m
}

pub fn json<T: Serialize>(tag: u8, v: &T) -> Vec<u8> {
    msg(tag, &serde_json::to_vec(v).expect("serializable"))
}

pub fn parse<'a, T: Deserialize<'a>>(payload: &'a [u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| format!("a malformed {what} message: {e}"))
}

/// An `F` message.
pub fn file_chunk(name: &str, offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(10 + name.len() + bytes.len());
    m.push(b'F');
    m.push(u8::try_from(name.len()).expect("image file names are short"));
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(&offset.to_le_bytes());
    m.extend_from_slice(bytes);
    m
}

/// A parsed `F` payload.
pub struct FileChunk<'a> {
    pub image: &'a str,
    /// `pipes/NAME` or a plain name.
    pub file: &'a str,
    pub offset: u64,
    pub bytes: &'a [u8],
}

pub fn parse_chunk(p: &[u8]) -> Result<FileChunk<'_>, String> {
    let (&n, rest) = p.split_first().ok_or("an empty file message")?;
    let n = usize::from(n);
    if rest.len() < n + 8 {
        return Err("a short file message".into());
    }
    let name = std::str::from_utf8(&rest[..n]).map_err(|_| "a file name that is not UTF-8")?;
    let (image, file) = image_file(name)?;
    let mut off = [0u8; 8];
    off.copy_from_slice(&rest[n..n + 8]);
    Ok(FileChunk {
        image,
        file,
        offset: u64::from_le_bytes(off),
        bytes: &rest[n + 8..],
    })
}

/// An image's name: a round's number, or `final`.
pub fn image_name(s: &str) -> Result<(), String> {
    let round = !s.is_empty()
        && s.len() <= 6
        && s.bytes().all(|b| b.is_ascii_digit())
        && !s.starts_with('0');
    if round || s == FINAL {
        Ok(())
    } else {
        Err(format!("{s:?} is not an image name of a migration"))
    }
}

/// The files an image holds (see `images`): nothing else is written.
fn plain_file(s: &str) -> bool {
    [
        images::INVENTORY_FILE,
        images::MM_FILE,
        images::PAGEMAP_FILE,
        images::PAGES_FILE,
        images::process::PROCESS_FILE,
    ]
    .contains(&s)
}

/// Split and check `IMAGE/FILE` or `IMAGE/pipes/FILE`.
pub fn image_file(name: &str) -> Result<(&str, &str), String> {
    let (image, file) = name
        .split_once('/')
        .ok_or_else(|| format!("{name:?} names no image file"))?;
    image_name(image)?;
    let ok = plain_file(file)
        || file.strip_prefix("pipes/").is_some_and(|p| {
            !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                && !p.starts_with('.')
        });
    if ok {
        Ok((image, file))
    } else {
        Err(format!("{name:?} is not a file an image holds"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_an_image_are_refused() {
        for bad in [
            "../x/inventory.json",
            "final/../../etc/passwd",
            "1/pipes/../../x",
            "1/pipes/.hidden",
            "01/mm.json",
            "final/other.json",
            "final",
            "/etc/inventory.json",
            "1/pipes/",
            "1234567/mm.json",
        ] {
            assert!(image_file(bad).is_err(), "{bad} accepted");
        }
        for good in [
            "1/pages.img",
            "final/process.json",
            "12/pipes/7-0",
            "final/inventory.json",
        ] {
            assert!(image_file(good).is_ok(), "{good} refused");
        }
        let m = file_chunk("3/pagemap.img", 4096, b"abc");
        let c = parse_chunk(&m[1..]).unwrap();
        assert_eq!(
            (c.image, c.file, c.offset, c.bytes),
            ("3", "pagemap.img", 4096, &b"abc"[..])
        );
        assert!(parse_chunk(&[200, 1, 2]).is_err());
    }
}
