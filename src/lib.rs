//! edge-outbox: a store-and-forward agent for edge hosts.
//!
//! Local programs hand messages to the agent over a Unix socket; the agent
//! commits each one to the SQLite table `msg_log` before it answers, then
//! forwards the table to RabbitMQ. The contract (names, protocol, schema,
//! statuses, configuration, CLI) is `SPEC.md`; this crate is its one
//! implementation.
//!
//! Layout, one module per concept:
//! - [`config`]: the typed, validated configuration (file, environment, defaults);
//! - [`store`]: `msg_log`: all SQL, the group-commit writer, the reader pool;
//! - [`protocol`]: the socket protocol's requests and answers, shared by `submit` and `cli`;
//! - [`submit`]: the Unix-socket protocol server;
//! - [`broker`]: reaching RabbitMQ: targets, backoff, the reconnect driver, the header codec;
//! - [`metrics`]: Prometheus counters and gauges, served at `/metrics`;
//! - [`forward`]: the forwarder to RabbitMQ: link, confirms, outcomes, the backlog walk, the periodic pass;
//! - [`consume`]: the idempotent manual-ack consumer and its handlers;
//! - [`purge`]: the daily and on-demand deletion of old settled rows;
//! - [`service`]: systemd notifications: READY, STOPPING, a progress-checked watchdog;
//! - [`status`]: the status report shared by the socket and the CLI;
//! - [`fd_limit`]: the file descriptor budget: the soft limit raised, the connections clamped;
//! - [`logging`]: where the log goes: journald's native protocol, stderr lines or JSON;
//! - [`app`]: the only module that wires components together and supervises them;
//! - [`cli`]: the command line.

pub mod app;
pub mod broker;
pub mod cli;
pub mod config;
pub mod consume;
pub(crate) mod fd_limit;
pub mod forward;
pub(crate) mod logging;
pub mod metrics;
pub(crate) mod protocol;
pub mod purge;
pub mod service;
pub mod status;
pub mod store;
pub mod submit;
