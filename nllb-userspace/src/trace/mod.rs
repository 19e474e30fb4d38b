//! `nllb trace`: the datapath's decisions, live, one line each.
//!
//! The programs put a record on `NLLB_TRACE_EVENTS` for every decision
//! while `NLLB_TRACE_CTL.until_ns` is in the future; with no reader they pay
//! one array read per connect. The reader keeps `until_ns` a few seconds
//! ahead, refreshed every second, so a reader that dies stops the events by
//! itself; a clean exit (Ctrl-C, `--duration`, a closed pipe) sets it to 0.
//! What the agent does in userspace (aborting connects, ending connections
//! to rebalance) arrives as notes (`notes.rs`). Works from the pins alone: with the agent running or gone.
//!
//! The ring is read on this runtime; lines are named and written on a
//! thread of their own (status file, cgroup tree, a slow terminal), so
//! nothing blocks the reading.

mod lock;
mod names;
pub mod notes;
mod record;

use std::{
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use clap::Args;
use nllb_common::{Event, maps};
use tokio::signal::unix::{SignalKind, signal};

pub use names::{Names, Origin, ServiceInfo};
pub use record::{Clock, TraceRecord};

use crate::{
    datapath::{DatapathError, events::EventReader, kernel::KernelMaps},
    errors::ConfigError,
    sys,
};
use lock::ReaderLock;
use notes::{AbortNote, NoteReceiver};

/// How far ahead of now a reader keeps `until_ns`.
pub const LEASE: Duration = Duration::from_secs(3);
/// How often it moves it.
const REFRESH: Duration = Duration::from_secs(1);
/// On exit, how long the ring is read for events still in it.
const DRAIN: Duration = Duration::from_millis(50);

#[derive(Args, Clone, Debug, Default)]
pub struct TraceArgs {
    /// Only this service's events (its name in `nllb status`, or its id).
    #[arg(long, value_name = "S")]
    pub service: Option<String>,
    /// Only events whose backend (or the backend passed over) is this
    /// address: an IP, or IP:port.
    #[arg(long, value_name = "IP", value_parser = BackendFilter::parse)]
    pub backend: Option<BackendFilter>,
    /// One JSON object per line (fields: README, "nllb trace").
    #[arg(long)]
    pub json: bool,
    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C.
    #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("no nllb datapath is pinned at {}: {source}; is the agent installed there? (--pin-path)", pin_path.display())]
    NoDatapath {
        pin_path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another `nllb trace` ({}) is reading {}: the kernel's trace ring has a single reader; stop that one first",
        holder.map_or_else(|| "pid unknown: another pid namespace".to_string(), |p| format!("pid {p}")),
        pin_path.display()
    )]
    Busy { pin_path: PathBuf, holder: Option<u32> },
    #[error("locking {} for this reader: {source}", pin_path.display())]
    Lock {
        pin_path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the datapath at {} was removed or replaced while tracing; run `nllb trace` again", .0.display())]
    Replaced(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Datapath(#[from] DatapathError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl TraceError {
    /// 2 for a bad flag, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            TraceError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// `--backend`: one IP (any port), or one IP and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendFilter {
    Ip(IpAddr),
    Addr(SocketAddr),
}

impl BackendFilter {
    pub fn parse(s: &str) -> Result<BackendFilter, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(BackendFilter::Addr(SocketAddr::new(canonical_ip(a.ip()), a.port())));
        }
        s.parse::<IpAddr>().map(|ip| BackendFilter::Ip(canonical_ip(ip))).map_err(|_| {
            format!("{s:?} is not an IP address; pass a backend's address, e.g. 198.18.1.2 or 198.18.1.2:6443")
        })
    }

    pub fn matches(&self, a: SocketAddr) -> bool {
        match self {
            BackendFilter::Ip(ip) => canonical_ip(a.ip()) == *ip,
            BackendFilter::Addr(want) => SocketAddr::new(canonical_ip(a.ip()), a.port()) == *want,
        }
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Which lines `--service` and `--backend` let through.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub service: Option<String>,
    pub backend: Option<BackendFilter>,
}

impl Filter {
    pub fn admits(&self, r: &TraceRecord, names: &Names) -> bool {
        if r.event == "lost" {
            return true;
        }
        if let Some(s) = &self.service
            && (r.service_id.is_none() || names.service_id(s) != r.service_id)
        {
            return false;
        }
        match &self.backend {
            Some(b) => r.backend.is_some_and(|a| b.matches(a)) || r.skipped.is_some_and(|a| b.matches(a)),
            None => true,
        }
    }
}

/// `until_ns` a lease ahead while it lives; 0 once dropped, also when the
/// reader stops on an error.
struct Lease {
    kernel: KernelMaps,
}

impl Lease {
    fn renew(&mut self) -> Result<(), DatapathError> {
        self.kernel.set_trace_until(sys::monotonic_ns() + LEASE.as_nanos() as u64)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.kernel.set_trace_until(0);
    }
}

pub fn run(pin_path: &Path, run_dir: &Path, args: &TraceArgs) -> Result<(), TraceError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(trace(pin_path, run_dir, args))
}

/// What the reading loop hands the writing thread.
enum Item {
    Events(Vec<Event>),
    Note(AbortNote),
    Tick,
}

/// The pinned ring's inode: a new one means the datapath was replaced.
fn ring_inode(pin_path: &Path) -> Option<u64> {
    std::fs::metadata(pin_path.join(maps::TRACE_EVENTS)).ok().map(|m| m.ino())
}

async fn trace(pin_path: &Path, run_dir: &Path, args: &TraceArgs) -> Result<(), TraceError> {
    let _lock = ReaderLock::acquire(pin_path)?;
    let mut ring = EventReader::open_pinned(pin_path, maps::TRACE_EVENTS)?;
    let inode = ring_inode(pin_path);
    let kernel = KernelMaps::open(pin_path)?;
    let mut names = Names::new();
    names.refresh_services(&kernel, run_dir);
    if let Some(s) = &args.service
        && names.service_id(s).is_none()
    {
        return Err(ConfigError::new(
            "--service",
            format!(
                "no service {s:?} is published at {} (services: {}); pass a name `nllb status` shows, or a service id",
                pin_path.display(),
                names.service_names().join(", ")
            ),
        )
        .into());
    }
    let mut notes = match NoteReceiver::bind(run_dir) {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!(
                "nllb trace: connects the agent aborts are not shown: cannot listen on {}: {e}",
                run_dir.join(notes::NOTES_SOCKET).display()
            );
            None
        }
    };
    let writer = Writer {
        names,
        filter: Filter { service: args.service.clone(), backend: args.backend },
        json: args.json,
        kernel: KernelMaps::open(pin_path)?,
        run_dir: run_dir.to_path_buf(),
        lost: None,
    };
    let start = sys::monotonic_ns();
    let mut lease = Lease { kernel };
    lease.renew()?;
    eprintln!("nllb trace: reading {} (Ctrl-C to stop)", pin_path.display());

    let (tx, rx) = mpsc::channel::<Item>();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<io::Result<()>>();
    let thread = std::thread::spawn(move || {
        let _ = done_tx.send(writer.run(rx));
    });
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(REFRESH);
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    // Records a reader that died left in the ring are older than `start`.
    let fresh = |batch: Vec<Event>| -> Vec<Event> { batch.into_iter().filter(|e| e.ts_ns >= start).collect() };
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = until(deadline) => break,
            written = &mut done_rx => {
                // The writer stopped: stdout closed (a pipe's reader left) ends
                // the trace like Ctrl-C; anything else is an error.
                result = match written {
                    Ok(Err(e)) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
                    _ => Ok(()),
                };
                break;
            }
            batch = ring.next_batch() => {
                let _ = tx.send(Item::Events(fresh(batch?)));
            }
            Some(note) = next_note(&mut notes) => {
                let _ = tx.send(Item::Note(note));
            }
            _ = tick.tick() => {
                if ring_inode(pin_path) != inode {
                    result = Err(TraceError::Replaced(pin_path.to_path_buf()));
                    break;
                }
                lease.renew()?;
                let _ = tx.send(Item::Tick);
            }
        }
    }
    // Off first, then whatever the programs had already written.
    drop(lease);
    while let Ok(Ok(batch)) = tokio::time::timeout(DRAIN, ring.next_batch()).await {
        let _ = tx.send(Item::Events(fresh(batch)));
    }
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    result
}

