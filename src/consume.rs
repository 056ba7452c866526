//! Consume: the idempotent manual-ack consumer (`SPEC.md`, "Consumer").
//!
//! Role: when `consumer.queue` is set, declare the configured topology,
//! consume the queue with manual acks and run each message's effect once,
//! however often the broker delivers it.
//!
//! Owns: its own AMQP connection and reconnect loop (separate from the
//! forwarder's, so a slow handler never holds up publishing), the running
//! handlers, the handler processes.
//!
//! Per delivery, keyed by its `message_id`:
//! 1. the row is status 3 already → ack, log a duplicate, run nothing;
//! 2. else run the handler; on success commit status 3 (inserting the row for
//!    a message this agent did not publish) and only then ack;
//! 3. on failure count the attempt in the row (`consume_count`: a restart
//!    does not reset it); below `consumer.max_attempts` → nack with requeue;
//!    at it → reject without requeue (dead-lettered when
//!    `consumer.dead_letter_exchange` is set) and the row becomes status 2.
//!
//! A delivery without `message_id` runs without deduplication; the
//! broker's `redelivered` flag stands in for the attempt count.
//!
//! Invariants:
//! - The ack follows the commit. An ack lost on a dead channel is harmless:
//!   the broker redelivers, the row says 3, step 1 acks it.
//! - A declaration the broker refuses (406: the queue exists with other
//!   arguments) is reported and retried slowly, never in a hot loop.
//! - On shutdown no new delivery is taken; running handlers get until the
//!   drain bound; unacked deliveries go back to the queue when the channel
//!   closes.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Event, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker::{backoff, ConnectFailure, Connector};
use crate::config::{ConsumerConfig, HandlerKind, QueueType};
use crate::metrics::Metrics;
use crate::store::{ConsumeVerdict, Consumption, Delivered, Status, Store, StoreError};

/// After the broker refused our declarations, wait this long before trying
/// again: the fix is an operator's, not a retry's.
const DECLARE_RETRY: Duration = Duration::from_secs(60);
/// How long shutdown waits for running handlers at most.
const SHUTDOWN_HANDLER_WAIT: Duration = Duration::from_secs(8);
/// `last_error` keeps at most this many bytes of a handler's stderr.
const ERROR_KEEP: usize = 1024;
/// After a store error, how long a delivery waits before going back to the queue.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How much of a handler's stderr is kept (the rest is read and dropped).
const STDERR_KEEP: usize = 64 * 1024;
/// After the handler exits, how long its stderr may stay open (held by a
/// process it left in the background) before the exit status decides.
const STDERR_GRACE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs the effect of one message.
#[derive(Debug, Clone)]
pub enum Handler {
    /// Only records the consumption: end-to-end proof of arrival.
    Record,
    /// Runs a command: body on stdin, the message's facts in the environment.
    Exec {
        argv: Vec<String>,
        timeout: Duration,
    },
}

impl Handler {
    pub fn from_config(config: &ConsumerConfig) -> Handler {
        match config.handler {
            HandlerKind::Record => Handler::Record,
            HandlerKind::Exec => Handler::Exec {
                argv: config.exec.clone(),
                timeout: config.handler_timeout,
            },
        }
    }

    /// Runs the handler on one delivery: `Err` carries the reason.
    pub async fn run(&self, message: &Message) -> Result<(), String> {
        match self {
            Handler::Record => Ok(()),
            Handler::Exec { argv, timeout } => run_exec(argv, *timeout, message).await,
        }
    }
}

/// What a handler sees of a delivery.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: Option<String>,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub body: Vec<u8>,
    pub headers: Option<String>,
    pub content_type: Option<String>,
}

impl Message {
    fn from_delivery(delivery: &Delivery) -> Message {
        let properties = &delivery.properties;
        Message {
            id: properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_string()),
            exchange: delivery.exchange.as_str().to_string(),
            routing_key: delivery.routing_key.as_str().to_string(),
            redelivered: delivery.redelivered,
            body: delivery.data.clone(),
            headers: properties.headers().as_ref().map(headers_json),
            content_type: properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str().to_string()),
        }
    }

    fn delivered(&self, id: &str) -> Delivered {
        Delivered {
            id: id.to_string(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            body: self.body.clone(),
            headers: self.headers.clone(),
            content_type: self.content_type.clone(),
        }
    }
}

