//! The idempotent manual-ack consumer against a real RabbitMQ
//! (docs/consuming.md): submit → publish → consume, duplicates acked without
//! running the handler, requeue then reject into a dead-letter exchange,
//! handler timeouts and the processes they leave, foreign messages,
//! deliveries without `message_id`, a prefetch-20 burst, a queue declared
//! with other arguments (406), a database that cannot record, quorum
//! queues. The kill -9 case is in `tests/durability.rs`, SIGTERM while a
//! handler runs in `tests/operations.rs`.
//!
//! Every test uses its own queue and exchange names on the shared broker and
//! deletes them at the end ([`Cleanup`]); unacked counts come from
//! `rabbitmqctl list_queues` ([`broker::queue_counts`], about 1 s a call).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use edge_outbox_testkit::amqp;
use edge_outbox_testkit::broker;
use edge_outbox_testkit::consumer::{
    lines, sh_path, wait_consuming, wait_queue_settled, Reaper, DEADLINE,
};
use edge_outbox_testkit::{ok_id, rt, toml_str, wait_until, Agent, Cleanup, Status};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use serde_json::json;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// A `[consumer] bindings` value with one direct binding.
fn binding(exchange: &str, routing_key: &str) -> String {
    format!(
        "[{{ exchange = {}, exchange_type = \"direct\", routing_key = {} }}]",
        toml_str(exchange),
        toml_str(routing_key)
    )
}

/// Log lines of the agent containing `needle`.
fn log_lines(agent: &Agent, needle: &str) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Submit → publish (confirmed) → the agent's own consumer receives it
/// through its binding → `record` → status 3, never a failed attempt.
#[test]
fn a_submitted_message_is_published_and_consumed() {
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let exchange = cleanup.exchange(amqp::unique("con-ex"));
    let queue = cleanup.queue(amqp::unique("con-q"));
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .set("consumer", "bindings", binding(&exchange, "k"))
        .start();
    // The consumer declares the exchange, the queue and the binding.
    wait_consuming(&agent, &queue);
    let id = ok_id(
        &agent
            .client()
            .submit(&exchange, "k", json!({"hello": "consumer"})),
    );
    let r = agent.wait_status(&id, Status::Consumed, DEADLINE);
    assert_eq!(r.try_count, 0, "{r:?}");
    assert_eq!(r.consume_count, 0, "{r:?}");
    assert_eq!(r.last_error, None, "{r:?}");
    assert_eq!(r.exchange, exchange);
    assert_eq!(r.routing_key, "k");
    wait_queue_settled(&queue);
    assert_eq!(
        agent.status_of(&id),
        Some(Status::Consumed),
        "status 3 stays"
    );
    assert_eq!(log_lines(&agent, "duplicate delivery"), 0);
}

/// After a message is consumed, the same `message_id` published three more
/// times by another client is acked each time without running the handler.
#[test]
fn a_consumed_message_id_delivered_again_is_acked_without_running_the_handler() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let exchange = cleanup.exchange(amqp::unique("con-dup-ex"));
    let queue = cleanup.queue(amqp::unique("con-dup"));
    let work = tempfile::tempdir().expect("tempdir");
    let runs = work.path().join("runs");
    let script = format!("echo \"$EDGE_OUTBOX_MESSAGE_ID\" >> {}", sh_path(&runs));
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .set("consumer", "bindings", binding(&exchange, "dup"))
        .start();
    wait_consuming(&agent, &queue);
    let id = ok_id(&agent.client().submit(&exchange, "dup", json!("once")));
    agent.wait_status(&id, Status::Consumed, DEADLINE);
    wait_queue_settled(&queue);
    assert_eq!(lines(&runs), [id.as_str()]);

    let again: Vec<(Option<String>, Vec<u8>)> = (0..3)
        .map(|i| (Some(id.clone()), format!("again {i}").into_bytes()))
        .collect();
    rt.block_on(amqp::publish_many(&url, &exchange, "dup", &again));
    wait_until("three duplicates logged", DEADLINE, || {
        log_lines(&agent, "duplicate delivery") == 3
    });
    wait_queue_settled(&queue);
    assert_eq!(lines(&runs), [id.as_str()], "the handler ran once in all");
    let r = agent.row(&id).expect("row");
    assert_eq!(r.status, Status::Consumed);
    assert_eq!(r.consume_count, 0);
    assert_eq!(r.body, b"once", "the row keeps the submitted body");
    assert_eq!(agent.rows(), 1);
}

