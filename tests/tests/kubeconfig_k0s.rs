//! `nllb kubeconfig` and `--k0s-config` on real-looking files.

use std::os::unix::fs::PermissionsExt;

use nllb::{
    config::Config,
    k0s::services_from_k0s,
    kubeconfig::{KubeconfigArgs, KubeconfigError, rewrite_kubeconfig, service_server},
};
use nllb_tests::fake_apiserver::{FakeApiServer, endpoint_slice};
use serde_json::Value;

/// Shaped like k0s's /var/lib/k0s/kubelet.conf (bootstrap-rotated client
/// certs by path), plus an unknown field and a second, unused cluster.
const KUBELET_CONF: &str = r#"apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
    server: https://198.18.1.2:6443
    tls-server-name: kubernetes.default.svc
    extensions:
    - name: client.authentication.k8s.io/exec
      extension:
        audience: kubelet
  name: local
- cluster:
    server: https://198.18.99.2:6443
  name: unused
contexts:
- context:
    cluster: local
    namespace: default
    user: user
  name: Default
current-context: Default
kind: Config
preferences: {}
users:
- name: user
  user:
    client-certificate: /var/lib/k0s/kubelet/pki/kubelet-client-current.pem
    client-key: /var/lib/k0s/kubelet/pki/kubelet-client-current.pem
x-vendor-field:
  kept: true
"#;

const AGENT_CONFIG: &str = r#"
services:
  - name: apiserver
    listen: ["[::1]:7443", "127.0.0.1:7443"]
    backendPort: 6443
  - name: v6only
    listen: ["[::1]:7444"]
    backendPort: 6443
"#;

#[test]
fn rewrites_the_current_server_and_keeps_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("kubelet.conf");
    let output = dir.path().join("kubelet-nllb.conf");
    std::fs::write(&input, KUBELET_CONF).unwrap();
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o640)).unwrap();

    let original = rewrite_kubeconfig(&input, &output, "https://127.0.0.1:7443").unwrap();
    assert_eq!(original, "https://198.18.1.2:6443");

    let mut before: Value = serde_saphyr::from_str(KUBELET_CONF).unwrap();
    let after: Value = serde_saphyr::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    assert_eq!(after["clusters"][0]["cluster"]["server"], Value::from("https://127.0.0.1:7443"));
    // Apart from that one field the document is identical, unknown fields included.
    before["clusters"][0]["cluster"]["server"] = Value::from("https://127.0.0.1:7443");
    assert_eq!(after, before);
    let mode = std::fs::metadata(&output).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "output keeps the input's mode");
    // The input is untouched; no temp file is left.
    assert_eq!(std::fs::read_to_string(&input).unwrap(), KUBELET_CONF);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn rewrite_in_place_is_atomic_and_keeps_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubelet.conf");
    std::fs::write(&path, KUBELET_CONF).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ino_before = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    rewrite_kubeconfig(&path, &path, "https://[::1]:7443").unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    // A new inode: renamed into place, never truncated and rewritten.
    assert_ne!(std::os::unix::fs::MetadataExt::ino(&meta), ino_before);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    // Running it again reports the virtual address as the original.
    assert_eq!(rewrite_kubeconfig(&path, &path, "https://[::1]:7443").unwrap(), "https://[::1]:7443");
}

#[test]
fn bad_kubeconfigs_are_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("k.conf");
    let out = dir.path().join("out.conf");
    std::fs::write(&input, KUBELET_CONF.replace("current-context: Default", "current-context: Missing")).unwrap();
    let e = rewrite_kubeconfig(&input, &out, "https://127.0.0.1:7443").unwrap_err();
    assert!(matches!(e, KubeconfigError::Shape { .. }), "{e}");
    assert!(e.to_string().contains("k.conf") && e.to_string().contains("Missing"), "{e}");
    assert!(!out.exists());
    let e = rewrite_kubeconfig(&dir.path().join("nope"), &out, "https://127.0.0.1:7443").unwrap_err();
    assert!(matches!(e, KubeconfigError::Read { .. }), "{e}");
}

#[test]
fn service_server_is_the_first_ipv4_virtual_address() {
    let config = Config::parse(AGENT_CONFIG).unwrap();
    assert_eq!(service_server(&config, "apiserver").unwrap(), "https://127.0.0.1:7443");
    assert_eq!(service_server(&config, "v6only").unwrap(), "https://[::1]:7444");
    let e = service_server(&config, "konnectivity").unwrap_err();
    assert_eq!(e.field, "--service");
}

#[test]
fn kubeconfig_command_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nllb.yaml");
    std::fs::write(&cfg, AGENT_CONFIG).unwrap();
    let input = dir.path().join("kubelet.conf");
    std::fs::write(&input, KUBELET_CONF).unwrap();
    let args = KubeconfigArgs {
        input: input.clone(),
        output: dir.path().join("out.conf"),
        service: "apiserver".into(),
        config: cfg,
        k0s_config: None,
    };
    assert_eq!(nllb::kubeconfig::run(&args).unwrap(), "https://198.18.1.2:6443");
    let after: Value = serde_saphyr::from_str(&std::fs::read_to_string(&args.output).unwrap()).unwrap();
    assert_eq!(after["clusters"][0]["cluster"]["server"], Value::from("https://127.0.0.1:7443"));
}

