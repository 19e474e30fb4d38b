//! `--k0s-config FILE`: nllb's two services derived from a k0s cluster
//! config, so a k0s worker switches from k0s's Envoy to nllb on the same
//! ports. k0s keeps its node-local load balancing ports under
//! `spec.network.nodeLocalLoadBalancing.envoyProxy`; the same keys directly
//! under `nodeLocalLoadBalancing` are accepted too.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use serde_json::Value;

use crate::{errors::ConfigError, model::Service};

const NLLB: &str = "spec.network.nodeLocalLoadBalancing";

/// Reads a k0s ClusterConfig and returns the `apiserver` and `konnectivity`
/// services, each on 127.0.0.1 and ::1 (k0s's Envoy binds one family only).
pub fn services_from_k0s(path: &Path) -> Result<Vec<Service>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("--k0s-config", format!("cannot read {}: {e}", path.display())))?;
    services_from_k0s_str(&text)
        .map_err(|e| ConfigError::new(e.field, format!("{} (in {})", e.message, path.display())))
}

pub fn services_from_k0s_str(text: &str) -> Result<Vec<Service>, ConfigError> {
    // An untyped tree: k0s's schema is large and only a few keys matter.
    let doc: Value = crate::yaml::from_str(text)
        .map_err(|e| ConfigError::new("--k0s-config", format!("not a YAML k0s cluster config: {}", e.message)))?;
    if let Some(v) = doc.get("apiVersion") {
        let v = v.as_str().unwrap_or_default();
        if !v.starts_with("k0s.k0sproject.io/") {
            return Err(ConfigError::new(
                "apiVersion",
                format!("{v:?} is not a k0s cluster config (expected k0s.k0sproject.io/v1beta1)"),
            ));
        }
    }
    if let Some(k) = doc.get("kind").and_then(Value::as_str)
        && k != "ClusterConfig"
    {
        return Err(ConfigError::new("kind", format!("{k:?} is not a k0s ClusterConfig")));
    }
    let api_port = port(&doc, "spec.api.port", 6443)?;
    let agent_port = port(&doc, "spec.konnectivity.agentPort", 8132)?;
    let api_bind = lb_port(&doc, "apiServerBindPort", 7443)?;
    let konn_bind = lb_port(&doc, "konnectivityServerBindPort", 7132)?;
    if api_bind == konn_bind {
        return Err(ConfigError::new(
            format!("{NLLB}.envoyProxy.konnectivityServerBindPort"),
            format!("{konn_bind} is also the apiServerBindPort; the two services need different ports"),
        ));
    }
    let listen = |p: u16| {
        vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p), SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), p)]
    };
    Ok(vec![
        Service { name: "apiserver".into(), listen: listen(api_bind), backend_port: api_port },
        Service { name: "konnectivity".into(), listen: listen(konn_bind), backend_port: agent_port },
    ])
}

/// A bind port from `envoyProxy` (k0s's layout), else from directly under
/// `nodeLocalLoadBalancing`, else the default.
fn lb_port(doc: &Value, key: &str, default: u16) -> Result<u16, ConfigError> {
    let proxied = format!("{NLLB}.envoyProxy.{key}");
    if lookup(doc, &proxied).is_some() {
        return port(doc, &proxied, default);
    }
    port(doc, &format!("{NLLB}.{key}"), default)
}

fn lookup<'a>(doc: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(doc, |v, k| v.get(k)).filter(|v| !v.is_null())
}

fn port(doc: &Value, dotted: &str, default: u16) -> Result<u16, ConfigError> {
    let Some(v) = lookup(doc, dotted) else {
        return Ok(default);
    };
    v.as_u64().and_then(|n| u16::try_from(n).ok()).filter(|p| *p != 0).ok_or_else(|| {
        ConfigError::new(dotted, format!("{} is not a port: use 1-65535 (k0s default {default})", show(v)))
    })
}

fn show(v: &Value) -> String {
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_give_k0s_ports_on_both_families() {
        let s =
            services_from_k0s_str("apiVersion: k0s.k0sproject.io/v1beta1\nkind: ClusterConfig\nspec: {}\n").unwrap();
        assert_eq!(s[0].listen, vec!["127.0.0.1:7443".parse().unwrap(), "[::1]:7443".parse().unwrap()]);
        assert_eq!(s[0].backend_port, 6443);
        assert_eq!(s[1].listen[1], "[::1]:7132".parse().unwrap());
        assert_eq!(s[1].backend_port, 8132);
    }

    #[test]
    fn bad_port_names_the_k0s_field() {
        let e = services_from_k0s_str("spec:\n  api:\n    port: 70000\n").unwrap_err();
        assert_eq!(e.field, "spec.api.port");
        let e = services_from_k0s_str(
            "spec:\n  network:\n    nodeLocalLoadBalancing:\n      envoyProxy:\n        apiServerBindPort: abc\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.network.nodeLocalLoadBalancing.envoyProxy.apiServerBindPort");
        let e = services_from_k0s_str("apiVersion: v1\nkind: Config\n").unwrap_err();
        assert_eq!(e.field, "apiVersion");
    }
}
