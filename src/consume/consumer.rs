//! Consumer: the consumer task and its link to the broker
//! (docs/consuming.md, Connection).
//!
//! Owns its own AMQP connection (never the forwarder's, so a slow handler
//! cannot hold up publishing), the channel and the `basic.consume`
//! subscription on it, and the deliveries being processed (a `JoinSet` of
//! `delivery::handle`).
//!
//! The link is a state machine ([`Link`]): `down()` waits out the backoff,
//! connects, declares the topology and starts consuming → `Up`; `up()` runs
//! the delivery loop until the connection is lost (→ `Down`) or shutdown
//! (→ `Stopped`). Backoff, connecting across `broker.urls`, failure logs
//! and the bounded close are the shared driver's (`broker::Reconnect`).
//!
//! Invariants:
//! - A declaration the broker refuses (406) is retried after
//!   [`DECLARE_RETRY`], not on the backoff: the fix is an operator's
//!   (docs/consuming.md, Topology).
//! - On shutdown the subscription is cancelled first, so no new delivery is
//!   taken; running handlers get `min(consumer.handler_timeout,
//!   SHUTDOWN_HANDLER_WAIT)`; what is still unacked when the connection
//!   closes goes back to the queue (docs/consuming.md, Connection loss
//!   and shutdown).
//! - On a lost connection running handlers finish (bounded) before the
//!   next connection; their acks fail harmlessly and redelivery plus
//!   dedupe covers them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Event};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::delivery::handle;
use super::handler::Handler;
use super::in_flight::InFlight;
use super::topology;
use super::ConsumeError;
use crate::broker::{self, Connector, Reconnect, SetupError};
use crate::config::ConsumerConfig;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// After the broker refused our declarations, wait this long before trying
/// again: the fix is an operator's, not a retry's.
const DECLARE_RETRY: Duration = Duration::from_secs(60);
/// What the consumer's setup step does, for the driver's log lines.
const DECLARE: &str = "declaring the consumer's topology";
/// How long shutdown waits for running handlers at most.
const SHUTDOWN_HANDLER_WAIT: Duration = Duration::from_secs(8);

/// The consumer task.
pub(crate) struct Consumer {
    /// `consumer.queue`: set, or there would be no consumer.
    queue: String,
    config: ConsumerConfig,
    reconnect: Reconnect,
    store: Store,
    /// Shared with every running delivery.
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
}

/// Where the consumer is with the broker.
enum Link {
    /// No connection; after a backoff delay it connects and declares →
    /// `Up`; `Down` again on failure (a long wait after a refused
    /// declaration). Shutdown → stop.
    Down,
    /// Consuming. Connection or channel lost → `Down` (running handlers
    /// finish; their acks may be lost, redelivery plus dedupe covers it).
    /// Shutdown → cancel, let handlers finish (bounded), close, stop.
    Up(Box<Session>),
    Stopped,
}

/// A live subscription: what `up()` needs to consume, cancel and close.
struct Session {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    /// The consumer tag, to cancel the subscription on shutdown.
    tag: String,
}

