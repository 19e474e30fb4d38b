//! Runs Envoy as a child and keeps it running.
//!
//! One thread owns the child: it alone waits for it and signals it, so a
//! signal can never reach a recycled pid (the pid stays ours until this
//! thread reaps it). Envoy gets its own process group (a Ctrl-C on the
//! agent's terminal must not kill it behind the agent's back) and
//! PR_SET_PDEATHSIG, so it dies with the supervising thread if the agent is
//! killed outright.

use std::{
    fs::OpenOptions,
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use backon::{BackoffBuilder as _, ExponentialBuilder};

use super::status::EnvoyStatus;

/// First restart delay; doubled after every crash up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run this long counts as healthy and resets the backoff.
const STABLE_RUN: Duration = Duration::from_secs(30);
/// How long Envoy gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct State {
    stop: bool,
    status: EnvoyStatus,
    /// Increments on every start, so waiters can tell runs apart.
    generation: u64,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A cheap, cloneable view of the supervisor for status reporting.
#[derive(Clone, Debug)]
pub struct SupervisorHandle {
    shared: Arc<Shared>,
}

impl SupervisorHandle {
    pub fn status(&self) -> EnvoyStatus {
        self.shared.lock().status.clone()
    }

    /// Wait until a run newer than `after` has a pid (or until timeout).
    pub fn wait_started(&self, after: u64, timeout: Duration) -> Option<(u64, u32)> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.generation > after
                && let Some(pid) = st.status.pid
            {
                return Some((st.generation, pid));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            st = self.shared.changed.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    pub fn generation(&self) -> u64 {
        self.shared.lock().generation
    }
}

/// Owns the supervising thread; dropping it stops Envoy.
#[derive(Debug)]
pub struct Supervisor {
    handle: SupervisorHandle,
    thread: Option<JoinHandle<()>>,
}

/// How to run Envoy.
#[derive(Clone, Debug)]
pub struct Launch {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub log_file: PathBuf,
    pub config_dir: PathBuf,
}

impl Supervisor {
    pub fn start(launch: Launch) -> Supervisor {
        let shared = Arc::new(Shared::default());
        {
            let mut st = shared.lock();
            st.status.binary = launch.binary.clone();
            st.status.config_dir = launch.config_dir.clone();
        }
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("envoy-supervisor".into())
            .spawn(move || supervise(&s, &launch))
            .expect("spawn the Envoy supervisor thread");
        Supervisor { handle: SupervisorHandle { shared }, thread: Some(thread) }
    }

    pub fn handle(&self) -> SupervisorHandle {
        self.handle.clone()
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns once Envoy is
    /// reaped and will not be restarted.
    pub fn stop(&mut self) {
        {
            let mut st = self.handle.shared.lock();
            st.stop = true;
        }
        self.handle.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The restart delays (backon's exponential policy, no jitter: there is one
/// Envoy per node). The supervisor sleeps on its own condition variable,
/// not through backon's `retry`, so that `stop` cuts a pending delay short.
fn restart_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

fn supervise(shared: &Shared, launch: &Launch) {
    let mut delays = restart_delays();
    let mut first = true;
    loop {
        if shared.lock().stop {
            return;
        }
        let started = Instant::now();
        match spawn(launch) {
            Ok(mut child) => {
                {
                    let mut st = shared.lock();
                    if !first {
                        st.status.restarts += 1;
                    }
                    st.generation += 1;
                    st.status.pid = Some(child.id());
                    st.status.running = true;
                    st.status.started_unix_ms = Some(now_ms());
                    st.status.next_restart_ms = None;
                }
                shared.changed.notify_all();
                tracing::info!(pid = child.id(), binary = %launch.binary.display(), "envoy started");
                let (status, stopping) = watch(shared, &mut child);
                let reason = describe_exit(status, &launch.log_file);
                {
                    let mut st = shared.lock();
                    st.status.pid = None;
                    st.status.running = false;
                    st.status.last_exit = Some(reason.clone());
                    st.status.last_exit_unix_ms = Some(now_ms());
                }
                shared.changed.notify_all();
                if stopping {
                    tracing::info!(%reason, "envoy stopped");
                    return;
                }
                tracing::warn!(%reason, "envoy died");
            }
            Err(e) => {
                let reason = format!("cannot start {}: {e}", launch.binary.display());
                tracing::error!("{reason}");
                let mut st = shared.lock();
                st.status.last_exit = Some(reason);
                st.status.last_exit_unix_ms = Some(now_ms());
            }
        }
        first = false;
        if started.elapsed() >= STABLE_RUN {
            delays = restart_delays();
        }
        let delay = delays.next().unwrap_or(BACKOFF_MAX);
        tracing::info!(delay_ms = delay.as_millis() as u64, "restarting envoy after backoff");
        let mut st = shared.lock();
        st.status.next_restart_ms = Some(delay.as_millis() as u64);
        let deadline = Instant::now() + delay;
        while !st.stop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            st = shared.changed.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

fn spawn(launch: &Launch) -> std::io::Result<Child> {
    let log = OpenOptions::new().create(true).append(true).open(&launch.log_file)?;
    let mut cmd = Command::new(&launch.binary);
    cmd.args(&launch.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // systemd's notify socket and watchdog are the agent's, not Envoy's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Wait for the child to exit, or stop it when asked. Returns its exit
/// status and whether the exit was requested.
fn watch(shared: &Shared, child: &mut Child) -> (ExitStatus, bool) {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (status, false),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "waiting for envoy"),
        }
        let st = shared.lock();
        let st = if st.stop { st } else { shared.changed.wait_timeout(st, POLL).unwrap_or_else(|p| p.into_inner()).0 };
        if st.stop {
            drop(st);
            return (terminate(child), true);
        }
    }
}

/// SIGTERM by pid (still our unreaped child), SIGKILL after the grace time.
fn terminate(child: &mut Child) -> ExitStatus {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(pid = child.id(), "envoy ignored SIGTERM; sending SIGKILL");
    let _ = child.kill();
    child.wait().unwrap_or_else(|_| ExitStatus::from_raw(9))
}

fn describe_exit(status: ExitStatus, log: &Path) -> String {
    let what = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    };
    match last_error_line(log) {
        Some(line) if status.code().is_some_and(|c| c != 0) => format!("{what}: {line}"),
        _ => what,
    }
}

/// The last `critical`/`error` line of Envoy's log: usually why it quit
/// (a port in use, a bad config).
pub fn last_error_line(log: &Path) -> Option<String> {
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024))).ok()?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).ok()?;
    let tail = String::from_utf8_lossy(&bytes);
    tail.lines()
        .rev()
        .find(|l| l.contains("[critical]") || l.contains("[error]"))
        .map(|l| l.rsplit("] ").next().unwrap_or(l).trim().to_string())
}
