//! What the agent serves, independent of how (eBPF or Envoy).

use std::net::{IpAddr, SocketAddr};

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

/// Everything a datapath serves; `apply` always gets the whole plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
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
        }
    }
}
