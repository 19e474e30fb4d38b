//! One trace line: built from a kernel record (or an agent note) and the
//! names around it, printed as text or as one JSON object.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, UNIX_EPOCH},
};

use nllb_common::{
    Event, EventKind,
    events::{STEER_ALL_MARKED, STEER_FIRST_PICK, STEER_SKIPPED_MARKED},
};
use serde::Serialize;

use super::{
    names::{Names, Origin},
    notes::{AbortCause, AbortNote},
};
use crate::datapath::{encoding::event_addr, events::cause_name};

/// The `--json` line; every field is always present (null when it does
/// not apply). README "`nllb trace`" documents each one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceRecord {
    pub time: String,
    pub ts_ns: u64,
    pub event: &'static str,
    pub cause: Option<&'static str>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup_id: Option<u64>,
    pub cgroup: Option<String>,
    pub cookie: Option<u64>,
    pub service: Option<String>,
    pub service_id: Option<u32>,
    pub panic: Option<bool>,
    pub vip: Option<SocketAddr>,
    pub backend: Option<SocketAddr>,
    pub skipped: Option<SocketAddr>,
    pub lost: Option<u64>,
}

/// CLOCK_MONOTONIC ns to wall-clock time: realtime minus monotonic, taken
/// together now and then.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let wall = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i128;
        Clock { offset_ns: wall - i128::from(crate::sys::monotonic_ns()) }
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        let wall = (i128::from(mono_ns) + self.offset_ns).max(0) as u64;
        humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_nanos(wall)).to_string()
    }
}

fn steer_cause(cause: u32) -> &'static str {
    match cause {
        STEER_FIRST_PICK => "first-pick",
        STEER_SKIPPED_MARKED => "skipped-marked",
        STEER_ALL_MARKED => "all-marked",
        _ => "unknown",
    }
}

fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// An IPv4 backend reached from an IPv6 socket (`::ffff:a.b.c.d`) is the
/// IPv4 backend the agent published.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, |v4| SocketAddr::new(IpAddr::V4(v4), addr.port())),
        IpAddr::V4(_) => addr,
    }
}

impl TraceRecord {
    fn blank(clock: &Clock, ts_ns: u64, event: &'static str) -> TraceRecord {
        TraceRecord {
            time: clock.rfc3339(ts_ns),
            ts_ns,
            event,
            cause: None,
            pid: None,
            comm: None,
            cgroup_id: None,
            cgroup: None,
            cookie: None,
            service: None,
            service_id: None,
            panic: None,
            vip: None,
            backend: None,
            skipped: None,
            lost: None,
        }
    }

    /// A kernel record; None for a kind this build does not know.
    pub fn from_event(e: &Event, names: &mut Names, clock: &Clock) -> Option<TraceRecord> {
        let kind = EventKind::from_u32(e.kind)?;
        let event = match kind {
            EventKind::Steer => "steer",
            EventKind::Refuse => "refuse",
            EventKind::Mark => "mark",
            EventKind::Recover => "recover",
        };
        let mut r = TraceRecord::blank(clock, e.ts_ns, event);
        r.cookie = (e.cookie != 0).then_some(e.cookie);
        r.cause = Some(match kind {
            EventKind::Steer => steer_cause(e.cause),
            EventKind::Refuse => "no-backend",
            EventKind::Mark => cause_name(e.cause),
            EventKind::Recover => "established",
        });
        r.backend = event_addr(e.backend, e.backend_port, e.backend_family).map(canonical);
        r.set_service(e.svc_id, names);
        match kind {
            EventKind::Steer | EventKind::Refuse => {
                r.vip = event_addr(e.vip, e.vip_port, e.family);
                if kind == EventKind::Steer && e.cause != STEER_FIRST_PICK {
                    r.skipped = event_addr(e.skipped, e.skipped_port, e.skipped_family).map(canonical);
                }
                let origin =
                    Origin { pid: (e.pid_tgid >> 32) as u32, comm: comm(&e.comm), cgroup_id: e.cgroup_id, vip: r.vip };
                r.set_origin(&origin, names);
                if kind == EventKind::Steer {
                    names.remember(e.cookie, origin);
                }
            }
            // From a timer or the peer's packet: no process context; the
            // socket's own steer event says whose connect it was.
            EventKind::Mark | EventKind::Recover => r.fill_from_socket(names),
        }
        Some(r)
    }

    pub fn from_note(n: &AbortNote, names: &mut Names, clock: &Clock) -> TraceRecord {
        let mut r = TraceRecord::blank(clock, n.ts_ns, "abort");
        r.cause = Some(match n.cause {
            AbortCause::BackendMarked => "backend-marked",
            AbortCause::BackendRemoved => "backend-removed",
            AbortCause::Rebalanced => "rebalanced",
        });
        r.cookie = Some(n.cookie);
        r.backend = Some(canonical(n.backend));
        r.vip = Some(n.vip);
        r.set_service(n.svc_id, names);
        r.fill_from_socket(names);
        r
    }

