//! `cargo xtask build [--target T,...]`: the release `nllb` binary for this
//! machine or, cross-compiled, for another CPU. The eBPF object inside it
//! is the same `bpfel` object either way (nllb-userspace/build.rs).

use crate::arch::{self, Arch};
use crate::paths::{cargo, target_dir};
use crate::{cmd, setup};
use anyhow::{Context as _, Result};
use std::path::PathBuf;
use std::process::Command;

pub fn build(targets: &[String]) -> Result<()> {
    let arches: Vec<&Arch> =
        if targets.is_empty() { vec![&arch::X86_64] } else { targets.iter().map(|t| arch::find(t)).collect::<Result<_>>()? };
    let tools = setup::setup()?;
    setup::cross(&arches)?;
    // One cargo run for every target: the host's build scripts and proc
    // macros are compiled once and both cores stay busy.
    let mut c = cargo();
    tools.apply(&mut c).args(["build", "--release", "--locked", "-p", "nllb-userspace", "--bin", "nllb"]);
    for a in &arches {
        a.apply_cross_env(&mut c).args(["--target", a.triple]);
    }
    println!("[build] {}", cmd::display(&c));
    let start = std::time::Instant::now();
    cmd::run(&mut c)?;
    println!("[build] took {:.0} s", start.elapsed().as_secs_f64());
    let target = target_dir()?;
    for a in arches {
        let bin = binary(&target, a, "release");
        let machine = elf_machine(&bin)?;
        let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
        println!("[build] {}: {} ({machine}, {:.1} MiB)", a.name, bin.display(), size as f64 / 1048576.0);
    }
    Ok(())
}

/// Where cargo puts a binary built with `--target <arch>`.
pub fn binary(target_dir: &std::path::Path, arch: &Arch, profile: &str) -> PathBuf {
    target_dir.join(arch.triple).join(profile).join("nllb")
}

/// The ELF header's machine (AArch64, ARM, RISC-V, X86-64), as proof of
/// what was built.
pub fn elf_machine(bin: &std::path::Path) -> Result<String> {
    let out = cmd::output(Command::new("readelf").arg("-h").arg(bin))?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Machine:"))
        .map(|m| m.trim().to_owned())
        .with_context(|| format!("readelf -h {} names no machine", bin.display()))
}
