//! The `nllb` command line as scripts see it: exit codes and messages for
//! bad input. None of these touch the kernel, so they run unprivileged.

use std::process::{Command, Output};

fn nllb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nllb")).args(args).output().expect("run nllb")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("nllb-cli-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

#[test]
fn unknown_flag_exits_2() {
    let o = nllb(&["agent", "--config", "x.yaml", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn bad_config_exits_2_naming_the_field() {
    let dir = tempdir();
    let cfg = write(&dir, "c.yaml", "services:\n  - name: a\n    listen: [\"10.0.0.1:7443\"]\n    backendPort: 6443\n");
    let o = nllb(&["agent", "--config", &cfg, "--pin-path", "/sys/fs/bpf/nllb-cli-never", "--run-dir", &dir.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("services[0].listen[0]"), "{}", stderr(&o));
    assert!(!std::path::Path::new("/sys/fs/bpf/nllb-cli-never").exists());
    let missing = nllb(&["agent", "--config", "/nonexistent/nllb.yaml"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("--config"), "{}", stderr(&missing));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn envoy_config_prints_listeners_for_every_virtual_address() {
    let dir = tempdir();
    let cfg = write(
        &dir,
        "c.yaml",
        "services:\n  - name: apiserver\n    listen: [\"127.0.0.1:7443\", \"[::1]:7443\"]\n    backendPort: 6443\nbackends: [\"198.18.1.2\"]\n",
    );
    let o = nllb(&["envoy-config", "--config", &cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in ["127.0.0.1", "::1", "7443", "198.18.1.2", "6443", "max_connect_attempts"] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kubeconfig_with_a_missing_input_exits_2() {
    let dir = tempdir();
    let cfg = write(&dir, "c.yaml", "services:\n  - name: apiserver\n    listen: [\"127.0.0.1:7443\"]\n    backendPort: 6443\n");
    let o = nllb(&["kubeconfig", "--in", "/nonexistent/kubelet.conf", "--out", "/tmp/x.conf", "--config", &cfg]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/kubelet.conf"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn status_without_an_agent_says_so_and_exits_1() {
    let dir = tempdir();
    let o = nllb(&["status", "--pin-path", "/sys/fs/bpf/nllb-cli-none", "--run-dir", &dir.display().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("NOT running"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}
