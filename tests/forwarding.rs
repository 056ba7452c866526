//! Forwarding to a real RabbitMQ (docs/forwarding.md): confirms, returns,
//! 404s, outages, connection cuts, silent stalls and partitions that must
//! charge nothing, a blocked broker, and a million-row backlog.
//!
//! Every test uses its own exchange and queue names, so they run in
//! parallel against the shared broker; the test that blocks the broker uses
//! the restartable node under its cross-process lock. Kill -9 and broker
//! restarts are in `tests/durability.rs`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_outbox_testkit::amqp;
use edge_outbox_testkit::broker;
use edge_outbox_testkit::db::get_status;
use edge_outbox_testkit::metrics::{free_port, listen_on, samples, scrape};
use edge_outbox_testkit::node;
use edge_outbox_testkit::prefill::{prefill_database, PrefillRow};
use edge_outbox_testkit::{
    ok_id, rt, submit_many, wait_until, Agent, AgentBuilder, FaultProxy, Mode, Status,
};
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// How long a test waits for the agent to forward everything.
const DRAIN: Duration = Duration::from_secs(120);

/// `(status, try_count, last_error)` of the row `id`; panics when there is none.
fn status_of(agent: &Agent, id: &str) -> (Status, i64, Option<String>) {
    agent
        .db()
        .query_row(
            "SELECT status, try_count, last_error FROM msg_log WHERE id = ?1",
            [id],
            |r| Ok((get_status(r, 0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap_or_else(|e| panic!("row {id}: {e}"))
}

// --------------------------------------------------------------- outcomes

#[test]
fn a_normal_message_is_confirmed_and_arrives_intact() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "user"));
    let agent = Agent::builder(BIN).forwarding_to(&url).start();
    let answer = agent.client().request(&json!({
        "exchange": exchange, "routing_key": "user",
        "payload": {"name": "yolo"},
        "headers": {"source": "test", "attempt": 7, "urgent": true},
    }));
    let id = ok_id(&answer);
    wait_until("status 1", DRAIN, || {
        status_of(&agent, &id).0 == Status::Delivered
    });
    let (_, try_count, last_error) = status_of(&agent, &id);
    assert_eq!(try_count, 0);
    assert_eq!(last_error, None);

    let received = rt.block_on(amqp::received(&url, &queue));
    assert_eq!(received.len(), 1);
    let m = &received[0];
    assert_eq!(m.message_id, id);
    assert_eq!(m.body, br#"{"name":"yolo"}"#);
    assert_eq!(m.delivery_mode, Some(2), "persistent");
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.headers.get("source").map(String::as_str), Some("test"));
    assert_eq!(m.headers.get("attempt").map(String::as_str), Some("7"));
    assert_eq!(m.headers.get("urgent").map(String::as_str), Some("true"));
    assert!(m.timestamp.unwrap_or(0) > 0, "timestamp set");

    let status = agent.cli(&["status", "--json"]).json();
    assert_eq!(status["broker"]["connected"], Value::Bool(true), "{status}");
    assert!(!status["broker"]["url"]
        .as_str()
        .unwrap_or_default()
        .contains("guest:guest"));
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

#[test]
fn a_missing_exchange_fails_after_max_attempts_and_costs_others_nothing() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let agent = Agent::builder(BIN)
        .forwarding_to(&url)
        .set("publish", "max_attempts", "3")
        .start();
    let missing = amqp::unique("no-such-exchange");
    let mut client = agent.client();
    let mut good = Vec::new();
    let mut bad = String::new();
    for i in 0..30 {
        if i == 15 {
            bad = ok_id(&client.submit(&missing, "k", json!("lost")));
        }
        good.push(ok_id(&client.submit(&exchange, "k", json!(i))));
    }
    wait_until("the bad message fails", DRAIN, || {
        status_of(&agent, &bad).0 == Status::Failed
    });
    let (_, tries, error) = status_of(&agent, &bad);
    assert_eq!(tries, 3);
    let error = error.unwrap_or_default();
    assert!(error.contains("404"), "{error}");
    wait_until("the good ones are delivered", DRAIN, || {
        good.iter()
            .all(|id| status_of(&agent, id).0 == Status::Delivered)
    });
    for id in &good {
        assert_eq!(status_of(&agent, id).1, 0, "{id} lost an attempt");
    }
    let received = rt.block_on(amqp::received(&url, &queue));
    amqp::assert_all_received(&received, &good);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

#[test]
fn an_unroutable_message_is_never_delivered_and_fails_with_no_route() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "bound"));
    let agent = Agent::builder(BIN)
        .forwarding_to(&url)
        .set("publish", "max_attempts", "2")
        .start();
    let id = ok_id(
        &agent
            .client()
            .submit(&exchange, "not-bound", json!("nowhere")),
    );
    let start = Instant::now();
    loop {
        let (status, _, _) = status_of(&agent, &id);
        assert_ne!(
            status,
            Status::Delivered,
            "an ack with a basic.return is not a delivery"
        );
        if status == Status::Failed {
            break;
        }
        assert!(start.elapsed() < DRAIN, "never failed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, tries, error) = status_of(&agent, &id);
    assert_eq!(tries, 2);
    assert!(error.unwrap_or_default().contains("312 NO_ROUTE"));
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

// ----------------------------------------------------- outages and faults

#[test]
fn offline_submits_cost_nothing_and_drain_in_order_when_the_broker_returns() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .start();
    let ids = submit_many(&agent, &exchange, "k", "offline", 300);
    // As long as the outage lasts, nothing is attempted and nothing counted.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(agent.count_status(Status::Delivering), 300);
        assert_eq!(agent.db_count("SELECT SUM(try_count) FROM msg_log"), 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = agent.cli(&["status", "--json"]).json();
    assert_eq!(
        status["broker"]["connected"],
        Value::Bool(false),
        "{status}"
    );
    proxy.set_mode(Mode::Pass);
    agent.wait_all_delivered(300, DRAIN);
    assert_eq!(agent.db_count("SELECT SUM(try_count) FROM msg_log"), 0);
    let received: Vec<String> = rt
        .block_on(amqp::received(&url, &queue))
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(received, ids, "delivered in submission order, once each");
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

/// Submits `n` messages in the background while `fault` runs, then checks
/// every acknowledged message was delivered and none failed.
fn survive(
    name: &str,
    n: usize,
    builder: impl FnOnce(&str) -> AgentBuilder,
    fault: impl FnOnce(&Agent, &FaultProxy),
) {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    let agent = builder(&proxy.url_for(&url)).start();
    let ids = std::thread::scope(|s| {
        let submitter = s.spawn(|| submit_many(&agent, &exchange, "k", name, n));
        fault(&agent, &proxy);
        submitter.join().expect("submitter")
    });
    agent.wait_all_delivered(n as i64, DRAIN);
    let received = rt.block_on(amqp::received(&url, &queue));
    amqp::assert_all_received(&received, &ids);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

#[test]
fn five_thousand_messages_survive_four_connection_cuts() {
    survive(
        "cuts",
        5_000,
        |url| Agent::builder(BIN).forwarding_to(url),
        |agent, proxy| {
            for cut in 1..=4 {
                // Cut mid-stream: after 1,000, 2,000, 3,000 and 4,000 deliveries.
                wait_until("progress before a cut", DRAIN, || {
                    agent.count_status(Status::Delivered) >= cut * 1_000
                });
                proxy.cut_all();
                eprintln!(
                    "cut {cut} at {} delivered",
                    agent.count_status(Status::Delivered)
                );
            }
        },
    );
}

#[test]
fn five_thousand_messages_survive_a_thirty_second_silent_stall() {
    survive(
        "stall",
        5_000,
        |url| {
            Agent::builder(BIN)
                .forwarding_to(url)
                .set_str("broker", "heartbeat", "5s")
        },
        |agent, proxy| {
            wait_until("progress before the stall", DRAIN, || {
                agent.count_status(Status::Delivered) > 0
            });
            proxy.set_mode(Mode::Stall);
            std::thread::sleep(Duration::from_secs(30));
            proxy.set_mode(Mode::Pass);
        },
    );
}

/// Sets its flag when dropped (see [`silent_partition_charges_nothing`]).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A silent partition of `stall` while messages are in flight and more are
/// submitted, with `publish.confirm_timeout` (5 s) shorter than the time
/// the heartbeat (`broker.heartbeat = heartbeat`; off with `?heartbeat=0`
/// in the URL when `url_heartbeat_off`) needs to notice the dead link: a
/// confirm timeout is charged only when the link proved alive after the
/// publish (docs/forwarding.md, Outcomes), so nothing is charged, nothing
/// fails, and everything is delivered once the partition heals.
fn silent_partition_charges_nothing(stall: Duration, heartbeat: &str, url_heartbeat_off: bool) {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    let port = free_port();
    let mut agent_url = proxy.url_for(&url);
    if url_heartbeat_off {
        agent_url.push_str("?heartbeat=0");
    }
    let mut agent = Agent::builder(BIN)
        .forwarding_to(&agent_url)
        .set_str("broker", "heartbeat", heartbeat)
        .set_str("publish", "confirm_timeout", "5s")
        // A charged attempt would fail the row at once: it shows.
        .set("publish", "max_attempts", "2")
        .set("metrics", "listen", listen_on(port))
        .prepare();
    let check = agent.cli(&["check-config"]);
    if check.code != 0 {
        eprintln!(
            "the configuration refuses broker.heartbeat = {heartbeat:?} (exit {}): {}",
            check.code, check.stderr
        );
        rt.block_on(amqp::delete(&url, &exchange, &queue));
        return;
    }
    agent.restart();
    let charged = |agent: &Agent| {
        agent.db_count("SELECT COALESCE(SUM(try_count), 0) FROM msg_log")
            + agent.count_status(Status::Failed)
    };
    let submitted = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut peak_in_flight = 0.0_f64;
    let ids = std::thread::scope(|s| {
        // Stops the submitter however this closure ends: the scope waits
        // for it, also when an assertion below panics.
        let stopper = StopOnDrop(&stop);
        let stream = s.spawn(|| {
            let mut client = agent.client();
            let mut ids = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let id = format!("partition-{}", ids.len());
                let request = json!({"exchange": exchange, "routing_key": "k", "id": id,
                                     "payload": {"n": ids.len()}});
                ids.push(ok_id(&client.request(&request)));
                submitted.fetch_add(1, Ordering::SeqCst);
                // Pacing: a steady trickle, so some are always in flight.
                std::thread::sleep(Duration::from_millis(20));
            }
            ids
        });
        wait_until("100 delivered before the partition", DRAIN, || {
            agent.count_status(Status::Delivered) >= 100
        });
        proxy.set_mode(Mode::Stall);
        let before = submitted.load(Ordering::SeqCst);
        let start = Instant::now();
        while start.elapsed() < stall {
            assert_eq!(
                charged(&agent),
                0,
                "an attempt charged during the partition"
            );
            let in_flight = samples(&scrape(port))
                .into_iter()
                .find(|(n, _)| n == "edge_outbox_in_flight")
                .map_or(0.0, |(_, v)| v);
            peak_in_flight = peak_in_flight.max(in_flight);
            std::thread::sleep(Duration::from_millis(250));
        }
        proxy.set_mode(Mode::Pass);
        eprintln!(
            "{} submitted during the {stall:?} partition; peak in flight {peak_in_flight}",
            submitted.load(Ordering::SeqCst) - before
        );
        let healed = Instant::now();
        wait_until("100 more delivered after the partition", DRAIN, || {
            agent.count_status(Status::Delivered) >= before as i64 + 100
        });
        eprintln!(
            "forwarding again {:?} after the partition healed",
            healed.elapsed()
        );
        drop(stopper);
        stream.join().expect("the submitter")
    });
    assert!(
        peak_in_flight > 0.0,
        "no message was in flight during the partition: the test tested nothing"
    );
    agent.wait_all_delivered(ids.len() as i64, DRAIN);
    assert_eq!(charged(&agent), 0, "an attempt was charged");
    let received = rt.block_on(amqp::received(&url, &queue));
    amqp::assert_all_received(&received, &ids);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

#[test]
fn silent_partitions_charge_nothing_30s() {
    silent_partition_charges_nothing(Duration::from_secs(30), "10s", false);
}

#[test]
fn silent_partitions_charge_nothing_90s() {
    silent_partition_charges_nothing(Duration::from_secs(90), "10s", false);
}

/// `broker.heartbeat = "0s"`, when the configuration accepts it.
#[test]
fn silent_partitions_charge_nothing_heartbeat_0s() {
    silent_partition_charges_nothing(Duration::from_secs(30), "0s", false);
}

/// With the heartbeat off (`?heartbeat=0` in the URL), nothing but the
/// probe after a confirm timeout tells a dead link.
#[test]
fn silent_partitions_charge_nothing_heartbeat_off_in_the_url() {
    silent_partition_charges_nothing(Duration::from_secs(30), "10s", true);
}

#[test]
fn a_dead_link_is_noticed_within_about_two_heartbeats() {
    let rt = rt();
    let url = broker::default_url();
    let proxy = FaultProxy::start(broker::default_addr());
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .set_str("broker", "heartbeat", "2s")
        .start();
    let connected =
        || agent.cli(&["status", "--json"]).json()["broker"]["connected"] == Value::Bool(true);
    wait_until("connected", DRAIN, connected);
    proxy.set_mode(Mode::Stall);
    let start = Instant::now();
    wait_until("the stall noticed", Duration::from_secs(15), || {
        !connected()
    });
    eprintln!("stall noticed after {:?}", start.elapsed());
    proxy.set_mode(Mode::Pass);
    wait_until("reconnected", DRAIN, connected);
    drop(rt);
}

#[test]
fn a_blocked_broker_is_waited_out_without_counting_failures() {
    let node = node::lock_restartable();
    let rt = rt();
    let url = node.url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    // A short confirm timeout: were blocked waits counted, they would show.
    let agent = Agent::builder(BIN)
        .forwarding_to(&url)
        .set_str("publish", "confirm_timeout", "1s")
        .start();
    let connected =
        || agent.cli(&["status", "--json"]).json()["broker"]["connected"] == Value::Bool(true);
    wait_until("connected", DRAIN, connected);
    node.memory_alarm(true);
    let ids = submit_many(&agent, &exchange, "k", "blocked", 200);
    wait_until("the agent sees the block", DRAIN, || {
        agent.cli(&["status", "--json"]).json()["broker"]["blocked"] == Value::Bool(true)
    });
    // Several confirm timeouts long: nothing may fail or be counted.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(
            agent.db_count("SELECT COALESCE(SUM(try_count), 0) FROM msg_log"),
            0
        );
        assert_eq!(agent.count_status(Status::Failed), 0);
        std::thread::sleep(Duration::from_millis(200));
    }
    node.memory_alarm(false);
    agent.wait_all_delivered(200, DRAIN);
    let received = rt.block_on(amqp::received(&url, &queue));
    amqp::assert_all_received(&received, &ids);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

// -------------------------------------------------------- a large backlog

/// Reads the agent's resident memory (VmRSS) in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A million-row backlog of mixed priorities drains with flat memory
/// (< 64 MiB resident), highest priority first: the pages walk one
/// priority at a time through the index, each priority spread over the
/// whole table (priority = row number mod 10).
/// Slow (minutes): `cargo nextest run --release --test forwarding --run-ignored only`.
#[test]
#[ignore]
fn a_million_row_backlog_drains_in_flat_memory() {
    const ROWS: i64 = 1_000_000;
    let rt = rt();
    let url = broker::default_url();
    let queue = amqp::unique("million");
    rt.block_on(amqp::declare_queue(&url, &queue));
    let mut agent = Agent::builder(BIN).forwarding_to(&url).prepare();
    prefill_database(&agent.db, ROWS, 512, |i| PrefillRow {
        id: format!("m-{i}"),
        status: Status::Delivering,
        routing_key: queue.clone(),
        create_time: 0,
        next_try_time: None,
    });
    agent
        .db()
        .execute("UPDATE msg_log SET priority = rowid % 10", [])
        .expect("mixed priorities");
    agent.restart();
    let pid = agent.pid();
    let mut peak = 0;
    let start = Instant::now();
    while agent.count_status(Status::Delivered) < ROWS {
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        assert!(start.elapsed() < Duration::from_secs(1800), "did not drain");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "drained {ROWS} rows of priorities 0-9 in {:?}; peak resident memory {} MiB",
        start.elapsed(),
        peak / 1024
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    // Highest priority first: each priority was confirmed before the next
    // lower one began, but for the in-flight window at the boundary.
    let bounds: Vec<(i64, i64, i64)> = agent
        .db()
        .prepare(
            "SELECT priority, MIN(update_time), MAX(update_time) FROM msg_log \
             GROUP BY priority ORDER BY priority DESC",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    eprintln!("(priority, first confirm, last confirm): {bounds:?}");
    for pair in bounds.windows(2) {
        let ((higher, _, higher_last), (lower, lower_first, _)) = (pair[0], pair[1]);
        assert!(
            lower_first >= higher_last - 2_000,
            "priority {lower} began at {lower_first}, before priority {higher} ended at {higher_last}"
        );
    }
    rt.block_on(amqp::delete_queue(&url, &queue));
}
