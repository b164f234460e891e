//! `cargo xtask setup`: install what a fresh Debian bookworm machine lacks to
//! build and test tern. Idempotent; prints nothing when everything is there.
//!
//! - Debian packages (checked with dpkg-query; `apt-get update` once, then
//!   `apt-get install`),
//! - the nightly toolchain's `rust-src` (tracker-ebpf is built with
//!   `-Z build-std=core` for `bpfel-unknown-none`),
//! - bpf-linker 0.13 linked against the nightly toolchain's own LLVM,
//! - tracefs and bpffs mounts for the eBPF dirty stream.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util::{capture, command, is_root, run, show, stdout_of};

/// Debian packages and why they are needed.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("build-essential", "C compiler and linker for -sys crates"),
    ("pkg-config", "locating C libraries for -sys crates"),
    (
        "libclang-dev",
        "bindgen in userfaultfd-sys (the `userfaultfd` crate)",
    ),
    (
        "python3",
        "a real program the dump/restore tests checkpoint",
    ),
    (
        "sqlite3",
        "a real program the dump/restore tests checkpoint",
    ),
    (
        "redis-server",
        "a real program the dump/restore tests checkpoint (epoll, a TCP listener)",
    ),
    (
        "nodejs",
        "a real program the dump/restore tests checkpoint (epoll, eventfds, timers)",
    ),
    (
        "iproute2",
        "`ip netns` and veth pairs (two hosts on one machine) and `tc` (shaped links) for the page-server and migration tests",
    ),
    (
        "util-linux",
        "`unshare`: a restore in a PID namespace of its own",
    ),
];

const BPF_LINKER_SERIES: &str = "0.13";

pub struct Setup {
    pub verbose: bool,
}

impl Setup {
    fn say(&self, msg: impl AsRef<str>) {
        if self.verbose {
            eprintln!("setup: {}", msg.as_ref());
        }
    }

    pub fn run(&self) -> Result<()> {
        self.debian_packages()
            .context("setup: installing Debian packages failed")?;
        self.nightly_rust_src()
            .context("setup: preparing the nightly toolchain failed")?;
        self.bpf_linker()
            .context("setup: preparing bpf-linker failed")?;
        self.mounts();
        self.say("everything is present");
        Ok(())
    }

    fn debian_packages(&self) -> Result<()> {
        ensure_debian_packages(DEBIAN_PACKAGES, self.verbose)
    }

    fn nightly_rust_src(&self) -> Result<()> {
        let toolchains = stdout_of(&mut command("rustup", ["toolchain", "list"]))
            .context("rustup is needed (tern builds its eBPF programs with a nightly toolchain)")?;
        if !toolchains.lines().any(|l| l.starts_with("nightly")) {
            eprintln!("setup: the nightly toolchain is missing; installing it");
            run(&mut command(
                "rustup",
                [
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ],
            ))
            .context("could not install the nightly toolchain; install it by hand: rustup toolchain install nightly --component rust-src")?;
        }
        let components = stdout_of(&mut command(
            "rustup",
            ["component", "list", "--toolchain", "nightly", "--installed"],
        ))?;
        if components.lines().any(|l| l.trim() == "rust-src") {
            self.say("nightly rust-src: installed");
            return Ok(());
        }
        eprintln!("setup: rustup component add rust-src --toolchain nightly");
        run(&mut command(
            "rustup",
            ["component", "add", "rust-src", "--toolchain", "nightly"],
        ))
        .context("tracker-ebpf needs the nightly rust-src (it builds core for bpfel-unknown-none)")
    }

