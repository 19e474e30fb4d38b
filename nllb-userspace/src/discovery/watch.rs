//! The watch loop: API objects in, controller sets out.
//!
//! Errors never shrink the set: a set is published only when the API gave
//! a non-empty list of valid addresses, and every failure (API down, dropped
//! watch, 410 Gone, bad data) leaves the last one in place while the loop
//! retries with backoff.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        utils::Backoff as _,
        watcher::{self, Event, ExponentialBackoff, watcher},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    DiscoveredSet, DiscoveryError, KubernetesDiscovery, Rejected, Source, Tuning,
    addresses::{ControllerAddresses, usable_addresses},
    cache::{self, CachedSet},
    route::{ApiRoute, api_route, redirect_to_controller},
};
use crate::model::Service;

/// Which API object lists the controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    EndpointSlices,
    /// For API servers that do not serve discovery.k8s.io/v1 (404).
    Endpoints,
}

enum Outcome {
    /// EndpointSlices answered 404: switch to Endpoints.
    NotServed,
    /// Dial another controller (the one in use keeps failing, or left the set).
    NextTarget,
    /// Every receiver is gone: stop.
    Closed,
}

pub(super) struct Runner {
    pub cfg: KubernetesDiscovery,
    pub services: Vec<Service>,
    pub state_dir: PathBuf,
    pub tuning: Tuning,
    pub tx: watch::Sender<DiscoveredSet>,
    pub last_stored: Option<Vec<IpAddr>>,
    target: usize,
    warned_empty: bool,
    backoff: ExponentialBackoff,
    rejected: Option<Rejected>,
}

/// The controller a watch goes through, when the kubeconfig names nllb's
/// own virtual address.
#[derive(Clone, Copy)]
struct Dialed {
    backend: SocketAddr,
}

impl Runner {
    pub fn new(
        cfg: KubernetesDiscovery,
        services: Vec<Service>,
        state_dir: PathBuf,
        tuning: Tuning,
        tx: watch::Sender<DiscoveredSet>,
        last_stored: Option<Vec<IpAddr>>,
        rejected: Option<Rejected>,
    ) -> Self {
        let backoff = backoff(&tuning);
        Runner { cfg, services, state_dir, tuning, tx, last_stored, target: 0, warned_empty: false, backoff, rejected }
    }

    fn is_rejected(&self, backend: SocketAddr) -> bool {
        self.rejected.as_ref().is_some_and(|r| r.borrow().contains(&backend))
    }

