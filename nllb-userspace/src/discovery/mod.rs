//! Controller discovery from the Kubernetes API (`default/kubernetes`).
//!
//! [`spawn`] starts a task that watches the EndpointSlices of the service
//! (label `kubernetes.io/service-name`), or its Endpoints object where
//! EndpointSlices are not served, and publishes the ready controller
//! addresses on a `watch` channel. The last good set is cached under the
//! state directory and used at a cold start; see `route` for how the client
//! reaches the API when the kubeconfig points at nllb's own virtual address.

mod addresses;
pub mod cache;
mod config;
pub mod route;
mod watch;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::Serialize;
use tracing::{info, warn};

use crate::model::Service;

pub use addresses::{ControllerAddresses, usable_addresses};
pub use config::{DiscoveryConfig, KubernetesDiscovery};
pub use route::{ApiRoute, api_route, controller_url, redirect_to_controller};

/// Where the current controller set came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config's static `backends`.
    Seed,
    /// `<state-dir>/controllers.json`, the last set the API gave.
    Cache,
    /// The API server, live.
    Api,
}

/// The controllers to send to, as discovery knows them now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiscoveredSet {
    /// Sorted, deduplicated, each valid as a backend (IPv4 before IPv6).
    /// Empty only when there was neither a cache nor a seed and the API has
    /// not answered yet; once non-empty it never becomes empty again.
    pub controllers: Vec<IpAddr>,
    pub source: Source,
    /// Starts at 0 for the initial value; +1 for each published change.
    pub generation: u64,
    /// The last failure to read the API (e.g. 403: the RBAC it needs), for
    /// `nllb status`. Recording one does not wake receivers: the set did
    /// not change. Kept after recovery; its time tells how old it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastError {
    pub message: String,
    pub at_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot use kubeconfig {path} (discovery.kubernetes.kubeconfig): {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build an API client from kubeconfig {path}: {source}")]
    Client {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },
}

/// Timings of the discovery loop; the defaults suit production, tests
/// shorten them.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// First retry delay after an error; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Server-side watch timeout (`timeoutSeconds`); the client also gives
    /// up on a silent watch a little after it, which bounds how long a
    /// blackholed API server goes unnoticed.
    pub watch_timeout_secs: u32,
    /// TCP + TLS connect timeout to the API server.
    pub connect_timeout: Duration,
    /// Consecutive errors before dialing the next known controller (only
    /// when the kubeconfig names a virtual address).
    pub errors_before_switch: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            watch_timeout_secs: 60,
            connect_timeout: Duration::from_secs(3),
            errors_before_switch: 2,
        }
    }
}

/// Starts discovery with default timings; see [`spawn_with`].
pub fn spawn(
    cfg: KubernetesDiscovery,
    services: Vec<Service>,
    state_dir: PathBuf,
    seed: Vec<IpAddr>,
    rejected: Option<Rejected>,
) -> tokio::sync::watch::Receiver<DiscoveredSet> {
    spawn_with(cfg, services, state_dir, seed, Tuning::default(), rejected)
}

/// Backends (controller address and port) the agent's health checks reject
/// right now. Discovery never watches through such a controller when
/// another one is known: a watch on a controller that went silent would
/// otherwise only end at the client's read timeout, minutes later.
pub type Rejected = tokio::sync::watch::Receiver<std::collections::BTreeSet<std::net::SocketAddr>>;

/// Starts discovery on the current tokio runtime and returns the channel
/// the agent follows. `services` are the config's services: they tell
/// whether the kubeconfig's server is one of nllb's virtual addresses
/// (see [`route`]). The initial value is available at once: the cached set
/// when `<state_dir>/controllers.json` holds one for this namespace/service,
/// else `seed`. The task stops when every receiver is dropped.
pub fn spawn_with(
    cfg: KubernetesDiscovery,
    services: Vec<Service>,
    state_dir: PathBuf,
    seed: Vec<IpAddr>,
    tuning: Tuning,
    rejected: Option<Rejected>,
) -> tokio::sync::watch::Receiver<DiscoveredSet> {
    let cached = match cache::load(&state_dir, &cfg.namespace, &cfg.service) {
        Ok(c) => c,
        Err(e) => {
            warn!("{e}; starting from the seed");
            None
        }
    };
    let initial = match &cached {
        Some(c) => {
            info!(controllers = ?c, "controller set from the cache");
            DiscoveredSet { controllers: c.clone(), source: Source::Cache, generation: 0, last_error: None }
        }
        None => {
            let mut s = seed;
            s.sort();
            s.dedup();
            DiscoveredSet { controllers: s, source: Source::Seed, generation: 0, last_error: None }
        }
    };
    let (tx, rx) = tokio::sync::watch::channel(initial);
    let runner = watch::Runner::new(cfg, services, state_dir, tuning, tx, cached, rejected);
    tokio::spawn(runner.run());
    rx
}