/// AMQP headers as the JSON object `msg_log.headers` holds.
fn headers_json(table: &FieldTable) -> String {
    let mut map = serde_json::Map::new();
    for (name, value) in table.inner() {
        let value = match value {
            AMQPValue::Boolean(b) => serde_json::Value::Bool(*b),
            AMQPValue::LongString(s) => serde_json::Value::String(s.to_string()),
            AMQPValue::ShortString(s) => serde_json::Value::String(s.as_str().to_string()),
            AMQPValue::LongLongInt(i) => serde_json::Value::from(*i),
            AMQPValue::LongInt(i) => serde_json::Value::from(*i),
            AMQPValue::ShortInt(i) => serde_json::Value::from(*i),
            AMQPValue::Double(d) => serde_json::Value::from(*d),
            other => serde_json::Value::String(format!("{other:?}")),
        };
        map.insert(name.as_str().to_string(), value);
    }
    serde_json::Value::Object(map).to_string()
}

/// What to tell the broker about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    Requeue,
    Reject,
}

/// Decides one delivery: dedupe, run, record. Returns what to tell the
/// broker; the store has committed whatever the answer rests on.
pub async fn process(
    store: &Store,
    handler: &Handler,
    max_attempts: u32,
    message: &Message,
    metrics: &Metrics,
) -> Result<Settle, StoreError> {
    metrics.deliveries.inc();
    let Some(id) = message.id.as_deref() else {
        tracing::warn!(exchange = %message.exchange, routing_key = %message.routing_key,
            "delivery without message_id: handled without deduplication");
        return Ok(match handler.run(message).await {
            Ok(()) => Settle::Ack,
            Err(error) if message.redelivered || max_attempts <= 1 => {
                metrics.handler_failures.inc();
                metrics.dead_lettered.inc();
                tracing::warn!(error = %error, "handler failed again; rejecting the delivery");
                Settle::Reject
            }
            Err(error) => {
                metrics.handler_failures.inc();
                tracing::warn!(error = %error, "handler failed; requeueing the delivery");
                Settle::Requeue
            }
        });
    };
    let reader = store.reader().clone();
    let lookup = id.to_string();
    let status = tokio::task::spawn_blocking(move || reader.status_of(&lookup))
        .await
        .map_err(|e| StoreError::WriteFailed(format!("status lookup: {e}")))??;
    if status == Some(Status::Consumed) {
        metrics.duplicates.inc();
        tracing::info!(message_id = %id, "duplicate delivery of a consumed message: acked, not run again");
        return Ok(Settle::Ack);
    }
    let consumption = match handler.run(message).await {
        Ok(()) => Consumption::Succeeded(message.delivered(id)),
        Err(error) => {
            metrics.handler_failures.inc();
            tracing::warn!(message_id = %id, error = %error, "handler failed");
            Consumption::Failed {
                delivery: message.delivered(id),
                error: truncate(&error, ERROR_KEEP),
                max_attempts,
            }
        }
    };
    Ok(match store.record_consumption(consumption).await? {
        ConsumeVerdict::Ack => {
            tracing::debug!(message_id = %id, "consumed");
            Settle::Ack
        }
        ConsumeVerdict::Requeue { attempts } => {
            tracing::info!(message_id = %id, attempts, "requeued for another attempt");
            Settle::Requeue
        }
        ConsumeVerdict::GiveUp { attempts } => {
            metrics.dead_lettered.inc();
            tracing::warn!(message_id = %id, attempts, "giving up on the message: rejected, marked failed");
            Settle::Reject
        }
    })
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

async fn run_exec(argv: &[String], timeout: Duration, message: &Message) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("consumer.exec is empty".into());
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env(
            "EDGE_OUTBOX_MESSAGE_ID",
            message.id.as_deref().unwrap_or(""),
        )
        .env("EDGE_OUTBOX_EXCHANGE", &message.exchange)
        .env("EDGE_OUTBOX_ROUTING_KEY", &message.routing_key)
        .env(
            "EDGE_OUTBOX_REDELIVERED",
            if message.redelivered { "1" } else { "0" },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let group = child
        .id()
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
    let stdin = child.stdin.take();
    let body = message.body.clone();
    // Feed stdin and drain stderr concurrently: a handler that writes a lot
    // before reading must not deadlock against us.
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A handler that exits without reading its input is its business.
            let _ = stdin.write_all(&body).await;
        }
    };
    // Read stderr to the end (keeping the first STDERR_KEEP bytes): closing
    // it early would kill a verbose handler with SIGPIPE. Once the handler
    // has exited, stop reading after STDERR_GRACE: a background process it
    // left may hold stderr open indefinitely.
    let mut stderr = child.stderr.take();
    let mut err = Vec::new();
    let (exited_tx, exited_rx) = tokio::sync::oneshot::channel::<()>();
    let read_stderr = async {
        let Some(stderr) = stderr.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
            let room = STDERR_KEEP.saturating_sub(err.len());
            err.extend_from_slice(&chunk[..n.min(room)]);
        }
    };
    let waited = tokio::time::timeout(timeout, async {
        let run = async {
            let ((), status) = tokio::join!(feed, child.wait());
            let _ = exited_tx.send(());
            status
        };
        let drain = async {
            tokio::select! {
                () = read_stderr => {}
                () = async {
                    let _ = exited_rx.await;
                    tokio::time::sleep(STDERR_GRACE).await;
                } => {}
            }
        };
        let (status, ()) = tokio::join!(run, drain);
        status
    })
    .await;
    let waited = waited.map(|status| (err, status));
    match waited {
        Ok((err, Ok(status))) if status.success() => {
            if !err.is_empty() {
                tracing::info!(message_id = ?message.id, stderr = %String::from_utf8_lossy(&err).trim_end(), "handler stderr");
            }
            Ok(())
        }
        Ok((err, Ok(status))) => {
            let stderr = String::from_utf8_lossy(&err).trim_end().to_string();
            let code = status
                .code()
                .map(|c| format!("exit status {c}"))
                .unwrap_or_else(|| format!("{status}"));
            Err(if stderr.is_empty() {
                format!("handler {program} failed: {code}")
            } else {
                format!("handler {program} failed: {code}: {stderr}")
            })
        }
        Ok((_, Err(e))) => Err(format!("waiting for {program}: {e}")),
        Err(_) => {
            if let Some(group) = group {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
            Err(format!(
                "handler {program} killed after consumer.handler_timeout ({})",
                humantime::format_duration(timeout)
            ))
        }
    }
}

