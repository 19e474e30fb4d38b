//! `services:` and `backends:`, the agent's own keys, and the rules that
//! span them: names and virtual addresses are unique across services (also
//! those derived from `--k0s-config`).

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{
    addr::{BackendAddr, VirtualAddr},
    errors::ConfigError,
    model::Service,
    rebalance::RebalanceOverride,
};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<VirtualAddr>,
    pub backend_port: u32,
    /// What this service sets differently from `rebalance:`.
    #[serde(default)]
    pub rebalance: Option<RebalanceOverride>,
}

/// The services as the datapath needs them: `derived` (already valid)
/// first, then the file's.
pub(super) fn validate(file: &[ServiceConfig], derived: Vec<Service>) -> Result<Vec<Service>, ConfigError> {
    if file.is_empty() && derived.is_empty() {
        return Err(ConfigError::new(
            "services",
            "at least one service is needed (or pass --k0s-config to derive them)",
        ));
    }
    let mut names: HashSet<String> = derived.iter().map(|s| s.name.clone()).collect();
    let mut vips: HashSet<SocketAddr> = derived.iter().flat_map(|s| s.listen.iter().copied()).collect();
    let mut services = derived;
    for (i, s) in file.iter().enumerate() {
        let field = format!("services[{i}]");
        if !valid_name(&s.name) {
            return Err(ConfigError::new(
                format!("{field}.name"),
                format!("{:?} is not a valid name: use 1-32 characters a-z, 0-9 and '-'", s.name),
            ));
        }
        if !names.insert(s.name.clone()) {
            return Err(ConfigError::new(
                format!("{field}.name"),
                format!(
                    "service {:?} is defined twice (or also derived from --k0s-config); names must be unique",
                    s.name
                ),
            ));
        }
        if s.listen.is_empty() {
            return Err(ConfigError::new(
                format!("{field}.listen"),
                "needs at least one virtual address such as \"127.0.0.1:7443\"",
            ));
        }
        for (j, addr) in s.listen.iter().enumerate() {
            if !vips.insert(addr.get()) {
                return Err(ConfigError::new(
                    format!("{field}.listen[{j}]"),
                    format!("{addr} is listed more than once; each virtual address belongs to one service"),
                ));
            }
        }
        let backend_port = u16::try_from(s.backend_port).ok().filter(|p| *p != 0).ok_or_else(|| {
            ConfigError::new(
                format!("{field}.backendPort"),
                format!("{} is not a port: use 1-65535 (the controllers' port, e.g. 6443)", s.backend_port),
            )
        })?;
        services.push(Service {
            name: s.name.clone(),
            listen: s.listen.iter().map(|a| a.get()).collect(),
            backend_port,
        });
    }
    if services.len() > nllb_common::MAX_SERVICES as usize {
        return Err(ConfigError::new(
            "services",
            format!("at most {} services are supported", nllb_common::MAX_SERVICES),
        ));
    }
    Ok(services)
}

/// Controller IPs from `field`, duplicates dropped. (No backend can be a
/// virtual address: those are loopback, which [`BackendAddr`] refuses.)
pub(super) fn backends(list: &[BackendAddr], field: &str) -> Result<Vec<IpAddr>, ConfigError> {
    let mut out: Vec<IpAddr> = Vec::new();
    for b in list {
        if !out.contains(&b.get()) {
            out.push(b.get());
        }
    }
    if out.len() > nllb_common::MAX_BACKENDS as usize {
        return Err(ConfigError::new(field, format!("at most {} backends are supported", nllb_common::MAX_BACKENDS)));
    }
    Ok(out)
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 32 && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
