//! Measurements that must happen in a process of their own (it joins a
//! cgroup, pins itself to a core) run as a hidden subcommand of this binary:
//! the spec goes in as JSON, the result comes back as JSON on stdout.

use std::process::Command;

use anyhow::{Context, bail};
use serde::{Serialize, de::DeserializeOwned};

pub fn run<S: Serialize, R: DeserializeOwned>(subcommand: &str, spec: &S) -> anyhow::Result<R> {
    let out = Command::new(std::env::current_exe()?)
        .arg(subcommand)
        .arg("--spec")
        .arg(serde_json::to_string(spec)?)
        .output()?;
    if !out.status.success() {
        bail!(
            "{subcommand} child exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the {subcommand} child's output"))
}
