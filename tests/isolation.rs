//! Fault isolation against a real RabbitMQ (docs/forwarding.md, Outcomes
//! and Logs): one bad message never stops the others, costs only itself,
//! and is charged each attempt with the broker's reply code; what the
//! agent's own consumer declares exists before the forwarder publishes to
//! it; a flood of failures logs a few hundred lines.
//!
//! Every test runs a stream of good messages beside the bad ones and checks
//! what a user sees: statuses, `try_count` and `last_error` of the rows,
//! the messages in the good queue, the metrics endpoint, the log file, and
//! the agent's CPU time once everything settled.
//!
//! The bad messages, one class per broker refusal (the code `last_error`
//! starts with):
//!
//! | class | how | the broker | `last_error` |
//! |---|---|---|---|
//! | no route | submit, a routing key nothing is bound to | `basic.return`, then ack | `312` |
//! | missing exchange | submit, an exchange that does not exist (up to 255 bytes) | closes the channel | `404` |
//! | `CC` a string, `BCC` a number | written into `msg_log` (submit refuses them) | closes the channel | `406` |
//! | internal exchange | submit, an exchange declared `internal` | closes the channel | `403` |
//! | full queue | submit, a queue with `x-max-length = 0`, `x-overflow = reject-publish` | `basic.nack` | `basic.nack` |
//!
//! The liveness bound (issue 9; docs/forwarding.md, Isolating a message the
//! broker refuses): once the broker is reachable, every good message is
//! confirmed within 2 × `publish.confirm_timeout` + the reconnect backoff's
//! cap (10 s) + a drain allowance per message handed over at once
//! ([`bound`]), measured per row (`update_time - create_time`). The bad
//! ones have no bound of their own: they get, on top, two channel reopens
//! per attempt at the reopen backoff's cap ([`bad_deadline`]).
//!
//! `EDGE_OUTBOX_TEST_SEED` re-runs the randomized test with one seed;
//! `EDGE_OUTBOX_TEST_RUNS` sets how often the outage test repeats (2).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_outbox_testkit::amqp;
use edge_outbox_testkit::broker;
use edge_outbox_testkit::cpu::cpu_share;
use edge_outbox_testkit::db::RawRow;
use edge_outbox_testkit::metrics::{free_port, listen_on, samples, scrape};
use edge_outbox_testkit::prefill::{prefill_database, PrefillRow};
use edge_outbox_testkit::{
    ok_id, request_many, rt, submit_many, toml_str, wait_until, Agent, AgentBuilder, Cleanup,
    FaultProxy, Mode, Status,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// `publish.confirm_timeout` of these tests.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// The cap of the reconnect backoff (docs/forwarding.md, Reconnecting).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The cap of the channel-reopen backoff (docs/forwarding.md, Reconnecting).
const REOPEN_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The drain allowance per message in [`bound`].
const PER_MESSAGE: Duration = Duration::from_millis(10);
/// `publish.max_in_flight` (the default): the copies a lost channel may
/// leave behind at most.
const WINDOW: f64 = 256.0;
/// The agent's CPU, once everything settled: under this share of one core.
const IDLE_CPU: f64 = 0.05;

/// The liveness bound when up to `burst` messages are handed to the agent
/// at once: 2 × confirm timeout + the backoff cap + the drain allowance of
/// the burst. A steady trickle (about 100 a second, far below the drain
/// rate) builds no backlog: it counts as a burst of [`TRICKLE`].
fn bound(burst: usize) -> Duration {
    2 * CONFIRM_TIMEOUT + MAX_BACKOFF + PER_MESSAGE * u32::try_from(burst).unwrap_or(u32::MAX)
}

/// The burst a trickle of good messages counts as in [`bound`].
const TRICKLE: usize = 100;

// ------------------------------------------------------------ the corpus

/// A class of bad message: what the broker does with it (module header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Bad {
    NoRoute,
    MissingExchange,
    CcString,
    BccNumber,
    Internal,
    FullQueue,
}

