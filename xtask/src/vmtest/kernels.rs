//! Debian kernels for the matrix, fetched with an apt configuration of our
//! own (lists, cache and sources under `$NLLB_CACHE/kernels`), so the
//! system's apt sources and state are never touched.

use crate::cmd;
use crate::paths::cache_dir;
use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A kernel line of the matrix: the Debian suite that ships it.
#[derive(Clone, Copy, Debug)]
pub struct KernelSpec {
    pub label: &'static str,
    pub suite: &'static str,
}

/// Oldest first. Nothing older than 5.10 can be fetched from the archive.
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec { label: "5.10", suite: "bullseye" },
    KernelSpec { label: "6.1", suite: "bookworm" },
    KernelSpec { label: "6.12", suite: "trixie" },
    KernelSpec { label: "7", suite: "sid" },
];

/// Accepts labels (`6.1`, `7`, `7.x`) and suite names (`bookworm`).
pub fn select(wanted: &[String]) -> Result<Vec<KernelSpec>> {
    if wanted.is_empty() {
        return Ok(KERNELS.to_vec());
    }
    wanted
        .iter()
        .map(|w| {
            let w = w.trim().trim_end_matches(".x");
            KERNELS
                .iter()
                .find(|k| k.label == w || k.suite == w)
                .copied()
                .with_context(|| {
                    let known: Vec<_> = KERNELS.iter().map(|k| format!("{} ({})", k.label, k.suite)).collect();
                    format!("unknown kernel `{w}` in --kernels; known: {}", known.join(", "))
                })
        })
        .collect()
}

/// An unpacked kernel package.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Debian package version, e.g. 6.1.176-1.
    pub version: String,
    /// The modules directory name (= `uname -r`).
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(spec: &KernelSpec, mirror: &str) -> Result<Self> {
        let dir = cache_dir().join("kernels/apt").join(spec.suite);
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources = format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {} main\n",
            spec.suite
        );
        std::fs::write(dir.join("sources.list"), sources)?;
        Ok(Self { dir })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let d = &self.dir;
        for (k, v) in [
            ("Dir::Etc::SourceList", d.join("sources.list")),
            ("Dir::Etc::SourceParts", "/dev/null".into()),
            ("Dir::State::Lists", d.join("lists")),
            ("Dir::State::Status", "/dev/null".into()),
            ("Dir::Cache", d.join("cache")),
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

    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists"))
            .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with("_Packages")))
            .unwrap_or(false)
    }

    fn update(&self) -> Result<()> {
        cmd::output(self.cmd("apt-get").arg("update")).map(|_| ())
    }

    /// `(field value)` of the first stanza of `apt-cache show pkg`.
    fn show(&self, pkg: &str, field: &str) -> Result<String> {
        let out = cmd::output(self.cmd("apt-cache").args(["show", pkg]))?;
        let stanza = out.split("\n\n").next().unwrap_or_default();
        stanza
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}: ")))
            .map(str::to_owned)
            .with_context(|| format!("`apt-cache show {pkg}` has no {field} field"))
    }

    /// The versioned image package behind `linux-image-amd64`, and the
    /// packages holding its files: the image itself up to 6.12; from 7.x on
    /// the image is a meta package over linux-binary-* and linux-modules-*.
    fn resolve(&self) -> Result<(String, String, Vec<String>)> {
        let version = self.show("linux-image-amd64", "Version")?;
        let image = dep_names(&self.show("linux-image-amd64", "Depends")?)
            .into_iter()
            .find(|d| d.starts_with("linux-image-"))
            .context("linux-image-amd64 depends on no linux-image-* package")?;
        let parts: Vec<String> = dep_names(&self.show(&image, "Depends")?)
            .into_iter()
            .filter(|d| d.starts_with("linux-binary-") || d.starts_with("linux-modules-"))
            .collect();
        let debs = if parts.is_empty() { vec![image.clone()] } else { parts };
        Ok((image, version, debs))
    }
}

/// Package names of a Depends field (alternatives: the first one).
fn dep_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|d| d.split('|').next()?.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Fetches (or finds cached) and unpacks the kernel for `spec`.
pub fn fetch(spec: KernelSpec, mirror: &str) -> Result<Kernel> {
    // The cache is shared by every work tree on the machine: one fetch per
    // suite at a time (apt's own lock would make a second one fail).
    let lock_path = cache_dir().join("kernels").join(format!("{}.lock", spec.suite));
    std::fs::create_dir_all(lock_path.parent().unwrap())?;
    let lock_file = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    fetch_locked(spec, mirror)
}

