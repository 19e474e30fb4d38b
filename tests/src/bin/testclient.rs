//! Makes TCP connects from inside a cgroup (and optionally a network
//! namespace), like a kubelet would, and prints what each one saw as JSON.
//!
//! SIGTERM ends the run early: the connects made so far are reported (a
//! test can keep a client connecting until it has done what it wanted to
//! do under traffic).
//!
//! With `--hold` it instead opens `--count` connections, prints
//! `HOLD connected`, and then one `HOLD closed <i> errno=<n>` line as each
//! one ends (errno 0: closed by the peer or still open after the timeout);
//! the socket destroy tests watch those lines.
//!
//! With `--hold --reconnect` each connection behaves like a watch or a
//! tunnel: it reads the server's greeting line (its name), prints
//! `HOLD up <i> <name>`, and when the connection ends prints
//! `HOLD closed <i> errno=<n>` and dials again after a short pause, until
//! SIGTERM (`HOLD stopped`). `--ping-ms` makes it a tunnel: it writes a
//! byte that often and reads the echo.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use nllb_tests::{ClientReport, ConnectResult};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[arg(long)]
    netns: Option<String>,
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// After a failed connect, try once more at once.
    #[arg(long)]
    retry: bool,
    /// Stop after this many milliseconds even before `count` connects.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Connect and close, no request: as many connects as possible.
    #[arg(long)]
    connect_only: bool,
    /// Keep each connection open until stdin closes, then ask getpeername
    /// again (`peer_after_hold`) before the request.
    #[arg(long)]
    peer_after_stdin: bool,
    /// Hold the connections open and report how each one ends.
    #[arg(long)]
    hold: bool,
    /// With --hold: dial again whenever a connection ends, until SIGTERM.
    #[arg(long)]
    reconnect: bool,
    /// With --reconnect: send a byte this often and read the echo.
    #[arg(long)]
    ping_ms: Option<u64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(cg) = &args.cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())?;
    }
    if let Some(ns) = &args.netns {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    if args.hold && !args.reconnect {
        return hold(args.addr, args.count, timeout);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGTERM, nix::sys::signal::SigHandler::Handler(stop))?;
    }
    if args.hold {
        return hold_reconnecting(args.addr, args.count, timeout, args.ping_ms.map(Duration::from_millis));
    }
    let start = Instant::now();
    let mut report = ClientReport {
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        ..Default::default()
    };
    for i in 0..args.count {
        if STOP.load(Ordering::SeqCst) || args.deadline_ms.is_some_and(|d| start.elapsed() >= Duration::from_millis(d)) {
            break;
        }
        // Open loop: connect i starts at i * interval, whatever earlier ones did.
        let due = Duration::from_millis(args.interval_ms * u64::from(i));
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        if args.connect_only {
            report.results.push(connect_only(args.addr, timeout, start));
            continue;
        }
        let first = one(args.addr, timeout, start, args.peer_after_stdin);
        let failed = !first.ok;
        report.results.push(first);
        if failed && args.retry {
            report.results.push(ConnectResult { retry: true, ..one(args.addr, timeout, start, args.peer_after_stdin) });
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A connect and a close; only failures are reported in detail.
fn connect_only(addr: SocketAddr, timeout: Duration, start: Instant) -> ConnectResult {
    let t0 = Instant::now();
    let r = TcpStream::connect_timeout(&addr, timeout);
    ConnectResult {
        t_ms: start.elapsed().as_millis() as u64,
        ok: r.is_ok(),
        errno: r.as_ref().err().and_then(|e| e.raw_os_error()),
        error: r.as_ref().err().map(|e| e.to_string()),
        body: None,
        peer: None,
        local: None,
        server_saw: None,
        elapsed_us: t0.elapsed().as_micros() as u64,
        retry: false,
        peer_after_hold: None,
    }
}

fn one(addr: SocketAddr, timeout: Duration, start: Instant, hold: bool) -> ConnectResult {
    let t0 = Instant::now();
    let mut r = ConnectResult {
        t_ms: start.elapsed().as_millis() as u64,
        ok: false,
        errno: None,
        error: None,
        body: None,
        peer: None,
        local: None,
        server_saw: None,
        elapsed_us: 0,
        retry: false,
        peer_after_hold: None,
    };
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(mut s) => {
            r.peer = s.peer_addr().ok().map(|p| p.to_string());
            r.local = s.local_addr().ok().map(|p| p.to_string());
            if hold {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                r.peer_after_hold = s.peer_addr().ok().map(|p| p.to_string());
            }
            let _ = s.set_read_timeout(Some(timeout));
            let _ = s.set_write_timeout(Some(timeout));
            let mut resp = Vec::new();
            let io = s
                .write_all(b"GET / HTTP/1.1\r\nHost: nllb\r\nConnection: close\r\n\r\n")
                .and_then(|_| s.read_to_end(&mut resp));
            match io {
                Ok(_) => {
                    let text = String::from_utf8_lossy(&resp);
                    r.server_saw = text
                        .split("\r\n\r\n")
                        .next()
                        .and_then(|head| head.lines().find_map(|l| l.strip_prefix("X-Peer: ")))
                        .map(str::to_string);
                    match text.split_once("\r\n\r\n") {
                        Some((_, body)) if text.starts_with("HTTP/1.1 200") => {
                            r.ok = true;
                            r.body = Some(body.trim().to_string());
                        }
                        _ => r.error = Some(format!("bad response: {text:?}")),
                    }
                }
                Err(e) => {
                    r.errno = e.raw_os_error();
                    r.error = Some(e.to_string());
                }
            }
        }
        Err(e) => {
            r.errno = e.raw_os_error();
            r.error = Some(e.to_string());
        }
    }
    r.elapsed_us = t0.elapsed().as_micros() as u64;
    r
}

/// `count` connections held open until the peer (or a socket destroy)
/// ends them, or `timeout` passes.
fn hold(addr: SocketAddr, count: u32, timeout: Duration) -> anyhow::Result<()> {
    let socks: Vec<TcpStream> = (0..count).map(|_| TcpStream::connect(addr)).collect::<Result<_, _>>()?;
    println!("HOLD connected");
    let threads: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(timeout));
                let errno = s.read(&mut [0u8; 1]).err().and_then(|e| e.raw_os_error()).unwrap_or(0);
                println!("HOLD closed {i} errno={errno}");
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// How long a watch waits before it dials again after its connection ended
/// or a dial failed.
const REDIAL: Duration = Duration::from_millis(100);

/// `count` connections that each dial again when they end, until SIGTERM.
fn hold_reconnecting(addr: SocketAddr, count: u32, timeout: Duration, ping: Option<Duration>) -> anyhow::Result<()> {
    for i in 0..count {
        std::thread::spawn(move || {
            while !STOP.load(Ordering::SeqCst) {
                if let Ok(s) = TcpStream::connect_timeout(&addr, timeout) {
                    let errno = watch(s, i, timeout, ping);
                    println!("HOLD closed {i} errno={errno}");
                }
                std::thread::sleep(REDIAL);
            }
        });
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("HOLD stopped");
    Ok(())
}

/// One connection from greeting to end; returns the errno it ended with (0:
/// closed by the peer).
fn watch(mut s: TcpStream, i: u32, timeout: Duration, ping: Option<Duration>) -> i32 {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
    let _ = s.set_read_timeout(Some(timeout));
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while name.last() != Some(&b'\n') {
        match s.read(&mut byte) {
            Ok(0) => return 0,
            Ok(_) => name.push(byte[0]),
            Err(e) => return errno(e),
        }
    }
    println!("HOLD up {i} {}", String::from_utf8_lossy(&name).trim());
    let _ = s.set_read_timeout(ping);
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return 0,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if let Err(e) = s.write_all(b"p") {
                    return errno(e);
                }
            }
            Err(e) => return errno(e),
        }
    }
}