/// A handler failing on its first run is requeued and succeeds on the
/// redelivery: two runs, status 3.
#[test]
fn a_handler_failing_once_runs_twice_and_the_message_is_consumed() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-once"));
    let work = tempfile::tempdir().expect("tempdir");
    let (runs, failed) = (work.path().join("runs"), work.path().join("failed"));
    let script = format!(
        "echo \"$EDGE_OUTBOX_REDELIVERED\" >> {runs}; \
         if [ ! -e {failed} ]; then touch {failed}; echo 'first run fails' >&2; exit 1; fi",
        runs = sh_path(&runs),
        failed = sh_path(&failed),
    );
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .start();
    wait_consuming(&agent, &queue);
    let id = amqp::unique("once-msg");
    rt.block_on(amqp::publish_with_id(
        &url,
        "",
        &queue,
        b"retry me",
        Some(&id),
    ));
    let r = agent.wait_status(&id, Status::Consumed, DEADLINE);
    assert_eq!(r.consume_count, 1, "one failed run counted: {r:?}");
    wait_queue_settled(&queue);
    assert_eq!(
        lines(&runs),
        ["0", "1"],
        "exactly two runs, the second redelivered"
    );
    assert_eq!(agent.status_of(&id), Some(Status::Consumed));
}

/// A handler that always fails runs `max_attempts` times; then the message
/// is rejected into the dead-letter exchange and the row is 2 with the
/// handler's stderr.
fn always_failing(max_attempts: Option<u32>) {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-fail"));
    let dlx = cleanup.exchange(amqp::unique("con-dlx"));
    let dlq = cleanup.queue(amqp::unique("con-dlq"));
    // The agent declares the DLX as a durable fanout: the same declaration.
    rt.block_on(amqp::declare_bound_queue(
        &url,
        &dlx,
        ExchangeKind::Fanout,
        &dlq,
        "",
    ));
    let work = tempfile::tempdir().expect("tempdir");
    let runs = work.path().join("runs");
    let script = format!(
        "echo run >> {}; echo 'no can do: disk on fire' >&2; exit 7",
        sh_path(&runs)
    );
    let mut builder = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .set_str("consumer", "dead_letter_exchange", &dlx);
    if let Some(n) = max_attempts {
        builder = builder.set("consumer", "max_attempts", n.to_string());
    }
    let agent = builder.start();
    let attempts = max_attempts.unwrap_or(2);
    wait_consuming(&agent, &queue);
    let id = amqp::unique("doomed");
    rt.block_on(amqp::publish_with_id(
        &url,
        "",
        &queue,
        b"doomed",
        Some(&id),
    ));
    let r = agent.wait_status(&id, Status::Failed, DEADLINE);
    assert_eq!(r.consume_count, i64::from(attempts), "{r:?}");
    let error = r.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("no can do: disk on fire") && error.contains("exit status 7"),
        "last_error: {error:?}"
    );
    wait_until("the message in the dead-letter queue", DEADLINE, || {
        rt.block_on(amqp::queue_len(&url, &dlq)) == 1
    });
    wait_queue_settled(&queue);
    assert_eq!(lines(&runs).len(), attempts as usize, "one run per attempt");
    let dead = rt.block_on(amqp::received(&url, &dlq));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, id);
    assert_eq!(dead[0].body, b"doomed");
    assert_eq!(agent.status_of(&id), Some(Status::Failed), "status 2 stays");
    assert_eq!(
        lines(&runs).len(),
        attempts as usize,
        "no run after giving up"
    );
}

