//! The agent's YAML config: its keys are a contract with operators, so they
//! are parsed strictly (unknown keys are errors) and validated before the
//! agent touches the machine.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    discovery::DiscoveryConfig, envoy::EnvoyConfig, health::HealthConfig, model::Service, passive::PassiveConfig,
};

/// A config problem: which field, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The in-kernel datapath when the kernel and privileges allow it, else Envoy.
    #[default]
    Auto,
    Ebpf,
    Envoy,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Ebpf => "ebpf",
            Mode::Envoy => "envoy",
        })
    }
}

/// The file as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigFile {
    /// May be empty when `--k0s-config` derives the services.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    #[serde(default)]
    pub backends: Vec<String>,
    #[serde(default = "yes")]
    pub host_network_only: bool,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub passive: PassiveConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub envoy: EnvoyConfig,
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Remove the datapath when the agent exits (default: keep it serving).
    #[serde(default)]
    pub detach_on_exit: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<String>,
    pub backend_port: u32,
}

/// A validated config: everything the agent needs, in typed form.
#[derive(Clone, Debug)]
pub struct Config {
    pub services: Vec<Service>,
    pub backends: Vec<IpAddr>,
    pub host_network_only: bool,
    pub mode: Option<Mode>,
    pub health: HealthConfig,
    pub passive: PassiveConfig,
    pub discovery: DiscoveryConfig,
    pub envoy: EnvoyConfig,
    pub metrics_addr: Option<SocketAddr>,
    pub detach_on_exit: bool,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, None)
    }

    /// The config file, plus the services a k0s cluster config derives
    /// (`--k0s-config`), which come first.
    pub fn load_with(path: &Path, k0s_config: Option<&Path>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        let derived = match k0s_config {
            Some(k) => crate::k0s::services_from_k0s(k)?,
            None => Vec::new(),
        };
        Self::parse_with(&text, derived)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_with(text, Vec::new())
    }

    pub fn parse_with(text: &str, derived: Vec<Service>) -> Result<Config, ConfigError> {
        let file: ConfigFile = serde_yaml::from_str(text).map_err(yaml_error)?;
        file.validate_with(derived)
    }
}

fn yaml_error(e: serde_yaml::Error) -> ConfigError {
    // serde_yaml prefixes the message with the path of the offending field
    // ("services[0]: unknown field `x`..."); keep it as the field name.
    let text = e.to_string();
    match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => ConfigError::new(path, rest),
        _ => ConfigError::new("(document)", text),
    }
}

impl ConfigFile {
    pub fn validate(self) -> Result<Config, ConfigError> {
        self.validate_with(Vec::new())
    }

