//! [`Datapath`] backed by a supervised Envoy: for nodes whose kernel or
//! privileges cannot run the eBPF programs.
//!
//! There is no kernel hook here, so nothing sees individual connects; the
//! agent stays the single source of truth for health and membership and
//! pushes each plan to Envoy through the files described in [`render`].
//! This file is process control: write the files, run Envoy under the
//! [`supervisor`](super::supervisor), wait for listener changes
//! ([`listeners`](super::listeners)); counters come from the
//! [`admin`](super::admin) poller.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    EnvoyConfig,
    admin::AdminPoller,
    listeners::{ListenerWait, expected_listeners, listening_sockets},
    render::{self, Layout, RenderOptions},
    status::EnvoyStatus,
    supervisor::{Launch, Supervisor, SupervisorHandle},
};
use crate::{
    datapath::{Datapath, DatapathError, DatapathKind, DatapathSnapshot},
    model::Plan,
    passive::PassiveConfig,
};

/// How long `start` waits for Envoy to listen on every virtual address.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `apply` waits for a listener change to show up in the kernel.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connections accepted by a removed listener (a service that lost
/// its last backend) may live on: Envoy's `--drain-time-s`.
pub const DRAIN_TIME_S: u32 = 600;

/// Everything Envoy mode is built from (the counterpart of eBPF's
/// `EbpfOptions`).
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    pub binary: PathBuf,
    /// Holds the generated config, Envoy's log and base id; e.g.
    /// `<run-dir>/envoy`. Created when missing.
    pub work_dir: PathBuf,
    pub render: RenderOptions,
    /// Envoy worker threads.
    pub concurrency: u32,
    pub log_level: String,
}

impl EnvoyOptions {
    /// From the `envoy:` and `passive:` config sections.
    pub fn new(envoy: &EnvoyConfig, passive: &PassiveConfig, binary: PathBuf, work_dir: PathBuf) -> EnvoyOptions {
        EnvoyOptions {
            binary,
            work_dir,
            render: super::render_options(envoy, passive),
            concurrency: envoy.concurrency(),
            log_level: envoy.log_level(),
        }
    }
}

pub struct EnvoyDatapath {
    layout: Layout,
    opts: EnvoyOptions,
    supervisor: Option<Supervisor>,
    /// Reads `/clusters` in the background when `envoy.adminPort` is set.
    admin: Option<AdminPoller>,
    plan: Plan,
    /// Contents last written per file, so unchanged files are not touched
    /// (every rename makes Envoy re-read its watched directory).
    written: BTreeMap<PathBuf, String>,
}

impl EnvoyDatapath {
    /// Write the config for `plan`, start Envoy and wait until it listens
    /// on every virtual address of every service that has backends.
    pub fn start(opts: EnvoyOptions, plan: &Plan) -> Result<EnvoyDatapath, DatapathError> {
        let layout = Layout::new(&opts.work_dir);
        for d in [layout.dir.clone(), layout.cds_dir(), layout.lds_dir(), layout.eds_dir()] {
            fs::create_dir_all(&d).map_err(|e| io_err(&d, e))?;
        }
        let mut dp = EnvoyDatapath {
            layout: layout.clone(),
            opts: opts.clone(),
            supervisor: None,
            admin: None,
            plan: Plan::default(),
            written: BTreeMap::new(),
        };
        // Stale files of an earlier run would be loaded first otherwise.
        for stale in fs::read_dir(layout.eds_dir()).map_err(|e| io_err(&layout.eds_dir(), e))?.flatten() {
            let _ = fs::remove_file(stale.path());
        }
        dp.write(&layout.bootstrap(), &render::to_yaml(&render::bootstrap(&layout, &opts.render)))?;
        dp.write_plan(plan)?;
        dp.plan = plan.clone();

        let supervisor = Supervisor::start(Launch {
            binary: opts.binary.clone(),
            args: envoy_args(&layout, &opts),
            log_file: layout.log_file(),
            config_dir: layout.dir.clone(),
        });
        let handle = supervisor.handle();
        dp.supervisor = Some(supervisor);
        let Some((generation, _)) = handle.wait_started(0, START_TIMEOUT) else {
            let why = handle.status().last_exit.unwrap_or_else(|| "it did not start".into());
            dp.stop();
            return Err(DatapathError::Other(format!(
                "envoy {}: {why}; check envoy.binary / --envoy-binary (`cargo xtask setup` installs Envoy)",
                opts.binary.display()
            )));
        };
        if let Err(why) = dp.listener_wait(plan, START_TIMEOUT, Some(generation)).block() {
            let log = dp.layout.log_file();
            dp.stop();
            return Err(DatapathError::Other(format!("envoy did not come up: {why} (log: {})", log.display())));
        }
        if let Some(port) = opts.render.admin_port {
            dp.admin = Some(AdminPoller::spawn(port).map_err(|e| io_err(Path::new("envoy-admin poller"), e))?);
        }
        tracing::info!(dir = %layout.dir.display(), "envoy datapath ready");
        Ok(dp)
    }

    /// A handle that reports Envoy's state; keep it beside the boxed
    /// datapath to show it in `nllb status`.
    pub fn handle(&self) -> SupervisorHandle {
        self.supervisor.as_ref().expect("supervisor runs until shutdown").handle()
    }

