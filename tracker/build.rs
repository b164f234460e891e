//! Builds the eBPF programs of the dirty stream (`tracker-ebpf`) from source,
//! with the nightly toolchain, for `bpfel-unknown-none` (`-Z build-std=core`),
//! linked by `bpf-linker`. `src/ebpf.rs` embeds the resulting object.
//!
//! Needs, besides the stable toolchain: `rustup` with a `nightly` toolchain
//! that has the `rust-src` component, and `bpf-linker` (built against that
//! nightly's LLVM) on `PATH` or in `$CARGO_HOME/bin`. `cargo xtask setup`
//! installs both. Without them the build fails and says so.
//!
//! `TERN_SKIP_EBPF_BUILD=1` (escape hatch for machines that only need to
//! type-check): embed an empty object instead; `DirtyStream::open` and
//! `probe` then fail with `EbpfError::NotBuilt`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const SETUP_HINT: &str = "run `cargo xtask setup` (it runs `rustup component add rust-src \
     --toolchain nightly` and installs bpf-linker built against the nightly's LLVM: see \
     the README, `cargo xtask setup`), or set TERN_SKIP_EBPF_BUILD=1 to build without the eBPF dirty stream";

fn fail(what: &str) -> ! {
    eprintln!("error: cannot build the eBPF programs (tracker-ebpf): {what}");
    eprintln!("hint: {SETUP_HINT}");
    panic!("cannot build the eBPF programs (tracker-ebpf): {what}; {SETUP_HINT}");
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=TERN_SKIP_EBPF_BUILD");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let object = out_dir.join("tracker-ebpf");

    if env::var_os("TERN_SKIP_EBPF_BUILD").is_some_and(|v| v == "1" || v == "true") {
        println!(
            "cargo:warning=TERN_SKIP_EBPF_BUILD set: the eBPF dirty stream is not built in \
             (DirtyStream::open will fail with NotBuilt)"
        );
        std::fs::write(&object, b"").expect("write empty eBPF object");
        return;
    }

    // 1. rustup + nightly toolchain.
    let Some(rustup) = find_in_path("rustup") else {
        fail("`rustup` not found (the eBPF build needs a rustup-managed nightly toolchain)");
    };
    let sysroot = Command::new(&rustup)
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    let sysroot = match sysroot {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        Ok(o) => fail(&format!(
            "no nightly toolchain (`rustup run nightly rustc` failed: {}); \
             `rustup toolchain install nightly` installs one",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => fail(&format!("cannot run `{}`: {e}", rustup.display())),
    };
    // 2. rust-src for -Z build-std=core.
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core_src.is_file() {
        fail(&format!(
            "the nightly toolchain lacks the rust-src component ({} is missing)",
            core_src.display()
        ));
    }
    // 3. bpf-linker, and that it runs (it links the nightly's libLLVM, which
    //    `rustup run nightly` puts on the library path).
    let Some(linker) = find_in_path("bpf-linker") else {
        fail("`bpf-linker` not found on PATH or in $CARGO_HOME/bin");
    };
    match Command::new(&rustup)
        .args(["run", "nightly"])
        .arg(&linker)
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!(
            "`{} --version` failed under the nightly toolchain (built against another LLVM?): {}",
            linker.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => fail(&format!("cannot run `{}`: {e}", linker.display())),
    }
    println!("cargo:rerun-if-changed={}", linker.display());

    // 4. Build. aya-build runs `rustup run nightly cargo build --package
    //    tracker-ebpf --bins --release --target bpfel-unknown-none -Z
    //    build-std=core` in its own target dir under OUT_DIR and copies the
    //    object to OUT_DIR/tracker-ebpf.
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let ebpf_dir = manifest_dir.join("../tracker-ebpf");
    let ebpf_dir = ebpf_dir.canonicalize().unwrap_or(ebpf_dir);
    let root_dir = ebpf_dir.to_str().expect("utf-8 path");
    println!("cargo:rerun-if-changed={root_dir}/src");
    println!("cargo:rerun-if-changed={root_dir}/Cargo.toml");
    // The layouts it shares with this crate (a path dependency of both).
    let common_dir = manifest_dir.join("../tracker-common");
    println!("cargo:rerun-if-changed={}/src", common_dir.display());
    println!("cargo:rerun-if-changed={}/Cargo.toml", common_dir.display());
    // A partial rebuild must not leave a stale object behind.
    let _ = std::fs::remove_file(&object);
    // aya-build forwards the nested cargo's stderr as one `cargo:warning` per
    // line; keep its progress lines out of every build's output (errors still
    // come through as compiler messages).
    // SAFETY: the build script is single-threaded here.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let package = aya_build::Package {
        name: "tracker-ebpf",
        root_dir,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly) {
        fail(&format!("{e:#}"));
    }
    if !object.is_file() {
        fail(&format!("the eBPF build produced no {}", object.display()));
    }
}
