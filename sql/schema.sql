-- =============================================================================
-- Mail job queue on PostgreSQL: the schema.
--
-- Run it whole in pgAdmin4's Query Tool (open the file, Execute), or with
--   psql -v ON_ERROR_STOP=1 -d mydb -f sql/schema.sql
-- Plain SQL only, valid on PostgreSQL 9.5 and later. Running it again on a live
-- database changes nothing and loses no data; running it on a database that has
-- the seed's original `jobs` and `queue` tables upgrades them in place.
-- =============================================================================


-- Re-running this script on a live queue must never stall it: every object is
-- looked up in the catalog before anything takes a lock, and a lock that must be
-- waited for (an application transaction holding jobs) is waited for 5 s at most;
-- the script then stops with "canceling statement due to lock timeout": run it
-- again later. Nothing is half done (each part is one transaction).
SET lock_timeout = '5s';

-- =============================================================================
-- Tables
-- =============================================================================

-- jobs: every mail ever asked for, finished ones included, for reports and review.
-- The seed's columns come first, unchanged; the seed's example still works:
--   INSERT INTO jobs(email, content_message) VALUES ('someone@example.com', 'test queue');
CREATE TABLE IF NOT EXISTS jobs (
  job_id SERIAL PRIMARY KEY,
  status VARCHAR DEFAULT 'available',
  start_time TIMESTAMP DEFAULT NULL,    -- when the job was (last) put into the queue
  end_time TIMESTAMP DEFAULT NULL,      -- when the job was sent, or given up on
  email VARCHAR,                        -- the recipient's address
  content_message VARCHAR               -- the message body (plain text)
);

-- attachments: files sent with a job; a row with content_id is an inline part
-- (referenced from the HTML as cid:...), the others are attachments. Insert a job
-- and its attachments in one transaction, so that no consumer sees one without the other.
CREATE TABLE IF NOT EXISTS attachments (
  attachment_id SERIAL PRIMARY KEY,
  job_id INTEGER NOT NULL REFERENCES jobs ON DELETE CASCADE,
  filename VARCHAR NOT NULL,
  content_type VARCHAR NOT NULL DEFAULT 'application/octet-stream',
  content BYTEA NOT NULL,
  content_id VARCHAR
);

-- queue: the jobs waiting for a consumer. A row lives from the moment the producer
-- queues a job until a consumer has recorded the job's outcome.
CREATE TABLE IF NOT EXISTS queue (
  queue_id SERIAL PRIMARY KEY,
  job_id INTEGER
);