    /// `derived`: already valid services from elsewhere (a k0s config).
    pub fn validate_with(self, derived: Vec<Service>) -> Result<Config, ConfigError> {
        if self.services.is_empty() && derived.is_empty() {
            return Err(ConfigError::new(
                "services",
                "at least one service is needed (or pass --k0s-config to derive them)",
            ));
        }
        let mut names: HashSet<String> = derived.iter().map(|s| s.name.clone()).collect();
        let mut vips: HashSet<SocketAddr> = derived.iter().flat_map(|s| s.listen.iter().copied()).collect();
        let mut services = derived;
        for (i, s) in self.services.iter().enumerate() {
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
                    format!("service {:?} is defined twice (or also derived from --k0s-config); names must be unique", s.name),
                ));
            }
            if s.listen.is_empty() {
                return Err(ConfigError::new(
                    format!("{field}.listen"),
                    "needs at least one virtual address such as \"127.0.0.1:7443\"",
                ));
            }
            let mut listen = Vec::new();
            for (j, l) in s.listen.iter().enumerate() {
                let lf = format!("{field}.listen[{j}]");
                let addr = parse_vip(l).map_err(|m| ConfigError::new(&lf, m))?;
                if !vips.insert(addr) {
                    return Err(ConfigError::new(
                        lf,
                        format!("{addr} is listed more than once; each virtual address belongs to one service"),
                    ));
                }
                listen.push(addr);
            }
            let backend_port = u16::try_from(s.backend_port).ok().filter(|p| *p != 0).ok_or_else(|| {
                ConfigError::new(
                    format!("{field}.backendPort"),
                    format!("{} is not a port: use 1-65535 (the controllers' port, e.g. 6443)", s.backend_port),
                )
            })?;
            services.push(Service { name: s.name.clone(), listen, backend_port });
        }
        if services.len() > nllb_common::MAX_SERVICES as usize {
            return Err(ConfigError::new(
                "services",
                format!("at most {} services are supported", nllb_common::MAX_SERVICES),
            ));
        }
        let vip_ips: HashSet<IpAddr> = vips.iter().map(|a| a.ip()).collect();
        let backends = parse_backends(&self.backends, "backends", &vip_ips)?;
        let metrics_addr = self
            .metrics_addr
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| {
                    ConfigError::new("metricsAddr", format!("{a:?} is not an address:port such as 127.0.0.1:9542"))
                })
            })
            .transpose()?;
        self.health.validate()?;
        self.discovery.validate()?;
        self.envoy.validate()?;
        self.passive.validate()?;
        Ok(Config {
            services,
            backends,
            host_network_only: self.host_network_only,
            mode: self.mode,
            health: self.health,
            passive: self.passive,
            discovery: self.discovery,
            envoy: self.envoy,
            metrics_addr,
            detach_on_exit: self.detach_on_exit,
        })
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A virtual address: loopback IP and a non-zero port. `[::ffff:127.x]`
/// is taken as its IPv4 form, which is what connect6 matches on.
pub fn parse_vip(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        format!("{text:?} is not an address:port; write \"127.0.0.1:7443\" or \"[::1]:7443\"")
    })?;
    let ip = canonical_ip(addr.ip());
    if !ip.is_loopback() {
        return Err(format!(
            "{text:?} is not a loopback address; virtual addresses must be in 127.0.0.0/8 or ::1"
        ));
    }
    if addr.port() == 0 {
        return Err(format!("{text:?} has port 0; use the port clients dial, e.g. 7443"));
    }
    Ok(SocketAddr::new(ip, addr.port()))
}

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Controller addresses: IPs that are neither loopback nor a virtual address
/// nor unspecified; duplicates are dropped.
pub fn parse_backends(list: &[String], field: &str, vips: &HashSet<IpAddr>) -> Result<Vec<IpAddr>, ConfigError> {
    let mut out: Vec<IpAddr> = Vec::new();
    for (i, b) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let ip = validate_backend(b).map_err(|m| ConfigError::new(&f, m))?;
        if vips.contains(&ip) {
            return Err(ConfigError::new(f, format!("{b:?} is a virtual address; a backend must be a controller")));
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    if out.len() > nllb_common::MAX_BACKENDS as usize {
        return Err(ConfigError::new(
            field,
            format!("at most {} backends are supported", nllb_common::MAX_BACKENDS),
        ));
    }
    Ok(out)
}

/// One controller address (also used for addresses from the API server).
pub fn validate_backend(text: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address; write a controller IP such as 198.18.1.2"))?;
    let ip = canonical_ip(ip);
    if ip.is_loopback() {
        return Err(format!("{text:?} is loopback; a backend must be a controller's address, not a local one"));
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{text:?} cannot be a backend; use a controller's unicast address"));
    }
    Ok(ip)
}

/// Where the per-agent files go.
#[derive(Clone, Debug)]
pub struct Paths {
    pub pin_path: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: apiserver
    listen: ["127.0.0.1:7443", "[::1]:7443"]
    backendPort: 6443
  - name: konnectivity
    listen: ["127.0.0.1:7132"]
    backendPort: 8132
backends: ["198.18.1.2", "198.18.2.2", "2001:db8::1"]
hostNetworkOnly: true
"#;

    fn err(text: &str) -> ConfigError {
        Config::parse(text).expect_err("config should be rejected")
    }

    #[test]
    fn accepts_the_documented_example() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].listen[1], "[::1]:7443".parse().unwrap());
        assert_eq!(c.services[1].backend_port, 8132);
        assert_eq!(c.backends.len(), 3);
        assert!(c.host_network_only);
        assert!(c.passive.enabled);
    }

    #[test]
    fn unknown_key_names_the_field() {
        let e = err("services:\n  - name: a\n    lisen: [\"127.0.0.1:1\"]\n    backendPort: 1\n");
        assert_eq!(e.field, "services[0]");
        assert!(e.message.contains("unknown field `lisen`"), "{e}");
    }

    #[test]
    fn non_loopback_vip_is_rejected() {
        let e = err("services:\n  - name: a\n    listen: [\"10.0.0.1:7443\"]\n    backendPort: 6443\n");
        assert_eq!(e.field, "services[0].listen[0]");
        assert!(e.message.contains("loopback"));
    }

    #[test]
    fn mapped_loopback_vip_is_its_ipv4_form() {
        assert_eq!(parse_vip("[::ffff:127.0.0.1]:7443").unwrap(), "127.0.0.1:7443".parse().unwrap());
    }

    #[test]
    fn duplicate_listen_is_rejected_across_services() {
        let e = err(
            "services:\n  - name: a\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 1\n  - name: b\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 2\n",
        );
        assert_eq!(e.field, "services[1].listen[0]");
    }

    #[test]
    fn bad_ports_are_rejected() {
        let e = err("services:\n  - name: a\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 70000\n");
        assert_eq!(e.field, "services[0].backendPort");
        let e = err("services:\n  - name: a\n    listen: [\"127.0.0.1:0\"]\n    backendPort: 1\n");
        assert_eq!(e.field, "services[0].listen[0]");
    }

    #[test]
    fn loopback_or_vip_backend_is_rejected() {
        let base = "services:\n  - name: a\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 1\n";
        let e = err(&format!("{base}backends: [\"198.18.1.2\", \"127.0.0.5\"]\n"));
        assert_eq!(e.field, "backends[1]");
        let e = err(&format!("{base}backends: [\"::1\"]\n"));
        assert_eq!(e.field, "backends[0]");
        let e = err(&format!("{base}backends: [\"not-an-ip\"]\n"));
        assert_eq!(e.field, "backends[0]");
    }

    #[test]
    fn bad_service_name_is_rejected() {
        let e = err("services:\n  - name: Api_Server\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 1\n");
        assert_eq!(e.field, "services[0].name");
    }
}

fn yes() -> bool {
    true
}
