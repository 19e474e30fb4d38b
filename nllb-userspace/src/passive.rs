//! In-kernel passive health (`passive:`): how long a steered connect's SYN
//! may go unanswered, and how long a kernel mark keeps a backend out.
//!
//! A connect-time balancer cannot retry a SYN on another host, so what it
//! does for a controller that vanished (powered off, no RST) is make the
//! kernel give up on it fast: the first SYN's retransmission timeout is a few
//! times the backend's measured handshake time, not the kernel's 1 s, and
//! `synRetries` caps the retries so the kernel fails the connect within a
//! few of those timeouts by itself. The first retransmission marks the
//! backend, and the agent aborts every other connect still waiting on it.
//! Envoy mode approximates the marks with outlier detection for the same
//! hold.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::errors::ConfigError;

/// Bounds of `synTimeout: auto` (4 × the recent worst handshake).
pub const AUTO_MIN: Duration = Duration::from_millis(50);
pub const AUTO_MAX: Duration = Duration::from_secs(1);
const AUTO_FACTOR: u32 = 4;
/// A published SYN timeout moves only when the new one differs by more than
/// this fraction: each change publishes new service tables.
const HYSTERESIS: f64 = 0.25;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PassiveConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long a refused or timed-out connect keeps a backend out of the
    /// pick without the agent's confirmation (covers an agent that is down).
    #[serde(default = "default_eject_hold", with = "humantime_serde")]
    pub eject_hold: Duration,
    /// Retransmission timeout of a steered connect's first SYN: `auto`
    /// (clamp(4 × recent worst probe handshake, 50ms, 1s)) or a duration.
    #[serde(default)]
    pub syn_timeout: SynTimeout,
    /// SYN retransmissions before the kernel gives a steered connect up
    /// (`TCP_SYNCNT`); 0 keeps the system's `net.ipv4.tcp_syn_retries`.
    #[serde(default = "default_syn_retries")]
    pub syn_retries: u32,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            enabled: true,
            eject_hold: default_eject_hold(),
            syn_timeout: SynTimeout::Auto,
            syn_retries: default_syn_retries(),
        }
    }
}

impl PassiveConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.eject_hold.is_zero() {
            return Err(ConfigError::new("passive.ejectHold", "must be longer than 0s, e.g. 10s"));
        }
        if let SynTimeout::Fixed(d) = self.syn_timeout
            && !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&d)
        {
            return Err(ConfigError::new(
                "passive.synTimeout",
                format!("{} is out of range; use auto or a duration from 10ms to 10s", humantime::format_duration(d)),
            ));
        }
        if self.syn_retries > 127 {
            return Err(ConfigError::new("passive.synRetries", "must be 0 (the system's) to 127, e.g. 2"));
        }
        Ok(())
    }

    /// The SYN timeout for a backend whose recent worst probe handshake took
    /// `worst` (None: not measured yet, or probes are off).
    pub fn syn_timeout_for(&self, worst: Option<Duration>) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        match self.syn_timeout {
            SynTimeout::Fixed(d) => Some(d),
            SynTimeout::Auto => worst.map(|w| (w * AUTO_FACTOR).clamp(AUTO_MIN, AUTO_MAX)),
        }
    }
}

/// Keeps `current` unless `next` differs from it by more than the
/// hysteresis; rounds to whole milliseconds.
pub fn settle(current: Option<Duration>, next: Option<Duration>) -> Option<Duration> {
    let next = next.map(|d| Duration::from_millis(d.as_millis().max(1) as u64));
    match (current, next) {
        (Some(c), Some(n)) => {
            let (c_ms, n_ms) = (c.as_secs_f64(), n.as_secs_f64());
            if (n_ms - c_ms).abs() > c_ms * HYSTERESIS { Some(n) } else { Some(c) }
        }
        (_, n) => n,
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum SynTimeout {
    #[default]
    Auto,
    Fixed(Duration),
}

impl TryFrom<String> for SynTimeout {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "auto" {
            return Ok(SynTimeout::Auto);
        }
        humantime::parse_duration(&s)
            .map(SynTimeout::Fixed)
            .map_err(|_| format!("{s:?} is neither auto nor a duration such as 200ms"))
    }
}

impl From<SynTimeout> for String {
    fn from(t: SynTimeout) -> String {
        match t {
            SynTimeout::Auto => "auto".into(),
            SynTimeout::Fixed(d) => humantime::format_duration(d).to_string(),
        }
    }
}

fn default_eject_hold() -> Duration {
    Duration::from_secs(10)
}

fn default_syn_retries() -> u32 {
    2
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn auto_is_four_times_the_worst_handshake_clamped() {
        let c = PassiveConfig::default();
        assert_eq!(c.syn_timeout_for(Some(Duration::from_micros(300))), Some(AUTO_MIN));
        assert_eq!(c.syn_timeout_for(Some(ms(30))), Some(ms(120)));
        assert_eq!(c.syn_timeout_for(Some(ms(400))), Some(AUTO_MAX));
        assert_eq!(c.syn_timeout_for(None), None);
        let fixed = PassiveConfig { syn_timeout: SynTimeout::Fixed(ms(200)), ..Default::default() };
        assert_eq!(fixed.syn_timeout_for(None), Some(ms(200)));
        let off = PassiveConfig { enabled: false, ..Default::default() };
        assert_eq!(off.syn_timeout_for(Some(ms(30))), None);
    }

    #[test]
    fn small_changes_do_not_republish() {
        assert_eq!(settle(Some(ms(100)), Some(ms(120))), Some(ms(100)));
        assert_eq!(settle(Some(ms(100)), Some(ms(130))), Some(ms(130)));
        assert_eq!(settle(None, Some(ms(50))), Some(ms(50)));
        assert_eq!(settle(Some(ms(50)), None), None);
    }

    #[test]
    fn syn_timeout_parses_auto_and_durations() {
        assert_eq!(SynTimeout::try_from("auto".to_string()), Ok(SynTimeout::Auto));
        assert_eq!(SynTimeout::try_from("200ms".to_string()), Ok(SynTimeout::Fixed(ms(200))));
        assert!(SynTimeout::try_from("soon".to_string()).is_err());
        let bad = PassiveConfig { syn_timeout: SynTimeout::Fixed(ms(1)), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("passive.synTimeout"));
    }
}
