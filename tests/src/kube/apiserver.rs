//! One kube-apiserver, on its controller host (its own network namespace
//! and 198.18.x.2 address), publishing itself in `default/kubernetes`
//! through the lease endpoint reconciler like every HA control plane.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{pki::KubePki, process::Process};
use crate::net::Netns;

/// The port every API server serves on, inside its own namespace.
pub const APISERVER_PORT: u16 = 6443;

/// The Service network: only allocated from (the `kubernetes` Service's
/// ClusterIP), never routed; inside the benchmarking range and outside the
/// subnets the harness leases to test hosts.
const SERVICE_CIDR: &str = "198.19.254.0/24";

/// Audit only what the tests look for: the probe requests (ConfigMaps)
/// and discovery's lists and watches (EndpointSlices), so each API
/// server's log tells which requests it served.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    resources:
      - {group: \"\", resources: [configmaps]}
      - {group: discovery.k8s.io, resources: [endpointslices]}
  - level: None
";

#[derive(Debug)]
pub struct ApiServer {
    pub ip: IpAddr,
    pub audit_log: PathBuf,
    netns: String,
    args: Vec<String>,
    log: PathBuf,
    process: Option<Process>,
}

/// What differs between control planes.
#[derive(Clone, Debug)]
pub struct ApiServerFlags {
    pub etcd_url: String,
    /// false: watches are served by etcd directly (so an etcd compaction
    /// reaches them), as with `--watch-cache=false`.
    pub watch_cache: bool,
}

impl ApiServer {
    pub fn new(
        index: usize,
        ip: IpAddr,
        netns: &Netns,
        pki: &KubePki,
        work: &Path,
        flags: &ApiServerFlags,
    ) -> ApiServer {
        let dir = work.join(format!("apiserver-{index}"));
        std::fs::create_dir_all(&dir).unwrap();
        let policy = work.join("audit-policy.yaml");
        std::fs::write(&policy, AUDIT_POLICY).unwrap();
        let audit_log = dir.join("audit.log");
        let p = |p: &Path| p.display().to_string();
        let args = vec![
            format!("--etcd-servers={}", flags.etcd_url),
            format!("--advertise-address={ip}"),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={APISERVER_PORT}"),
            "--endpoint-reconciler-type=lease".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--client-ca-file={}", p(&pki.ca_cert)),
            format!("--tls-cert-file={}", p(&pki.serving_cert)),
            format!("--tls-private-key-file={}", p(&pki.serving_key)),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p(&pki.sa_public_key)),
            format!(
                "--service-account-signing-key-file={}",
                p(&pki.sa_private_key)
            ),
            "--authorization-mode=Node,RBAC".into(),
            // deploy/daemonset.yaml's bpffs init container is privileged.
            "--allow-privileged=true".into(),
            // Fewer objects and goroutines at start-up on a 2-core machine.
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", p(&dir)),
            format!("--audit-policy-file={}", p(&policy)),
            format!("--audit-log-path={}", p(&audit_log)),
            format!("--watch-cache={}", flags.watch_cache),
        ];
        ApiServer {
            ip,
            audit_log,
            netns: netns.name.clone(),
            args,
            log: dir.join("apiserver.log"),
            process: None,
        }
    }

    pub fn start(&mut self, bin: &Path, netns: &Netns) {
        assert!(
            self.process.is_none(),
            "kube-apiserver on {} is already running",
            self.ip
        );
        assert_eq!(netns.name, self.netns);
        let mut cmd = Command::new(bin);
        cmd.args(&self.args);
        self.process = Some(Process::spawn(
            &format!("kube-apiserver {}", self.ip),
            cmd,
            Some(netns),
            &self.log,
        ));
    }

    /// SIGTERM: a graceful shutdown (the lease reconciler removes this
    /// server from `default/kubernetes` on the way out).
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut p) = self.process.take() {
            p.stop(grace);
        }
    }

    pub fn running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::running)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::pid)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        super::process::tail(&self.log, lines)
    }

    /// The audit events this server logged so far (one JSON per line,
    /// stage ResponseComplete or ResponseStarted).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
