//! Outcome: what the forwarder sends for a row, and what the broker's
//! answers mean (docs/forwarding.md, Message properties and Outcomes).
//!
//! Role: the pure part of forwarding that touches lapin's types, with no
//! I/O: the AMQP properties of a row ([`properties`]), and the translation
//! of one awaited confirm into what the ledger understands
//! ([`confirm_event`]): a broker reply about the row, a close of its
//! channel or connection, or a timeout.
//!
//! Invariants:
//! - Replies are classified by reply code and AMQP method, never by reply
//!   text: lapin turns `channel.close`/`connection.close` into an error
//!   carrying the reply code, and the publishing channel carries nothing
//!   but `basic.publish` after `confirm.select`, so a close on it is about
//!   a publish.
//! - Only codes a message can cause ([`blames_a_message`]) may ever charge
//!   one; a broker shutting down (320), our own protocol slip (504) or a
//!   lost socket charge nothing.
//! - Every row goes out persistent, with `message_id` = row id, so a
//!   re-publish after an unknown outcome is recognisable downstream.

use lapin::{BasicProperties, Confirmation};

use super::ledger::{BrokerClose, Reply};
use crate::broker::headers;
use crate::store::OutgoingRow;

/// What awaiting one confirm gave: the confirm, a channel error, or no
/// answer within `publish.confirm_timeout`.
pub(crate) type ConfirmResult = Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>;

/// One awaited confirm, as the ledger sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConfirmEvent {
    /// The broker answered about this row.
    Reply(Reply),
    /// The channel (or the connection) closed before the answer: by the
    /// broker with this reply when `Some`, else the link was lost.
    Closed(Option<BrokerClose>),
    /// No answer within `publish.confirm_timeout`.
    TimedOut,
}

/// Translates a confirm (see the module header).
pub(crate) fn confirm_event(result: &ConfirmResult) -> ConfirmEvent {
    match result {
        Ok(Ok(Confirmation::Ack(None))) => ConfirmEvent::Reply(Reply::Ack),
        Ok(Ok(Confirmation::Ack(Some(returned)))) | Ok(Ok(Confirmation::Nack(Some(returned)))) => {
            ConfirmEvent::Reply(Reply::Returned {
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
            })
        }
        Ok(Ok(Confirmation::Nack(None))) => ConfirmEvent::Reply(Reply::Nack),
        // Not in confirm mode: the channel is not the one we opened.
        Ok(Ok(Confirmation::NotRequested)) => ConfirmEvent::Closed(None),
        Ok(Err(error)) => ConfirmEvent::Closed(broker_close(error)),
        Err(_) => ConfirmEvent::TimedOut,
    }
}

/// The row a returned message names: every row goes out with its id as
/// `message_id`, and a `basic.return` carries the message's properties.
/// `None` for a confirm without a return (or a return without an id).
pub(crate) fn returned_row(result: &ConfirmResult) -> Option<(String, Reply)> {
    match result {
        Ok(Ok(Confirmation::Ack(Some(returned)))) | Ok(Ok(Confirmation::Nack(Some(returned)))) => {
            let id = returned.delivery.properties.message_id().as_ref()?;
            Some((
                id.to_string(),
                Reply::Returned {
                    code: returned.reply_code,
                    text: returned.reply_text.to_string(),
                },
            ))
        }
        _ => None,
    }
}

/// The event for the confirm of row `id`, with the returns of the confirms
/// that arrived together keyed by the row each names. lapin hands a
/// `basic.return` to the next confirm it resolves, and a multiple ack
/// resolves several at once, so a return can come with another row's
/// confirm: a return counts for the row it names, and the confirm it came
/// with is that row's plain ack (or nack).
pub(crate) fn attributed(
    id: &str,
    result: &ConfirmResult,
    returns: &std::collections::HashMap<String, Reply>,
) -> ConfirmEvent {
    if let Some(reply) = returns.get(id) {
        return ConfirmEvent::Reply(reply.clone());
    }
    match (confirm_event(result), returned_row(result)) {
        // About another row (which the map above charges): ours was acked.
        (ConfirmEvent::Reply(Reply::Returned { .. }), Some(_)) => match result {
            Ok(Ok(Confirmation::Nack(_))) => ConfirmEvent::Reply(Reply::Nack),
            _ => ConfirmEvent::Reply(Reply::Ack),
        },
        (event, _) => event,
    }
}

/// The broker's close reply carried by a lapin error, if it is one.
pub(crate) fn broker_close(error: &lapin::Error) -> Option<BrokerClose> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(BrokerClose {
            code: amqp.get_id(),
            text: amqp.get_message().to_string(),
        }),
        _ => None,
    }
}

/// Reply codes a message can cause on `basic.publish`: channel errors
/// (403 access refused, 404 not found, 405 resource locked, 406
/// precondition failed, 311 content too large, 313 no consumers) and the
/// connection errors that a malformed message could provoke (501 frame,
/// 502 syntax, 503 command invalid, 505 unexpected frame, 541 internal).
/// Never 320 (the broker shutting down or an operator closing us), 504
/// (a channel-id slip), 506, 530 or 540.
pub(crate) fn blames_a_message(code: u16) -> bool {
    matches!(
        code,
        311 | 313 | 403 | 404 | 405 | 406 | 501 | 502 | 503 | 505 | 541
    )
}

