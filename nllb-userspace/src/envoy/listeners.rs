//! Which virtual addresses Envoy listens on, as the kernel sees them.
//!
//! A listener change is visible in the kernel before anything else (a
//! service without backends has no listener, so connects are refused): the
//! datapath waits for that, reading Envoy's sockets with procfs.

use std::{
    collections::HashSet,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process},
};

use super::supervisor::{SupervisorHandle, last_error_line};
use crate::model::Plan;

/// How often a [`ListenerWait`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// TCP sockets in LISTEN state owned by `pid`, from its fd table and its
/// network namespace's tcp tables.
pub fn listening_sockets(pid: u32) -> std::io::Result<HashSet<SocketAddr>> {
    let proc = Process::new(pid as i32).map_err(std::io::Error::other)?;
    let inodes: HashSet<u64> = proc
        .fd()
        .map_err(std::io::Error::other)?
        .flatten()
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    let mut out = HashSet::new();
    for table in [proc.tcp(), proc.tcp6()] {
        // An address family the kernel lacks has no table: nothing listens there.
        for e in table.unwrap_or_default() {
            if e.state == TcpState::Listen && inodes.contains(&e.inode) {
                out.insert(e.local_address);
            }
        }
    }
    Ok(out)
}

/// The virtual addresses Envoy must listen on for `plan`: those of
/// services that have backends.
pub fn expected_listeners(plan: &Plan) -> HashSet<SocketAddr> {
    plan.services.iter().filter(|s| !s.backends.is_empty()).flat_map(|s| s.listen.iter().copied()).collect()
}

/// Waiting until the running Envoy listens on exactly the expected
/// addresses. It owns what it needs, so it can run anywhere (a blocking
/// thread, `spawn_blocking`) while the datapath goes on.
pub struct ListenerWait {
    want: HashSet<SocketAddr>,
    handle: SupervisorHandle,
    /// Fail at once if this run of Envoy exits (start-up).
    generation: Option<u64>,
    /// Envoy's own admin listener, which is not a virtual address.
    admin: Option<SocketAddr>,
    log: PathBuf,
    log_start: u64,
    timeout: Duration,
}

impl ListenerWait {
    pub(super) fn new(
        plan: &Plan,
        handle: SupervisorHandle,
        generation: Option<u64>,
        admin_port: Option<u16>,
        log: &Path,
        timeout: Duration,
    ) -> ListenerWait {
        ListenerWait {
            want: expected_listeners(plan),
            handle,
            generation,
            admin: admin_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
            log: log.to_path_buf(),
            log_start: fs::metadata(log).map(|m| m.len()).unwrap_or(0),
            timeout,
        }
    }

    /// Polls until Envoy listens on the expected addresses, fails, or the
    /// timeout passes; the error says what is missing and why.
    pub fn block(self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let seen = match self.look() {
                Ok(seen) if seen == self.want => return Ok(()),
                Ok(seen) => seen,
                Err(why) => return Err(why),
            };
            if Instant::now() > deadline {
                return Err(self.timed_out(&seen));
            }
            std::thread::sleep(POLL);
        }
    }

    /// One look at Envoy: its listening virtual addresses, or why waiting
    /// is pointless.
    fn look(&self) -> Result<HashSet<SocketAddr>, String> {
        let st = self.handle.status();
        if let Some(g) = self.generation
            && (self.handle.generation() != g || !st.running)
        {
            return Err(st.last_exit.unwrap_or_else(|| "envoy exited".into()));
        }
        // A listener that cannot bind never will: say so now.
        if let Some(line) = new_log_lines(&self.log, self.log_start).into_iter().find(|l| l.contains("cannot bind")) {
            return Err(line.rsplit("] ").next().unwrap_or(&line).trim().to_string());
        }
        let mut seen = st.pid.and_then(|pid| listening_sockets(pid).ok()).unwrap_or_default();
        if let Some(admin) = self.admin {
            seen.remove(&admin);
        }
        Ok(seen)
    }

    fn timed_out(&self, seen: &HashSet<SocketAddr>) -> String {
        let mut missing: Vec<_> = self.want.difference(seen).map(|a| a.to_string()).collect();
        let mut extra: Vec<_> = seen.difference(&self.want).map(|a| a.to_string()).collect();
        missing.sort();
        extra.sort();
        let last = last_error_line(&self.log).unwrap_or_default();
        format!(
            "after {:?} Envoy is not listening on [{}] and still on [{}]; {last}",
            self.timeout,
            missing.join(", "),
            extra.join(", ")
        )
    }
}

/// Lines Envoy logged after byte `from` (capped to the last 64 KiB).
fn new_log_lines(log: &Path, from: u64) -> Vec<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = fs::File::open(log) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len <= from || f.seek(SeekFrom::Start(from.max(len.saturating_sub(64 * 1024)))).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).lines().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_listening_sockets_are_found() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let found = listening_sockets(std::process::id()).unwrap();
        assert!(found.contains(&v4.local_addr().unwrap()), "{found:?}");
        if let Some(v6) = v6 {
            assert!(found.contains(&v6.local_addr().unwrap()), "{found:?}");
        }
        // A connected (not listening) socket is not a listener.
        let c = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let found = listening_sockets(std::process::id()).unwrap();
        assert!(!found.contains(&c.local_addr().unwrap()), "{found:?}");
    }
}
