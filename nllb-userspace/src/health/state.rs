//! Per-backend health with rise/fall hysteresis, kept apart from the probing
//! so the rules can be tested without sockets or clocks.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::probe::Handshake;

/// What the agent (and `nllb status`) knows about one backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendHealth {
    /// The verdict the datapath should follow.
    pub healthy: bool,
    /// Outcome of the last observation (probe or passive report); `None`
    /// until the first probe finishes.
    pub last_ok: Option<bool>,
    #[serde(rename = "last_latency_ms", serialize_with = "latency_ms")]
    pub last_latency: Option<Duration>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    /// Times the kernel's passive check marked this backend failed.
    pub passive_ejections: u64,
    /// When `healthy` last changed (or the backend was first seen).
    #[serde(rename = "since_unix_ms", serialize_with = "unix_ms")]
    pub since: SystemTime,
    /// The longest of the last `HANDSHAKE_WINDOW` probe handshakes (a timed
    /// out one counts as the probe timeout).
    #[serde(rename = "handshake_worst_ms", serialize_with = "latency_ms")]
    pub handshake_worst: Option<Duration>,
    #[serde(skip)]
    handshakes: VecDeque<Duration>,
}

/// Probe handshakes remembered per backend: a few seconds at the default
/// interval, so a slow spell moves the SYN timeout up at once and a quiet
/// network brings it back down soon after.
pub const HANDSHAKE_WINDOW: usize = 8;

fn latency_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}

fn unix_ms<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let ms = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    s.serialize_u64(ms)
}

impl BackendHealth {
    /// A new backend is healthy until its first probe says otherwise, so an
    /// agent that starts (or learns a controller) never refuses connects while
    /// waiting for `rise` probes. A first probe that fails ejects it at once:
    /// nothing has vouched for it yet.
    pub fn new(now: SystemTime) -> Self {
        BackendHealth {
            healthy: true,
            last_ok: None,
            last_latency: None,
            last_error: None,
            consecutive_failures: 0,
            consecutive_successes: 0,
            passive_ejections: 0,
            since: now,
            handshake_worst: None,
            handshakes: VecDeque::new(),
        }
    }

    /// Records how a probe's TCP handshake went.
    pub fn observe_handshake(&mut self, handshake: Handshake) {
        let took = match handshake {
            Handshake::Took(d) | Handshake::TimedOut(d) => d,
            Handshake::Failed => return,
        };
        if self.handshakes.len() == HANDSHAKE_WINDOW {
            self.handshakes.pop_front();
        }
        self.handshakes.push_back(took);
        self.handshake_worst = self.handshakes.iter().max().copied();
    }

    /// Records one probe result; returns true when `healthy` flipped.
    pub fn observe(&mut self, outcome: Result<Duration, String>, rise: u32, fall: u32, now: SystemTime) -> bool {
        let unproven = self.last_ok.is_none();
        match outcome {
            Ok(latency) => {
                self.last_ok = Some(true);
                self.last_latency = Some(latency);
                self.last_error = None;
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                self.consecutive_failures = 0;
                if !self.healthy && self.consecutive_successes >= rise {
                    return self.set_healthy(true, now);
                }
            }
            Err(error) => {
                self.last_ok = Some(false);
                self.last_latency = None;
                self.last_error = Some(error);
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.consecutive_successes = 0;
                if self.healthy && (unproven || self.consecutive_failures >= fall) {
                    return self.set_healthy(false, now);
                }
            }
        }
        false
    }

    /// The kernel saw a connect to this backend refused or time out: eject it
    /// now (the kernel already steers away; this keeps the agent's view and
    /// the published set in line) and require `rise` good probes to return.
    pub fn observe_passive(&mut self, now: SystemTime) -> bool {
        self.passive_ejections = self.passive_ejections.saturating_add(1);
        self.last_ok = Some(false);
        self.last_latency = None;
        self.last_error = Some("passive: a connect through nllb was refused or timed out".into());
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.consecutive_successes = 0;
        self.set_healthy(false, now)
    }

    fn set_healthy(&mut self, healthy: bool, now: SystemTime) -> bool {
        if self.healthy == healthy {
            return false;
        }
        self.healthy = healthy;
        self.since = now;
        true
    }
}

/// Health of every probed backend (address and service port). Serializes
/// as a plain map `"IP:PORT" -> BackendHealth`, the `health` object of the
/// agent's status file that `nllb status` reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct HealthSnapshot {
    pub backends: BTreeMap<SocketAddr, BackendHealth>,
}

impl HealthSnapshot {
    pub fn get(&self, addr: &SocketAddr) -> Option<&BackendHealth> {
        self.backends.get(addr)
    }

