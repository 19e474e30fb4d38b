//! The backends every path is measured against: per simulated controller an
//! HTTP echo server (small response, closes after a `Connection: close`
//! request) and a bulk source (writes until the peer goes away).
//!
//! Listeners are bound by a short-lived thread that enters the host's network
//! namespace; a socket stays in the namespace it was created in, so all
//! backends can then be served by one runtime pinned to the "controller" core.

use std::{fs::File, net::SocketAddr, os::fd::AsRawFd, time::Duration};

use anyhow::Context;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    task::JoinHandle,
};

use nllb_tests::TestHost;

pub const ECHO_PORT: u16 = 6443;
pub const BULK_PORT: u16 = 6444;

pub struct Backends {
    rt: Runtime,
    servers: Vec<Option<Vec<JoinHandle<()>>>>,
    /// Loopback listeners that accept and drop (`loopback_sink`).
    sinks: Vec<JoinHandle<()>>,
    netns: Vec<String>,
    names: Vec<String>,
}

impl Backends {
    pub fn start(hosts: &[TestHost], cpu: Option<usize>) -> anyhow::Result<Backends> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                if let Some(cpu) = cpu {
                    let _ = crate::loadgen::pin_current(cpu);
                }
            })
            .build()?;
        let mut b = Backends {
            rt,
            servers: Vec::new(),
            sinks: Vec::new(),
            netns: hosts.iter().map(|h| h.netns.name.clone()).collect(),
            names: (1..=hosts.len())
                .map(|i| format!("controller-{i}"))
                .collect(),
        };
        for i in 0..hosts.len() {
            b.servers.push(None);
            b.start_one(i)?;
        }
        Ok(b)
    }

    /// (Re)starts the servers of host `i`.
    pub fn start_one(&mut self, i: usize) -> anyhow::Result<()> {
        let echo = bind_in_netns(&self.netns[i], ECHO_PORT)?;
        let bulk = bind_in_netns(&self.netns[i], BULK_PORT)?;
        let name = self.names[i].clone();
        let _guard = self.rt.enter();
        let echo = TcpListener::from_std(echo)?;
        let bulk = TcpListener::from_std(bulk)?;
        let body: &'static [u8] = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
            name.len()
        )
        .leak()
        .as_bytes();
        let h1 = self
            .rt
            .spawn(accept_loop(echo, move |s| serve_echo(s, body)));
        let h2 = self.rt.spawn(accept_loop(bulk, serve_source));
        self.servers[i] = Some(vec![h1, h2]);
        Ok(())
    }

    /// Closes host `i`'s listeners: new connects to it get a RST, as when a
    /// controller's API server process died but its machine is up.
    pub fn stop_one(&mut self, i: usize) {
        if let Some(hs) = self.servers[i].take() {
            for h in hs {
                h.abort();
            }
        }
        // abort() takes effect at the task's next poll; wait until the
        // listener is really gone so the fault time we record is exact.
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Backends {
    /// A listener on loopback in the host's own namespace that accepts and
    /// drops: the peer of a connect that is not to a virtual address, and a
    /// backend that holds no descriptor for a connection the client keeps
    /// open (the table-at-capacity figure). Each call adds one.
    pub fn loopback_sink(&mut self) -> anyhow::Result<SocketAddr> {
        let l = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let l = deep_backlog(l)?;
        let addr = l.local_addr()?;
        let _guard = self.rt.enter();
        let l = TcpListener::from_std(l)?;
        self.sinks
            .push(self.rt.spawn(accept_loop(l, |s| async move { drop(s) })));
        Ok(addr)
    }
}

/// Deep backlog: at high connect rates a short one drops SYNs and the
/// benchmark would measure SYN retransmits instead of the path.
fn deep_backlog(l: std::net::TcpListener) -> anyhow::Result<std::net::TcpListener> {
    // SAFETY: listen() on a socket we own; calling it again only resizes the backlog.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    l.set_nonblocking(true)?;
    Ok(l)
}

fn bind_in_netns(netns: &str, port: u16) -> anyhow::Result<std::net::TcpListener> {
    let path = format!("/run/netns/{netns}");
    let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<std::net::TcpListener> {
            // setns affects only this thread, which ends right after binding.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            let l = std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
                .with_context(|| format!("binding port {port} in {netns}"))?;
            deep_backlog(l)
        })
        .join()
        .expect("bind thread panicked")
    })
}

async fn accept_loop<F, Fut>(l: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(serve(s));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

async fn serve_echo(mut s: TcpStream, response: &'static [u8]) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let close = contains(&buf[..end], b"Connection: close");
        buf.drain(..end + 4);
        if s.write_all(response).await.is_err() {
            return;
        }
        if close {
            // Server closes first, like an HTTP/1.0 server: the TIME_WAIT
            // lands here and not on the client, whose ephemeral ports
            // would otherwise run out within seconds at these rates.
            let _ = s.shutdown().await;
            return;
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

async fn serve_source(mut s: TcpStream) {
    let data = vec![0x5au8; 128 * 1024];
    while s.write_all(&data).await.is_ok() {}
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use super::*;
    use crate::loadgen::{Workload, run_workload_for_test};

    /// The load generator against real backends in a namespace: every
    /// workload completes without errors, and stopping a backend turns
    /// open-loop attempts into recorded failures.
    #[test]
    fn workloads_run_against_backends_and_see_a_killed_one() {
        if !nllb_tests::privileged() {
            return;
        }
        let net = nllb_tests::TestNet::new(1);
        let mut b = Backends::start(net.hosts(), None).unwrap();
        let IpAddr::V4(ip) = net.hosts()[0].v4 else {
            unreachable!()
        };
        let echo = SocketAddr::from((ip, ECHO_PORT));
        for w in [
            Workload::Crr {
                concurrency: 4,
                duration_ms: 300,
            },
            Workload::Rr {
                concurrency: 4,
                duration_ms: 300,
            },
        ] {
            let r = run_workload_for_test(echo, &w);
            assert!(r.ops > 50, "{w:?}: only {} ops", r.ops);
            assert_eq!(r.errors, 0, "{w:?}: {:?}", r.first_error);
            assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us);
        }
        let r = run_workload_for_test(
            SocketAddr::from((ip, BULK_PORT)),
            &Workload::Bulk { duration_ms: 300 },
        );
        assert!(r.bytes > 1_000_000, "bulk moved only {} bytes", r.bytes);

        // Open-loop attempts against a stopped, then a restarted backend.
        let open_loop = || {
            run_workload_for_test(
                echo,
                &Workload::OpenLoop {
                    rate: 100,
                    duration_ms: 300,
                    timeout_ms: 500,
                },
            )
        };
        b.stop_one(0);
        let r = open_loop();
        assert_eq!(r.attempts.len(), 30);
        assert!(
            r.attempts.iter().all(|a| !a.ok),
            "connects to a stopped backend must fail"
        );
        b.start_one(0).unwrap();
        let r = open_loop();
        assert!(
            r.attempts.iter().all(|a| a.ok),
            "restarted backend must answer: {:?}",
            r.first_error
        );
    }
}
