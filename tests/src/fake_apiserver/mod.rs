//! A wire-level fake Kubernetes API server for discovery tests.
//!
//! No kube-apiserver binary can be had on the test machines, so this speaks
//! the part of the REST + watch protocol that controller discovery uses,
//! over TLS, with JSON built from k8s-openapi types: list and watch of
//! EndpointSlices (`/apis/discovery.k8s.io/v1`) and Endpoints (`/api/v1`),
//! label and `metadata.name` field selectors, resourceVersions, BOOKMARK
//! events, `ERROR 410 Gone` for watches that resume too far back. Tests
//! drive it: change objects, expire or drop watches, stop serving
//! EndpointSlices (404), stop and restart on the same port.
//!
//! It runs on its own thread and tokio runtime, optionally inside a network
//! namespace (the thread joins it before binding), so it works from both
//! sync and async tests.

mod http;
pub mod pki;
pub mod store;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, WatchEvent},
};
use serde_json::Value;
use tokio::{sync::broadcast, task::AbortHandle};

pub use pki::Pki;
use store::{Broadcast, Change, Kind, Store};

/// Where and how to start.
#[derive(Clone, Debug)]
pub struct FakeApiOpts {
    /// Port 0 picks a free port (kept across restarts).
    pub bind: SocketAddr,
    /// Network namespace (`ip netns` name) to serve in; None: the caller's.
    pub netns: Option<String>,
    /// Extra certificate names beyond 127.0.0.1, ::1, localhost and the bind IP.
    pub extra_sans: Vec<String>,
    /// How often open watches get a BOOKMARK.
    pub bookmark_every: Duration,
}

impl Default for FakeApiOpts {
    fn default() -> Self {
        FakeApiOpts {
            bind: "127.0.0.1:0".parse().unwrap(),
            netns: None,
            extra_sans: Vec::new(),
            bookmark_every: Duration::from_millis(500),
        }
    }
}

pub(crate) struct Inner {
    pub store: Mutex<Store>,
    pub events: broadcast::Sender<Broadcast>,
    pub conns: Mutex<Vec<AbortHandle>>,
    pub requests: Mutex<Vec<String>>,
    pub serve_slices: Mutex<bool>,
    /// Answer every request 403, like an API server whose RBAC denies it.
    pub forbidden: Mutex<bool>,
    pub bookmark_every: Duration,
    /// Watches streaming right now.
    pub open_watches: std::sync::atomic::AtomicUsize,
    /// `ERROR 410 Gone` events sent so far.
    pub gone_sent: std::sync::atomic::AtomicUsize,
    /// The resourceVersion of every BOOKMARK sent.
    pub bookmarks: Mutex<Vec<u64>>,
}

/// A running fake API server; dropping it stops it.
pub struct FakeApiServer {
    inner: Arc<Inner>,
    pki: Pki,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    rt: tokio::runtime::Handle,
    listener: Mutex<Option<AbortHandle>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 with a free port.
    pub fn start() -> FakeApiServer {
        Self::start_with(FakeApiOpts::default())
    }

