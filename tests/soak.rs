//! The long outage the agent exists for, in one run (ignored by default:
//! `scripts/soak-outage` runs it, docs/operations.md, Soak).
//!
//! 32 clients submit 512-byte messages with client ids while the broker is
//! unreachable, until the database reaches `store.max_db_size` and submits
//! are refused `storage_full`; the clients keep retrying. The link returns:
//! the backlog drains under `publish.max_rate` while the clients go on
//! submitting the rest, the agent making room from the delivered rows by
//! itself. Once every message is in the queue, a last round of submits
//! must meet no refusal, and the purge gives the space back.
//!
//! Prints: drain time, peak RSS, the submit latency (p50/p99/p99.9) during
//! the catch-up, refusals during the outage, the catch-up and after, and
//! the database size full, after the drain and after the purge. Asserts:
//! nothing acknowledged is lost (the queue holds every message once), no
//! refusal after the drain, the cap held, the file shrank.
//!
//! Knobs: `SOAK_MESSAGES` (1,000,000), `SOAK_CLIENTS` (32), `SOAK_MAX_RATE`
//! (5000 messages/s), `SOAK_MAX_DB_SIZE` ("256MiB").

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_outbox_testkit::{amqp, broker, rt, Agent, Client, FaultProxy, Mode, Status};
use serde_json::json;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Which part of the cycle an answer fell in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Outage = 0,
    CatchUp = 1,
    After = 2,
}

