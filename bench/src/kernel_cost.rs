//! What nllb costs a connect inside the kernel (issue 12's goals), next to
//! the floor (empty programs at the same hooks) in the same interleaved
//! client run; what it does to the latency of connects that are not to a
//! virtual address; the same with 65,536 steered sockets alive (what filled
//! the per-socket table of earlier builds); and tracing off vs on (issue 16).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context;
use nllb::datapath::{events::EventReader, kernel::KernelMaps};
use nllb_common::maps;
use nllb_tests::TestCgroup;

use crate::{
    backend::Backends,
    bpfstats::{self, StatsEnabled},
    child,
    connects::{HoldSpec, Holder, Leg, LoopResult, LoopSpec},
    floor::Floor,
    results::{CostCase, Held, KernelCost},
};

/// A leg of an interleaved run, with the name its figures go under.
pub struct Case {
    pub id: &'static str,
    pub label: String,
    pub leg: Leg,
}

impl Case {
    pub fn new(
        id: &'static str,
        label: impl Into<String>,
        cgroup: &Path,
        targets: Vec<SocketAddr>,
    ) -> Case {
        Case {
            id,
            label: label.into(),
            leg: Leg {
                cgroup: cgroup.to_path_buf(),
                targets,
            },
        }
    }
}

/// Runs `cases` interleaved in one client process (after a short warm-up
/// that is not counted: ARP, caches); with `stats`, also what every
/// program attached to each case's cgroup ran meanwhile.
pub fn interleaved(
    cases: &[Case],
    per_leg: u64,
    cpu: Option<usize>,
    stats: bool,
) -> anyhow::Result<Vec<CostCase>> {
    let legs: Vec<Leg> = cases.iter().map(|c| c.leg.clone()).collect();
    let warm = LoopSpec {
        legs: legs.clone(),
        per_leg: 100,
        batch: 50,
        cpu,
    };
    let _: LoopResult = child::run("connects", &warm)?;
    let snapshot = || -> anyhow::Result<Vec<Vec<bpfstats::ProgStats>>> {
        cases
            .iter()
            .map(|c| {
                if stats {
                    bpfstats::attached(&c.leg.cgroup)
                } else {
                    Ok(Vec::new())
                }
            })
            .collect()
    };
    let before = snapshot()?;
    let r: LoopResult = child::run(
        "connects",
        &LoopSpec {
            legs,
            per_leg,
            batch: 250,
            cpu,
        },
    )?;
    let after = snapshot()?;
    Ok(cases
        .iter()
        .zip(r.legs)
        .zip(before.iter().zip(&after))
        .map(|((c, l), (b, a))| CostCase {
            id: c.id.into(),
            label: c.label.clone(),
            connects: l.attempts,
            errors: l.errors,
            first_error: l.first_error.clone(),
            programs: bpfstats::delta(b, a),
            latency: l,
        })
        .collect())
}

pub struct Setup<'a> {
    /// The running agent's cgroup and pin path (the "nllb (eBPF)" path).
    pub nllb_cg: &'a Path,
    pub pin: &'a Path,
    pub vip: SocketAddr,
    /// A controller's address, where the virtual address leads.
    pub backend: SocketAddr,
    /// A loopback listener: a connect that is not to a virtual address.
    pub other: SocketAddr,
    /// Loopback listeners that accept and drop, for the held rows: the
    /// first takes their measured connects, each other one a holder's
    /// connections (a holder's 16,384 fit one address's source ports).
    pub sinks: Vec<SocketAddr>,
    pub plain_cg: &'a Path,
    pub client_cpu: Option<usize>,
    /// Where the trace reader runs (not the client's core).
    pub reader_cpu: Option<usize>,
    pub quick: bool,
}