-- consumers: one row per running consumer process, kept alive by its heartbeat.
-- A queue row it has claimed names it (queue.claimed_by). If its heartbeat stops
-- for longer than its lease (a crash), any consumer deletes the row, and the
-- foreign key frees its claims for others.
CREATE TABLE IF NOT EXISTS consumers (
  consumer_id SERIAL PRIMARY KEY,
  name VARCHAR NOT NULL,                -- host and process id, for people
  lease_seconds REAL NOT NULL,          -- its claims outlive its last heartbeat by this long
  started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- send_rate: the token bucket behind queue.rate_limit, shared by every consumer
-- of the database on any host: a claim takes a token per mail.
CREATE TABLE IF NOT EXISTS send_rate (
  bucket VARCHAR PRIMARY KEY,
  tokens DOUBLE PRECISION NOT NULL DEFAULT 0,   -- mails that may be claimed now
  refreshed_at TIMESTAMPTZ NOT NULL DEFAULT now()  -- when tokens was last brought up to date
);
INSERT INTO send_rate (bucket)
SELECT 'default' WHERE NOT EXISTS (SELECT 1 FROM send_rate WHERE bucket = 'default');

-- deliveries: one row per send attempt, written in the same transaction as the
-- job's outcome, so that the two never disagree (the attempt log of reports).
CREATE TABLE IF NOT EXISTS deliveries (
  delivery_id BIGSERIAL PRIMARY KEY,
  job_id INTEGER NOT NULL REFERENCES jobs ON DELETE CASCADE,
  attempt INTEGER NOT NULL,             -- 1, 2, ...: the job's attempts after this one
  started_at TIMESTAMPTZ,               -- when the consumer began this attempt
  finished_at TIMESTAMPTZ,              -- when its outcome was known
  outcome VARCHAR NOT NULL,             -- sent, failed (retried later) or dead
  smtp_code INTEGER,                    -- the server's reply code (250 when sent); NULL when none
  detail TEXT                           -- as readable as jobs.last_error
);

-- Columns a real mail queue needs beyond the seed's. Added one by one so that a
-- database created from the seed's CREATE TABLE is upgraded in place.
DO $$
DECLARE
  col RECORD;
BEGIN
  FOR col IN SELECT * FROM (VALUES
    -- the subject line; NULL means the configured default subject
    ('jobs', 'subject',    'VARCHAR'),
    -- how many times a send was attempted
    ('jobs', 'attempts',   'INTEGER NOT NULL DEFAULT 0'),
    -- why the last attempt failed, readable by people (NULL after a success)
    ('jobs', 'last_error', 'TEXT'),
    -- not before: the producer queues the job only once this time has come
    -- (set in the future to schedule a mail; set by the consumer for a retry)
    ('jobs', 'run_at',     'TIMESTAMPTZ NOT NULL DEFAULT now()'),
    -- when the job was inserted; also makes each job's Message-ID unique
    ('jobs', 'created_at', 'TIMESTAMPTZ NOT NULL DEFAULT now()'),
    -- the HTML body; with content_message the mail is multipart/alternative
    ('jobs', 'html_message', 'TEXT'),
    -- this job's From and envelope sender; NULL means the configured smtp.sender
    ('jobs', 'sender', 'VARCHAR'),
    -- one address for Reply-To
    ('jobs', 'reply_to', 'VARCHAR'),
    -- more recipients: Cc is a header; Bcc addresses go in the envelope only
    ('jobs', 'cc', 'TEXT[]'),
    ('jobs', 'bcc', 'TEXT[]'),
    -- extra headers, a JSON object of strings, e.g. {"List-Unsubscribe": "<https://...>"}
    ('jobs', 'headers', 'JSONB'),
    -- larger goes first, in the producer's move and in the consumer's claim
    ('jobs', 'priority', 'INTEGER NOT NULL DEFAULT 0'),
    -- not sent after this: the job becomes dead, and spends no attempt
    ('jobs', 'expires_at', 'TIMESTAMPTZ'),
    -- the application's key: INSERT ... ON CONFLICT (idempotency_key) DO NOTHING
    ('jobs', 'idempotency_key', 'VARCHAR'),
    -- what to do when the content went out and no final reply came (the server
    -- may have the mail): 'retry' (send it again: a duplicate is possible) or
    -- 'hold' (the job ends 'uncertain' and is never sent again by itself)
    ('jobs', 'on_uncertain', 'VARCHAR NOT NULL DEFAULT ''retry'''),
    -- the envelope recipients that still wait for their answer, after a
    -- transaction in which the server accepted some and refused others for now;
    -- NULL: every recipient of the job (nothing was delivered yet)
    ('jobs', 'pending_recipients', 'TEXT[]'),
    -- times in a row the job was put back without spending an attempt (the relay
    -- throttled, or a recipient was refused for now); past queue.max_deferrals,
    -- or queue.max_defer_time after deferred_since, the next one spends an attempt
    ('jobs', 'deferrals', 'INTEGER NOT NULL DEFAULT 0'),
    ('jobs', 'deferred_since', 'TIMESTAMPTZ'),
    -- the consumer whose claim the row is under; NULL: waiting for one
    ('queue', 'claimed_by', 'INTEGER'),
    -- when that claim was made
    ('queue', 'claimed_at', 'TIMESTAMPTZ'),
    -- the job's priority, copied when it is queued: larger is claimed first
    ('queue', 'priority', 'INTEGER NOT NULL DEFAULT 0')
  ) AS wanted(tbl, name, definition)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = col.tbl::regclass AND attname = col.name
                     AND NOT attisdropped) THEN
      EXECUTE format('ALTER TABLE %I ADD COLUMN %I %s', col.tbl, col.name, col.definition);
    END IF;
  END LOOP;
END
$$;


-- =============================================================================
-- Invariants (named CHECK constraints)
-- =============================================================================
-- The statuses, as people read them in pgAdmin:
--   available  ready to be queued (the seed's default for a new job)
--   queued     in the queue table, waiting for or being sent by a consumer
--   completed  the SMTP server accepted the mail (for every recipient that can have it)
--   failed     waiting to be tried again at run_at: the last attempt failed for a
--              reason that may pass, or a recipient was refused for now (deferred)
--   dead       given up: permanent rejection, bad input, or attempts exhausted
--   uncertain  the content went out and no final reply came, and the job says
--              on_uncertain = 'hold': never sent again by itself (requeue sends it)
--   suppressed never sent: its address is on the suppression list
--   bounced    sent, then a delivery status notification said it failed for good
-- A constraint is added NOT VALID first, so that existing rows never stop the
-- script; it is then validated, and a warning names the problem if that fails.
-- A constraint whose definition grew (new statuses) is dropped first and added again.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_constraint
              WHERE conrelid = 'jobs'::regclass AND conname = 'jobs_status_known'
                AND pg_get_constraintdef(oid) NOT LIKE '%bounced%') THEN
    ALTER TABLE jobs DROP CONSTRAINT jobs_status_known;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_constraint
              WHERE conrelid = 'deliveries'::regclass AND conname = 'deliveries_outcome_known'
                AND pg_get_constraintdef(oid) NOT LIKE '%deferred%') THEN
    ALTER TABLE deliveries DROP CONSTRAINT deliveries_outcome_known;
  END IF;
END
$$;
DO $$
DECLARE
  con RECORD;
