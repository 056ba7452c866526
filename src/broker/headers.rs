//! Headers: the one codec between `msg_log.headers` and AMQP headers
//! (docs/protocol.md, "Headers"; docs/storage.md, `msg_log`;
//! docs/forwarding.md and docs/consuming.md, message properties).
//!
//! Role: the submit server reads a request's `headers` with [`encode`] (the
//! same rules the forwarder applies, so what is accepted can be published)
//! and stores [`decode`] of the result; the forwarder [`encode`]s the stored
//! JSON object into the field table it publishes; the consumer [`decode`]s a
//! delivery's field table into the JSON object it stores. All directions
//! live here so they cannot drift apart.
//!
//! What each value becomes (the JSON *text* decides, not a parsed number, so
//! an integer too big for `i64` is refused instead of becoming a double):
//!
//! | JSON (stored)                                  | AMQP (published) | JSON (consumed back) |
//! |------------------------------------------------|------------------|----------------------|
//! | string                                         | long string      | string               |
//! | `true`, `false`                                | boolean          | boolean              |
//! | integer (no `.`, `e`, `E`) that fits `i64`     | long long int    | integer              |
//! | other number, finite and not rounded to 0      | double           | number (`1.5`, `1e300`) |
//! | array of the above                             | field array      | array                |
//! | `null`, object, nested array, any other number | [`HeaderError`]  | -                    |
//!
//! Names are AMQP short strings: at most [`MAX_NAME_LEN`] bytes; a name may
//! appear once. Nothing here knows what the broker makes of a header (`CC`
//! must be an array of strings, say): the submit server checks that, and for
//! a row that bypassed it the broker's refusal is the row's outcome.
//!
//! Decoding also takes what other publishers send: short strings, the
//! narrower integers, single floats. Any other AMQP value (a table, a
//! timestamp, a decimal, bytes, void, a non-finite float, an array inside an
//! array) is kept as the text of its debug form rather than dropped, so
//! nothing a producer sent disappears silently.
//!
//! Invariants:
//! - [`encode`] never panics, whatever the stored text (a row inserted by
//!   hand): what it cannot encode is a [`HeaderError`] that names the header.
//! - For every table [`encode`] returns, `encode(decode(t)) == t`; for every
//!   table a delivery carries, [`decode`] gives text that [`encode`] accepts.
//! - [`encoded_len`] is the size of the table on the wire, to the byte.

use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::protocol::MAX_NAME_LEN;

/// Why stored or submitted headers cannot be published; its text starts
/// with the path of the culprit (`headers.x: …`, `headers.x[2]: …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub(crate) struct HeaderError {
    path: String,
    reason: String,
}

impl HeaderError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        HeaderError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// `headers.<name>`, the name cut to 64 characters: a path names the
/// header without repeating a name that is itself the fault.
pub(crate) fn path(name: &str) -> String {
    if name.chars().count() <= 64 {
        format!("headers.{name}")
    } else {
        format!("headers.{}…", name.chars().take(64).collect::<String>())
    }
}

/// The members of a JSON object as written: order and repeated names kept,
/// each value's text untouched.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    members.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// A JSON headers object (its text) as the AMQP field table it publishes.
pub(crate) fn encode(json: &str) -> Result<FieldTable, HeaderError> {
    let Members(members) = serde_json::from_str::<Members<'_>>(json)
        .map_err(|e| HeaderError::new("headers", format!("not a JSON object: {e}")))?;
    let mut table = FieldTable::default();
    for (name, raw) in members {
        let at = path(&name);
        let key = ShortString::try_new(name).map_err(|e| {
            HeaderError::new(
                at.clone(),
                format!("a name is at most {MAX_NAME_LEN} bytes ({e})"),
            )
        })?;
        if table.contains_key(key.as_str()) {
            return Err(HeaderError::new(at, "the name is given twice"));
        }
        let value = encode_value(raw, &at, false)?;
        table.insert(key, value);
    }
    Ok(table)
}