impl Bad {
    const ALL: [Bad; 6] = [
        Bad::NoRoute,
        Bad::MissingExchange,
        Bad::CcString,
        Bad::BccNumber,
        Bad::Internal,
        Bad::FullQueue,
    ];

    /// Whether the broker answers it by closing the publishing channel.
    fn closes_the_channel(self) -> bool {
        matches!(self, Bad::CcString | Bad::BccNumber | Bad::Internal)
    }

    /// What the row's `last_error` starts with: the broker's reply code.
    fn code(self) -> &'static str {
        match self {
            Bad::NoRoute => "312",
            Bad::MissingExchange => "404",
            Bad::CcString | Bad::BccNumber => "406",
            Bad::Internal => "403",
            Bad::FullQueue => "basic.nack",
        }
    }
}

/// One message of a test, as it reaches the agent.
enum Message {
    /// A submit request on the socket.
    Submit(Value),
    /// A row written into `msg_log` directly.
    Insert(RawRow),
}

/// The broker side of one test: a good exchange and queue (routing key
/// `good`), and a target for each bad class. Deleted when dropped.
struct World {
    rt: tokio::runtime::Runtime,
    url: String,
    good_exchange: String,
    good_queue: String,
    internal_exchange: String,
    full_queue: String,
    _cleanup: Cleanup,
}

impl World {
    fn new() -> World {
        let rt = rt();
        let url = broker::default_url();
        let mut cleanup = Cleanup::new(&url);
        let good_exchange = cleanup.exchange(amqp::unique("iso-ex"));
        let good_queue = cleanup.queue(amqp::unique("iso-q"));
        let internal_exchange = cleanup.exchange(amqp::unique("iso-internal"));
        let full_queue = cleanup.queue(amqp::unique("iso-full"));
        rt.block_on(async {
            amqp::declare_exchange_with_queue(&url, &good_exchange, &good_queue, "good").await;
            amqp::declare_internal_exchange(&url, &internal_exchange).await;
            let mut args = FieldTable::default();
            args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            amqp::declare_queue_with_args(&url, &full_queue, args).await;
        });
        World {
            rt,
            url,
            good_exchange,
            good_queue,
            internal_exchange,
            full_queue,
            _cleanup: cleanup,
        }
    }

    /// An agent forwarding to this broker with `max_attempts`, short
    /// retries, [`CONFIRM_TIMEOUT`], and metrics on `metrics_port`.
    fn agent(&self, max_attempts: i64, metrics_port: u16) -> AgentBuilder {
        Agent::builder(BIN)
            .forwarding_to(&self.url)
            .set("publish", "max_attempts", max_attempts.to_string())
            .set_str("publish", "retry_interval", "200ms")
            .set_str(
                "publish",
                "confirm_timeout",
                format!("{}s", CONFIRM_TIMEOUT.as_secs()),
            )
            .set("metrics", "listen", listen_on(metrics_port))
    }

    /// A good message `id`.
    fn good(&self, id: &str) -> Value {
        json!({"exchange": self.good_exchange, "routing_key": "good", "id": id,
               "payload": {"good": id}})
    }

    /// A good message `id` written into `msg_log` directly.
    fn good_row(&self, id: &str) -> RawRow {
        RawRow {
            id: id.to_owned(),
            exchange: self.good_exchange.clone(),
            routing_key: "good".to_owned(),
            body: json!({"good": id}).to_string(),
            headers: None,
        }
    }

    /// A bad message `id` of `class`; `missing` names the exchange a
    /// missing-exchange message goes to.
    fn bad(&self, class: Bad, id: &str, missing: &str) -> Message {
        let submit = |exchange: &str, routing_key: &str| {
            Message::Submit(json!({"exchange": exchange, "routing_key": routing_key,
                                   "id": id, "payload": {"bad": id}}))
        };
        let insert = |headers: Value| {
            Message::Insert(RawRow {
                headers: Some(headers.to_string()),
                ..self.good_row(id)
            })
        };
        match class {
            Bad::NoRoute => submit(&self.good_exchange, "bound-to-nothing"),
            Bad::MissingExchange => submit(missing, "good"),
            // RabbitMQ wants CC and BCC as arrays of strings (406 otherwise).
            Bad::CcString => insert(json!({"CC": self.good_queue})),
            Bad::BccNumber => insert(json!({"BCC": 7})),
            Bad::Internal => submit(&self.internal_exchange, "good"),
            Bad::FullQueue => submit("", &self.full_queue),
        }
    }
}