BEGIN
  FOR con IN SELECT * FROM (VALUES
    -- a job is always in one of the eight statuses above
    ('jobs', 'jobs_status_known',
     'CHECK (status IS NOT NULL AND status IN (''available'', ''queued'', ''completed'', ''failed'', ''dead'', ''uncertain'', ''suppressed'', ''bounced''))'),
    -- attempts only ever count up from zero
    ('jobs', 'jobs_attempts_not_negative', 'CHECK (attempts >= 0)'),
    -- deferrals only ever count up from zero (and back to zero)
    ('jobs', 'jobs_deferrals_not_negative', 'CHECK (deferrals >= 0)'),
    -- what to do with an outcome that is not known: send again, or hold
    ('jobs', 'jobs_on_uncertain_known', 'CHECK (on_uncertain IN (''retry'', ''hold''))'),
    -- a delivery's outcome: sent, failed (an attempt spent, retried later), dead
    -- (given up), deferred (put back without spending an attempt: the relay
    -- throttled, or a recipient was refused for now), uncertain (no final reply;
    -- the job holds), suppressed (an address dropped by the suppression list)
    ('deliveries', 'deliveries_outcome_known',
     'CHECK (outcome IN (''sent'', ''failed'', ''dead'', ''deferred'', ''uncertain'', ''suppressed''))'),
    -- a queue row always names a job
    ('queue', 'queue_job_id_present', 'CHECK (job_id IS NOT NULL)'),
    -- a queue row names a job that exists; deleting a job removes it from the queue
    ('queue', 'queue_job_id_fkey',
     'FOREIGN KEY (job_id) REFERENCES jobs (job_id) ON DELETE CASCADE'),
    -- a claim names a live consumer; deleting a consumer (gone, or its lease run
    -- out) frees its claims
    ('queue', 'queue_claimed_by_fkey',
     'FOREIGN KEY (claimed_by) REFERENCES consumers (consumer_id) ON DELETE SET NULL')
  ) AS wanted(tbl, name, definition)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = con.tbl::regclass AND conname = con.name) THEN
      EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s NOT VALID',
                     con.tbl, con.name, con.definition);
      BEGIN
        EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', con.tbl, con.name);
      EXCEPTION WHEN check_violation OR foreign_key_violation THEN
        RAISE WARNING 'existing rows of % break constraint %; new rows are checked, fix the old ones and run this script again',
          con.tbl, con.name;
      END;
    END IF;
  END LOOP;
END
$$;

-- One queue row per job at most, so that no job can be sent by two consumers at
-- once. Duplicates left by hand-written inserts are removed first (the oldest row
-- of each job stays), because the unique index cannot be built over them.
DO $$
BEGIN
  IF to_regclass('queue_job_id_key') IS NULL THEN
    DELETE FROM queue dup USING queue keep
     WHERE dup.job_id = keep.job_id AND dup.queue_id > keep.queue_id;
    CREATE UNIQUE INDEX queue_job_id_key ON queue (job_id);
  END IF;
END
$$;

-- One job per idempotency_key, so that an application's retried
--   INSERT ... ON CONFLICT (idempotency_key) DO NOTHING
-- queues its mail once. A plain (not partial) unique index: ON CONFLICT names it
-- by its column alone, and the many jobs without a key (NULL) never conflict.
-- Jobs are never deleted here: if rows inserted before this index share a key,
-- a warning names the key and the index waits for them to be fixed.
DO $$
DECLARE
  twice VARCHAR;
BEGIN
  IF to_regclass('jobs_idempotency_key_key') IS NULL THEN
    SELECT idempotency_key INTO twice FROM jobs WHERE idempotency_key IS NOT NULL
     GROUP BY idempotency_key HAVING count(*) > 1 LIMIT 1;
    IF FOUND THEN
      RAISE WARNING 'jobs share idempotency_key %: give them distinct keys (or NULL) and run this script again', twice;
    ELSE
      CREATE UNIQUE INDEX jobs_idempotency_key_key ON jobs (idempotency_key);
    END IF;
  END IF;
END
$$;


-- =============================================================================
-- Indexes
-- =============================================================================

-- Each index is created only if the catalog lacks it: CREATE INDEX IF NOT EXISTS
-- would take a SHARE lock on its table (and stall every writer behind it) even
-- when the index is there.
DO $$
DECLARE
  idx RECORD;