    /// Envoy's process state (pid, restarts, last exit).
    pub fn status(&self) -> EnvoyStatus {
        self.supervisor.as_ref().map(|s| s.handle().status()).unwrap_or_default()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The virtual addresses Envoy serves now: bound, listening sockets of
    /// the running Envoy process.
    pub fn listening(&self) -> HashSet<SocketAddr> {
        self.status().pid.and_then(|pid| listening_sockets(pid).ok()).unwrap_or_default()
    }

    /// Writes the files for `plan` and returns at once. When the change
    /// adds or removes listeners (visible in the kernel: connects refused
    /// or accepted), also returns the wait for Envoy to apply it, for the
    /// caller to run where blocking is fine. [`Datapath::apply`] is this
    /// plus that wait.
    pub fn stage(&mut self, plan: &Plan) -> Result<Option<ListenerWait>, DatapathError> {
        if *plan == self.plan {
            return Ok(None);
        }
        self.write_plan(plan)?;
        let listeners_changed = expected_listeners(plan) != expected_listeners(&self.plan);
        self.plan = plan.clone();
        // An Envoy that is down picks the files up when it comes back.
        Ok((listeners_changed && self.status().running).then(|| self.listener_wait(plan, APPLY_TIMEOUT, None)))
    }

    fn listener_wait(&self, plan: &Plan, timeout: Duration, generation: Option<u64>) -> ListenerWait {
        ListenerWait::new(
            plan,
            self.handle(),
            generation,
            self.opts.render.admin_port,
            &self.layout.log_file(),
            timeout,
        )
    }

    fn stop(&mut self) {
        self.admin = None;
        if let Some(mut s) = self.supervisor.take() {
            s.stop();
        }
    }

    /// Write every file `plan` needs, in an order that never leaves a
    /// listener pointing at a missing cluster; a service losing its last
    /// backend loses its listener before its endpoints.
    fn write_plan(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        let files = render::dynamic_files(&self.layout, plan, &self.opts.render);
        let empty: BTreeSet<PathBuf> =
            plan.services.iter().filter(|s| s.backends.is_empty()).map(|s| self.layout.eds_file(&s.name)).collect();
        let (later, now): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| empty.contains(&f.path));
        for f in now.iter().chain(later.iter()) {
            self.write(&f.path, &f.contents)?;
        }
        // Endpoint files of services that left the plan.
        let keep: BTreeSet<PathBuf> = plan.services.iter().map(|s| self.layout.eds_file(&s.name)).collect();
        let gone: Vec<PathBuf> = self
            .written
            .keys()
            .filter(|p| p.starts_with(self.layout.eds_dir()) && !keep.contains(*p))
            .cloned()
            .collect();
        for p in gone {
            let _ = fs::remove_file(&p);
            self.written.remove(&p);
        }
        Ok(())
    }

    /// Atomic replace: a temp file in the same (watched) directory, then
    /// rename, so Envoy never reads a half-written file.
    fn write(&mut self, path: &Path, contents: &str) -> Result<(), DatapathError> {
        if self.written.get(path).is_some_and(|c| c == contents) {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, contents).map_err(|e| io_err(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
        self.written.insert(path.to_path_buf(), contents.to_string());
        Ok(())
    }
}

impl Datapath for EnvoyDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Envoy
    }

    /// Once this returns, listener changes are live: a service that lost
    /// its last backend refuses connects. The wait (up to
    /// [`APPLY_TIMEOUT`]) blocks the calling thread; see [`Self::stage`]
    /// for running it elsewhere.
    fn apply(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        if let Some(wait) = self.stage(plan)?
            && let Err(why) = wait.block()
        {
            tracing::warn!(%why, "envoy has not applied the new listeners yet");
        }
        Ok(())
    }

    /// Upstream connections per controller, as the admin poller last read
    /// them (`/clusters`; none when `envoy.adminPort` is unset or Envoy's
    /// admin does not answer), and the supervisor's view of the process.
    /// Never waits for Envoy.
    fn snapshot(&self) -> DatapathSnapshot {
        DatapathSnapshot {
            services: self.admin.as_ref().map(AdminPoller::latest).unwrap_or_default(),
            envoy: serde_json::to_value(self.status()).ok(),
            ..Default::default()
        }
    }

    fn shutdown(&mut self) -> Result<(), DatapathError> {
        self.stop();
        // Remove the generated config; the log stays for post-mortems.
        let l = &self.layout;
        for d in [l.cds_dir(), l.lds_dir(), l.eds_dir()] {
            let _ = fs::remove_dir_all(d);
        }
        for f in [l.bootstrap(), l.base_id_file()] {
            let _ = fs::remove_file(f);
        }
        self.written.clear();
        Ok(())
    }
}

impl Drop for EnvoyDatapath {
    fn drop(&mut self) {
        self.stop();
    }
}

fn envoy_args(layout: &Layout, opts: &EnvoyOptions) -> Vec<String> {
    vec![
        "-c".into(),
        layout.bootstrap().display().to_string(),
        // nllb restarts Envoy rather than hot-restarting it, and with hot
        // restart on every Envoy start leaves a shared memory region in
        // /dev/shm that no exit removes, even a clean one (a leak per
        // restart on a node). Without it there is nothing to share, so
        // other Envoys on the node cannot collide with this one either.
        "--disable-hot-restart".into(),
        // Coexist with other Envoys on the node (their shared memory and
        // hot-restart sockets are keyed by base id).
        "--use-dynamic-base-id".into(),
        "--base-id-path".into(),
        layout.base_id_file().display().to_string(),
        "--concurrency".into(),
        opts.concurrency.to_string(),
        "--log-level".into(),
        opts.log_level.clone(),
        "--drain-time-s".into(),
        DRAIN_TIME_S.to_string(),
    ]
}

fn io_err(path: &Path, e: std::io::Error) -> DatapathError {
    DatapathError::Other(format!("{}: {e}", path.display()))
}
