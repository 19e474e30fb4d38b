//! Envoy's admin interface, read in the background.
//!
//! An [`AdminPoller`] asks `/clusters` every [`POLL_EVERY`] on a thread of
//! its own (a small tokio runtime, hyper as the HTTP client) and publishes
//! the per-controller connection counters on a watch channel. Whoever wants
//! the counters reads the latest snapshot: nothing the agent calls ever
//! waits on Envoy's admin, however slow or dead it is.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::sync::{oneshot, watch};

use crate::datapath::{BackendCounters, ServiceSnapshot};

/// How often `/clusters` is read: the agent's tick.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// One admin request may take this long (connect included).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// The latest counters, refreshed in the background; stops on drop.
pub struct AdminPoller {
    latest: watch::Receiver<Arc<Vec<ServiceSnapshot>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AdminPoller {
    /// Starts polling Envoy's admin on `127.0.0.1:port`.
    pub fn spawn(port: u16) -> std::io::Result<AdminPoller> {
        let (tx, latest) = watch::channel(Arc::new(Vec::new()));
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new()
            .name("envoy-admin".into())
            .spawn(move || runtime.block_on(poll(port, tx, stopped)))?;
        Ok(AdminPoller { latest, stop: Some(stop), thread: Some(thread) })
    }

    /// The counters of the last poll; empty while Envoy's admin does not
    /// answer (Envoy down or starting).
    pub fn latest(&self) -> Vec<ServiceSnapshot> {
        self.latest.borrow().as_ref().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<ServiceSnapshot>>> {
        self.latest.clone()
    }
}

impl Drop for AdminPoller {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn poll(port: u16, tx: watch::Sender<Arc<Vec<ServiceSnapshot>>>, mut stopped: oneshot::Receiver<()>) {
    let mut every = tokio::time::interval(POLL_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = every.tick() => {}
        }
        // Stopping does not wait for a request in flight.
        let answer = tokio::select! {
            _ = &mut stopped => return,
            answer = get(port, "/clusters?format=json") => answer,
        };
        let counters = match answer {
            Ok(body) => parse_cluster_counters(&body),
            Err(e) => {
                tracing::debug!(error = %e, "envoy admin /clusters");
                Vec::new()
            }
        };
        tx.send_if_modified(|cur| {
            let changed = **cur != counters;
            if changed {
                *cur = Arc::new(counters);
            }
            changed
        });
    }
}

/// A GET on Envoy's loopback admin interface; the body.
pub async fn get(port: u16, path: &str) -> Result<String, String> {
    let request = async {
        let stream = tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // The connection task ends with the request (or the timeout).
        let conn = tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, "localhost")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        conn.abort();
        if !status.is_success() {
            return Err(format!("{path}: HTTP {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| format!("{path}: no answer in {REQUEST_TIMEOUT:?}"))?
}

/// `cx_total` of every host of every cluster in `/clusters?format=json`.
pub fn parse_cluster_counters(body: &str) -> Vec<ServiceSnapshot> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let empty = Vec::new();
    let mut out = Vec::new();
    for c in v["cluster_statuses"].as_array().unwrap_or(&empty) {
        let mut backends = std::collections::BTreeMap::new();
        for h in c["host_statuses"].as_array().unwrap_or(&empty) {
            let sa = &h["address"]["socket_address"];
            let Some(addr) = sa["address"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .zip(sa["port_value"].as_u64().and_then(|p| u16::try_from(p).ok()))
                .map(|(ip, port)| SocketAddr::new(ip, port))
            else {
                continue;
            };
            let total = h["stats"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .find(|s| s["name"] == "cx_total")
                .and_then(|s| s["value"].as_u64().or_else(|| s["value"].as_str()?.parse().ok()))
                .unwrap_or(0);
            backends.insert(addr, BackendCounters { connects: total, ..Default::default() });
        }
        if let Some(name) = c["name"].as_str() {
            out.push(ServiceSnapshot { name: name.to_string(), backends, ..Default::default() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_counters_parse() {
        let body = r#"{"cluster_statuses":[{"name":"apiserver","host_statuses":[
            {"address":{"socket_address":{"address":"198.18.1.2","port_value":6443}},
             "stats":[{"name":"cx_active","value":"1"},{"name":"cx_total","value":"7"}]},
            {"address":{"socket_address":{"address":"2001:db8::2","port_value":6443}},
             "stats":[{"name":"cx_total","value":3}]}]}]}"#;
        let c = parse_cluster_counters(body);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "apiserver");
        assert_eq!(
            c[0].backends.iter().map(|(a, c)| (*a, c.connects)).collect::<Vec<_>>(),
            vec![("198.18.1.2:6443".parse().unwrap(), 7), ("[2001:db8::2]:6443".parse().unwrap(), 3)]
        );
        assert!(parse_cluster_counters("not json").is_empty());
    }

    /// An admin that answers `/clusters` with a chunked body, as Envoy does.
    fn chunked_admin(body: &'static str) -> u16 {
        use std::io::{Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let (a, b) = body.split_at(body.len() / 2);
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                    a.len(),
                    b.len()
                );
            }
        });
        port
    }

    #[test]
    fn the_poller_publishes_counters_from_a_chunked_answer() {
        let port = chunked_admin(
            r#"{"cluster_statuses":[{"name":"apiserver","host_statuses":[{"address":{"socket_address":{"address":"198.18.1.2","port_value":6443}},"stats":[{"name":"cx_total","value":"4"}]}]}]}"#,
        );
        let poller = AdminPoller::spawn(port).unwrap();
        let mut rx = poller.subscribe();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| !c.is_empty())).await.unwrap().unwrap();
        });
        assert_eq!(poller.latest()[0].backends.iter().map(|(a, c)| (*a, c.connects)).collect::<Vec<_>>(), vec![("198.18.1.2:6443".parse().unwrap(), 4)]);
    }

    #[test]
    fn latest_never_waits_for_a_silent_admin() {
        // Accepts connections (kernel backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let poller = AdminPoller::spawn(silent.local_addr().unwrap().port()).unwrap();
        // Over more than one request timeout, every read is immediate.
        let until = std::time::Instant::now() + REQUEST_TIMEOUT * 2;
        while std::time::Instant::now() < until {
            let t = std::time::Instant::now();
            assert!(poller.latest().is_empty());
            assert!(t.elapsed() < Duration::from_millis(50), "latest() waited {:?}", t.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        let t = std::time::Instant::now();
        drop(poller);
        assert!(t.elapsed() < REQUEST_TIMEOUT, "stopping waited for the request: {:?}", t.elapsed());
    }

    #[test]
    fn a_dead_admin_port_answers_an_error_within_the_timeout() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert!(rt.block_on(get(port, "/clusters")).is_err());
    }
}
