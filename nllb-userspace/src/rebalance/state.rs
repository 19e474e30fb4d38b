//! What the rebalancer remembers between looks, and what it decides at
//! each: when backends joined and returned, which groups are moving
//! connections, the weights it wants and the ones that are live, the rate
//! limits. Time is passed in, never read here, so unit tests drive it.
//!
//! One look ("round"): the agent counts nllb's established sockets to every
//! published backend (blocking, elsewhere), hands them to [`State::counted`],
//! which judges each group ([`super::policy::judge`]) and returns the weights
//! to publish and the connections to end. A connection is ended only once
//! the weights that steer its reconnect are live, and only with a token from
//! both the global bucket and the service's own.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    bucket::Bucket,
    config::RebalanceSettings,
    policy::{Member, Verdict, judge},
};
use crate::{datapath::reaper::Steered, model::Plan};

/// A backend never gives up connections within this time of its own return
/// (issue 17: "never ... within a minute of its own return").
pub(crate) const DONOR_QUIET: Duration = Duration::from_secs(60);
/// Returns within this window make the next wait longer (flap damping).
pub(crate) const FLAP_WINDOW: Duration = Duration::from_secs(600);
/// The longest a returning backend waits before it receives connections.
pub(crate) const MAX_SETTLE: Duration = Duration::from_secs(600);
/// Between a move and the next count: the moved client reconnects first.
const MIN_GAP: Duration = Duration::from_secs(1);
/// After new weights were handed to the datapath: look again this soon.
const WEIGHTS_WAIT: Duration = Duration::from_millis(500);

/// A service's backends of one address family.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Group {
    pub(crate) service: String,
    pub(crate) v4: bool,
}

/// One connection to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Move {
    pub(crate) service: String,
    pub(crate) from: SocketAddr,
    pub(crate) toward: Vec<SocketAddr>,
    pub(crate) conn: Steered,
    /// Established connections per backend when it was decided.
    pub(crate) spread: Vec<(SocketAddr, usize)>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// The wanted weights changed: publish a new plan.
    pub(crate) replan: bool,
    pub(crate) moves: Vec<Move>,
}

#[derive(Clone, Debug)]
struct Published {
    backends: Vec<SocketAddr>,
    panic: bool,
}

pub(crate) struct State {
    settings: RebalanceSettings,
    observed: bool,
    services: BTreeMap<String, Published>,
    /// When each backend last entered each service's published set.
    joined: BTreeMap<(String, SocketAddr), Instant>,
    /// Recent returns per backend (within FLAP_WINDOW).
    returns: BTreeMap<SocketAddr, Vec<Instant>>,
    active: BTreeSet<Group>,
    wanted: BTreeMap<SocketAddr, u32>,
    live: BTreeMap<SocketAddr, u32>,
    global: Bucket,
    buckets: BTreeMap<String, Bucket>,
    next_round: Instant,
    /// Rounds due when a returned backend has settled.
    wakes: BTreeSet<Instant>,
    /// A count or a destroy is under way.
    busy: bool,
    /// Established connections per (service, backend) at the last count.
    pub(crate) established: BTreeMap<(String, SocketAddr), usize>,
    /// Connections ended per (service, backend they were taken from).
    pub(crate) moved: BTreeMap<(String, SocketAddr), u64>,
    turn: usize,
    rng: StdRng,
}

impl State {
    pub(crate) fn new(settings: RebalanceSettings, now: Instant, seed: Option<u64>) -> State {
        let global = Bucket::new(settings.global.max_per_minute, now);
        State {
            next_round: now + settings.global.interval,
            settings,
            observed: false,
            services: BTreeMap::new(),
            joined: BTreeMap::new(),
            returns: BTreeMap::new(),
            active: BTreeSet::new(),
            wanted: BTreeMap::new(),
            live: BTreeMap::new(),
            global,
            buckets: BTreeMap::new(),
            wakes: BTreeSet::new(),
            busy: false,
            established: BTreeMap::new(),
            moved: BTreeMap::new(),
            turn: 0,
            rng: seed.map_or_else(StdRng::from_entropy, StdRng::seed_from_u64),
        }
    }

