//! The demo workload: `hotloop --mib N --hot-mib H [--drift-pages-per-ms D]
//! [--sleep-ms S] [--hot-at-end] [--report-ms R]`.
//!
//! Maps and fills N MiB (every 8th page stays zero), prints `ready ...`, then
//! forever: rewrites the hot set (the first H MiB, or the last H MiB with
//! `--hot-at-end`), advances a drift pointer by D pages through the rest,
//! and sleeps S ms (default 1; 0: no sleep, a busy loop). Never exits until
//! killed.
//!
//! With `--report-ms R` (R > 0) it prints its progress for the restore
//! benchmark, stamped with CLOCK_REALTIME (which a benchmark driver on the
//! same machine shares; CRIU shifts a restored process's monotonic clock,
//! see `bench::real_ns`):
//! - `progress T_NS SWEEPS PAGES` at most every R ms: the time and the
//!   running counts of hot-set sweeps and page writes (rates come from the
//!   differences between two lines);
//! - `resumed T_NS GAP_NS` when the clock jumped by more than 20 ms between
//!   two checks (one every 64 page writes): the process was stopped
//!   (frozen by a dump, then restored) and runs again; T_NS is the first
//!   check after the gap. Its throughput then says how fast the restored
//!   memory is.
//!
//! The hot set at the end of the memory is what separates a lazy restore
//! prefetching hot pages first from one prefetching in address order: the
//! latter reaches the hot set last.

use std::io::Write;
use std::time::Duration;

use bench::{PAGE, Region, arg, flag, real_ns};

/// Page writes between two clock checks.
const CHECK_EVERY: usize = 64;
/// A clock jump larger than this between two checks is a stop.
const GAP_NS: u64 = 20_000_000;

fn main() {
    let mib: usize = arg("--mib", 256);
    let hot_mib: usize = arg("--hot-mib", 8);
    let drift: usize = arg("--drift-pages-per-ms", 1);
    let sleep_ms: u64 = arg("--sleep-ms", 1);
    let report_ns: u64 = arg::<u64>("--report-ms", 0) * 1_000_000;
    let hot_at_end = flag("--hot-at-end");
    let region = Region::new(mib << 20).expect("mmap");
    region.fill(8);
    let pages = region.pages();
    let hot = ((hot_mib << 20) / PAGE).min(pages);
    // The hot set is [hot_start, hot_start + hot); the drift walks the rest.
    let hot_start = if hot_at_end { pages - hot } else { 0 };
    let (cold_start, cold_end) = if hot_at_end {
        (0, pages - hot)
    } else {
        (hot, pages)
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ready pid={} mib={mib} hot_mib={hot_mib}",
        std::process::id()
    )
    .expect("stdout");
    out.flush().expect("stdout");

    let mut sweep: u64 = 0;
    let mut written: u64 = 0;
    let mut cold = cold_start;
    let mut last_check = real_ns();
    let mut last_report = last_check;
    loop {
        sweep += 1;
        let offset = usize::try_from(sweep.wrapping_mul(64) % PAGE as u64).unwrap_or(0);
        for i in 0..hot {
            let p = hot_start + i;
            region.write(p, offset, sweep << 20 | p as u64);
            if report_ns != 0 && i % CHECK_EVERY == CHECK_EVERY - 1 {
                let now = real_ns();
                if now.saturating_sub(last_check) > GAP_NS {
                    // Unbuffered: the driver times the restore by this line.
                    let _ = writeln!(out, "resumed {now} {}", now - last_check);
                    let _ = out.flush();
                }
                last_check = now;
            }
        }
        written += hot as u64;
        for _ in 0..drift {
            if cold_end > cold_start {
                region.write(cold, offset, sweep);
                cold += 1;
                if cold >= cold_end {
                    cold = cold_start;
                }
                written += 1;
            }
        }
        if report_ns != 0 {
            let now = real_ns();
            if now - last_report >= report_ns {
                let _ = writeln!(out, "progress {now} {sweep} {written}");
                let _ = out.flush();
                last_report = now;
            }
        }
        if sleep_ms != 0 {
            std::thread::sleep(Duration::from_millis(sleep_ms));
            // A sleeping loop has gaps of its own: only a gap beyond the
            // sleep is a stop.
            last_check = real_ns();
        }
    }
}