#[test]
fn an_always_failing_handler_dead_letters_after_the_default_two_attempts() {
    always_failing(None);
}

#[test]
fn an_always_failing_handler_dead_letters_after_three_attempts() {
    always_failing(Some(3));
}

/// A handler that hangs is killed at `consumer.handler_timeout` and counted
/// as a failed attempt.
#[test]
fn a_hanging_handler_is_killed_at_the_timeout_and_counted_as_a_failure() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-hang"));
    let work = tempfile::tempdir().expect("tempdir");
    let pids = work.path().join("pids");
    let _reaper = Reaper(pids.clone());
    let script = format!("echo $$ >> {}; exec sleep 600", sh_path(&pids));
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .set_str("consumer", "handler_timeout", "1s")
        .set("consumer", "max_attempts", "1")
        .start();
    wait_consuming(&agent, &queue);
    let id = amqp::unique("hang");
    let published = Instant::now();
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"zzz", Some(&id)));
    let r = agent.wait_status(&id, Status::Failed, DEADLINE);
    let took = published.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "a 1 s timeout took {took:?}"
    );
    assert_eq!(r.consume_count, 1, "{r:?}");
    let error = r.last_error.unwrap_or_default();
    assert!(
        error.contains("killed") && error.contains("handler_timeout"),
        "last_error: {error:?}"
    );
    let pid = lines(&pids);
    assert_eq!(pid.len(), 1, "one run");
    let proc_dir = PathBuf::from(format!("/proc/{}", pid[0].trim()));
    wait_until("the handler process to be gone", DEADLINE, || {
        !proc_dir.exists()
    });
    wait_queue_settled(&queue);
}

/// A message another publisher sent with an id this agent never saw is
/// handled once and recorded: a new row, status 3, with its exchange,
/// routing key and body (byte-exact, also when it is not UTF-8).
#[test]
fn a_foreign_message_is_handled_and_recorded_as_consumed() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let exchange = cleanup.exchange(amqp::unique("con-foreign-ex"));
    let queue = cleanup.queue(amqp::unique("con-foreign"));
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .set("consumer", "bindings", binding(&exchange, "elsewhere"))
        .start();
    wait_consuming(&agent, &queue);
    let (text_id, binary_id) = (amqp::unique("foreign-t"), amqp::unique("foreign-b"));
    let text = br#"{"from":"another publisher"}"#.to_vec();
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    let messages = vec![
        (Some(text_id.clone()), text.clone()),
        (Some(binary_id.clone()), binary.clone()),
    ];
    rt.block_on(amqp::publish_many(&url, &exchange, "elsewhere", &messages));
    for (id, body) in [(&text_id, &text), (&binary_id, &binary)] {
        let r = agent.wait_status(id, Status::Consumed, DEADLINE);
        assert_eq!(r.exchange, exchange, "{r:?}");
        assert_eq!(r.routing_key, "elsewhere");
        assert_eq!(&r.body, body, "{id}: the body is kept byte-exact");
        assert_eq!((r.try_count, r.consume_count), (0, 0));
        assert_eq!(r.last_error, None);
    }
    wait_queue_settled(&queue);
    assert_eq!(agent.rows(), 2);
    assert_eq!(agent.count_status(Status::Consumed), 2);
}

/// A delivery without `message_id` is handled (no deduplication, no row)
/// and acked.
#[test]
fn a_delivery_without_message_id_is_handled_and_acked() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-noid"));
    let work = tempfile::tempdir().expect("tempdir");
    let runs = work.path().join("runs");
    let script = format!(
        "echo \"id=[$EDGE_OUTBOX_MESSAGE_ID] body=[$(cat)]\" >> {}",
        sh_path(&runs)
    );
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .start();
    wait_consuming(&agent, &queue);
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"anonymous", None));
    wait_until("the handler to run", DEADLINE, || !lines(&runs).is_empty());
    wait_queue_settled(&queue);
    assert_eq!(lines(&runs), ["id=[] body=[anonymous]"]);
    assert_eq!(agent.rows(), 0, "nothing to key a row on");
    assert!(
        log_lines(&agent, "without message_id") >= 1,
        "the delivery is logged"
    );
}

