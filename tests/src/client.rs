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
    pub elapsed_us: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientReport {
    pub results: Vec<ConnectResult>,
}

impl ClientReport {
    pub fn ok_count(&self) -> usize {
        self.results.iter().filter(|r| r.ok).count()
    }

    pub fn failed(&self) -> Vec<&ConnectResult> {
        self.results.iter().filter(|r| !r.ok).collect()
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
