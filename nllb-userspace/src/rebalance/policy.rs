//! The rule for one group (a service's published backends of one address
//! family: a connect to an IPv4 virtual address only picks IPv4 backends):
//! is the spread of nllb's established connections fair, which backend
//! gives up a connection, and which backends draw the reconnects. Pure, so
//! every case is a unit test.
//!
//! - fair share = connections / backends.
//! - The spread turns uneven when a backend is off its fair share by more
//!   than `margin` × fair share, and by more than one connection (one
//!   connection more or less is never worth ending a stream).
//! - Once uneven, connections move until no backend carries more than
//!   ⌈fair share⌉ (hysteresis: stopping at the margin would leave the
//!   returning backend short for good).
//! - Receivers are backends below their fair share that may receive
//!   (settled after their return); they get a weight such that about 9 in
//!   10 reconnects pick one of them. Without a receiver nothing moves.
//! - The donor is the backend with the most connections above ⌈fair share⌉
//!   that may give (not within a minute of its own return).

use std::net::SocketAddr;

use nllb_common::MAX_BACKENDS;

/// Odds (to 1) that a reconnect picks a receiver rather than another backend.
const RECEIVER_ODDS: u32 = 9;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) addr: SocketAddr,
    /// nllb's established connections to it for this service.
    pub(crate) established: usize,
    /// Published long enough after its last return to be given connections.
    pub(crate) can_receive: bool,
    /// Not within a minute of its own return.
    pub(crate) can_give: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Verdict {
    /// Connections are being moved in this group.
    pub(crate) active: bool,
    pub(crate) fair: f64,
    /// Slots per receiver (others keep one).
    pub(crate) weights: Vec<(SocketAddr, u32)>,
    /// Where the next connection is taken from (None: nobody may give now).
    pub(crate) donor: Option<SocketAddr>,
}

