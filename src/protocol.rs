//! Protocol: the requests and answers of the submit socket (docs/protocol.md),
//! shared by the socket server ([`crate::submit`]) and the CLI ([`crate::cli`]).
//!
//! The protocol in brief: a client writes one JSON object per line and reads
//! one JSON object per line back, in the same order (pipelining is allowed).
//! - A request has an `op`: `"submit"` (the default when `op` is absent) or
//!   `"status"`. A submit carries `exchange`, `routing_key` (both required,
//!   may be `""`), optionally `id`, `content_type`, `headers` (strings,
//!   booleans, numbers and arrays of them), and exactly one of `payload` (any
//!   JSON value; a string is sent as its text, anything else as the JSON
//!   text exactly as the client wrote it) or `payload_base64` (raw bytes).
//! - The answer to a stored submit is `{"ok":true,"id":…}`, plus
//!   `"duplicate":true` when the id was already stored, `"made_room":N` when
//!   settled rows were purged to make room for it; the answer to a status
//!   request is `"ok":true` with the fields of the status report.
//! - A refusal is `{"ok":false,"error":<code>,"message":<text>}` and stores
//!   nothing; the codes are [`ErrorCode`] (docs/protocol.md, "Error codes").
//!
//! Owns: the types of both directions, the wire names of the error codes,
//! the default content types, the 255-byte name limit and the size limit of
//! the headers, and every encoding of an answer. Reading a request line
//! (validation, with a reason per fault) is the server's job, in
//! `submit::parse`; what a header value may be is the header codec's
//! (`broker::headers`).
//!
//! Invariants:
//! - The bytes of an answer are what the agent has always written; the unit
//!   tests below pin them.
//! - A request carries `payload` and the values of `headers` as JSON text
//!   ([`RawValue`]), never as a parsed value: no number is rounded, no key
//!   reordered or dropped on the way from the client's bytes to the row
//!   (docs/decisions/0022-payload-is-the-json-text-as-sent.md).

use serde::de::{self, DeserializeOwned};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::status::StatusReport;

/// AMQP short strings (exchange, routing key, message id, content type,
/// header names) hold 255 bytes; a longer one could be stored but never
/// published.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// Most bytes the headers may take as an AMQP field table. The message
/// properties travel in one frame, and RabbitMQ ends the whole connection
/// (501 FRAME_ERROR) on a frame over its `frame_max` (128 KiB by default):
/// half of that leaves room for the other properties and a broker that
/// lowers `frame_max` (docs/protocol.md, "Headers").
pub(crate) const MAX_HEADERS_LEN: usize = 64 * 1024;

/// Default content type of a payload that is JSON but not a string.
pub(crate) const CONTENT_TYPE_JSON: &str = "application/json";
/// Default content type of a payload that is a JSON string.
pub(crate) const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";
/// Default content type of a `payload_base64`.
pub(crate) const CONTENT_TYPE_BYTES: &str = "application/octet-stream";

/// The base64 of `payload_base64`: standard alphabet, padding optional, so
/// clients need not care which encoder they use.
pub(crate) fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

/// One request line.
#[derive(Debug, Clone)]
pub(crate) enum Request {
    Submit(SubmitRequest),
    Status,
}

/// A submit request as it travels, before the server decodes its payload.
///
/// Fields in alphabetical order: the CLI has always sent them so.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SubmitRequest {
    /// Overrides the type derived from the payload's kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content_type: Option<String>,
    pub(crate) exchange: String,
    /// AMQP headers: a JSON object as text. Once `submit::parse` has read
    /// the request, its validated form, the text `msg_log.headers` stores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) headers: Option<Box<RawValue>>,
    /// The client's own id: the same id submitted twice is stored once.
    /// Absent, the agent makes one up (a UUIDv7).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<String>,
    #[serde(flatten)]
    pub(crate) payload: Payload,
    /// 0 to 9, 0 when absent: the backlog goes out highest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) priority: Option<u8>,
    pub(crate) routing_key: String,
    /// How long the message may wait to be published, in milliseconds;
    /// absent: the agent's `publish.max_age`. On the wire also a duration
    /// string ("30s", "5m").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ttl: Option<u64>,
}