fn fetch_locked(spec: KernelSpec, mirror: &str) -> Result<Kernel> {
    let apt = Apt::new(&spec, mirror)?;
    if !apt.has_lists() {
        apt.update().with_context(|| format!("apt-get update for {}", spec.suite))?;
    }
    let (image, version, debs) = apt.resolve()?;
    let root = cache_dir().join("kernels").join(spec.suite).join(&image);
    if !root.join(".complete").exists() {
        let debs_dir = cache_dir().join("kernels/debs").join(spec.suite);
        std::fs::create_dir_all(&debs_dir)?;
        let download = |debs: &[String]| cmd::output(apt.cmd("apt-get").arg("download").args(debs).current_dir(&debs_dir));
        if download(&debs).is_err() {
            // The archive moved on since our lists were fetched (sid does
            // often): refresh them and resolve again.
            apt.update()?;
            let (image2, _, debs2) = apt.resolve()?;
            if image2 != image {
                return fetch_locked(spec, mirror);
            }
            download(&debs2)?;
        }
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        for entry in std::fs::read_dir(&debs_dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if debs.iter().any(|d| name.starts_with(&format!("{d}_"))) {
                cmd::output(Command::new("dpkg-deb").arg("-x").arg(&path).arg(&root))?;
            }
            // Unpacked is what we keep; the .deb files are large.
            let _ = std::fs::remove_file(&path);
        }
        std::fs::write(root.join(".complete"), &version)?;
    }
    let version = std::fs::read_to_string(root.join(".complete"))?.trim().to_owned();
    let (release, modules) = modules_dir(&root)?;
    let vmlinuz = [root.join("boot").join(format!("vmlinuz-{release}")), modules.join("vmlinuz")]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("no vmlinuz for {release} under {}", root.display()))?;
    Ok(Kernel { version, release, vmlinuz, modules })
}

fn modules_dir(root: &Path) -> Result<(String, PathBuf)> {
    for base in ["usr/lib/modules", "lib/modules"] {
        if let Ok(rd) = std::fs::read_dir(root.join(base)) {
            for e in rd.filter_map(|e| e.ok()) {
                if e.path().join("kernel").is_dir() {
                    return Ok((e.file_name().to_string_lossy().into_owned(), e.path()));
                }
            }
        }
    }
    bail!("no lib/modules/<release>/kernel under {}", root.display())
}

/// The Debian archive URI the system's own apt sources use (read only),
/// so the matrix fetches from wherever this machine is set up to.
pub fn debian_mirror() -> Result<String> {
    if let Ok(m) = std::env::var("NLLB_DEBIAN_MIRROR")
        && !m.is_empty()
    {
        return Ok(m);
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let name = f.to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let uris: Vec<&str> = if name.ends_with(".sources") {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("URIs:"))
                .flat_map(|v| v.split_whitespace())
                .collect()
        } else if name.ends_with(".list") {
            text.lines()
                .filter(|l| l.trim_start().starts_with("deb "))
                .filter_map(|l| l.split_whitespace().skip(1).find(|w| w.contains("://")))
                .collect()
        } else {
            continue;
        };
        if let Some(u) = uris.into_iter().find(|u| u.trim_end_matches('/').ends_with("/debian")) {
            return Ok(u.trim_end_matches('/').to_owned());
        }
    }
    bail!("no Debian archive in the system's apt sources; set NLLB_DEBIAN_MIRROR to the archive URI")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_field_gives_package_names() {
        let d = "dracut | initramfs-tools (>= 0.120+deb8u2), linux-base-7.2.13+deb14-amd64 (= 7.2.13-1), linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1)";
        assert_eq!(dep_names(d), ["dracut", "linux-base-7.2.13+deb14-amd64", "linux-binary-7.2.13+deb14-amd64"]);
    }

    #[test]
    fn kernels_are_selected_by_label_or_suite() {
        let s = select(&["7.x".into(), "bookworm".into()]).unwrap();
        assert_eq!(s.iter().map(|k| k.suite).collect::<Vec<_>>(), ["sid", "bookworm"]);
        assert!(select(&["4.19".into()]).is_err());
    }
}