    /// A backend the snapshot does not know (not probed yet, or health
    /// checks off) counts as healthy: only evidence ejects.
    pub fn is_healthy(&self, addr: &SocketAddr) -> bool {
        self.backends.get(addr).is_none_or(|h| h.healthy)
    }

    /// Verdicts only, for comparing two snapshots without the noise of
    /// latencies and counters.
    pub fn verdicts(&self) -> BTreeMap<SocketAddr, bool> {
        self.backends.iter().map(|(a, h)| (*a, h.healthy)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RISE: u32 = 2;
    const FALL: u32 = 3;

    fn ok() -> Result<Duration, String> {
        Ok(Duration::from_millis(1))
    }
    fn bad() -> Result<Duration, String> {
        Err("refused".into())
    }
    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn proven() -> BackendHealth {
        let mut h = BackendHealth::new(t(0));
        assert!(!h.observe(ok(), RISE, FALL, t(1)));
        h
    }

    #[test]
    fn new_backend_is_healthy_and_unproven() {
        let h = BackendHealth::new(t(0));
        assert!(h.healthy);
        assert_eq!(h.last_ok, None);
    }

    #[test]
    fn first_probe_failing_ejects_at_once() {
        let mut h = BackendHealth::new(t(0));
        assert!(h.observe(bad(), RISE, FALL, t(1)));
        assert!(!h.healthy);
        assert_eq!(h.since, t(1));
        assert_eq!(h.last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn proven_backend_needs_fall_failures() {
        let mut h = proven();
        assert!(!h.observe(bad(), RISE, FALL, t(2)));
        assert!(!h.observe(bad(), RISE, FALL, t(3)));
        assert!(h.healthy);
        assert!(h.observe(bad(), RISE, FALL, t(4)));
        assert!(!h.healthy);
        assert_eq!(h.consecutive_failures, 3);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut h = proven();
        h.observe(bad(), RISE, FALL, t(2));
        h.observe(bad(), RISE, FALL, t(3));
        h.observe(ok(), RISE, FALL, t(4));
        h.observe(bad(), RISE, FALL, t(5));
        h.observe(bad(), RISE, FALL, t(6));
        assert!(h.healthy, "only 2 consecutive failures since the success");
    }

    #[test]
    fn needs_rise_successes_to_return() {
        let mut h = BackendHealth::new(t(0));
        h.observe(bad(), RISE, FALL, t(1));
        assert!(!h.observe(ok(), RISE, FALL, t(2)));
        assert!(!h.healthy);
        assert!(h.observe(ok(), RISE, FALL, t(3)));
        assert!(h.healthy);
        assert_eq!(h.since, t(3));
    }

    #[test]
    fn flapping_backend_stays_out() {
        let mut h = BackendHealth::new(t(0));
        h.observe(bad(), RISE, FALL, t(1));
        for i in 0..10 {
            let r = if i % 2 == 0 { ok() } else { bad() };
            h.observe(r, RISE, FALL, t(2 + i));
            assert!(!h.healthy, "one good probe between failures must not readmit");
        }
    }

    #[test]
    fn passive_failure_ejects_at_once_and_needs_rise() {
        let mut h = proven();
        assert!(h.observe_passive(t(2)));
        assert!(!h.healthy);
        assert_eq!(h.passive_ejections, 1);
        assert!(!h.observe_passive(t(3)), "already out: no transition");
        assert_eq!(h.passive_ejections, 2);
        assert!(!h.observe(ok(), RISE, FALL, t(4)));
        assert!(h.observe(ok(), RISE, FALL, t(5)));
    }

    #[test]
    fn status_json_uses_plain_units() {
        let mut h = BackendHealth::new(t(5));
        h.observe(Ok(Duration::from_micros(1500)), RISE, FALL, t(6));
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["last_latency_ms"], 1.5);
        assert_eq!(v["since_unix_ms"], 5000);
        assert_eq!(v["healthy"], true);
    }

    #[test]
    fn snapshot_json_is_keyed_by_address() {
        let mut snap = HealthSnapshot::default();
        snap.backends.insert("198.18.1.2:6443".parse().unwrap(), BackendHealth::new(t(0)));
        let v = serde_json::to_value(&snap).unwrap();
        assert_eq!(v["198.18.1.2:6443"]["healthy"], true, "{v}");
    }

    #[test]
    fn unknown_backends_count_as_healthy() {
        let snap = HealthSnapshot::default();
        assert!(snap.is_healthy(&"198.18.1.2:6443".parse().unwrap()));
    }
}
