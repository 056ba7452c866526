//! Shared test harness: real agent processes, a real broker, a fault proxy.
//!
//! - `agent`: start the `edge-outbox` binary on a temp directory (real
//!   SQLite file, real Unix socket), talk to it, kill it.
//! - `broker`: reach a RabbitMQ broker; a second node tests may stop/start.
//! - `proxy`: a TCP proxy between agent and broker that can refuse, cut and stall.
//!
//! Every wait polls a condition with a deadline ([`wait_until`]).

#![allow(dead_code)]

pub mod agent;
pub mod broker;
pub mod proxy;

use std::time::{Duration, Instant};

/// Polls `condition` every 20 ms until it holds; panics with `what` after `deadline`.
pub fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small multi-threaded runtime for the async broker helpers.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
