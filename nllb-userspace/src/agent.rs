//! `nllb agent`: installs the datapath, keeps it serving the current plan,
//! and tears it down on SIGINT/SIGTERM.
//!
//! The event loop only waits on events: signals, discovery, health verdicts,
//! kernel events, the datapath thread's outcomes, the rebalancer's next
//! look and a once-a-second tick. Whatever blocks runs elsewhere: plan
//! publishing on the datapath thread (`datapath::worker`), socket destroys
//! on blocking tasks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    config::{Config, ConfigError, Mode},
    datapath::{
        Datapath, DatapathError, DatapathKind, DatapathSnapshot,
        ebpf::{EbpfDatapath, EbpfOptions},
        events::{EventReader, KernelEvent},
        reaper::Reaper,
        worker::{Applied, DatapathWorker},
    },
    discovery::DiscoveredSet,
    health::{self, HealthError, HealthSnapshot, Monitor, Transitions},
    metrics::{self, Metrics},
    model::{BackendFacts, Plan},
    passive,
    rebalance::Rebalance,
    sock_diag::States,
    stand_aside::{Selected, select_datapath},
    status::{AgentStatus, PassiveStatus, ServiceStatus},
    sys,
    trace::notes::{AbortCause, NoteSender},
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
        return Err(ConfigError::new(
            "--pin-path",
            "must be an absolute path under a bpffs mount, e.g. /sys/fs/bpf/nllb",
        )
        .into());
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

/// The next batch of kernel events; never resolves without a ring.
async fn next_events(reader: &mut Option<EventReader>) -> Vec<KernelEvent> {
    let Some(r) = reader else {
        return std::future::pending().await;
    };
    match r.next_batch().await {
        Ok(batch) => batch.iter().filter_map(KernelEvent::from_event).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "the kernel's event ring failed; passive marks now reach the agent only through probes");
            *reader = None;
            std::future::pending().await
        }
    }
}

fn probe_observer(metrics: &Arc<Metrics>) -> health::ProbeObserver {
    let metrics = metrics.clone();
    Arc::new(move |target, took| {
        let labels = metrics::AddrLabels { backend: target.to_string() };
        metrics.probe_duration.get_or_create(&labels).observe(took.as_secs_f64());
    })
}

/// What a finished socket destroy reports back to the loop.
struct Aborted {
    backend: SocketAddr,
    why: &'static str,
    result: Result<usize, String>,
}

