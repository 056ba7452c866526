//! What the benchmarks share: the broker they measure against and its
//! queue housekeeping.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

/// The broker every benchmark uses (scripts/test-setup starts it).
pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Message size of every benchmark.
pub const BODY: usize = 512;

pub async fn connect() -> Connection {
    Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (run scripts/test-setup)")
}

/// Declares `queue` durable (classic).
pub async fn declare_queue(queue: &str) {
    let conn = connect().await;
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue_declare");
    let _ = conn.close(200, "".into()).await;
}

pub async fn delete_queue(queue: &str) {
    let conn = connect().await;
    let channel = conn.create_channel().await.expect("channel");
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "".into()).await;
}

/// Declares `queue` and publishes `messages` persistent, mandatory
/// `BODY`-byte messages to it (ids `{prefix}-{i}`) with up to `window`
/// confirms outstanding; every one must be an ack without a return.
/// Returns the time from the first publish to the last confirm.
pub async fn publish_confirmed(
    queue: &str,
    prefix: &str,
    messages: usize,
    window: usize,
) -> Duration {
    declare_queue(queue).await;
    let conn = connect().await;
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    let body = vec![b'x'; BODY];
    let mut confirms = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..messages {
        if confirms.len() >= window {
            let confirm: lapin::Result<Confirmation> = confirms.next().await.expect("confirm");
            assert!(
                matches!(confirm, Ok(Confirmation::Ack(None))),
                "{confirm:?}"
            );
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{prefix}-{i}").into());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                properties,
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    while let Some(confirm) = confirms.next().await {
        assert!(
            matches!(confirm, Ok(Confirmation::Ack(None))),
            "{confirm:?}"
        );
    }
    let elapsed = start.elapsed();
    let _ = conn.close(200, "".into()).await;
    elapsed
}
