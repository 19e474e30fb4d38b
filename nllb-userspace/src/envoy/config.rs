//! `envoy:` in the config, its checks, and the options Envoy mode is built
//! from.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::render::RenderOptions;
use crate::{errors::ConfigError, passive::PassiveConfig};

/// One worker thread carries a node's control-plane traffic easily and
/// keeps Envoy's memory small.
pub const DEFAULT_CONCURRENCY: u32 = 1;
pub const DEFAULT_LOG_LEVEL: &str = "warning";

const LOG_LEVELS: [&str; 8] = ["trace", "debug", "info", "warning", "warn", "error", "critical", "off"];

/// `envoy:` in the config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyConfig {
    /// The Envoy binary; default: `envoy` on PATH.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Loopback port of Envoy's admin interface; off when unset.
    #[serde(default)]
    pub admin_port: Option<u16>,
    /// Envoy worker threads (default 1).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Envoy's log level (default `warning`); the log is `<run-dir>/envoy/envoy.log`.
    #[serde(default)]
    pub log_level: Option<String>,
}

impl EnvoyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_port == Some(0) {
            return Err(ConfigError::new("envoy.adminPort", "use a port between 1 and 65535, or leave it unset"));
        }
        if let Some(c) = self.concurrency
            && !(1..=64).contains(&c)
        {
            return Err(ConfigError::new("envoy.concurrency", format!("{c} worker threads: use 1-64")));
        }
        if let Some(l) = &self.log_level
            && !LOG_LEVELS.contains(&l.as_str())
        {
            return Err(ConfigError::new(
                "envoy.logLevel",
                format!("{l:?} is not an Envoy log level: use one of {}", LOG_LEVELS.join(", ")),
            ));
        }
        Ok(())
    }

    pub fn concurrency(&self) -> u32 {
        self.concurrency.unwrap_or(DEFAULT_CONCURRENCY)
    }

    pub fn log_level(&self) -> String {
        self.log_level.clone().unwrap_or_else(|| DEFAULT_LOG_LEVEL.into())
    }
}

/// What the generated Envoy config takes from `envoy:` and `passive:`
/// (Envoy's outlier detection stands in for the kernel's passive ejection).
pub fn render_options(envoy: &EnvoyConfig, passive: &PassiveConfig) -> RenderOptions {
    RenderOptions { admin_port: envoy.admin_port, eject_hold: passive.enabled.then_some(passive.eject_hold) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_envoy_settings_name_the_field() {
        let c = EnvoyConfig { log_level: Some("loud".into()), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "envoy.logLevel");
        let c = EnvoyConfig { concurrency: Some(0), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "envoy.concurrency");
        let c = EnvoyConfig { admin_port: Some(0), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "envoy.adminPort");
    }
}
