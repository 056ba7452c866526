-- edge-outbox schema, version 1 (PRAGMA user_version = 1).
-- The binary embeds this file and applies it to a new database; later
-- versions add migrations after it, never edit it in place.

CREATE TABLE msg_log (
  id            TEXT    PRIMARY KEY NOT NULL, -- message id; also the AMQP message_id
  msg           TEXT,                         -- body: TEXT when it is UTF-8, else a BLOB (byte-exact)
  exchange      TEXT    NOT NULL DEFAULT '',
  routing_key   TEXT    NOT NULL DEFAULT '',
  status        INTEGER NOT NULL DEFAULT 0,   -- 0 delivering, 1 delivered, 2 failed, 3 consumed
  try_count     INTEGER NOT NULL DEFAULT 0,   -- failed attempts so far
  next_try_time INTEGER,                      -- epoch ms: not (re)published before this
  create_time   INTEGER,                      -- epoch ms
  update_time   INTEGER,                      -- epoch ms
  last_error    TEXT,                         -- why the last attempt failed
  headers       TEXT,                         -- AMQP headers as a JSON object, or NULL
  content_type  TEXT,                         -- AMQP content_type
  consume_count INTEGER NOT NULL DEFAULT 0    -- failed handler runs so far (consumer)
);

-- Serves every status lookup in insertion (rowid) order: the forwarder's
-- oldest-first pages, counts per status, and the purge's old-rows-first scan.
CREATE INDEX msg_log_status ON msg_log (status);
