//! AMQP client helpers for tests and benchmarks: unique names, declaring,
//! publishing, reading and deleting queues and exchanges.
//!
//! Every helper is async and opens a connection of its own (closed before
//! it returns), so a test can point it at the shared broker, at the
//! restartable node or through a fault proxy alike. Each broker call has a
//! 15 s deadline; a failed or late call panics, naming what it was doing.
//! Give every queue and exchange a [`unique`] name and register it with a
//! [`crate::Cleanup`], so tests run in parallel and leave nothing behind.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

/// Deadline of each broker call made by the helpers below.
pub(crate) const AMQP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Names and connections
// ---------------------------------------------------------------------------

/// A name no other test uses: `prefix-<uuid v7>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Connects to `url`; panics after 15 s or on error.
pub async fn connect(url: &str) -> Connection {
    let what = format!("connect to {url}");
    deadline(
        &what,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
}

pub(crate) async fn deadline<T>(what: &str, fut: impl Future<Output = lapin::Result<T>>) -> T {
    match tokio::time::timeout(AMQP_DEADLINE, fut).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {AMQP_DEADLINE:?}"),
    }
}

/// Runs `f` on a fresh connection and channel, then closes both.
async fn with_channel<T, F, Fut>(url: &str, what: &str, f: F) -> T
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = lapin::Result<T>>,
{
    let conn = connect(url).await;
    let channel = deadline(&format!("{what}: open channel"), conn.create_channel()).await;
    let value = deadline(what, f(channel)).await;
    let _ = tokio::time::timeout(AMQP_DEADLINE, conn.close(200, "OK".into())).await;
    value
}

// ---------------------------------------------------------------------------
// Declaring
// ---------------------------------------------------------------------------

/// Declares a durable classic queue.
pub async fn declare_queue(url: &str, queue: &str) {
    let q = queue.to_owned();
    with_channel(url, &format!("declare queue {queue}"), |ch| async move {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map(drop)
    })
    .await
}

/// Declares a durable direct exchange and a durable queue bound to it with
/// `routing_key`.
pub async fn declare_exchange_with_queue(
    url: &str,
    exchange: &str,
    queue: &str,
    routing_key: &str,
) {
    declare_bound_queue(url, exchange, ExchangeKind::Direct, queue, routing_key).await
}

/// A new durable direct exchange and queue (`fwd-ex-…`, `fwd-q-…`) bound
/// with `routing_key`: where a forwarding test sends. Returns their names.
pub async fn topology(url: &str, routing_key: &str) -> (String, String) {
    let exchange = unique("fwd-ex");
    let queue = unique("fwd-q");
    declare_exchange_with_queue(url, &exchange, &queue, routing_key).await;
    (exchange, queue)
}

