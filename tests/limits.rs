//! What the agent refuses, and that a refusal costs nothing else: bodies and
//! lines over the size limits (`too_large`), a full buffer (`buffer_full`),
//! full disks and the storage limits (`storage_full`), a database locked by
//! someone else (`storage_error`), the idle timeout, the connection limit
//! and the peer credential checks (`unauthorized`); the file descriptor
//! limit (2,000 clients at once past a soft limit of 1024); a long outage
//! past `store.max_db_size` that the agent recovers from by itself (settled
//! rows make room, the purge gives the space back), and submits during a
//! large reclaim. docs/protocol.md (Error codes), docs/storage.md (Limits,
//! Making room), docs/purge.md, docs/configuration.md, docs/operations.md
//! (File descriptors).

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use edge_outbox_testkit::{
    amqp, broker, ok_id, refused, wait_until, Agent, Cleanup, Client, Status, Tmpfs,
};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// ------------------------------------------------------------------ sizes

#[test]
fn too_large_bodies_and_lines_are_refused_and_the_connection_stays_usable() {
    let agent = Agent::builder(BIN)
        .set_str("submit", "max_message_size", "1KiB")
        .start();
    let mut c = agent.client();
    // Exactly the limit is fine, one byte more is not.
    ok_id(&c.submit("ex", "rk", json!("x".repeat(1024))));
    let message = refused(&c.submit("ex", "rk", json!("x".repeat(1025))), "too_large");
    assert!(message.contains("max_message_size"), "{message}");
    let message = refused(
        &c.request(&json!({"exchange": "", "routing_key": "", "payload_base64": B64.encode(vec![7u8; 4096])})),
        "too_large",
    );
    assert!(message.contains("max_message_size"), "{message}");
    ok_id(&c.submit("ex", "rk", json!("fine again")));

    // A line over the line limit (6 × 1 KiB + 64 KiB here) is skipped whole.
    let line_limit = 6 * 1024 + 64 * 1024;
    let mut huge = String::from(r#"{"exchange":"","routing_key":"","payload":""#);
    huge.push_str(&"y".repeat(line_limit + 10_000));
    huge.push_str("\"}");
    c.send_line(&huge);
    let message = refused(&c.answer(), "too_large");
    assert!(message.contains("line"), "{message}");
    // A line of garbage that never parses, also over the limit.
    c.send_line(&"z".repeat(3 * line_limit));
    refused(&c.answer(), "too_large");
    let id = ok_id(&c.submit("ex", "rk", json!("after the long lines")));
    assert_eq!(agent.rows(), 3);
    assert_eq!(agent.status_of(&id), Some(Status::Delivering));
}

// ------------------------------------------------ the buffer and the disk

#[test]
fn buffer_full_refuses_without_evicting() {
    let agent = Agent::builder(BIN).set("store", "max_pending", "3").start();
    let mut c = agent.client();
    for i in 0..3 {
        ok_id(&c.submit_with_id(&format!("m-{i}"), json!(i)));
    }
    let message = refused(&c.submit_with_id("m-3", json!(3)), "buffer_full");
    assert!(message.contains("max_pending"), "{message}");
    // A duplicate of a stored message is still ok.
    let dup = c.submit_with_id("m-1", json!("again"));
    assert_eq!(ok_id(&dup), "m-1");
    assert_eq!(dup["duplicate"], json!(true), "{dup}");
    // Still refused on a new connection; nothing evicted.
    let mut other = agent.client();
    refused(&other.submit("ex", "rk", json!("more")), "buffer_full");
    assert_eq!(agent.rows(), 3);
    for i in 0..3 {
        assert_eq!(agent.status_of(&format!("m-{i}")), Some(Status::Delivering));
    }
    assert_eq!(agent.status_of("m-3"), None);
}

#[test]
fn a_full_disk_gives_storage_full_and_the_agent_recovers() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let mut agent = Agent::builder(BIN)
        .set_str(
            "store",
            "path",
            fs.path().join("outbox.db").to_string_lossy(),
        )
        .set_str("store", "min_free_disk", "0")
        .start();
    let mut c = agent.client();
    for i in 0..5 {
        ok_id(&c.submit_with_id(&format!("before-{i}"), json!(i)));
    }
    let filler = fs.fill("filler", None);
    let big = "b".repeat(256 * 1024);
    let message = refused(&c.submit_with_id("big-1", json!(big)), "storage_full");
    eprintln!("full disk: {message}");
    assert!(message.contains("disk full"), "{message}");
    // Small ones too, from any connection, and the agent keeps running.
    let mut refusals = 0;
    for i in 0..3 {
        let answer = agent
            .client()
            .submit_with_id(&format!("small-{i}"), json!(i));
        if answer["ok"] == json!(false) {
            refused(&answer, "storage_full");
            refusals += 1;
        }
    }
    assert!(refusals > 0, "small submits all fit on a full disk?");
    let status = c.request(&json!({"op": "status"}));
    assert_eq!(status["ok"], json!(true), "{status}");
    assert!(agent.is_running());
    assert_eq!(agent.status_of("big-1"), None);

    std::fs::remove_file(&filler).expect("removing the filler");
    ok_id(&c.submit_with_id("big-2", json!(big)));
    ok_id(&agent.client().submit_with_id("after-1", json!(1)));
    for i in 0..5 {
        assert_eq!(
            agent.status_of(&format!("before-{i}")),
            Some(Status::Delivering)
        );
    }
    assert_eq!(agent.status_of("big-2"), Some(Status::Delivering));
    drop(c);
    agent.terminate();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
}

