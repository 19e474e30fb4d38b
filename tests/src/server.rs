//! A tiny HTTP server inside a test host's namespace that names itself.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::net::Netns;

/// How `/readyz` is answered (other paths always get 200 and the name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Readyz {
    Ok = 0,
    Fail = 1,
    Hang = 2,
}

#[derive(Debug)]
pub struct Server {
    pub port: u16,
    pub name: String,
    served: Arc<AtomicU64>,
    readyz: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    listener_fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub(crate) fn start(netns: &Netns, port: u16, name: &str) -> Server {
        let (tx, rx) = std::sync::mpsc::channel();
        let served = Arc::new(AtomicU64::new(0));
        let readyz = Arc::new(AtomicU8::new(Readyz::Ok as u8));
        let stop = Arc::new(AtomicBool::new(false));
        let ns_path = netns.path();
        let (s2, r2, st2, body) = (served.clone(), readyz.clone(), stop.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns_path).expect("open netns");
            nix::sched::setns(std::os::fd::AsFd::as_fd(&f), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns");
            // One dual-stack socket serves the host's IPv4 and IPv6 address.
            let listener = TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
                .expect("bind test server");
            tx.send(listener.as_raw_fd()).unwrap();
            for conn in listener.incoming() {
                if st2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { break };
                s2.fetch_add(1, Ordering::Relaxed);
                let (r3, body) = (r2.clone(), body.clone());
                std::thread::spawn(move || answer(conn, &body, &r3));
            }
        });
        let listener_fd = rx.recv_timeout(Duration::from_secs(10)).expect("test server did not start");
        Server { port, name: name.into(), served, readyz, stop, listener_fd, thread: Some(thread) }
    }

    /// Connections accepted so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub fn set_readyz(&self, r: Readyz) {
        self.readyz.store(r as u8, Ordering::SeqCst);
    }

    /// Close the listening socket: later connects are refused (RST).
    pub fn stop(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // shutdown() wakes the blocked accept(); the thread then drops the socket.
        // SAFETY: the fd belongs to the listener owned by our thread, still open.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(mut conn: TcpStream, name: &str, readyz: &AtomicU8) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 2048];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    // The client address as this server sees it (IPv4 clients arrive
    // v4-mapped on the dual-stack socket): tells a direct client from a proxy.
    let peer = conn.peer_addr().map(|p| SocketAddr::new(p.ip().to_canonical(), p.port()).to_string()).unwrap_or_default();
    let request = String::from_utf8_lossy(&got);
    let is_readyz = request.starts_with("GET /readyz");
    let (status, body) = match (is_readyz, readyz.load(Ordering::SeqCst)) {
        (true, 1) => ("500 Internal Server Error", "not ready".to_string()),
        (true, 2) => {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        (true, _) => ("200 OK", "ok".to_string()),
        _ => ("200 OK", name.to_string()),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nX-Peer: {peer}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
