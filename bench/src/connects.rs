//! Client side of the in-kernel cost figures: plain blocking connects (no
//! runtime, no request), each followed by getpeername (as Go's `net.Dial`
//! does) and an abortive close (SO_LINGER 0: no TIME_WAIT, so a long run
//! never runs out of ports). One process walks through several cgroups in
//! batches, so every cgroup's connects see the same machine state: the
//! comparison is interleaved, not one run after another.
//!
//! Also the holder of many live steered sockets, to fill nllb's per-socket
//! table for the "table at capacity" figure.

use std::{
    io::{BufRead as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Connects from one cgroup, to these targets in turn.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Leg {
    pub cgroup: PathBuf,
    pub targets: Vec<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoopSpec {
    pub legs: Vec<Leg>,
    /// Connects per leg.
    pub per_leg: u64,
    /// Connects in a row from one cgroup before moving to the next.
    pub batch: u64,
    pub cpu: Option<usize>,
}

/// One leg's connects: latency of socket + connect + getpeername + close.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LegResult {
    pub attempts: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub p50_ns: f64,
    pub p90_ns: f64,
    pub mean_ns: f64,
    /// Median over the batches of each batch's median: steadier than the
    /// overall median when a stall hits a few batches.
    pub batch_p50_ns: Vec<f64>,
    /// Connects whose getpeername answered the address dialed (for a virtual
    /// address: nllb translated it back).
    pub peer_is_dialed: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoopResult {
    pub legs: Vec<LegResult>,
}

pub fn join_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).with_context(|| {
        format!(
            "joining cgroup {}: is it a cgroup v2 directory and are we root?",
            procs.display()
        )
    })
}

/// Entry point of `nllb-bench connects`.
pub fn run_loop(spec: &LoopSpec) -> anyhow::Result<LoopResult> {
    if let Some(cpu) = spec.cpu {
        crate::loadgen::pin_current(cpu)?;
    }
    let batch = spec.batch.max(1);
    let batches = spec.per_leg.div_ceil(batch);
    let mut hists: Vec<Histogram<u64>> = spec.legs.iter().map(|_| new_hist()).collect();
    let mut res: Vec<LegResult> = spec.legs.iter().map(|_| LegResult::default()).collect();
    for b in 0..batches {
        // Each round starts with another leg, so a periodic disturbance
        // cannot keep landing on the same one.
        for k in 0..spec.legs.len() {
            let i = (b as usize + k) % spec.legs.len();
            let leg = &spec.legs[i];
            // A socket belongs to the cgroup of the task that created it.
            join_cgroup(&leg.cgroup)?;
            let mut h = new_hist();
            for n in 0..batch {
                let target = leg.targets[((b * batch + n) as usize) % leg.targets.len()];
                let r = &mut res[i];
                r.attempts += 1;
                let t0 = Instant::now();
                match connect_close(target) {
                    Ok(peer) => {
                        let _ = h.record(t0.elapsed().as_nanos().max(1) as u64);
                        r.peer_is_dialed += u64::from(peer == target);
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error
                            .get_or_insert_with(|| format!("{target}: {e:#}"));
                    }
                }
            }
            if !h.is_empty() {
                res[i].batch_p50_ns.push(h.value_at_quantile(0.5) as f64);
            }
            hists[i].add(&h)?;
        }
    }
    for (r, h) in res.iter_mut().zip(&hists) {
        r.p50_ns = h.value_at_quantile(0.5) as f64;
        r.p90_ns = h.value_at_quantile(0.9) as f64;
        r.mean_ns = h.mean();
    }
    Ok(LoopResult { legs: res })
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn connect_close(target: SocketAddr) -> anyhow::Result<SocketAddr> {
    let s = TcpStream::connect(target).context("connect")?;
    let peer = s.peer_addr().context("getpeername")?;
    abortive_close_on_drop(&s)?;
    Ok(peer)
}

/// SO_LINGER 0: close sends an RST and leaves no TIME_WAIT behind.
fn abortive_close_on_drop(s: &TcpStream) -> anyhow::Result<()> {
    let off = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &off).context("SO_LINGER")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HoldSpec {
    pub cgroup: PathBuf,
    pub target: SocketAddr,
    pub count: u64,
    pub cpu: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HoldReport {
    pub held: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Entry point of `nllb-bench hold`: open `count` connections (one at a
/// time, so the backends' accept queues never overflow), print a report
/// line, keep them until stdin closes.
pub fn run_hold(spec: &HoldSpec) -> anyhow::Result<()> {
    join_cgroup(&spec.cgroup)?;
    if let Some(cpu) = spec.cpu {
        crate::loadgen::pin_current(cpu)?;
    }
    let mut held = Vec::with_capacity(spec.count as usize);
    let mut r = HoldReport::default();
    // Ports run out per destination; a few misses in a row mean the
    // kernel has no port left for any backend.
    let mut misses_in_a_row = 0;
    while (held.len() as u64) < spec.count && misses_in_a_row < 64 {
        match TcpStream::connect(spec.target)
            .context("connect")
            .and_then(|s| {
                abortive_close_on_drop(&s)?;
                Ok(s)
            }) {
            Ok(s) => {
                held.push(s);
                misses_in_a_row = 0;
            }
            Err(e) => {
                r.errors += 1;
                misses_in_a_row += 1;
                r.first_error
                    .get_or_insert_with(|| format!("after {} connections: {e:#}", held.len()));
            }
        }
    }
    r.held = held.len() as u64;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&r)?)?;
    out.flush()?;
    // Hold until the orchestrator closes our stdin (or goes away).
    let mut sink = String::new();
    while std::io::stdin().lock().read_line(&mut sink)? > 0 {}
    drop(held);
    Ok(())
}

/// A running holder; its sockets close (RST) when this is dropped.
pub struct Holder {
    child: Child,
    pub report: HoldReport,
}

impl Holder {
    pub fn start(spec: &HoldSpec) -> anyhow::Result<Holder> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("hold")
            .arg("--spec")
            .arg(serde_json::to_string(spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the socket holder")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("holder stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let mut h = Holder {
            child,
            report: HoldReport::default(),
        };
        if line.trim().is_empty() {
            let st = h.child.wait()?;
            bail!("the socket holder exited ({st}) without a report");
        }
        h.report = serde_json::from_str(line.trim()).context("parsing the holder's report")?;
        Ok(h)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
