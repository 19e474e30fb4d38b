//! Run `nllb-testclient` in a cgroup (and optionally a netns) and collect
//! what each connect saw.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectResult {
    /// Milliseconds since the client started.
    pub t_ms: u64,
    pub ok: bool,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// The body the server answered with (its name).
    pub body: Option<String>,
    /// What getpeername() returned for the connected socket.
    pub peer: Option<String>,
    /// What getsockname() returned: the client's own address and port.
    #[serde(default)]
    pub local: Option<String>,
    /// The client address the server saw (its `X-Peer` header): equal to
    /// `local` when the client reached the server directly, another
    /// address when a proxy connected on its behalf.
    #[serde(default)]
    pub server_saw: Option<String>,
    pub elapsed_us: u64,
    /// This attempt retried a failed one at once (`ClientOpts::retry`).
    #[serde(default)]
    pub retry: bool,
    /// getpeername() again after the connection was held (`--hold`).
    #[serde(default)]
    pub peer_after_hold: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientReport {
    pub results: Vec<ConnectResult>,
    /// Wall clock (ms since the epoch) at the client's t = 0, to place an
    /// event of the test on the client's `t_ms` scale.
    #[serde(default)]
    pub started_unix_ms: u64,
}

impl ClientReport {
    pub fn ok_count(&self) -> usize {
        self.results.iter().filter(|r| r.ok).count()
    }

    pub fn failed(&self) -> Vec<&ConnectResult> {
        self.results.iter().filter(|r| !r.ok).collect()
    }

    /// A wall-clock instant (ms since the epoch, e.g. from
    /// [`unix_ms`](crate::unix_ms)) on this client's `t_ms` scale, which
    /// starts when the client runs, not when it was spawned.
    pub fn t_ms_of(&self, unix_ms: u64) -> u64 {
        unix_ms.saturating_sub(self.started_unix_ms)
    }

    /// The longest any single connect attempt took.
    pub fn longest(&self) -> Duration {
        Duration::from_micros(self.results.iter().map(|r| r.elapsed_us).max().unwrap_or(0))
    }

    /// How many connects each server (by body) answered.
    pub fn by_body(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in &self.results {
            if let Some(b) = &r.body {
                *m.entry(b.clone()).or_default() += 1;
            }
        }
        m
    }
}

#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub addr: SocketAddr,
    pub count: u32,
    pub cgroup: Option<PathBuf>,
    pub netns: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// After a failed connect, try once more at once (what client-go and
    /// most clients do on a connection error).
    pub retry: bool,
    /// Stop after this long even if `count` connects were not made.
    pub deadline: Option<Duration>,
    /// Connect and close without a request (fastest churn).
    pub connect_only: bool,
}

impl ClientOpts {
    pub fn new(addr: SocketAddr, count: u32, cgroup: Option<&Path>) -> ClientOpts {
        ClientOpts {
            addr,
            count,
            cgroup: cgroup.map(Path::to_path_buf),
            netns: None,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(3),
            retry: false,
            deadline: None,
            connect_only: false,
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(testclient_bin());
        cmd.arg("--addr").arg(self.addr.to_string());
        cmd.arg("--count").arg(self.count.to_string());
        cmd.arg("--interval-ms").arg(self.interval.as_millis().to_string());
        cmd.arg("--timeout-ms").arg(self.timeout.as_millis().to_string());
        if let Some(c) = &self.cgroup {
            cmd.arg("--cgroup").arg(c);
        }
        if let Some(n) = &self.netns {
            cmd.arg("--netns").arg(n);
        }
        if self.retry {
            cmd.arg("--retry");
        }
        if self.connect_only {
            cmd.arg("--connect-only");
        }
        if let Some(d) = self.deadline {
            cmd.arg("--deadline-ms").arg(d.as_millis().to_string());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    pub fn spawn(&self) -> Child {
        self.command().spawn().expect("spawn nllb-testclient")
    }
}

pub fn wait_client(child: Child) -> ClientReport {
    let out = child.wait_with_output().expect("wait for nllb-testclient");
    assert!(out.status.success(), "nllb-testclient failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("nllb-testclient JSON")
}

/// Ends a client started with a large `count` (SIGTERM): it reports the
/// connects it made until then.
pub fn stop_client(child: Child) -> ClientReport {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    wait_client(child)
}

pub fn run_client(opts: &ClientOpts) -> ClientReport {
    wait_client(opts.spawn())
}

/// The client binary sits next to the test executables' `deps/` directory.
pub fn testclient_bin() -> PathBuf {
    crate::built_binary("NLLB_TESTCLIENT", "nllb-testclient")
}
