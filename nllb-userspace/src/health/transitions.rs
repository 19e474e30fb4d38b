//! What the agent must do when health or the backend set changes: the new
//! plan, the backends that left it, panic mode changes, passive marks to
//! clear. Pure bookkeeping, so the agent's loop stays a few calls.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::{HealthConfig, HealthSnapshot, plan};
use crate::model::{Plan, Service};

/// The agent's memory of what it published last.
#[derive(Debug, Default)]
pub struct Transitions {
    known: BTreeSet<SocketAddr>,
    published: BTreeSet<SocketAddr>,
    healthy: BTreeMap<SocketAddr, bool>,
    panic: BTreeMap<String, bool>,
}

/// One step's outcome. The agent publishes `plan`, clears the kernel's
/// passive mark of each `recovered` backend, destroys established sockets to
/// [`Reaction::to_destroy`], and calls [`Reaction::log`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reaction {
    pub plan: Plan,
    /// Turned healthy since the last step.
    pub recovered: Vec<SocketAddr>,
    /// Turned unhealthy since the last step.
    pub ejected: Vec<SocketAddr>,
    /// No longer known at all (config reload or discovery dropped them).
    pub removed: Vec<SocketAddr>,
    /// Known but no longer published by any service (ejected, not panic).
    pub unpublished: Vec<SocketAddr>,
    pub panic_entered: Vec<String>,
    pub panic_left: Vec<String>,
}

impl Transitions {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn react(&mut self, services: &[Service], backends: &[IpAddr], snapshot: &HealthSnapshot) -> Reaction {
        let plan = plan(services, backends, snapshot);
        let known: BTreeSet<SocketAddr> = super::targets(services, backends).into_iter().collect();
        let published: BTreeSet<SocketAddr> = plan.services.iter().flat_map(|s| s.backends.iter().copied()).collect();
        let mut r = Reaction::default();
        for addr in &known {
            let now = snapshot.is_healthy(addr);
            match self.healthy.get(addr) {
                Some(true) if !now => r.ejected.push(*addr),
                Some(false) if now => r.recovered.push(*addr),
                None if !now => r.ejected.push(*addr),
                _ => {}
            }
        }
        r.removed = self.known.difference(&known).copied().collect();
        r.unpublished = self.published.difference(&published).filter(|a| known.contains(a)).copied().collect();
        let mut panic = BTreeMap::new();
        for s in &plan.services {
            let was = self.panic.get(&s.name).copied().unwrap_or(false);
            if s.panic && !was {
                r.panic_entered.push(s.name.clone());
            } else if !s.panic && was {
                r.panic_left.push(s.name.clone());
            }
            panic.insert(s.name.clone(), s.panic);
        }
        self.healthy = known.iter().map(|a| (*a, snapshot.is_healthy(a))).collect();
        self.known = known;
        self.published = published;
        self.panic = panic;
        r.plan = plan;
        r
    }
}

impl Reaction {
    /// Backends whose established sockets (made through nllb) should be
    /// destroyed: removed ones when `destroyOnRemove`, ejected-and-unpublished
    /// ones when `destroyOnEject`. Never a backend that is still published
    /// (panic mode keeps using every backend, so cutting streams there would
    /// only add churn).
    pub fn to_destroy(&self, cfg: &HealthConfig) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        if cfg.destroy_on_remove {
            out.extend(self.removed.iter().copied());
        }
        if cfg.destroy_on_eject {
            out.extend(self.unpublished.iter().copied());
        }
        out
    }

    /// Loud where it matters: panic mode is an error-level event.
    pub fn log(&self) {
        for s in &self.panic_entered {
            tracing::error!(
                service = %s,
                "PANIC MODE: every backend of the service is unhealthy; spreading connects over all known \
                 backends rather than refusing them (check the health probes if the control plane is up)"
            );
        }
        for s in &self.panic_left {
            tracing::warn!(service = %s, "panic mode over: a healthy backend is back");
        }
        for b in &self.recovered {
            tracing::info!(backend = %b, "backend back in rotation");
        }
        for b in &self.unpublished {
            tracing::warn!(backend = %b, "backend taken out of rotation");
        }
        for b in &self.removed {
            tracing::info!(backend = %b, "backend removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::health::BackendHealth;

    fn svc() -> Vec<Service> {
        vec![Service { name: "api".into(), listen: vec![SocketAddr::from(([127, 0, 0, 1], 7443))], backend_port: 6443 }]
    }
    fn ip(i: u8) -> IpAddr {
        [198, 18, i, 2].into()
    }
    fn sa(i: u8) -> SocketAddr {
        SocketAddr::new(ip(i), 6443)
    }
    fn snap(down: &[u8]) -> HealthSnapshot {
        let mut s = HealthSnapshot::default();
        for i in 1..=3 {
            let mut h = BackendHealth::new(SystemTime::UNIX_EPOCH);
            h.healthy = !down.contains(&i);
            s.backends.insert(sa(i), h);
        }
        s
    }

    #[test]
    fn eject_recover_and_panic_are_reported_once() {
        let mut t = Transitions::new();
        let ips = [ip(1), ip(2), ip(3)];
        let r = t.react(&svc(), &ips, &snap(&[]));
        assert!(r.ejected.is_empty() && r.recovered.is_empty() && r.panic_entered.is_empty());
        assert_eq!(r.plan.services[0].backends.len(), 3);

        let r = t.react(&svc(), &ips, &snap(&[2]));
        assert_eq!((r.ejected.clone(), r.unpublished.clone()), (vec![sa(2)], vec![sa(2)]));
        let r = t.react(&svc(), &ips, &snap(&[2]));
        assert_eq!(r, Reaction { plan: r.plan.clone(), ..Default::default() }, "no change, nothing to do");

        let r = t.react(&svc(), &ips, &snap(&[1, 2, 3]));
        assert_eq!(r.panic_entered, vec!["api".to_string()]);
        assert_eq!(r.ejected, vec![sa(1), sa(3)]);
        assert!(r.unpublished.is_empty(), "panic publishes everything: nothing leaves the set");
        assert!(r.plan.services[0].panic);

        let r = t.react(&svc(), &ips, &snap(&[1, 3]));
        assert_eq!(r.panic_left, vec!["api".to_string()]);
        assert_eq!(r.recovered, vec![sa(2)]);
        assert_eq!(r.unpublished, vec![sa(1), sa(3)]);
    }

    #[test]
    fn removal_is_destroyed_by_default_ejection_only_when_asked() {
        let mut t = Transitions::new();
        t.react(&svc(), &[ip(1), ip(2), ip(3)], &snap(&[]));
        let r = t.react(&svc(), &[ip(1), ip(3)], &snap(&[3]));
        assert_eq!(r.removed, vec![sa(2)]);
        assert_eq!(r.unpublished, vec![sa(3)]);
        let mut cfg = HealthConfig::default();
        assert_eq!(r.to_destroy(&cfg), vec![sa(2)]);
        cfg.destroy_on_eject = true;
        assert_eq!(r.to_destroy(&cfg), vec![sa(2), sa(3)]);
        cfg.destroy_on_remove = false;
        assert_eq!(r.to_destroy(&cfg), vec![sa(3)]);
    }
}
