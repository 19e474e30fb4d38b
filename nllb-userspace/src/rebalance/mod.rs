//! Failback (issue 17): long-lived connections spread back to a controller
//! that returns.
//!
//! A connect-time balancer places a connection once; kubelet's watches and
//! konnectivity tunnels stay where they were placed for hours. After a
//! controller died and came back it would carry nothing until something
//! else reconnects them. So the agent looks at how nllb's established
//! connections are spread (when a service's published set gains a backend,
//! and every `interval`), and where the spread is uneven it
//!
//! 1. gives the backends below their fair share more slots in the
//!    service's table (weighted pick), so reconnects go to them, and once
//!    that table is live
//! 2. ends a connection of the busiest backend, oldest first (sock_diag
//!    `SOCK_DESTROY`, as for a removed backend: the client sees
//!    `ECONNABORTED` and reconnects through the virtual address),
//! 3. one at a time, at most `maxPerMinute` for all services together (and
//!    a service's own cap), until no backend carries more than its fair
//!    share rounded up; then the weights go back to even.
//!
//! Never from a backend that is alone, in panic mode, or within a minute of
//! its own return; never toward a backend before it has stayed published
//! `healthyFor` after its return (doubled per further return within ten
//! minutes, so a flapping controller causes no churn). The rules are in
//! `policy.rs`, the memory and rate limits in `state.rs`; this file runs the
//! blocking netlink work on blocking tasks and reports to log, metrics,
//! status and `nllb trace`. Needs the kernel datapath (its per-socket state
//! and socket destroy).

mod bucket;
pub mod config;
mod policy;
mod state;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

pub use config::{RebalanceConfig, RebalanceOverride, RebalanceSettings, ServiceRebalance};
use tokio::sync::mpsc;

use self::state::{Move, State};
use crate::{
    datapath::{
        DatapathSnapshot,
        reaper::{Reaper, Steered},
    },
    metrics::Metrics,
    model::Plan,
    sock_diag::{self, States},
    status::RebalanceStatus,
    trace::notes::{AbortCause, NoteSender},
};

/// What a blocking task reports back to the agent's loop.
pub struct Report(Done);

enum Done {
    Counted(BTreeMap<SocketAddr, Result<Vec<Steered>, String>>),
    Moved(Vec<(Move, Result<usize, String>)>),
}

pub struct Rebalance {
    state: State,
    reaper: Option<Arc<Reaper>>,
    tx: mpsc::UnboundedSender<Report>,
    rx: mpsc::UnboundedReceiver<Report>,
    /// The last counting error logged (logged again only when it changes).
    last_error: Option<String>,
    /// Each move goes to `nllb trace` as an abort note.
    notes: Option<Arc<NoteSender>>,
}

impl Rebalance {
    /// `reaper`: None where the datapath cannot end connections (Envoy):
    /// then nothing is counted or moved.
    pub fn new(settings: RebalanceSettings, reaper: Option<Arc<Reaper>>) -> Rebalance {
        if reaper.is_none() && settings.global.enabled {
            tracing::info!(
                "rebalance: needs the kernel datapath (its socket table and socket destroy); off in this mode"
            );
        }
        let (tx, rx) = mpsc::unbounded_channel();
        Rebalance { state: State::new(settings, Instant::now(), None), reaper, tx, rx, last_error: None, notes: None }
    }

    /// Shows each move in `nllb trace`.
    pub fn with_notes(mut self, notes: Arc<NoteSender>) -> Rebalance {
        self.notes = Some(notes);
        self
    }

    /// A reloaded config.
    pub fn set_settings(&mut self, settings: RebalanceSettings) {
        if &settings != self.state.settings() {
            self.state.set_settings(settings, Instant::now());
        }
    }

    /// The plan about to be published and the backends probes just readmitted.
    pub fn observe(&mut self, plan: &Plan, recovered: &[SocketAddr]) {
        if self.reaper.is_some() {
            self.state.observe(plan, recovered, Instant::now());
        }
    }

    /// Gives the backends that should draw reconnects their weight.
    pub fn weigh(&self, plan: &mut Plan) {
        self.state.weigh(plan);
    }

    /// `plan` is live: connections may be ended once its weights are the wanted ones.
    pub fn plan_live(&mut self, plan: &Plan) {
        self.state.plan_live(plan, Instant::now());
    }

    /// When [`Rebalance::tick`] next has a count to start (None: not before
    /// something changes).
    pub fn next_due(&self) -> Option<Instant> {
        self.reaper.as_ref()?;
        self.state.next_due()
    }