/// Prefetch 20 and a 2,000-message backlog: every message is handled exactly
/// once, recorded 3 and acked; never more than 20 unacked at a time.
#[test]
fn a_prefetch_20_backlog_of_2000_is_handled_exactly_once_and_all_acked() {
    const N: usize = 2000;
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-bulk"));
    rt.block_on(amqp::declare_queue(&url, &queue));
    let ids: Vec<String> = (0..N).map(|i| format!("bulk-{i}")).collect();
    let messages: Vec<(Option<String>, Vec<u8>)> = ids
        .iter()
        .map(|id| (Some(id.clone()), format!("body of {id}").into_bytes()))
        .collect();
    rt.block_on(amqp::publish_many(&url, "", &queue, &messages));
    assert_eq!(broker::queue_counts(&queue), Some((N as u64, 0)));

    let work = tempfile::tempdir().expect("tempdir");
    let handled = work.path().join("handled");
    let script = format!("echo \"$EDGE_OUTBOX_MESSAGE_ID\" >> {}", sh_path(&handled));
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .set("consumer", "prefetch", "20")
        .start();
    let mut max_unacked = 0;
    wait_until("every message consumed", Duration::from_secs(300), || {
        let (_, unacked) = broker::queue_counts(&queue).expect("the queue");
        max_unacked = max_unacked.max(unacked);
        assert!(unacked <= 20, "{unacked} unacked with prefetch 20");
        agent.count_status(Status::Consumed) == N as i64
    });
    wait_queue_settled(&queue);
    let lines = lines(&handled);
    assert_eq!(lines.len(), N, "one handler run per message");
    let distinct: HashSet<&str> = lines.iter().map(String::as_str).collect();
    let expected: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(distinct, expected, "each message handled exactly once");
    assert_eq!(agent.rows(), N as i64);
    assert_eq!(
        agent.db_count("SELECT COALESCE(SUM(consume_count), 0) FROM msg_log"),
        0
    );
    eprintln!("max unacked seen: {max_unacked}");
}

