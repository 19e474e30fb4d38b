//! Controller addresses out of the API objects that name them.

use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use kube::ResourceExt;
use tracing::warn;

use crate::addr::BackendAddr;

/// An API object that lists controller addresses.
pub trait ControllerAddresses {
    /// Every address the object marks ready, as written (not yet validated).
    fn ready_addresses(&self) -> Vec<String>;
}

impl ControllerAddresses for EndpointSlice {
    fn ready_addresses(&self) -> Vec<String> {
        // FQDN slices name hosts, not addresses; the datapath needs IPs.
        if self.address_type != "IPv4" && self.address_type != "IPv6" {
            return Vec::new();
        }
        self.endpoints
            .iter()
            // A missing `ready` means "unknown", which the API says to treat as ready.
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect()
    }
}

impl ControllerAddresses for Endpoints {
    fn ready_addresses(&self) -> Vec<String> {
        // `notReadyAddresses` are left out on purpose.
        self.subsets.iter().flatten().flat_map(|s| s.addresses.iter().flatten()).map(|a| a.ip.clone()).collect()
    }
}

/// The object's ready addresses that can be backends; every address that
/// cannot is logged and dropped, so one bad entry does not hide the others.
pub fn usable_addresses<K: ControllerAddresses + ResourceExt>(obj: &K) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for text in obj.ready_addresses() {
        match text.parse::<BackendAddr>() {
            Ok(ip) => {
                out.insert(ip.get());
            }
            Err(why) => {
                warn!(object = %obj.name_any(), "ignoring controller address from the API: {why}")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::{
        core::v1::{EndpointAddress, EndpointSubset},
        discovery::v1::{Endpoint, EndpointConditions},
    };

    fn ep(addr: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![addr.into()],
            conditions: Some(EndpointConditions { ready, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn slice_keeps_ready_and_unknown_drops_not_ready_and_invalid() {
        let slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: vec![
                ep("198.18.1.2", Some(true)),
                ep("198.18.2.2", None),
                ep("198.18.3.2", Some(false)),
                ep("127.0.0.1", Some(true)),
                ep("not-an-ip", Some(true)),
            ],
            ..Default::default()
        };
        let got: Vec<IpAddr> = usable_addresses(&slice).into_iter().collect();
        assert_eq!(got, vec!["198.18.1.2".parse::<IpAddr>().unwrap(), "198.18.2.2".parse().unwrap()]);
    }

    #[test]
    fn fqdn_slice_gives_nothing() {
        let slice = EndpointSlice {
            address_type: "FQDN".into(),
            endpoints: vec![ep("198.18.1.2", Some(true))],
            ..Default::default()
        };
        assert!(usable_addresses(&slice).is_empty());
    }

    #[test]
    fn endpoints_use_ready_addresses_only() {
        let e = Endpoints {
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![EndpointAddress { ip: "2001:2:0:1::2".into(), ..Default::default() }]),
                not_ready_addresses: Some(vec![EndpointAddress { ip: "198.18.9.2".into(), ..Default::default() }]),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let got: Vec<IpAddr> = usable_addresses(&e).into_iter().collect();
        assert_eq!(got, vec!["2001:2:0:1::2".parse::<IpAddr>().unwrap()]);
    }
}
