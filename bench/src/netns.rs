//! Simulated controllers: one network namespace per host, joined to the root
//! namespace by a veth pair, and a child cgroup for the clients. Every name
//! carries our pid so parallel runs and other tests on the machine never collide.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// Host `i` (0-based) is `198.19.(SUBNET_BASE+i).2/24`, the root side `.1`.
/// 198.19.0.0/16 is inside the benchmarking range 198.18.0.0/15 but away from
/// the 198.18.i.0/24 subnets the project's tests create, so a benchmark and a
/// test running at the same time do not fight over routes.
const SUBNET_BASE: u8 = 200;

pub struct Host {
    pub netns: String,
    pub addr: Ipv4Addr,
}

pub struct Hosts {
    pub hosts: Vec<Host>,
}

pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}: is it installed?"))?;
    if !out.status.success() {
        bail!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Hosts {
    pub fn new(n: usize) -> anyhow::Result<Hosts> {
        let pid = std::process::id();
        let mut hosts = Hosts { hosts: Vec::new() };
        for i in 0..n {
            let netns = format!("nllbbench-{pid}-{i}");
            let outer = format!("nbb{pid}o{i}");
            let inner = format!("nbb{pid}i{i}");
            let net = SUBNET_BASE + i as u8;
            run("ip", &["netns", "add", &netns])?;
            // Pushed before configuring so Drop removes a half-built host too.
            hosts.hosts.push(Host { netns: netns.clone(), addr: Ipv4Addr::new(198, 19, net, 2) });
            run("ip", &["link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &netns])?;
            run("ip", &["addr", "add", &format!("198.19.{net}.1/24"), "dev", &outer])?;
            run("ip", &["link", "set", &outer, "up"])?;
            run("ip", &["-n", &netns, "addr", "add", &format!("198.19.{net}.2/24"), "dev", &inner])?;
            run("ip", &["-n", &netns, "link", "set", &inner, "up"])?;
            run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }
}

impl Host {
    /// Drops every packet arriving at the host: connects to it hang, as with a
    /// controller whose machine died or whose network partitioned.
    pub fn blackhole(&self) -> anyhow::Result<()> {
        run("ip", &["netns", "exec", &self.netns, "nft", "add table inet nllbbench { chain in { type filter hook input priority 0; policy drop; } }"])
            .map(drop)
    }

    pub fn unblackhole(&self) -> anyhow::Result<()> {
        run("ip", &["netns", "exec", &self.netns, "nft", "delete table inet nllbbench"]).map(drop)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Deleting the namespace destroys the inner veth end and with it the pair.
            if let Err(e) = run("ip", &["netns", "del", &h.netns]) {
                eprintln!("warning: could not remove netns {}: {e:#}", h.netns);
            }
        }
    }
}

/// A child cgroup of the cgroup2 mount, removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> anyhow::Result<Cgroup> {
        let root = cgroup2_mount()?;
        let path = root.join(format!("nllb-bench-{}-{tag}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Clients exit before we get here; a cgroup with processes cannot be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// The cgroup v2 mount point from /proc/self/mountinfo (hybrid hosts have it
/// at /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&info).context("no cgroup2 mount in /proc/self/mountinfo: mount one (mount -t cgroup2 none /sys/fs/cgroup)")
}

fn parse_cgroup2_mount(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(Path::new(pre.split_whitespace().nth(4)?).to_path_buf())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "35 24 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("35 24 0:30 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n"), None);
    }
}
