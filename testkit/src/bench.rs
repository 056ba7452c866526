//! What the benchmarks share: the message size they all use, the
//! plain-lapin publisher that is both the forwarding baseline and the
//! consumer benchmark's pre-fill, and the one-at-a-time publisher that is
//! the latency benchmark's baseline.
//!
//! The broker is the shared one ([`crate::broker::default_url`]).

use std::time::{Duration, Instant};

use crate::amqp::{confirm_channel, connect, declare_queue, publish_pipelined, Target};

/// Message size of every benchmark, in bytes.
pub const BODY: usize = 512;

/// What every benchmark starts with: a runtime, the shared broker's URL, and
/// a suffix that makes its queue names unique.
pub fn setup() -> (tokio::runtime::Runtime, String, String) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    (runtime, crate::broker::default_url(), suffix)
}

/// Declares `queue` (durable classic) and publishes `messages` persistent,
/// mandatory [`BODY`]-byte messages to it through the default exchange (ids
/// `{prefix}-{i}`) with up to `window` confirms outstanding; every one must
/// be an ack without a return. Returns the time from the first publish to
/// the last confirm (connecting and declaring are not timed).
pub async fn publish_confirmed(
    url: &str,
    queue: &str,
    prefix: &str,
    messages: usize,
    window: usize,
) -> Duration {
    declare_queue(url, queue).await;
    let conn = connect(url).await;
    let ch = confirm_channel(&conn, "publish_confirmed").await;
    let target = Target::queue("publish_confirmed", queue);
    let body = vec![b'x'; BODY];
    let start = Instant::now();
    publish_pipelined(&ch, &target, window, messages, |i| {
        (Some(format!("{prefix}-{i}")), body.as_slice())
    })
    .await;
    let elapsed = start.elapsed();
    let _ = conn.close(200, "".into()).await;
    elapsed
}

/// Declares `queue` (durable classic) and publishes `messages` persistent,
/// mandatory [`BODY`]-byte messages to it through the default exchange, one
/// at a time: each waits for its confirm before the next is published.
/// Returns each round trip, from the publish to the confirm (connecting and
/// declaring are not timed).
pub async fn publish_round_trips(url: &str, queue: &str, messages: usize) -> Vec<Duration> {
    declare_queue(url, queue).await;
    let conn = connect(url).await;
    let ch = confirm_channel(&conn, "publish_round_trips").await;
    let target = Target::queue("publish_round_trips", queue);
    let body = vec![b'x'; BODY];
    let mut times = Vec::with_capacity(messages);
    for i in 0..messages {
        let start = Instant::now();
        publish_pipelined(&ch, &target, 1, 1, |_| {
            (Some(format!("round-trip-{i}")), body.as_slice())
        })
        .await;
        times.push(start.elapsed());
    }
    let _ = conn.close(200, "".into()).await;
    times
}
