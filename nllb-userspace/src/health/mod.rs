//! Active health probes (TCP connect or HTTPS `/readyz`) with rise/fall
//! hysteresis. The agent turns their verdicts into the published backend set.

mod config;

pub use config::{HealthConfig, ProbeKind};
