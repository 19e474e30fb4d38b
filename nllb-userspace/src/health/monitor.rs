//! Probe tasks, one per backend address and service port, and the snapshot
//! they publish.
//!
//! One tokio task per target, each probe bounded by `timeout`, so a
//! blackholed controller (whose probes all run into the timeout) never delays
//! the verdict on another.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rand::Rng;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{BackendHealth, HealthConfig, HealthError, HealthSnapshot, probe::Prober};

/// Active health checking of the backends given by `set_targets`.
///
/// Subscribers of [`Monitor::subscribe`] are woken only when some backend's
/// `healthy` verdict flips or the target set changes; the latest probe
/// details (latency, error, counters) are always in the snapshot they
/// borrow, for `nllb status`.
pub struct Monitor {
    shared: Arc<Shared>,
    tasks: Mutex<HashMap<SocketAddr, ProbeTask>>,
}

struct Shared {
    cfg: HealthConfig,
    /// None when `health.enabled` is false: every backend stays healthy.
    prober: Option<Prober>,
    tx: watch::Sender<HealthSnapshot>,
    /// Told about every finished probe (target, duration), e.g. for a
    /// latency histogram.
    observer: Mutex<Option<ProbeObserver>>,
}

pub type ProbeObserver = Arc<dyn Fn(SocketAddr, Duration) + Send + Sync>;

struct ProbeTask {
    handle: JoinHandle<()>,
    /// Cuts the wait before the next probe short (passive failure reports).
    wake: Arc<Notify>,
}

impl Monitor {
    /// Starts an empty monitor; must be called inside a tokio runtime. Fails
    /// when `probe: https` TLS material (CA, kubeconfig, client cert) cannot
    /// be loaded, naming the file and field.
    pub fn spawn(cfg: HealthConfig) -> Result<Monitor, HealthError> {
        cfg.validate().map_err(HealthError::Config)?;
        let prober = if cfg.enabled { Some(Prober::new(&cfg)?) } else { None };
        let (tx, _) = watch::channel(HealthSnapshot::default());
        Ok(Monitor {
            shared: Arc::new(Shared { cfg, prober, tx, observer: Mutex::new(None) }),
            tasks: Mutex::new(HashMap::new()),
        })
    }

    /// Call `f` with the duration of every probe from now on.
    pub fn observe_probes(&self, f: ProbeObserver) {
        *self.shared.observer.lock().expect("observer lock") = Some(f);
    }

    /// Probes exactly these targets from now on. Unchanged targets keep
    /// their state and schedule; new ones start healthy (see
    /// [`BackendHealth::new`]) with a first probe within 10% of `interval`;
    /// removed ones are dropped from the snapshot.
    pub fn set_targets(&self, targets: impl IntoIterator<Item = SocketAddr>) {
        let wanted: std::collections::HashSet<SocketAddr> = targets.into_iter().collect();
        let mut tasks = self.tasks.lock().expect("monitor lock");
        let now = SystemTime::now();
        let mut changed = false;
        tasks.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                task.handle.abort();
                changed = true;
            }
            keep
        });
        let mut added = Vec::new();
        for addr in &wanted {
            if !tasks.contains_key(addr) {
                added.push(*addr);
            }
        }
        self.shared.tx.send_if_modified(|snap| {
            snap.backends.retain(|a, _| wanted.contains(a));
            for addr in &added {
                snap.backends.insert(*addr, BackendHealth::new(now));
            }
            changed || !added.is_empty()
        });
        for addr in added {
            let wake = Arc::new(Notify::new());
            let handle = match &self.shared.prober {
                Some(prober) => tokio::spawn(probe_loop(self.shared.clone(), prober.clone(), addr, wake.clone())),
                // Disabled: nothing to probe, but keep the bookkeeping uniform.
                None => tokio::spawn(async {}),
            };
            tasks.insert(addr, ProbeTask { handle, wake });
        }
    }

    /// The kernel marked `addr` failed (a connect through nllb was refused or
    /// its SYN timed out). Treated as a failed observation that ejects the
    /// backend at once; a probe runs right away, and `rise` good probes bring
    /// it back. Call once per new mark. With health checks off this only
    /// counts the ejection: the kernel's hold time is then the only ejection.
    pub fn report_passive_failure(&self, addr: SocketAddr) {
        let enabled = self.shared.cfg.enabled;
        let now = SystemTime::now();
        self.shared.tx.send_if_modified(|snap| match snap.backends.get_mut(&addr) {
            Some(h) if enabled => {
                let flipped = h.observe_passive(now);
                if flipped {
                    warn!(backend = %addr, "backend ejected: the kernel saw a connect to it fail");
                }
                flipped
            }
            Some(h) => {
                h.passive_ejections += 1;
                false
            }
            None => {
                debug!(backend = %addr, "passive failure for a backend that is not probed; ignored");
                false
            }
        });
        if let Some(task) = self.tasks.lock().expect("monitor lock").get(&addr) {
            task.wake.notify_one();
        }
    }

    /// Woken when a verdict flips or targets change.
    pub fn subscribe(&self) -> watch::Receiver<HealthSnapshot> {
        self.shared.tx.subscribe()
    }

    /// The current snapshot, with the latest probe details.
    pub fn snapshot(&self) -> HealthSnapshot {
        self.shared.tx.borrow().clone()
    }

    pub fn config(&self) -> &HealthConfig {
        &self.shared.cfg
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.values() {
                task.handle.abort();
            }
        }
    }
}

async fn probe_loop(shared: Arc<Shared>, prober: Prober, target: SocketAddr, wake: Arc<Notify>) {
    let interval = shared.cfg.interval;
    let (rise, fall) = (shared.cfg.rise, shared.cfg.fall);
    // The first probe soon, but not at the same instant on every node.
    let mut next = Instant::now() + interval.mul_f64(rand::thread_rng().gen_range(0.0..0.1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = wake.notified() => {}
        }
        let started = Instant::now();
        let (outcome, handshake) = prober.probe_measured(target).await;
        let observer = shared.observer.lock().ok().and_then(|o| o.clone());
        if let Some(observe) = observer {
            observe(target, started.elapsed());
        }
        let error = outcome.as_ref().err().cloned();
        let now = SystemTime::now();
        shared.tx.send_if_modified(|snap| {
            let Some(h) = snap.backends.get_mut(&target) else {
                return false;
            };
            h.observe_handshake(handshake);
            let flipped = h.observe(outcome, rise, fall, now);
            if flipped && h.healthy {
                info!(backend = %target, successes = h.consecutive_successes, "backend healthy");
            } else if flipped {
                warn!(
                    backend = %target,
                    failures = h.consecutive_failures,
                    error = error.as_deref().unwrap_or(""),
                    "backend unhealthy"
                );
            }
            flipped
        });
        next = started + jittered(interval);
    }
}

/// `interval` ± 10%, so probes of many nodes drift apart instead of hitting
/// the controllers in lockstep.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::thread_rng().gen_range(0.9..1.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let base = Duration::from_millis(500);
        for _ in 0..1000 {
            let d = jittered(base);
            assert!(d >= Duration::from_millis(450) && d <= Duration::from_millis(550), "{d:?}");
        }
    }
}
