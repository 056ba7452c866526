//! Submit throughput: the agent against raw SQLite on the same disk.
//!
//! `cargo bench --bench submit` (or `scripts/bench-submit`) measures, in one
//! run, in one temp dir under `target/tmp` (the repository's filesystem):
//!
//! 1. `raw_batched`: rusqlite inserts into the agent's `msg_log` table
//!    (its own schema code), `journal_mode=WAL`, `synchronous=FULL`, 1,000 rows per
//!    transaction, 512-byte payloads (the ceiling for durable inserts here);
//! 2. `raw_one_commit`: the same with one transaction (one fsync) per row
//!    (what a store without group commit can do);
//! 3. `agent`: the release `edge-outbox` binary; 32 clients on its Unix
//!    socket, each pipelining a window of up to 64 requests of 512-byte
//!    payloads; only `ok` answers count.
//!
//! 4. `agent_encrypted`: the same agent load with `store.key_file` set
//!    (SQLCipher: every page of the database and its WAL encrypted), right
//!    after the plain one (`BENCH_ENCRYPTED=0` skips it).
//!
//! It prints rows/s for each and the ratios agent/raw_batched (target ≥ 0.5)
//! and agent/raw_one_commit (target ≥ 4), and exits 1 when a target is missed
//! and `BENCH_STRICT=1`.
//!
//! Sizes can be changed with `BENCH_RAW_ROWS`, `BENCH_ONE_COMMIT_ROWS`,
//! `BENCH_AGENT_ROWS`, `BENCH_CLIENTS`, `BENCH_WINDOW`, `BENCH_PAYLOAD`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_outbox::store::now_ms;
use edge_outbox_testkit::prefill::create_schema;
use edge_outbox_testkit::{Agent, Status};
use rusqlite::{params, Connection, TransactionBehavior};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

/// The binary measured.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");
/// The agent's own INSERT (the store's write SQL), so the raw runs do the
/// same work.
const INSERT: &str = "INSERT INTO msg_log (id, msg, exchange, routing_key, status, try_count, \
     next_try_time, create_time, update_time, headers, content_type) \
     VALUES (?1, ?2, ?3, ?4, ?8, 0, ?5, ?5, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// A database set up like the agent's: incremental auto-vacuum, WAL, FULL.
fn open_like_the_agent(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open");
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")
        .expect("auto_vacuum");
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode.to_lowercase(), "wal");
    conn.execute_batch("PRAGMA synchronous = FULL")
        .expect("synchronous");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("synchronous");
    assert_eq!(sync, 2, "synchronous is not FULL");
    create_schema(&conn);
    conn
}

/// Inserts `rows` rows, `per_tx` per transaction; returns rows/s.
fn raw_inserts(path: &Path, rows: usize, per_tx: usize, payload: &str) -> f64 {
    let mut conn = open_like_the_agent(path);
    let start = Instant::now();
    let mut done = 0;
    while done < rows {
        let n = per_tx.min(rows - done);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .expect("begin");
        {
            let mut insert = tx.prepare_cached(INSERT).expect("prepare");
            let now = now_ms();
            for _ in 0..n {
                let id = uuid::Uuid::now_v7().to_string();
                let inserted = insert
                    .execute(params![
                        id,
                        payload,
                        "bench",
                        "rk",
                        now,
                        None::<String>,
                        "text/plain; charset=utf-8",
                        Status::Delivering
                    ])
                    .expect("insert");
                assert_eq!(inserted, 1);
            }
        }
        tx.commit().expect("commit");
        done += n;
    }
    let elapsed = start.elapsed();
    let count: i64 = conn
        .query_row("SELECT COUNT(*) FROM msg_log", [], |r| r.get(0))
        .expect("count");
    assert_eq!(count as usize, rows);
    rows as f64 / elapsed.as_secs_f64()
}

/// One client: pipelines `n` copies of `line`, at most `window` unanswered.
/// Returns how many were answered `ok`.
async fn client(socket: PathBuf, line: Arc<Vec<u8>>, n: usize, window: usize) -> (usize, usize) {
    let stream = UnixStream::connect(&socket).await.expect("connect");
    let (read_half, write_half) = stream.into_split();
    let slots = Arc::new(Semaphore::new(window));
    let writer_slots = slots.clone();
    let writer = tokio::spawn(async move {
        let mut out = BufWriter::with_capacity(64 * 1024, write_half);
        for _ in 0..n {
            let permit = match writer_slots.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    out.flush().await.expect("flush");
                    writer_slots.acquire().await.expect("semaphore")
                }
            };
            permit.forget();
            out.write_all(&line).await.expect("write");
        }
        out.flush().await.expect("flush");
        out
    });
    let mut lines = BufReader::with_capacity(64 * 1024, read_half).lines();
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..n {
        let answer = lines
            .next_line()
            .await
            .expect("read")
            .expect("the agent closed the connection");
        // Answers are `{"ok":true,"id":...}`: no need to parse them whole.
        if answer.starts_with(r#"{"ok":true"#) {
            ok += 1;
        } else {
            if refused == 0 {
                eprintln!("refused: {answer}");
            }
            refused += 1;
        }
        slots.add_permits(1);
    }
    let _ = writer.await;
    (ok, refused)
}

