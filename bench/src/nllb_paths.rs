//! The nllb rows: the real `nllb agent` in eBPF mode and in Envoy mode,
//! each with its own cgroup, pin path and directories.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    paths::{self, AgentOpts, PathUnderTest},
    proxies,
};

pub const EBPF_ID: &str = "nllb";
pub const EBPF_LABEL: &str = "nllb (eBPF)";
pub const ENVOY_ID: &str = "nllb-envoy";
pub const ENVOY_LABEL: &str = "nllb (Envoy mode)";
pub const K0S_PACE_ID: &str = "nllb-k0s-pace";
pub const K0S_PACE_LABEL: &str = "nllb (eBPF), checks at k0s's pace";
/// k0s's Envoy checks each controller every 5 s with a 1 s timeout
/// (tests/src/k0s_nllb.envoy.yaml); nllb's default is every 500 ms.
const K0S_PACE_HEALTH: &str = "health:\n  interval: 5s\n  timeout: 1s\n";

/// What every agent of the run starts from.
pub struct Nllb<'a> {
    /// The binary, or why there is none.
    pub bin: &'a Result<PathBuf, String>,
    pub envoy: Option<&'a Path>,
    pub dir: &'a Path,
    pub backends: &'a [Ipv4Addr],
    /// The agent (and its Envoy) run here (taskset).
    pub cpu: Option<usize>,
}

impl Nllb<'_> {
    /// The agent in eBPF mode, default settings, on `api` and `bulk`.
    #[allow(clippy::too_many_arguments)]
    pub fn ebpf_agent(
        &self,
        tag: &str,
        cgroup: &Path,
        api: SocketAddr,
        bulk: SocketAddr,
        id: &str,
        label: &str,
        note: String,
    ) -> anyhow::Result<PathUnderTest> {
        self.ebpf_agent_with(tag, cgroup, (api, bulk), (id, label, note), "")
    }

    /// The agent in eBPF mode with `health` appended to its config.
    fn ebpf_agent_with(
        &self,
        tag: &str,
        cgroup: &Path,
        vips: (SocketAddr, SocketAddr),
        (id, label, note): (&str, &str, String),
        health: &str,
    ) -> anyhow::Result<PathUnderTest> {
        let bin = self.bin.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        paths::agent_supports(bin, "--cgroup")?;
        let extra = format!("mode: ebpf\n{health}");
        let o = self.agent_opts(bin, tag, cgroup, vips, &extra, true);
        paths::nllb_agent(&o, id, label, Some(note))
    }

    /// An idle-only row: the agent as "nllb (eBPF)" but checking the
    /// controllers as often as k0s's Envoy does, so that idle CPU compares
    /// like with like (an idle agent's CPU is mostly its checks).
    pub fn k0s_pace_path(&self, tag: &str, cgroup: &Path) -> PathUnderTest {
        let r = (|| {
            let vips = (
                SocketAddr::from(([127, 0, 0, 1], proxies::free_port()?)),
                SocketAddr::from(([127, 0, 0, 1], proxies::free_port()?)),
            );
            let note = "idle footprint only: real `nllb agent` (eBPF) with k0s's check pace \
                        (`health.interval: 5s`, `timeout: 1s`), otherwise default settings"
                .to_string();
            self.ebpf_agent_with(
                tag,
                cgroup,
                vips,
                (K0S_PACE_ID, K0S_PACE_LABEL, note),
                K0S_PACE_HEALTH,
            )
        })();
        r.unwrap_or_else(|e| {
            PathUnderTest::unavailable(K0S_PACE_ID, K0S_PACE_LABEL, format!("{e:#}"))
        })
    }

    /// The agent's options: this run's directories, backends and core.
    fn agent_opts<'b>(
        &'b self,
        bin: &'b Path,
        tag: &'b str,
        cgroup: &'b Path,
        (api, bulk): (SocketAddr, SocketAddr),
        extra_config: &'b str,
        ebpf: bool,
    ) -> AgentOpts<'b> {
        AgentOpts {
            nllb: bin,
            dir: self.dir,
            tag,
            backends: self.backends,
            cgroup,
            api,
            bulk,
            extra_config,
            cpu: self.cpu,
            ebpf,
        }
    }

    /// The "nllb (eBPF)" row: virtual addresses 127.0.0.1:7443 and :7444.
    pub fn ebpf_path(&self, tag: &str, cgroup: &Path) -> PathUnderTest {
        let (api, bulk) = (
            SocketAddr::from(([127, 0, 0, 1], 7443)),
            SocketAddr::from(([127, 0, 0, 1], 7444)),
        );
        let note = format!("real `nllb agent`, default settings, virtual address {api}");
        self.ebpf_agent(tag, cgroup, api, bulk, EBPF_ID, EBPF_LABEL, note)
            .unwrap_or_else(|e| PathUnderTest::unavailable(EBPF_ID, EBPF_LABEL, format!("{e:#}")))
    }

    /// The "nllb (Envoy mode)" row: the real agent with `mode: envoy`, which
    /// runs and configures Envoy itself. Clients use a cgroup of its own: if
    /// a build wrongly attached eBPF programs there, no other path's clients
    /// would be affected (and `nllb_agent` refuses such an agent).
    pub fn envoy_path(&self, tag: &str, cgroup: &Path) -> PathUnderTest {
        let r = (|| {
            let envoy = self.envoy.ok_or_else(|| {
                anyhow::anyhow!(
                    "no Envoy binary (venv ~/.cache/nllb/envoy-venv, PATH, --envoy-bin)"
                )
            })?;
            let bin = self.bin.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            paths::agent_supports(bin, "--cgroup")?;
            let (api, bulk) = (
                SocketAddr::from(([127, 0, 0, 1], proxies::free_port()?)),
                SocketAddr::from(([127, 0, 0, 1], proxies::free_port()?)),
            );
            let extra = format!("mode: envoy\nenvoy:\n  binary: \"{}\"\n", envoy.display());
            let o = self.agent_opts(bin, tag, cgroup, (api, bulk), &extra, false);
            let note = "real `nllb agent --mode envoy`, default settings (the agent writes Envoy's config and runs it); \
                        CPU/RSS are agent + Envoy";
            paths::nllb_agent(&o, ENVOY_ID, ENVOY_LABEL, Some(note.into()))
        })();
        r.unwrap_or_else(|e| PathUnderTest::unavailable(ENVOY_ID, ENVOY_LABEL, format!("{e:#}")))
    }
}

/// `--nllb-bin`, env NLLB_BIN, or the workspace's release build (built now
/// if missing or stale).
pub fn find_bin(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NLLB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    eprintln!("== building the nllb binary (cargo build --release -p nllb-userspace --bin nllb)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "nllb-userspace",
            "--bin",
            "nllb",
        ])
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !st.success() {
        return Err("cargo build of the nllb binary failed (is bpf-linker on PATH? run `cargo xtask setup`)".into());
    }
    Ok(target.join("release/nllb"))
}
