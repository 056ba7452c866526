//! Headers: a delivery's AMQP headers as the JSON object `msg_log.headers`
//! holds (docs/storage.md, Schema: `headers`).
//!
//! Owns only the decoding, in its own file so that a codec shared with the
//! forwarder can replace it with a one-line change in `message.rs`.
//!
//! Invariant: every header becomes one JSON member; the types without a
//! JSON counterpart are kept as their debug text rather than dropped.

use lapin::types::{AMQPValue, FieldTable};

/// AMQP headers as the JSON object `msg_log.headers` holds.
pub(crate) fn headers_json(table: &FieldTable) -> String {
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
