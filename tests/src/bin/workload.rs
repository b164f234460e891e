//! A controllable checkpoint target.
//!
//! Reads one command per line on stdin and answers one JSON line on stdout:
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Between commands it is
//! idle (blocked in read(2) on stdin), so its memory does not change while a
//! test compares it with an image chain.
//!
//! Regions are named anonymous mappings. Commands:
//!
//! ```text
//! ping                                  -> pid
//! alloc NAME PAGES [rand|light|zero|none] [shared] [populate] [at=ADDR] [seed=N]
//!                                       -> addr, len   (fills every page)
//! addr NAME                             -> addr, len, pages
//! regions                               -> regions: [{name, addr, pages}] of every
//!                                       region, and of the mappings a churn keeps
//!                                       (`churn.*`) and pages moved out
//! dirty NAME IDX[,A-B...]               write new contents into those pages
//! dirty_frac NAME FRAC SEED             the pages of pattern::frac_set
//! zap NAME FIRST COUNT                  madvise(MADV_DONTNEED)
//! mremap NAME NEWPAGES                  move (and resize) to a new address
//! grow NAME NEWPAGES                    mremap in place or moved (MAYMOVE)
//! unmap NAME
//! renew NAME [CONTENT] [PAGES]          munmap + mmap anew at the same address, fill
//! mprotect NAME FIRST COUNT r|rw|none
//! readfill NAME FIRST COUNT pipe|file   fill pages with read(2) (kernel writes)
//! threads NAME N IDXSPEC|all            N threads dirty the pages concurrently
//! fork NAME MS                          child rewrites its copy of NAME for MS ms,
//!                                       then checks it and exits 0 (or 1)
//! fork_wait                             reap the child: its exit status
//! sum NAME [FIRST COUNT]                FNV-1a of the bytes
//! bg NAME FRAC SEED PERIOD_MS           background thread: each period, write one
//!                                       byte to a fresh random FRAC of the pages
//! bg_stop                               -> iterations, page_writes
//! churn NAME PAGES SEED [maps|realloc]  one step of mapping churn beside NAME (see
//!                                       `Churn`), then PAGES random pages of NAME
//!                                       written -> pages (all pages written), churn
//! churn_bg NAME PAGES SEED PERIOD_MS [maps|realloc]
//!                                       the same in a background thread, each period
//! churn_stop                            -> iterations, page_writes, max_step_pages
//! move_out NAME FIRST COUNT             move those pages of NAME away (mremap onto a
//!                                       placeholder) -> addr
//! move_back NAME                        move them back where they were
//! exit_after MS                         _exit(0) after MS ms (reply now)
//! exit
//! ```

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tern_tests::pattern::{self, Content, PAGE};

struct Region {
    addr: usize,
    pages: usize,
    content: Content,
    shared: bool,
    seed: u64,
    generation: u64,
}

impl Region {
    fn len(&self) -> usize {
        self.pages * PAGE
    }
    fn page(&self, idx: usize) -> &'static mut [u8] {
        assert!(idx < self.pages);
        // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
        unsafe { std::slice::from_raw_parts_mut((self.addr + idx * PAGE) as *mut u8, PAGE) }
    }
    /// What a dirtying write puts in a page of this region.
    fn dirty_content(&self) -> Content {
        match self.content {
            Content::Rand => Content::Rand,
            _ => Content::Light,
        }
    }
    fn fill_all(&self, content: Content) {
        for i in 0..self.pages {
            fill(self.page(i), content, self.seed, self.generation, i as u64);
        }
    }
}

fn fill(page: &mut [u8], content: Content, seed: u64, generation: u64, idx: u64) {
    match content {
        // Populate with a real write, leaving zeros.
        // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
        Content::Zero => unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) },
        c => pattern::fill_page(page, c, seed, generation, idx),
    }
}

struct Bg {
    stop: Arc<AtomicBool>,
    iterations: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

struct State {
    regions: HashMap<String, Region>,
    child: Option<libc::pid_t>,
    bg: Option<Bg>,
    churn: Option<Churn>,
    churn_bg: Option<ChurnBg>,
    /// Pages moved away by move_out: (region, where they were, where they are, pages).
    moved_out: Option<(String, usize, usize, usize)>,
    tmpdir: std::path::PathBuf,
}

type Reply = Result<String, String>;

fn mmap(len: usize, shared: bool, at: Option<usize>, noreplace: bool) -> Result<usize, String> {
    mmap_flags(len, shared, at, noreplace, 0)
}

fn mmap_flags(
    len: usize,
    shared: bool,
    at: Option<usize>,
    noreplace: bool,
    extra: i32,
) -> Result<usize, String> {
    let mut flags = extra
        | libc::MAP_ANONYMOUS
        | if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    if at.is_some() {
        flags |= if noreplace {
            libc::MAP_FIXED_NOREPLACE
        } else {
            libc::MAP_FIXED
        };
    }
    // SAFETY: maps or moves only anonymous memory of this program at addresses it owns; the result is checked before use.
    let p = unsafe {
        libc::mmap(
            at.unwrap_or(0) as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mmap {len} bytes: {}",
            std::io::Error::last_os_error()
        ));
    }
    if let Some(a) = at
        && p as usize != a
    {
        return Err(format!("mmap at {a:#x} gave {:#x}", p as usize));
    }
    Ok(p as usize)
}