/// The rewritten kubeconfig still works as a client config: TLS trust and
/// credentials survive the round trip (kube-rs against the fake API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_kubeconfig_still_authenticates_against_the_api() {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let api = FakeApiServer::start();
    api.apply_slice(&endpoint_slice("default", "kubernetes", "kubernetes", &[("198.18.1.2", true)]));
    let dir = tempfile::tempdir().unwrap();
    let input = api.write_kubeconfig(dir.path(), "https://198.18.1.2:6443");
    let output = dir.path().join("rewritten.conf");
    let original = rewrite_kubeconfig(&input, &output, &api.url()).unwrap();
    assert_eq!(original, "https://198.18.1.2:6443");
    let kc = kube::config::Kubeconfig::read_from(&output).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "default");
    let list = slices.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
}

/// What `k0s config create` writes, trimmed to the relevant parts, with
/// non-default ports.
const K0S_YAML: &str = r#"apiVersion: k0s.k0sproject.io/v1beta1
kind: ClusterConfig
metadata:
  name: k0s
spec:
  api:
    address: 198.18.1.2
    k0sApiPort: 9443
    port: 16443
    sans:
    - 198.18.1.2
  konnectivity:
    adminPort: 8133
    agentPort: 18132
  network:
    kubeProxy:
      mode: iptables
    nodeLocalLoadBalancing:
      enabled: true
      envoyProxy:
        apiServerBindPort: 17443
        image:
          image: quay.io/k0sproject/envoy-distroless
          version: v1.31.5
        konnectivityServerBindPort: 17132
      type: EnvoyProxy
    provider: kuberouter
  storage:
    type: etcd
"#;

#[test]
fn k0s_config_gives_both_services_on_both_families() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k0s.yaml");
    std::fs::write(&path, K0S_YAML).unwrap();
    let s = services_from_k0s(&path).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].name, "apiserver");
    assert_eq!(s[0].listen, vec!["127.0.0.1:17443".parse().unwrap(), "[::1]:17443".parse().unwrap()]);
    assert_eq!(s[0].backend_port, 16443);
    assert_eq!(s[1].name, "konnectivity");
    assert_eq!(s[1].listen, vec!["127.0.0.1:17132".parse().unwrap(), "[::1]:17132".parse().unwrap()]);
    assert_eq!(s[1].backend_port, 18132);
}

#[test]
fn k0s_defaults_and_the_flat_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k0s.yaml");
    std::fs::write(&path, "apiVersion: k0s.k0sproject.io/v1beta1\nkind: ClusterConfig\nspec:\n  network:\n    nodeLocalLoadBalancing:\n      enabled: true\n").unwrap();
    let s = services_from_k0s(&path).unwrap();
    assert_eq!((s[0].listen[0].port(), s[0].backend_port), (7443, 6443));
    assert_eq!((s[1].listen[0].port(), s[1].backend_port), (7132, 8132));
    std::fs::write(&path, "spec:\n  network:\n    nodeLocalLoadBalancing:\n      apiServerBindPort: 7555\n").unwrap();
    assert_eq!(services_from_k0s(&path).unwrap()[0].listen[1], "[::1]:7555".parse().unwrap());
}

#[test]
fn k0s_bad_values_name_the_k0s_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k0s.yaml");
    for (from, to, field) in [
        ("port: 16443", "port: 0", "spec.api.port"),
        ("agentPort: 18132", "agentPort: \"x\"", "spec.konnectivity.agentPort"),
        (
            "apiServerBindPort: 17443",
            "apiServerBindPort: 99999",
            "spec.network.nodeLocalLoadBalancing.envoyProxy.apiServerBindPort",
        ),
        (
            "konnectivityServerBindPort: 17132",
            "konnectivityServerBindPort: 17443",
            "spec.network.nodeLocalLoadBalancing.envoyProxy.konnectivityServerBindPort",
        ),
    ] {
        std::fs::write(&path, K0S_YAML.replace(from, to)).unwrap();
        let e = services_from_k0s(&path).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains("k0s.yaml"), "{e}");
    }
    let e = services_from_k0s(&dir.path().join("missing.yaml")).unwrap_err();
    assert_eq!(e.field, "--k0s-config");
}

/// A copy written to another directory still names the same certificate
/// files; one written beside the input is left byte-for-byte alike.
#[test]
fn relative_certificate_paths_survive_a_copy_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("k0s");
    let dst = dir.path().join("out");
    std::fs::create_dir_all(src.join("pki")).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let input = src.join("kubelet.conf");
    std::fs::write(&input, KUBELET_CONF.replace("/var/lib/k0s/kubelet/pki/", "pki/")).unwrap();

    rewrite_kubeconfig(&input, &dst.join("kubelet.conf"), "https://127.0.0.1:7443").unwrap();
    let moved: Value = serde_saphyr::from_str(&std::fs::read_to_string(dst.join("kubelet.conf")).unwrap()).unwrap();
    let abs = std::fs::canonicalize(&src).unwrap().join("pki/kubelet-client-current.pem");
    assert_eq!(moved["users"][0]["user"]["client-certificate"], Value::from(abs.to_str().unwrap()));

    rewrite_kubeconfig(&input, &src.join("kubelet-nllb.conf"), "https://127.0.0.1:7443").unwrap();
    let beside: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(src.join("kubelet-nllb.conf")).unwrap()).unwrap();
    assert_eq!(beside["users"][0]["user"]["client-certificate"], Value::from("pki/kubelet-client-current.pem"));
}
