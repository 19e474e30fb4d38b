//! The kernel's side of the datapath, in domain terms. This is the one
//! module that knows the maps' layout (`nllb-common`): the agent publishes
//! and reads services, marks, sockets and counters through it, and so does
//! `nllb status` (from the pins).
//!
//! Publishing a service never edits what a connect may be reading. Each
//! virtual address maps (HASH_OF_MAPS) to a one-element array holding the
//! service's whole table; a publish creates a new array, fills it, and swaps
//! it into every virtual address of the service. The update syscall on a
//! map-of-maps returns only after an RCU grace period
//! (`maybe_wait_bpf_programs`), so once it returned no program still holds
//! the old table. The agent keeps its own reference to the old tables until
//! the last swap returned: kernels before 6.8 free an inner map whose last
//! reference the swap dropped without waiting for that grace period.
//!
//! Each published table is also pinned as `<pin path>/tables/<map id>`:
//! opening a map by id needs CAP_SYS_ADMIN, which neither the agent nor
//! `nllb status` has with the documented capabilities, while a pin needs
//! only access to the file. Pins of tables no address leads to any more are
//! pruned after every apply.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    fs,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, HashOfMaps, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues},
};
use nllb_common::{
    BackendCounters, BackendKey, DatapathConfig, DatapathCounters, PassiveMark, ServiceCounters, ServiceTable,
    TraceControl, Vip4Key, Vip6Key, maps,
};

use super::{
    DatapathError, bpf_sys,
    encoding::{backend_key, key_addr, vip4_addr, vip4_key, vip6_addr, vip6_key},
};

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn not_found(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound)
}

/// One service as the kernel serves it: its table and the virtual
/// addresses that lead to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedService {
    pub listen: Vec<SocketAddr>,
    pub table: ServiceTable,
    /// Id of the table map (a new one for every publish).
    pub table_id: u32,
}

/// A service table map: one element, swapped whole.
type TableMap = Array<MapData, ServiceTable>;

pub struct KernelMaps {
    vips4: HashOfMaps<MapData, Vip4Key, TableMap>,
    vips6: HashOfMaps<MapData, Vip6Key, TableMap>,
    table_shape: bpf_sys::MapShape,
    marks: HashMap<MapData, BackendKey, PassiveMark>,
    /// `NLLB_SOCKETS`, socket-local storage: readable only through the
    /// sockets themselves (sock_diag). Held, not just its fd duplicated: the
    /// programs still to be loaded were relocated against this very fd.
    sockets: MapData,
    backend_stats: PerCpuArray<MapData, BackendCounters>,
    service_stats: PerCpuArray<MapData, ServiceCounters>,
    datapath_stats: PerCpuArray<MapData, DatapathCounters>,
    config: Array<MapData, DatapathConfig>,
    trace_ctl: Array<MapData, TraceControl>,
    /// The outer maps' own fds, to read table ids (`HashOfMaps` keeps its fd
    /// private).
    vips4_fd: OwnedFd,
    vips6_fd: OwnedFd,
    tables_dir: PathBuf,
}

/// Where the tables of the maps pinned at `pin_path` are pinned.
pub fn tables_dir(pin_path: &Path) -> PathBuf {
    pin_path.join(TABLES_DIR)
}

pub const TABLES_DIR: &str = "tables";

impl KernelMaps {
    /// Takes the maps out of a freshly loaded object (they stay pinned if
    /// they were); the event rings stay in the object for their readers.
    pub fn take(ebpf: &mut Ebpf, pin_path: &Path) -> Result<KernelMaps, DatapathError> {
        Self::build(pin_path, |name| {
            ebpf.take_map(name).ok_or_else(|| DatapathError::Other(format!("eBPF object has no map {name}")))
        })
    }

    /// Opens the maps pinned under `pin_path`.
    pub fn open(pin_path: &Path) -> Result<KernelMaps, DatapathError> {
        Self::build(pin_path, |name| open_pinned(pin_path, name))
    }

