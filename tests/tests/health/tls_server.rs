//! An HTTPS "API server" for probe tests: a test CA, a serving certificate
//! for the host's IPs and `controller.test`, and a `/readyz` whose answer
//! the test switches (200, 500, or never).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    thread::JoinHandle,
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
};

pub const READY: u8 = 0;
pub const FAIL: u8 = 1;
pub const HANG: u8 = 2;
/// Answer 200 once, then behave as FAIL.
pub const READY_ONCE: u8 = 3;

/// A CA and what it signed.
pub struct Pki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivatePkcs8KeyDer<'static>,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl Pki {
    pub fn new(ips: &[IpAddr]) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);

        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["controller.test".to_string()]).unwrap();
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cert = params.signed_by(&key, &issuer).unwrap();

        let ckey = KeyPair::generate().unwrap();
        let cparams = CertificateParams::new(vec!["nllb-client".to_string()]).unwrap();
        let ccert = cparams.signed_by(&ckey, &issuer).unwrap();

        Pki {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            server_chain: vec![cert.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            client_cert_pem: ccert.pem(),
            client_key_pem: ckey.serialize_pem(),
        }
    }

    pub fn write_ca(&self, dir: &Path) -> std::path::PathBuf {
        let p = dir.join("ca.crt");
        std::fs::write(&p, &self.ca_pem).unwrap();
        p
    }

    fn server_config(&self, require_client_cert: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap(),
            )
        } else {
            builder.with_no_client_auth()
        };
        let cfg = builder
            .with_single_cert(self.server_chain.clone(), PrivateKeyDer::Pkcs8(self.server_key.clone_key()))
            .unwrap();
        Arc::new(cfg)
    }
}

/// A running HTTPS server; `stop()` (or drop) closes the listener so later
/// connects are refused.
pub struct TlsServer {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TlsServer {
    /// Serves on `port` of every address of `netns` (None: the test's own
    /// namespace, bound to `127.0.0.1`).
    pub fn start(netns: Option<&Path>, port: u16, pki: &Pki, require_client_cert: bool) -> TlsServer {
        let mode = Arc::new(AtomicU8::new(READY));
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(require_client_cert));
        let netns = netns.map(Path::to_path_buf);
        let m = mode.clone();
        let thread = std::thread::spawn(move || {
            let bind: SocketAddr = match &netns {
                Some(ns) => {
                    let f = std::fs::File::open(ns).expect("open netns");
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
                }
                None => SocketAddr::from(([127, 0, 0, 1], port)),
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind(bind).await.expect("bind TLS test server");
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        conn = listener.accept() => {
                            let Ok((tcp, _)) = conn else { break };
                            let (acceptor, m) = (acceptor.clone(), m.clone());
                            tokio::spawn(async move {
                                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                                let mut buf = vec![0u8; 4096];
                                let mut got = Vec::new();
                                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                                    match tls.read(&mut buf).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(n) => got.extend_from_slice(&buf[..n]),
                                    }
                                }
                                let once = m.compare_exchange(READY_ONCE, FAIL, Ordering::SeqCst, Ordering::SeqCst);
                                let status = match m.load(Ordering::SeqCst) {
                                    _ if once.is_ok() => "200 OK",
                                    READY => "200 OK",
                                    FAIL => "500 Internal Server Error",
                                    _ => {
                                        std::future::pending::<()>().await;
                                        unreachable!()
                                    }
                                };
                                let _ = tls
                                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").as_bytes())
                                    .await;
                                let _ = tls.shutdown().await;
                            });
                        }
                    }
                }
                // Leaving the runtime drops the listener and every connection.
            });
        });
        let local = ready_rx.recv_timeout(std::time::Duration::from_secs(10)).expect("TLS server did not start");
        TlsServer { addr: local, mode, stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    pub fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
