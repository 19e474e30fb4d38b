//! `nllb detect` and mode selection: what this node can run, and which
//! datapath `--mode auto` picks (and why).
//!
//! Exit status of `nllb detect` (for scripts):
//! - 0: the eBPF datapath works here (auto picks eBPF);
//! - 3: only Envoy mode is possible (auto picks Envoy);
//! - 4: neither works (no usable eBPF and no Envoy binary).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{
    compat::{self, AttachProbe, FEATURES, Feature, KernelVersion, Need, Privileges},
    config::Mode,
    envoy,
    platform::{self, Platform},
    sys,
};

pub const EXIT_EBPF: i32 = 0;
pub const EXIT_ENVOY_ONLY: i32 = 3;
pub const EXIT_NEITHER: i32 = 4;

/// One row of the feature table as it stands on this node.
#[derive(Clone, Debug, Serialize)]
pub struct FeatureStatus {
    pub feature: Feature,
    pub name: &'static str,
    pub min_kernel: String,
    pub need: Need,
    pub used_for: &'static str,
    /// None when neither the version nor a probe can tell.
    pub available: Option<bool>,
    /// "kernel version", "probe" or "kernel config".
    pub source: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct EnvoyProbe {
    pub binary: Option<PathBuf>,
    pub version: Option<String>,
    pub error: Option<String>,
}

impl EnvoyProbe {
    pub fn usable(&self) -> bool {
        self.version.is_some()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DetectReport {
    pub kernel_release: String,
    pub kernel: Option<KernelVersion>,
    pub privileges: Privileges,
    pub cgroup2_mount: Option<PathBuf>,
    /// The cgroup the agent would attach to (--cgroup, else the mount).
    pub target_cgroup: Option<PathBuf>,
    pub target_is_cgroup2: bool,
    pub bpffs_mounted: bool,
    pub bpf_syscall: Result<(), String>,
    pub btf: bool,
    /// The real programs loaded and attached to a temporary child cgroup.
    pub attach: Result<AttachProbe, String>,
    pub features: Vec<FeatureStatus>,
    /// The CPU architecture: is there an Envoy for it, is the BPF JIT on.
    pub platform: Platform,
    pub envoy: EnvoyProbe,
    /// What `--mode auto` picks and why.
    pub auto_mode: Mode,
    pub reason: String,
}

impl DetectReport {
    pub fn ebpf_usable(&self) -> bool {
        self.attach.as_ref().is_ok_and(AttachProbe::rewrite_works)
    }

    /// `--mode auto`: eBPF when the probe attached the rewrite hooks, else
    /// Envoy, with the reason.
    pub fn auto_mode(&self) -> (Mode, String) {
        (self.auto_mode, self.reason.clone())
    }

    pub fn exit_code(&self) -> i32 {
        if self.ebpf_usable() {
            EXIT_EBPF
        } else if self.envoy.usable() {
            EXIT_ENVOY_ONLY
        } else {
            EXIT_NEITHER
        }
    }

    /// Why the eBPF datapath cannot run here, most basic cause first.
    pub fn ebpf_blocker(&self) -> Option<String> {
        if self.ebpf_usable() {
            return None;
        }
        if let Some(v) = self.kernel
            && v < compat::min_ebpf_kernel()
        {
            let missing: Vec<_> = compat::missing_features(v)
                .iter()
                .filter(|f| f.need == Need::Required)
                .map(|f| format!("{} ({}+)", f.name, f.min))
                .collect();
            return Some(format!(
                "kernel {v} is older than {}: lacks {}",
                compat::min_ebpf_kernel(),
                missing.join(", ")
            ));
        }
        if let Err(e) = &self.bpf_syscall {
            return Some(e.clone());
        }
        if !self.privileges.can_attach_cgroup_programs() {
            return Some(format!(
                "missing privileges (euid {}, CapEff {}): need root, or CAP_BPF + CAP_NET_ADMIN",
                self.privileges.euid, self.privileges.cap_eff
            ));
        }
        if self.cgroup2_mount.is_none() {
            return Some("no cgroup v2 filesystem is mounted (cgroup v1 only)".into());
        }
        if !self.target_is_cgroup2 {
            let t = self.target_cgroup.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
            return Some(format!("{t} is not a cgroup v2 directory"));
        }
        match &self.attach {
            Err(e) => Some(e.clone()),
            Ok(a) => {
                let refused = a.refused();
                Some(format!(
                    "the kernel refused {} ({}){}: {}",
                    if refused.len() == 1 { "a program" } else { "programs" },
                    refused.join(", "),
                    if a.privileges_short() { "; the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON" } else { "" },
                    a.first_error().unwrap_or_else(|| "connect4/connect6 not attached".into())
                ))
            }
        }
    }
}

/// Probe this node. `target_cgroup`: where the agent would attach (default:
/// the root of the cgroup2 mount; the probe itself always uses a temporary
/// child of it). `envoy_binary`: an explicit Envoy binary, as the agent would
/// be given.
pub fn detect(target_cgroup: Option<&Path>) -> DetectReport {
    detect_with(target_cgroup, None)
}

pub fn detect_with(target_cgroup: Option<&Path>, envoy_binary: Option<&Path>) -> DetectReport {
    let kernel_release = compat::kernel_release();
    let kernel = KernelVersion::parse(&kernel_release);
    let cgroup2_mount = sys::cgroup2_mount().ok();
    let target = target_cgroup.map(Path::to_path_buf).or_else(|| cgroup2_mount.clone());
    let target_is_cgroup2 = target.as_deref().is_some_and(sys::is_cgroup2_dir);
    let attach = match &target {
        None => Err("no cgroup v2 filesystem is mounted (cgroup v1 only)".to_string()),
        Some(t) => compat::probe_attach(t),
    };
    let btf = compat::vmlinux_btf();
    let features = feature_statuses(kernel, attach.as_ref().ok(), btf);
    let platform = platform::probe(attach.as_ref().ok().and_then(|a| a.jited));
    // Where no Envoy build exists, auto never runs one (not even to ask
    // its version): the in-kernel datapath is the only one.
    let envoy = match &platform.no_envoy {
        Some(why) => EnvoyProbe { binary: None, version: None, error: Some(why.clone()) },
        None => probe_envoy(envoy_binary),
    };
    let mut report = DetectReport {
        kernel_release,
        kernel,
        privileges: Privileges::probe(),
        cgroup2_mount,
        target_cgroup: target,
        target_is_cgroup2,
        bpffs_mounted: sys::is_bpffs(Path::new("/sys/fs/bpf")),
        bpf_syscall: compat::probe_bpf_syscall(),
        btf,
        attach,
        features,
        platform,
        envoy,
        auto_mode: Mode::Envoy,
        reason: String::new(),
    };
    (report.auto_mode, report.reason) = decide(&report);
    report
}

fn decide(r: &DetectReport) -> (Mode, String) {
    if r.ebpf_usable() {
        let degraded: Vec<&str> = r
            .attach
            .as_ref()
            .map(|a| a.programs.iter().filter(|p| !p.attached).map(|p| p.program).collect())
            .unwrap_or_default();
        let mut why = "the kernel loaded and attached connect4/connect6 to a test cgroup".to_string();
        if !degraded.is_empty() {
            why.push_str(&format!(" (without {})", degraded.join(", ")));
        }
        if let Some(only) = &r.platform.no_envoy {
            why.push_str(&format!("; {only}"));
        }
        return (Mode::Ebpf, why);
    }
    let blocker = r.ebpf_blocker().unwrap_or_default();
    if let Some(only) = &r.platform.no_envoy {
        // The only candidate; it cannot run (exit status 4).
        return (Mode::Ebpf, format!("eBPF datapath unavailable: {blocker}; {only}"));
    }
    if r.envoy.usable() {
        (Mode::Envoy, format!("eBPF datapath unavailable: {blocker}"))
    } else {
        let e = r.envoy.error.clone().unwrap_or_default();
        (Mode::Envoy, format!("eBPF datapath unavailable: {blocker}; Envoy unavailable too: {e}"))
    }
}

fn probe_envoy(explicit: Option<&Path>) -> EnvoyProbe {
    match envoy::resolve_binary(explicit) {
        Err(e) => EnvoyProbe { binary: None, version: None, error: Some(e.to_string()) },
        Ok(b) => match envoy::binary_version(&b) {
            Ok(v) => EnvoyProbe { binary: Some(b), version: Some(v), error: None },
            Err(e) => EnvoyProbe { binary: Some(b), version: None, error: Some(e) },
        },
    }
}

fn feature_statuses(kernel: Option<KernelVersion>, attach: Option<&AttachProbe>, btf: bool) -> Vec<FeatureStatus> {
    use nllb_common::programs as p;
    FEATURES
        .iter()
        .map(|f| {
            let by_version = kernel.map(|v| v >= f.min);
            let probed = |progs: &[&str]| -> Option<bool> {
                let a = attach?;
                a.load_error.is_none().then(|| progs.iter().all(|n| a.attached(n)))
            };
            let (available, source) = match f.feature {
                Feature::CgroupConnect => (probed(&[p::CONNECT4, p::CONNECT6]), "probe"),
                Feature::CgroupGetpeername => (probed(&[p::GETPEERNAME4, p::GETPEERNAME6]), "probe"),
                Feature::SockOps | Feature::SockOpsCallbacks | Feature::SockOpsTimeoutInit => {
                    (probed(&[p::SOCK_OPS]), "probe")
                }
                // connect4 stores into NLLB_SOCKETS: a load and attach proves it.
                Feature::SkStorage => (probed(&[p::CONNECT4]).filter(|ok| *ok), "probe"),
                Feature::CgroupBpfLink => (
                    attach
                        .filter(|a| a.load_error.is_none())
                        .map(|a| a.programs.iter().any(|p| p.attached && p.bpf_link)),
                    "probe",
                ),
                // The object declares a ring buffer and the rewrite hooks call
                // bpf_get_netns_cookie: a successful load and attach proves both.
                Feature::RingBuf => (attach.map(|a| a.load_error.is_none()).filter(|ok| *ok), "probe"),
                Feature::NetnsCookieSockAddr => (probed(&[p::CONNECT4]).filter(|ok| *ok), "probe"),
                Feature::VmlinuxBtf => (Some(btf), "probe"),
                Feature::SockDiagDestroy => (
                    compat::kernel_config("CONFIG_INET_DIAG_DESTROY").map(|c| c && by_version.unwrap_or(true)),
                    "kernel config",
                ),
                _ => (None, "kernel version"),
            };
            let (available, source) = match available {
                Some(a) => (Some(a), source),
                None => (by_version, "kernel version"),
            };
            FeatureStatus {
                feature: f.feature,
                name: f.name,
                min_kernel: format!("{}.{}", f.min.major, f.min.minor),
                need: f.need,
                used_for: f.used_for,
                available,
                source,
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("--mode ebpf: the eBPF datapath cannot run here: {0}; use --mode envoy or --mode auto")]
    EbpfUnavailable(String),
    #[error("--mode envoy: {0}")]
    EnvoyUnavailable(String),
    #[error("--mode auto: the eBPF datapath cannot run here ({ebpf}) and Envoy is not available ({envoy})")]
    Neither { ebpf: String, envoy: String },
    #[error("--mode auto: the eBPF datapath cannot run here ({ebpf}); {only}")]
    InKernelOnly { ebpf: String, only: String },
}

/// The datapath the agent runs, from `--mode` / `mode:` (`requested`) and
/// the target `cgroup`. `auto` probes the in-kernel datapath (loads and
/// attaches the programs to a temporary child of `cgroup`) and falls back to
/// Envoy only when that fails, logging the exact reason; `ebpf` fails
/// instead of falling back; `envoy` only needs the binary. Returns
/// `Mode::Ebpf` or `Mode::Envoy`, never `Mode::Auto`.
pub fn select_mode(requested: Mode, cgroup: &Path, envoy_binary: Option<&Path>) -> Result<Mode, ModeError> {
    if requested == Mode::Envoy {
        let e = probe_envoy(envoy_binary);
        return if e.usable() {
            tracing::info!(binary = %e.binary.as_deref().unwrap_or(Path::new("")).display(), "mode envoy (requested)");
            Ok(Mode::Envoy)
        } else {
            Err(ModeError::EnvoyUnavailable(e.error.unwrap_or_default()))
        };
    }
    let report = detect_with(Some(cgroup), envoy_binary);
    if report.ebpf_usable() {
        tracing::info!(mode = "ebpf", reason = %report.reason, bpf_jit = %report.platform.bpf_jit.summary, "datapath selected");
        return Ok(Mode::Ebpf);
    }
    let blocker = report.ebpf_blocker().unwrap_or_default();
    match requested {
        Mode::Ebpf => Err(ModeError::EbpfUnavailable(blocker)),
        _ if let Some(only) = report.platform.no_envoy => Err(ModeError::InKernelOnly { ebpf: blocker, only }),
        _ if report.envoy.usable() => {
            tracing::warn!(mode = "envoy", reason = %blocker, "eBPF datapath unavailable: falling back to Envoy");
            Ok(Mode::Envoy)
        }
        _ => Err(ModeError::Neither { ebpf: blocker, envoy: report.envoy.error.unwrap_or_default() }),
    }
}

/// `nllb detect [--json] [--cgroup DIR] [--envoy-binary FILE]`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DetectArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// cgroup v2 directory the agent would attach to (default: the cgroup2
    /// mount's root). The probe attaches to a temporary child of it.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Envoy binary to check (default: as the agent finds it).
    #[arg(long)]
    pub envoy_binary: Option<PathBuf>,
}

/// Print the report; returns the exit status (0 eBPF, 3 Envoy only, 4
/// neither).
pub fn run_detect(args: DetectArgs) -> i32 {
    let report = detect_with(args.cgroup.as_deref(), args.envoy_binary.as_deref());
    if args.json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        v["ebpf_usable"] = report.ebpf_usable().into();
        v["exit_code"] = report.exit_code().into();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", render(&report));
    }
    report.exit_code()
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The human-readable report.
pub fn render(r: &DetectReport) -> String {
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("  {k:<14} {v}\n"));
    line("kernel", format!("{} ({})", r.kernel_release, r.kernel.map(|k| k.to_string()).unwrap_or("unparsed".into())));
    line(
        "architecture",
        match &r.platform.no_envoy {
            None => format!("{} (Envoy exists for it)", r.platform.arch),
            Some(why) => format!("{}: {why}", r.platform.arch),
        },
    );
    line("BPF JIT", r.platform.bpf_jit.summary.clone());
    let p = &r.privileges;
    line(
        "privileges",
        format!(
            "euid {}, CAP_SYS_ADMIN {}, CAP_BPF {}, CAP_NET_ADMIN {}, CAP_PERFMON {}",
            p.euid,
            yes_no(p.cap_sys_admin),
            yes_no(p.cap_bpf),
            yes_no(p.cap_net_admin),
            yes_no(p.cap_perfmon)
        ),
    );
    line("cgroup v2", r.cgroup2_mount.as_ref().map_or("not mounted".into(), |m| format!("mounted at {}", m.display())));
    line(
        "target cgroup",
        match &r.target_cgroup {
            Some(t) => format!("{} ({})", t.display(), if r.target_is_cgroup2 { "cgroup v2" } else { "NOT cgroup v2" }),
            None => "none".into(),
        },
    );
    line(
        "bpffs",
        if r.bpffs_mounted { "mounted at /sys/fs/bpf".into() } else { "not mounted (the agent mounts it)".into() },
    );
    line(
        "BPF syscall",
        match &r.bpf_syscall {
            Ok(()) => "ok (created an array map)".into(),
            Err(e) => e.clone(),
        },
    );
    line("BTF", if r.btf { "/sys/kernel/btf/vmlinux present".into() } else { "no /sys/kernel/btf/vmlinux".into() });
    match &r.attach {
        Err(e) => line("attach probe", format!("not run: {e}")),
        Ok(a) => {
            line("attach probe", format!("temporary cgroup {} (removed)", a.cgroup.display()));
            if let Some(e) = &a.load_error {
                line("", format!("object load failed: {e}"));
            }
            for p in &a.programs {
                let what = match (p.attached, p.bpf_link) {
                    (true, true) => "attached (bpf_link)".to_string(),
                    (true, false) => format!("attached without bpf_link: {}", p.error.clone().unwrap_or_default()),
                    _ => format!("FAILED: {}", p.error.clone().unwrap_or_default()),
                };
                line("", format!("{:<18} {what}", p.program));
            }
        }
    }
    o.push_str("  kernel features (minimum kernel, here):\n");
    for f in &r.features {
        let here = match f.available {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "unknown",
        };
        let need = match f.need {
            Need::Required => "required",
            Need::Degrades => "optional, degrades",
            Need::UsedIfPresent => "used if present",
            Need::Optional => "not used yet",
        };
        o.push_str(&format!("    {:<38} {:>5}+  {:<7} ({}; {})\n", f.name, f.min_kernel, here, f.source, need));
    }
    let envoy = match (&r.envoy.binary, &r.envoy.version) {
        (Some(b), Some(v)) => format!("{} ({v})", b.display()),
        _ => format!("not available: {}", r.envoy.error.clone().unwrap_or_default()),
    };
    o.push_str(&format!("  {:<14} {envoy}\n", "envoy"));
    o.push_str(&format!("  {:<14} {}: {}\n", "auto mode", r.auto_mode, r.reason));
    o.push_str(&format!(
        "  {:<14} {}\n",
        "exit status",
        match r.exit_code() {
            EXIT_EBPF => "0 (eBPF datapath works)",
            EXIT_ENVOY_ONLY => "3 (only Envoy mode is possible)",
            _ => "4 (neither eBPF nor Envoy is possible)",
        }
    ));
    o
}
