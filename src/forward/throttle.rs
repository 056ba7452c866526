//! Throttle: the pure core of the catch-up rate cap (docs/forwarding.md,
//! The rate cap; docs/decisions/0026-rate-cap-token-bucket-with-debt.md).
//!
//! Role: say whether the forwarder may take the next row now, and for how
//! long it must wait if not; record the cost of every publish; keep the
//! account of time spent waiting. No I/O and no clock: every call is given
//! `now`, so the tests drive time by hand.
//!
//! Owns: one token [`Bucket`] per configured cap (`publish.max_rate`, cost
//! 1 per message; `publish.max_bytes_rate`, cost the body's bytes), and the
//! waiting account behind `throttled` in status and metrics.
//!
//! Invariants:
//! - The gate opens when no bucket is in debt; a publish then takes its
//!   whole cost, which may leave a bucket in debt, paid back at the cap
//!   before the next row. So over any interval `T` at most
//!   `burst + cap × T + one message's cost` goes out, and a message larger
//!   than the burst goes out too (nothing deadlocks).
//! - A bucket holds at most its burst, a tenth of a second of its cap: an
//!   idle agent that comes back starts at the cap, not with a flood.
//! - Tokens accrue from the elapsed time, not from timer wake-ups, so a
//!   late timer costs no throughput: the long-run rate is the cap.
//! - With no cap configured the gate is always open and nothing is counted.

use std::time::{Duration, Instant};

/// How much a bucket holds when full, in seconds of its cap.
pub(crate) const BURST: Duration = Duration::from_millis(100);

/// How long `throttled` stays true after the cap last held a row back:
/// the forwarder passes the gate between two waits, and a status read at
/// that instant must not say the cap is off while it is holding the drain.
pub(crate) const THROTTLED_HOLD: Duration = Duration::from_secs(1);

/// One token bucket: `rate` tokens per second, at most `burst` kept.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    /// Tokens at `at`; negative while in debt.
    level: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket for `rate` per second; `None` when `rate` is 0 (off).
    pub(crate) fn new(rate: u64, now: Instant) -> Option<Bucket> {
        if rate == 0 {
            return None;
        }
        let rate = rate as f64;
        let burst = rate * BURST.as_secs_f64();
        Some(Bucket {
            rate,
            burst,
            level: burst,
            at: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }

    /// `None` when not in debt; else how long until the debt is paid.
    pub(crate) fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.level >= 0.0 {
            return None;
        }
        // At least a microsecond: a debt too small to express must still
        // be waited for, or the caller would spin on a zero sleep.
        Some(Duration::from_secs_f64(-self.level / self.rate).max(Duration::from_micros(1)))
    }

    pub(crate) fn charge(&mut self, now: Instant, cost: u64) {
        self.refill(now);
        self.level -= cost as f64;
    }
}

/// The caps of one forwarder and the account of its waiting.
#[derive(Debug, Clone)]
pub(crate) struct Throttle {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    /// Since when the gate has been holding a wanted row back.
    waiting_since: Option<Instant>,
    /// When the gate last held a wanted row back (or still does).
    last_held: Option<Instant>,
    /// Closed waiting time, over the agent's life.
    waited: Duration,
    /// What [`Throttle::take_waited`] has handed out so far.
    reported: Duration,
}

impl Throttle {
    /// Caps of `max_rate` messages/s and `max_bytes_rate` bytes/s; 0 is off.
    pub(crate) fn new(max_rate: u64, max_bytes_rate: u64, now: Instant) -> Throttle {
        Throttle {
            messages: Bucket::new(max_rate, now),
            bytes: Bucket::new(max_bytes_rate, now),
            waiting_since: None,
            last_held: None,
            waited: Duration::ZERO,
            reported: Duration::ZERO,
        }
    }

