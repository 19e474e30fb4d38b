//! What an earlier agent left under the pin path, and whether this build
//! can adopt it.

use std::{mem::size_of, path::Path};

use aya::maps::{Array, Map, MapData, MapType};
use nllb_common::{
    BackendCounters, BackendKey, DatapathConfig, DatapathCounters, EVENT_RING_BYTES, LAYOUT_VERSION, MAX_MARKS,
    MAX_SERVICES, MAX_STATS, MAX_VIPS, MarkClock, PassiveMark, ServiceCounters, ServiceTable, SockState,
    TRACE_RING_BYTES, TraceControl, Vip4Key, Vip6Key, maps,
};

#[derive(Debug, PartialEq, Eq)]
pub enum PinnedMaps {
    /// Nothing pinned: a fresh install.
    Absent,
    /// Same layout: adopt the maps and keep counters and socket records.
    Compatible,
    /// Another layout (older or newer build): load new maps and swap the
    /// programs over atomically.
    Incompatible(String),
}

struct Expected {
    name: &'static str,
    map_type: MapType,
    key: usize,
    value: usize,
    entries: u32,
}

fn expected() -> [Expected; 13] {
    use MapType::*;
    let e = |name, map_type, key, value, entries| Expected { name, map_type, key, value, entries };
    let u32s = size_of::<u32>();
    [
        e(maps::VIPS4, HashOfMaps, size_of::<Vip4Key>(), u32s, MAX_VIPS),
        e(maps::VIPS6, HashOfMaps, size_of::<Vip6Key>(), u32s, MAX_VIPS),
        e(maps::TABLE_PROTO, Array, u32s, size_of::<ServiceTable>(), 1),
        e(maps::MARKS, Hash, size_of::<BackendKey>(), size_of::<PassiveMark>(), MAX_MARKS),
        e(maps::MARK_CLOCK, Array, u32s, size_of::<MarkClock>(), 1),
        e(maps::SOCKETS, SkStorage, size_of::<i32>(), size_of::<SockState>(), 0),
        e(maps::BACKEND_STATS, PerCpuArray, u32s, size_of::<BackendCounters>(), MAX_STATS),
        e(maps::SERVICE_STATS, PerCpuArray, u32s, size_of::<ServiceCounters>(), MAX_SERVICES),
        e(maps::DATAPATH_STATS, PerCpuArray, u32s, size_of::<DatapathCounters>(), 1),
        e(maps::CONFIG, Array, u32s, size_of::<DatapathConfig>(), 1),
        e(maps::EVENTS, RingBuf, 0, 0, EVENT_RING_BYTES),
        e(maps::TRACE_CTL, Array, u32s, size_of::<TraceControl>(), 1),
        e(maps::TRACE_EVENTS, RingBuf, 0, 0, TRACE_RING_BYTES),
    ]
}

/// Layout this build writes; `NLLB_LAYOUT_VERSION` overrides it so tests
/// can stand in for a build with another map format.
pub fn layout_version() -> u32 {
    std::env::var("NLLB_LAYOUT_VERSION").ok().and_then(|v| v.parse().ok()).unwrap_or(LAYOUT_VERSION)
}

pub fn inspect(pin_path: &Path) -> PinnedMaps {
    let all = expected();
    let present: Vec<&Expected> = all.iter().filter(|e| pin_path.join(e.name).exists()).collect();
    if present.is_empty() {
        return PinnedMaps::Absent;
    }
    if present.len() != all.len() {
        return PinnedMaps::Incompatible(format!("only {} of {} maps are pinned", present.len(), all.len()));
    }
    for e in &all {
        let info = match MapData::from_pin(pin_path.join(e.name)).and_then(|m| m.info()) {
            Ok(i) => i,
            Err(err) => return PinnedMaps::Incompatible(format!("{}: {err}", e.name)),
        };
        let same = info.map_type().ok() == Some(e.map_type)
            && info.key_size() as usize == e.key
            && info.value_size() as usize == e.value
            && info.max_entries() == e.entries;
        if !same {
            return PinnedMaps::Incompatible(format!(
                "{}: pinned key/value/entries {}/{}/{}, this build uses {}/{}/{}",
                e.name,
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                e.key,
                e.value,
                e.entries
            ));
        }
    }
    let version = MapData::from_pin(pin_path.join(maps::CONFIG))
        .ok()
        .and_then(|d| Array::<MapData, DatapathConfig>::try_from(Map::Array(d)).ok())
        .and_then(|a| a.get(&0, 0).ok())
        .map(|c| c.layout_version);
    match version {
        Some(v) if v == layout_version() => PinnedMaps::Compatible,
        Some(v) => {
            PinnedMaps::Incompatible(format!("pinned layout version {v}, this build writes {}", layout_version()))
        }
        None => PinnedMaps::Incompatible("cannot read the pinned config map".into()),
    }
}
