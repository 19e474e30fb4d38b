//! [`Datapath`] backed by a supervised Envoy: for nodes whose kernel or
//! privileges cannot run the eBPF programs.
//!
//! There is no kernel hook here, so nothing sees individual connects; the
//! agent stays the single source of truth for health and membership and
//! pushes each plan to Envoy through the files described in [`render`].

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    render::{self, Layout, RenderOptions},
    supervisor::{EnvoyStatus, Launch, Supervisor, SupervisorHandle},
};
use crate::{
    config::Config,
    datapath::{BackendCounters, Datapath, DatapathError, DatapathKind, DatapathSnapshot, ServiceSnapshot},
    model::Plan,
};

/// How long `start` waits for Envoy to listen on every virtual address.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `apply` waits for a listener change to show up in the kernel.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connections accepted by a removed listener (a service that lost
/// its last backend) may live on: Envoy's `--drain-time-s`.
pub const DRAIN_TIME_S: u32 = 600;

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
    pub fn from_config(cfg: &Config, binary: PathBuf, work_dir: PathBuf) -> EnvoyOptions {
        EnvoyOptions {
            binary,
            work_dir,
            render: render_options(cfg),
            concurrency: cfg.envoy.concurrency.unwrap_or(super::DEFAULT_CONCURRENCY),
            log_level: cfg.envoy.log_level.clone().unwrap_or_else(|| super::DEFAULT_LOG_LEVEL.into()),
        }
    }
}

/// Render settings taken from the config.
pub fn render_options(cfg: &Config) -> RenderOptions {
    RenderOptions {
        admin_port: cfg.envoy.admin_port,
        eject_hold: cfg.passive.enabled.then_some(cfg.passive.eject_hold),
    }
}

pub struct EnvoyDatapath {
    layout: Layout,
    opts: EnvoyOptions,
    supervisor: Option<Supervisor>,
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
        if let Err(why) = dp.wait_listening(plan, START_TIMEOUT, Some(generation)) {
            let log = dp.layout.log_file();
            dp.stop();
            return Err(DatapathError::Other(format!("envoy did not come up: {why} (log: {})", log.display())));
        }
        tracing::info!(dir = %layout.dir.display(), "envoy datapath ready");
        Ok(dp)
    }

    /// A handle that reports Envoy's state; keep it beside the boxed
    /// datapath to show it in `nllb status`.
    pub fn handle(&self) -> SupervisorHandle {
        self.supervisor.as_ref().expect("supervisor runs until shutdown").handle()
    }

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

    fn stop(&mut self) {
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
        let gone: Vec<PathBuf> =
            self.written.keys().filter(|p| p.starts_with(self.layout.eds_dir()) && !keep.contains(*p)).cloned().collect();
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

    /// Wait until the running Envoy listens on exactly the virtual
    /// addresses of `plan`'s services that have backends. With
    /// `generation`, fail at once if that run of Envoy exits.
    fn wait_listening(&self, plan: &Plan, timeout: Duration, generation: Option<u64>) -> Result<(), String> {
        let want = expected_listeners(plan);
        let handle = self.handle();
        let deadline = Instant::now() + timeout;
        let mut seen = HashSet::new();
        let log = self.layout.log_file();
        let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        loop {
            let st = handle.status();
            if let Some(g) = generation
                && (handle.generation() != g || !st.running)
            {
                return Err(st.last_exit.unwrap_or_else(|| "envoy exited".into()));
            }
            if let Some(pid) = st.pid {
                seen = listening_sockets(pid).unwrap_or_default();
                if let Some(port) = self.opts.render.admin_port {
                    seen.remove(&SocketAddr::from(([127, 0, 0, 1], port)));
                }
                if seen == want {
                    return Ok(());
                }
            }
            // A listener that cannot bind never will: say so now.
            if let Some(line) = new_log_lines(&log, log_start).into_iter().find(|l| l.contains("cannot bind")) {
                return Err(line.rsplit("] ").next().unwrap_or(&line).trim().to_string());
            }
            if Instant::now() > deadline {
                let mut missing: Vec<_> = want.difference(&seen).map(|a| a.to_string()).collect();
                let mut extra: Vec<_> = seen.difference(&want).map(|a| a.to_string()).collect();
                missing.sort();
                extra.sort();
                let last = super::supervisor::last_error_line(&self.layout.log_file()).unwrap_or_default();
                return Err(format!(
                    "after {timeout:?} Envoy is not listening on [{}] and still on [{}]; {last}",
                    missing.join(", "),
                    extra.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Datapath for EnvoyDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Envoy
    }

    fn apply(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        if *plan == self.plan {
            return Ok(());
        }
        self.write_plan(plan)?;
        let listeners_changed = expected_listeners(plan) != expected_listeners(&self.plan);
        self.plan = plan.clone();
        // Listener changes are visible in the kernel, so wait for them: once
        // apply returns, a service without backends refuses connects. An
        // Envoy that is down picks the files up when it comes back.
        if listeners_changed
            && self.status().running
            && let Err(why) = self.wait_listening(plan, APPLY_TIMEOUT, None)
        {
            tracing::warn!(%why, "envoy has not applied the new listeners yet");
        }
        Ok(())
    }

    /// Upstream connections per controller from the admin interface
    /// (`/clusters`; none when `envoy.adminPort` is unset or Envoy is down),
    /// and the supervisor's view of the process.
    fn snapshot(&self) -> DatapathSnapshot {
        let services = match self.opts.render.admin_port.map(|port| admin_get(port, "/clusters?format=json")) {
            Some(Ok(body)) => parse_cluster_counters(&body),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "envoy admin /clusters");
                Vec::new()
            }
            None => Vec::new(),
        };
        DatapathSnapshot { services, envoy: serde_json::to_value(self.status()).ok(), ..Default::default() }
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

/// Lines Envoy logged after byte `from` (capped to the last 64 KiB).
fn new_log_lines(log: &Path, from: u64) -> Vec<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = fs::File::open(log) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len <= from || f.seek(SeekFrom::Start(from.max(len.saturating_sub(64 * 1024)))).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).lines().map(str::to_string).collect()
}

/// A GET on Envoy's loopback admin interface; the body.
fn admin_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    // Envoy's admin answers HTTP/1.0 with 426, so 1.1 and its chunks.
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        return Ok(String::new());
    };
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok(out)
}