async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The next note from the agent; never resolves without a socket.
async fn next_note(notes: &mut Option<NoteReceiver>) -> Option<AbortNote> {
    let Some(n) = notes else {
        return std::future::pending().await;
    };
    match n.next().await {
        Ok(note) => Some(note),
        Err(e) => {
            eprintln!("nllb trace: the agent's notes socket failed ({e}); aborted connects are no longer shown");
            *notes = None;
            std::future::pending().await
        }
    }
}

/// Names, filters and writes lines, on its own thread.
struct Writer {
    names: Names,
    filter: Filter,
    json: bool,
    kernel: KernelMaps,
    run_dir: PathBuf,
    /// Events the kernel could not put on a ring, when last looked.
    lost: Option<u64>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Item>) -> io::Result<()> {
        let mut out = io::BufWriter::new(io::stdout().lock());
        let mut clock = Clock::now();
        self.lost = Some(self.kernel.datapath_counters().events_lost);
        for item in rx {
            let records: Vec<TraceRecord> = match item {
                Item::Events(batch) => {
                    batch.iter().filter_map(|e| TraceRecord::from_event(e, &mut self.names, &clock)).collect()
                }
                Item::Note(note) => vec![TraceRecord::from_note(&note, &mut self.names, &clock)],
                Item::Tick => {
                    clock = Clock::now();
                    self.names.refresh_services(&self.kernel, &self.run_dir);
                    self.lost_since(&clock).into_iter().collect()
                }
            };
            for r in records.iter().filter(|r| self.filter.admits(r, &self.names)) {
                if self.json {
                    serde_json::to_writer(&mut out, r)?;
                    out.write_all(b"\n")?;
                } else {
                    writeln!(out, "{}", r.text())?;
                }
            }
            out.flush()?;
        }
        Ok(())
    }

    fn lost_since(&mut self, clock: &Clock) -> Option<TraceRecord> {
        let now = self.kernel.datapath_counters().events_lost;
        let before = self.lost.replace(now)?;
        (now > before).then(|| TraceRecord::lost(now - before, clock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_filters_match_an_ip_or_an_address_in_any_form() {
        let ip = BackendFilter::parse("198.18.1.2").unwrap();
        assert!(ip.matches("198.18.1.2:6443".parse().unwrap()));
        assert!(ip.matches("[::ffff:198.18.1.2]:8132".parse().unwrap()));
        assert!(!ip.matches("198.18.1.3:6443".parse().unwrap()));
        let addr = BackendFilter::parse("198.18.1.2:6443").unwrap();
        assert!(addr.matches("198.18.1.2:6443".parse().unwrap()));
        assert!(!addr.matches("198.18.1.2:8132".parse().unwrap()));
        let v6 = BackendFilter::parse("2001:2::2").unwrap();
        assert!(v6.matches("[2001:2::2]:6443".parse().unwrap()));
        let err = BackendFilter::parse("controller-1").unwrap_err();
        assert!(err.contains("not an IP address") && err.contains("198.18.1.2"), "{err}");
    }
}
