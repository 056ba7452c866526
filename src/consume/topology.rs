//! Topology: what the consumer declares before it consumes
//! (docs/consuming.md, Topology).
//!
//! Owns the declarations made from `[consumer]`: the dead-letter exchange
//! (a durable fanout) when `consumer.dead_letter_exchange` is set, the
//! exchanges of `consumer.bindings` (durable, of their `exchange_type`), the
//! queue (durable, `classic` or `quorum`, with `x-dead-letter-exchange`),
//! its bindings, and the prefetch (`basic.qos(consumer.prefetch)`).
//!
//! Invariants:
//! - Declarations are idempotent: the same configuration declares the same
//!   things on every reconnect.
//! - The queue's arguments come only from the configuration; a queue that
//!   exists with other arguments is refused by the broker (406), which the
//!   consumer reports instead of redeclaring differently.
//! - A binding with an empty exchange declares and binds nothing (the
//!   default exchange routes by queue name already).

use lapin::options::{
    BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::{ConsumerConfig, QueueType};

/// Declares the dead-letter exchange, the bindings' exchanges, the queue
/// and its bindings, and sets the prefetch, on `channel`.
pub(crate) async fn declare(
    channel: &Channel,
    queue: &str,
    c: &ConsumerConfig,
) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let mut arguments = FieldTable::default();
    if c.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    if let Some(dead_letter_exchange) = &c.dead_letter_exchange {
        channel
            .exchange_declare(
                dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dead_letter_exchange.as_str().into()),
        );
    }
    for binding in &c.bindings {
        if !binding.exchange.is_empty() {
            channel
                .exchange_declare(
                    binding.exchange.as_str().into(),
                    binding.exchange_type.into(),
                    durable,
                    FieldTable::default(),
                )
                .await?;
        }
    }
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    for binding in c.bindings.iter().filter(|b| !b.exchange.is_empty()) {
        channel
            .queue_bind(
                queue.into(),
                binding.exchange.as_str().into(),
                binding.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .basic_qos(c.prefetch.get(), BasicQosOptions::default())
        .await
}
