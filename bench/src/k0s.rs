//! The k0s rows: k0s's own node-local load balancer ("k0s NLLB": Envoy with
//! the configuration k0s generates, rendered by `nllb_tests::k0s_nllb`),
//! and the same Envoy with nllb in place in front of it (the real agent on
//! the same virtual addresses: connects from its cgroup skip Envoy).
//!
//! The benchmark's two services map onto k0s's two listeners: the echo
//! workloads use the API server listener (RANDOM, upstream :6443) and the
//! bulk download uses the konnectivity listener (ROUND_ROBIN, upstream :6444
//! here instead of 8132).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use nllb_tests::k0s_nllb::{self, HealthPace, K0sNllbOptions, K0sPorts};

use crate::{
    backend::{BULK_PORT, ECHO_PORT},
    nllb_paths::Nllb,
    paths::{PathInfo, PathUnderTest},
    proxies::Proc,
};

pub const ENVOY_ID: &str = "k0s-nllb";
pub const ENVOY_LABEL: &str = "k0s NLLB (Envoy, k0s settings)";
pub const IN_PLACE_ID: &str = "k0s-nllb-inplace";
pub const IN_PLACE_LABEL: &str = "k0s NLLB + nllb in place";

/// k0s's Envoy on free loopback ports (production: 7443/7132).
fn start_envoy(
    envoy: &Path,
    dir: &Path,
    tag: &str,
    backends: &[Ipv4Addr],
    health: HealthPace,
    cpu: Option<usize>,
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let mut o = K0sNllbOptions::new(
        K0sPorts::free(),
        &backends.iter().map(|b| (*b).into()).collect::<Vec<_>>(),
    );
    o.api_upstream_port = ECHO_PORT;
    o.konnectivity_upstream_port = BULK_PORT;
    o.health = health;
    let cfg = dir.join(format!("{tag}.yaml"));
    std::fs::write(&cfg, k0s_nllb::render(&o))?;
    let log = dir.join(format!("{tag}.log"));
    let base_id = dir.join(format!("{tag}.{}", k0s_nllb::BASE_ID_FILE));
    let cmd = k0s_nllb::envoy_command(envoy, &cfg, &base_id);
    let mut p = Proc::spawn(tag, cmd, &log, cpu)?;
    p.after_exit = Some(Box::new(move || k0s_nllb::remove_shared_memory(&base_id)));
    let api = SocketAddr::from(([127, 0, 0, 1], o.ports.api));
    let bulk = SocketAddr::from(([127, 0, 0, 1], o.ports.konnectivity));
    p.wait_listening(api, &log)?;
    p.wait_listening(bulk, &log)?;
    Ok((p, api, bulk))
}

fn health_note(health: HealthPace) -> &'static str {
    match health {
        HealthPace::AsK0s => "",
        HealthPace::SteadyState => {
            " (no_traffic_interval set to 5 s to measure the steady state; k0s keeps Envoy's 60 s default, \
             which slows detection in the first minute after Envoy starts)"
        }
    }
}

/// What both rows start from: the run's Envoy, directories, backends and
/// core (Envoy and the agent run there), and k0s's health-check pace.
pub struct Setup<'a> {
    pub nllb: &'a Nllb<'a>,
    pub health: HealthPace,
}

/// "k0s NLLB (Envoy, k0s settings)": clients in `cgroup` (nothing attached).
pub fn envoy_path(s: &Setup<'_>, tag: &str, cgroup: &Path) -> PathUnderTest {
    let (health, n) = (s.health, s.nllb);
    let Some(envoy) = n.envoy else {
        return PathUnderTest::unavailable(ENVOY_ID, ENVOY_LABEL, "no Envoy binary".into());
    };
    match start_envoy(envoy, n.dir, tag, n.backends, health, n.cpu) {
        Ok((p, api, bulk)) => PathUnderTest {
            info: PathInfo {
                id: ENVOY_ID.into(),
                label: ENVOY_LABEL.into(),
                available: true,
                note: Some(format!(
                    "Envoy with the configuration k0s generates (tests/src/k0s_nllb.envoy.yaml): tcp_proxy, STATIC, \
                     RANDOM (API server) / ROUND_ROBIN (konnectivity, carries the bulk workload), connect_timeout 0.25 s, \
                     TCP checks 5 s / 1 s / healthy 3 / unhealthy 5{}, default concurrency (one worker per CPU)",
                    health_note(health)
                )),
            },
            api,
            bulk,
            cgroup: cgroup.to_path_buf(),
            proc: Some(p),
            pin: None,
            cleanup: None,
        },
        Err(e) => PathUnderTest::unavailable(ENVOY_ID, ENVOY_LABEL, format!("{e:#}")),
    }
}

/// "k0s NLLB + nllb in place": k0s's Envoy plus `nllb agent` (eBPF, default
/// settings) on the same virtual addresses, attached to `cgroup`, where the
/// clients run. The path's process is the agent (its CPU and RSS); Envoy
/// runs beside it, idle for these clients, and stops with the path.
pub fn in_place_path(s: &Setup<'_>, tag: &str, cgroup: &Path) -> PathUnderTest {
    let (health, n) = (s.health, s.nllb);
    let r = (|| {
        let envoy = n.envoy.ok_or_else(|| anyhow::anyhow!("no Envoy binary"))?;
        let (k0s, api, bulk) = start_envoy(
            envoy,
            n.dir,
            &format!("{tag}-envoy"),
            n.backends,
            health,
            n.cpu,
        )?;
        let note = format!(
            "k0s's Envoy as in the row above{} on {api} and {bulk}, with the real `nllb agent` (eBPF, default settings) \
             on the same addresses in front of it; CPU/RSS are the agent's, k0s's Envoy (idle for these clients) \
             adds its own RSS",
            health_note(health)
        );
        let mut path = n.ebpf_agent(tag, cgroup, api, bulk, IN_PLACE_ID, IN_PLACE_LABEL, note)?;
        // Envoy goes after the agent has gone and its pins are removed.
        let uninstall = path.cleanup.take();
        path.cleanup = Some(Box::new(move || {
            if let Some(u) = uninstall {
                u();
            }
            drop(k0s);
        }));
        anyhow::Ok(path)
    })();
    r.unwrap_or_else(|e| PathUnderTest::unavailable(IN_PLACE_ID, IN_PLACE_LABEL, format!("{e:#}")))
}

/// Whether `--only` names one of these rows (`k0s` selects both).
pub fn selected(only: &str, id: &str) -> bool {
    only == "k0s" && id.starts_with("k0s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_goes_through_the_konnectivity_listener_to_the_bulk_port() {
        let mut o = K0sNllbOptions::new(
            K0sPorts {
                api: 1000,
                konnectivity: 1001,
            },
            &["198.19.200.2".parse().unwrap()],
        );
        o.api_upstream_port = ECHO_PORT;
        o.konnectivity_upstream_port = BULK_PORT;
        let v: serde_json::Value = serde_yaml::from_str(&k0s_nllb::render(&o)).unwrap();
        let c = &v["static_resources"]["clusters"];
        let port = |i: usize| {
            c[i]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"].clone()
        };
        assert_eq!((port(0), port(1)), (ECHO_PORT.into(), BULK_PORT.into()));
        assert!(
            v.get("admin").is_none(),
            "k0s's Envoy has no admin endpoint"
        );
    }
}
