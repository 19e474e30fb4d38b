//! Per-connect cost as the tables grow: one service with 1 to 64 backends,
//! and 1 to 256 services. nllb's own datapath code (the library the agent
//! runs) publishes every size at once, each on a cgroup of the benchmark's
//! own, and one client measures them side by side; the
//! backends are extra addresses of one simulated controller, so every
//! connect is answered.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use nllb::{
    datapath::{
        Datapath,
        ebpf::{EbpfDatapath, EbpfOptions},
    },
    model::{BackendFacts, Plan, ServicePlan},
};
use nllb_common::{MAX_BACKENDS, MAX_SERVICES};
use nllb_tests::{TestCgroup, TestHost};

use crate::{
    backend::ECHO_PORT,
    bpfstats::StatsEnabled,
    kernel_cost::{Case, interleaved},
    results::ScalePoint,
};

pub const BACKENDS: [u32; 7] = [1, 2, 4, 8, 16, 32, 64];
pub const SERVICES: [u32; 5] = [1, 4, 16, 64, 256];
/// The services axis when the client connects to one service of the n.
pub const ONE_OF_N: &str = "services-one";
/// Backends of each service on the services axis.
const BACKENDS_PER_SERVICE: usize = 3;
const _: () = assert!(
    BACKENDS[BACKENDS.len() - 1] == MAX_BACKENDS && SERVICES[SERVICES.len() - 1] == MAX_SERVICES
);

/// Virtual address of service `i`: 127.77.0.0/16, which nothing else uses.
pub fn vip(i: u32) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 77, 0, 1)) + i),
        7443,
    ))
}

/// `n` addresses of `host` (its own .2 and more in its /24), each answered
/// by the host's echo server (it listens on all addresses).
fn backend_addrs(host: &TestHost, n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let IpAddr::V4(v4) = host.v4 else {
        bail!("host without an IPv4 address")
    };
    let [a, b, c, _] = v4.octets();
    let dev = format!("{}p", host.veth);
    let mut out = vec![SocketAddr::new(host.v4, ECHO_PORT)];
    for i in 0..n.saturating_sub(1) {
        let ip = Ipv4Addr::new(a, b, c, 10 + i as u8);
        host.netns
            .exec("ip", &["addr", "add", &format!("{ip}/24"), "dev", &dev]);
        out.push(SocketAddr::from((ip, ECHO_PORT)));
    }
    Ok(out)
}

pub fn plan(services: u32, backends: &[SocketAddr]) -> Plan {
    Plan {
        services: (0..services)
            .map(|i| ServicePlan {
                // Service 0 keeps its name across sizes, so it is never
                // removed and re-added between points.
                name: format!("svc-{i}"),
                listen: vec![vip(i)],
                backends: backends.to_vec(),
                panic: false,
            })
            .collect(),
        // The SYN timeout the agent publishes for a controller this close.
        backends: backends
            .iter()
            .map(|b| {
                (
                    *b,
                    BackendFacts {
                        syn_timeout: Some(Duration::from_millis(50)),
                        ..Default::default()
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

/// nllb's datapath on a cgroup of the benchmark's own, pinned at `pin`.
/// Removes the pins (and so detaches the programs) on drop, also on error.
pub struct Installed(pub EbpfDatapath, pub PathBuf);

impl Installed {
    /// `name` tells this run's datapaths apart in bpffs.
    pub fn new(cgroup: &Path, name: &str, plan: &Plan) -> anyhow::Result<Installed> {
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/nllb-bench-{}-{name}",
            std::process::id()
        ));
        let dp = EbpfDatapath::install(
            EbpfOptions {
                cgroup: cgroup.to_path_buf(),
                pin_path: pin.clone(),
                host_network_only: true,
                passive: true,
                eject_hold: Duration::from_secs(10),
                syn_retries: 2,
            },
            plan,
        )
        .with_context(|| format!("installing nllb's datapath on the {name} cgroup"))?;
        Ok(Installed(dp, pin))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("warning: scale datapath not removed: {e}");
        }
    }
}

pub fn measure(
    host: &TestHost,
    cpu: Option<usize>,
    quick: bool,
) -> anyhow::Result<Vec<ScalePoint>> {
    let _stats = StatsEnabled::new()?;
    let all = backend_addrs(host, MAX_BACKENDS as usize)?;
    let per_point = if quick { 1_500 } else { 20_000 };
    // (axis, n, services published, backends each, services connected to)
    let points: Vec<(&str, u32, u32, usize, u32)> = BACKENDS
        .iter()
        .map(|&n| ("backends", n, 1, n as usize, 1))
        .chain(
            SERVICES
                .iter()
                .map(|&n| ("services", n, n, BACKENDS_PER_SERVICE, n)),
        )
        // Connects to every service in turn meet each service's lines cold
        // (the client comes back to one only after n other connects); to
        // one service of the n published, what the table's size alone costs.
        .chain(
            SERVICES
                .iter()
                .map(|&n| (ONE_OF_N, n, n, BACKENDS_PER_SERVICE, 1)),
        )
        .collect();
    // Every size is published at once, each on a cgroup of its own (the run
    // time figures are per program, so per cgroup), and one client
    // interleaves them all: measured one after another, a full run on a
    // quiet machine showed sizes alternating ~40% apart (the machine's slow
    // and fast stretches, not size), which side by side cancels.
    let mut installed = Vec::with_capacity(points.len());
    let mut cases = Vec::with_capacity(points.len());
    for &(axis, n, services, backends, dialed) in &points {
        let cg = TestCgroup::new();
        let dp = Installed::new(
            cg.path(),
            &format!("scale-{axis}-{n}"),
            &plan(services, &all[..backends]),
        )
        .with_context(|| format!("publishing {n} {axis}"))?;
        // The last published services: for one of n, the newest.
        let targets = (services - dialed..services).map(vip).collect();
        cases.push(Case::new(
            "scale",
            format!("{n} {axis}"),
            cg.path(),
            targets,
        ));
        // Datapath first: a tuple drops in field order, so its programs
        // detach (pins removed) before its cgroup goes, on error too.
        installed.push((dp, cg));
    }
    let measured = interleaved(&cases, per_point, cpu, true)?;
    drop(installed);
    Ok(points
        .iter()
        .zip(measured)
        .map(|(&(axis, n, ..), case)| {
            let split: Vec<String> = case
                .programs
                .iter()
                .map(|p| {
                    let per = p.run_time_ns / case.connects.max(1);
                    format!("{} {per}", p.attach_type.trim_start_matches("cgroup_"))
                })
                .collect();
            eprintln!(
                "   {n:>3} {axis:<12} {:.0} ns per connect ({})",
                case.ns_per_connect(),
                split.join(", ")
            );
            ScalePoint {
                axis: axis.into(),
                n,
                case,
            }
        })
        .collect())
}
