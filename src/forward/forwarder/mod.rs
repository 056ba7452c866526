//! Forwarder: the lapin loop around the ledger (docs/forwarding.md,
//! Connection, Outcomes, Isolating a message the broker refuses).
//!
//! Role: the one task that talks to the broker for publishing. It keeps the
//! link through [`Link`] (states in the module header of
//! [`crate::forward`]), asks the [`Ledger`] what may go out next, publishes
//! it, feeds every broker answer back to the ledger, hands the outcomes to
//! the store, and answers pass requests and watchdog probes whatever the
//! link's state. It decides nothing itself: the ledger decides what an
//! answer means, [`Exchanges`] what is known of an exchange, the
//! [`Digest`] when a failure is worth a log line.
//!
//! Owns: the [`Reconnect`] driver and the live [`Session`], the [`Window`]
//! (ledger and futures), the [`BrokerState`] updates, the pass waiters.
//!
//! Invariants:
//! - Before the first publish of a connection the agent's own consumer
//!   topology is declared, so nothing is sent to an exchange the agent
//!   itself creates before it exists.
//! - A row for an exchange not known to exist is preceded by a passive
//!   declare on a channel of its own; the publishing channel never carries
//!   a publish the broker is known to refuse.
//! - A confirm timeout is charged only after the broker answered a
//!   liveness probe sent after it; no answer → the link is dropped and
//!   nothing is charged.
//! - A closed publishing channel is reopened only once it is fully closed,
//!   and after a growing pause when closes come in a row.
//! - Outcomes are handed to the store before the loop waits again.
//! - Every publish, confirm, probe and declare await has a timeout.
//! - The rate cap's gate stands before every backlog row and every publish
//!   is charged (docs/forwarding.md, The rate cap); time without a link is
//!   never counted as throttled.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{Stream, StreamExt};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, Event};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

mod answers;
mod publishing;

use super::backlog::Backlog;
use super::exchanges::Exchanges;
use super::ledger::Next;
use super::resend::{PassReport, PassRequest};
use super::side::{self, Pace};
use super::throttle::Throttle;
use super::window::Window;
use crate::broker::{self, ConnectFailure, Connector, Linked, Reconnect, SetupError};
use crate::config::{ConsumerConfig, PublishConfig};
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::service::{self, ProbeRx};
use crate::status::BrokerState;
use crate::stop::StopTally;
use crate::store::{now_ms, RetryPolicy, Store, StoreError};

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
    /// Bumped per channel, so answers about a closed channel are told apart.
    generation: u64,
    /// The broker asked publishers to pause (memory or disk alarm): nothing
    /// is published, and a confirm timeout is not the message's fault.
    blocked: bool,
}

impl Session {
    /// What publishing needs of the session, without its event stream
    /// (which is not `Sync`, so a `&Session` cannot be held across an await).
    fn wire(&self) -> Wire<'_> {
        Wire {
            connection: &self.connection,
            channel: &self.channel,
            generation: self.generation,
            blocked: self.blocked,
        }
    }
}

/// A view of the live session for publishing (see [`Session::wire`]).
#[derive(Clone, Copy)]
struct Wire<'a> {
    connection: &'a Connection,
    channel: &'a Channel,
    generation: u64,
    blocked: bool,
}

/// The agent's own consumer's queue and configuration, when it has one.
pub(crate) type OwnTopology = Option<(String, ConsumerConfig)>;

/// The forwarder task.
pub(crate) struct Forwarder {
    config: PublishConfig,
    /// Declared on every new connection before anything is published.
    topology: OwnTopology,
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
    exchanges: Exchanges,
    /// Publish failures per (exchange, routing key, reason), for the log.
    failures: Digest<(String, String, String)>,
    /// "Lost the broker connection" lines.
    losses: Digest<()>,
    /// Reopening the publishing channel after closes in a row.
    reopens: Pace,
    /// The latest channel's generation (see [`Session::generation`]).
    generation: u64,
    /// Where the shutdown drain notes the confirms it waited for.
    stop: Arc<StopTally>,
    /// The rate cap: the gate before each backlog row, charged per publish.
    throttle: Throttle,
}

/// Where the forwarder is with the broker (see the module header of
/// [`crate::forward`]).
enum Link {
    Down,
    Up(Box<Session>),
    Stopped,
}

