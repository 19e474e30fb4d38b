//! A real Kubernetes control plane for end-to-end tests: one etcd and N
//! kube-apiservers, each on its own controller host (network namespace,
//! 198.18.x.2), with a PKI made by the test, ServiceAccount keys, and an
//! admin identity. The binaries are the ones `cargo xtask setup --kube`
//! builds from the Go modules pinned in `tests/kube/go.mod`.
//!
//! Everything (processes by pid, namespaces, files) goes on drop, also
//! when the test fails; a control plane holds a lock so the tests of one
//! binary never run two at once on a 2-core machine.

mod apiserver;
mod etcd;
mod kubectl;
mod pki;
mod process;
pub mod sockets;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

pub use apiserver::{APISERVER_PORT, ApiServer};
pub use kubectl::{Kubectl, KubectlRun};
pub use pki::{ClientCert, KubePki, SERVICE_NAMES};

use crate::{net::TestNet, wait_for};
use process::WorkDir;

/// Where `cargo xtask setup --kube` put kube-apiserver and etcd:
/// `NLLB_KUBE_BIN_DIR`, else `$NLLB_CACHE/kube/<versions>` (versions from
/// tests/kube/go.mod). None (the test skips) only outside CI when they
/// were never built; under CI a missing binary fails the test.
pub fn kube_bin_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("NLLB_KUBE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(default_bin_dir);
    let missing: Vec<&str> = ["kube-apiserver", "etcd"]
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    let why = format!(
        "{} missing in {}: run `cargo xtask setup --kube`",
        missing.join(" and "),
        dir.display()
    );
    if std::env::var_os("NLLB_IN_VM").is_some() {
        eprintln!("SKIPPED in the kernel-matrix guest (no control plane in the initramfs): {why}");
        return None;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

fn default_bin_dir() -> PathBuf {
    let cache = std::env::var_os("NLLB_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/nllb")
        });
    let go_mod = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/go.mod");
    let text = std::fs::read_to_string(&go_mod)
        .unwrap_or_else(|e| panic!("read {}: {e}", go_mod.display()));
    let required = |module: &str| {
        text.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(module))
                    .then(|| w.next().map(str::to_string))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("{} does not require {module}", go_mod.display()))
    };
    // The same name xtask's kube step gives the directory.
    cache.join("kube").join(format!(
        "{}-etcd-{}",
        required("k8s.io/kubernetes"),
        required("go.etcd.io/etcd/server/v3")
    ))
}

/// The root-namespace end of a controller host's veth (198.18.x.1).
pub fn gateway_of(controller: IpAddr) -> IpAddr {
    match controller {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], 1))
        }
        IpAddr::V6(_) => panic!("controllers are reached over IPv4"),
    }
}

/// Polls `curl ARGS` until `done(http_code, body)`; false on timeout.
fn wait_http(timeout: Duration, args: &[&str], mut done: impl FnMut(u16, &str) -> bool) -> bool {
    wait_for(timeout, || {
        let (code, body) = curl(args);
        done(code, &body).then_some(())
    })
    .is_some()
}

