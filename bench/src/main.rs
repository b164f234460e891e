//! `bench`: tern's benchmarks, run through `cargo xtask bench NAME`.
//!
//! - `bench tracking --tern T --bin-dir D --out O [...]`: what dirty tracking
//!   costs a write-heavy workload (see `bench::tracking`).
//! - `bench dump`: frozen time of the final dump with and without pre-dumps,
//!   and restore time (see `bench::dump`).
//! - `bench restore`: eager and lazy restore, tern beside CRIU (see
//!   `bench::restore`).
//! - `bench migrate`: live migration between two network namespaces (see
//!   `bench::migrate`).
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
        /// Modes: none, kernel-wp, uffd-track, uffd-noebpf, uffd-ebpf, full.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "none,kernel-wp,uffd-track,uffd-noebpf,uffd-ebpf,full"
        )]
        modes: Vec<String>,
        /// Windows per configuration (medians are taken over them).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Time between the starts of two rounds, ms.
        #[arg(long, default_value_t = 100)]
        period_ms: u64,
        /// A window lasts at least this long, ms...
        #[arg(long, default_value_t = 1000)]
        window_ms: u64,
        /// ...and at least this many rounds (1 for full copies of >= 4 GiB)...
        #[arg(long, default_value_t = 2)]
        min_rounds: usize,
        /// ...and at most this many.
        #[arg(long, default_value_t = 10)]
        max_rounds: usize,
        /// Stop repeating windows once a fraction has taken this long, s.
        #[arg(long, default_value_t = 8.0)]
        frac_budget_s: f64,
        /// Length of an untracked window, ms.
        #[arg(long, default_value_t = 500)]
        baseline_ms: u64,
        /// Pass --no-compress to tern (the workload's pages compress well, and
        /// compressed images keep 8 GiB rounds off the disk).
        #[arg(long)]
        no_compress: bool,
        /// A short run to check the plumbing: 256 MiB, 2 fractions, 2
        /// windows of at least 0.5 s.
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
    /// Frozen and wall time of dumps (full, after 3 pre-dumps) and restore
    /// time, tern beside CRIU and the machine's floors.
    Dump {
        #[arg(long, default_value = "target/release/tern")]
        tern: PathBuf,
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// CRIU's command (`cargo xtask bench dump` fetches one).
        #[arg(long, conflicts_with = "no_criu")]
        criu: Option<PathBuf>,
        /// Run without CRIU; the reason goes into the report.
        #[arg(long, value_name = "WHY")]
        no_criu: Option<String>,
        /// Rounds per configuration (medians).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Only the 256 MiB configuration, once.
        #[arg(long)]
        quick: bool,
        /// Only the configuration of this resident size (256 or 4096).
        #[arg(long, value_name = "MIB")]
        mib: Option<u64>,
    },
    /// Eager and lazy restore of hotloop (256 MiB and 4 GiB), tern and CRIU.
    Restore {
        #[arg(long, default_value = "target/release/tern")]
        tern: PathBuf,
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// CRIU's command (`cargo xtask bench restore` fetches one).
        #[arg(long, conflicts_with = "no_criu")]
        criu: Option<PathBuf>,
        /// Run without CRIU; the reason goes into the report.
        #[arg(long, value_name = "WHY")]
        no_criu: Option<String>,
        /// Restores per mode (medians).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Only 256 MiB, one restore per mode.
        #[arg(long)]
        quick: bool,
    },
    /// Live migration between two network namespaces (see
    /// `bench::migrate`).
    Migrate {
        #[arg(long, default_value = "target/release/tern")]
        tern: PathBuf,
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// The workload's resident memory, MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Migrations per configuration (the median is shown).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// CRIU's command (`cargo xtask bench migrate` fetches one).
        #[arg(long, conflicts_with = "no_criu")]
        criu: Option<PathBuf>,
        /// Run without CRIU; the reason goes into the report.
        #[arg(long, value_name = "WHY")]
        no_criu: Option<String>,
    },
    /// Measure the async-WP first-write floor only.
    Floor {
        #[arg(long, default_value_t = 64)]
        mib: usize,
        #[arg(long, default_value_t = 7)]
        reps: usize,
    },
}

/// `--criu` or why CRIU does not run.
fn criu_or_why(
    criu: Option<PathBuf>,
    no_criu: Option<String>,
    bench: &str,
) -> std::result::Result<PathBuf, String> {
    match (criu, no_criu) {
        (Some(c), _) => Ok(c),
        (None, Some(why)) => Err(why),
        (None, None) => Err(format!(
            "no --criu given (`cargo xtask bench {bench}` fetches Debian trixie's)"
        )),
    }
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
            period_ms,
            mut window_ms,
            min_rounds,
            max_rounds,
            frac_budget_s,
            mut baseline_ms,
            no_compress,
            quick,
            no_nice,
        } => {
            if quick {
                sizes = vec![256];
                fracs = vec![0.01, 0.1];
                repeats = 2;
                window_ms = 500;
                baseline_ms = 300;
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
                period_ms,
                window_ms,
                min_rounds: min_rounds.max(1),
                max_rounds: max_rounds.max(1),
                frac_budget_s,
                baseline_ms,
                compress: !no_compress,
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
        Cmd::Dump {
            tern,
            bin_dir,
            out,
            criu,
            no_criu,
            repeats,
            quick,
            mib,
        } => {
            let mut configs = vec![(256, 16, 10), (4096, 64, 10)];
            let mut repeats = repeats.max(1);
            if quick {
                configs.truncate(1);
                repeats = 1;
            }
            if let Some(m) = mib {
                configs.retain(|c| c.0 == m);
                if configs.is_empty() {
                    bail!("bench dump: no configuration of {m} MiB (there are 256 and 4096)");
                }
            }
            bench::dump::run(&bench::dump::Opts {
                tern,
                bin_dir,
                out,
                criu: criu_or_why(criu, no_criu, "dump"),
                configs,
                repeats,
            })
        }
        Cmd::Restore {
            tern,
            bin_dir,
            out,
            criu,
            no_criu,
            repeats,
            quick,
        } => {
            let mut configs = vec![(256, 16), (4096, 64)];
            let mut repeats = repeats.max(1);
            if quick {
                configs.truncate(1);
                repeats = 1;
            }
            if !tern.exists() {
                bail!(
                    "{} does not exist: build it first (cargo build --release)",
                    tern.display()
                );
            }
            bench::restore::run(&bench::restore::Opts {
                tern,
                bin_dir,
                out,
                criu: criu_or_why(criu, no_criu, "restore"),
                configs,
                repeats,
            })
        }
        Cmd::Migrate {
            tern,
            bin_dir,
            out,
            mib,
            repeats,
            criu,
            no_criu,
        } => {
            bench::migrate::run(
                &tern,
                &bin_dir,
                &out,
                mib,
                repeats,
                criu_or_why(criu, no_criu, "migrate"),
            )?;
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
