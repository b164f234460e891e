//! The tracking benchmark's workload: `dirtier --mib N [--frac F] [--progress-ms P]`.
//!
//! Maps and fills N MiB, prints `ready pid=<pid> pages=<n>`, then writes one
//! 8-byte word per page, as fast as it can, sweeping over a working set made of
//! the fraction F of its pages (spread over the whole region by a hash, visited
//! in address order). Every P ms it prints `p <CLOCK_MONOTONIC ns> <writes>`,
//! the running count of page writes, which is the throughput the benchmark
//! measures. A line `frac F` on stdin switches the working set (acknowledged
//! with `frac F pages <n>`); F = 0 idles; `quit` or EOF on stdin exits.

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

use bench::{PAGE, Region, arg, mono_ns, unit_hash};

fn working_set(pages: usize, frac: f64) -> Vec<u32> {
    (0..pages as u32)
        .filter(|&p| unit_hash(p as u64) < frac)
        .collect()
}

fn main() {
    let mib: usize = arg("--mib", 1024);
    let mut frac: f64 = arg("--frac", 0.0);
    let progress_ns: u64 = arg::<u64>("--progress-ms", 5) * 1_000_000;
    let region = Region::new(mib << 20).expect("mmap");
    region.fill(0);
    let pages = region.pages();
    let mut ws = working_set(pages, frac);

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        let _ = tx.send("quit".into());
    });

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready pid={} pages={pages}", std::process::id()).expect("stdout");
    out.flush().expect("stdout");

    let mut count: u64 = 0;
    let mut next_print = mono_ns();
    let mut offset = 0usize;
    let mut pos = 0usize;
    loop {
        // Up to 1024 writes, resuming the sweep where the last batch stopped,
        // then a look at the clock.
        if ws.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        } else {
            let end = (pos + 1024).min(ws.len());
            for &p in &ws[pos..end] {
                region.write(p as usize, offset, count);
                count += 1;
            }
            pos = end;
            if pos == ws.len() {
                pos = 0;
                offset = (offset + 64) % PAGE;
            }
        }
        let now = mono_ns();
        if now < next_print {
            continue;
        }
        next_print = now + progress_ns;
        writeln!(out, "p {now} {count}").expect("stdout");
        out.flush().expect("stdout");
        while let Ok(cmd) = rx.try_recv() {
            let mut words = cmd.split_whitespace();
            match (words.next(), words.next()) {
                (Some("frac"), Some(f)) => {
                    frac = f.parse().expect("frac F");
                    ws = working_set(pages, frac);
                    pos = 0;
                    writeln!(out, "frac {frac} pages {}", ws.len()).expect("stdout");
                    out.flush().expect("stdout");
                }
                (Some("quit"), _) => return,
                _ => eprintln!("dirtier: unknown command {cmd:?}"),
            }
        }
    }
}
