//! The rate cap (docs/forwarding.md, The rate cap): a backlog drains at
//! `publish.max_rate` / `publish.max_bytes_rate` within 5%, a message
//! larger than the byte burst still goes out, and status and metrics say
//! the agent is throttled while the cap holds it back.
//!
//! The rate is measured from the delivered timestamps (`update_time` of
//! each row's delivered outcome), after the first tenth of the backlog, so
//! the bucket's initial burst (a tenth of a second of the cap) is not
//! counted; every drain lasts 10-15 s, so a 5% error is 0.5 s or more.
//! Every test uses its own queue on the shared broker.
//!
//! Tests: a prefilled backlog under `max_rate` (with status and metrics
//! mid-drain and after), one under `max_bytes_rate` with a message twelve
//! times the burst, and a backlog built during an outage drained while live
//! submits keep coming.

use std::time::Duration;

use edge_outbox_testkit::amqp;
use edge_outbox_testkit::broker;
use edge_outbox_testkit::metrics::{free_port, listen_on, sample, scrape};
use edge_outbox_testkit::prefill::{prefill_database, PrefillRow};
use edge_outbox_testkit::{rt, submit_many, wait_until, Agent, FaultProxy, Mode, Status};
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// How long a drain may take at most (the caps below make them 10-15 s).
const DRAIN: Duration = Duration::from_secs(120);

/// The accepted error of a measured rate.
const TOLERANCE: f64 = 0.05;

