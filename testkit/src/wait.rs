//! Waiting with a deadline, and the runtime the async helpers run on.
//!
//! Every wait in the kit and the tests polls a condition with a deadline
//! ([`wait_until`]): nothing sleeps for a fixed time and hopes. A wait that
//! runs out panics with what it was waiting for, so a hung test names its
//! cause instead of hitting nextest's backstop timeout.

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

/// Runs a future to completion on a new thread with a new runtime, so sync
/// and async callers (and `Drop` impls, even while unwinding) can use it alike.
pub(crate) fn on_own_runtime<F, Fut>(f: F) -> Result<(), String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        rt.block_on(f())
    })
    .join()
    .unwrap_or_else(|_| Err("panicked".to_owned()))
}
