-- filterd quarantine index, schema version 1 (contract: quarantine/README.md).
-- Derived data: every row comes from one sidecar <id>.json and is rebuilt by
-- `filterd quarantine reindex`. Times are seconds since the epoch (UTC).
CREATE TABLE IF NOT EXISTS items (
    id          TEXT PRIMARY KEY,           -- 20261122T101500-3f9a0c41d2
    state       TEXT NOT NULL CHECK (state IN ('held', 'releasing', 'released')),
    category    TEXT NOT NULL CHECK (category IN ('spam', 'virus', 'banned', 'bad-header', 'policy')),
    time        REAL NOT NULL,              -- when it was quarantined
    size        INTEGER NOT NULL,           -- bytes of the stored message
    sha256      TEXT NOT NULL,              -- digest of the stored message
    queue_id    TEXT,                       -- Postfix queue ID, when the MTA gave one
    mail_from   TEXT NOT NULL,              -- envelope sender ('' for <>)
    subject     TEXT NOT NULL,
    score       REAL NOT NULL,
    action      TEXT NOT NULL,              -- the verdict's action
    reason      TEXT NOT NULL,
    released_at REAL,                       -- last release, if any
    released_by TEXT
);
CREATE TABLE IF NOT EXISTS recipients (
    id      TEXT NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    address TEXT NOT NULL,                  -- envelope recipient, lower-cased
    PRIMARY KEY (id, address)
);
CREATE INDEX IF NOT EXISTS items_time ON items (time);
CREATE INDEX IF NOT EXISTS items_category_time ON items (category, time);
CREATE INDEX IF NOT EXISTS items_sender ON items (mail_from);
CREATE INDEX IF NOT EXISTS recipients_address ON recipients (address);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1');