#[test]
fn min_free_disk_refuses_with_storage_full() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let agent = Agent::builder(BIN)
        .set_str(
            "store",
            "path",
            fs.path().join("outbox.db").to_string_lossy(),
        )
        .set_str("store", "min_free_disk", "4MiB")
        .start();
    let mut c = agent.client();
    ok_id(&c.submit_with_id("a", json!(1)));
    // Leave about 3 MiB free: below the 4 MiB floor.
    let filler = fs.fill("filler", Some(5 * 1024 * 1024));
    let message = refused(&c.submit_with_id("b", json!(2)), "storage_full");
    assert!(message.contains("min_free_disk"), "{message}");
    // A duplicate of a stored message is still ok.
    let dup = c.submit_with_id("a", json!(1));
    assert_eq!(dup["duplicate"], json!(true), "{dup}");
    std::fs::remove_file(&filler).expect("removing the filler");
    ok_id(&c.submit_with_id("b", json!(2)));
    assert_eq!(agent.rows(), 2);

    // Larger than the whole filesystem: always refused.
    let agent = Agent::builder(BIN)
        .set_str(
            "store",
            "path",
            fs.path().join("other.db").to_string_lossy(),
        )
        .set_str("store", "min_free_disk", "16MiB")
        .start();
    let message = refused(&agent.client().submit("", "", json!(1)), "storage_full");
    assert!(message.contains("min_free_disk"), "{message}");
    assert_eq!(agent.rows(), 0);
}

#[test]
fn max_db_size_refuses_with_storage_full_and_evicts_nothing() {
    let agent = Agent::builder(BIN)
        .set_str("store", "max_db_size", "64KiB")
        .start();
    let mut c = agent.client();
    let mut stored = Vec::new();
    let mut refusal = None;
    for i in 0..500 {
        let id = format!("s-{i}");
        let answer = c.submit_with_id(&id, json!("d".repeat(2000)));
        if answer["ok"] == json!(true) {
            stored.push(id);
        } else {
            refusal = Some(refused(&answer, "storage_full"));
            break;
        }
    }
    let message = refusal.expect("never refused: max_db_size not enforced");
    assert!(message.contains("max_db_size"), "{message}");
    assert!(
        stored.len() >= 5,
        "refused too early: {} stored",
        stored.len()
    );
    // Still refused; duplicates of stored rows still ok; nothing evicted.
    refused(&c.submit("", "", json!("more")), "storage_full");
    let dup = c.submit_with_id(&stored[0], json!("again"));
    assert_eq!(dup["duplicate"], json!(true), "{dup}");
    assert_eq!(agent.rows(), stored.len() as i64);
    agent.assert_all_stored(&stored);
    let page_size = agent.db_count("PRAGMA page_size");
    let pages = agent.db_count("PRAGMA page_count");
    assert!(
        pages * page_size <= 64 * 1024 + 2 * 4096 * 2,
        "database grew to {} bytes",
        pages * page_size
    );
}