    pub(crate) fn settings(&self) -> &RebalanceSettings {
        &self.settings
    }

    /// A reloaded config: new rates and margins from the next look on.
    pub(crate) fn set_settings(&mut self, settings: RebalanceSettings, now: Instant) {
        self.global.set_rate(settings.global.max_per_minute, now);
        for (name, b) in &mut self.buckets {
            b.set_rate(settings.service(name).max_per_minute, now);
        }
        self.next_round = self.next_round.min(now + settings.global.interval);
        self.settings = settings;
    }

    /// The plan the agent is about to publish and the backends probes just
    /// readmitted: notes joins and returns (a backend that (re)joins a
    /// service's set after the first plan returned) and schedules a look
    /// for when a returned backend has settled.
    pub(crate) fn observe(&mut self, plan: &Plan, recovered: &[SocketAddr], now: Instant) {
        let first = !std::mem::replace(&mut self.observed, true);
        let mut returned: BTreeSet<SocketAddr> = BTreeSet::new();
        let mut services = BTreeMap::new();
        for sp in &plan.services {
            let known_service = self.services.contains_key(&sp.name);
            for b in &sp.backends {
                if let std::collections::btree_map::Entry::Vacant(e) = self.joined.entry((sp.name.clone(), *b)) {
                    e.insert(now);
                    if known_service && !first {
                        returned.insert(*b);
                    }
                }
                if recovered.contains(b) {
                    returned.insert(*b);
                }
            }
            services.insert(sp.name.clone(), Published { backends: sp.backends.clone(), panic: sp.panic });
        }
        self.joined.retain(|(s, b), _| services.get(s).is_some_and(|p| p.backends.contains(b)));
        self.active.retain(|g| services.contains_key(&g.service));
        self.buckets.retain(|s, _| services.contains_key(s));
        self.established.retain(|(s, b), _| services.get(s).is_some_and(|p| p.backends.contains(b)));
        self.services = services;
        for r in self.returns.values_mut() {
            r.retain(|t| now.saturating_duration_since(*t) < FLAP_WINDOW);
        }
        self.returns.retain(|_, r| !r.is_empty());
        for b in returned {
            self.returns.entry(b).or_default().push(now);
            let settle = self.settle(b, now);
            let enabled =
                self.services.iter().any(|(name, p)| p.backends.contains(&b) && self.settings.service(name).enabled);
            if !enabled {
                continue;
            }
            // Nodes saw the return at the same moment: spread their first
            // moves over one spacing of the rate rather than all at once.
            let jitter = self.global.spacing().mul_f64(self.rng.gen_range(0.0..1.0));
            self.wakes.insert(now + settle + jitter + Duration::from_millis(100));
            tracing::info!(
                backend = %b,
                settle_s = settle.as_secs(),
                "rebalance: backend returned; connections move back to it once it has been healthy this long"
            );
        }
    }

    /// How long `b` must stay published after its last return before it
    /// receives connections: `healthyFor`, doubled for each further return
    /// within FLAP_WINDOW (a flapping controller waits longer each time).
    pub(crate) fn settle(&self, b: SocketAddr, now: Instant) -> Duration {
        let recent = self
            .returns
            .get(&b)
            .map_or(0, |r| r.iter().filter(|t| now.saturating_duration_since(**t) < FLAP_WINDOW).count());
        let doublings = recent.saturating_sub(1).min(16) as u32;
        self.settings.global.healthy_for.saturating_mul(1 << doublings).min(MAX_SETTLE)
    }

    fn last_return(&self, b: SocketAddr) -> Option<Instant> {
        self.returns.get(&b).and_then(|r| r.last().copied())
    }

    fn can_receive(&self, service: &str, b: SocketAddr, now: Instant) -> bool {
        let Some(joined) = self.joined.get(&(service.to_string(), b)) else { return false };
        let since = self.last_return(b).map_or(*joined, |r| r.max(*joined));
        now >= since + self.settle(b, now)
    }