struct Agent {
    config: Config,
    opts: AgentOptions,
    cgroup: PathBuf,
    datapath: DatapathWorker,
    /// New datapath snapshots: the kernel's counters go to the metrics as
    /// soon as the datapath thread has read them.
    snapshots: watch::Receiver<DatapathSnapshot>,
    events: Option<EventReader>,
    reaper: Option<Arc<Reaper>>,
    /// Tells an attached `nllb trace` which connects were aborted.
    notes: Arc<NoteSender>,
    /// The plan last handed to the datapath thread.
    plan: Plan,
    /// The plan the datapath last reported applied: what the status file
    /// calls published (the worker applies a moment after `plan` changes).
    live: Plan,
    /// A reload was accepted; it is reported once its plan is live.
    reload_pending: bool,
    /// Backends whose connections close once the plan that dropped them is
    /// live (closing them earlier would send the reconnects to them again).
    destroy_after_apply: BTreeSet<SocketAddr>,
    facts: BTreeMap<SocketAddr, BackendFacts>,
    aborted: BTreeMap<SocketAddr, u64>,
    aborted_tx: mpsc::UnboundedSender<Aborted>,
    aborted_rx: mpsc::UnboundedReceiver<Aborted>,
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
    /// Moves long-lived connections back to controllers that return (issue 17).
    rebalance: Rebalance,
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
    let metrics_addr = opts
        .metrics_addr
        .or(config.metrics_addr)
        .unwrap_or_else(|| metrics::DEFAULT_ADDR.parse().expect("default address"));
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
    // Before anything is attached, so unreadable TLS material exits 2 clean.
    let monitor = Monitor::spawn(config.health.clone())?;
    let discovered = config.discovery.kubernetes.clone().map(|k| {
        let rejected = Some(rejected_backends(monitor.subscribe()));
        crate::discovery::spawn(k, config.services.clone(), opts.state_dir.clone(), config.backends.clone(), rejected)
    });
    let backends = controllers(&discovered, &config.backends);
    monitor.observe_probes(probe_observer(&metrics));
    monitor.set_targets(health::targets(&config.services, &backends));
    let health_rx = monitor.subscribe();
    let mut transitions = Transitions::new();
    // Every backend starts healthy: no black hole while the first probes run.
    let plan = transitions.react(&config.services, &backends, &health_rx.borrow()).plan;
    let requested = opts.mode.or(config.mode).unwrap_or(Mode::Auto);
    let envoy_binary = opts.envoy_binary.clone().or_else(|| config.envoy.binary.clone());
    let mut datapath: Box<dyn Datapath> = match select_datapath(requested, &cgroup, envoy_binary.as_deref(), &plan)? {
        Selected::Aside(aside) => Box::new(aside),
        Selected::Mode(Mode::Envoy) => Box::new(crate::envoy::start_datapath(
            &config.envoy,
            &config.passive,
            envoy_binary.as_deref(),
            &opts.run_dir,
            &plan,
        )?),
        Selected::Mode(Mode::Ebpf | Mode::Auto) => Box::new(EbpfDatapath::install(
            EbpfOptions {
                cgroup: cgroup.clone(),
                pin_path: opts.pin_path.clone(),
                host_network_only: config.host_network_only,
                passive: config.passive.enabled,
                eject_hold: config.passive.eject_hold,
                syn_retries: config.passive.syn_retries,
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
    let events = datapath.take_events();
    let reaper = datapath.reaper();
    let kind = datapath.kind();
    let (aborted_tx, aborted_rx) = mpsc::unbounded_channel();
    let notes = Arc::new(NoteSender::new(&opts.run_dir));
    let rebalance = Rebalance::new(config.rebalance.clone(), reaper.clone()).with_notes(notes.clone());
    let datapath = DatapathWorker::spawn(datapath);
    let mut agent = Agent {
        config,
        opts,
        cgroup,
        snapshots: datapath.subscribe(),
        datapath,
        events,
        reaper,
        notes,
        live: plan.clone(),
        plan,
        reload_pending: false,
        destroy_after_apply: BTreeSet::new(),
        facts: BTreeMap::new(),
        aborted: BTreeMap::new(),
        aborted_tx,
        aborted_rx,
        metrics,
        health,
        metrics_addr: Some(metrics_addr),
        config_text,
        monitor,
        health_rx,
        transitions,
        discovered,
        backends,
        rebalance,
    };
    agent.metrics.set_mode(kind.name());
    let result = agent.serve().await;
    // Envoy is the agent's child: it always goes with the agent (and aside,
    // nothing stays).
    let detach = agent.opts.detach_on_exit || agent.config.detach_on_exit || kind != DatapathKind::Ebpf;
    let run_dir = agent.opts.run_dir.clone();
    let pin_path = agent.opts.pin_path.clone();
    let stopped = agent.datapath.stop(detach).await;
    if detach {
        let _ = std::fs::remove_file(run_dir.join(crate::status::STATUS_FILE));
    } else {
        // Worker components keep reaching the control plane while the agent
        // restarts or upgrades: the pinned links keep the programs attached.
        tracing::info!(
            pin_path = %pin_path.display(),
            "datapath stays attached with the last published backends; `nllb uninstall` removes it"
        );
    }
    result?;
    stopped?;
    Ok(())
}

impl Agent {
    async fn serve(&mut self) -> Result<(), AgentError> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        self.write_status();
        tracing::info!(services = self.plan.services.len(), "nllb agent ready");
        let mut systemd = crate::systemd::Notifier::from_env();
        systemd.ready();
        loop {
            let rebalance_due = self.rebalance.next_due();
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
                events = next_events(&mut self.events) => self.on_kernel_events(events),
                Some(applied) = self.datapath.next_applied() => self.on_applied(applied),
                Ok(()) = self.snapshots.changed() => {
                    self.metrics.sync_datapath(&self.snapshots.borrow_and_update());
                }
                Some(aborted) = self.aborted_rx.recv() => self.on_aborted(aborted),
                Some(report) = self.rebalance.next_report() => self.on_rebalance(report),
                _ = sleep_until(rebalance_due) => self.rebalance.tick(),
                _ = tick.tick() => {
                    systemd.tick();
                    self.health.beat();
                    self.datapath.refresh();
                    // A ConfigMap update or an edit applies itself: no restart,
                    // no SIGHUP needed (k0s needs a worker restart, #8212).
                    self.reload_if_changed();
                    // Handshake times move without verdicts changing.
                    self.apply_health();
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
        if config.host_network_only != self.config.host_network_only
            || config.passive.enabled != self.config.passive.enabled
            || config.passive.syn_retries != self.config.passive.syn_retries
            || config.passive.eject_hold != self.config.passive.eject_hold
        {
            tracing::warn!(
                "hostNetworkOnly, passive.enabled, passive.ejectHold and passive.synRetries take effect after a restart"
            );
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
        self.rebalance.set_settings(config.rebalance.clone());
        self.config = config;
        self.metrics.reloads.get_or_create(&metrics::ModeLabels { mode: "applied".into() }).inc();
        tracing::info!("reloaded {}", self.opts.config_path.display());
        self.apply_health();
    }

    /// Health or the backend set changed: publish the healthy backends (or
    /// all of them in panic mode) with what is known of each, and close
    /// nllb's connections to backends that left once that is live.
    fn apply_health(&mut self) {
        let snapshot = self.health_rx.borrow_and_update().clone();
        let reaction = self.transitions.react(&self.config.services, &self.backends, &snapshot);
        reaction.log();
        let now = sys::monotonic_ns();
        for backend in &reaction.recovered {
            // Marks the kernel set before now no longer count.
            self.facts.entry(*backend).or_default().recovered_at_ns = now;
        }
        let mut plan = reaction.plan.clone();
        let published: BTreeSet<SocketAddr> = plan.services.iter().flat_map(|s| s.backends.iter().copied()).collect();
        self.facts.retain(|b, _| published.contains(b));
        for backend in &published {
            let worst = snapshot.get(backend).and_then(|h| h.handshake_worst);
            let facts = self.facts.entry(*backend).or_default();
            facts.syn_timeout = passive::settle(facts.syn_timeout, self.config.passive.syn_timeout_for(worst));
            self.metrics.set_syn_timing(*backend, facts.syn_timeout, worst);
        }
        plan.backends = self.facts.clone();
        self.rebalance.observe(&plan, &reaction.recovered);
        self.rebalance.weigh(&mut plan);
        self.destroy_after_apply.extend(reaction.to_destroy(&self.config.health));
        if plan != self.plan {
            self.datapath.apply(plan.clone());
            self.plan = plan;
        } else {
            self.plan_live();
        }
        self.write_status();
    }

    fn on_applied(&mut self, applied: Applied) {
        if applied.result.is_ok() {
            // Exactly the weights the kernel now serves (rebalancing ends
            // connections only once they are live).
            self.rebalance.plan_live(&applied.plan);
            self.live = applied.plan.clone();
        }
        match &applied.result {
            Ok(()) if applied.plan == self.plan => self.plan_live(),
            Ok(()) => {}
            Err(e) => tracing::error!(error = %e, "publishing the backend set failed"),
        }
        self.write_status();
    }

    /// The datapath serves the current plan.
    fn plan_live(&mut self) {
        if std::mem::take(&mut self.reload_pending) {
            tracing::info!("reloaded {}: the new config is live", self.opts.config_path.display());
        }
        self.destroy_now();
    }

    /// A rebalancing count or move finished (`crate::rebalance`); new
    /// weights are published with the plan.
    fn on_rebalance(&mut self, report: crate::rebalance::Report) {
        if self.rebalance.on_report(report, &self.datapath.snapshot(), &self.metrics) {
            self.apply_health();
        } else {
            self.write_status();
        }
    }

    /// Closes nllb's connections to the backends waiting for it, on a
    /// blocking task; the outcome comes back through `aborted_rx`.
    fn destroy_now(&mut self) {
        for backend in std::mem::take(&mut self.destroy_after_apply) {
            self.abort(backend, States::ESTABLISHED.union(States::SYN_SENT), "left the published set");
        }
    }

    fn abort(&self, backend: SocketAddr, states: States, why: &'static str) {
        let Some(reaper) = self.reaper.clone() else {
            return;
        };
        let tx = self.aborted_tx.clone();
        let notes = self.notes.clone();
        tokio::task::spawn_blocking(move || {
            let result = match reaper.abort(backend, states) {
                Ok(destroyed) => {
                    let cause = if why == WHY_MARKED { AbortCause::BackendMarked } else { AbortCause::BackendRemoved };
                    notes.aborted(cause, &destroyed);
                    Ok(destroyed.len())
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(Aborted { backend, why, result });
        });
    }

    fn on_aborted(&mut self, a: Aborted) {
        match a.result {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(backend = %a.backend, sockets = n, reason = a.why, "closed connections through nllb");
                if a.why == WHY_MARKED {
                    *self.aborted.entry(a.backend).or_default() += n as u64;
                    let labels = metrics::AddrLabels { backend: a.backend.to_string() };
                    self.metrics.syn_sent_aborted.get_or_create(&labels).inc_by(n as u64);
                }
            }
            Err(e) => {
                tracing::warn!(backend = %a.backend, error = %e, "cannot destroy sockets (SOCK_DESTROY)")
            }
        }
    }

    fn on_kernel_events(&mut self, events: Vec<KernelEvent>) {
        for e in events {
            match e {
                KernelEvent::Marked { backend, cause, .. } => {
                    tracing::warn!(backend = %backend, cause = ?cause, "kernel saw a steered connect fail: backend passively ejected");
                    // Connects still waiting on it would wait out their SYN
                    // retries: end them now, their retry goes elsewhere. A
                    // socket that never connected has no stream to lose.
                    self.abort(backend, States::SYN_SENT, WHY_MARKED);
                    self.metrics.passive_ejection(backend);
                    self.monitor.report_passive_failure(backend);
                }
                KernelEvent::Recovered { backend, .. } => {
                    tracing::info!(backend = %backend, "a steered connect to a marked backend was established: the kernel uses it again");
                }
            }
        }
    }

    fn status_extra(&self) -> BTreeMap<String, serde_json::Value> {
        let mut extra = BTreeMap::new();
        extra.insert("metrics_addr".into(), serde_json::json!(self.metrics_addr.map(|a| a.to_string())));
        let snapshot = self.datapath.snapshot();
        if let Some(envoy) = snapshot.envoy {
            if let Some(restarts) = envoy.get("restarts").and_then(|r| r.as_u64()) {
                self.metrics.sync_envoy_restarts(restarts);
            }
            extra.insert("envoy".into(), envoy);
        }
        if let Some(aside) = snapshot.aside {
            extra.insert(crate::stand_aside::STATUS_KEY.into(), aside);
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
        let health = self.monitor.snapshot();
        for (addr, h) in &health.backends {
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
        let snapshot = self.datapath.snapshot();
        let services = self
            .live
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                id: snapshot.services.iter().find(|k| k.name == s.name).and_then(|k| k.id),
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
        let passive = self
            .plan
            .services
            .iter()
            .flat_map(|s| s.backends.iter())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|b| PassiveStatus {
                backend: *b,
                syn_timeout_ms: self.facts.get(b).and_then(|f| f.syn_timeout).map(|d| d.as_millis() as u64),
                handshake_worst_ms: health.get(b).and_then(|h| h.handshake_worst).map(|d| d.as_secs_f64() * 1000.0),
                syn_sent_aborted: self.aborted.get(b).copied().unwrap_or(0),
            })
            .collect();
        let status = AgentStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            mode: self.datapath.kind().name().into(),
            pin_path: self.opts.pin_path.clone(),
            cgroup: Some(self.cgroup.clone()),
            services,
            passive,
            rebalance: self.rebalance.status(),
            health: serde_json::to_value(&health).unwrap_or_default(),
            extra: self.status_extra(),
            updated_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        };
        if let Err(e) = status.write(&self.opts.run_dir) {
            tracing::warn!(error = %e, dir = %self.opts.run_dir.display(), "cannot write the status file");
        }
    }
}

/// How often the loop does what nothing signals: the systemd watchdog, the
/// liveness beat, reading the kernel counters (the metrics take them when the
/// read arrives), the config file check and SYN timeouts that follow
/// handshake times. Every wakeup of an idle agent costs CPU (on a 2-core VM
/// each also woke the datapath thread): a 250 ms tick made an idle agent ~20%
/// dearer than this one, and nothing here needs more than a second; the
/// rebalancer has a deadline of its own.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Sleeps until `deadline`; without one, never wakes.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

const WHY_MARKED: &str = "passively marked: aborting connects still waiting for it";

/// The backends the health checks reject, kept current by a task that ends
/// with the monitor.
fn rejected_backends(mut health: watch::Receiver<HealthSnapshot>) -> crate::discovery::Rejected {
    let rejected = |h: &HealthSnapshot| -> BTreeSet<SocketAddr> {
        h.backends.iter().filter(|(_, b)| !b.healthy).map(|(a, _)| *a).collect()
    };
    let (tx, rx) = watch::channel(rejected(&health.borrow_and_update()));
    tokio::spawn(async move {
        while health.changed().await.is_ok() {
            let now = rejected(&health.borrow_and_update());
            tx.send_if_modified(|r| {
                let changed = *r != now;
                *r = now;
                changed
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}
