//! Nothing the agent acknowledged is lost: `kill -9` of the agent right
//! after and in the middle of a burst of submits, while it forwards and
//! while a consumer handler runs; a restart and a kill of the broker; and
//! the database the agent keeps (WAL, its schema), which is what makes an
//! `ok` answer durable (docs/storage.md, Durability; docs/forwarding.md;
//! docs/consuming.md).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_outbox_testkit::amqp;
use edge_outbox_testkit::broker;
use edge_outbox_testkit::consumer::{
    self, lines, sh_path, wait_consuming, wait_queue_settled, Reaper,
};
use edge_outbox_testkit::db::get_status;
use edge_outbox_testkit::node;
use edge_outbox_testkit::{ok_id, rt, submit_many, wait_until, Agent, Cleanup, Status};
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// How long a forwarding test waits for the broker to get everything.
const DRAIN: Duration = Duration::from_secs(120);

// ----------------------------------------------------------- the database

/// The database the agent creates: WAL, the columns of `msg_log` and a row
/// as docs/storage.md describes them.
#[test]
fn the_database_is_wal_with_the_spec_schema() {
    let agent = Agent::start(BIN);
    let id = ok_id(&agent.client().request(&json!({
        "exchange": "userExchange", "routing_key": "user", "payload": {"name": "yolo"},
        "headers": {"a": 1, "b": "two", "c": true},
    })));
    let conn = agent.db();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("user_version");
    assert!(version >= 1, "user_version {version}");
    let mut stmt = conn
        .prepare("SELECT name, type FROM pragma_table_info('msg_log')")
        .expect("table_info");
    let columns: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("columns")
        .map(|c| c.expect("column"))
        .collect();
    for (name, kind) in [
        ("id", "TEXT"),
        ("msg", "TEXT"),
        ("exchange", "TEXT"),
        ("routing_key", "TEXT"),
        ("status", "INTEGER"),
        ("try_count", "INTEGER"),
        ("next_try_time", "INTEGER"),
        ("create_time", "INTEGER"),
        ("update_time", "INTEGER"),
    ] {
        assert!(
            columns.iter().any(|(n, k)| n == name && k == kind),
            "column {name} {kind} missing: {columns:?}"
        );
    }
    let (msg, exchange, rk, status, tries, next, created, updated, headers, ctype): (
        String,
        String,
        String,
        Status,
        i64,
        i64,
        i64,
        i64,
        String,
        String,
    ) = conn
        .query_row(
            "SELECT msg, exchange, routing_key, status, try_count, next_try_time, \
             create_time, update_time, headers, content_type FROM msg_log WHERE id = ?1",
            [&id],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    get_status(r, 3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            },
        )
        .expect("the row");
    assert_eq!(msg, r#"{"name":"yolo"}"#);
    assert_eq!((exchange.as_str(), rk.as_str()), ("userExchange", "user"));
    assert_eq!((status, tries), (Status::Delivering, 0));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert!(
        (now - created).abs() < 60_000,
        "create_time {created} is not epoch ms"
    );
    assert!(
        updated >= created && next >= created - 1,
        "{updated} {next} {created}"
    );
    let headers: Value = serde_json::from_str(&headers).expect("headers JSON");
    assert_eq!(headers, json!({"a": 1, "b": "two", "c": true}));
    assert_eq!(ctype, "application/json");
}

// ---------------------------- kill -9 of the agent while it takes submits

/// `clients` threads pipeline `each` submits; returns the ids answered ok
/// (answers read until the agent closes, if it dies) and the count sent.
fn burst(agent: &Agent, clients: usize, each: usize, acked: &Arc<AtomicUsize>) -> Vec<String> {
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let mut c = agent.client();
            let acked = acked.clone();
            std::thread::spawn(move || {
                let mut writer = c.writer();
                let sender = std::thread::spawn(move || {
                    let mut out = std::io::BufWriter::new(&mut writer);
                    for i in 0..each {
                        let line = json!({
                            "exchange": "ex", "routing_key": "rk",
                            "id": format!("k{t}-{i}"), "payload": "x".repeat(200),
                        });
                        // The agent may be dead already.
                        if writeln!(out, "{line}").is_err() {
                            return;
                        }
                    }
                    let _ = out.flush();
                });
                let mut ok = Vec::new();
                while ok.len() < each {
                    let Some(answer) = c.read_answer() else { break };
                    ok.push(ok_id(&answer));
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                let _ = sender.join();
                ok
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("a client thread"))
        .collect()
}

#[test]
fn kill_9_right_after_a_burst_loses_nothing_acknowledged() {
    let mut agent = Agent::start(BIN);
    let acked = Arc::new(AtomicUsize::new(0));
    let ids = burst(&agent, 4, 500, &acked);
    agent.kill9();
    assert_eq!(ids.len(), 2000);
    agent.restart();
    agent.assert_all_stored(&ids);
    assert_eq!(agent.status_counts(), [(Status::Delivering, 2000)]);
}

#[test]
fn kill_9_during_a_burst_loses_nothing_acknowledged() {
    let mut agent = Agent::start(BIN);
    let acked = Arc::new(AtomicUsize::new(0));
    let ids = std::thread::scope(|s| {
        let run = s.spawn(|| burst(&agent, 4, 5_000, &acked));
        wait_until(
            "1,000 acknowledged submits",
            Duration::from_secs(60),
            || acked.load(Ordering::SeqCst) >= 1_000,
        );
        // Kill while requests are still in flight.
        let pid = agent.pid();
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        run.join().expect("the burst")
    });
    agent.kill9(); // reap
    assert!(ids.len() >= 1_000, "only {} acknowledged", ids.len());
    agent.restart();
    agent.assert_all_stored(&ids);
    eprintln!(
        "acknowledged {} before kill -9; {} rows after restart",
        ids.len(),
        agent.rows()
    );
}

// ---------------- kill -9 of the agent while it forwards; broker restarts

#[test]
fn acknowledged_messages_survive_kill_9_of_the_agent() {
    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let mut agent = Agent::builder(BIN).forwarding_to(&url).start();
    let ids = submit_many(&agent, &exchange, "k", "crash", 3_000);
    wait_until("some delivered", DRAIN, || {
        agent.count_status(Status::Delivered) > 0
    });
    agent.kill9();
    let stuck = agent.count_status(Status::Delivering);
    eprintln!("killed with {stuck} rows undelivered");
    agent.restart();
    agent.wait_all_delivered(3_000, DRAIN);
    let received = rt.block_on(amqp::received(&url, &queue));
    amqp::assert_all_received(&received, &ids);
    let copies: BTreeMap<&str, usize> = received.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.message_id.as_str()).or_default() += 1;
        m
    });
    eprintln!(
        "duplicates after the crash: {}",
        copies.values().filter(|c| **c > 1).count()
    );
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

#[test]
fn acknowledged_messages_survive_a_broker_restart_and_a_broker_kill() {
    let node = node::lock_restartable();
    let rt = rt();
    let url = node.url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let agent = Agent::builder(BIN).forwarding_to(&url).start();
    let mut all = Vec::new();
    for (round, kill) in [("restart", false), ("kill", true)] {
        let ids = std::thread::scope(|s| {
            let submitter = s.spawn(|| submit_many(&agent, &exchange, "k", round, 2_000));
            wait_until("progress", DRAIN, || {
                agent.count_status(Status::Delivered) > all.len() as i64
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
        agent.wait_all_delivered(all.len() as i64, DRAIN);
    }
    let received = rt.block_on(amqp::received(&url, &queue));
    amqp::assert_all_received(&received, &all);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

// ------------------------------ kill -9 of the agent while a handler runs

/// The ack follows the handler and the commit: while the handler runs, the
/// delivery is unacked; `kill -9` of the agent gives it back to the queue;
/// the restarted agent runs the handler again (redelivered) and consumes it.
#[test]
fn kill9_during_the_handler_returns_the_message_and_a_restart_consumes_it() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-kill"));
    let work = tempfile::tempdir().expect("tempdir");
    let (runs, started, pid) = (
        work.path().join("runs"),
        work.path().join("started"),
        work.path().join("pid"),
    );
    let _reaper = Reaper(pid.clone());
    // First run: note the pid, mark "started", hang. Any later run: succeed.
    let script = format!(
        "echo \"$EDGE_OUTBOX_REDELIVERED\" >> {runs}; \
         if [ -e {started} ]; then exit 0; fi; \
         echo $$ > {pid}; touch {started}; exec sleep 600",
        runs = sh_path(&runs),
        started = sh_path(&started),
        pid = sh_path(&pid),
    );
    let mut agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .set_str("consumer", "handler_timeout", "10m")
        .start();
    wait_consuming(&agent, &queue);
    let id = amqp::unique("kill9-msg");
    rt.block_on(amqp::publish_with_id(
        &url,
        "",
        &queue,
        b"survives a crash",
        Some(&id),
    ));
    wait_until("the handler to start", consumer::DEADLINE, || {
        started.exists()
    });
    wait_until("the delivery to be unacked", consumer::DEADLINE, || {
        broker::queue_counts(&queue) == Some((0, 1))
    });
    assert_eq!(
        agent.row(&id).map(|r| r.status),
        None,
        "nothing recorded yet"
    );

    agent.kill9();
    wait_until("the delivery to be ready again", consumer::DEADLINE, || {
        broker::queue_counts(&queue) == Some((1, 0))
    });
    assert_eq!(agent.row(&id).map(|r| r.status), None);

    agent.restart();
    let r = agent.wait_status(&id, Status::Consumed, consumer::DEADLINE);
    assert_eq!(r.consume_count, 0, "{r:?}");
    assert_eq!(r.body, b"survives a crash");
    wait_queue_settled(&queue);
    assert_eq!(
        lines(&runs),
        ["0", "1"],
        "one run per delivery; the second redelivered"
    );
}
