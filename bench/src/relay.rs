//! A delaying, rate-limited link between two network namespaces, made in
//! userspace: a TUN device in each namespace and a relay that carries each
//! packet across once the link would have sent it at `rate` and after a
//! one-way `delay` (what `tc qdisc netem delay D rate R` does; this kernel
//! has neither netem nor fq, which honours the departure times a tc-bpf
//! program could set).
//!
//! Each direction is one thread: it reads what the sending side's TUN
//! device gives, queues it (tail drop past [`QUEUE_BYTES`], as a router's
//! buffer), and writes each packet into the other side's device when its
//! time comes: `max(arrival, link free) + size / rate + delay`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What a direction holds before it drops (about 80 ms at 100 Mbit/s).
pub const QUEUE_BYTES: usize = 1 << 20;

/// `struct ifreq` (include/uapi/linux/if.h) as TUNSETIFF reads it: the
/// name, then the flags in the union (40 bytes on 64-bit).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// include/uapi/linux/if_tun.h
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
// TUNSETIFF = _IOW('T', 202, int)
nix::ioctl_write_ptr_bad!(tun_set_iff, 0x4004_54ca, IfReq);

/// `f` run on a thread of its own in network namespace `netns` (what it
/// makes there, devices and sockets, stays there).
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let netns = netns.to_string();
    std::thread::spawn(move || -> Result<T> {
        let ns = File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("network namespace {netns}"))?;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("joining network namespace {netns}"))?;
        f()
    })
}

/// A TUN device named `name` in network namespace `netns` (a device is
/// made in its maker's namespace).
fn open_tun_in(netns: &str, name: &str) -> Result<File> {
    if name.len() >= 16 {
        bail!("TUN device name {name} is longer than 15 bytes");
    }
    let (ns, dev) = (netns.to_string(), name.to_string());
    in_netns(netns, move || -> Result<File> {
        let (netns, name) = (ns, dev);
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("/dev/net/tun (CONFIG_TUN)")?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads one `struct ifreq`, which `req` is, on
        // the TUN fd we own.
        unsafe { tun_set_iff(std::os::fd::AsRawFd::as_raw_fd(&tun), &req) }
            .with_context(|| format!("TUNSETIFF {name} in {netns}"))?;
        Ok(tun)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread making TUN device {name} panicked"))?
}

/// The link; dropping it stops the relay (the devices go with their fds).
pub struct DelayLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Packets dropped because a direction's queue was full.
    pub dropped: Arc<AtomicU64>,
}

impl DelayLink {
    /// Devices `dev_a` in `ns_a` and `dev_b` in `ns_b` with `addr_a` and
    /// `addr_b` (/24), joined at `rate_bps` with `delay` each way.
    pub fn new(
        (ns_a, dev_a, addr_a): (&str, &str, &str),
        (ns_b, dev_b, addr_b): (&str, &str, &str),
        rate_bps: u64,
        delay: Duration,
    ) -> Result<DelayLink> {
        let a = open_tun_in(ns_a, dev_a)?;
        let b = open_tun_in(ns_b, dev_b)?;
        for (ns, dev, addr) in [(ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)] {
            crate::migrate::ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            crate::migrate::ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (a2, b2) = (a.try_clone()?, b.try_clone()?);
        let mut threads = Vec::new();
        for (from, to) in [(a, b2), (b, a2)] {
            let (stop, dropped) = (stop.clone(), dropped.clone());
            threads.push(std::thread::spawn(move || {
                relay(from, to, rate_bps, delay, &stop, &dropped)
            }));
        }
        Ok(DelayLink {
            stop,
            threads,
            dropped,
        })
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One direction: `from`'s packets into `to`, each at its time.
fn relay(
    mut from: File,
    mut to: File,
    rate_bps: u64,
    delay: Duration,
    stop: &AtomicBool,
    dropped: &AtomicU64,
) {
    use nix::poll::{PollFd, PollFlags, ppoll};
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut queued = 0usize;
    let mut link_free = Instant::now();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // Until the next packet is due (at most 50 ms, to see `stop`).
        let wait = queue
            .front()
            .map_or(Duration::from_millis(50), |(due, _)| {
                due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(50));
        // ppoll: a 1 ms delay needs a finer timeout than poll's.
        let readable = matches!(
            ppoll(
                &mut [PollFd::new(from.as_fd(), PollFlags::POLLIN)],
                Some(nix::sys::time::TimeSpec::from_duration(wait)),
                None,
            ),
            Ok(n) if n > 0
        );
        if readable {
            match from.read(&mut buf) {
                Ok(n) if n > 0 => {
                    let arrival = Instant::now();
                    if queued + n > QUEUE_BYTES {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let start = link_free.max(arrival);
                        let sent =
                            start + Duration::from_nanos(n as u64 * 8 * 1_000_000_000 / rate_bps);
                        link_free = sent;
                        queue.push_back((sent + delay, buf[..n].to_vec()));
                        queued += n;
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The device is gone (its namespace was removed).
                Err(_) => return,
            }
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, p) = queue.pop_front().expect("a front packet");
            queued -= p.len();
            // A write the other side refuses is a packet lost.
            let _ = to.write(&p);
        }
    }
}
