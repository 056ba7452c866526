//! Answers: what the forwarder does with each confirm (docs/forwarding.md,
//! Outcomes): feed it to the ledger, record what the ledger decides, prove
//! the link before a timeout is charged, and digest failures for the log.

use std::collections::HashMap;
use std::time::Instant;

use super::{Forwarder, Wire};
use crate::forward::ledger::{Reply, Settle};
use crate::forward::outcome::{attributed, blames_a_message, returned_row, ConfirmEvent};
use crate::forward::side;
use crate::forward::window::Confirmed;

impl Forwarder {
    /// A confirm arrived: it and every other one already there. Rows whose
    /// confirm timed out are charged only if the broker then answers a
    /// liveness probe; `Some(reason)` when it does not (the link is dead).
    pub(super) async fn on_confirms(
        &mut self,
        first: Confirmed,
        session: Wire<'_>,
    ) -> Option<String> {
        let mut batch = vec![first];
        while let Some(more) = self.window.ready_confirm() {
            batch.push(more);
        }
        let returns: HashMap<String, Reply> = batch
            .iter()
            .filter_map(|c| returned_row(&c.result))
            .collect();
        let mut overdue = Vec::new();
        for c in batch {
            let event = attributed(&c.id, &c.result, &returns);
            self.on_confirm(c, event, session, &mut overdue);
        }
        if overdue.is_empty() {
            return None;
        }
        let timeout = self.reconnect.connect_timeout();
        if !side::link_alive(session.connection, timeout).await {
            return Some(format!(
                "{} confirms overdue and no answer to a liveness probe within {}",
                overdue.len(),
                humantime::format_duration(timeout)
            ));
        }
        let reason = format!(
            "no confirm within publish.confirm_timeout ({}) while the broker answered",
            humantime::format_duration(self.config.confirm_timeout)
        );
        let ids: Vec<String> = overdue.iter().map(|c| c.id.clone()).collect();
        for settle in self.window.ledger.charge_overdue(&ids, &reason) {
            if let Some(c) = overdue.iter().find(|c| c.id == settle.id()) {
                self.note_failure(&c.exchange, &c.routing_key, &reason);
            }
            self.window.record(settle);
        }
        None
    }

    pub(super) fn on_confirm(
        &mut self,
        c: Confirmed,
        event: ConfirmEvent,
        session: Wire<'_>,
        overdue: &mut Vec<Confirmed>,
    ) {
        match event {
            ConfirmEvent::Reply(reply) => {
                let m = &self.metrics;
                match &reply {
                    Reply::Ack => {
                        m.confirms.inc();
                        m.confirm_latency.observe(c.sent_at.elapsed().as_secs_f64());
                    }
                    Reply::Returned { .. } => {
                        m.returns.inc();
                    }
                    Reply::Nack => {
                        m.nacks.inc();
                    }
                }
                if let Some(settle) = self.window.ledger.confirmed(&c.id, c.generation, reply) {
                    self.settle(&c, settle);
                }
            }
            ConfirmEvent::Closed(close) => {
                // The first answer about a closed channel accounts for all
                // its rows; later ones are stale.
                let blame = close.filter(|close| blames_a_message(close.code));
                if blame.as_ref().is_some_and(|close| close.code == 404) {
                    self.exchanges.forget_all();
                }
                let settles = self
                    .window
                    .ledger
                    .channel_closed(c.generation, blame.as_ref());
                if let Some(blame) = &blame {
                    tracing::debug!(generation = c.generation, error = %blame, charged = settles.len(), "the broker closed the publishing channel");
                }
                if !settles.is_empty() {
                    // The close was pinned on a message: progress, not a
                    // flapping channel, so the next reopen need not wait.
                    self.reopens.calm();
                }
                for settle in settles {
                    self.settle(&c, settle);
                }
            }
            ConfirmEvent::TimedOut => {
                self.metrics.confirm_timeouts.inc();
                if !self.window.ledger.awaits(&c.id, c.generation) {
                    return;
                }
                if session.blocked {
                    self.window.ledger.forget(&c.id, c.generation);
                    self.backlog.rewind();
                } else {
                    overdue.push(c);
                }
            }
        }
    }

    /// Records an outcome the ledger decided; a failure also feeds the log
    /// digest.
    pub(super) fn settle(&mut self, c: &Confirmed, settle: Settle) {
        if let Settle::Rejected(id, reason) = &settle {
            tracing::debug!(message_id = %id, error = %reason, "publish attempt failed");
            if *id == c.id {
                self.note_failure(&c.exchange, &c.routing_key, reason);
            }
        }
        self.window.record(settle);
    }

    /// One line per (exchange, routing key, reason) and period; the rest
    /// is counted into the next line.
    pub(super) fn note_failure(&mut self, exchange: &str, routing_key: &str, reason: &str) {
        let key = (
            exchange.to_string(),
            routing_key.to_string(),
            reason.to_string(),
        );
        if let Some(count) = self.failures.note(&key, Instant::now()) {
            tracing::warn!(
                exchange,
                routing_key,
                error = reason,
                count,
                "publish attempts failed"
            );
        }
    }

    pub(super) fn report_failures(&mut self) {
        for ((exchange, routing_key, error), count) in self.failures.due(Instant::now()) {
            tracing::warn!(%exchange, %routing_key, %error, count, "publish attempts failed");
        }
    }
}
