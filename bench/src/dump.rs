//! `bench dump`: how long a dump holds the process frozen, tern beside CRIU
//! and beside the floors this machine sets, for a workload that keeps
//! rewriting a hot set (`hotloop`): 256 MiB with 16 MiB rewritten every
//! 10 ms, and 4 GiB with 64 MiB hot.
//!
//! Per configuration, `repeats` rounds, each running every variant once on a
//! fresh workload (interleaved, so that a slow minute of the machine hits
//! every variant alike), then the floors:
//! - tern: a full dump (no pre-dump: every page copied while frozen, as
//!   `tern dump` without a parent does); 3 pre-dumps then `--live-rounds 0`
//!   (the pages written since the last pre-dump copied while frozen); 3
//!   pre-dumps then a plain dump (its live rounds first: the default way).
//!   Each dump is restored (`tern restore --detach`, its eager fill by
//!   `UFFDIO_COPY`) and checked to run; the full dump is restored once more
//!   with `--fill write` (`process_vm_writev` into fresh memory), the
//!   other way tern keeps.
//! - CRIU (Debian trixie's, when given): `criu dump` (a full dump: its
//!   `pre-dump --track-mem` needs soft-dirty, which this kernel lacks; the
//!   report gives its error) and `criu restore -d`, with `--display-stats`.
//! - The full dump's floor: the resident pages of the frozen workload read
//!   with `process_vm_readv` into pre-faulted buffers (one thread), plus
//!   their writing over cached pages of a file; both timed on their own.
//! - The restore's floor: `UFFDIO_COPY` of the same size into missing
//!   memory, in 2 MiB copies from a source in memory (one thread).
//!
//! Figures per dump: `frozen_ms` (tern's own; CRIU's `Frozen time`), the
//! wall time of the command, tern's `fsync_ms` (after the target is gone;
//! CRIU does not fsync) and `frozen_parts`; per restore the tool's figure
//! (tern's `restore_ms`, CRIU's `Restore time`) and the wall time until the
//! command returned. Medians; `target/bench/dump.json` and a table.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use tracker::maps::VmaPolicy;

use crate::run::{
    criu_stat_ms, criu_version, kill, run_deadline, spawn_until_ready, tern_json, wait_gone,
};
use crate::uffd::median;

pub struct Opts {
    pub tern: PathBuf,
    pub bin_dir: PathBuf,
    pub out: PathBuf,
    /// CRIU's command (a script that runs it), or why there is none.
    pub criu: std::result::Result<PathBuf, String>,
    /// (resident MiB, hot MiB, sleep between rewrites in ms)
    pub configs: Vec<(u64, u64, u64)>,
    pub repeats: usize,
}

/// Deadline of one dump or restore (4 GiB: seconds).
const DEADLINE: Duration = Duration::from_secs(120);
/// The restore floor's copy size: as large a batch as a restore would use.
const UFFD_FLOOR_CHUNK: usize = 2 << 20;
/// The dump floor's buffer: pre-faulted once, reused for every batch.
const READ_FLOOR_BUF: usize = 4 << 20;

/// What each round runs, in this order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    TernFull,
    TernPre3Frozen,
    TernPre3,
    Criu,
}

const VARIANTS: [Variant; 4] = [
    Variant::TernFull,
    Variant::TernPre3Frozen,
    Variant::TernPre3,
    Variant::Criu,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::TernFull => "tern full dump",
            Variant::TernPre3Frozen => "tern 3 pre-dumps + --live-rounds 0",
            Variant::TernPre3 => "tern 3 pre-dumps + dump",
            Variant::Criu => "CRIU dump",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Variant::TernFull => "tern_full",
            Variant::TernPre3Frozen => "tern_pre3_frozen",
            Variant::TernPre3 => "tern_pre3",
            Variant::Criu => "criu",
        }
    }

    fn pre_dumps(self) -> usize {
        match self {
            Variant::TernPre3Frozen | Variant::TernPre3 => 3,
            _ => 0,
        }
    }

    fn live_rounds(self) -> Option<usize> {
        match self {
            Variant::TernPre3Frozen => Some(0),
            _ => None,
        }
    }
}

