//! The seam between the agent's control logic and whatever moves packets.
//!
//! Discovery, health and the CLI see only [`Datapath`]; the eBPF maps (and
//! the Envoy fallback) live behind it.

pub mod backend_table;
pub mod bpf_sys;
pub mod encoding;
pub mod ebpf;
pub mod pinned;
pub mod pins;

use std::net::SocketAddr;

use serde::Serialize;

use crate::model::Plan;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Which datapath is serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    Ebpf,
    Envoy,
    /// Serving nothing: another process serves the addresses (`stand_aside`).
    Aside,
}

/// A backend the kernel saw fail (sock_ops), with its mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PassiveFailure {
    pub backend: SocketAddr,
    /// Nanoseconds since boot (CLOCK_MONOTONIC) of the last failure.
    pub failed_ns: u64,
    pub failures: u32,
}

/// Connect counters of one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceCounters {
    pub name: String,
    pub per_backend: Vec<(SocketAddr, u64)>,
    pub no_backend: u64,
}

pub trait Datapath: Send {
    fn kind(&self) -> DatapathKind;
    /// Make the datapath serve exactly `plan`; unchanged services are not
    /// disturbed.
    fn apply(&mut self, plan: &Plan) -> Result<(), DatapathError>;
    /// Backends the kernel saw fail since their marks were last cleared.
    fn passive_failures(&self) -> Vec<PassiveFailure> {
        Vec::new()
    }
    /// Forget a backend's passive mark once probes say it is back.
    fn clear_passive(&mut self, _backend: SocketAddr) -> Result<(), DatapathError> {
        Ok(())
    }
    /// Cookies of the sockets whose connect this datapath rewrote (so socket
    /// destroy never touches a connection made without nllb).
    fn rewritten_sockets(&self) -> std::collections::HashSet<u64> {
        Default::default()
    }
    fn counters(&self) -> Vec<ServiceCounters> {
        Vec::new()
    }
    /// Kernel service ids by name (eBPF only), to match the pinned maps.
    fn service_ids(&self) -> std::collections::BTreeMap<String, u32> {
        Default::default()
    }
    /// A section for the status file (e.g. Envoy's process state).
    fn status_extra(&self) -> Option<(String, serde_json::Value)> {
        None
    }
    /// Detach and remove everything this datapath installed.
    fn shutdown(&mut self) -> Result<(), DatapathError>;
}