/// `curl ARGS`, returning (HTTP status, body); status 0 when it failed.
fn curl(args: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["--max-time", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[derive(Clone, Debug)]
pub struct ControlPlaneOpts {
    pub apiservers: usize,
    /// The API servers' watch cache (on in every real cluster); off to let
    /// an etcd compaction reach the watches directly.
    pub watch_cache: bool,
}

impl Default for ControlPlaneOpts {
    fn default() -> Self {
        ControlPlaneOpts {
            apiservers: 3,
            watch_cache: true,
        }
    }
}

/// How long an API server may take to become ready on a loaded 2-core machine.
pub const APISERVER_START: Duration = Duration::from_secs(180);

/// Field order is drop order: API servers, then etcd, then the hosts.
#[derive(Debug)]
pub struct ControlPlane {
    apiservers: Vec<ApiServer>,
    powered_off: Vec<bool>,
    pub etcd: etcd::Etcd,
    pub pki: KubePki,
    net: TestNet,
    bin_dir: PathBuf,
    work: WorkDir,
    _exclusive: MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

impl ControlPlane {
    /// Starts etcd and `opts.apiservers` API servers and waits until every
    /// one is ready and listed in the `kubernetes` EndpointSlice. None when
    /// the test must skip (not root outside CI, binaries never built).
    pub fn start(opts: &ControlPlaneOpts) -> Option<ControlPlane> {
        if !crate::privileged() {
            return None;
        }
        let bin_dir = kube_bin_dir()?;
        let exclusive = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let work = WorkDir(std::env::temp_dir().join(crate::unique_name("nllb-kube-")));
        std::fs::create_dir_all(&work.0).unwrap();
        let net = TestNet::new(opts.apiservers);
        let ips: Vec<IpAddr> = net.hosts().iter().map(|h| h.v4).collect();
        let pki = KubePki::new(&work.0.join("pki"), &ips);
        let gateways: Vec<IpAddr> = ips.iter().map(|ip| gateway_of(*ip)).collect();
        let etcd = etcd::Etcd::start(&bin_dir.join("etcd"), &work.0, &gateways);
        let apiservers = net
            .hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let flags = apiserver::ApiServerFlags {
                    etcd_url: etcd.url_for(h.v4),
                    watch_cache: opts.watch_cache,
                };
                ApiServer::new(i, h.v4, &h.netns, &pki, &work.0, &flags)
            })
            .collect();
        let mut cp = ControlPlane {
            apiservers,
            powered_off: vec![false; opts.apiservers],
            etcd,
            pki,
            net,
            bin_dir,
            work,
            _exclusive: exclusive,
        };
        // The first one alone: API servers starting together on an empty
        // etcd race to create the Service IP allocator, and the losers exit
        // ("another caller has already initialized the resource"), as
        // kubeadm's one-node-first bootstrap avoids. The others then start
        // together.
        cp.start_apiserver(0);
        for i in 1..opts.apiservers {
            cp.start_apiserver_nowait(i);
        }
        for i in 1..opts.apiservers {
            cp.wait_ready(i);
        }
        let all: BTreeSet<IpAddr> = ips.iter().copied().collect();
        cp.wait_published(&all, APISERVER_START);
        Some(cp)
    }

    pub fn work_dir(&self) -> &Path {
        &self.work.0
    }

    pub fn controllers(&self) -> Vec<IpAddr> {
        self.apiservers.iter().map(|a| a.ip).collect()
    }

    pub fn apiserver(&self, i: usize) -> &ApiServer {
        &self.apiservers[i]
    }

    pub fn net(&self) -> &TestNet {
        &self.net
    }

    /// `https://<controller i>:6443`
    pub fn url(&self, i: usize) -> String {
        format!("https://{}:{APISERVER_PORT}", self.apiservers[i].ip)
    }

    /// The first controller that is running and not powered off.
    fn live(&mut self) -> usize {
        (0..self.apiservers.len())
            .find(|&i| !self.powered_off[i] && self.apiservers[i].running())
            .expect("no API server is up")
    }

    /// A kubeconfig at `path` for `server`, authenticating as `auth`.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        server: &str,
        auth: &KubeAuth,
        tls_server_name: Option<&str>,
    ) {
        let user = match auth {
            KubeAuth::Cert(c) => {
                format!(
                    "client-certificate: {}\n      client-key: {}",
                    c.cert.display(),
                    c.key.display()
                )
            }
            KubeAuth::TokenFile(f) => format!("tokenFile: {}", f.display()),
        };
        let sni = tls_server_name
            .map(|n| format!("\n      tls-server-name: {n}"))
            .unwrap_or_default();
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n  - name: test\n    cluster:\n      server: {server}\n      certificate-authority: {ca}{sni}\nusers:\n  - name: test\n    user:\n      {user}\ncontexts:\n  - name: test\n    context:\n      cluster: test\n      user: test\ncurrent-context: test\n",
            ca = self.pki.ca_cert.display(),
        );
        std::fs::write(path, yaml).unwrap();
    }

    /// kubectl as cluster admin, straight to a controller that is up.
    pub fn admin(&mut self) -> Kubectl {
        let i = self.live();
        let path = self.work.0.join(format!("admin-{i}.kubeconfig"));
        let admin = KubeAuth::Cert(self.pki.admin.clone());
        self.write_kubeconfig(&path, &self.url(i), &admin, None);
        Kubectl::new(&path, &self.work.0.join("kubectl-admin"))
    }

    /// GET `path` on controller i as admin: (status, body).
    pub fn get(&self, i: usize, path: &str) -> (u16, String) {
        self.reader(i).get(path)
    }

    /// A reader of controller i's API as admin that can move to another
    /// thread (e.g. to record when the EndpointSlice changes).
    pub fn reader(&self, i: usize) -> AdminReader {
        AdminReader {
            base: self.url(i),
            ca: self.pki.ca_cert.clone(),
            cert: self.pki.admin.cert.clone(),
            key: self.pki.admin.key.clone(),
        }
    }

    fn wait_ready(&mut self, i: usize) {
        let mut exited = false;
        let ready = wait_for(APISERVER_START, || {
            if !self.apiservers[i].running() {
                exited = true;
                return Some(false);
            }
            (self.get(i, "/readyz").0 == 200).then_some(true)
        });
        if ready != Some(true) {
            panic!(
                "kube-apiserver on {} not ready (exited: {exited}); log:\n{}\netcd:\n{}",
                self.apiservers[i].ip,
                self.apiservers[i].log_tail(60),
                self.etcd.log_tail(20)
            );
        }
    }

    fn start_apiserver_nowait(&mut self, i: usize) {
        let bin = self.bin_dir.join("kube-apiserver");
        self.apiservers[i].start(&bin, &self.net.hosts()[i].netns);
    }

    /// Starts API server i again (after [`stop_apiserver`]) and waits until
    /// it is ready.
    pub fn start_apiserver(&mut self, i: usize) {
        self.start_apiserver_nowait(i);
        self.wait_ready(i);
    }

    /// Graceful stop (SIGTERM): it removes itself from the endpoints.
    pub fn stop_apiserver(&mut self, i: usize) {
        self.apiservers[i].stop(Duration::from_secs(60));
    }

    /// The controller's host goes silent: every packet to it is dropped
    /// (no RST, no ICMP), its API server loses etcd too. The process keeps
    /// running, as on a machine whose network died.
    pub fn power_off(&mut self, i: usize) {
        self.net.hosts()[i].blackhole();
        self.powered_off[i] = true;
    }

    pub fn power_on(&mut self, i: usize) {
        self.net.hosts()[i].unblackhole();
        self.powered_off[i] = false;
    }

    /// The ready addresses of the `default/kubernetes` EndpointSlice, read
    /// from a live controller; None when it cannot be read.
    pub fn published(&mut self) -> Option<BTreeSet<IpAddr>> {
        let i = self.live();
        self.reader(i).published()
    }

    /// Waits until the EndpointSlice lists exactly `want`.
    pub fn wait_published(&mut self, want: &BTreeSet<IpAddr>, timeout: Duration) {
        let mut last = None;
        let ok = wait_for(timeout, || {
            last = self.published();
            (last.as_ref() == Some(want)).then_some(())
        });
        assert!(
            ok.is_some(),
            "the kubernetes EndpointSlice never listed {want:?} (last: {last:?})"
        );
    }

    /// A token for a ServiceAccount (TokenRequest, as kubelet mounts it),
    /// written to a file in the work directory.
    pub fn service_account_token(&mut self, namespace: &str, name: &str) -> PathBuf {
        let token =
            self.admin()
                .ok(&["create", "token", name, "-n", namespace, "--duration", "2h"]);
        let path = self.work.0.join(format!("token-{namespace}-{name}"));
        std::fs::write(&path, token.trim()).unwrap();
        path
    }

    /// Logs of every API server and etcd, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for a in &self.apiservers {
            out += &format!("--- kube-apiserver {} ---\n{}\n", a.ip, a.log_tail(lines));
        }
        out + &format!("--- etcd ---\n{}\n", self.etcd.log_tail(lines))
    }
}

/// Admin GETs against one controller, by `curl`.
#[derive(Clone, Debug)]
pub struct AdminReader {
    base: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl AdminReader {
    /// (HTTP status, body); status 0 when the request failed.
    pub fn get(&self, path: &str) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        let s = |p: &Path| p.display().to_string();
        curl(&[
            "-sS",
            "--cacert",
            &s(&self.ca),
            "--cert",
            &s(&self.cert),
            "--key",
            &s(&self.key),
            &url,
        ])
    }

    /// The ready addresses of the `default/kubernetes` EndpointSlice.
    pub fn published(&self) -> Option<BTreeSet<IpAddr>> {
        let (code, body) =
            self.get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes");
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let mut out = BTreeSet::new();
        for ep in v["endpoints"].as_array().into_iter().flatten() {
            if ep["conditions"]["ready"].as_bool() == Some(false) {
                continue;
            }
            for a in ep["addresses"].as_array().into_iter().flatten() {
                out.extend(a.as_str().and_then(|s| s.parse::<IpAddr>().ok()));
            }
        }
        Some(out)
    }
}

/// How a kubeconfig authenticates.
#[derive(Clone, Debug)]
pub enum KubeAuth {
    Cert(ClientCert),
    TokenFile(PathBuf),
}
