//! CRIU for the benchmarks that run it beside tern (`bench restore`).
//!
//! Debian bookworm's criu 3.17 refuses this kernel (`vdso: Unexpected rt
//! vDSO area bounds`); trixie's 4.1.1 works. It is not installed: its
//! package and its libraries' (with trixie's C library, whose loader runs
//! it) are fetched through an apt configuration of the xtask's own
//! (`crate::debian`) and unpacked under `target/criu/`, and
//! `target/criu/run-criu` is a script that starts it through that loader with
//! that library path:
//! `ld-linux-x86-64.so.2 --library-path LIBS .../usr/sbin/criu "$@"`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{debian, util};

const SUITE: &str = "trixie";

/// criu and the packages of every library it loads, down to the C library
/// (`ldd` of trixie's criu 4.1.1, resolved against these packages only).
const PACKAGES: &[&str] = &[
    "criu",
    "libcompel1",
    "libprotobuf-c1",
    "libnl-3-200",
    "libnet1",
    "libnftables1",
    "libnftnl11",
    "libmnl0",
    "libxtables12",
    "libjansson4",
    "libgnutls30t64",
    "libnettle8t64",
    "libhogweed6t64",
    "libgmp10",
    "libidn2-0",
    "libunistring5",
    "libtasn1-6",
    "libp11-kit0",
    "libffi8",
    "libbsd0",
    "libmd0",
    "libc6",
];

/// `target/criu/run-criu`, fetched and checked (`criu --version` runs) once.
/// The error says what failed: the benchmark then runs without CRIU and
/// says why.
pub fn fetch() -> Result<PathBuf> {
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "the benchmark fetches CRIU for x86_64 only (this is {})",
            std::env::consts::ARCH
        );
    }
    let work = util::target_dir().join("criu");
    let script = work.join("run-criu");
    if script.is_file() && version(&script).is_ok() {
        return Ok(script);
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let apt = debian::OwnApt::new(&work.join("apt"), SUITE, "amd64", "CRIU for the benchmarks")?;
    let roots = apt.fetch(|apt| {
        PACKAGES
            .iter()
            .map(|p| debian::package(&work, p, apt))
            .collect::<Result<Vec<_>>>()
    })?;
    let mut libs = Vec::new();
    for root in &roots {
        for d in ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"] {
            if root.join(d).is_dir() {
                libs.push(root.join(d));
            }
        }
    }
    let find = |rel: &str| -> Result<PathBuf> {
        roots
            .iter()
            .map(|r| r.join(rel))
            .find(|p| p.exists())
            .with_context(|| format!("no {rel} in the unpacked packages under {}", work.display()))
    };
    let loader = find("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        .or_else(|_| find("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"))?;
    let criu = find("usr/sbin/criu")?;
    let lib_path = libs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let text = format!(
        "#!/bin/sh\n# Debian {SUITE}'s criu, unpacked here by `cargo xtask` (xtask/src/criu.rs),\n# run through its own C library's loader.\nexec {} --library-path {lib_path} {} \"$@\"\n",
        loader.display(),
        criu.display()
    );
    std::fs::write(&script, text)?;
    make_executable(&script)?;
    let v = version(&script)?;
    eprintln!("xtask: {v} ready in {}", work.display());
    Ok(script)
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 755 {}", path.display()))
}

/// `criu --version`'s first line.
fn version(script: &Path) -> Result<String> {
    let out = util::stdout_of(&mut util::command(
        script.to_str().context("non-UTF-8 path")?,
        ["--version"],
    ))?;
    Ok(out.lines().next().unwrap_or("criu").trim().to_string())
}
