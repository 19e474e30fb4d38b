//! `cargo xtask vm-test`: the kernel compatibility matrix. Boots real Debian
//! kernels under qemu and runs the datapath tests inside each guest, on
//! x86-64 or, cross-built, on arm64, armv7 and riscv64 (`--arch`).

mod apt;
mod build;
mod initramfs;
mod kernels;
mod known;
mod qemu;
mod report;
mod userland;

use crate::arch::{self, Arch};
use crate::setup;
use anyhow::Result;
use initramfs::GuestEnv;
use kernels::KernelSpec;
use report::KernelReport;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use userland::Userland;

/// Whole-guest time limit (boot + all tests); NLLB_VM_TIMEOUT overrides
/// (seconds). Scaled by the architecture's slowdown under TCG.
const DEFAULT_TIMEOUT_SECS: u64 = 1800;

pub struct Options<'a> {
    pub arches: &'a [String],
    pub kernels: &'a [String],
    pub jobs: usize,
    pub filter: &'a str,
    pub binaries: &'a [String],
    /// Build the agent (not the tests) in release mode, as deployed.
    pub release_agent: bool,
}

/// One architecture's guest image: what every kernel of it boots with.
struct ArchRun {
    arch: &'static Arch,
    work: PathBuf,
    shared: PathBuf,
    /// dev or release: which build of the agent the guests run.
    agent_profile: String,
}

/// Returns the exit status: 0 when every test passed on every kernel.
pub fn vm_test(o: &Options<'_>) -> Result<i32> {
    let arches: Vec<&'static Arch> = if o.arches.is_empty() {
        vec![&arch::X86_64]
    } else {
        let mut v = Vec::new();
        for a in o.arches {
            let a = arch::find(a)?;
            if !v.contains(&a) {
                v.push(a);
            }
        }
        v
    };
    // Every kernel is checked before anything is built.
    let mut jobs: Vec<(&'static Arch, KernelSpec)> = Vec::new();
    for a in &arches {
        for k in kernels::select(a, o.kernels)? {
            jobs.push((a, k));
        }
    }
    let tools = setup::setup()?;
    setup::cross(&arches)?;
    let target = crate::paths::target_dir()?;

    let started = Instant::now();
    let built = build::build(&tools, &arches, o.binaries, o.release_agent)?;
    say(&format!("built in {:.0} s", started.elapsed().as_secs_f64()));
    let mirror = kernels::debian_mirror()?;
    let mut runs = Vec::new();
    for a in &arches {
        let b = built.iter().find(|b| b.arch == *a).expect("every arch was built");
        say(&format!(
            "{}: test binaries for the guest: {}",
            a.name,
            if b.tests.is_empty() { "none (smoke tests only)".into() } else { b.tests.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ") }
        ));
        let userland = Userland::for_arch(a, &mirror)?;
        say(&format!("{}: guest userland: {}", a.name, userland.describe()));
        let work = if a.is_host() { target.join("vm-test") } else { target.join("vm-test").join(a.name) };
        std::fs::create_dir_all(&work)?;
        let guest = GuestEnv { arch: a.name, slowdown: a.qemu.slowdown };
        let shared = initramfs::shared_archive(&work, &userland, &guest, &b.nllb, &b.tests, &b.bins, o.filter)?;
        runs.push(ArchRun { arch: a, work, shared, agent_profile: if o.release_agent { "release" } else { "dev" }.into() });
    }
    let base_timeout =
        std::env::var("NLLB_VM_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_TIMEOUT_SECS);

    let known_path = crate::paths::workspace_root().join("xtask/vm-known-failures.txt");
    let known = known::KnownFailures::load(&known_path)?;

    // Longest first (slow architectures, then slow kernels), so parallel
    // guests finish close together.
    let mut queue: Vec<(usize, &'static Arch, KernelSpec)> =
        jobs.iter().copied().enumerate().map(|(i, (a, k))| (i, a, k)).collect();
    queue.sort_by_key(|(i, a, k)| (a.qemu.slowdown, k.guest_seconds, *i));
    let queue = Mutex::new(queue);
    let reports: Mutex<Vec<(usize, KernelReport)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..o.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let Some((i, a, spec)) = queue.lock().unwrap().pop() else { break };
                    let run = runs.iter().find(|r| r.arch == a).expect("every arch has an image");
                    let timeout = Duration::from_secs(base_timeout * u64::from(a.qemu.slowdown));
                    let r = run_kernel(run, spec, &mirror, timeout, &known);
                    say(&format!("{}: {}", r.key(), r.summary()));
                    reports.lock().unwrap().push((i, r));
                }
            });
        }
    });
    let mut reports = reports.into_inner().unwrap();
    reports.sort_by_key(|(i, _)| *i);
    let reports: Vec<KernelReport> = reports.into_iter().map(|(_, r)| r).collect();

    let root = crate::paths::workspace_root();
    for a in &arches {
        let mine: Vec<&KernelReport> = reports.iter().filter(|r| r.arch == a.name).collect();
        let (json, md) = if a.is_host() {
            (target.join("vm-matrix.json"), root.join("docs/kernel-matrix.md"))
        } else {
            (target.join(format!("vm-matrix-{}.json", a.name)), root.join(format!("docs/kernel-matrix-{}.md", a.name)))
        };
        report::write(a, &mine, &json, &md, &root.join("README.md"))?;
        println!("\n{}", report::markdown_table(&mine));
        say(&format!("wrote {} and {}", json.display(), md.display()));
    }
    let failed: Vec<String> = reports.iter().filter(|r| !r.passed()).map(|r| r.key()).collect();
    let total = |status: &str| reports.iter().map(|r| r.count(status)).sum::<usize>();
    let known_count = total("known-failure");
    if known_count > 0 {
        say(&format!("{known_count} known failures, listed with reasons in {}", known_path.display()));
    }
    if total("flaky") > 0 {
        say(&format!("{} tests passed only on their retry (flaky under TCG?)", total("flaky")));
    }
    for r in &reports {
        say(&format!("{}: guest {}", r.key(), r.seconds.map(|s| format!("{s:.0} s")).unwrap_or_else(|| "—".into())));
    }
    say(&format!("total {:.0} s", started.elapsed().as_secs_f64()));
    // A closing line CI's log reader understands.
    println!("vm-test: {} passed, {} failed", total("ok") + total("flaky"), total("FAILED"));
    if failed.is_empty() {
        Ok(0)
    } else {
        let dirs: Vec<String> = runs.iter().map(|r| r.work.display().to_string()).collect();
        say(&format!("FAILED on: {} (console logs under {})", failed.join(", "), dirs.join(", ")));
        Ok(1)
    }
}