/// What the clients saw, per phase.
#[derive(Default)]
struct Tally {
    refused: [AtomicU64; 3],
    /// Round trips of accepted submits during the catch-up, in µs.
    catch_up_us: Mutex<Vec<u64>>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Peak resident memory of process `pid` (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Submits ids `prefix-n` for n taken from `next` until `total`, each
/// retried until `ok`; classifies refusals by the phase they met.
#[allow(clippy::too_many_arguments)]
fn client_loop(
    socket: std::path::PathBuf,
    exchange: String,
    prefix: &'static str,
    next: Arc<AtomicUsize>,
    total: usize,
    phase: Arc<AtomicUsize>,
    tally: Arc<Tally>,
    full_seen: Arc<AtomicBool>,
) {
    let mut client = Client::connect(&socket);
    let payload = "p".repeat(512);
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            return;
        }
        let request = json!({
            "exchange": exchange, "routing_key": "soak",
            "id": format!("{prefix}-{n}"), "payload": payload,
        });
        loop {
            let started = Instant::now();
            let answer = client.request(&request);
            let took = started.elapsed();
            let now_phase = phase.load(Ordering::Relaxed);
            if answer["ok"] == json!(true) {
                if now_phase == Phase::CatchUp as usize {
                    tally
                        .catch_up_us
                        .lock()
                        .expect("tally")
                        .push(took.as_micros() as u64);
                }
                break;
            }
            let code = answer["error"].as_str().unwrap_or_default();
            assert!(
                code == "storage_full" || code == "buffer_full",
                "unexpected refusal {answer}"
            );
            tally.refused[now_phase].fetch_add(1, Ordering::Relaxed);
            full_seen.store(true, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
#[ignore = "a long soak: scripts/soak-outage"]
fn a_long_outage_past_the_size_limit_recovers_under_the_rate_cap() {
    let messages = env_or("SOAK_MESSAGES", 1_000_000) as usize;
    let clients = env_or("SOAK_CLIENTS", 32) as usize;
    let max_rate = env_or("SOAK_MAX_RATE", 5000);
    let max_db_size = std::env::var("SOAK_MAX_DB_SIZE").unwrap_or_else(|_| "256MiB".into());
    let after_messages = 20_000.min(messages);
    println!(
        "soak: {messages} messages of 512 bytes from {clients} clients, max_db_size {max_db_size}, \
         max_rate {max_rate}/s"
    );

    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "soak"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .set_str("store", "max_db_size", &max_db_size)
        .set("publish", "max_rate", max_rate.to_string())
        .set_str("purge", "retention", "0s")
        .set_str("purge", "failed_retention", "0s")
        .start();
    let pid = agent.pid();

    let phase = Arc::new(AtomicUsize::new(Phase::Outage as usize));
    let tally = Arc::new(Tally::default());
    let full_seen = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (socket, exchange) = (agent.socket.clone(), exchange.clone());
            let (next, phase, tally, full) = (
                next.clone(),
                phase.clone(),
                tally.clone(),
                full_seen.clone(),
            );
            std::thread::spawn(move || {
                client_loop(socket, exchange, "soak", next, messages, phase, tally, full)
            })
        })
        .collect();

    // The outage lasts until the limit has refused submits for a while.
    let deadline = Instant::now() + Duration::from_secs(1800);
    while !full_seen.load(Ordering::Relaxed) && next.load(Ordering::Relaxed) < messages {
        assert!(Instant::now() < deadline, "the limit never refused");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let stored_in_outage = agent.count_status(Status::Delivering);
    let full_file = file_len(&agent.db);
    println!(
        "outage: {stored_in_outage} stored in {:.1}s, then refused (file {} MiB)",
        started.elapsed().as_secs_f64(),
        full_file >> 20
    );

    // The link returns.
    phase.store(Phase::CatchUp as usize, Ordering::Relaxed);
    let recovered = Instant::now();
    proxy.set_mode(Mode::Pass);
    for w in workers {
        w.join().expect("a client panicked");
    }
    let submitted_at = recovered.elapsed();
    let drain_deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let delivering = agent.count_status(Status::Delivering);
        if delivering == 0 {
            break;
        }
        assert!(
            Instant::now() < drain_deadline,
            "{delivering} never drained"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let drain = recovered.elapsed();
    let in_queue = rt.block_on(amqp::queue_len(&url, &queue)) as usize;
    let drained_file = file_len(&agent.db);

    // After the drain: submits meet no refusal.
    phase.store(Phase::After as usize, Ordering::Relaxed);
    let next_after = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (socket, exchange) = (agent.socket.clone(), exchange.clone());
            let (next, phase, tally, full) = (
                next_after.clone(),
                phase.clone(),
                tally.clone(),
                Arc::new(AtomicBool::new(false)),
            );
            std::thread::spawn(move || {
                client_loop(
                    socket,
                    exchange,
                    "after",
                    next,
                    after_messages,
                    phase,
                    tally,
                    full,
                )
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a client panicked");
    }
    let wait = Instant::now() + Duration::from_secs(600);
    while agent.count_status(Status::Delivering) > 0 {
        assert!(Instant::now() < wait, "the last round never drained");
        std::thread::sleep(Duration::from_millis(250));
    }
    let peak_kib = peak_rss_kib(pid);
    let purge = agent.cli(&["purge"]);
    assert_eq!(purge.code, 0, "{purge:?}");
    let purged_file = file_len(&agent.db);
    let final_in_queue = rt.block_on(amqp::queue_len(&url, &queue)) as usize;

    let mut lat = tally.catch_up_us.lock().expect("tally").clone();
    lat.sort_unstable();
    let refused: Vec<u64> = tally
        .refused
        .iter()
        .map(|r| r.load(Ordering::Relaxed))
        .collect();
    let rate = messages as f64 / drain.as_secs_f64();
    println!(
        "catch-up: every message submitted {:.1}s after the link returned, all delivered after {:.1}s \
         ({rate:.0} msg/s over the drain; cap {max_rate}/s)",
        submitted_at.as_secs_f64(),
        drain.as_secs_f64()
    );
    println!(
        "submit round trip during the catch-up ({} accepted): p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
        lat.len(),
        percentile(&lat, 0.5) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
        percentile(&lat, 0.999) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    println!(
        "refusals: outage {}, catch-up {}, after {}",
        refused[0], refused[1], refused[2]
    );
    println!("agent peak RSS {:.1} MiB", peak_kib as f64 / 1024.0);
    println!(
        "database file: full {:.1} MiB, after the drain {:.1} MiB, after the purge {:.1} MiB",
        full_file as f64 / 1048576.0,
        drained_file as f64 / 1048576.0,
        purged_file as f64 / 1048576.0
    );
    println!(
        "queue: {in_queue} after the drain, {final_in_queue} at the end ({} submitted)",
        messages + after_messages
    );

    rt.block_on(amqp::delete(&url, &exchange, &queue));
    assert_eq!(in_queue, messages, "lost or duplicated during the drain");
    assert_eq!(final_in_queue, messages + after_messages);
    assert_eq!(refused[2], 0, "refused after the drain");
    assert!(
        rate <= max_rate as f64 * 1.05,
        "the cap did not hold: {rate:.0} msg/s"
    );
    assert!(purged_file < full_file, "the file did not shrink");
}
