//! Forwarder: the lapin loop (docs/forwarding.md, Publishing, Outcomes and
//! Reconnecting).
//!
//! Role: the one task that talks to the broker for publishing. It keeps the
//! link through [`Link`] (states in the module header of
//! [`crate::forward`]), publishes the rows its [`Backlog`] hands out, awaits
//! their confirms, hands their outcomes to the store, and answers pass
//! requests and watchdog probes whatever the link's state.
//!
//! Owns: the [`Reconnect`] driver and the live [`Session`], the
//! [`Window`] of rows in flight, the [`BrokerState`] updates, the pass
//! waiters.
//!
//! Invariants:
//! - Outcomes are handed to the store before the loop waits again, so a
//!   commit is never held back by an idle link.
//! - Every publish and every confirm await has a timeout; the shutdown
//!   drain is bounded by [`SHUTDOWN_CONFIRM_WAIT`], the close by
//!   [`crate::broker::link::CLOSE_WAIT`].
//! - Confirms carry the generation of their channel, so a confirm of a
//!   channel since closed is told apart in the logs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{Stream, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection, Event};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::backlog::Backlog;
use super::outcome::{classify, properties, Attempt};
use super::resend::{PassReport, PassRequest};
use super::window::{Confirmed, Window};
use crate::broker::{self, ConnectFailure, Connector, Linked, Reconnect, SetupError};
use crate::config::PublishConfig;
use crate::metrics::Metrics;
use crate::service::{self, ProbeRx};
use crate::status::BrokerState;
use crate::store::{now_ms, OutgoingRow, PublishOutcome, RetryPolicy, Store, StoreError};

/// How long shutdown waits for outstanding confirms.
const SHUTDOWN_CONFIRM_WAIT: Duration = Duration::from_secs(5);

/// The setup step of a new connection, as failures name it.
const OPEN_CHANNEL: &str = "cannot open a confirm-mode channel";

#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
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
    /// The broker asked publishers to pause (memory or disk alarm): nothing
    /// is published, and a confirm timeout is not the message's fault.
    blocked: bool,
}

/// The forwarder task.
pub(crate) struct Forwarder {
    config: PublishConfig,
    reconnect: Reconnect,
    store: Store,
    state: BrokerState,
    metrics: Arc<Metrics>,
    passes: mpsc::Receiver<PassRequest>,
    passes_open: bool,
    probes: ProbeRx,
    probes_open: bool,
    pass_waiters: Vec<oneshot::Sender<PassReport>>,
    backlog: Backlog,
    window: Window,
    /// The latest channel's generation (see [`Session::generation`]).
    generation: u64,
}

/// Where the forwarder is with the broker (see the module header of
/// [`crate::forward`]).
enum Link {
    /// No connection: waits out the backoff, then connects → `Up`, or
    /// `Down` again. Shutdown → stop.
    Down,
    /// Connected, channel in confirm mode, publishing. Connection lost →
    /// `Down`; channel closed by the broker → reopened, stays `Up`;
    /// shutdown → drain confirms, close, stop.
    Up(Box<Session>),
    /// Shutdown finished.
    Stopped,
}

impl Forwarder {
    /// The forwarder and the sender its [`super::Resend`] uses.
    pub(crate) fn new(
        config: PublishConfig,
        connector: Connector,
        store: Store,
        state: BrokerState,
        probes: ProbeRx,
        metrics: Arc<Metrics>,
    ) -> (Forwarder, mpsc::Sender<PassRequest>) {
        let (tx, rx) = mpsc::channel(8);
        let backlog = Backlog::new(store.reader().clone());
        let reconnect =
            Reconnect::new(connector).counting_failures(metrics.connect_failures.clone());
        let forwarder = Forwarder {
            config,
            reconnect,
            store,
            state,
            metrics,
            passes: rx,
            passes_open: true,
            probes,
            probes_open: true,
            pass_waiters: Vec::new(),
            backlog,
            window: Window::new(),
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
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<(), ForwardError> {
        let mut link = Link::Down;
        loop {
            link = match link {
                Link::Down => self.down(&shutdown).await,
                Link::Up(session) => self.up(*session, &shutdown).await?,
                Link::Stopped => return Ok(()),
            };
        }
    }

    /// Waits out the backoff (answering pass requests and probes
    /// meanwhile), then one attempt to connect and open a confirm channel.
    async fn down(&mut self, shutdown: &CancellationToken) -> Link {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Link::Stopped,
                _ = self.reconnect.wait_backoff() => break,
                request = self.passes.recv(), if self.passes_open => self.on_pass_request(request),
                probe = self.probes.recv(), if self.probes_open => self.on_probe(probe),
            }
        }
        let attempt = self
            .reconnect
            .connect(OPEN_CHANNEL, async |connection: &Connection| {
                open_channel(connection)
                    .await
                    .map_err(|e| SetupError::new(format!("{OPEN_CHANNEL}: {e}")))
            });
        let linked = tokio::select! {
            _ = shutdown.cancelled() => return Link::Stopped,
            linked = attempt => linked,
        };
        match linked {
            Ok(linked) => self.link_up(linked),
            Err(failure) => self.connect_failed(failure),
        }
    }