    pub fn lost(count: u64, clock: &Clock) -> TraceRecord {
        let mut r = TraceRecord::blank(clock, crate::sys::monotonic_ns(), "lost");
        r.lost = Some(count);
        r
    }

    fn set_service(&mut self, id: u32, names: &Names) {
        self.service_id = Some(id);
        let info = names.service(id);
        self.service = Some(info.and_then(|s| s.name.clone()).unwrap_or_else(|| id.to_string()));
        self.panic = info.map(|s| s.panic);
    }

    fn set_origin(&mut self, o: &Origin, names: &mut Names) {
        self.pid = Some(o.pid);
        self.comm = Some(o.comm.clone());
        self.cgroup_id = Some(o.cgroup_id);
        self.cgroup = names.cgroup(o.cgroup_id);
    }

    fn fill_from_socket(&mut self, names: &mut Names) {
        if let Some(o) = self.cookie.and_then(|c| names.origin(c)).cloned() {
            self.set_origin(&o, names);
            self.vip = self.vip.or(o.vip);
        }
    }

    /// `17:50:01.123456 steer   apiserver 127.0.0.1:7443 -> 198.18.1.2:6443  pid 4242 (curl) cgroup /x socket 8193`
    pub fn text(&self) -> String {
        let time = self.time.get(11..26).unwrap_or(&self.time);
        let mut line = format!("{time} {:<7}", self.event);
        let opt = |a: Option<SocketAddr>| a.map_or_else(|| "?".to_string(), |a| a.to_string());
        if let Some(s) = &self.service {
            let _ = write!(line, " {s}");
        }
        let _ = match self.event {
            "steer" => {
                let why = match (self.cause, self.skipped) {
                    (Some("skipped-marked"), Some(s)) => format!(" (skipped {s}: marked)"),
                    (Some("all-marked"), _) => " (all marked: oldest mark taken)".to_string(),
                    _ => String::new(),
                };
                write!(line, " {} -> {}{why}", opt(self.vip), opt(self.backend))
            }
            "refuse" => write!(line, " {} refused: no backend", opt(self.vip)),
            "mark" => write!(line, " {} marked: {}", opt(self.backend), self.cause.unwrap_or("?")),
            "recover" => write!(line, " {} recovered: a steered connect was established", opt(self.backend)),
            "abort" => write!(
                line,
                " {} {}",
                opt(self.backend),
                match self.cause {
                    Some("backend-removed") => "agent aborted a connect (backend removed)",
                    Some("rebalanced") => {
                        "agent ended a connection (rebalanced: this backend carried more than its fair share; \
                         the client reconnects toward a less loaded one)"
                    }
                    _ => "agent aborted a connect (SYN_SENT, backend marked)",
                }
            ),
            "lost" => write!(line, " {} events lost: the trace ring was full", self.lost.unwrap_or(0)),
            _ => Ok(()),
        };
        if self.panic == Some(true) {
            line.push_str(" [panic mode]");
        }
        if let Some(pid) = self.pid {
            let _ = write!(line, "  pid {pid} ({})", self.comm.as_deref().unwrap_or("?"));
        }
        match (&self.cgroup, self.cgroup_id) {
            (Some(path), _) => {
                let _ = write!(line, " cgroup {path}");
            }
            (None, Some(id)) if id != 0 => {
                let _ = write!(line, " cgroup id {id}");
            }
            _ => {}
        }
        if let Some(c) = self.cookie {
            let _ = write!(line, " socket {c}");
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nllb_common::FAMILY_V4;

    use super::*;
    use crate::{
        datapath::encoding::{backend_key, vip4_key},
        trace::names::ServiceInfo,
    };

    fn names() -> Names {
        let mut n = Names::default();
        n.set_services(BTreeMap::from([(2, ServiceInfo { name: Some("apiserver".into()), panic: false })]));
        n
    }

    fn steer(cookie: u64, backend: &str, cause: u32, skipped: Option<&str>) -> Event {
        let vip = vip4_key([127, 0, 0, 1].into(), 7443);
        let b = backend_key(backend.parse().unwrap());
        let mut e = Event {
            ts_ns: 1_000,
            pid_tgid: (4242u64 << 32) | 4243,
            cgroup_id: 0,
            cookie,
            kind: EventKind::Steer as u32,
            cause,
            svc_id: 2,
            family: FAMILY_V4,
            vip_port: vip.port,
            vip: [vip.addr, 0, 0, 0],
            backend: b.addr,
            backend_port: b.port,
            backend_family: b.family,
            ..Default::default()
        };
        e.comm[..4].copy_from_slice(b"curl");
        if let Some(s) = skipped {
            let s = backend_key(s.parse().unwrap());
            (e.skipped, e.skipped_port, e.skipped_family) = (s.addr, s.port, s.family);
        }
        e
    }

    #[test]
    fn a_steer_names_process_service_and_backend() {
        let mut n = names();
        let clock = Clock { offset_ns: 0 };
        let r = TraceRecord::from_event(&steer(9, "198.18.1.2:6443", STEER_FIRST_PICK, None), &mut n, &clock).unwrap();
        assert_eq!(r.event, "steer");
        assert_eq!(r.cause, Some("first-pick"));
        assert_eq!(r.pid, Some(4242));
        assert_eq!(r.comm.as_deref(), Some("curl"));
        assert_eq!(r.service.as_deref(), Some("apiserver"));
        assert_eq!(r.vip, Some("127.0.0.1:7443".parse().unwrap()));
        assert_eq!(r.backend, Some("198.18.1.2:6443".parse().unwrap()));
        assert_eq!(r.skipped, None);
        assert_eq!(r.time, "1970-01-01T00:00:00.000001Z");
        assert_eq!(
            r.text(),
            "00:00:00.000001 steer   apiserver 127.0.0.1:7443 -> 198.18.1.2:6443  pid 4242 (curl) socket 9"
        );
    }

    #[test]
    fn a_skip_says_which_backend_was_passed_over() {
        let mut n = names();
        let clock = Clock { offset_ns: 0 };
        let e = steer(9, "198.18.2.2:6443", STEER_SKIPPED_MARKED, Some("198.18.1.2:6443"));
        let r = TraceRecord::from_event(&e, &mut n, &clock).unwrap();
        assert_eq!(r.skipped, Some("198.18.1.2:6443".parse().unwrap()));
        assert!(r.text().contains("-> 198.18.2.2:6443 (skipped 198.18.1.2:6443: marked)"), "{}", r.text());
        let e = steer(10, "198.18.1.2:6443", STEER_ALL_MARKED, Some("198.18.2.2:6443"));
        let r = TraceRecord::from_event(&e, &mut n, &clock).unwrap();
        assert!(r.text().contains("(all marked: oldest mark taken)"), "{}", r.text());
    }

    #[test]
    fn a_mark_and_an_abort_name_the_process_of_their_socket() {
        let mut n = names();
        let clock = Clock { offset_ns: 0 };
        TraceRecord::from_event(&steer(9, "198.18.1.2:6443", STEER_FIRST_PICK, None), &mut n, &clock).unwrap();
        let b = backend_key("198.18.1.2:6443".parse().unwrap());
        let mark = Event {
            kind: EventKind::Mark as u32,
            cause: nllb_common::MarkCause::SynTimeout as u32,
            cookie: 9,
            svc_id: 2,
            backend: b.addr,
            backend_port: b.port,
            backend_family: b.family,
            ..Default::default()
        };
        let r = TraceRecord::from_event(&mark, &mut n, &clock).unwrap();
        assert_eq!((r.event, r.cause, r.pid), ("mark", Some("syn-timeout"), Some(4242)));
        assert_eq!(r.vip, Some("127.0.0.1:7443".parse().unwrap()));
        let note = AbortNote {
            ts_ns: 5,
            cause: AbortCause::BackendMarked,
            cookie: 9,
            svc_id: 2,
            vip: "127.0.0.1:7443".parse().unwrap(),
            backend: "[::ffff:198.18.1.2]:6443".parse().unwrap(),
            created_ns: 1,
        };
        let r = TraceRecord::from_note(&note, &mut n, &clock);
        assert_eq!((r.event, r.cause, r.pid), ("abort", Some("backend-marked"), Some(4242)));
        assert_eq!(r.backend, Some("198.18.1.2:6443".parse().unwrap()), "mapped addresses are folded");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["event"], "abort");
        assert!(json["skipped"].is_null(), "absent fields are null, not missing: {json}");
    }

    #[test]
    fn a_rebalance_move_is_an_abort_that_says_why() {
        let mut n = names();
        let clock = Clock { offset_ns: 0 };
        let note = AbortNote {
            ts_ns: 5_000,
            cause: AbortCause::Rebalanced,
            cookie: 11,
            svc_id: 2,
            vip: "127.0.0.1:7443".parse().unwrap(),
            backend: "198.18.2.2:6443".parse().unwrap(),
            created_ns: 1,
        };
        // A long-lived connection: its steer came before the reader started.
        let r = TraceRecord::from_note(&note, &mut n, &clock);
        assert_eq!((r.event, r.cause, r.pid), ("abort", Some("rebalanced"), None));
        assert_eq!(serde_json::to_value(&r).unwrap()["cause"], "rebalanced");
        assert_eq!(
            r.text(),
            "00:00:00.000005 abort   apiserver 198.18.2.2:6443 agent ended a connection (rebalanced: this backend \
             carried more than its fair share; the client reconnects toward a less loaded one) socket 11"
        );
    }

    #[test]
    fn a_refusal_has_no_backend() {
        let mut n = names();
        let clock = Clock { offset_ns: 0 };
        let mut e = steer(0, "198.18.1.2:6443", 0, None);
        e.kind = EventKind::Refuse as u32;
        e.backend_family = 0;
        let r = TraceRecord::from_event(&e, &mut n, &clock).unwrap();
        assert_eq!((r.event, r.cause, r.backend, r.cookie), ("refuse", Some("no-backend"), None, None));
        assert!(r.text().contains("127.0.0.1:7443 refused: no backend"), "{}", r.text());
    }
}
