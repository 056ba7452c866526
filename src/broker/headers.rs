//! Headers: the one codec between `msg_log.headers` and AMQP headers
//! (docs/storage.md, `msg_log`; docs/forwarding.md and docs/consuming.md,
//! message properties).
//!
//! Role: the forwarder [`encode`]s the stored JSON headers object into the
//! field table it publishes; the consumer [`decode`]s a delivery's field
//! table into the JSON object it stores. Both directions live here so they
//! cannot drift apart.
//!
//! What each value becomes:
//!
//! | JSON (stored)          | AMQP (published)  | JSON (consumed back)       |
//! |------------------------|-------------------|----------------------------|
//! | string                 | long string       | string                     |
//! | boolean                | boolean           | boolean                    |
//! | integer (fits `i64`)   | long long int     | integer                    |
//! | other number           | double            | number                     |
//! | null, array, object    | left out          | -                          |
//!
//! Decoding also takes short strings and the narrower integers other
//! publishers send; any other AMQP value is kept as the text of its debug
//! form rather than dropped, so nothing a producer sent disappears silently.
//!
//! Invariants:
//! - [`encode`] never fails the publish: text that is not a JSON object
//!   publishes without headers (the socket server only stores objects).
//! - For every value [`encode`] keeps, `decode(encode(x))` gives it back
//!   with its JSON type.

use lapin::types::{AMQPValue, FieldTable};

/// The stored JSON headers object as an AMQP field table; `None` when the
/// text is not a JSON object.
pub(crate) fn encode(json: &str) -> Option<FieldTable> {
    let serde_json::Value::Object(map) = serde_json::from_str(json).ok()? else {
        return None;
    };
    let mut table = FieldTable::default();
    for (name, value) in map {
        let value = match value {
            serde_json::Value::String(s) => AMQPValue::LongString(s.into()),
            serde_json::Value::Bool(b) => AMQPValue::Boolean(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => AMQPValue::LongLongInt(i),
                None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
            },
            _ => continue,
        };
        table.insert(name.into(), value);
    }
    Some(table)
}

/// A delivery's AMQP headers as the JSON object `msg_log.headers` holds.
pub(crate) fn decode(table: &FieldTable) -> String {
    let mut map = serde_json::Map::new();
    for (name, value) in table.inner() {
        let value = match value {
            AMQPValue::Boolean(b) => serde_json::Value::Bool(*b),
            AMQPValue::LongString(s) => serde_json::Value::String(s.to_string()),
            AMQPValue::ShortString(s) => serde_json::Value::String(s.as_str().to_string()),
            AMQPValue::LongLongInt(i) => serde_json::Value::from(*i),
            AMQPValue::LongInt(i) => serde_json::Value::from(*i),
            AMQPValue::ShortInt(i) => serde_json::Value::from(*i),
            AMQPValue::Double(d) => serde_json::Value::from(*d),
            other => serde_json::Value::String(format!("{other:?}")),
        };
        map.insert(name.as_str().to_string(), value);
    }
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;
    use serde_json::{json, Value};

    fn parsed(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn headers_keep_their_types() {
        let table = encode(r#"{"a":"s","b":1,"c":true,"d":1.5}"#).unwrap();
        let inner = table.inner();
        assert!(matches!(inner.get("a"), Some(AMQPValue::LongString(_))));
        assert!(matches!(inner.get("b"), Some(AMQPValue::LongLongInt(1))));
        assert!(matches!(inner.get("c"), Some(AMQPValue::Boolean(true))));
        assert!(matches!(inner.get("d"), Some(AMQPValue::Double(_))));
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
        });
        let table = encode(&stored.to_string()).unwrap();
        assert_eq!(parsed(&decode(&table)), stored);
    }

    #[test]
    fn round_trip_leaves_out_what_amqp_is_not_given() {
        let stored = json!({
            "kept": "v",
            "null": null,
            "list": [1, 2],
            "nested": {"a": 1},
            // Beyond i64: published as a double, read back as a number.
            "huge": u64::MAX,
        });
        let table = encode(&stored.to_string()).unwrap();
        assert_eq!(table.inner().len(), 2);
        let back = parsed(&decode(&table));
        assert_eq!(back["kept"], json!("v"));
        assert_eq!(back["huge"].as_f64(), Some(u64::MAX as f64));
        assert!(back.get("null").is_none() && back.get("list").is_none());
        assert!(back.get("nested").is_none());
    }

    #[test]
    fn encode_takes_only_a_json_object() {
        assert!(encode("[1,2]").is_none());
        assert!(encode("\"text\"").is_none());
        assert!(encode("not json").is_none());
        assert_eq!(encode("{}").map(|t| t.inner().len()), Some(0));
    }

    #[test]
    fn decode_takes_what_other_publishers_send() {
        let mut table = FieldTable::default();
        table.insert("short".into(), AMQPValue::ShortString("s".into()));
        table.insert("long_int".into(), AMQPValue::LongInt(-5));
        table.insert("short_int".into(), AMQPValue::ShortInt(3));
        table.insert("list".into(), AMQPValue::FieldArray(FieldArray::default()));
        let back = parsed(&decode(&table));
        assert_eq!(back["short"], json!("s"));
        assert_eq!(back["long_int"], json!(-5));
        assert_eq!(back["short_int"], json!(3));
        // Unsupported values are kept as text, not dropped.
        let list = format!("{:?}", AMQPValue::FieldArray(FieldArray::default()));
        assert_eq!(back["list"], json!(list));
    }
}
