//! Forwarding to a real RabbitMQ: confirms, returns, 404s, outages, cuts,
//! stalls, broker restarts and agent crashes (SPEC "Forwarding to RabbitMQ").
//!
//! Every test uses its own exchange and queue names, so they run in
//! parallel against the shared broker; tests that stop the broker node use
//! the restartable node under its cross-process lock.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::agent::{forwarding_agent, ok_id, Agent, AgentBuilder};
use common::broker::{self, Received};
use common::proxy::{FaultProxy, Mode};
use common::wait_until;
use serde_json::{json, Value};

const DRAIN: Duration = Duration::from_secs(120);

/// A durable direct exchange and queue bound with `routing_key`.
fn topology(rt: &tokio::runtime::Runtime, url: &str, routing_key: &str) -> (String, String) {
    let exchange = broker::unique("fwd-ex");
    let queue = broker::unique("fwd-q");
    rt.block_on(broker::declare_exchange_with_queue(
        url,
        &exchange,
        &queue,
        routing_key,
    ));
    (exchange, queue)
}

fn status_of(agent: &Agent, id: &str) -> (i64, i64, Option<String>) {
    agent
        .db()
        .query_row(
            "SELECT status, try_count, last_error FROM msg_log WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap_or_else(|e| panic!("row {id}: {e}"))
}

/// Submits `n` messages with ids `{prefix}-{i}` on one pipelined connection.
fn submit_many(
    agent: &Agent,
    exchange: &str,
    routing_key: &str,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut client = agent.client();
    let mut writer = client.writer();
    let lines: Vec<String> = (0..n)
        .map(|i| {
            json!({"exchange": exchange, "routing_key": routing_key,
                   "id": format!("{prefix}-{i}"), "payload": {"n": i, "pad": "x".repeat(200)}})
            .to_string()
        })
        .collect();
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        for line in lines {
            writer.write_all(line.as_bytes()).expect("write");
            writer.write_all(b"\n").expect("write");
        }
    });
    let ids = (0..n).map(|_| ok_id(&client.answer())).collect();
    sender.join().expect("sender");
    ids
}

/// Every id in `ids` arrived in `queue` (duplicates allowed).
fn assert_all_received(received: &[Received], ids: &[String]) {
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

fn wait_all_delivered(agent: &Agent, n: i64, deadline: Duration) {
    wait_until(&format!("{n} rows delivered"), deadline, || {
        agent.count_status(1) == n
    });
    assert_eq!(agent.count_status(2), 0, "no message may fail");
}

#[test]
fn a_normal_message_is_confirmed_and_arrives_intact() {
    let rt = common::rt();
    let url = broker::default_url();
    let (exchange, queue) = topology(&rt, &url, "user");
    let agent = forwarding_agent(&url).start();
    let answer = agent.client().request(&json!({
        "exchange": exchange, "routing_key": "user",
        "payload": {"name": "yolo"},
        "headers": {"source": "test", "attempt": 7, "urgent": true},
    }));
    let id = ok_id(&answer);
    wait_until("status 1", DRAIN, || status_of(&agent, &id).0 == 1);
    let (_, try_count, last_error) = status_of(&agent, &id);
    assert_eq!(try_count, 0);
    assert_eq!(last_error, None);

    let received = rt.block_on(broker::received(&url, &queue));
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
    rt.block_on(broker::delete(&url, &exchange, &queue));
}

#[test]
fn a_missing_exchange_fails_after_max_attempts_and_costs_others_nothing() {
    let rt = common::rt();
    let url = broker::default_url();
    let (exchange, queue) = topology(&rt, &url, "k");
    let agent = forwarding_agent(&url)
        .set("publish", "max_attempts", "3")
        .start();
    let missing = broker::unique("no-such-exchange");
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
        status_of(&agent, &bad).0 == 2
    });
    let (_, tries, error) = status_of(&agent, &bad);
    assert_eq!(tries, 3);
    let error = error.unwrap_or_default();
    assert!(error.contains("404"), "{error}");
    wait_until("the good ones are delivered", DRAIN, || {
        good.iter().all(|id| status_of(&agent, id).0 == 1)
    });
    for id in &good {
        assert_eq!(status_of(&agent, id).1, 0, "{id} lost an attempt");
    }
    let received = rt.block_on(broker::received(&url, &queue));
    assert_all_received(&received, &good);
    rt.block_on(broker::delete(&url, &exchange, &queue));
}

