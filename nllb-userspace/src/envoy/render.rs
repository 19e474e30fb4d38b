//! Envoy's configuration, generated from the plan.
//!
//! The bootstrap is fixed for the life of the process: it only points Envoy
//! at three watched directories. Everything that changes lives in
//! path-based xDS files (clusters = CDS, listeners = LDS, one endpoints file
//! per service = EDS). They are replaced by rename, and Envoy applies a
//! changed resource in place, so a membership change never restarts Envoy
//! nor touches established connections:
//!
//! - EDS: a service's backends. Removing a host does not close connections
//!   to it (`close_connections_on_host_set_change` stays false).
//! - LDS: one TCP proxy listener per virtual address, but only for services
//!   that have at least one backend. A service without backends has no
//!   listener, so a connect gets ECONNREFUSED at once, exactly as in eBPF
//!   mode (an empty cluster would accept and then close: EOF instead).
//! - CDS: one cluster per service; unchanged unless the services change.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};

use crate::model::{Plan, ServicePlan};

/// Upstream connect timeout. Controllers are one hop away; a slow SYN means
/// a dead controller, and `max_connect_attempts` moves on to the next one.
pub const CONNECT_TIMEOUT: &str = "0.25s";
/// tcp_proxy tries this many controllers (round robin) before giving up on a
/// downstream connection. k0s leaves it at 1.
pub const MAX_CONNECT_ATTEMPTS: u32 = 3;
/// Upper bound of downstream connections, which also silences Envoy's
/// start-up warning about running without one.
pub const MAX_DOWNSTREAM_CONNECTIONS: u64 = 50_000;

const TCP_PROXY: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const LOAD_ASSIGNMENT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const DOWNSTREAM_CONNECTIONS: &str =
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

/// Where the generated files live inside the work directory.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Layout {
        Layout { dir: dir.into() }
    }
    pub fn bootstrap(&self) -> PathBuf {
        self.dir.join("bootstrap.yaml")
    }
    pub fn cds_dir(&self) -> PathBuf {
        self.dir.join("cds")
    }
    pub fn cds_file(&self) -> PathBuf {
        self.cds_dir().join("clusters.yaml")
    }
    pub fn lds_dir(&self) -> PathBuf {
        self.dir.join("lds")
    }
    pub fn lds_file(&self) -> PathBuf {
        self.lds_dir().join("listeners.yaml")
    }
    pub fn eds_dir(&self) -> PathBuf {
        self.dir.join("eds")
    }
    pub fn eds_file(&self, service: &str) -> PathBuf {
        self.eds_dir().join(format!("{service}.yaml"))
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("envoy.log")
    }
    pub fn base_id_file(&self) -> PathBuf {
        self.dir.join("base-id")
    }
}

/// Settings that shape the generated config besides the plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// Loopback admin port; no admin interface when None.
    pub admin_port: Option<u16>,
    /// Envoy's own passive ejection (outlier detection on failed connects),
    /// the counterpart of the kernel's sock_ops ejection; None turns it off.
    pub eject_hold: Option<Duration>,
}

/// One generated file: where it goes and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFile {
    pub path: PathBuf,
    pub contents: String,
}

pub fn bootstrap(layout: &Layout, opts: &RenderOptions) -> Value {
    let mut b = json!({
        "node": {"id": "nllb", "cluster": "nllb"},
        "dynamic_resources": {
            "cds_config": path_source(&layout.cds_file(), &layout.cds_dir()),
            "lds_config": path_source(&layout.lds_file(), &layout.lds_dir()),
        },
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": DOWNSTREAM_CONNECTIONS,
                    "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                },
            }],
        },
    });
    if let Some(port) = opts.admin_port {
        // Loopback only: the admin interface can stop Envoy and change its
        // state, so it must never face the network.
        b["admin"] = json!({"address": socket_address(SocketAddr::from(([127, 0, 0, 1], port)))});
    }
    b
}

/// CDS: one EDS cluster per service, endpoints from the service's file.
pub fn clusters(layout: &Layout, plan: &Plan, opts: &RenderOptions) -> Value {
    let resources: Vec<Value> = plan.services.iter().map(|s| cluster(layout, s, opts)).collect();
    json!({"resources": resources})
}

