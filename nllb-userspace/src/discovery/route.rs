//! Which address the discovery client dials.
//!
//! The kubeconfig the agent reads may already point at nllb's own virtual
//! address (`https://127.0.0.1:7443`, `https://localhost:7443`): that is the
//! point of `nllb kubeconfig`. Dialing it from the agent would be circular: at
//! a cold start the datapath has no backend yet, and the agent's own process
//! need not be in the cgroup the programs are attached to. So when the server
//! is a virtual address, discovery dials a known controller (from the
//! discovered set, the cache or the seed) directly on that service's
//! `backendPort`, and keeps verifying the server certificate against the
//! virtual address's name (`tls_server_name`): the API server certificate
//! must carry it anyway for the rewritten kubeconfigs to work (k0s's carries
//! 127.0.0.1 and localhost). Any other server is dialed as written.

use std::net::{IpAddr, SocketAddr};

use kube::config::Config;

use crate::{addr::canonical_ip, model::Service};

/// How to reach the API server named in a kubeconfig.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRoute {
    /// The server is not one of ours: dial it as written.
    Direct,
    /// The server is a virtual address of `service`: dial controllers on
    /// `backend_port`, verifying the certificate for `tls_server_name`.
    ViaControllers { service: String, backend_port: u16, tls_server_name: String },
}

/// Tells whether `server` (a kubeconfig `server:` URL) is one of the
/// services' virtual addresses. `localhost` counts as 127.0.0.1 and ::1.
pub fn api_route(server: &str, services: &[Service]) -> ApiRoute {
    let Ok(uri) = server.parse::<http::Uri>() else {
        return ApiRoute::Direct;
    };
    let Some(host) = uri.host() else {
        return ApiRoute::Direct;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
    let candidates: Vec<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
        vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()]
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        vec![canonical_ip(ip)]
    } else {
        return ApiRoute::Direct;
    };
    for s in services {
        if candidates.iter().any(|ip| s.listen.contains(&SocketAddr::new(*ip, port))) {
            return ApiRoute::ViaControllers {
                service: s.name.clone(),
                backend_port: s.backend_port,
                tls_server_name: host.to_string(),
            };
        }
    }
    ApiRoute::Direct
}

/// `original` with its authority replaced by `ip:port`, scheme and path kept.
pub fn controller_url(original: &http::Uri, ip: IpAddr, port: u16) -> http::Uri {
    let authority = SocketAddr::new(ip, port).to_string();
    let mut parts = original.clone().into_parts();
    parts.scheme = Some(parts.scheme.unwrap_or(http::uri::Scheme::HTTPS));
    parts.authority = Some(authority.parse().expect("an ip:port is a valid authority"));
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    http::Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
}

/// Points a client config at controller `ip` instead of the virtual address
/// it names, keeping every TLS and auth setting; the certificate is still
/// checked for the name the kubeconfig used (unless it set its own
/// `tls-server-name`).
pub fn redirect_to_controller(config: &mut Config, ip: IpAddr, backend_port: u16, tls_server_name: &str) {
    config.cluster_url = controller_url(&config.cluster_url, ip, backend_port);
    if config.tls_server_name.is_none() {
        config.tls_server_name = Some(tls_server_name.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<Service> {
        vec![
            Service {
                name: "apiserver".into(),
                listen: vec!["127.0.0.1:7443".parse().unwrap(), "[::1]:7443".parse().unwrap()],
                backend_port: 6443,
            },
            Service {
                name: "konnectivity".into(),
                listen: vec!["127.0.0.1:7132".parse().unwrap()],
                backend_port: 8132,
            },
        ]
    }

    fn via(name: &str) -> ApiRoute {
        ApiRoute::ViaControllers { service: "apiserver".into(), backend_port: 6443, tls_server_name: name.into() }
    }

    #[test]
    fn virtual_addresses_route_via_controllers() {
        assert_eq!(api_route("https://127.0.0.1:7443", &services()), via("127.0.0.1"));
        assert_eq!(api_route("https://[::1]:7443/", &services()), via("::1"));
        assert_eq!(api_route("https://localhost:7443", &services()), via("localhost"));
        assert_eq!(api_route("https://[::ffff:127.0.0.1]:7443", &services()), via("::ffff:127.0.0.1"));
    }

    #[test]
    fn other_servers_are_direct() {
        assert_eq!(api_route("https://198.18.1.2:6443", &services()), ApiRoute::Direct);
        assert_eq!(api_route("https://127.0.0.1:6443", &services()), ApiRoute::Direct);
        assert_eq!(api_route("https://api.example.com:7443", &services()), ApiRoute::Direct);
        assert_eq!(api_route("not a url", &services()), ApiRoute::Direct);
    }

    #[test]
    fn controller_url_keeps_scheme_and_path() {
        let u: http::Uri = "https://127.0.0.1:7443/prefix".parse().unwrap();
        assert_eq!(
            controller_url(&u, "198.18.1.2".parse().unwrap(), 6443).to_string(),
            "https://198.18.1.2:6443/prefix"
        );
        assert_eq!(
            controller_url(&u, "2001:2:0:1::2".parse().unwrap(), 6443).to_string(),
            "https://[2001:2:0:1::2]:6443/prefix"
        );
    }
}
