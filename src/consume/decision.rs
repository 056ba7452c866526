//! Decision: what to do with a delivery, given what the store says about
//! its row, the delivery's facts and the handler's result
//! (docs/consuming.md, The decision on a delivery; Deliveries without
//! `message_id`). Pure: no I/O, no clock, no logs; `delivery.rs` asks it at
//! each step and does what it says.
//!
//! | known | then |
//! |---|---|
//! | the row is status 3 (consumed) | ack as a duplicate, run nothing |
//! | no row, or status 0, 1 or 2 | run the handler |
//! | the handler succeeded | commit the consumption, then ack |
//! | the handler failed | commit the attempt, then follow the store's verdict |
//! | verdict: attempts below `max_attempts` | nack with requeue |
//! | verdict: attempts reached `max_attempts` (the row is now status 2) | reject without requeue (dead-letter) |
//! | no `message_id`, the handler succeeded | ack |
//! | no `message_id`, failed, not redelivered, `max_attempts` > 1 | nack with requeue |
//! | no `message_id`, failed, redelivered or `max_attempts` ≤ 1 | reject without requeue |
//! | the store could not answer (lookup or commit failed) | nack with requeue (after a pause) |
//!
//! Invariants:
//! - Nothing is acked before the store has committed what the ack rests on;
//!   what cannot be committed goes back to the queue.
//! - Attempts are counted by the store in the same transaction that marks
//!   the row failed at `max_attempts`, so the count and the status agree
//!   after a restart; this module maps the store's verdict, it does not
//!   recount.
//! - Without a `message_id` there is no row to count in: the broker's
//!   `redelivered` flag stands in for "attempted before".

use crate::store::{ConsumeVerdict, Consumption, Delivered, Status};

/// `last_error` keeps at most this many bytes of a handler's failure.
const ERROR_KEEP: usize = 1024;

/// What to tell the broker about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    /// Nack with requeue: the delivery comes again.
    Requeue,
    /// Reject without requeue: dead-lettered when the queue has a
    /// dead-letter exchange, dropped otherwise.
    Reject,
}

/// The first step of a delivery with a `message_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Already consumed: ack without running the handler.
    Duplicate,
    /// Run the handler.
    Run,
}

/// Whether the handler runs, from the status of the message's row (`None`:
/// no row, a message this agent did not publish).
pub(crate) fn on_arrival(row: Option<Status>) -> Arrival {
    match row {
        Some(Status::Consumed) => Arrival::Duplicate,
        _ => Arrival::Run,
    }
}

/// What to commit for a delivery with a `message_id` once the handler has
/// run: the consumption, or one more failed attempt (the store marks the
/// row failed when the attempts reach `max_attempts`).
pub(crate) fn to_commit(
    delivery: Delivered,
    handled: Result<(), String>,
    max_attempts: u32,
) -> Consumption {
    match handled {
        Ok(()) => Consumption::Succeeded(delivery),
        Err(error) => Consumption::Failed {
            delivery,
            error: truncate(&error, ERROR_KEEP),
            max_attempts,
        },
    }
}

/// What to tell the broker once the store has committed the handler's
/// result.
pub(crate) fn on_commit(verdict: ConsumeVerdict) -> Settle {
    match verdict {
        ConsumeVerdict::Ack => Settle::Ack,
        ConsumeVerdict::Requeue { .. } => Settle::Requeue,
        ConsumeVerdict::GiveUp { .. } => Settle::Reject,
    }
}

/// What to tell the broker when the store could not answer (the lookup or
/// the commit failed): nothing is decided without the database, and a
/// delivery left unacked would hold its prefetch slot for as long as the
/// channel lives.
pub(crate) fn on_store_error() -> Settle {
    Settle::Requeue
}

/// A delivery without `message_id`: nothing is committed, so the handler's
/// result decides at once, with `redelivered` standing in for the attempt
/// count.
pub(crate) fn without_id(
    handled: &Result<(), String>,
    redelivered: bool,
    max_attempts: u32,
) -> Settle {
    match handled {
        Ok(()) => Settle::Ack,
        Err(_) if redelivered || max_attempts <= 1 => Settle::Reject,
        Err(_) => Settle::Requeue,
    }
}

/// `text` cut to at most `max` bytes on a char boundary, marked with `…`.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered() -> Delivered {
        Delivered::sample("m-1")
    }

    #[test]
    fn a_consumed_row_is_a_duplicate_acked_without_running() {
        assert_eq!(on_arrival(Some(Status::Consumed)), Arrival::Duplicate);
    }

    #[test]
    fn any_other_row_or_none_runs_the_handler() {
        for row in [
            None,
            Some(Status::Delivering),
            Some(Status::Delivered),
            Some(Status::Failed),
        ] {
            assert_eq!(on_arrival(row), Arrival::Run, "{row:?}");
        }
    }

    #[test]
    fn success_commits_the_consumption_then_acks() {
        match to_commit(delivered(), Ok(()), 2) {
            Consumption::Succeeded(d) => assert_eq!(d.id, "m-1"),
            other => panic!("{other:?}"),
        }
        assert_eq!(on_commit(ConsumeVerdict::Ack), Settle::Ack);
    }

    #[test]
    fn a_failure_commits_the_attempt_with_the_limit_and_the_reason() {
        match to_commit(delivered(), Err("exit status 3".into()), 3) {
            Consumption::Failed {
                delivery,
                error,
                max_attempts,
            } => {
                assert_eq!(delivery.id, "m-1");
                assert_eq!(error, "exit status 3");
                assert_eq!(max_attempts, 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_first_failure_is_requeued() {
        let verdict = ConsumeVerdict::Requeue { attempts: 1 };
        assert_eq!(on_commit(verdict), Settle::Requeue);
    }

    #[test]
    fn a_failure_at_max_attempts_is_rejected() {
        // The store answers GiveUp when the attempts reach max_attempts,
        // in the transaction that marks the row failed.
        let verdict = ConsumeVerdict::GiveUp { attempts: 2 };
        assert_eq!(on_commit(verdict), Settle::Reject);
    }

    #[test]
    fn a_store_error_sends_the_delivery_back_to_the_queue() {
        assert_eq!(on_store_error(), Settle::Requeue);
    }

    #[test]
    fn without_message_id_redelivered_stands_in_for_attempts() {
        let failed = Err("exit status 1".to_string());
        assert_eq!(without_id(&Ok(()), false, 2), Settle::Ack);
        assert_eq!(without_id(&Ok(()), true, 2), Settle::Ack);
        // First delivery: attempts left, so back to the queue.
        assert_eq!(without_id(&failed, false, 2), Settle::Requeue);
        // Delivered before: counts as the last attempt.
        assert_eq!(without_id(&failed, true, 2), Settle::Reject);
        assert_eq!(without_id(&failed, true, 5), Settle::Reject);
        // One attempt allowed: the first failure is the last.
        assert_eq!(without_id(&failed, false, 1), Settle::Reject);
    }

    #[test]
    fn long_errors_are_truncated_on_a_char_boundary() {
        let text = "é".repeat(1000);
        let t = truncate(&text, 1023);
        assert!(t.len() <= 1023 + "…".len());
        match to_commit(delivered(), Err(text), 2) {
            Consumption::Failed { error, .. } => {
                assert!(error.len() <= ERROR_KEEP + "…".len());
                assert!(error.ends_with('…'));
            }
            other => panic!("{other:?}"),
        }
    }
}