/// AMQP short strings (the exchange, routing key, `message_id` and content
/// type) hold at most 255 bytes; lapin panics on a longer one. Submit
/// refuses such rows, so only a row written into `msg_log` by hand can have
/// one: it is refused with the reason, never sent.
pub(crate) fn short_fields(row: &OutgoingRow) -> Result<(), String> {
    let fields = [
        ("exchange", Some(row.exchange.as_str())),
        ("routing key", Some(row.routing_key.as_str())),
        ("id", Some(row.id.as_str())),
        ("content type", row.content_type.as_deref()),
    ];
    for (name, value) in fields {
        if let Some(value) = value.filter(|v| v.len() > 255) {
            return Err(format!(
                "its {name} is {} bytes long (AMQP allows 255)",
                value.len()
            ));
        }
    }
    Ok(())
}

/// AMQP properties of a row published at `now` (epoch ms): persistent, its
/// id, its submit time, its content type and headers when it has them, its
/// priority when above 0, and when it can expire the time it has left as
/// `expiration` (milliseconds, at least 1; docs/forwarding.md, Message
/// properties). `Err` when the stored headers cannot be sent (a row
/// written into `msg_log` by hand): the row is then charged with that
/// reason instead of being published. The caller never publishes a row
/// whose expiry has passed.
pub(crate) fn properties(row: &OutgoingRow, now: i64) -> Result<BasicProperties, String> {
    short_fields(row)?;
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
    if let Some(stored) = row.headers.as_deref() {
        let table = headers::encode(stored).map_err(|e| e.to_string())?;
        properties = properties.with_headers(table);
    }
    if row.priority > 0 {
        properties = properties.with_priority(row.priority);
    }
    if let Some(expires) = row.expire_time {
        let left = expires.saturating_sub(now).max(1);
        properties = properties.with_expiration(left.to_string().into());
    }
    Ok(properties)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn confirms_become_ledger_events() {
        let ok: ConfirmResult = Ok(Ok(Confirmation::Ack(None)));
        assert_eq!(confirm_event(&ok), ConfirmEvent::Reply(Reply::Ack));
        let nack: ConfirmResult = Ok(Ok(Confirmation::Nack(None)));
        assert_eq!(confirm_event(&nack), ConfirmEvent::Reply(Reply::Nack));
        let elapsed: ConfirmResult = Err(tokio_timeout_elapsed());
        assert_eq!(confirm_event(&elapsed), ConfirmEvent::TimedOut);
        let closed: ConfirmResult = Ok(Err(lapin::Error::from(lapin::ErrorKind::ProtocolError(
            lapin::protocol::AMQPError::new(
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no exchange 'x' in vhost '/'".into(),
            ),
        ))));
        assert!(matches!(
            confirm_event(&closed),
            ConfirmEvent::Closed(Some(BrokerClose { code: 404, .. }))
        ));
        let lost: ConfirmResult = Ok(Err(lapin::Error::from(
            lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
        )));
        assert_eq!(confirm_event(&lost), ConfirmEvent::Closed(None));
    }

    #[test]
    fn a_return_counts_for_the_row_it_names() {
        use lapin::message::{BasicReturnMessage, Delivery};
        let returned = |id: &str| -> ConfirmResult {
            let mut delivery = Delivery::mock(0, "x".into(), "rk".into(), false, Vec::new());
            delivery.properties = BasicProperties::default().with_message_id(id.into());
            Ok(Ok(Confirmation::Ack(Some(BasicReturnMessage {
                delivery,
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
            }))))
        };
        // A multiple ack resolved A and B together; lapin attached B's return to A.
        let a = returned("B");
        let b: ConfirmResult = Ok(Ok(Confirmation::Ack(None)));
        let returns: std::collections::HashMap<String, Reply> =
            [&a, &b].iter().filter_map(|r| returned_row(r)).collect();
        assert_eq!(
            attributed("A", &a, &returns),
            ConfirmEvent::Reply(Reply::Ack)
        );
        assert!(matches!(
            attributed("B", &b, &returns),
            ConfirmEvent::Reply(Reply::Returned { code: 312, .. })
        ));
        // The usual case: the return came with its own row's confirm.
        let c = returned("C");
        let returns: std::collections::HashMap<String, Reply> =
            returned_row(&c).into_iter().collect();
        assert!(matches!(
            attributed("C", &c, &returns),
            ConfirmEvent::Reply(Reply::Returned { code: 312, .. })
        ));
    }

    #[test]
    fn only_codes_a_message_can_cause_blame_one() {
        for code in [311, 313, 403, 404, 406, 501, 505, 541] {
            assert!(blames_a_message(code), "{code}");
        }
        for code in [200, 320, 504, 506, 530, 540] {
            assert!(!blames_a_message(code), "{code}");
        }
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
            priority: 0,
            expire_time: None,
        };
        let p = properties(&row, 0).unwrap();
        assert!(p.priority().is_none() && p.expiration().is_none());
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
            headers: None,
            content_type: None,
            create_time: None,
            ..row.clone()
        };
        let p = properties(&bare, 0).unwrap();
        assert!(p.headers().is_none() && p.content_type().is_none());
        assert_eq!(*p.timestamp(), Some(0));
        let broken = OutgoingRow {
            headers: Some("not json".into()),
            ..row
        };
        assert!(
            properties(&broken, 0).is_err(),
            "a row that cannot be sent says why"
        );
    }

    #[test]
    fn a_row_carries_its_priority_and_the_time_it_has_left() {
        let row = OutgoingRow {
            rowid: 1,
            id: "m-1".into(),
            body: b"x".to_vec(),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            headers: None,
            content_type: None,
            create_time: Some(1_000),
            priority: 7,
            expire_time: Some(31_000),
        };
        let p = properties(&row, 30_750).unwrap();
        assert_eq!(*p.priority(), Some(7));
        assert_eq!(p.expiration().as_ref().map(|s| s.as_str()), Some("250"));
        let p = properties(&row, 31_000).unwrap();
        assert_eq!(p.expiration().as_ref().map(|s| s.as_str()), Some("1"));
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
