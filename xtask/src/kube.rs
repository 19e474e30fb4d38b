//! `cargo xtask setup --kube`: the real control plane for the tests,
//! `kube-apiserver` and `etcd`, built with `go build` from their published
//! Go modules (no prebuilt binary can be fetched here).
//!
//! The versions are pinned in `tests/kube/go.mod` (with `go.sum`); the test
//! harness reads the same file, so both agree on where the binaries are:
//! `$NLLB_CACHE/kube/<kubernetes>-etcd-<etcd>/`. Go's module and build
//! caches live under `$NLLB_CACHE/kube/go/`, so a rebuild (new versions)
//! compiles only what changed.

use crate::cmd;
use crate::paths::{cache_dir, workspace_root};
use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The binaries the tests run, by their name in the cache directory, and
/// the Go package each is built from.
const BINARIES: [(&str, &str); 2] = [
    ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    ("etcd", "go.etcd.io/etcd/server/v3"),
];

/// The pinned versions, as `tests/kube/go.mod` requires them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    pub kubernetes: String,
    pub etcd: String,
}

impl Versions {
    /// `v1.33.13-etcd-v3.5.21`: the cache directory's name.
    pub fn dir_name(&self) -> String {
        format!("{}-etcd-{}", self.kubernetes, self.etcd)
    }
}

fn module_dir() -> PathBuf {
    workspace_root().join("tests/kube")
}

/// Reads the two pinned versions from `go.mod`'s require block.
pub fn versions_in(go_mod: &str) -> Option<Versions> {
    let required = |module: &str| {
        go_mod.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            let w = words.next()?;
            let w = if w == "require" { words.next()? } else { w };
            (w == module)
                .then(|| words.next().map(str::to_string))
                .flatten()
        })
    };
    Some(Versions {
        kubernetes: required("k8s.io/kubernetes")?,
        etcd: required("go.etcd.io/etcd/server/v3")?,
    })
}

fn say(msg: impl AsRef<str>) {
    println!("[setup] {}", msg.as_ref());
}

/// The Go toolchain: `go` on PATH, else where the Go tarball installs it.
fn go_binary() -> Result<PathBuf> {
    if cmd::succeeds(Command::new("go").arg("version")) {
        return Ok(PathBuf::from("go"));
    }
    let fallback = PathBuf::from("/usr/local/go/bin/go");
    if cmd::succeeds(Command::new(&fallback).arg("version")) {
        return Ok(fallback);
    }
    bail!(
        "Go is needed to build kube-apiserver and etcd for the tests: install Go 1.24 or newer (`go` on PATH or /usr/local/go)"
    )
}

/// Builds the binaries unless they are already there, prints their
/// versions and returns their directory.
pub fn binaries() -> Result<PathBuf> {
    let dir = build_if_missing()?;
    for (name, _) in BINARIES {
        say(format!(
            "{name}: {} ({})",
            version_line(&dir.join(name)),
            dir.join(name).display()
        ));
    }
    Ok(dir)
}

