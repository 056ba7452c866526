//! Wakeup latency benchmark: how long after a submit is stored its confirm
//! is recorded, with many clients submitting at once (docs/forwarding.md,
//! The resend pass: a committed row is published without waiting for a
//! pass).
//!
//! In one run, against the same broker (127.0.0.1:5672), 512-byte
//! persistent messages to a durable classic queue:
//! 1. baseline: a plain lapin publisher, one message at a time, each
//!    waiting for its confirm: the broker's own round trip;
//! 2. the agent at idle: 32 clients, each submitting a burst of 10
//!    pipelined messages at the same moment, then a pause of 100 ms, for 50
//!    rounds; the latency of a message is `update_time - create_time` of its
//!    delivered row (ms): from the commit of the submit to the commit of
//!    the confirm;
//! 3. the same under load: a CPU hog process spinning on one core.
//!
//! The agent runs on its defaults (`publish.resend_every = 30s`), so a row
//! whose wakeup is lost shows as a latency of up to 30 s.
//!
//! Prints p50, p99 and max of each, and the agent's ratios to the baseline;
//! the target is p99 under 50 ms at idle. `BENCH_STRICT=1` exits 1 when it
//! is missed. Run with `scripts/bench-latency` (or `cargo bench --bench
//! latency`); `BENCH_CLIENTS`, `BENCH_BURST`, `BENCH_ROUNDS`,
//! `BENCH_PAUSE_MS` and `BENCH_BASELINE` (round trips, 500) change the sizes.

use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::time::Duration;

use edge_outbox_testkit::amqp::delete_queue;
use edge_outbox_testkit::bench::{publish_round_trips, BODY};
use edge_outbox_testkit::{ok_id, toml_str, wait_until, Agent, Status};
use serde_json::json;

/// The binary measured.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");
/// The target: p99 at idle under this many ms.
const TARGET_P99_MS: f64 = 50.0;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// The shape of one measured phase.
#[derive(Clone, Copy)]
struct Load {
    clients: usize,
    burst: usize,
    rounds: usize,
    pause: Duration,
}

/// p50, p99 and max of a set of latencies in ms.
struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

impl Summary {
    fn of(mut ms: Vec<f64>) -> Summary {
        ms.sort_by(f64::total_cmp);
        let at = |p: usize| {
            ms.get((ms.len() * p / 100).min(ms.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        Summary {
            p50: at(50),
            p99: at(99),
            max: ms.last().copied().unwrap_or(0.0),
            n: ms.len(),
        }
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} messages)",
            self.p50, self.p99, self.max, self.n
        )
    }
}

/// A process spinning on one core; killed when dropped.
struct CpuHog(Child);

impl CpuHog {
    fn start() -> CpuHog {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the CPU hog");
        CpuHog(child)
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let load = Load {
        clients: env_or("BENCH_CLIENTS", 32),
        burst: env_or("BENCH_BURST", 10),
        rounds: env_or("BENCH_ROUNDS", 50),
        pause: Duration::from_millis(env_or("BENCH_PAUSE_MS", 100) as u64),
    };
    let round_trips = env_or("BENCH_BASELINE", 500);
    let (runtime, url, suffix) = edge_outbox_testkit::bench::setup();
    let plain_queue = format!("bench-latency-plain-{suffix}");
    let agent_queue = format!("bench-latency-agent-{suffix}");

    let baseline = runtime.block_on(publish_round_trips(&url, &plain_queue, round_trips));
    runtime.block_on(delete_queue(&url, &plain_queue));
    let baseline = Summary::of(baseline.iter().map(|d| d.as_secs_f64() * 1000.0).collect());
    println!(
        "{}",
        baseline.line("baseline, plain lapin publish + confirm of one message")
    );

    runtime.block_on(edge_outbox_testkit::amqp::declare_queue(&url, &agent_queue));
    let mut agent = Agent::builder(BIN)
        .set("broker", "urls", format!("[{}]", toml_str(&url)))
        .start();
    let shape = format!(
        "{} clients x {} messages, {} rounds, {} ms apart",
        load.clients,
        load.burst,
        load.rounds,
        load.pause.as_millis()
    );
    let idle = measure(&agent, &agent_queue, "idle", load);
    println!("{}", idle.line(&format!("edge-outbox at idle ({shape})")));
    let loaded = {
        let _hog = CpuHog::start();
        measure(&agent, &agent_queue, "load", load)
    };
    println!(
        "{}",
        loaded.line(&format!(
            "edge-outbox under load, a CPU hog on one core ({shape})"
        ))
    );
    agent.terminate();
    agent.wait_exit(Duration::from_secs(60));
    runtime.block_on(delete_queue(&url, &agent_queue));

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "ratio to the baseline at idle: p50 {:.1}x, p99 {:.1}x; under load: p50 {:.1}x, p99 {:.1}x",
        ratio(idle.p50, baseline.p50),
        ratio(idle.p99, baseline.p99),
        ratio(loaded.p50, baseline.p50),
        ratio(loaded.p99, baseline.p99)
    );
    let met = idle.p99 < TARGET_P99_MS;
    println!(
        "target p99 at idle < {TARGET_P99_MS} ms: {}",
        if met { "met" } else { "MISSED" }
    );
    if !met && std::env::var("BENCH_STRICT").as_deref() == Ok("1") {
        std::process::exit(1);
    }
}

/// Runs `load` against `agent` (ids `{phase}-{client}-{round}-{i}`, to the
/// default exchange, routed to `queue`), waits until every message is
/// delivered, and returns the latencies from its rows.
fn measure(agent: &Agent, queue: &str, phase: &str, load: Load) -> Summary {
    let start_barrier = Barrier::new(load.clients + 1);
    let end_barrier = Barrier::new(load.clients + 1);
    let payload = "x".repeat(BODY);
    std::thread::scope(|s| {
        for client in 0..load.clients {
            let (start_barrier, end_barrier, payload) = (&start_barrier, &end_barrier, &payload);
            s.spawn(move || {
                let mut c = agent.client();
                for round in 0..load.rounds {
                    start_barrier.wait();
                    for i in 0..load.burst {
                        c.send(&json!({"exchange": "", "routing_key": queue,
                                       "id": format!("{phase}-{client}-{round}-{i}"),
                                       "payload": payload}));
                    }
                    for _ in 0..load.burst {
                        ok_id(&c.answer());
                    }
                    end_barrier.wait();
                }
            });
        }
        for _ in 0..load.rounds {
            start_barrier.wait();
            end_barrier.wait();
            // The pause between bursts: the forwarder goes idle in between.
            std::thread::sleep(load.pause);
        }
    });
    let total = (load.clients * load.burst * load.rounds) as i64;
    let pattern = format!("{phase}-%");
    let delivered = || {
        agent
            .db()
            .query_row(
                "SELECT COUNT(*) FROM msg_log WHERE status = ?1 AND id LIKE ?2",
                rusqlite::params![Status::Delivered as i64, pattern],
                |r| r.get::<_, i64>(0),
            )
            .expect("counting delivered rows")
    };
    // A lost wakeup waits for the next pass (30 s): the deadline covers it.
    wait_until(
        &format!("{total} {phase} messages delivered"),
        Duration::from_secs(300),
        || delivered() == total,
    );
    let conn = agent.db();
    let mut stmt = conn
        .prepare("SELECT update_time - create_time FROM msg_log WHERE id LIKE ?1")
        .expect("prepare");
    let ms: Vec<f64> = stmt
        .query_map([&pattern], |r| r.get::<_, i64>(0))
        .expect("query")
        .map(|r| r.expect("row") as f64)
        .collect();
    Summary::of(ms)
}