    pub async fn run(mut self) {
        let mut flavour = Flavour::EndpointSlices;
        loop {
            let (client, dialed) = match self.client().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("controller discovery: {e}; retrying");
                    self.record_error(e.to_string());
                    if self.pause().await {
                        return;
                    }
                    continue;
                }
            };
            let ns = self.cfg.namespace.clone();
            let svc = self.cfg.service.clone();
            let outcome = match flavour {
                Flavour::EndpointSlices => {
                    let wc = list_config().labels(&format!("kubernetes.io/service-name={svc}"));
                    self.watch::<EndpointSlice>(Api::namespaced(client, &ns), wc, dialed, true).await
                }
                Flavour::Endpoints => {
                    let wc = list_config().fields(&format!("metadata.name={svc}"));
                    self.watch::<Endpoints>(Api::namespaced(client, &ns), wc, dialed, false).await
                }
            };
            match outcome {
                Outcome::Closed => return,
                Outcome::NotServed => {
                    info!(namespace = %ns, service = %svc, "EndpointSlices are not served; watching the Endpoints object");
                    flavour = Flavour::Endpoints;
                }
                Outcome::NextTarget => self.target = self.target.wrapping_add(1),
            }
        }
    }

    /// A client for the kubeconfig, re-read each time so rotated client
    /// certificates are picked up. Returns the controller dialed when the
    /// kubeconfig names a virtual address (see `route`).
    async fn client(&self) -> Result<(Client, Option<Dialed>), DiscoveryError> {
        let path = &self.cfg.kubeconfig;
        let kerr = |source| DiscoveryError::Kubeconfig { path: path.clone(), source };
        let kubeconfig = Kubeconfig::read_from(path).map_err(kerr)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.map_err(kerr)?;
        config.connect_timeout = Some(self.tuning.connect_timeout);
        // Bounds a request (a list) stuck on a server gone silent; longer
        // than the server-side watch timeout, so idle watches end first.
        config.read_timeout = Some(Duration::from_secs(u64::from(self.tuning.watch_timeout_secs) + 15));
        config.reset_reader_on_write = true;
        let mut dialed = None;
        if let ApiRoute::ViaControllers { backend_port, tls_server_name, .. } =
            api_route(&config.cluster_url.to_string(), &self.services)
        {
            let known = self.tx.borrow().controllers.clone();
            // With nothing known yet, the virtual address is the only lead:
            // it works when the agent itself is in an attached cgroup and
            // something else published backends.
            if !known.is_empty() {
                // From the current target on, the first controller the
                // health checks do not reject (else the target itself).
                let n = known.len();
                let ip = (0..n)
                    .map(|i| known[(self.target + i) % n])
                    .find(|ip| !self.is_rejected(SocketAddr::new(*ip, backend_port)))
                    .unwrap_or(known[self.target % n]);
                redirect_to_controller(&mut config, ip, backend_port, &tls_server_name);
                dialed = Some(Dialed { backend: SocketAddr::new(ip, backend_port) });
            }
        }
        debug!(server = %config.cluster_url, "discovery client");
        let client =
            Client::try_from(config).map_err(|source| DiscoveryError::Client { path: path.clone(), source })?;
        Ok((client, dialed))
    }

    async fn watch<K>(&mut self, api: Api<K>, wc: watcher::Config, dialed: Option<Dialed>, slices: bool) -> Outcome
    where
        K: kube::Resource + ControllerAddresses + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let stream = watcher(api, wc.timeout(self.tuning.watch_timeout_secs));
        futures::pin_mut!(stream);
        let mut objects: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        let mut pending: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        let mut errors = 0u32;
        loop {
            let item = tokio::select! {
                _ = self.tx.closed() => return Outcome::Closed,
                Some(()) = rejection_changed(&mut self.rejected), if dialed.is_some() => {
                    if let Some(d) = dialed
                        && self.is_rejected(d.backend)
                        && self.tx.borrow().controllers.iter().any(|ip| !self.is_rejected(SocketAddr::new(*ip, d.backend.port())))
                    {
                        info!(controller = %d.backend.ip(), "the health checks rejected the controller discovery watches through; switching");
                        return Outcome::NextTarget;
                    }
                    continue;
                }
                item = stream.next() => item,
            };
            let changed = match item {
                // The watcher stream does not end by itself; if it does, start over.
                None => return Outcome::NextTarget,
                Some(Ok(Event::Init)) => {
                    pending.clear();
                    false
                }
                Some(Ok(Event::InitApply(obj))) => {
                    pending.insert(key(&obj), usable_addresses(&obj));
                    false
                }
                Some(Ok(Event::InitDone)) => {
                    objects = std::mem::take(&mut pending);
                    true
                }
                Some(Ok(Event::Apply(obj))) => {
                    objects.insert(key(&obj), usable_addresses(&obj));
                    self.backoff.reset();
                    true
                }
                Some(Ok(Event::Delete(obj))) => {
                    objects.remove(&key(&obj));
                    self.backoff.reset();
                    true
                }
                Some(Err(e)) => {
                    if let watcher::Error::InitialListFailed(kube::Error::Api(s)) = &e
                        && s.code == 404
                        && slices
                    {
                        return Outcome::NotServed;
                    }
                    if let watcher::Error::WatchError(s) = &e
                        && s.code == 410
                    {
                        // Normal life of a watch: the watcher relists at once.
                        info!("watch expired (410 Gone); relisting");
                        continue;
                    }
                    errors += 1;
                    if let watcher::Error::InitialListFailed(kube::Error::Api(s))
                    | watcher::Error::WatchStartFailed(kube::Error::Api(s)) = &e
                        && s.code == 403
                    {
                        warn!(
                            attempt = errors, namespace = %self.cfg.namespace,
                            "controller discovery is forbidden: the kubeconfig's identity needs list/watch of \
                             endpointslices and endpoints there (deploy/rbac.yaml); keeping the last controller set"
                        );
                        self.record_error(format!(
                            "forbidden (403) in namespace {}: the kubeconfig's identity needs list and watch of \
                             endpointslices and endpoints (deploy/rbac.yaml): {}",
                            self.cfg.namespace, s.message
                        ));
                    } else {
                        warn!(attempt = errors, "controller discovery: {e}; keeping the last controller set");
                        self.record_error(e.to_string());
                    }
                    if dialed.is_some()
                        && errors >= self.tuning.errors_before_switch
                        && self.tx.borrow().controllers.len() > 1
                    {
                        return Outcome::NextTarget;
                    }
                    if self.pause().await {
                        return Outcome::Closed;
                    }
                    continue;
                }
            };
            if changed {
                // Only a watch event resets the backoff: a list that works
                // before a watch that is refused (RBAC without `watch`) must
                // not turn the retries into a relist loop.
                errors = 0;
                self.publish(&objects);
                if let Some(d) = dialed
                    && !self.tx.borrow().controllers.contains(&d.backend.ip())
                {
                    info!(controller = %d.backend.ip(), "the controller discovery dials left the set; switching");
                    self.target = 0;
                    return Outcome::NextTarget;
                }
            }
        }
    }

    /// Publishes the union of the objects' addresses, unless it is empty.
    fn publish(&mut self, objects: &BTreeMap<String, BTreeSet<IpAddr>>) {
        let mut set: Vec<IpAddr> = objects.values().flatten().copied().collect::<BTreeSet<_>>().into_iter().collect();
        if set.is_empty() {
            if !self.warned_empty {
                warn!(
                    namespace = %self.cfg.namespace, service = %self.cfg.service,
                    "the API lists no usable controller; keeping the last controller set"
                );
                self.warned_empty = true;
            }
            return;
        }
        self.warned_empty = false;
        let max = nllb_common::MAX_BACKENDS as usize;
        if set.len() > max {
            warn!(count = set.len(), max, "more controllers than backend slots; using the first {max}");
            set.truncate(max);
        }
        let (same, generation) = {
            let cur = self.tx.borrow();
            (cur.controllers == set && cur.source == Source::Api, cur.generation + 1)
        };
        if same {
            return;
        }
        if self.last_stored.as_ref() != Some(&set) {
            let cached = CachedSet {
                namespace: self.cfg.namespace.clone(),
                service: self.cfg.service.clone(),
                controllers: set.clone(),
            };
            match cache::store(&self.state_dir, &cached) {
                Ok(()) => self.last_stored = Some(set.clone()),
                Err(e) => warn!("{e}"),
            }
        }
        info!(controllers = ?set, generation, "controller set from the API");
        let last_error = self.tx.borrow().last_error.clone();
        self.tx.send_replace(DiscoveredSet { controllers: set, source: Source::Api, generation, last_error });
    }

    /// Keeps `message` for `nllb status` without waking the agent.
    fn record_error(&self, message: String) {
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.tx.send_if_modified(|set| {
            set.last_error = Some(super::LastError { message, at_unix_ms });
            false
        });
    }

    /// Sleeps for the next backoff step; true when every receiver is gone.
    async fn pause(&mut self) -> bool {
        let d = self.backoff.next().unwrap_or(self.tuning.backoff_max);
        tokio::select! {
            _ = self.tx.closed() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}

/// Resolves when the rejected set changed; never without a sender.
async fn rejection_changed(rejected: &mut Option<Rejected>) -> Option<()> {
    match rejected {
        Some(r) => r.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// Lists are served from the API server's watch cache (resourceVersion=0),
/// as client-go's reflectors do: after an API server restart every worker
/// relists, and that must not all land on etcd.
fn list_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

fn key<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// kube-runtime's watcher backoff (exponential, backon underneath) with
/// the tuning's bounds and jitter, so many workers do not retry in step
/// after an API server restart. The loop pauses itself rather than wrapping
/// the stream in `StreamBackoff`: the same delays also pace failed client
/// set-ups, which happen outside any stream.
fn backoff(tuning: &Tuning) -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(tuning.backoff_min)
        .with_max_delay(tuning.backoff_max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}