    /// Starts a count on a blocking task when a look is due.
    pub fn tick(&mut self) {
        let Some(reaper) = self.reaper.clone() else { return };
        let Some(backends) = self.state.due(Instant::now()) else { return };
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let counts = match reaper.steered_to_each(&backends, States::ESTABLISHED) {
                Ok(mut each) => backends.into_iter().map(|b| (b, Ok(each.remove(&b).unwrap_or_default()))).collect(),
                Err(e) => {
                    let e = crate::errors::chain(&e);
                    backends.into_iter().map(|b| (b, Err(e.clone()))).collect()
                }
            };
            let _ = tx.send(Report(Done::Counted(counts)));
        });
    }

    pub async fn next_report(&mut self) -> Option<Report> {
        self.rx.recv().await
    }

    /// Handles a finished count or destroy; true when the wanted weights
    /// changed and the plan must be published again.
    pub fn on_report(&mut self, report: Report, snapshot: &DatapathSnapshot, metrics: &Metrics) -> bool {
        let now = Instant::now();
        match report.0 {
            Done::Counted(counts) => {
                let mut ok = BTreeMap::new();
                for (b, result) in counts {
                    match result {
                        Ok(v) => {
                            ok.insert(b, v);
                        }
                        Err(e) if self.last_error.as_ref() != Some(&e) => {
                            tracing::warn!(backend = %b, error = %e, "rebalance: cannot count nllb's connections");
                            self.last_error = Some(e);
                        }
                        Err(_) => {}
                    }
                }
                if ok.is_empty() {
                    self.state.count_failed(now);
                    return false;
                }
                let ids: BTreeMap<String, u32> =
                    snapshot.services.iter().filter_map(|s| s.id.map(|id| (s.name.clone(), id))).collect();
                let outcome = self.state.counted(&ok, &ids, now);
                metrics.set_established(self.state.established.iter().map(|((s, b), n)| (s.as_str(), *b, *n)));
                metrics.set_rebalance_weights(self.state.published().map(|(_, b)| (b, self.state.weight(b))));
                if !outcome.moves.is_empty() {
                    self.spawn_moves(outcome.moves);
                }
                outcome.replan
            }
            Done::Moved(results) => {
                let mut ended = Vec::new();
                for (m, result) in &results {
                    match result {
                        Ok(0) => {
                            tracing::debug!(backend = %m.from, "rebalance: the connection to move was already gone")
                        }
                        Ok(_) => {
                            log_move(m);
                            metrics.rebalance_move(&m.service, m.from);
                            ended.push(m);
                        }
                        Err(e) => tracing::warn!(backend = %m.from, error = %e, "rebalance: cannot end a connection"),
                    }
                }
                self.state.moved(&ended);
                false
            }
        }
    }

    fn spawn_moves(&self, moves: Vec<Move>) {
        let tx = self.tx.clone();
        let notes = self.notes.clone();
        tokio::task::spawn_blocking(move || {
            let results = moves
                .into_iter()
                .map(|m| {
                    let r =
                        sock_diag::destroy(std::slice::from_ref(&m.conn.socket)).map_err(|e| crate::errors::chain(&e));
                    if let (Some(notes), Ok(1..)) = (&notes, &r) {
                        notes.aborted(AbortCause::Rebalanced, std::slice::from_ref(&m.conn.state));
                    }
                    (m, r)
                })
                .collect();
            let _ = tx.send(Report(Done::Moved(results)));
        });
    }

    /// Per published (service, backend): established connections at the last
    /// count, connections ended, weight.
    pub fn status(&self) -> Vec<RebalanceStatus> {
        self.state
            .published()
            .map(|(service, backend)| {
                let key = (service.to_string(), backend);
                RebalanceStatus {
                    service: service.to_string(),
                    backend,
                    established: self.state.established.get(&key).map(|n| *n as u64),
                    moves: self.state.moved.get(&key).copied().unwrap_or(0),
                    weight: self.state.weight(backend),
                }
            })
            .collect()
    }
}

fn log_move(m: &Move) {
    let age = Duration::from_nanos(crate::sys::monotonic_ns().saturating_sub(m.conn.state.created_ns));
    let spread: Vec<String> = m.spread.iter().map(|(b, n)| format!("{b}={n}")).collect();
    let toward: Vec<String> = m.toward.iter().map(ToString::to_string).collect();
    tracing::info!(
        service = %m.service,
        backend = %m.from,
        client = %m.conn.socket.local,
        age_s = age.as_secs(),
        toward = %toward.join(","),
        spread = %spread.join(" "),
        "rebalance: moved a connection (ended it; its client reconnects toward the least loaded backend)"
    );
}