/// `(update_time, body bytes)` of every delivered row, by delivery time.
fn deliveries(agent: &Agent) -> Vec<(i64, i64)> {
    let conn = agent.db();
    let mut stmt = conn
        .prepare(
            "SELECT update_time, length(CAST(msg AS BLOB)) FROM msg_log \
             WHERE status = ?1 ORDER BY update_time",
        )
        .expect("prepare");
    stmt.query_map([Status::Delivered], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// Messages and bytes per second delivered after the first tenth of
/// `rows` (the burst and the start-up are left out).
fn measured_rates(rows: &[(i64, i64)]) -> (f64, f64) {
    let from = rows.len() / 10;
    let start = rows[from].0;
    let end = rows[rows.len() - 1].0;
    let seconds = (end - start) as f64 / 1000.0;
    let later = &rows[from + 1..];
    let bytes: i64 = later.iter().map(|r| r.1).sum();
    (later.len() as f64 / seconds, bytes as f64 / seconds)
}

fn assert_within(what: &str, measured: f64, cap: f64) {
    let error = (measured - cap) / cap;
    eprintln!(
        "{what}: measured {measured:.1}/s, cap {cap}/s, accuracy {:.4}",
        measured / cap
    );
    assert!(
        error.abs() <= TOLERANCE,
        "{what}: measured {measured:.1}/s against a cap of {cap}/s ({:+.1}%)",
        error * 100.0
    );
}

/// The `broker` part of the status the running agent answers.
fn broker_status(agent: &Agent) -> Value {
    let answer = agent.client().request(&json!({"op": "status"}));
    assert_eq!(answer["ok"], true, "{answer}");
    answer["broker"].clone()
}

/// A prefilled backlog of `rows` `body`-byte messages to `queue`, and an
/// agent configured by `configure` started on it.
fn agent_on_backlog(
    queue: &str,
    rows: i64,
    body: usize,
    configure: impl FnOnce(edge_outbox_testkit::AgentBuilder) -> edge_outbox_testkit::AgentBuilder,
) -> Agent {
    let url = broker::default_url();
    let agent = configure(Agent::builder(BIN).forwarding_to(&url)).prepare();
    let now = edge_outbox::store::now_ms();
    prefill_database(&agent.db, rows, body, |i| PrefillRow {
        id: format!("r-{i}"),
        status: Status::Delivering,
        routing_key: queue.to_owned(),
        create_time: now,
        next_try_time: None,
    });
    agent
}

#[test]
fn a_backlog_drains_at_max_rate_and_status_and_metrics_say_throttled() {
    const CAP: f64 = 1000.0;
    const ROWS: i64 = 15_000;
    let rt = rt();
    let url = broker::default_url();
    let queue = amqp::unique("rate");
    rt.block_on(amqp::declare_queue(&url, &queue));
    let port = free_port();
    let mut agent = agent_on_backlog(&queue, ROWS, 512, |b| {
        b.set("publish", "max_rate", "1000")
            .set("metrics", "listen", listen_on(port))
    });
    agent.restart();

    // Mid-drain, the agent says it is held back, and by what.
    wait_until("a fifth of the backlog delivered", DRAIN, || {
        agent.count_status(Status::Delivered) > ROWS / 5
    });
    let status = broker_status(&agent);
    assert_eq!(status["throttled"], true, "{status}");
    assert_eq!(status["max_rate"], 1000, "{status}");
    assert_eq!(status["max_bytes_rate"], Value::Null, "{status}");
    assert!(status["throttled_ms"].as_u64().unwrap_or(0) > 0, "{status}");
    let shown = agent.cli(&["status"]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    assert!(
        shown
            .stdout
            .lines()
            .any(|l| l.starts_with("rate cap:  1000 messages/s, throttled now;")),
        "{}",
        shown.stdout
    );
    let text = scrape(port);
    assert_eq!(sample(&text, "edge_outbox_throttled"), 1.0, "{text}");
    assert_eq!(sample(&text, "edge_outbox_publish_max_rate"), 1000.0);
    assert_eq!(sample(&text, "edge_outbox_publish_max_bytes_rate"), 0.0);
    assert!(sample(&text, "edge_outbox_throttled_seconds_total") > 0.0);

    agent.wait_all_delivered(ROWS, DRAIN);
    let (rate, _) = measured_rates(&deliveries(&agent));
    assert_within("max_rate", rate, CAP);
    // The queue holds every message, once.
    assert_eq!(rt.block_on(amqp::queue_len(&url, &queue)), ROWS as u32);

    // Drained: nothing is held back any more.
    wait_until("throttled turns false", Duration::from_secs(10), || {
        broker_status(&agent)["throttled"] == false
    });
    let waited = broker_status(&agent)["throttled_ms"].as_u64().unwrap_or(0);
    // At 1000/s a 512-byte message takes far less than its 1 ms at the
    // cap: most of the drain is spent waiting for the cap.
    assert!(waited > 5_000, "waited {waited} ms");
    wait_until("the gauge turns 0", Duration::from_secs(10), || {
        sample(&scrape(port), "edge_outbox_throttled") == 0.0
    });
    rt.block_on(amqp::delete_queue(&url, &queue));
}

#[test]
fn a_backlog_drains_at_max_bytes_rate_and_a_message_larger_than_the_burst_goes_out() {
    // 256 KiB/s of 512-byte bodies is 512 messages/s: 6,000 rows take
    // about 12 s. The first row is made 300 KiB, twelve times the burst
    // (a tenth of a second of the cap, 25.6 KiB).
    const CAP: f64 = 256.0 * 1024.0;
    const ROWS: i64 = 6_000;
    const LARGE: usize = 300 * 1024;
    let rt = rt();
    let url = broker::default_url();
    let queue = amqp::unique("byterate");
    rt.block_on(amqp::declare_queue(&url, &queue));
    let mut agent = agent_on_backlog(&queue, ROWS, 512, |b| {
        b.set("publish", "max_bytes_rate", "\"256KiB\"").set(
            "submit",
            "max_message_size",
            "\"1MiB\"",
        )
    });
    agent
        .db()
        .execute(
            "UPDATE msg_log SET msg = ?1 WHERE id = 'r-0'",
            ["y".repeat(LARGE)],
        )
        .expect("the large row");
    agent.restart();

    let large = agent.wait_status("r-0", Status::Delivered, DRAIN);
    assert_eq!(large.try_count, 0);
    let status = broker_status(&agent);
    assert_eq!(status["max_bytes_rate"], 256 * 1024, "{status}");
    assert_eq!(status["max_rate"], Value::Null, "{status}");

    agent.wait_all_delivered(ROWS, DRAIN);
    let rows = deliveries(&agent);
    let (_, bytes_rate) = measured_rates(&rows);
    assert_within("max_bytes_rate", bytes_rate, CAP);
    // Nothing went out before the large message's debt was paid: the
    // whole backlog took at least its bytes at the cap, minus the burst.
    let total: i64 = rows.iter().map(|r| r.1).sum();
    let span = (rows[rows.len() - 1].0 - rows[0].0) as f64 / 1000.0;
    let floor = (total as f64 - CAP * 0.1 - LARGE as f64) / CAP;
    assert!(
        span >= floor * (1.0 - TOLERANCE),
        "{span} s for {total} bytes"
    );

    // The large message arrived whole.
    let messages = rt.block_on(amqp::get_all(&url, &queue));
    assert_eq!(messages.len(), ROWS as usize);
    let first = messages
        .iter()
        .find(|m| m.properties.message_id().as_ref().map(|s| s.as_str()) == Some("r-0"))
        .expect("the large message in the queue");
    assert_eq!(first.data, "y".repeat(LARGE).into_bytes());
    rt.block_on(amqp::delete_queue(&url, &queue));
}

#[test]
fn an_outage_backlog_and_live_submits_together_drain_at_max_rate() {
    // 3,000 messages submitted while the broker is away, then 3,000 more
    // in ten bursts over 5 s once it is back (600/s, above the cap): 6,000
    // at 500/s take about 12 s.
    const CAP: f64 = 500.0;
    const OFFLINE: usize = 3_000;
    const LIVE_BURSTS: usize = 10;
    const LIVE_BURST: usize = 300;
    let total = (OFFLINE + LIVE_BURSTS * LIVE_BURST) as i64;
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .set("publish", "max_rate", "500")
        .start();
    submit_many(&agent, &exchange, "k", "offline", OFFLINE);
    assert_eq!(agent.count_status(Status::Delivering), OFFLINE as i64);
    assert_eq!(broker_status(&agent)["throttled"], false);

    proxy.set_mode(Mode::Pass);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for burst in 0..LIVE_BURSTS {
                submit_many(&agent, &exchange, "k", &format!("live{burst}"), LIVE_BURST);
                // The pace of the load, not a wait for a condition.
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        wait_until("throttled during the catch-up", DRAIN, || {
            broker_status(&agent)["throttled"] == true
        });
    });
    agent.wait_all_delivered(total, DRAIN);
    assert_eq!(agent.db_count("SELECT SUM(try_count) FROM msg_log"), 0);
    let (rate, _) = measured_rates(&deliveries(&agent));
    assert_within("max_rate, outage and live", rate, CAP);
    assert_eq!(rt.block_on(amqp::queue_len(&url, &queue)), total as u32);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}