pub fn measure(s: &Setup<'_>) -> anyhow::Result<KernelCost> {
    let floor_cg = TestCgroup::new();
    let _floor = Floor::attach(floor_cg.path())?;
    let plain2_cg = TestCgroup::new();
    let per_leg = per_leg(s.quick);
    let mut k = KernelCost::default();

    eprintln!("== connect+close latency, interleaved (run-time accounting off)");
    k.latency_stats_on = StatsEnabled::is_on();
    k.latency = interleaved(
        &[
            Case::new("plain", "no program", s.plain_cg, vec![s.other]),
            Case::new(
                "plain-2",
                "no program (A/A: a second such cgroup)",
                plain2_cg.path(),
                vec![s.other],
            ),
            Case::new(
                "floor",
                "empty programs (floor)",
                floor_cg.path(),
                vec![s.other],
            ),
            Case::new("nllb", "nllb", s.nllb_cg, vec![s.other]),
        ],
        per_leg * 2,
        s.client_cpu,
        false,
    )?;

    let _stats = StatsEnabled::new()?;
    eprintln!("== in-kernel cost per connect: not to a virtual address, to one");
    let other = |id_floor, id_nllb| {
        [
            Case::new(
                id_floor,
                "floor, connect not to a virtual address",
                floor_cg.path(),
                vec![s.other],
            ),
            Case::new(
                id_nllb,
                "nllb, connect not to a virtual address",
                s.nllb_cg,
                vec![s.other],
            ),
        ]
    };
    k.cases.extend(interleaved(
        &other("floor-other", "nllb-other"),
        per_leg,
        s.client_cpu,
        true,
    )?);
    let vip = |id_floor, id_nllb, table: &str| {
        [
            Case::new(
                id_floor,
                format!("floor, connect to the controller itself{table}"),
                floor_cg.path(),
                vec![s.backend],
            ),
            Case::new(
                id_nllb,
                format!("nllb, connect to the virtual address{table}"),
                s.nllb_cg,
                vec![s.vip],
            ),
        ]
    };
    k.cases.extend(interleaved(
        &vip("floor-vip", "nllb-vip", ""),
        per_leg,
        s.client_cpu,
        true,
    )?);

    eprintln!("== the same with {HELD_SOCKETS} live sockets, not steered and steered");
    match table_full(&s.sinks, s.client_cpu, s.quick, &floor_cg, per_leg) {
        Ok((cases, held)) => {
            k.cases.extend(cases);
            k.held = Some(held);
        }
        Err(e) => k
            .notes
            .push(format!("table at capacity: not measured: {e:#}")),
    }

    eprintln!("== tracing off vs on (a reader drains the trace ring)");
    if let Err(e) = tracing(s, per_leg, &mut k) {
        k.notes
            .push(format!("tracing off vs on: not measured: {e:#}"));
    }
    Ok(k)
}

/// Live sockets for the "held" rows: the capacity of the per-socket hash
/// earlier builds used (a full one cost 3.7 µs per connect). Socket storage
/// has no capacity; the rows show what holding them costs a connect.
const HELD_SOCKETS: u64 = 65_536;

/// Held connections per holder process: under the open-file limit a
/// process may have here (root without CAP_SYS_RESOURCE cannot raise it).
const PER_HOLDER: u64 = 16_384;

/// The loopback sinks the held rows need (`Setup::sinks`): one for their
/// measured connects, one per holder.
pub fn held_sinks(backends: &mut Backends) -> anyhow::Result<Vec<SocketAddr>> {
    (0..1 + HELD_SOCKETS.div_ceil(PER_HOLDER))
        .map(|_| backends.loopback_sink())
        .collect()
}

/// Connects per row (the held rows split them over their rounds).
fn per_leg(quick: bool) -> u64 {
    if quick { 2_000 } else { 20_000 }
}

