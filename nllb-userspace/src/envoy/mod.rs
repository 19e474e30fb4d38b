//! The Envoy fallback datapath for kernels without the eBPF hooks.
//!
//! - [`config`]: the `envoy:` config section and [`render_options`];
//! - [`binary`]: which Envoy binary runs;
//! - [`render`]: Envoy's config generated from the plan (bootstrap plus
//!   path-based CDS/LDS/EDS files);
//! - [`supervisor`]: runs Envoy as a child, restarts it with backoff;
//! - [`listeners`]: the virtual addresses Envoy listens on (procfs);
//! - [`admin`]: counters from Envoy's admin interface, polled in the
//!   background;
//! - [`datapath`]: [`EnvoyDatapath`], the [`crate::datapath::Datapath`]
//!   that ties them together;
//! - [`status`]: [`EnvoyStatus`], Envoy's process state for the agent and
//!   `nllb status`.

pub mod admin;
pub mod binary;
pub mod config;
pub mod datapath;
pub mod listeners;
pub mod render;
pub mod status;
pub mod supervisor;

use std::path::Path;

pub use binary::{BINARY_ENV, BinaryError, SETUP_VENV, binary_version, resolve_binary};
pub use config::{DEFAULT_CONCURRENCY, DEFAULT_LOG_LEVEL, EnvoyConfig, render_options};
pub use datapath::{EnvoyDatapath, EnvoyOptions};
pub use status::{EnvoyState, EnvoyStatus, render_status};
pub use supervisor::SupervisorHandle;

use crate::{datapath::DatapathError, model::Plan, passive::PassiveConfig};

/// The agent's entry point for Envoy mode: find the binary (`--envoy-binary`,
/// then `envoy.binary`, then [`resolve_binary`]'s search) and start Envoy on
/// `plan`, with its files in `<run_dir>/envoy`.
pub fn start_datapath(
    envoy: &EnvoyConfig,
    passive: &PassiveConfig,
    binary_flag: Option<&Path>,
    run_dir: &Path,
    plan: &Plan,
) -> Result<EnvoyDatapath, DatapathError> {
    let binary =
        resolve_binary(binary_flag.or(envoy.binary.as_deref())).map_err(|e| DatapathError::Other(e.to_string()))?;
    EnvoyDatapath::start(EnvoyOptions::new(envoy, passive, binary, run_dir.join("envoy")), plan)
}
