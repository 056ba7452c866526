//! Submit throughput: the agent against raw SQLite on the same disk.
//!
//! `cargo bench --bench submit` (or `scripts/bench-submit`) measures, in one
//! run, in one temp dir under `target/tmp` (the repository's filesystem):
//!
//! 1. `raw_batched`: rusqlite inserts into the repository's `schema.sql`
//!    table, `journal_mode=WAL`, `synchronous=FULL`, 1,000 rows per
//!    transaction, 512-byte payloads (the ceiling for durable inserts here);
//! 2. `raw_one_commit`: the same with one transaction (one fsync) per row
//!    (what a store without group commit can do);
//! 3. `agent`: the release `edge-outbox` binary; 32 clients on its Unix
//!    socket, each pipelining a window of up to 64 requests of 512-byte
//!    payloads; only `ok` answers count.
//!
//! It prints rows/s for each and the ratios agent/raw_batched (target ≥ 0.5)
//! and agent/raw_one_commit (target ≥ 4), and exits 1 when a target is missed
//! and `BENCH_STRICT=1`.
//!
//! Sizes can be changed with `BENCH_RAW_ROWS`, `BENCH_ONE_COMMIT_ROWS`,
//! `BENCH_AGENT_ROWS`, `BENCH_CLIENTS`, `BENCH_WINDOW`, `BENCH_PAYLOAD`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, TransactionBehavior};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

const SCHEMA: &str = include_str!("../schema.sql");
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");
/// The agent's own INSERT (src/store.rs), so the raw runs do the same work.
const INSERT: &str = "INSERT INTO msg_log (id, msg, exchange, routing_key, status, try_count, \
     next_try_time, create_time, update_time, headers, content_type) \
     VALUES (?1, ?2, ?3, ?4, 0, 0, ?5, ?5, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
    conn.execute_batch(SCHEMA).expect("schema");
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
                        "text/plain; charset=utf-8"
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

struct AgentProcess {
    child: Child,
    socket: PathBuf,
    db: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    fn start(dir: &Path) -> AgentProcess {
        let socket = dir.join("s.sock");
        let db = dir.join("agent.db");
        let log = dir.join("agent.log");
        let config = dir.join("agent.toml");
        let text = format!(
            "[store]\npath = {}\n\n[submit]\nsocket = {}\n\n[broker]\n\
             urls = [\"amqp://guest:guest@127.0.0.1:1/%2f\"]\n",
            toml::Value::String(db.display().to_string()),
            toml::Value::String(socket.display().to_string()),
        );
        std::fs::write(&config, text).expect("config");
        let log_file = std::fs::File::create(&log).expect("log");
        let mut cmd = Command::new(BIN);
        for (key, _) in std::env::vars() {
            if key.starts_with("EDGE_OUTBOX_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .arg("run")
            .arg("-c")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("spawning the agent");
        let mut agent = AgentProcess {
            child,
            socket,
            db,
            log,
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&agent.socket).is_err() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "the agent exited ({status}):\n{}",
                    std::fs::read_to_string(&agent.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the agent did not listen within 30s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                _ if start.elapsed() > Duration::from_secs(30) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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

    let agent = AgentProcess::start(dir.path());
    let (ok, refused, secs) = agent_load(&agent.socket, agent_rows, clients, window, &payload);
    let stored: i64 = Connection::open(&agent.db)
        .and_then(|c| c.query_row("SELECT COUNT(*) FROM msg_log", [], |r| r.get(0)))
        .expect("counting the agent's rows");
    let log = agent.log.clone();
    agent.stop();
    let agent_rate = ok as f64 / secs;
    println!(
        "agent           {agent_rate:>12.0} rows/s  ({ok} acknowledged, {refused} refused, \
         {stored} rows stored, {secs:.2}s)"
    );
    assert_eq!(stored as usize, ok, "acknowledged and stored differ");
    if refused > 0 {
        eprintln!(
            "agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
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
