//! The forwarder's in-flight ledger: which rows are out, and what each
//! broker answer means for them. A pure core: no I/O, no clock, no lapin
//! types; the lapin loop around it ([`super::forwarder`]) feeds it events
//! and carries out what it answers (docs/forwarding.md, "Outcomes" and
//! "Isolating a message the broker refuses").
//!
//! Owns, per row id: *published* (awaiting its confirm on one channel
//! generation), *settling* (its outcome is being committed), *suspect*
//! (its outcome was lost when the broker closed the channel or the
//! connection, and nobody knows whether it was the cause).
//!
//! Isolation, the liveness guarantee: a broker close that cannot be pinned
//! on one row turns every row that was awaiting a confirm on that channel
//! into a suspect, charged nothing. Suspects are published again before
//! anything else, in groups of [`GROUP`] with nothing else in flight; a
//! group that is closed again splits into single rows; a row closed while
//! it is alone on the channel is the culprit and is charged one attempt
//! with the broker's reply. So a message the broker refuses costs itself
//! one attempt per pass and at most two channel closes, and every other row
//! goes through after at most `GROUP + 1` confirm round trips per suspect
//! group.
//!
//! Invariants:
//! - A row is in at most one state; [`Ledger::holds`] is true for every row
//!   in any state, so the backlog never hands out a row already out.
//! - An attempt is charged (a [`Settle::Rejected`]) only for a broker
//!   reply about that row alone: a return, a nack, a close while it was
//!   the only row on its channel, or a confirm timeout after the link
//!   proved alive ([`Ledger::charge_overdue`]).
//! - Answers about an older channel generation are ignored: that channel's
//!   rows were already accounted for when it closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// Suspects published together in the first round of an isolation.
pub(crate) const GROUP: usize = 16;

/// A row's id (the AMQP `message_id`).
pub(crate) type RowId = String;

/// What the broker answered about one published row (lapin-free).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `basic.ack` with no `basic.return` before it: delivered.
    Ack,
    /// `basic.return` (then an ack or nack): not routed.
    Returned { code: u16, text: String },
    /// `basic.nack` without a return.
    Nack,
}

/// The broker closed a channel or the connection, with this reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokerClose {
    pub(crate) code: u16,
    pub(crate) text: String,
}

impl std::fmt::Display for BrokerClose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// An outcome for the store to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Status 0 → 1.
    Delivered(RowId),
    /// One failed attempt, with the broker's reason.
    Rejected(RowId, String),
}

impl Settle {
    pub(crate) fn id(&self) -> &str {
        match self {
            Settle::Delivered(id) | Settle::Rejected(id, _) => id,
        }
    }
}

/// What the forwarder may publish next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Publish this suspect now (it was handed out: call
    /// [`Ledger::published`] or [`Ledger::not_sent`] for it).
    Suspect(RowId),
    /// Publish the next backlog row.
    Backlog,
    /// Publish nothing: the window is full, or an isolation waits for the
    /// rows on the wire to settle.
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Published with others, as usual.
    Normal,
    /// Republished with the other suspects of its group.
    Group,
    /// Republished alone: a close now is its own.
    Alone,
}

#[derive(Debug)]
struct Published {
    channel: u64,
    sent_at: Instant,
    phase: Phase,
}

/// The in-flight bookkeeping of one forwarder.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// Unconfirmed rows at most (`publish.max_in_flight`).
    window: usize,
    published: HashMap<RowId, Published>,
    settling: HashSet<RowId>,
    /// Suspects waiting for a group round, oldest first.
    suspects: VecDeque<RowId>,
    /// Suspects waiting to be published alone.
    singles: VecDeque<RowId>,
    /// Suspects handed out and not yet published (or not sent).
    handed: HashMap<RowId, Phase>,
    /// Rows whose outcome was committed, with the count of backlog page
    /// reads started by then: a page read that started before the commit
    /// may still show the row delivering, and must not hand it out again
    /// (a duplicate without a fault). Pruned as reads move on.
    recent: HashMap<RowId, u64>,
    recent_order: VecDeque<(u64, RowId)>,
    /// Rows the broker closed a channel on, oldest first: their next tries
    /// go out alone, so a message the broker refuses costs only its own
    /// channel, not a batch of copies and an isolation each time.
    culprits: HashSet<RowId>,
    culprit_order: VecDeque<RowId>,
}