    fn can_give(&self, b: SocketAddr, now: Instant) -> bool {
        self.last_return(b).is_none_or(|t| now.saturating_duration_since(t) >= DONOR_QUIET)
    }

    /// The first instant at which [`State::due`] returns the backends to
    /// count (None while a count or move runs, or with nothing published).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        if self.busy || self.services.is_empty() {
            return None;
        }
        Some(self.wakes.first().map_or(self.next_round, |w| (*w).min(self.next_round)))
    }

    /// Whether a look is due; if so, the backends to count (the caller
    /// counts them and calls [`State::counted`]).
    pub(crate) fn due(&mut self, now: Instant) -> Option<Vec<SocketAddr>> {
        if now < self.next_due()? {
            return None;
        }
        self.wakes.retain(|w| *w > now);
        self.busy = true;
        let all: BTreeSet<SocketAddr> = self.services.values().flat_map(|p| p.backends.iter().copied()).collect();
        Some(all.into_iter().collect())
    }

    /// A count failed: try again at the next regular look.
    pub(crate) fn count_failed(&mut self, now: Instant) {
        self.busy = false;
        self.next_round = now + self.settings.global.interval;
    }

    /// Judges every group from the counted sockets (`ids`: service name →
    /// the datapath's service id, which each socket carries).
    pub(crate) fn counted(
        &mut self,
        counts: &BTreeMap<SocketAddr, Vec<Steered>>,
        ids: &BTreeMap<String, u32>,
        now: Instant,
    ) -> Outcome {
        self.established.clear();
        let mut judged: Vec<(Group, Verdict, Vec<Member>)> = Vec::new();
        let mut wanted: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        let mut active = BTreeSet::new();
        for (name, p) in &self.services {
            let Some(id) = ids.get(name).copied() else { continue };
            let cfg = self.settings.service(name);
            for v4 in [true, false] {
                let members: Vec<Member> = p
                    .backends
                    .iter()
                    .filter(|b| b.is_ipv4() == v4)
                    .map(|b| Member {
                        addr: *b,
                        established: counts.get(b).map_or(0, |c| c.iter().filter(|s| s.state.svc_id == id).count()),
                        can_receive: self.can_receive(name, *b, now),
                        can_give: self.can_give(*b, now),
                    })
                    .collect();
                for m in &members {
                    self.established.insert((name.clone(), m.addr), m.established);
                }
                if members.is_empty()
                    || !cfg.enabled
                    || p.panic
                    || members.iter().any(|m| !counts.contains_key(&m.addr))
                {
                    continue;
                }
                let group = Group { service: name.clone(), v4 };
                let was = self.active.contains(&group);
                let verdict = judge(&members, cfg.margin, was);
                let spread: Vec<String> = members.iter().map(|m| format!("{}={}", m.addr, m.established)).collect();
                if verdict.active {
                    for (b, w) in &verdict.weights {
                        let e = wanted.entry(*b).or_default();
                        *e = (*e).max(*w);
                    }
                    if !was {
                        tracing::info!(
                            service = %name,
                            spread = %spread.join(" "),
                            fair = %format!("{:.1}", verdict.fair),
                            toward = ?verdict.weights,
                            "rebalance: connections are unevenly spread; moving some toward the least loaded backends"
                        );
                    }
                    active.insert(group.clone());
                } else if was {
                    tracing::info!(service = %name, spread = %spread.join(" "), "rebalance: spread is even again; weights back to even");
                }
                judged.push((group, verdict, members));
            }
        }
        self.active = active;
        let replan = wanted != self.wanted;
        self.wanted = wanted;
        let mut moves = Vec::new();
        if !replan && !judged.is_empty() {
            // Groups take turns at the shared budget: the one after the
            // last that moved goes first.
            let k = self.turn % judged.len();
            judged.rotate_left(k);
            for (i, (group, verdict, members)) in judged.iter().enumerate() {
                if let Some(m) = self.take_move(group, verdict, members, counts, ids, now) {
                    moves.push(m);
                    self.turn = (k + i + 1) % judged.len();
                }
            }
        }
        self.next_round = if replan {
            now + WEIGHTS_WAIT
        } else if self.active.is_empty() {
            now + self.settings.global.interval
        } else {
            let services: BTreeSet<String> = self.active.iter().map(|g| g.service.clone()).collect();
            let global = self.global.next_ready(now);
            let ready =
                services.iter().map(|s| global.max(self.bucket(s, now).next_ready(now))).min().unwrap_or(global);
            ready.max(now + MIN_GAP)
        };
        self.busy = !moves.is_empty();
        Outcome { replan, moves }
    }

    fn bucket(&mut self, service: &str, now: Instant) -> &mut Bucket {
        let rate = self.settings.service(service).max_per_minute;
        self.buckets.entry(service.to_string()).or_insert_with(|| Bucket::new(rate, now))
    }

    /// The oldest connection of the group's donor, if the weights toward its
    /// receivers are live and both buckets hold a token.
    fn take_move(
        &mut self,
        group: &Group,
        verdict: &Verdict,
        members: &[Member],
        counts: &BTreeMap<SocketAddr, Vec<Steered>>,
        ids: &BTreeMap<String, u32>,
        now: Instant,
    ) -> Option<Move> {
        let from = verdict.donor.filter(|_| verdict.active)?;
        if verdict.weights.iter().any(|(b, w)| self.live.get(b).copied().unwrap_or(1) < *w) {
            return None;
        }
        if !self.global.ready(now) || !self.bucket(&group.service, now).ready(now) {
            return None;
        }
        let id = ids.get(&group.service).copied()?;
        // Oldest first: the reaper lists them by connect time.
        let conn = counts.get(&from)?.iter().find(|s| s.state.svc_id == id)?.clone();
        self.global.take(now);
        self.bucket(&group.service, now).take(now);
        Some(Move {
            service: group.service.clone(),
            from,
            toward: verdict.weights.iter().map(|(b, _)| *b).collect(),
            conn,
            spread: members.iter().map(|m| (m.addr, m.established)).collect(),
        })
    }

    /// The destroys of the last look finished; `ended` were really ended.
    pub(crate) fn moved(&mut self, ended: &[&Move]) {
        self.busy = false;
        for m in ended {
            *self.moved.entry((m.service.clone(), m.from)).or_default() += 1;
        }
    }

    /// Sets the wanted weights on the plan's published backends.
    pub(crate) fn weigh(&self, plan: &mut Plan) {
        let published: BTreeSet<SocketAddr> = plan.services.iter().flat_map(|s| s.backends.iter().copied()).collect();
        for (b, w) in &self.wanted {
            if published.contains(b) {
                plan.backends.entry(*b).or_default().weight = *w;
            }
        }
    }

    /// `plan` is what the datapath serves now.
    pub(crate) fn plan_live(&mut self, plan: &Plan, now: Instant) {
        self.live = plan.backends.iter().filter(|(_, f)| f.weight > 1).map(|(b, f)| (*b, f.weight)).collect();
        if !self.active.is_empty() && self.wanted.iter().all(|(b, w)| self.live.get(b) == Some(w)) {
            self.next_round = self.next_round.min(now);
        }
    }

    pub(crate) fn weight(&self, b: SocketAddr) -> u32 {
        self.wanted.get(&b).copied().unwrap_or(1)
    }

    /// Every published (service, backend).
    pub(crate) fn published(&self) -> impl Iterator<Item = (&str, SocketAddr)> {
        self.services.iter().flat_map(|(s, p)| p.backends.iter().map(move |b| (s.as_str(), *b)))
    }
}