fn cluster(layout: &Layout, s: &ServicePlan, opts: &RenderOptions) -> Value {
    let mut c = json!({
        "@type": CLUSTER,
        "name": s.name,
        "type": "EDS",
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "ROUND_ROBIN",
        "eds_cluster_config": {
            "service_name": s.name,
            "eds_config": path_source(&layout.eds_file(&s.name), &layout.eds_dir()),
        },
    });
    if let Some(hold) = opts.eject_hold {
        // Failed connects (refused, timed out) are local-origin errors for
        // tcp_proxy; two in a row take the controller out of the pick for
        // `hold`.
        c["outlier_detection"] = json!({
            "split_external_local_origin_errors": true,
            "consecutive_local_origin_failure": 2,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_success_rate": 0,
            "enforcing_local_origin_success_rate": 0,
            "interval": "1s",
            "base_ejection_time": duration(hold),
            "max_ejection_time": duration(hold),
            "max_ejection_percent": 100,
        });
        // Envoy's default panic threshold (50%) would spread connects over
        // ejected hosts as soon as half of them are out, e.g. 2 of 3 dead
        // controllers. Panic only when none is left, like the kernel
        // datapath's panic mode (every backend down: use all).
        c["common_lb_config"] = json!({"healthy_panic_threshold": {"value": 1.0}});
    }
    c
}

/// LDS: a TCP proxy listener on every virtual address of every service that
/// has backends.
pub fn listeners(plan: &Plan) -> Value {
    let resources: Vec<Value> = plan
        .services
        .iter()
        .filter(|s| !s.backends.is_empty())
        .flat_map(|s| s.listen.iter().map(move |addr| listener(s, *addr)))
        .collect();
    json!({"resources": resources})
}

pub fn listener_name(service: &str, addr: SocketAddr) -> String {
    format!("{service}-{addr}")
}

fn listener(s: &ServicePlan, addr: SocketAddr) -> Value {
    json!({
        "@type": LISTENER,
        "name": listener_name(&s.name, addr),
        "address": socket_address(addr),
        // Another process on the same virtual address must make the bind
        // fail loudly instead of silently sharing the port.
        "enable_reuse_port": false,
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": TCP_PROXY,
                    "stat_prefix": s.name,
                    "cluster": s.name,
                    "max_connect_attempts": MAX_CONNECT_ATTEMPTS,
                },
            }],
        }],
    })
}

/// EDS: the service's current backends.
pub fn endpoints(s: &ServicePlan) -> Value {
    json!({"resources": [load_assignment(s)]})
}

fn load_assignment(s: &ServicePlan) -> Value {
    let lb: Vec<Value> = s.backends.iter().map(|b| json!({"endpoint": {"address": socket_address(*b)}})).collect();
    let endpoints = if lb.is_empty() { json!([]) } else { json!([{"lb_endpoints": lb}]) };
    json!({"@type": LOAD_ASSIGNMENT, "cluster_name": s.name, "endpoints": endpoints})
}

/// Every dynamic file for `plan`, in the order they must be written: EDS
/// before the CDS that names it, clusters before the listeners using them.
pub fn dynamic_files(layout: &Layout, plan: &Plan, opts: &RenderOptions) -> Vec<RenderedFile> {
    let mut files: Vec<RenderedFile> = plan
        .services
        .iter()
        .map(|s| RenderedFile { path: layout.eds_file(&s.name), contents: to_yaml(&endpoints(s)) })
        .collect();
    files.push(RenderedFile { path: layout.cds_file(), contents: to_yaml(&clusters(layout, plan, opts)) });
    files.push(RenderedFile { path: layout.lds_file(), contents: to_yaml(&listeners(plan)) });
    files
}

/// The bootstrap followed by every dynamic file.
pub fn all_files(layout: &Layout, plan: &Plan, opts: &RenderOptions) -> Vec<RenderedFile> {
    let mut files = vec![RenderedFile { path: layout.bootstrap(), contents: to_yaml(&bootstrap(layout, opts)) }];
    files.extend(dynamic_files(layout, plan, opts));
    files
}