    /// bpf-linker must link the nightly toolchain's own LLVM (the README's setup
    /// list). It is built with `LLVM_PREFIX=P` where `P/lib` holds a
    /// `libLLVM.so` symlink to the nightly's library, and it then finds the
    /// library at run time through its RUNPATH `P/lib`, by its soname: so `P/lib`
    /// also gets a symlink under the soname.
    fn bpf_linker(&self) -> Result<()> {
        let sysroot = stdout_of(&mut command(
            "rustup",
            ["run", "nightly", "rustc", "--print", "sysroot"],
        ))?;
        let sysroot_lib = Path::new(&sysroot).join("lib");
        let (llvm_lib, major) = find_nightly_llvm(&sysroot_lib)?;
        let prefix = llvm_prefix()?;
        let prefix_lib = prefix.join("lib");
        fs::create_dir_all(&prefix_lib)
            .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
        let soname = llvm_lib
            .file_name()
            .expect("a library file has a name")
            .to_owned();
        ensure_symlink(&llvm_lib, &prefix_lib.join("libLLVM.so"))?;
        ensure_symlink(&llvm_lib, &prefix_lib.join(&soname))?;

        if let Some(version) = bpf_linker_version() {
            if version.starts_with(BPF_LINKER_SERIES) {
                self.say(format!("bpf-linker {version}: present"));
                return Ok(());
            }
            eprintln!("setup: bpf-linker {version} found, {BPF_LINKER_SERIES} wanted");
        }
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_SERIES} against the nightly LLVM {major} ({}); this takes a few minutes",
            llvm_lib.display()
        );
        let mut install = crate::util::cargo();
        install
            .args([
                "install",
                "bpf-linker",
                "--version",
                &format!("~{BPF_LINKER_SERIES}"),
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
                "--force",
            ])
            .env("LLVM_PREFIX", &prefix);
        run(&mut install).with_context(|| {
            format!(
                "building bpf-linker failed; by hand: LLVM_PREFIX={} {}",
                prefix.display(),
                show(&install)
            )
        })?;
        match bpf_linker_version() {
            Some(v) if v.starts_with(BPF_LINKER_SERIES) => Ok(()),
            other => bail!(
                "bpf-linker was installed but `bpf-linker --version` gives {other:?}; is ~/.cargo/bin on PATH, and does {} exist?",
                prefix_lib.join(&soname).display()
            ),
        }
    }

    /// eBPF tracepoints need tracefs, and pinned programs need bpffs. A
    /// failure is a warning: tern runs without eBPF (`--no-ebpf`).
    fn mounts(&self) {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for (fstype, source, target) in [
            ("tracefs", "nodev", "/sys/kernel/tracing"),
            ("bpf", "bpf", "/sys/fs/bpf"),
        ] {
            let mounted = mounts.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_, mnt, ty) = (f.next(), f.next(), f.next());
                mnt == Some(target) && ty == Some(fstype)
            });
            if mounted {
                self.say(format!("{fstype} is mounted on {target}"));
                continue;
            }
            if !Path::new(target).is_dir() {
                eprintln!(
                    "setup: warning: {target} does not exist; eBPF tracking will be unavailable"
                );
                continue;
            }
            eprintln!("setup: mount -t {fstype} {source} {target}");
            let out = capture(&mut command("mount", ["-t", fstype, source, target]));
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "setup: warning: mounting {fstype} on {target} failed: {}; eBPF tracking will be unavailable (run as root, or use --no-ebpf)",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("setup: warning: {e:#}"),
            }
        }
    }
}

/// The nightly's LLVM shared library (`libLLVM.so.<major>.<minor>-rust-...`)
/// and its major version.
fn find_nightly_llvm(sysroot_lib: &Path) -> Result<(PathBuf, u32)> {
    let entries = fs::read_dir(sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix("libLLVM.so.") {
            let major: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(major) = major.parse() {
                return Ok((entry.path(), major));
            }
        }
    }
    bail!(
        "no libLLVM.so.* in {} (the nightly toolchain ships one; reinstall it: rustup toolchain install nightly)",
        sysroot_lib.display()
    )
}

/// Where the `LLVM_PREFIX` for bpf-linker lives: `$HOME/.cache/tern-llvm`.
fn llvm_prefix() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/tern-llvm"))
}

fn ensure_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).ok().as_deref() == Some(target) {
        return Ok(());
    }
    let _ = fs::remove_file(link);
    symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

/// `bpf-linker --version` as "0.13.0", or None if it does not run.
fn bpf_linker_version() -> Option<String> {
    let out = capture(&mut command("bpf-linker", ["--version"])).ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_string)
}

/// Install the Debian packages of `list` (name, why) that are missing.
pub fn ensure_debian_packages(list: &[(&str, &str)], verbose: bool) -> Result<()> {
    if capture(&mut command("dpkg-query", ["--version"])).is_err() {
        eprintln!(
            "setup: warning: dpkg-query not found (not Debian?): make sure these are installed: {}",
            list.iter()
                .map(|(p, why)| format!("{p} ({why})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    let mut missing = Vec::new();
    for (pkg, why) in list {
        let out = capture(&mut command(
            "dpkg-query",
            ["-W", "-f=${db:Status-Abbrev}", pkg],
        ))?;
        let installed =
            out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ii");
        if installed {
            if verbose {
                eprintln!("setup: {pkg}: installed");
            }
        } else {
            missing.push((*pkg, *why));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    for (pkg, why) in &missing {
        eprintln!("setup: Debian package {pkg} is missing (needed for {why})");
    }
    if !is_root() {
        bail!(
            "not root, cannot install; run: sudo apt-get update && sudo apt-get install -y {}",
            names.join(" ")
        );
    }
    eprintln!("setup: apt-get update");
    run(command("apt-get", ["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    eprintln!("setup: apt-get install {}", names.join(" "));
    let mut install = command(
        "apt-get",
        ["install", "-y", "-qq", "--no-install-recommends"],
    );
    install
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(&mut install)?;
    Ok(())
}
