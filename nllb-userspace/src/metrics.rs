//! Prometheus metrics and the agent's HTTP endpoints (`/metrics`,
//! `/healthz`, `/readyz`) on a loopback address by default.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::datapath::DatapathSnapshot;

pub const DEFAULT_ADDR: &str = "127.0.0.1:9542";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddrLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

type HistogramFamily = Family<AddrLabels, Histogram, fn() -> Histogram>;

fn probe_histogram() -> Histogram {
    // 0.5 ms .. ~1 s: in-cluster probes are fast, blackholes hit the timeout.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 12))
}

pub struct Metrics {
    registry: Registry,
    pub backend_healthy: Family<AddrLabels, Gauge>,
    pub probe_duration: HistogramFamily,
    pub connects: Family<BackendLabels, Counter>,
    pub refused: Family<ServiceLabels, Counter>,
    pub passive_ejections: Family<AddrLabels, Counter>,
    pub passive_refused: Family<BackendLabels, Counter>,
    pub passive_syn_timeouts: Family<BackendLabels, Counter>,
    pub syn_sent_aborted: Family<AddrLabels, Counter>,
    pub syn_timeout: Family<AddrLabels, Gauge<f64, AtomicU64>>,
    pub handshake_worst: Family<AddrLabels, Gauge<f64, AtomicU64>>,
    pub panic_mode: Family<ServiceLabels, Gauge>,
    pub published: Family<ServiceLabels, Gauge>,
    pub mode: Family<ModeLabels, Gauge>,
    pub envoy_restarts: Counter,
    pub reloads: Family<ModeLabels, Counter>,
    pub established: Family<BackendLabels, Gauge>,
    pub rebalance_moves: Family<BackendLabels, Counter>,
    pub rebalance_weight: Family<AddrLabels, Gauge>,
    /// Last absolute value seen per kernel counter, to feed monotonic deltas.
    last: Mutex<HashMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("nllb");
        let m = Metrics {
            backend_healthy: Family::default(),
            probe_duration: Family::new_with_constructor(probe_histogram),
            connects: Family::default(),
            refused: Family::default(),
            passive_ejections: Family::default(),
            passive_refused: Family::default(),
            passive_syn_timeouts: Family::default(),
            syn_sent_aborted: Family::default(),
            syn_timeout: Family::default(),
            handshake_worst: Family::default(),
            panic_mode: Family::default(),
            published: Family::default(),
            mode: Family::default(),
            envoy_restarts: Counter::default(),
            reloads: Family::default(),
            established: Family::default(),
            rebalance_moves: Family::default(),
            rebalance_weight: Family::default(),
            last: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register("backend_healthy", "1 when active probes say the backend is healthy", m.backend_healthy.clone());
        registry.register("probe_duration_seconds", "Duration of active health probes", m.probe_duration.clone());
        registry.register("connects", "Connects steered to a backend by the datapath", m.connects.clone());
        registry.register(
            "connects_refused_no_backend",
            "Connects refused because the service had no backend",
            m.refused.clone(),
        );
        registry.register("passive_ejections", "Backends ejected by the kernel after a failed connect", m.passive_ejections.clone());
        registry.register("panic_mode", "1 when every backend is unhealthy and all are used", m.panic_mode.clone());
        registry.register("backends_published", "Backends taking new connects", m.published.clone());
        registry.register("datapath_mode", "The datapath serving the virtual addresses", m.mode.clone());
        registry.register("envoy_restarts", "Times the supervised Envoy was restarted", m.envoy_restarts.clone());
        registry.register("config_reloads", "Config reloads by result", m.reloads.clone());
        // Both results exported from the start, at 0: a series that first
        // appears at 1 shows no increase() in Prometheus, so the first
        // rejection would never fire NllbConfigReloadRejected.
        for mode in ["applied", "rejected"] {
            let _ = m.reloads.get_or_create(&ModeLabels { mode: mode.into() });
        }
        let build: Family<BuildLabels, Gauge> = Family::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("build_info", "Agent build", build);
        registry.register(
            "passive_refused",
            "Steered connects refused, given up or aborted before they connected",
            m.passive_refused.clone(),
        );
        registry.register(
            "passive_syn_timeouts",
            "Steered connects whose first SYN went unanswered within the SYN timeout",
            m.passive_syn_timeouts.clone(),
        );
        registry.register(
            "syn_sent_aborted",
            "Steered connects still waiting for a SYN-ACK that the agent aborted when their backend was marked",
            m.syn_sent_aborted.clone(),
        );
        registry.register(
            "syn_timeout_seconds",
            "SYN retransmission timeout in force for steered connects",
            m.syn_timeout.clone(),
        );
        registry.register(
            "handshake_worst_seconds",
            "Longest recent probe TCP handshake (what synTimeout auto is derived from)",
            m.handshake_worst.clone(),
        );
        registry.register(
            "established_connections",
            "Established connections nllb steered, per backend, at the last count",
            m.established.clone(),
        );
        registry.register(
            "rebalance_moves",
            "Connections rebalancing ended at a backend so they reconnect to a less loaded one",
            m.rebalance_moves.clone(),
        );
        registry.register(
            "rebalance_weight",
            "Slots of a backend in its service's table (more than 1 while it draws reconnects)",
            m.rebalance_weight.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Established connections per (service, backend) as just counted; the
    /// move counters of those backends show up from here on, at 0.
    pub fn set_established<'a>(&self, counts: impl Iterator<Item = (&'a str, SocketAddr, usize)>) {
        self.established.clear();
        for (service, backend, n) in counts {
            let labels = BackendLabels { service: service.into(), backend: backend.to_string() };
            self.established.get_or_create(&labels).set(n as i64);
            let _ = self.rebalance_moves.get_or_create(&labels);
        }
    }

