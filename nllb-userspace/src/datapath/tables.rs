//! The agent's record of what it published: which service has which id,
//! which counter slot each backend owns, and the table last swapped in. It
//! turns a `Plan` into service tables and hands them to `KernelMaps`.
//!
//! Ids are safe to reuse at once: a service's id and counter slots are freed
//! only after its virtual addresses were deleted, and each delete returns
//! after an RCU grace period (see `kernel.rs`), so no program still holds
//! them. Counter slots of a backend stay with it while the service exists,
//! also while it is ejected, so its counters survive health flaps; a slot is
//! only taken back when the service needs it for a backend it never had.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use nllb_common::{MAX_BACKENDS, MAX_SERVICES, MAX_STATS, ServiceTable, TABLE_FLAG_PANIC};

use super::{
    DatapathError,
    encoding::{backend_slot, slot_addr},
    kernel::{KernelMaps, PublishedService},
};
use crate::model::{BackendFacts, Plan, ServicePlan};

/// Counter slots a service keeps at most (both families): those of its
/// published backends and of backends it may publish again soon.
const STATS_PER_SERVICE: usize = MAX_BACKENDS as usize * 2;

#[derive(Debug, Clone)]
struct ServiceEntry {
    id: u32,
    listen: Vec<SocketAddr>,
    /// Counter slot of each backend, with the plan generation that last
    /// published it (for taking back the longest unused).
    stat_ids: HashMap<SocketAddr, (u32, u64)>,
    published: Option<ServiceTable>,
}

#[derive(Debug, Default)]
pub struct Tables {
    services: HashMap<String, ServiceEntry>,
    generation: u64,
}

impl Tables {
    pub fn apply(&mut self, kernel: &mut KernelMaps, plan: &Plan) -> Result<(), DatapathError> {
        self.generation += 1;
        let wanted: BTreeSet<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = self.services.keys().filter(|n| !wanted.contains(n.as_str())).cloned().collect();
        for name in gone {
            let entry = self.services.remove(&name).expect("listed above");
            // Its id and counter slots are free once this returned.
            kernel.unpublish(&entry.listen)?;
            tracing::info!(service = %name, "service removed from the datapath");
        }
        for sp in &plan.services {
            self.apply_service(kernel, sp, &plan.backends)?;
        }
        let published: BTreeSet<SocketAddr> = plan.services.iter().flat_map(|s| s.backends.iter().copied()).collect();
        kernel.retain_marks(&published);
        kernel.prune_table_pins();
        Ok(())
    }