#[test]
fn an_unroutable_message_is_never_delivered_and_fails_with_no_route() {
    let rt = common::rt();
    let url = broker::default_url();
    let (exchange, queue) = topology(&rt, &url, "bound");
    let agent = forwarding_agent(&url)
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
        assert_ne!(status, 1, "an ack with a basic.return is not a delivery");
        if status == 2 {
            break;
        }
        assert!(start.elapsed() < DRAIN, "never failed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, tries, error) = status_of(&agent, &id);
    assert_eq!(tries, 2);
    assert!(error.unwrap_or_default().contains("312 NO_ROUTE"));
    rt.block_on(broker::delete(&url, &exchange, &queue));
}

#[test]
fn offline_submits_cost_nothing_and_drain_in_order_when_the_broker_returns() {
    let rt = common::rt();
    let url = broker::default_url();
    let (exchange, queue) = topology(&rt, &url, "k");
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let agent = forwarding_agent(&proxy.url_for(&url)).start();
    let ids = submit_many(&agent, &exchange, "k", "offline", 300);
    // As long as the outage lasts, nothing is attempted and nothing counted.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(agent.count_status(0), 300);
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
    wait_all_delivered(&agent, 300, DRAIN);
    assert_eq!(agent.db_count("SELECT SUM(try_count) FROM msg_log"), 0);
    let received: Vec<String> = rt
        .block_on(broker::received(&url, &queue))
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(received, ids, "delivered in submission order, once each");
    rt.block_on(broker::delete(&url, &exchange, &queue));
}

/// Submits `n` messages in the background while `fault` runs, then checks
/// every acknowledged message was delivered and none failed.
fn survive(
    name: &str,
    n: usize,
    builder: impl FnOnce(&str) -> AgentBuilder,
    fault: impl FnOnce(&Agent, &FaultProxy),
) {
    let rt = common::rt();
    let url = broker::default_url();
    let (exchange, queue) = topology(&rt, &url, "k");
    let proxy = FaultProxy::start(broker::default_addr());
    let agent = builder(&proxy.url_for(&url)).start();
    let ids = std::thread::scope(|s| {
        let submitter = s.spawn(|| submit_many(&agent, &exchange, "k", name, n));
        fault(&agent, &proxy);
        submitter.join().expect("submitter")
    });
    wait_all_delivered(&agent, n as i64, DRAIN);
    let received = rt.block_on(broker::received(&url, &queue));
    assert_all_received(&received, &ids);
    rt.block_on(broker::delete(&url, &exchange, &queue));
}

#[test]
fn five_thousand_messages_survive_four_connection_cuts() {
    survive("cuts", 5_000, forwarding_agent, |agent, proxy| {
        for cut in 1..=4 {
            // Cut mid-stream: after 1,000, 2,000, 3,000 and 4,000 deliveries.
            wait_until("progress before a cut", DRAIN, || {
                agent.count_status(1) >= cut * 1_000
            });
            proxy.cut_all();
            eprintln!("cut {cut} at {} delivered", agent.count_status(1));
        }
    });
}

#[test]
fn five_thousand_messages_survive_a_thirty_second_silent_stall() {
    survive(
        "stall",
        5_000,
        |url| forwarding_agent(url).set_str("broker", "heartbeat", "5s"),
        |agent, proxy| {
            wait_until("progress before the stall", DRAIN, || {
                agent.count_status(1) > 0
            });
            proxy.set_mode(Mode::Stall);
            std::thread::sleep(Duration::from_secs(30));
            proxy.set_mode(Mode::Pass);
        },
    );
}

#[test]
fn a_dead_link_is_noticed_within_about_two_heartbeats() {
    let rt = common::rt();
    let url = broker::default_url();
    let proxy = FaultProxy::start(broker::default_addr());
    let agent = forwarding_agent(&proxy.url_for(&url))
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
fn acknowledged_messages_survive_a_broker_restart_and_a_broker_kill() {
    let node = broker::lock_restartable();
    let rt = common::rt();
    let url = node.url();
    let (exchange, queue) = topology(&rt, &url, "k");
    let agent = forwarding_agent(&url).start();
    let mut all = Vec::new();
    for (round, kill) in [("restart", false), ("kill", true)] {
        let ids = std::thread::scope(|s| {
            let submitter = s.spawn(|| submit_many(&agent, &exchange, "k", round, 2_000));
            wait_until("progress", DRAIN, || {
                agent.count_status(1) > all.len() as i64
            });
            if kill {
                node.kill9();
            } else {
                node.stop();
            }
            node.start();
            submitter.join().expect("submitter")
        });
        all.extend(ids);
        wait_all_delivered(&agent, all.len() as i64, DRAIN);
    }
    let received = rt.block_on(broker::received(&url, &queue));
    assert_all_received(&received, &all);
    rt.block_on(broker::delete(&url, &exchange, &queue));
}

#[test]
fn a_blocked_broker_is_waited_out_without_counting_failures() {
    let node = broker::lock_restartable();
    let rt = common::rt();
    let url = node.url();
    let (exchange, queue) = topology(&rt, &url, "k");
    // A short confirm timeout: were blocked waits counted, they would show.
    let agent = forwarding_agent(&url)
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
        assert_eq!(agent.count_status(2), 0);
        std::thread::sleep(Duration::from_millis(200));
    }
    node.memory_alarm(false);
    wait_all_delivered(&agent, 200, DRAIN);
    let received = rt.block_on(broker::received(&url, &queue));
    assert_all_received(&received, &ids);
    rt.block_on(broker::delete(&url, &exchange, &queue));
}

#[test]
fn acknowledged_messages_survive_kill_9_of_the_agent() {
    let rt = common::rt();
    let url = broker::default_url();
    let (exchange, queue) = topology(&rt, &url, "k");
    let mut agent = forwarding_agent(&url).start();
    let ids = submit_many(&agent, &exchange, "k", "crash", 3_000);
    wait_until("some delivered", DRAIN, || agent.count_status(1) > 0);
    agent.kill9();
    let stuck = agent.count_status(0);
    eprintln!("killed with {stuck} rows undelivered");
    agent.restart();
    wait_all_delivered(&agent, 3_000, DRAIN);
    let received = rt.block_on(broker::received(&url, &queue));
    assert_all_received(&received, &ids);
    let copies: BTreeMap<&str, usize> = received.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.message_id.as_str()).or_default() += 1;
        m
    });
    eprintln!(
        "duplicates after the crash: {}",
        copies.values().filter(|c| **c > 1).count()
    );
    rt.block_on(broker::delete(&url, &exchange, &queue));
}

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

/// A million-row backlog drains with flat memory (< 64 MiB resident).
/// Slow (minutes): `cargo nextest run --release --test forward --run-ignored only`.
#[test]
#[ignore]
fn a_million_row_backlog_drains_in_flat_memory() {
    const ROWS: i64 = 1_000_000;
    let rt = common::rt();
    let url = broker::default_url();
    let queue = broker::unique("million");
    rt.block_on(broker::declare_queue(&url, &queue));
    let mut agent = forwarding_agent(&url).prepare();
    common::agent::prefill_database(&agent.db, ROWS, |i| (format!("m-{i}"), 0, queue.clone(), 0));
    agent.restart();
    let pid = agent.pid();
    let mut peak = 0;
    let start = Instant::now();
    while agent.count_status(1) < ROWS {
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        assert!(start.elapsed() < Duration::from_secs(1800), "did not drain");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "drained {ROWS} rows in {:?}; peak resident memory {} MiB",
        start.elapsed(),
        peak / 1024
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    rt.block_on(broker::delete_queue(&url, &queue));
}
