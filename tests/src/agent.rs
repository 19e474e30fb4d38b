//! The real `nllb` binary as a child process with its own pin path, run
//! directory and state directory.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::Duration,
};

use crate::{unique_name, wait_for};

/// The nllb binary: `NLLB_BIN`, else `<target>/debug/nllb` next to the tests.
pub fn nllb_bin() -> PathBuf {
    let bin = crate::built_binary("NLLB_BIN", "nllb");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p nllb-userspace`) or set NLLB_BIN",
        bin.display()
    );
    bin
}

/// The capabilities the agent is documented to need (deploy/daemonset.yaml,
/// deploy/nllb.service, docs/deploy.md), as Kubernetes spells them
/// (systemd adds `CAP_`, setpriv wants lower case).
pub const AGENT_CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];

#[derive(Clone, Debug, Default)]
pub struct AgentOpts {
    pub config_yaml: String,
    pub cgroup: PathBuf,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A command prefix the agent runs under (e.g. `setpriv --bounding-set=...`);
    /// it must exec the binary it is given so the pid stays the agent's.
    pub wrapper: Vec<String>,
}

#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    pub pin_path: PathBuf,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub cgroup: PathBuf,
    work: PathBuf,
    opts: AgentOpts,
}

impl Agent {
    /// Start the agent and wait until it has published its first plan.
    pub fn start(opts: &AgentOpts) -> Agent {
        let mut agent = Self::spawn(opts);
        let mut exited = None;
        let ready = wait_for(Duration::from_secs(20), || {
            if agent.run_dir.join("status.json").exists() {
                return Some(true);
            }
            exited = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            exited.is_some().then_some(false)
        });
        if ready != Some(true) {
            panic!("nllb agent did not become ready (exit: {exited:?}); log:\n{}", agent.log());
        }
        agent
    }

    /// Start the agent without waiting for it.
    pub fn spawn(opts: &AgentOpts) -> Agent {
        let name = unique_name("nllb-test-");
        let work = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&work).unwrap();
        let config_path = work.join("nllb.yaml");
        std::fs::write(&config_path, &opts.config_yaml).unwrap();
        let mut agent = Agent {
            child: None,
            pin_path: PathBuf::from("/sys/fs/bpf").join(&name),
            run_dir: work.join("run"),
            state_dir: work.join("state"),
            config_path,
            log_path: work.join("agent.log"),
            cgroup: opts.cgroup.clone(),
            work,
            opts: opts.clone(),
        };
        agent.launch(&[]);
        agent
    }

    /// Start a new agent process on the same pins, run dir and config (after
    /// the previous one exited or was killed) and wait until it published.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.launch(env);
        let pid = self.pid().unwrap();
        let ready = wait_for(Duration::from_secs(20), || {
            let text = std::fs::read_to_string(self.run_dir.join("status.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            (v["pid"].as_u64() == Some(u64::from(pid))).then_some(())
        });
        assert!(ready.is_some(), "restarted agent did not become ready; log:\n{}", self.log());
    }

    fn launch(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).unwrap();
        let mut cmd = match self.opts.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(nllb_bin());
                c
            }
            None => Command::new(nllb_bin()),
        };
        cmd.arg("agent")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--cgroup")
            .arg(&self.opts.cgroup)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            // Tests run agents side by side: each gets its own metrics port.
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(&self.opts.extra_args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn nllb agent"));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Run another `nllb` subcommand against this agent's pins and run dir.
    pub fn nllb(&self, args: &[&str]) -> Output {
        Command::new(nllb_bin())
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .output()
            .expect("run nllb")
    }

    /// Where the agent's metrics and health endpoints listen.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.run_dir.join("status.json")).unwrap()).unwrap();
        v["extra"]["metrics_addr"].as_str().expect("metrics_addr in status.json").parse().unwrap()
    }

    /// GET a path on the metrics listener: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&self.metrics_addr(), Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: nllb\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }

    /// Replace the config file (the agent notices within about a second).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, &self.config_path).unwrap();
    }

    /// `nllb status --json` parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.nllb(&["status", "--json"]);
        assert!(out.status.success(), "nllb status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// `bpftool -j map dump pinned <pin path>/<map>`: the map as bpftool
    /// prints it (BTF field names under `formatted`).
    pub fn dump_pinned_map(&self, map: &str) -> serde_json::Value {
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(self.pin_path.join(map))
            .output()
            .expect("run bpftool (cargo xtask setup installs it)");
        assert!(out.status.success(), "bpftool map dump {map}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("bpftool JSON")
    }

    /// `nllb status --json` for polling: Null while it cannot answer (the
    /// agent still starting), where [`Agent::status`] would fail the test.
    fn kernel_status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.nllb(&["status", "--json"]).stdout).unwrap_or_default()
    }

    /// Connects the kernel datapath has steered, per backend address, from
    /// the pinned maps (readable while the agent is down too).
    pub fn connects_by_backend(&self) -> std::collections::BTreeMap<String, u64> {
        let mut by = std::collections::BTreeMap::new();
        for s in self.kernel_status()["services"].as_array().into_iter().flatten() {
            for b in s["backends"].as_array().into_iter().flatten() {
                if let (Some(addr), Some(n)) = (b["addr"].as_str(), b["connects"].as_u64()) {
                    *by.entry(addr.to_string()).or_default() += n;
                }
            }
        }
        by
    }

    /// The backends the kernel serves for `service` right now (the pinned
    /// table, via `nllb status`): the agent's status file shows the set it
    /// wants as soon as it decides, before its datapath worker has
    /// published it.
    pub fn kernel_backends(&self, service: &str) -> std::collections::BTreeSet<String> {
        self.kernel_status()["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"].as_str() == Some(service))
            .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["addr"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits until the kernel serves exactly `want` for `service`.
    pub fn wait_kernel_backends(&self, service: &str, want: &std::collections::BTreeSet<String>, timeout: Duration) {
        let got = crate::wait_for(timeout, || (self.kernel_backends(service) == *want).then_some(()));
        assert!(
            got.is_some(),
            "the kernel never served {want:?} for {service} (serves {:?}); log:\n{}",
            self.kernel_backends(service),
            self.log()
        );
    }

    /// Connects the kernel datapath has steered in total.
    pub fn connects(&self) -> u64 {
        self.connects_by_backend().values().sum()
    }

    /// Waits until the datapath has steered `more` connects beyond now (a
    /// client that keeps connecting has made progress). Each look runs
    /// `nllb status`, so it looks every 100 ms, not in a tight loop that
    /// would starve the client on a one-CPU guest.
    pub fn wait_connects(&self, more: u64, timeout: Duration) {
        let base = self.connects();
        let deadline = std::time::Instant::now() + crate::scaled(timeout);
        while self.connects() < base + more {
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than {more} connects after {timeout:?} (from {base}); log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGTERM and wait for the exit (SIGKILL after `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.signal_pid(child.id(), nix::sys::signal::Signal::SIGTERM);
        let status = wait_for(timeout, || child.try_wait().ok().flatten());
        match status {
            Some(s) => Some(s),
            None => {
                let _ = child.kill();
                child.wait().ok()
            }
        }
    }

    /// Wait for the agent to exit by itself (e.g. after a bad config).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let s = wait_for(timeout, || child.try_wait().ok().flatten());
        if s.is_some() {
            self.child = None;
        }
        s
    }

    fn signal_pid(&self, pid: u32, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }

    pub fn work_dir(&self) -> &Path {
        &self.work
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!("--- nllb agent log ({}) ---\n{}", self.log_path.display(), self.log());
        }
        // Whatever the agent left behind (a crash, a failed test) goes too.
        let _ = Command::new(nllb_bin()).arg("uninstall").arg("--pin-path").arg(&self.pin_path).output();
        let _ = std::fs::remove_dir_all(&self.pin_path);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}
