//! The floor: nllb's own empty programs (`nllb_floor_connect4`,
//! `nllb_floor_sock_ops`, built into the same object the agent embeds),
//! attached to a cgroup of the benchmark's own. What they cost per connect
//! is what any program at these hooks costs: the call and, while
//! `kernel.bpf_stats_enabled` is on, the accounting's clock reads.

use std::path::Path;

use anyhow::Context;
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use nllb_common::programs::{FLOOR_CONNECT4, FLOOR_SOCK_OPS};

/// Loaded and attached; dropping it detaches both programs.
pub struct Floor {
    _ebpf: Ebpf,
}

impl Floor {
    pub fn attach(cgroup: &Path) -> anyhow::Result<Floor> {
        nllb::sys::raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .load(nllb::EBPF_OBJECT)
            .context("loading nllb's eBPF object")?;
        let cg =
            std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let p: &mut CgroupSockAddr = ebpf
            .program_mut(FLOOR_CONNECT4)
            .with_context(|| format!("no program {FLOOR_CONNECT4} in nllb's object"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("loading {FLOOR_CONNECT4}"))?;
        p.attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {FLOOR_CONNECT4}"))?;
        let p: &mut SockOps = ebpf
            .program_mut(FLOOR_SOCK_OPS)
            .with_context(|| format!("no program {FLOOR_SOCK_OPS} in nllb's object"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("loading {FLOOR_SOCK_OPS}"))?;
        p.attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {FLOOR_SOCK_OPS}"))?;
        Ok(Floor { _ebpf: ebpf })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use nllb_tests::{TestCgroup, privileged};

    use super::*;
    use crate::bpfstats;

    /// The floor is exactly the two empty programs, at the hooks nllb uses,
    /// and leaves the cgroup bare when dropped.
    #[test]
    fn attaches_both_empty_programs_and_detaches_on_drop() {
        if !privileged() {
            return;
        }
        let cg = TestCgroup::new();
        let floor = Floor::attach(cg.path()).expect("attaching the floor");
        let seen: BTreeSet<(String, String)> = bpfstats::attached(cg.path())
            .expect("bpftool cgroup show")
            .into_iter()
            .map(|p| (p.name, p.attach_type))
            .collect();
        let want: BTreeSet<(String, String)> = [
            (
                FLOOR_CONNECT4.to_string(),
                "cgroup_inet4_connect".to_string(),
            ),
            (FLOOR_SOCK_OPS.to_string(), "cgroup_sock_ops".to_string()),
        ]
        .into();
        assert_eq!(seen, want);
        drop(floor);
        assert_eq!(
            bpfstats::attached(cg.path())
                .expect("bpftool cgroup show")
                .len(),
            0
        );
    }
}