BEGIN
  FOR idx IN SELECT * FROM (VALUES
    -- The producer's search for ready work, highest priority first: only
    -- available and failed jobs are in it, so it never scans the history of
    -- completed and dead jobs.
    ('jobs_ready_by_priority_idx',
     'ON jobs (priority DESC, run_at, job_id) WHERE status IN (''available'', ''failed'')'),
    -- The producer's sweep for queued jobs that lost their queue row (an admin's
    -- TRUNCATE queue): only queued jobs are in it.
    ('jobs_queued_idx', 'ON jobs (job_id) WHERE status = ''queued'''),
    -- The consumers' claim: only rows no consumer holds are in it, in the order
    -- they are claimed.
    ('queue_waiting_idx', 'ON queue (priority DESC, queue_id) WHERE claimed_by IS NULL'),
    -- A consumer's own claims (its heartbeat, and freeing them when it goes): only
    -- claimed rows are in it.
    ('queue_claimed_by_idx', 'ON queue (claimed_by) WHERE claimed_by IS NOT NULL'),
    -- The files of a job: the claim's has_attachments, attachments_of, and the
    -- cascade when a job is deleted.
    ('attachments_job_id_idx', 'ON attachments (job_id)')
  ) AS wanted(name, definition)
  LOOP
    IF to_regclass(idx.name) IS NULL THEN
      EXECUTE format('CREATE INDEX %I %s', idx.name, idx.definition);
    END IF;
  END LOOP;
  -- Replaced by jobs_ready_by_priority_idx (the order now starts with priority).
  IF to_regclass('jobs_ready_idx') IS NOT NULL THEN
    DROP INDEX jobs_ready_idx;
  END IF;
END
$$;


-- =============================================================================
-- Notifications (doorbells: the payload is always empty, so Postgres collapses
-- duplicates within a transaction and no personal data is ever broadcast)
-- =============================================================================

-- Rings the channel named by the trigger's argument.
CREATE OR REPLACE FUNCTION mailqueue_ring() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
  PERFORM pg_notify(TG_ARGV[0], '');
  RETURN NULL;
END
$$;

DO $$
BEGIN
  -- New jobs: wakes the producer. One notification per statement, not per row.
  IF NOT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = 'jobs'::regclass AND tgname = 'jobs_ring_producer') THEN
    CREATE TRIGGER jobs_ring_producer
      AFTER INSERT ON jobs
      FOR EACH STATEMENT EXECUTE PROCEDURE mailqueue_ring('mailqueue_jobs');
  END IF;
  -- A job put back to available by hand (e.g. a dead one retried): wakes the producer.
  IF NOT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = 'jobs'::regclass AND tgname = 'jobs_ring_producer_on_retry') THEN
    CREATE TRIGGER jobs_ring_producer_on_retry
      AFTER UPDATE OF status ON jobs
      FOR EACH ROW WHEN (NEW.status = 'available' AND OLD.status IS DISTINCT FROM 'available')
      EXECUTE PROCEDURE mailqueue_ring('mailqueue_jobs');
  END IF;
  -- Rows entering the queue: wakes the consumers. One notification per statement.
  IF NOT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = 'queue'::regclass AND tgname = 'queue_ring_consumers') THEN
    CREATE TRIGGER queue_ring_consumers
      AFTER INSERT ON queue
      FOR EACH STATEMENT EXECUTE PROCEDURE mailqueue_ring('mailqueue_queue');
  END IF;
END
$$;


-- =============================================================================
-- Operating the queue: indexes and views for reports, the dashboard and prune
-- (python -m mailqueue report | dashboard | prune | requeue; issue 13)
-- =============================================================================

-- Created only if the catalog lacks them, as above.
DO $$
DECLARE
  idx RECORD;