fn say(msg: &str) {
    println!("[vm-test] {msg}");
}

fn run_kernel(
    run: &ArchRun,
    spec: KernelSpec,
    mirror: &str,
    timeout: Duration,
    known: &known::KnownFailures,
) -> KernelReport {
    let mut report = KernelReport::new(run.arch, spec, &run.agent_profile);
    let key = report.key();
    let result = (|| -> Result<()> {
        say(&format!("{key}: fetching the {} {} kernel", spec.suite, run.arch.kernel_flavour));
        let kernel = kernels::fetch(spec, run.arch, mirror)?;
        report.package_version = Some(kernel.version.clone());
        report.release = Some(kernel.release.clone());
        let dir = run.work.join(spec.label);
        std::fs::create_dir_all(&dir)?;
        let initrd = initramfs::kernel_initrd(&dir, &run.shared, spec.label, &kernel)?;
        let console = dir.join("console.log");
        say(&format!("{key}: booting {} ({}), console in {}", kernel.release, kernel.version, console.display()));
        let guest = qemu::boot(run.arch, &kernel.vmlinuz, &initrd, &console, timeout)?;
        report.fill(guest, known);
        Ok(())
    })();
    if let Err(e) = result {
        report.error = Some(format!("{e:#}"));
    }
    report
}

/// Where one architecture's binaries ended up.
pub struct Built {
    pub arch: &'static Arch,
    pub nllb: PathBuf,
    pub tests: Vec<initramfs::TestBinary>,
    pub bins: Vec<PathBuf>,
}

