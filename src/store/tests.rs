//! Tests of the [`Store`](super::Store) handle as the agent uses it: each
//! write through the writer thread and its group commit, read back through
//! the reader pool, grouped by behaviour (submits and limits, publish
//! outcomes, consumer results, purge).

use std::path::Path;

use rusqlite::params;

use crate::config::StoreConfig;
use crate::store::{
    now_ms, ConsumeVerdict, Consumption, Delivered, Inserted, ListOrder, NewMessage,
    PublishOutcome, PurgeCutoffs, RetryPolicy, RowFilter, Status, Store, StoreError,
};

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        path: dir.join("t.db"),
        ..StoreConfig::default()
    }
}

/// Stores `message` and waits for its commit, as a submit does.
async fn insert(store: &Store, message: NewMessage) -> Result<Inserted, StoreError> {
    store.enqueue_insert(message).await?.await
}

fn message(id: &str, body: &[u8]) -> NewMessage {
    NewMessage {
        id: id.into(),
        body: body.to_vec(),
        exchange: "ex".into(),
        routing_key: "rk".into(),
        headers: None,
        content_type: "text/plain".into(),
        priority: 0,
        ttl_ms: None,
    }
}

#[tokio::test]
async fn insert_dedupes_and_round_trips_binary() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    let body = vec![0u8, 255, 1, 128];
    let first = insert(&store, message("a", &body)).await.unwrap();
    assert!(!first.duplicate);
    let again = insert(&store, message("a", b"other")).await.unwrap();
    assert!(again.duplicate);
    let row = store.reader().get("a").unwrap().unwrap();
    assert_eq!(row.body, body);
    assert!(!row.body_is_text);
    assert_eq!(row.status, Status::Delivering);
    assert_eq!(store.reader().counts().unwrap().delivering, 1);
    store.close().await;
    assert!(matches!(
        insert(&store, message("b", b"x")).await,
        Err(StoreError::Closed)
    ));
}

#[tokio::test]
async fn max_pending_refuses_without_evicting() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_pending = std::num::NonZeroU64::new(2).unwrap();
    let store = Store::open(&cfg).unwrap();
    insert(&store, message("1", b"x")).await.unwrap();
    insert(&store, message("2", b"x")).await.unwrap();
    let refused = insert(&store, message("3", b"x")).await;
    assert!(matches!(refused, Err(StoreError::BufferFull { .. })));
    // A duplicate of a stored message is still ok.
    assert!(insert(&store, message("2", b"x")).await.unwrap().duplicate);
    assert_eq!(store.reader().counts().unwrap().delivering, 2);
    store.close().await;
}

fn delivered(id: &str) -> Delivered {
    Delivered::sample(id)
}

#[tokio::test]
async fn outcomes_move_status_forward_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    let policy = RetryPolicy {
        max_attempts: 2,
        retry_interval_ms: 1000,
    };
    for id in ["a", "b", "c"] {
        insert(&store, message(id, b"x")).await.unwrap();
    }
    let record = |outcomes| async {
        store
            .record_outcomes(outcomes, policy)
            .await
            .unwrap()
            .await
            .unwrap()
    };
    record(vec![PublishOutcome::Delivered { id: "a".into() }]).await;
    let rejected = |id: &str| PublishOutcome::Rejected {
        id: id.into(),
        error: "312 NO_ROUTE".into(),
    };
    record(vec![rejected("b")]).await;
    let b = store.reader().get("b").unwrap().unwrap();
    assert_eq!((b.status, b.try_count), (Status::Delivering, 1));
    assert!(b.next_try_time.unwrap() >= b.update_time.unwrap() + 1000);
    record(vec![rejected("b")]).await;
    let b = store.reader().get("b").unwrap().unwrap();
    assert_eq!((b.status, b.try_count), (Status::Failed, 2));
    assert_eq!(b.last_error.as_deref(), Some("312 NO_ROUTE"));
    // The consumer settles c before its confirm arrives: 3 stays.
    let verdict = store
        .record_consumption(Consumption::Succeeded(delivered("c")))
        .await
        .unwrap();
    assert_eq!(verdict, ConsumeVerdict::Ack);
    record(vec![PublishOutcome::Delivered { id: "c".into() }]).await;
    assert_eq!(
        store.reader().status_of("c").unwrap(),
        Some(Status::Consumed)
    );
    assert_eq!(
        store.reader().status_of("a").unwrap(),
        Some(Status::Delivered)
    );
    store.close().await;
}

#[tokio::test]
async fn handler_failures_are_counted_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    let failed = |id: &str| Consumption::Failed {
        delivery: delivered(id),
        error: "exit 1".into(),
        max_attempts: 2,
    };
    // A message this agent did not publish gets a row on first sight.
    let v = store.record_consumption(failed("foreign")).await.unwrap();
    assert_eq!(v, ConsumeVerdict::Requeue { attempts: 1 });
    let row = store.reader().get("foreign").unwrap().unwrap();
    assert_eq!(row.status, Status::Delivered);
    assert_eq!(row.body, b"body");
    let v = store.record_consumption(failed("foreign")).await.unwrap();
    assert_eq!(v, ConsumeVerdict::GiveUp { attempts: 2 });
    let row = store.reader().get("foreign").unwrap().unwrap();
    assert_eq!(row.status, Status::Failed);
    assert_eq!(row.last_error.as_deref(), Some("exit 1"));
    store
        .record_consumption(Consumption::Succeeded(delivered("new")))
        .await
        .unwrap();
    assert_eq!(
        store.reader().status_of("new").unwrap(),
        Some(Status::Consumed)
    );
    store.close().await;
}

