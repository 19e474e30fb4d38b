//! `discovery:` in the config, and its checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::errors::ConfigError;

/// `discovery:` in the config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DiscoveryConfig {
    #[serde(default)]
    pub kubernetes: Option<KubernetesDiscovery>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesDiscovery {
    pub kubeconfig: PathBuf,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service")]
    pub service: String,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_service() -> String {
    "kubernetes".into()
}

impl DiscoveryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(k) = &self.kubernetes {
            if k.namespace.is_empty() {
                return Err(ConfigError::new("discovery.kubernetes.namespace", "must not be empty, e.g. default"));
            }
            if k.service.is_empty() {
                return Err(ConfigError::new("discovery.kubernetes.service", "must not be empty, e.g. kubernetes"));
            }
        }
        Ok(())
    }
}
