//! Consumer benchmark: the agent's idempotent consumer against plain lapin.
//!
//! In one run, against the same broker (127.0.0.1:5672), with the same
//! messages (512 bytes, persistent, unique `message_id`s, in a durable
//! classic queue pre-filled by a pipelined-confirm publisher):
//! 1. baseline: a plain lapin consumer, manual acks, prefetch 100, no
//!    database — timed from connecting until every message is acked;
//! 2. the agent: the release binary with `[consumer] handler = "record"`,
//!    prefetch 100, on the pre-filled queue — timed from its start until
//!    every message is a consumed row (each committed before its ack).
//!
//! The plain consumer runs twice, before and after the agent, on queues of
//! its own (the broker's state drifts on a shared machine); the ratio uses
//! the faster of its two runs.
//!
//! Prints the rates and the ratio (target: agent ≥ 50% of plain).
//! Run with `scripts/bench-consume` (or `cargo bench --bench consume`).
//! `BENCH_MESSAGES` sets the count (default 50000), `BENCH_PREFETCH` the
//! prefetch of both (default 100), `BENCH_SYNCHRONOUS` the agent's
//! `store.synchronous` (default "full", the agent's default).

use std::path::Path;
use std::time::{Duration, Instant};

use edge_outbox_testkit::amqp::{connect, delete_queue};
use edge_outbox_testkit::bench::{publish_confirmed, BODY};
use edge_outbox_testkit::{toml_str, Agent, Status};
use futures_util::stream::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

/// The binary measured.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// Outstanding confirms of the pre-fill publisher.
const WINDOW: usize = 1024;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let messages: usize = env_or("BENCH_MESSAGES", 50_000);
    let prefetch: u16 = env_or("BENCH_PREFETCH", 100);
    let synchronous: String = env_or("BENCH_SYNCHRONOUS", "full".to_string());
    let (runtime, url, suffix) = edge_outbox_testkit::bench::setup();
    let plain_queues = [
        format!("bench-consume-plain1-{suffix}"),
        format!("bench-consume-plain2-{suffix}"),
    ];
    let agent_queue = format!("bench-consume-agent-{suffix}");

    for (queue, prefix) in [
        (&plain_queues[0], "plain1"),
        (&agent_queue, "agent"),
        (&plain_queues[1], "plain2"),
    ] {
        let t = Instant::now();
        runtime.block_on(prefill(&url, queue, prefix, messages));
        println!(
            "pre-filled {queue}: {messages} messages in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    let plain = |queue: &str, run: u32| {
        let rate = runtime.block_on(plain_consumer(&url, queue, messages, prefetch));
        runtime.block_on(delete_queue(&url, queue));
        println!(
            "plain lapin consumer (manual acks, prefetch {prefetch}), run {run}: \
             {messages} messages, {rate:.0} msg/s"
        );
        rate
    };
    let first = plain(&plain_queues[0], 1);

    let agent_rate = agent_consumer(&url, &agent_queue, messages, prefetch, &synchronous);
    runtime.block_on(delete_queue(&url, &agent_queue));
    println!(
        "edge-outbox consumer (record handler, prefetch {prefetch}, synchronous={synchronous}): \
         {messages} messages, {agent_rate:.0} msg/s"
    );

    let second = plain(&plain_queues[1], 2);
    let plain_rate = first.max(second);
    println!(
        "ratio agent/plain: {:.2} (target >= 0.50)",
        agent_rate / plain_rate
    );
}

/// Declares `queue` (durable classic) and fills it with `messages` persistent
/// 512-byte messages with ids `{prefix}-{i}`, pipelining confirms.
async fn prefill(url: &str, queue: &str, prefix: &str, messages: usize) {
    publish_confirmed(url, queue, prefix, messages, WINDOW).await;
}

/// Consumes `messages` from `queue` with manual acks; returns messages/s,
/// from connecting to the last ack.
async fn plain_consumer(url: &str, queue: &str, messages: usize, prefetch: u16) -> f64 {
    let start = Instant::now();
    let conn = connect(url).await;
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("basic_qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-plain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("basic_consume");
    let mut seen = 0;
    while seen < messages {
        let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .expect("a delivery within 60 s")
            .expect("the consumer stream ended")
            .expect("delivery");
        assert_eq!(delivery.data.len(), BODY);
        assert!(delivery.properties.message_id().is_some());
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        seen += 1;
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    let _ = conn.close(200, "".into()).await;
    rate
}

/// Starts the agent consuming `queue` with the `record` handler; returns
/// messages/s from its start until `messages` rows are consumed.
fn agent_consumer(
    url: &str,
    queue: &str,
    messages: usize,
    prefetch: u16,
    synchronous: &str,
) -> f64 {
    let mut agent = Agent::builder(BIN)
        .set_str("store", "synchronous", synchronous)
        .set("broker", "urls", format!("[{}]", toml_str(url)))
        .set_str("consumer", "queue", queue)
        .set("consumer", "prefetch", prefetch.to_string())
        .set_str("consumer", "handler", "record")
        .prepare();
    let start = Instant::now();
    agent.restart();
    let deadline = start + Duration::from_secs(900);
    let mut reader = None;
    loop {
        if reader.is_none() && agent.db.exists() {
            reader = open_reader(&agent.db);
        }
        let consumed: i64 = reader
            .as_ref()
            .and_then(|r: &rusqlite::Connection| {
                r.query_row(
                    "SELECT COUNT(*) FROM msg_log WHERE status = ?1",
                    [Status::Consumed],
                    |r| r.get(0),
                )
                .ok()
            })
            .unwrap_or(0);
        if consumed as usize >= messages {
            break;
        }
        if Instant::now() > deadline || !agent.is_running() {
            panic!(
                "the agent consumed {consumed} of {messages} in {:?}; its log:\n{}",
                start.elapsed(),
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    if let Some(cpu) = cpu_seconds(agent.pid()) {
        println!(
            "edge-outbox CPU: {cpu:.2} s user+system ({:.0} µs per message)",
            cpu * 1e6 / messages as f64
        );
    }
    agent.terminate();
    agent.wait_exit(Duration::from_secs(60));
    rate
}

fn open_reader(db: &Path) -> Option<rusqlite::Connection> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    Some(conn)
}

/// User + system CPU seconds of process `pid` so far (Linux `/proc`, 100 Hz ticks).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