/// Another process holding the database's write lock (an operator's
/// `sqlite3` shell left inside a transaction) for longer than the writer's
/// busy timeout: a real storage error, not a full disk.
#[test]
fn storage_error_when_the_database_stays_locked() {
    let agent = Agent::start(BIN);
    let mut c = agent.client();
    ok_id(&c.submit("ex", "rk", json!("before the lock")));
    let locker = agent.db();
    locker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("taking the write lock");
    let started = Instant::now();
    let message = refused(
        &c.submit("ex", "rk", json!("while locked")),
        "storage_error",
    );
    assert!(message.contains("locked"), "{message}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "refused before the busy timeout: {:?}",
        started.elapsed()
    );
    // The agent keeps serving: status answers (readers are not blocked).
    let status = agent.client().request(&json!({"op": "status"}));
    assert_eq!(status["ok"], json!(true), "{status}");
    locker
        .execute_batch("ROLLBACK")
        .expect("releasing the lock");
    drop(locker);
    ok_id(&c.submit("ex", "rk", json!("after the lock")));
    assert_eq!(agent.rows(), 2);
}

// ------------------------------------------------------------ connections

#[test]
fn an_idle_half_line_is_closed_and_others_are_served() {
    let agent = Agent::builder(BIN)
        .set_str("submit", "idle_timeout", "1s")
        .start();
    let mut idle = agent.client();
    idle.send_raw(br#"{"exchange":"ex","rout"#)
        .expect("writing half a line");
    let started = Instant::now();
    let answers = idle.expect_closed(Duration::from_secs(15));
    assert!(answers.is_empty(), "{answers:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
    let mut c = agent.client();
    ok_id(&c.submit("ex", "rk", json!(1)));
    // A client that keeps sending within the timeout is not cut off.
    for i in 0..3 {
        ok_id(&c.submit("ex", "rk", json!(i)));
    }
    assert_eq!(agent.rows(), 4);
}

/// A connection the agent admitted (it answered a submit with ok): retries
/// while earlier connections (the harness's readiness probe, a client just
/// dropped) still hold their slots.
fn admitted_client(agent: &Agent, id: &str) -> Client {
    let mut admitted = None;
    wait_until("a free connection slot", Duration::from_secs(10), || {
        let mut c = agent.client();
        let line = format!(r#"{{"exchange":"","routing_key":"","payload":0,"id":"{id}"}}"#);
        // A refused connection may be closed before the line is written.
        let _ = c.send_raw(format!("{line}\n").as_bytes());
        match c.read_answer() {
            Some(a) if a["ok"] == json!(true) => {
                admitted = Some(c);
                true
            }
            Some(a) => {
                let message = refused(&a, "buffer_full");
                assert!(message.contains("too many connections"), "{message}");
                false
            }
            None => false,
        }
    });
    admitted.expect("admitted")
}

#[test]
fn connections_beyond_max_connections_are_refused() {
    let agent = Agent::builder(BIN)
        .set("submit", "max_connections", "2")
        .start();
    let mut c1 = admitted_client(&agent, "c1");
    let mut c2 = admitted_client(&agent, "c2");
    let mut c3 = agent.client();
    let answers = c3.expect_closed(Duration::from_secs(10));
    assert_eq!(answers.len(), 1, "{answers:?}");
    let message = refused(&answers[0], "buffer_full");
    assert!(message.contains("too many connections"), "{message}");
    // A refused request is not stored.
    let mut c3 = agent.client();
    let _ = c3.send_raw(b"{\"exchange\":\"\",\"routing_key\":\"\",\"payload\":1,\"id\":\"c3\"}\n");
    let answers = c3.expect_closed(Duration::from_secs(10));
    assert!(answers.len() <= 1, "{answers:?}");
    // The two admitted connections are unaffected.
    ok_id(&c1.submit("", "", json!(3)));
    ok_id(&c2.submit("", "", json!(4)));
    drop(c1);
    // Once the agent has seen c1 go, a new connection is admitted.
    let mut c4 = admitted_client(&agent, "c4");
    ok_id(&c4.submit("", "", json!(5)));
    ok_id(&c2.submit("", "", json!(6)));
    assert_eq!(agent.rows(), 7);
    assert_eq!(agent.status_of("c3"), None);
}

// ------------------------------------------------------------------ peers

#[test]
fn unauthorized_peers_are_refused_and_closed() {
    // The tests run as root (uid 0): not in the list.
    let agent = Agent::builder(BIN)
        .set("submit", "allowed_uids", "[12345]")
        .start();
    let mut c = agent.client();
    let answers = c.expect_closed(Duration::from_secs(10));
    assert_eq!(answers.len(), 1, "{answers:?}");
    let message = refused(&answers[0], "unauthorized");
    assert!(message.contains("uid 0"), "{message}");
    // A request sent anyway is not stored.
    let mut c = agent.client();
    // The agent may already have closed the connection: the write can fail
    // with a broken pipe, which is as good a refusal as any.
    let _ = c.send_raw(b"{\"exchange\":\"\",\"routing_key\":\"\",\"payload\":1}\n");
    let answers = c.expect_closed(Duration::from_secs(10));
    assert!(answers.len() <= 1, "{answers:?}");
    if let Some(a) = answers.first() {
        refused(a, "unauthorized");
    }
    assert_eq!(agent.rows(), 0);
    // The CLI reports the refusal with exit 77 (not allowed).
    let out = agent.cli(&["submit", "--exchange", "", "--routing-key", "", "x"]);
    assert_eq!(out.code, 77, "{out:?}");
    assert!(out.stderr.contains("unauthorized"), "{out:?}");
    // `status` from a user the agent refuses still reads the database.
    let out = agent.cli(&["status", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["source"], json!("database"), "{out:?}");
    assert!(out.stderr.contains("unauthorized"), "{out:?}");
}

#[test]
fn allowed_gid_admits_the_peer() {
    let agent = Agent::builder(BIN)
        .set("submit", "allowed_uids", "[12345]")
        .set("submit", "allowed_gids", "[0]")
        .start();
    ok_id(&agent.client().submit("ex", "rk", json!(1)));
}

// ------------------------------------------------------ file descriptors

/// Clients in the storm: twice the default soft limit.
const STORM: usize = 2000;

/// What one client of the storm got.
enum Got {
    Ok,
    BufferFull(String),
    Other(String),
}

/// Raises this test's own descriptor limit so it can hold the storm's
/// sockets (root may raise the hard limit too).
fn raise_own_fd_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.map_or(want, |h| h.max(want));
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    );
    let now = getrlimit(Resource::Nofile).current;
    assert!(
        now.is_some_and(|n| n >= want),
        "this test needs {want} file descriptors; RLIMIT_NOFILE is {limit:?} and raising it \
         failed ({raised:?}): run it as root or with a hard limit of at least {want}"
    );
}

/// `STORM` clients connect at once, then each sends one submit to `queue`,
/// reads one answer and keeps its connection open until every client has
/// its answer: 2,000 connections at once, nobody leaving to make room.
/// Every wait ends at the same deadline. Returns what each got.
fn storm(socket: &std::path::Path, queue: &str) -> Vec<Got> {
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let rt = edge_outbox_testkit::rt();
    rt.block_on(async {
        let all_connected = Arc::new(tokio::sync::Barrier::new(STORM));
        let all_answered = Arc::new(tokio::sync::Barrier::new(STORM));
        let mut clients = tokio::task::JoinSet::new();
        for i in 0..STORM {
            let socket = socket.to_path_buf();
            let all_connected = all_connected.clone();
            let all_answered = all_answered.clone();
            let line = format!(
                "{}\n",
                json!({"exchange": "", "routing_key": queue, "id": format!("storm-{i}"), "payload": i})
            );
            clients.spawn(async move {
                let stream = loop {
                    match UnixStream::connect(&socket).await {
                        Ok(stream) => break stream,
                        // The listen backlog is full: a real client retries.
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if tokio::time::Instant::now() > deadline {
                                return Got::Other(format!("connect: {e}"));
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(e) => return Got::Other(format!("connect: {e}")),
                    }
                };
                if tokio::time::timeout_at(deadline, all_connected.wait())
                    .await
                    .is_err()
                {
                    return Got::Other("not all clients connected by the deadline".into());
                }
                let (read, mut write) = stream.into_split();
                // A refused client may be closed before it writes: the
                // answer is waiting to be read all the same.
                let _ = write.write_all(line.as_bytes()).await;
                let mut answer = String::new();
                let mut read = BufReader::new(read);
                let got = match tokio::time::timeout_at(deadline, read.read_line(&mut answer)).await {
                    Err(_) => Got::Other("no answer by the deadline".into()),
                    Ok(Err(e)) => Got::Other(format!("read: {e}")),
                    Ok(Ok(0)) => Got::Other("closed without an answer".into()),
                    Ok(Ok(_)) => {
                        let value: serde_json::Value = match serde_json::from_str(&answer) {
                            Ok(v) => v,
                            Err(e) => return Got::Other(format!("{e}: {answer}")),
                        };
                        if value["ok"] == json!(true) {
                            Got::Ok
                        } else if value["error"] == json!("buffer_full") {
                            Got::BufferFull(value["message"].as_str().unwrap_or("").to_string())
                        } else {
                            Got::Other(answer)
                        }
                    }
                };
                let _ = tokio::time::timeout_at(deadline, all_answered.wait()).await;
                drop((read, write));
                got
            });
        }
        let mut got = Vec::with_capacity(STORM);
        while let Some(joined) = clients.join_next().await {
            got.push(joined.unwrap_or_else(|e| Got::Other(format!("client task: {e}"))));
        }
        got
    })
}

/// The storm, then what every client must have got: `ok` or `buffer_full`,
/// nothing else, no silence. Returns how many were stored.
fn assert_every_client_answered(got: &[Got]) -> usize {
    let ok = got.iter().filter(|g| matches!(g, Got::Ok)).count();
    let full: Vec<&String> = got
        .iter()
        .filter_map(|g| match g {
            Got::BufferFull(m) => Some(m),
            _ => None,
        })
        .collect();
    let other: Vec<&str> = got
        .iter()
        .filter_map(|g| match g {
            Got::Other(what) => Some(what.as_str()),
            _ => None,
        })
        .collect();
    eprintln!(
        "{STORM} clients: {ok} ok, {} buffer_full, {} other",
        full.len(),
        other.len()
    );
    assert!(
        other.is_empty(),
        "{} clients got no proper answer, e.g. {:?}",
        other.len(),
        &other[..other.len().min(5)]
    );
    for message in full {
        assert!(message.contains("too many connections"), "{message}");
    }
    assert!(ok > 0, "nobody was served");
    ok
}

/// The soft and hard `RLIMIT_NOFILE` of a running process.
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut words = line.split_whitespace().skip(3);
    let soft = words.next().unwrap_or_default().to_string();
    let hard = words.next().unwrap_or_default().to_string();
    (soft, hard)
}

/// After the storm the broker connection still works: a message submitted
/// now reaches the queue, beside the `stored` ones of the storm.
fn assert_forwarding_still_works(agent: &Agent, url: &str, queue: &str, stored: usize) {
    let rt = edge_outbox_testkit::rt();
    let id = ok_id(&agent.client().submit("", queue, json!("after the storm")));
    agent.wait_status(&id, Status::Delivered, Duration::from_secs(60));
    wait_until(
        "the storm's messages and the last one in the queue",
        Duration::from_secs(60),
        || rt.block_on(amqp::queue_len(url, queue)) as usize == stored + 1,
    );
    assert_eq!(agent.count_status(Status::Failed), 0);
}

/// Outside systemd the soft limit is 1024, the default
/// `submit.max_connections`: the agent raises it to the hard limit, so
/// 2,000 clients at once are each answered and the broker link survives.
#[test]
fn two_thousand_clients_past_a_soft_limit_of_1024_are_all_answered() {
    raise_own_fd_limit(3 * STORM as u64);
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("fd-storm"));
    edge_outbox_testkit::rt().block_on(amqp::declare_queue(&url, &queue));
    let agent = Agent::builder(BIN)
        .forwarding_to(&url)
        .fd_limit(1024, 4096)
        .start();
    assert_eq!(
        open_files_limit(agent.pid()),
        ("4096".to_string(), "4096".to_string()),
        "the soft limit is raised to the hard one"
    );
    let got = storm(&agent.socket, &queue);
    let stored = assert_every_client_answered(&got);
    assert_eq!(
        stored, 1024,
        "the default submit.max_connections (1024) fits, and no more are served at once"
    );
    let log = agent.log_text();
    assert!(!log.contains("does not fit"), "{log}");
    assert!(!log.contains("out of file descriptors"), "{log}");
    assert_forwarding_still_works(&agent, &url, &queue, stored);
}

/// With a hard limit of 1024 too, `submit.max_connections` is clamped below
/// it (a warning names both numbers); the clients past it are answered
/// `buffer_full`, and the reserve keeps the broker link working.
#[test]
fn a_hard_limit_of_1024_clamps_the_connections_and_keeps_the_broker_link() {
    raise_own_fd_limit(3 * STORM as u64);
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("fd-clamp"));
    edge_outbox_testkit::rt().block_on(amqp::declare_queue(&url, &queue));
    let agent = Agent::builder(BIN)
        .forwarding_to(&url)
        .fd_limit(1024, 1024)
        .start();
    let log = agent.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("does not fit the file descriptor limit"))
        .unwrap_or_else(|| panic!("no clamp warning: {log}"));
    assert!(
        warning.contains("submit.max_connections = 1024") && warning.contains("RLIMIT_NOFILE 1024"),
        "{warning}"
    );
    let allowed: usize = warning
        .split("serving at most ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no clamped number in: {warning}"));
    assert!(allowed < 1024 && allowed > 900, "{warning}");

    let got = storm(&agent.socket, &queue);
    let stored = assert_every_client_answered(&got);
    assert!(
        stored >= allowed,
        "{stored} served, {allowed} allowed at once"
    );
    assert!(
        got.iter().any(|g| matches!(g, Got::BufferFull(m)
            if m.contains(&format!("submit.max_connections = {allowed}")))),
        "the clients past the clamped limit are told so"
    );
    assert_forwarding_still_works(&agent, &url, &queue, stored);
    let log = agent.log_text();
    assert!(!log.contains("Too many open files"), "{log}");
}

