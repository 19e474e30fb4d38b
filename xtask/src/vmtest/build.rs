//! Building what the guests run: `nllb`, the package binaries of
//! nllb-tests (the test client) and the chosen test binaries, for every
//! architecture asked for. Cross targets share one cargo run (the host's
//! build scripts and proc macros compile once, both cores stay busy); only
//! the test binaries that will run are compiled.

use super::Built;
use super::initramfs::TestBinary;
use crate::arch::Arch;
use crate::paths::{cargo, target_dir};
use crate::{cmd, setup};
use anyhow::{Context as _, Result};
use std::path::PathBuf;

const TEST_PACKAGE: &str = "nllb-tests";

pub fn build(tools: &setup::Tools, arches: &[&'static Arch], binaries: &[String], release_agent: bool) -> Result<Vec<Built>> {
    let all = binaries.iter().any(|b| b == "all");
    let tests = if all { Vec::new() } else { existing_tests(binaries)? };
    let mut built: Vec<Built> = Vec::new();
    // The host's build stays a plain one (no --target), so it shares
    // target/debug with `cargo xtask test`.
    let groups: Vec<Vec<&'static Arch>> = [
        arches.iter().copied().filter(|a| a.is_host()).collect::<Vec<_>>(),
        arches.iter().copied().filter(|a| !a.is_host()).collect(),
    ]
    .into_iter()
    .filter(|g| !g.is_empty())
    .collect();
    for group in groups {
        let mut c = cargo();
        tools.apply(&mut c).args(["build", "--message-format=json-render-diagnostics"]);
        c.args(["-p", "nllb-userspace", "-p", TEST_PACKAGE, "--bins"]);
        if all {
            c.arg("--tests");
        }
        for t in &tests {
            c.args(["--test", t]);
        }
        targets(&mut c, &group);
        super::say(&format!("building: {}", cmd::display(&c)));
        let start = std::time::Instant::now();
        let out = cmd::output(&mut c)?;
        super::say(&format!(
            "{}: built in {:.0} s",
            group.iter().map(|a| a.name).collect::<Vec<_>>().join(", "),
            start.elapsed().as_secs_f64()
        ));
        for a in &group {
            built.push(parse_artifacts(&out, a, &group)?);
        }
        if release_agent {
            let mut c = cargo();
            tools.apply(&mut c).args(["build", "-q", "--release", "-p", "nllb-userspace", "--bin", "nllb"]);
            targets(&mut c, &group);
            super::say(&format!("building the release agent: {}", cmd::display(&c)));
            cmd::run(&mut c)?;
            let target = target_dir()?;
            for b in built.iter_mut().filter(|b| group.contains(&b.arch)) {
                b.nllb = if b.arch.is_host() {
                    target.join("release/nllb")
                } else {
                    target.join(b.arch.triple).join("release/nllb")
                };
            }
        }
    }
    Ok(built)
}

fn targets(c: &mut std::process::Command, group: &[&'static Arch]) {
    if group.iter().any(|a| !a.is_host()) {
        // The initramfs strips debug info anyway; not generating it makes
        // the cold cross build (CI's) markedly shorter. The host build keeps
        // the dev profile it shares with `cargo xtask test`.
        c.env("CARGO_PROFILE_DEV_DEBUG", "false");
    }
    for a in group.iter().filter(|a| !a.is_host()) {
        a.apply_cross_env(c).args(["--target", a.triple]);
    }
}

/// The requested test binaries that nllb-tests has (the lead adds and
/// removes them; a name that is gone is reported, not fatal).
fn existing_tests(wanted: &[String]) -> Result<Vec<String>> {
    let out = cmd::output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let meta: serde_json::Value = serde_json::from_str(&out).context("parsing `cargo metadata` output")?;
    let have: Vec<String> = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == TEST_PACKAGE)
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test")))
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    let (present, missing): (Vec<String>, Vec<String>) = wanted.iter().cloned().partition(|w| have.contains(w));
    if !missing.is_empty() {
        super::say(&format!("no such test binary in {TEST_PACKAGE}, skipped: {} (it has: {})", missing.join(", "), have.join(", ")));
    }
    Ok(present)
}

/// This architecture's artifacts from cargo's JSON messages: a cross
/// target's files live under `target/<triple>/`, the host's do not.
fn parse_artifacts(out: &str, arch: &'static Arch, group: &[&'static Arch]) -> Result<Built> {
    let mine = |exe: &str| {
        if arch.is_host() {
            !group.iter().any(|a| !a.is_host() && exe.contains(&format!("/{}/", a.triple)))
        } else {
            exe.contains(&format!("/{}/", arch.triple))
        }
    };
    let mut tests = Vec::new();
    let mut bins = Vec::new();
    let mut nllb = None;
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str().filter(|e| mine(e)) else { continue };
        let name = msg["target"]["name"].as_str().context("artifact without target name")?;
        let package = msg["package_id"].as_str().unwrap_or_default();
        let kinds: Vec<&str> =
            msg["target"]["kind"].as_array().into_iter().flatten().filter_map(|k| k.as_str()).collect();
        if msg["profile"]["test"] == true {
            if !package.contains(TEST_PACKAGE) {
                continue;
            }
            // Integration tests keep their name; unit tests of a lib or bin
            // target get a suffix so they never shadow the bin itself.
            let name = match kinds.first() {
                Some(&"test") | None => name.to_owned(),
                Some(kind) => format!("{name}-{kind}-unittests"),
            };
            tests.push(TestBinary { name, path: exe.into() });
        } else if kinds.contains(&"bin") {
            if name == "nllb" {
                nllb = Some(PathBuf::from(exe));
            } else {
                bins.push(PathBuf::from(exe));
            }
        }
    }
    let nllb = nllb.with_context(|| format!("cargo built no `nllb` binary for {}", arch.triple))?;
    Ok(Built { arch, nllb, tests, bins })
}