/// Culprits remembered at most (a row that fails for good stops coming
/// back, so only a flood of refused messages reaches this).
const MAX_CULPRITS: usize = 4096;

impl Ledger {
    pub(crate) fn new(window: usize) -> Ledger {
        Ledger {
            window: window.max(1),
            published: HashMap::new(),
            settling: HashSet::new(),
            suspects: VecDeque::new(),
            singles: VecDeque::new(),
            handed: HashMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            culprits: HashSet::new(),
            culprit_order: VecDeque::new(),
        }
    }

    /// The broker closed a channel on this row before: it goes out alone.
    pub(crate) fn is_culprit(&self, id: &str) -> bool {
        self.culprits.contains(id)
    }

    /// Publish this row alone, as a single suspect (a known culprit the
    /// backlog handed out).
    pub(crate) fn alone(&mut self, id: RowId) {
        if !self.holds(&id) {
            self.singles.push_back(id);
        }
    }

    fn convicted(&mut self, id: &str) {
        if self.culprits.insert(id.to_string()) {
            self.culprit_order.push_back(id.to_string());
            if self.culprit_order.len() > MAX_CULPRITS {
                if let Some(oldest) = self.culprit_order.pop_front() {
                    self.culprits.remove(&oldest);
                }
            }
        }
    }

