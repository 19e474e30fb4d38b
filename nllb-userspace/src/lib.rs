//! The nllb agent as a library; `main.rs` is the CLI edge.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nllb"));
