//! Encryption at rest (docs/storage.md, Encryption at rest): with
//! `store.key_file` set, the database and its WAL hold no plaintext, a
//! reader without the key cannot read them, the agent and the CLI with the
//! key can; a wrong, empty or missing key is refused with a clear error and
//! the file is left as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_outbox_testkit::{ok_id, Agent};
use serde_json::json;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// Text in every submitted message, looked for in the files.
const CANARY: &str = "PLAINTEXT-CANARY";

/// A key file in a directory of its own (the agent's temp dir exists only
/// once the agent is prepared).
fn key_file(key: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("key dir");
    let path = dir.path().join("store-key");
    std::fs::write(&path, key).expect("writing the key file");
    (dir, path)
}

/// Every file of the database (`db`, `db-wal`), concatenated.
fn database_bytes(db: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        let path = PathBuf::from(format!("{}{suffix}", db.display()));
        if let Ok(b) = std::fs::read(&path) {
            bytes.extend(b);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Submits `n` messages that carry the canary in their payload, exchange,
/// routing key and headers.
fn submit_canaries(agent: &Agent, n: usize) -> Vec<String> {
    let mut client = agent.client();
    (0..n)
        .map(|i| {
            ok_id(&client.request(&json!({
                "exchange": format!("{CANARY}-exchange"),
                "routing_key": format!("{CANARY}-key"),
                "payload": {"text": format!("{CANARY} {i}")},
                "headers": {"note": CANARY},
            })))
        })
        .collect()
}

fn stop(agent: &mut Agent) {
    agent.terminate();
    agent.wait_exit(Duration::from_secs(30));
}

#[test]
fn an_encrypted_database_holds_no_plaintext_and_opens_only_with_its_key() {
    let (_keys, key) = key_file("correct horse battery staple\n");
    let mut agent = Agent::builder(BIN)
        .set_str("store", "key_file", key.to_string_lossy())
        .start();
    let ids = submit_canaries(&agent, 50);
    // While the agent runs, the acknowledged rows are in the WAL.
    assert!(
        !contains(&database_bytes(&agent.db), CANARY),
        "plaintext in the running agent's files"
    );
    stop(&mut agent);
    assert!(
        !contains(&database_bytes(&agent.db), CANARY),
        "plaintext in the stopped agent's files"
    );

    // Without the key, SQLite sees no database.
    let plain = rusqlite::Connection::open(&agent.db).expect("open");
    let err = plain
        .query_row("SELECT COUNT(*) FROM msg_log", [], |r| r.get::<_, i64>(0))
        .expect_err("read without the key");
    assert_eq!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase),
        "{err}"
    );
    // With it, every row is there.
    let keyed = rusqlite::Connection::open(&agent.db).expect("open");
    keyed
        .pragma_update(None, "key", "correct horse battery staple")
        .expect("key");
    let rows: i64 = keyed
        .query_row("SELECT COUNT(*) FROM msg_log", [], |r| r.get(0))
        .expect("read with the key");
    assert_eq!(rows, 50);
    drop((plain, keyed));

    // The CLI reads it with the configured key, the agent restarts on it.
    let shown = agent.cli(&["show", &ids[7], "--json"]);
    assert_eq!(shown.code, 0, "{shown:?}");
    assert!(shown.stdout.contains(&format!("{CANARY} 7")), "{shown:?}");
    agent.restart();
    submit_canaries(&agent, 1);
    let status = agent.cli(&["status", "--json"]);
    assert_eq!(status.code, 0, "{status:?}");
    stop(&mut agent);
}

#[test]
fn a_wrong_key_is_refused_clearly_and_the_file_is_left_alone() {
    let (_keys, key) = key_file("the right key");
    let mut agent = Agent::builder(BIN)
        .set_str("store", "key_file", key.to_string_lossy())
        .start();
    submit_canaries(&agent, 3);
    stop(&mut agent);
    let before = std::fs::read(&agent.db).expect("db");

    std::fs::write(&key, "a wrong key").expect("key");
    let run = agent.cli(&["run"]);
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("the key is wrong"), "{run:?}");
    let list = agent.cli(&["list"]);
    assert_ne!(list.code, 0, "{list:?}");
    assert!(list.stderr.contains("the key is wrong"), "{list:?}");
    assert_eq!(
        std::fs::read(&agent.db).expect("db"),
        before,
        "file changed"
    );

    std::fs::write(&key, "\n").expect("key");
    let empty = agent.cli(&["run"]);
    assert_ne!(empty.code, 0, "{empty:?}");
    assert!(empty.stderr.contains("store.key_file"), "{empty:?}");
    assert!(empty.stderr.contains("empty"), "{empty:?}");

    std::fs::remove_file(&key).expect("rm key");
    let missing = agent.cli(&["list"]);
    assert_ne!(missing.code, 0, "{missing:?}");
    assert!(missing.stderr.contains("store.key_file"), "{missing:?}");
    assert_eq!(
        std::fs::read(&agent.db).expect("db"),
        before,
        "file changed"
    );
}

#[test]
fn an_encrypted_database_without_a_key_is_named_as_possibly_encrypted() {
    let (_keys, key) = key_file("k");
    let mut agent = Agent::builder(BIN)
        .set_str("store", "key_file", key.to_string_lossy())
        .start();
    submit_canaries(&agent, 1);
    stop(&mut agent);
    // The same database, through a configuration without the key.
    let unkeyed = agent.config_text.replace(
        &format!(
            "key_file = {}",
            edge_outbox_testkit::config::toml_str(key.to_string_lossy())
        ),
        "key_file = \"\"",
    );
    assert_ne!(unkeyed, agent.config_text, "the key line was not found");
    std::fs::write(&agent.config, unkeyed).expect("config");
    let list = agent.cli(&["list"]);
    assert_ne!(list.code, 0, "{list:?}");
    assert!(list.stderr.contains("set store.key_file"), "{list:?}");
}

#[test]
fn a_plain_database_is_not_encrypted_by_setting_a_key() {
    let mut agent = Agent::start(BIN);
    submit_canaries(&agent, 1);
    stop(&mut agent);
    let (_keys, key) = key_file("k");
    let keyed = format!(
        "{}\n",
        agent.config_text.replace(
            "[store]\n",
            &format!(
                "[store]\nkey_file = {}\n",
                edge_outbox_testkit::config::toml_str(key.to_string_lossy())
            ),
        )
    );
    assert_ne!(
        keyed.trim_end(),
        agent.config_text.trim_end(),
        "no [store] section"
    );
    std::fs::write(&agent.config, keyed).expect("config");
    let run = agent.cli(&["run"]);
    assert_ne!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("not encrypted by"), "{run:?}");
}
