//! In flight: the message ids whose deliveries are being processed.
//!
//! Owns one lock per `message_id` in flight. Copies of one message
//! delivered together (a redelivery racing the original, a publisher that
//! sent it twice) take their turns on it one at a time, so the handler runs
//! once: the later copy then finds status 3 and is acked as a duplicate
//! (docs/consuming.md, The decision on a delivery).
//!
//! Invariants:
//! - At most one [`Turn`] per id exists at a time.
//! - An id is forgotten when its last turn ends and no other delivery of it
//!   waits, so the set holds only what is in flight.
//! - Different ids never wait for each other.

use std::collections::HashMap;
use std::sync::Arc;

/// The message ids whose deliveries are being processed, each with a lock
/// that copies of the same message take in turn.
#[derive(Default)]
pub(crate) struct InFlight(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl InFlight {
    /// Waits until no other delivery of `id` is being processed.
    pub(crate) async fn turn(self: &Arc<Self>, id: &str) -> Turn {
        let lock = {
            let mut ids = self.0.lock().unwrap_or_else(|e| e.into_inner());
            ids.entry(id.to_string()).or_default().clone()
        };
        Turn {
            guard: Some(lock.lock_owned().await),
            in_flight: self.clone(),
            id: id.to_string(),
        }
    }
}

/// One delivery's turn on its message id; the id is forgotten when no other
/// delivery of it waits.
pub(crate) struct Turn {
    /// Released first on drop, so the count below sees only waiters.
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    in_flight: Arc<InFlight>,
    id: String,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.guard.take();
        let mut ids = self.in_flight.0.lock().unwrap_or_else(|e| e.into_inner());
        if ids
            .get(&self.id)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            ids.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ids(in_flight: &InFlight) -> usize {
        in_flight.0.lock().unwrap().len()
    }

    #[tokio::test]
    async fn copies_of_one_id_take_turns_and_the_id_is_forgotten_after() {
        let in_flight = Arc::new(InFlight::default());
        let first = in_flight.turn("m-1").await;
        // Another id does not wait for m-1.
        let other = tokio::time::timeout(Duration::from_secs(5), in_flight.turn("m-2"))
            .await
            .expect("a different id must not wait");
        assert_eq!(ids(&in_flight), 2);
        drop(other);
        assert_eq!(ids(&in_flight), 1);
        // A second copy of m-1 waits for the first one's turn to end.
        let waiting = in_flight.clone();
        let second = tokio::spawn(async move {
            let _turn = waiting.turn("m-1").await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !second.is_finished(),
            "the second copy ran alongside the first"
        );
        // The first turn ends with a waiter: the id stays known.
        drop(first);
        assert_eq!(ids(&in_flight), 1);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second copy gets its turn")
            .unwrap();
        assert_eq!(ids(&in_flight), 0);
    }
}