    /// Whether the next row may be taken: `None` yes, `Some(wait)` not
    /// before `wait` has passed. `wanted` says whether the forwarder has a
    /// row to take; without one nothing is held back and the waiting
    /// account closes.
    pub(crate) fn gate(&mut self, now: Instant, wanted: bool) -> Option<Duration> {
        let wait = if wanted {
            let messages = self.messages.as_mut().and_then(|b| b.wait(now));
            let bytes = self.bytes.as_mut().and_then(|b| b.wait(now));
            messages.max(bytes)
        } else {
            None
        };
        match wait {
            Some(_) => {
                self.waiting_since.get_or_insert(now);
                self.last_held = Some(now);
            }
            None => {
                self.close_wait(now);
                if !wanted {
                    self.last_held = None;
                }
            }
        }
        wait
    }

    /// Records a publish of a `bytes`-byte body.
    pub(crate) fn charge(&mut self, now: Instant, bytes: usize) {
        if let Some(b) = self.messages.as_mut() {
            b.charge(now, 1);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.charge(now, u64::try_from(bytes).unwrap_or(u64::MAX));
        }
    }

    /// The cap is holding the forwarder back: it has rows to send and the
    /// gate held one back within [`THROTTLED_HOLD`].
    pub(crate) fn throttled(&self, now: Instant) -> bool {
        self.last_held
            .is_some_and(|t| now.saturating_duration_since(t) < THROTTLED_HOLD)
    }

    /// Time spent waiting at the gate over the agent's life, the wait in
    /// progress included.
    pub(crate) fn waited(&self, now: Instant) -> Duration {
        self.waited
            + self
                .waiting_since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// The waiting time not handed out by an earlier call (for a counter).
    pub(crate) fn take_waited(&mut self, now: Instant) -> Duration {
        let total = self.waited(now);
        let new = total.saturating_sub(self.reported);
        self.reported = total;
        new
    }

    fn close_wait(&mut self, now: Instant) {
        if let Some(t) = self.waiting_since.take() {
            self.waited += now.saturating_duration_since(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Drives the gate like the forwarder: whenever it opens, one row of
    /// `size(i)` bytes goes out; a closed gate is waited out exactly (or
    /// `late` later, a sluggish timer). Returns the send times.
    fn drain(
        throttle: &mut Throttle,
        start: Instant,
        rows: usize,
        late: Duration,
        size: impl Fn(usize) -> usize,
    ) -> Vec<Instant> {
        let mut now = start;
        let mut sent = Vec::with_capacity(rows);
        while sent.len() < rows {
            match throttle.gate(now, true) {
                None => {
                    throttle.charge(now, size(sent.len()));
                    sent.push(now);
                }
                Some(wait) => now += wait + late,
            }
        }
        sent
    }

    #[test]
    fn off_by_default_never_waits_and_counts_nothing() {
        let t0 = Instant::now();
        let mut t = Throttle::new(0, 0, t0);
        for i in 0..10_000 {
            assert_eq!(t.gate(t0, true), None);
            t.charge(t0, i);
        }
        assert!(!t.throttled(t0));
        assert_eq!(t.waited(t0 + ms(5)), Duration::ZERO);
    }

    #[test]
    fn the_message_cap_holds_over_a_long_drain() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1000, 0, t0);
        let sent = drain(&mut t, t0, 20_001, Duration::ZERO, |_| 512);
        // The burst (100 messages, plus the one the gate lets into debt)
        // goes at once; the rest at the cap.
        let burst = sent.iter().filter(|&&s| s == t0).count();
        assert_eq!(burst, 101);
        let span = (sent[20_000] - sent[burst - 1]).as_secs_f64();
        let rate = (20_000 - (burst - 1)) as f64 / span;
        assert!((rate - 1000.0).abs() < 1.0, "rate {rate}");
    }

    #[test]
    fn a_late_timer_costs_no_throughput() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1000, 0, t0);
        // Every wait overshoots by 2 ms (more than a message's time).
        let sent = drain(&mut t, t0, 10_101, ms(2), |_| 512);
        let rate = 10_000.0 / (sent[10_100] - sent[100]).as_secs_f64();
        assert!((rate - 1000.0).abs() / 1000.0 < 0.01, "rate {rate}");
    }

