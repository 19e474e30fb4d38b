//! The load generator: one client process per measurement, pinned to a core
//! and placed in a cgroup before its runtime starts, so that nllb's cgroup
//! programs see every one of its connects.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A request the echo backend answers and then closes (one connection per request).
pub const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
/// A request the echo backend answers and keeps the connection open for the next one.
pub const REQUEST_KEEPALIVE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    /// Closed loop: connect, request, response, close; `concurrency` loops in parallel.
    Crr {
        concurrency: usize,
        duration_ms: u64,
    },
    /// Closed loop: request/response over `concurrency` persistent connections.
    Rr {
        concurrency: usize,
        duration_ms: u64,
    },
    /// One connection reading from a source backend as fast as it can.
    Bulk { duration_ms: u64 },
    /// Open loop: a new connect–request–response every 1/rate s, whatever the
    /// previous ones are doing, each bounded by `timeout_ms`.
    OpenLoop {
        rate: u32,
        duration_ms: u64,
        timeout_ms: u64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientSpec {
    pub addr: SocketAddr,
    pub workload: Workload,
    /// cgroup v2 directory the client moves itself into before any connect.
    pub cgroup: Option<PathBuf>,
    /// Core to pin the client to.
    pub cpu: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientResult {
    /// Completed operations (connections for crr/open loop, requests for rr).
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    /// ops per second.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    /// Bytes received (bulk).
    pub bytes: u64,
    pub gbit_s: f64,
    /// CPU the client process used (getrusage), seconds.
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    /// Open loop only: every attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    /// Wall clock at the start of the attempt (ms since the epoch), so the
    /// orchestrator can line attempts up with the moment it injected a fault.
    pub t_ms: f64,
    pub ok: bool,
    pub latency_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Entry point of `nllb-bench client`: join the cgroup, pin, run, print JSON.
pub fn run_client(spec: &ClientSpec) -> anyhow::Result<ClientResult> {
    if let Some(cg) = &spec.cgroup {
        let procs = cg.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string()).with_context(|| {
            format!(
                "joining cgroup {}: is it a cgroup v2 directory and are we root?",
                procs.display()
            )
        })?;
    }
    if let Some(cpu) = spec.cpu {
        pin_current(cpu)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let before = rusage();
    let mut res = rt.block_on(run_workload(spec.addr, &spec.workload))?;
    let after = rusage();
    res.cpu_user_s = after.0 - before.0;
    res.cpu_sys_s = after.1 - before.1;
    Ok(res)
}

pub fn pin_current(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("cpu {cpu} out of range"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to cpu {cpu}"))?;
    Ok(())
}

/// (user, system) CPU seconds of this process.
fn rusage() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct we pass.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(u.ru_utime), tv(u.ru_stime))
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

async fn run_workload(addr: SocketAddr, w: &Workload) -> anyhow::Result<ClientResult> {
    match *w {
        Workload::Crr {
            concurrency,
            duration_ms,
        } => closed_loop(addr, concurrency, duration_ms, true).await,
        Workload::Rr {
            concurrency,
            duration_ms,
        } => closed_loop(addr, concurrency, duration_ms, false).await,
        Workload::Bulk { duration_ms } => bulk(addr, duration_ms).await,
        Workload::OpenLoop {
            rate,
            duration_ms,
            timeout_ms,
        } => open_loop(addr, rate, duration_ms, timeout_ms).await,
    }
}

struct LoopStats {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

async fn closed_loop(
    addr: SocketAddr,
    concurrency: usize,
    duration_ms: u64,
    crr: bool,
) -> anyhow::Result<ClientResult> {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(duration_ms);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        tasks.push(tokio::spawn(async move {
            if crr {
                crr_worker(addr, deadline).await
            } else {
                rr_worker(addr, deadline).await
            }
        }));
    }
    let mut hist = new_hist();
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        let s = t.await?;
        hist.add(&s.hist)?;
        errors += s.errors;
        first_error = first_error.or(s.first_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(summarize(&hist, errors, first_error, elapsed))
}

fn summarize(
    hist: &Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: f64,
) -> ClientResult {
    ClientResult {
        ops: hist.len(),
        errors,
        first_error,
        elapsed_s: elapsed,
        rate: hist.len() as f64 / elapsed,
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
        p999_us: hist.value_at_quantile(0.999) as f64,
        mean_us: hist.mean(),
        ..Default::default()
    }
}

impl LoopStats {
    fn new() -> Self {
        Self {
            hist: new_hist(),
            errors: 0,
            first_error: None,
        }
    }
    async fn error(&mut self, e: anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
        // A refused connect returns at once; without a pause a broken path
        // would spin and drown the machine instead of being measured.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn crr_worker(addr: SocketAddr, deadline: Instant) -> LoopStats {
    let mut s = LoopStats::new();
    let mut buf = Vec::with_capacity(256);
    while Instant::now() < deadline {
        let t0 = Instant::now();
        match bounded(one_crr(addr, &mut buf)).await {
            Ok(()) => {
                let _ = s.hist.record(t0.elapsed().as_micros().max(1) as u64);
            }
            Err(e) => s.error(e).await,
        }
    }
    s
}

/// A closed loop must not hang on one lost connect (SYN retries take two
/// minutes): past this an operation counts as an error and the loop goes on.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

async fn bounded<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("no answer within {OP_TIMEOUT:?}")),
    }
}

/// Connect, send one request, read the response until the server closes.
pub async fn one_crr(addr: SocketAddr, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut c = TcpStream::connect(addr).await.context("connect")?;
    c.set_nodelay(true)?;
    c.write_all(REQUEST_CLOSE).await.context("write")?;
    buf.clear();
    c.read_to_end(buf).await.context("read")?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        anyhow::bail!("bad response ({} bytes)", buf.len());
    }
    Ok(())
}

async fn rr_worker(addr: SocketAddr, deadline: Instant) -> LoopStats {
    let mut s = LoopStats::new();
    let mut buf = Vec::with_capacity(4096);
    while Instant::now() < deadline {
        let mut c = match bounded(async { TcpStream::connect(addr).await.context("connect") }).await
        {
            Ok(c) => c,
            Err(e) => {
                s.error(e).await;
                continue;
            }
        };
        let _ = c.set_nodelay(true);
        buf.clear();
        while Instant::now() < deadline {
            let t0 = Instant::now();
            let r = bounded(async {
                c.write_all(REQUEST_KEEPALIVE).await.context("write")?;
                read_response(&mut c, &mut buf).await
            })
            .await;
            match r {
                Ok(()) => {
                    let _ = s.hist.record(t0.elapsed().as_micros().max(1) as u64);
                }
                Err(e) => {
                    s.error(e).await;
                    break;
                }
            }
        }
    }
    s
}

/// Reads one `Content-Length` framed HTTP response and removes it from `buf`.
async fn read_response(c: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(total) = complete_response(buf)? {
            buf.drain(..total);
            return Ok(());
        }
        let n = c.read(&mut chunk).await.context("read")?;
        if n == 0 {
            anyhow::bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Length of the first complete response in `buf`, if it is all there.
fn complete_response(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("bad status line: {:?}", head.lines().next());
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .context("response without Content-Length")?
        .trim()
        .parse::<usize>()?;
    let total = end + 4 + len;
    Ok((buf.len() >= total).then_some(total))
}

async fn bulk(addr: SocketAddr, duration_ms: u64) -> anyhow::Result<ClientResult> {
    let mut c = TcpStream::connect(addr).await.context("connect")?;
    let start = Instant::now();
    let deadline = start + Duration::from_millis(duration_ms);
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), c.read(&mut buf)).await {
            Ok(Ok(0)) => anyhow::bail!("source closed after {bytes} bytes"),
            Ok(Ok(n)) => bytes += n as u64,
            Ok(Err(e)) => return Err(e).context("read"),
            Err(_) => break,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(ClientResult {
        ops: 1,
        elapsed_s: elapsed,
        bytes,
        gbit_s: bytes as f64 * 8.0 / elapsed / 1e9,
        rate: bytes as f64 / elapsed,
        ..Default::default()
    })
}

async fn open_loop(
    addr: SocketAddr,
    rate: u32,
    duration_ms: u64,
    timeout_ms: u64,
) -> anyhow::Result<ClientResult> {
    let n = (rate as u64 * duration_ms / 1000).max(1);
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let timeout = Duration::from_millis(timeout_ms);
    let start = Instant::now();
    let mut tick = tokio::time::interval(period);
    // An open loop must keep its schedule even after a stall, or a slow path
    // would be offered less load than a fast one.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n as usize);
    for _ in 0..n {
        tick.tick().await;
        tasks.push(tokio::spawn(async move {
            let t_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0;
            let t0 = Instant::now();
            let mut buf = Vec::with_capacity(256);
            let r = match tokio::time::timeout(timeout, one_crr(addr, &mut buf)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("timed out after {timeout_ms} ms")),
            };
            Attempt {
                t_ms,
                ok: r.is_ok(),
                latency_us: t0.elapsed().as_micros() as u64,
                error: r.err().map(|e| format!("{e:#}")),
            }
        }));
    }
    let mut attempts = Vec::with_capacity(tasks.len());
    let mut hist = new_hist();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let a = t.await?;
        if a.ok {
            let _ = hist.record(a.latency_us.max(1));
        } else {
            errors += 1;
            first_error = first_error.or(a.error.clone());
        }
        attempts.push(a);
    }
    let mut res = summarize(&hist, errors, first_error, start.elapsed().as_secs_f64());
    res.attempts = attempts;
    Ok(res)
}

#[cfg(test)]
pub fn run_workload_for_test(addr: SocketAddr, w: &Workload) -> ClientResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run_workload(addr, w)).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_responses() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nb1HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nb";
        assert_eq!(complete_response(two).unwrap(), Some(40));
        assert_eq!(complete_response(&two[40..]).unwrap(), None);
        assert_eq!(
            complete_response(b"HTTP/1.1 200 OK\r\nContent-Len").unwrap(),
            None
        );
        assert!(complete_response(b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n").is_err());
    }
}
