use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../nllb-ebpf");
    add_cached_bpf_linker_to_path();
    let toolchain = ebpf_toolchain();
    aya_build::build_ebpf(
        [Package { name: "nllb-ebpf", root_dir: &root_dir, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF programs; run `cargo xtask setup` first if bpf-linker is missing")
}

fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("NLLB_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nllb")))
}

/// The nightly that `cargo xtask setup` chose (the pinned day's; bpf-linker
/// is built against its LLVM): `NLLB_EBPF_TOOLCHAIN`, else what setup wrote
/// to `$NLLB_CACHE/ebpf-toolchain`, else plain `nightly`.
fn ebpf_toolchain() -> String {
    println!("cargo:rerun-if-env-changed=NLLB_EBPF_TOOLCHAIN");
    if let Some(t) = std::env::var("NLLB_EBPF_TOOLCHAIN").ok().filter(|t| !t.is_empty()) {
        return t;
    }
    let chosen = cache_dir().map(|c| c.join("ebpf-toolchain"));
    if let Some(file) = &chosen {
        println!("cargo:rerun-if-changed={}", file.display());
        if let Ok(t) = std::fs::read_to_string(file) {
            let t = t.trim();
            if !t.is_empty() {
                return t.to_string();
            }
        }
    }
    "nightly".to_string()
}

/// `cargo xtask setup` builds bpf-linker into `$NLLB_CACHE/bpf-linker/bin`
/// (default `~/.cache/nllb`); find it there so a plain `cargo build` works.
fn add_cached_bpf_linker_to_path() {
    println!("cargo:rerun-if-env-changed=NLLB_CACHE");
    let Some(bin) = cache_dir().map(|c| c.join("bpf-linker/bin")) else { return };
    if !bin.join("bpf-linker").exists() {
        return;
    }
    let mut paths = vec![bin];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    if let Ok(joined) = std::env::join_paths(paths) {
        // SAFETY: build scripts are single-threaded at this point; aya-build
        // passes PATH on to the cargo it spawns.
        unsafe { std::env::set_var("PATH", joined) };
    }
}
