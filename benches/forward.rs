//! Forwarding benchmark: the agent draining a backlog against plain lapin.
//!
//! In one run, against the same broker (127.0.0.1:5672), with the same
//! message size (512 bytes, persistent, durable classic queue):
//! 1. baseline: a plain lapin publisher with pipelined confirms (window 256),
//!    no database;
//! 2. the agent: a database pre-filled with the backlog, the release binary
//!    started on it, timed until every row is status 1 (confirmed).
//!
//! Prints both rates and the ratio (target: agent ≥ 70% of plain).
//! Run with `scripts/bench-forward` (or `cargo bench --bench forward`);
//! `BENCH_MESSAGES` sets the message count (default 100000).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{declare_queue, delete_queue, publish_confirmed, BODY, URL};

const WINDOW: usize = 256;

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let plain_queue = format!("bench-plain-{suffix}");
    let agent_queue = format!("bench-agent-{suffix}");

    let plain_rate = runtime.block_on(plain_publisher(&plain_queue, messages));
    runtime.block_on(delete_queue(&plain_queue));
    println!("plain lapin publisher: {messages} messages, {plain_rate:.0} msg/s");

    runtime.block_on(declare_queue(&agent_queue));
    let agent_rate = agent_drain(&agent_queue, messages);
    runtime.block_on(delete_queue(&agent_queue));
    println!("edge-outbox draining a backlog: {messages} messages, {agent_rate:.0} msg/s");
    println!(
        "ratio agent/plain: {:.2} (target >= 0.70)",
        agent_rate / plain_rate
    );
}

async fn plain_publisher(queue: &str, messages: usize) -> f64 {
    let elapsed = publish_confirmed(queue, "plain", messages, WINDOW).await;
    messages as f64 / elapsed.as_secs_f64()
}

fn agent_drain(queue: &str, messages: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("bench.db");
    prefill(&db, queue, messages);
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = {:?}\n[submit]\nsocket = {:?}\n[broker]\nurls = [{URL:?}]\n",
            db.display().to_string(),
            dir.path().join("s.sock").display().to_string()
        ),
    )
    .expect("config");
    let start = Instant::now();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .args(["run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    let reader =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let delivered: i64 = reader
            .query_row("SELECT COUNT(*) FROM msg_log WHERE status = 1", [], |r| {
                r.get(0)
            })
            .unwrap_or(0);
        if delivered as usize >= messages {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not drain in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    rate
}

/// Writes `messages` status-0 rows the way the agent would have stored them.
fn prefill(db: &std::path::Path, queue: &str, messages: usize) {
    let mut conn = rusqlite::Connection::open(db).expect("create db");
    conn.execute_batch(
        "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
    )
    .expect("pragmas");
    conn.execute_batch(include_str!("../schema.sql"))
        .expect("schema");
    conn.execute_batch(&format!(
        "PRAGMA user_version = {}",
        edge_outbox::store::SCHEMA_VERSION
    ))
    .expect("version");
    let body = "x".repeat(BODY);
    let now = edge_outbox::store::now_ms();
    let tx = conn.transaction().expect("tx");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO msg_log (id, msg, exchange, routing_key, status, try_count, \
                 next_try_time, create_time, update_time, content_type) \
                 VALUES (?1, ?2, '', ?3, 0, 0, ?4, ?4, ?4, 'text/plain')",
            )
            .expect("prepare");
        for i in 0..messages {
            insert
                .execute(rusqlite::params![format!("agent-{i}"), body, queue, now])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}
