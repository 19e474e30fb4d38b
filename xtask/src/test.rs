//! `cargo xtask test`: set-up, build the agent binary, run every test.

use crate::paths::{cargo, target_dir};
use crate::{cmd, setup};
use anyhow::Result;

/// Returns the exit code of `cargo test` so CI sees the tests' verdict.
pub fn test(extra: &[String]) -> Result<i32> {
    let tools = setup::setup()?;
    // The end-to-end tests run the real binary; build it first so they never
    // test a stale one.
    cmd::run(tools.apply(&mut cargo()).args(["build", "-p", "nllb-userspace", "--bin", "nllb"]))?;
    let nllb = target_dir()?.join("debug/nllb");
    println!("[test] NLLB_BIN={}", nllb.display());
    let mut c = cargo();
    tools.apply(&mut c).env("NLLB_BIN", &nllb).arg("test");
    // nllb-ebpf only builds for the BPF target (through nllb-userspace's build
    // script); a package picked by the caller replaces the whole-workspace run.
    let picks_package = extra.iter().take_while(|a| *a != "--").any(|a| a == "-p" || a.starts_with("--package"));
    if !picks_package {
        c.args(["--workspace", "--exclude", "nllb-ebpf"]);
    }
    if !extra.is_empty() {
        c.args(extra);
    }
    println!("[test] {}", cmd::display(&c));
    let status = c.status()?;
    Ok(status.code().unwrap_or(1))
}