BEGIN
  FOR idx IN SELECT * FROM (VALUES
    -- Finished jobs by when they finished: the counts of completed and dead jobs,
    -- the lag (end_time - start_time) over a window and prune's search, all
    -- read from the index alone (start_time is in it). Only finished jobs are in
    -- it, so a job gets one entry, when it finishes, and the write path pays
    -- nothing before that.
    ('jobs_finished_idx',
     'ON jobs (status, end_time, start_time) WHERE status IN (''completed'', ''dead'')'),
    -- The attempts of one job: deleting a job (prune, a cancel) deletes its
    -- deliveries through the foreign key, which would otherwise scan them all.
    ('deliveries_job_id_idx', 'ON deliveries (job_id)'),
    -- Attempts by when they ended: per-minute sent and failed, the latest
    -- failures, the per-outcome counts of /metrics, over a window.
    ('deliveries_finished_idx', 'ON deliveries (finished_at, outcome)'),
    -- The other finished statuses (uncertain, suppressed, bounced): their counts
    -- and prune's search, without scanning the history of completed jobs.
    ('jobs_other_finished_idx',
     'ON jobs (status, end_time) WHERE status IN (''uncertain'', ''suppressed'', ''bounced'')')
    -- (attachments_job_id_idx, above, serves prune's deletes of attachments.)
  ) AS wanted(name, definition)
  LOOP
    IF to_regclass(idx.name) IS NULL THEN
      EXECUTE format('CREATE INDEX %I %s', idx.name, idx.definition);
    END IF;
  END LOOP;
END
$$;

-- The views pgAdmin users open instead of writing SQL. Each is (re)created only
-- when it is missing or its comment, which carries its version, differs: running
-- the script again takes no lock on a view that is already right.
DO $$
DECLARE
  v RECORD;
BEGIN
  FOR v IN SELECT * FROM (VALUES
    ('mailqueue_status_counts',
     'How many jobs are in each of the eight statuses, zeros included (mailqueue view v2)',
     -- One count per status, each written out so that it reads a partial index
     -- (available and failed: jobs_ready_by_priority_idx; queued: jobs_queued_idx;
     -- completed and dead: jobs_finished_idx; the others: jobs_other_finished_idx)
     -- instead of scanning the history.
     $v$
SELECT 'available'::varchar AS status,
       (SELECT count(*) FROM jobs WHERE status = 'available') AS jobs
UNION ALL
SELECT 'queued', (SELECT count(*) FROM jobs WHERE status = 'queued')
UNION ALL
SELECT 'completed', (SELECT count(*) FROM jobs WHERE status = 'completed')
UNION ALL
SELECT 'failed', (SELECT count(*) FROM jobs WHERE status = 'failed')
UNION ALL
SELECT 'dead', (SELECT count(*) FROM jobs WHERE status = 'dead')
UNION ALL
SELECT 'uncertain', (SELECT count(*) FROM jobs WHERE status = 'uncertain')
UNION ALL
SELECT 'suppressed', (SELECT count(*) FROM jobs WHERE status = 'suppressed')
UNION ALL
SELECT 'bounced', (SELECT count(*) FROM jobs WHERE status = 'bounced')
$v$),
    ('mailqueue_per_minute',
     'Each minute of the last hour: mails sent, attempts failed (failed or dead) and the lag p50/p95 in seconds (mailqueue view v2)',
     -- sent and the lag (end_time - start_time, the seed''s measure) from the jobs
     -- that finished in that minute; failed from the attempts logged in deliveries.
     $v$
WITH minutes AS (
  SELECT generate_series(date_trunc('minute', now()) - interval '59 minutes',
                         date_trunc('minute', now()), interval '1 minute') AS minute
), finished AS (
  -- one range of jobs_finished_idx per status (see ops_finished_since)
  SELECT date_trunc('minute', end_time)::timestamptz AS minute,
         count(*) FILTER (WHERE status = 'completed') AS sent,
         percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS lag_p50_seconds,
         percentile_cont(0.95) WITHIN GROUP (ORDER BY lag) AS lag_p95_seconds
    FROM (SELECT status, end_time, EXTRACT(EPOCH FROM end_time - start_time) AS lag
            FROM jobs
           WHERE status = 'completed'
             AND end_time >= date_trunc('minute', LOCALTIMESTAMP) - interval '59 minutes'
          UNION ALL
          SELECT status, end_time, EXTRACT(EPOCH FROM end_time - start_time)
            FROM jobs
           WHERE status = 'dead'
             AND end_time >= date_trunc('minute', LOCALTIMESTAMP) - interval '59 minutes')
         AS recent
   GROUP BY 1
), failures AS (
  SELECT date_trunc('minute', finished_at) AS minute, count(*) AS failed
    FROM deliveries
   WHERE finished_at >= date_trunc('minute', now()) - interval '59 minutes'
     AND outcome IN ('failed', 'dead')
   GROUP BY 1
)
SELECT minutes.minute,
       COALESCE(finished.sent, 0) AS sent,
       COALESCE(failures.failed, 0) AS failed,
       finished.lag_p50_seconds,
       finished.lag_p95_seconds
  FROM minutes
  LEFT JOIN finished ON finished.minute = minutes.minute
  LEFT JOIN failures ON failures.minute = minutes.minute
 ORDER BY minutes.minute
$v$)
,
    ('mailqueue_failures',
     'Every failed or dead send attempt, with its reason grouped across recipients (mailqueue view v1)',
     -- reason: the attempt's detail with every address in it replaced by
     -- <...@...> (and a bad address quoted after "email"), so that the same SMTP
     -- reply for different recipients reads the same; the reply code first when
     -- the detail does not carry it.
     $v$
SELECT delivery_id, job_id, attempt, started_at, finished_at, outcome, smtp_code,
       CASE WHEN smtp_code IS NOT NULL AND strpos(COALESCE(detail, ''), smtp_code::text) = 0
            THEN smtp_code || ' ' ELSE '' END
       || regexp_replace(
            regexp_replace(COALESCE(detail, 'no detail recorded'),
                           '[^][:space:]<>(),;:"''[]+@[^][:space:]<>(),;:"''[]+', '...@...', 'g'),
            '^email (''[^'']*''|"[^"]*")', 'email ...') AS reason
  FROM deliveries
 WHERE outcome IN ('failed', 'dead')
$v$)
  ) AS wanted(name, note, definition)
  LOOP
    IF to_regclass(v.name) IS NULL
       OR obj_description(to_regclass(v.name), 'pg_class') IS DISTINCT FROM v.note THEN
      EXECUTE format('CREATE OR REPLACE VIEW %I AS %s', v.name, v.definition);
      EXECUTE format('COMMENT ON VIEW %I IS %L', v.name, v.note);
    END IF;
  END LOOP;
END
$$;


-- =============================================================================
-- Several relays: routes per job, relay health and quotas shared by every
-- consumer (issue 19; docs/relays.md)
-- =============================================================================

-- relays: the health of each relay named in the configuration, shared by every
-- consumer of the database, so that one consumer's failure spares the others the
-- same timeout. A row is made for each relay when a consumer starts.
--   up         down_until IS NULL
--   down       down_until IS NOT NULL: left alone until down_until; after it, one
--              consumer at a time may try it (probe_until: that try's deadline),
--              and the others see it down until the try marks it up or down again.
CREATE TABLE IF NOT EXISTS relays (
  name VARCHAR PRIMARY KEY,             -- as in the configuration's relays object
  down_until TIMESTAMPTZ,               -- NULL: up
  last_error TEXT,                      -- why it was last marked down (kept once up again)
  probe_until TIMESTAMPTZ,              -- a consumer is trying it until then
  changed_at TIMESTAMPTZ NOT NULL DEFAULT now()  -- when it last went down or came back up
);

-- relay_usage: the mails each relay was given, one row per relay per hour, for
-- its daily_quota (a rolling 24 hours, counted over at most 25 rows).
CREATE TABLE IF NOT EXISTS relay_usage (
  relay VARCHAR NOT NULL,
  hour TIMESTAMPTZ NOT NULL,            -- date_trunc('hour', ...): the hour they went in
  sent INTEGER NOT NULL DEFAULT 0,      -- mails given to the relay in that hour
  PRIMARY KEY (relay, hour)
);

-- Columns for relays, added as the ones above are.
DO $$
DECLARE
  col RECORD;
BEGIN
  FOR col IN SELECT * FROM (VALUES
    -- the route (configuration: routes) the job goes by; NULL: the route "default"
    ('jobs', 'route', 'VARCHAR'),
    -- the relay this attempt went to; NULL: not known (written before relays)
    ('deliveries', 'relay', 'VARCHAR')
  ) AS wanted(tbl, name, definition)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = col.tbl::regclass AND attname = col.name
                     AND NOT attisdropped) THEN
      EXECUTE format('ALTER TABLE %I ADD COLUMN %I %s', col.tbl, col.name, col.definition);
    END IF;
  END LOOP;
END
$$;

-- Their invariants, added NOT VALID then validated, as above.
DO $$
DECLARE
  con RECORD;
BEGIN
  FOR con IN SELECT * FROM (VALUES
    -- a probe is only ever held on a relay that is down
    ('relays', 'relays_probe_only_when_down',
     'CHECK (probe_until IS NULL OR down_until IS NOT NULL)'),
    -- mails given back never take an hour below zero
    ('relay_usage', 'relay_usage_sent_not_negative', 'CHECK (sent >= 0)')
  ) AS wanted(tbl, name, definition)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = con.tbl::regclass AND conname = con.name) THEN
      EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s NOT VALID',
                     con.tbl, con.name, con.definition);
      BEGIN
        EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', con.tbl, con.name);
      EXCEPTION WHEN check_violation OR foreign_key_violation THEN
        RAISE WARNING 'existing rows of % break constraint %; new rows are checked, fix the old ones and run this script again',
          con.tbl, con.name;
      END;
    END IF;
  END LOOP;
