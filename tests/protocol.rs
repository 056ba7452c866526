//! The socket protocol and the command line, end to end (docs/protocol.md,
//! docs/cli.md): requests and their answers, refusals that leave the
//! connection usable, pipelining and concurrent clients, client-chosen ids,
//! binary bodies, JSON payloads that reach the broker byte for byte, what
//! the broker would refuse refused at submit, the socket file's life, and
//! the CLI's commands and exit codes.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use lapin::types::AMQPValue;
use serde_json::{json, Value};

use edge_outbox_testkit::cli::run_bin;
use edge_outbox_testkit::{amqp, broker};
use edge_outbox_testkit::{ok_id, refused, rt, Agent, Cleanup, CliOutput, Status};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// --------------------------------------------------- requests and answers

#[test]
fn bad_requests_are_refused_and_the_connection_stays_usable() {
    let agent = Agent::start(BIN);
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
    assert_eq!(agent.status_of(&id), Some(Status::Delivering));
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
    let agent = Agent::start(BIN);
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
fn a_client_id_is_stored_once() {
    let agent = Agent::start(BIN);
    let mut c = agent.client();
    let first = c.submit_with_id("dup-1", json!("first"));
    assert_eq!(ok_id(&first), "dup-1");
    assert!(first.get("duplicate").is_none(), "{first}");
    let second = c.submit_with_id("dup-1", json!("second"));
    assert_eq!(ok_id(&second), "dup-1");
    assert_eq!(second["duplicate"], json!(true), "{second}");
    // From another connection, too.
    let third = agent.client().submit_with_id("dup-1", json!("third"));
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
    let agent = Agent::start(BIN);
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

// ------------------------------------------------- byte-exact JSON payloads

/// How long a test waits for the agent to forward what it was given.
const DRAIN: Duration = Duration::from_secs(120);

/// JSON payloads a parse-and-serialise round trip would rewrite: integers
/// beyond `f64`, a number that underflows, duplicate keys, whitespace inside
/// the value (no `\n`: it ends a request line), escapes, `-0.0`.
const EXACT_PAYLOADS: [&str; 8] = [
    r#"{"order":98765432109876543210}"#,
    "123456789012345678901234567890",
    r#"{"amount":123456789012345678901234567890.000000000000000000001}"#,
    "1e-400",
    "-1E+400",
    r#"{"b":1,"a":2,"b":3}"#,
    "{ \"a\" :\t[ 1 ,\r 2.50 ,  0.1e1 ]\t,\"c\":{}}",
    r#"{"s":"\u00e9\ud83d\ude00\/\"","n":-0.0}"#,
];

#[test]
fn json_payloads_reach_the_queue_byte_identical() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("exact-q"));
    rt.block_on(amqp::declare_queue(&url, &queue));
    let agent = Agent::builder(BIN).forwarding_to(&url).start();

    // (id, the body the queue must hold)
    let mut sent: Vec<(String, String)> = Vec::new();
    // On the socket, with spaces around the value.
    let mut c = agent.client();
    for (i, payload) in EXACT_PAYLOADS.iter().enumerate() {
        let id = format!("socket-{i}");
        c.send_line(&format!(
            r#"{{"exchange":"","routing_key":{},"id":"{id}","payload": {payload} }}"#,
            json!(queue)
        ));
        assert_eq!(ok_id(&c.answer()), id);
        sent.push((id, payload.to_string()));
    }
    // `submit --json`, the payload as an argument and on stdin (the
    // whitespace around it is not part of the value).
    let submit = [
        "submit",
        "--exchange",
        "",
        "--routing-key",
        &queue,
        "--json",
    ];
    for (i, payload) in EXACT_PAYLOADS.iter().enumerate() {
        let id = format!("cli-arg-{i}");
        let out = agent.cli(&[&submit[..], &["--id", &id, "--", payload]].concat());
        assert_eq!((out.code, out.stdout.trim()), (0, id.as_str()), "{out:?}");
        sent.push((id, payload.to_string()));
        let id = format!("cli-stdin-{i}");
        let stdin = format!(" \t{payload}\n");
        let out = agent.cli_stdin(
            &[&submit[..], &["--id", &id, "-"]].concat(),
            stdin.as_bytes(),
        );
        assert_eq!((out.code, out.stdout.trim()), (0, id.as_str()), "{out:?}");
        sent.push((id, payload.to_string()));
    }
    // `submit --bulk`: the exchange and routing key filled in by the CLI.
    let bulk: String = EXACT_PAYLOADS
        .iter()
        .enumerate()
        .map(|(i, payload)| format!("{{\"id\":\"bulk-{i}\", \"payload\":{payload}}}\n"))
        .collect();
    let out = agent.cli_stdin(
        &[
            "submit",
            "--bulk",
            "--exchange",
            "",
            "--routing-key",
            &queue,
        ],
        bulk.as_bytes(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    for (i, payload) in EXACT_PAYLOADS.iter().enumerate() {
        sent.push((format!("bulk-{i}"), payload.to_string()));
    }

    agent.wait_all_delivered(sent.len() as i64, DRAIN);
    let received = rt.block_on(amqp::received(&url, &queue));
    assert_eq!(received.len(), sent.len());
    for (id, body) in &sent {
        let row = agent.row(id).unwrap_or_else(|| panic!("no row {id}"));
        assert_eq!(String::from_utf8_lossy(&row.body), *body, "stored {id}");
        let m = received
            .iter()
            .find(|m| m.message_id == *id)
            .unwrap_or_else(|| panic!("{id} never reached {queue}"));
        assert_eq!(String::from_utf8_lossy(&m.body), *body, "published {id}");
        assert_eq!(m.content_type.as_deref(), Some("application/json"), "{id}");
    }
}

// ------------------------------------- what the broker would refuse, refused

#[test]
fn what_the_broker_would_refuse_is_refused_at_submit_naming_the_field() {
    let agent = Agent::start(BIN);
    let mut c = agent.client();
    let long = "x".repeat(256);
    // One header "pad" whose table is a byte over the limit (64 KiB).
    let pad = "v".repeat(64 * 1024 - 13 + 1);
    let submit =
        |members: &str| format!(r#"{{"exchange":"ex","routing_key":"rk","payload":1,{members}}}"#);
    let cases = [
        (
            submit(r#""headers":{"CC":"q"}"#),
            "headers.CC: must be an array of strings",
        ),
        (
            submit(r#""headers":{"BCC":7}"#),
            "headers.BCC: must be an array of strings",
        ),
        (
            submit(r#""headers":{"CC":["q",["r"]]}"#),
            "headers.CC[1]: an array inside an array",
        ),
        (
            submit(r#""headers":{"BCC":["q",1]}"#),
            "headers.BCC[1]: must be a string",
        ),
        (
            submit(&format!(r#""headers":{{"CC":["{long}"]}}"#)),
            "headers.CC[0]: 256 bytes",
        ),
        (submit(r#""headers":{"x":null}"#), "headers.x: null"),
        (submit(r#""headers":{"x":{"y":1}}"#), "headers.x: an object"),
        (
            submit(r#""headers":{"order":98765432109876543210}"#),
            "headers.order: 98765432109876543210 does not fit",
        ),
        (
            submit(r#""headers":{"x":9223372036854775808}"#),
            "headers.x: 9223372036854775808 does not fit",
        ),
        (
            submit(r#""headers":{"x":1e-400}"#),
            "headers.x: 1e-400 is too small",
        ),
        (
            submit(r#""headers":{"x":1e400}"#),
            "headers.x: 1e400 is too large",
        ),
        (
            submit(r#""headers":{"x":[1,1e400]}"#),
            "headers.x[1]: 1e400 is too large",
        ),
        (
            submit(r#""headers":{"x":1,"x":2}"#),
            "headers.x: the name is given twice",
        ),
        (
            submit(&format!(r#""headers":{{"{long}":1}}"#)),
            "headers.xxxxxxxx",
        ),
        (
            submit(&format!(r#""headers":{{"pad":"{pad}"}}"#)),
            "\"headers\" take 65537 bytes",
        ),
        (
            submit(r#""headers":[["a",1]]"#),
            "\"headers\" must be an object",
        ),
        (
            submit(&format!(r#""content_type":"{long}""#)),
            "\"content_type\" is 256 bytes",
        ),
        (
            submit(r#""id":"a","id":"b""#),
            "\"id\" is given more than once",
        ),
        (
            r#"{"exchange":"amq.rabbitmq.trace","routing_key":"rk","payload":1}"#.to_string(),
            "\"exchange\" \"amq.rabbitmq.trace\": names beginning with \"amq.\" are reserved",
        ),
        (
            r#"{"exchange":"amq.default","routing_key":"rk","payload":1}"#.to_string(),
            "\"exchange\" \"amq.default\"",
        ),
        (
            r#"{"exchange":"orders\n","routing_key":"rk","payload":1}"#.to_string(),
            "\"exchange\" holds a CR or LF",
        ),
        (
            format!(r#"{{"exchange":"ex","routing_key":"{long}","payload":1}}"#),
            "\"routing_key\" is 256 bytes",
        ),
    ];
    for (line, needle) in &cases {
        c.send_line(line);
        let message = refused(&c.answer(), "bad_request");
        assert!(message.starts_with(needle), "{line:.120}: {message}");
    }
    assert_eq!(agent.rows(), 0, "a refusal stores nothing");
    // The same headers done right are stored, in their checked form.
    let line = submit(
        r#""id":"fine","headers":{"CC":["q"],"BCC":[],"order":"98765432109876543210","n":-7,"f":1e2,"l":["a",1,true,0.5]}"#,
    );
    c.send_line(&line);
    assert_eq!(ok_id(&c.answer()), "fine");
    let headers: String = agent
        .db()
        .query_row("SELECT headers FROM msg_log WHERE id = 'fine'", [], |r| {
            r.get(0)
        })
        .expect("the row");
    assert_eq!(
        headers,
        r#"{"BCC":[],"CC":["q"],"f":100.0,"l":["a",1,true,0.5],"n":-7,"order":"98765432109876543210"}"#
    );
    // The CLI's --header: a number that does not fit is refused, not rounded.
    let out = agent.cli(&[
        "submit",
        "--exchange",
        "ex",
        "--routing-key",
        "rk",
        "--header",
        "order=98765432109876543210",
        "x",
    ]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(out.stderr.contains("headers.order"), "{out:?}");
    assert_eq!(agent.rows(), 1);
}

#[test]
fn cc_and_bcc_arrays_are_honoured_by_the_broker() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let main = cleanup.queue(amqp::unique("cc-main"));
    let cc = cleanup.queue(amqp::unique("cc-copy"));
    let bcc = cleanup.queue(amqp::unique("cc-blind"));
    rt.block_on(async {
        for q in [&main, &cc, &bcc] {
            amqp::declare_queue(&url, q).await;
        }
    });
    let agent = Agent::builder(BIN).forwarding_to(&url).start();
    // Headers close to the size limit go out in one frame, too.
    let pad = "p".repeat(60_000);
    let answer = agent.client().request(&json!({
        "exchange": "", "routing_key": main, "id": "cc-1", "payload": "hi",
        "headers": {"CC": [cc], "BCC": [bcc], "list": ["a", 1, true, 0.5], "pad": pad},
    }));
    assert_eq!(ok_id(&answer), "cc-1");
    agent.wait_all_delivered(1, DRAIN);

    let (in_main, in_cc, in_bcc) = rt.block_on(async {
        (
            amqp::get_all(&url, &main).await,
            amqp::get_all(&url, &cc).await,
            amqp::get_all(&url, &bcc).await,
        )
    });
    for (queue, got) in [(&main, &in_main), (&cc, &in_cc), (&bcc, &in_bcc)] {
        assert_eq!(got.len(), 1, "{queue}");
        let p = &got[0].delivery.properties;
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("cc-1"));
        let headers = p.headers().clone().unwrap_or_default();
        let headers = headers.inner();
        // The broker removes BCC from every copy; CC stays, as a field array.
        assert!(headers.get("BCC").is_none(), "{queue}: {headers:?}");
        let Some(AMQPValue::FieldArray(routes)) = headers.get("CC") else {
            panic!("{queue}: CC is {:?}", headers.get("CC"));
        };
        assert!(matches!(routes.as_slice(), [AMQPValue::LongString(s)] if s.to_string() == cc));
        let Some(AMQPValue::FieldArray(list)) = headers.get("list") else {
            panic!("{queue}: list is {:?}", headers.get("list"));
        };
        assert!(
            matches!(
                list.as_slice(),
                [
                    AMQPValue::LongString(_),
                    AMQPValue::LongLongInt(1),
                    AMQPValue::Boolean(true),
                    AMQPValue::Double(d)
                ] if *d == 0.5
            ),
            "{queue}: {list:?}"
        );
    }
}

// --------------------------------------------- pipelining and concurrency

#[test]
fn ten_thousand_pipelined_requests_are_answered_in_order() {
    const N: usize = 10_000;
    let agent = Agent::start(BIN);
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
    let stored: i64 = agent
        .db()
        .query_row(
            "SELECT COUNT(*) FROM msg_log WHERE id LIKE 'p-%' AND status = ?1 \
             AND exchange = 'ex' AND routing_key = 'rk'",
            [Status::Delivering],
            |r| r.get(0),
        )
        .expect("counting the rows");
    assert_eq!(stored, N as i64);
}

#[test]
fn sixty_four_concurrent_clients() {
    const CLIENTS: usize = 64;
    const EACH: usize = 40;
    let agent = Agent::start(BIN);
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

// -------------------------------------------------------- the socket file

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("socket metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn socket_file_mode_default_and_configured() {
    let agent = Agent::start(BIN);
    assert_eq!(mode_of(&agent.socket), 0o660);
    let agent = Agent::builder(BIN)
        .set_str("submit", "socket_mode", "0600")
        .start();
    assert_eq!(mode_of(&agent.socket), 0o600);
    ok_id(&agent.client().submit("", "", json!(1)));
}

#[test]
fn stale_socket_is_replaced_and_a_live_agent_is_detected() {
    let mut agent = Agent::start(BIN);
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
    let mut other = Agent::builder(BIN).prepare();
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

// ------------------------------------------------------- the command line

#[test]
fn cli_submit_status_list_show_retry_bulk() {
    let mut agent = Agent::builder(BIN)
        .set_str("submit", "max_message_size", "1KiB")
        .start();

    let out = agent.cli(&["submit", "--exchange", "ex", "--routing-key", "rk", "hello"]);
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.stdout.trim().to_string();
    assert_eq!(id.lines().count(), 1, "{out:?}");
    assert!(!id.is_empty());
    assert_eq!(agent.status_of(&id), Some(Status::Delivering));

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

    // Refused: exit 65 (bad data) with the reason.
    let big = "x".repeat(2000);
    let out = agent.cli(&["submit", "--exchange", "ex", "--routing-key", "rk", &big]);
    assert_eq!(out.code, 65, "{out:?}");
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
    // The JSON text as given, not re-serialised.
    assert_eq!(row["body"], json!(r#"{"a": 1}"#), "{row}");
    assert_eq!(row["content_type"], json!("application/json"), "{row}");
    assert_eq!(row["status"], json!("delivering"), "{row}");
    let out = agent.cli(&["show", "no-such-id"]);
    assert_eq!(out.code, 1, "{out:?}");

    // retry of a message that is not failed: exit 1, nothing changes.
    let out = agent.cli(&["retry", "c-1"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("c-1"), "{out:?}");
    assert_eq!(agent.status_of("c-1"), Some(Status::Delivering));

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
        assert_eq!(agent.status_of(id), Some(Status::Delivering), "{id}");
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
    assert_eq!(out.code, 65, "{out:?}");
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
    // submit with no agent: exit 69, says why.
    let out = agent.cli(&["submit", "--exchange", "", "--routing-key", "", "x"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(out.stderr.contains("cannot reach the agent"), "{out:?}");
}

#[test]
fn cli_exit_codes_for_usage_and_configuration_errors() {
    let agent = Agent::builder(BIN).prepare();
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

fn run_with_env(agent: &Agent, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let mut cmd = Command::new(BIN);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bin(cmd, agent.path(), args, b"")
}
