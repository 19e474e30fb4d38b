//! What the agent serves, independent of how (eBPF or Envoy).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::Serialize;

/// A service from the config: virtual addresses and the controllers' port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub backend_port: u16,
}

/// One service as a datapath must serve it right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePlan {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    /// Backends that take new connects (healthy ones, or all in panic mode).
    pub backends: Vec<SocketAddr>,
    /// Every backend probes say is down, so all known ones are published.
    pub panic: bool,
}

/// What the agent knows of a backend beyond its address. A datapath uses
/// what it can (the kernel datapath uses all of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackendFacts {
    /// Retransmission timeout for the first SYN of a connect sent there
    /// (`passive.synTimeout`); None keeps the kernel's default.
    pub syn_timeout: Option<Duration>,
    /// CLOCK_MONOTONIC ns at which probes last saw it come back: passive
    /// marks older than this no longer count.
    pub recovered_at_ns: u64,
    /// Share of new connects relative to the service's other backends
    /// (0 and 1 both mean an even share).
    pub weight: u32,
}

/// Everything a datapath serves; `apply` always gets the whole plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
    /// Facts about backends of `services`; a backend missing here has the
    /// defaults.
    pub backends: BTreeMap<SocketAddr, BackendFacts>,
}

impl Plan {
    /// All services sending to every given controller address, no health
    /// filtering: the plan for static backends.
    pub fn all_backends(services: &[Service], backends: &[IpAddr]) -> Plan {
        Plan {
            services: services
                .iter()
                .map(|s| ServicePlan {
                    name: s.name.clone(),
                    listen: s.listen.clone(),
                    backends: backends.iter().map(|ip| SocketAddr::new(*ip, s.backend_port)).collect(),
                    panic: false,
                })
                .collect(),
            backends: BTreeMap::new(),
        }
    }
}
