//! [`Cleanup`]: deletes a test's queues and exchanges when the test ends,
//! passed or failed.

use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

use crate::wait::on_own_runtime;

/// Deletes the queues and exchanges it was given when dropped, best effort
/// (errors are ignored, nothing panics; runs on its own thread and runtime,
/// so it works at the end of sync and async tests alike, and while unwinding).
pub struct Cleanup {
    url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    /// Cleans up on the broker at `url` (use a direct URL, not a proxied one).
    pub fn new(url: &str) -> Cleanup {
        Cleanup {
            url: url.to_owned(),
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    /// Registers a queue; returns its name.
    pub fn queue(&mut self, name: impl Into<String>) -> String {
        let name = name.into();
        self.queues.push(name.clone());
        name
    }

    /// Registers an exchange; returns its name.
    pub fn exchange(&mut self, name: impl Into<String>) -> String {
        let name = name.into();
        self.exchanges.push(name.clone());
        name
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.queues.is_empty() && self.exchanges.is_empty() {
            return;
        }
        let url = self.url.clone();
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let _ = on_own_runtime(move || async move {
            let work = async {
                let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
                for q in queues {
                    let ch = conn.create_channel().await?;
                    let _ = ch
                        .queue_delete(q.into(), QueueDeleteOptions::default())
                        .await;
                }
                for x in exchanges {
                    let ch = conn.create_channel().await?;
                    let _ = ch
                        .exchange_delete(x.into(), ExchangeDeleteOptions::default())
                        .await;
                }
                conn.close(200, "OK".into()).await
            };
            match tokio::time::timeout(Duration::from_secs(10), work).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timeout".to_owned()),
            }
        });
    }
}
