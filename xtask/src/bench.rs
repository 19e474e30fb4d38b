//! `cargo xtask bench [--quick] [args]`: the side-by-side benchmark
//! (crate `bench/`), with the release agent built once and handed over.

use anyhow::Result;

use crate::paths::{cargo, target_dir};
use crate::{bpffs, cmd, setup};

pub fn bench(args: &[String]) -> Result<i32> {
    let tools = setup::setup()?;
    let _bpffs = bpffs::Restore::record();
    // One build for both binaries: the agent under test and the bench.
    cmd::run(tools.apply(&mut cargo()).args(["build", "--release", "-p", "nllb-userspace", "-p", "nllb-bench"]))?;
    let target = target_dir()?;
    let nllb = target.join("release/nllb");
    let mut c = std::process::Command::new(target.join("release/nllb-bench"));
    tools.apply(&mut c).env("NLLB_BIN", &nllb).arg("--envoy-bin").arg(&tools.envoy).args(args);
    println!("[bench] {}", cmd::display(&c));
    Ok(c.status()?.code().unwrap_or(1))
}