impl Forwarder {
    /// The forwarder and the sender its [`super::Resend`] uses.
    pub(crate) fn new(
        config: PublishConfig,
        topology: OwnTopology,
        connector: Connector,
        store: Store,
        state: BrokerState,
        probes: ProbeRx,
        metrics: Arc<Metrics>,
    ) -> (Forwarder, mpsc::Sender<PassRequest>) {
        let (tx, rx) = mpsc::channel(8);
        let backlog = Backlog::new(store.reader().clone(), config.order);
        let reconnect =
            Reconnect::new(connector).counting_failures(metrics.connect_failures.clone());
        let window = Window::new(config.max_in_flight.get());
        let throttle = Throttle::new(
            u64::from(config.max_rate),
            config.max_bytes_rate.as_u64(),
            Instant::now(),
        );
        state.update(|s| {
            s.max_rate = (config.max_rate > 0).then_some(config.max_rate);
            s.max_bytes_rate = Some(config.max_bytes_rate.as_u64()).filter(|&b| b > 0);
        });
        let forwarder = Forwarder {
            config,
            topology,
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
            window,
            exchanges: Exchanges::default(),
            failures: Digest::default(),
            losses: Digest::default(),
            reopens: Pace::default(),
            generation: 0,
            stop: StopTally::new(),
            throttle,
        };
        (forwarder, tx)
    }

