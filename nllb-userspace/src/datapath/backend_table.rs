//! Publishing service backend sets into the maps without a connect ever
//! seeing a half-written set.
//!
//! The scheme: every (service, address family) owns two banks of
//! `MAX_BACKENDS` slots in the `NLLB_BACKENDS` array, and one
//! `ServiceState { bank, count }` element in the `NLLB_SERVICES` hash map.
//! connect4/6 read the state once, then read only slots of the bank it
//! names. To publish a new set the agent
//!   1. writes the new slots into the bank that is *not* live,
//!   2. replaces the `ServiceState` element in one `bpf_map_update_elem`.
//! A hash-map update allocates a new element and swaps it in under RCU, so a
//! concurrent connect reads either the old state (old bank, untouched) or the
//! new one (new bank, fully written) — never a mix. Array slots are written
//! in place, which is why the live bank is never touched.
//!
//! The one remaining race is a connect that read the old state just before
//! the flip and is still reading its slots when the *next* publish rewrites
//! that bank. BPF programs run to completion in well under a microsecond
//! inside an RCU read section, so the agent waits `BANK_REUSE_GRACE` after a
//! flip before it writes that bank again, orders of magnitude longer.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use nllb_common::{
    FAM_IDX_V4, FAM_IDX_V6, MAX_BACKENDS, MAX_SERVICES, PassiveMark, SERVICE_FLAG_PANIC, ServiceState, VipValue,
    backend_index, maps, service_key,
};

use super::{
    DatapathError, ServiceCounters,
    encoding::{backend_key, backend_slot, vip4_key, vip6_key},
    pinned::Maps,
};
use crate::model::{Plan, ServicePlan};

pub const BANK_REUSE_GRACE: Duration = Duration::from_millis(20);
/// Connect counters reserved per service (both families).
const STATS_PER_SERVICE: u32 = MAX_BACKENDS * 2;

#[derive(Debug, Clone)]
struct FamilyState {
    bank: u32,
    generation: u32,
    published: Vec<SocketAddr>,
    panic: bool,
    flipped_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct ServiceEntry {
    id: u32,
    listen: Vec<SocketAddr>,
    families: [FamilyState; 2],
    /// Counter index of each backend this service ever published (kept while
    /// the backend stays in the service so counters survive health flaps).
    stat_ids: HashMap<SocketAddr, u32>,
}

/// The agent's record of what it published, and the id allocations.
#[derive(Debug, Default)]
pub struct Tables {
    services: HashMap<String, ServiceEntry>,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl Tables {
    pub fn apply(&mut self, maps: &mut Maps, plan: &Plan) -> Result<(), DatapathError> {
        let wanted: BTreeSet<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        // Removed services: virtual addresses first, so no connect finds a
        // VIP whose state is gone (it would be refused, not proceed).
        let gone: Vec<String> = self.services.keys().filter(|n| !wanted.contains(n.as_str())).cloned().collect();
        for name in gone {
            let entry = self.services.remove(&name).expect("listed above");
            remove_vips(maps, &entry.listen)?;
            for fam in [FAM_IDX_V4, FAM_IDX_V6] {
                match maps.services.remove(&service_key(entry.id, fam)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(maps::SERVICES)(e)),
                }
            }
            tracing::info!(service = %name, "service removed from the datapath");
        }
        for sp in &plan.services {
            self.apply_service(maps, sp)?;
        }
        self.sync_passive(maps)?;
        Ok(())
    }

