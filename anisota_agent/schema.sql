-- The store's schema as the migrations of anisota_agent/migrations.py leave a
-- new database, made in one go without importing sqlite-utils.
-- Regenerate: python -m anisota_agent.migrations > anisota_agent/schema.sql

CREATE TABLE "_sqlite_migrations" (
   "id" INTEGER PRIMARY KEY,
   "migration_set" TEXT,
   "name" TEXT,
   "applied_at" TEXT
);

CREATE UNIQUE INDEX "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");

CREATE TABLE "sessions" (
   "rkey" TEXT PRIMARY KEY,
   "did" TEXT,
   "status" TEXT NOT NULL,
   "outbox" TEXT NOT NULL,
   "owner_pid" INTEGER,
   "owner_started" REAL,
   "owner_token" TEXT,
   "started_at" TEXT NOT NULL,
   "last_activity_at" TEXT,
   "local_day" TEXT,
   "record" TEXT NOT NULL,
   "attempts" INTEGER DEFAULT 0,
   "next_attempt_at" REAL,
   "last_error" TEXT,
   "uri" TEXT,
   "cid" TEXT,
   "synced_at" REAL,
   "checkpointed_at" REAL
, "in_flight" INTEGER NOT NULL DEFAULT 0, "mirrored" INTEGER NOT NULL DEFAULT 0, "record_bytes" INTEGER NOT NULL DEFAULT 0, "awaiting_login" TEXT, "background_ms" INTEGER NOT NULL DEFAULT 0);

CREATE TABLE "counters" (
   "name" TEXT PRIMARY KEY,
   "value" INTEGER
);

CREATE TABLE "meta" (
   "key" TEXT PRIMARY KEY,
   "value" TEXT
);

CREATE TABLE outbox_totals (outbox TEXT PRIMARY KEY, sessions INTEGER NOT NULL, bytes INTEGER NOT NULL);

CREATE TRIGGER sessions_totals_insert AFTER INSERT ON sessions BEGIN
    INSERT INTO outbox_totals(outbox, sessions, bytes) SELECT NEW.outbox, 0, 0
        WHERE NOT EXISTS (SELECT 1 FROM outbox_totals WHERE outbox = NEW.outbox);
    UPDATE outbox_totals SET sessions = sessions + 1, bytes = bytes + NEW.record_bytes
        WHERE outbox = NEW.outbox;
END;

CREATE TRIGGER sessions_totals_delete AFTER DELETE ON sessions BEGIN
    UPDATE outbox_totals SET sessions = sessions - 1, bytes = bytes - OLD.record_bytes
        WHERE outbox = OLD.outbox;
END;

CREATE TRIGGER sessions_totals_update AFTER UPDATE OF outbox, record_bytes ON sessions
WHEN OLD.outbox IS NOT NEW.outbox OR OLD.record_bytes IS NOT NEW.record_bytes BEGIN
    UPDATE outbox_totals SET sessions = sessions - 1, bytes = bytes - OLD.record_bytes
        WHERE outbox = OLD.outbox;
    INSERT INTO outbox_totals(outbox, sessions, bytes) SELECT NEW.outbox, 0, 0
        WHERE NOT EXISTS (SELECT 1 FROM outbox_totals WHERE outbox = NEW.outbox);
    UPDATE outbox_totals SET sessions = sessions + 1, bytes = bytes + NEW.record_bytes
        WHERE outbox = NEW.outbox;
END;

CREATE INDEX "idx_sessions_outbox_synced_at"
    ON "sessions" ("outbox", "synced_at");

CREATE INDEX "idx_sessions_outbox_checkpointed_at"
    ON "sessions" ("outbox", "checkpointed_at");

CREATE INDEX "idx_sessions_outbox_rkey"
    ON "sessions" ("outbox", "rkey");

CREATE INDEX "idx_sessions_outbox_did_rkey"
    ON "sessions" ("outbox", "did", "rkey");

CREATE INDEX "idx_sessions_local_day_did_rkey"
    ON "sessions" ("local_day", "did", "rkey");

CREATE INDEX idx_sessions_awaiting_login ON sessions(awaiting_login) WHERE awaiting_login IS NOT NULL;
