//! `nllb agent`: installs the datapath, keeps it serving the current plan,
//! and tears it down on SIGINT/SIGTERM.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use std::sync::Arc;

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    config::{Config, ConfigError},
    config::Mode,
    datapath::{
        Datapath, DatapathError, DatapathKind,
        ebpf::{EbpfDatapath, EbpfOptions},
    },
    discovery::DiscoveredSet,
    health::{self, HealthError, HealthSnapshot, Monitor, Transitions},
    metrics::{self, Metrics},
    model::Plan,
    status::{AgentStatus, ServiceStatus},
    sys,
};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub config_path: PathBuf,
    pub k0s_config: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub pin_path: PathBuf,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Remove programs and pins on exit instead of leaving the datapath
    /// serving the last published backends.
    pub detach_on_exit: bool,
    /// Overrides the config's `metricsAddr`; None there too means the default.
    pub metrics_addr: Option<SocketAddr>,
    /// Overrides the config's `mode` (default auto).
    pub mode: Option<Mode>,
    /// Overrides the config's `envoy.binary`.
    pub envoy_binary: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Datapath(#[from] DatapathError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Health(#[from] HealthError),
    #[error(transparent)]
    Mode(#[from] crate::detect::ModeError),
}

impl AgentError {
    /// 2 for input the operator must fix, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Config(_) => 2,
            // Unreadable CA, kubeconfig or client certificate: operator input.
            AgentError::Health(HealthError::Config(_) | HealthError::File { .. }) => 2,
            _ => 1,
        }
    }
}

/// Check everything the operator gave us before touching the machine.
pub fn validate(opts: &AgentOptions) -> Result<(Config, PathBuf), AgentError> {
    let config = Config::load_with(&opts.config_path, opts.k0s_config.as_deref())?;
    let cgroup = match &opts.cgroup {
        Some(c) => c.clone(),
        None => sys::cgroup2_mount().map_err(|e| ConfigError::new("--cgroup", format!("{e}; pass --cgroup DIR")))?,
    };
    if !cgroup.is_dir() {
        return Err(ConfigError::new(
            "--cgroup",
            format!("{} is not a directory; pass a directory under the cgroup2 mount", cgroup.display()),
        )
        .into());
    }
    // In auto mode a cgroup the kernel datapath cannot use makes the agent
    // fall back to Envoy (and say why); asked for eBPF, it is a bad flag.
    let requested = opts.mode.or(config.mode).unwrap_or(Mode::Auto);
    if requested == Mode::Ebpf && !sys::is_cgroup2_dir(&cgroup) {
        return Err(ConfigError::new(
            "--cgroup",
            format!("{} is not a cgroup v2 directory; pass a directory under the cgroup2 mount", cgroup.display()),
        )
        .into());
    }
    if !opts.pin_path.is_absolute() || opts.pin_path.parent().is_none() {
        return Err(ConfigError::new("--pin-path", "must be an absolute path under a bpffs mount, e.g. /sys/fs/bpf/nllb").into());
    }
    Ok((config, cgroup))
}

/// The controller set in force: discovered (or cached) when discovery is
/// on, else the static seed.
fn controllers(discovered: &Option<watch::Receiver<DiscoveredSet>>, seed: &[IpAddr]) -> Vec<IpAddr> {
    match discovered {
        Some(rx) => rx.borrow().controllers.clone(),
        None => seed.to_vec(),
    }
}

/// The next discovered set; never resolves without discovery.
async fn next_discovered(rx: &mut Option<watch::Receiver<DiscoveredSet>>) -> Option<DiscoveredSet> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn probe_observer(metrics: &Arc<Metrics>) -> health::ProbeObserver {
    let metrics = metrics.clone();
    Arc::new(move |target, took| {
        let labels = metrics::AddrLabels { backend: target.to_string() };
        metrics.probe_duration.get_or_create(&labels).observe(took.as_secs_f64());
    })
}

struct Agent {
    config: Config,
    opts: AgentOptions,
    cgroup: PathBuf,
    datapath: Box<dyn Datapath>,
    service_ids: BTreeMap<String, u32>,
    plan: Plan,
    seen_passive: BTreeMap<SocketAddr, u32>,
    metrics: Arc<Metrics>,
    health: Arc<metrics::Health>,
    metrics_addr: Option<SocketAddr>,
    /// The config file's text as last applied, to notice edits.
    config_text: String,
    monitor: Monitor,
    health_rx: watch::Receiver<HealthSnapshot>,
    transitions: Transitions,
    /// Controllers from the API (`discovery.kubernetes`); None: static `backends`.
    discovered: Option<watch::Receiver<DiscoveredSet>>,
    /// The controller set in force: discovered, cached, or the seed.
    backends: Vec<IpAddr>,
}

pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let (config, cgroup) = validate(&opts)?;
    if let Some(prev) = AgentStatus::read(&opts.run_dir)
        && prev.pid != std::process::id()
        && crate::status::pid_alive(prev.pid)
        && prev.pin_path == opts.pin_path
    {
        return Err(AgentError::Datapath(DatapathError::Other(format!(
            "another nllb agent (pid {}) serves {}; stop it first",
            prev.pid,
            opts.pin_path.display()
        ))));
    }
    let config_text = std::fs::read_to_string(&opts.config_path).unwrap_or_default();
    let metrics_addr = opts.metrics_addr.or(config.metrics_addr).unwrap_or_else(|| metrics::DEFAULT_ADDR.parse().expect("default address"));
    if !metrics_addr.ip().is_loopback() {
        tracing::warn!(%metrics_addr, "metrics and health endpoints are reachable from other hosts");
    }
    // Bound before the datapath is installed: a taken port changes nothing.
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(metrics::Health::default());
    health.beat();
    let metrics_addr = metrics::serve(metrics_addr, metrics.clone(), health.clone())
        .await
        .map_err(|e| AgentError::Io(std::io::Error::new(e.kind(), format!("metrics address {metrics_addr}: {e}"))))?;
    // Starts with the cache or the seed, so the first plan never waits for the API.
    let discovered = config.discovery.kubernetes.clone().map(|k| {
        crate::discovery::spawn(k, config.services.clone(), opts.state_dir.clone(), config.backends.clone())
    });
    let backends = controllers(&discovered, &config.backends);
    // Before anything is attached, so unreadable TLS material exits 2 clean.
    let monitor = Monitor::spawn(config.health.clone())?;
    monitor.observe_probes(probe_observer(&metrics));
    monitor.set_targets(health::targets(&config.services, &backends));
    let health_rx = monitor.subscribe();
    let mut transitions = Transitions::new();
    // Every backend starts healthy: no black hole while the first probes run.
    let plan = transitions.react(&config.services, &backends, &health_rx.borrow()).plan;
    let requested = opts.mode.or(config.mode).unwrap_or(Mode::Auto);
    let envoy_binary = opts.envoy_binary.clone().or_else(|| config.envoy.binary.clone());
    let datapath: Box<dyn Datapath> = match crate::detect::select_mode(requested, &cgroup, envoy_binary.as_deref())? {
        Mode::Envoy => Box::new(crate::envoy::start_datapath(&config, envoy_binary.as_deref(), &opts.run_dir, &plan)?),
        Mode::Ebpf | Mode::Auto => Box::new(EbpfDatapath::install(
            EbpfOptions {
                cgroup: cgroup.clone(),
                pin_path: opts.pin_path.clone(),
                host_network_only: config.host_network_only,
                passive: config.passive.enabled,
                eject_hold: config.passive.eject_hold,
            },
            &plan,
        )?),
    };
    if datapath.kind() == DatapathKind::Ebpf
        && let Some(v) = crate::compat::running_kernel()
    {
        for f in crate::compat::missing_features(v) {
            tracing::warn!(feature = f.name, min_kernel = %f.min, "this kernel lacks a feature nllb uses; it is disabled");
        }
    }
    let service_ids = datapath.service_ids();
    let mut agent = Agent {
        config,
        opts,
        cgroup,
        datapath,
        service_ids,
        plan,
        seen_passive: BTreeMap::new(),
        metrics,
        health,
        metrics_addr: Some(metrics_addr),
        config_text,
        monitor,
        health_rx,
        transitions,
        discovered,
        backends,
    };
    let kind = agent.datapath.kind();
    agent.metrics.set_mode(&format!("{kind:?}").to_lowercase());
    let result = agent.serve().await;
    // Envoy is the agent's child: it always goes with the agent.
    if agent.opts.detach_on_exit || agent.config.detach_on_exit || kind == DatapathKind::Envoy {
        let shutdown = agent.datapath.shutdown();
        let _ = std::fs::remove_file(agent.opts.run_dir.join(crate::status::STATUS_FILE));
        result?;
        shutdown?;
    } else {
        // Worker components keep reaching the control plane while the agent
        // restarts or upgrades: the pinned links keep the programs attached.
        tracing::info!(
            pin_path = %agent.opts.pin_path.display(),
            "datapath stays attached with the last published backends; `nllb uninstall` removes it"
        );
        result?;
    }
    Ok(())
}