    /// The row is out in some state: the backlog must skip it.
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.published.contains_key(id)
            || self.settling.contains(id)
            || self.handed.contains_key(id)
            || self.suspects.iter().any(|s| s == id)
            || self.singles.iter().any(|s| s == id)
    }

    /// Rows awaiting a confirm.
    pub(crate) fn unconfirmed(&self) -> usize {
        self.published.len()
    }

    /// No row's outcome is open in any way.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.published.is_empty()
            && self.settling.is_empty()
            && self.handed.is_empty()
            && self.suspects.is_empty()
            && self.singles.is_empty()
            && self.recent.is_empty()
    }

    /// An isolation is under way: suspects wait for their round.
    #[cfg(test)]
    pub(crate) fn isolating(&self) -> bool {
        !self.suspects.is_empty()
            || !self.singles.is_empty()
            || self.published.values().any(|p| p.phase != Phase::Normal)
    }

    /// What may go out next.
    pub(crate) fn next(&mut self) -> Next {
        if !self.handed.is_empty() {
            return Next::Wait;
        }
        let in_group = self
            .published
            .values()
            .filter(|p| p.phase == Phase::Group)
            .count();
        let alone = self.published.values().any(|p| p.phase == Phase::Alone);
        if !self.singles.is_empty() {
            if !self.published.is_empty() {
                return Next::Wait;
            }
            let id = self.singles.pop_front().unwrap_or_default();
            self.handed.insert(id.clone(), Phase::Alone);
            return Next::Suspect(id);
        }
        if !self.suspects.is_empty() {
            // A group round starts on a quiet channel and fills up to GROUP.
            let round_open = in_group > 0 && in_group == self.published.len();
            if alone || (!self.published.is_empty() && !round_open) || in_group >= GROUP {
                return Next::Wait;
            }
            let id = self.suspects.pop_front().unwrap_or_default();
            self.handed.insert(id.clone(), Phase::Group);
            return Next::Suspect(id);
        }
        if in_group > 0 || alone {
            // Let the isolation's last round settle before anything else.
            return Next::Wait;
        }
        if self.published.len() >= self.window {
            Next::Wait
        } else {
            Next::Backlog
        }
    }

    /// The row's publish frame went out on `channel`.
    pub(crate) fn published(&mut self, id: RowId, channel: u64, now: Instant) {
        let phase = self.handed.remove(&id).unwrap_or(Phase::Normal);
        self.published.insert(
            id,
            Published {
                channel,
                sent_at: now,
                phase,
            },
        );
    }

    /// The row could not be sent (the channel was already closing, the
    /// publish timed out): nothing is known of it. A suspect keeps its
    /// place at the head of its queue.
    pub(crate) fn not_sent(&mut self, id: &str) {
        match self.handed.remove(id) {
            Some(Phase::Alone) => self.singles.push_front(id.to_string()),
            Some(Phase::Group) => self.suspects.push_front(id.to_string()),
            Some(Phase::Normal) | None => {
                self.published.remove(id);
            }
        }
    }

    /// The broker refused the row before it was published (its exchange is
    /// missing, by a fresh passive declare), or it cannot be sent at all:
    /// one failed attempt, with that reason.
    pub(crate) fn refuse(&mut self, id: &str, reason: String) -> Settle {
        self.handed.remove(id);
        self.settling.insert(id.to_string());
        Settle::Rejected(id.to_string(), reason)
    }

    /// A suspect handed out is no longer delivering (settled meanwhile by
    /// the consumer, or deleted by an operator): let it go.
    pub(crate) fn vanished(&mut self, id: &str) {
        self.handed.remove(id);
    }

    /// The connection is gone: every channel is lost (see
    /// [`Ledger::channel_closed`] with `None`).
    pub(crate) fn link_lost(&mut self) {
        let mut channels: Vec<u64> = self.published.values().map(|p| p.channel).collect();
        channels.sort_unstable();
        channels.dedup();
        for channel in channels {
            self.channel_closed(channel, None);
        }
        // Handed-out suspects never went out: they keep their place.
        let handed: Vec<(RowId, Phase)> = self.handed.drain().collect();
        for (id, phase) in handed {
            match phase {
                Phase::Alone => self.singles.push_front(id),
                Phase::Group => self.suspects.push_front(id),
                Phase::Normal => {}
            }
        }
    }

    /// Nothing is known of a published row after all (its confirm timed
    /// out while the broker blocked publishing): it goes out again, charged
    /// nothing; a suspect stays a suspect.
    pub(crate) fn forget(&mut self, id: &str, channel: u64) {
        match self.published.get(id) {
            Some(p) if p.channel == channel => {}
            _ => return,
        }
        if let Some(p) = self.published.remove(id) {
            match p.phase {
                Phase::Normal => {}
                Phase::Group => self.suspects.push_front(id.to_string()),
                Phase::Alone => self.singles.push_front(id.to_string()),
            }
        }
    }

    /// Whether the row is published on `channel` and awaiting its confirm.
    pub(crate) fn awaits(&self, id: &str, channel: u64) -> bool {
        self.published.get(id).is_some_and(|p| p.channel == channel)
    }

    /// A confirm arrived. `None` when it is stale (an older channel, or a
    /// row already accounted for).
    pub(crate) fn confirmed(&mut self, id: &str, channel: u64, reply: Reply) -> Option<Settle> {
        match self.published.get(id) {
            Some(p) if p.channel == channel => {}
            _ => return None,
        }
        self.published.remove(id);
        self.settling.insert(id.to_string());
        Some(match reply {
            Reply::Ack => Settle::Delivered(id.to_string()),
            Reply::Returned { code, text } => Settle::Rejected(
                id.to_string(),
                format!("{code} {text}: returned by the broker (unroutable)"),
            ),
            Reply::Nack => Settle::Rejected(
                id.to_string(),
                "basic.nack: the broker could not take the message".into(),
            ),
        })
    }

    /// Channel `channel` is gone. With `Some(close)` the broker closed it
    /// (or the connection) with that reply: the one row alone on it is
    /// charged; otherwise its rows become suspects. With `None` the link
    /// was lost (network, heartbeat, our own close): its rows are simply
    /// unknown and go out again with the backlog, charged nothing, except
    /// suspects, which stay suspects.
    pub(crate) fn channel_closed(
        &mut self,
        channel: u64,
        close: Option<&BrokerClose>,
    ) -> Vec<Settle> {
        let mut gone: Vec<(RowId, Published)> = Vec::new();
        let ids: Vec<RowId> = self
            .published
            .iter()
            .filter(|(_, p)| p.channel == channel)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(p) = self.published.remove(&id) {
                gone.push((id, p));
            }
        }
        // Oldest first, so suspects are retried in submission order.
        gone.sort_by_key(|(_, p)| p.sent_at);
        let Some(close) = close else {
            for (id, p) in gone {
                match p.phase {
                    Phase::Normal => {}
                    Phase::Group => self.suspects.push_back(id),
                    Phase::Alone => self.singles.push_back(id),
                }
            }
            return Vec::new();
        };
        if gone.len() == 1 {
            let (id, _) = gone.remove(0);
            self.convicted(&id);
            self.settling.insert(id.clone());
            return vec![Settle::Rejected(
                id,
                format!("{close}: the broker closed the channel on this message"),
            )];
        }
        for (id, p) in gone {
            match p.phase {
                Phase::Normal => self.suspects.push_back(id),
                Phase::Group | Phase::Alone => self.singles.push_back(id),
            }
        }
        Vec::new()
    }

    /// The link answered after these rows were published (so the broker
    /// had them and did not confirm in time): each is charged an attempt.
    pub(crate) fn charge_overdue(&mut self, ids: &[RowId], reason: &str) -> Vec<Settle> {
        let mut settles = Vec::new();
        for id in ids {
            if self.published.remove(id).is_some() {
                self.settling.insert(id.clone());
                settles.push(Settle::Rejected(id.clone(), reason.to_string()));
            }
        }
        settles
    }

    /// The outcomes of these rows are committed (or failed to commit: the
    /// row stays due and goes out again) when `reads` backlog page reads
    /// have been started.
    pub(crate) fn settled<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>, reads: u64) {
        for id in ids {
            if self.settling.remove(id) {
                self.recent.insert(id.to_string(), reads);
                self.recent_order.push_back((reads, id.to_string()));
            }
        }
    }

    /// Whether a row read by page read number `read` may be out of date:
    /// its outcome was committed after that read began.
    pub(crate) fn stale(&self, id: &str, read: u64) -> bool {
        self.recent.get(id).is_some_and(|settled| *settled >= read)
    }

    /// No page read older than `read` is in use any more.
    pub(crate) fn forget_settled_before(&mut self, read: u64) {
        while let Some((at, _)) = self.recent_order.front() {
            if *at >= read {
                break;
            }
            if let Some((at, id)) = self.recent_order.pop_front() {
                if self.recent.get(&id) == Some(&at) {
                    self.recent.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> RowId {
        format!("m{n}")
    }

    fn close(code: u16) -> BrokerClose {
        BrokerClose {
            code,
            text: "NOT_FOUND - no exchange 'x' in vhost '/'".into(),
        }
    }

    /// Publishes `n` backlog rows on `channel`.
    fn publish_backlog(l: &mut Ledger, ids: std::ops::Range<usize>, channel: u64, t: Instant) {
        for n in ids {
            assert_eq!(l.next(), Next::Backlog);
            l.published(id(n), channel, t);
        }
    }

    /// Drives suspects round by round: `culprits` close their channel when
    /// they are on it; returns (charged rows, delivered rows, closes).
    fn isolate(
        l: &mut Ledger,
        culprits: &[RowId],
        mut channel: u64,
    ) -> (Vec<RowId>, Vec<RowId>, usize) {
        let t = Instant::now();
        let (mut charged, mut delivered, mut closes) = (Vec::new(), Vec::new(), 0);
        for _ in 0..10_000 {
            let mut round = Vec::new();
            while let Next::Suspect(s) = l.next() {
                l.published(s.clone(), channel, t);
                round.push(s);
            }
            if round.is_empty() {
                break;
            }
            if round.iter().any(|r| culprits.contains(r)) {
                closes += 1;
                for s in l.channel_closed(channel, Some(&close(404))) {
                    l.settled([s.id()], 0);
                    if let Settle::Rejected(r, _) = s {
                        charged.push(r);
                    }
                }
                channel += 1;
            } else {
                for r in round {
                    let s = l.confirmed(&r, channel, Reply::Ack).unwrap();
                    l.settled([s.id()], 0);
                    delivered.push(r);
                }
            }
        }
        (charged, delivered, closes)
    }

    mod outcomes {
        use super::*;

        #[test]
        fn an_ack_delivers_and_a_return_or_nack_charges() {
            let mut l = Ledger::new(8);
            let t = Instant::now();
            publish_backlog(&mut l, 0..3, 1, t);
            assert_eq!(
                l.confirmed("m0", 1, Reply::Ack),
                Some(Settle::Delivered(id(0)))
            );
            let returned = l.confirmed(
                "m1",
                1,
                Reply::Returned {
                    code: 312,
                    text: "NO_ROUTE".into(),
                },
            );
            assert!(
                matches!(returned, Some(Settle::Rejected(_, ref e)) if e.starts_with("312 NO_ROUTE"))
            );
            assert!(matches!(
                l.confirmed("m2", 1, Reply::Nack),
                Some(Settle::Rejected(..))
            ));
            assert!(l.holds("m0"), "settling rows are still out");
            l.settled(["m0", "m1", "m2"], 3);
            assert!(
                l.stale("m0", 3),
                "a read begun before the commit may be stale"
            );
            assert!(!l.stale("m0", 4), "a read begun after it is not");
            l.forget_settled_before(4);
            assert!(l.is_idle());
        }

        #[test]
        fn answers_about_an_older_channel_are_ignored() {
            let mut l = Ledger::new(8);
            let t = Instant::now();
            publish_backlog(&mut l, 0..1, 1, t);
            assert!(l.channel_closed(1, None).is_empty());
            assert_eq!(l.confirmed("m0", 1, Reply::Ack), None);
            assert!(!l.holds("m0"), "a lost row goes out again with the backlog");
        }

        #[test]
        fn a_lost_link_charges_nothing() {
            let mut l = Ledger::new(8);
            publish_backlog(&mut l, 0..5, 1, Instant::now());
            assert!(l.channel_closed(1, None).is_empty());
            assert!(l.is_idle());
            assert!(!l.isolating());
        }

        #[test]
        fn the_window_bounds_what_is_unconfirmed() {
            let mut l = Ledger::new(3);
            publish_backlog(&mut l, 0..3, 1, Instant::now());
            assert_eq!(l.next(), Next::Wait);
            l.confirmed("m0", 1, Reply::Ack);
            assert_eq!(l.next(), Next::Backlog);
        }
    }

    mod timeouts {
        use super::*;

        #[test]
        fn only_overdue_rows_are_charged_and_only_when_told() {
            let mut l = Ledger::new(8);
            let t0 = Instant::now();
            publish_backlog(&mut l, 0..3, 1, t0);
            let overdue = vec![id(0), id(1)];
            let charged = l.charge_overdue(&overdue, "no confirm");
            assert_eq!(charged.len(), 2);
            assert_eq!(l.unconfirmed(), 1);
            // A row confirmed meanwhile is not charged twice.
            assert!(l.charge_overdue(&overdue, "no confirm").is_empty());
        }
    }

    mod isolation {
        use super::*;

        #[test]
        fn a_close_with_one_row_out_is_that_rows() {
            let mut l = Ledger::new(8);
            publish_backlog(&mut l, 0..1, 1, Instant::now());
            let s = l.channel_closed(1, Some(&close(406)));
            assert!(
                matches!(&s[..], [Settle::Rejected(r, e)] if r == "m0" && e.starts_with("406"))
            );
        }

        #[test]
        fn a_close_with_many_out_charges_nobody_and_isolates() {
            let mut l = Ledger::new(256);
            publish_backlog(&mut l, 0..100, 1, Instant::now());
            assert!(l.channel_closed(1, Some(&close(404))).is_empty());
            assert!(l.isolating());
            for n in 0..100 {
                assert!(
                    l.holds(&id(n)),
                    "suspects are not handed out by the backlog"
                );
            }
            let (charged, delivered, closes) = isolate(&mut l, &[id(42)], 2);
            assert_eq!(charged, vec![id(42)]);
            assert_eq!(delivered.len(), 99);
            assert!(closes <= 2, "one close for the group, one alone: {closes}");
            assert!(!l.isolating());
            assert_eq!(l.next(), Next::Backlog);
        }

        #[test]
        fn several_culprits_are_each_found() {
            let mut l = Ledger::new(256);
            publish_backlog(&mut l, 0..64, 1, Instant::now());
            l.channel_closed(1, Some(&close(404)));
            let culprits = vec![id(3), id(4), id(40)];
            let (mut charged, delivered, _) = isolate(&mut l, &culprits, 2);
            charged.sort();
            assert_eq!(charged, vec![id(3), id(4), id(40)]);
            assert_eq!(delivered.len(), 61);
        }

        #[test]
        fn nothing_new_goes_out_while_suspects_wait() {
            let mut l = Ledger::new(256);
            let t = Instant::now();
            publish_backlog(&mut l, 0..4, 1, t);
            l.channel_closed(1, Some(&close(404)));
            let mut round = 0;
            while let Next::Suspect(s) = l.next() {
                l.published(s, 2, t);
                round += 1;
            }
            assert_eq!(round, 4);
            assert_eq!(l.next(), Next::Wait);
            for n in 0..4 {
                l.confirmed(&id(n), 2, Reply::Ack);
            }
            assert_eq!(l.next(), Next::Backlog);
        }

        #[test]
        fn a_refused_row_is_charged_without_a_publish() {
            let mut l = Ledger::new(4);
            let s = l.refuse("m9", "404 NOT_FOUND - no exchange 'x'".into());
            assert!(matches!(s, Settle::Rejected(ref r, _) if r == "m9"));
            assert!(l.holds("m9"));
            l.settled(["m9"], 0);
            l.forget_settled_before(1);
            assert!(l.is_idle());
        }

        #[test]
        fn a_forgotten_row_is_charged_nothing() {
            let mut l = Ledger::new(4);
            publish_backlog(&mut l, 0..1, 1, Instant::now());
            assert!(l.awaits("m0", 1));
            l.forget("m0", 1);
            assert!(!l.holds("m0"));
        }

        #[test]
        fn a_culprit_goes_out_alone_next_time() {
            let mut l = Ledger::new(8);
            let t = Instant::now();
            publish_backlog(&mut l, 0..3, 1, t);
            l.channel_closed(1, Some(&close(406)));
            let (charged, _, _) = isolate(&mut l, &[id(1)], 2);
            assert_eq!(charged, vec![id(1)]);
            assert!(l.is_culprit("m1"));
            // Its next try: the backlog hands it out, the ledger sends it alone.
            publish_backlog(&mut l, 3..5, 10, t);
            l.alone(id(1));
            assert_eq!(
                l.next(),
                Next::Wait,
                "alone means after the rows on the wire"
            );
            l.confirmed("m3", 10, Reply::Ack);
            l.confirmed("m4", 10, Reply::Ack);
            assert_eq!(l.next(), Next::Suspect(id(1)));
            l.published(id(1), 11, t);
            let s = l.channel_closed(11, Some(&close(406)));
            assert!(matches!(&s[..], [Settle::Rejected(r, _)] if r == "m1"));
        }

        #[test]
        fn a_lost_link_keeps_handed_suspects_in_their_place() {
            let mut l = Ledger::new(8);
            publish_backlog(&mut l, 0..3, 1, Instant::now());
            l.channel_closed(1, Some(&close(404)));
            let Next::Suspect(first) = l.next() else {
                panic!("a suspect goes first")
            };
            l.link_lost();
            assert_eq!(l.next(), Next::Suspect(first));
        }

        #[test]
        fn a_suspect_not_sent_keeps_its_place() {
            let mut l = Ledger::new(256);
            publish_backlog(&mut l, 0..2, 1, Instant::now());
            l.channel_closed(1, Some(&close(404)));
            let Next::Suspect(first) = l.next() else {
                panic!("a suspect goes first")
            };
            l.not_sent(&first);
            assert_eq!(l.next(), Next::Suspect(first));
        }

        #[test]
        fn a_link_lost_during_isolation_keeps_the_suspects() {
            let mut l = Ledger::new(256);
            let t = Instant::now();
            publish_backlog(&mut l, 0..3, 1, t);
            l.channel_closed(1, Some(&close(404)));
            while let Next::Suspect(s) = l.next() {
                l.published(s, 2, t);
            }
            assert!(l.channel_closed(2, None).is_empty());
            assert!(l.isolating());
            let (charged, delivered, _) = isolate(&mut l, &[id(1)], 3);
            assert_eq!(charged, vec![id(1)]);
            assert_eq!(delivered.len(), 2);
        }
    }

    mod properties {
        use super::*;

        /// A tiny deterministic generator, so the test needs no crate.
        struct Rng(u64);
        impl Rng {
            fn next(&mut self) -> u64 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0
            }
        }

        #[test]
        fn every_row_ends_once_and_only_culprits_are_charged() {
            let seed = std::env::var("LEDGER_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0x9e37_79b9_7f4a_7c15_u64);
            for round in 0..200u64 {
                let mut rng = Rng(seed ^ (round + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
                let n = 1 + (rng.next() % 300) as usize;
                let window = 1 + (rng.next() % 64) as usize;
                let bad: HashSet<RowId> = (0..n)
                    .filter(|_| rng.next().is_multiple_of(10))
                    .map(id)
                    .collect();
                let mut l = Ledger::new(window);
                let (mut next_row, mut channel) = (0usize, 1u64);
                let mut ended: HashMap<RowId, bool> = HashMap::new();
                let t = Instant::now();
                for _ in 0..1_000_000 {
                    if ended.len() == n {
                        break;
                    }
                    let mut sent = Vec::new();
                    loop {
                        match l.next() {
                            Next::Suspect(s) => {
                                l.published(s.clone(), channel, t);
                                sent.push(s);
                            }
                            Next::Backlog if next_row < n => {
                                l.published(id(next_row), channel, t);
                                sent.push(id(next_row));
                                next_row += 1;
                            }
                            _ => break,
                        }
                    }
                    // The broker: the first bad row on the wire closes the channel.
                    let on_wire: Vec<RowId> = {
                        let mut v: Vec<_> = l.published.keys().cloned().collect();
                        v.sort();
                        v
                    };
                    let settles = if on_wire.iter().any(|r| bad.contains(r)) {
                        let s = l.channel_closed(channel, Some(&close(404)));
                        channel += 1;
                        s
                    } else {
                        on_wire
                            .iter()
                            .filter_map(|r| l.confirmed(r, channel, Reply::Ack))
                            .collect()
                    };
                    for s in settles {
                        l.settled([s.id()], 0);
                        let (r, charged) = match s {
                            Settle::Delivered(r) => (r, false),
                            Settle::Rejected(r, _) => (r, true),
                        };
                        assert_eq!(charged, bad.contains(&r), "seed {seed} round {round}: {r}");
                        assert!(
                            ended.insert(r.clone(), charged).is_none(),
                            "seed {seed}: {r} twice"
                        );
                    }
                }
                assert_eq!(ended.len(), n, "seed {seed} round {round}: every row ends");
                l.forget_settled_before(1);
                assert!(l.is_idle());
            }
        }
    }
}
