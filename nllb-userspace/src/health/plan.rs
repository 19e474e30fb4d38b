//! From services, controller addresses and health verdicts to the plan the
//! datapath serves: the whole health-to-datapath step in one pure function.

use std::net::{IpAddr, SocketAddr};

use super::{HealthSnapshot, select};
use crate::model::{Plan, Service, ServicePlan};

/// Every (controller, service port) pair to probe, without duplicates (two
/// services on the same backend port share one probe).
pub fn targets(services: &[Service], backends: &[IpAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for s in services {
        for ip in backends {
            let t = SocketAddr::new(*ip, s.backend_port);
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

/// The plan for these services: per service the healthy backends, or all of
/// them in panic mode (see [`select`]).
pub fn plan(services: &[Service], backends: &[IpAddr], snapshot: &HealthSnapshot) -> Plan {
    Plan {
        services: services
            .iter()
            .map(|s| {
                let known: Vec<SocketAddr> = backends.iter().map(|ip| SocketAddr::new(*ip, s.backend_port)).collect();
                let (backends, panic) = select(&known, snapshot);
                ServicePlan { name: s.name.clone(), listen: s.listen.clone(), backends, panic }
            })
            .collect(),
        backends: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::health::BackendHealth;

    fn svc(name: &str, port: u16) -> Service {
        Service { name: name.into(), listen: vec![SocketAddr::from(([127, 0, 0, 1], port + 1000))], backend_port: port }
    }

    fn ips() -> Vec<IpAddr> {
        vec![[198, 18, 1, 2].into(), [198, 18, 2, 2].into()]
    }

    #[test]
    fn targets_cover_every_service_port_once() {
        let t = targets(&[svc("api", 6443), svc("konn", 8132), svc("api2", 6443)], &ips());
        assert_eq!(t.len(), 4);
        assert!(t.contains(&"198.18.2.2:8132".parse().unwrap()));
    }

    #[test]
    fn each_service_is_judged_on_its_own_port() {
        let mut snap = HealthSnapshot::default();
        let mut down = BackendHealth::new(SystemTime::UNIX_EPOCH);
        down.healthy = false;
        snap.backends.insert("198.18.1.2:6443".parse().unwrap(), down.clone());
        snap.backends.insert("198.18.1.2:8132".parse().unwrap(), down.clone());
        snap.backends.insert("198.18.2.2:8132".parse().unwrap(), down);
        let p = plan(&[svc("api", 6443), svc("konn", 8132)], &ips(), &snap);
        assert_eq!(p.services[0].backends, vec!["198.18.2.2:6443".parse().unwrap()]);
        assert!(!p.services[0].panic);
        assert_eq!(p.services[1].backends.len(), 2);
        assert!(p.services[1].panic);
    }

    #[test]
    fn matches_all_backends_when_everything_is_healthy() {
        let services = [svc("api", 6443)];
        assert_eq!(plan(&services, &ips(), &HealthSnapshot::default()), Plan::all_backends(&services, &ips()));
    }
}
