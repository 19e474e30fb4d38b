//! Debian kernels for the matrix, fetched with an apt configuration of our
//! own (see [`super::apt`]) for the guest's architecture.

use super::apt::{Apt, dep_names};
use crate::arch::Arch;
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
    /// Seconds one x86-64 guest of this kernel took in a cold CI run
    /// (2026-12-07; the same order in earlier runs): parallel guests start
    /// with the slowest so they finish close together. Debian's 6.1 runs
    /// every test about twice as slow as 5.10 under TCG.
    pub guest_seconds: u32,
}

/// Oldest first. Nothing older than 5.10 can be fetched from the archive.
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec { label: "5.10", suite: "bullseye", guest_seconds: 419 },
    KernelSpec { label: "6.1", suite: "bookworm", guest_seconds: 759 },
    KernelSpec { label: "6.12", suite: "trixie", guest_seconds: 487 },
    KernelSpec { label: "7", suite: "sid", guest_seconds: 623 },
];

/// The kernels `--arch` runs when `--kernels` is not given: every one on
/// x86-64; elsewhere the oldest one Debian ships for the architecture in a
/// supported release and the newest (sid), which keeps a TCG run short.
pub fn default_labels(arch: &Arch) -> &'static [&'static str] {
    match arch.debian {
        "amd64" => &["5.10", "6.1", "6.12", "7"],
        "riscv64" => &["6.12", "7"],
        _ => &["6.1", "7"],
    }
}

/// Why a suite has no kernel for an architecture (checked before any fetch).
fn unavailable(arch: &Arch, spec: &KernelSpec) -> Option<String> {
    (arch.debian == "riscv64" && matches!(spec.suite, "bullseye" | "bookworm")).then(|| {
        format!(
            "riscv64 was not a release architecture of Debian {} (it became one with trixie, 13), so the archive has no \
             riscv64 kernel {}; the oldest riscv64 kernel there is 6.12 (trixie)",
            spec.suite, spec.label
        )
    })
}

/// Accepts labels (`6.1`, `7`, `7.x`) and suite names (`bookworm`).
pub fn select(arch: &Arch, wanted: &[String]) -> Result<Vec<KernelSpec>> {
    let wanted: Vec<String> =
        if wanted.is_empty() { default_labels(arch).iter().map(|l| l.to_string()).collect() } else { wanted.to_vec() };
    wanted
        .iter()
        .map(|w| {
            let w = w.trim().trim_end_matches(".x");
            let spec = KERNELS.iter().find(|k| k.label == w || k.suite == w).copied().with_context(|| {
                let known: Vec<_> = KERNELS.iter().map(|k| format!("{} ({})", k.label, k.suite)).collect();
                format!("unknown kernel `{w}` in --kernels; known: {}", known.join(", "))
            })?;
            if let Some(why) = unavailable(arch, &spec) {
                bail!("--kernels {w} --arch {}: {why}", arch.name);
            }
            Ok(spec)
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
    /// The build configuration Debian ships beside the image.
    pub config: Option<PathBuf>,
}

/// The versioned image package behind `linux-image-<flavour>`, and the
/// packages holding its files: the image itself up to 6.12; from 7.x on
/// the image is a meta package over linux-binary-* and linux-modules-*.
fn resolve(apt: &Apt, arch: &Arch) -> Result<(String, String, Vec<String>)> {
    let meta = format!("linux-image-{}", arch.kernel_flavour);
    let version = apt.show(&meta, "Version")?;
    let image = dep_names(&apt.show(&meta, "Depends")?)
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("{meta} depends on no linux-image-* package"))?;
    let parts: Vec<String> = dep_names(&apt.show(&image, "Depends")?)
        .into_iter()
        .filter(|d| d.starts_with("linux-binary-") || d.starts_with("linux-modules-"))
        .collect();
    let debs = if parts.is_empty() { vec![image.clone()] } else { parts };
    Ok((image, version, debs))
}

/// Fetches (or finds cached) and unpacks the kernel for `spec` on `arch`.
pub fn fetch(spec: KernelSpec, arch: &Arch, mirror: &str) -> Result<Kernel> {
    // The cache is shared by every work tree on the machine: one fetch per
    // suite and architecture at a time (apt's own lock would make a second
    // one fail).
    let lock_path = cache_dir().join("kernels").join(format!("{}-{}.lock", spec.suite, arch.debian));
    std::fs::create_dir_all(lock_path.parent().unwrap())?;
    let lock_file = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    fetch_locked(spec, arch, mirror)
}

fn fetch_locked(spec: KernelSpec, arch: &Arch, mirror: &str) -> Result<Kernel> {
    let apt = Apt::new(spec.suite, arch.debian, mirror)?;
    apt.ensure_lists().with_context(|| format!("apt-get update for {} ({})", spec.suite, arch.debian))?;
    let (image, version, debs) = resolve(&apt, arch)
        .with_context(|| format!("Debian {} has no {} kernel for {}", spec.suite, arch.kernel_flavour, arch.debian))?;
    let root = cache_dir().join("kernels").join(spec.suite).join(&image);
    if !root.join(".complete").exists() {
        let debs_dir = cache_dir().join("kernels/debs").join(format!("{}-{}", spec.suite, arch.debian));
        std::fs::create_dir_all(&debs_dir)?;
        if apt.download(&debs, &debs_dir).is_err() {
            // The archive moved on since our lists were fetched (sid does
            // often): refresh them and resolve again.
            apt.update()?;
            let (image2, _, debs2) = resolve(&apt, arch)?;
            if image2 != image {
                return fetch_locked(spec, arch, mirror);
            }
            apt.download(&debs2, &debs_dir)?;
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
    // vmlinuz everywhere but riscv64, whose Debian image is an
    // uncompressed `vmlinux`; from 7.x both live in the modules directory.
    let vmlinuz = ["vmlinuz", "vmlinux"]
        .into_iter()
        .flat_map(|n| [root.join("boot").join(format!("{n}-{release}")), modules.join(n)])
        .find(|p| p.is_file())
        .with_context(|| format!("no vmlinuz for {release} under {}", root.display()))?;
    let config =
        [root.join("boot").join(format!("config-{release}")), modules.join("config")].into_iter().find(|p| p.is_file());
    Ok(Kernel { version, release, vmlinuz, modules, config })
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
    use crate::arch::{ARM64, RISCV64, X86_64};

    #[test]
    fn kernels_are_selected_by_label_or_suite() {
        let s = select(&X86_64, &["7.x".into(), "bookworm".into()]).unwrap();
        assert_eq!(s.iter().map(|k| k.suite).collect::<Vec<_>>(), ["sid", "bookworm"]);
        assert!(select(&X86_64, &["4.19".into()]).is_err());
    }

    #[test]
    fn each_arch_has_its_default_kernels_and_riscv64_says_why_it_has_no_6_1() {
        assert_eq!(select(&X86_64, &[]).unwrap().len(), 4);
        assert_eq!(select(&ARM64, &[]).unwrap().iter().map(|k| k.label).collect::<Vec<_>>(), ["6.1", "7"]);
        let e = select(&RISCV64, &["6.1".into()]).unwrap_err().to_string();
        assert!(e.contains("not a release architecture of Debian bookworm"), "{e}");
    }
}
