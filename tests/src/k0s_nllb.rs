//! "k0s NLLB": k0s's own node-local load balancer as a test peer. A real
//! Envoy runs the configuration k0s generates for it (our own template,
//! `k0s_nllb.envoy.yaml`, written from the facts in k0s's
//! `pkg/component/worker/nllb/envoy.go`), so tests can put nllb in front of
//! it on the same virtual addresses, take nllb away again, and compare the
//! two under the same faults.
//!
//! Ports: production k0s listens on 7443 (API server) and 7132
//! (konnectivity), [`PRODUCTION_PORTS`]. Tests, the demo and other
//! developers share this machine, so tests take free loopback ports
//! ([`K0sPorts::free`]) and everything else follows from [`K0sPorts`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{unique_name, wait_for};

/// The bind ports of a k0s worker's NLLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct K0sPorts {
    /// `spec.network.nodeLocalLoadBalancing.envoyProxy.apiServerBindPort`.
    pub api: u16,
    /// `spec.network.nodeLocalLoadBalancing.envoyProxy.konnectivityServerBindPort`.
    pub konnectivity: u16,
}

/// k0s's defaults: what a production worker's Envoy binds. Tests never do.
pub const PRODUCTION_PORTS: K0sPorts = K0sPorts { api: 7443, konnectivity: 7132 };
/// The controllers' ports behind them (`spec.api.port`,
/// `spec.konnectivity.agentPort`); test controllers live in their own
/// network namespaces, so these are the real ones.
pub const CONTROLLER_API_PORT: u16 = 6443;
pub const CONTROLLER_KONNECTIVITY_PORT: u16 = 8132;

impl K0sPorts {
    /// Two distinct loopback ports nobody listens on right now.
    pub fn free() -> K0sPorts {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
        let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
        K0sPorts { api: a.local_addr().unwrap().port(), konnectivity: b.local_addr().unwrap().port() }
    }
}

/// When the health checks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthPace {
    /// Exactly k0s's settings. k0s leaves Envoy's `no_traffic_interval` at its
    /// 60 s default, and Envoy schedules the check that follows one made
    /// before the cluster carried traffic with it: for about a minute after
    /// Envoy starts, a dead controller is not noticed at all.
    AsK0s,
    /// `no_traffic_interval` = the 5 s interval: how a node's Envoy that has
    /// run for more than a minute behaves, without waiting that minute.
    /// Failover comparisons use this (and say so).
    SteadyState,
}

#[derive(Clone, Debug)]
pub struct K0sNllbOptions {
    pub ports: K0sPorts,
    /// The one loopback address k0s binds (the first one `localhost`
    /// resolves to; 127.0.0.1 on most hosts).
    pub bind_ip: IpAddr,
    pub controllers: Vec<IpAddr>,
    pub api_upstream_port: u16,
    pub konnectivity_upstream_port: u16,
    pub health: HealthPace,
    /// The admin listener k0s does not have; None renders it without.
    pub admin_port: Option<u16>,
}

impl K0sNllbOptions {
    pub fn new(ports: K0sPorts, controllers: &[IpAddr]) -> K0sNllbOptions {
        K0sNllbOptions {
            ports,
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            controllers: controllers.to_vec(),
            api_upstream_port: CONTROLLER_API_PORT,
            konnectivity_upstream_port: CONTROLLER_KONNECTIVITY_PORT,
            health: HealthPace::AsK0s,
            admin_port: None,
        }
    }
}

const TEMPLATE: &str = include_str!("k0s_nllb.envoy.yaml");

/// The Envoy bootstrap for `o`.
pub fn render(o: &K0sNllbOptions) -> String {
    let endpoints = |port: u16| {
        let list: Vec<String> = o
            .controllers
            .iter()
            .map(|ip| {
                format!("{{endpoint: {{address: {{socket_address: {{address: \"{ip}\", port_value: {port}}}}}}}}}")
            })
            .collect();
        format!("[{}]", list.join(", "))
    };
    let admin = match o.admin_port {
        Some(p) => format!("admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {p} }}"),
        None => "# no admin endpoint, as k0s".to_string(),
    };
    let no_traffic = match o.health {
        HealthPace::AsK0s => "# no_traffic_interval: Envoy's default (60 s), as k0s",
        HealthPace::SteadyState => "no_traffic_interval: 5s  # steady state, see HealthPace::SteadyState",
    };
    TEMPLATE
        .replace("{{ADMIN}}", &admin)
        .replace("{{BIND_IP}}", &o.bind_ip.to_string())
        .replace("{{API_BIND_PORT}}", &o.ports.api.to_string())
        .replace("{{KONNECTIVITY_BIND_PORT}}", &o.ports.konnectivity.to_string())
        .replace("{{NO_TRAFFIC_INTERVAL}}", no_traffic)
        .replace("{{API_ENDPOINTS}}", &endpoints(o.api_upstream_port))
        .replace("{{KONNECTIVITY_ENDPOINTS}}", &endpoints(o.konnectivity_upstream_port))
}