/// The same programs as the agent's (nllb's datapath library), installed on
/// a cgroup of the benchmark's own, measured three times: with no sockets
/// held, with 65,536 held that nllb did not steer (connected to the sinks
/// directly), and with 65,536 steered ones (through the virtual address):
/// the last two hold the machine in the same state (as many sockets, same
/// addresses), so their difference is what nllb's per-socket state costs.
/// Sinks keep no descriptor for a held connection, so the machine's
/// open-file limits bound only the holders, which split the sockets.
///
/// The measured connects go to a sink of their own (service 1), never to a
/// held one (service 0): towards an address with ~16,000 of the kernel's
/// ~28,000 source ports taken, a connect tries several ports, each a cold
/// hash walk, which made even the empty floor programs 3-6x slower and hid
/// what nllb's state costs behind what the port search evicts.
fn table_full(
    sinks: &[SocketAddr],
    client_cpu: Option<usize>,
    quick: bool,
    floor_cg: &TestCgroup,
    per_leg: u64,
) -> anyhow::Result<(Vec<CostCase>, Held)> {
    let (measured, held_sinks) = sinks
        .split_first()
        .context("no loopback sinks for the held rows")?;
    anyhow::ensure!(
        held_sinks.len() as u64 >= HELD_SOCKETS.div_ceil(PER_HOLDER),
        "{} held sinks, want one per holder",
        held_sinks.len()
    );
    let cg = TestCgroup::new();
    let mut plan = crate::scale::plan(2, sinks);
    plan.services[0].backends = held_sinks.to_vec();
    plan.services[1].backends = vec![*measured];
    let dp = crate::scale::Installed::new(cg.path(), "full", &plan)?;
    let (held_vip, measured_vip) = (crate::scale::vip(0), crate::scale::vip(1));
    let maps = KernelMaps::open(&dp.1).context("opening the bench datapath's pinned maps")?;
    let cases = |id_floor: &'static str, id_nllb: &'static str, table: &str| {
        [
            Case::new(
                id_floor,
                format!("floor, connect to a loopback listener{table}"),
                floor_cg.path(),
                vec![*measured],
            ),
            Case::new(
                id_nllb,
                format!(
                    "nllb (same programs, bench cgroup), connect to its virtual address{table}"
                ),
                cg.path(),
                vec![measured_vip],
            ),
        ]
    };
    let mut held = Held {
        wanted: HELD_SOCKETS,
        ..Held::default()
    };
    // The three states follow one another, so a slow stretch of the machine
    // could decide between them (one full run measured steered +160 ns over
    // unsteered, a quick one -44 ns): rounds, the order reversed every other
    // one, summed per state.
    let rounds = if quick { 1 } else { 3 };
    let ids = [
        ("floor-vip-room", "nllb-vip-room"),
        ("floor-vip-plain", "nllb-vip-plain"),
        ("floor-vip-full", "nllb-vip-full"),
    ];
    let mut sums: Vec<[CostCase; 2]> = vec![Default::default(); ids.len()];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for state in order {
            let holders = match state {
                0 => None,
                1 => Some(hold(&cg, |i| held_sinks[i], client_cpu)?),
                _ => Some(hold(&cg, |_| held_vip, client_cpu)?),
            };
            match (&holders, state) {
                (Some(h), 1) => held.unsteered = h.held,
                (Some(h), _) => {
                    held.held = h.held;
                    held.first_error = held.first_error.take().or(h.first_error.clone());
                }
                (None, _) => {}
            }
            let full_before = maps.datapath_counters().sockets_full;
            let r = interleaved(
                &cases(ids[state].0, ids[state].1, ""),
                per_leg / rounds,
                client_cpu,
                true,
            )?;
            if state == 2 {
                held.not_remembered += maps.datapath_counters().sockets_full - full_before;
            }
            for (sum, c) in sums[state].iter_mut().zip(&r) {
                add(sum, c);
            }
            drop(holders);
        }
    }
    let suffix = [
        ", no sockets held".to_string(),
        format!(", {} sockets held that nllb did not steer", held.unsteered),
        format!(", {} steered sockets held", held.held),
    ];
    let mut out = Vec::new();
    for ((state, (id_floor, id_nllb)), sum) in suffix.iter().zip(ids).zip(sums) {
        for (c, mut sum) in cases(id_floor, id_nllb, state).into_iter().zip(sum) {
            sum.id = c.id.into();
            sum.label = c.label;
            sum.latency.p50_ns = crate::workloads::median(&sum.latency.batch_p50_ns);
            out.push(sum);
        }
    }
    drop(dp);
    Ok((out, held))
}

/// `nllb-bench held`: only the held rows (floor and nllb, no sockets held,
/// 65,536 unsteered, 65,536 steered), each program's runs and ns per run
/// printed. For working on what per-socket state costs a connect.
pub fn held_only(
    sinks: &[SocketAddr],
    client_cpu: Option<usize>,
    quick: bool,
) -> anyhow::Result<()> {
    let floor_cg = TestCgroup::new();
    let _floor = Floor::attach(floor_cg.path())?;
    let _stats = StatsEnabled::new()?;
    let per_leg = per_leg(quick);
    let (cases, held) = table_full(sinks, client_cpu, quick, &floor_cg, per_leg)?;
    for c in &cases {
        let progs: Vec<String> = c
            .programs
            .iter()
            .map(|p| {
                format!(
                    "{} {:.1} x {:.0}",
                    p.name,
                    p.run_cnt as f64 / c.connects.max(1) as f64,
                    p.ns_per_run()
                )
            })
            .collect();
        println!(
            "{:>6.0} ns per connect  {}  ({}; {} errors)",
            c.ns_per_connect(),
            c.label,
            progs.join(", "),
            c.errors
        );
    }
    println!(
        "held {} unsteered, {} steered; {} steered connects not remembered",
        held.unsteered, held.held, held.not_remembered
    );
    Ok(())
}

/// Holder processes with `HELD_SOCKETS` live connections between them; the
/// sockets close (RST) when this is dropped.
struct Holders {
    holders: Vec<Holder>,
    held: u64,
    first_error: Option<String>,
}