/// The name of an exchange that does not exist, `len` bytes long (at least 40).
fn missing_exchange(len: usize) -> String {
    let mut name = amqp::unique("iso-missing");
    name.push('-');
    while name.len() < len {
        name.push('x');
    }
    name.truncate(len);
    name
}

/// Hands `messages` to the agent in their order: runs of submits pipelined
/// on one connection (each answered `ok`), runs of rows inserted in one
/// transaction.
fn send(agent: &Agent, messages: Vec<Message>) {
    let mut submits = Vec::new();
    let mut inserts = Vec::new();
    let flush_submits = |submits: &mut Vec<Value>| {
        for answer in request_many(agent, submits) {
            ok_id(&answer);
        }
        submits.clear();
    };
    for message in messages {
        match message {
            Message::Submit(request) => {
                if !inserts.is_empty() {
                    agent.insert_rows(&inserts);
                    inserts.clear();
                }
                submits.push(request);
            }
            Message::Insert(row) => {
                if !submits.is_empty() {
                    flush_submits(&mut submits);
                }
                inserts.push(row);
            }
        }
    }
    if !submits.is_empty() {
        flush_submits(&mut submits);
    }
    if !inserts.is_empty() {
        agent.insert_rows(&inserts);
    }
}

/// Sets its flag when dropped: a thread stopped by the flag ends even when
/// the test panics inside `std::thread::scope` (which waits for it).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Submits good messages one at a time, about 100 a second, until `stop`;
/// counts them in `submitted`; returns their ids.
fn good_stream(
    agent: &Agent,
    world: &World,
    prefix: &str,
    submitted: &AtomicUsize,
    stop: &AtomicBool,
) -> Vec<String> {
    let mut client = agent.client();
    let mut ids = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let id = format!("{prefix}-{}", ids.len());
        ids.push(ok_id(&client.request(&world.good(&id))));
        submitted.fetch_add(1, Ordering::SeqCst);
        // Pacing, not waiting for anything: a steady trickle of submits.
        std::thread::sleep(Duration::from_millis(10));
    }
    ids
}

// ----------------------------------------------------------- the checks

/// A counter (or gauge) scraped from the agent; 0 when it has no sample yet.
fn metric(port: u16, name: &str) -> f64 {
    samples(&scrape(port))
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(0.0, |(_, v)| v)
}

/// Rows of `ids` not yet in a final status (delivered, failed, consumed).
fn unsettled(agent: &Agent, ids: &[String]) -> usize {
    ids.iter()
        .filter(|id| {
            !matches!(
                agent.status_of(id),
                Some(Status::Delivered | Status::Failed | Status::Consumed)
            )
        })
        .count()
}