/// One value by the rules of the module header; `path` names it in errors.
fn encode_value(raw: &RawValue, path: &str, in_array: bool) -> Result<AMQPValue, HeaderError> {
    let text = raw.get();
    let refuse = |reason: String| HeaderError::new(path, reason);
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text)
            .map(|s| AMQPValue::LongString(s.into()))
            .map_err(|e| refuse(format!("not a JSON string: {e}"))),
        Some(b't') if text == "true" => Ok(AMQPValue::Boolean(true)),
        Some(b'f') if text == "false" => Ok(AMQPValue::Boolean(false)),
        Some(b'n') if text == "null" => Err(refuse(
            "null is not a header value (leave the header out)".into(),
        )),
        Some(b'{') => Err(refuse("an object is not a header value".into())),
        Some(b'[') if in_array => Err(refuse(
            "an array inside an array is not a header value".into(),
        )),
        Some(b'[') => {
            let elements = serde_json::from_str::<Vec<&RawValue>>(text)
                .map_err(|e| refuse(format!("not a JSON array: {e}")))?;
            let mut array = FieldArray::default();
            for (i, element) in elements.into_iter().enumerate() {
                array.push(encode_value(element, &format!("{path}[{i}]"), true)?);
            }
            Ok(AMQPValue::FieldArray(array))
        }
        Some(b'-' | b'0'..=b'9') => number(text).map_err(refuse),
        _ => Err(refuse(format!("{} is not a JSON value", shorten(text)))),
    }
}

/// A JSON number's text as the AMQP number it stands for, or why none.
fn number(text: &str) -> Result<AMQPValue, String> {
    let is_float = text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'));
    if !is_float {
        return text
            .parse::<i64>()
            .map(AMQPValue::LongLongInt)
            .map_err(|_| {
                format!(
                    "{} does not fit a 64-bit signed integer (send it as a string)",
                    shorten(text)
                )
            });
    }
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{} is not a JSON number", shorten(text)))?;
    let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
    if value.is_infinite() {
        Err(format!(
            "{} is too large for a 64-bit float (send it as a string)",
            shorten(text)
        ))
    } else if value == 0.0 && mantissa.bytes().any(|b| matches!(b, b'1'..=b'9')) {
        Err(format!(
            "{} is too small for a 64-bit float: it would become 0 (send it as a string)",
            shorten(text)
        ))
    } else {
        Ok(AMQPValue::Double(value))
    }
}

/// A value's text short enough for a message.
fn shorten(text: &str) -> String {
    if text.chars().count() <= 40 {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(40).collect::<String>())
    }
}

/// A field table as the JSON object `msg_log.headers` holds (names sorted).
pub(crate) fn decode(table: &FieldTable) -> String {
    let map: serde_json::Map<String, Value> = table
        .inner()
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), decode_value(value, false)))
        .collect();
    Value::Object(map).to_string()
}

fn decode_value(value: &AMQPValue, in_array: bool) -> Value {
    let float = |f: f64| {
        if f.is_finite() {
            Value::from(f)
        } else {
            Value::String(format!("{value:?}"))
        }
    };
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::LongString(s) => Value::String(s.to_string()),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(d) => float(*d),
        AMQPValue::FieldArray(array) if !in_array => Value::Array(
            array
                .as_slice()
                .iter()
                .map(|v| decode_value(v, true))
                .collect(),
        ),
        other => Value::String(format!("{other:?}")),
    }
}

/// Bytes of `table` on the wire: its 4-byte length, then per header the
/// name (1 + its bytes) and the value (1 type byte + its payload).
pub(crate) fn encoded_len(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(name, value)| 1 + name.as_str().len() + value_len(value))
        .sum::<usize>()
}