/// The consumer's queue exists with other arguments: the broker refuses the
/// declaration (406 PRECONDITION_FAILED). The agent says so clearly, does
/// not retry in a hot loop, and keeps running and forwarding.
#[test]
fn a_queue_with_other_arguments_is_reported_and_not_retried_in_a_hot_loop() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-406"));
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(10));
    rt.block_on(amqp::declare_queue_with_args(&url, &queue, arguments));
    // Forwarding goes elsewhere.
    let exchange = cleanup.exchange(amqp::unique("con-406-ex"));
    let out = cleanup.queue(amqp::unique("con-406-out"));
    rt.block_on(amqp::declare_exchange_with_queue(
        &url, &exchange, &out, "out",
    ));

    let mut agent = Agent::builder(BIN).consuming(&url, &queue).start();
    let refusal = |agent: &Agent| {
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains("PRECONDITION_FAILED") || l.contains("406"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    wait_until("the refusal in the log", DEADLINE, || {
        !refusal(&agent).is_empty()
    });
    let first = Instant::now();
    let lines = refusal(&agent);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ERROR") && l.contains(&queue) && l.contains("PRECONDITION")),
        "an error naming the queue and the refusal: {lines:#?}"
    );

    // Meanwhile the agent forwards.
    let id = ok_id(&agent.client().submit(&exchange, "out", json!("still here")));
    agent.wait_status(&id, Status::Delivered, DEADLINE);
    let got = rt.block_on(amqp::received(&url, &out));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id, id);

    // Watch for 3 s in all: the agent stays up and does not retry hot.
    while first.elapsed() < Duration::from_secs(3) {
        assert!(
            agent.is_running(),
            "the agent exited:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // One attempt logs the agent's error (plus lapin's and a warning): at
    // most two attempts in ~3 s.
    let attempts = refusal(&agent)
        .iter()
        .filter(|l| l.contains("ERROR edge_outbox::consume"))
        .count();
    assert!(
        (1..=2).contains(&attempts),
        "{attempts} declaration attempts logged in ~3 s: {:#?}",
        refusal(&agent)
    );
    assert!(
        refusal(&agent).len() <= 6,
        "too many refusal lines: {:#?}",
        refusal(&agent)
    );
    eprintln!("refusal lines in ~3 s: {:#?}", refusal(&agent));
    // The queue is left as it was.
    assert_eq!(broker::queue_counts(&queue), Some((0, 0)));
    assert!(agent.is_running());
}

/// Copies of one `message_id` delivered together (a backlog holding a
/// re-published message, prefetch > 1) run the handler once: the second
/// copy must not pass the "status 3 already?" check while the first copy's
/// handler still runs.
#[test]
fn copies_of_one_message_id_in_flight_together_run_the_handler_once() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-twins"));
    rt.block_on(amqp::declare_queue(&url, &queue));
    let id = amqp::unique("twin");
    let copies: Vec<(Option<String>, Vec<u8>)> = (0..3)
        .map(|i| (Some(id.clone()), format!("copy {i}").into_bytes()))
        .collect();
    rt.block_on(amqp::publish_many(&url, "", &queue, &copies));

    let work = tempfile::tempdir().expect("tempdir");
    let runs = work.path().join("runs");
    let script = format!(
        "echo \"$EDGE_OUTBOX_MESSAGE_ID\" >> {}; sleep 0.5",
        sh_path(&runs)
    );
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .set("consumer", "prefetch", "10")
        .start();
    agent.wait_status(&id, Status::Consumed, DEADLINE);
    wait_queue_settled(&queue);
    assert_eq!(lines(&runs), [id.as_str()], "the handler ran once");
    assert_eq!(log_lines(&agent, "duplicate delivery"), 2);
    assert_eq!(agent.status_of(&id), Some(Status::Consumed));
}

/// A handler killed at `consumer.handler_timeout` takes what it started with
/// it (a script whose command is not `exec`ed): it runs in a process group
/// of its own, killed as a group.
#[test]
fn a_timed_out_handler_leaves_no_process_behind() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-orphan"));
    let work = tempfile::tempdir().expect("tempdir");
    let pids = work.path().join("pids");
    let _reaper = Reaper(pids.clone());
    // `sleep` runs as a child of the shell, which waits for it.
    let script = format!("sleep 600 & echo $! >> {}; wait", sh_path(&pids));
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .set_str("consumer", "handler_timeout", "1s")
        .set("consumer", "max_attempts", "1")
        .start();
    wait_consuming(&agent, &queue);
    let id = amqp::unique("orphan");
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"", Some(&id)));
    agent.wait_status(&id, Status::Failed, DEADLINE);
    let pid = lines(&pids);
    assert_eq!(pid.len(), 1);
    let proc_dir = PathBuf::from(format!("/proc/{}", pid[0].trim()));
    wait_until("the handler's child to be gone", DEADLINE, || {
        !proc_dir.exists()
    });
}

/// A handler that exits 0 but leaves a background process holding its
/// stderr open succeeds: its exit status decides (shortly after it exits),
/// not the background process closing stderr (which, past the timeout, made
/// it a "killed" failure before the fix).
#[test]
fn a_handler_exiting_0_with_a_background_child_succeeds() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-bg"));
    let work = tempfile::tempdir().expect("tempdir");
    let pids = work.path().join("pids");
    let _reaper = Reaper(pids.clone());
    let script = format!(
        "sleep 600 >/dev/null & echo $! >> {}; exit 0",
        sh_path(&pids)
    );
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .set_str("consumer", "handler_timeout", "3s")
        .set("consumer", "max_attempts", "1")
        .start();
    wait_consuming(&agent, &queue);
    let id = amqp::unique("bg");
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"", Some(&id)));
    wait_until("the row to be settled", DEADLINE, || {
        matches!(
            agent.status_of(&id),
            Some(Status::Failed | Status::Consumed)
        )
    });
    let r = agent.row(&id).expect("row");
    assert_eq!(r.status, Status::Consumed, "the handler exited 0: {r:?}");
}

