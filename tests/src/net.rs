//! Controller hosts: one network namespace each, joined to the root
//! namespace by a veth pair, with addresses from the benchmarking ranges
//! (198.18.0.0/15 and 2001:2::/48).

use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    net::IpAddr,
    os::fd::AsFd as _,
    path::PathBuf,
};

use crate::{next_serial, server::Server, sh, unique_name};

/// A name for a host's veth, unique on the machine: "nv<pid>_<n>" with
/// both numbers in base 36. An interface name holds at most 15 bytes (the
/// peer adds "p"); in decimal a 7-digit pid left the counter 3 digits, and
/// cutting the name there made the 1000th name of a process its 100th.
fn veth_name() -> String {
    let name = veth_name_for(std::process::id(), next_serial());
    assert!(name.len() < 15, "veth name {name} too long for its peer's");
    name
}

fn veth_name_for(pid: u32, n: u32) -> String {
    format!("nv{}_{}", base36(pid), base36(n))
}

fn base36(mut n: u32) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit(n % 36, 36).expect("a base-36 digit"));
        n /= 36;
        if n == 0 {
            return digits.iter().rev().collect();
        }
    }
}

/// A network namespace created by a test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique_name(prefix);
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Serve HTTP on `port` inside this namespace (e.g. a pod's own
    /// loopback listener), answering with `name`.
    pub fn serve(&self, port: u16, name: &str) -> Server {
        Server::start(self, port, name)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Move the calling thread into this namespace (threads have their own
    /// network namespace, so only this thread is affected).
    pub fn enter_current_thread(&self) -> std::io::Result<()> {
        let f = fs::File::open(self.path())?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// One simulated controller.
#[derive(Debug)]
pub struct TestHost {
    pub netns: Netns,
    pub v4: IpAddr,
    pub v6: IpAddr,
    /// The root-namespace end of the veth pair.
    pub veth: String,
    pub subnet: u32,
}

impl TestHost {
    /// Serve HTTP on `port` (both address families) answering with `name`.
    pub fn serve(&self, port: u16, name: &str) -> Server {
        Server::start(&self.netns, port, name)
    }

    /// Hold long-lived connections on `port` as controller `name` (see
    /// [`HoldServer`](crate::HoldServer)).
    pub fn hold(&self, port: u16, name: &str) -> crate::HoldServer {
        crate::HoldServer::start(&self.netns, port, name)
    }

    /// Drop every packet to and from this host (a blackholed controller:
    /// SYNs time out instead of being refused).
    pub fn blackhole(&self) {
        self.netns.exec("nft", &["add", "table", "inet", "nllbtest"]);
        self.netns.exec(
            "nft",
            &["add", "chain", "inet", "nllbtest", "in", "{ type filter hook input priority 0 ; policy drop ; }"],
        );
    }

    /// The controller's interface goes down (same L2, powered off): the
    /// host's neighbour lookups for it go unanswered, nothing is refused.
    pub fn link_down(&self) {
        self.netns.exec("ip", &["link", "set", &format!("{}p", self.veth), "down"]);
    }

    pub fn link_up(&self) {
        self.netns.exec("ip", &["link", "set", &format!("{}p", self.veth), "up"]);
    }

    pub fn unblackhole(&self) {
        self.netns.exec("nft", &["delete", "table", "inet", "nllbtest"]);
    }
}

/// A set of controller hosts.
#[derive(Debug)]
pub struct TestNet {
    hosts: Vec<TestHost>,
    _leases: Vec<SubnetLease>,
}

impl TestNet {
    pub fn new(n: usize) -> TestNet {
        let mut hosts = Vec::new();
        let mut leases = Vec::new();
        for _ in 0..n {
            let lease = SubnetLease::take();
            let s = lease.index;
            let netns = Netns::new("nllbh");
            let veth = veth_name();
            let peer = format!("{veth}p");
            sh("ip", &["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
            sh("ip", &["link", "set", &peer, "netns", &netns.name]);
            let (second, third) = (18 + s / 256, s % 256);
            let v4_root = format!("198.{second}.{third}.1/24");
            let v4_host = format!("198.{second}.{third}.2/24");
            let v6_root = format!("2001:2:0:{s:x}::1/64");
            let v6_host = format!("2001:2:0:{s:x}::2/64");
            sh("ip", &["addr", "add", &v4_root, "dev", &veth]);
            sh("ip", &["-6", "addr", "add", &v6_root, "dev", &veth, "nodad"]);
            sh("ip", &["link", "set", &veth, "up"]);
            netns.exec("ip", &["addr", "add", &v4_host, "dev", &peer]);
            netns.exec("ip", &["-6", "addr", "add", &v6_host, "dev", &peer, "nodad"]);
            netns.exec("ip", &["link", "set", &peer, "up"]);
            let v4: IpAddr = v4_host.trim_end_matches("/24").parse().unwrap();
            let v6: IpAddr = v6_host.trim_end_matches("/64").parse().unwrap();
            hosts.push(TestHost { netns, v4, v6, veth, subnet: s });
            leases.push(lease);
        }
        TestNet { hosts, _leases: leases }
    }

    pub fn hosts(&self) -> &[TestHost] {
        &self.hosts
    }

    /// Serve HTTP on every host, host i answering `"{prefix}{i}"`.
    pub fn serve_all(&self, port: u16, prefix: &str) -> Vec<Server> {
        self.hosts.iter().enumerate().map(|(i, h)| h.serve(port, &format!("{prefix}{i}"))).collect()
    }
}

/// Exclusive use of one /24 of 198.18.0.0/15 (and the matching IPv6 /64)
/// across every test process on the machine: a lock file per subnet, taken
/// over when the process that held it is gone.
#[derive(Debug)]
struct SubnetLease {
    index: u32,
    path: PathBuf,
}

const LEASE_DIR: &str = "/run/nllb-tests/subnets";

impl SubnetLease {
    fn take() -> SubnetLease {
        fs::create_dir_all(LEASE_DIR).expect("create subnet lease dir");
        let me = std::process::id();
        // Skip 198.18.0.x and the first few so the demo's 198.18.{1,2,3} stay free.
        for index in 10..500u32 {
            let path = PathBuf::from(format!("{LEASE_DIR}/{index}"));
            let lease = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let _ = write!(f, "{me}");
                    SubnetLease { index, path }
                }
                Err(_) => {
                    let holder: Option<i32> = fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
                    // No pid yet: its taker is between create and write (another
                    // thread or process); only a file left empty for long is stale.
                    let alive = match holder {
                        Some(pid) => PathBuf::from(format!("/proc/{pid}")).exists(),
                        None => fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| t.elapsed().map_or(true, |age| age < std::time::Duration::from_secs(10))),
                    };
                    if alive || fs::remove_file(&path).is_err() {
                        continue;
                    }
                    let Ok(mut f) = OpenOptions::new().write(true).create_new(true).open(&path) else { continue };
                    let _ = write!(f, "{me}");
                    SubnetLease { index, path }
                }
            };
            // A process killed mid-test leaves its netns and veth behind (and,
            // with its lease file, the dead holder above): the leftover root
            // end keeps the subnet's route, so our host would be unreachable
            // and a connect to it refused by the leftover namespace.
            if subnet_in_use(index) {
                continue;
            }
            return lease;
        }
        panic!("no free test subnet in 198.18.0.0/15");
    }
}

fn subnet_in_use(index: u32) -> bool {
    let subnet = format!("198.{}.{}.0/24", 18 + index / 256, index % 256);
    let out = std::process::Command::new("ip").args(["-o", "-4", "addr", "show", "to", &subnet]).output();
    out.map(|o| !o.stdout.is_empty()).unwrap_or(false)
}

impl Drop for SubnetLease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_for_any_pid() {
        assert_eq!([base36(0), base36(35), base36(36), base36(4_194_304)], ["0", "z", "10", "2hwcg"]);
        // The largest pid Linux allows (pid_max 2^22) with a counter far
        // beyond any test binary's: still room for the peer's "p".
        let widest = veth_name_for(4_194_304, 1_000_000);
        assert!(widest.len() < 15, "{widest}");
    }
}