    fn apply_service(&mut self, maps: &mut Maps, sp: &ServicePlan) -> Result<(), DatapathError> {
        if !self.services.contains_key(&sp.name) {
            let used: BTreeSet<u32> = self.services.values().map(|e| e.id).collect();
            let id = (0..MAX_SERVICES)
                .find(|i| !used.contains(i))
                .ok_or_else(|| DatapathError::Other(format!("more than {MAX_SERVICES} services")))?;
            let fresh = FamilyState { bank: 0, generation: 0, published: Vec::new(), panic: false, flipped_at: None };
            self.services.insert(
                sp.name.clone(),
                ServiceEntry { id, listen: Vec::new(), families: [fresh.clone(), fresh], stat_ids: HashMap::new() },
            );
            Maps::zero(&mut maps.no_backend, id)?;
        }
        let entry = self.services.get_mut(&sp.name).expect("inserted above");
        entry.stat_ids.retain(|addr, _| sp.backends.contains(addr));
        for (fam_idx, want_v4) in [(FAM_IDX_V4, true), (FAM_IDX_V6, false)] {
            let backends: Vec<SocketAddr> =
                sp.backends.iter().copied().filter(|b| b.is_ipv4() == want_v4).collect();
            if backends.len() > MAX_BACKENDS as usize {
                return Err(DatapathError::Other(format!(
                    "service {}: {} backends, at most {MAX_BACKENDS} per address family",
                    sp.name,
                    backends.len()
                )));
            }
            let fs = &entry.families[fam_idx as usize];
            if fs.published == backends && fs.panic == sp.panic && fs.flipped_at.is_some() {
                continue;
            }
            let mut slots = Vec::new();
            for b in &backends {
                let stat_id = match entry.stat_ids.get(b) {
                    Some(id) => *id,
                    None => {
                        let base = entry.id * STATS_PER_SERVICE;
                        let used: BTreeSet<u32> = entry.stat_ids.values().copied().collect();
                        let id = (base..base + STATS_PER_SERVICE).find(|i| !used.contains(i)).expect("fewer backends than counters");
                        Maps::zero(&mut maps.connect_stats, id)?;
                        entry.stat_ids.insert(*b, id);
                        id
                    }
                };
                slots.push(backend_slot(*b, stat_id));
            }
            let fs = &mut entry.families[fam_idx as usize];
            if let Some(at) = fs.flipped_at {
                let since = at.elapsed();
                if since < BANK_REUSE_GRACE {
                    std::thread::sleep(BANK_REUSE_GRACE - since);
                }
            }
            let next = if fs.flipped_at.is_some() { fs.bank ^ 1 } else { fs.bank };
            for (i, slot) in slots.iter().enumerate() {
                maps.backends
                    .set(backend_index(entry.id, fam_idx, next, i as u32), slot, 0)
                    .map_err(map_err(maps::BACKENDS))?;
            }
            let state = ServiceState {
                bank: next,
                count: slots.len() as u32,
                flags: if sp.panic { SERVICE_FLAG_PANIC } else { 0 },
                generation: fs.generation.wrapping_add(1),
            };
            maps.services.insert(service_key(entry.id, fam_idx), state, 0).map_err(map_err(maps::SERVICES))?;
            fs.bank = next;
            fs.generation = state.generation;
            fs.published = backends;
            fs.panic = sp.panic;
            fs.flipped_at = Some(Instant::now());
        }
        // New virtual addresses only now that the backends are live.
        let stale: Vec<SocketAddr> = entry.listen.iter().copied().filter(|l| !sp.listen.contains(l)).collect();
        remove_vips(maps, &stale)?;
        for l in &sp.listen {
            insert_vip(maps, *l, entry.id)?;
        }
        entry.listen = sp.listen.clone();
        Ok(())
    }

    /// sock_ops watches exactly the published backends: add entries for new
    /// ones (keeping marks of existing ones), drop the rest.
    fn sync_passive(&self, maps: &mut Maps) -> Result<(), DatapathError> {
        let published: BTreeSet<SocketAddr> = self
            .services
            .values()
            .flat_map(|e| e.families.iter().flat_map(|f| f.published.iter().copied()))
            .collect();
        let existing: Vec<_> = maps.passive.keys().filter_map(Result::ok).collect();
        for key in existing {
            let addr = super::encoding::key_addr(&key);
            if !published.contains(&addr) {
                let _ = maps.passive.remove(&key);
            }
        }
        for addr in published {
            const BPF_NOEXIST: u64 = 1;
            match maps.passive.insert(backend_key(addr), PassiveMark::default(), BPF_NOEXIST) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(map_err(maps::PASSIVE)(e)),
            }
        }
        Ok(())
    }

