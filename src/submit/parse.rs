//! Parse: one request line → a typed [`Request`], and a submit → the
//! [`NewMessage`] the store keeps, or a [`Refusal`] that says what is wrong
//! (docs/protocol.md, "Requests").
//!
//! Owns the validation of a request: required, repeated and unknown fields;
//! the 255-byte name limit; the names a publish can never reach; the
//! headers (the codec's value rules, then what RabbitMQ demands of `CC` and
//! `BCC`, and the size of the table); the payload's kind and its default
//! content type; `submit.max_message_size` on the decoded body.
//!
//! Refuse what the broker would refuse: every rule here stands for a publish
//! RabbitMQ 3.x refuses whatever its state (docs/protocol.md, "What the
//! agent refuses for the broker"), so a message that can never be delivered
//! is refused at submit instead of failing `max_attempts` times later.
//!
//! Invariants:
//! - `payload` is never parsed into a value: its JSON text goes to the row
//!   as the client wrote it; a JSON string is decoded to its UTF-8 text.
//! - Faults are reported in a fixed order (a repeated field, names, id,
//!   content type, headers, priority, ttl, unknown fields, payload, size), each as
//!   `bad_request` but an oversized body, which is `too_large`; a base64
//!   payload too large to accept is refused before it is decoded.

use std::fmt;

use base64::Engine;
use lapin::types::AMQPValue;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::error::Category;
use serde_json::value::RawValue;

use crate::broker::headers;
use crate::protocol::{
    base64_engine, ErrorCode, Payload, Refusal, Request, SubmitRequest, CONTENT_TYPE_BYTES,
    CONTENT_TYPE_JSON, CONTENT_TYPE_TEXT, MAX_HEADERS_LEN, MAX_NAME_LEN,
};
use crate::store::{NewMessage, MAX_PRIORITY};

/// The exchanges every RabbitMQ virtual host has under the reserved prefix
/// `amq.` and that a client may publish to (rabbit_vhost.erl).
const STANDARD_AMQ_EXCHANGES: [&str; 5] = [
    "amq.direct",
    "amq.fanout",
    "amq.topic",
    "amq.headers",
    "amq.match",
];

/// The headers RabbitMQ routes by (sender-selected distribution):
/// `?ROUTING_HEADERS` in rabbit.hrl.
const ROUTING_HEADERS: [&str; 2] = ["CC", "BCC"];

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::BadRequest, message)
}

/// The members of a request line, each value's JSON text as sent.
#[derive(Default)]
struct Fields<'a> {
    op: Option<&'a RawValue>,
    exchange: Option<&'a RawValue>,
    routing_key: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    content_type: Option<&'a RawValue>,
    headers: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
    payload_base64: Option<&'a RawValue>,
    priority: Option<&'a RawValue>,
    ttl: Option<&'a RawValue>,
    /// The first member the protocol does not know.
    unknown: Option<String>,
    /// The first known member given more than once.
    repeated: Option<String>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Fields::default();
                while let Some(name) = map.next_key::<String>()? {
                    let slot = match name.as_str() {
                        "op" => &mut fields.op,
                        "exchange" => &mut fields.exchange,
                        "routing_key" => &mut fields.routing_key,
                        "id" => &mut fields.id,
                        "content_type" => &mut fields.content_type,
                        "headers" => &mut fields.headers,
                        "payload" => &mut fields.payload,
                        "payload_base64" => &mut fields.payload_base64,
                        "priority" => &mut fields.priority,
                        "ttl" => &mut fields.ttl,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            fields.unknown.get_or_insert(name);
                            continue;
                        }
                    };
                    let value = map.next_value::<&'de RawValue>()?;
                    if slot.replace(value).is_some() && fields.repeated.is_none() {
                        fields.repeated = Some(name);
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// Parses one request line into its typed form; the payload stays its JSON
/// text, the headers become the text `msg_log.headers` stores.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, Refusal> {
    let fields: Fields<'_> = serde_json::from_slice(line).map_err(|e| match e.classify() {
        // Valid JSON of another type: an array, a number, a string.
        Category::Data => bad("a request is a JSON object"),
        _ => bad(format!("not a JSON object: {e}")),
    })?;
    let op = match fields.op {
        None => "submit".to_string(),
        Some(raw) => {
            serde_json::from_str::<String>(raw.get()).map_err(|_| bad("\"op\" must be a string"))?
        }
    };
    match op.as_str() {
        "submit" => submit_request(fields).map(Request::Submit),
        "status" => Ok(Request::Status),
        other => Err(bad(format!(
            "unknown op {other:?} (expected \"submit\" or \"status\")"
        ))),
    }
}

