//! The submit side of the foundation, end to end: the real `edge-outbox`
//! binary, a real SQLite file, a real Unix socket (see `common::agent`).
//!
//! Covers every error code of the protocol, pipelining and concurrency,
//! client-id deduplication, binary bodies, crash safety (`kill -9`), the
//! socket file's life, full disks and the storage limits, the idle timeout,
//! the connection limit and the command line.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use common::agent::{ok_id, refused, Agent, Client};
use common::wait_until;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn submit_with_id(client: &mut Client, id: &str, payload: Value) -> Value {
    client.request(&json!({"exchange": "ex", "routing_key": "rk", "id": id, "payload": payload}))
}

fn status_of(agent: &Agent, id: &str) -> Option<i64> {
    use rusqlite::OptionalExtension;
    agent
        .db()
        .query_row("SELECT status FROM msg_log WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()
        .expect("querying a row")
}

// ---------------------------------------------------------------- error codes

#[test]
fn bad_requests_are_refused_and_the_connection_stays_usable() {
    let agent = Agent::start();
    let mut c = agent.client();
    let bad = [
        ("nope", "not a JSON object"),
        ("[1,2]", "JSON object"),
        ("{\"exchange\":\"e\"", "not a JSON object"),
        (r#"{"routing_key":"k","payload":1}"#, "exchange"),
        (r#"{"exchange":"e","payload":1}"#, "routing_key"),
        (r#"{"exchange":"e","routing_key":"k"}"#, "payload"),
        (
            r#"{"exchange":1,"routing_key":"k","payload":1}"#,
            "exchange",
        ),
        (
            r#"{"exchange":"e","routing_key":"k","payload_base64":"!!"}"#,
            "base64",
        ),
        (
            r#"{"exchange":"e","routing_key":"k","payload":1,"colour":"red"}"#,
            "colour",
        ),
        (r#"{"op":"dance"}"#, "unknown op"),
    ];
    for (line, needle) in bad {
        c.send_line(line);
        let message = refused(&c.answer(), "bad_request");
        assert!(message.contains(needle), "{line}: {message}");
    }
    let long_name = "x".repeat(256);
    let message = refused(
        &c.request(&json!({"exchange": long_name, "routing_key": "", "payload": 1})),
        "bad_request",
    );
    assert!(message.contains("255"), "{message}");
    // Still usable, and nothing refused was stored.
    let id = ok_id(&c.submit("ex", "rk", json!({"after": "errors"})));
    assert_eq!(agent.rows(), 1);
    assert_eq!(status_of(&agent, &id), Some(0));
    // Pipelined good and bad lines are answered in order.
    c.send_line(r#"{"exchange":"","routing_key":"","payload":"a","id":"order-1"}"#);
    c.send_line("garbage");
    c.send_line(r#"{"exchange":"","routing_key":"","payload":"b","id":"order-2"}"#);
    assert_eq!(ok_id(&c.answer()), "order-1");
    refused(&c.answer(), "bad_request");
    assert_eq!(ok_id(&c.answer()), "order-2");
    assert_eq!(agent.rows(), 3);
}

#[test]
fn status_op_answers_the_status_report() {
    let agent = Agent::start();
    let mut c = agent.client();
    ok_id(&c.submit("ex", "rk", json!(1)));
    let status = c.request(&json!({"op": "status"}));
    assert_eq!(status["ok"], json!(true), "{status}");
    assert_eq!(status["source"], json!("agent"), "{status}");
    assert_eq!(status["counts"]["delivering"], json!(1), "{status}");
    assert!(
        status["db_size_bytes"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
}

#[test]
fn too_large_bodies_and_lines_are_refused_and_the_connection_stays_usable() {
    let agent = Agent::builder()
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
    assert_eq!(status_of(&agent, &id), Some(0));
}

#[test]
fn buffer_full_refuses_without_evicting() {
    let agent = Agent::builder().set("store", "max_pending", "3").start();
    let mut c = agent.client();
    for i in 0..3 {
        ok_id(&submit_with_id(&mut c, &format!("m-{i}"), json!(i)));
    }
    let message = refused(&submit_with_id(&mut c, "m-3", json!(3)), "buffer_full");
    assert!(message.contains("max_pending"), "{message}");
    // A duplicate of a stored message is still ok.
    let dup = submit_with_id(&mut c, "m-1", json!("again"));
    assert_eq!(ok_id(&dup), "m-1");
    assert_eq!(dup["duplicate"], json!(true), "{dup}");
    // Still refused on a new connection; nothing evicted.
    let mut other = agent.client();
    refused(&other.submit("ex", "rk", json!("more")), "buffer_full");
    assert_eq!(agent.rows(), 3);
    for i in 0..3 {
        assert_eq!(status_of(&agent, &format!("m-{i}")), Some(0));
    }
    assert_eq!(status_of(&agent, "m-3"), None);
}

/// Another process holding the database's write lock (an operator's
/// `sqlite3` shell left inside a transaction) for longer than the writer's
/// busy timeout: a real storage error, not a full disk.
#[test]
fn storage_error_when_the_database_stays_locked() {
    let agent = Agent::start();
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

#[test]
fn unauthorized_peers_are_refused_and_closed() {
    // The tests run as root (uid 0): not in the list.
    let agent = Agent::builder()
        .set("submit", "allowed_uids", "[12345]")
        .start();
    let mut c = agent.client();
    let answers = c.expect_closed(Duration::from_secs(10));
    assert_eq!(answers.len(), 1, "{answers:?}");
    let message = refused(&answers[0], "unauthorized");
    assert!(message.contains("uid 0"), "{message}");
    // A request sent anyway is not stored.
    let mut c = agent.client();
    c.send_line(r#"{"exchange":"","routing_key":"","payload":1}"#);
    let answers = c.expect_closed(Duration::from_secs(10));
    assert!(answers.len() <= 1, "{answers:?}");
    if let Some(a) = answers.first() {
        refused(a, "unauthorized");
    }
    assert_eq!(agent.rows(), 0);
    // The CLI reports the refusal with exit 1.
    let out = agent.cli(&["submit", "--exchange", "", "--routing-key", "", "x"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("unauthorized"), "{out:?}");
    // `status` from a user the agent refuses still reads the database.
    let out = agent.cli(&["status", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["source"], json!("database"), "{out:?}");
    assert!(out.stderr.contains("unauthorized"), "{out:?}");
}

#[test]
fn allowed_gid_admits_the_peer() {
    let agent = Agent::builder()
        .set("submit", "allowed_uids", "[12345]")
        .set("submit", "allowed_gids", "[0]")
        .start();
    ok_id(&agent.client().submit("ex", "rk", json!(1)));
}

#[test]
fn shutting_down_is_answered_after_sigterm_then_the_agent_exits_0() {
    let mut agent = Agent::start();
    let mut c = agent.client();
    ok_id(&c.submit("ex", "rk", json!("before")));
    agent.terminate();
    let socket = agent.socket.clone();
    wait_until("the socket file to go", Duration::from_secs(10), || {
        !socket.exists()
    });
    c.send_line(r#"{"exchange":"ex","routing_key":"rk","payload":"too late","id":"late"}"#);
    let message = refused(&c.answer(), "shutting_down");
    assert!(message.contains("shutting down"), "{message}");
    c.expect_closed(Duration::from_secs(10));
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status}");
    assert_eq!(agent.rows(), 1);
    assert_eq!(status_of(&agent, "late"), None);
}

#[test]
fn sigint_stops_the_agent_like_sigterm() {
    let mut agent = Agent::start();
    ok_id(&agent.client().submit("ex", "rk", json!(1)));
    agent.signal("INT");
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!agent.socket.exists(), "the socket file was left behind");
    assert_eq!(agent.rows(), 1);
}

/// A second signal ends the agent at once, even while a client keeps a
/// connection draining.
#[test]
fn a_second_signal_exits_at_once() {
    let mut agent = Agent::start();
    let mut c = agent.client();
    ok_id(&c.submit("ex", "rk", json!(1)));
    agent.terminate();
    let socket = agent.socket.clone();
    wait_until("the socket file to go", Duration::from_secs(10), || {
        !socket.exists()
    });
    // Keep the connection busy: every line resets its drain grace.
    let mut writer = c.writer();
    let keep_busy = std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let line = b"{\"exchange\":\"\",\"routing_key\":\"\",\"payload\":1}\n";
            if writer.write_all(line).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100)); // pacing, not a wait
        }
    });
    refused(&c.answer(), "shutting_down");
    refused(&c.answer(), "shutting_down");
    assert!(agent.is_running(), "the agent stopped draining early");
    let signalled = Instant::now();
    agent.terminate();
    let status = agent.wait_exit(Duration::from_secs(5));
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "took {:?} after the second signal",
        signalled.elapsed()
    );
    eprintln!("exit status after the second signal: {status}");
    drop(c);
    let _ = keep_busy.join();
    assert_eq!(agent.rows(), 1);
}

/// SIGTERM in the middle of a pipelined burst: what was read before is
/// answered (and stored when ok), what comes after is `shutting_down`,
/// nothing acknowledged is lost, and the agent exits 0.
#[test]
fn sigterm_during_a_pipelined_burst_answers_in_order_and_loses_nothing() {
    const N: usize = 20_000;
    let mut agent = Agent::start();
    let mut c = agent.client();
    let mut writer = c.writer();
    let sender = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(&mut writer);
        for i in 0..N {
            let line = json!({"exchange": "ex", "routing_key": "rk", "id": format!("t-{i}"), "payload": i});
            if writeln!(out, "{line}").is_err() {
                return;
            }
        }
        let _ = out.flush();
    });
    let mut ok = Vec::new();
    let mut late = 0;
    let mut i = 0;
    while let Some(answer) = c.read_answer() {
        if answer["ok"] == json!(true) {
            assert_eq!(late, 0, "ok after shutting_down: {answer}");
            assert_eq!(ok_id(&answer), format!("t-{i}"));
            ok.push(format!("t-{i}"));
        } else {
            refused(&answer, "shutting_down");
            late += 1;
        }
        i += 1;
        if i == 1_000 {
            agent.terminate();
        }
    }
    let _ = sender.join();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(ok.len() >= 1_000, "{} ok", ok.len());
    assert!(i <= N);
    eprintln!(
        "{} ok, {late} shutting_down, {} unanswered",
        ok.len(),
        N - i
    );
    assert_all_stored(&agent, &ok);
    assert_eq!(
        agent.rows(),
        ok.len() as i64,
        "refused requests were stored"
    );
}

// ---------------------------------------------------------- load and order

#[test]
fn ten_thousand_pipelined_requests_are_answered_in_order() {
    const N: usize = 10_000;
    let agent = Agent::start();
    let mut c = agent.client();
    let mut writer = c.writer();
    let sender = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, &mut writer);
        for i in 0..N {
            let line = json!({
                "exchange": "ex",
                "routing_key": "rk",
                "id": format!("p-{i}"),
                "payload": {"n": i},
            });
            writeln!(out, "{line}").expect("writing a request");
        }
        out.flush().expect("flushing");
    });
    for i in 0..N {
        let answer = c.answer();
        assert_eq!(ok_id(&answer), format!("p-{i}"), "answer {i} out of order");
        assert!(answer.get("duplicate").is_none(), "{answer}");
    }
    sender.join().expect("the writer thread");
    assert_eq!(agent.rows(), N as i64);
    assert_eq!(
        agent.db_count(
            "SELECT COUNT(*) FROM msg_log WHERE id LIKE 'p-%' AND status = 0 \
             AND exchange = 'ex' AND routing_key = 'rk'"
        ),
        N as i64
    );
}

#[test]
fn sixty_four_concurrent_clients() {
    const CLIENTS: usize = 64;
    const EACH: usize = 40;
    let agent = Agent::start();
    let ids = Arc::new(Mutex::new(BTreeSet::new()));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let mut c = agent.client();
            let ids = ids.clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let answer = c.submit("ex", &format!("client-{t}"), json!({"t": t, "i": i}));
                    let id = ok_id(&answer);
                    assert!(ids.lock().expect("lock").insert(id), "id given twice");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread");
    }
    assert_eq!(ids.lock().expect("lock").len(), CLIENTS * EACH);
    assert_eq!(agent.rows(), (CLIENTS * EACH) as i64);
    assert_eq!(
        agent.db_count("SELECT COUNT(DISTINCT routing_key) FROM msg_log"),
        CLIENTS as i64
    );
}

