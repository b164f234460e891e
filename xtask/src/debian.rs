//! Debian packages fetched and unpacked under `target/`, never installed:
//! the arm64 lane's guest kernel and busybox, and the CRIU that `bench
//! restore` runs beside tern.
//!
//! [`OwnApt`] is an apt configuration of the xtask's own (its sources list,
//! state, package lists and cache in one directory; signatures checked
//! against the Debian archive keyring): the machine's apt sources and its
//! installed packages are not touched. [`package`] downloads one package
//! (with that configuration, or the host's) and unpacks it with `dpkg-deb
//! -x`, once.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::util;

/// Debian's mirror, for every suite the xtask fetches from.
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// The keyring apt checks the mirror's signatures against (Debian package
/// `debian-archive-keyring`, on every Debian system).
pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// An apt configuration of the xtask's own under `dir`: one suite, one
/// architecture, `main` only.
pub struct OwnApt {
    dir: PathBuf,
    what: String,
    options: Vec<String>,
}

impl OwnApt {
    /// Write `dir/{sources.list,status}` and the state and cache
    /// directories (again each time: cheap, and a changed suite or
    /// architecture takes effect). `what` names the user in messages.
    pub fn new(dir: &Path, suite: &str, arch: &str, what: &str) -> Result<OwnApt> {
        for d in ["state/lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(d))
                .with_context(|| format!("creating {}", dir.join(d).display()))?;
        }
        let sources = dir.join("sources.list");
        std::fs::write(
            &sources,
            format!("deb [arch={arch} signed-by={KEYRING}] {MIRROR} {suite} main\n"),
        )?;
        // No packages are installed in this configuration.
        let status = dir.join("status");
        if !status.exists() {
            std::fs::write(&status, b"")?;
        }
        let d = |p: &Path| p.to_string_lossy().into_owned();
        let options = [
            format!("Dir::Etc::SourceList={}", d(&sources)),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State={}", d(&dir.join("state"))),
            format!("Dir::State::status={}", d(&status)),
            format!("Dir::Cache={}", d(&dir.join("cache"))),
            format!("APT::Architecture={arch}"),
            format!("APT::Architectures={arch}"),
            // Only the package lists: no translations, no AppStream metadata.
            "Acquire::Languages=none".to_string(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        Ok(OwnApt {
            dir: dir.to_path_buf(),
            what: format!("{what} (Debian {suite} {arch})"),
            options,
        })
    }

    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("state/lists")).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
        })
    }

    fn update(&self) -> Result<()> {
        eprintln!("xtask: apt-get update ({}, own lists)", self.what);
        util::run(util::command("apt-get", &self.options).arg("update"))
            .with_context(|| format!("apt-get update of the package lists of {}", self.what))
    }

    /// Run `fetch` with these options: `apt-get update` first when there
    /// are no package lists yet, and once more (then `fetch` again) when
    /// `fetch` fails with older lists (the mirror moved on).
    pub fn fetch<T>(&self, fetch: impl Fn(&[String]) -> Result<T>) -> Result<T> {
        let had_lists = self.has_lists();
        if !had_lists {
            self.update()?;
        }
        match fetch(&self.options) {
            Ok(r) => Ok(r),
            Err(e) if had_lists => {
                eprintln!("xtask: {e:#}; refreshing the package lists");
                self.update()?;
                fetch(&self.options)
            }
            Err(e) => Err(e),
        }
    }
}

/// The kernel image of Debian package `meta` (a metapackage such as
/// `linux-image-amd64`, resolved to the versioned package it depends on),
/// downloaded into `work` once and unpacked there; `apt` options are added
/// to every apt-get and apt-cache call (none: the host's apt).
pub fn kernel(work: &Path, meta: &str, apt: &[String]) -> Result<PathBuf> {
    let deps = util::stdout_of(util::command("apt-cache", apt).args(["depends", meta]))?;
    let pkg = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .with_context(|| format!("apt-cache depends {meta}: no versioned kernel package"))?
        .to_string();
    let boot = package(work, &pkg, apt)?.join("boot");
    std::fs::read_dir(&boot)
        .with_context(|| format!("{}: the kernel package has no /boot", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{}: no vmlinuz-* in the package", boot.display()))
}

/// Debian package `pkg` (`apt-get download` with `apt` options added) unpacked
/// with `dpkg-deb -x` into `work/PKG`, once: a later call finds it there.
pub fn package(work: &Path, pkg: &str, apt: &[String]) -> Result<PathBuf> {
    let unpacked = work.join(pkg);
    let done = unpacked.join(".unpacked");
    if done.exists() {
        return Ok(unpacked);
    }
    // Kernels unpacked before the marker existed.
    if unpacked.join("boot").is_dir() {
        std::fs::write(&done, b"")?;
        return Ok(unpacked);
    }
    let deb = match find_deb(work, pkg) {
        Some(deb) => deb,
        None => {
            eprintln!("xtask: apt-get download {pkg}");
            util::run(
                util::command("apt-get", apt)
                    .args(["download", pkg])
                    .current_dir(work),
            )?;
            find_deb(work, pkg).with_context(|| {
                format!("apt-get download {pkg} left no .deb in {}", work.display())
            })?
        }
    };
    let _ = std::fs::remove_dir_all(&unpacked);
    util::run(util::command("dpkg-deb", ["-x"]).arg(&deb).arg(&unpacked))?;
    std::fs::write(&done, b"")?;
    Ok(unpacked)
}

/// `work/PKG_*.deb`, if downloaded.
fn find_deb(work: &Path, pkg: &str) -> Option<PathBuf> {
    let prefix = format!("{pkg}_");
    std::fs::read_dir(work)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                && p.extension().is_some_and(|e| e == "deb")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arm64 lane's configuration, as it was before it moved here.
    #[test]
    fn own_apt_is_one_suite_one_architecture() {
        let dir = std::env::temp_dir().join(format!("xtask-apt-test-{}", std::process::id()));
        let apt = OwnApt::new(&dir, "trixie", "arm64", "a test").expect("writes its files");
        let sources = std::fs::read_to_string(dir.join("sources.list")).expect("sources.list");
        assert_eq!(
            sources,
            format!("deb [arch=arm64 signed-by={KEYRING}] {MIRROR} trixie main\n")
        );
        let opts = &apt.options;
        assert!(opts.iter().step_by(2).all(|o| o == "-o"));
        for want in [
            format!(
                "Dir::Etc::SourceList={}",
                dir.join("sources.list").display()
            ),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State::status={}", dir.join("status").display()),
            "APT::Architecture=arm64".to_string(),
            "APT::Architectures=arm64".to_string(),
        ] {
            assert!(opts.contains(&want), "{want} missing from {opts:?}");
        }
        assert!(!apt.has_lists());
        assert!(dir.join("state/lists/partial").is_dir());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