fn string(raw: &RawValue, key: &str) -> Result<String, Refusal> {
    serde_json::from_str::<String>(raw.get())
        .map_err(|_| bad(format!("\"{key}\" must be a string")))
}

fn short_string(raw: Option<&RawValue>, key: &str) -> Result<Option<String>, Refusal> {
    let Some(raw) = raw else { return Ok(None) };
    let s = string(raw, key)?;
    if s.len() > MAX_NAME_LEN {
        return Err(bad(format!(
            "\"{key}\" is {} bytes, at most {MAX_NAME_LEN} are allowed",
            s.len()
        )));
    }
    Ok(Some(s))
}

fn submit_request(fields: Fields<'_>) -> Result<SubmitRequest, Refusal> {
    if let Some(name) = &fields.repeated {
        return Err(bad(format!("{name:?} is given more than once")));
    }
    let exchange = short_string(fields.exchange, "exchange")?
        .ok_or_else(|| bad("\"exchange\" is required (\"\" is the default exchange)"))?;
    exchange_rules(&exchange)?;
    let routing_key = short_string(fields.routing_key, "routing_key")?
        .ok_or_else(|| bad("\"routing_key\" is required (it may be \"\")"))?;
    let id = short_string(fields.id, "id")?;
    if id.as_deref() == Some("") {
        return Err(bad("\"id\" must not be empty"));
    }
    let content_type = short_string(fields.content_type, "content_type")?;
    let headers = fields.headers.map(valid_headers).transpose()?.flatten();
    let priority = fields.priority.map(priority).transpose()?;
    let ttl = fields.ttl.map(ttl).transpose()?;
    if let Some(unknown) = &fields.unknown {
        return Err(bad(format!("unknown field {unknown:?}")));
    }
    let payload = match (fields.payload, fields.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "give either \"payload\" or \"payload_base64\", not both",
            ))
        }
        (None, None) => {
            return Err(bad(
                "\"payload\" (any JSON value) or \"payload_base64\" is required",
            ))
        }
        (Some(raw), None) => Payload::Json(raw.to_owned()),
        (None, Some(raw)) => Payload::Base64(string(raw, "payload_base64")?),
    };
    Ok(SubmitRequest {
        content_type,
        exchange,
        headers,
        id,
        payload,
        priority,
        routing_key,
        ttl,
    })
}

/// `priority`: an integer from 0 to [`MAX_PRIORITY`] (AMQP's range).
fn priority(raw: &RawValue) -> Result<u8, Refusal> {
    serde_json::from_str::<u8>(raw.get())
        .ok()
        .filter(|p| *p <= MAX_PRIORITY)
        .ok_or_else(|| {
            bad(format!(
                "\"priority\" must be an integer from 0 to {MAX_PRIORITY}, not {}",
                raw.get()
            ))
        })
}

/// The longest `ttl`: ten years, so that an expiry time always fits.
const MAX_TTL_MS: u64 = 10 * 366 * 86_400 * 1000;

