//! A controller that holds long-lived connections (watches, tunnels)
//! inside a test host's namespace: it greets each connection with its name,
//! echoes what it gets, counts the connections it holds, and can die (its
//! listener closes and every connection ends, as when the process is
//! killed) and come back.
//!
//! Every thread it starts sits in the host's namespace (threads inherit it),
//! so all of them end when it dies or is dropped: a thread left there
//! would keep the namespace and its veth alive after `ip netns del`.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::net::Netns;

#[derive(Default)]
struct Held {
    conns: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicU64,
    next: AtomicU64,
    dead: AtomicBool,
}

pub struct HoldServer {
    pub name: String,
    pub port: u16,
    netns: PathBuf,
    held: Arc<Held>,
    listener_fd: Option<i32>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HoldServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HoldServer({} :{}, {} held)", self.name, self.port, self.active())
    }
}

impl HoldServer {
    pub(crate) fn start(netns: &Netns, port: u16, name: &str) -> HoldServer {
        let mut s = HoldServer {
            name: name.into(),
            port,
            netns: netns.path(),
            held: Arc::default(),
            listener_fd: None,
            acceptor: None,
        };
        s.restart();
        s
    }

    /// Connections it holds right now.
    pub fn active(&self) -> usize {
        self.held.conns.lock().unwrap().len()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.held.accepted.load(Ordering::SeqCst)
    }

    /// The controller dies: connects are refused from now on and every
    /// connection it held is closed.
    pub fn kill(&mut self) {
        self.held.dead.store(true, Ordering::SeqCst);
        if let Some(fd) = self.listener_fd.take() {
            // SAFETY: the listener is owned by the acceptor thread, still open
            // until that thread (joined below) returns.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for c in self.held.conns.lock().unwrap().values() {
            let _ = c.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.held.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
    }

    /// The controller is back (same port).
    pub fn restart(&mut self) {
        assert!(self.acceptor.is_none(), "{} is already serving", self.name);
        self.held.dead.store(false, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        let (ns, port, name, held) = (self.netns.clone(), self.port, self.name.clone(), self.held.clone());
        self.acceptor = Some(std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).expect("open netns");
            nix::sched::setns(std::os::fd::AsFd::as_fd(&f), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let listener =
                TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)).expect("bind hold server");
            tx.send(listener.as_raw_fd()).unwrap();
            for conn in listener.incoming() {
                if held.dead.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { break };
                held.accepted.fetch_add(1, Ordering::SeqCst);
                if conn.write_all(format!("{name}\n").as_bytes()).is_err() {
                    continue;
                }
                let id = held.next.fetch_add(1, Ordering::SeqCst);
                let Ok(clone) = conn.try_clone() else { continue };
                held.conns.lock().unwrap().insert(id, clone);
                let h = held.clone();
                let t = std::thread::spawn(move || {
                    echo(conn);
                    h.conns.lock().unwrap().remove(&id);
                });
                held.threads.lock().unwrap().push(t);
            }
        }));
        self.listener_fd = Some(rx.recv_timeout(Duration::from_secs(10)).expect("hold server did not start"));
    }
}

/// Echoes until the peer closes or the connection is shut down.
fn echo(mut conn: TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for HoldServer {
    fn drop(&mut self) {
        self.kill();
    }
}
