//! The nllb agent as a library; `main.rs` is the CLI edge.

pub mod addr;
pub mod agent;
pub mod compat;
pub mod config;
pub mod datapath;
pub mod detect;
pub mod discovery;
pub mod envoy;
pub mod errors;
pub mod health;
pub mod k0s;
pub mod kubeconfig;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod passive;
pub mod platform;
pub mod rebalance;
pub mod sock_diag;
pub mod stand_aside;
pub mod status;
pub mod sys;
pub mod systemd;
pub mod trace;
pub mod yaml;

/// The eBPF object built from `nllb-ebpf` by build.rs (aya-build).
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nllb-ebpf"));