// ------------------------------------------------ a long outage, and after

/// `PRAGMA name` of the agent's database (what SQLite sees, WAL included).
fn pragma(agent: &Agent, name: &str) -> i64 {
    agent.db_count(&format!("PRAGMA {name}"))
}

/// Bytes of a file; 0 when it is not there.
fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The database's size as `status` reports it, the main file alone, and
/// its live data (pages not on the freelist).
fn sizes(agent: &Agent) -> (u64, u64, i64) {
    let status = agent.cli(&["status", "--json"]).json();
    let with_wal = status["db_size_bytes"].as_u64().expect("db_size_bytes");
    let live = (pragma(agent, "page_count") - pragma(agent, "freelist_count"))
        * pragma(agent, "page_size");
    (with_wal, file_len(&agent.db), live)
}

/// The whole outage cycle at a small `store.max_db_size`: the broker is
/// unreachable while submits fill the database to the limit (refused
/// `storage_full`, nothing settled to purge); the link returns and the
/// backlog drains; the agent then accepts submits again by itself, making
/// room from the delivered rows (`made_room`, the metric), never touching
/// a delivering row; the purge then gives the space back: the file
/// shrinks. docs/storage.md (Limits, Making room), docs/purge.md.
#[test]
fn after_an_outage_past_max_db_size_submits_are_accepted_again_and_the_file_shrinks() {
    use edge_outbox_testkit::metrics::{free_port, value};
    use edge_outbox_testkit::{rt, FaultProxy, Mode};

    let rt = rt();
    let url = broker::default_url();
    let (exchange, queue) = rt.block_on(amqp::topology(&url, "k"));
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let port = free_port();
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .set_str("store", "max_db_size", "8MiB")
        // The on-demand purge at the end takes every delivered row.
        .set_str("purge", "retention", "0s")
        .set_str("metrics", "listen", format!("127.0.0.1:{port}"))
        .start();
    let mut c = agent.client();
    let body = "o".repeat(2000);
    let submit = |c: &mut Client, id: &str| {
        c.request(&json!({"exchange": exchange, "routing_key": "k", "id": id, "payload": body}))
    };

    // The outage: pipelined batches until the limit refuses.
    let mut stored: Vec<String> = Vec::new();
    let refusal = 'fill: loop {
        assert!(
            stored.len() < 20_000,
            "never refused: max_db_size not enforced"
        );
        let batch: Vec<String> = (0..100)
            .map(|i| format!("out-{}", stored.len() + i))
            .collect();
        for id in &batch {
            c.send(&json!({"exchange": exchange, "routing_key": "k", "id": id, "payload": body}));
        }
        let mut refusal = None;
        for id in &batch {
            let answer = c.answer();
            if answer["ok"] == json!(true) {
                assert_eq!(answer.get("made_room"), None, "{answer}");
                assert!(refusal.is_none(), "stored after a refusal: {answer}");
                assert_eq!(&ok_id(&answer), id);
                stored.push(id.clone());
            } else if refusal.is_none() {
                refusal = Some(refused(&answer, "storage_full"));
            }
        }
        if let Some(refusal) = refusal {
            break 'fill refusal;
        }
    };
    assert!(refusal.contains("max_db_size"), "{refusal}");
    assert!(refusal.contains("no settled row is left"), "{refusal}");
    let (full_with_wal, full_file, full_live) = sizes(&agent);
    assert!(
        full_live >= 8 << 20,
        "refused at {full_live} bytes of live data"
    );
    assert_eq!(agent.count_status(Status::Delivering), stored.len() as i64);

    // The link returns; the backlog drains.
    proxy.set_mode(Mode::Pass);
    agent.wait_all_delivered(stored.len() as i64, Duration::from_secs(120));

    // Nobody touches the agent: the next submit is stored, making room.
    let answer = submit(&mut c, "after-0");
    assert_eq!(ok_id(&answer), "after-0");
    let made_room = answer["made_room"]
        .as_u64()
        .expect("made_room in the answer");
    assert!(made_room > 0, "{answer}");
    let mut after = vec!["after-0".to_string()];
    for i in 1..200 {
        let id = format!("after-{i}");
        ok_id(&submit(&mut c, &id));
        after.push(id);
    }
    let purged = value(port, "edge_outbox_rows_purged_for_room_total");
    assert!(
        purged >= made_room as f64,
        "metric {purged}, answer {made_room}"
    );
    // Only delivered rows made room, the oldest first; every message still
    // reaches the broker.
    let left: i64 = agent.db_count("SELECT COUNT(*) FROM msg_log WHERE id LIKE 'out-%'");
    assert_eq!(left, stored.len() as i64 - purged as i64);
    let oldest_left = agent
        .db_count("SELECT MIN(CAST(substr(id, 5) AS INTEGER)) FROM msg_log WHERE id LIKE 'out-%'");
    assert_eq!(oldest_left, purged as i64, "the oldest rows go first");
    wait_until(
        "the new messages delivered",
        Duration::from_secs(60),
        || agent.count_status(Status::Delivering) == 0,
    );
    let received = rt.block_on(amqp::received(&url, &queue));
    let all: Vec<String> = stored.iter().chain(&after).cloned().collect();
    amqp::assert_all_received(&received, &all);

    // The purge runs; the reclaim hands the space back: the file shrinks.
    let purge = agent.cli(&["purge"]);
    assert_eq!(purge.code, 0, "{purge:?}");
    wait_until("the file shrinks", Duration::from_secs(30), || {
        file_len(&agent.db) < full_file / 4 && pragma(&agent, "freelist_count") == 0
    });
    let (end_with_wal, end_file, end_live) = sizes(&agent);
    eprintln!(
        "outage: {} stored, refused at {full_live} bytes of live data; database file \
         {full_file} bytes ({full_with_wal} with its WAL); after the drain {made_room} rows \
         made room for the first submit, {purged} for {} submits; after the purge: file \
         {end_file} bytes ({end_with_wal} with its WAL), {end_live} bytes of live data",
        stored.len(),
        after.len()
    );
    assert!(end_live * 4 < full_live);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