#[test]
fn a_client_id_is_stored_once() {
    let agent = Agent::start();
    let mut c = agent.client();
    let first = submit_with_id(&mut c, "dup-1", json!("first"));
    assert_eq!(ok_id(&first), "dup-1");
    assert!(first.get("duplicate").is_none(), "{first}");
    let second = submit_with_id(&mut c, "dup-1", json!("second"));
    assert_eq!(ok_id(&second), "dup-1");
    assert_eq!(second["duplicate"], json!(true), "{second}");
    // From another connection, too.
    let third = submit_with_id(&mut agent.client(), "dup-1", json!("third"));
    assert_eq!(third["duplicate"], json!(true), "{third}");
    assert_eq!(agent.rows(), 1);
    let body: String = agent
        .db()
        .query_row("SELECT msg FROM msg_log WHERE id = 'dup-1'", [], |r| {
            r.get(0)
        })
        .expect("the row");
    assert_eq!(body, "first");
    // Duplicates inside one pipelined burst (one group commit).
    for _ in 0..5 {
        c.send_line(r#"{"exchange":"","routing_key":"","payload":1,"id":"dup-2"}"#);
    }
    let answers: Vec<Value> = (0..5).map(|_| c.answer()).collect();
    let dups = answers
        .iter()
        .filter(|a| a["duplicate"] == json!(true))
        .count();
    assert!(
        answers.iter().all(|a| a["ok"] == json!(true)),
        "{answers:?}"
    );
    assert_eq!(dups, 4, "{answers:?}");
    assert_eq!(agent.rows(), 2);
}

#[test]
fn binary_payload_round_trips_byte_exact() {
    let agent = Agent::start();
    let bytes: Vec<u8> = (0..=255u8).collect();
    let encoded = B64.encode(&bytes);
    let answer = agent.client().request(&json!({
        "exchange": "ex", "routing_key": "rk", "payload_base64": encoded,
    }));
    let id = ok_id(&answer);
    let (kind, stored, content_type): (String, Vec<u8>, String) = agent
        .db()
        .query_row(
            "SELECT typeof(msg), msg, content_type FROM msg_log WHERE id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the row");
    assert_eq!(kind, "blob");
    assert_eq!(stored, bytes);
    assert_eq!(content_type, "application/octet-stream");
    let out = agent.cli(&["show", &id, "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["body_base64"], json!(encoded), "{out:?}");

    // UTF-8 text stays TEXT, JSON values are stored compact.
    let text_id = ok_id(&agent.client().submit("", "", json!("héllo\u{0}wörld")));
    let json_id = ok_id(
        &agent
            .client()
            .submit("", "", json!({"a": [1, 2], "b": null})),
    );
    let (kind, text): (String, String) = agent
        .db()
        .query_row(
            "SELECT typeof(msg), msg FROM msg_log WHERE id = ?1",
            [&text_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("the row");
    assert_eq!((kind.as_str(), text.as_str()), ("text", "héllo\u{0}wörld"));
    let text: String = agent
        .db()
        .query_row("SELECT msg FROM msg_log WHERE id = ?1", [&json_id], |r| {
            r.get(0)
        })
        .expect("the row");
    assert_eq!(text, r#"{"a":[1,2],"b":null}"#);
}

// -------------------------------------------------------------- crash safety

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

fn assert_all_stored(agent: &Agent, ids: &[String]) {
    let conn = agent.db();
    let mut stmt = conn
        .prepare("SELECT status FROM msg_log WHERE id = ?1")
        .expect("prepare");
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| {
            stmt.query_row([id.as_str()], |r| r.get::<_, i64>(0))
                .map(|s| s != 0)
                .unwrap_or(true)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost or not status 0, e.g. {:?}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn kill_9_right_after_a_burst_loses_nothing_acknowledged() {
    let mut agent = Agent::start();
    let acked = Arc::new(AtomicUsize::new(0));
    let ids = burst(&agent, 4, 500, &acked);
    agent.kill9();
    assert_eq!(ids.len(), 2000);
    agent.restart();
    assert_all_stored(&agent, &ids);
    assert_eq!(
        agent.status_counts(),
        std::collections::BTreeMap::from([(0, 2000)])
    );
}

#[test]
fn kill_9_during_a_burst_loses_nothing_acknowledged() {
    let mut agent = Agent::start();
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
    assert_all_stored(&agent, &ids);
    eprintln!(
        "acknowledged {} before kill -9; {} rows after restart",
        ids.len(),
        agent.rows()
    );
}

// ------------------------------------------------------------- socket file

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("socket metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn socket_file_mode_default_and_configured() {
    let agent = Agent::start();
    assert_eq!(mode_of(&agent.socket), 0o660);
    let agent = Agent::builder()
        .set_str("submit", "socket_mode", "0600")
        .start();
    assert_eq!(mode_of(&agent.socket), 0o600);
    ok_id(&agent.client().submit("", "", json!(1)));
}

#[test]
fn stale_socket_is_replaced_and_a_live_agent_is_detected() {
    let mut agent = Agent::start();
    ok_id(&agent.client().submit("", "", json!(1)));
    agent.kill9();
    let meta = std::fs::symlink_metadata(&agent.socket).expect("the stale socket file");
    assert!(meta.file_type().is_socket());
    assert!(
        std::os::unix::net::UnixStream::connect(&agent.socket).is_err(),
        "nobody should listen on a dead agent's socket"
    );
    agent.restart();
    ok_id(&agent.client().submit("", "", json!(2)));

    // A second agent on the same socket path while the first runs.
    let second = agent.cli(&["run"]);
    assert_eq!(second.code, 1, "{second:?}");
    let said = format!("{}{}", second.stdout, second.stderr);
    assert!(said.contains("already"), "{second:?}");
    // The first one is untouched and still serving on its socket.
    assert!(agent.is_running());
    ok_id(&agent.client().submit("", "", json!(3)));
    assert_eq!(agent.rows(), 3);

    // Something that is not a socket at the path is never replaced.
    let mut other = Agent::builder().prepare();
    std::fs::write(&other.socket, b"precious").expect("writing a file");
    let out = other.cli(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("not a socket"), "{out:?}");
    assert_eq!(
        std::fs::read(&other.socket).expect("still there"),
        b"precious"
    );
    std::fs::remove_file(&other.socket).expect("removing it");
    other.restart();
    ok_id(&other.client().submit("", "", json!(4)));
}

// ------------------------------------------------------- disks and limits

/// A small tmpfs mounted on a temp dir, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (and a note on stderr) when mounting is not possible here.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("eofs")
            .tempdir()
            .expect("temp dir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name` until the filesystem is full (or `limit` bytes).
    fn fill(&self, name: &str, limit: Option<u64>) -> PathBuf {
        let path = self.path().join(name);
        let mut file = std::fs::File::create(&path).expect("creating the filler");
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            if limit.is_some_and(|l| written >= l) {
                break;
            }
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Single bytes into what is left of the last page.
        if limit.is_none() {
            while let Ok(1) = file.write(&[0]) {}
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // Busy (an agent still dying): detach it.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[test]
fn a_full_disk_gives_storage_full_and_the_agent_recovers() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let mut agent = Agent::builder()
        .set_str(
            "store",
            "path",
            fs.path().join("outbox.db").to_string_lossy(),
        )
        .set_str("store", "min_free_disk", "0")
        .start();
    let mut c = agent.client();
    for i in 0..5 {
        ok_id(&submit_with_id(&mut c, &format!("before-{i}"), json!(i)));
    }
    let filler = fs.fill("filler", None);
    let big = "b".repeat(256 * 1024);
    let message = refused(&submit_with_id(&mut c, "big-1", json!(big)), "storage_full");
    eprintln!("full disk: {message}");
    assert!(message.contains("disk full"), "{message}");
    // Small ones too, from any connection, and the agent keeps running.
    let mut refusals = 0;
    for i in 0..3 {
        let answer = submit_with_id(&mut agent.client(), &format!("small-{i}"), json!(i));
        if answer["ok"] == json!(false) {
            refused(&answer, "storage_full");
            refusals += 1;
        }
    }
    assert!(refusals > 0, "small submits all fit on a full disk?");
    let status = c.request(&json!({"op": "status"}));
    assert_eq!(status["ok"], json!(true), "{status}");
    assert!(agent.is_running());
    assert_eq!(status_of(&agent, "big-1"), None);

    std::fs::remove_file(&filler).expect("removing the filler");
    ok_id(&submit_with_id(&mut c, "big-2", json!(big)));
    ok_id(&submit_with_id(&mut agent.client(), "after-1", json!(1)));
    for i in 0..5 {
        assert_eq!(status_of(&agent, &format!("before-{i}")), Some(0));
    }
    assert_eq!(status_of(&agent, "big-2"), Some(0));
    drop(c);
    agent.terminate();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
}

#[test]
fn min_free_disk_refuses_with_storage_full() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let agent = Agent::builder()
        .set_str(
            "store",
            "path",
            fs.path().join("outbox.db").to_string_lossy(),
        )
        .set_str("store", "min_free_disk", "4MiB")
        .start();
    let mut c = agent.client();
    ok_id(&submit_with_id(&mut c, "a", json!(1)));
    // Leave about 3 MiB free: below the 4 MiB floor.
    let filler = fs.fill("filler", Some(5 * 1024 * 1024));
    let message = refused(&submit_with_id(&mut c, "b", json!(2)), "storage_full");
    assert!(message.contains("min_free_disk"), "{message}");
    // A duplicate of a stored message is still ok.
    let dup = submit_with_id(&mut c, "a", json!(1));
    assert_eq!(dup["duplicate"], json!(true), "{dup}");
    std::fs::remove_file(&filler).expect("removing the filler");
    ok_id(&submit_with_id(&mut c, "b", json!(2)));
    assert_eq!(agent.rows(), 2);

    // Larger than the whole filesystem: always refused.
    let agent = Agent::builder()
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
    let agent = Agent::builder()
        .set_str("store", "max_db_size", "64KiB")
        .start();
    let mut c = agent.client();
    let mut stored = Vec::new();
    let mut refusal = None;
    for i in 0..500 {
        let id = format!("s-{i}");
        let answer = submit_with_id(&mut c, &id, json!("d".repeat(2000)));
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
    let dup = submit_with_id(&mut c, &stored[0], json!("again"));
    assert_eq!(dup["duplicate"], json!(true), "{dup}");
    assert_eq!(agent.rows(), stored.len() as i64);
    assert_all_stored(&agent, &stored);
    let page_size = agent.db_count("PRAGMA page_size");
    let pages = agent.db_count("PRAGMA page_count");
    assert!(
        pages * page_size <= 64 * 1024 + 2 * 4096 * 2,
        "database grew to {} bytes",
        pages * page_size
    );
}

// ------------------------------------------------- timeouts and connections

#[test]
fn an_idle_half_line_is_closed_and_others_are_served() {
    let agent = Agent::builder()
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
    let agent = Agent::builder()
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
    assert_eq!(status_of(&agent, "c3"), None);
}

// ---------------------------------------------------------------- the CLI

#[test]
fn cli_submit_status_list_show_retry_bulk() {
    let mut agent = Agent::builder()
        .set_str("submit", "max_message_size", "1KiB")
        .start();

    let out = agent.cli(&["submit", "--exchange", "ex", "--routing-key", "rk", "hello"]);
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.stdout.trim().to_string();
    assert_eq!(id.lines().count(), 1, "{out:?}");
    assert!(!id.is_empty());
    assert_eq!(status_of(&agent, &id), Some(0));

    let out = agent.cli(&[
        "submit",
        "--exchange",
        "ex",
        "--routing-key",
        "rk",
        "--id",
        "c-1",
        "--header",
        "n=1",
        "--json",
        r#"{"a": 1}"#,
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "c-1");
    // The payload from stdin.
    let out = agent.cli_stdin(
        &[
            "submit",
            "--exchange",
            "ex",
            "--routing-key",
            "rk",
            "--id",
            "c-2",
            "-",
        ],
        b"from stdin",
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), "c-2");

    // Refused: exit 1 with the reason.
    let big = "x".repeat(2000);
    let out = agent.cli(&["submit", "--exchange", "ex", "--routing-key", "rk", &big]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("too_large"), "{out:?}");
    assert!(out.stdout.trim().is_empty(), "{out:?}");

    let out = agent.cli(&["status", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let status = out.json();
    assert_eq!(status["counts"]["delivering"], json!(3), "{status}");
    assert_eq!(status["source"], json!("agent"), "{status}");
    let out = agent.cli(&["status"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("3 delivering"), "{out:?}");

    let out = agent.cli(&["list", "--status", "delivering", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let rows = out.json();
    let listed: BTreeSet<&str> = rows
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, BTreeSet::from([id.as_str(), "c-1", "c-2"]));
    let out = agent.cli(&["list", "--status", "failed", "--json"]);
    assert_eq!(out.json(), json!([]), "{out:?}");

    let out = agent.cli(&["show", "c-1", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let row = out.json();
    assert_eq!(row["body"], json!(r#"{"a":1}"#), "{row}");
    assert_eq!(row["content_type"], json!("application/json"), "{row}");
    assert_eq!(row["status"], json!("delivering"), "{row}");
    let out = agent.cli(&["show", "no-such-id"]);
    assert_eq!(out.code, 1, "{out:?}");

    // retry of a message that is not failed: exit 1, nothing changes.
    let out = agent.cli(&["retry", "c-1"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("c-1"), "{out:?}");
    assert_eq!(status_of(&agent, "c-1"), Some(0));

    // --bulk: NDJSON on stdin, one id per line out.
    let ndjson = concat!(
        "{\"payload\":1}\n",
        "{\"payload\":\"two\",\"id\":\"b-2\"}\n",
        "\n",
        "{\"payload\":{\"k\":true},\"routing_key\":\"other\"}\n",
    );
    let out = agent.cli_stdin(
        &[
            "submit",
            "--bulk",
            "--exchange",
            "ex",
            "--routing-key",
            "rk",
        ],
        ndjson.as_bytes(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let ids: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{out:?}");
    assert_eq!(ids[1], "b-2");
    for id in &ids {
        assert_eq!(status_of(&agent, id), Some(0), "{id}");
    }
    let rk: String = agent
        .db()
        .query_row(
            "SELECT routing_key FROM msg_log WHERE id = ?1",
            [ids[2]],
            |r| r.get(0),
        )
        .expect("row");
    assert_eq!(rk, "other");
    // A bulk with a bad line: the others are stored, exit 1.
    let out = agent.cli_stdin(
        &[
            "submit",
            "--bulk",
            "--exchange",
            "ex",
            "--routing-key",
            "rk",
        ],
        b"{\"payload\":1,\"id\":\"b-4\"}\nnot json\n{\"payload\":2,\"id\":\"b-5\"}\n",
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["b-4", "b-5"],
        "{out:?}"
    );
    assert!(out.stderr.contains("bad_request"), "{out:?}");

    // status with the agent stopped reads the database.
    agent.terminate();
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
    let out = agent.cli(&["status", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let status = out.json();
    assert_eq!(status["source"], json!("database"), "{status}");
    assert_eq!(status["counts"]["delivering"], json!(8), "{status}");
    let out = agent.cli(&["status"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("not running"), "{out:?}");
    // submit with no agent: exit 1, says why.
    let out = agent.cli(&["submit", "--exchange", "", "--routing-key", "", "x"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("cannot reach the agent"), "{out:?}");
}

#[test]
fn cli_exit_codes_for_usage_and_configuration_errors() {
    let agent = Agent::builder().prepare();
    let out = agent.cli(&["check-config"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("configuration OK"), "{out:?}");
    assert!(
        !out.stdout.contains("guest:guest"),
        "password shown: {out:?}"
    );

    let bad = agent.path().join("bad.toml");
    std::fs::write(&bad, "[store]\npaht = \"x.db\"\n").expect("writing");
    let bad = bad.to_string_lossy().into_owned();
    let out = agent.cli_raw(&["check-config", "-c", &bad], b"");
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("paht"), "{out:?}");
    // Every command checks it, `run` included.
    let out = agent.cli_raw(&["run", "-c", &bad], b"");
    assert_eq!(out.code, 78, "{out:?}");
    let bad_value = agent.path().join("bad-value.toml");
    std::fs::write(&bad_value, "[submit]\nmax_connections = 0\n").expect("writing");
    let out = agent.cli_raw(&["check-config", "-c", &bad_value.to_string_lossy()], b"");
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("submit.max_connections"), "{out:?}");

    for args in [
        &["frobnicate"][..],
        &[][..],
        &["submit", "--bogus"][..],
        &["list", "--status", "lost"][..],
        &["retry"][..],
    ] {
        let out = agent.cli_raw(args, b"");
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
    }
    // Configuration from the environment, too.
    let out = run_with_env(&agent, &["check-config"], &[("EDGE_OUTBOX_CONFIG", &bad)]);
    assert_eq!(out.code, 78, "{out:?}");
}

fn run_with_env(agent: &Agent, args: &[&str], env: &[(&str, &str)]) -> common::agent::CliOutput {
    let mut cmd = Command::new(common::agent::BIN);
    for (k, v) in env {
        cmd.env(k, v);
    }
    common::agent::run_bin(cmd, agent.path(), args, b"")
}

/// The database the agent creates: WAL, the spec's columns, a row as the
/// spec describes it.
#[test]
fn the_database_is_wal_with_the_spec_schema() {
    let agent = Agent::start();
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
        i64,
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
                    r.get(3)?,
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
    assert_eq!((status, tries), (0, 0));
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

/// The agent's log says what it is doing (and has no password in it).
#[test]
fn the_log_names_the_socket_and_database() {
    let mut agent = Agent::start();
    agent.terminate();
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
    let log = agent.log_text();
    assert!(log.contains("ready"), "{log}");
    assert!(log.contains(&agent.socket.display().to_string()), "{log}");
    assert!(!log.contains("guest:guest"), "{log}");
}