/// The body of a submit, as one of the two fields that may carry it.
#[derive(Debug, Clone, Serialize)]
pub(crate) enum Payload {
    /// `payload`, the value's JSON text as the client wrote it (surrounding
    /// whitespace aside): a JSON string is sent as the UTF-8 text it
    /// encodes, any other value as this text, byte for byte.
    #[serde(rename = "payload")]
    Json(Box<RawValue>),
    /// `payload_base64`: bytes that need not be text.
    #[serde(rename = "payload_base64")]
    Base64(String),
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            // `op` left out: "submit" is the default.
            Request::Submit(submit) => submit.serialize(serializer),
            Request::Status => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("op", "status")?;
                map.end()
            }
        }
    }
}

impl Request {
    /// The request as one line, `\n`-terminated.
    pub(crate) fn to_line(&self) -> serde_json::Result<Vec<u8>> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }
}

/// The error codes of the protocol (docs/protocol.md, "Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    BadRequest,
    TooLarge,
    BufferFull,
    StorageFull,
    StorageError,
    Unauthorized,
    ShuttingDown,
}

impl ErrorCode {
    pub(crate) const ALL: [ErrorCode; 7] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::BufferFull,
        ErrorCode::StorageFull,
        ErrorCode::StorageError,
        ErrorCode::Unauthorized,
        ErrorCode::ShuttingDown,
    ];

    /// The wire name, also the `code` label of the refusal metric.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::BufferFull => "buffer_full",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }

    fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == name)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        ErrorCode::from_name(&name)
            .ok_or_else(|| de::Error::custom(format!("unknown error code {name:?}")))
    }
}

/// A refused request: its code and a reason for a human.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Refusal {
    #[serde(rename = "error")]
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// What the agent says to a stored submit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Accepted {
    pub(crate) id: String,
    /// The id was already stored; this submit stored nothing new.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) duplicate: bool,
    /// Settled rows purged, in the commit that stored this message, to make
    /// room under `store.max_db_size` (docs/protocol.md, Answers).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) made_room: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One answer line: `"ok":true` with `T`'s fields, or a refusal.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Answer<T> {
    Ok(T),
    Refused(Refusal),
}

/// The answer to a submit.
pub(crate) type SubmitAnswer = Answer<Accepted>;
/// The answer to `{"op":"status"}`.
pub(crate) type StatusAnswer = Answer<StatusReport>;

/// The wire shape of a submit answer and of every refusal: `ok` first.
#[derive(Serialize)]
struct Wire<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    #[serde(skip_serializing_if = "is_zero")]
    made_room: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

impl Refusal {
    /// The refusal as one answer line, `\n`-terminated.
    pub(crate) fn to_line(&self) -> Vec<u8> {
        line(&Wire {
            ok: false,
            id: None,
            duplicate: false,
            made_room: 0,
            error: Some(self.code),
            message: Some(&self.message),
        })
    }
}

impl SubmitAnswer {
    /// The answer as one line, `\n`-terminated.
    pub(crate) fn to_line(&self) -> Vec<u8> {
        match self {
            Answer::Ok(accepted) => line(&Wire {
                ok: true,
                id: Some(&accepted.id),
                duplicate: accepted.duplicate,
                made_room: accepted.made_room,
                error: None,
                message: None,
            }),
            Answer::Refused(refusal) => refusal.to_line(),
        }
    }
}

impl StatusAnswer {
    /// The answer as one line, `\n`-terminated. The report's keys come out
    /// sorted, `ok` among them, at every level: the agent has always
    /// answered so (the report goes through a JSON map).
    pub(crate) fn to_line(&self) -> Vec<u8> {
        match self {
            Answer::Ok(report) => match serde_json::to_value(report) {
                Ok(mut value) => {
                    if let Value::Object(map) = &mut value {
                        map.insert("ok".into(), Value::Bool(true));
                    }
                    let mut line = serde_json::to_vec(&value).unwrap_or_default();
                    line.push(b'\n');
                    line
                }
                Err(e) => Refusal::new(ErrorCode::StorageError, e.to_string()).to_line(),
            },
            Answer::Refused(refusal) => refusal.to_line(),
        }
    }
}

