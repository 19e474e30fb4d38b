use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../nllb-ebpf");
    aya_build::build_ebpf(
        [Package { name: "nllb-ebpf", root_dir: &root_dir, ..Default::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF programs; run `cargo xtask setup` first if bpf-linker is missing")
}
