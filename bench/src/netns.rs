//! Running the system tools the benchmark drives (ip, nft, bpftool).
//! Hosts and cgroups come from the project's test harness (`nllb-tests`),
//! which leases subnets machine-wide so a benchmark and tests never collide.

use std::process::Command;

use anyhow::{Context, bail};

pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}: is it installed?"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
