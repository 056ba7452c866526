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
//! Layout, one file per concern (pure cores without I/O, and the shell):
//! - `ledger`: the pure in-flight core: which rows are out, what each broker
//!   answer means, suspects and their isolation;
//! - `exchanges`: the pure cache of what the broker said of each exchange;
//! - `outcome`: lapin's answers translated for the ledger (by reply code),
//!   and the AMQP properties of a row;
//! - `forwarder`: [`Forwarder`], the task: the link, the loop, publishing,
//!   feeding answers to the ledger, the shutdown drain;
//! - `side`: what is asked on channels other than the publishing one
//!   (exchange checks, the liveness probe, the own topology), and the
//!   pacing of channel reopens;
//! - `window`: the futures of the rows in flight (confirms, commits);
//! - `backlog`: the paged walk over due rows (docs/forwarding.md, The
//!   resend pass);
//! - `resend`: [`Resend`], the periodic pass, and the pass request the
//!   forwarder answers;
//! - `throttle`: the pure core of the rate cap (`publish.max_rate`,
//!   `publish.max_bytes_rate`): token buckets with time passed in, the
//!   gate before each backlog row, the account of time spent waiting.
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
//! - **Up**: publishing. Connection lost → **Down** (at once after a link
//!   that was up 10 s, else after the backoff); channel closed by the
//!   broker → reopened on the same connection once fully closed (paced when
//!   closes come in a row), stays **Up**; blocked by the broker (`connection.blocked`)
//!   → stays **Up**, publishes nothing until unblocked. Every new link and
//!   every reopened channel starts a new pass from the head of the backlog
//!   (highest priority, then `publish.order`).
//!   Shutdown → drain the confirms (bounded), record them, close (bounded)
//!   → **Stopped**.
//! - **Stopped**: the task returns.
//!
//! # Outcomes (docs/forwarding.md, Outcomes and Isolating a message the
//! broker refuses)
//!
//! - **delivered**: an ack that carries no `basic.return` → status
//!   delivered;
//! - **rejected** (one failed attempt, recorded by the store; status failed
//!   at `publish.max_attempts`): a nack; an ack *with* a return (312
//!   NO_ROUTE); the exchange refused by a passive declare (never
//!   published); a channel close with a code a message can cause while the
//!   row was alone on the channel; a confirm timeout after which the broker
//!   answered a liveness probe;
//! - **unknown** (nothing recorded; the row goes out again with the same
//!   `message_id`): a lost link, a close that blames no message, a timeout
//!   the probe could not explain, a blocked broker. A blaming close with
//!   several rows on the channel makes them *suspects*, isolated by the
//!   ledger until the culprit is alone on a channel.
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
mod exchanges;
mod forwarder;
mod ledger;
mod outcome;
mod resend;
mod side;
mod throttle;
mod window;

pub(crate) use forwarder::ForwardError;
pub(crate) use forwarder::Forwarder;
pub(crate) use resend::Resend;