/// `ttl`: milliseconds (a positive integer) or a duration string ("30s",
/// "5m", "500ms"), from 1 ms to ten years.
fn ttl(raw: &RawValue) -> Result<u64, Refusal> {
    let invalid = || {
        bad(format!(
            "\"ttl\" must be milliseconds (a positive integer) or a duration like \"30s\", \
             at most ten years, not {}",
            raw.get()
        ))
    };
    let ms = match serde_json::from_str::<u64>(raw.get()) {
        Ok(ms) => ms,
        Err(_) => {
            let text = serde_json::from_str::<String>(raw.get()).map_err(|_| invalid())?;
            let d = humantime::parse_duration(&text).map_err(|_| invalid())?;
            u64::try_from(d.as_millis()).map_err(|_| invalid())?
        }
    };
    if ms == 0 || ms > MAX_TTL_MS {
        return Err(invalid());
    }
    Ok(ms)
}

/// Whether a stored row breaks the rules a submit is checked against (it was
/// written into `msg_log` past them): the broker may well close the channel
/// on it, so the forwarder sends such a row alone (docs/forwarding.md,
/// Isolating a message the broker refuses).
pub(crate) fn breaks_submit_rules(exchange: &str, headers: Option<&str>) -> bool {
    if exchange_rules(exchange).is_err() {
        return true;
    }
    headers.is_some_and(|text| {
        RawValue::from_string(text.to_string()).map_or(true, |raw| valid_headers(&raw).is_err())
    })
}

/// What RabbitMQ 3.x refuses of an exchange name on `basic.publish`
/// whatever its state (rabbit_channel.erl): a name no exchange can have.
fn exchange_rules(exchange: &str) -> Result<(), Refusal> {
    if exchange.contains(['\r', '\n']) {
        // Every declare strips CR and LF from the name; a publish does not.
        return Err(bad(
            "\"exchange\" holds a CR or LF: RabbitMQ removes them from the names it \
             declares, so no exchange has this name",
        ));
    }
    if exchange.starts_with("amq.") && !STANDARD_AMQ_EXCHANGES.contains(&exchange) {
        // Clients cannot declare "amq." names (403), and RabbitMQ's own
        // (amq.rabbitmq.*) are internal: a publish gets a 404 or a 403.
        return Err(bad(format!(
            "\"exchange\" {exchange:?}: names beginning with \"amq.\" are reserved; a publish \
             can reach only {}",
            STANDARD_AMQ_EXCHANGES.join(", ")
        )));
    }
    Ok(())
}

/// `headers` as sent → the JSON text `msg_log.headers` stores (`None` for
/// `null`): every value publishable, `CC`/`BCC` as RabbitMQ wants them,
/// the table within [`MAX_HEADERS_LEN`].
fn valid_headers(raw: &RawValue) -> Result<Option<Box<RawValue>>, Refusal> {
    match raw.get().as_bytes().first() {
        Some(b'{') => {}
        _ if raw.get() == "null" => return Ok(None),
        _ => return Err(bad("\"headers\" must be an object")),
    }
    let table = headers::encode(raw.get()).map_err(|e| bad(e.to_string()))?;
    for name in ROUTING_HEADERS {
        let Some(value) = table.inner().get(name) else {
            continue;
        };
        let path = headers::path(name);
        let AMQPValue::FieldArray(routes) = value else {
            return Err(bad(format!(
                "{path}: must be an array of strings (RabbitMQ routes the message by them, \
                 and closes the channel on anything else)"
            )));
        };
        for (i, route) in routes.as_slice().iter().enumerate() {
            match route {
                AMQPValue::LongString(key) if key.len() <= MAX_NAME_LEN => {}
                AMQPValue::LongString(key) => {
                    return Err(bad(format!(
                        "{path}[{i}]: {} bytes, at most {MAX_NAME_LEN} (a routing key)",
                        key.len()
                    )))
                }
                _ => {
                    return Err(bad(format!(
                        "{path}[{i}]: must be a string (RabbitMQ ignores anything else)"
                    )))
                }
            }
        }
    }
    let size = headers::encoded_len(&table);
    if size > MAX_HEADERS_LEN {
        return Err(bad(format!(
            "\"headers\" take {size} bytes as an AMQP field table, at most {MAX_HEADERS_LEN}"
        )));
    }
    RawValue::from_string(headers::decode(&table))
        .map(Some)
        .map_err(|e| bad(format!("\"headers\": {e}")))
}

