//! `bench`: tern's benchmarks, run through `cargo xtask bench NAME`.
//!
//! - `bench tracking --tern T --bin-dir D --out O [...]`: what dirty tracking
//!   costs a write-heavy workload (see `bench::tracking`).
//! - `bench floor`: the per-fault floor alone (first write to an async-WP page).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use bench::tracking::{Mode, Opts};

#[derive(Parser)]
#[command(name = "bench", about = "tern's benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Throughput of a write-heavy workload with and without tracking.
    Tracking {
        /// The tern binary.
        #[arg(long, default_value = "target/release/tern")]
        tern: PathBuf,
        /// Where the workload binaries (dirtier) are.
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        /// Output directory (tracking.json, tracking.svg, tmp/ for images).
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Resident sizes, MiB.
        #[arg(long, value_delimiter = ',', default_value = "1024,8192")]
        sizes: Vec<u64>,
        /// Fractions of the pages in the working set.
        #[arg(long, value_delimiter = ',', default_value = "0.01,0.1,0.5")]
        fracs: Vec<f64>,
        /// Modes: none, uffd-ebpf, uffd-noebpf, full.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "none,uffd-ebpf,uffd-noebpf,full"
        )]
        modes: Vec<String>,
        /// Windows per configuration (medians are taken over them).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Pre-dump rounds per window.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Time between the starts of two rounds, ms.
        #[arg(long, default_value_t = 100)]
        period_ms: u64,
        /// Full-copy rounds per window at sizes >= 4 GiB (each copies it all).
        #[arg(long, default_value_t = 1)]
        full_big_rounds: usize,
        /// Full-copy windows at sizes >= 4 GiB.
        #[arg(long, default_value_t = 1)]
        full_big_repeats: usize,
        /// Full-copy rounds per window at smaller sizes.
        #[arg(long, default_value_t = 3)]
        full_rounds: usize,
        /// A short run to check the plumbing: 256 MiB, 2 fractions, 2 windows
        /// of 4 rounds.
        #[arg(long)]
        quick: bool,
        /// Do not raise the priority (nice -20) of the workload and of tern.
        #[arg(long)]
        no_nice: bool,
    },
    /// Redraw the SVG of a tracking report: `bench plot target/bench/tracking.json`.
    Plot {
        json: PathBuf,
        /// Output SVG (default: the JSON's path with .svg).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Measure the async-WP first-write floor only.
    Floor {
        #[arg(long, default_value_t = 64)]
        mib: usize,
        #[arg(long, default_value_t = 7)]
        reps: usize,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Tracking {
            tern,
            bin_dir,
            out,
            mut sizes,
            mut fracs,
            modes,
            mut repeats,
            mut rounds,
            period_ms,
            full_big_rounds,
            full_big_repeats,
            mut full_rounds,
            quick,
            no_nice,
        } => {
            if quick {
                sizes = vec![256];
                fracs = vec![0.01, 0.1];
                repeats = 2;
                rounds = 4;
                full_rounds = 2;
            }
            let modes = modes
                .iter()
                .map(|m| Mode::parse(m).with_context(|| format!("unknown mode {m:?}")))
                .collect::<Result<Vec<_>>>()?;
            if !tern.exists() && modes.iter().any(|&m| m != Mode::None) {
                bail!(
                    "{} does not exist: build it first (cargo build --release)",
                    tern.display()
                );
            }
            bench::tracking::run(&Opts {
                tern,
                bin_dir,
                out,
                sizes_mib: sizes,
                fracs,
                modes,
                repeats,
                rounds,
                period_ms,
                full_big_rounds,
                full_big_repeats,
                full_rounds,
                nice: !no_nice,
            })
        }
        Cmd::Plot { json, out } => {
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("cannot read {}", json.display()))?;
            let report: serde_json::Value = serde_json::from_str(&text)?;
            let out = out.unwrap_or_else(|| json.with_extension("svg"));
            std::fs::write(&out, bench::svg::tracking_plot(&report))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Floor { mib, reps } => {
            let f = bench::uffd::measure_floor(mib, reps)?;
            println!(
                "{}",
                serde_json::json!({
                    "fault_us": f.fault_ns / 1e3,
                    "fault_min_us": f.fault_min_ns / 1e3,
                    "plain_write_ns": f.plain_ns,
                    "pages": f.pages,
                    "reps": f.reps,
                })
            );
            Ok(())
        }
    }
}
