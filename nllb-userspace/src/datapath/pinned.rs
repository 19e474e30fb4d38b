//! Typed handles on the datapath's maps, from a freshly loaded object or
//! from their pins (what `nllb status` and a restarted agent use).

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
};
use nllb_common::{
    BackendKey, BackendSlot, DatapathConfig, OrigDst, PassiveMark, ServiceState, Vip4Key, Vip6Key, VipValue, maps,
};

use super::DatapathError;

pub struct Maps {
    pub vips4: HashMap<MapData, Vip4Key, VipValue>,
    pub vips6: HashMap<MapData, Vip6Key, VipValue>,
    pub services: HashMap<MapData, u32, ServiceState>,
    pub backends: Array<MapData, BackendSlot>,
    pub connect_stats: PerCpuArray<MapData, u64>,
    pub no_backend: PerCpuArray<MapData, u64>,
    pub sockets: HashMap<MapData, u64, OrigDst>,
    pub passive: HashMap<MapData, BackendKey, PassiveMark>,
    pub config: Array<MapData, DatapathConfig>,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl Maps {
    /// Take the maps out of a loaded object (they stay pinned if they were).
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps, DatapathError> {
        Self::build(|name| {
            ebpf.take_map(name).ok_or_else(|| DatapathError::Other(format!("eBPF object has no map {name}")))
        })
    }

    /// Open the maps pinned under `pin_path`.
    pub fn open(pin_path: &Path) -> Result<Maps, DatapathError> {
        Self::build(|name| {
            let data = MapData::from_pin(pin_path.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    fn build(mut get: impl FnMut(&'static str) -> Result<Map, DatapathError>) -> Result<Maps, DatapathError> {
        Ok(Maps {
            vips4: HashMap::try_from(get(maps::VIPS4)?).map_err(map_err(maps::VIPS4))?,
            vips6: HashMap::try_from(get(maps::VIPS6)?).map_err(map_err(maps::VIPS6))?,
            services: HashMap::try_from(get(maps::SERVICES)?).map_err(map_err(maps::SERVICES))?,
            backends: Array::try_from(get(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?,
            connect_stats: PerCpuArray::try_from(get(maps::CONNECT_STATS)?).map_err(map_err(maps::CONNECT_STATS))?,
            no_backend: PerCpuArray::try_from(get(maps::NO_BACKEND_STATS)?).map_err(map_err(maps::NO_BACKEND_STATS))?,
            sockets: HashMap::try_from(get(maps::SOCKETS)?).map_err(map_err(maps::SOCKETS))?,
            passive: HashMap::try_from(get(maps::PASSIVE)?).map_err(map_err(maps::PASSIVE))?,
            config: Array::try_from(get(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?,
        })
    }

    /// Sum of a per-CPU counter.
    pub fn sum(counters: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
        counters.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Zero a per-CPU counter before its index is given to a new owner.
    pub fn zero(counters: &mut PerCpuArray<MapData, u64>, index: u32) -> Result<(), DatapathError> {
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Io(e))?;
        let values = aya::maps::PerCpuValues::try_from(vec![0u64; ncpu]).map_err(DatapathError::Io)?;
        counters.set(index, values, 0).map_err(map_err(maps::CONNECT_STATS))
    }
}
