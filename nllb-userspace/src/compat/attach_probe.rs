//! The decisive probe: load the real eBPF object and attach each program to
//! a throw-away child cgroup, the way the agent would.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use serde::Serialize;

/// One program of the real eBPF object, loaded and attached (or not).
#[derive(Clone, Debug, Serialize)]
pub struct ProgramProbe {
    pub program: &'static str,
    pub attached: bool,
    /// Attached through a bpf_link (what the agent pins).
    pub bpf_link: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AttachProbe {
    /// The temporary cgroup the programs were attached to (removed since).
    pub cgroup: PathBuf,
    /// The whole object failed to load (maps or BTF), before any program.
    pub load_error: Option<String>,
    pub programs: Vec<ProgramProbe>,
    /// Every loaded program came out JIT-compiled (false: some run in the
    /// interpreter); None when none loaded. See [`crate::platform`].
    pub jited: Option<bool>,
}

impl AttachProbe {
    pub fn attached(&self, program: &str) -> bool {
        self.programs.iter().any(|p| p.program == program && p.attached && p.bpf_link)
    }

    /// The agent's requirement: both rewrite hooks, through bpf_links.
    /// The agent's requirement: every required program, through bpf_links.
    pub fn rewrite_works(&self) -> bool {
        self.load_error.is_none()
            && crate::datapath::ebpf::PROGRAMS
                .iter()
                .filter(|(_, required)| *required)
                .all(|(name, _)| self.attached(name))
    }

    /// Every program the kernel did not attach through a bpf_link.
    pub fn refused(&self) -> Vec<&'static str> {
        self.programs.iter().filter(|p| !p.attached || !p.bpf_link).map(|p| p.program).collect()
    }

    /// A refusal that says the process lacks a privilege (without
    /// CAP_PERFMON the verifier treats the loader as unprivileged).
    pub fn privileges_short(&self) -> bool {
        self.programs.iter().filter_map(|p| p.error.as_deref()).any(|e| e.contains("prohibited for !root"))
    }

    /// The error that matters most: the object's, else a required
    /// program's, else an optional one's.
    pub fn first_error(&self) -> Option<String> {
        let required = |name: &str| crate::datapath::ebpf::PROGRAMS.iter().any(|(n, r)| *n == name && *r);
        let failed = |p: &&ProgramProbe| !p.attached || !p.bpf_link;
        self.load_error.clone().or_else(|| {
            let mut failing: Vec<&ProgramProbe> = self.programs.iter().filter(failed).collect();
            failing.sort_by_key(|p| !required(p.program));
            failing.first().map(|p| {
                format!("{}: {}", p.program, p.error.clone().unwrap_or_else(|| "attached without a bpf_link".into()))
            })
        })
    }
}

/// A uniquely named child cgroup, removed on drop.
struct ProbeCgroup(PathBuf);

impl ProbeCgroup {
    fn create(parent: &Path) -> io::Result<ProbeCgroup> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let p = parent.join(format!("nllb-probe-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&p)?;
        Ok(ProbeCgroup(p))
    }
}

impl Drop for ProbeCgroup {
    fn drop(&mut self) {
        // A cgroup directory is removed with rmdir, never recursively.
        if let Err(e) = fs::remove_dir(&self.0) {
            tracing::warn!(cgroup = %self.0.display(), error = %e, "could not remove the probe cgroup");
        }
    }
}

/// Load the real programs ([`crate::EBPF_OBJECT`]) and attach each to a
/// fresh child of `parent` (a cgroup v2 directory), then detach, unload and
/// remove the child. No process is in the child, so no connect anywhere is
/// affected. Where no child can be made, the probe attaches to `parent`
/// itself for a moment, with empty maps (no connect is rewritten).
pub fn probe_attach(parent: &Path) -> Result<AttachProbe, String> {
    use aya::{
        EbpfLoader,
        programs::links::FdLink,
    };

    if !crate::sys::is_cgroup2_dir(parent) {
        return Err(format!("{} is not a cgroup v2 directory", parent.display()));
    }
    // A read-only view of the cgroup tree (the DaemonSet mounts it so) has
    // no room for a child: probe on the target itself then. The probe's
    // maps are its own and empty, so its programs let every connect proceed.
    let cg = match ProbeCgroup::create(parent) {
        Ok(cg) => Some(cg),
        Err(e) => {
            tracing::debug!(cgroup = %parent.display(), error = %e, "no probe child cgroup; probing on the target");
            None
        }
    };
    let target = cg.as_ref().map(|c| c.0.clone()).unwrap_or_else(|| parent.to_path_buf());
    let mut report = AttachProbe { cgroup: target.clone(), load_error: None, programs: Vec::new(), jited: None };
    crate::sys::raise_memlock();
    let mut ebpf = match EbpfLoader::new().load(crate::EBPF_OBJECT) {
        Ok(e) => e,
        Err(e) => {
            report.load_error = Some(crate::errors::chain(&e));
            return Ok(report);
        }
    };
    let cgroup_fd = fs::File::open(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    // Links live until the end of this function: dropping them detaches.
    let mut links: Vec<FdLink> = Vec::new();
    // Each program the agent attaches, the way the agent loads and attaches it.
    for (name, _) in crate::datapath::ebpf::PROGRAMS {
        report.programs.push(match crate::datapath::ebpf::load_and_attach(&mut ebpf, name, &cgroup_fd) {
            Ok(link) => {
                links.push(link);
                ProgramProbe { program: name, attached: true, bpf_link: true, error: None }
            }
            Err(crate::datapath::DatapathError::Other(e)) if e.contains("no bpf_link") => {
                ProgramProbe { program: name, attached: true, bpf_link: false, error: Some(e) }
            }
            Err(e) => {
                ProgramProbe { program: name, attached: false, bpf_link: false, error: Some(crate::errors::chain(&e)) }
            }
        });
    }
    report.jited = crate::platform::programs_jited(&ebpf);
    drop(links);
    drop(ebpf);
    drop(cg);
    Ok(report)
}
