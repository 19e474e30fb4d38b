//! Where the guest's programs come from: busybox, `ip`, `nft`, `bpftool`
//! and the shared libraries of everything in the initramfs (those tools,
//! `nllb` and the test binaries).
//!
//! On x86-64 they are the host's own (found on PATH, libraries from
//! `ldd`). For another architecture they are Debian's packages for it,
//! fetched with the project's own apt configuration and unpacked into a
//! sysroot under `$NLLB_CACHE/kernels/userland`; libraries are then found
//! from each ELF's `NEEDED` entries and program interpreter (`readelf`),
//! since `ldd` cannot run a foreign binary.

use super::apt::Apt;
use crate::arch::Arch;
use crate::cmd;
use crate::paths::cache_dir;
use anyhow::{Context as _, Result, bail};
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Debian packages of the guest's userland on a foreign architecture (their
/// library dependencies come along); libc6 and libgcc-s1 serve the
/// cross-built Rust binaries.
const PACKAGES: &[&str] = &["busybox-static", "iproute2", "nftables", "bpftool", "libc6", "libgcc-s1"];

pub enum Userland {
    Host,
    Sysroot { root: PathBuf, arch: &'static Arch, suite: String },
}

impl Userland {
    /// The host for x86-64; Debian's packages of `arch` otherwise.
    pub fn for_arch(arch: &'static Arch, mirror: &str) -> Result<Self> {
        if arch.is_host() {
            return Ok(Userland::Host);
        }
        let suite = userland_suite(arch);
        let root = fetch_sysroot(arch, &suite, mirror)?;
        Ok(Userland::Sysroot { root, arch, suite })
    }

    pub fn describe(&self) -> String {
        match self {
            Userland::Host => "the host's busybox, ip, nft, bpftool".into(),
            Userland::Sysroot { root, arch, suite } => {
                format!("Debian {suite} {} packages (busybox-static, iproute2, nftables, bpftool) in {}", arch.debian, root.display())
            }
        }
    }

    pub fn busybox(&self) -> Result<PathBuf> {
        match self {
            Userland::Host => {
                let b = PathBuf::from("/bin/busybox");
                if !b.is_file() {
                    bail!("/bin/busybox missing; `cargo xtask setup` installs busybox-static");
                }
                Ok(b)
            }
            Userland::Sysroot { root, .. } => find_in(root, &["bin", "usr/bin"], "busybox"),
        }
    }

    /// A program the tests call (`ip`, `nft`, `bpftool`).
    pub fn tool(&self, name: &str) -> Result<PathBuf> {
        match self {
            Userland::Host => which(name).with_context(|| format!("`{name}` not found; `cargo xtask setup` installs it")),
            Userland::Sysroot { root, .. } => find_in(root, &["usr/sbin", "sbin", "usr/bin", "bin"], name),
        }
    }

    /// `strip` that understands this architecture's ELF files.
    pub fn strip(&self) -> String {
        match self {
            Userland::Host => "strip".into(),
            Userland::Sysroot { arch, .. } => arch.tool("strip"),
        }
    }

    /// Every shared library (and program interpreter) `elfs` need: (file
    /// to copy, path in the guest relative to its root).
    pub fn libraries(&self, elfs: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>> {
        match self {
            Userland::Host => Ok(ldd_libraries(elfs)?
                .into_iter()
                .map(|l| {
                    let rel = l.strip_prefix("/").unwrap_or(&l).to_path_buf();
                    (l, rel)
                })
                .collect()),
            Userland::Sysroot { root, arch, .. } => sysroot_libraries(root, arch, elfs),
        }
    }
}

/// The suite the foreign userland comes from: the host's own release (its
/// cross compiler links against that glibc, so the guest's must be as new),
/// or trixie where the host's release lacks the architecture (riscv64 is a
/// release architecture from trixie on).
fn userland_suite(arch: &Arch) -> String {
    let host = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(|v| v.trim_matches('"').to_owned())))
        .unwrap_or_default();
    match host.as_str() {
        "bullseye" | "bookworm" if arch.debian != "riscv64" => host,
        "bullseye" | "bookworm" | "" => "trixie".into(),
        _ => host,
    }
}

