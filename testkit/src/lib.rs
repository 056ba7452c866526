//! The test kit of edge-outbox: what the integration tests (`tests/`) and
//! the benchmarks (`benches/`) share. Real processes, a real broker, real
//! files: nothing is mocked.
//!
//! Layout, by role:
//!
//! | module       | what it holds |
//! |--------------|---------------|
//! | [`agent`]    | [`Agent`]: the `edge-outbox` binary run on a temp dir; start, restart, signals, log |
//! | [`config`]   | [`AgentBuilder`]: the agent's TOML config, the kit's defaults, forwarding/consuming set-ups |
//! | [`client`]   | [`Client`]: the socket protocol; [`ok_id`], [`refused`], pipelined [`submit_many`], [`request_many`] |
//! | [`cli`]      | the agent's command line run to completion: [`CliOutput`] |
//! | [`db`]       | looking into the agent's `msg_log`: counts, rows, statuses as [`Status`]; rows written past submit |
//! | [`prefill`]  | databases made without the agent: the schema, prefilled backlogs |
//! | [`consumer`] | consumer-test fixtures: waiting for the consumer, handler scripts' files and pids |
//! | [`broker`]   | the shared RabbitMQ broker on 127.0.0.1:5672, `rabbitmqctl list_queues` |
//! | [`node`]     | the restartable RabbitMQ node on 127.0.0.1:5673 and its cross-process locks |
//! | [`amqp`]     | AMQP client helpers: unique names, declare, publish, read, delete |
//! | [`cleanup`]  | [`Cleanup`]: deletes a test's queues and exchanges at its end |
//! | [`proxy`]    | [`FaultProxy`]: a TCP proxy that refuses, cuts and stalls |
//! | [`tmpfs`]    | [`Tmpfs`]: a small filesystem to fill up |
//! | [`notify`]   | [`NotifySocket`]: a systemd notification socket a test owns |
//! | [`journal`]  | [`JournalSocket`]: journald's socket played by a test; entries parsed |
//! | [`tls`]      | a test CA, certificates and a TLS listener in front of the broker |
//! | [`metrics`]  | scraping and parsing the agent's metrics endpoint |
//! | [`cpu`]      | a process's CPU time from `/proc`: back to idle or not |
//! | [`bench`]    | what the benchmarks share: message size, the baseline publisher |
//! | [`wait`]     | [`wait_until`] (every wait has a deadline) and [`rt`] |
//!
//! The binary under test: `env!("CARGO_BIN_EXE_edge-outbox")` exists only
//! while the main package's tests and benches compile, so each of them
//! passes it in: `const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");`
//! then `Agent::builder(BIN)`.
//!
//! Statuses are `edge_outbox::store::Status` everywhere (re-exported as
//! [`Status`]); no helper takes or returns the codes 0-3.

pub mod agent;
pub mod amqp;
pub mod bench;
pub mod broker;
pub mod cleanup;
pub mod cli;
pub mod client;
pub mod config;
pub mod consumer;
pub mod cpu;
pub mod db;
pub mod journal;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod prefill;
pub mod proxy;
pub mod tls;
pub mod tmpfs;
pub mod wait;

mod lock;
mod process;

pub use agent::Agent;
pub use cleanup::Cleanup;
pub use cli::CliOutput;
pub use client::{ok_id, refused, request_many, submit_many, Client};
pub use config::{toml_str, AgentBuilder};
pub use edge_outbox::store::Status;
pub use journal::JournalSocket;
pub use notify::NotifySocket;
pub use proxy::{FaultProxy, Mode};
pub use tmpfs::Tmpfs;
pub use wait::{rt, wait_until};
