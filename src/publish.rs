//! Publish: the forwarder from `msg_log` to RabbitMQ (`SPEC.md`, "Forwarding").
//!
//! Role: keep one AMQP connection with one confirm-mode channel, publish
//! the rows the [`Backlog`] hands out (persistent, `mandatory`,
//! `message_id` = row id), up to `publish.max_in_flight` unconfirmed, and
//! turn every confirm into a recorded outcome.
//!
//! Owns: the connection and its reconnect loop (lapin's own recovery is not
//! used), the in-flight set, the outcome buffer, [`BrokerState`] updates.
//!
//! Outcome of one attempt ([`classify`]):
//! - **delivered**: an ack that carries no `basic.return` → status 1;
//! - **rejected**: a nack, an ack *with* a return (312 NO_ROUTE), the channel
//!   closed by the broker because of this message (404 naming its exchange),
//!   or no confirm within `publish.confirm_timeout` on a connection that
//!   stayed up and unblocked → one failed attempt, recorded by the store
//!   (`try_count`, `last_error`, `next_try_time`, status 2 at `max_attempts`);
//! - **unknown**: anything else (connection lost, channel closed because of
//!   another message, blocked broker) → nothing recorded; the row stays due
//!   and the next pass publishes it again with the same `message_id`.
//!
//! Invariants:
//! - Nothing is attempted, so nothing is counted, while the broker is away.
//! - A row is in the in-flight set from its publish until its outcome is
//!   committed (or known to be unknown), so no pass publishes it twice at once.
//! - Every publish and every confirm await has a timeout.
//! - URLs in logs, errors and status are redacted.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use futures_util::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::broker::{backoff, ConnectFailure, Connector};
use crate::config::PublishConfig;
use crate::metrics::Metrics;
use crate::resend::{Backlog, PassReport, PassRequest};
use crate::service::{self, ProbeRx};
use crate::status::BrokerState;
use crate::store::{now_ms, OutgoingRow, PublishOutcome, RetryPolicy, Store, StoreError};

/// How long shutdown waits for outstanding confirms.
const SHUTDOWN_CONFIRM_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An AMQP connection with its confirm-mode channel.
struct Session {
    connection: Connection,
    channel: Channel,
    events: Pin<Box<dyn Stream<Item = Event> + Send>>,
    /// Bumped per channel, so confirms of a closed channel are told apart.
    generation: u64,
}

/// A confirm being awaited.
struct Confirmed {
    sent_at: std::time::Instant,
    id: String,
    exchange: String,
    generation: u64,
    result: Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>,
}

type ConfirmFuture = Pin<Box<dyn Future<Output = Confirmed> + Send>>;
type SettleFuture = Pin<Box<dyn Future<Output = (Vec<String>, Result<(), StoreError>)> + Send>>;

/// What one attempt came to (see the module header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered,
    Rejected(String),
    Unknown(String),
}

/// Classifies a confirm. `link_ok`: the connection is still up and not
/// blocked (only then does a timeout count against the message).
pub fn classify(
    exchange: &str,
    result: &Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>,
    confirm_timeout: Duration,
    link_ok: bool,
) -> Attempt {
    match result {
        Ok(Ok(Confirmation::Ack(None))) => Attempt::Delivered,
        Ok(Ok(Confirmation::Ack(Some(returned)))) | Ok(Ok(Confirmation::Nack(Some(returned)))) => {
            Attempt::Rejected(format!(
                "{} {}: returned by the broker (unroutable)",
                returned.reply_code, returned.reply_text
            ))
        }
        Ok(Ok(Confirmation::Nack(None))) => {
            Attempt::Rejected("basic.nack: the broker could not take the message".into())
        }
        Ok(Ok(Confirmation::NotRequested)) => {
            Attempt::Unknown("the channel was not in confirm mode".into())
        }
        Ok(Err(error)) => match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if amqp.get_id() == 404
                    && amqp
                        .get_message()
                        .as_str()
                        .contains(&format!("exchange '{exchange}'")) =>
            {
                Attempt::Rejected(format!(
                    "404 channel closed by the broker: {}",
                    amqp.get_message()
                ))
            }
            _ => Attempt::Unknown(error.to_string()),
        },
        Err(_) if link_ok => Attempt::Rejected(format!(
            "no confirm within publish.confirm_timeout ({})",
            humantime::format_duration(confirm_timeout)
        )),
        Err(_) => Attempt::Unknown("no confirm while the broker was blocked".into()),
    }
}