    pub fn set_rebalance_weights(&self, weights: impl Iterator<Item = (SocketAddr, u32)>) {
        self.rebalance_weight.clear();
        for (backend, w) in weights {
            self.rebalance_weight.get_or_create(&AddrLabels { backend: backend.to_string() }).set(i64::from(w));
        }
    }

    pub fn rebalance_move(&self, service: &str, backend: SocketAddr) {
        let labels = BackendLabels { service: service.into(), backend: backend.to_string() };
        self.rebalance_moves.get_or_create(&labels).inc();
    }

    /// Feed an absolute kernel counter into a monotonic Prometheus counter.
    fn sync_counter(&self, counter: &Counter, key: String, absolute: u64) {
        let mut last = self.last.lock().expect("metrics lock");
        let prev = last.insert(key, absolute).unwrap_or(0);
        // A smaller value means the kernel counter was reset (slot reused).
        counter.inc_by(if absolute >= prev { absolute - prev } else { absolute });
    }

    pub fn sync_datapath(&self, snapshot: &DatapathSnapshot) {
        for s in &snapshot.services {
            for (backend, n) in &s.backends {
                let labels = BackendLabels { service: s.name.clone(), backend: backend.to_string() };
                let c = self.connects.get_or_create(&labels).clone();
                self.sync_counter(&c, format!("c/{}/{}", s.name, backend), n.connects);
                let c = self.passive_refused.get_or_create(&labels).clone();
                self.sync_counter(&c, format!("pr/{}/{}", s.name, backend), n.refused);
                let c = self.passive_syn_timeouts.get_or_create(&labels).clone();
                self.sync_counter(&c, format!("ps/{}/{}", s.name, backend), n.syn_timeouts);
            }
            let c = self.refused.get_or_create(&ServiceLabels { service: s.name.clone() }).clone();
            self.sync_counter(&c, format!("r/{}", s.name), s.no_backend);
        }
    }

    /// The kernel marked `backend`: one more passive ejection.
    pub fn passive_ejection(&self, backend: SocketAddr) {
        self.passive_ejections.get_or_create(&AddrLabels { backend: backend.to_string() }).inc();
    }

    pub fn set_syn_timing(
        &self,
        backend: SocketAddr,
        syn_timeout: Option<Duration>,
        handshake_worst: Option<Duration>,
    ) {
        let labels = AddrLabels { backend: backend.to_string() };
        self.syn_timeout.get_or_create(&labels).set(syn_timeout.map_or(0.0, |d| d.as_secs_f64()));
        self.handshake_worst.get_or_create(&labels).set(handshake_worst.map_or(0.0, |d| d.as_secs_f64()));
    }

    pub fn sync_envoy_restarts(&self, restarts: u64) {
        self.sync_counter(&self.envoy_restarts, "envoy_restarts".into(), restarts);
    }

    pub fn set_mode(&self, mode: &str) {
        self.mode.clear();
        self.mode.get_or_create(&ModeLabels { mode: mode.into() }).set(1);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding to a String");
        out
    }
}

/// What `/healthz` and `/readyz` answer from.
#[derive(Default)]
pub struct Health {
    /// Datapath installed and at least one backend published.
    pub ready: AtomicBool,
    /// Last time the agent loop ran (unix ms): a stuck loop is unhealthy.
    pub heartbeat_ms: AtomicU64,
}

impl Health {
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Bind first (so a taken port is an error at start-up), then serve.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, health: Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "metrics and health endpoints listening");
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(addr)
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let age = now_ms().saturating_sub(s.health.heartbeat_ms.load(Ordering::Relaxed));
    if age < Duration::from_secs(10).as_millis() as u64 {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "agent loop stalled\n")
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no backend published\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_become_monotonic_counters() {
        let m = Metrics::new();
        let s = |n| crate::datapath::DatapathSnapshot {
            services: vec![crate::datapath::ServiceSnapshot {
                name: "apiserver".into(),
                backends: [(
                    "198.18.1.2:6443".parse().unwrap(),
                    crate::datapath::BackendCounters { connects: n, ..Default::default() },
                )]
                .into(),
                no_backend: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        m.sync_datapath(&s(5));
        m.sync_datapath(&s(9));
        let text = m.render();
        assert!(text.contains(r#"nllb_connects_total{service="apiserver",backend="198.18.1.2:6443"} 9"#), "{text}");
        assert!(text.contains(r#"nllb_connects_refused_no_backend_total{service="apiserver"} 2"#), "{text}");
        assert!(text.contains(r#"nllb_build_info{version="#), "{text}");
    }
}
