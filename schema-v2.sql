-- edge-outbox schema, version 2 (PRAGMA user_version = 2): priority and
-- expiry (docs/storage.md, Schema; docs/decisions/0029, 0031).
-- Applied after schema.sql; never edited in place once shipped.

-- 0 (the default) to 9; the backlog goes out highest first.
ALTER TABLE msg_log ADD COLUMN priority INTEGER NOT NULL DEFAULT 0
  CHECK (priority BETWEEN 0 AND 9);
-- Epoch ms after which the row is never published (it becomes failed,
-- last_error "expired"); NULL: it never expires.
ALTER TABLE msg_log ADD COLUMN expire_time INTEGER;

-- The forwarder's pages: one priority at a time, in rowid order either way
-- (the rowid is the index's last key), so no page ever needs a sort.
CREATE INDEX msg_log_priority ON msg_log (status, priority);
-- The expiry sweep: only rows that can expire are indexed.
CREATE INDEX msg_log_expiry ON msg_log (status, expire_time)
  WHERE expire_time IS NOT NULL;