    fn build(
        pin_path: &Path,
        mut get: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<KernelMaps, DatapathError> {
        let proto = match get(maps::TABLE_PROTO)? {
            Map::Array(data) => data,
            _ => {
                return Err(DatapathError::Other(format!("{} is not an array", maps::TABLE_PROTO)));
            }
        };
        let table_shape = bpf_sys::map_shape(proto.fd().as_fd())
            .map_err(|e| DatapathError::Other(format!("reading {}: {e}", maps::TABLE_PROTO)))?;
        let (vips4, vips6) = (get(maps::VIPS4)?, get(maps::VIPS6)?);
        let own_fd = |m: &Map, name: &str| match m {
            Map::HashOfMaps(data) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| DatapathError::Other(format!("duplicating the fd of {name}: {e}"))),
            _ => Err(DatapathError::Other(format!("{name} is not a hash of maps"))),
        };
        let (vips4_fd, vips6_fd) = (own_fd(&vips4, maps::VIPS4)?, own_fd(&vips6, maps::VIPS6)?);
        Ok(KernelMaps {
            vips4: HashOfMaps::try_from(vips4).map_err(map_err(maps::VIPS4))?,
            vips6: HashOfMaps::try_from(vips6).map_err(map_err(maps::VIPS6))?,
            vips4_fd,
            vips6_fd,
            tables_dir: tables_dir(pin_path),
            table_shape,
            marks: HashMap::try_from(get(maps::MARKS)?).map_err(map_err(maps::MARKS))?,
            sockets: match get(maps::SOCKETS)? {
                Map::SkStorage(data) => data,
                _ => return Err(DatapathError::Other(format!("{} is not socket storage", maps::SOCKETS))),
            },
            backend_stats: PerCpuArray::try_from(get(maps::BACKEND_STATS)?).map_err(map_err(maps::BACKEND_STATS))?,
            service_stats: PerCpuArray::try_from(get(maps::SERVICE_STATS)?).map_err(map_err(maps::SERVICE_STATS))?,
            datapath_stats: PerCpuArray::try_from(get(maps::DATAPATH_STATS)?).map_err(map_err(maps::DATAPATH_STATS))?,
            config: Array::try_from(get(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?,
            trace_ctl: Array::try_from(get(maps::TRACE_CTL)?).map_err(map_err(maps::TRACE_CTL))?,
        })
    }

    /// Makes every address in `listen` lead to `table`: a new table map,
    /// filled, then swapped into each virtual address.
    pub fn publish(&mut self, listen: &[SocketAddr], table: &ServiceTable) -> Result<(), DatapathError> {
        let fd = bpf_sys::create_map_like(&self.table_shape, "nllb_table")
            .map_err(|e| DatapathError::Other(format!("creating a service table map: {e}")))?;
        let data = MapData::from_fd(fd).map_err(map_err("nllb_table"))?;
        let mut new: TableMap = Array::try_from(Map::Array(data)).map_err(map_err("nllb_table"))?;
        new.set(0, table, 0).map_err(map_err("nllb_table"))?;
        let id = new.map().info().map_err(map_err("nllb_table"))?.id();
        fs::create_dir_all(&self.tables_dir)
            .and_then(|()| fs::set_permissions(&self.tables_dir, fs::Permissions::from_mode(0o700)))
            .and_then(|()| new.map().pin(self.tables_dir.join(id.to_string())).map_err(std::io::Error::other))
            .map_err(|e| DatapathError::Other(format!("pinning a service table in {}: {e}", self.tables_dir.display())))?;
        // Held until every swap below returned (see the module comment).
        let mut old: Vec<TableMap> = Vec::new();
        for addr in listen {
            match addr {
                SocketAddr::V4(a) => {
                    let key = vip4_key(*a.ip(), a.port());
                    if let Ok(prev) = self.vips4.get(&key, 0) {
                        old.push(prev);
                    }
                    self.vips4.insert(key, &new, 0).map_err(map_err(maps::VIPS4))?;
                }
                SocketAddr::V6(a) => {
                    let key = vip6_key(*a.ip(), a.port());
                    if let Ok(prev) = self.vips6.get(&key, 0) {
                        old.push(prev);
                    }
                    self.vips6.insert(key, &new, 0).map_err(map_err(maps::VIPS6))?;
                }
            }
        }
        drop(old);
        Ok(())
    }

    /// Removes virtual addresses. Each delete waits for a grace period too,
    /// so when this returns no program still holds a table reached through
    /// them (and their counter ids may be given to another service).
    pub fn unpublish(&mut self, listen: &[SocketAddr]) -> Result<(), DatapathError> {
        for addr in listen {
            let r = match addr {
                SocketAddr::V4(a) => self.vips4.remove(&vip4_key(*a.ip(), a.port())).map_err(|e| (maps::VIPS4, e)),
                SocketAddr::V6(a) => self.vips6.remove(&vip6_key(*a.ip(), a.port())).map_err(|e| (maps::VIPS6, e)),
            };
            match r {
                Ok(()) => {}
                Err((_, e)) if not_found(&e) => {}
                Err((name, e)) => return Err(map_err(name)(e)),
            }
        }
        Ok(())
    }

    /// Every service the kernel serves, grouped by table (all virtual
    /// addresses of one service share it).
    pub fn services(&self) -> Vec<PublishedService> {
        let mut by_table: BTreeMap<u32, PublishedService> = BTreeMap::new();
        for (listen, id) in self.table_ids() {
            if let Some(entry) = by_table.get_mut(&id) {
                entry.listen.push(listen);
                continue;
            }
            match self.open_table(id) {
                Ok(inner) => {
                    let table = inner.get(&0, 0).unwrap_or_default();
                    by_table.insert(id, PublishedService { listen: vec![listen], table, table_id: id });
                }
                Err(e) => tracing::warn!(%listen, table = id, error = %e, "cannot read a service table"),
            }
        }
        let mut out: Vec<PublishedService> = by_table.into_values().collect();
        for s in &mut out {
            s.listen.sort();
        }
        out.sort_by_key(|s| s.table.svc_id);
        out
    }

    /// Each virtual address with the id of the table it leads to.
    fn table_ids(&self) -> Vec<(SocketAddr, u32)> {
        let v4 = self.vips4.keys().filter_map(Result::ok).filter_map(|k| {
            bpf_sys::inner_map_id(self.vips4_fd.as_fd(), &k).ok().map(|id| (vip4_addr(&k), id))
        });
        let v6 = self.vips6.keys().filter_map(Result::ok).filter_map(|k| {
            bpf_sys::inner_map_id(self.vips6_fd.as_fd(), &k).ok().map(|id| (vip6_addr(&k), id))
        });
        v4.chain(v6).collect()
    }

    /// A table by its pin, else by id (an agent that predates the pins;
    /// needs CAP_SYS_ADMIN).
    fn open_table(&self, id: u32) -> Result<TableMap, String> {
        let pin = self.tables_dir.join(id.to_string());
        let data = match MapData::from_pin(&pin) {
            Ok(data) => data,
            Err(by_pin) => MapData::from_id(id).map_err(|by_id| {
                format!("no pin {} ({by_pin}) and opening it by id failed ({by_id}; needs CAP_SYS_ADMIN)", pin.display())
            })?,
        };
        Array::try_from(Map::Array(data)).map_err(|e| e.to_string())
    }

    /// Removes the pins of tables no virtual address leads to any more.
    pub fn prune_table_pins(&self) {
        let live: BTreeSet<String> = self.table_ids().into_iter().map(|(_, id)| id.to_string()).collect();
        let Ok(entries) = fs::read_dir(&self.tables_dir) else { return };
        for entry in entries.flatten() {
            if !live.contains(entry.file_name().to_string_lossy().as_ref())
                && let Err(e) = fs::remove_file(entry.path())
            {
                tracing::warn!(pin = %entry.path().display(), error = %e, "stale table pin not removed");
            }
        }
    }

    /// Backends the kernel holds a passive mark for.
    pub fn marks(&self) -> Vec<(SocketAddr, PassiveMark)> {
        self.marks.iter().filter_map(Result::ok).map(|(k, m)| (key_addr(&k), m)).collect()
    }

    /// Forgets the marks of backends no longer published.
    pub fn retain_marks(&mut self, published: &BTreeSet<SocketAddr>) {
        let stale: Vec<BackendKey> =
            self.marks.keys().filter_map(Result::ok).filter(|k| !published.contains(&key_addr(k))).collect();
        for key in stale {
            let _ = self.marks.remove(&key);
        }
    }

    /// `NLLB_SOCKETS` for the socket reaper's thread (its own fd).
    pub fn sockets_handle(&self) -> Result<SocketTable, DatapathError> {
        Ok(SocketTable { map: self.sockets.fd().as_fd().try_clone_to_owned().map_err(DatapathError::Io)? })
    }

    pub fn backend_counters(&self, stat_id: u32) -> BackendCounters {
        sum(&self.backend_stats, stat_id, |a: &mut BackendCounters, b| {
            a.connects += b.connects;
            a.refused += b.refused;
            a.syn_timeouts += b.syn_timeouts;
            a.established += b.established;
        })
    }

    pub fn service_counters(&self, svc_id: u32) -> ServiceCounters {
        sum(&self.service_stats, svc_id, |a: &mut ServiceCounters, b| {
            a.no_backend += b.no_backend;
            a.all_marked += b.all_marked;
        })
    }

    pub fn datapath_counters(&self) -> DatapathCounters {
        sum(&self.datapath_stats, 0, |a: &mut DatapathCounters, b| {
            a.sockets_full += b.sockets_full;
            a.events_lost += b.events_lost;
            a.marks_full += b.marks_full;
            a.syncnt_refused += b.syncnt_refused;
        })
    }

    /// Zeroes a counter slot before its index is given to a new owner.
    pub fn zero_backend_counters(&mut self, stat_id: u32) -> Result<(), DatapathError> {
        zero(&mut self.backend_stats, stat_id, maps::BACKEND_STATS)
    }

    pub fn zero_service_counters(&mut self, svc_id: u32) -> Result<(), DatapathError> {
        zero(&mut self.service_stats, svc_id, maps::SERVICE_STATS)
    }

    pub fn config(&self) -> Option<DatapathConfig> {
        self.config.get(&0, 0).ok()
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<(), DatapathError> {
        self.config.set(0, config, 0).map_err(map_err(maps::CONFIG))
    }

    /// Emits trace events until `until_ns` (CLOCK_MONOTONIC); 0 stops them.
    pub fn set_trace_until(&mut self, until_ns: u64) -> Result<(), DatapathError> {
        self.trace_ctl.set(0, TraceControl { until_ns }, 0).map_err(map_err(maps::TRACE_CTL))
    }

    /// Until when (CLOCK_MONOTONIC ns) the programs emit trace events; 0: off.
    pub fn trace_until(&self) -> u64 {
        self.trace_ctl.get(&0, 0).map_or(0, |c| c.until_ns)
    }
}

/// `NLLB_SOCKETS`: sock_diag reports each socket's value when the dump
/// request names this map's fd.
pub struct SocketTable {
    map: OwnedFd,
}

impl SocketTable {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.map.as_fd()
    }
}

/// A mark's key for a backend address; for callers outside this module.
pub fn mark_key(addr: SocketAddr) -> BackendKey {
    backend_key(addr)
}

fn open_pinned(pin_path: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let data = MapData::from_pin(pin_path.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

fn sum<T: aya::Pod + Default>(map: &PerCpuArray<MapData, T>, index: u32, add: impl Fn(&mut T, &T)) -> T {
    let mut total = T::default();
    if let Ok(values) = map.get(&index, 0) {
        for v in values.iter() {
            add(&mut total, v);
        }
    }
    total
}

fn zero<T: aya::Pod + Default + Clone>(
    map: &mut PerCpuArray<MapData, T>,
    index: u32,
    name: &'static str,
) -> Result<(), DatapathError> {
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Io(e))?;
    let values = PerCpuValues::try_from(vec![T::default(); ncpu]).map_err(DatapathError::Io)?;
    map.set(index, values, 0).map_err(map_err(name))
}
