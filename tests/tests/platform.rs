//! What the CPU architecture changes: `nllb detect` reports the architecture
//! and the BPF JIT truthfully, and where no Envoy build exists (armv7,
//! riscv64) `--mode auto` never runs an Envoy binary, not even to ask its
//! version. These run on the host and, cross-built, in the kernel-matrix
//! guests of every architecture (`cargo xtask vm-test --arch ...`). Test
//! names avoid the word "envoy": the guests report tests so named as not
//! run (they carry no Envoy), and these must run there.

use std::{path::PathBuf, process::Command, time::Duration};

use nllb_tests::{Agent, AgentOpts, TestCgroup, nllb_bin, one_service_config, privileged, unique_name};

/// Envoy builds exist for these (`nllb_userspace::platform`).
const HAS_ENVOY: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

fn expected_arch() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        "x86-64"
    } else if cfg!(target_arch = "aarch64") {
        "arm64"
    } else if cfg!(target_arch = "arm") {
        "armv7"
    } else {
        std::env::consts::ARCH
    }
}

/// A directory of ours, removed on drop. Not a cgroup, so the in-kernel
/// datapath cannot attach there.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A stand-in Envoy that leaves a mark when anything executes it (and
/// answers `--version` like the real one, so on architectures where Envoy
/// may be used, detect accepts it).
struct MarkingEnvoy(TempDir);

impl MarkingEnvoy {
    fn new() -> Self {
        let dir = TempDir::new("nllb-fake-envoy-");
        let script = format!(
            "#!/bin/sh\ntouch {}\necho 'envoy  version: 0000/1.40.0/Clean/RELEASE/BoringSSL'\n",
            dir.0.join("ran").display()
        );
        let bin = dir.0.join("envoy");
        std::fs::write(&bin, script).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(dir)
    }

    fn bin(&self) -> PathBuf {
        self.0.0.join("envoy")
    }

    fn ran(&self) -> bool {
        self.0.0.join("ran").exists()
    }
}

fn detect(args: &[&str]) -> (i32, String) {
    let out = Command::new(nllb_bin()).arg("detect").args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn detect_names_the_architecture_and_whether_programs_are_jit_compiled() {
    if !privileged() {
        return;
    }
    // The attach probe loads the real programs under a test cgroup of ours.
    let cg = TestCgroup::new();
    let cgroup = cg.path().display().to_string();
    let (_, json) = detect(&["--json", "--cgroup", &cgroup]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let p = &v["platform"];
    assert_eq!(p["arch"], expected_arch(), "{p}");
    assert_eq!(p["envoy_build"], HAS_ENVOY, "{p}");
    let jit = &p["bpf_jit"];
    let sysctl: Option<u64> =
        std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable").ok().and_then(|s| s.trim().parse().ok());
    assert_eq!(jit["sysctl"].as_u64(), sysctl, "{jit}");
    // When the programs loaded, the verdict follows what the kernel did
    // with them; with the JIT switched off or absent, they are interpreted.
    match jit["programs_jited"].as_bool() {
        Some(true) => assert_eq!(jit["state"], "jit", "{jit}"),
        Some(false) => assert_eq!(jit["state"], "interpreted", "{jit}"),
        None => {}
    }
    if matches!(sysctl, Some(0) | None) && v["ebpf_usable"] == true {
        assert_eq!(jit["state"], "interpreted", "{jit}");
        assert_eq!(jit["programs_jited"], false, "{jit}");
    }
    if v["ebpf_usable"] == true {
        assert!(jit["programs_jited"].is_boolean(), "the attach probe loaded the programs: {jit}");
    }
    let (_, text) = detect(&["--cgroup", &cgroup]);
    assert!(text.contains("BPF JIT"), "{text}");
}

#[test]
fn auto_never_executes_the_fallback_binary_where_it_has_no_build() {
    let envoy = MarkingEnvoy::new();
    let not_cgroup = TempDir::new("nllb-not-cgroup-");
    let cgroup = not_cgroup.0.display().to_string();
    let bin = envoy.bin().display().to_string();
    let (code, text) = detect(&["--cgroup", &cgroup, "--envoy-binary", &bin]);
    if HAS_ENVOY {
        // The fallback exists here: detect asks the binary and offers it.
        assert!(envoy.ran(), "detect must probe Envoy where it exists:\n{text}");
        assert_eq!(code, 3, "only Envoy can run against a non-cgroup:\n{text}");
        return;
    }
    assert!(!envoy.ran(), "detect ran the Envoy binary on {}:\n{text}", expected_arch());
    assert_eq!(code, 4, "neither datapath can run (exit 4):\n{text}");
    assert!(text.contains(&format!("no Envoy build for {}", expected_arch())), "{text}");
    assert!(text.contains("in-kernel datapath is the only one"), "{text}");

    // The agent in auto mode: the eBPF datapath cannot attach to a
    // non-cgroup, and instead of falling back it exits saying why.
    let mut agent = Agent::spawn(&AgentOpts {
        config_yaml: one_service_config(&["127.0.0.1:7443"], 6443, &["198.18.0.1".parse().unwrap()], ""),
        cgroup: not_cgroup.0.clone(),
        extra_args: vec!["--mode".into(), "auto".into(), "--envoy-binary".into(), bin.clone()],
        env: vec![("NLLB_ENVOY_BINARY".into(), bin.clone())],
        ..Default::default()
    });
    let status = agent.wait_exit(Duration::from_secs(60)).expect("the agent must exit, not fall back to Envoy");
    let log = agent.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("not a cgroup v2 directory"), "the eBPF reason must be given:\n{log}");
    assert!(log.contains("in-kernel datapath is the only one"), "{log}");
    assert!(!envoy.ran(), "the agent ran the Envoy binary on {}:\n{log}", expected_arch());
}