fn line(wire: &Wire<'_>) -> Vec<u8> {
    let mut line = serde_json::to_vec(wire).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    line
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Answer<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut fields = Map::<String, Value>::deserialize(deserializer)?;
        let ok = fields.remove("ok");
        let rest = Value::Object(fields);
        match ok {
            Some(Value::Bool(true)) => T::deserialize(rest).map(Answer::Ok),
            Some(Value::Bool(false)) => Refusal::deserialize(rest).map(Answer::Refused),
            _ => return Err(de::Error::custom("an answer has a boolean \"ok\"")),
        }
        .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StatusCounts;

    fn text(line: Vec<u8>) -> String {
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn answer_bytes_are_pinned() {
        let accepted = |duplicate| {
            Answer::Ok(Accepted {
                id: "m-1".into(),
                duplicate,
                made_room: 0,
            })
        };
        assert_eq!(
            text(accepted(false).to_line()),
            "{\"ok\":true,\"id\":\"m-1\"}\n"
        );
        assert_eq!(
            text(accepted(true).to_line()),
            "{\"ok\":true,\"id\":\"m-1\",\"duplicate\":true}\n"
        );
        let made_room = Answer::Ok(Accepted {
            id: "m-2".into(),
            duplicate: false,
            made_room: 128,
        });
        assert_eq!(
            text(made_room.to_line()),
            "{\"ok\":true,\"id\":\"m-2\",\"made_room\":128}\n"
        );
        let refused = SubmitAnswer::Refused(Refusal::new(ErrorCode::TooLarge, "big"));
        assert_eq!(
            text(refused.to_line()),
            "{\"ok\":false,\"error\":\"too_large\",\"message\":\"big\"}\n"
        );
    }

    #[test]
    fn status_answer_keys_are_sorted_with_ok() {
        // Built from JSON: the report's optional fields stay out of the test.
        let report: StatusReport = serde_json::from_value(serde_json::json!({
            "source": "agent",
            "version": "0",
            "counts": StatusCounts::default(),
            "db_path": "db",
            "db_size_bytes": 1,
        }))
        .unwrap();
        let line = text(StatusAnswer::Ok(report).to_line());
        assert!(
            line.starts_with("{\"broker\":null,\"counts\":{\"consumed\":0,"),
            "{line}"
        );
        assert!(
            line.contains("\"free_disk_bytes\":null,\"ok\":true,"),
            "{line}"
        );
        let back: StatusAnswer = serde_json::from_str(&line).unwrap();
        assert!(matches!(back, Answer::Ok(r) if r.db_size_bytes == 1));
    }

    #[test]
    fn answers_read_back_typed() {
        for answer in [
            Answer::Ok(Accepted {
                id: "a".into(),
                duplicate: true,
                made_room: 0,
            }),
            Answer::Ok(Accepted {
                id: "b".into(),
                duplicate: false,
                made_room: 7,
            }),
            Answer::Refused(Refusal::new(ErrorCode::Unauthorized, "who?")),
        ] {
            let back: SubmitAnswer = serde_json::from_slice(&answer.to_line()).unwrap();
            assert_eq!(back, answer);
        }
        assert!(serde_json::from_str::<SubmitAnswer>(r#"{"id":"a"}"#).is_err());
    }

    #[test]
    fn error_code_names_round_trip() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        assert!(serde_json::from_str::<ErrorCode>("\"nope\"").is_err());
    }

    #[test]
    fn requests_are_written_as_the_cli_always_wrote_them() {
        let status = Request::Status.to_line().unwrap();
        assert_eq!(text(status), "{\"op\":\"status\"}\n");
        let submit = Request::Submit(SubmitRequest {
            content_type: None,
            exchange: "e".into(),
            headers: None,
            id: Some("c1".into()),
            payload: Payload::Base64("AA==".into()),
            priority: None,
            routing_key: "k".into(),
            ttl: None,
        });
        assert_eq!(
            text(submit.to_line().unwrap()),
            "{\"exchange\":\"e\",\"id\":\"c1\",\"payload_base64\":\"AA==\",\"routing_key\":\"k\"}\n"
        );
        // A JSON payload and the headers go out as their text, unparsed.
        let raw = |json: &str| RawValue::from_string(json.to_string()).unwrap();
        let submit = Request::Submit(SubmitRequest {
            content_type: None,
            exchange: "e".into(),
            headers: Some(raw(r#"{"n":98765432109876543210}"#)),
            id: None,
            payload: Payload::Json(raw("{ \"a\" :1e-400,\"a\":[ 1 ]}")),
            priority: None,
            routing_key: "k".into(),
            ttl: None,
        });
        assert_eq!(
            text(submit.to_line().unwrap()),
            "{\"exchange\":\"e\",\"headers\":{\"n\":98765432109876543210},\
             \"payload\":{ \"a\" :1e-400,\"a\":[ 1 ]},\"routing_key\":\"k\"}\n"
        );
    }
}
