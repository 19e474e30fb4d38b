//! apt with a configuration of our own (sources, lists and cache under
//! `$NLLB_CACHE/kernels/apt`, the dpkg status empty), for one suite and one
//! architecture: the system's apt sources and state are never touched, and
//! other architectures' packages are fetched without `dpkg
//! --add-architecture` (whose `apt-get update` fails on this image).

use crate::cmd;
use crate::paths::cache_dir;
use anyhow::{Context as _, Result};
use std::path::PathBuf;
use std::process::Command;

pub struct Apt {
    pub dir: PathBuf,
    /// Debian's name: amd64, arm64, armhf, riscv64.
    arch: &'static str,
}

impl Apt {
    /// amd64 keeps the directory name it always had (`apt/<suite>`), so
    /// existing caches stay valid; other architectures get `<suite>-<arch>`.
    pub fn new(suite: &str, arch: &'static str, mirror: &str) -> Result<Self> {
        let name = if arch == "amd64" { suite.to_owned() } else { format!("{suite}-{arch}") };
        let dir = cache_dir().join("kernels/apt").join(name);
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources =
            format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n");
        std::fs::write(dir.join("sources.list"), sources)?;
        Ok(Self { dir, arch })
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let d = &self.dir;
        for (k, v) in [
            ("Dir::Etc::SourceList", d.join("sources.list")),
            ("Dir::Etc::SourceParts", "/dev/null".into()),
            ("Dir::State::Lists", d.join("lists")),
            ("Dir::State::Status", "/dev/null".into()),
            ("Dir::Cache", d.join("cache")),
            ("APT::Architecture", self.arch.into()),
            ("APT::Architectures", self.arch.into()),
            // Only the package lists: no translations or AppStream data.
            ("Acquire::Languages", "none".into()),
            ("Acquire::IndexTargets::deb::DEP-11::DefaultEnabled", "false".into()),
            ("Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled", "false".into()),
            ("Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled", "false".into()),
            ("Acquire::IndexTargets::deb::CNF::DefaultEnabled", "false".into()),
            ("APT::Sandbox::User", "root".into()),
        ] {
            c.arg("-o").arg(format!("{k}={}", v.display()));
        }
        c.arg("-q");
        c
    }

    pub fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists"))
            .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with("_Packages")))
            .unwrap_or(false)
    }

    pub fn update(&self) -> Result<()> {
        cmd::output(self.cmd("apt-get").arg("update")).map(|_| ())
    }

    /// Fetches the package lists unless they are there.
    pub fn ensure_lists(&self) -> Result<()> {
        if self.has_lists() { Ok(()) } else { self.update() }
    }

    /// `(field value)` of the first stanza of `apt-cache show pkg`.
    pub fn show(&self, pkg: &str, field: &str) -> Result<String> {
        let out = cmd::output(self.cmd("apt-cache").args(["show", pkg]))?;
        let stanza = out.split("\n\n").next().unwrap_or_default();
        stanza
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}: ")))
            .map(str::to_owned)
            .with_context(|| format!("`apt-cache show {pkg}` has no {field} field"))
    }

    /// `pkgs` and everything they depend on (Depends and Pre-Depends,
    /// recursively; virtual packages left out).
    pub fn closure(&self, pkgs: &[&str]) -> Result<Vec<String>> {
        let out = cmd::output(
            self.cmd("apt-cache")
                .args(["depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts"])
                .args(["--no-breaks", "--no-replaces", "--no-enhances"])
                .args(pkgs),
        )?;
        let mut names: Vec<String> = out
            .lines()
            .filter(|l| !l.starts_with(' ') && !l.starts_with('<') && !l.trim().is_empty())
            .map(|l| l.trim().split(':').next().unwrap_or_default().to_owned())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// `apt-get download` into `dir`.
    pub fn download(&self, pkgs: &[String], dir: &std::path::Path) -> Result<()> {
        cmd::output(self.cmd("apt-get").arg("download").args(pkgs).current_dir(dir)).map(|_| ())
    }
}

/// Package names of a Depends field (alternatives: the first one).
pub fn dep_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|d| d.split('|').next()?.split_whitespace().next().map(|n| n.split(':').next().unwrap_or(n).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_field_gives_package_names() {
        let d = "dracut | initramfs-tools (>= 0.120+deb8u2), linux-base-7.2.13+deb14-amd64 (= 7.2.13-1), linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), libc6:any";
        assert_eq!(
            dep_names(d),
            ["dracut", "linux-base-7.2.13+deb14-amd64", "linux-binary-7.2.13+deb14-amd64", "libc6"]
        );
    }
}