/// Runs the load against a started agent; returns (acknowledged, refused, seconds).
fn agent_load(
    socket: &Path,
    total: usize,
    clients: usize,
    window: usize,
    payload: &str,
) -> (usize, usize, f64) {
    let line = serde_json::json!({
        "exchange": "bench",
        "routing_key": "rk",
        "payload": payload,
    });
    let mut bytes = serde_json::to_vec(&line).expect("json");
    bytes.push(b'\n');
    let line = Arc::new(bytes);
    // One client thread: the agent gets the rest of the machine.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let n = total / clients + usize::from(i < total % clients);
                tokio::spawn(client(socket.to_path_buf(), line.clone(), n, window))
            })
            .collect();
        let (mut ok, mut refused) = (0, 0);
        for t in tasks {
            let (o, r) = t.await.expect("client task");
            ok += o;
            refused += r;
        }
        (ok, refused, start.elapsed().as_secs_f64())
    })
}

fn main() {
    let raw_rows = env_or("BENCH_RAW_ROWS", 100_000);
    let one_rows = env_or("BENCH_ONE_COMMIT_ROWS", 5_000);
    let agent_rows = env_or("BENCH_AGENT_ROWS", 200_000);
    let clients = env_or("BENCH_CLIENTS", 32).max(1);
    let window = env_or("BENCH_WINDOW", 64).max(1);
    let payload = "x".repeat(env_or("BENCH_PAYLOAD", 512));

    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).expect("target tmp dir");
    let dir = tempfile::Builder::new()
        .prefix("bs")
        .tempdir_in(&base)
        .expect("temp dir");
    let fs = rustix::fs::statvfs(dir.path()).ok();
    println!("bench-submit: temp dir {}", dir.path().display());
    if let Some(fs) = fs {
        println!(
            "bench-submit: filesystem id {:#x}, {} MiB free",
            fs.f_fsid,
            fs.f_bavail * fs.f_frsize / (1024 * 1024)
        );
    }
    println!(
        "bench-submit: payload {} bytes; raw {} rows in 1,000-row transactions; \
         {} rows one commit each; agent {} submits from {} clients, window {}",
        payload.len(),
        raw_rows,
        one_rows,
        agent_rows,
        clients,
        window
    );

    let batched = raw_inserts(&dir.path().join("raw-batched.db"), raw_rows, 1000, &payload);
    println!("raw_batched     {batched:>12.0} rows/s  (synchronous=FULL, WAL, 1,000 rows/commit)");

    let one = raw_inserts(&dir.path().join("raw-one.db"), one_rows, 1, &payload);
    println!("raw_one_commit  {one:>12.0} rows/s  (synchronous=FULL, WAL, 1 row/commit)");

    // The agent's temp dir sits next to the raw databases: the same disk.
    let mut agent = Agent::builder(BIN).temp_dir_in(dir.path()).start();
    let (ok, refused, secs) = agent_load(&agent.socket, agent_rows, clients, window, &payload);
    let stored = agent.rows();
    agent.terminate();
    agent.wait_exit(Duration::from_secs(30));
    let agent_rate = ok as f64 / secs;
    println!(
        "agent           {agent_rate:>12.0} rows/s  ({ok} acknowledged, {refused} refused, \
         {stored} rows stored, {secs:.2}s)"
    );
    assert_eq!(stored as usize, ok, "acknowledged and stored differ");
    if refused > 0 {
        eprintln!("agent log:\n{}", agent.log_text());
    }

    if std::env::var("BENCH_ENCRYPTED").map_or(true, |v| v != "0") {
        let key_dir = tempfile::tempdir_in(dir.path()).expect("key dir");
        let key_file = key_dir.path().join("store-key");
        std::fs::write(&key_file, "bench passphrase\n").expect("key file");
        let mut agent = Agent::builder(BIN)
            .temp_dir_in(dir.path())
            .set_str("store", "key_file", key_file.to_string_lossy())
            .start();
        let (ok, refused, secs) = agent_load(&agent.socket, agent_rows, clients, window, &payload);
        agent.terminate();
        agent.wait_exit(Duration::from_secs(30));
        let rate = ok as f64 / secs;
        println!(
            "agent_encrypted {rate:>12.0} rows/s  ({ok} acknowledged, {refused} refused, {secs:.2}s)"
        );
        println!(
            "ratio agent_encrypted/agent {:>6.2}  (the cost of encryption at rest)",
            rate / agent_rate
        );
    }

    let vs_batched = agent_rate / batched;
    let vs_one = agent_rate / one;
    println!(
        "ratio agent/raw_batched    {vs_batched:>6.2}  (target >= 0.5) {}",
        verdict(vs_batched >= 0.5)
    );
    println!(
        "ratio agent/raw_one_commit {vs_one:>6.2}  (target >= 4)   {}",
        verdict(vs_one >= 4.0)
    );
    let strict = std::env::var("BENCH_STRICT").is_ok_and(|v| v == "1");
    if strict && (vs_batched < 0.5 || vs_one < 4.0) {
        std::process::exit(1);
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}