/// Holders in `cg`, holder `i` connecting to `target(i)`.
fn hold(
    cg: &TestCgroup,
    target: impl Fn(usize) -> SocketAddr,
    cpu: Option<usize>,
) -> anyhow::Result<Holders> {
    let mut h = Holders {
        holders: Vec::new(),
        held: 0,
        first_error: None,
    };
    while h.held < HELD_SOCKETS {
        let count = PER_HOLDER.min(HELD_SOCKETS - h.held);
        let one = Holder::start(&HoldSpec {
            cgroup: cg.path().to_path_buf(),
            target: target(h.holders.len()),
            count,
            cpu,
        })?;
        h.held += one.report.held;
        // A holder retries a failed connect; one that stopped short has
        // run out of something (ports, memory): more holders would too.
        let short = one.report.held < count;
        if short {
            h.first_error = one.report.first_error.clone();
        }
        h.holders.push(one);
        if short {
            break;
        }
    }
    eprintln!(
        "   holding {} sockets in {} processes{}",
        h.held,
        h.holders.len(),
        h.first_error
            .as_deref()
            .map(|e| format!(" (stopped: {e})"))
            .unwrap_or_default()
    );
    Ok(h)
}

fn tracing(s: &Setup<'_>, per_leg: u64, k: &mut KernelCost) -> anyhow::Result<()> {
    let mut maps = KernelMaps::open(s.pin).context("opening the agent's pinned maps")?;
    let reader = TraceReader::start(s.pin.to_path_buf(), s.reader_cpu)?;
    let lost_before = maps.datapath_counters().events_lost;
    let (mut off, mut on) = (CostCase::default(), CostCase::default());
    let rounds = 3;
    for round in 0..rounds * 2 {
        let traced = round % 2 == 1;
        // An hour ahead: the programs trace until this run's end, when it is
        // set back to 0; a reader (`nllb trace`) renews it the same way.
        maps.set_trace_until(if traced {
            nllb::sys::monotonic_ns() + 3_600_000_000_000
        } else {
            0
        })?;
        let case = Case::new("nllb-vip", "", s.nllb_cg, vec![s.vip]);
        let r = interleaved(
            std::slice::from_ref(&case),
            per_leg / rounds,
            s.client_cpu,
            true,
        );
        maps.set_trace_until(0)?;
        let r = r?.remove(0);
        add(if traced { &mut on } else { &mut off }, &r);
    }
    // The ring is drained as fast as the reader wakes; give it a moment for
    // the last wake-up.
    std::thread::sleep(std::time::Duration::from_millis(200));
    k.trace_events = reader.stop();
    k.trace_events_lost = maps.datapath_counters().events_lost - lost_before;
    for c in [&mut off, &mut on] {
        c.latency.p50_ns = crate::workloads::median(&c.latency.batch_p50_ns);
    }
    off.id = "trace-off".into();
    off.label = "no trace reader".into();
    on.id = "trace-on".into();
    on.label = "tracing on, a reader draining the ring".into();
    k.tracing = vec![off, on];
    Ok(())
}

/// Sums `r` into `into` (same programs: one cgroup).
fn add(into: &mut CostCase, r: &CostCase) {
    into.connects += r.connects;
    into.errors += r.errors;
    into.first_error = into.first_error.take().or(r.first_error.clone());
    for p in &r.programs {
        match into.programs.iter_mut().find(|q| q.id == p.id) {
            Some(q) => {
                q.run_cnt += p.run_cnt;
                q.run_time_ns += p.run_time_ns;
            }
            None => into.programs.push(p.clone()),
        }
    }
    into.latency.attempts += r.latency.attempts;
    into.latency.errors += r.latency.errors;
    into.latency.peer_is_dialed += r.latency.peer_is_dialed;
    into.latency.batch_p50_ns.extend(&r.latency.batch_p50_ns);
}

/// A trace reader like `nllb trace`: drains `NLLB_TRACE_EVENTS` on a
/// thread of its own and counts what it read.
struct TraceReader {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    count: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TraceReader {
    fn start(pin: PathBuf, cpu: Option<usize>) -> anyhow::Result<TraceReader> {
        let count = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let n = count.clone();
        let thread = std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                let _ = crate::loadgen::pin_current(cpu);
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return drop(ready_tx.send(Err(e.into()))),
            };
            rt.block_on(async move {
                let mut r = match EventReader::open_pinned(&pin, maps::TRACE_EVENTS) {
                    Ok(r) => r,
                    Err(e) => return drop(ready_tx.send(Err(e.into()))),
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    tokio::select! {
                        b = r.next_batch() => match b {
                            Ok(b) => { n.fetch_add(b.len() as u64, Ordering::Relaxed); }
                            Err(_) => break,
                        },
                        _ = &mut stopped => break,
                    }
                }
            });
        });
        ready.recv().context("trace reader thread")??;
        Ok(TraceReader {
            stop: Some(stop),
            count,
            thread: Some(thread),
        })
    }

    fn stop(mut self) -> u64 {
        self.shutdown();
        self.count.load(Ordering::Relaxed)
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TraceReader {
    fn drop(&mut self) {
        self.shutdown();
    }
}