/// The message a submit stores: its body decoded and within `max_body`
/// bytes, its id made up when the client gave none.
pub(crate) fn new_message(request: SubmitRequest, max_body: u64) -> Result<NewMessage, Refusal> {
    let too_large = |size: u64| {
        Refusal::new(
            ErrorCode::TooLarge,
            format!("the message is {size} bytes, submit.max_message_size is {max_body}"),
        )
    };
    let (body, default_type) = match request.payload {
        Payload::Json(raw) if raw.get().starts_with('"') => {
            let text = serde_json::from_str::<String>(raw.get())
                .map_err(|e| bad(format!("\"payload\" is not a JSON string: {e}")))?;
            (text.into_bytes(), CONTENT_TYPE_TEXT)
        }
        Payload::Json(raw) => (
            String::from(Box::<str>::from(raw)).into_bytes(),
            CONTENT_TYPE_JSON,
        ),
        Payload::Base64(encoded) => {
            // Refuse before decoding: 4 base64 characters carry 3 bytes.
            let decoded_at_least = (encoded.trim_end_matches('=').len() as u64 * 3) / 4;
            if decoded_at_least > max_body {
                return Err(too_large(decoded_at_least));
            }
            let bytes = base64_engine()
                .decode(encoded.as_bytes())
                .map_err(|e| bad(format!("\"payload_base64\" is not base64: {e}")))?;
            (bytes, CONTENT_TYPE_BYTES)
        }
    };
    if body.len() as u64 > max_body {
        return Err(too_large(body.len() as u64));
    }
    Ok(NewMessage {
        id: request
            .id
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        body,
        exchange: request.exchange,
        routing_key: request.routing_key,
        headers: request
            .headers
            .map(|headers| String::from(Box::<str>::from(headers))),
        content_type: request
            .content_type
            .unwrap_or_else(|| default_type.to_string()),
        priority: request.priority.unwrap_or(0),
        ttl_ms: request.ttl.and_then(|ms| i64::try_from(ms).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line through both steps, as the connection runs them.
    fn parse(line: &str) -> Result<Option<NewMessage>, Refusal> {
        match parse_request(line.as_bytes())? {
            Request::Submit(submit) => new_message(submit, 1024).map(Some),
            Request::Status => Ok(None),
        }
    }

    fn submit(line: &str) -> Result<NewMessage, Refusal> {
        parse(line).map(|m| m.expect("a submit"))
    }

    /// A submit to the default exchange with these extra members.
    fn with(members: &str) -> Result<NewMessage, Refusal> {
        submit(&format!(r#"{{"exchange":"","routing_key":"k",{members}}}"#))
    }

    fn refused(members: &str) -> String {
        let err = with(members).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest, "{members}: {err:?}");
        err.message
    }

    #[test]
    fn priority_and_ttl_are_read_and_checked() {
        let m = with(r#""payload":1"#).unwrap();
        assert_eq!((m.priority, m.ttl_ms), (0, None), "the defaults");
        let m = with(r#""payload":1,"priority":9,"ttl":500"#).unwrap();
        assert_eq!((m.priority, m.ttl_ms), (9, Some(500)));
        for (ttl, ms) in [
            (r#""30s""#, 30_000),
            (r#""5m""#, 300_000),
            (r#""250ms""#, 250),
        ] {
            let m = with(&format!(r#""payload":1,"ttl":{ttl}"#)).unwrap();
            assert_eq!(m.ttl_ms, Some(ms), "{ttl}");
        }
        for bad in ["10", "-1", "1.5", "\"5\"", "null", "1e0"] {
            let message = refused(&format!(r#""payload":1,"priority":{bad}"#));
            assert!(
                message.contains("\"priority\" must be an integer from 0 to 9"),
                "{bad}: {message}"
            );
        }
        for bad in [
            "0",
            "-5",
            "1.5",
            "\"soon\"",
            "\"\"",
            "true",
            "\"11000d\"",
            "99999999999999",
        ] {
            let message = refused(&format!(r#""payload":1,"ttl":{bad}"#));
            assert!(
                message.contains("\"ttl\" must be milliseconds"),
                "{bad}: {message}"
            );
        }
        let message = refused(r#""payload":1,"priority":1,"priority":2"#);
        assert!(message.contains("more than once"), "{message}");
    }

    #[test]
    fn payload_kinds_and_content_types() {
        let m = submit(r#"{"exchange":"e","routing_key":"k","payload":{"name":"yolo"}}"#).unwrap();
        assert_eq!(m.body, br#"{"name":"yolo"}"#);
        assert_eq!(m.content_type, CONTENT_TYPE_JSON);
        let m = submit(r#"{"exchange":"","routing_key":"","payload":"héllo"}"#).unwrap();
        assert_eq!(m.body, "héllo".as_bytes());
        assert_eq!(m.content_type, CONTENT_TYPE_TEXT);
        let m = submit(r#"{"exchange":"","routing_key":"","payload":"a\"\u00e9\n"}"#).unwrap();
        assert_eq!(m.body, "a\"é\n".as_bytes());
        let m = submit(r#"{"exchange":"","routing_key":"","payload_base64":"AP8B"}"#).unwrap();
        assert_eq!(m.body, vec![0, 255, 1]);
        assert_eq!(m.content_type, CONTENT_TYPE_BYTES);
        let m = submit(
            r#"{"exchange":"","routing_key":"","payload":1,"content_type":"x/y","id":"c1","headers":{"a":1,"b":"s","c":true}}"#,
        )
        .unwrap();
        assert_eq!(m.content_type, "x/y");
        assert_eq!(m.id, "c1");
        assert_eq!(m.headers.as_deref(), Some(r#"{"a":1,"b":"s","c":true}"#));
        assert!(matches!(parse(r#"{"op":"status"}"#), Ok(None)));
        // A status request ignores every other member.
        assert!(matches!(parse(r#"{"op":"status","x":1,"x":2}"#), Ok(None)));
    }

    #[test]
    fn a_json_payload_is_stored_as_its_text() {
        for payload in [
            r#"{"order":98765432109876543210}"#,
            "98765432109876543210",
            "1e-400",
            "1E+400",
            "-0.0",
            "1.000000000000000000000000001",
            r#"{"b":1,"a":2,"b":3}"#,
            "{ \"a\" :\t[ 1 ,\n 2 ]\r\n}",
            "[]",
            "null",
            "true",
            r#"{"s":"\u00e9\ud83d\ude00\/"}"#,
        ] {
            let m = with(&format!(" \"payload\" : {payload} ")).unwrap();
            assert_eq!(String::from_utf8_lossy(&m.body), payload);
            assert_eq!(m.content_type, CONTENT_TYPE_JSON, "{payload}");
        }
    }

    #[test]
    fn headers_are_stored_in_their_validated_form() {
        let m = with(
            r#""payload":1,"headers":{"z":1e2,"a":[ "x" , 2 ],"CC":["q1","q2"],"BCC":[],"f":2.50}"#,
        )
        .unwrap();
        assert_eq!(
            m.headers.as_deref(),
            Some(r#"{"BCC":[],"CC":["q1","q2"],"a":["x",2],"f":2.5,"z":100.0}"#)
        );
        assert_eq!(with(r#""payload":1,"headers":null"#).unwrap().headers, None);
        assert_eq!(
            with(r#""payload":1,"headers":{}"#)
                .unwrap()
                .headers
                .as_deref(),
            Some("{}")
        );
    }

    #[test]
    fn headers_that_cannot_be_published_are_refused_naming_the_header() {
        for (members, needle) in [
            (r#""headers":{"x":null},"payload":1"#, "headers.x: null"),
            (
                r#""headers":{"x":{"y":1}},"payload":1"#,
                "headers.x: an object",
            ),
            (
                r#""headers":{"x":[1,[2]]},"payload":1"#,
                "headers.x[1]: an array inside",
            ),
            (
                r#""headers":{"x":98765432109876543210},"payload":1"#,
                "headers.x: 98765432109876543210 does not fit",
            ),
            (
                r#""headers":{"x":1e-400},"payload":1"#,
                "headers.x: 1e-400 is too small",
            ),
            (
                r#""headers":{"x":1e400},"payload":1"#,
                "headers.x: 1e400 is too large",
            ),
            (
                r#""headers":{"x":1,"x":2},"payload":1"#,
                "headers.x: the name is given twice",
            ),
            (
                r#""headers":{"CC":"q"},"payload":1"#,
                "headers.CC: must be an array of strings",
            ),
            (
                r#""headers":{"BCC":7},"payload":1"#,
                "headers.BCC: must be an array of strings",
            ),
            (
                r#""headers":{"CC":["q",1]},"payload":1"#,
                "headers.CC[1]: must be a string",
            ),
            (
                r#""headers":[1],"payload":1"#,
                "\"headers\" must be an object",
            ),
            (
                r#""headers":"x","payload":1"#,
                "\"headers\" must be an object",
            ),
        ] {
            let message = refused(members);
            assert!(message.starts_with(needle), "{members}: {message}");
        }
        let long_route = "q".repeat(256);
        let message = refused(&format!(
            r#""headers":{{"CC":["q","{long_route}"]}},"payload":1"#
        ));
        assert!(message.starts_with("headers.CC[1]: 256 bytes"), "{message}");
        let ok_route = "q".repeat(255);
        assert!(with(&format!(r#""headers":{{"CC":["{ok_route}"]}},"payload":1"#)).is_ok());
        let long_name = "n".repeat(256);
        let message = refused(&format!(r#""headers":{{"{long_name}":1}},"payload":1"#));
        assert!(message.contains("at most 255 bytes"), "{message}");
        // "cc" is not "CC": RabbitMQ routes by the exact names only.
        assert!(breaks_submit_rules("x", Some(r#"{"CC":"q"}"#)));
        assert!(breaks_submit_rules("amq.nope", None));
        assert!(!breaks_submit_rules("x", Some(r#"{"CC":["q"],"cc":"q"}"#)));
        assert!(with(r#""headers":{"cc":"q","Bcc":1},"payload":1"#).is_ok());
    }

    #[test]
    fn the_header_table_fits_a_frame() {
        // 4 + 1 + 1 + 1 + 4 + n bytes for one header "x" holding n bytes.
        let fits = MAX_HEADERS_LEN - 11;
        let value = "v".repeat(fits);
        assert!(with(&format!(r#""headers":{{"x":"{value}"}},"payload":1"#)).is_ok());
        let value = "v".repeat(fits + 1);
        let message = refused(&format!(r#""headers":{{"x":"{value}"}},"payload":1"#));
        assert!(
            message.contains(&format!("{} bytes", MAX_HEADERS_LEN + 1)),
            "{message}"
        );
        assert!(message.contains("headers"), "{message}");
    }

    #[test]
    fn exchange_names_no_publish_can_reach_are_refused() {
        for exchange in [
            "amq.direct",
            "amq.fanout",
            "amq.topic",
            "amq.headers",
            "amq.match",
            "",
            "amq",
            "amqx.y",
            "x.amq.y",
        ] {
            let line = format!(r#"{{"exchange":"{exchange}","routing_key":"k","payload":1}}"#);
            assert!(submit(&line).is_ok(), "{exchange}");
        }
        for (exchange, needle) in [
            ("amq.rabbitmq.trace", "reserved"),
            ("amq.rabbitmq.event", "reserved"),
            ("amq.default", "reserved"),
            ("amq.", "reserved"),
            ("a\\nb", "CR or LF"),
            ("a\\rb", "CR or LF"),
        ] {
            let line = format!(r#"{{"exchange":"{exchange}","routing_key":"k","payload":1}}"#);
            let err = submit(&line).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest);
            assert!(
                err.message.starts_with("\"exchange\""),
                "{exchange}: {}",
                err.message
            );
            assert!(err.message.contains(needle), "{exchange}: {}", err.message);
        }
        // Routing keys: only the length (a CR in one is the broker's to route).
        assert!(submit(r#"{"exchange":"e","routing_key":"a\nb","payload":1}"#).is_ok());
        assert!(submit(r#"{"exchange":"e","routing_key":"amq.x","payload":1}"#).is_ok());
    }

    #[test]
    fn bad_requests_are_named() {
        for (line, needle) in [
            ("nope", "not a JSON object"),
            ("[1]", "JSON object"),
            ("\"text\"", "JSON object"),
            ("{\"exchange\":\"e\"", "not a JSON object"),
            (r#"{"routing_key":"k","payload":1}"#, "exchange"),
            (r#"{"exchange":"e","payload":1}"#, "routing_key"),
            (r#"{"exchange":"e","routing_key":"k"}"#, "payload"),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"payload_base64":"AA=="}"#,
                "not both",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload_base64":"!!"}"#,
                "base64",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload_base64":1}"#,
                "\"payload_base64\" must be a string",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"id":""}"#,
                "id",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"colour":"red"}"#,
                "colour",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"payload":2}"#,
                "\"payload\" is given more than once",
            ),
            (
                r#"{"exchange":"e","exchange":"f","routing_key":"k","payload":1}"#,
                "\"exchange\" is given more than once",
            ),
            (r#"{"op":"dance"}"#, "unknown op"),
            (r#"{"op":1}"#, "\"op\" must be a string"),
            (
                r#"{"exchange":1,"routing_key":"k","payload":1}"#,
                "\"exchange\" must be a string",
            ),
        ] {
            let err = parse(line).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{line}");
            assert!(err.message.contains(needle), "{line}: {}", err.message);
        }
        let long = "x".repeat(256);
        for field in ["exchange", "routing_key", "id", "content_type"] {
            let mut request = serde_json::json!({"exchange": "", "routing_key": "", "payload": 1});
            request[field] = serde_json::json!(long);
            let err = submit(&request.to_string()).unwrap_err();
            assert!(err.message.contains("255"), "{field}: {}", err.message);
            assert!(err.message.contains(field), "{field}: {}", err.message);
        }
    }

    #[test]
    fn size_limit_is_on_the_decoded_body() {
        let big = "x".repeat(1025);
        let err = submit(&format!(
            r#"{{"exchange":"","routing_key":"","payload":"{big}"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        let ok = "x".repeat(1024);
        assert!(submit(&format!(
            r#"{{"exchange":"","routing_key":"","payload":"{ok}"}}"#
        ))
        .is_ok());
        // A JSON value's text counts as sent, whitespace inside included.
        let spaced = format!("[{}1]", " ".repeat(1021));
        assert!(with(&format!(r#""payload":{spaced}"#)).is_ok());
        let spaced = format!("[{}1]", " ".repeat(1022));
        assert_eq!(
            with(&format!(r#""payload":{spaced}"#)).unwrap_err().code,
            ErrorCode::TooLarge
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 1025]);
        let err = submit(&format!(
            r#"{{"exchange":"","routing_key":"","payload_base64":"{encoded}"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
    }
}
