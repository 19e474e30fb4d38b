//! The rate limit on ended connections: a token bucket that holds one
//! token, so moves are spaced evenly (at most 1 + rate × t in any window of
//! length t) and never come in bursts.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    per_minute: u32,
    /// 0.0 ..= 1.0: a move may be made at 1.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Full: the first move need not wait.
    pub(crate) fn new(per_minute: u32, now: Instant) -> Bucket {
        Bucket { per_minute: per_minute.max(1), tokens: 1.0, at: now }
    }

    /// A new rate; what has refilled so far stays.
    pub(crate) fn set_rate(&mut self, per_minute: u32, now: Instant) {
        self.refill(now);
        self.per_minute = per_minute.max(1);
    }

    /// Time between two moves.
    pub(crate) fn spacing(&self) -> Duration {
        Duration::from_secs(60) / self.per_minute
    }

    fn refill(&mut self, now: Instant) {
        // An earlier `now` (callers take their own readings) must not move
        // the clock back and refill the same time twice.
        if now <= self.at {
            return;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(self.per_minute) / 60.0).min(1.0);
        self.at = now;
    }

    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        // Float steps must not delay a token that is due.
        self.tokens >= 1.0 - 1e-9
    }

    /// Takes the token; call only when `ready`.
    pub(crate) fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// When the next token is there.
    pub(crate) fn next_ready(&mut self, now: Instant) -> Instant {
        if self.ready(now) {
            return now;
        }
        now + self.spacing().mul_f64(1.0 - self.tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_move_then_one_per_spacing_never_a_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(12, t0);
        assert!(b.ready(t0));
        b.take(t0);
        assert_eq!(b.next_ready(t0), t0 + Duration::from_secs(5));
        assert!(!b.ready(t0 + Duration::from_millis(4900)));
        let due = b.next_ready(t0 + Duration::from_millis(4900));
        assert!((due - t0).abs_diff(Duration::from_secs(5)) < Duration::from_micros(1), "{:?}", due - t0);
        assert!(b.ready(t0 + Duration::from_secs(5)));
        // A long quiet time does not save up tokens for a burst.
        let later = t0 + Duration::from_secs(600);
        assert!(b.ready(later));
        b.take(later);
        assert!(!b.ready(later + Duration::from_secs(1)));
    }

    #[test]
    fn moves_in_any_window_stay_within_one_plus_rate_times_length() {
        let t0 = Instant::now();
        let mut b = Bucket::new(30, t0);
        let mut taken = 0;
        let mut t = t0;
        // Asked every 100 ms for 60 s.
        while t < t0 + Duration::from_secs(60) {
            if b.ready(t) {
                b.take(t);
                taken += 1;
            }
            t += Duration::from_millis(100);
        }
        assert!((30..=31).contains(&taken), "{taken}");
    }
}
