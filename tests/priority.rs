//! What matters first and visible expiry (docs/forwarding.md, Passes and
//! Expiry), against a real RabbitMQ: a backlog built during an outage goes
//! out highest priority first, oldest (or newest) first within a priority,
//! as the queue shows; rows past their `ttl` end failed/"expired" while the
//! broker is away and never reach it; a message published near its expiry
//! carries the time it has left as `expiration`.

use std::time::Duration;

use edge_outbox_testkit::amqp;
use edge_outbox_testkit::broker;
use edge_outbox_testkit::metrics::{free_port, listen_on, sample, scrape};
use edge_outbox_testkit::{
    ok_id, request_many, rt, wait_until, Agent, AgentBuilder, FaultProxy, Mode, Status,
};
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// How long a test waits for the agent to forward everything.
const DRAIN: Duration = Duration::from_secs(120);

/// How long a test waits for the expiry sweep (it runs every second).
const SWEEP: Duration = Duration::from_secs(20);

/// The submits of a backlog with mixed priorities (some without one: 0),
/// in submit order, and their priorities; randomized, the seed printed.
fn mixed_backlog(exchange: &str, n: usize) -> (Vec<Value>, Vec<u8>) {
    let seed: u64 = std::env::var("PRIORITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("mixed backlog seed {seed} (re-run with PRIORITY_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut requests = Vec::new();
    let mut priorities = Vec::new();
    for i in 0..n {
        let mut request = json!({
            "exchange": exchange, "routing_key": "k", "id": format!("m-{i}"),
            "payload": {"n": i},
        });
        let priority: u8 = rng.u8(0..=9);
        // A priority of 0 is sent half the time, left out the other half.
        if priority > 0 || rng.bool() {
            request["priority"] = json!(priority);
        }
        requests.push(request);
        priorities.push(priority);
    }
    (requests, priorities)
}

/// The ids in the order the agent promises: highest priority first, then
/// submit order (`newest_first`: its reverse) within a priority.
fn promised_order(ids: &[String], priorities: &[u8], newest_first: bool) -> Vec<String> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| {
        let within = if newest_first { usize::MAX - i } else { i };
        (std::cmp::Reverse(priorities[i]), within)
    });
    order.into_iter().map(|i| ids[i].clone()).collect()
}