/// `cx_total` of every host of every cluster in `/clusters?format=json`.
fn parse_cluster_counters(body: &str) -> Vec<ServiceSnapshot> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let empty = Vec::new();
    let mut out = Vec::new();
    for c in v["cluster_statuses"].as_array().unwrap_or(&empty) {
        let mut backends = std::collections::BTreeMap::new();
        for h in c["host_statuses"].as_array().unwrap_or(&empty) {
            let sa = &h["address"]["socket_address"];
            let Some(addr) = sa["address"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .zip(sa["port_value"].as_u64().and_then(|p| u16::try_from(p).ok()))
                .map(|(ip, port)| SocketAddr::new(ip, port))
            else {
                continue;
            };
            let total = h["stats"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .find(|s| s["name"] == "cx_total")
                .and_then(|s| s["value"].as_u64().or_else(|| s["value"].as_str()?.parse().ok()))
                .unwrap_or(0);
            backends.insert(addr, BackendCounters { connects: total, ..Default::default() });
        }
        if let Some(name) = c["name"].as_str() {
            out.push(ServiceSnapshot { name: name.to_string(), backends, ..Default::default() });
        }
    }
    out
}

fn expected_listeners(plan: &Plan) -> HashSet<SocketAddr> {
    plan.services.iter().filter(|s| !s.backends.is_empty()).flat_map(|s| s.listen.iter().copied()).collect()
}

fn io_err(path: &Path, e: std::io::Error) -> DatapathError {
    DatapathError::Other(format!("{}: {e}", path.display()))
}

/// TCP sockets in LISTEN state owned by `pid`, from its fd table and its
/// network namespace's /proc/<pid>/net/tcp{,6}.
pub fn listening_sockets(pid: u32) -> std::io::Result<HashSet<SocketAddr>> {
    let mut inodes = HashSet::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(target) = fs::read_link(fd.path())
            && let Some(inode) =
                target.to_str().and_then(|t| t.strip_prefix("socket:[")).and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let mut out = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(addr) = parse_proc_addr(f[1]) {
                out.insert(addr);
            }
        }
    }
    Ok(out)
}

/// `0100007F:1D03` or the 32-hex-digit IPv6 form: each 32-bit word is
/// printed in host byte order.
pub(crate) fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok().map(u32::to_ne_bytes))
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        if cfg!(target_endian = "little") {
            assert_eq!(parse_proc_addr("0100007F:1D03"), Some("127.0.0.1:7427".parse().unwrap()));
            assert_eq!(
                parse_proc_addr("00000000000000000000000001000000:1D03"),
                Some("[::1]:7427".parse().unwrap())
            );
        }
    }

    #[test]
    fn this_process_listening_socket_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let found = listening_sockets(std::process::id()).unwrap();
        assert!(found.contains(&l.local_addr().unwrap()), "{found:?}");
    }
}
