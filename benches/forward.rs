//! Forwarding benchmark: the agent draining a backlog against plain lapin.
//!
//! In one run, against the same broker (127.0.0.1:5672), with the same
//! message size (512 bytes, persistent, durable classic queue):
//! 1. baseline: a plain lapin publisher with pipelined confirms (window 256),
//!    no database;
//! 2. the agent: a database pre-filled with the backlog, the release binary
//!    started on it, timed until every row is delivered (confirmed).
//!
//! Prints both rates and the ratio (target: agent ≥ 70% of plain).
//! Run with `scripts/bench-forward` (or `cargo bench --bench forward`);
//! `BENCH_MESSAGES` sets the message count (default 100000).

use std::time::{Duration, Instant};

use edge_outbox::store::now_ms;
use edge_outbox_testkit::amqp::{declare_queue, delete_queue};
use edge_outbox_testkit::bench::{publish_confirmed, BODY};
use edge_outbox_testkit::prefill::{prefill_database, PrefillRow};
use edge_outbox_testkit::{toml_str, Agent, Status};

/// The binary measured.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");
const WINDOW: usize = 256;

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let (runtime, url, suffix) = edge_outbox_testkit::bench::setup();
    let plain_queue = format!("bench-plain-{suffix}");
    let agent_queue = format!("bench-agent-{suffix}");

    let plain_rate = runtime.block_on(plain_publisher(&url, &plain_queue, messages));
    runtime.block_on(delete_queue(&url, &plain_queue));
    println!("plain lapin publisher: {messages} messages, {plain_rate:.0} msg/s");

    runtime.block_on(declare_queue(&url, &agent_queue));
    let agent_rate = agent_drain(&url, &agent_queue, messages);
    runtime.block_on(delete_queue(&url, &agent_queue));
    println!("edge-outbox draining a backlog: {messages} messages, {agent_rate:.0} msg/s");
    println!(
        "ratio agent/plain: {:.2} (target >= 0.70)",
        agent_rate / plain_rate
    );
}

async fn plain_publisher(url: &str, queue: &str, messages: usize) -> f64 {
    let elapsed = publish_confirmed(url, queue, "plain", messages, WINDOW).await;
    messages as f64 / elapsed.as_secs_f64()
}

/// Prefills a database with `messages` delivering rows routed to `queue`
/// (the way the agent would have stored them), starts the agent on it and
/// times it until every row is delivered; returns messages/s.
fn agent_drain(url: &str, queue: &str, messages: usize) -> f64 {
    let mut agent = Agent::builder(BIN)
        .set("broker", "urls", format!("[{}]", toml_str(url)))
        .prepare();
    let now = now_ms();
    prefill_database(&agent.db, messages as i64, BODY, |i| PrefillRow {
        id: format!("agent-{i}"),
        status: Status::Delivering,
        routing_key: queue.to_owned(),
        create_time: now,
        next_try_time: Some(now),
    });
    let start = Instant::now();
    agent.restart();
    let reader = rusqlite::Connection::open_with_flags(
        &agent.db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open db");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let delivered: i64 = reader
            .query_row(
                "SELECT COUNT(*) FROM msg_log WHERE status = ?1",
                [Status::Delivered],
                |r| r.get(0),
            )
            .unwrap_or(0);
        if delivered as usize >= messages {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not drain in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    agent.terminate();
    agent.wait_exit(Duration::from_secs(60));
    rate
}