/// Builds a mixed backlog while the broker is unreachable, lets the link
/// come back, and checks the order the messages reach the queue in, and
/// their AMQP priority.
fn backlog_drains_in_the_promised_order(order: &str) {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let port = free_port();
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .set_str("publish", "order", order)
        .set("metrics", "listen", listen_on(port))
        .start();
    let (requests, priorities) = mixed_backlog(&exchange, 600);
    let ids: Vec<String> = request_many(&agent, &requests).iter().map(ok_id).collect();
    assert_eq!(agent.count_status(Status::Delivering), 600);
    // The backlog per priority, in the status report and the metrics.
    let status = agent.cli(&["status", "--json"]).json();
    let metrics = scrape(port);
    for p in 0..=9u8 {
        let want = priorities.iter().filter(|&&q| q == p).count() as u64;
        let shown = status["delivering_by_priority"][p.to_string()]
            .as_u64()
            .unwrap_or(0);
        assert_eq!(shown, want, "priority {p}: {status}");
        let gauge = sample(
            &metrics,
            &format!("edge_outbox_backlog{{priority=\"{p}\"}}"),
        );
        assert_eq!(gauge as u64, want, "priority {p}");
    }
    let text = agent.cli(&["status"]).stdout;
    assert!(text.contains("backlog:   "), "{text}");
    proxy.set_mode(Mode::Pass);
    agent.wait_all_delivered(600, DRAIN);
    let received = rt.block_on(amqp::received(&url, &queue));
    let got: Vec<String> = received.iter().map(|m| m.message_id.clone()).collect();
    let newest_first = order == "newest_first";
    assert_eq!(
        got,
        promised_order(&ids, &priorities, newest_first),
        "{order}: highest priority first, then {order} within a priority, once each"
    );
    for m in &received {
        let i: usize = m.message_id["m-".len()..].parse().unwrap();
        let want = Some(priorities[i]).filter(|&p| p > 0);
        assert_eq!(m.priority, want, "{}", m.message_id);
        assert_eq!(m.expiration, None, "no ttl, no max_age: no expiration");
    }
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

#[test]
fn a_mixed_priority_backlog_drains_highest_first_then_oldest_first() {
    backlog_drains_in_the_promised_order("oldest_first");
}

#[test]
fn a_mixed_priority_backlog_drains_highest_first_then_newest_first() {
    backlog_drains_in_the_promised_order("newest_first");
}

/// A message submitted while the backlog drains goes out before the
/// lower-priority rows still waiting: it does not wait for the pass to end.
#[test]
fn an_urgent_message_overtakes_a_draining_backlog() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        // A slow drain: one message at a time.
        .set("publish", "max_in_flight", "1")
        .start();
    let requests: Vec<Value> = (0..3000)
        .map(|i| json!({"exchange": exchange, "routing_key": "k", "id": format!("bulk-{i}"), "payload": i}))
        .collect();
    request_many(&agent, &requests);
    proxy.set_mode(Mode::Pass);
    wait_until("the drain under way", DRAIN, || {
        agent.count_status(Status::Delivered) >= 100
    });
    let urgent = ok_id(&agent.client().request(&json!({
        "exchange": exchange, "routing_key": "k", "id": "urgent", "priority": 9,
        "payload": "alarm",
    })));
    let delivered_then = agent.count_status(Status::Delivered) as usize;
    agent.wait_all_delivered(3001, DRAIN);
    let got: Vec<String> = rt
        .block_on(amqp::received(&url, &queue))
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    let at = got.iter().position(|id| *id == urgent).unwrap();
    eprintln!("the urgent message came out {at}th of {}; {delivered_then} were delivered when it was submitted", got.len());
    // It waits at most for the rows already read (the page being handed
    // out and the next one, 512 each) and the one in flight, never for the
    // rest of the 3000.
    assert!(
        at <= delivered_then + 2 * 512 + 1,
        "the urgent message came out {at}th of {}, {delivered_then} were delivered when it was submitted",
        got.len()
    );
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

/// `(status, last_error)` of row `id`.
fn status_and_error(agent: &Agent, id: &str) -> (Status, Option<String>) {
    let row = agent.row(id).unwrap_or_else(|| panic!("no row {id}"));
    (row.status, row.last_error)
}

/// Rows past their `ttl` end failed/"expired" while the broker is down
/// (whatever their priority), are counted, stay in the database, and never
/// reach the broker when it returns; rows with time left are delivered.
fn expiry_while_the_broker_is_down(builder: impl FnOnce(AgentBuilder) -> AgentBuilder) {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let port = free_port();
    let agent = builder(Agent::builder(BIN).forwarding_to(&proxy.url_for(&url)).set(
        "metrics",
        "listen",
        listen_on(port),
    ))
    .start();
    let submit = |id: &str, ttl: Option<Value>| {
        let mut request =
            json!({"exchange": exchange, "routing_key": "k", "id": id, "payload": id});
        if let Some(ttl) = ttl {
            request["ttl"] = ttl;
        }
        ok_id(&agent.client().request(&request))
    };
    let short = [
        submit("short-ms", Some(json!(500))),
        submit("short-text", Some(json!("1s"))),
        ok_id(
            &agent
                .client()
                .request(&json!({"exchange": exchange, "routing_key": "k",
            "id": "short-urgent", "payload": "x", "priority": 9, "ttl": 700})),
        ),
    ];
    let long = submit("long", Some(json!("1h")));
    let plain = submit("plain", None);
    wait_until("the short-lived rows expired", SWEEP, || {
        short
            .iter()
            .all(|id| agent.status_of(id) == Some(Status::Failed))
    });
    for id in &short {
        assert_eq!(
            status_and_error(&agent, id),
            (Status::Failed, Some("expired".into())),
            "{id}"
        );
    }
    assert_eq!(agent.db_count("SELECT SUM(try_count) FROM msg_log"), 0);
    let status = agent.cli(&["status", "--json"]).json();
    assert_eq!(status["expired"], json!(3), "{status}");
    assert_eq!(
        sample(&scrape(port), "edge_outbox_expired_total"),
        3.0,
        "counted"
    );
    let listed = agent.cli(&["list", "--status", "failed", "--json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    proxy.set_mode(Mode::Pass);
    agent.wait_status(&long, Status::Delivered, DRAIN);
    agent.wait_status(&plain, Status::Delivered, DRAIN);
    let mut got: Vec<String> = rt
        .block_on(amqp::received(&url, &queue))
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    got.sort();
    let mut want = vec![long, plain];
    want.sort();
    assert_eq!(got, want, "expired rows never reach the broker");
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

#[test]
fn rows_past_their_ttl_end_failed_expired_while_the_broker_is_down() {
    expiry_while_the_broker_is_down(|b| b);
}

/// `publish.max_age` gives messages without a `ttl` an expiry: "plain"
/// expires too, and only "long" (its own ttl of an hour) is delivered.
#[test]
fn max_age_expires_messages_without_a_ttl() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .set_str("publish", "max_age", "1s")
        .start();
    let submit = |id: &str, ttl: Option<&str>| {
        let mut request =
            json!({"exchange": exchange, "routing_key": "k", "id": id, "payload": id});
        if let Some(ttl) = ttl {
            request["ttl"] = json!(ttl);
        }
        ok_id(&agent.client().request(&request))
    };
    let plain = submit("plain", None);
    let long = submit("long", Some("1h"));
    let row = agent.row(&plain).unwrap();
    assert!(row.status == Status::Delivering || row.status == Status::Failed);
    wait_until("plain expired", SWEEP, || {
        agent.status_of(&plain) == Some(Status::Failed)
    });
    assert_eq!(
        status_and_error(&agent, &plain),
        (Status::Failed, Some("expired".into()))
    );
    proxy.set_mode(Mode::Pass);
    agent.wait_status(&long, Status::Delivered, DRAIN);
    let got: Vec<String> = rt
        .block_on(amqp::received(&url, &queue))
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(got, [long]);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

/// A message that waited out most of its `ttl` in an outage goes out with
/// the time it has left as `expiration`: no more than its expiry minus the
/// moment the link came back, no less than its expiry minus the moment it
/// was read from the queue.
#[test]
fn a_message_published_near_its_expiry_carries_the_time_it_has_left() {
    const TTL_MS: i64 = 12_000;
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let mut agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .start();
    let id = ok_id(&agent.client().request(&json!({
        "exchange": exchange, "routing_key": "k", "priority": 4, "ttl": TTL_MS,
        "payload": "late",
    })));
    let expire_time: i64 = agent.db_count(&format!(
        "SELECT expire_time FROM msg_log WHERE id = '{id}'"
    ));
    let created: i64 = agent.db_count(&format!(
        "SELECT create_time FROM msg_log WHERE id = '{id}'"
    ));
    assert_eq!(expire_time - created, TTL_MS);
    // Two thirds of its life in the outage.
    wait_until(
        "two thirds of the ttl gone",
        Duration::from_secs(30),
        || now_ms() >= created + TTL_MS * 2 / 3,
    );
    let back = now_ms();
    proxy.set_mode(Mode::Pass);
    // A restarted agent connects at once; the running one could be in a
    // reconnect backoff of up to 10 s by now, longer than the ttl left.
    agent.restart();
    agent.wait_status(&id, Status::Delivered, Duration::from_secs(3));
    let received = rt.block_on(amqp::received(&url, &queue));
    let read = now_ms();
    assert_eq!(received.len(), 1);
    let message = &received[0];
    assert_eq!(message.priority, Some(4));
    let left: i64 = message
        .expiration
        .as_deref()
        .expect("an expiration")
        .parse()
        .expect("milliseconds");
    assert!(
        left <= expire_time - back && left >= expire_time - read,
        "expiration {left} ms: expected between {} and {}",
        expire_time - read,
        expire_time - back
    );
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

/// A bad `priority` or `ttl` is refused with `bad_request`, nothing stored.
#[test]
fn a_bad_priority_or_ttl_is_refused() {
    let agent = Agent::builder(BIN).start();
    let mut client = agent.client();
    for (field, value) in [
        ("priority", json!(10)),
        ("priority", json!(-1)),
        ("priority", json!(1.5)),
        ("priority", json!("5")),
        ("ttl", json!(0)),
        ("ttl", json!(-5)),
        ("ttl", json!("soon")),
        ("ttl", json!(true)),
    ] {
        let mut request = json!({"exchange": "", "routing_key": "k", "payload": 1});
        request[field] = value.clone();
        let answer = client.request(&request);
        assert_eq!(answer["ok"], json!(false), "{field} {value}: {answer}");
        assert_eq!(answer["error"], json!("bad_request"), "{answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{message}");
    }
    assert_eq!(agent.rows(), 0);
    // The CLI's flags carry both; a priority out of range is a usage error.
    let out = agent.cli(&[
        "submit",
        "--exchange",
        "",
        "--routing-key",
        "k",
        "--priority",
        "9",
        "--ttl",
        "30s",
        "hello",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.stdout.trim().to_string();
    let (priority, ttl) = agent
        .db()
        .query_row(
            "SELECT priority, expire_time - create_time FROM msg_log WHERE id = ?1",
            [&id],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .unwrap();
    assert_eq!((priority, ttl), (9, 30_000));
    let out = agent.cli(&[
        "submit",
        "--exchange",
        "",
        "--routing-key",
        "k",
        "--priority",
        "10",
        "x",
    ]);
    assert_eq!(out.code, 2, "{out:?}");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
