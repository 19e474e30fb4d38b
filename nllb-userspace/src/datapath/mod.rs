//! The seam between the agent's control logic and whatever moves packets.
//!
//! Discovery, health and the CLI see only [`Datapath`]: it serves a
//! [`Plan`] and reports a typed [`DatapathSnapshot`]. What only the kernel
//! datapath can do comes as capabilities, not as no-op methods: a stream of
//! kernel events ([`events::EventReader`]) and closing connections to a
//! backend ([`reaper::Reaper`]).

pub mod bpf_sys;
pub mod ebpf;
pub mod encoding;
pub mod events;
pub mod kernel;
pub mod pins;
pub mod reaper;
pub mod tables;
pub mod worker;

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

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

impl DatapathKind {
    pub fn name(self) -> &'static str {
        match self {
            DatapathKind::Ebpf => "ebpf",
            DatapathKind::Envoy => "envoy",
            DatapathKind::Aside => crate::stand_aside::STATUS_KEY,
        }
    }
}

/// What a datapath is doing, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DatapathSnapshot {
    pub services: Vec<ServiceSnapshot>,
    /// Backends the kernel holds a passive mark for (kernel datapath).
    pub marks: Vec<MarkSnapshot>,
    /// Kernel datapath only.
    pub kernel: Option<KernelCounters>,
    /// Envoy datapath only: the supervisor's view of the process.
    pub envoy: Option<serde_json::Value>,
    /// Standing aside only: who serves the virtual addresses instead.
    pub aside: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceSnapshot {
    pub name: String,
    /// The kernel's id for the service (its counter slots).
    pub id: Option<u32>,
    pub backends: BTreeMap<SocketAddr, BackendCounters>,
    pub no_backend: u64,
    /// Connects that found every backend marked and took the oldest mark.
    pub all_marked: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackendCounters {
    pub connects: u64,
    /// Steered connects refused, given up or aborted before they connected.
    pub refused: u64,
    /// Steered connects whose first SYN had to be retransmitted.
    pub syn_timeouts: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MarkSnapshot {
    pub backend: SocketAddr,
    /// CLOCK_MONOTONIC ns.
    pub failed_ns: u64,
    pub recovered_ns: u64,
    pub cause: &'static str,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelCounters {
    /// Steered sockets not remembered: the socket table was full.
    pub sockets_full: u64,
    pub events_lost: u64,
    pub marks_full: u64,
    /// Steered connects whose SYN retry cap the kernel refused.
    pub syncnt_refused: u64,
    /// Optional programs the kernel refused (the datapath runs without).
    pub missing_programs: Vec<&'static str>,
}

pub trait Datapath: Send {
    fn kind(&self) -> DatapathKind;
    /// Make the datapath serve exactly `plan`; unchanged services are not
    /// disturbed. May block (a map-of-maps swap waits for an RCU grace
    /// period; Envoy waits until it serves): the agent calls it from its
    /// datapath thread, never from its event loop.
    fn apply(&mut self, plan: &Plan) -> Result<(), DatapathError>;
    fn snapshot(&self) -> DatapathSnapshot;
    /// Kernel events, taken once by the agent; None for a datapath that has
    /// none (Envoy ejects on its own).
    fn take_events(&mut self) -> Option<events::EventReader> {
        None
    }
    /// Closes nllb's connections to a backend; None where the datapath
    /// cannot (Envoy closes its upstream connections itself).
    fn reaper(&self) -> Option<Arc<reaper::Reaper>> {
        None
    }
    /// Detach and remove everything this datapath installed.
    fn shutdown(&mut self) -> Result<(), DatapathError>;
}