/// A handler that writes a lot to stderr (more than the 64 KiB the agent
/// keeps) and exits 0 succeeds: its stderr is read to the end, not closed
/// under it.
#[test]
fn a_verbose_handler_exiting_0_succeeds() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-verbose"));
    // About 300 KiB on stderr, line by line, from the shell itself.
    let script = "i=0; while [ $i -lt 10000 ]; do \
                  echo \"verbose handler diagnostics, line $i\" >&2; i=$((i+1)); done; exit 0";
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(script)
        .set("consumer", "max_attempts", "1")
        .start();
    wait_consuming(&agent, &queue);
    let id = amqp::unique("verbose");
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"", Some(&id)));
    wait_until("the row to be settled", DEADLINE, || {
        matches!(
            agent.status_of(&id),
            Some(Status::Failed | Status::Consumed)
        )
    });
    let r = agent.row(&id).expect("row");
    assert_eq!(r.status, Status::Consumed, "the handler exited 0: {r:?}");
    wait_queue_settled(&queue);
}

/// A delivery whose outcome cannot be committed (the database is locked by
/// someone else past the busy timeout) is not left unacked for the life of
/// the channel: it goes back to the queue and is consumed once the database
/// is writable again, without a reconnect. (With prefetch 1, the default, a
/// stranded delivery would stop the consumer altogether.)
#[test]
fn a_delivery_that_cannot_be_recorded_is_requeued_not_stranded() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-locked"));
    let agent = Agent::builder(BIN).consuming(&url, &queue).start();
    wait_consuming(&agent, &queue);
    // Someone holds the write lock longer than the agent's busy timeout.
    let locker = agent.db();
    locker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("taking the write lock");
    let id = amqp::unique("locked");
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"later", Some(&id)));
    wait_until("the failed commit in the log", DEADLINE, || {
        log_lines(&agent, "could not record a delivery") >= 1
    });
    locker
        .execute_batch("ROLLBACK")
        .expect("releasing the lock");
    drop(locker);
    let second = amqp::unique("after");
    rt.block_on(amqp::publish_with_id(
        &url,
        "",
        &queue,
        b"next",
        Some(&second),
    ));
    agent.wait_status(&id, Status::Consumed, DEADLINE);
    agent.wait_status(&second, Status::Consumed, DEADLINE);
    wait_queue_settled(&queue);
    assert_eq!(
        log_lines(&agent, "consumer lost its connection"),
        0,
        "no reconnect needed"
    );
}

/// `queue_type = "quorum"`: the agent declares a quorum queue and consumes
/// from it like from a classic one.
#[test]
fn a_quorum_queue_is_declared_and_consumed() {
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let exchange = cleanup.exchange(amqp::unique("con-qq-ex"));
    let queue = cleanup.queue(amqp::unique("con-qq"));
    let agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .set_str("consumer", "queue_type", "quorum")
        .set("consumer", "bindings", binding(&exchange, "qq"))
        .start();
    wait_consuming(&agent, &queue);
    let ids: Vec<String> = (0..20)
        .map(|i| ok_id(&agent.client().submit(&exchange, "qq", json!({ "n": i }))))
        .collect();
    for id in &ids {
        agent.wait_status(id, Status::Consumed, DEADLINE);
    }
    wait_queue_settled(&queue);
    assert_eq!(
        broker::queue_info(&queue, &["type"]),
        Some(vec!["quorum".to_string()])
    );
}
