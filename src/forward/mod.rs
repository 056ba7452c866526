//! Forward: from `msg_log` to RabbitMQ with publisher confirms
//! (docs/forwarding.md).
//!
//! Role: every delivering row reaches the broker, and every attempt ends in
//! a recorded outcome or is known to have none. The component keeps one
//! AMQP connection with one confirm-mode channel, publishes the rows a
//! backlog walk hands out (persistent, `mandatory`, `message_id` = row id),
//! up to `publish.max_in_flight` unconfirmed, and turns every confirm into
//! an outcome the store records.
//!
//! Layout, one file per concern:
//! - `forwarder`: [`Forwarder`], the task: the link, publishing, confirms,
//!   settling outcomes, the shutdown drain;
//! - `window`: the rows in flight, from publish to a recorded outcome;
//! - `outcome`: the pure part: the AMQP properties of a row and the
//!   classification of a confirm;
//! - `backlog`: the paged walk over due rows (docs/forwarding.md, Passes);
//! - `resend`: [`Resend`], the periodic pass, and the pass request the
//!   forwarder answers.
//!
//! Reaching the broker (targets, backoff, the reconnect driver, the header
//! codec) is [`crate::broker`]'s; this component only says what to do with
//! a link once it is up.
//!
//! # The link (docs/forwarding.md, Reconnecting)
//!
//! - **Down**: no connection. The [`crate::broker::Reconnect`] driver waits
//!   out the backoff (none before the first attempt, capped, exponential,
//!   jittered after failures), then tries the next URL and opens a
//!   confirm-mode channel → **Up**; a failure → **Down** again, shown in
//!   `status` (`last_error`). Pass requests and watchdog probes are
//!   answered while waiting. Shutdown → **Stopped**.
//! - **Up**: publishing. Connection lost → **Down** at once (no wait);
//!   channel closed by the broker (a 404) → reopened on the same
//!   connection, stays **Up**; blocked by the broker (`connection.blocked`)
//!   → stays **Up**, publishes nothing until unblocked. Every new link and
//!   every reopened channel starts a new pass from the oldest row.
//!   Shutdown → drain the confirms (bounded), record them, close (bounded)
//!   → **Stopped**.
//! - **Stopped**: the task returns.
//!
//! # Outcomes (docs/forwarding.md, Outcomes)
//!
//! - **delivered**: an ack that carries no `basic.return` → status
//!   delivered;
//! - **rejected**: a nack, an ack *with* a return (312 NO_ROUTE), the
//!   channel closed by the broker because of this message (404 naming its
//!   exchange), or no confirm within `publish.confirm_timeout` on a
//!   connection that stayed up and unblocked → one failed attempt, recorded
//!   by the store (`try_count`, `last_error`, `next_try_time`; status failed
//!   at `publish.max_attempts`);
//! - **unknown**: anything else (connection lost, channel closed because of
//!   another message, blocked broker) → nothing recorded; the row stays due
//!   and the next pass publishes it again with the same `message_id`.
//!
//! # Invariants
//!
//! - Nothing is attempted, so nothing is counted, while the broker is away.
//! - A row is in flight from its publish until its outcome is committed (or
//!   known to be unknown), so no pass publishes it twice at once.
//! - A duplicate at worst, never a loss: an outcome that cannot be recorded
//!   leaves the row delivering, to be published again.
//! - Every publish and every confirm await has a timeout; so do the
//!   connect, the setup step, the shutdown drain and the close.
//! - URLs in logs, errors and status are redacted.

mod backlog;
mod forwarder;
mod outcome;
mod resend;
mod window;

pub(crate) use forwarder::ForwardError;
pub(crate) use forwarder::Forwarder;
pub(crate) use resend::Resend;