fn build_if_missing() -> Result<PathBuf> {
    let go_mod_path = module_dir().join("go.mod");
    let go_mod = std::fs::read_to_string(&go_mod_path)
        .with_context(|| format!("reading {}", go_mod_path.display()))?;
    let versions = versions_in(&go_mod).with_context(|| {
        format!(
            "{} requires no k8s.io/kubernetes or go.etcd.io/etcd/server/v3",
            go_mod_path.display()
        )
    })?;
    let root = cache_dir().join("kube");
    let dir = root.join(versions.dir_name());
    if BINARIES.iter().all(|(name, _)| runs(&dir.join(name))) {
        say(format!(
            "kube-apiserver {}, etcd {}: already built",
            versions.kubernetes, versions.etcd
        ));
        return Ok(dir);
    }
    let go = go_binary()?;
    say(format!(
        "kube-apiserver {}, etcd {}: building from their Go modules into {} (once: ~12.5 CPU-minutes, so 6-8 minutes on 2 idle cores, much longer on busy ones)",
        versions.kubernetes,
        versions.etcd,
        dir.display()
    ));
    // Built next to the final directory and renamed into place, so an
    // interrupted build never looks finished.
    let partial = root.join(format!(".{}.partial", versions.dir_name()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let started = Instant::now();
    for (name, package) in BINARIES {
        let mut c = Command::new(&go);
        c.current_dir(module_dir())
            .env("GOMODCACHE", root.join("go/mod"))
            .env("GOCACHE", root.join("go/build"))
            // Pure Go, no C toolchain needed; go.sum is the contract.
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=readonly -buildvcs=false")
            .args(["build", "-trimpath", "-ldflags", &ldflags(&versions), "-o"])
            .arg(partial.join(name))
            .arg(package);
        cmd::run(&mut c)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir)
        .with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
    for (name, _) in BINARIES {
        if !runs(&dir.join(name)) {
            bail!(
                "{} was built but `--version` fails",
                dir.join(name).display()
            );
        }
    }
    say(format!(
        "kube-apiserver and etcd built in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(dir)
}

/// No symbol tables (smaller, faster to link) and the release version in
/// `kube-apiserver --version` and `/version`, as kubernetes' own build sets it
/// (a module build otherwise reports v0.0.0-master).
fn ldflags(v: &Versions) -> String {
    let pkg = "k8s.io/component-base/version";
    let (major, minor) = major_minor(&v.kubernetes);
    format!(
        "-s -w -X {pkg}.gitVersion={} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean",
        v.kubernetes
    )
}

fn major_minor(version: &str) -> (String, String) {
    let mut parts = version.trim_start_matches('v').split('.');
    (
        parts.next().unwrap_or("1").to_string(),
        parts.next().unwrap_or("0").to_string(),
    )
}

fn runs(bin: &Path) -> bool {
    bin.is_file() && cmd::succeeds(Command::new(bin).arg("--version"))
}

/// `<binary> --version`, first line, for the setup summary.
fn version_line(bin: &Path) -> String {
    cmd::output(Command::new(bin).arg("--version"))
        .map(|o| o.lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_else(|e| format!("(version unknown: {e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_require_block() {
        let go_mod = "module x\n\nrequire (\n\tgo.etcd.io/etcd/server/v3 v3.5.21\n\tk8s.io/kubernetes v1.33.13\n)\n\nreplace (\n\tk8s.io/api => k8s.io/api v0.33.13\n)\n";
        let v = versions_in(go_mod).unwrap();
        assert_eq!(
            v,
            Versions {
                kubernetes: "v1.33.13".into(),
                etcd: "v3.5.21".into()
            }
        );
        assert_eq!(v.dir_name(), "v1.33.13-etcd-v3.5.21");
        assert_eq!(
            versions_in("module x\nrequire k8s.io/kubernetes v1.2.3\n"),
            None
        );
    }

    #[test]
    fn the_pinned_module_names_both_versions() {
        let go_mod = std::fs::read_to_string(module_dir().join("go.mod")).unwrap();
        let v = versions_in(&go_mod).expect("tests/kube/go.mod pins both");
        // Every staging module is replaced by the release matching kubernetes'.
        let staging = format!(
            "v0.{}.",
            v.kubernetes
                .trim_start_matches("v1.")
                .split('.')
                .next()
                .unwrap()
        );
        let replaced: Vec<&str> = go_mod.lines().filter(|l| l.contains(" => ")).collect();
        assert!(replaced.len() > 20, "{replaced:?}");
        assert!(
            replaced.iter().all(|l| l.trim_end().ends_with(&format!(
                "{}{}",
                staging,
                v.kubernetes.rsplit('.').next().unwrap()
            ))),
            "{replaced:?}"
        );
        assert_eq!(major_minor(&v.kubernetes).0, "1");
    }
}