impl Consumer {
    pub(crate) fn new(
        queue: String,
        config: ConsumerConfig,
        connector: Connector,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Consumer {
        let handler = Arc::new(Handler::from_config(&config));
        Consumer {
            queue,
            config,
            reconnect: Reconnect::new(connector),
            store,
            handler,
            metrics,
        }
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<(), ConsumeError> {
        let mut link = Link::Down;
        loop {
            link = match link {
                Link::Down => self.down(&shutdown).await,
                Link::Up(session) => self.up(*session, &shutdown).await?,
                Link::Stopped => return Ok(()),
            };
        }
    }

    async fn down(&mut self, shutdown: &CancellationToken) -> Link {
        tokio::select! {
            _ = shutdown.cancelled() => return Link::Stopped,
            _ = self.reconnect.wait_backoff() => {}
        }
        let (queue, config) = (&self.queue, &self.config);
        let attempt = self
            .reconnect
            .connect(DECLARE, async |connection: &Connection| {
                declare_and_consume(queue, config, connection)
                    .await
                    .map_err(|e| declare_failure(queue, &e))
            });
        let linked = tokio::select! {
            _ = shutdown.cancelled() => return Link::Stopped,
            linked = attempt => linked,
        };
        match linked {
            Ok(linked) => {
                let (channel, consumer, tag) = linked.setup;
                tracing::info!(broker = %linked.url, queue = %self.queue, "consuming");
                Link::Up(Box::new(Session {
                    connection: linked.connection,
                    channel,
                    consumer,
                    tag,
                }))
            }
            // The driver logged and counted it, and set the next wait.
            Err(_) => Link::Down,
        }
    }

    async fn up(
        &mut self,
        mut session: Session,
        shutdown: &CancellationToken,
    ) -> Result<Link, ConsumeError> {
        let mut running: JoinSet<Result<(), StoreError>> = JoinSet::new();
        let in_flight = Arc::new(InFlight::default());
        let mut events = Box::pin(session.connection.events_listener());
        let lost = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let _ = session
                        .channel
                        .basic_cancel(session.tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                    let wait = self.config.handler_timeout.min(SHUTDOWN_HANDLER_WAIT);
                    let _ = tokio::time::timeout(wait, drain(&mut running)).await;
                    running.abort_all();
                    broker::close(&session.connection, "edge-outbox shutting down").await;
                    return Ok(Link::Stopped);
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    match done {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "could not record a delivery; it went back to the queue"),
                        Err(e) => tracing::error!(error = %e, "a delivery's task panicked; it will be redelivered"),
                    }
                }
                event = events.next() => match event {
                    Some(Event::Error(e)) if !session.connection.status().connected() => break e.to_string(),
                    None => break "the connection's event stream ended".into(),
                    Some(_) => {}
                },
                delivery = session.consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let store = self.store.clone();
                        let handler = self.handler.clone();
                        let max_attempts = self.config.max_attempts.get();
                        let metrics = self.metrics.clone();
                        let in_flight = in_flight.clone();
                        running.spawn(handle(delivery, store, handler, max_attempts, metrics, in_flight));
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the broker cancelled the consumer".into(),
                },
            }
        };
        tracing::warn!(error = %lost, "consumer lost its connection; unacked deliveries will come again");
        // Handlers of the lost channel finish; their acks fail harmlessly.
        let _ = tokio::time::timeout(SHUTDOWN_HANDLER_WAIT, drain(&mut running)).await;
        running.abort_all();
        broker::close(&session.connection, "reconnecting").await;
        self.reconnect.lost();
        Ok(Link::Down)
    }
}

/// Declares the topology (exchanges, the queue, its bindings, the
/// dead-letter exchange, the prefetch), starts consuming.
async fn declare_and_consume(
    queue: &str,
    config: &ConsumerConfig,
    connection: &Connection,
) -> lapin::Result<(Channel, lapin::Consumer, String)> {
    let channel = connection.create_channel().await?;
    topology::declare(&channel, queue, config).await?;
    let tag = format!("edge-outbox-{}", uuid::Uuid::now_v7().simple());
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer, tag))
}

/// A refused declaration (406: the queue or exchange exists with other
/// arguments) waits [`DECLARE_RETRY`]: only an operator can fix it.
fn declare_failure(queue: &str, e: &lapin::Error) -> SetupError {
    let refused = matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406);
    if refused {
        tracing::error!(queue = %queue, error = %e,
            "the broker refused the consumer's declarations (406: the queue or exchange exists with other arguments); fix the broker or the [consumer] configuration");
        SetupError::new(format!("declaration refused: {e}")).retry_after(DECLARE_RETRY)
    } else {
        SetupError::new(format!("{DECLARE}: {e}"))
    }
}

/// Waits for every running delivery.
async fn drain(running: &mut JoinSet<Result<(), StoreError>>) {
    while running.join_next().await.is_some() {}
}
