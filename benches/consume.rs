//! Consumer benchmark: the agent's idempotent consumer against plain lapin.
//!
//! In one run, against the same broker (127.0.0.1:5672), with the same
//! messages (512 bytes, persistent, unique `message_id`s, in a durable
//! classic queue pre-filled by a pipelined-confirm publisher):
//! 1. baseline: a plain lapin consumer, manual acks, prefetch 100, no
//!    database — timed from connecting until every message is acked;
//! 2. the agent: the release binary with `[consumer] handler = "record"`,
//!    prefetch 100, on the pre-filled queue — timed from its start until
//!    every message is a status-3 row (each committed before its ack).
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

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect, delete_queue, publish_confirmed, BODY, URL};
use futures_util::stream::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let suffix = uuid::Uuid::now_v7().simple().to_string();
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
        runtime.block_on(prefill(queue, prefix, messages));
        println!(
            "pre-filled {queue}: {messages} messages in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    let plain = |queue: &str, run: u32| {
        let rate = runtime.block_on(plain_consumer(queue, messages, prefetch));
        runtime.block_on(delete_queue(queue));
        println!(
            "plain lapin consumer (manual acks, prefetch {prefetch}), run {run}: \
             {messages} messages, {rate:.0} msg/s"
        );
        rate
    };
    let first = plain(&plain_queues[0], 1);

    let agent_rate = agent_consumer(&agent_queue, messages, prefetch, &synchronous);
    runtime.block_on(delete_queue(&agent_queue));
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
async fn prefill(queue: &str, prefix: &str, messages: usize) {
    publish_confirmed(queue, prefix, messages, WINDOW).await;
}

/// Consumes `messages` from `queue` with manual acks; returns messages/s,
/// from connecting to the last ack.
async fn plain_consumer(queue: &str, messages: usize, prefetch: u16) -> f64 {
    let start = Instant::now();
    let conn = connect().await;
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
/// messages/s from its start until `messages` rows are status 3.
fn agent_consumer(queue: &str, messages: usize, prefetch: u16, synchronous: &str) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("bench.db");
    let log = dir.path().join("agent.log");
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = {:?}\nsynchronous = {synchronous:?}\n\
             [submit]\nsocket = {:?}\n\
             [broker]\nurls = [{URL:?}]\n\
             [consumer]\nqueue = {queue:?}\nprefetch = {prefetch}\nhandler = \"record\"\n",
            db.display().to_string(),
            dir.path().join("s.sock").display().to_string(),
        ),
    )
    .expect("config");
    let log_file = std::fs::File::create(&log).expect("log file");
    let start = Instant::now();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .args(["run", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start the agent");
    let deadline = start + Duration::from_secs(900);
    let mut reader = None;
    loop {
        if reader.is_none() && db.exists() {
            reader = open_reader(&db);
        }
        let consumed: i64 = reader
            .as_ref()
            .and_then(|r: &rusqlite::Connection| {
                r.query_row("SELECT COUNT(*) FROM msg_log WHERE status = 3", [], |r| {
                    r.get(0)
                })
                .ok()
            })
            .unwrap_or(0);
        if consumed as usize >= messages {
            break;
        }
        if Instant::now() > deadline || matches!(agent.try_wait(), Ok(Some(_))) {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!(
                "the agent consumed {consumed} of {messages} in {:?}; its log:\n{}",
                start.elapsed(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    if let Some(cpu) = cpu_seconds(agent.id()) {
        println!(
            "edge-outbox CPU: {cpu:.2} s user+system ({:.0} µs per message)",
            cpu * 1e6 / messages as f64
        );
    }
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
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
