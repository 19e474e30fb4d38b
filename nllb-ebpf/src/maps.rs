//! Every map the programs use. The layouts are `nllb-common`'s; this file
//! only places them in the object (BTF-defined, so `bpftool map dump`
//! prints field names).

use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, PerCpuArray, RingBuf, SkStorage},
    macros::btf_map,
};
use nllb_common::{
    BackendCounters, BackendKey, DatapathConfig, DatapathCounters, EVENT_RING_BYTES, Event, MAX_MARKS, MAX_SERVICES,
    MAX_STATS, MAX_VIPS, MarkClock, PassiveMark, ServiceCounters, ServiceTable, SockState, TRACE_RING_BYTES,
    TraceControl, Vip4Key, Vip6Key,
};

/// The table of one service: an array of one element, swapped whole.
pub type Table = Array<ServiceTable, 1>;

#[btf_map]
pub static NLLB_VIPS4: HashOfMaps<Vip4Key, Table, { MAX_VIPS as usize }> = HashOfMaps::new();
#[btf_map]
pub static NLLB_VIPS6: HashOfMaps<Vip6Key, Table, { MAX_VIPS as usize }> = HashOfMaps::new();
/// Not used by any program; see `nllb_common::maps::TABLE_PROTO`.
#[btf_map]
pub static NLLB_TABLE_PROTO: Table = Array::new();
#[btf_map]
pub static NLLB_MARKS: HashMap<BackendKey, PassiveMark, { MAX_MARKS as usize }> = HashMap::new();
/// See `nllb_common::MarkClock` and `marks.rs`.
#[btf_map]
pub static NLLB_MARK_CLOCK: Array<MarkClock, 1> = Array::new();
/// Socket-local storage: see `sockets.rs`.
#[btf_map]
pub static NLLB_SOCKETS: SkStorage<SockState> = SkStorage::new();
#[btf_map]
pub static NLLB_BACKEND_STATS: PerCpuArray<BackendCounters, { MAX_STATS as usize }> = PerCpuArray::new();
#[btf_map]
pub static NLLB_SERVICE_STATS: PerCpuArray<ServiceCounters, { MAX_SERVICES as usize }> = PerCpuArray::new();
#[btf_map]
pub static NLLB_DATAPATH_STATS: PerCpuArray<DatapathCounters, 1> = PerCpuArray::new();
#[btf_map]
pub static NLLB_CONFIG: Array<DatapathConfig, 1> = Array::new();
#[btf_map]
pub static NLLB_EVENTS: RingBuf<Event, { EVENT_RING_BYTES as usize }> = RingBuf::new();
#[btf_map]
pub static NLLB_TRACE_CTL: Array<TraceControl, 1> = Array::new();
#[btf_map]
pub static NLLB_TRACE_EVENTS: RingBuf<Event, { TRACE_RING_BYTES as usize }> = RingBuf::new();

/// Per-CPU counters are only ever touched by the CPU they belong to, and a
/// program runs to completion on one CPU: plain adds are exact.
#[inline(always)]
pub fn bump_backend(stat_id: u32, f: impl FnOnce(&mut BackendCounters)) {
    if let Some(c) = NLLB_BACKEND_STATS.get_ptr_mut(stat_id) {
        // SAFETY: a valid per-CPU slot; see above.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
pub fn bump_service(svc_id: u32, f: impl FnOnce(&mut ServiceCounters)) {
    if let Some(c) = NLLB_SERVICE_STATS.get_ptr_mut(svc_id) {
        // SAFETY: as in bump_backend.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
pub fn bump_datapath(f: impl FnOnce(&mut DatapathCounters)) {
    if let Some(c) = NLLB_DATAPATH_STATS.get_ptr_mut(0) {
        // SAFETY: as in bump_backend.
        f(unsafe { &mut *c });
    }
}
