use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../nllb-ebpf");
    add_cached_bpf_linker_to_path();
    aya_build::build_ebpf(
        [Package { name: "nllb-ebpf", root_dir: &root_dir, ..Default::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF programs; run `cargo xtask setup` first if bpf-linker is missing")
}

/// `cargo xtask setup` builds bpf-linker into `$NLLB_CACHE/bpf-linker/bin`
/// (default `~/.cache/nllb`); find it there so a plain `cargo build` works.
fn add_cached_bpf_linker_to_path() {
    println!("cargo:rerun-if-env-changed=NLLB_CACHE");
    let cache = std::env::var_os("NLLB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nllb")));
    let Some(bin) = cache.map(|c| c.join("bpf-linker/bin")) else { return };
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
