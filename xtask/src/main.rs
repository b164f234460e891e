//! Developer entry points for tern: `cargo xtask setup|test|demo|bench`.
//!
//! Every command but `setup` runs `setup` first, so that a fresh Debian
//! bookworm machine (root, stable and nightly rustup toolchains) needs nothing
//! else than `cargo xtask demo` or `cargo xtask test`.

mod criu;
mod debian;
mod demo;
mod demo_migrate;
mod setup;
mod util;
mod vm;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tern's developer commands")]
struct Cli {
    /// Say what setup checks, not only what it changes.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages, nightly rust-src, bpf-linker,
    /// tracefs/bpffs mounts. Quiet when everything is present.
    Setup,
    /// Build the workspace, then run every test (as root), then (without
    /// arguments) the VM lanes `x86-softdirty` and `arm64`. Arguments after
    /// `--` go to `cargo test`.
    Test {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build release, start a workload and checkpoint it with `tern pre-dump`
    /// rounds until the dirty set converges; print a summary.
    Demo(demo::DemoArgs),
    /// Run a benchmark: `tracking` (what dirty tracking costs a workload),
    /// `dump` (frozen time of the final dump), `restore` (eager and lazy
    /// restore, CRIU's beside them), `vm-criu` (CRIU and tern side by side
    /// in the 6.1 guest).
    /// Arguments after the name go to the benchmark (`--quick`, ...).
    Bench {
        /// Which benchmark.
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot another kernel under qemu (TCG) with tern inside and run a lane
    /// of tests there: `x86-softdirty` (Debian's 6.1, soft-dirty backend),
    /// `arm64` (Debian trixie's 6.12 on an emulated arm64 CPU with pointer
    /// authentication, uffd-wp backend).
    VmTest {
        /// Which lane.
        lane: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let setup = setup::Setup {
        verbose: cli.verbose,
    };
    setup.run()?;
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::Test { args } => test(&args),
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Bench { name, args } => bench(&name, &args),
        Cmd::VmTest { lane } => vm::run(&lane),
    }
}

/// Build everything first (the integration tests run `target/ci/tern`),
/// then run every test with cargo's plain output, which ends each test binary
/// with a `test result:` line.
///
/// "Everything" is the workspace's default members: all crates but
/// `tracker-ebpf`, which only builds for `bpfel-unknown-none` and is compiled
/// (with the nightly toolchain) by `tracker`'s build script. The profile is
/// [`util::TEST_PROFILE`]: optimized, so the x86 lane's guest runs this same
/// build instead of a second one (it was ~5 of the suite's ~30 minutes).
fn test(args: &[String]) -> Result<()> {
    let profile = util::TEST_PROFILE;
    eprintln!("xtask: cargo build --profile {profile}");
    util::run(util::cargo().args(["build", "--profile", profile]))?;
    eprintln!("xtask: cargo test --profile {profile} --no-fail-fast");
    let tests = util::run(
        util::cargo()
            .args(["test", "--profile", profile, "--no-fail-fast"])
            .args(args),
    )
    .map_err(|e| anyhow::anyhow!("tests failed: {e:#}"));
    // The VM lanes (other kernels and arm64 under qemu) with the whole
    // suite only, not with a filter. Each runs even if another failed.
    let lanes = if args.is_empty() {
        vm::run_all()
    } else {
        Vec::new()
    };
    tests?;
    if !lanes.is_empty() {
        anyhow::bail!(
            "VM lane(s) failed: {} (their output is above)",
            lanes.join(", ")
        );
    }
    Ok(())
}

fn bench(name: &str, args: &[String]) -> Result<()> {
    match name {
        "tracking" | "dump" | "restore" | "migrate" => {}
        "vm-criu" => return vm::bench_criu(),
        other => {
            bail!("unknown benchmark `{other}`; known: tracking, dump, restore, migrate, vm-criu")
        }
    }
    // `bench dump` and `bench restore` run CRIU beside tern: Debian
    // trixie's, fetched under target/criu/. Without it the benchmark runs
    // tern alone and its report says why.
    let mut criu_args: Vec<std::ffi::OsString> = Vec::new();
    if name == "restore" || name == "dump" || name == "migrate" {
        match criu::fetch() {
            Ok(criu) => criu_args.extend(["--criu".into(), criu.into_os_string()]),
            Err(e) => {
                let why = format!("CRIU could not be fetched: {e:#}");
                eprintln!("xtask: {why}; the benchmark runs without it");
                criu_args.extend(["--no-criu".into(), why.into()]);
            }
        }
    }
    eprintln!("xtask: cargo build --release (tern, bench)");
    util::run(util::cargo().args(["build", "--release", "-p", "tern", "-p", "bench"]))?;
    let release = util::target_dir().join("release");
    let out = util::target_dir().join("bench");
    util::run(
        util::command(release.join("bench").to_str().expect("utf-8 path"), [name])
            .arg("--tern")
            .arg(release.join("tern"))
            .arg("--bin-dir")
            .arg(&release)
            .arg("--out")
            .arg(&out)
            .args(criu_args)
            .args(args)
            .current_dir(util::root()),
    )
}
