//! The backlog tools (docs/cli.md: Filters, `list`, `retry`, `discard`,
//! `export`) as an operator uses them: the CLI beside a running agent, its
//! real socket, and the real RabbitMQ where forwarding matters.
//!
//! Every test uses its own exchange and queue names, so they run in
//! parallel against the shared broker.

use std::collections::BTreeSet;

use base64::Engine;
use std::time::Duration;

use edge_outbox_testkit::amqp;
use edge_outbox_testkit::broker;
use edge_outbox_testkit::db::get_status;
use edge_outbox_testkit::{ok_id, rt, wait_until, Agent, FaultProxy, Mode, Status};
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// How long a test waits for the agent to forward.
const DRAIN: Duration = Duration::from_secs(60);

/// The ids `list --json ARGS` prints, in its order.
fn listed(agent: &Agent, args: &[&str]) -> Vec<String> {
    let mut full = vec!["list", "--json"];
    full.extend_from_slice(args);
    let out = agent.cli(&full);
    assert_eq!(out.code, 0, "{out:?}");
    out.json()
        .as_array()
        .expect("an array")
        .iter()
        .map(|r| r["id"].as_str().expect("an id").to_string())
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn submit(agent: &Agent, id: &str, exchange: &str, routing_key: &str) -> String {
    ok_id(&agent.client().request(&json!({
        "id": id, "exchange": exchange, "routing_key": routing_key, "payload": id,
    })))
}

/// Moves `create_time` of `id` back by `ms` (a message stored that long ago).
fn backdate(agent: &Agent, id: &str, ms: i64) {
    let n = agent
        .db()
        .execute(
            "UPDATE msg_log SET create_time = create_time - ?2 WHERE id = ?1",
            rusqlite::params![id, ms],
        )
        .expect("backdating");
    assert_eq!(n, 1);
}

/// `(status, last_error)` of `id`.
fn state(agent: &Agent, id: &str) -> Option<(Status, Option<String>)> {
    use rusqlite::OptionalExtension;
    agent
        .db()
        .query_row(
            "SELECT status, last_error FROM msg_log WHERE id = ?1",
            [id],
            |r| Ok((get_status(r, 0)?, r.get(1)?)),
        )
        .optional()
        .expect("reading a row")
}

/// Failed messages of the real broker's two kinds (a 404 exchange, a
/// NO_ROUTE return), then each filter of `list`; `retry --failed` with
/// filters after the operator fixed the routing; `discard --failed` with
/// a filter; `discard` refusing a delivered message.
#[test]
fn filters_select_what_list_retry_and_discard_act_on() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "ok"));
    let missing = amqp::unique("bk-missing");
    let unrouted = amqp::unique("bk-unrouted");
    let agent = Agent::builder(BIN)
        .forwarding_to(&url)
        .set("publish", "max_attempts", "1")
        .start();
    let p = amqp::unique("bk");
    let id = |s: &str| format!("{p}-{s}");
    let (d1, d2, n1, n2, m1) = (id("d1"), id("d2"), id("n1"), id("n2"), id("m1"));
    submit(&agent, &d1, &exchange, "ok");
    submit(&agent, &n1, &exchange, &unrouted);
    submit(&agent, &m1, &missing, "k");
    submit(&agent, &n2, &exchange, &unrouted);
    submit(&agent, &d2, &exchange, "ok");
    for (id, want) in [
        (&d1, Status::Delivered),
        (&d2, Status::Delivered),
        (&n1, Status::Failed),
        (&n2, Status::Failed),
        (&m1, Status::Failed),
    ] {
        agent.wait_status(id, want, DRAIN);
    }
    backdate(&agent, &n1, 2 * 3_600_000);
    backdate(&agent, &m1, 3 * 3_600_000);
    let mine = |ids: Vec<String>| -> Vec<String> {
        ids.into_iter().filter(|i| i.starts_with(&p)).collect()
    };

    // Newest first by default, oldest first with --oldest.
    let all = mine(listed(&agent, &[]));
    assert_eq!(all, [&d2, &n2, &m1, &n1, &d1].map(String::clone));
    let oldest = mine(listed(&agent, &["--oldest"]));
    assert_eq!(oldest, [&d1, &n1, &m1, &n2, &d2].map(String::clone));
    assert_eq!(listed(&agent, &["--oldest", "--limit", "2"]).len(), 2);

    let failed = set(&[&n1, &n2, &m1]);
    let cases: Vec<(Vec<&str>, BTreeSet<String>)> = vec![
        (vec!["--status", "failed"], failed.clone()),
        (vec!["--exchange", &exchange], set(&[&d1, &d2, &n1, &n2])),
        (vec!["--exchange", &missing], set(&[&m1])),
        (vec!["--routing-key", &unrouted], set(&[&n1, &n2])),
        // The broker's reply code names the cause in last_error.
        (vec!["--error", "NO_ROUTE"], set(&[&n1, &n2])),
        (vec!["--error", "NOT_FOUND"], set(&[&m1])),
        (vec!["--error", "no_route"], set(&[])),
        (vec!["--older-than", "1h"], set(&[&n1, &m1])),
        (vec!["--older-than", "150m"], set(&[&m1])),
        (
            vec![
                "--status",
                "failed",
                "--exchange",
                &exchange,
                "--older-than",
                "1h",
            ],
            set(&[&n1]),
        ),
        (
            vec!["--status", "delivered", "--error", "NO_ROUTE"],
            set(&[]),
        ),
    ];
    for (args, want) in cases {
        let got: BTreeSet<String> = mine(listed(&agent, &args)).into_iter().collect();
        assert_eq!(got, want, "list {args:?}");
    }
    for bad in [
        vec!["list", "--older-than", "soon"],
        vec!["list", "--status", "lost"],
    ] {
        let out = agent.cli(&bad);
        assert_eq!(out.code, 2, "{bad:?}: {out:?}");
    }

    // The operator binds the key, then retries only the old NO_ROUTE one.
    rt.block_on(amqp::declare_exchange_with_queue(
        &url, &exchange, &queue, &unrouted,
    ));
    let out = agent.cli(&[
        "retry",
        "--failed",
        "--exchange",
        &exchange,
        "--older-than",
        "1h",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "1 failed message(s) moved back to delivering"
    );
    agent.wait_status(&n1, Status::Delivered, DRAIN);
    assert_eq!(state(&agent, &n2).map(|s| s.0), Some(Status::Failed));
    assert_eq!(state(&agent, &m1).map(|s| s.0), Some(Status::Failed));
    let out = agent.cli(&["retry", "--failed", "--error", "NO_ROUTE"]);
    assert_eq!(
        out.stdout.trim(),
        "1 failed message(s) moved back to delivering"
    );
    agent.wait_status(&n2, Status::Delivered, DRAIN);
    let got: BTreeSet<String> = rt
        .block_on(amqp::received(&url, &queue))
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(got, set(&[&d1, &d2, &n1, &n2]));

    // Ids and a selection do not mix; filters need --failed.
    for bad in [
        vec!["retry", &n1, "--failed"],
        vec!["retry", &n1, "--exchange", "x"],
        vec!["discard", &n1, "--error", "x"],
        vec!["discard"],
    ] {
        let out = agent.cli(&bad);
        assert_eq!(out.code, 2, "{bad:?}: {out:?}");
    }

    // discard --failed with a filter deletes only the failed rows it selects.
    let out = agent.cli(&["discard", "--failed", "--exchange", &missing]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "1 failed message(s) deleted");
    assert_eq!(state(&agent, &m1), None);
    // A delivered message is refused, named, and left as it is.
    let out = agent.cli(&["discard", &d1]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("0 message(s) discarded"), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("{d1}: not discarded: it is delivered")),
        "{out:?}"
    );
    assert_eq!(state(&agent, &d1).map(|s| s.0), Some(Status::Delivered));
}