    pub fn start_with(opts: FakeApiOpts) -> FakeApiServer {
        let mut sans: Vec<String> = vec!["127.0.0.1".into(), "::1".into(), "localhost".into()];
        let ip = opts.bind.ip().to_string();
        if !sans.contains(&ip) && !opts.bind.ip().is_unspecified() {
            sans.push(ip);
        }
        sans.extend(opts.extra_sans.iter().cloned());
        let pki = Pki::new(&sans);
        let tls = Arc::new(pki.server_config());
        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            events,
            conns: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            serve_slices: Mutex::new(true),
            forbidden: Mutex::new(false),
            bookmark_every: opts.bookmark_every,
            open_watches: Default::default(),
            gone_sent: Default::default(),
            bookmarks: Default::default(),
        });
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let netns = opts.netns.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                if let Some(ns) = netns {
                    let path = format!("/run/netns/{ns}");
                    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                }
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                handle_tx.send(rt.handle().clone()).expect("hand over runtime");
                rt.block_on(async {
                    let _ = shutdown_rx.await;
                });
            })
            .expect("spawn fake-apiserver thread");
        let rt = handle_rx.recv().expect("fake-apiserver thread started");
        let mut server = FakeApiServer {
            inner,
            pki,
            tls,
            addr: opts.bind,
            rt,
            listener: Mutex::new(None),
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        server.addr = server.listen(opts.bind);
        server
    }

    /// Binds `bind` on the server's thread (so inside its netns) and serves.
    fn listen(&self, bind: SocketAddr) -> SocketAddr {
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = self.inner.clone();
        let tls = self.tls.clone();
        let task = self.rt.spawn(async move {
            // A fixed port given back by `stop` can be taken meanwhile as
            // the local port of some other test's outgoing connection on
            // loopback; it is free again once that one closes.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            let listener = loop {
                match tokio::net::TcpListener::bind(bind).await {
                    Ok(l) => break l,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AddrInUse
                            && bind.port() != 0
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            };
            let _ = tx.send(Ok(listener.local_addr().expect("local addr")));
            http::accept_loop(listener, tls, inner).await;
        });
        let addr = rx.recv().expect("listener task ran").unwrap_or_else(|e| panic!("fake apiserver bind {bind}: {e}"));
        *self.listener.lock().unwrap() = Some(task.abort_handle());
        addr
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://addr`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// A kubeconfig for `server` trusting this server's CA (token auth).
    pub fn kubeconfig_yaml(&self, server: &str) -> String {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(self.pki.ca_pem.as_bytes());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: nllb-test-token\n"
        )
    }

    /// Writes `kubeconfig_yaml(server)` to `dir/kubeconfig` and returns the path.
    pub fn write_kubeconfig(&self, dir: &Path, server: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig_yaml(server)).expect("write kubeconfig");
        path
    }

    // ---- objects ----

    /// Creates or replaces an EndpointSlice (ADDED / MODIFIED to watchers).
    pub fn apply_slice(&self, slice: &EndpointSlice) {
        self.apply(Kind::EndpointSlice, serde_json::to_value(slice).expect("serialize slice"));
    }

    pub fn apply_endpoints(&self, endpoints: &Endpoints) {
        self.apply(Kind::Endpoints, serde_json::to_value(endpoints).expect("serialize endpoints"));
    }

    /// Creates or replaces an object given as raw JSON (for data a typed
    /// struct cannot express). It needs metadata.namespace and .name.
    pub fn apply_raw(&self, kind: Kind, mut obj: Value) {
        let mut st = self.inner.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = Value::from(rv.to_string());
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).expect("metadata.namespace").to_string();
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).expect("metadata.name").to_string();
        let map = match kind {
            Kind::EndpointSlice => &mut st.slices,
            Kind::Endpoints => &mut st.endpoints,
        };
        let existed = map.insert((ns.clone(), name.clone()), obj.clone()).is_some();
        let event = if existed { WatchEvent::Modified(obj.clone()) } else { WatchEvent::Added(obj.clone()) };
        self.record(&mut st, kind, ns, name, &obj, store::line(&event));
    }

    fn apply(&self, kind: Kind, obj: Value) {
        self.apply_raw(kind, obj)
    }

    pub fn delete_slice(&self, namespace: &str, name: &str) {
        self.delete(Kind::EndpointSlice, namespace, name)
    }

    pub fn delete_endpoints(&self, namespace: &str, name: &str) {
        self.delete(Kind::Endpoints, namespace, name)
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut st = self.inner.store.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        let removed = match kind {
            Kind::EndpointSlice => st.slices.remove(&key),
            Kind::Endpoints => st.endpoints.remove(&key),
        };
        let Some(mut obj) = removed else { return };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::from(st.rv.to_string());
        let line = store::line(&WatchEvent::Deleted(obj.clone()));
        self.record(&mut st, kind, key.0, key.1, &obj, line);
    }

    fn record(&self, st: &mut Store, kind: Kind, namespace: String, name: String, obj: &Value, line: Vec<u8>) {
        let change = Arc::new(Change { rv: st.rv, kind, namespace, name, labels: store::labels_of(obj), line });
        st.history.push(change.clone());
        let _ = self.inner.events.send(Broadcast::Change(change));
    }

    // ---- faults ----

    /// Serve EndpointSlices (default) or answer them with 404, like an API
    /// server that predates discovery.k8s.io/v1.
    pub fn serve_endpoint_slices(&self, on: bool) {
        *self.inner.serve_slices.lock().unwrap() = on;
    }

    /// Answer every request with 403 Forbidden (missing RBAC) or not.
    pub fn forbid(&self, on: bool) {
        *self.inner.forbidden.lock().unwrap() = on;
    }

    /// Forgets the watch history: a watch resuming from any resourceVersion
    /// seen so far gets 410 Gone. Open watches are not told.
    pub fn compact(&self) {
        let mut st = self.inner.store.lock().unwrap();
        st.oldest_watchable = st.rv + 1;
        st.history.clear();
    }

    /// Compacts and sends `ERROR 410 Gone` to every open watch, which ends it.
    pub fn expire_watches(&self) {
        self.compact();
        let _ = self.inner.events.send(Broadcast::Gone);
    }

    /// Cuts every open connection (no clean end of the chunked stream).
    pub fn drop_connections(&self) {
        for h in self.inner.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Stops listening and cuts every connection; objects are kept.
    pub fn stop(&self) {
        if let Some(h) = self.listener.lock().unwrap().take() {
            h.abort();
        }
        self.drop_connections();
        // Give the runtime a moment to close the sockets.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Listens again on the same address. A restarted kube-apiserver has
    /// lost its watch cache: so does this one.
    pub fn restart(&self) {
        self.stop();
        self.compact();
        let addr = self.listen(self.addr);
        assert_eq!(addr, self.addr);
    }

    // ---- what happened ----

    /// Every request so far, as "LIST endpointslices default ..." or
    /// "WATCH endpoints default rv=12 ...".
    pub fn requests(&self) -> Vec<String> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// How many requests start with `prefix` (e.g. "LIST endpointslices").
    pub fn count(&self, prefix: &str) -> usize {
        self.inner.requests.lock().unwrap().iter().filter(|r| r.starts_with(prefix)).count()
    }

    /// Watches streaming right now.
    pub fn open_watches(&self) -> usize {
        self.inner.open_watches.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `ERROR 410 Gone` events sent so far.
    pub fn gone_sent(&self) -> usize {
        self.inner.gone_sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// BOOKMARK events sent so far whose resourceVersion is at least `rv`.
    pub fn bookmarks_sent(&self, rv: u64) -> usize {
        self.inner.bookmarks.lock().unwrap().iter().filter(|b| **b >= rv).count()
    }

    /// Waits (up to `timeout`) until at least `n` watches are open.
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) {
        let end = std::time::Instant::now() + timeout;
        while self.open_watches() < n {
            assert!(std::time::Instant::now() < end, "no {n} open watch(es) after {timeout:?}: {:?}", self.requests());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.store.lock().unwrap().rv
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(h) = self.listener.lock().unwrap().take() {
            h.abort();
        }
        self.drop_connections();
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- object builders ----

/// An EndpointSlice of `service` like the API server's own for
/// `default/kubernetes`: each (address, ready) is one endpoint on port 6443.
/// The address type follows the first address.
pub fn endpoint_slice(namespace: &str, name: &str, service: &str, endpoints: &[(&str, bool)]) -> EndpointSlice {
    let v6 = endpoints.first().is_some_and(|(a, _)| a.contains(':'));
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/service-name".to_string(), service.to_string()),
                (
                    "endpointslice.kubernetes.io/managed-by".to_string(),
                    "endpointslicemirroring-controller.k8s.io".to_string(),
                ),
            ])),
            ..Default::default()
        },
        address_type: if v6 { "IPv6" } else { "IPv4" }.into(),
        endpoints: endpoints
            .iter()
            .map(|(a, ready)| Endpoint {
                addresses: vec![a.to_string()],
                conditions: Some(EndpointConditions { ready: Some(*ready), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![SlicePort {
            name: Some("https".into()),
            port: Some(6443),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

/// The Endpoints object `namespace/name` with ready and not-ready addresses.
pub fn endpoints(namespace: &str, name: &str, ready: &[&str], not_ready: &[&str]) -> Endpoints {
    let addrs = |l: &[&str]| {
        (!l.is_empty())
            .then(|| l.iter().map(|ip| EndpointAddress { ip: ip.to_string(), ..Default::default() }).collect())
    };
    Endpoints {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
        subsets: Some(vec![EndpointSubset {
            addresses: addrs(ready),
            not_ready_addresses: addrs(not_ready),
            ports: Some(vec![EndpointPort {
                name: Some("https".into()),
                port: 6443,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        }]),
    }
}

/// Addresses as IPs (for assertions).
pub fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().expect("an IP")).collect()
}