    /// Rebuild the record of what an earlier agent published into adopted
    /// maps, so the next publish writes the bank that is not live and
    /// counters keep their indices. Services are matched to `plan` by their
    /// virtual addresses; ids matching no planned service get a name no
    /// config can use, so the next `apply` removes them.
    pub fn recover(maps: &Maps, plan: &Plan) -> Tables {
        let mut listen_by_id: BTreeMap<u32, Vec<SocketAddr>> = BTreeMap::new();
        for (k, v) in maps.vips4.iter().filter_map(Result::ok) {
            listen_by_id.entry(v.svc_id).or_default().push(super::encoding::vip4_addr(&k));
        }
        for (k, v) in maps.vips6.iter().filter_map(Result::ok) {
            listen_by_id.entry(v.svc_id).or_default().push(super::encoding::vip6_addr(&k));
        }
        let mut tables = Tables::default();
        for (id, listen) in listen_by_id {
            let planned = plan
                .services
                .iter()
                .find(|s| s.listen.iter().any(|l| listen.contains(l)) && !tables.services.contains_key(&s.name));
            let name = planned.map(|s| s.name.clone()).unwrap_or_else(|| format!("~stale-{id}"));
            let mut stat_ids = HashMap::new();
            let families = [FAM_IDX_V4, FAM_IDX_V6].map(|fam| match maps.services.get(&service_key(id, fam), 0) {
                Ok(state) => {
                    let bank = state.bank & 1;
                    let published: Vec<SocketAddr> = (0..state.count.min(MAX_BACKENDS))
                        .filter_map(|slot| maps.backends.get(&backend_index(id, fam, bank, slot), 0).ok())
                        .map(|b| {
                            let addr = super::encoding::slot_addr(&b);
                            stat_ids.insert(addr, b.stat_id);
                            addr
                        })
                        .collect();
                    FamilyState {
                        bank,
                        generation: state.generation,
                        published,
                        panic: state.flags & SERVICE_FLAG_PANIC != 0,
                        flipped_at: Some(Instant::now()),
                    }
                }
                Err(_) => FamilyState { bank: 0, generation: 0, published: Vec::new(), panic: false, flipped_at: None },
            });
            tables.services.insert(name, ServiceEntry { id, listen, families, stat_ids });
        }
        tables
    }

    pub fn counters(&self, maps: &Maps) -> Vec<ServiceCounters> {
        let mut out: Vec<ServiceCounters> = self
            .services
            .iter()
            .map(|(name, e)| {
                let mut per_backend: Vec<(SocketAddr, u64)> =
                    e.stat_ids.iter().map(|(addr, id)| (*addr, Maps::sum(&maps.connect_stats, *id))).collect();
                per_backend.sort();
                ServiceCounters { name: name.clone(), per_backend, no_backend: Maps::sum(&maps.no_backend, e.id) }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Service ids by name, for the status file.
    pub fn ids(&self) -> HashMap<String, u32> {
        self.services.iter().map(|(n, e)| (n.clone(), e.id)).collect()
    }
}

fn insert_vip(maps: &mut Maps, addr: SocketAddr, svc_id: u32) -> Result<(), DatapathError> {
    let v = VipValue { svc_id };
    match addr {
        SocketAddr::V4(a) => maps.vips4.insert(vip4_key(*a.ip(), a.port()), v, 0).map_err(map_err(maps::VIPS4)),
        SocketAddr::V6(a) => maps.vips6.insert(vip6_key(*a.ip(), a.port()), v, 0).map_err(map_err(maps::VIPS6)),
    }
}

fn remove_vips(maps: &mut Maps, addrs: &[SocketAddr]) -> Result<(), DatapathError> {
    for addr in addrs {
        let r = match addr {
            SocketAddr::V4(a) => maps.vips4.remove(&vip4_key(*a.ip(), a.port())),
            SocketAddr::V6(a) => maps.vips6.remove(&vip6_key(*a.ip(), a.port())),
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::VIPS4)(e)),
        }
    }
    Ok(())
}