#[tokio::test]
async fn purge_deletes_old_settled_rows_in_batches_never_delivering() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    // (id, status, age in days)
    let rows = [
        ("old-delivering", Status::Delivering, 400),
        ("old-delivered", Status::Delivered, 40),
        ("old-consumed", Status::Consumed, 40),
        ("new-delivered", Status::Delivered, 1),
        ("old-failed", Status::Failed, 40),
        ("very-old-failed", Status::Failed, 100),
        ("very-old-consumed", Status::Consumed, 100),
    ];
    for (id, _, _) in rows {
        insert(&store, message(id, b"x")).await.unwrap();
    }
    let now = now_ms();
    let db = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    for (id, status, days) in rows {
        db.execute(
            "UPDATE msg_log SET status = ?2, create_time = ?3 WHERE id = ?1",
            params![id, status, now - days * 86_400_000],
        )
        .unwrap();
    }
    let cutoffs = PurgeCutoffs {
        settled_before: now - 30 * 86_400_000,
        failed_before: now - 90 * 86_400_000,
    };
    let would = store.reader().purgeable(cutoffs).unwrap();
    assert_eq!((would.delivered, would.failed, would.consumed), (1, 1, 2));
    assert_eq!(store.purge_batch(cutoffs, 3).await.unwrap().total(), 3);
    assert_eq!(store.purge_batch(cutoffs, 3).await.unwrap().total(), 1);
    assert_eq!(store.purge_batch(cutoffs, 3).await.unwrap().total(), 0);
    let mut left: Vec<String> = store
        .reader()
        .list(&RowFilter::default(), ListOrder::NewestFirst, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    left.sort();
    assert_eq!(left, ["new-delivered", "old-delivering", "old-failed"]);
    store.close().await;
}

/// A row past its expiry becomes failed, "expired", through the writer;
/// one with time left, one without an expiry and a settled one stay; the
/// agent's `max_age` applies to a message without a `ttl` of its own; the
/// priority is stored, and the forwarder hears of the highest one.
#[tokio::test]
async fn expired_rows_fail_as_expired_and_nothing_else_moves() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path()))
        .unwrap()
        .with_max_age(Some(std::time::Duration::from_millis(1)));
    let with = |id: &str, ttl: Option<i64>, priority: u8| NewMessage {
        ttl_ms: ttl,
        priority,
        ..message(id, b"x")
    };
    insert(&store, with("short", Some(1), 3)).await.unwrap();
    insert(&store, with("default", None, 7)).await.unwrap();
    insert(&store, with("long", Some(3_600_000), 0))
        .await
        .unwrap();
    assert_eq!(store.take_new_priority(), Some(7));
    assert_eq!(store.take_new_priority(), None);
    let no_default = Store::open(&StoreConfig {
        path: dir.path().join("other.db"),
        ..StoreConfig::default()
    })
    .unwrap();
    insert(&no_default, with("forever", None, 0)).await.unwrap();
    let forever = no_default.reader().get("forever").unwrap().unwrap();
    assert_eq!(forever.expire_time, None);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(store.expire_batch(1).await.unwrap(), 1, "the limit holds");
    assert_eq!(store.expire_batch(100).await.unwrap(), 1);
    assert_eq!(store.expire_batch(100).await.unwrap(), 0);
    for id in ["short", "default"] {
        let row = store.reader().get(id).unwrap().unwrap();
        assert_eq!(row.status, Status::Failed, "{id}");
        assert_eq!(row.last_error.as_deref(), Some(crate::store::EXPIRED));
    }
    assert_eq!(store.reader().get("short").unwrap().unwrap().priority, 3);
    let long = store.reader().get("long").unwrap().unwrap();
    assert_eq!(long.status, Status::Delivering);
    assert!(long.expire_time.unwrap() > now_ms() + 3_500_000);
    let (backlog, expired) = store.reader().backlog().unwrap();
    assert_eq!(backlog.by_priority[0], 1);
    assert_eq!(backlog.by_priority.iter().sum::<u64>(), 1);
    assert_eq!(expired, 2);
    store.close().await;
    no_default.close().await;
}

/// After a purge the writer hands every freed page back, in slices between
/// groups, while submits go on: the freelist ends empty and the file
/// shorter (decisions/0023).
#[tokio::test]
async fn after_a_purge_the_writer_reclaims_every_free_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config(dir.path())).unwrap();
    let body = vec![b'r'; 4000];
    for i in 0..2000 {
        insert(&store, message(&format!("r-{i}"), &body))
            .await
            .unwrap();
    }
    let db = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    let pragma = |name: &str| -> i64 {
        db.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .unwrap()
    };
    db.execute("UPDATE msg_log SET status = ?1", params![Status::Delivered])
        .unwrap();
    let full = pragma("page_count");
    let cutoffs = PurgeCutoffs {
        settled_before: i64::MAX,
        failed_before: 0,
    };
    while store.purge_batch(cutoffs, 500).await.unwrap().total() > 0 {}
    // Submits go on during the reclaim.
    for i in 0..20 {
        insert(&store, message(&format!("during-{i}"), b"x"))
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pragma("freelist_count") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} free pages left",
            pragma("freelist_count")
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after = pragma("page_count");
    assert!(after * 20 < full, "{full} pages before, {after} after");
    assert_eq!(
        store
            .reader()
            .list(&RowFilter::default(), ListOrder::NewestFirst, 100)
            .unwrap()
            .len(),
        20
    );
    store.close().await;
}
