//! `rebalance:` in the config, `services[].rebalance` overrides, and their
//! checks. Why the defaults are what they are: docs/health.md
//! ("Rebalancing after a controller returns").

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::errors::ConfigError;

/// `rebalance:` in the config (every service, unless it overrides).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RebalanceConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Connections ended per minute at most, all services together.
    #[serde(default = "default_max_per_minute")]
    pub max_per_minute: u32,
    /// How far (a fraction of the fair share) a backend's count may be off
    /// before connections are moved; a difference of one connection never is.
    #[serde(default = "default_margin")]
    pub margin: f64,
    /// How long a returning backend must stay published before connections
    /// are moved to it (doubled for each further return within 10 minutes).
    #[serde(default = "default_healthy_for", with = "humantime_serde")]
    pub healthy_for: Duration,
    /// How often the spread is looked at when nothing changed.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
}

/// `services[].rebalance`: what one service sets differently.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RebalanceOverride {
    #[serde(default)]
    pub enabled: Option<bool>,
    /// This service's own cap; the global one still caps all services.
    #[serde(default)]
    pub max_per_minute: Option<u32>,
    #[serde(default)]
    pub margin: Option<f64>,
}

/// What applies to one service.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServiceRebalance {
    pub enabled: bool,
    pub max_per_minute: u32,
    pub margin: f64,
}

/// The global section with each service's overrides, validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RebalanceSettings {
    pub global: RebalanceConfig,
    pub services: BTreeMap<String, RebalanceOverride>,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        crate::yaml::from_str("{}").expect("the defaults parse")
    }
}

const MAX_PER_MINUTE: u32 = 600;
const MAX_MARGIN: f64 = 10.0;

impl RebalanceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_rate("rebalance.maxPerMinute", self.max_per_minute)?;
        check_margin("rebalance.margin", self.margin)?;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.healthy_for) {
            return Err(ConfigError::new("rebalance.healthyFor", "must be from 1s to 1h, e.g. 10s"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.interval) {
            return Err(ConfigError::new("rebalance.interval", "must be from 1s to 1h, e.g. 30s"));
        }
        Ok(())
    }

    /// The settings with each service's override (`field` is where the
    /// operator wrote it, e.g. `services[1].rebalance`), checked against
    /// this section.
    pub fn compose<'a>(
        self,
        overrides: impl IntoIterator<Item = (String, &'a str, &'a RebalanceOverride)>,
    ) -> Result<RebalanceSettings, ConfigError> {
        self.validate()?;
        let mut services = BTreeMap::new();
        for (field, name, o) in overrides {
            if let Some(n) = o.max_per_minute {
                check_rate(&format!("{field}.maxPerMinute"), n)?;
                if n > self.max_per_minute {
                    return Err(ConfigError::new(
                        format!("{field}.maxPerMinute"),
                        format!(
                            "{n} is more than rebalance.maxPerMinute ({}), which caps all services together; \
                             lower it or raise rebalance.maxPerMinute",
                            self.max_per_minute
                        ),
                    ));
                }
            }
            if let Some(m) = o.margin {
                check_margin(&format!("{field}.margin"), m)?;
            }
            services.insert(name.to_string(), o.clone());
        }
        Ok(RebalanceSettings { global: self, services })
    }
}

impl RebalanceSettings {
    pub fn service(&self, name: &str) -> ServiceRebalance {
        let o = self.services.get(name).cloned().unwrap_or_default();
        ServiceRebalance {
            enabled: o.enabled.unwrap_or(self.global.enabled),
            max_per_minute: o.max_per_minute.unwrap_or(self.global.max_per_minute),
            margin: o.margin.unwrap_or(self.global.margin),
        }
    }
}

fn check_rate(field: &str, n: u32) -> Result<(), ConfigError> {
    if n == 0 || n > MAX_PER_MINUTE {
        return Err(ConfigError::new(
            field,
            format!(
                "{n} is out of range: use 1 to {MAX_PER_MINUTE}, e.g. 12 (to turn rebalancing off: enabled: false)"
            ),
        ));
    }
    Ok(())
}

fn check_margin(field: &str, m: f64) -> Result<(), ConfigError> {
    if !(0.0..=MAX_MARGIN).contains(&m) {
        return Err(ConfigError::new(
            field,
            format!("{m} is out of range: a fraction of the fair share from 0 to {MAX_MARGIN}, e.g. 0.5 (50 %)"),
        ));
    }
    Ok(())
}

fn yes() -> bool {
    true
}
fn default_max_per_minute() -> u32 {
    12
}
fn default_margin() -> f64 {
    0.5
}
fn default_healthy_for() -> Duration {
    Duration::from_secs(10)
}
fn default_interval() -> Duration {
    Duration::from_secs(30)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RebalanceConfig, ConfigError> {
        let c: RebalanceConfig = crate::yaml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_are_gentle() {
        let c = RebalanceConfig::default();
        assert!(c.enabled);
        assert_eq!(c.max_per_minute, 12);
        assert!((c.margin - 0.5).abs() < 1e-9);
        assert_eq!(c.healthy_for, Duration::from_secs(10));
        assert_eq!(c.interval, Duration::from_secs(30));
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_field_and_the_fix() {
        let e = parse("maxPerMinute: 0").unwrap_err();
        assert_eq!(e.field, "rebalance.maxPerMinute");
        assert!(e.message.contains("enabled: false"), "{e}");
        assert_eq!(parse("margin: -0.1").unwrap_err().field, "rebalance.margin");
        assert_eq!(parse("healthyFor: 0s").unwrap_err().field, "rebalance.healthyFor");
        assert_eq!(parse("interval: 2h").unwrap_err().field, "rebalance.interval");
        assert!(parse("margin: 1").is_ok(), "an integer margin is a number too");
    }

    #[test]
    fn a_service_overrides_but_never_exceeds_the_global_cap() {
        let global = RebalanceConfig { max_per_minute: 10, ..Default::default() };
        let off = RebalanceOverride { enabled: Some(false), margin: Some(0.2), ..Default::default() };
        let s = global.clone().compose([("services[1].rebalance".to_string(), "konnectivity", &off)]).unwrap();
        assert_eq!(s.service("konnectivity"), ServiceRebalance { enabled: false, max_per_minute: 10, margin: 0.2 });
        assert_eq!(s.service("apiserver"), ServiceRebalance { enabled: true, max_per_minute: 10, margin: 0.5 });
        let fast = RebalanceOverride { max_per_minute: Some(20), ..Default::default() };
        let e = global.compose([("services[1].rebalance".to_string(), "konnectivity", &fast)]).unwrap_err();
        assert_eq!(e.field, "services[1].rebalance.maxPerMinute");
        assert!(e.message.contains("rebalance.maxPerMinute (10)"), "{e}");
    }
}