    #[test]
    fn the_byte_cap_holds_with_mixed_sizes() {
        let t0 = Instant::now();
        let cap = 1 << 20;
        let mut t = Throttle::new(0, cap, t0);
        let size = |i: usize| 100 + (i * 7919) % 20_000;
        let sent = drain(&mut t, t0, 5_000, Duration::ZERO, size);
        let bytes: usize = (1..5_000).map(size).sum();
        // The bytes of rows 1.. went out over the time from row 0 to the
        // last row, give or take the burst and one message.
        let span = (sent[4_999] - sent[0]).as_secs_f64();
        let rate = bytes as f64 / span;
        let slack = (cap as f64 * BURST.as_secs_f64() + 20_000.0) / span;
        assert!((rate - cap as f64).abs() <= slack, "rate {rate}");
    }

    #[test]
    fn a_message_larger_than_the_burst_goes_out_and_the_next_waits_its_cost() {
        let t0 = Instant::now();
        // 10 KiB/s: the burst is 1 KiB; the message is 100 KiB.
        let mut t = Throttle::new(0, 10 * 1024, t0);
        assert_eq!(t.gate(t0, true), None);
        t.charge(t0, 100 * 1024);
        // The debt is 99 KiB, paid at 10 KiB/s.
        let wait = t.gate(t0, true).unwrap();
        assert!((wait.as_secs_f64() - 9.9).abs() < 0.001, "{wait:?}");
        assert_eq!(t.gate(t0 + wait, true), None);
    }

    #[test]
    fn the_tighter_of_two_caps_decides() {
        let t0 = Instant::now();
        // 1000 messages/s but 100 KiB/s of 1 KiB messages: 100/s.
        let mut t = Throttle::new(1000, 100 * 1024, t0);
        let sent = drain(&mut t, t0, 1_011, Duration::ZERO, |_| 1024);
        let rate = 1_000.0 / (sent[1_010] - sent[10]).as_secs_f64();
        assert!((rate - 100.0).abs() < 0.5, "rate {rate}");
    }

    #[test]
    fn an_idle_bucket_keeps_only_its_burst() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1000, 0, t0);
        let later = t0 + Duration::from_secs(3600);
        let sent = drain(&mut t, later, 500, Duration::ZERO, |_| 1);
        assert_eq!(sent.iter().filter(|&&s| s == later).count(), 101);
    }

    #[test]
    fn throttled_while_the_gate_holds_rows_back_and_waiting_is_counted() {
        let t0 = Instant::now();
        // 10 messages/s: the burst is one message (and one into debt).
        let mut t = Throttle::new(10, 0, t0);
        for _ in 0..2 {
            assert_eq!(t.gate(t0, true), None);
            t.charge(t0, 1);
        }
        assert!(!t.throttled(t0), "the burst is not throttling");
        let wait = t.gate(t0, true).unwrap();
        assert_eq!(wait, ms(100));
        assert!(t.throttled(t0));
        assert_eq!(t.waited(t0 + ms(40)), ms(40), "the wait in progress counts");
        // Passing the gate between two waits is still throttled.
        assert_eq!(t.gate(t0 + wait, true), None);
        assert!(t.throttled(t0 + wait));
        assert_eq!(t.take_waited(t0 + wait), ms(100));
        assert_eq!(t.take_waited(t0 + wait), Duration::ZERO);
        // Nothing left to send: not throttled, nothing more counted.
        assert_eq!(t.gate(t0 + ms(150), false), None);
        assert!(!t.throttled(t0 + ms(150)));
        assert_eq!(t.waited(t0 + ms(900)), ms(100));
        // A drain that the cap stops holding back stops being throttled.
        t.charge(t0 + ms(200), 1);
        t.charge(t0 + ms(200), 1);
        let wait = t.gate(t0 + ms(200), true).unwrap();
        assert!(t.throttled(t0 + ms(200)));
        assert_eq!(t.gate(t0 + ms(200) + wait, true), None);
        assert!(!t.throttled(t0 + ms(200) + wait + THROTTLED_HOLD));
    }
}