fn fetch_sysroot(arch: &Arch, suite: &str, mirror: &str) -> Result<PathBuf> {
    let name = format!("{suite}-{}", arch.debian);
    let base = cache_dir().join("kernels/userland");
    let root = base.join(&name);
    std::fs::create_dir_all(&base)?;
    let lock_file = std::fs::File::create(base.join(format!("{name}.lock")))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking the {name} userland"))?;
    if root.join(".complete").exists() {
        return Ok(root);
    }
    let apt = Apt::new(suite, arch.debian, mirror)?;
    apt.ensure_lists().with_context(|| format!("apt-get update for {suite} ({})", arch.debian))?;
    let pkgs = apt.closure(PACKAGES)?;
    let debs = base.join(format!("{name}.debs"));
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs)?;
    if apt.download(&pkgs, &debs).is_err() {
        // Lists older than the archive (a point release): refresh, retry.
        apt.update()?;
        apt.download(&apt.closure(PACKAGES)?, &debs)?;
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for e in std::fs::read_dir(&debs)? {
        let deb = e?.path();
        cmd::output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::write(root.join(".complete"), pkgs.join("\n") + "\n")?;
    Ok(root)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// `name` in one of `dirs` of the sysroot, symlinks resolved inside it.
fn find_in(root: &Path, dirs: &[&str], name: &str) -> Result<PathBuf> {
    dirs.iter()
        .find_map(|d| resolve_in(root, &Path::new(d).join(name)))
        .with_context(|| format!("no {name} in {} under {}", dirs.join(", "), root.display()))
}

/// Follows symlinks of `rel` (relative to `root`) with absolute targets
/// taken relative to `root`, as the guest will see them. None when missing.
fn resolve_in(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut parts: Vec<PathBuf> = Vec::new();
    let mut todo: Vec<PathBuf> = rel.components().rev().map(|c| PathBuf::from(c.as_os_str())).collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.components().next() {
            Some(Component::ParentDir) => {
                parts.pop();
                continue;
            }
            Some(Component::CurDir | Component::RootDir) | None => continue,
            _ => {}
        }
        let here: PathBuf = root.join(parts.iter().collect::<PathBuf>()).join(&c);
        match std::fs::read_link(&here) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                if target.is_absolute() {
                    parts.clear();
                }
                todo.extend(target.components().rev().map(|c| PathBuf::from(c.as_os_str())));
            }
            Err(_) => parts.push(c),
        }
    }
    let p = root.join(parts.iter().collect::<PathBuf>());
    p.is_file().then_some(p)
}

/// `NEEDED` entries and the program interpreter of an ELF file.
fn elf_needs(elf: &Path) -> Result<(Option<String>, Vec<String>)> {
    let dynamic = cmd::output(Command::new("readelf").arg("-dW").arg(elf))?;
    let needed = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_owned()))
        .collect();
    let headers = cmd::output(Command::new("readelf").arg("-lW").arg(elf))?;
    let interp = headers
        .lines()
        .find_map(|l| l.split_once("[Requesting program interpreter: "))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(p, _)| p.to_owned());
    Ok((interp, needed))
}

fn sysroot_libraries(root: &Path, arch: &Arch, elfs: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>> {
    let dirs = [format!("lib/{}", arch.gnu), format!("usr/lib/{}", arch.gnu), "lib".into(), "usr/lib".into()];
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo: Vec<PathBuf> = elfs.to_vec();
    while let Some(elf) = todo.pop() {
        let (interp, needed) = elf_needs(&elf)?;
        if let Some(i) = interp {
            let rel = PathBuf::from(i.trim_start_matches('/'));
            if seen.insert(rel.clone()) {
                // From trixie on, packages put it under usr/ and rely on
                // base-files' /lib -> usr/lib link, which the sysroot lacks.
                let src = resolve_in(root, &rel)
                    .or_else(|| resolve_in(root, &Path::new("usr").join(&rel)))
                    .with_context(|| format!("{}: interpreter {i} not in {}", elf.display(), root.display()))?;
                out.push((src, rel));
            }
        }
        for lib in needed {
            let (rel, src) = dirs
                .iter()
                .find_map(|d| {
                    let rel = Path::new(d).join(&lib);
                    resolve_in(root, &rel).map(|src| (rel, src))
                })
                .with_context(|| format!("{}: {lib} not found in {} (lib dirs: {})", elf.display(), root.display(), dirs.join(", ")))?;
            if seen.insert(rel.clone()) {
                todo.push(src.clone());
                out.push((src, rel));
            }
        }
    }
    Ok(out)
}

/// Absolute library paths (including the dynamic loader) that `ldd` lists.
fn ldd_libraries(bins: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for b in bins {
        let out = cmd::raw_output(Command::new("ldd").arg(b))?;
        // A static binary makes ldd fail: it needs nothing.
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            let path = match line.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_sysroot() {
        let d = tempfile_dir();
        std::fs::create_dir_all(d.join("usr/lib/arm-linux-gnueabihf")).unwrap();
        std::fs::write(d.join("usr/lib/arm-linux-gnueabihf/ld-linux-armhf.so.3"), b"x").unwrap();
        std::os::unix::fs::symlink("usr/lib", d.join("lib")).unwrap();
        std::os::unix::fs::symlink("/lib/arm-linux-gnueabihf/ld-linux-armhf.so.3", d.join("usr/lib/ld-linux-armhf.so.3"))
            .unwrap();
        assert_eq!(
            resolve_in(&d, Path::new("lib/ld-linux-armhf.so.3")),
            Some(d.join("usr/lib/arm-linux-gnueabihf/ld-linux-armhf.so.3"))
        );
        assert_eq!(resolve_in(&d, Path::new("lib/missing.so")), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-userland-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
