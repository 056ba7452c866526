//! The protocol's JSON Schema (docs/protocol.schema.json, decisions/0042)
//! against real traffic: requests sent to a running agent over its socket
//! and the answers it gives, each validated; requests the agent refuses for
//! their shape are invalid for the schema too.

use std::time::Duration;

use edge_outbox_testkit::broker;
use edge_outbox_testkit::{rt, wait_until, Agent};
use jsonschema::Validator;
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// The schema file, as the repository ships it.
const SCHEMA: &str = include_str!("../docs/protocol.schema.json");

/// A validator for one of the schema's `$defs` (`request`, `answer`).
fn validator(def: &str) -> Validator {
    let mut schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
    let root = schema.as_object_mut().expect("an object");
    root.remove("anyOf");
    root.insert("$ref".into(), json!(format!("#/$defs/{def}")));
    jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("the schema: {e}"))
}

struct Check {
    request: Validator,
    answer: Validator,
}

impl Check {
    fn new() -> Check {
        Check {
            request: validator("request"),
            answer: validator("answer"),
        }
    }

    fn valid(v: &Validator, what: &str, value: &Value) {
        let errors: Vec<String> = v.iter_errors(value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{what} {value} is invalid: {errors:?}");
    }

    /// Sends `line` to `agent` and returns its answer, valid for the schema.
    fn answer(&self, agent: &Agent, line: &str) -> Value {
        let mut client = agent.client();
        // An agent that refuses the connection (unauthorized) answers and
        // closes without reading: the write may meet a closed socket.
        let _ = client.send_raw(format!("{line}\n").as_bytes());
        let answer = client.answer();
        Check::valid(&self.answer, "answer", &answer);
        answer
    }

    /// A request valid for the schema, and its answer.
    fn send(&self, agent: &Agent, request: &Value) -> Value {
        Check::valid(&self.request, "request", request);
        self.answer(agent, &request.to_string())
    }
}

#[test]
fn real_requests_and_answers_match_the_schema() {
    let check = Check::new();
    // A dead broker: the status answer shows a broker not connected.
    let agent = Agent::builder(BIN)
        .set_str("submit", "max_message_size", "1KiB")
        .start();
    let accepted = [
        json!({"exchange": "", "routing_key": "demo", "payload": "hello"}),
        json!({"op": "submit", "exchange": "x", "routing_key": "", "payload": {"n": [1, 2.5, null]}}),
        json!({"exchange": "amq.topic", "routing_key": "k", "id": "m-1", "payload_base64": "AAEC/w==",
               "content_type": "application/x-thing",
               "headers": {"s": "v", "i": -7, "f": 1.5, "b": false, "a": [1, "x", true], "CC": ["k2"]}}),
        json!({"exchange": "x", "routing_key": "k", "payload": null, "headers": null}),
        json!({"exchange": "x", "routing_key": "k", "payload_base64": "AAE"}),
    ];
    for request in &accepted {
        let answer = check.send(&agent, request);
        assert_eq!(answer["ok"], true, "{request} -> {answer}");
    }
    let duplicate = check.send(&agent, &accepted[2]);
    assert_eq!(duplicate["duplicate"], true, "{duplicate}");
    let too_large = check.send(
        &agent,
        &json!({"exchange": "x", "routing_key": "k", "payload": "x".repeat(2000)}),
    );
    assert_eq!(too_large["error"], "too_large");
    for status in [json!({"op": "status"}), json!({"op": "status", "other": 1})] {
        let report = check.send(&agent, &status);
        assert_eq!(report["broker"]["connected"], false, "{report}");
    }

    // The lines `export` writes are requests too.
    let export = agent.cli(&["export"]);
    assert_eq!(export.code, 0, "{export:?}");
    for line in export.stdout.lines() {
        let request: Value = serde_json::from_str(line).expect("JSON");
        Check::valid(&check.request, "exported request", &request);
    }

    // Refused for their shape by the agent, invalid for the schema.
    let long = "k".repeat(256);
    let refused = [
        json!({"routing_key": "k", "payload": 1}),
        json!({"exchange": "x", "payload": 1}),
        json!({"exchange": "x", "routing_key": "k"}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "payload_base64": "AA=="}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "extra": true}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "id": ""}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "id": null}),
        json!({"exchange": "x", "routing_key": long, "payload": 1}),
        json!({"exchange": 5, "routing_key": "k", "payload": 1}),
        json!({"exchange": "x\n", "routing_key": "k", "payload": 1}),
        json!({"exchange": "amq.rabbitmq.log", "routing_key": "k", "payload": 1}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "content_type": 3}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "headers": {"h": null}}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "headers": {"h": {"a": 1}}}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "headers": {"h": [[1]]}}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "headers": {"CC": "k"}}),
        json!({"exchange": "x", "routing_key": "k", "payload": 1, "headers": []}),
        json!({"exchange": "x", "routing_key": "k", "payload_base64": "not base64!"}),
        json!({"op": "purge"}),
        json!({"op": 1, "exchange": "x", "routing_key": "k", "payload": 1}),
        json!([1]),
    ];
    for request in &refused {
        assert!(
            !check.request.is_valid(request),
            "the schema accepts {request}"
        );
        let answer = check.answer(&agent, &request.to_string());
        assert_eq!(answer["error"], "bad_request", "{request} -> {answer}");
    }
    let answer = check.answer(&agent, "not json");
    assert_eq!(answer["error"], "bad_request");
}

#[test]
fn refusals_of_the_limits_and_a_connected_status_match_the_schema() {
    let check = Check::new();
    let full = Agent::builder(BIN).set("store", "max_pending", "1").start();
    let request = json!({"exchange": "x", "routing_key": "k", "payload": 1});
    assert_eq!(check.send(&full, &request)["ok"], true);
    assert_eq!(check.send(&full, &request)["error"], "buffer_full");

    let closed = Agent::builder(BIN)
        .set("submit", "allowed_uids", "[12345]")
        .start();
    assert_eq!(check.send(&closed, &request)["error"], "unauthorized");

    let _rt = rt();
    let live = Agent::builder(BIN)
        .forwarding_to(&broker::default_url())
        .start();
    wait_until("the broker connected", Duration::from_secs(60), || {
        let mut client = live.client();
        client.send(&json!({"op": "status"}));
        client.answer()["broker"]["connected"] == true
    });
    let report = check.send(&live, &json!({"op": "status"}));
    assert!(report["broker"]["url"].is_string(), "{report}");
    assert!(report["broker"]["since"].is_i64(), "{report}");
}
