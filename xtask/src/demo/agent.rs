//! The `nllb agent` child process and what it leaves behind (pins, dirs).

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Agent {
    child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `nllb agent` with its output in `log`. Its own process group
    /// keeps a terminal Ctrl-C from reaching it before the demo's ordered
    /// shutdown (SIGTERM, then cleanup checks).
    pub fn start(nllb: &Path, args: &[&std::ffi::OsStr], log: PathBuf) -> Result<Self> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(nllb)
            .arg("agent")
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} agent", nllb.display()))?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the agent's log) when it has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the agent exited with {status}; its log:\n{}", self.log_tail());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, up to 10 s for a clean detach, then SIGKILL.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // Not reaped yet, so the pid is still ours.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: agent {} ignored SIGTERM for 10 s; killing it", self.child.id());
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The agent's bpffs pins. The datapath is built to outlive its agent, so
/// on drop `nllb uninstall` removes whatever an agent that died without
/// `--detach-on-exit` left, then the directory goes.
pub struct Pins {
    pub path: PathBuf,
    pub nllb: PathBuf,
    pub run_dir: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let _ = Command::new(&self.nllb)
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.path)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        drop(RemoveOnDrop(self.path.clone()));
    }
}

/// Removes a directory tree on drop.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.0)
        {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}
