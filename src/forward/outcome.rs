//! Outcome: what the forwarder sends for a row, and what a confirm means
//! (docs/forwarding.md, Publishing and Outcomes).
//!
//! Role: the pure part of forwarding, with no I/O: the AMQP properties of
//! a row ([`properties`]), and the classification of one confirm into
//! [`Attempt::Delivered`], [`Attempt::Rejected`] or [`Attempt::Unknown`]
//! ([`classify`]); the table is in the module header of
//! [`crate::forward`].
//!
//! Invariants:
//! - A timeout counts against the message only when the link stayed up and
//!   unblocked; anything the message is not to blame for is unknown.
//! - A closed channel counts against the message only when the broker named
//!   the message's own exchange (404); another message's 404 is unknown.
//! - Every row goes out persistent, with `message_id` = row id, so a
//!   re-publish after an unknown outcome is recognisable downstream.

use std::time::Duration;

use lapin::{BasicProperties, Confirmation};

use crate::broker::headers;
use crate::store::OutgoingRow;

/// What awaiting one confirm gave: the confirm, a channel error, or no
/// answer within `publish.confirm_timeout`.
pub(crate) type ConfirmResult = Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>;

/// What one attempt came to (see the module header of [`crate::forward`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    Delivered,
    Rejected(String),
    Unknown(String),
}

/// Classifies a confirm of a message sent to `exchange`. `link_ok`: the
/// connection is still up and not blocked (only then does a timeout count
/// against the message).
pub(crate) fn classify(
    exchange: &str,
    result: &ConfirmResult,
    confirm_timeout: Duration,
    link_ok: bool,
) -> Attempt {
    match result {
        Ok(Ok(Confirmation::Ack(None))) => Attempt::Delivered,
        Ok(Ok(Confirmation::Ack(Some(returned)))) | Ok(Ok(Confirmation::Nack(Some(returned)))) => {
            Attempt::Rejected(format!(
                "{} {}: returned by the broker (unroutable)",
                returned.reply_code, returned.reply_text
            ))
        }
        Ok(Ok(Confirmation::Nack(None))) => {
            Attempt::Rejected("basic.nack: the broker could not take the message".into())
        }
        Ok(Ok(Confirmation::NotRequested)) => {
            Attempt::Unknown("the channel was not in confirm mode".into())
        }
        Ok(Err(error)) => match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if amqp.get_id() == 404
                    && amqp
                        .get_message()
                        .as_str()
                        .contains(&format!("exchange '{exchange}'")) =>
            {
                Attempt::Rejected(format!(
                    "404 channel closed by the broker: {}",
                    amqp.get_message()
                ))
            }
            _ => Attempt::Unknown(error.to_string()),
        },
        Err(_) if link_ok => Attempt::Rejected(format!(
            "no confirm within publish.confirm_timeout ({})",
            humantime::format_duration(confirm_timeout)
        )),
        Err(_) => Attempt::Unknown("no confirm while the broker was blocked".into()),
    }
}

/// AMQP properties of a row: persistent, its id, its submit time, its
/// content type and headers when it has them.
pub(crate) fn properties(row: &OutgoingRow) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_message_id(row.id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(
            row.create_time
                .and_then(|ms| u64::try_from(ms / 1000).ok())
                .unwrap_or(0),
        );
    if let Some(ct) = &row.content_type {
        properties = properties.with_content_type(ct.as_str().into());
    }
    // Headers the codec refuses (a row written past submit) go out without
    // headers for now; the forwarder's loop will fail such a row instead.
    if let Some(headers) = row.headers.as_deref().and_then(|h| headers::encode(h).ok()) {
        properties = properties.with_headers(headers);
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_count_only_on_a_live_link() {
        let elapsed = tokio_timeout_elapsed();
        let t = Duration::from_secs(1);
        assert!(matches!(
            classify("x", &Err(elapsed), t, true),
            Attempt::Rejected(_)
        ));
        let elapsed = tokio_timeout_elapsed();
        assert!(matches!(
            classify("x", &Err(elapsed), t, false),
            Attempt::Unknown(_)
        ));
        let ok: ConfirmResult = Ok(Ok(Confirmation::Ack(None)));
        assert_eq!(classify("x", &ok, t, true), Attempt::Delivered);
        let nack: ConfirmResult = Ok(Ok(Confirmation::Nack(None)));
        assert!(matches!(
            classify("x", &nack, t, true),
            Attempt::Rejected(_)
        ));
    }

    #[test]
    fn a_row_goes_out_persistent_with_its_id_and_headers() {
        let row = OutgoingRow {
            rowid: 1,
            id: "m-1".into(),
            body: b"x".to_vec(),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            headers: Some(r#"{"a":"s"}"#.into()),
            content_type: Some("text/plain".into()),
            create_time: Some(1_700_000_000_123),
        };
        let p = properties(&row);
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.timestamp(), Some(1_700_000_000));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert!(p
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("a")));
        let bare = OutgoingRow {
            headers: Some("not json".into()),
            content_type: None,
            create_time: None,
            ..row
        };
        let p = properties(&bare);
        assert!(p.headers().is_none() && p.content_type().is_none());
        assert_eq!(*p.timestamp(), Some(0));
    }

    fn tokio_timeout_elapsed() -> tokio::time::error::Elapsed {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(1), std::future::pending::<()>()).await
        })
        .unwrap_err()
    }
}
