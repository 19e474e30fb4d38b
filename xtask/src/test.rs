//! `cargo xtask test`: set-up, build the agent binary, run every test.

use crate::paths::{cargo, target_dir};
use crate::{bpffs, cmd, kube, setup};
use anyhow::Result;

/// Returns the exit code of `cargo test` so CI sees the tests' verdict.
pub fn test(extra: &[String]) -> Result<i32> {
    let tools = setup::setup()?;
    let _bpffs = bpffs::Restore::record();
    // The end-to-end tests run the real binary. `cargo test` builds it in
    // the same run (nllb-userspace has integration tests), with the same
    // feature set as everything else: a separate `cargo build` would unify
    // features differently and compile half the workspace twice.
    let nllb = target_dir()?.join("debug/nllb");
    println!("[test] NLLB_BIN={}", nllb.display());
    let mut c = cargo();
    tools.apply(&mut c).env("NLLB_BIN", &nllb).arg("test");
    // The tests against a real control plane need kube-apiserver and etcd:
    // built here (once) rather than skipped, so CI always runs them.
    if runs_kube_tests(extra) {
        let dir = kube::binaries()?;
        println!("[test] NLLB_KUBE_BIN_DIR={}", dir.display());
        c.env("NLLB_KUBE_BIN_DIR", &dir);
    }
    // nllb-ebpf only builds for the BPF target (through nllb-userspace's build
    // script); a package picked by the caller replaces the whole-workspace run.
    let picks_package = extra.iter().take_while(|a| *a != "--").any(|a| a == "-p" || a.starts_with("--package"));
    if !picks_package {
        c.args(["--workspace", "--exclude", "nllb-ebpf"]);
    }
    if !extra.is_empty() {
        c.args(extra);
    }
    // `cargo test` builds a package's binaries only for its own integration
    // tests: picking nllb-tests alone would run whatever agent binary an
    // earlier build left, without the change under test. Built first, with
    // both packages picked so the features are the ones of the test run.
    if misses_agent_build(extra) {
        let mut b = cargo();
        tools.apply(&mut b).args(["test", "--no-run", "-p", "nllb-userspace", "-p", "nllb-tests", "--test", "cli"]);
        println!("[test] {}", cmd::display(&b));
        let built = b.status()?;
        if !built.success() {
            return Ok(built.code().unwrap_or(1));
        }
    }
    println!("[test] {}", cmd::display(&c));
    let status = c.status()?;
    Ok(status.code().unwrap_or(1))
}

/// The values of a cargo flag (`--test X`, `--test=X`) before any `--`.
fn values<'a>(extra: &'a [String], flag: &str) -> Vec<&'a str> {
    let args: Vec<&str> = extra.iter().map(String::as_str).take_while(|a| *a != "--").collect();
    let long = format!("{flag}=");
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if *a == flag {
            out.extend(args.get(i + 1).copied());
        } else if let Some(v) = a.strip_prefix(&long) {
            out.push(v);
        }
    }
    out
}

/// The packages the cargo arguments pick (none: the whole workspace).
fn packages(extra: &[String]) -> Vec<&str> {
    let mut packages = values(extra, "-p");
    packages.extend(values(extra, "--package"));
    packages
}

/// Whether the cargo arguments can select the `kube*` test targets of
/// nllb-tests: not when they pick only other packages or other `--test`s.
fn runs_kube_tests(extra: &[String]) -> bool {
    let packages = packages(extra);
    if !packages.is_empty() && !packages.contains(&"nllb-tests") {
        return false;
    }
    let tests = values(extra, "--test");
    tests.is_empty() || tests.iter().any(|t| t.starts_with("kube"))
}

/// Whether the run picks the end-to-end tests but not the package whose
/// integration tests make `cargo test` build the agent binary they run.
fn misses_agent_build(extra: &[String]) -> bool {
    let packages = packages(extra);
    packages.contains(&"nllb-tests") && !packages.contains(&"nllb-userspace")
}

#[cfg(test)]
mod tests {
    use super::{misses_agent_build, runs_kube_tests};

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn kube_tests_run_unless_the_arguments_exclude_them() {
        assert!(runs_kube_tests(&[]));
        assert!(runs_kube_tests(&args("-p nllb-tests")));
        assert!(runs_kube_tests(&args("-p nllb-tests --test kube")));
        assert!(runs_kube_tests(&args("--package=nllb-tests --test=kube_failover")));
        assert!(!runs_kube_tests(&args("-p nllb-tests --test datapath")));
        assert!(!runs_kube_tests(&args("-p nllb-userspace")));
        assert!(!runs_kube_tests(&args("-p nllb-userspace -- --test kube")));
    }

    #[test]
    fn the_agent_binary_is_built_when_only_the_end_to_end_tests_are_picked() {
        assert!(misses_agent_build(&args("-p nllb-tests --test rebalance")));
        assert!(misses_agent_build(&args("--package=nllb-tests")));
        // The workspace run and a run with nllb-userspace build it themselves.
        assert!(!misses_agent_build(&[]));
        assert!(!misses_agent_build(&args("-p nllb-tests -p nllb-userspace")));
        assert!(!misses_agent_build(&args("-p nllb-userspace -- -p nllb-tests")));
    }
}
