//! Health of the backends: active probes (TCP connect or HTTPS `GET
//! /readyz`) with rise/fall hysteresis, passive failure reports from the
//! kernel, and the rule that turns verdicts into the published set without
//! ever black-holing a service.
//!
//! The agent owns one [`Monitor`], gives it every (controller, service port)
//! pair ([`targets`]) with [`Monitor::set_targets`], and on each change of
//! [`Monitor::subscribe`] publishes [`plan`] (which applies [`select`] per
//! service).

mod config;
mod monitor;
mod plan;
mod probe;
mod select;
mod state;
mod tls;
mod transitions;

use std::path::{Path, PathBuf};

pub use config::{HealthConfig, ProbeKind};
pub use monitor::{Monitor, ProbeObserver};
pub use plan::{plan, targets};
pub use probe::{Handshake, Prober};
pub use select::select;
pub use state::{BackendHealth, HealthSnapshot};
pub use transitions::{Reaction, Transitions};

use crate::errors::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("config field `{field}`: {}: {message}", path.display())]
    File { field: &'static str, path: PathBuf, message: String },
    #[error("health probe TLS setup: {0}")]
    Tls(String),
}

impl HealthError {
    fn file(field: &'static str, path: &Path, message: String) -> Self {
        HealthError::File { field, path: path.to_owned(), message }
    }
}