/// Declares a durable exchange of `kind` and a durable classic queue bound to
/// it with `routing_key` (e.g. a queue collecting a dead-letter fanout).
pub async fn declare_bound_queue(
    url: &str,
    exchange: &str,
    kind: ExchangeKind,
    queue: &str,
    routing_key: &str,
) {
    let (x, q, rk) = (
        exchange.to_owned(),
        queue.to_owned(),
        routing_key.to_owned(),
    );
    let what = format!("declare {kind:?} exchange {exchange} -> queue {queue} ({routing_key})");
    with_channel(url, &what, |ch| async move {
        ch.exchange_declare(
            x.clone().into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            q.clone().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            q.into(),
            x.into(),
            rk.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    })
    .await
}

/// Declares a durable queue with `arguments` (e.g. `x-max-length`).
pub async fn declare_queue_with_args(url: &str, queue: &str, arguments: FieldTable) {
    let q = queue.to_owned();
    with_channel(url, &format!("declare queue {queue}"), |ch| async move {
        ch.queue_declare(q.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .map(drop)
    })
    .await
}

// ---------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------

/// Publishes one persistent message and waits for the broker's confirm.
pub async fn publish(url: &str, exchange: &str, routing_key: &str, payload: &[u8]) {
    let (x, rk, body) = (
        exchange.to_owned(),
        routing_key.to_owned(),
        payload.to_vec(),
    );
    let what = format!("publish to {exchange:?} ({routing_key})");
    with_channel(url, &what, |ch| async move {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let confirm = ch
            .basic_publish(
                x.into(),
                rk.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        if confirm.is_ack() {
            Ok(())
        } else {
            panic!("publish: broker nacked: {confirm:?}");
        }
    })
    .await
}

/// Publishes one persistent message, with `message_id` when given, and waits
/// for the broker's confirm.
pub async fn publish_with_id(
    url: &str,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    message_id: Option<&str>,
) {
    let messages = vec![(message_id.map(str::to_owned), payload.to_vec())];
    publish_many(url, exchange, routing_key, &messages).await;
}

/// Publishes persistent messages (`(message_id, body)`, in order) on one
/// channel with pipelined confirms (at most 256 outstanding); returns once
/// every one is confirmed. Panics on a nack. 15 s deadline per confirm.
pub async fn publish_many(
    url: &str,
    exchange: &str,
    routing_key: &str,
    messages: &[(Option<String>, Vec<u8>)],
) {
    const WINDOW: usize = 256;
    let conn = connect(url).await;
    let ch = confirm_channel(&conn, "publish_many").await;
    let target = Target {
        what: "publish_many",
        exchange,
        routing_key,
        options: BasicPublishOptions::default(),
    };
    publish_pipelined(&ch, &target, WINDOW, messages.len(), |i| {
        (messages[i].0.clone(), messages[i].1.as_slice())
    })
    .await;
    let _ = tokio::time::timeout(AMQP_DEADLINE, conn.close(200, "OK".into())).await;
}

/// A channel on `conn` in confirm mode.
pub(crate) async fn confirm_channel(conn: &Connection, what: &str) -> Channel {
    let ch = deadline(&format!("{what}: open channel"), conn.create_channel()).await;
    deadline(
        &format!("{what}: confirm_select"),
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    ch
}

/// Where [`publish_pipelined`] publishes, and how.
pub(crate) struct Target<'a> {
    /// Names the caller in panics.
    pub(crate) what: &'a str,
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) options: BasicPublishOptions,
}

impl<'a> Target<'a> {
    /// Mandatory publishes to `queue` through the default exchange.
    pub(crate) fn queue(what: &'a str, queue: &'a str) -> Target<'a> {
        Target {
            what,
            exchange: "",
            routing_key: queue,
            options: BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
        }
    }
}

/// Publishes `count` persistent messages on `ch` (in confirm mode), the
/// `i`-th with the message id and body `message(i)` gives, keeping at most
/// `window` confirms outstanding; returns once every one is confirmed.
/// Panics on a nack or a basic.return (an unroutable mandatory message), and
/// when a call or a confirm takes longer than 15 s.
pub(crate) async fn publish_pipelined<'b>(
    ch: &Channel,
    target: &Target<'_>,
    window: usize,
    count: usize,
    mut message: impl FnMut(usize) -> (Option<String>, &'b [u8]),
) {
    let what = target.what;
    let check = |confirm: Confirmation| {
        assert!(
            matches!(confirm, Confirmation::Ack(None)),
            "{what}: broker nacked or returned: {confirm:?}"
        );
    };
    let mut confirms = FuturesUnordered::new();
    for i in 0..count {
        if confirms.len() >= window {
            let next = async { confirms.next().await.expect("an outstanding confirm") };
            check(deadline(&format!("{what}: confirm"), next).await);
        }
        let (id, body) = message(i);
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = id {
            properties = properties.with_message_id(id.into());
        }
        let confirm = deadline(
            &format!("{what}: publish"),
            ch.basic_publish(
                target.exchange.into(),
                target.routing_key.into(),
                target.options,
                body,
                properties,
            ),
        )
        .await;
        confirms.push(confirm);
    }
    while let Some(confirm) = tokio::time::timeout(AMQP_DEADLINE, confirms.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no confirm within the deadline"))
    {
        check(confirm.unwrap_or_else(|e| panic!("{what}: confirm: {e}")));
    }
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// Number of ready messages in `queue` (passive declare; panics if it does not exist).
pub async fn queue_len(url: &str, queue: &str) -> u32 {
    let q = queue.to_owned();
    with_channel(url, &format!("queue_len {queue}"), |ch| async move {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(q.into(), options, FieldTable::default())
            .await
            .map(|q| q.message_count())
    })
    .await
}

/// Takes every message in `queue` (basic.get until empty, acking each), in order.
pub async fn get_all(url: &str, queue: &str) -> Vec<BasicGetMessage> {
    let q = queue.to_owned();
    with_channel(url, &format!("get_all {queue}"), |ch| async move {
        let mut messages = Vec::new();
        while let Some(msg) = ch
            .basic_get(q.clone().into(), BasicGetOptions::default())
            .await?
        {
            msg.delivery.acker.ack(BasicAckOptions::default()).await?;
            messages.push(msg);
        }
        Ok(messages)
    })
    .await
}

/// A message as a test looks at it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub body: Vec<u8>,
    pub delivery_mode: Option<u8>,
    pub content_type: Option<String>,
    /// Header values rendered as text (`"7"`, `"true"`, `"s"`).
    pub headers: BTreeMap<String, String>,
    pub timestamp: Option<u64>,
    pub priority: Option<u8>,
    /// The AMQP `expiration` property (milliseconds, as text).
    pub expiration: Option<String>,
}

/// Takes every message from `queue` (acking each), in queue order.
pub async fn received(url: &str, queue: &str) -> Vec<Received> {
    get_all(url, queue)
        .await
        .into_iter()
        .map(|m| {
            let p = &m.delivery.properties;
            let headers = p
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .map(|(k, v)| {
                            let text = match v {
                                AMQPValue::LongString(s) => s.to_string(),
                                AMQPValue::Boolean(b) => b.to_string(),
                                AMQPValue::LongLongInt(i) => i.to_string(),
                                AMQPValue::LongInt(i) => i.to_string(),
                                AMQPValue::Double(d) => d.to_string(),
                                other => format!("{other:?}"),
                            };
                            (k.as_str().to_string(), text)
                        })
                        .collect()
                })
                .unwrap_or_default();
            Received {
                message_id: p
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                body: m.delivery.data.clone(),
                delivery_mode: *p.delivery_mode(),
                content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
                headers,
                timestamp: *p.timestamp(),
                priority: *p.priority(),
                expiration: p.expiration().as_ref().map(|s| s.as_str().to_string()),
            }
        })
        .collect()
}

