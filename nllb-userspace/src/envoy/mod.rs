//! The Envoy fallback datapath for kernels without the eBPF hooks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

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
}

impl EnvoyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_port == Some(0) {
            return Err(ConfigError::new("envoy.adminPort", "use a port between 1 and 65535, or leave it unset"));
        }
        Ok(())
    }
}
