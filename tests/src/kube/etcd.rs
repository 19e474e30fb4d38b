//! One etcd for a test control plane, in the root network namespace: it
//! listens on loopback and on the root end of every controller's veth, so
//! each API server reaches it over its own link (a powered-off controller
//! loses etcd too) and nothing has to forward between namespaces.

use std::{net::IpAddr, path::Path, process::Command, time::Duration};

use super::{process::Process, wait_http};
use crate::free_port;

#[derive(Debug)]
pub struct Etcd {
    process: Process,
    pub port: u16,
}

impl Etcd {
    pub fn start(bin: &Path, work: &Path, listen: &[IpAddr]) -> Etcd {
        let port = free_port();
        let peer = free_port();
        let mut clients = vec![format!("http://127.0.0.1:{port}")];
        clients.extend(listen.iter().map(|ip| format!("http://{ip}:{port}")));
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "nllb-test"])
            .arg("--data-dir")
            .arg(work.join("etcd-data"))
            .args(["--listen-client-urls", &clients.join(",")])
            .args(["--advertise-client-urls", &clients[0]])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("nllb-test={peer_url}")])
            // A test cluster: losing it in a crash costs nothing, and fsync on
            // a machine busy with builds would slow every write.
            .arg("--unsafe-no-fsync")
            .args(["--log-level", "warn"]);
        let process = Process::spawn("etcd", cmd, None, &work.join("etcd.log"));
        let etcd = Etcd { process, port };
        let health = format!("http://127.0.0.1:{port}/health");
        if !wait_http(Duration::from_secs(60), &["-sS", &health], |_, body| {
            body.contains("\"health\":\"true\"")
        }) {
            panic!(
                "etcd did not become healthy; log:\n{}",
                etcd.process.log_tail(40)
            );
        }
        etcd
    }

    /// The URL an API server on `controller` uses: the root end of its veth.
    pub fn url_for(&self, controller: IpAddr) -> String {
        format!("http://{}:{}", super::gateway_of(controller), self.port)
    }

    /// The current revision of the store (etcd's JSON gateway).
    pub fn revision(&self) -> u64 {
        let body = self.post("/v3/kv/range", r#"{"key":"AA=="}"#);
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("etcd range: {e}: {body}"));
        v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {body}"))
    }

    /// Compacts the history up to the current revision, as the API server's
    /// own compactor does every few minutes: watches that resume from an
    /// older resourceVersion get `410 Gone`. Returns that revision.
    pub fn compact(&self) -> u64 {
        let rev = self.revision();
        let body = self.post(
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{rev}","physical":true}}"#),
        );
        assert!(body.contains("header"), "etcd compaction failed: {body}");
        rev
    }

    fn post(&self, path: &str, json: &str) -> String {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        crate::sh(
            "curl",
            &["-sS", "--max-time", "10", "-X", "POST", "-d", json, &url],
        )
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