/// A k0s ClusterConfig with the same ports, for `nllb agent --k0s-config`.
pub fn cluster_config(o: &K0sNllbOptions) -> String {
    format!(
        "apiVersion: k0s.k0sproject.io/v1beta1\nkind: ClusterConfig\nmetadata:\n  name: k0s\nspec:\n  api:\n    port: {}\n  \
         konnectivity:\n    agentPort: {}\n  network:\n    nodeLocalLoadBalancing:\n      enabled: true\n      type: EnvoyProxy\n      \
         envoyProxy:\n        apiServerBindPort: {}\n        konnectivityServerBindPort: {}\n",
        o.api_upstream_port, o.konnectivity_upstream_port, o.ports.api, o.ports.konnectivity
    )
}

/// k0s's Envoy, running; stopped (by pid) and its files removed on drop.
#[derive(Debug)]
pub struct K0sNllb {
    child: Option<Child>,
    pub opts: K0sNllbOptions,
    pub admin_port: u16,
    dir: PathBuf,
}

impl K0sNllb {
    /// Start Envoy with k0s's configuration plus an admin listener, and wait
    /// until both listeners accept and every controller passed a check.
    pub fn start(envoy: &Path, mut opts: K0sNllbOptions) -> K0sNllb {
        let admin_port = crate::free_port();
        opts.admin_port = Some(admin_port);
        let dir = std::env::temp_dir().join(unique_name("nllb-k0s-envoy-"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, render(&opts)).unwrap();
        let log = std::fs::File::create(dir.join("envoy.log")).unwrap();
        let child = envoy_command(envoy, &config, &dir.join(BASE_ID_FILE))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", envoy.display()));
        let peer = K0sNllb { child: Some(child), opts, admin_port, dir };
        let want = [peer.api_vip(), peer.konnectivity_vip()];
        let pid = peer.pid();
        let listening = wait_for(Duration::from_secs(20), || {
            let l = nllb::envoy::listeners::listening_sockets(pid).ok()?;
            want.iter().all(|a| l.contains(a)).then_some(())
        });
        assert!(listening.is_some(), "k0s's Envoy did not listen on {want:?}; log:\n{}", peer.log());
        let n = peer.opts.controllers.len() as u64;
        for cluster in ["apiserver", "konnectivity"] {
            assert!(
                peer.wait_healthy(cluster, n, Duration::from_secs(20)),
                "k0s's Envoy: {cluster} did not see {n} healthy controllers: {:?}\n{}",
                peer.stats_matching(cluster),
                peer.log()
            );
        }
        peer
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Where the API server listener is (`127.0.0.1:<api>`).
    pub fn api_vip(&self) -> SocketAddr {
        SocketAddr::new(self.opts.bind_ip, self.opts.ports.api)
    }

    pub fn konnectivity_vip(&self) -> SocketAddr {
        SocketAddr::new(self.opts.bind_ip, self.opts.ports.konnectivity)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// Every counter and gauge of the admin `/stats` page.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        let url = format!("http://127.0.0.1:{}/stats", self.admin_port);
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "3", &url])
            .output()
            .expect("run curl (cargo xtask setup installs it)");
        assert!(out.status.success(), "GET {url}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    fn stats_matching(&self, needle: &str) -> BTreeMap<String, u64> {
        self.stats().into_iter().filter(|(k, _)| k.contains(needle)).collect()
    }

    /// Connections Envoy accepted on the listener at `vip`
    /// (`listener.<ip>_<port>.downstream_cx_total`).
    pub fn downstream_connections(&self, vip: SocketAddr) -> u64 {
        let name = format!("listener.{}_{}.downstream_cx_total", vip.ip(), vip.port());
        let stats = self.stats();
        *stats.get(&name).unwrap_or_else(|| panic!("no {name} in /stats: {:?}", self.stats_matching("listener.")))
    }

    /// Wait until `cluster` counts `n` healthy members.
    pub fn wait_healthy(&self, cluster: &str, n: u64, timeout: Duration) -> bool {
        let name = format!("cluster.{cluster}.membership_healthy");
        wait_for(timeout, || (self.stats().get(&name) == Some(&n)).then_some(())).is_some()
    }

    /// Resident memory of the Envoy process.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// Where k0s's Envoy writes the base id it picked (`--base-id-path`).
pub const BASE_ID_FILE: &str = "base-id";

/// Envoy as k0s runs it: `-c <config> --use-dynamic-base-id`, default
/// concurrency (one worker per CPU) and log level. `base_id_file` records
/// the id it picks, only for [`remove_shared_memory`] after it exits.
pub fn envoy_command(envoy: &Path, config: &Path, base_id_file: &Path) -> Command {
    let mut cmd = Command::new(envoy);
    cmd.arg("-c").arg(config).arg("--use-dynamic-base-id").arg("--base-id-path").arg(base_id_file);
    cmd
}

/// Removes the shared memory region of an Envoy that has exited. With hot
/// restart on, as k0s runs it, Envoy leaves
/// `/dev/shm/envoy_shared_memory_<base id><restart epoch>` behind even after
/// a clean exit; runs never hot-restart, so the epoch is 0.
pub fn remove_shared_memory(base_id_file: &Path) {
    let id = std::fs::read_to_string(base_id_file).ok().and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(id) = id {
        let _ = std::fs::remove_file(format!("/dev/shm/envoy_shared_memory_{id}0"));
    }
}

impl Drop for K0sNllb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if wait_for(Duration::from_secs(5), || child.try_wait().ok().flatten()).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        remove_shared_memory(&self.dir.join(BASE_ID_FILE));
        if std::thread::panicking() {
            eprintln!("--- k0s's Envoy log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_k0s_settings_and_the_admin_listener_only_when_asked() {
        let controllers: Vec<IpAddr> = vec!["198.18.10.2".parse().unwrap(), "198.18.11.2".parse().unwrap()];
        let mut o = K0sNllbOptions::new(K0sPorts { api: 17443, konnectivity: 17132 }, &controllers);
        let text = render(&o);
        assert!(!text.contains("{{"), "every placeholder is replaced:\n{text}");
        assert!(!text.contains("\nadmin:"), "k0s's Envoy has no admin endpoint:\n{text}");
        let v: serde_json::Value = yaml(&text);
        let clusters = &v["static_resources"]["clusters"];
        assert_eq!(clusters[0]["lb_policy"], "RANDOM");
        assert_eq!(clusters[1]["lb_policy"], "ROUND_ROBIN");
        for c in clusters.as_array().unwrap() {
            assert_eq!(c["connect_timeout"], "0.25s");
            let hc = &c["health_checks"][0];
            assert_eq!((&hc["interval"], &hc["timeout"]), (&"5s".into(), &"1s".into()));
            assert_eq!((&hc["unhealthy_threshold"], &hc["healthy_threshold"]), (&5.into(), &3.into()));
            assert!(hc.get("no_traffic_interval").is_none());
            assert!(c.get("outlier_detection").is_none());
        }
        let eps = &clusters[1]["load_assignment"]["endpoints"][0]["lb_endpoints"];
        assert_eq!(eps[1]["endpoint"]["address"]["socket_address"]["address"], "198.18.11.2");
        assert_eq!(eps[1]["endpoint"]["address"]["socket_address"]["port_value"], 8132);
        assert_eq!(v["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"], 17443);

        o.admin_port = Some(19901);
        o.health = HealthPace::SteadyState;
        let v = yaml(&render(&o));
        assert_eq!(v["admin"]["address"]["socket_address"]["port_value"], 19901);
        assert_eq!(v["static_resources"]["clusters"][0]["health_checks"][0]["no_traffic_interval"], "5s");
    }

    /// YAML through the JSON value the assertions compare with.
    fn yaml(text: &str) -> serde_json::Value {
        serde_saphyr::from_str(text).expect("rendered config is YAML")
    }
}
