//! What the benchmarks share: the broker they measure against and its
//! queue housekeeping.

#![allow(dead_code)]

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

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