END
$$;


-- =============================================================================
-- After the 250: the suppression list, bounces and complaints read back,
-- one-click unsubscribe (issue 20; docs/suppressions.md)
-- =============================================================================

-- suppressions: one row per address that must not be mailed. pgAdmin users add
-- and remove rows by hand (email is the primary key, so rows can be edited);
-- the address is stored trimmed and lower-cased by the trigger below, whoever
-- writes it. A row whose expires_at has passed no longer suppresses anything.
CREATE TABLE IF NOT EXISTS suppressions (
  email VARCHAR PRIMARY KEY,            -- the address, lower-cased
  reason VARCHAR NOT NULL DEFAULT 'manual',  -- hard_bounce, complaint, unsubscribe or manual
  source VARCHAR NOT NULL DEFAULT 'manual',  -- smtp, dsn, arf, link, cli, manual (pgAdmin) ...
  job_id INTEGER,                       -- the job that caused it; NULL for manual rows
  detail TEXT,                          -- the server's (or the person's) words
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  expires_at TIMESTAMPTZ                -- NULL: never
);

-- mail_events: what came back after the 250, one row per report and recipient:
-- DSNs read from the bounce mailbox (kind failed, delayed, delivered, relayed,
-- expanded), ARF complaints (complaint), and 5.1.x refusals at RCPT (rejected).
-- The unique (message_key, recipient) makes reading a mailbox twice change
-- nothing: the event and its effects are written in one statement.
CREATE TABLE IF NOT EXISTS mail_events (
  event_id BIGSERIAL PRIMARY KEY,
  message_key VARCHAR NOT NULL,         -- sha256 of the report's bytes; smtp:JOB for RCPT
  recipient VARCHAR NOT NULL DEFAULT '',  -- the address the report is about, lower-cased
  kind VARCHAR NOT NULL,                -- failed, delayed, delivered, relayed, expanded, complaint, rejected
  status VARCHAR,                       -- the enhanced status code, e.g. 5.1.1
  source VARCHAR NOT NULL,              -- dsn, arf or smtp
  job_id INTEGER,                       -- the job it is about, when found
  detail TEXT,                          -- Diagnostic-Code, Feedback-Type ...
  received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The jobs' own switches (NULL-free, default off: the seed's INSERT is unchanged).
