//! `passive:` in the config: in-kernel passive ejection. The sock_ops
//! program marks a backend that refused or timed out a connect, and the
//! connect hooks skip marked backends for `ejectHold` without waiting for
//! the agent (which confirms with probes, see `health`). Envoy mode
//! approximates it with outlier detection for the same hold.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::errors::ConfigError;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PassiveConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long a refused or timed-out connect keeps a backend out of the
    /// pick without the agent's confirmation (covers an agent that is down).
    #[serde(default = "default_eject_hold", with = "humantime_serde")]
    pub eject_hold: Duration,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self { enabled: true, eject_hold: default_eject_hold() }
    }
}

impl PassiveConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.eject_hold.is_zero() {
            return Err(ConfigError::new("passive.ejectHold", "must be longer than 0s, e.g. 10s"));
        }
        Ok(())
    }
}

fn default_eject_hold() -> Duration {
    Duration::from_secs(10)
}

fn yes() -> bool {
    true
}