/// The forwarder task.
pub struct Forwarder {
    config: PublishConfig,
    connector: Connector,
    store: Store,
    state: BrokerState,
    metrics: Arc<Metrics>,
    passes: mpsc::Receiver<PassRequest>,
    passes_open: bool,
    probes: ProbeRx,
    probes_open: bool,
    pass_waiters: Vec<oneshot::Sender<PassReport>>,
    backlog: Backlog,
    /// Rows published and not settled: awaiting a confirm or its commit.
    in_flight: HashSet<String>,
    /// The part of `in_flight` still awaiting a confirm.
    awaiting_confirm: HashSet<String>,
    confirms: FuturesUnordered<ConfirmFuture>,
    settling: FuturesUnordered<SettleFuture>,
    outcomes: Vec<PublishOutcome>,
    generation: u64,
}

/// Where the forwarder is with the broker.
enum Link {
    /// No connection. After a backoff delay (capped, exponential, jittered;
    /// `failures` so far) it tries the next URL → `Up` on success, `Down`
    /// with one more failure else. Shutdown → stop.
    Down { failures: u32 },
    /// Connected, channel in confirm mode, publishing. Connection lost →
    /// `Down`; channel closed by the broker → reopened, stays `Up`;
    /// shutdown → drain confirms, close, stop.
    Up(Box<Session>),
    /// Shutdown finished.
    Stopped,
}