/// `discard ID`: a delivering message becomes failed, "discarded by
/// operator"; again, it is deleted; a third time, it is not found. The
/// agent runs throughout and sees each change.
#[test]
fn discard_by_id_fails_a_delivering_message_then_deletes_it() {
    let agent = Agent::start(BIN); // a dead broker: rows stay delivering
    let a = submit(&agent, "a", "ex", "k");
    let b = submit(&agent, "b", "ex", "k");
    let out = agent.cli(&["discard", &a]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "1 message(s) discarded: 0 failed deleted, 1 delivering moved to failed"
    );
    assert_eq!(
        state(&agent, &a),
        Some((Status::Failed, Some("discarded by operator".into())))
    );
    let counts = agent.cli(&["status", "--json"]).json()["counts"].clone();
    assert_eq!(counts["delivering"], 1, "{counts}");
    assert_eq!(counts["failed"], 1, "{counts}");

    // The failed one is deleted, the delivering one failed, one id unknown.
    let out = agent.cli(&["discard", &a, &b, "nope"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "2 message(s) discarded: 1 failed deleted, 1 delivering moved to failed"
    );
    assert!(
        out.stderr.contains("nope: no message with this id"),
        "{out:?}"
    );
    assert_eq!(state(&agent, &a), None);
    assert_eq!(state(&agent, &b).map(|s| s.0), Some(Status::Failed));

    // A discarded message can be sent again, like any failed one.
    let out = agent.cli(&["retry", &b]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(state(&agent, &b).map(|s| s.0), Some(Status::Delivering));
    assert_eq!(
        agent.cli(&["discard", "--failed"]).stdout.trim(),
        "0 failed message(s) deleted"
    );
}

/// A message in flight (published, its confirm held back by a stalled
/// link) is discarded: it becomes failed, and the confirm that arrives
/// afterwards leaves it failed (statuses move forward only); the broker
/// has the message once, and the forwarder does not publish it again.
#[test]
fn a_discarded_message_in_flight_stays_failed_when_its_confirm_arrives() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .set_str("publish", "confirm_timeout", "30s")
        .start();
    let warm = submit(&agent, "warm", &exchange, "k");
    agent.wait_status(&warm, Status::Delivered, DRAIN);

    proxy.set_mode(Mode::Stall);
    let x = submit(&agent, "x", &exchange, "k");
    wait_until("x in flight", DRAIN, || {
        agent.cli(&["status", "--json"]).json()["broker"]["in_flight"] == 1
    });
    let out = agent.cli(&["discard", &x]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("1 delivering moved to failed"),
        "{out:?}"
    );
    proxy.set_mode(Mode::Pass);

    // The confirm comes back and is recorded (nothing in flight), and a
    // message submitted afterwards is delivered: the forwarder went on.
    wait_until("the confirm of x", DRAIN, || {
        agent.cli(&["status", "--json"]).json()["broker"]["in_flight"] == 0
    });
    let y = submit(&agent, "y", &exchange, "k");
    agent.wait_status(&y, Status::Delivered, DRAIN);
    // Two resend passes (publish.resend_every 300ms) go by.
    let z = submit(&agent, "z", &exchange, "k");
    agent.wait_status(&z, Status::Delivered, DRAIN);
    assert_eq!(
        state(&agent, &x),
        Some((Status::Failed, Some("discarded by operator".into())))
    );
    let ids: Vec<String> = rt
        .block_on(amqp::received(&url, &queue))
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(ids, ["warm", "x", "y", "z"], "x reached the broker once");
}

/// What a row of `msg_log` holds that an export must carry: id, body and
/// whether it is TEXT, exchange, routing key, headers, content type.
type Carried = (
    String,
    Vec<u8>,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
);

fn carried(agent: &Agent, status: Status) -> Vec<Carried> {
    let conn = agent.db();
    let mut stmt = conn
        .prepare(
            "SELECT id, CAST(msg AS BLOB), typeof(msg), exchange, routing_key, headers, \
             content_type FROM msg_log WHERE status = ?1 ORDER BY rowid",
        )
        .expect("prepare");
    let rows = stmt
        .query_map([status], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?.unwrap_or_default(),
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .expect("query");
    rows.map(|r| r.expect("row")).collect()
}

/// Export from agent A's database, `submit --bulk` into agent B: B's rows
/// equal A's delivering rows (id, body bytes and type, exchange, routing
/// key, headers, content type), in A's order; a second import stores
/// nothing; B then delivers them to the real broker as A would have.
#[test]
fn an_export_submitted_in_bulk_to_another_agent_stores_the_same_messages() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let a = Agent::start(BIN); // a dead broker: A keeps its backlog
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&binary);
    let requests = [
        json!({"exchange": exchange, "routing_key": "k", "id": "text-1",
               "payload": "h\u{e9}llo\n\t\"quoted\" \u{2028} end",
               "content_type": "text/x-custom",
               "headers": {"n": 98765, "f": 2.5, "s": "x", "b": true, "arr": [1, "a", false]}}),
        json!({"exchange": exchange, "routing_key": "k", "id": "bin-1", "payload_base64": b64}),
        json!({"exchange": exchange, "routing_key": "k", "payload": ""}),
        json!({"exchange": exchange, "routing_key": "a key.with spaces", "id": "spaces-1",
               "payload": [1, 2], "headers": {"CC": ["k"]}}),
    ];
    let mut ids: Vec<String> = requests
        .iter()
        .map(|r| ok_id(&a.client().request(r)))
        .collect();
    // A JSON payload as the client wrote it, whitespace and all.
    let mut client = a.client();
    client.send_line(&format!(
        r#"{{"exchange":"{exchange}","routing_key":"k","payload": {{ "a" :1e-400,"a":[ 1 ]}} }}"#
    ));
    ids.push(ok_id(&client.answer()));
    // A failed row is not part of the default export.
    let failed = submit(&a, "failed-1", &exchange, "k");
    a.db()
        .execute(
            "UPDATE msg_log SET status = ?2, last_error = 'x' WHERE id = ?1",
            rusqlite::params![failed, Status::Failed],
        )
        .expect("failing a row");

    let export = a.cli(&["export"]);
    assert_eq!(export.code, 0, "{export:?}");
    assert!(
        export.stderr.contains("exported 5 message(s)"),
        "{export:?}"
    );
    let lines: Vec<Value> = export
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let exported: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(
        exported, ids,
        "every delivering row, oldest first, with its id"
    );
    let failed_only = a.cli(&["export", "--status", "failed"]);
    assert_eq!(failed_only.stdout.lines().count(), 1, "{failed_only:?}");
    assert!(failed_only.stdout.contains("failed-1"));

    // B's broker refuses connections until the rows are compared.
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let b = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .start();
    let import = b.cli_stdin(&["submit", "--bulk"], export.stdout.as_bytes());
    assert_eq!(import.code, 0, "{import:?}");
    assert_eq!(import.stdout.lines().collect::<Vec<_>>(), ids);
    let stored = carried(&a, Status::Delivering);
    assert_eq!(carried(&b, Status::Delivering), stored);
    let again = b.cli_stdin(&["submit", "--bulk"], export.stdout.as_bytes());
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(b.rows(), ids.len() as i64, "a second import stores nothing");

    // B delivers them: the broker gets A's messages, ids and bytes intact.
    rt.block_on(amqp::declare_exchange_with_queue(
        &url,
        &exchange,
        &queue,
        "a key.with spaces",
    ));
    proxy.set_mode(Mode::Pass);
    b.wait_all_delivered(ids.len() as i64, DRAIN);
    let mut got: Vec<(String, Vec<u8>, Option<String>)> = rt
        .block_on(amqp::received(&url, &queue))
        .into_iter()
        .map(|m| (m.message_id, m.body, m.content_type))
        .collect();
    let mut want: Vec<(String, Vec<u8>, Option<String>)> = stored
        .into_iter()
        .map(|(id, body, _, _, _, _, content_type)| (id, body, content_type))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}
