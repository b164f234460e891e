//! The tracking benchmark's workload: `dirtier --mib N [--frac F] [--progress-ms P]`.
//!
//! Maps and fills N MiB, prints `ready pid=<pid> pages=<n>`, then writes one
//! 8-byte word per page, as fast as it can, sweeping over a working set made of
//! the fraction F of its pages (spread over the whole region by a hash, visited
//! in address order). Every P ms it prints `p <CLOCK_MONOTONIC ns> <writes>`,
//! the running count of page writes, which is the throughput the benchmark
//! measures. A line `frac F` on stdin switches the working set (acknowledged
//! with `frac F pages <n>`); F = 0 idles; `quit` or EOF on stdin exits.
//!
//! `scan` on stdin is the benchmark's `kernel-wp` mode, the floor of tracking
//! for this very access pattern: the process tracks itself, with no tern. The
//! first `scan` registers the region with a userfaultfd in async
//! write-protect mode; every `scan` runs one PAGEMAP_SCAN that reports the
//! pages written since the previous one and write-protects them again (what
//! tern's uffd-wp backend does from outside), on the stdin thread, so from
//! another CPU than the writing one, and answers `scan <pages> <ns>`.
//! `unscan` closes the userfaultfd (the region is writable again).

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

use bench::uffd::AsyncWp;
use bench::{PAGE, Region, arg, mono_ns, unit_hash};
use tracker::pagemap_scan::{Pagemap, ScanQuery};

/// The in-process tracker of the `kernel-wp` mode.
struct SelfTracker {
    _wp: AsyncWp,
    pagemap: Pagemap,
    start: u64,
    end: u64,
    out: Vec<tracker::pagemap_scan::PageRegion>,
}

impl SelfTracker {
    fn new(start: u64, len: u64) -> std::io::Result<SelfTracker> {
        let wp = AsyncWp::over(start, len)?;
        let pagemap = Pagemap::open(std::process::id() as i32).map_err(std::io::Error::other)?;
        Ok(SelfTracker {
            _wp: wp,
            pagemap,
            start,
            end: start + len,
            out: Vec::new(),
        })
    }

    /// Pages written since the last scan (all pages, the first time), and
    /// write-protect them again.
    fn scan(&mut self) -> std::io::Result<u64> {
        self.out.clear();
        self.pagemap
            .scan(
                self.start,
                self.end,
                ScanQuery::WRITTEN_AND_REPROTECT,
                &mut self.out,
            )
            .map_err(std::io::Error::other)?;
        Ok(self
            .out
            .iter()
            .map(|r| (r.end - r.start) / PAGE as u64)
            .sum())
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

fn working_set(pages: usize, frac: f64) -> Vec<u32> {
    (0..u32::try_from(pages).unwrap_or(u32::MAX))
        .filter(|&p| unit_hash(u64::from(p)) < frac)
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
    let (start, len) = (region.addr() as u64, region.len() as u64);
    std::thread::spawn(move || {
        let mut tracker: Option<SelfTracker> = None;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match line.trim() {
                "scan" => {
                    let t = mono_ns();
                    let r = match tracker.as_mut() {
                        Some(tr) => tr.scan(),
                        None => SelfTracker::new(start, len).and_then(|mut tr| {
                            let n = tr.scan();
                            tracker = Some(tr);
                            n
                        }),
                    };
                    match r {
                        Ok(n) => say(&format!("scan {n} {}", mono_ns() - t)),
                        Err(e) => say(&format!("scan error {e}")),
                    }
                }
                "unscan" => {
                    tracker = None;
                    say("unscan");
                }
                _ => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send("quit".into());
    });

    say(&format!("ready pid={} pages={pages}", std::process::id()));

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
        say(&format!("p {now} {count}"));
        while let Ok(cmd) = rx.try_recv() {
            let mut words = cmd.split_whitespace();
            match (words.next(), words.next()) {
                (Some("frac"), Some(f)) => {
                    frac = f.parse().expect("frac F");
                    ws = working_set(pages, frac);
                    pos = 0;
                    say(&format!("frac {frac} pages {}", ws.len()));
                }
                (Some("quit"), _) => return,
                _ => eprintln!("dirtier: unknown command {cmd:?}"),
            }
        }
    }
}