/// Asserts that every id in `ids` arrived (duplicates allowed).
pub fn assert_all_received(received: &[Received], ids: &[String]) {
    let got: HashSet<&str> = received.iter().map(|m| m.message_id.as_str()).collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !got.contains(id.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} of {} messages never arrived, e.g. {:?}",
        missing.len(),
        ids.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------
// Deleting
// ---------------------------------------------------------------------------

/// Deletes `queue` (no error if it does not exist).
pub async fn delete_queue(url: &str, queue: &str) {
    let q = queue.to_owned();
    with_channel(url, &format!("delete queue {queue}"), |ch| async move {
        ch.queue_delete(q.into(), QueueDeleteOptions::default())
            .await
            .map(drop)
    })
    .await
}

/// Deletes `exchange` (no error if it does not exist).
pub async fn delete_exchange(url: &str, exchange: &str) {
    let x = exchange.to_owned();
    with_channel(
        url,
        &format!("delete exchange {exchange}"),
        |ch| async move {
            ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await
        },
    )
    .await
}

/// Deletes a test's exchange and queue.
pub async fn delete(url: &str, exchange: &str, queue: &str) {
    delete_queue(url, queue).await;
    delete_exchange(url, exchange).await;
}

/// Declares a durable direct exchange with `internal: true`: clients may
/// bind to it but not publish to it (the broker answers a publish with
/// `403 ACCESS_REFUSED`, closing the channel).
pub async fn declare_internal_exchange(url: &str, exchange: &str) {
    let x = exchange.to_owned();
    let what = format!("declare internal exchange {exchange}");
    with_channel(url, &what, |ch| async move {
        ch.exchange_declare(
            x.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                internal: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    })
    .await
}