    fn link_up(&mut self, linked: Linked<Channel>) -> Link {
        tracing::info!(broker = %linked.url, "connected to the broker");
        self.metrics.connects.inc();
        let since = now_ms();
        self.state.update(|s| {
            s.connected = true;
            s.url = Some(linked.url.clone());
            s.since = Some(since);
            s.last_error = None;
            s.blocked = false;
        });
        // Drain the backlog now, unconfirmed rows of the last link first.
        self.backlog.rewind();
        self.generation += 1;
        let events = Box::pin(linked.connection.events_listener());
        Link::Up(Box::new(Session {
            connection: linked.connection,
            channel: linked.setup,
            events,
            generation: self.generation,
            blocked: false,
        }))
    }

    /// The driver has logged and counted the failure; the status says it.
    fn connect_failed(&mut self, failure: ConnectFailure) -> Link {
        self.state.update(|s| {
            if s.connected || s.since.is_none() {
                s.since = Some(now_ms());
            }
            s.connected = false;
            s.url = Some(failure.url);
            s.last_error = Some(failure.error);
        });
        Link::Down
    }

    /// Publishes while connected; returns the next link state. Each arm of
    /// the `select!` is one method below.
    async fn up(
        &mut self,
        mut session: Session,
        shutdown: &CancellationToken,
    ) -> Result<Link, ForwardError> {
        let new_rows = self.store.new_rows();
        let lost = loop {
            if let Err(lost) = self.check_link(&mut session).await {
                break lost;
            }
            self.flush_outcomes().await?;
            let in_flight = self.window.awaiting();
            self.state.update(|s| {
                s.in_flight = in_flight as u64;
                s.blocked = session.blocked;
            });
            let can_publish = in_flight < self.config.max_in_flight.get()
                && !session.blocked
                && !self.backlog.exhausted();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return self.stop(session).await,
                event = session.events.next() => {
                    if let Some(lost) = self.on_event(event, &mut session) {
                        break lost;
                    }
                }
                Some(confirmed) = self.window.confirms.next(), if !self.window.confirms.is_empty() => {
                    self.on_confirms(confirmed, &session);
                }
                Some(settled) = self.window.settling.next(), if !self.window.settling.is_empty() => {
                    self.window.settled(settled);
                }
                request = self.passes.recv(), if self.passes_open => self.on_pass_request(request),
                probe = self.probes.recv(), if self.probes_open => self.on_probe(probe),
                _ = new_rows.notified() => self.backlog.more_rows(),
                row = self.backlog.next(&self.window.in_flight), if can_publish => match row? {
                    Some(row) => self.publish(&session.channel, session.generation, row).await,
                    None => self.pass_done(),
                },
            }
        };
        self.link_lost(&lost);
        self.flush_outcomes().await?;
        Ok(Link::Down)
    }

    /// `Err(reason)` when the connection is gone. A channel the broker
    /// closed (a 404, say) is reopened on the live connection, and the
    /// backlog starts over so nothing it had taken is left behind.
    async fn check_link(&mut self, session: &mut Session) -> Result<(), String> {
        if !session.connection.status().connected() {
            return Err("the connection closed".into());
        }
        if session.channel.status().connected() {
            return Ok(());
        }
        let reopened = tokio::time::timeout(
            self.reconnect.connect_timeout(),
            open_channel(&session.connection),
        )
        .await;
        match reopened {
            Ok(Ok(channel)) => {
                self.generation += 1;
                session.channel = channel;
                session.generation = self.generation;
                self.backlog.rewind();
                self.metrics.channel_closes.inc();
                tracing::info!("reopened the publishing channel");
                Ok(())
            }
            Ok(Err(e)) => Err(format!("cannot reopen the channel: {e}")),
            Err(_) => Err("cannot reopen the channel: timed out".into()),
        }
    }

    /// One event of the connection; `Some(reason)` when it is lost.
    fn on_event(&mut self, event: Option<Event>, session: &mut Session) -> Option<String> {
        match event {
            // A channel-level error (a 404 closing our channel) is reported
            // here too; the connection lives on and the channel is reopened
            // by `check_link`.
            Some(Event::Error(e)) if !session.connection.status().connected() => {
                return Some(e.to_string())
            }
            Some(Event::Error(e)) => {
                tracing::debug!(error = %e, "channel error; the connection is still up");
            }
            None => return Some("the connection's event stream ended".into()),
            Some(Event::ConnectionBlocked(reason)) => {
                tracing::warn!(reason = %reason, "the broker blocked publishing; waiting");
                session.blocked = true;
            }
            Some(Event::ConnectionUnblocked) => {
                tracing::info!("the broker unblocked publishing");
                session.blocked = false;
            }
            Some(_) => {}
        }
        None
    }

    /// A confirm arrived: it and every other one already there.
    fn on_confirms(&mut self, first: Confirmed, session: &Session) {
        let link_ok = !session.blocked && session.connection.status().connected();
        self.on_confirm(first, link_ok);
        while let Some(more) = self.window.ready_confirm() {
            self.on_confirm(more, link_ok);
        }
    }

    /// Shutdown with a link: drain (bounded), close (bounded), stop.
    async fn stop(&mut self, session: Session) -> Result<Link, ForwardError> {
        self.drain(&session.connection).await?;
        broker::close(&session.connection, "edge-outbox shutting down").await;
        self.state.update(|s| {
            s.connected = false;
            s.since = Some(now_ms());
            s.in_flight = 0;
        });
        Ok(Link::Stopped)
    }

    /// The link is gone: every unconfirmed row is unknown (due again, no
    /// attempt counted); outcomes already known are still recorded.
    fn link_lost(&mut self, reason: &str) {
        let unknown = self.window.abandon();
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
        self.window.publishing(&row.id);
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
                let OutgoingRow { id, exchange, .. } = row;
                self.metrics.publishes.inc();
                let timeout = self.config.confirm_timeout;
                self.window
                    .published(id, exchange, generation, confirm, timeout);
            }
            Ok(Err(e)) => {
                tracing::debug!(message_id = %row.id, error = %e, "publish failed; will publish again");
                self.window.not_published(&row.id);
            }
            Err(_) => {
                tracing::debug!(message_id = %row.id, "publish did not complete in time; will publish again");
                self.window.not_published(&row.id);
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
        match classify(&exchange, &result, self.config.confirm_timeout, link_ok) {
            Attempt::Delivered => {
                tracing::debug!(message_id = %id, generation, "confirmed");
                self.window.record(PublishOutcome::Delivered { id });
            }
            Attempt::Rejected(error) => {
                tracing::warn!(message_id = %id, exchange = %exchange, error = %error, "publish attempt failed");
                self.window.record(PublishOutcome::Rejected { id, error });
            }
            Attempt::Unknown(reason) => {
                tracing::debug!(message_id = %id, reason = %reason, "outcome unknown; will publish again");
                self.window.unknown(&id);
            }
        }
    }

    /// Hands the buffered outcomes to the store (see [`Window::flush`]).
    async fn flush_outcomes(&mut self) -> Result<(), ForwardError> {
        let policy = self.policy();
        Ok(self.window.flush(&self.store, policy).await?)
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
    async fn drain(&mut self, connection: &Connection) -> Result<(), ForwardError> {
        let wait = self.config.confirm_timeout.min(SHUTDOWN_CONFIRM_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        while !self.window.confirms.is_empty() {
            match tokio::time::timeout_at(deadline, self.window.confirms.next()).await {
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
        while let Some(settled) = self.window.settling.next().await {
            self.window.settled(settled);
        }
        Ok(())
    }
}

async fn open_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}
