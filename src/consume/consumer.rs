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
//! (→ `Stopped`); `failed()` turns a failed attempt into the next `Down`.
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
use crate::broker::{backoff, ConnectFailure, Connector};
use crate::config::ConsumerConfig;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// After the broker refused our declarations, wait this long before trying
/// again: the fix is an operator's, not a retry's.
const DECLARE_RETRY: Duration = Duration::from_secs(60);
/// How long shutdown waits for running handlers at most.
const SHUTDOWN_HANDLER_WAIT: Duration = Duration::from_secs(8);

/// The consumer task.
pub struct Consumer {
    /// `consumer.queue`: set, or there would be no consumer.
    queue: String,
    config: ConsumerConfig,
    connector: Connector,
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
    Down {
        failures: u32,
        /// Overrides the backoff (after a refused declaration).
        wait: Option<Duration>,
    },
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
    pub fn new(
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
            connector,
            store,
            handler,
            metrics,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ConsumeError> {
        let mut link = Link::Down {
            failures: 0,
            wait: None,
        };
        loop {
            link = match link {
                Link::Down { failures, wait } => self.down(failures, wait, &shutdown).await,
                Link::Up(session) => self.up(*session, &shutdown).await?,
                Link::Stopped => return Ok(()),
            };
        }
    }

    async fn down(
        &mut self,
        failures: u32,
        wait: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> Link {
        let delay = wait.unwrap_or_else(|| {
            if failures == 0 {
                Duration::ZERO
            } else {
                backoff(failures)
            }
        });
        tokio::select! {
            _ = shutdown.cancelled() => return Link::Stopped,
            _ = tokio::time::sleep(delay) => {}
        }
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return Link::Stopped,
            connected = self.connector.connect() => connected,
        };
        let connected = match connected {
            Ok(c) => c,
            Err(failure) => return self.failed(failure, failures, None),
        };
        let setup = tokio::time::timeout(
            self.connector.connect_timeout(),
            self.declare_and_consume(&connected.connection),
        )
        .await;
        match setup {
            Ok(Ok((channel, consumer, tag))) => {
                tracing::info!(broker = %connected.url, queue = %self.queue, "consuming");
                Link::Up(Box::new(Session {
                    connection: connected.connection,
                    channel,
                    consumer,
                    tag,
                }))
            }
            Ok(Err(e)) => {
                let refused = matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406);
                let _ = connected.connection.close(200, "setup failed".into()).await;
                if refused {
                    tracing::error!(queue = %self.queue, error = %e,
                        "the broker refused the consumer's declarations (406: the queue or exchange exists with other arguments); fix the broker or the [consumer] configuration");
                    let failure = connected.failure(format!("declaration refused: {e}"));
                    return self.failed(failure, failures, Some(DECLARE_RETRY));
                }
                let failure = connected.failure(format!("declaring the consumer's topology: {e}"));
                self.failed(failure, failures, None)
            }
            Err(_) => {
                let failure = connected.failure("declaring the consumer's topology: timed out");
                self.failed(failure, failures, None)
            }
        }
    }

    fn failed(&self, failure: ConnectFailure, failures: u32, wait: Option<Duration>) -> Link {
        tracing::warn!(broker = %failure.url, error = %failure.error, "consumer cannot connect");
        Link::Down {
            failures: failures + 1,
            wait,
        }
    }

    /// Declares the topology (exchanges, the queue, its bindings, the
    /// dead-letter exchange, the prefetch), starts consuming.
    async fn declare_and_consume(
        &self,
        connection: &Connection,
    ) -> lapin::Result<(Channel, lapin::Consumer, String)> {
        let channel = connection.create_channel().await?;
        topology::declare(&channel, &self.queue, &self.config).await?;
        let tag = format!("edge-outbox-{}", uuid::Uuid::now_v7().simple());
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer, tag))
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
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        session.connection.close(200, "edge-outbox shutting down".into()),
                    )
                    .await;
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
        let _ = session.connection.close(200, "reconnecting".into()).await;
        Ok(Link::Down {
            failures: 0,
            wait: None,
        })
    }
}

/// Waits for every running delivery.
async fn drain(running: &mut JoinSet<Result<(), StoreError>>) {
    while running.join_next().await.is_some() {}
}
