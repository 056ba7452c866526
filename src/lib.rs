//! edge-outbox: a store-and-forward agent for edge hosts.
//!
//! Local programs hand messages to the agent over a Unix socket; the agent
//! commits each one to the SQLite table `msg_log` before it answers, then
//! forwards the table to RabbitMQ with publisher confirms, and (optionally)
//! consumes a queue idempotently. The contract (protocol, schema and
//! statuses, forwarding and consumer semantics, configuration, CLI) is the
//! repository's `docs/`; the design decisions are `docs/decisions/`.
//!
//! # Layout
//!
//! One module per concept; a folder where a concept has several parts, each
//! folder's `mod.rs` header being its design document. Only [`app`] wires
//! components together.
//!
//! | module | role |
//! |---|---|
//! | `main.rs` | the binary: calls [`cli::main`] |
//! | [`cli`] | the command line: arguments, commands, output, exit codes |
//! | [`config`] | the typed configuration: file, `EDGE_OUTBOX_*` overrides, validation |
//! | [`app`] | wiring and supervision: start every task, stop them in order |
//! | [`protocol`] | the socket protocol's requests and answers, shared by `submit` and `cli` |
//! | [`submit`] | the Unix-socket server: accept loop, connections, parsing, line reader |
//! | [`store`] | `msg_log`: open and migrations, group-commit writer, write SQL, readers, admin |
//! | [`broker`] | reaching RabbitMQ: targets, the shared reconnect driver, the header codec |
//! | [`forward`] | the forwarder: the in-flight ledger, backlog walk, publishing, outcomes, isolation |
//! | [`consume`] | the consumer: topology, the decision on a delivery, handlers |
//! | [`purge`] | the daily and on-demand deletion of old settled rows |
//! | [`expiry`] | the sweep that fails rows past their expiry, broker or not |
//! | [`service`] | systemd: READY, STOPPING, STATUS, the progress-checked watchdog |
//! | [`status`] | the status report shared by the socket, the CLI and metrics |
//! | [`stop`] | the account of what an orderly stop waited for, for its log line |
//! | [`metrics`] | Prometheus counters and gauges at `/metrics` |
//! | [`digest`] | one log line per key and period for repeated events |
//! | [`fd_limit`] | the descriptor budget: the soft limit raised, the connections clamped |
//! | [`logging`] | where the log goes: journald's native protocol, stderr lines or JSON |
//!
//! One message, from socket to consumed: `submit::connection` reads the
//! line, `submit::parse` turns it into a `store::NewMessage`, the
//! `store::writer` thread commits it in a group and the connection answers
//! `ok`; the writer wakes the forwarder, whose `forward::backlog` reads the
//! row, `forward::ledger` lets it out, `forward::forwarder` publishes it
//! and `forward::window` awaits the confirm, the store records status 1;
//! `consume::consumer` receives the delivery, `consume::delivery` runs the
//! handler and commits status 3 through `store::write` before the ack.
//!
//! Everything but [`cli::main`] and a few [`store`] items (used by the test
//! kit) is `pub(crate)`; `unreachable_pub` keeps it so.

#![warn(unreachable_pub)]

pub(crate) mod app;
pub(crate) mod broker;
pub mod cli;
pub(crate) mod config;
pub(crate) mod consume;
pub(crate) mod digest;
pub(crate) mod expiry;
pub(crate) mod fd_limit;
pub(crate) mod forward;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod protocol;
pub(crate) mod purge;
pub(crate) mod service;
pub(crate) mod status;
pub(crate) mod stop;
pub mod store;
pub(crate) mod submit;
