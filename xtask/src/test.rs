//! `cargo xtask test`: set-up, build the agent binary, run every test.

use crate::paths::{cargo, target_dir};
use crate::{cmd, setup};
use anyhow::Result;

/// Returns the exit code of `cargo test` so CI sees the tests' verdict.
pub fn test(extra: &[String]) -> Result<i32> {
    let tools = setup::setup()?;
    // The end-to-end tests run the real binary. `cargo test` builds it in
    // the same run (nllb-userspace has integration tests), with the same
    // feature set as everything else: a separate `cargo build` would unify
    // features differently and compile half the workspace twice.
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
