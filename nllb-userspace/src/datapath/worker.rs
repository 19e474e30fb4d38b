//! The datapath runs on a thread of its own: applying a plan can block (a
//! map-of-maps swap waits for an RCU grace period; Envoy waits until it
//! serves), and the agent's event loop must never wait on it. The loop sends
//! commands and reads the latest snapshot; outcomes come back as messages.

use std::{sync::mpsc as std_mpsc, thread};

use tokio::sync::{mpsc, oneshot, watch};

use super::{Datapath, DatapathError, DatapathKind, DatapathSnapshot};
use crate::model::Plan;

enum Cmd {
    Apply(Plan),
    Refresh,
    Stop { detach: bool, done: oneshot::Sender<Result<(), DatapathError>> },
}

/// How an `apply` ended.
#[derive(Debug)]
pub struct Applied {
    pub plan: Plan,
    pub result: Result<(), String>,
}

pub struct DatapathWorker {
    kind: DatapathKind,
    cmds: std_mpsc::Sender<Cmd>,
    snapshot: watch::Receiver<DatapathSnapshot>,
    applied: mpsc::UnboundedReceiver<Applied>,
}

impl DatapathWorker {
    pub fn spawn(mut datapath: Box<dyn Datapath>) -> DatapathWorker {
        let kind = datapath.kind();
        let (cmds, rx) = std_mpsc::channel::<Cmd>();
        let (snap_tx, snapshot) = watch::channel(datapath.snapshot());
        let (applied_tx, applied) = mpsc::unbounded_channel();
        thread::Builder::new()
            .name("nllb-datapath".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Only the newest plan matters when several queued up.
                    let mut pending = vec![first];
                    pending.extend(rx.try_iter());
                    let last_apply = pending.iter().rposition(|c| matches!(c, Cmd::Apply(_)));
                    let mut refresh = false;
                    for (i, cmd) in pending.into_iter().enumerate() {
                        match cmd {
                            Cmd::Apply(plan) if Some(i) == last_apply => {
                                let result = datapath.apply(&plan).map_err(|e| crate::errors::chain(&e));
                                let _ = applied_tx.send(Applied { plan, result });
                                refresh = true;
                            }
                            Cmd::Apply(_) => {}
                            Cmd::Refresh => refresh = true,
                            Cmd::Stop { detach, done } => {
                                let result = if detach { datapath.shutdown() } else { Ok(()) };
                                let _ = done.send(result);
                                return;
                            }
                        }
                    }
                    if refresh {
                        let _ = snap_tx.send(datapath.snapshot());
                    }
                }
            })
            .expect("spawning the datapath thread");
        DatapathWorker { kind, cmds, snapshot, applied }
    }

    pub fn kind(&self) -> DatapathKind {
        self.kind
    }

    /// Queues `plan`; its outcome arrives through `next_applied`.
    pub fn apply(&self, plan: Plan) {
        let _ = self.cmds.send(Cmd::Apply(plan));
    }

    /// Asks for a fresh snapshot (counters, marks).
    pub fn refresh(&self) {
        let _ = self.cmds.send(Cmd::Refresh);
    }

    pub fn snapshot(&self) -> DatapathSnapshot {
        self.snapshot.borrow().clone()
    }

    /// Each new snapshot as the thread reads it, for whoever must see the
    /// kernel's counters when they are read rather than a tick later.
    pub fn subscribe(&self) -> watch::Receiver<DatapathSnapshot> {
        self.snapshot.clone()
    }

    pub async fn next_applied(&mut self) -> Option<Applied> {
        self.applied.recv().await
    }

    /// Ends the thread after the queued commands; with `detach`, the
    /// datapath removes everything it installed first.
    pub async fn stop(self, detach: bool) -> Result<(), DatapathError> {
        let (done, wait) = oneshot::channel();
        if self.cmds.send(Cmd::Stop { detach, done }).is_err() {
            return Err(DatapathError::Other("the datapath thread ended early".into()));
        }
        wait.await.unwrap_or_else(|_| Err(DatapathError::Other("the datapath thread ended early".into())))
    }
}
