//! Two hosts on one machine, for what crosses a network: each host is a
//! network namespace, joined by a veth pair whose ends hold the only
//! addresses (10.231.N.1 and .2/24). Made by the test and removed when it
//! is dropped (deleting a namespace removes its end of the pair). `tc`
//! shapes the link's rate.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace and its address on the link.
pub struct Host {
    pub netns: String,
    pub addr: String,
    dev: String,
}

pub struct TwoHosts {
    pub a: Host,
    pub b: Host,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip (iproute2) cannot run: {e}; `cargo xtask setup` installs it"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl TwoHosts {
    /// Two namespaces joined by a veth pair, both ends up.
    pub fn new() -> Result<TwoHosts, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}x{n}", std::process::id());
        let subnet = (std::process::id() % 200 + n) % 250 + 1;
        let host = |side: &str, last: u8| Host {
            netns: format!("tern-{tag}-{side}"),
            addr: format!("10.231.{subnet}.{last}"),
            dev: format!("tv{tag}{side}"),
        };
        let hosts = TwoHosts {
            a: host("a", 1),
            b: host("b", 2),
        };
        for h in [&hosts.a, &hosts.b] {
            ip(&["netns", "add", &h.netns])?;
        }
        ip(&[
            "link",
            "add",
            &hosts.a.dev,
            "netns",
            &hosts.a.netns,
            "type",
            "veth",
            "peer",
            "name",
            &hosts.b.dev,
            "netns",
            &hosts.b.netns,
        ])?;
        for h in [&hosts.a, &hosts.b] {
            let cidr = format!("{}/24", h.addr);
            ip(&["-n", &h.netns, "addr", "add", &cidr, "dev", &h.dev])?;
            ip(&["-n", &h.netns, "link", "set", &h.dev, "up"])?;
            ip(&["-n", &h.netns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// `ip netns exec HOST PROGRAM`: a command run on that host.
    pub fn on(&self, host: &Host, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.netns]).arg(program);
        c
    }

    /// Shape the link both ways to `rate` (tc syntax: `100mbit`) with a
    /// token bucket (tbf). A delay needs netem, which this machine's kernel
    /// lacks (`CONFIG_NET_SCH_NETEM` is not set): a delayed link has to be
    /// a relay in userspace.
    pub fn shape(&self, rate: &str) -> Result<(), String> {
        for h in [&self.a, &self.b] {
            let out = Command::new("tc")
                .args([
                    "-n", &h.netns, "qdisc", "replace", "dev", &h.dev, "root", "tbf",
                ])
                .args(["rate", rate, "burst", "64kb", "latency", "100ms"])
                .output()
                .map_err(|e| format!("tc (iproute2) cannot run: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "tc tbf rate {rate} on {}: {} (the kernel needs sch_tbf)",
                    h.dev,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }

    /// Take the link down (`up: false`) or up again, from host `a`'s side.
    pub fn link(&self, up: bool) -> Result<(), String> {
        ip(&[
            "-n",
            &self.a.netns,
            "link",
            "set",
            &self.a.dev,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for h in [&self.a, &self.b] {
            let _ = ip(&["netns", "del", &h.netns]);
        }
    }
}
