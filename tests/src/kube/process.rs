//! A control-plane process (etcd, kube-apiserver): started in a network
//! namespace when asked, its output in a log file, ended by its pid on drop.

use std::{
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::{net::Netns, wait_for};

#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Process {
    /// Starts `cmd` with stdout and stderr appended to `log`, inside
    /// `netns` when given (setns in the child before exec, so the pid is
    /// the program's own and nothing else runs in between).
    pub fn spawn(name: &str, mut cmd: Command, netns: Option<&Netns>, log: &Path) -> Process {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let ns = netns.map(|n| {
            std::fs::File::open(n.path()).unwrap_or_else(|e| panic!("open netns {}: {e}", n.name))
        });
        if let Some(ns) = ns {
            let fd = ns.as_raw_fd();
            // SAFETY: only async-signal-safe calls (setns) between fork and
            // exec; `ns` outlives the spawn below.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
            drop(ns);
            return Process {
                child: Some(child),
                log: log.to_path_buf(),
            };
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Process {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running (false once it exited or was ended).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGTERM, then SIGKILL when it is still there after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        if wait_for(grace, || child.try_wait().ok().flatten()).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `lines` lines of its log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A scratch directory removed on drop; kept (and named) when the test
/// failed, for its logs.
#[derive(Debug)]
pub struct WorkDir(pub PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("control-plane logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
