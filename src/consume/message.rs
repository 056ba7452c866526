//! Message: what the consumer keeps of a delivery.
//!
//! Owns the conversion from lapin's `Delivery` (id, routing, body, headers,
//! content type) into plain data that the decision and the handlers read,
//! and into the store's `Delivered` (enough to insert the row of a message
//! this agent did not publish).
//!
//! Invariant: nothing here talks to the broker; the acker stays with the
//! delivery in `delivery.rs`.

use lapin::message::Delivery;

use crate::broker::headers;
use crate::store::Delivered;

/// What a handler sees of a delivery.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    /// The deduplication key; `None` runs without deduplication.
    pub(crate) id: Option<String>,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    /// Stands in for the attempt count when there is no `id`.
    pub(crate) redelivered: bool,
    pub(crate) body: Vec<u8>,
    /// The AMQP headers as JSON, stored with a row the agent did not publish.
    pub(crate) headers: Option<String>,
    pub(crate) content_type: Option<String>,
}

impl Message {
    pub(crate) fn from_delivery(delivery: &Delivery) -> Message {
        let properties = &delivery.properties;
        Message {
            id: properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_string()),
            exchange: delivery.exchange.as_str().to_string(),
            routing_key: delivery.routing_key.as_str().to_string(),
            redelivered: delivery.redelivered,
            body: delivery.data.clone(),
            headers: properties.headers().as_ref().map(headers::decode),
            content_type: properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str().to_string()),
        }
    }

    /// The delivery as the store records it under `id`.
    pub(crate) fn delivered(&self, id: &str) -> Delivered {
        Delivered {
            id: id.to_string(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            body: self.body.clone(),
            headers: self.headers.clone(),
            content_type: self.content_type.clone(),
        }
    }
}