/// The consumer task.
pub struct Consumer {
    /// `consumer.queue`: a consumer runs only when it is set.
    queue: String,
    config: ConsumerConfig,
    connector: Connector,
    store: Store,
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
        wait: Option<Duration>,
    },
    /// Consuming. Connection or channel lost → `Down` (running handlers
    /// finish; their acks may be lost, redelivery plus dedupe covers it).
    /// Shutdown → cancel, let handlers finish (bounded), close, stop.
    Up(Box<Session>),
    Stopped,
}

struct Session {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
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

    /// Declares exchanges, the queue, its bindings (and the dead-letter
    /// exchange), sets the prefetch, starts consuming.
    async fn declare_and_consume(
        &self,
        connection: &Connection,
    ) -> lapin::Result<(Channel, lapin::Consumer, String)> {
        let c = &self.config;
        let channel = connection.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let mut arguments = FieldTable::default();
        if c.queue_type == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(dead_letter_exchange) = &c.dead_letter_exchange {
            channel
                .exchange_declare(
                    dead_letter_exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await?;
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dead_letter_exchange.as_str().into()),
            );
        }
        for binding in &c.bindings {
            if !binding.exchange.is_empty() {
                channel
                    .exchange_declare(
                        binding.exchange.as_str().into(),
                        binding.exchange_type.into(),
                        durable,
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        for binding in c.bindings.iter().filter(|b| !b.exchange.is_empty()) {
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        channel
            .basic_qos(c.prefetch.get(), BasicQosOptions::default())
            .await?;
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

async fn drain(running: &mut JoinSet<Result<(), StoreError>>) {
    while running.join_next().await.is_some() {}
}

/// One delivery, start to ack.
async fn handle(
    delivery: Delivery,
    store: Store,
    handler: Arc<Handler>,
    max_attempts: u32,
    metrics: Arc<Metrics>,
    in_flight: Arc<InFlight>,
) -> Result<(), StoreError> {
    let message = Message::from_delivery(&delivery);
    // Copies of one message delivered together go one at a time: the later
    // one then finds status 3 and is acked as a duplicate.
    let _turn = match message.id.as_deref() {
        Some(id) => Some(in_flight.turn(id).await),
        None => None,
    };
    // Nothing is decided without the database: on a store error the
    // delivery goes back to the queue (after a pause, so a database that
    // stays broken is no hot loop). Left unacked it would hold its prefetch
    // slot for as long as the channel lives.
    let settle = match process(&store, &handler, max_attempts, &message, &metrics).await {
        Ok(settle) => settle,
        Err(e) => {
            tokio::time::sleep(STORE_ERROR_PAUSE).await;
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let _ = delivery.acker.nack(requeue).await;
            return Err(e);
        }
    };
    let acker = &delivery.acker;
    let sent = match settle {
        Settle::Ack => acker.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
        Settle::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
    };
    match sent {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            tracing::debug!(message_id = ?message.id, ?settle,
                "could not tell the broker (channel gone); the delivery will come again and be deduplicated");
        }
    }
    Ok(())
}

/// The message ids whose deliveries are being processed, each with a lock
/// that copies of the same message take in turn.
#[derive(Default)]
struct InFlight(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl InFlight {
    /// Waits until no other delivery of `id` is being processed.
    async fn turn(self: &Arc<Self>, id: &str) -> Turn {
        let lock = {
            let mut ids = self.0.lock().unwrap_or_else(|e| e.into_inner());
            ids.entry(id.to_string()).or_default().clone()
        };
        Turn {
            guard: Some(lock.lock_owned().await),
            in_flight: self.clone(),
            id: id.to_string(),
        }
    }
}

/// One delivery's turn on its message id; the id is forgotten when no other
/// delivery of it waits.
struct Turn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    in_flight: Arc<InFlight>,
    id: String,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.guard.take();
        let mut ids = self.in_flight.0.lock().unwrap_or_else(|e| e.into_inner());
        if ids
            .get(&self.id)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            ids.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> Message {
        Message {
            id: Some("m-1".into()),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            redelivered: true,
            body: body.to_vec(),
            headers: None,
            content_type: None,
        }
    }

    #[tokio::test]
    async fn exec_passes_body_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "cat > {0}; echo \"$EDGE_OUTBOX_MESSAGE_ID $EDGE_OUTBOX_EXCHANGE $EDGE_OUTBOX_ROUTING_KEY $EDGE_OUTBOX_REDELIVERED\" >> {0}",
            out.display()
        );
        let handler = Handler::Exec {
            argv: vec!["sh".into(), "-c".into(), script],
            timeout: Duration::from_secs(10),
        };
        handler.run(&message(b"hello\n")).await.unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        assert_eq!(written, "hello\nm-1 ex rk 1\n");
    }

    #[tokio::test]
    async fn exec_failure_carries_stderr_and_timeout_kills() {
        let handler = Handler::Exec {
            argv: vec!["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()],
            timeout: Duration::from_secs(10),
        };
        let err = handler.run(&message(b"")).await.unwrap_err();
        assert!(
            err.contains("exit status 3") && err.contains("boom"),
            "{err}"
        );
        let slow = Handler::Exec {
            argv: vec!["sleep".into(), "30".into()],
            timeout: Duration::from_millis(200),
        };
        let started = std::time::Instant::now();
        let err = slow.run(&message(b"")).await.unwrap_err();
        assert!(err.contains("killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn long_errors_are_truncated_on_a_char_boundary() {
        let text = "é".repeat(1000);
        let t = truncate(&text, 1023);
        assert!(t.len() <= 1023 + "…".len());
    }
}
