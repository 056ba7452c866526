//! Rate cap benchmark: how closely a drain holds `publish.max_rate`.
//!
//! In one run, against the same broker (127.0.0.1:5672), with the same
//! message size (512 bytes, persistent, durable classic queue):
//! 1. baseline: the agent draining a pre-filled backlog with no cap;
//! 2. capped: the same backlog drained with `publish.max_rate` set to
//!    `BENCH_RATE` (default: half the baseline's rate, rounded down to a
//!    hundred, so that the cap and not the broker sets the pace).
//!
//! The rates come from the delivered timestamps (`update_time` of each
//! row's delivered outcome): over the whole drain (first to last delivery)
//! and in the steady state (after the first tenth, which leaves out the
//! bucket's burst). Prints both, and the cap's accuracy (measured / cap;
//! target within 0.95-1.05).
//! Run with `scripts/bench-rate` (or `cargo bench --bench rate`);
//! `BENCH_MESSAGES` sets the message count (default 100000).

use std::time::Duration;

use edge_outbox::store::now_ms;
use edge_outbox_testkit::amqp::{declare_queue, delete_queue, queue_len};
use edge_outbox_testkit::bench::BODY;
use edge_outbox_testkit::prefill::{prefill_database, PrefillRow};
use edge_outbox_testkit::{toml_str, Agent, Status};

/// The binary measured.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    let messages = env_number("BENCH_MESSAGES").unwrap_or(100_000) as usize;
    let (runtime, url, suffix) = edge_outbox_testkit::bench::setup();

    let queue = format!("bench-uncapped-{suffix}");
    runtime.block_on(declare_queue(&url, &queue));
    let baseline = agent_drain(&url, &queue, messages, None);
    assert_eq!(runtime.block_on(queue_len(&url, &queue)) as usize, messages);
    runtime.block_on(delete_queue(&url, &queue));
    println!(
        "uncapped: {messages} messages in {:.1} s, {:.0} msg/s (steady {:.0} msg/s)",
        baseline.seconds, baseline.overall, baseline.steady
    );

    let cap =
        env_number("BENCH_RATE").unwrap_or(((baseline.steady / 2.0) as u64 / 100 * 100).max(100));
    let queue = format!("bench-capped-{suffix}");
    runtime.block_on(declare_queue(&url, &queue));
    let capped = agent_drain(&url, &queue, messages, Some(cap));
    assert_eq!(runtime.block_on(queue_len(&url, &queue)) as usize, messages);
    runtime.block_on(delete_queue(&url, &queue));
    println!(
        "max_rate = {cap}: {messages} messages in {:.1} s, {:.1} msg/s (steady {:.1} msg/s)",
        capped.seconds, capped.overall, capped.steady
    );
    println!(
        "accuracy measured/cap: whole drain {:.4}, steady {:.4} (target 0.95-1.05)",
        capped.overall / cap as f64,
        capped.steady / cap as f64
    );
    println!(
        "the cap is {:.0}% of the uncapped rate",
        100.0 * cap as f64 / baseline.steady
    );
}

/// A drain's rates, from the delivered timestamps.
struct Drain {
    /// First to last delivery.
    seconds: f64,
    overall: f64,
    /// After the first tenth of the rows.
    steady: f64,
}

/// Prefills a database with `messages` delivering rows routed to `queue`,
/// starts the agent on it (with `publish.max_rate = cap` when given) and
/// waits until every row is delivered.
fn agent_drain(url: &str, queue: &str, messages: usize, cap: Option<u64>) -> Drain {
    let mut builder = Agent::builder(BIN).set("broker", "urls", format!("[{}]", toml_str(url)));
    if let Some(cap) = cap {
        builder = builder.set("publish", "max_rate", cap.to_string());
    }
    let mut agent = builder.prepare();
    let now = now_ms();
    prefill_database(&agent.db, messages as i64, BODY, |i| PrefillRow {
        id: format!("rate-{i}"),
        status: Status::Delivering,
        routing_key: queue.to_owned(),
        create_time: now,
        next_try_time: Some(now),
    });
    agent.restart();
    agent.wait_all_delivered(messages as i64, Duration::from_secs(1200));
    let reader = agent.db();
    let times: Vec<i64> = reader
        .prepare("SELECT update_time FROM msg_log WHERE status = ?1 ORDER BY update_time")
        .and_then(|mut s| {
            s.query_map([Status::Delivered], |r| r.get(0))?
                .collect::<Result<_, _>>()
        })
        .expect("delivery times");
    agent.terminate();
    agent.wait_exit(Duration::from_secs(60));
    let rate = |from: usize| {
        let span = (times[times.len() - 1] - times[from]) as f64 / 1000.0;
        (times.len() - 1 - from) as f64 / span
    };
    Drain {
        seconds: (times[times.len() - 1] - times[0]) as f64 / 1000.0,
        overall: rate(0),
        steady: rate(times.len() / 10),
    }
}
