//! The agent's YAML config: its keys are a contract with operators, so they
//! are parsed strictly (unknown keys are errors) and validated before the
//! agent touches the machine.
//!
//! This module only composes: each subsystem owns its section and its
//! checks (`health:` in [`crate::health`], `discovery:` in
//! [`crate::discovery`], `envoy:` in [`crate::envoy`], `passive:` in
//! [`crate::passive`], `rebalance:` and `services[].rebalance` in
//! [`crate::rebalance`]), addresses are checked by [`crate::addr`], and errors
//! are [`crate::errors::ConfigError`]. Nothing here is imported back by
//! them. What is left here are the agent's own top-level keys.

mod services;

use std::{fmt, net::SocketAddr, path::Path};

use serde::{Deserialize, Serialize};

pub use crate::errors::ConfigError;
use crate::{
    addr::BackendAddr, discovery::DiscoveryConfig, envoy::EnvoyConfig, health::HealthConfig, model::Service,
    passive::PassiveConfig,
    rebalance::{RebalanceConfig, RebalanceSettings},
};
pub use services::ServiceConfig;

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
    pub backends: Vec<BackendAddr>,
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
    pub rebalance: RebalanceConfig,
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Remove the datapath when the agent exits (default: keep it serving).
    #[serde(default)]
    pub detach_on_exit: bool,
}

fn yes() -> bool {
    true
}

/// A validated config: everything the agent needs, in typed form.
#[derive(Clone, Debug)]
pub struct Config {
    pub services: Vec<Service>,
    pub backends: Vec<std::net::IpAddr>,
    pub host_network_only: bool,
    pub mode: Option<Mode>,
    pub health: HealthConfig,
    pub passive: PassiveConfig,
    pub discovery: DiscoveryConfig,
    pub envoy: EnvoyConfig,
    pub rebalance: RebalanceSettings,
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
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("--config", format!("cannot read {}: {e}", path.display())))?;
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
        let file: ConfigFile = crate::yaml::from_str(text)?;
        file.validate_with(derived)
    }
}

impl ConfigFile {
    pub fn validate(self) -> Result<Config, ConfigError> {
        self.validate_with(Vec::new())
    }

    /// `derived`: already valid services from elsewhere (a k0s config).
    pub fn validate_with(self, derived: Vec<Service>) -> Result<Config, ConfigError> {
        let services = services::validate(&self.services, derived)?;
        let backends = services::backends(&self.backends, "backends")?;
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
        let overrides = self
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((format!("services[{i}].rebalance"), s.name.as_str(), s.rebalance.as_ref()?)));
        let rebalance = self.rebalance.compose(overrides)?;
        Ok(Config {
            services,
            backends,
            host_network_only: self.host_network_only,
            mode: self.mode,
            health: self.health,
            passive: self.passive,
            discovery: self.discovery,
            envoy: self.envoy,
            rebalance,
            metrics_addr,
            detach_on_exit: self.detach_on_exit,
        })
    }
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
        assert_eq!(e.field, "services[0].lisen");
        assert!(e.message.contains("unknown field `lisen`") && e.message.contains("listen"), "{e}");
    }

    #[test]
    fn non_loopback_vip_is_rejected() {
        let e = err("services:\n  - name: a\n    listen: [\"10.0.0.1:7443\"]\n    backendPort: 6443\n");
        assert_eq!(e.field, "services[0].listen[0]");
        assert!(e.message.contains("loopback"));
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
    fn rebalance_is_global_with_per_service_overrides_checked_against_it() {
        let c = Config::parse(&format!("{GOOD}rebalance:\n  maxPerMinute: 6\n  healthyFor: 30s\n")).unwrap();
        assert_eq!(c.rebalance.service("apiserver").max_per_minute, 6);
        let konnectivity = |rebalance: &str| {
            GOOD.replace("    backendPort: 8132\n", &format!("    backendPort: 8132\n    rebalance: {rebalance}\n"))
        };
        let c = Config::parse(&konnectivity("{enabled: false}")).unwrap();
        assert!(!c.rebalance.service("konnectivity").enabled && c.rebalance.service("apiserver").enabled);
        let e = err(&konnectivity("{maxPerMinute: 60}"));
        assert_eq!(e.field, "services[1].rebalance.maxPerMinute");
        let e = err(&format!("{GOOD}rebalance:\n  margin: -1\n"));
        assert_eq!(e.field, "rebalance.margin");
        let e = err(&konnectivity("{healthyFor: 1s}"));
        assert_eq!(e.field, "services[1].rebalance.healthyFor", "only the global section has it: {e}");
    }

    #[test]
    fn bad_service_name_is_rejected() {
        let e = err("services:\n  - name: Api_Server\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 1\n");
        assert_eq!(e.field, "services[0].name");
    }
}