#[cfg(test)]
mod tests {
    use nllb_common::SockState;

    use super::*;
    use crate::{
        model::ServicePlan,
        rebalance::config::{RebalanceConfig, RebalanceOverride},
        sock_diag::SocketInfo,
    };

    fn a(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, i, 2], 6443))
    }

    fn plan(backends: &[u8]) -> Plan {
        Plan {
            services: vec![ServicePlan {
                name: "api".into(),
                listen: vec![SocketAddr::from(([127, 0, 0, 1], 7443))],
                backends: backends.iter().map(|i| a(*i)).collect(),
                panic: false,
            }],
            backends: BTreeMap::new(),
        }
    }

    fn ids() -> BTreeMap<String, u32> {
        [("api".to_string(), 0)].into()
    }

    /// `n` sockets to `b`, the first the oldest.
    fn conns(counts: &[(u8, usize)]) -> BTreeMap<SocketAddr, Vec<Steered>> {
        let mut cookie = 0;
        counts
            .iter()
            .map(|(i, n)| {
                let v = (0..*n)
                    .map(|k| {
                        cookie += 1;
                        Steered {
                            socket: SocketInfo {
                                cookie,
                                state: 1,
                                local: SocketAddr::from(([127, 0, 0, 1], 40000 + cookie as u16)),
                                remote: a(*i),
                                inode: 0,
                                uid: 0,
                            },
                            state: SockState { created_ns: k as u64, svc_id: 0, ..Default::default() },
                        }
                    })
                    .collect();
                (a(*i), v)
            })
            .collect()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Agent start with three controllers, c1 ejected and back at `back`.
    fn returned_at(state: &mut State, t0: Instant, back: Instant) {
        state.observe(&plan(&[1, 2, 3]), &[], t0);
        state.observe(&plan(&[2, 3]), &[], back - secs(5));
        state.observe(&plan(&[1, 2, 3]), &[a(1)], back);
    }

    /// Publishes what was wanted, as the agent does once the plan is live.
    fn go_live(state: &mut State, now: Instant) {
        let mut p = plan(&[1, 2, 3]);
        state.weigh(&mut p);
        state.plan_live(&p, now);
    }

    #[test]
    fn a_return_moves_nothing_before_it_settled_then_weights_first_then_one_move_per_token() {
        let t0 = Instant::now();
        let mut s = State::new(RebalanceSettings::default(), t0, Some(1));
        let back = t0 + secs(120);
        returned_at(&mut s, t0, back);
        let spread = conns(&[(1, 0), (2, 16), (3, 14)]);
        // Before healthyFor (10 s): nothing, however uneven.
        assert!(s.due(back + secs(8)).is_some(), "the regular look");
        let o = s.counted(&spread, &ids(), back + secs(8));
        assert_eq!(o, Outcome::default(), "not settled: no weights, no moves");
        // Then a look between 10 s and 10 s + one spacing (5 s) of jitter.
        let woke = (81..=300)
            .map(|x| back + Duration::from_millis(100 * x))
            .find(|t| s.due(*t).is_some())
            .expect("a look after settling");
        assert!(woke >= back + secs(10) && woke <= back + Duration::from_millis(15_200), "{:?}", woke - back);
        let o = s.counted(&spread, &ids(), woke);
        assert!(o.replan && o.moves.is_empty(), "weights are published before anything is ended: {o:?}");
        assert_eq!(s.weight(a(1)), 18);
        assert!(s.due(woke + secs(1)).is_some(), "looks again soon");
        let o = s.counted(&spread, &ids(), woke + secs(1));
        assert!(o.moves.is_empty(), "the weights are not live yet");
        go_live(&mut s, woke + secs(1));
        let now = woke + secs(2);
        let o = s.counted(&spread, &ids(), now);
        assert_eq!(o.moves.len(), 1);
        let m = &o.moves[0];
        assert_eq!(
            (m.from, m.toward.clone(), m.conn.state.created_ns),
            (a(2), vec![a(1)], 0),
            "the busiest, oldest first"
        );
        s.moved(&[m]);
        // The next token is 5 s later (12 per minute).
        assert!(s.counted(&spread, &ids(), now + secs(3)).moves.is_empty());
        s.moved(&[]);
        assert_eq!(s.counted(&spread, &ids(), now + secs(5)).moves.len(), 1);
        assert_eq!(s.moved[&("api".to_string(), a(2))], 1);
    }

    /// The agent sleeps until `next_due` instead of asking `due` on a tick,
    /// so a look must be due exactly then, and not a millisecond before.
    #[test]
    fn next_due_is_the_first_instant_a_look_is_due() {
        let t0 = Instant::now();
        let mut s = State::new(RebalanceSettings::default(), t0, Some(1));
        assert_eq!(s.next_due(), None, "nothing published: nothing to count");
        let back = t0 + secs(120);
        returned_at(&mut s, t0, back);
        let mut seen = Vec::new();
        for _ in 0..5 {
            let at = s.next_due().expect("a look ahead");
            assert!(s.due(at - Duration::from_millis(1)).is_none(), "due before next_due");
            assert!(s.due(at).is_some(), "not due at next_due");
            assert_eq!(s.next_due(), None, "no second look while one is counting");
            s.counted(&conns(&[(1, 0), (2, 16), (3, 14)]), &ids(), at);
            s.moved(&[]);
            seen.push(at.duration_since(t0));
        }
        // The regular looks every 30 s, then the return's settle wake-up
        // (10 s plus up to one 5 s spacing of jitter after c1 came back).
        assert_eq!(seen[..4], [secs(30), secs(60), secs(90), secs(120)]);
        assert!(seen[4] > secs(130) && seen[4] < Duration::from_millis(135_200), "{:?}", seen[4]);
    }

    #[test]
    fn weights_return_to_even_once_the_spread_is_fair() {
        let t0 = Instant::now();
        let mut s = State::new(RebalanceSettings::default(), t0, Some(1));
        let back = t0 + secs(120);
        returned_at(&mut s, t0, back);
        let now = back + secs(30);
        assert!(s.counted(&conns(&[(1, 0), (2, 16), (3, 14)]), &ids(), now).replan);
        let o = s.counted(&conns(&[(1, 10), (2, 10), (3, 10)]), &ids(), now + secs(60));
        assert!(o.replan && o.moves.is_empty());
        assert_eq!(s.weight(a(1)), 1);
        let mut p = plan(&[1, 2, 3]);
        s.weigh(&mut p);
        assert!(p.backends.values().all(|f| f.weight <= 1), "{p:?}");
    }

    #[test]
    fn never_from_a_backend_that_returned_within_a_minute_nor_in_panic_or_alone() {
        let t0 = Instant::now();
        let mut s = State::new(RebalanceSettings::default(), t0, Some(1));
        s.observe(&plan(&[1, 2, 3]), &[], t0);
        // c2 returned 20 s ago and now carries the most; c1 is empty and settled.
        s.observe(&plan(&[1, 3]), &[], t0 + secs(90));
        s.observe(&plan(&[1, 2, 3]), &[a(2)], t0 + secs(100));
        let now = t0 + secs(120);
        let spread = conns(&[(1, 0), (2, 20), (3, 13)]);
        s.counted(&spread, &ids(), now);
        go_live(&mut s, now);
        let o = s.counted(&spread, &ids(), now);
        assert_eq!(o.moves.iter().map(|m| m.from).collect::<Vec<_>>(), vec![a(3)], "not from c2 (returned 20 s ago)");

        let mut panic = plan(&[1, 2, 3]);
        panic.services[0].panic = true;
        let mut s = State::new(RebalanceSettings::default(), t0, Some(1));
        s.observe(&panic, &[], t0);
        assert_eq!(s.counted(&spread, &ids(), t0 + secs(300)), Outcome::default(), "panic mode");

        let mut s = State::new(RebalanceSettings::default(), t0, Some(1));
        s.observe(&plan(&[2]), &[], t0);
        assert_eq!(s.counted(&conns(&[(2, 30)]), &ids(), t0 + secs(300)), Outcome::default(), "alone");
    }

    #[test]
    fn flapping_doubles_the_wait_and_a_minute_of_quiet_is_needed_to_give() {
        let t0 = Instant::now();
        let mut s = State::new(RebalanceSettings::default(), t0, Some(1));
        s.observe(&plan(&[1, 2]), &[], t0);
        assert_eq!(s.settle(a(1), t0), secs(10));
        let mut t = t0;
        for n in 0..4 {
            t += secs(30);
            s.observe(&plan(&[2]), &[], t);
            t += secs(5);
            s.observe(&plan(&[1, 2]), &[a(1)], t);
            assert_eq!(s.settle(a(1), t), secs(10) * (1 << n), "return {}", n + 1);
        }
        assert!(!s.can_give(a(1), t + secs(59)) && s.can_give(a(1), t + secs(60)));
        assert!(!s.can_receive("api", a(1), t + secs(79)) && s.can_receive("api", a(1), t + secs(80)));
        // Ten quiet minutes later a return waits healthyFor again.
        t += FLAP_WINDOW;
        s.observe(&plan(&[2]), &[], t);
        s.observe(&plan(&[1, 2]), &[a(1)], t + secs(1));
        assert_eq!(s.settle(a(1), t + secs(1)), secs(10));
    }

    #[test]
    fn a_burst_of_returns_shares_one_budget_across_services() {
        let t0 = Instant::now();
        let global = RebalanceConfig { max_per_minute: 6, ..Default::default() };
        let settings = global.compose([]).unwrap();
        let mut s = State::new(settings, t0, Some(1));
        let two = |backends: &[u8]| {
            let mut p = plan(backends);
            let mut k = p.services[0].clone();
            k.name = "konn".into();
            k.listen = vec![SocketAddr::from(([127, 0, 0, 1], 7132))];
            k.backends = backends.iter().map(|i| SocketAddr::from(([198, 18, *i, 2], 8132))).collect();
            p.services.push(k);
            p
        };
        s.observe(&two(&[1, 2, 3]), &[], t0);
        let ids: BTreeMap<String, u32> = [("api".to_string(), 0), ("konn".to_string(), 1)].into();
        let mut counts = conns(&[(1, 0), (2, 16), (3, 14)]);
        for (i, n) in [(1u8, 0usize), (2, 8), (3, 7)] {
            let b = SocketAddr::from(([198, 18, i, 2], 8132));
            let v = (0..n)
                .map(|k| Steered {
                    socket: SocketInfo {
                        cookie: 1000 + k as u64,
                        state: 1,
                        local: SocketAddr::from(([127, 0, 0, 1], 50000 + k as u16)),
                        remote: b,
                        inode: 0,
                        uid: 0,
                    },
                    state: SockState { created_ns: k as u64, svc_id: 1, ..Default::default() },
                })
                .collect();
            counts.insert(b, v);
        }
        let mut now = t0 + secs(60);
        s.counted(&counts, &ids, now);
        let mut p = two(&[1, 2, 3]);
        s.weigh(&mut p);
        s.plan_live(&p, now);
        let mut ended = 0;
        // Looked at every 100 ms for two minutes: 6 per minute in total.
        for _ in 0..1200 {
            let o = s.counted(&counts, &ids, now);
            ended += o.moves.len();
            s.moved(&o.moves.iter().collect::<Vec<_>>());
            now += Duration::from_millis(100);
        }
        assert!((12..=13).contains(&ended), "{ended}");
        assert!(s.moved.keys().any(|(svc, _)| svc == "api") && s.moved.keys().any(|(svc, _)| svc == "konn"));
    }

    #[test]
    fn a_disabled_service_is_counted_but_never_moved_or_weighted() {
        let t0 = Instant::now();
        let off = RebalanceOverride { enabled: Some(false), ..Default::default() };
        let settings = RebalanceConfig::default().compose([("services[0].rebalance".into(), "api", &off)]).unwrap();
        let mut s = State::new(settings, t0, Some(1));
        s.observe(&plan(&[1, 2, 3]), &[], t0);
        let o = s.counted(&conns(&[(1, 0), (2, 16), (3, 14)]), &ids(), t0 + secs(300));
        assert_eq!(o, Outcome::default());
        assert_eq!(s.established[&("api".to_string(), a(2))], 16);
    }
}