/// A hotloop of one configuration, our child, in its own session (see
/// `spawn_until_ready`); killed on drop.
struct Hotloop {
    child: Child,
    pid: i32,
}

impl Drop for Hotloop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_hotloop(opts: &Opts, work: &Path, cfg: (u64, u64, u64)) -> Result<Hotloop> {
    let (mib, hot, sleep) = cfg;
    let log_path = work.join("hotloop.out");
    let log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = Command::new(opts.bin_dir.join("hotloop"));
    cmd.args([
        "--mib",
        &mib.to_string(),
        "--hot-mib",
        &hot.to_string(),
        "--drift-pages-per-ms",
        "0",
        "--sleep-ms",
        &sleep.to_string(),
    ])
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    let (child, pid) = spawn_until_ready(&mut cmd, &log_path, DEADLINE)?;
    Ok(Hotloop { child, pid })
}

/// The restored process runs: still there 200 ms after its restore
/// returned. Then it is killed and its PID awaited free.
fn check_runs_then_kill(pid: i32, who: &str) -> Result<()> {
    std::thread::sleep(Duration::from_millis(200));
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false);
    kill(pid);
    wait_gone(pid, Duration::from_secs(10))?;
    if !alive {
        bail!("the hotloop {who} restored (PID {pid}) is not running");
    }
    Ok(())
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One tern run of `v`: pre-dumps, the dump, its restore.
fn tern_run(opts: &Opts, work: &Path, cfg: (u64, u64, u64), v: Variant) -> Result<Value> {
    let h = start_hotloop(opts, work, cfg)?;
    let pid = h.pid;
    let mut prev: Option<PathBuf> = None;
    for i in 0..v.pre_dumps() {
        let d = work.join(format!("pre{i}"));
        let mut a = vec![
            "pre-dump".to_string(),
            "-t".into(),
            pid.to_string(),
            "-D".into(),
            d.display().to_string(),
            "--json".into(),
        ];
        if let Some(p) = &prev {
            a.extend(["--prev-images-dir".into(), p.display().to_string()]);
        }
        tern_json(&opts.tern, &a)?;
        prev = Some(d);
        std::thread::sleep(Duration::from_millis(100));
    }
    let d = work.join("dump");
    let mut a = vec![
        "dump".to_string(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        d.display().to_string(),
        "--json".into(),
    ];
    if let Some(p) = &prev {
        a.extend(["--prev-images-dir".into(), p.display().to_string()]);
    }
    if let Some(n) = v.live_rounds() {
        a.extend(["--live-rounds".into(), n.to_string()]);
    }
    let t = Instant::now();
    let dump = tern_json(&opts.tern, &a);
    let dump_wall_ms = ms_since(t);
    // Reap the killed original (or kill it if the dump failed).
    drop(h);
    let dump = dump?;
    let t = Instant::now();
    let restore = tern_json(
        &opts.tern,
        &[
            "restore".into(),
            "-D".into(),
            d.display().to_string(),
            "--detach".into(),
            "--json".into(),
        ],
    )?;
    let restore_wall_ms = ms_since(t);
    check_runs_then_kill(pid, "tern")?;
    // The full dump restored again with the eager fill's other way
    // (`process_vm_writev` into fresh memory), for the side-by-side.
    let restore_write_ms = if v == Variant::TernFull {
        let r = tern_json(
            &opts.tern,
            &[
                "restore".into(),
                "-D".into(),
                d.display().to_string(),
                "--detach".into(),
                "--fill".into(),
                "write".into(),
                "--json".into(),
            ],
        )?;
        check_runs_then_kill(pid, "tern --fill write")?;
        r["restore_ms"].clone()
    } else {
        Value::Null
    };
    Ok(json!({
        "frozen_ms": dump["frozen_ms"],
        "dump_wall_ms": dump_wall_ms,
        "fsync_ms": dump["fsync_ms"],
        "pages_written": dump["pages_written"],
        "live_rounds": dump["live_rounds"].as_array().map_or(0, |a| a.len()),
        "frozen_parts": dump["frozen_parts"],
        "restore_ms": restore["restore_ms"],
        "restore_wall_ms": restore_wall_ms,
        "restore_fill": restore["fill"],
        "restore_write_ms": restore_write_ms,
    }))
}

/// One CRIU run: `criu dump`, then `criu restore -d`.
fn criu_run(criu: &Path, opts: &Opts, work: &Path, cfg: (u64, u64, u64)) -> Result<Value> {
    let h = start_hotloop(opts, work, cfg)?;
    let pid = h.pid;
    let dir = work.join("criu");
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let out = run_deadline(
        Command::new(criu)
            .args(["dump", "-t", &pid.to_string(), "-D"])
            .arg(&dir)
            .args(["-o", "dump.log", "-v2", "--display-stats"]),
        "criu dump",
        DEADLINE,
    );
    let dump_wall_ms = ms_since(t);
    drop(h);
    let out = out?;
    if !out.status.success() {
        bail!(
            "`criu dump -t {pid}` failed ({}): {}; see {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            dir.join("dump.log").display()
        );
    }
    let stats = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    let r = run_deadline(
        Command::new(criu).args(["restore", "-D"]).arg(&dir).args([
            "-d",
            "--display-stats",
            "-o",
            "restore.log",
            "-v2",
        ]),
        "criu restore",
        DEADLINE,
    )?;
    let restore_wall_ms = ms_since(t);
    if !r.status.success() {
        bail!(
            "`criu restore -D {}` failed ({}): {}; see {}",
            dir.display(),
            r.status,
            String::from_utf8_lossy(&r.stderr).trim(),
            dir.join("restore.log").display()
        );
    }
    let rstats = format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    check_runs_then_kill(pid, "CRIU")?;
    let stat = |text: &str, name: &str| json!(criu_stat_ms(text, name));
    Ok(json!({
        "frozen_ms": stat(&stats, "Frozen time"),
        "dump_wall_ms": dump_wall_ms,
        "fsync_ms": Value::Null,
        "freezing_ms": stat(&stats, "Freezing time"),
        "memory_dump_ms": stat(&stats, "Memory dump time"),
        "memory_write_ms": stat(&stats, "Memory write time"),
        "restore_ms": stat(&rstats, "Restore time"),
        "restore_wall_ms": restore_wall_ms,
    }))
}

/// What `criu pre-dump --track-mem` says on this kernel (once).
fn criu_pre_dump(criu: &Path, opts: &Opts, work: &Path, cfg: (u64, u64, u64)) -> Result<String> {
    let h = start_hotloop(opts, work, cfg)?;
    let dir = work.join("criu-pre");
    std::fs::create_dir_all(&dir)?;
    let out = run_deadline(
        Command::new(criu)
            .args(["pre-dump", "-t", &h.pid.to_string(), "-D"])
            .arg(&dir)
            .args(["--track-mem", "-o", "pre-dump.log", "-v2"]),
        "criu pre-dump",
        DEADLINE,
    )?;
    drop(h);
    if out.status.success() {
        return Ok("criu pre-dump --track-mem succeeded".into());
    }
    // Its log's error lines say why.
    let log = std::fs::read_to_string(dir.join("pre-dump.log")).unwrap_or_default();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") || l.contains("rror ("))
        .take(3)
        .collect();
    Ok(format!(
        "criu pre-dump --track-mem failed ({}): {}",
        out.status,
        if errors.is_empty() {
            String::from_utf8_lossy(&out.stderr).trim().to_string()
        } else {
            errors.join(" | ")
        }
    ))
}

/// The full dump's floor on this workload, frozen (SIGSTOP): its resident
/// pages (pagemap: present) read into a pre-faulted buffer, then written
/// over cached pages of a file (a first pass brings them into the cache).
fn dump_floor(opts: &Opts, work: &Path, cfg: (u64, u64, u64)) -> Result<Value> {
    let h = start_hotloop(opts, work, cfg)?;
    let pid = h.pid;
    kill_with(pid, libc::SIGSTOP);
    let t = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_default()
        .contains(") T ")
    {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("hotloop (PID {pid}) did not stop within 10 s of SIGSTOP");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let ranges = resident_ranges(pid)?;
    let bytes: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    let file = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(work.join("floor.img"))?;
    let mut buf = vec![1u8; READ_FLOOR_BUF];
    let mut passes = Vec::new();
    for _ in 0..2 {
        let (mut read, mut write) = (Duration::ZERO, Duration::ZERO);
        let mut off = 0u64;
        for batch in batches(&ranges, READ_FLOOR_BUF) {
            let t = Instant::now();
            let got = read_batch(pid, &batch, &mut buf)?;
            read += t.elapsed();
            let t = Instant::now();
            file.write_all_at(&buf[..got], off)?;
            write += t.elapsed();
            off += got as u64;
        }
        passes.push((read, write));
    }
    drop(h);
    let _ = std::fs::remove_file(work.join("floor.img"));
    let (read, write) = passes[1];
    let (read_ms, write_ms) = (read.as_secs_f64() * 1e3, write.as_secs_f64() * 1e3);
    Ok(json!({
        "bytes": bytes,
        "read_ms": read_ms,
        "write_ms": write_ms,
        "floor_ms": read_ms + write_ms,
    }))
}

fn kill_with(pid: i32, sig: i32) {
    // SAFETY: a signal to our own workload child.
    unsafe { libc::kill(pid, sig) };
}

/// The present pages of `pid`'s memory that tern copies, as
/// `(start, end)` address ranges.
fn resident_ranges(pid: i32) -> Result<Vec<(u64, u64)>> {
    let vmas = tracker::maps::read_vmas(pid).with_context(|| format!("maps of PID {pid}"))?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut entries = Vec::new();
    for v in vmas.iter().filter(|v| v.is_dumped() && v.perms.read) {
        let pages = usize::try_from((v.end - v.start) / crate::PAGE as u64)?;
        sys::pagemap::read_entries(&pagemap, v.start, pages, &mut entries)?;
        let file_is_hole = v.file_pages_are_holes();
        for (i, &e) in entries.iter().enumerate() {
            use sys::pagemap::entry::{FILE_OR_SHARED_ANON, PRESENT};
            // A private file mapping's page-cache pages are not copied (the
            // file holds them), as in tern's dump.
            if e & PRESENT == 0 || (file_is_hole && e & FILE_OR_SHARED_ANON != 0) {
                continue;
            }
            let a = v.start + (i * crate::PAGE) as u64;
            match out.last_mut() {
                Some(last) if last.1 == a => last.1 += crate::PAGE as u64,
                _ => out.push((a, a + crate::PAGE as u64)),
            }
        }
    }
    Ok(out)
}

/// `ranges` cut into batches of at most `max` bytes.
fn batches(ranges: &[(u64, u64)], max: usize) -> Vec<Vec<(u64, u64)>> {
    let max = max as u64;
    let mut out = Vec::new();
    let mut cur: Vec<(u64, u64)> = Vec::new();
    let mut len = 0;
    for &(mut s, e) in ranges {
        while s < e {
            let n = (e - s).min(max - len);
            cur.push((s, s + n));
            len += n;
            s += n;
            if len == max {
                out.push(std::mem::take(&mut cur));
                len = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// One `process_vm_readv` of `batch` into `buf`; the bytes read.
fn read_batch(pid: i32, batch: &[(u64, u64)], buf: &mut [u8]) -> Result<usize> {
    let remote: Vec<libc::iovec> = batch
        .iter()
        .map(|&(s, e)| libc::iovec {
            iov_base: sys::usize_of(s) as *mut libc::c_void,
            iov_len: sys::usize_of(e - s),
        })
        .collect();
    let want: usize = remote.iter().map(|r| r.iov_len).sum();
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: want,
    };
    // SAFETY: `local` lies within `buf` (a batch is at most its length);
    // the remote iovecs name another process's memory, which the kernel
    // checks.
    let n =
        unsafe { libc::process_vm_readv(pid, &local, 1, remote.as_ptr(), remote.len() as _, 0) };
    if n < 0 {
        bail!(
            "process_vm_readv of PID {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let n = usize::try_from(n)?;
    if n != want {
        bail!("process_vm_readv of PID {pid} read {n} of {want} bytes");
    }
    Ok(n)
}

/// `UFFDIO_COPY` of `mib` MiB into missing memory in 2 MiB copies: ms.
fn restore_floor(mib: u64) -> Result<Value> {
    let f = crate::uffd::measure_copy_floor(usize::try_from(mib)?, UFFD_FLOOR_CHUNK, 1)
        .context("measuring the UFFDIO_COPY floor")?;
    Ok(json!({
        "mib": mib,
        "chunk_kib": f.chunk_kib,
        "mb_s": f.mb_s,
        "floor_ms": (mib << 20) as f64 / f.mb_s / 1e3,
    }))
}

/// Median of `field` over `runs` (numbers only).
fn med(runs: &[Value], field: &str) -> f64 {
    med_of(runs, |r| r[field].as_f64())
}

/// Median of what `f` finds in each of `runs`.
fn med_of(runs: &[Value], f: impl Fn(&Value) -> Option<f64>) -> f64 {
    let mut xs: Vec<f64> = runs.iter().filter_map(f).collect();
    median(&mut xs)
}

/// Median of each `frozen_parts` field over `runs`.
fn parts_medians(runs: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(first) = runs.first().and_then(|r| r["frozen_parts"].as_object()) {
        for k in first.keys() {
            let mut xs: Vec<f64> = runs
                .iter()
                .filter_map(|r| r["frozen_parts"][k].as_f64())
                .collect();
            out.insert(k.clone(), json!(median(&mut xs)));
        }
    }
    Value::Object(out)
}

fn config(
    opts: &Opts,
    cfg: (u64, u64, u64),
    started: Instant,
    pre_dump_note: &mut Option<String>,
) -> Result<Value> {
    let (mib, hot, every) = cfg;
    let work = opts.out.join("tmp-dump");
    let mut runs: Vec<(Variant, Vec<Value>)> = VARIANTS.iter().map(|&v| (v, Vec::new())).collect();
    let (mut dump_floors, mut restore_floors) = (Vec::new(), Vec::new());
    let fresh = || -> Result<()> {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        Ok(())
    };
    for round in 0..opts.repeats {
        for (v, rs) in &mut runs {
            fresh()?;
            let r = match v {
                Variant::Criu => match &opts.criu {
                    Ok(criu) => criu_run(criu, opts, &work, cfg),
                    Err(_) => continue,
                },
                _ => tern_run(opts, &work, cfg, *v),
            }
            .with_context(|| format!("{mib} MiB / {hot} MiB hot: {}, round {round}", v.name()))?;
            eprintln!(
                "[{:6.1}s] {mib} MiB, {hot} MiB hot every {every} ms: {}: frozen {:.1} ms, dump {:.0} ms wall, restore {:.1} ms ({:.0} ms wall)",
                started.elapsed().as_secs_f64(),
                v.name(),
                r["frozen_ms"].as_f64().unwrap_or(f64::NAN),
                r["dump_wall_ms"].as_f64().unwrap_or(f64::NAN),
                r["restore_ms"].as_f64().unwrap_or(f64::NAN),
                r["restore_wall_ms"].as_f64().unwrap_or(f64::NAN),
            );
            rs.push(r);
        }
        fresh()?;
        let d = dump_floor(opts, &work, cfg).context("the dump floor")?;
        let r = restore_floor(mib)?;
        eprintln!(
            "[{:6.1}s] {mib} MiB floors: dump {:.1} ms (read {:.1} + write {:.1} of {} MiB resident), restore (UFFDIO_COPY) {:.1} ms",
            started.elapsed().as_secs_f64(),
            d["floor_ms"].as_f64().unwrap_or(f64::NAN),
            d["read_ms"].as_f64().unwrap_or(f64::NAN),
            d["write_ms"].as_f64().unwrap_or(f64::NAN),
            d["bytes"].as_u64().unwrap_or(0) >> 20,
            r["floor_ms"].as_f64().unwrap_or(f64::NAN),
        );
        dump_floors.push(d);
        restore_floors.push(r);
    }
    if pre_dump_note.is_none()
        && let Ok(criu) = &opts.criu
    {
        fresh()?;
        *pre_dump_note = Some(criu_pre_dump(criu, opts, &work, cfg)?);
    }
    let _ = std::fs::remove_dir_all(&work);
    let mut variants = serde_json::Map::new();
    for (v, rs) in &runs {
        if rs.is_empty() {
            continue;
        }
        let mut m = json!({
            "name": v.name(),
            "frozen_ms": med(rs, "frozen_ms"),
            "dump_wall_ms": med(rs, "dump_wall_ms"),
            "restore_ms": med(rs, "restore_ms"),
            "restore_wall_ms": med(rs, "restore_wall_ms"),
            "runs": rs,
        });
        if *v == Variant::Criu {
            m["fsync_ms"] = Value::Null;
        } else {
            m["fsync_ms"] = json!(med(rs, "fsync_ms"));
            m["pages_written"] = json!(med(rs, "pages_written"));
            m["frozen_parts"] = parts_medians(rs);
            m["restore_fill_ms"] = json!(med_of(rs, |r| r["restore_fill"]["ms"].as_f64()));
        }
        if *v == Variant::TernFull {
            m["restore_write_ms"] = json!(med(rs, "restore_write_ms"));
        }
        variants.insert(v.key().into(), m);
    }
    let dump_floor_ms = med(&dump_floors, "floor_ms");
    let restore_floor_ms = med(&restore_floors, "floor_ms");
    let get = |k: &str, f: &str| variants.get(k).and_then(|v| v[f].as_f64());
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    };
    let ratios = json!({
        "full_dump_frozen_vs_floor": ratio(get("tern_full", "frozen_ms"), Some(dump_floor_ms)),
        "restore_vs_uffdio_copy_floor": ratio(get("tern_full", "restore_ms"), Some(restore_floor_ms)),
        "restore_fill_write_vs_uffdio_copy_floor": ratio(get("tern_full", "restore_write_ms"), Some(restore_floor_ms)),
        "tern_full_vs_criu_frozen": ratio(get("tern_full", "frozen_ms"), get("criu", "frozen_ms")),
        "tern_full_vs_criu_dump_wall": ratio(get("tern_full", "dump_wall_ms"), get("criu", "dump_wall_ms")),
        "tern_pre3_vs_criu_frozen": ratio(get("tern_pre3", "frozen_ms"), get("criu", "frozen_ms")),
        "tern_vs_criu_restore_wall": ratio(get("tern_full", "restore_wall_ms"), get("criu", "restore_wall_ms")),
    });
    Ok(json!({
        "resident_mib": mib,
        "hot_mib": hot,
        "rewrite_every_ms": every,
        "repeats": opts.repeats,
        "variants": variants,
        "dump_floor": {"floor_ms": dump_floor_ms, "read_ms": med(&dump_floors, "read_ms"), "write_ms": med(&dump_floors, "write_ms"), "runs": dump_floors},
        "restore_floor": {"floor_ms": restore_floor_ms, "chunk_kib": UFFD_FLOOR_CHUNK >> 10, "runs": restore_floors},
        "ratios": ratios,
    }))
}

pub fn run(opts: &Opts) -> Result<()> {
    std::fs::create_dir_all(&opts.out)?;
    if !opts.tern.exists() {
        bail!(
            "{} does not exist: build it first (cargo build --release)",
            opts.tern.display()
        );
    }
    // Restored processes whose restorer exits (criu restore -d, tern
    // restore --detach) become our children: reaped here, so that the next
    // run finds the PID free without waiting for PID 1.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let started = Instant::now();
    let criu_note = match &opts.criu {
        Ok(c) => format!(
            "CRIU: {} ({}); full dumps (its pre-dump needs soft-dirty: see criu_pre_dump); frozen_ms is its --display-stats `Frozen time`, restore_ms its `Restore time`; CRIU does not fsync its images",
            c.display(),
            criu_version(c)
        ),
        Err(why) => format!("CRIU not run: {why}"),
    };
    eprintln!("{criu_note}");
    let mut pre_dump_note = None;
    let mut results = Vec::new();
    for &cfg in &opts.configs {
        results.push(config(opts, cfg, started, &mut pre_dump_note)?);
    }
    let report = json!({
        "benchmark": "dump",
        "machine": crate::tracking::machine(),
        "criu": criu_note,
        "criu_pre_dump": pre_dump_note,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "results": results,
    });
    let path = opts.out.join("dump.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    print_tables(&report);
    println!("{criu_note}");
    if let Some(n) = report["criu_pre_dump"].as_str() {
        println!("{n}");
    }
    println!("wrote {}", path.display());
    Ok(())
}

fn print_tables(report: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    // Small ratios (0.0044) keep two significant figures.
    let r2 = |v: &Value| {
        v.as_f64().map_or("-".to_string(), |x| {
            if x.abs() < 0.1 {
                format!("{x:.4}")
            } else {
                format!("{x:.2}")
            }
        })
    };
    println!(
        "\n| workload | dump | frozen ms | dump wall ms | fsync ms | restore ms | restore wall ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in report["results"].as_array().into_iter().flatten() {
        let w = format!("{} MiB / {} MiB hot", r["resident_mib"], r["hot_mib"]);
        for v in VARIANTS {
            let m = &r["variants"][v.key()];
            if m.is_null() {
                continue;
            }
            println!(
                "| {w} | {} | {} | {} | {} | {} | {} |",
                v.name(),
                f(&m["frozen_ms"]),
                f(&m["dump_wall_ms"]),
                f(&m["fsync_ms"]),
                f(&m["restore_ms"]),
                f(&m["restore_wall_ms"]),
            );
        }
        let full = &r["variants"]["tern_full"];
        if !full.is_null() {
            println!(
                "| {w} | tern full dump, restored with --fill write | - | - | - | {} | - |",
                f(&full["restore_write_ms"]),
            );
        }
        println!(
            "| {w} | floor: read + write resident / UFFDIO_COPY | {} | - | - | {} | - |",
            f(&r["dump_floor"]["floor_ms"]),
            f(&r["restore_floor"]["floor_ms"]),
        );
    }
    println!(
        "\n| workload | full dump frozen / floor | restore / floor | tern full / CRIU frozen | tern full / CRIU dump wall | tern 3 pre-dumps / CRIU frozen | tern / CRIU restore wall |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in report["results"].as_array().into_iter().flatten() {
        let x = &r["ratios"];
        println!(
            "| {} MiB / {} MiB hot | {} | {} | {} | {} | {} | {} |",
            r["resident_mib"],
            r["hot_mib"],
            r2(&x["full_dump_frozen_vs_floor"]),
            r2(&x["restore_vs_uffdio_copy_floor"]),
            r2(&x["tern_full_vs_criu_frozen"]),
            r2(&x["tern_full_vs_criu_dump_wall"]),
            r2(&x["tern_pre3_vs_criu_frozen"]),
            r2(&x["tern_vs_criu_restore_wall"]),
        );
    }
    println!(
        "\nWhere tern's frozen window went (medians, ms; state and checks beside scan + copy):"
    );
    // The parts in the order they run (tern's own list), then those beside.
    let parts: Vec<String> = tracker::dump::FrozenParts::default()
        .sequential()
        .iter()
        .map(|(name, _)| (*name).to_string())
        .chain(["state".to_string(), "checks".to_string()])
        .collect();
    println!("| workload | dump | {} |", parts.join(" | "));
    println!("|---|---|{}", "---|".repeat(parts.len()));
    for r in report["results"].as_array().into_iter().flatten() {
        for v in VARIANTS {
            let frozen = &r["variants"][v.key()]["frozen_parts"];
            if frozen.is_null() {
                continue;
            }
            println!(
                "| {} MiB | {} | {} |",
                r["resident_mib"],
                v.name(),
                parts
                    .iter()
                    .map(|p| f(&frozen[format!("{p}_ms").as_str()]))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cut_ranges_at_the_buffer_size() {
        let b = batches(&[(0, 3), (10, 15), (20, 21)], 4);
        assert_eq!(
            b,
            vec![vec![(0, 3), (10, 11)], vec![(11, 15)], vec![(20, 21)]]
        );
        assert!(batches(&[], 4).is_empty());
    }
}
