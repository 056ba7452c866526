//! Publishing: how one row goes out (docs/forwarding.md, Message
//! properties and Isolating a message the broker refuses): a suspect read
//! back and republished, an exchange asked about before its first publish,
//! a row refused without a publish, a row past its expiry let go unsent,
//! the `basic.publish` itself.

use std::time::Instant;

use lapin::options::BasicPublishOptions;

use super::{ForwardError, Forwarder, Wire};
use crate::forward::exchanges::Known;
use crate::forward::outcome::{properties, short_fields};
use crate::forward::side;
use crate::forward::window::Sent;
use crate::store::{now_ms, OutgoingRow, StoreError};

impl Forwarder {
    /// Publishes a suspect again (read back from the database: the ledger
    /// keeps ids, not bodies). A row no longer delivering is let go.
    pub(super) async fn publish_suspect(
        &mut self,
        session: Wire<'_>,
        id: String,
    ) -> Result<(), ForwardError> {
        let reader = self.store.reader().clone();
        let lookup = id.clone();
        let row = tokio::task::spawn_blocking(move || reader.outgoing(&lookup))
            .await
            .map_err(|e| StoreError::WriteFailed(format!("suspect read: {e}")))??;
        match row {
            Some(row) => self.route(session, row).await,
            None => self.window.ledger.vanished(&id),
        }
        Ok(())
    }

    /// Publishes a row unless the broker is known to refuse its exchange;
    /// an exchange not known either way is asked about first.
    pub(super) async fn route(&mut self, session: Wire<'_>, row: OutgoingRow) {
        if let Err(e) = short_fields(&row) {
            return self.refuse(&row, format!("cannot be published: {e}"));
        }
        match self.exchanges.lookup(&row.exchange, Instant::now()) {
            Known::Exists => self.publish(session, row).await,
            Known::Missing(reply) => self.refuse(&row, reply),
            Known::Unknown => {
                let timeout = self.reconnect.connect_timeout();
                match side::check_exchange(session.connection, &row.exchange, timeout).await {
                    Some(answer) => {
                        self.exchanges
                            .answered(&row.exchange, answer.clone(), Instant::now());
                        match answer {
                            None => self.publish(session, row).await,
                            Some(reply) => self.refuse(&row, reply),
                        }
                    }
                    // No answer: the row goes out with the next pass.
                    None => self.window.ledger.not_sent(&row.id),
                }
            }
        }
    }

    /// One failed attempt for a row that was not published.
    pub(super) fn refuse(&mut self, row: &OutgoingRow, reason: String) {
        tracing::debug!(message_id = %row.id, error = %reason, "publish attempt failed");
        self.note_failure(&row.exchange, &row.routing_key, &reason);
        let settle = self.window.ledger.refuse(&row.id, reason);
        self.window.record(settle);
    }

    pub(super) async fn publish(&mut self, session: Wire<'_>, row: OutgoingRow) {
        let now = now_ms();
        if row.expire_time.is_some_and(|expires| expires <= now) {
            // Never published: the expiry sweep settles it as "expired"
            // (docs/forwarding.md, Expiry). Nothing was sent, so nothing is
            // charged; the ledger lets go of a suspect.
            tracing::debug!(message_id = %row.id, "expired before it could be published");
            return self.window.ledger.vanished(&row.id);
        }
        let properties = match properties(&row, now) {
            Ok(properties) => properties,
            Err(e) => return self.refuse(&row, format!("cannot be published: {e}")),
        };
        // Charged before the publish: an attempt whose outcome is unknown
        // still used the link (docs/forwarding.md, The rate cap).
        self.throttle.charge(Instant::now(), row.body.len());
        let sent = tokio::time::timeout(
            self.config.confirm_timeout,
            session.channel.basic_publish(
                row.exchange.as_str().into(),
                row.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &row.body,
                properties,
            ),
        )
        .await;
        match sent {
            Ok(Ok(confirm)) => {
                self.metrics.publishes.inc();
                let OutgoingRow {
                    id,
                    exchange,
                    routing_key,
                    ..
                } = row;
                let sent = Sent {
                    id,
                    exchange,
                    routing_key,
                    generation: session.generation,
                };
                self.window
                    .published(sent, confirm, self.config.confirm_timeout);
            }
            Ok(Err(e)) => {
                tracing::debug!(message_id = %row.id, error = %e, "publish failed; will publish again");
                self.window.ledger.not_sent(&row.id);
            }
            Err(_) => {
                tracing::debug!(message_id = %row.id, "publish did not complete in time; will publish again");
                self.window.ledger.not_sent(&row.id);
            }
        }
    }
}
