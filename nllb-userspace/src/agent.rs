//! `nllb agent`: installs the datapath, keeps it serving the current plan,
//! and tears it down on SIGINT/SIGTERM.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{Config, ConfigError},
    datapath::{
        Datapath, DatapathError,
        ebpf::{EbpfDatapath, EbpfOptions},
    },
    model::Plan,
    status::{AgentStatus, ServiceStatus},
    sys,
};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub config_path: PathBuf,
    pub cgroup: Option<PathBuf>,
    pub pin_path: PathBuf,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Datapath(#[from] DatapathError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// 2 for input the operator must fix, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Check everything the operator gave us before touching the machine.
pub fn validate(opts: &AgentOptions) -> Result<(Config, PathBuf), AgentError> {
    let config = Config::load(&opts.config_path)?;
    let cgroup = match &opts.cgroup {
        Some(c) => c.clone(),
        None => sys::cgroup2_mount().map_err(|e| ConfigError::new("--cgroup", format!("{e}; pass --cgroup DIR")))?,
    };
    if !sys::is_cgroup2_dir(&cgroup) {
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

struct Agent {
    config: Config,
    opts: AgentOptions,
    cgroup: PathBuf,
    datapath: Box<dyn Datapath>,
    service_ids: BTreeMap<String, u32>,
    plan: Plan,
    seen_passive: BTreeMap<SocketAddr, u32>,
}

pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let (config, cgroup) = validate(&opts)?;
    let plan = Plan::all_backends(&config.services, &config.backends);
    let ebpf = EbpfDatapath::install(
        EbpfOptions {
            cgroup: cgroup.clone(),
            pin_path: opts.pin_path.clone(),
            host_network_only: config.host_network_only,
            passive: config.passive.enabled,
            eject_hold: config.passive.eject_hold,
        },
        &plan,
    )?;
    let service_ids = ebpf.service_ids();
    let mut agent = Agent {
        config,
        opts,
        cgroup,
        datapath: Box::new(ebpf),
        service_ids,
        plan,
        seen_passive: BTreeMap::new(),
    };
    let result = agent.serve().await;
    let shutdown = agent.datapath.shutdown();
    let _ = std::fs::remove_file(agent.opts.run_dir.join(crate::status::STATUS_FILE));
    result?;
    shutdown?;
    Ok(())
}

impl Agent {
    async fn serve(&mut self) -> Result<(), AgentError> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        self.write_status();
        tracing::info!(services = self.plan.services.len(), "nllb agent ready");
        loop {
            tokio::select! {
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()) }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()) }
                _ = sighup.recv() => self.reload(),
                _ = tick.tick() => self.watch_passive(),
            }
        }
    }

    /// SIGHUP: apply a new config's services and backends; a bad config is
    /// logged and the running one stays.
    fn reload(&mut self) {
        let config = match Config::load(&self.opts.config_path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reload rejected: keeping the running config");
                return;
            }
        };
        if config.host_network_only != self.config.host_network_only || config.passive.enabled != self.config.passive.enabled {
            tracing::warn!("hostNetworkOnly and passive changes take effect after a restart");
        }
        let plan = Plan::all_backends(&config.services, &config.backends);
        match self.publish(plan) {
            Ok(()) => {
                tracing::info!("reloaded {}", self.opts.config_path.display());
                self.config = config;
            }
            Err(e) => tracing::error!(error = %e, "reload failed: keeping the running config"),
        }
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
            if prev != Some(f.failures) {
                tracing::warn!(backend = %f.backend, failures = f.failures, "kernel saw a failed connect: backend passively ejected");
            }
        }
    }

    fn write_status(&mut self) {
        let services = self
            .plan
            .services
            .iter()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                id: self.service_ids.get(&s.name).copied(),
                listen: s.listen.clone(),
                known_backends: s.backends.clone(),
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
            health: serde_json::Value::Null,
            extra: BTreeMap::new(),
            updated_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        };
        if let Err(e) = status.write(&self.opts.run_dir) {
            tracing::warn!(error = %e, dir = %self.opts.run_dir.display(), "cannot write the status file");
        }
    }
}