/// Judges one group; `was_active`: connections were being moved here at the
/// last look (keeps moving to ⌈fair share⌉).
pub(crate) fn judge(members: &[Member], margin: f64, was_active: bool) -> Verdict {
    // A backend that has not settled since it joined or returned is left
    // out: its empty share must not set the others moving before it may
    // draw anything itself (a controller back for two seconds made a 9/21
    // split of the others look uneven, and one was moved toward the 9; had
    // it gone again, that move was for nothing). It still holds its slot.
    let judged: Vec<&Member> = members.iter().filter(|m| m.can_receive).collect();
    let n = judged.len();
    let total: usize = judged.iter().map(|m| m.established).sum();
    if n < 2 || total == 0 {
        return Verdict::default();
    }
    let fair = total as f64 / n as f64;
    let ceiling = fair.ceil() as usize;
    let tolerance = (margin * fair).max(1.0);
    let uneven = judged.iter().any(|m| (m.established as f64 - fair).abs() > tolerance);
    let most = judged.iter().map(|m| m.established).max().unwrap_or(0);
    let receivers: Vec<&&Member> = judged.iter().filter(|m| (m.established as f64) < fair).collect();
    if !(uneven || was_active) || most <= ceiling || receivers.is_empty() {
        return Verdict { fair, ..Default::default() };
    }
    let r = receivers.len() as u32;
    let others = members.len() as u32 - r;
    // A table holds MAX_BACKENDS slots per family: others keep one each.
    let room = (MAX_BACKENDS.saturating_sub(others) / r).max(1);
    let weight = (RECEIVER_ODDS * others).div_ceil(r).clamp(2, room.max(2)).min(room);
    let donor = judged
        .iter()
        .filter(|m| m.established > ceiling && m.can_give)
        .max_by(|a, b| a.established.cmp(&b.established).then(b.addr.cmp(&a.addr)))
        .map(|m| m.addr);
    Verdict { active: true, fair, weights: receivers.iter().map(|m| (m.addr, weight)).collect(), donor }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, i, 2], 6443))
    }

    fn group(counts: &[usize]) -> Vec<Member> {
        counts
            .iter()
            .enumerate()
            .map(|(i, c)| Member { addr: a(i as u8 + 1), established: *c, can_receive: true, can_give: true })
            .collect()
    }

    #[test]
    fn a_returned_backend_with_nothing_draws_reconnects_from_the_busiest() {
        let v = judge(&group(&[0, 16, 14]), 0.5, false);
        assert!(v.active);
        assert!((v.fair - 10.0).abs() < 1e-9, "{v:?}");
        assert_eq!(v.donor, Some(a(2)));
        // 18 slots against 2: 9 in 10 reconnects land on it.
        assert_eq!(v.weights, vec![(a(1), 18)]);
    }

    #[test]
    fn moves_go_on_to_the_fair_share_once_started_then_stop() {
        // 12/12/6 is within the margin: alone it would not start anything...
        assert!(!judge(&group(&[6, 12, 12]), 0.5, false).active);
        // ...but an episode that got there goes on to 10/10/10.
        let v = judge(&group(&[6, 12, 12]), 0.5, true);
        assert!(v.active && v.donor.is_some(), "{v:?}");
        assert!(!judge(&group(&[10, 10, 10]), 0.5, true).active);
        // 31 connections: 11/10/10 is as fair as it gets.
        assert!(!judge(&group(&[10, 11, 10]), 0.5, true).active);
    }

    #[test]
    fn one_connection_more_or_less_is_never_moved() {
        for counts in [&[1, 0][..], &[1, 1, 0], &[2, 1, 0], &[3, 2, 1], &[0, 2, 1]] {
            assert!(!judge(&group(counts), 0.0, false).active, "{counts:?}");
        }
        // Two apart is.
        assert!(judge(&group(&[3, 3, 0]), 0.5, false).active);
        assert!(judge(&group(&[3, 0]), 0.5, false).active);
    }

    #[test]
    fn random_placement_noise_stays_within_the_default_margin() {
        for counts in [&[14, 8, 8][..], &[13, 9, 8], &[12, 12, 6]] {
            assert!(!judge(&group(counts), 0.5, false).active, "{counts:?}");
        }
        assert!(judge(&group(&[13, 9, 8]), 0.2, false).active, "a tighter margin moves it");
    }

    #[test]
    fn nothing_moves_for_a_lone_backend_an_empty_group_or_without_a_receiver() {
        assert_eq!(judge(&group(&[30]), 0.0, true), Verdict::default());
        assert_eq!(judge(&group(&[0, 0, 0]), 0.0, true), Verdict::default());
        let mut g = group(&[0, 16, 14]);
        g[0].can_receive = false;
        assert!(!judge(&g, 0.5, false).active, "the returned backend has not settled yet");
    }

    #[test]
    fn an_unsettled_backend_does_not_make_the_others_uneven() {
        // The others' 9/21 is within the margin of their 15 each; with the
        // returned backend's 0 counted it is not, and the 9 would draw.
        let mut g = group(&[0, 9, 21]);
        g[0].can_receive = false;
        assert!(!judge(&g, 0.5, false).active, "{:?}", judge(&g, 0.5, false));
        // Settled, it draws, and so does the one below the fair share; its
        // slot counted among the others when it could not receive.
        g[0].can_receive = true;
        let v = judge(&g, 0.5, false);
        assert!(v.active && v.donor == Some(a(3)), "{v:?}");
        assert_eq!(v.weights.iter().map(|w| w.0).collect::<Vec<_>>(), [a(1), a(2)]);
        let mut g = group(&[0, 0, 16, 14]);
        g[0].can_receive = false;
        let v = judge(&g, 0.5, false);
        assert_eq!(v.weights, vec![(a(2), 27)], "9 in 10 against three other slots");
    }

    #[test]
    fn a_backend_that_just_returned_never_gives() {
        let mut g = group(&[0, 16, 14]);
        g[1].can_give = false;
        assert_eq!(judge(&g, 0.5, false).donor, Some(a(3)));
        g[2].can_give = false;
        let v = judge(&g, 0.5, false);
        assert!(v.active && v.donor.is_none(), "weights still steer new connects: {v:?}");
    }

    #[test]
    fn weights_fit_the_table() {
        // 64 backends, one receiver: 63 others keep one slot each.
        let mut counts = vec![2usize; 64];
        counts[0] = 0;
        counts[1] = 4;
        let v = judge(&group(&counts), 0.5, true);
        assert_eq!(v.weights, vec![(a(1), 1)]);
        // Two receivers of four: 9 slots each against 2.
        let v = judge(&group(&[0, 0, 10, 10]), 0.5, false);
        assert_eq!(v.weights.iter().map(|w| w.1).collect::<Vec<_>>(), vec![9, 9]);
        let slots: u32 = v.weights.iter().map(|w| w.1).sum::<u32>() + 2;
        assert!(slots <= MAX_BACKENDS);
    }
}
