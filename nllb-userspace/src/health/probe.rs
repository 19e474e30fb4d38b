//! One probe of one backend: a TCP connect, or TLS + `GET <path>`.
//!
//! Probes dial the controller's own address, never a virtual address, so
//! nllb's connect rewrite leaves them alone.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::{HealthConfig, HealthError, ProbeKind, tls::TlsSettings};

/// Largest response head read before giving up on finding the status line.
const MAX_HEAD: usize = 16 * 1024;

/// How a probe's TCP handshake went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    Took(Duration),
    /// No SYN-ACK within the probe's timeout: the handshake took at least
    /// that long.
    TimedOut(Duration),
    /// Refused or unreachable: says nothing about the round trip.
    Failed,
}

/// Runs probes as `health:` says; cheap to share between probe tasks.
#[derive(Clone)]
pub struct Prober {
    kind: ProbeKind,
    timeout: Duration,
    path: Arc<str>,
    tls: Option<(TlsConnector, Arc<TlsSettings>)>,
}

impl Prober {
    pub fn new(cfg: &HealthConfig) -> Result<Self, HealthError> {
        let tls = match cfg.probe {
            ProbeKind::Tcp => None,
            ProbeKind::Https => {
                let settings = Arc::new(TlsSettings::from_config(cfg)?);
                Some((TlsConnector::from(settings.config.clone()), settings))
            }
        };
        Ok(Prober { kind: cfg.probe, timeout: cfg.timeout, path: cfg.path.as_str().into(), tls })
    }

    /// Probes `target` once, within the timeout. Ok holds the probe's
    /// latency; Err a one-line reason for status and logs.
    pub async fn probe(&self, target: SocketAddr) -> Result<Duration, String> {
        self.probe_measured(target).await.0
    }

    /// As `probe`, and how the TCP handshake went (what `passive.synTimeout:
    /// auto` is derived from).
    pub async fn probe_measured(&self, target: SocketAddr) -> (Result<Duration, String>, Handshake) {
        let start = Instant::now();
        let mut handshake = Handshake::Failed;
        let outcome = match tokio::time::timeout(self.timeout, self.run(target, &mut handshake)).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                if handshake == Handshake::Failed {
                    handshake = Handshake::TimedOut(self.timeout);
                }
                Err(format!("timed out after {}", humantime::format_duration(self.timeout)))
            }
        };
        (outcome, handshake)
    }

    async fn run(&self, target: SocketAddr, handshake: &mut Handshake) -> Result<(), String> {
        let start = Instant::now();
        let tcp = TcpStream::connect(target).await.map_err(|e| format!("connect: {e}"))?;
        *handshake = Handshake::Took(start.elapsed());
        match (&self.kind, &self.tls) {
            (ProbeKind::Https, Some((connector, settings))) => {
                // Only the request needs it; a TCP probe sends nothing.
                let _ = tcp.set_nodelay(true);
                let name = settings.name_for(target.ip());
                let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS handshake: {e}"))?;
                let host = match target {
                    SocketAddr::V4(a) => a.ip().to_string(),
                    SocketAddr::V6(a) => format!("[{}]", a.ip()),
                };
                let req = format!(
                    "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nllb-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
                    self.path
                );
                tls.write_all(req.as_bytes()).await.map_err(|e| format!("send request: {e}"))?;
                let status = read_status(&mut tls).await?;
                // Best effort: a clean TLS close spares the server a warning.
                let _ = tls.shutdown().await;
                if status == 200 { Ok(()) } else { Err(format!("GET {}: HTTP {status}", self.path)) }
            }
            _ => Ok(()),
        }
    }
}

/// Reads until the response head parses and returns its status code.
async fn read_status<S: AsyncRead + Unpin>(stream: &mut S) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("read response: {e}"))?;
        if n == 0 {
            return Err("connection closed before an HTTP response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                return resp.code.ok_or_else(|| "HTTP response without status".to_string());
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("HTTP response head too large".into()),
            Err(e) => return Err(format!("not an HTTP response: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_is_read_from_split_heads() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for part in ["HTTP/1.1 5", "03 Service Unavailable\r\nContent-Le", "ngth: 0\r\n\r\n"] {
                a.write_all(part.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        assert_eq!(read_status(&mut b).await, Ok(503));
    }

    #[tokio::test]
    async fn garbage_is_not_a_status() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"\x16\x03\x01 not http\r\n\r\n").await.unwrap();
        assert!(read_status(&mut b).await.unwrap_err().contains("not an HTTP response"));
    }

    #[tokio::test]
    async fn early_close_is_an_error() {
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(read_status(&mut b).await.is_err());
    }
}