DO $$
DECLARE
  col RECORD;
BEGIN
  FOR col IN SELECT * FROM (VALUES
    -- add List-Unsubscribe and List-Unsubscribe-Post (RFC 8058) with a signed link
    ('jobs', 'unsubscribe', 'BOOLEAN NOT NULL DEFAULT false'),
    -- send even if the address is suppressed (a password reset to a complainer)
    ('jobs', 'ignore_suppression', 'BOOLEAN NOT NULL DEFAULT false')
  ) AS wanted(tbl, name, definition)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = col.tbl::regclass AND attname = col.name
                     AND NOT attisdropped) THEN
      EXECUTE format('ALTER TABLE %I ADD COLUMN %I %s', col.tbl, col.name, col.definition);
    END IF;
  END LOOP;
END
$$;

-- Named constraints, added NOT VALID then validated, as above.
DO $$
DECLARE
  con RECORD;
BEGIN
  FOR con IN SELECT * FROM (VALUES
    ('suppressions', 'suppressions_reason_known',
     'CHECK (reason IN (''hard_bounce'', ''complaint'', ''unsubscribe'', ''manual''))'),
    -- deleting a job keeps the suppression it caused, without its job
    ('suppressions', 'suppressions_job_id_fkey',
     'FOREIGN KEY (job_id) REFERENCES jobs (job_id) ON DELETE SET NULL'),
    ('mail_events', 'mail_events_kind_known',
     'CHECK (kind IN (''failed'', ''delayed'', ''delivered'', ''relayed'', ''expanded'', ''complaint'', ''rejected''))'),
    ('mail_events', 'mail_events_job_id_fkey',
     'FOREIGN KEY (job_id) REFERENCES jobs (job_id) ON DELETE SET NULL')
  ) AS wanted(tbl, name, definition)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = con.tbl::regclass AND conname = con.name) THEN
      EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s NOT VALID',
                     con.tbl, con.name, con.definition);
      BEGIN
        EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', con.tbl, con.name);
      EXCEPTION WHEN check_violation OR foreign_key_violation THEN
        RAISE WARNING 'existing rows of % break constraint %; new rows are checked, fix the old ones and run this script again',
          con.tbl, con.name;
      END;
    END IF;
  END LOOP;
END
$$;

-- Addresses are compared lower-cased: a row typed in pgAdmin as
-- ' Someone@Example.COM' is stored as 'someone@example.com'.
CREATE OR REPLACE FUNCTION mailqueue_suppressions_lower() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
  NEW.email := lower(btrim(NEW.email));
  RETURN NEW;
END
$$;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = 'suppressions'::regclass
                   AND tgname = 'suppressions_lower_email') THEN
    CREATE TRIGGER suppressions_lower_email
      BEFORE INSERT OR UPDATE OF email ON suppressions
      FOR EACH ROW EXECUTE PROCEDURE mailqueue_suppressions_lower();
  END IF;
END
$$;

-- Indexes, created only if the catalog lacks them (as above).
DO $$
DECLARE
  idx RECORD;
BEGIN
  FOR idx IN SELECT * FROM (VALUES
    -- Reading a mailbox twice records each report once (the ON CONFLICT target).
    ('mail_events_message_key', 'UNIQUE INDEX %I ON mail_events (message_key, recipient)'),
    -- Rates over a window: events by when they came, per kind.
    ('mail_events_received_idx', 'INDEX %I ON mail_events (received_at, kind)'),
    -- The dashboard's latest suppressions, and the counts by reason.
    ('suppressions_created_idx', 'INDEX %I ON suppressions (created_at)'),
    -- The jobs a DSN or a complaint may name (deleting a job sets them NULL).
    ('mail_events_job_id_idx', 'INDEX %I ON mail_events (job_id) WHERE job_id IS NOT NULL'),
    -- Partial: only the rows that name a job (manual ones do not), for the
    -- foreign key's SET NULL when a job is deleted.
    ('suppressions_job_id_idx', 'INDEX %I ON suppressions (job_id) WHERE job_id IS NOT NULL')
    -- (jobs_other_finished_idx, above, serves the counts of suppressed and
    -- bounced jobs and the bounced ones of the rates.)
  ) AS wanted(name, definition)
  LOOP
    IF to_regclass(idx.name) IS NULL THEN
      EXECUTE format('CREATE ' || idx.definition, idx.name);
    END IF;
  END LOOP;
