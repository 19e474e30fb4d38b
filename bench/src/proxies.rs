//! The processes under test besides the direct path: HAProxy, Envoy and the
//! nllb agent. Each is started with a generated config in our temp dir and
//! stopped on drop (SIGTERM, then SIGKILL), by pid.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::backend::{BULK_PORT, ECHO_PORT};

pub struct Proc {
    pub name: String,
    child: Child,
    /// Runs once the process has exited (what it leaves behind).
    pub after_exit: Option<Box<dyn FnOnce() + Send>>,
}

impl Proc {
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        cpu: Option<usize>,
    ) -> anyhow::Result<Proc> {
        let log_file = std::fs::File::create(log)?;
        cmd.stdout(log_file.try_clone()?)
            .stderr(log_file)
            .stdin(Stdio::null());
        if let Some(cpu) = cpu {
            // taskset keeps the program's own pid (it execs), so /proc
            // figures below are the program's, not a wrapper's.
            let mut t = Command::new("taskset");
            t.arg("-c")
                .arg(cpu.to_string())
                .arg(cmd.get_program())
                .args(cmd.get_args());
            for (k, v) in cmd.get_envs() {
                match v {
                    Some(v) => t.env(k, v),
                    None => t.env_remove(k),
                };
            }
            let log_file = std::fs::OpenOptions::new().append(true).open(log)?;
            t.stdout(log_file.try_clone()?)
                .stderr(log_file)
                .stdin(Stdio::null());
            cmd = t;
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting {name} ({:?}): is it installed?",
                cmd.get_program()
            )
        })?;
        Ok(Proc {
            name: name.to_string(),
            child,
            after_exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process already exited (a bad config, a port in use).
    pub fn check_alive(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{} exited with {st}; last log lines from {}:\n{tail}",
                self.name,
                log.display()
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts TCP connects from this (root-cgroup) process.
    pub fn wait_listening(&mut self, addr: SocketAddr, log: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            self.check_alive(log)?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} did not listen on {addr} within 15 s; see {}",
            self.name,
            log.display()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(f) = self.after_exit.take() {
            f();
        }
    }
}

/// A free loopback port (bound and released; the window for a race is small
/// and a lost race shows up as a clear "did not listen" error).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A plain `mode tcp` HAProxy, round robin: the configuration a user
/// reaching for "a TCP load balancer" writes first. With `checks`, TCP checks
/// at nllb's default pace (500 ms, fall 2, rise 2) and a redispatch of a
/// failed connect to another server, as a careful user would add.
pub fn haproxy_config(
    api_port: u16,
    bulk_port: u16,
    backends: &[Ipv4Addr],
    checks: bool,
) -> String {
    let mut c = String::from(
        "global\n  maxconn 8000\n  nbthread 1\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n",
    );
    let check = if checks {
        c.push_str("  option redispatch\n  retries 1\n  timeout check 250ms\n");
        " check inter 500ms fall 2 rise 2"
    } else {
        ""
    };
    for (name, listen, port) in [("api", api_port, ECHO_PORT), ("bulk", bulk_port, BULK_PORT)] {
        let _ = writeln!(
            c,
            "listen {name}\n  bind 127.0.0.1:{listen}\n  balance roundrobin"
        );
        for (i, b) in backends.iter().enumerate() {
            let _ = writeln!(c, "  server c{i} {b}:{port}{check}");
        }
    }
    c
}

/// The Envoy binary: `--envoy-bin`, `envoy` inside the project's venv
/// (the real binary, not the Python wrapper, so its pid is Envoy's), or PATH.
pub fn find_envoy(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let lib = home.join(".cache/nllb/envoy-venv/lib");
    if let Ok(rd) = std::fs::read_dir(&lib) {
        for e in rd.flatten() {
            let p = e.path().join("site-packages/envoy/_bin/envoy");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("envoy"))
        .find(|p| p.is_file())
}

/// nllb agent config for the bench: the echo and bulk services, our hosts as
/// controllers. `extra` is appended verbatim (mode, health settings).
pub fn nllb_config(
    api: SocketAddr,
    bulk: SocketAddr,
    backends: &[Ipv4Addr],
    extra: &str,
) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "services:\n  - name: apiserver\n    listen: [\"{api}\"]\n    backendPort: {ECHO_PORT}\n  \
         - name: bulk\n    listen: [\"{bulk}\"]\n    backendPort: {BULK_PORT}\n\
         backends: [{}]\nhostNetworkOnly: true\n{extra}",
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_config_lists_every_backend_per_service() {
        let c = haproxy_config(
            1000,
            1001,
            &[
                Ipv4Addr::new(198, 19, 200, 2),
                Ipv4Addr::new(198, 19, 201, 2),
            ],
            false,
        );
        assert!(c.contains("bind 127.0.0.1:1000"));
        assert!(c.contains("server c1 198.19.201.2:6443"));
        assert!(c.contains("server c0 198.19.200.2:6444"));
    }
}
