//! What the agent and `nllb status` know about the supervised Envoy.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Envoy's process state, kept by the supervisor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvoyStatus {
    pub binary: PathBuf,
    pub config_dir: PathBuf,
    pub running: bool,
    pub pid: Option<u32>,
    /// Times Envoy was started again after it died.
    pub restarts: u32,
    /// How the last run ended, e.g. "killed by signal 9" or "exit status 1:
    /// <last log line>".
    pub last_exit: Option<String>,
    pub last_exit_unix_ms: Option<u64>,
    pub started_unix_ms: Option<u64>,
    /// Delay before the next start when Envoy is down.
    pub next_restart_ms: Option<u64>,
}

/// Where Envoy is in its life, derived from [`EnvoyStatus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnvoyState {
    /// Not started yet.
    Starting,
    Running,
    /// Died; the supervisor starts it again after `next_restart_ms`.
    BackingOff,
    /// Stopped for good (the agent is shutting down), or it never started.
    Stopped,
}

impl EnvoyStatus {
    pub fn state(&self) -> EnvoyState {
        match (self.running, self.next_restart_ms, &self.last_exit) {
            (true, _, _) => EnvoyState::Running,
            (false, Some(_), _) => EnvoyState::BackingOff,
            (false, None, None) => EnvoyState::Starting,
            (false, None, Some(_)) => EnvoyState::Stopped,
        }
    }
}

/// Lines for `nllb status` in Envoy mode (the agent stores the status
/// under `extra["envoy"]` of its status file).
pub fn render_status(s: &EnvoyStatus) -> String {
    let mut out = match (s.running, s.pid) {
        (true, Some(pid)) => format!("envoy: running (pid {pid}, {} restarts)", s.restarts),
        _ => format!(
            "envoy: NOT running ({} restarts{})",
            s.restarts,
            s.next_restart_ms.map(|ms| format!(", next start in {ms} ms")).unwrap_or_default()
        ),
    };
    if let Some(e) = &s.last_exit {
        out.push_str(&format!("; last exit: {e}"));
    }
    out.push_str(&format!("\n  binary {}\n  config {}\n", s.binary.display(), s.config_dir.display()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_follows_the_supervisor() {
        let mut s = EnvoyStatus::default();
        assert_eq!(s.state(), EnvoyState::Starting);
        s.running = true;
        s.pid = Some(7);
        assert_eq!(s.state(), EnvoyState::Running);
        assert!(render_status(&s).contains("running (pid 7, 0 restarts)"));
        s.running = false;
        s.pid = None;
        s.last_exit = Some("killed by signal 9".into());
        s.next_restart_ms = Some(200);
        assert_eq!(s.state(), EnvoyState::BackingOff);
        let text = render_status(&s);
        assert!(
            text.contains("NOT running (0 restarts, next start in 200 ms); last exit: killed by signal 9"),
            "{text}"
        );
        s.next_restart_ms = None;
        assert_eq!(s.state(), EnvoyState::Stopped);
    }
}