/// Waits until every row of `ids` is settled and returns how long it took;
/// Err past `deadline`, showing the rows still unsettled.
fn settle(agent: &Agent, ids: &[String], deadline: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    while unsettled(agent, ids) > 0 {
        if start.elapsed() > deadline {
            let open: Vec<String> = ids
                .iter()
                .filter_map(|id| agent.row(id).map(|r| (id, r)))
                .filter(|(_, r)| !matches!(r.status, Status::Delivered | Status::Failed))
                .take(10)
                .map(|(id, r)| {
                    format!(
                        "{id}: {} try_count {} last_error {:?}",
                        r.status.name(),
                        r.try_count,
                        r.last_error
                    )
                })
                .collect();
            return Err(format!(
                "{} of {} rows not settled after {deadline:?}: {open:#?}",
                unsettled(agent, ids),
                ids.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(start.elapsed())
}

/// p50, p99 and max of submit → confirm of the delivered rows of `good`, ms.
fn good_latency(agent: &Agent, good: &[String]) -> String {
    let mut times = agent.delivery_times_ms(good);
    times.sort_unstable();
    format!(
        "submit→confirm of {} delivered good messages (of {}): p50 {} ms, p99 {} ms, max {} ms",
        times.len(),
        good.len(),
        percentile(&times, 50),
        percentile(&times, 99),
        times.last().copied().unwrap_or(0)
    )
}

/// [`settle`], or a panic that also shows how the good messages fared.
fn wait_settled(agent: &Agent, ids: &[String], deadline: Duration, good: &[String]) -> Duration {
    settle(agent, ids, deadline).unwrap_or_else(|e| panic!("{e}\n{}", good_latency(agent, good)))
}

/// How long the bad messages of a test may take to settle: the liveness
/// bound, plus, for each message that makes the broker close the channel,
/// two channel reopens per attempt at the reopen backoff's cap
/// (docs/forwarding.md, Reconnecting and Isolating).
fn bad_deadline(burst: usize, bad: &[(String, Bad)], max_attempts: i64) -> Duration {
    let closing = bad
        .iter()
        .filter(|(_, class)| class.closes_the_channel())
        .count();
    bound(burst)
        + REOPEN_BACKOFF_CAP * 2 * u32::try_from(closing as i64 * max_attempts).unwrap_or(u32::MAX)
}

/// The percentile `p` (0-100) of sorted `values`.
fn percentile(sorted: &[i64], p: usize) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Asserts the properties every isolation test shares, once every row
/// settled: each good row delivered with no attempt charged and confirmed
/// within the bound of `burst` ([`bound`]); each bad row failed after `max_attempts`
/// attempts with its class's reply code; publishes per bad message bounded;
/// one connection all along; every good message in the good queue; the
/// agent's CPU back to idle. Prints the figures.
fn assert_isolated(
    world: &World,
    agent: &Agent,
    port: u16,
    good: &[String],
    bad: &[(String, Bad)],
    max_attempts: i64,
    burst: usize,
) {
    let limit = bound(burst);
    for id in good {
        let row = agent.row(id).unwrap_or_else(|| panic!("no row {id}"));
        assert_eq!(row.status, Status::Delivered, "good {id}: {row:?}");
        assert_eq!(row.try_count, 0, "good {id} was charged: {row:?}");
    }
    for (id, class) in bad {
        let row = agent.row(id).unwrap_or_else(|| panic!("no row {id}"));
        assert_eq!(row.status, Status::Failed, "{class:?} {id}: {row:?}");
        assert_eq!(row.try_count, max_attempts, "{class:?} {id}: {row:?}");
        let error = row.last_error.clone().unwrap_or_default();
        assert!(
            error.starts_with(class.code()),
            "{class:?} {id}: last_error should start with {}: {row:?}",
            class.code()
        );
    }

    // The figures first, so a failing run still shows them all.
    let mut times = agent.delivery_times_ms(good);
    times.sort_unstable();
    let slowest = times.last().copied().unwrap_or(0);
    let publishes = metric(port, "edge_outbox_publishes_total");
    let closes = metric(port, "edge_outbox_channel_closes_total");
    let connects = metric(port, "edge_outbox_connects_total");
    // Per bad message: its own tries (a group round, alone, again per
    // attempt), and once, the first time it closes the channel before it is
    // known, a republish of the rows that were on the wire with it (at most
    // the in-flight window: docs/forwarding.md, Isolating a message the
    // broker refuses). Later tries of a known culprit go out alone.
    let allowed = good.len() as f64 + bad.len() as f64 * (max_attempts as f64 * 3.0 + WINDOW);
    let received = world
        .rt
        .block_on(amqp::received(&world.url, &world.good_queue));
    let good_set: HashSet<&str> = good.iter().map(String::as_str).collect();
    let copies = received
        .iter()
        .filter(|m| good_set.contains(m.message_id.as_str()))
        .count();
    let cpu = cpu_share(agent.pid(), Duration::from_secs(3));
    eprintln!(
        "figures: {} good, {} bad (max_attempts {max_attempts}); submit→confirm of good \
         messages p50 {} ms, p99 {} ms, max {slowest} ms (bound {limit:?}); publishes {publishes} \
         (at most {allowed}); channel closes {closes}; connects {connects}; good copies in the \
         queue {copies} ({:.2}% extra); agent CPU afterwards {:.2}% of a core",
        good.len(),
        bad.len(),
        percentile(&times, 50),
        percentile(&times, 99),
        (copies as f64 / good.len().max(1) as f64 - 1.0) * 100.0,
        cpu * 100.0
    );

    amqp::assert_all_received(&received, good);
    assert!(
        u128::try_from(slowest).unwrap_or(0) <= limit.as_millis(),
        "a good message took {slowest} ms from submit to confirm (bound {limit:?})"
    );
    assert!(
        publishes <= allowed,
        "{publishes} publishes for {} good and {} bad messages (at most {allowed})",
        good.len(),
        bad.len()
    );
    assert_eq!(connects, 1.0, "a connection-level error: reconnected");
    assert!(
        cpu < IDLE_CPU,
        "the agent still uses {:.1}% of a core once everything settled",
        cpu * 100.0
    );
}

// ------------------------------------------------------------- the tests

/// One bad message of every class (a missing exchange with a 255-byte
/// name among them) while good messages are submitted before, during and
/// after: the good ones are confirmed within the bound, each bad one fails
/// after `max_attempts` with the broker's reply code.
#[test]
fn poison_corpus_never_stops_the_good_ones() {
    const MAX_ATTEMPTS: i64 = 3;
    let world = World::new();
    let port = free_port();
    let agent = world.agent(MAX_ATTEMPTS, port).start();
    let missing = missing_exchange(255);
    let corpus: Vec<(String, Bad)> = Bad::ALL
        .iter()
        .map(|class| (format!("bad-{class:?}"), *class))
        .collect();
    // The corpus comes at once, beside the trickle.
    let burst = TRICKLE + corpus.len();
    let submitted = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let good = std::thread::scope(|s| {
        let stopper = StopOnDrop(&stop);
        let stream = s.spawn(|| good_stream(&agent, &world, "good", &submitted, &stop));
        wait_until("100 good messages submitted", bound(TRICKLE), || {
            submitted.load(Ordering::SeqCst) >= 100
        });
        send(
            &agent,
            corpus
                .iter()
                .map(|(id, class)| world.bad(*class, id, &missing))
                .collect(),
        );
        let bad_ids: Vec<String> = corpus.iter().map(|(id, _)| id.clone()).collect();
        let deadline = bad_deadline(burst, &corpus, MAX_ATTEMPTS);
        let failed = settle(&agent, &bad_ids, deadline).unwrap_or_else(|e| {
            let so_far: Vec<String> = (0..submitted.load(Ordering::SeqCst))
                .map(|i| format!("good-{i}"))
                .collect();
            panic!("{e}\n{}", good_latency(&agent, &so_far))
        });
        eprintln!("the bad messages settled {failed:?} after they were sent");
        // Good messages go on after the bad ones are done.
        let after = submitted.load(Ordering::SeqCst) + 100;
        wait_until("100 more good messages submitted", bound(TRICKLE), || {
            submitted.load(Ordering::SeqCst) >= after
        });
        drop(stopper);
        stream.join().expect("the good stream")
    });
    let last_submit = Instant::now();
    let drained = wait_settled(&agent, &good, bound(burst), &good);
    eprintln!(
        "{} good messages over {:?}; all settled {drained:?} after the last submit",
        good.len(),
        last_submit - start
    );
    assert_isolated(&world, &agent, port, &good, &corpus, MAX_ATTEMPTS, burst);
}

/// The seed of the randomized test: `EDGE_OUTBOX_TEST_SEED`, else the clock.
fn seed() -> u64 {
    match std::env::var("EDGE_OUTBOX_TEST_SEED")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        Some(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("EDGE_OUTBOX_TEST_SEED={text:?} is not a number")),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

/// Good and bad messages (3 to 12 bad ones, of random classes, to missing
/// exchanges of random name lengths up to 255 bytes) in random order,
/// submitted or written into `msg_log`, in chunks spread over a few
/// seconds: the same properties as the corpus. Re-run one case with
/// `EDGE_OUTBOX_TEST_SEED=N`.
#[test]
fn randomized_poison_mix() {
    let seed = seed();
    eprintln!("seed={seed} (EDGE_OUTBOX_TEST_SEED={seed} re-runs this case)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = rng.usize(200..=2_000);
    // Few enough that the bad ones settle within nextest's timeout even at
    // the reopen backoff's cap ([`bad_deadline`]).
    let bad_count = rng.usize(3..=12);
    let max_attempts = rng.i64(2..=3);
    let world = World::new();
    let missing: Vec<String> = (0..3)
        .map(|_| {
            missing_exchange(
                *rng.choice(&[40usize, 120, 230, 250, 254, 255])
                    .unwrap_or(&255),
            )
        })
        .collect();
    let mut bad_at = HashSet::new();
    while bad_at.len() < bad_count {
        bad_at.insert(rng.usize(0..total));
    }
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut messages = Vec::new();
    for i in 0..total {
        let id = format!("mix-{i}");
        if bad_at.contains(&i) {
            let class = Bad::ALL[rng.usize(0..Bad::ALL.len())];
            let exchange = &missing[rng.usize(0..missing.len())];
            messages.push(world.bad(class, &id, exchange));
            bad.push((id, class));
        } else {
            messages.push(if rng.usize(0..10) == 0 {
                Message::Insert(world.good_row(&id))
            } else {
                Message::Submit(world.good(&id))
            });
            good.push(id);
        }
    }
    eprintln!(
        "{total} messages, {} bad ({:?}), max_attempts {max_attempts}",
        bad.len(),
        bad.iter().map(|(_, class)| *class).collect::<Vec<_>>()
    );
    let port = free_port();
    let agent = world.agent(max_attempts, port).start();
    let start = Instant::now();
    let mut messages = messages.into_iter().peekable();
    while messages.peek().is_some() {
        let chunk: Vec<Message> = messages.by_ref().take(rng.usize(20..=200)).collect();
        send(&agent, chunk);
        // Spread the chunks out, so good messages arrive while bad ones
        // are being isolated.
        std::thread::sleep(Duration::from_millis(rng.u64(0..=200)));
    }
    let sent = start.elapsed();
    // The good ones first: they are what the bound is about.
    let delivered = wait_settled(&agent, &good, bound(total), &good);
    let bad_ids: Vec<String> = bad.iter().map(|(id, _)| id.clone()).collect();
    let failed = wait_settled(
        &agent,
        &bad_ids,
        bad_deadline(total, &bad, max_attempts),
        &good,
    );
    eprintln!(
        "sent over {sent:?}; the good ones settled {delivered:?} after the last one, the bad \
         ones {:?}",
        delivered + failed
    );
    assert_isolated(&world, &agent, port, &good, &bad, max_attempts, total);
}

/// 1,000 messages to one missing exchange among 1,000 good ones: the good
/// ones are delivered with under 5% extra copies, the bad ones fail with
/// `404`, and the connection never drops.
#[test]
fn a_storm_to_a_missing_exchange_costs_the_good_ones_nothing() {
    const MAX_ATTEMPTS: i64 = 2;
    const EACH: usize = 1_000;
    let world = World::new();
    let port = free_port();
    let agent = world.agent(MAX_ATTEMPTS, port).start();
    let missing = missing_exchange(60);
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut messages = Vec::new();
    for i in 0..EACH {
        let id = format!("storm-good-{i}");
        messages.push(Message::Submit(world.good(&id)));
        good.push(id);
        let id = format!("storm-bad-{i}");
        messages.push(world.bad(Bad::MissingExchange, &id, &missing));
        bad.push((id, Bad::MissingExchange));
    }
    send(&agent, messages);
    let all: Vec<String> = good
        .iter()
        .cloned()
        .chain(bad.iter().map(|(id, _)| id.clone()))
        .collect();
    let settled = wait_settled(&agent, &all, bound(2 * EACH), &good);
    eprintln!("all settled {settled:?} after the last submit");
    let in_queue = world
        .rt
        .block_on(amqp::queue_len(&world.url, &world.good_queue));
    eprintln!("the good queue holds {in_queue} messages for {EACH} good ones");
    assert!(
        (in_queue as usize) < EACH + EACH / 20,
        "{in_queue} messages in the good queue: more than 5% extra copies of {EACH}"
    );
    assert_isolated(&world, &agent, port, &good, &bad, MAX_ATTEMPTS, 2 * EACH);
}

/// How often the outage test repeats: `EDGE_OUTBOX_TEST_RUNS`, else 2.
fn runs() -> usize {
    std::env::var("EDGE_OUTBOX_TEST_RUNS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(2)
}

/// One run of the outage test; Err says what went wrong.
fn outage_run(run: usize) -> Result<Duration, String> {
    const MESSAGES: usize = 300;
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    // New names each run: the exchange exists only once the consumer
    // declared it, as after a first start.
    let exchange = cleanup.exchange(amqp::unique("iso-own-ex"));
    let queue = cleanup.queue(amqp::unique("iso-own-q"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let binding = format!(
        "[{{ exchange = {}, exchange_type = \"direct\", routing_key = \"k\" }}]",
        toml_str(&exchange)
    );
    let agent = Agent::builder(BIN)
        .consuming(&proxy.url_for(&url), &queue)
        .set("consumer", "bindings", binding)
        .set("consumer", "prefetch", "64")
        .set("publish", "max_attempts", "2")
        .set_str("publish", "retry_interval", "200ms")
        .start();
    let ids = submit_many(&agent, &exchange, "k", &format!("own-{run}"), MESSAGES);
    proxy.set_mode(Mode::Pass);
    let start = Instant::now();
    let deadline = Duration::from_secs(90);
    loop {
        let consumed = agent.count_status(Status::Consumed);
        let failed = agent.count_status(Status::Failed);
        if failed > 0 {
            let example = ids.iter().find_map(|id| {
                agent
                    .row(id)
                    .filter(|r| r.status == Status::Failed)
                    .map(|r| format!("{id}: try_count {}, {:?}", r.try_count, r.last_error))
            });
            return Err(format!(
                "{failed} of {MESSAGES} failed ({consumed} consumed), e.g. {}",
                example.unwrap_or_default()
            ));
        }
        if consumed == MESSAGES as i64 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            return Err(format!("after {deadline:?}: {:?}", agent.status_counts()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 300 messages submitted while the broker is unreachable, to the exchange
/// the agent's own consumer declares, with `max_attempts = 2`: when the
/// link returns, the consumer's topology exists before the forwarder
/// publishes, so all 300 are consumed and none fails. Repeated
/// `EDGE_OUTBOX_TEST_RUNS` times (2).
#[test]
fn an_outage_does_not_fail_messages_to_the_consumers_own_exchange() {
    let runs = runs();
    let mut failures = Vec::new();
    for run in 1..=runs {
        match outage_run(run) {
            Ok(took) => eprintln!("run {run}: all consumed {took:?} after the link returned"),
            Err(e) => {
                eprintln!("run {run}: {e}");
                failures.push(format!("run {run}: {e}"));
            }
        }
    }
    eprintln!("{} runs of {runs} passed", runs - failures.len());
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One JSON log line's fields (flattened: `message`, `level`, and the
/// event's fields).
fn json_lines(text: &str) -> Vec<serde_json::Map<String, Value>> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| match v {
            Value::Object(map) => Some(map),
            _ => None,
        })
        .collect()
}

/// 100,000 messages to a routing key nothing is bound to, each failing at
/// its first attempt: the log holds at most a few hundred lines (repeated
/// failures aggregated per exchange, routing key and error, one line per
/// key per 10 s), at warning level, and their `count` fields add up to
/// every failure.
#[test]
fn a_flood_of_unroutable_messages_logs_a_few_hundred_lines() {
    const ROWS: i64 = 100_000;
    const MAX_LINES: usize = 300;
    let url = broker::default_url();
    let port = free_port();
    let routing_key = amqp::unique("iso-unbound");
    let mut agent = Agent::builder(BIN)
        .forwarding_to(&url)
        .set("publish", "max_attempts", "1")
        .set("metrics", "listen", listen_on(port))
        .set_str("log", "format", "json")
        .prepare();
    // Submitting 100,000 takes long: the rows are written as the agent
    // would have stored them (default exchange, due now).
    prefill_database(&agent.db, ROWS, 100, |i| PrefillRow {
        id: format!("flood-{i}"),
        status: Status::Delivering,
        routing_key: routing_key.clone(),
        create_time: edge_outbox::store::now_ms(),
        next_try_time: None,
    });
    let start = Instant::now();
    agent.restart();
    wait_until("every row failed", Duration::from_secs(240), || {
        agent.count_status(Status::Failed) == ROWS
    });
    eprintln!("{ROWS} rows failed in {:?}", start.elapsed());
    let failed_with_312 =
        agent.db_count("SELECT COUNT(*) FROM msg_log WHERE last_error LIKE '312%'");
    assert_eq!(failed_with_312, ROWS, "every row failed with 312 NO_ROUTE");

    // The lines about this key, and the failures they count. Counts may be
    // per line (they add up) or running totals (the last one is the total).
    let counted = |agent: &Agent| {
        let lines: Vec<_> = json_lines(&agent.log_text())
            .into_iter()
            .filter(|l| {
                l.values()
                    .any(|v| v.as_str().is_some_and(|s| s.contains(routing_key.as_str())))
            })
            .collect();
        let counts: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.get("count").and_then(Value::as_u64))
            .collect();
        (lines, counts)
    };
    let logged = |agent: &Agent| {
        let (_, counts) = counted(agent);
        let sum: u64 = counts.iter().sum();
        let max = counts.iter().copied().max().unwrap_or(0);
        sum == ROWS as u64 || max == ROWS as u64
    };
    // The last aggregate comes out within one 10 s period (polled, not
    // waited for with a panic: the figures below say what the log holds).
    let start = Instant::now();
    while !logged(&agent) && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = agent.log_text();
    let total_lines = text.lines().count();
    let (lines, counts) = counted(&agent);
    eprintln!(
        "figures: {total_lines} log lines in all ({} bytes), {} about the key, counts {:?}",
        text.len(),
        lines.len(),
        &counts[..counts.len().min(20)]
    );
    assert!(
        total_lines <= MAX_LINES,
        "{total_lines} log lines for {ROWS} failures (at most {MAX_LINES})"
    );
    assert!(
        logged(&agent),
        "the count fields of the lines about {routing_key} do not add up to {ROWS}: {counts:?}"
    );
    for line in &lines {
        let level = line.get("level").and_then(Value::as_str).unwrap_or("");
        assert!(
            matches!(level, "WARN" | "ERROR"),
            "a failure logged below warning level (journalctl -p warning would not show it): \
             {line:?}"
        );
    }
    let connects = metric(port, "edge_outbox_connects_total");
    assert_eq!(connects, 1.0, "a connection-level error: reconnected");
    let publishes = metric(port, "edge_outbox_publishes_total");
    eprintln!("publishes {publishes} for {ROWS} rows");
    assert!(
        publishes <= ROWS as f64 * 3.0 + WINDOW,
        "{publishes} publishes"
    );
}