fn parse<T: std::str::FromStr>(s: Option<&&str>, what: &str) -> Result<T, String> {
    let s = s.ok_or_else(|| format!("missing {what}"))?;
    s.parse().map_err(|_| format!("bad {what}: {s:?}"))
}

fn parse_addr(s: &str) -> Result<usize, String> {
    let r = if let Some(h) = s.strip_prefix("0x") {
        usize::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.map_err(|_| format!("bad address {s:?}"))
}

fn region_json(r: &Region) -> String {
    format!(
        "\"addr\":{},\"len\":{},\"pages\":{},\"generation\":{}",
        r.addr,
        r.len(),
        r.pages,
        r.generation
    )
}

impl State {
    fn region(&mut self, name: Option<&&str>) -> Result<&mut Region, String> {
        let name = name.ok_or("missing region name")?;
        self.regions
            .get_mut(*name)
            .ok_or_else(|| format!("no region {name:?}"))
    }

    fn run(&mut self, line: &str) -> Reply {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(&cmd) = w.first() else {
            return Err("empty command".into());
        };
        match cmd {
            "ping" => Ok(format!("\"pid\":{}", std::process::id())),
            "alloc" => self.alloc(&w),
            "addr" => {
                let r = self.region(w.get(1))?;
                Ok(region_json(r))
            }
            "regions" => self.regions_json(),
            "dirty" => {
                let spec = w.get(2).ok_or("missing index list")?;
                let r = self.region(w.get(1))?;
                let idx = if *spec == "all" {
                    (0..r.pages as u64).collect()
                } else {
                    pattern::parse_indices(spec)?
                };
                dirty(r, &idx)
            }
            "dirty_frac" => {
                let frac: f64 = parse(w.get(2), "fraction")?;
                let seed: u64 = parse(w.get(3), "seed")?;
                let r = self.region(w.get(1))?;
                let idx = pattern::frac_set(r.pages as u64, frac, seed);
                dirty(r, &idx)
            }
            "zap" => {
                let first: usize = parse(w.get(2), "first page")?;
                let count: usize = parse(w.get(3), "count")?;
                let r = self.region(w.get(1))?;
                if first + count > r.pages {
                    return Err("range past the region".into());
                }
                // SAFETY: MADV_DONTNEED on a mapping this program made, to which no Rust reference is alive.
                let rc = unsafe {
                    libc::madvise(
                        (r.addr + first * PAGE) as *mut _,
                        count * PAGE,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc != 0 {
                    return Err(format!("madvise: {}", std::io::Error::last_os_error()));
                }
                Ok(format!("\"pages\":{count}"))
            }
            "mremap" | "grow" => {
                let newpages: usize = parse(w.get(2), "page count")?;
                let r = self.region(w.get(1))?;
                let old = r.addr;
                let newaddr = if cmd == "mremap" {
                    // Reserve a fresh spot, then move the region onto it.
                    // SAFETY: maps or moves only anonymous memory of this program at addresses it owns; the result is checked before use.
                    let spot = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            newpages * PAGE,
                            libc::PROT_NONE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    if spot == libc::MAP_FAILED {
                        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
                    }
                    // SAFETY: maps or moves only anonymous memory of this program at addresses it owns; the result is checked before use.
                    unsafe {
                        libc::mremap(
                            old as *mut _,
                            r.len(),
                            newpages * PAGE,
                            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                            spot,
                        )
                    }
                } else {
                    // SAFETY: maps or moves only anonymous memory of this program at addresses it owns; the result is checked before use.
                    unsafe {
                        libc::mremap(
                            old as *mut _,
                            r.len(),
                            newpages * PAGE,
                            libc::MREMAP_MAYMOVE,
                        )
                    }
                };
                if newaddr == libc::MAP_FAILED {
                    return Err(format!("mremap: {}", std::io::Error::last_os_error()));
                }
                r.addr = newaddr as usize;
                r.pages = newpages;
                Ok(format!("\"old\":{old},{}", region_json(r)))
            }
            "unmap" => {
                let name = w.get(1).ok_or("missing region name")?;
                let r = self
                    .regions
                    .remove(*name)
                    .ok_or_else(|| format!("no region {name:?}"))?;
                // SAFETY: unmaps only a region this code mapped, which nothing references any more.
                if unsafe { libc::munmap(r.addr as *mut _, r.len()) } != 0 {
                    return Err(format!("munmap: {}", std::io::Error::last_os_error()));
                }
                Ok(format!("\"addr\":{},\"len\":{}", r.addr, r.len()))
            }
            "renew" => {
                let r = self.region(w.get(1))?;
                let content = match w.get(2) {
                    Some(c) => Content::parse(c).ok_or("bad content")?,
                    None => r.content,
                };
                let pages = match w.get(3) {
                    Some(p) => p.parse().map_err(|_| "bad page count")?,
                    None => r.pages,
                };
                // SAFETY: unmaps only a region this code mapped, which nothing references any more.
                if unsafe { libc::munmap(r.addr as *mut _, r.len()) } != 0 {
                    return Err(format!("munmap: {}", std::io::Error::last_os_error()));
                }
                mmap(pages * PAGE, r.shared, Some(r.addr), true)?;
                r.pages = pages;
                r.content = content;
                r.generation += 1;
                r.fill_all(content);
                Ok(region_json(r))
            }
            "mprotect" => {
                let first: usize = parse(w.get(2), "first page")?;
                let count: usize = parse(w.get(3), "count")?;
                let prot = match w.get(4).copied() {
                    Some("r") => libc::PROT_READ,
                    Some("rw") => libc::PROT_READ | libc::PROT_WRITE,
                    Some("none") => libc::PROT_NONE,
                    _ => return Err("protection: r, rw or none".into()),
                };
                let r = self.region(w.get(1))?;
                // SAFETY: changes the protection of a mapping this program made; no Rust reference into it is alive.
                if unsafe { libc::mprotect((r.addr + first * PAGE) as *mut _, count * PAGE, prot) }
                    != 0
                {
                    return Err(format!("mprotect: {}", std::io::Error::last_os_error()));
                }
                Ok(String::new())
            }
            "readfill" => self.readfill(&w),
            "threads" => {
                let n: usize = parse(w.get(2), "thread count")?;
                let spec = w.get(3).ok_or("missing index list")?;
                let r = self.region(w.get(1))?;
                let idx = if *spec == "all" {
                    (0..r.pages as u64).collect()
                } else {
                    pattern::parse_indices(spec)?
                };
                threads_dirty(r, n, &idx)
            }
            "fork" => self.fork(&w),
            "fork_wait" => {
                let pid = self.child.take().ok_or("no child")?;
                let mut status = 0;
                // SAFETY: waitpid(2) writes at most one int, into a local status (or none for a null pointer).
                if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
                    return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
                }
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -libc::WTERMSIG(status)
                };
                Ok(format!("\"child\":{pid},\"status\":{code}"))
            }
            "sum" => {
                let r = self.region(w.get(1))?;
                let (first, count) = match (w.get(2), w.get(3)) {
                    (Some(f), Some(c)) => (
                        f.parse::<usize>().map_err(|_| "bad first")?,
                        c.parse::<usize>().map_err(|_| "bad count")?,
                    ),
                    _ => (0, r.pages),
                };
                // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
                let bytes = unsafe {
                    std::slice::from_raw_parts((r.addr + first * PAGE) as *const u8, count * PAGE)
                };
                Ok(format!("\"sum\":{}", pattern::fnv(bytes)))
            }
            "bg" => self.bg(&w),
            "bg_stop" => {
                let bg = self.bg.take().ok_or("no background writer")?;
                bg.stop.store(true, Ordering::SeqCst);
                bg.handle.join().map_err(|_| "background writer panicked")?;
                Ok(format!(
                    "\"iterations\":{},\"page_writes\":{}",
                    bg.iterations.load(Ordering::SeqCst),
                    bg.writes.load(Ordering::SeqCst)
                ))
            }
            "churn" => {
                let pages: u64 = parse(w.get(2), "page count")?;
                let seed: u64 = parse(w.get(3), "seed")?;
                let mode = ChurnMode::parse(w.get(4).copied())?;
                if self.churn_bg.is_some() {
                    return Err("a background churn is running".into());
                }
                let r = self.region(w.get(1))?;
                let (addr, npages) = (r.addr, r.pages);
                let churn = self
                    .churn
                    .get_or_insert_with(|| Churn::new(addr, npages, seed, mode));
                let n = churn.step(pages)?;
                Ok(format!("\"pages\":{n},\"steps\":{}", churn.steps))
            }
            "churn_bg" => {
                let pages: u64 = parse(w.get(2), "page count")?;
                let seed: u64 = parse(w.get(3), "seed")?;
                let period: u64 = parse(w.get(4), "period")?;
                let mode = ChurnMode::parse(w.get(5).copied())?;
                if self.churn_bg.is_some() || self.churn.is_some() {
                    return Err("a churn already ran in this process".into());
                }
                let r = self.region(w.get(1))?;
                let mut churn = Churn::new(r.addr, r.pages, seed, mode);
                let stop = Arc::new(AtomicBool::new(false));
                let s = stop.clone();
                let handle = std::thread::spawn(move || -> Result<Churn, String> {
                    let period = std::time::Duration::from_millis(period);
                    while !s.load(Ordering::Relaxed) {
                        let start = std::time::Instant::now();
                        churn.step(pages)?;
                        let spent = start.elapsed();
                        if spent < period {
                            std::thread::sleep(period - spent);
                        }
                    }
                    Ok(churn)
                });
                self.churn_bg = Some(ChurnBg { stop, handle });
                Ok(String::new())
            }
            "churn_stop" => {
                let bg = self.churn_bg.take().ok_or("no background churn")?;
                bg.stop.store(true, Ordering::SeqCst);
                let churn = bg
                    .handle
                    .join()
                    .map_err(|_| "background churn panicked")??;
                let out = format!(
                    "\"iterations\":{},\"page_writes\":{},\"max_step_pages\":{}",
                    churn.steps, churn.page_writes, churn.max_step_pages
                );
                self.churn = Some(churn);
                Ok(out)
            }
            "move_out" => {
                let first: usize = parse(w.get(2), "first page")?;
                let count: usize = parse(w.get(3), "count")?;
                if self.moved_out.is_some() {
                    return Err("pages are already moved out".into());
                }
                let r = self.region(w.get(1))?;
                if count == 0 || first + count > r.pages {
                    return Err("range past the region".into());
                }
                let from = r.addr + first * PAGE;
                let spot = mmap_prot(count * PAGE, libc::PROT_NONE)?;
                // Pages of a region this process owns, onto a placeholder it
                // just mapped.
                let to = move_fixed(from, count * PAGE, spot)?;
                let name = w[1].to_string();
                self.moved_out = Some((name, from, to, count));
                Ok(format!("\"addr\":{to}"))
            }
            "move_back" => {
                let (name, home, at, count) = self.moved_out.take().ok_or("nothing moved out")?;
                if w.get(1) != Some(&name.as_str()) {
                    return Err(format!("the pages moved out are {name}'s"));
                }
                // The pages back into the hole they left.
                move_fixed(at, count * PAGE, home)?;
                Ok(format!("\"addr\":{home}"))
            }
            "exit_after" => {
                let ms: u64 = parse(w.get(1), "milliseconds")?;
                let seq = REPLIES.load(Ordering::SeqCst);
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                    // Not before the reply to this command is out (a 0 ms
                    // exit could otherwise beat it).
                    while REPLIES.load(Ordering::SeqCst) == seq {
                        std::thread::sleep(std::time::Duration::from_micros(100));
                    }
                    // SAFETY: ends this (forked) process at once; nothing after it runs.
                    unsafe { libc::_exit(0) };
                });
                Ok(String::new())
            }
            "exit" => {
                self.cleanup();
                reply(&Ok(String::new()));
                std::process::exit(0);
            }
            other => Err(format!("unknown command {other:?}")),
        }
    }

    /// Every page range this program mapped and still holds, by name.
    fn regions_json(&self) -> Reply {
        if self.churn_bg.is_some() {
            return Err("a background churn is running: its mappings change".into());
        }
        let mut all: Vec<(String, usize, usize)> = self
            .regions
            .iter()
            .map(|(n, r)| (n.clone(), r.addr, r.pages))
            .collect();
        if let Some((name, _, at, count)) = &self.moved_out {
            all.push((format!("moved_out.{name}"), *at, *count));
        }
        if let Some(c) = &self.churn {
            for (i, &(a, n)) in c.small.iter().enumerate() {
                all.push((format!("churn.small.{i}"), a, n));
            }
            if let Some((a, n)) = c.fresh {
                all.push(("churn.fresh".into(), a, n));
            }
            if let Some((a, n)) = c.renewed {
                all.push(("churn.renewed".into(), a, n));
            }
            if let Some((b, len)) = c.block {
                // The pages of the realloc'd block (inside glibc's chunk).
                let first = b & !(PAGE - 1);
                all.push((
                    "churn.block".into(),
                    first,
                    (b + len - first).div_ceil(PAGE),
                ));
            }
        }
        all.sort_by_key(|r| r.1);
        let items: Vec<String> = all
            .iter()
            .map(|(n, a, p)| format!("{{\"name\":{},\"addr\":{a},\"pages\":{p}}}", json_str(n)))
            .collect();
        Ok(format!("\"regions\":[{}]", items.join(",")))
    }

    fn alloc(&mut self, w: &[&str]) -> Reply {
        let name = w.get(1).ok_or("missing region name")?.to_string();
        let pages: usize = parse(w.get(2), "page count")?;
        let mut content = Content::Rand;
        let mut shared = false;
        let mut at = None;
        let mut extra = 0;
        let mut seed = pattern::mix(name.bytes().fold(0u64, |h, b| h * 31 + b as u64));
        for opt in &w[3..] {
            if let Some(c) = Content::parse(opt) {
                content = c;
            } else if *opt == "shared" {
                shared = true;
            } else if *opt == "populate" {
                // Fault everything in at mmap time: much faster than one
                // user fault per page for big regions.
                extra = libc::MAP_POPULATE;
            } else if let Some(a) = opt.strip_prefix("at=") {
                at = Some(parse_addr(a)?);
            } else if let Some(s) = opt.strip_prefix("seed=") {
                seed = s.parse().map_err(|_| "bad seed")?;
            } else {
                return Err(format!("unknown alloc option {opt:?}"));
            }
        }
        if self.regions.contains_key(&name) {
            return Err(format!("region {name:?} exists"));
        }
        let addr = mmap_flags(pages * PAGE, shared, at, true, extra)?;
        let r = Region {
            addr,
            pages,
            content,
            shared,
            seed,
            generation: 0,
        };
        r.fill_all(content);
        let out = region_json(&r);
        self.regions.insert(name, r);
        Ok(out)
    }

    fn readfill(&mut self, w: &[&str]) -> Reply {
        let first: usize = parse(w.get(2), "first page")?;
        let count: usize = parse(w.get(3), "count")?;
        let src = w.get(4).copied().unwrap_or("pipe");
        let tmpdir = self.tmpdir.clone();
        let r = self.region(w.get(1))?;
        if first + count > r.pages {
            return Err("range past the region".into());
        }
        r.generation += 1;
        // The data, built in a private buffer: the region itself is written
        // only by the kernel, inside read(2).
        let mut data = vec![0u8; count * PAGE];
        for (i, page) in data.chunks_exact_mut(PAGE).enumerate() {
            pattern::fill_page(
                page,
                Content::Rand,
                r.seed,
                r.generation,
                (first + i) as u64,
            );
        }
        let dst = (r.addr + first * PAGE) as *mut u8;
        let fd = match src {
            "pipe" => {
                let mut fds = [0; 2];
                // SAFETY: pipe(2) writes two fds into `fds`, a local array of two.
                if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
                    return Err(format!("pipe: {}", std::io::Error::last_os_error()));
                }
                let wfd = fds[1];
                std::thread::spawn(move || {
                    let mut off = 0;
                    while off < data.len() {
                        // SAFETY: the kernel reads at most the given length from the buffer, which we own for the call.
                        let n = unsafe {
                            libc::write(wfd, data[off..].as_ptr() as *const _, data.len() - off)
                        };
                        if n <= 0 {
                            break;
                        }
                        off += n as usize;
                    }
                    // SAFETY: closes an fd this code opened and no longer uses.
                    unsafe { libc::close(wfd) };
                });
                fds[0]
            }
            "file" => {
                let path = tmpdir.join(format!("readfill-{}", std::process::id()));
                std::fs::write(&path, &data).map_err(|e| format!("{}: {e}", path.display()))?;
                let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: the path is a NUL-terminated CString that outlives the call.
                let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
                let _ = std::fs::remove_file(&path);
                if fd < 0 {
                    return Err(format!("open: {}", std::io::Error::last_os_error()));
                }
                fd
            }
            other => return Err(format!("source {other:?}: pipe or file")),
        };
        let mut off = 0;
        let total = count * PAGE;
        while off < total {
            // SAFETY: the kernel writes at most the given length into the buffer, which we own for the call.
            let n = unsafe { libc::read(fd, dst.add(off) as *mut _, total - off) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // SAFETY: closes an fd this code opened and no longer uses.
                unsafe { libc::close(fd) };
                return Err(format!("read: {e}"));
            }
            if n == 0 {
                break;
            }
            off += n as usize;
        }
        // SAFETY: closes an fd this code opened and no longer uses.
        unsafe { libc::close(fd) };
        if off != total {
            return Err(format!("read {off} of {total} bytes"));
        }
        Ok(format!("\"pages\":{count},\"generation\":{}", r.generation))
    }

    fn fork(&mut self, w: &[&str]) -> Reply {
        let ms: u64 = parse(w.get(2), "milliseconds")?;
        if self.child.is_some() {
            return Err("a child is already running".into());
        }
        let r = self.region(w.get(1))?;
        let (addr, pages, seed) = (r.addr, r.pages, r.seed);
        // The child writes generations far from the parent's.
        let base_gen = r.generation + 1_000_000;
        let ppid = std::process::id() as i32;
        // SAFETY: the child calls only async-signal-safe functions (or plain memory accesses of this single-threaded program) before _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // Child: raw memory and syscalls only.
            // SAFETY: prctl and getppid take integers; _exit ends the child at once.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != ppid {
                    libc::_exit(3);
                }
            }
            // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
            let page = |i: usize| unsafe {
                std::slice::from_raw_parts_mut((addr + i * PAGE) as *mut u8, PAGE)
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            let mut generation = base_gen;
            for i in 0..pages {
                pattern::fill_page(page(i), Content::Light, seed, generation, i as u64);
            }
            let mut gens = vec![generation; pages];
            let mut rng = pattern::Rng::new(seed);
            while std::time::Instant::now() < deadline {
                generation += 1;
                for _ in 0..16.min(pages) {
                    let i = sys::usize_of(rng.below(pages as u64));
                    pattern::fill_page(page(i), Content::Light, seed, generation, i as u64);
                    gens[i] = generation;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let mut want = vec![0u8; PAGE];
            for (i, &g) in gens.iter().enumerate() {
                pattern::fill_page(&mut want, Content::Light, seed, g, i as u64);
                if page(i) != &want[..] {
                    // SAFETY: ends this (forked) process at once; nothing after it runs.
                    unsafe { libc::_exit(1) };
                }
            }
            // SAFETY: ends this (forked) process at once; nothing after it runs.
            unsafe { libc::_exit(0) };
        }
        self.child = Some(pid);
        Ok(format!("\"child\":{pid}"))
    }

    fn bg(&mut self, w: &[&str]) -> Reply {
        let frac: f64 = parse(w.get(2), "fraction")?;
        let seed: u64 = parse(w.get(3), "seed")?;
        let period: u64 = parse(w.get(4), "period")?;
        if self.bg.is_some() {
            return Err("a background writer is already running".into());
        }
        let r = self.region(w.get(1))?;
        let (addr, pages) = (r.addr, r.pages);
        let stop = Arc::new(AtomicBool::new(false));
        let iterations = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, it, wr) = (stop.clone(), iterations.clone(), writes.clone());
        // A fraction of the u64 range; float-to-int `as` saturates.
        #[allow(clippy::cast_possible_truncation)]
        let threshold = (frac.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
        let handle = std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                let start = std::time::Instant::now();
                let round_seed = pattern::mix(seed ^ n);
                let mut count = 0;
                for i in 0..pages {
                    if pattern::mix(round_seed ^ i as u64) <= threshold {
                        // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
                        unsafe {
                            let p = (addr + i * PAGE + (sys::usize_of(n) % 512) * 8) as *mut u64;
                            std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(1));
                        }
                        count += 1;
                    }
                }
                n += 1;
                it.store(n, Ordering::Relaxed);
                wr.fetch_add(count, Ordering::Relaxed);
                let spent = start.elapsed();
                let period = std::time::Duration::from_millis(period);
                if spent < period {
                    std::thread::sleep(period - spent);
                }
            }
        });
        self.bg = Some(Bg {
            stop,
            iterations,
            writes,
            handle,
        });
        Ok(String::new())
    }

    fn cleanup(&mut self) {
        if let Some(bg) = self.churn_bg.take() {
            bg.stop.store(true, Ordering::SeqCst);
            let _ = bg.handle.join();
        }
        if let Some(bg) = self.bg.take() {
            bg.stop.store(true, Ordering::SeqCst);
            let _ = bg.handle.join();
        }
        if let Some(pid) = self.child.take() {
            // SAFETY: kill(2) takes integers; waitpid reaps our own child and reads no status (null).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum ChurnMode {
    /// mmap, mremap onto a placeholder, munmap and mmap anew.
    Maps,
    /// The same, and glibc realloc of a large block to and fro.
    Realloc,
}

impl ChurnMode {
    fn parse(s: Option<&str>) -> Result<ChurnMode, String> {
        match s {
            None | Some("maps") => Ok(ChurnMode::Maps),
            Some("realloc") => Ok(ChurnMode::Realloc),
            Some(o) => Err(format!("churn mode {o:?}: maps or realloc")),
        }
    }
}

/// Mapping churn beside a big region (the pattern of issue 13). Each step
/// maps a small region and leaves it untouched (carved out of a PROT_NONE
/// reservation, as allocators do, so that it merges with nothing); moves the one the previous
/// step mapped (untouched until then) with mremap onto a placeholder it has
/// just mapped right below or right above the big region (whichever side
/// is free), writes a page of it and unmaps the one moved before; unmaps a third and maps it anew
/// (writing its two pages); with `realloc`, also grows or shrinks a large
/// malloc'd block with glibc's realloc (an mremap of the block's own
/// mapping, moved when it cannot grow in place) and writes its first and
/// last pages. Then it writes `pages` random pages of the big region. The
/// kernel places these mappings next to each other and to the big region:
/// whatever merges, the pages a step wrote are all it changed.
struct Churn {
    big: usize,
    big_pages: usize,
    mode: ChurnMode,
    rng: pattern::Rng,
    /// Regions moved by earlier steps (addr, pages); the oldest are
    /// unmapped so that a few stay.
    small: std::collections::VecDeque<(usize, usize)>,
    /// The region mapped by the previous step, moved by the next one.
    fresh: Option<(usize, usize)>,
    /// PROT_NONE reservation the small regions are carved out of, one slot
    /// (and a page of gap) each.
    nursery: Option<usize>,
    /// The region unmapped and mapped anew each step.
    renewed: Option<(usize, usize)>,
    /// The realloc'd block and its size.
    block: Option<(usize, usize)>,
    steps: usize,
    page_writes: u64,
    max_step_pages: u64,
}

const CHURN_SMALL: usize = 4;
const CHURN_RENEWED: usize = 2;
const CHURN_KEEP: usize = 1;

impl Churn {
    fn new(big: usize, big_pages: usize, seed: u64, mode: ChurnMode) -> Churn {
        Churn {
            big,
            big_pages,
            mode,
            rng: pattern::Rng::new(seed),
            small: Default::default(),
            fresh: None,
            nursery: None,
            renewed: None,
            block: None,
            steps: 0,
            page_writes: 0,
            max_step_pages: 0,
        }
    }

    /// Write one word of the page at `addr` (a new value every step).
    fn touch(&mut self, addr: usize) {
        let p = (addr + (self.steps % 512) * 8) as *mut u64;
        // SAFETY: `addr` is a writable page of a mapping this churn owns.
        unsafe { std::ptr::write_volatile(p, self.rng.next_u64()) };
    }

    fn step(&mut self, pages: u64) -> Result<u64, String> {
        let mut written = 0;
        // The region the previous step mapped, moved onto a placeholder
        // mapped for it, then written.
        if let Some((from, n)) = self.fresh.take() {
            let below = self.big - n * PAGE;
            let above = self.big + self.big_pages * PAGE;
            let spot = mmap_at(below, n * PAGE, libc::PROT_NONE)
                .or_else(|_| mmap_at(above, n * PAGE, libc::PROT_NONE))
                .or_else(|_| mmap_prot(n * PAGE, libc::PROT_NONE))?;
            // A mapping this churn owns, onto one it owns.
            let to = move_fixed(from, n * PAGE, spot)?;
            self.touch(to + (self.steps % n) * PAGE);
            written += 1;
            self.small.push_back((to, n));
            while self.small.len() > CHURN_KEEP {
                let (a, n) = self.small.pop_front().unwrap();
                munmap(a, n)?;
            }
        }
        // A small region, left untouched for now.
        const SLOTS: usize = 8;
        let nursery = match self.nursery {
            Some(a) => a,
            None => *self.nursery.insert(mmap_prot(
                SLOTS * (CHURN_SMALL + 1) * PAGE,
                libc::PROT_NONE,
            )?),
        };
        let slot = nursery + (self.steps % SLOTS) * (CHURN_SMALL + 1) * PAGE;
        self.fresh = Some((
            mmap(CHURN_SMALL * PAGE, false, Some(slot), false)?,
            CHURN_SMALL,
        ));
        // A third one unmapped and mapped anew.
        if let Some((a, n)) = self.renewed.take() {
            munmap(a, n)?;
        }
        let r = mmap(CHURN_RENEWED * PAGE, false, None, false)?;
        for i in 0..CHURN_RENEWED {
            self.touch(r + i * PAGE);
        }
        written += CHURN_RENEWED as u64;
        self.renewed = Some((r, CHURN_RENEWED));
        if self.mode == ChurnMode::Realloc {
            // 1 MiB and up: an mmapped chunk, grown or shrunk by mremap.
            let len = (256 + 64 * (self.steps % 4)) * PAGE;
            let old = self
                .block
                .map_or(std::ptr::null_mut(), |(a, _)| a as *mut libc::c_void);
            // SAFETY: `old` is null or the block realloc returned last.
            let b = unsafe { libc::realloc(old, len) };
            if b.is_null() {
                return Err(format!(
                    "realloc {len}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let b = b as usize;
            self.block = Some((b, len));
            // Its first and last pages (the chunk header is on the first).
            self.touch(b);
            self.touch((b + len - 8) & !(PAGE - 1));
            written += 2;
        }
        // The big region's pages, `pages` distinct ones.
        let mut idx = std::collections::BTreeSet::new();
        while (idx.len() as u64) < pages.min(self.big_pages as u64) {
            idx.insert(sys::usize_of(self.rng.below(self.big_pages as u64)));
        }
        for &i in &idx {
            self.touch(self.big + i * PAGE);
        }
        written += idx.len() as u64;
        self.steps += 1;
        self.page_writes += written;
        self.max_step_pages = self.max_step_pages.max(written);
        Ok(written)
    }
}

struct ChurnBg {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<Churn, String>>,
}

/// Move `len` bytes of this program's own memory at `from` onto `to`
/// (replacing what is mapped there, a placeholder of its own), as
/// `mremap(MREMAP_MAYMOVE | MREMAP_FIXED)`.
fn move_fixed(from: usize, len: usize, to: usize) -> Result<usize, String> {
    // SAFETY: both ranges are anonymous memory this program mapped and holds
    // no Rust reference into; the result is checked.
    let r = unsafe {
        libc::mremap(
            from as *mut _,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(format!("mremap: {}", std::io::Error::last_os_error()));
    }
    Ok(r as usize)
}

fn mmap_prot(len: usize, prot: i32) -> Result<usize, String> {
    // SAFETY: a new anonymous mapping at an address of the kernel's choice.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok(p as usize)
}

/// A new anonymous mapping at `addr` exactly, if nothing is mapped there.
fn mmap_at(addr: usize, len: usize, prot: i32) -> Result<usize, String> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mmap at {addr:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    if p as usize != addr {
        // Kernels before 4.17 take the flag as a hint.
        // SAFETY: unmaps what was just mapped.
        unsafe { libc::munmap(p, len) };
        return Err(format!("mmap at {addr:#x} gave {:#x}", p as usize));
    }
    Ok(addr)
}

fn munmap(addr: usize, pages: usize) -> Result<(), String> {
    // SAFETY: unmaps a mapping this churn owns.
    if unsafe { libc::munmap(addr as *mut _, pages * PAGE) } != 0 {
        return Err(format!("munmap: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn dirty(r: &mut Region, idx: &[u64]) -> Reply {
    if let Some(bad) = idx.iter().find(|&&i| sys::usize_of(i) >= r.pages) {
        return Err(format!("page {bad} past the region ({} pages)", r.pages));
    }
    r.generation += 1;
    let c = r.dirty_content();
    for &i in idx {
        pattern::fill_page(r.page(sys::usize_of(i)), c, r.seed, r.generation, i);
    }
    Ok(format!(
        "\"pages\":{},\"generation\":{}",
        idx.len(),
        r.generation
    ))
}

fn threads_dirty(r: &mut Region, n: usize, idx: &[u64]) -> Reply {
    if n == 0 {
        return Err("no threads".into());
    }
    if let Some(bad) = idx.iter().find(|&&i| sys::usize_of(i) >= r.pages) {
        return Err(format!("page {bad} past the region"));
    }
    r.generation += 1;
    let (addr, seed, generation, c) = (r.addr, r.seed, r.generation, r.dirty_content());
    let chunk = idx.len().div_ceil(n).max(1);
    let barrier = Arc::new(std::sync::Barrier::new(n));
    std::thread::scope(|s| {
        for t in 0..n {
            let part = &idx[(t * chunk).min(idx.len())..((t + 1) * chunk).min(idx.len())];
            let barrier = barrier.clone();
            s.spawn(move || {
                barrier.wait();
                for &i in part {
                    // SAFETY: the address lies inside a mapping this program made and has not unmapped, of at least the length used.
                    let page = unsafe {
                        std::slice::from_raw_parts_mut(
                            (addr + sys::usize_of(i) * PAGE) as *mut u8,
                            PAGE,
                        )
                    };
                    pattern::fill_page(page, c, seed, generation, i);
                }
            });
        }
    });
    Ok(format!(
        "\"pages\":{},\"threads\":{n},\"generation\":{generation}",
        idx.len()
    ))
}

fn reply(r: &Reply) {
    let line = match r {
        Ok(s) if s.is_empty() => "{\"ok\":true}".to_string(),
        Ok(s) => format!("{{\"ok\":true,{s}}}"),
        Err(e) => format!("{{\"ok\":false,\"error\":{}}}", json_str(e)),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    REPLIES.fetch_add(1, Ordering::SeqCst);
}

/// Replies written so far (`exit_after` waits for its own).
static REPLIES: AtomicU64 = AtomicU64::new(0);

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn main() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let mut st = State {
        regions: HashMap::new(),
        child: None,
        bg: None,
        churn: None,
        churn_bg: None,
        moved_out: None,
        tmpdir: std::env::temp_dir(),
    };
    let stdin = std::io::stdin();
    let mut line = String::with_capacity(4096);
    let mut input = stdin.lock();
    reply(&Ok(format!(
        "\"ready\":true,\"pid\":{}",
        std::process::id()
    )));
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("workload: stdin: {e}");
                break;
            }
        }
        let r = st.run(line.trim());
        reply(&r);
    }
    st.cleanup();
}
