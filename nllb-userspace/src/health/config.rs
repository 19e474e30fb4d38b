use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::errors::ConfigError;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// A TCP connect that completes within the timeout.
    #[default]
    Tcp,
    /// A TLS handshake and `GET /readyz` answered with 200.
    Https,
}

/// `health:` in the config.
///
/// Defaults eject a blackholed controller in about 1.25 s: `fall` = 2 failed
/// probes, 500 ms apart, the second timing out after 250 ms. Two failures
/// rather than one so a single lost SYN does not eject a healthy controller;
/// 250 ms is far above an in-cluster RTT yet short enough that a dead
/// controller is noticed quickly. `rise` = 2 keeps a flapping controller from
/// taking traffic on one lucky probe.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub probe: ProbeKind,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Path probed by `probe: https`.
    #[serde(default = "default_path")]
    pub path: String,
    /// PEM CA bundle that signs the controllers' serving certificates.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Take the CA from this kubeconfig's cluster entry instead (the cluster
    /// of its current-context, else its first cluster). `caFile` wins when
    /// both are set.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Client certificate and key (PEM) when the API server requires one.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// TLS server name to verify; defaults to the controller's IP.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Close established sockets to a backend removed from the set.
    #[serde(default = "yes")]
    pub destroy_on_remove: bool,
    /// Close established sockets to a backend that probes eject. Off by
    /// default: probes can be wrong while established streams still work
    /// (a slow `/readyz`, a probe path blocked by a firewall), and cutting
    /// every watch of every node at once on a false verdict would cause a
    /// reconnect storm against the remaining controllers. A controller that
    /// is really gone resets or times those streams out anyway.
    #[serde(default)]
    pub destroy_on_eject: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        crate::yaml::from_str("{}").expect("the defaults parse")
    }
}

impl HealthConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval < Duration::from_millis(50) {
            return Err(ConfigError::new("health.interval", "must be at least 50ms, e.g. 500ms"));
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            return Err(ConfigError::new(
                "health.timeout",
                "must be more than 0 and at most health.interval, e.g. 250ms",
            ));
        }
        if self.rise == 0 || self.rise > 100 {
            return Err(ConfigError::new("health.rise", "must be between 1 and 100, e.g. 2"));
        }
        if self.fall == 0 || self.fall > 100 {
            return Err(ConfigError::new("health.fall", "must be between 1 and 100, e.g. 2"));
        }
        if !self.path.starts_with('/') {
            return Err(ConfigError::new("health.path", "must start with '/', e.g. /readyz"));
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(ConfigError::new(
                "health.clientCertFile",
                "clientCertFile and clientKeyFile go together; set both or neither",
            ));
        }
        if self.probe == ProbeKind::Https
            && self.ca_file.is_none()
            && self.kubeconfig.is_none()
            && !self.insecure_skip_verify
        {
            return Err(ConfigError::new(
                "health.caFile",
                "probe: https needs the CA of the API servers' certificates: set caFile or \
                 kubeconfig (e.g. kubelet's), or insecureSkipVerify: true",
            ));
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}
fn default_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_timeout() -> Duration {
    Duration::from_millis(250)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}
fn default_path() -> String {
    "/readyz".into()
}