impl Forwarder {
    /// The forwarder and the sender its [`crate::resend::Resend`] uses.
    pub fn new(
        config: PublishConfig,
        connector: Connector,
        store: Store,
        state: BrokerState,
        probes: ProbeRx,
        metrics: Arc<Metrics>,
    ) -> (Forwarder, mpsc::Sender<PassRequest>) {
        let (tx, rx) = mpsc::channel(8);
        let backlog = Backlog::new(store.reader().clone());
        let forwarder = Forwarder {
            config,
            connector,
            store,
            state,
            metrics,
            passes: rx,
            passes_open: true,
            probes,
            probes_open: true,
            pass_waiters: Vec::new(),
            backlog,
            in_flight: HashSet::new(),
            awaiting_confirm: HashSet::new(),
            confirms: FuturesUnordered::new(),
            settling: FuturesUnordered::new(),
            outcomes: Vec::new(),
            generation: 0,
        };
        (forwarder, tx)
    }

    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.config.max_attempts.get(),
            retry_interval_ms: i64::try_from(self.config.retry_interval.as_millis())
                .unwrap_or(i64::MAX),
        }
    }

    /// Forwards until `shutdown`. Returns an error only for a store failure
    /// it cannot work around; broker trouble is never an error here.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), PublishError> {
        let mut link = Link::Down { failures: 0 };
        loop {
            link = match link {
                Link::Down { failures } => self.down(failures, &shutdown).await,
                Link::Up(session) => self.up(*session, &shutdown).await?,
                Link::Stopped => return Ok(()),
            };
        }
    }

    /// Waits out the backoff (none before the first attempt), then connects.
    async fn down(&mut self, failures: u32, shutdown: &CancellationToken) -> Link {
        if failures > 0 {
            let delay = backoff(failures);
            let wake = tokio::time::sleep(delay);
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Link::Stopped,
                    _ = &mut wake => break,
                    request = self.passes.recv(), if self.passes_open => self.on_pass_request(request),
                    probe = self.probes.recv(), if self.probes_open => self.on_probe(probe),
                }
            }
        }
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return Link::Stopped,
            opened = self.connector.connect() => opened,
        };
        let connected = match opened {
            Ok(connected) => connected,
            Err(failure) => return self.connect_failed(failure, failures),
        };
        let channel = tokio::time::timeout(
            self.connector.connect_timeout(),
            open_channel(&connected.connection),
        )
        .await;
        let channel = match channel {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                let failure = connected.failure(format!("cannot open a confirm-mode channel: {e}"));
                return self.connect_failed(failure, failures);
            }
            Err(_) => {
                let failure = connected.failure("cannot open a confirm-mode channel: timed out");
                return self.connect_failed(failure, failures);
            }
        };
        tracing::info!(broker = %connected.url, "connected to the broker");
        self.metrics.connects.inc();
        let since = now_ms();
        self.state.update(|s| {
            s.connected = true;
            s.url = Some(connected.url.clone());
            s.since = Some(since);
            s.last_error = None;
            s.blocked = false;
        });
        // Drain the backlog now, unconfirmed rows of the last link first.
        self.backlog.rewind();
        self.generation += 1;
        let events = Box::pin(connected.connection.events_listener());
        Link::Up(Box::new(Session {
            connection: connected.connection,
            channel,
            events,
            generation: self.generation,
        }))
    }

    fn connect_failed(&mut self, failure: ConnectFailure, failures: u32) -> Link {
        self.metrics.connect_failures.inc();
        tracing::warn!(broker = %failure.url, error = %failure.error, failures = failures + 1, "cannot connect to the broker");
        self.state.update(|s| {
            if s.connected || s.since.is_none() {
                s.since = Some(now_ms());
            }
            s.connected = false;
            s.url = Some(failure.url);
            s.last_error = Some(failure.error);
        });
        Link::Down {
            failures: failures + 1,
        }
    }

    /// Publishes while connected; returns the next link state.
    async fn up(
        &mut self,
        mut session: Session,
        shutdown: &CancellationToken,
    ) -> Result<Link, PublishError> {
        let mut blocked = false;
        let new_rows = self.store.new_rows();
        let lost = loop {
            if !session.connection.status().connected() {
                break "the connection closed".to_string();
            }
            if !session.channel.status().connected() {
                // Closed by the broker (a 404, say): the connection lives on.
                match tokio::time::timeout(
                    self.connector.connect_timeout(),
                    open_channel(&session.connection),
                )
                .await
                {
                    Ok(Ok(channel)) => {
                        self.generation += 1;
                        session.channel = channel;
                        session.generation = self.generation;
                        self.backlog.rewind();
                        self.metrics.channel_closes.inc();
                        tracing::info!("reopened the publishing channel");
                    }
                    Ok(Err(e)) => break format!("cannot reopen the channel: {e}"),
                    Err(_) => break "cannot reopen the channel: timed out".into(),
                }
            }
            self.flush_outcomes().await?;
            let in_flight = self.confirms.len();
            self.state.update(|s| {
                s.in_flight = in_flight as u64;
                s.blocked = blocked;
            });
            let can_publish = in_flight < self.config.max_in_flight.get()
                && !blocked
                && !self.backlog.exhausted();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.drain(&session.connection).await?;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        session.connection.close(200, "edge-outbox shutting down".into()),
                    )
                    .await;
                    self.state.update(|s| {
                        s.connected = false;
                        s.since = Some(now_ms());
                        s.in_flight = 0;
                    });
                    return Ok(Link::Stopped);
                }
                event = session.events.next() => match event {
                    // A channel-level error (a 404 closing our channel) is
                    // reported here too; the connection lives on and the
                    // channel is reopened at the top of the loop.
                    Some(Event::Error(e)) if !session.connection.status().connected() => {
                        break e.to_string()
                    }
                    Some(Event::Error(e)) => {
                        tracing::debug!(error = %e, "channel error; the connection is still up");
                    }
                    None => break "the connection's event stream ended".into(),
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(reason = %reason, "the broker blocked publishing; waiting");
                        blocked = true;
                    }
                    Some(Event::ConnectionUnblocked) => {
                        tracing::info!("the broker unblocked publishing");
                        blocked = false;
                    }
                    Some(_) => {}
                },
                Some(confirmed) = self.confirms.next(), if !self.confirms.is_empty() => {
                    let link_ok = !blocked && session.connection.status().connected();
                    self.on_confirm(confirmed, link_ok);
                    while let Some(Some(more)) = self.confirms.next().now_or_never() {
                        self.on_confirm(more, link_ok);
                    }
                }
                Some((ids, result)) = self.settling.next(), if !self.settling.is_empty() => {
                    self.on_settled(ids, result);
                }
                request = self.passes.recv(), if self.passes_open => self.on_pass_request(request),
                probe = self.probes.recv(), if self.probes_open => self.on_probe(probe),
                _ = new_rows.notified() => self.backlog.more_rows(),
                row = self.backlog.next(&self.in_flight), if can_publish => match row? {
                    Some(row) => self.publish(&session.channel, session.generation, row).await,
                    None => self.pass_done(),
                },
            }
        };
        self.link_lost(&lost);
        self.flush_outcomes().await?;
        Ok(Link::Down { failures: 0 })
    }

    /// The link is gone: every unconfirmed row is unknown (due again, no
    /// attempt counted); outcomes already known are still recorded.
    fn link_lost(&mut self, reason: &str) {
        let unknown = self.confirms.len();
        // Dropping the futures abandons the confirms; their rows become due again.
        self.confirms = FuturesUnordered::new();
        for id in self.awaiting_confirm.drain() {
            self.in_flight.remove(&id);
        }
        tracing::warn!(error = %reason, unconfirmed = unknown, "lost the broker connection; unconfirmed messages will be published again");
        let since = now_ms();
        self.state.update(|s| {
            s.connected = false;
            s.since = Some(since);
            s.in_flight = 0;
            s.blocked = false;
            s.last_error = Some(reason.to_string());
        });
    }

    async fn publish(&mut self, channel: &Channel, generation: u64, row: OutgoingRow) {
        let properties = properties(&row);
        self.in_flight.insert(row.id.clone());
        self.awaiting_confirm.insert(row.id.clone());
        let sent = tokio::time::timeout(
            self.config.confirm_timeout,
            channel.basic_publish(
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
                let timeout = self.config.confirm_timeout;
                let OutgoingRow { id, exchange, .. } = row;
                self.metrics.publishes.inc();
                let sent_at = std::time::Instant::now();
                self.confirms.push(Box::pin(async move {
                    let result = tokio::time::timeout(timeout, confirm).await;
                    Confirmed {
                        sent_at,
                        id,
                        exchange,
                        generation,
                        result,
                    }
                }));
            }
            Ok(Err(e)) => {
                tracing::debug!(message_id = %row.id, error = %e, "publish failed; will publish again");
                self.in_flight.remove(&row.id);
                self.awaiting_confirm.remove(&row.id);
            }
            Err(_) => {
                tracing::debug!(message_id = %row.id, "publish did not complete in time; will publish again");
                self.in_flight.remove(&row.id);
                self.awaiting_confirm.remove(&row.id);
            }
        }
    }

    fn on_confirm(&mut self, confirmed: Confirmed, link_ok: bool) {
        let Confirmed {
            sent_at,
            id,
            exchange,
            generation,
            result,
        } = confirmed;
        let m = &self.metrics;
        match &result {
            Ok(Ok(Confirmation::Ack(None))) => {
                m.confirms.inc();
                m.confirm_latency.observe(sent_at.elapsed().as_secs_f64());
            }
            Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => {
                m.returns.inc();
            }
            Ok(Ok(Confirmation::Nack(None))) => {
                m.nacks.inc();
            }
            Err(_) => {
                m.confirm_timeouts.inc();
            }
            _ => {}
        }
        self.awaiting_confirm.remove(&id);
        match classify(&exchange, &result, self.config.confirm_timeout, link_ok) {
            Attempt::Delivered => {
                tracing::debug!(message_id = %id, generation, "confirmed");
                self.outcomes.push(PublishOutcome::Delivered { id });
            }
            Attempt::Rejected(error) => {
                tracing::warn!(message_id = %id, exchange = %exchange, error = %error, "publish attempt failed");
                self.outcomes.push(PublishOutcome::Rejected { id, error });
            }
            Attempt::Unknown(reason) => {
                tracing::debug!(message_id = %id, reason = %reason, "outcome unknown; will publish again");
                self.in_flight.remove(&id);
            }
        }
    }

    /// Hands the buffered outcomes to the store; their rows stay in flight
    /// until the commit (so no pass re-publishes a row being settled).
    async fn flush_outcomes(&mut self) -> Result<(), PublishError> {
        if self.outcomes.is_empty() {
            return Ok(());
        }
        let outcomes = std::mem::take(&mut self.outcomes);
        let ids: Vec<String> = outcomes.iter().map(|o| outcome_id(o).to_string()).collect();
        let pending = self.store.record_outcomes(outcomes, self.policy()).await?;
        self.settling
            .push(Box::pin(async move { (ids, pending.await) }));
        Ok(())
    }

    fn on_settled(&mut self, ids: Vec<String>, result: Result<(), StoreError>) {
        if let Err(e) = result {
            // The rows stay status 0: they will be published again (a
            // duplicate at worst, never a loss).
            tracing::warn!(error = %e, rows = ids.len(), "could not record publish outcomes");
        }
        for id in ids {
            self.in_flight.remove(&id);
        }
    }

    fn on_pass_request(&mut self, request: Option<PassRequest>) {
        match request {
            Some(request) => {
                self.backlog.rewind();
                self.pass_waiters.push(request.reply);
            }
            None => self.passes_open = false,
        }
    }

    fn on_probe(&mut self, probe: Option<tokio::sync::oneshot::Sender<()>>) {
        self.probes_open = probe.is_some();
        service::answer(probe);
    }

    fn pass_done(&mut self) {
        let report = PassReport {
            published: self.backlog.handed_out(),
        };
        for waiter in self.pass_waiters.drain(..) {
            let _ = waiter.send(report);
        }
    }

    /// Shutdown with a link: wait (bounded) for outstanding confirms, record
    /// what they say, and let the commits finish.
    async fn drain(&mut self, connection: &Connection) -> Result<(), PublishError> {
        let wait = self.config.confirm_timeout.min(SHUTDOWN_CONFIRM_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        while !self.confirms.is_empty() {
            match tokio::time::timeout_at(deadline, self.confirms.next()).await {
                Ok(Some(confirmed)) => {
                    let link_ok = connection.status().connected();
                    // A timeout cut short by shutdown is not the message's fault.
                    let link_ok = link_ok && confirmed.result.is_ok();
                    self.on_confirm(confirmed, link_ok);
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.flush_outcomes().await?;
        while let Some((ids, result)) = self.settling.next().await {
            self.on_settled(ids, result);
        }
        Ok(())
    }
}

fn outcome_id(outcome: &PublishOutcome) -> &str {
    match outcome {
        PublishOutcome::Delivered { id } | PublishOutcome::Rejected { id, .. } => id,
    }
}

async fn open_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// AMQP properties of a row: persistent, its id, its submit time.
fn properties(row: &OutgoingRow) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_message_id(row.id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(
            row.create_time
                .and_then(|ms| u64::try_from(ms / 1000).ok())
                .unwrap_or(0),
        );
    if let Some(ct) = &row.content_type {
        properties = properties.with_content_type(ct.as_str().into());
    }
    if let Some(headers) = row.headers.as_deref().and_then(headers_table) {
        properties = properties.with_headers(headers);
    }
    properties
}

/// The stored JSON headers object as an AMQP field table.
fn headers_table(json: &str) -> Option<FieldTable> {
    let serde_json::Value::Object(map) = serde_json::from_str(json).ok()? else {
        return None;
    };
    let mut table = FieldTable::default();
    for (name, value) in map {
        let value = match value {
            serde_json::Value::String(s) => AMQPValue::LongString(s.into()),
            serde_json::Value::Bool(b) => AMQPValue::Boolean(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => AMQPValue::LongLongInt(i),
                None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
            },
            _ => continue,
        };
        table.insert(name.into(), value);
    }
    Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_count_only_on_a_live_link() {
        let elapsed = tokio_timeout_elapsed();
        let t = Duration::from_secs(1);
        assert!(matches!(
            classify("x", &Err(elapsed), t, true),
            Attempt::Rejected(_)
        ));
        let elapsed = tokio_timeout_elapsed();
        assert!(matches!(
            classify("x", &Err(elapsed), t, false),
            Attempt::Unknown(_)
        ));
        let ok: Result<lapin::Result<Confirmation>, _> = Ok(Ok(Confirmation::Ack(None)));
        assert_eq!(classify("x", &ok, t, true), Attempt::Delivered);
        let nack: Result<lapin::Result<Confirmation>, _> = Ok(Ok(Confirmation::Nack(None)));
        assert!(matches!(
            classify("x", &nack, t, true),
            Attempt::Rejected(_)
        ));
    }

    fn tokio_timeout_elapsed() -> tokio::time::error::Elapsed {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(1), std::future::pending::<()>()).await
        })
        .unwrap_err()
    }

    #[test]
    fn headers_keep_their_types() {
        let table = headers_table(r#"{"a":"s","b":1,"c":true,"d":1.5}"#).unwrap();
        let inner = table.inner();
        assert!(matches!(inner.get("a"), Some(AMQPValue::LongString(_))));
        assert!(matches!(inner.get("b"), Some(AMQPValue::LongLongInt(1))));
        assert!(matches!(inner.get("c"), Some(AMQPValue::Boolean(true))));
        assert!(matches!(inner.get("d"), Some(AMQPValue::Double(_))));
    }
}