fn value_len(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_len).sum::<usize>(),
        AMQPValue::FieldTable(t) => encoded_len(t),
        AMQPValue::Void => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::generation::gen_field_table;
    use serde_json::json;

    fn parsed(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    fn wire_len(table: &FieldTable) -> usize {
        let written = gen_field_table::<Vec<u8>>(table)(Vec::new().into()).unwrap();
        written.write.len()
    }

    #[test]
    fn headers_keep_their_types() {
        let table = encode(r#"{"a":"s","b":1,"c":true,"d":1.5,"e":["x",2,false,0.5]}"#).unwrap();
        let inner = table.inner();
        assert!(matches!(inner.get("a"), Some(AMQPValue::LongString(_))));
        assert!(matches!(inner.get("b"), Some(AMQPValue::LongLongInt(1))));
        assert!(matches!(inner.get("c"), Some(AMQPValue::Boolean(true))));
        assert!(matches!(inner.get("d"), Some(AMQPValue::Double(d)) if *d == 1.5));
        let Some(AMQPValue::FieldArray(array)) = inner.get("e") else {
            panic!("not an array: {inner:?}");
        };
        assert!(matches!(
            array.as_slice(),
            [
                AMQPValue::LongString(_),
                AMQPValue::LongLongInt(2),
                AMQPValue::Boolean(false),
                AMQPValue::Double(_)
            ]
        ));
    }

    #[test]
    fn the_text_decides_integer_or_double() {
        for (text, want) in [
            ("0", AMQPValue::LongLongInt(0)),
            ("-0", AMQPValue::LongLongInt(0)),
            ("9223372036854775807", AMQPValue::LongLongInt(i64::MAX)),
            ("-9223372036854775808", AMQPValue::LongLongInt(i64::MIN)),
            ("2.0", AMQPValue::Double(2.0)),
            ("1e2", AMQPValue::Double(100.0)),
            ("1E+2", AMQPValue::Double(100.0)),
            ("-0.0", AMQPValue::Double(-0.0)),
            ("0e0", AMQPValue::Double(0.0)),
            ("0.000e-999", AMQPValue::Double(0.0)),
            ("1e-310", AMQPValue::Double(1e-310)),
            ("1.7976931348623157e308", AMQPValue::Double(f64::MAX)),
        ] {
            let table = encode(&format!(r#"{{"n":{text}}}"#)).unwrap();
            assert_eq!(table.inner().get("n"), Some(&want), "{text}");
        }
    }

    #[test]
    fn what_cannot_be_published_is_an_error_naming_the_header() {
        for (json, needle) in [
            (r#"{"x":null}"#, "headers.x: null"),
            (r#"{"x":{"a":1}}"#, "headers.x: an object"),
            (r#"{"x":[[1]]}"#, "headers.x[0]: an array inside an array"),
            (r#"{"x":[1,null]}"#, "headers.x[1]: null"),
            (
                r#"{"x":9223372036854775808}"#,
                "headers.x: 9223372036854775808 does not fit",
            ),
            (
                r#"{"x":98765432109876543210}"#,
                "does not fit a 64-bit signed integer",
            ),
            (r#"{"x":1e400}"#, "headers.x: 1e400 is too large"),
            (r#"{"x":-1e400}"#, "too large"),
            (r#"{"x":1e-400}"#, "headers.x: 1e-400 is too small"),
            (r#"{"x":0.5e-330}"#, "too small"),
            (r#"{"x":1,"x":2}"#, "headers.x: the name is given twice"),
            ("[1,2]", "headers: not a JSON object"),
            ("\"text\"", "headers: not a JSON object"),
            ("not json", "headers: not a JSON object"),
            ("", "headers: not a JSON object"),
        ] {
            let err = encode(json).unwrap_err().to_string();
            assert!(
                err.starts_with(needle) || err.contains(needle),
                "{json}: {err}"
            );
        }
        let long = "n".repeat(256);
        let err = encode(&format!(r#"{{"{long}":1}}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 255 bytes"), "{err}");
        assert!(
            err.starts_with(&format!("headers.{}…:", "n".repeat(64))),
            "{err}"
        );
        let ok = "n".repeat(255);
        assert!(encode(&format!(r#"{{"{ok}":1}}"#)).is_ok());
    }

    #[test]
    fn round_trip_keeps_every_supported_value() {
        let stored = json!({
            "text": "hé llo",
            "empty": "",
            "yes": true,
            "no": false,
            "int": 42,
            "negative": -7,
            "big": i64::MAX,
            "small": i64::MIN,
            "float": 1.5,
            "whole_float": 2.0,
            "tiny": -0.001,
            "huge": 1e300,
            "list": ["a", 1, true, 2.5],
            "empty_list": [],
            "CC": ["q1", "q2"],
        });
        let table = encode(&stored.to_string()).unwrap();
        let decoded = decode(&table);
        assert_eq!(parsed(&decoded), stored);
        // The stored form encodes back to the same table: a float stays a
        // float (`2.0`), an integer an integer.
        assert_eq!(encode(&decoded).unwrap(), table);
    }

    #[test]
    fn floats_survive_the_stored_text_exactly() {
        // Seeded, so a failure can be replayed.
        let seed = 0x5eed_u64;
        let mut rng = fastrand::Rng::with_seed(seed);
        for _ in 0..10_000 {
            let f = f64::from_bits(rng.u64(..));
            if !f.is_finite() {
                continue;
            }
            let table = encode(&json!({ "f": f }).to_string()).unwrap();
            let back = encode(&decode(&table)).unwrap();
            let Some(AMQPValue::Double(g)) = back.inner().get("f") else {
                panic!("seed {seed}: {f:e} came back as {back:?}");
            };
            assert_eq!(g.to_bits(), f.to_bits(), "seed {seed}: {f:e}");
        }
    }

    #[test]
    fn decode_takes_what_other_publishers_send() {
        let mut table = FieldTable::default();
        table.insert("short".into(), AMQPValue::ShortString("s".into()));
        table.insert("long_int".into(), AMQPValue::LongInt(-5));
        table.insert("short_int".into(), AMQPValue::ShortInt(3));
        table.insert("u32".into(), AMQPValue::LongUInt(u32::MAX));
        table.insert("f32".into(), AMQPValue::Float(0.5));
        table.insert("nan".into(), AMQPValue::Double(f64::NAN));
        table.insert("stamp".into(), AMQPValue::Timestamp(7));
        let nested = FieldArray::from(vec![AMQPValue::FieldArray(FieldArray::default())]);
        table.insert("nested".into(), AMQPValue::FieldArray(nested));
        table.insert("table".into(), AMQPValue::FieldTable(FieldTable::default()));
        let decoded = decode(&table);
        let back = parsed(&decoded);
        assert_eq!(back["short"], json!("s"));
        assert_eq!(back["long_int"], json!(-5));
        assert_eq!(back["short_int"], json!(3));
        assert_eq!(back["u32"], json!(u32::MAX));
        assert_eq!(back["f32"], json!(0.5));
        // Unsupported values are kept as text, not dropped.
        assert_eq!(
            back["nan"],
            json!(format!("{:?}", AMQPValue::Double(f64::NAN)))
        );
        assert_eq!(back["stamp"], json!("Timestamp(7)"));
        let inner = format!("{:?}", AMQPValue::FieldArray(FieldArray::default()));
        assert_eq!(back["nested"], json!([inner]));
        assert!(back["table"].is_string(), "{back}");
        // And what decode gives, encode takes: a consumed row can be retried.
        assert!(encode(&decoded).is_ok(), "{decoded}");
    }

    #[test]
    fn encoded_len_is_the_wire_size() {
        let table = encode(r#"{"a":"s","bb":1,"c":true,"d":1.5,"e":["x",2,false,0.5,""],"é":"ü"}"#)
            .unwrap();
        assert_eq!(encoded_len(&table), wire_len(&table));
        let mut other = FieldTable::default();
        other.insert("s".into(), AMQPValue::ShortString("abc".into()));
        other.insert("i8".into(), AMQPValue::ShortShortInt(1));
        other.insert("i16".into(), AMQPValue::ShortInt(1));
        other.insert("u32".into(), AMQPValue::LongUInt(1));
        other.insert("f".into(), AMQPValue::Float(1.0));
        other.insert("t".into(), AMQPValue::Timestamp(1));
        other.insert("v".into(), AMQPValue::Void);
        other.insert("tab".into(), AMQPValue::FieldTable(table));
        assert_eq!(encoded_len(&other), wire_len(&other));
        assert_eq!(encoded_len(&FieldTable::default()), 4);
    }
}
