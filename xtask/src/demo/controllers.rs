//! Simulated controllers: each a network namespace joined to the host by a
//! veth pair, with a tiny HTTP server that answers with its own name.

use crate::cmd;
use anyhow::{Context as _, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const BACKEND_PORT: u16 = 6443;

pub struct Controller {
    pub name: String,
    pub ip: Ipv4Addr,
    netns: String,
    host_veth: String,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

impl Controller {
    /// Controller `index` (1-based) gets 198.18.index.2/24, the host side 198.18.index.1/24.
    pub fn start(index: u8, unique: &str) -> Result<Self> {
        let net = format!("198.18.{index}.0/24");
        let in_use = cmd::output(Command::new("ip").args(["-o", "-4", "addr", "show", "to", &net]))?;
        if !in_use.trim().is_empty() {
            bail!(
                "{net} is already used in the host network namespace (another nllb demo or test running?): {}",
                in_use.trim()
            );
        }
        let mut c = Controller {
            name: format!("controller-{index}"),
            ip: Ipv4Addr::new(198, 18, index, 2),
            netns: format!("nllb-demo-{unique}-c{index}"),
            host_veth: format!("nd{unique}h{index}"),
            stop: Arc::new(AtomicBool::new(false)),
            server: None,
        };
        // From here on, Drop undoes whatever part was created.
        let ns = c.netns.clone();
        let hv = c.host_veth.clone();
        let ip = |args: &[&str]| cmd::output(Command::new("ip").args(args)).map(|_| ());
        ip(&["netns", "add", &ns])?;
        ip(&["link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["addr", "add", &format!("198.18.{index}.1/24"), "dev", &hv])?;
        ip(&["link", "set", &hv, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{}/24", c.ip), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        c.server = Some(serve(&ns, SocketAddr::from((c.ip, BACKEND_PORT)), &c.name, c.stop.clone())?);
        Ok(c)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // The server thread holds the namespace (its socket and its own
        // nsproxy); let it go first so deleting the namespace frees it.
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        let _ = cmd::raw_output(Command::new("ip").args(["link", "del", &self.host_veth]));
        let _ = cmd::raw_output(Command::new("ip").args(["netns", "del", &self.netns]));
    }
}

/// Serves `name` over HTTP on `addr` from a thread that entered `netns`.
/// setns(CLONE_NEWNET) affects only the calling thread, so the rest of
/// xtask stays in the host namespace.
fn serve(netns: &str, addr: SocketAddr, name: &str, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
    let ns_path = format!("/run/netns/{netns}");
    let body = name.to_owned();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let handle = std::thread::spawn(move || {
        let listener = match enter_and_bind(&ns_path, addr) {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("{e:#}")));
                return;
            }
        };
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => answer(stream, &body),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(anyhow!("controller server on {addr} in {netns}: {e}")),
        Err(_) => Err(anyhow!("controller server on {addr} in {netns} did not start")),
    }
}

fn enter_and_bind(ns_path: &str, addr: SocketAddr) -> Result<TcpListener> {
    let ns = std::fs::File::open(ns_path).with_context(|| format!("opening {ns_path}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {ns_path}"))?;
    let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn answer(mut s: TcpStream, body: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}
