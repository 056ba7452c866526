//! Parse: one request line → a typed [`Request`], and a submit → the
//! [`NewMessage`] the store keeps, or a [`Refusal`] that says what is wrong
//! (docs/protocol.md, "Requests").
//!
//! Owns the validation of a request: required and unknown fields, the
//! 255-byte name limit, header value kinds, the payload's kind and its
//! default content type, and `submit.max_message_size` on the decoded body.
//!
//! Invariants: faults are reported in a fixed order (names, id, content
//! type, headers, unknown fields, payload, size), each as `bad_request` but
//! an oversized body, which is `too_large`; a base64 payload too large to
//! accept is refused before it is decoded.

use base64::Engine;
use serde_json::{Map, Value};

use crate::protocol::{
    base64_engine, ErrorCode, Payload, Refusal, Request, SubmitRequest, CONTENT_TYPE_BYTES,
    CONTENT_TYPE_JSON, CONTENT_TYPE_TEXT, MAX_NAME_LEN,
};
use crate::store::NewMessage;

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::BadRequest, message)
}

/// Parses one request line into its typed form; the payload stays encoded.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, Refusal> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| bad(format!("not a JSON object: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(bad("a request is a JSON object"));
    };
    let op = match fields.remove("op") {
        None => "submit".to_string(),
        Some(Value::String(op)) => op,
        Some(_) => return Err(bad("\"op\" must be a string")),
    };
    match op.as_str() {
        "submit" => submit_request(fields).map(Request::Submit),
        "status" => Ok(Request::Status),
        other => Err(bad(format!(
            "unknown op {other:?} (expected \"submit\" or \"status\")"
        ))),
    }
}

fn short_string(fields: &mut Map<String, Value>, key: &str) -> Result<Option<String>, Refusal> {
    match fields.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_NAME_LEN => Ok(Some(s)),
        Some(Value::String(s)) => Err(bad(format!(
            "\"{key}\" is {} bytes, at most {MAX_NAME_LEN} are allowed",
            s.len()
        ))),
        Some(_) => Err(bad(format!("\"{key}\" must be a string"))),
    }
}

fn submit_request(mut fields: Map<String, Value>) -> Result<SubmitRequest, Refusal> {
    let exchange = short_string(&mut fields, "exchange")?
        .ok_or_else(|| bad("\"exchange\" is required (\"\" is the default exchange)"))?;
    let routing_key = short_string(&mut fields, "routing_key")?
        .ok_or_else(|| bad("\"routing_key\" is required (it may be \"\")"))?;
    let id = short_string(&mut fields, "id")?;
    if id.as_deref() == Some("") {
        return Err(bad("\"id\" must not be empty"));
    }
    let content_type = short_string(&mut fields, "content_type")?;
    let headers = headers(fields.remove("headers"))?;
    let payload = fields.remove("payload");
    let payload_base64 = fields.remove("payload_base64");
    if let Some(unknown) = fields.keys().next() {
        return Err(bad(format!("unknown field {unknown:?}")));
    }
    let payload = match (payload, payload_base64) {
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
        (Some(value), None) => Payload::Json(value),
        (None, Some(Value::String(encoded))) => Payload::Base64(encoded),
        (None, Some(_)) => return Err(bad("\"payload_base64\" must be a string")),
    };
    Ok(SubmitRequest {
        content_type,
        exchange,
        headers,
        id,
        payload,
        routing_key,
    })
}

fn headers(value: Option<Value>) -> Result<Option<Map<String, Value>>, Refusal> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(headers)) => {
            for (name, value) in &headers {
                if name.len() > MAX_NAME_LEN {
                    return Err(bad(format!(
                        "header name {:?}... is longer than {MAX_NAME_LEN} bytes",
                        name.chars().take(32).collect::<String>()
                    )));
                }
                if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
                    return Err(bad(format!(
                        "header {name:?} must be a string, number or boolean"
                    )));
                }
            }
            Ok(Some(headers))
        }
        Some(_) => Err(bad("\"headers\" must be an object")),
    }
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
        Payload::Json(Value::String(text)) => (text.into_bytes(), CONTENT_TYPE_TEXT),
        Payload::Json(value) => (value.to_string().into_bytes(), CONTENT_TYPE_JSON),
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
            .map(|headers| Value::Object(headers).to_string()),
        content_type: request
            .content_type
            .unwrap_or_else(|| default_type.to_string()),
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

    #[test]
    fn payload_kinds_and_content_types() {
        let m = submit(r#"{"exchange":"e","routing_key":"k","payload":{"name":"yolo"}}"#).unwrap();
        assert_eq!(m.body, br#"{"name":"yolo"}"#);
        assert_eq!(m.content_type, CONTENT_TYPE_JSON);
        let m = submit(r#"{"exchange":"","routing_key":"","payload":"héllo"}"#).unwrap();
        assert_eq!(m.body, "héllo".as_bytes());
        assert_eq!(m.content_type, CONTENT_TYPE_TEXT);
        let m = submit(r#"{"exchange":"","routing_key":"","payload_base64":"AP8B"}"#).unwrap();
        assert_eq!(m.body, vec![0, 255, 1]);
        assert_eq!(m.content_type, CONTENT_TYPE_BYTES);
        let m = submit(
            r#"{"exchange":"","routing_key":"","payload":1,"content_type":"x/y","id":"c1","headers":{"a":1,"b":"s","c":true}}"#,
        )
        .unwrap();
        assert_eq!(m.content_type, "x/y");
        assert_eq!(m.id, "c1");
        assert!(m.headers.unwrap().contains("\"a\":1"));
        assert!(matches!(parse(r#"{"op":"status"}"#), Ok(None)));
    }

    #[test]
    fn bad_requests_are_named() {
        for (line, needle) in [
            ("nope", "not a JSON object"),
            ("[1]", "JSON object"),
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
                r#"{"exchange":"e","routing_key":"k","payload":1,"id":""}"#,
                "id",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"headers":{"a":[1]}}"#,
                "header",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"colour":"red"}"#,
                "colour",
            ),
            (r#"{"op":"dance"}"#, "unknown op"),
        ] {
            let err = parse(line).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{line}");
            assert!(err.message.contains(needle), "{line}: {}", err.message);
        }
        let long = "x".repeat(256);
        let err = submit(&format!(
            r#"{{"exchange":"{long}","routing_key":"k","payload":1}}"#
        ))
        .unwrap_err();
        assert!(err.message.contains("255"), "{}", err.message);
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
        let encoded = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 1025]);
        let err = submit(&format!(
            r#"{{"exchange":"","routing_key":"","payload_base64":"{encoded}"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
    }
}
