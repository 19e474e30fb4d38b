//! systemd's service notifications (sd_notify), for `Type=notify` units:
//!
//! - `READY=1` once the datapath is attached and serves the first plan, so
//!   units ordered after nllb (the kubelet) start only when connects to the
//!   virtual addresses already reach a controller;
//! - `WATCHDOG=1` from the agent's tick while the unit sets `WatchdogSec=`
//!   (`WATCHDOG_USEC`), so a wedged agent is restarted.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub struct Notifier {
    /// The unit's `WatchdogSec=`, when it is set for this process.
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier { watchdog: sd_notify::watchdog_enabled(), last_ping: None }
    }

    /// The datapath is attached and serves its first plan.
    pub fn ready(&mut self) {
        send(&[NotifyState::Ready, NotifyState::Status("serving")]);
        self.last_ping = Some(Instant::now());
    }

    /// The agent's loop is alive. Pings at most four times per watchdog
    /// period, however often the loop ticks.
    pub fn tick(&mut self) {
        let Some(period) = self.watchdog else { return };
        if self.last_ping.is_some_and(|t| t.elapsed() < period / 4) {
            return;
        }
        send(&[NotifyState::Watchdog]);
        self.last_ping = Some(Instant::now());
    }
}

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
