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
    if let Some(p) = std::env::var_os("NLLB_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("nllb");
    assert!(bin.exists(), "{} not found: build it first (`cargo build -p nllb-userspace`) or set NLLB_BIN", bin.display());
    bin
}

#[derive(Clone, Debug, Default)]
pub struct AgentOpts {
    pub config_yaml: String,
    pub cgroup: PathBuf,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
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
}

impl Agent {
    /// Start the agent and wait until it has published its first plan.
    pub fn start(opts: &AgentOpts) -> Agent {
        let agent = Self::spawn(opts);
        let ready = wait_for(Duration::from_secs(20), || agent.run_dir.join("status.json").exists().then_some(()));
        if ready.is_none() {
            let mut agent = agent;
            let status = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!("nllb agent did not become ready (exit: {status:?}); log:\n{}", agent.log());
        }
        agent
    }

    /// Start the agent without waiting for it.
    pub fn spawn(opts: &AgentOpts) -> Agent {
        let name = unique_name("nllb-test-");
        let work = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&work).unwrap();
        let pin_path = PathBuf::from("/sys/fs/bpf").join(&name);
        let run_dir = work.join("run");
        let state_dir = work.join("state");
        let config_path = work.join("nllb.yaml");
        let log_path = work.join("agent.log");
        std::fs::write(&config_path, &opts.config_yaml).unwrap();
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(nllb_bin());
        cmd.arg("agent")
            .arg("--config")
            .arg(&config_path)
            .arg("--cgroup")
            .arg(&opts.cgroup)
            .arg("--pin-path")
            .arg(&pin_path)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(&opts.extra_args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn nllb agent");
        Agent { child: Some(child), pin_path, run_dir, state_dir, config_path, log_path, cgroup: opts.cgroup.clone(), work }
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

    /// `nllb status --json` parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.nllb(&["status", "--json"]);
        assert!(out.status.success(), "nllb status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
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
