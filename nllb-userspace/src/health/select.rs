//! Turning health verdicts into the backend set the datapath publishes.

use std::net::SocketAddr;

use super::HealthSnapshot;

/// The backends to publish for one service, and whether panic mode is on.
///
/// Healthy backends, in the order given. If none of the known backends is
/// healthy, all of them with `panic = true`: health checks can be wrong (a
/// broken probe path, an expired CA, a firewall in front of `/readyz`) while
/// the control plane is up, and refusing every connect would cut the node
/// off for certain, whereas spreading over all of them only might hit a dead
/// one. The caller logs the panic loudly (on transitions) and shows it in
/// status. An empty `known` gives an empty set and no panic.
pub fn select(known: &[SocketAddr], snapshot: &HealthSnapshot) -> (Vec<SocketAddr>, bool) {
    let healthy: Vec<SocketAddr> = known.iter().copied().filter(|a| snapshot.is_healthy(a)).collect();
    if healthy.is_empty() && !known.is_empty() {
        return (known.to_vec(), true);
    }
    (healthy, false)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::health::BackendHealth;

    fn a(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, i, 2], 6443))
    }

    fn snap(states: &[(SocketAddr, bool)]) -> HealthSnapshot {
        let mut s = HealthSnapshot::default();
        for (addr, healthy) in states {
            let mut h = BackendHealth::new(SystemTime::UNIX_EPOCH);
            h.healthy = *healthy;
            s.backends.insert(*addr, h);
        }
        s
    }

    #[test]
    fn all_healthy_keeps_all_in_order() {
        let known = [a(3), a(1), a(2)];
        let s = snap(&[(a(1), true), (a(2), true), (a(3), true)]);
        assert_eq!(select(&known, &s), (known.to_vec(), false));
    }

    #[test]
    fn unhealthy_are_left_out() {
        let known = [a(1), a(2), a(3)];
        let s = snap(&[(a(1), true), (a(2), false), (a(3), true)]);
        assert_eq!(select(&known, &s), (vec![a(1), a(3)], false));
    }

    #[test]
    fn one_healthy_is_enough_to_avoid_panic() {
        let known = [a(1), a(2), a(3)];
        let s = snap(&[(a(1), false), (a(2), false), (a(3), true)]);
        assert_eq!(select(&known, &s), (vec![a(3)], false));
    }

    #[test]
    fn none_healthy_panics_to_all_known() {
        let known = [a(1), a(2), a(3)];
        let s = snap(&[(a(1), false), (a(2), false), (a(3), false)]);
        assert_eq!(select(&known, &s), (known.to_vec(), true));
    }

    #[test]
    fn no_backends_is_not_panic() {
        assert_eq!(select(&[], &snap(&[(a(1), false)])), (vec![], false));
    }

    #[test]
    fn unprobed_backends_count_as_healthy() {
        let known = [a(1), a(4)];
        let s = snap(&[(a(1), false)]);
        assert_eq!(select(&known, &s), (vec![a(4)], false));
    }

    #[test]
    fn snapshot_entries_that_are_not_known_are_ignored() {
        // A removed backend still in the snapshot must not come back.
        let known = [a(1)];
        let s = snap(&[(a(1), false), (a(9), true)]);
        assert_eq!(select(&known, &s), (vec![a(1)], true));
    }

    #[test]
    fn service_port_is_part_of_the_identity() {
        let api = SocketAddr::from(([198, 18, 1, 2], 6443));
        let konn = SocketAddr::from(([198, 18, 1, 2], 8132));
        let s = snap(&[(api, false), (konn, true)]);
        assert_eq!(select(&[konn], &s), (vec![konn], false));
        assert_eq!(select(&[api], &s), (vec![api], true));
    }

    #[test]
    fn ipv6_and_ipv4_mixed() {
        let v6: SocketAddr = "[2001:2:0:1::2]:6443".parse().unwrap();
        let known = [a(1), v6];
        let s = snap(&[(a(1), false), (v6, true)]);
        assert_eq!(select(&known, &s), (vec![v6], false));
    }
}