/// A large reclaim in the agent (free pages it finds at start: here about
/// 600 MB, a deleted backlog of 1,000,000 rows) while 32 clients submit: the
/// writer hands the pages back in slices between its groups, so the
/// submits wait little, judged on the 99.9th percentile (under 50 ms), and
/// the file ends at about its live data. Slow (a minute or two):
/// `cargo nextest run --release --test limits --run-ignored only reclaim`.
#[test]
#[ignore]
fn submits_flow_while_a_large_reclaim_runs() {
    use edge_outbox_testkit::prefill::{prefill_database, PrefillRow};

    const ROWS: i64 = 1_000_000;
    const CLIENTS: usize = 32;
    let mut agent = Agent::builder(BIN).prepare();
    prefill_database(&agent.db, ROWS, 512, |i| PrefillRow {
        id: format!("old-{i}"),
        status: Status::Delivered,
        routing_key: String::new(),
        create_time: 0,
        next_try_time: None,
    });
    {
        let db = agent.db();
        db.execute("DELETE FROM msg_log", [])
            .expect("deleting the backlog");
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    let before = file_len(&agent.db);
    let free_before = pragma(&agent, "freelist_count");
    let started = Instant::now();
    agent.restart();
    // 0: warming up; 1: measuring during the reclaim; 2: the same after it
    // (the machine's own figure); 3: done.
    let phase = std::sync::atomic::AtomicUsize::new(0);
    let ready = std::sync::Barrier::new(CLIENTS + 1);
    let mut phases: [Vec<Duration>; 2] = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|n| {
                let (agent, phase, ready) = (&agent, &phase, &ready);
                s.spawn(move || {
                    // A new connection's first answer is the accept's, not
                    // the writer's: submit once before the measure.
                    let mut c = agent.client();
                    ok_id(&c.submit("", "k", json!("warm-up")));
                    ready.wait();
                    let mut waits: [Vec<Duration>; 2] = Default::default();
                    loop {
                        let now = phase.load(std::sync::atomic::Ordering::SeqCst);
                        if now > 2 {
                            return waits;
                        }
                        let t = Instant::now();
                        ok_id(&c.submit("", "k", json!(format!("{n}-{}", waits[0].len()))));
                        waits[now - 1].push(t.elapsed());
                    }
                })
            })
            .collect();
        phase.store(1, std::sync::atomic::Ordering::SeqCst);
        ready.wait();
        assert!(
            pragma(&agent, "freelist_count") > free_before / 2,
            "the reclaim was nearly over before the clients were ready"
        );
        wait_until("the reclaim ends", Duration::from_secs(600), || {
            pragma(&agent, "freelist_count") == 0
        });
        let took = started.elapsed();
        phase.store(2, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(took.min(Duration::from_secs(10)));
        phase.store(3, std::sync::atomic::Ordering::SeqCst);
        let mut all: [Vec<Duration>; 2] = Default::default();
        for c in clients {
            let [during, after] = c.join().expect("client");
            all[0].extend(during);
            all[1].extend(after);
        }
        all
    });
    let took = started.elapsed();
    let after = {
        wait_until(
            "the file cut at a checkpoint",
            Duration::from_secs(30),
            || {
                agent.client().submit("", "k", json!("nudge"));
                file_len(&agent.db) < before / 10
            },
        );
        file_len(&agent.db)
    };
    let line = |name: &str, waits: &mut Vec<Duration>| -> Duration {
        waits.sort();
        let n = waits.len().max(1);
        let at = |q: usize| {
            waits
                .get((n * q / 1000).min(n - 1))
                .copied()
                .unwrap_or_default()
        };
        eprintln!(
            "{name}: {} submits from {CLIENTS} clients: median {:?}, p99 {:?}, p99.9 {:?}, \
             worst {:?}; over 50 ms: {}",
            waits.len(),
            at(500),
            at(990),
            at(999),
            waits.last().copied().unwrap_or_default(),
            waits
                .iter()
                .filter(|w| **w > Duration::from_millis(50))
                .count()
        );
        at(999)
    };
    eprintln!(
        "reclaim of {free_before} free pages: file {before} -> {after} bytes, in {took:?} \
         (including the measure after it)"
    );
    let [during, after_reclaim] = &mut phases;
    let p999 = line("during the reclaim", during);
    line("after it, the same clients", after_reclaim);
    let submits = during.len();
    assert!(submits > 1000, "only {submits} submits during the reclaim");
    // On a shared 2-core machine a few waits are the scheduler's; the
    // figure after the reclaim shows the machine's own.
    assert!(p999 < Duration::from_millis(50), "p99.9 {p999:?}");
}