/// The whole configuration as one multi-document YAML text, each document
/// headed by the file it is written to (`nllb envoy-config`).
pub fn render_all(layout: &Layout, plan: &Plan, opts: &RenderOptions) -> String {
    let mut out = String::new();
    for f in all_files(layout, plan, opts) {
        out.push_str(&format!("---\n# {}\n", f.path.display()));
        out.push_str(&f.contents);
    }
    out
}

/// The same listeners, clusters and endpoints inlined into one static
/// bootstrap. `envoy --mode validate` does not read path-based xDS files,
/// so this is what lets it check every generated resource.
pub fn static_bootstrap(plan: &Plan, opts: &RenderOptions) -> Value {
    let mut b = bootstrap(&Layout::new("/nonexistent"), opts);
    let obj = b.as_object_mut().expect("bootstrap is an object");
    obj.remove("dynamic_resources");
    let layout = Layout::new("/nonexistent");
    let clusters: Vec<Value> = plan
        .services
        .iter()
        .map(|s| {
            let mut c = cluster(&layout, s, opts);
            let o = c.as_object_mut().expect("cluster is an object");
            o.remove("@type");
            o.remove("eds_cluster_config");
            o.insert("type".into(), json!("STATIC"));
            let mut la = load_assignment(s);
            la.as_object_mut().expect("object").remove("@type");
            o.insert("load_assignment".into(), la);
            c
        })
        .collect();
    let listeners: Vec<Value> = listeners(plan)["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .cloned()
        .map(|mut l| {
            l.as_object_mut().expect("object").remove("@type");
            l
        })
        .collect();
    obj.insert("static_resources".into(), json!({"listeners": listeners, "clusters": clusters}));
    b
}

pub fn to_yaml(v: &Value) -> String {
    crate::yaml::to_string(v)
}

fn path_source(file: &Path, dir: &Path) -> Value {
    json!({
        "resource_api_version": "V3",
        "path_config_source": {
            "path": file.display().to_string(),
            // Envoy reloads `path` when something is moved into this
            // directory: our atomic rename.
            "watched_directory": {"path": dir.display().to_string()},
        },
    })
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

fn duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{}s", d.as_secs()) } else { format!("{:.3}s", d.as_secs_f64()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(backends: &[&str]) -> Plan {
        Plan {
            services: vec![ServicePlan {
                name: "apiserver".into(),
                listen: vec!["127.0.0.1:7443".parse().unwrap(), "[::1]:7443".parse().unwrap()],
                backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
                panic: false,
            }],
            backends: Default::default(),
        }
    }

    #[test]
    fn a_listener_per_virtual_address_with_retries() {
        let l = listeners(&plan(&["198.18.1.2:6443"]));
        let res = l["resources"].as_array().unwrap();
        assert_eq!(res.len(), 2);
        assert_eq!(res[1]["address"]["socket_address"]["address"], "::1");
        let tp = &res[0]["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(tp["cluster"], "apiserver");
        assert_eq!(tp["max_connect_attempts"], 3);
    }

    #[test]
    fn a_service_without_backends_has_no_listener_and_an_empty_cluster() {
        let p = plan(&[]);
        assert!(listeners(&p)["resources"].as_array().unwrap().is_empty());
        assert_eq!(endpoints(&p.services[0])["resources"][0]["endpoints"], json!([]));
    }

    #[test]
    fn admin_is_loopback_only_and_absent_by_default() {
        let layout = Layout::new("/run/nllb/envoy");
        assert!(bootstrap(&layout, &RenderOptions::default()).get("admin").is_none());
        let b = bootstrap(&layout, &RenderOptions { admin_port: Some(9901), ..Default::default() });
        assert_eq!(b["admin"]["address"]["socket_address"]["address"], "127.0.0.1");
    }

    #[test]
    fn eds_file_is_in_the_watched_directory() {
        let layout = Layout::new("/w");
        let c = clusters(&layout, &plan(&["198.18.1.2:6443"]), &RenderOptions::default());
        let src = &c["resources"][0]["eds_cluster_config"]["eds_config"]["path_config_source"];
        assert_eq!(src["path"], "/w/eds/apiserver.yaml");
        assert_eq!(src["watched_directory"]["path"], "/w/eds");
        assert_eq!(c["resources"][0]["connect_timeout"], "0.25s");
    }
}
