//! The demo workload: `hotloop --mib N --hot-mib H [--drift-pages-per-ms D] [--sleep-ms S]`.
//!
//! Maps and fills N MiB (every 8th page stays zero), prints `ready ...`, then
//! forever: rewrites the first H MiB (the hot set), advances a drift pointer
//! by D pages through the rest, and sleeps S ms (default 1). Never exits
//! until killed.

use std::io::Write;
use std::time::Duration;

use bench::{PAGE, Region, arg};

fn main() {
    let mib: usize = arg("--mib", 256);
    let hot_mib: usize = arg("--hot-mib", 8);
    let drift: usize = arg("--drift-pages-per-ms", 1);
    let sleep_ms: u64 = arg("--sleep-ms", 1);
    let region = Region::new(mib << 20).expect("mmap");
    region.fill(8);
    let pages = region.pages();
    let hot = ((hot_mib << 20) / PAGE).min(pages);
    println!(
        "ready pid={} mib={mib} hot_mib={hot_mib}",
        std::process::id()
    );
    std::io::stdout().flush().expect("stdout");

    let mut sweep: u64 = 0;
    let mut cold = hot;
    loop {
        sweep += 1;
        let offset = usize::try_from(sweep.wrapping_mul(64) % PAGE as u64).unwrap_or(0);
        for p in 0..hot {
            region.write(p, offset, sweep << 20 | p as u64);
        }
        for _ in 0..drift {
            if pages > hot {
                region.write(cold, offset, sweep);
                cold += 1;
                if cold >= pages {
                    cold = hot;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(sleep_ms));
    }
}
