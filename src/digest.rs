//! Log lines an operator can read under a flood: repeated events are
//! counted per key and reported at most once per key and period. A pure
//! core: no I/O, no clock (docs/operations.md, "Logs").
//!
//! The first event of a key is reported at once (count 1); later ones within
//! [`PERIOD`] are only counted, and [`Digest::due`] hands out the count of
//! each key whose period has ended, so 100,000 failures of one kind give a
//! line every ten seconds, not 100,000 lines.
//!
//! Invariants: at most one line per key per period; no count is lost while
//! the key is remembered; at most [`MAX_KEYS`] keys (a new key past it
//! reports at once and is not remembered, so a flood of distinct keys still
//! costs at most one line per event and no memory).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// At most one line per key per period.
pub(crate) const PERIOD: Duration = Duration::from_secs(10);
/// Keys remembered at most.
pub(crate) const MAX_KEYS: usize = 1024;

#[derive(Debug)]
struct Tally {
    /// When the key was last reported.
    reported_at: Instant,
    /// Events since then, not yet reported.
    unreported: u64,
}

/// Counts of repeated events per key.
#[derive(Debug)]
pub(crate) struct Digest<K> {
    tallies: HashMap<K, Tally>,
}

impl<K> Default for Digest<K> {
    fn default() -> Self {
        Digest {
            tallies: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Digest<K> {
    /// An event of `key` happened. `Some(1)`: report it now; `None`: it is
    /// counted for a later [`Digest::due`].
    pub(crate) fn note(&mut self, key: &K, now: Instant) -> Option<u64> {
        if let Some(t) = self.tallies.get_mut(key) {
            if now.saturating_duration_since(t.reported_at) < PERIOD {
                t.unreported += 1;
                return None;
            }
            let count = t.unreported + 1;
            t.reported_at = now;
            t.unreported = 0;
            return Some(count);
        }
        if self.tallies.len() < MAX_KEYS {
            self.tallies.insert(
                key.clone(),
                Tally {
                    reported_at: now,
                    unreported: 0,
                },
            );
        }
        Some(1)
    }

    /// Keys whose period ended with events unreported, and their counts;
    /// keys quiet for a whole period are forgotten.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<(K, u64)> {
        let mut due = Vec::new();
        self.tallies.retain(|key, t| {
            if now.saturating_duration_since(t.reported_at) < PERIOD {
                return true;
            }
            if t.unreported == 0 {
                return false;
            }
            due.push((key.clone(), t.unreported));
            t.unreported = 0;
            t.reported_at = now;
            true
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gives_one_line_per_period() {
        let mut d = Digest::default();
        let t = Instant::now();
        let mut lines = 0;
        let mut counted = 0;
        for n in 0..100_000u64 {
            let now = t + Duration::from_micros(n * 150); // 15 s of events
            if let Some(c) = d.note(&"k", now) {
                lines += 1;
                counted += c;
            }
            for (_, c) in d.due(now) {
                lines += 1;
                counted += c;
            }
        }
        for (_, c) in d.due(t + Duration::from_secs(60)) {
            lines += 1;
            counted += c;
        }
        assert_eq!(counted, 100_000, "no event is lost");
        assert!(lines <= 3, "{lines} lines");
    }

    #[test]
    fn keys_are_counted_apart_and_quiet_keys_forgotten() {
        let mut d = Digest::default();
        let t = Instant::now();
        assert_eq!(d.note(&"a", t), Some(1));
        assert_eq!(d.note(&"b", t), Some(1));
        assert_eq!(d.note(&"a", t), None);
        let due = d.due(t + PERIOD);
        assert_eq!(due, vec![("a", 1)]);
        assert!(d.due(t + PERIOD * 3).is_empty());
        assert!(d.tallies.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut d = Digest::default();
        let t = Instant::now();
        for n in 0..(MAX_KEYS * 2) {
            assert_eq!(d.note(&n, t), Some(1));
        }
        assert_eq!(d.tallies.len(), MAX_KEYS);
    }
}