    /// Notes the confirms the shutdown drain waits for in `tally`.
    pub(crate) fn noting_stop_in(mut self, tally: Arc<StopTally>) -> Self {
        self.stop = tally;
        self
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
    /// meanwhile), then one attempt to connect, declare the agent's own
    /// topology and open a confirm channel.
    async fn down(&mut self, shutdown: &CancellationToken) -> Link {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Link::Stopped,
                _ = self.reconnect.wait_backoff() => break,
                request = self.passes.recv(), if self.passes_open => self.on_pass_request(request),
                probe = self.probes.recv(), if self.probes_open => self.on_probe(probe),
            }
        }
        let topology = &self.topology;
        let attempt = self
            .reconnect
            .connect(OPEN_CHANNEL, async |connection: &Connection| {
                if let Some((queue, consumer)) = topology {
                    side::declare_own_topology(connection, queue, consumer).await;
                }
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
        // A new connection may meet a changed broker: ask again.
        self.exchanges.forget_all();
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

    /// Publishes while connected; returns the next link state. The ledger
    /// says what may go out: a suspect (published at once), backlog rows
    /// (the `select!` arm, when the rate cap's gate is open; else the
    /// gate's wait is one more arm), or nothing until an answer comes.
    async fn up(
        &mut self,
        mut session: Session,
        shutdown: &CancellationToken,
    ) -> Result<Link, ForwardError> {
        let new_rows = self.store.new_rows();
        let mut tick = tokio::time::interval(crate::digest::PERIOD / 10);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = loop {
            if let Err(lost) = self.check_link(&mut session).await {
                break lost;
            }
            self.flush_outcomes().await?;
            let next = if session.blocked {
                Next::Wait
            } else {
                self.window.ledger.next()
            };
            let wanted = next == Next::Backlog && !self.backlog.exhausted();
            // The rate cap holds the next backlog row back, live or
            // catch-up alike (docs/forwarding.md, The rate cap); a suspect
            // is not held (it goes out alone, one at a time) but is charged.
            let throttled = self.throttle.gate(Instant::now(), wanted);
            self.show_state(&session);
            if let Next::Suspect(id) = next {
                self.publish_suspect(session.wire(), id).await?;
                continue;
            }
            let from_backlog = wanted && throttled.is_none();
            let gate = async move {
                if let Some(wait) = throttled {
                    tokio::time::sleep(wait).await;
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return self.stop(session).await,
                event = session.events.next() => {
                    if let Some(lost) = self.on_event(event, &mut session) {
                        break lost;
                    }
                }
                Some(confirmed) = self.window.confirms.next(), if !self.window.confirms.is_empty() => {
                    if let Some(lost) = self.on_confirms(confirmed, session.wire()).await {
                        break lost;
                    }
                }
                Some(settled) = self.window.settling.next(), if !self.window.settling.is_empty() => {
                    self.window.settled(settled, self.backlog.reads());
                    self.window.ledger.forget_settled_before(self.backlog.oldest_read_in_use());
                }
                request = self.passes.recv(), if self.passes_open => self.on_pass_request(request),
                probe = self.probes.recv(), if self.probes_open => self.on_probe(probe),
                _ = tick.tick() => self.report_failures(),
                _ = new_rows.notified() => self.backlog.more_rows(self.store.take_new_priority()),
                _ = gate, if throttled.is_some() => {}
                row = self.backlog.next(&self.window.ledger), if from_backlog => match row? {
                    // A row the broker closed a channel on, or one that
                    // breaks the submit rules (written past them), goes out
                    // alone: its refusal must cost no other message.
                    Some(row) if self.window.ledger.is_culprit(&row.id)
                        || crate::submit::breaks_submit_rules(&row.exchange, row.headers.as_deref()) => {
                        self.window.ledger.alone(row.id);
                    }
                    Some(row) => self.route(session.wire(), row).await,
                    None => self.pass_done(),
                },
            }
        };
        self.link_lost(&lost);
        self.flush_outcomes().await?;
        Ok(Link::Down)
    }

    fn show_state(&mut self, session: &Session) {
        let in_flight = self.window.ledger.unconfirmed() as u64;
        let now = Instant::now();
        let throttled = self.throttle.throttled(now);
        let waited = self.throttle.take_waited(now);
        if !waited.is_zero() {
            self.metrics.throttled_seconds.inc_by(waited.as_secs_f64());
        }
        let throttled_ms = u64::try_from(self.throttle.waited(now).as_millis()).unwrap_or(u64::MAX);
        self.state.update(|s| {
            s.in_flight = in_flight;
            s.blocked = session.blocked;
            s.throttled = throttled;
            s.throttled_ms = throttled_ms;
        });
    }

    /// `Err(reason)` when the connection is gone. A channel the broker
    /// closed is reopened on the live connection once its close is
    /// complete (no frame of ours may follow the close-ok), after the pause
    /// [`Pace`] asks for, and the backlog starts over so nothing it had
    /// taken is left behind.
    async fn check_link(&mut self, session: &mut Session) -> Result<(), String> {
        if !session.connection.status().connected() {
            return Err("the connection closed".into());
        }
        if session.channel.status().connected() {
            return Ok(());
        }
        side::until_closed(&session.channel).await;
        tokio::time::sleep(self.reopens.next_delay(Instant::now())).await;
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
                tracing::debug!("reopened the publishing channel");
                Ok(())
            }
            Ok(Err(e)) => Err(format!("cannot reopen the channel: {e}")),
            Err(_) => Err("cannot reopen the channel: timed out".into()),
        }
    }

    /// One event of the connection; `Some(reason)` when it is lost.
    fn on_event(&mut self, event: Option<Event>, session: &mut Session) -> Option<String> {
        match event {
            Some(Event::Error(e)) if !session.connection.status().connected() => {
                return Some(e.to_string())
            }
            // A channel-level error closing our channel: the confirms of
            // its rows say so, and `check_link` reopens it.
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

    /// Shutdown with a link: drain (bounded), close (bounded), stop.
    async fn stop(&mut self, session: Session) -> Result<Link, ForwardError> {
        self.drain(session.wire()).await?;
        broker::close(&session.connection, "edge-outbox shutting down").await;
        self.report_failures();
        self.state.update(|s| {
            s.connected = false;
            s.since = Some(now_ms());
            s.in_flight = 0;
            s.throttled = false;
        });
        Ok(Link::Stopped)
    }

    /// The link is gone: every unconfirmed row is unknown (due again, no
    /// attempt counted); suspects stay suspects; outcomes already known are
    /// still recorded.
    fn link_lost(&mut self, reason: &str) {
        // Nothing is held back without a link: close the cap's wait.
        self.throttle.gate(Instant::now(), false);
        let unknown = self.window.ledger.unconfirmed();
        self.window.ledger.link_lost();
        self.window.abandon();
        self.reconnect.lost();
        if let Some(count) = self.losses.note(&(), Instant::now()) {
            tracing::warn!(error = %reason, unconfirmed = unknown, count, "lost the broker connection; unconfirmed messages will be published again");
        }
        let since = now_ms();
        self.state.update(|s| {
            s.connected = false;
            s.since = Some(since);
            s.in_flight = 0;
            s.blocked = false;
            s.throttled = false;
            s.last_error = Some(reason.to_string());
        });
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
    /// what they say, and let the commits finish. A confirm that times out
    /// now is never charged: there is no time left to prove the link.
    async fn drain(&mut self, session: Wire<'_>) -> Result<(), ForwardError> {
        let wait = self.config.confirm_timeout.min(SHUTDOWN_CONFIRM_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let outstanding = self.window.confirms.len() as u64;
        while !self.window.confirms.is_empty() {
            match tokio::time::timeout_at(deadline, self.window.confirms.next()).await {
                Ok(Some(confirmed)) => {
                    let mut overdue = Vec::new();
                    let event = super::outcome::confirm_event(&confirmed.result);
                    self.on_confirm(confirmed, event, session, &mut overdue);
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.stop
            .confirms_awaited(outstanding, self.window.confirms.len() as u64);
        self.flush_outcomes().await?;
        while let Some(settled) = self.window.settling.next().await {
            self.window.settled(settled, self.backlog.reads());
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