impl Agent {
    async fn serve(&mut self) -> Result<(), AgentError> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut ticks: u64 = 0;
        self.write_status();
        tracing::info!(services = self.plan.services.len(), "nllb agent ready");
        loop {
            tokio::select! {
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()) }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()) }
                _ = sighup.recv() => self.reload(),
                Some(set) = next_discovered(&mut self.discovered) => {
                    tracing::info!(controllers = ?set.controllers, source = ?set.source, "controller set changed");
                    self.backends = set.controllers;
                    self.monitor.set_targets(health::targets(&self.config.services, &self.backends));
                    self.apply_health();
                }
                _ = tick.tick() => {
                    ticks += 1;
                    self.watch_passive();
                    self.health.beat();
                    self.metrics.sync_datapath(&self.datapath.counters());
                    // A ConfigMap update or an edit applies itself: no restart,
                    // no SIGHUP needed (k0s needs a worker restart, #8212).
                    if ticks % 4 == 0 {
                        self.reload_if_changed();
                        // Probe latencies change without verdicts changing.
                        self.write_status();
                    }
                }
                Ok(()) = self.health_rx.changed() => self.apply_health(),
            }
        }
    }

    fn reject_reload(&self, e: &dyn std::fmt::Display) {
        self.metrics.reloads.get_or_create(&metrics::ModeLabels { mode: "rejected".into() }).inc();
        tracing::error!(error = %e, "reload rejected: keeping the running config");
    }

    fn reload_if_changed(&mut self) {
        match std::fs::read_to_string(&self.opts.config_path) {
            Ok(text) if text != self.config_text => {
                tracing::info!("config file changed");
                self.reload();
            }
            _ => {}
        }
    }

    /// SIGHUP: apply a new config's services and backends; a bad config is
    /// logged and the running one stays.
    fn reload(&mut self) {
        let text = std::fs::read_to_string(&self.opts.config_path).unwrap_or_default();
        // Remembered even when rejected, so a bad file is reported once.
        self.config_text = text.clone();
        let derived = match self.opts.k0s_config.as_deref().map(crate::k0s::services_from_k0s).transpose() {
            Ok(d) => d.unwrap_or_default(),
            Err(e) => {
                self.reject_reload(&e);
                return;
            }
        };
        let config = match Config::parse_with(&text, derived) {
            Ok(c) => c,
            Err(e) => {
                self.reject_reload(&e);
                return;
            }
        };
        if config.host_network_only != self.config.host_network_only || config.passive.enabled != self.config.passive.enabled {
            tracing::warn!("hostNetworkOnly and passive changes take effect after a restart");
        }
        let health_changed =
            serde_json::to_value(&config.health).ok() != serde_json::to_value(&self.config.health).ok();
        if health_changed {
            // New probe settings: a fresh monitor (backends start healthy
            // again and the first failed probe ejects at once).
            match Monitor::spawn(config.health.clone()) {
                Ok(monitor) => {
                    monitor.observe_probes(probe_observer(&self.metrics));
                    self.health_rx = monitor.subscribe();
                    self.monitor = monitor;
                    tracing::info!("health settings changed: probes restarted");
                }
                Err(e) => {
                    self.reject_reload(&e);
                    return;
                }
            }
        }
        self.backends = controllers(&self.discovered, &config.backends);
        self.monitor.set_targets(health::targets(&config.services, &self.backends));
        self.config = config;
        self.metrics.reloads.get_or_create(&metrics::ModeLabels { mode: "applied".into() }).inc();
        tracing::info!("reloaded {}", self.opts.config_path.display());
        self.apply_health();
    }

    /// Health or the backend set changed: publish the healthy backends (or
    /// all of them in panic mode), clear passive marks of recovered backends,
    /// and close nllb's sockets to backends that left.
    fn apply_health(&mut self) {
        let snapshot = self.health_rx.borrow_and_update().clone();
        let reaction = self.transitions.react(&self.config.services, &self.backends, &snapshot);
        reaction.log();
        for backend in &reaction.recovered {
            if let Err(e) = self.datapath.clear_passive(*backend) {
                tracing::warn!(backend = %backend, error = %e, "cannot clear the passive mark");
            }
        }
        if let Err(e) = self.publish(reaction.plan.clone()) {
            tracing::error!(error = %e, "publishing the backend set failed");
        }
        let doomed = reaction.to_destroy(&self.config.health);
        if !doomed.is_empty() {
            let cookies = self.datapath.rewritten_sockets();
            for backend in doomed {
                match crate::sock_destroy::destroy_sockets_to(backend, Some(&cookies)) {
                    Ok(n) => tracing::info!(backend = %backend, sockets = n, "closed established connections through nllb"),
                    Err(e) => tracing::warn!(backend = %backend, error = %e, "cannot destroy sockets (SOCK_DESTROY)"),
                }
            }
        }
        self.write_status();
    }

    fn publish(&mut self, plan: Plan) -> Result<(), DatapathError> {
        if plan == self.plan {
            return Ok(());
        }
        self.datapath.apply(&plan)?;
        self.service_ids = self.datapath.service_ids();
        self.plan = plan;
        self.write_status();
        Ok(())
    }

    fn watch_passive(&mut self) {
        for f in self.datapath.passive_failures() {
            let prev = self.seen_passive.insert(f.backend, f.failures);
            self.metrics.sync_passive(f.backend, f.failures);
            if prev != Some(f.failures) {
                tracing::warn!(backend = %f.backend, failures = f.failures, "kernel saw a failed connect: backend passively ejected");
                self.monitor.report_passive_failure(f.backend);
            }
        }
    }

    fn status_extra(&self) -> BTreeMap<String, serde_json::Value> {
        let mut extra = BTreeMap::new();
        extra.insert("metrics_addr".into(), serde_json::json!(self.metrics_addr.map(|a| a.to_string())));
        if let Some((key, value)) = self.datapath.status_extra() {
            if let Some(restarts) = value.get("restarts").and_then(|r| r.as_u64()) {
                self.metrics.sync_envoy_restarts(restarts);
            }
            extra.insert(key, value);
        }
        if let Some(rx) = &self.discovered {
            let set = rx.borrow();
            extra.insert(
                "discovery".into(),
                serde_json::json!({
                    "source": format!("{:?}", set.source).to_lowercase(),
                    "generation": set.generation,
                    "controllers": set.controllers,
                    "last_error": set.last_error,
                }),
            );
        }
        extra
    }

    fn write_status(&mut self) {
        for (addr, h) in &self.monitor.snapshot().backends {
            let labels = metrics::AddrLabels { backend: addr.to_string() };
            self.metrics.backend_healthy.get_or_create(&labels).set(i64::from(h.healthy));
        }
        let published: usize = self.plan.services.iter().map(|s| s.backends.len()).sum();
        self.health.ready.store(published > 0, std::sync::atomic::Ordering::Relaxed);
        for s in &self.plan.services {
            let labels = metrics::ServiceLabels { service: s.name.clone() };
            self.metrics.published.get_or_create(&labels).set(s.backends.len() as i64);
            self.metrics.panic_mode.get_or_create(&labels).set(i64::from(s.panic));
        }
        let services = self
            .plan
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                id: self.service_ids.get(&s.name).copied(),
                listen: s.listen.clone(),
                known_backends: self
                    .config
                    .services
                    .iter()
                    .find(|c| c.name == s.name)
                    .map(|c| self.backends.iter().map(|ip| SocketAddr::new(*ip, c.backend_port)).collect())
                    .unwrap_or_default(),
                published_backends: s.backends.clone(),
                panic: s.panic,
            })
            .collect();
        let status = AgentStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            mode: format!("{:?}", self.datapath.kind()).to_lowercase(),
            pin_path: self.opts.pin_path.clone(),
            cgroup: Some(self.cgroup.clone()),
            services,
            health: serde_json::to_value(self.monitor.snapshot()).unwrap_or_default(),
            extra: self.status_extra(),
            updated_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        };
        if let Err(e) = status.write(&self.opts.run_dir) {
            tracing::warn!(error = %e, dir = %self.opts.run_dir.display(), "cannot write the status file");
        }
    }
}