END
$$;


-- =============================================================================
-- Mail in from Python: stored templates (issue 21; mailqueue.enqueue, the
-- producer renders them: mailqueue/templates.py, docs/templates.md)
-- =============================================================================

-- templates: a mail's subject, text and HTML as Jinja2 templates, one row per
-- name and locale ('' is the default locale, used when no other matches).
--   INSERT INTO templates (name, locale, subject, text)
--   VALUES ('welcome', '', 'Welcome, {{ name }}', 'Hello {{ name }}!');
CREATE TABLE IF NOT EXISTS templates (
  template_id SERIAL PRIMARY KEY,
  name VARCHAR NOT NULL,
  locale VARCHAR NOT NULL DEFAULT '',   -- 'vi-VN', 'vi', ... or '' for the default
  subject TEXT,                         -- NULL: the job's own subject (or the default)
  text TEXT,                            -- the plain-text part; NULL: the job's content_message
  html TEXT,                            -- the HTML part (escaped by default); NULL: none
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()  -- set again by every UPDATE (trigger below)
);

-- A job asks for a template by name; the producer renders it (once) into the
-- job's subject, content_message and html_message before queueing it.
DO $$
DECLARE
  col RECORD;
BEGIN
  FOR col IN SELECT * FROM (VALUES
    -- the template's name (templates.name); NULL: the job's columns are the mail
    ('jobs', 'template', 'VARCHAR'),
    -- the template's variables, a JSON object, e.g. {"name": "Lan"}
    ('jobs', 'context', 'JSONB'),
    -- the wanted locale, e.g. 'vi-VN' (then 'vi', then ''); NULL means ''
    ('jobs', 'locale', 'VARCHAR'),
    -- when the template was rendered into the job's columns; NULL: not yet
    ('jobs', 'rendered_at', 'TIMESTAMPTZ')
  ) AS wanted(tbl, name, definition)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = col.tbl::regclass AND attname = col.name
                     AND NOT attisdropped) THEN
      EXECUTE format('ALTER TABLE %I ADD COLUMN %I %s', col.tbl, col.name, col.definition);
    END IF;
  END LOOP;
END
$$;

DO $$
DECLARE
  con RECORD;
BEGIN
  FOR con IN SELECT * FROM (VALUES
    -- a job's context is a JSON object (or NULL): the template's variables by name
    ('jobs', 'jobs_context_is_object',
     'CHECK (context IS NULL OR jsonb_typeof(context) = ''object'')'),
    -- a template has a name, and at least one part to render
    ('templates', 'templates_name_present', 'CHECK (name <> '''')'),
    ('templates', 'templates_has_a_part',
     'CHECK (subject IS NOT NULL OR text IS NOT NULL OR html IS NOT NULL)')
  ) AS wanted(tbl, name, definition)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = con.tbl::regclass AND conname = con.name) THEN
      EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s NOT VALID',
                     con.tbl, con.name, con.definition);
      BEGIN
        EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', con.tbl, con.name);
      EXCEPTION WHEN check_violation THEN
        RAISE WARNING 'existing rows of % break constraint %; new rows are checked, fix the old ones and run this script again',
          con.tbl, con.name;
      END;
    END IF;
  END LOOP;
END
$$;

DO $$
DECLARE
  idx RECORD;
BEGIN
  FOR idx IN SELECT * FROM (VALUES
    -- One template per name and locale: a job's (name, locale) finds one row.
    -- Unique and plain, so that INSERT ... ON CONFLICT (name, locale) DO UPDATE
    -- can name it.
    ('templates_name_locale_key', 'UNIQUE INDEX', 'ON templates (name, locale)'),
    -- The producer's search for jobs to render: only jobs that wait for their
    -- template are in it (a job leaves it once rendered, or dead), so it stays
    -- tiny however long the history is.
    ('jobs_to_render_idx', 'INDEX',
     'ON jobs (priority DESC, run_at, job_id) WHERE template IS NOT NULL AND rendered_at IS NULL AND status IN (''available'', ''failed'')')
  ) AS wanted(name, kind, definition)
  LOOP
    IF to_regclass(idx.name) IS NULL THEN
      EXECUTE format('CREATE %s %I %s', idx.kind, idx.name, idx.definition);
    END IF;
  END LOOP;
END
$$;

-- An edited template gets a new updated_at, which is how the producer's cache of
-- compiled templates learns of the edit (clock_timestamp: two edits in one
-- transaction still differ).
CREATE OR REPLACE FUNCTION mailqueue_template_touched() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
  NEW.updated_at := clock_timestamp();
  RETURN NEW;
END
$$;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger
                 WHERE tgrelid = 'templates'::regclass AND tgname = 'templates_touch') THEN
    CREATE TRIGGER templates_touch
      BEFORE UPDATE ON templates
      FOR EACH ROW EXECUTE PROCEDURE mailqueue_template_touched();
  END IF;
END
$$;