    fn apply_service(
        &mut self,
        kernel: &mut KernelMaps,
        sp: &ServicePlan,
        facts: &BTreeMap<SocketAddr, BackendFacts>,
    ) -> Result<(), DatapathError> {
        if !self.services.contains_key(&sp.name) {
            let used: BTreeSet<u32> = self.services.values().map(|e| e.id).collect();
            let id = (0..MAX_SERVICES)
                .find(|i| !used.contains(i))
                .ok_or_else(|| DatapathError::Other(format!("more than {MAX_SERVICES} services")))?;
            kernel.zero_service_counters(id)?;
            self.services.insert(
                sp.name.clone(),
                ServiceEntry { id, listen: Vec::new(), stat_ids: HashMap::new(), published: None },
            );
        }
        let generation = self.generation;
        let mut used_stats: BTreeSet<u32> =
            self.services.values().flat_map(|e| e.stat_ids.values().map(|(id, _)| *id)).collect();
        let entry = self.services.get_mut(&sp.name).expect("inserted above");
        // Before any slot is taken back: backends in this plan are in use.
        for b in &sp.backends {
            if let Some((_, seen)) = entry.stat_ids.get_mut(b) {
                *seen = generation;
            }
        }
        let mut table =
            ServiceTable { svc_id: entry.id, flags: if sp.panic { TABLE_FLAG_PANIC } else { 0 }, ..Default::default() };
        for b in &sp.backends {
            let stat_id = stat_id(kernel, &mut used_stats, entry, *b, generation)?;
            let f = facts.get(b).cloned().unwrap_or_default();
            let mut slot = backend_slot(*b, stat_id);
            slot.syn_rto_ms = f.syn_timeout.map_or(0, |d| d.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
            slot.cleared_ns = f.recovered_at_ns;
            let (slots, count) = if b.is_ipv4() {
                (&mut table.backends4, &mut table.count4)
            } else {
                (&mut table.backends6, &mut table.count6)
            };
            // A weight is published as that many slots; a table holds at
            // most MAX_BACKENDS per family.
            for _ in 0..f.weight.max(1) {
                if *count >= MAX_BACKENDS {
                    break;
                }
                slots[*count as usize] = slot;
                *count += 1;
            }
        }
        for (fam, n) in [
            ("IPv4", sp.backends.iter().filter(|b| b.is_ipv4()).count()),
            ("IPv6", sp.backends.iter().filter(|b| b.is_ipv6()).count()),
        ] {
            if n > MAX_BACKENDS as usize {
                return Err(DatapathError::Other(format!(
                    "service {}: {n} {fam} backends, at most {MAX_BACKENDS} per address family",
                    sp.name
                )));
            }
        }
        let stale: Vec<SocketAddr> = entry.listen.iter().copied().filter(|l| !sp.listen.contains(l)).collect();
        if entry.published.as_ref() != Some(&table) || entry.listen != sp.listen {
            kernel.publish(&sp.listen, &table)?;
            entry.published = Some(table);
        }
        kernel.unpublish(&stale)?;
        entry.listen = sp.listen.clone();
        Ok(())
    }

    /// Rebuilds the record from what an earlier agent left in the kernel, so
    /// counters keep their slots and an unchanged plan publishes nothing.
    /// Services are matched to `plan` by their virtual addresses; tables
    /// matching no planned service get a name no config can use, so the next
    /// `apply` removes them.
    pub fn recover(kernel: &KernelMaps, plan: &Plan) -> Tables {
        let mut tables = Tables::default();
        for PublishedService { listen, table, .. } in kernel.services() {
            let planned = plan
                .services
                .iter()
                .find(|s| s.listen.iter().any(|l| listen.contains(l)) && !tables.services.contains_key(&s.name));
            let name = planned.map(|s| s.name.clone()).unwrap_or_else(|| format!("~stale-{}", table.svc_id));
            let slots = table
                .backends4
                .iter()
                .take(table.count4 as usize)
                .chain(table.backends6.iter().take(table.count6 as usize));
            let stat_ids = slots.map(|s| (slot_addr(s), (s.stat_id, 0))).collect();
            tables.services.insert(name, ServiceEntry { id: table.svc_id, listen, stat_ids, published: Some(table) });
        }
        tables
    }

    /// Service ids by name.
    pub fn ids(&self) -> BTreeMap<String, u32> {
        self.services.iter().map(|(n, e)| (n.clone(), e.id)).collect()
    }

    /// Counter slots of every backend of every service, by service name.
    pub fn stat_ids(&self) -> BTreeMap<String, BTreeMap<SocketAddr, u32>> {
        self.services
            .iter()
            .map(|(n, e)| (n.clone(), e.stat_ids.iter().map(|(a, (id, _))| (*a, *id)).collect()))
            .collect()
    }
}

/// The backend's counter slot in this service: its own, a free one from the
/// pool, or, when the service already holds as many as it may, the one it
/// published least recently (never one in the table being built).
fn stat_id(
    kernel: &mut KernelMaps,
    used: &mut BTreeSet<u32>,
    entry: &mut ServiceEntry,
    backend: SocketAddr,
    generation: u64,
) -> Result<u32, DatapathError> {
    if let Some((id, _)) = entry.stat_ids.get(&backend) {
        return Ok(*id);
    }
    let reuse = (entry.stat_ids.len() >= STATS_PER_SERVICE)
        .then(|| entry.stat_ids.iter().filter(|(_, (_, seen))| *seen < generation).min_by_key(|(_, (_, seen))| *seen))
        .flatten()
        .map(|(a, (id, _))| (*a, *id));
    let id = match reuse {
        Some((addr, id)) => {
            entry.stat_ids.remove(&addr);
            id
        }
        None => {
            let id = (0..MAX_STATS).find(|i| !used.contains(i)).ok_or_else(|| {
                DatapathError::Other(format!("more than {MAX_STATS} (service, backend) counters in use"))
            })?;
            used.insert(id);
            id
        }
    };
    kernel.zero_backend_counters(id)?;
    entry.stat_ids.insert(backend, (id, generation));
    Ok(id)
}
