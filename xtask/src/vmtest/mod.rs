//! `cargo xtask vm-test`: the kernel compatibility matrix. Boots real Debian
//! kernels under qemu and runs the datapath tests inside each guest.

mod initramfs;
mod kernels;
mod known;
mod qemu;
mod report;

use crate::paths::{cargo, target_dir};
use crate::{cmd, setup};
use anyhow::{Context as _, Result};
use initramfs::TestBinary;
use kernels::KernelSpec;
use report::KernelReport;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Whole-guest time limit (boot + all tests); NLLB_VM_TIMEOUT overrides (seconds).
const DEFAULT_TIMEOUT_SECS: u64 = 1800;

/// Returns the exit status: 0 when every test passed on every kernel.
pub fn vm_test(wanted: &[String], jobs: usize, filter: &str, binaries: &[String]) -> Result<i32> {
    let specs = kernels::select(wanted)?;
    let tools = setup::setup()?;
    let target = target_dir()?;
    let work = target.join("vm-test");
    std::fs::create_dir_all(&work)?;

    say("building nllb and the nllb-tests test binaries");
    cmd::run(tools.apply(&mut cargo()).args(["build", "-q", "-p", "nllb-userspace", "--bin", "nllb"]))?;
    let nllb = target.join("debug/nllb");
    let (mut tests, host_bins) = build_tests(&tools)?;
    if !binaries.iter().any(|b| b == "all") {
        tests.retain(|t| binaries.contains(&t.name));
    }
    say(&format!(
        "test binaries for the guest: {}",
        if tests.is_empty() { "none yet (smoke tests only)".into() } else { tests.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ") }
    ));
    let shared = initramfs::shared_archive(&work, &nllb, &tests, &host_bins, filter)?;
    let mirror = kernels::debian_mirror()?;
    let timeout = Duration::from_secs(
        std::env::var("NLLB_VM_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_TIMEOUT_SECS),
    );

    let known_path = crate::paths::workspace_root().join("xtask/vm-known-failures.txt");
    let known = known::KnownFailures::load(&known_path)?;

    let queue = Mutex::new(specs.iter().copied().enumerate().collect::<Vec<_>>());
    let reports: Mutex<Vec<(usize, KernelReport)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                loop {
                    let Some((i, spec)) = queue.lock().unwrap().pop() else { break };
                    let r = run_kernel(spec, &work, &shared, &mirror, timeout, &known);
                    say(&format!("{}: {}", spec.label, r.summary()));
                    reports.lock().unwrap().push((i, r));
                }
            });
        }
    });
    let mut reports = reports.into_inner().unwrap();
    reports.sort_by_key(|(i, _)| *i);
    let reports: Vec<KernelReport> = reports.into_iter().map(|(_, r)| r).collect();

    let json = target.join("vm-matrix.json");
    let md = crate::paths::workspace_root().join("docs/kernel-matrix.md");
    report::write(&reports, &json, &md, &crate::paths::workspace_root().join("README.md"))?;
    println!("\n{}", report::markdown_table(&reports));
    say(&format!("wrote {} and {}", json.display(), md.display()));
    let failed: Vec<&str> = reports.iter().filter(|r| !r.passed()).map(|r| r.label.as_str()).collect();
    let total = |status: &str| reports.iter().map(|r| r.count(status)).sum::<usize>();
    let known_count = total("known-failure");
    if known_count > 0 {
        say(&format!("{known_count} known failures, listed with reasons in {}", known_path.display()));
    }
    // A closing line CI's log reader understands.
    if total("flaky") > 0 {
        say(&format!("{} tests passed only on their retry (flaky under TCG?)", total("flaky")));
    }
    println!("vm-test: {} passed, {} failed", total("ok") + total("flaky"), total("FAILED"));
    if failed.is_empty() {
        Ok(0)
    } else {
        say(&format!("FAILED on: {} (console logs in {})", failed.join(", "), work.display()));
        Ok(1)
    }
}

fn say(msg: &str) {
    println!("[vm-test] {msg}");
}

fn run_kernel(
    spec: KernelSpec,
    work: &Path,
    shared: &Path,
    mirror: &str,
    timeout: Duration,
    known: &known::KnownFailures,
) -> KernelReport {
    let mut report = KernelReport::new(spec);
    let result = (|| -> Result<()> {
        say(&format!("{}: fetching the {} kernel", spec.label, spec.suite));
        let kernel = kernels::fetch(spec, mirror)?;
        report.package_version = Some(kernel.version.clone());
        report.release = Some(kernel.release.clone());
        let dir = work.join(spec.label);
        std::fs::create_dir_all(&dir)?;
        let initrd = initramfs::kernel_initrd(&dir, shared, spec.label, &kernel.modules)?;
        let console = dir.join("console.log");
        say(&format!("{}: booting {} ({}), console in {}", spec.label, kernel.release, kernel.version, console.display()));
        let run = qemu::boot(&kernel.vmlinuz, &initrd, &console, timeout)?;
        report.fill(run, known);
        Ok(())
    })();
    if let Err(e) = result {
        report.error = Some(format!("{e:#}"));
    }
    report
}

/// `cargo test -p nllb-tests --no-run`: the test executables, and the
/// package's binaries (tests reach them at their compiled-in paths).
fn build_tests(tools: &setup::Tools) -> Result<(Vec<TestBinary>, Vec<PathBuf>)> {
    let out = cmd::output(
        tools
            .apply(&mut cargo())
            .args(["test", "-p", "nllb-tests", "--no-run", "--message-format=json-render-diagnostics"]),
    )?;
    let mut tests = Vec::new();
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else { continue };
        let name = msg["target"]["name"].as_str().context("artifact without target name")?;
        let kinds: Vec<&str> =
            msg["target"]["kind"].as_array().into_iter().flatten().filter_map(|k| k.as_str()).collect();
        if msg["profile"]["test"] == true {
            // Integration tests keep their name; unit tests of a lib or bin
            // target get a suffix so they never shadow the bin itself.
            let name = match kinds.first() {
                Some(&"test") | None => name.to_owned(),
                Some(kind) => format!("{name}-{kind}-unittests"),
            };
            tests.push(TestBinary { name, path: exe.into() });
        } else if kinds.contains(&"bin") {
            bins.push(PathBuf::from(exe));
        }
    }
    Ok((tests, bins))
}
