-- Every query the producer and the consumer run, each under a `-- name --` header,
-- one statement each, with %(name)s parameters. Loaded by mailqueue/db.py (load_queries).
-- Every one runs on its own in autocommit: no transaction is ever left open while
-- a script waits on anything else.

-- =============================================================================
-- Producer
-- =============================================================================

-- move_ready_jobs --
-- Move up to %(limit)s ready jobs (available, or failed and due for a retry, and
-- rendered if they have a template) into
-- the queue, highest priority first, then oldest. SKIP LOCKED lets several
-- producers run at once without waiting on each other, and each job is moved
-- exactly once: its status leaves the ready set in the same statement. A job whose
-- old queue row is still there (a consumer is recording its outcome) waits for the
-- next sweep.
WITH ready AS (
  SELECT job_id
    FROM jobs
   WHERE status IN ('available', 'failed')
     AND run_at <= now()
     AND NOT EXISTS (SELECT 1 FROM queue WHERE queue.job_id = jobs.job_id)
     -- a job with a template goes once it is rendered (render_take_jobs)
     AND (template IS NULL OR rendered_at IS NOT NULL)
   ORDER BY priority DESC, run_at, job_id
   LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED
), moved AS (
  UPDATE jobs
     SET status = 'queued', start_time = now(), end_time = NULL
    FROM ready
   WHERE jobs.job_id = ready.job_id
  RETURNING jobs.job_id, jobs.priority
)
INSERT INTO queue (job_id, priority)
SELECT job_id, priority FROM moved ORDER BY priority DESC, job_id;

-- requeue_stranded_jobs --
-- The queue heals: a job that is 'queued' but has no queue row (an admin's
-- TRUNCATE queue, a row deleted by hand) would never be sent; give it a row again.
-- Safe beside everything else: a job becomes queued together with its queue row,
-- and its row goes together with its outcome, each in one statement.
INSERT INTO queue (job_id, priority)
SELECT job_id, priority
  FROM jobs
 WHERE status = 'queued'
   AND NOT EXISTS (SELECT 1 FROM queue WHERE queue.job_id = jobs.job_id)
ON CONFLICT (job_id) DO NOTHING;

-- =============================================================================
-- Consumer: claims, under a lease kept alive by a heartbeat
-- =============================================================================

-- register_consumer --
-- A consumer process starts: its row names its claims, and its heartbeat keeps
-- them. %(lease)s seconds after its last heartbeat, anyone may free them.
INSERT INTO consumers (name, lease_seconds)
VALUES (%(label)s, %(lease)s)
RETURNING consumer_id;

-- heartbeat --
-- Every few seconds, on the recording connection: keep this consumer's claims,
-- and learn which of the rows it holds (%(held)s) are no longer its own: the job
-- was deleted (cancelled) or its status changed by hand, the queue was truncated,
-- or the lease ran out and someone freed them. `alive` is false when the consumer's
-- row itself is gone: then none of its claims holds.
WITH beat AS (
  UPDATE consumers SET heartbeat_at = now()
   WHERE consumer_id = %(consumer)s
  RETURNING consumer_id
)
SELECT EXISTS (SELECT 1 FROM beat) AS alive,
       ARRAY(SELECT held.queue_id
               FROM unnest(%(held)s::int[]) AS held(queue_id)
              WHERE NOT EXISTS (SELECT 1
                                  FROM queue JOIN jobs ON jobs.job_id = queue.job_id
                                 WHERE queue.queue_id = held.queue_id
                                   AND queue.claimed_by = %(consumer)s
                                   AND jobs.status = 'queued')) AS lost;

-- free_expired_claims --
-- Any consumer, at every poll: forget consumers whose heartbeat stopped longer
-- than their lease ago (crashed, or cut off). The foreign key frees their claims.
DELETE FROM consumers
 WHERE heartbeat_at < now() - lease_seconds * interval '1 second';

-- retire_consumer --
-- A consumer stops (or its supervisor saw it die): every claim it still holds is
-- free at once, for the others to take.
DELETE FROM consumers WHERE consumer_id = %(consumer)s;

-- claim_batch --
-- Take up to %(limit)s queue rows no one holds, highest priority first, then
-- oldest; SKIP LOCKED: consumers never wait for each other and never take the
-- same row. The claim is committed at once, and the job's row comes along. A row
-- whose job is no longer 'queued' is returned too: the consumer drops it unsent.
-- Memory: rows are taken in order while their attachments add up to at most
-- %(budget)s bytes (the rest stay unclaimed, for the next claim or another
-- consumer); with %(alone)s, a first row larger than that is taken alone.
-- Times come as seconds by the database's clock (expires_in, deferred_for), so
-- that a consumer whose own clock is wrong still judges them right.
WITH next AS (
  SELECT queue_id, priority,
         (SELECT COALESCE(sum(octet_length(content)), 0)
            FROM attachments WHERE attachments.job_id = queue.job_id) AS bytes
    FROM queue
   WHERE claimed_by IS NULL
   ORDER BY priority DESC, queue_id
   LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED
), chosen AS (
  SELECT queue_id, bytes
    FROM (SELECT queue_id, bytes,
                 sum(bytes) OVER (ORDER BY priority DESC, queue_id) AS running,
                 row_number() OVER (ORDER BY priority DESC, queue_id) AS place
            FROM next) AS sized
   WHERE running <= %(budget)s OR (place = 1 AND %(alone)s)
)
UPDATE queue
   SET claimed_by = %(consumer)s, claimed_at = now()
  FROM chosen, jobs
 WHERE queue.queue_id = chosen.queue_id AND jobs.job_id = queue.job_id
RETURNING queue.queue_id, chosen.bytes AS attachment_bytes,
          EXTRACT(EPOCH FROM jobs.expires_at - now()) AS expires_in,
          EXTRACT(EPOCH FROM now() - jobs.deferred_since) AS deferred_for,
          (jobs.pending_recipients IS NOT NULL
           AND EXISTS (SELECT 1 FROM deliveries
                        WHERE deliveries.job_id = jobs.job_id AND deliveries.outcome = 'sent'))
            AS delivered_before,
          jobs.*;

-- claim_paced_batch --
-- claim_batch under queue.rate_limit: the one token bucket of the database is
-- locked, brought up to date (%(rate)s tokens a second, at most %(burst)s saved
-- up), and each row claimed takes a token. One row always comes back: its
-- tokens_left tells the consumer how long to wait; the claimed rows, if any, are
-- the ones whose queue_id is not NULL.
WITH bucket AS (
  SELECT clock_timestamp() AS at,
         LEAST(%(burst)s::float8,
               tokens + %(rate)s * EXTRACT(EPOCH FROM clock_timestamp() - refreshed_at))
           AS tokens
    FROM send_rate
   WHERE bucket = 'default'
     FOR UPDATE
), next AS (
  SELECT queue_id, priority,
         (SELECT COALESCE(sum(octet_length(content)), 0)
            FROM attachments WHERE attachments.job_id = queue.job_id) AS bytes
    FROM queue
   WHERE claimed_by IS NULL
   ORDER BY priority DESC, queue_id
   LIMIT (SELECT GREATEST(0, LEAST(%(limit)s, floor(tokens)))::int FROM bucket)
     FOR UPDATE SKIP LOCKED
), chosen AS (
  SELECT queue_id, bytes
    FROM (SELECT queue_id, bytes,
                 sum(bytes) OVER (ORDER BY priority DESC, queue_id) AS running,
                 row_number() OVER (ORDER BY priority DESC, queue_id) AS place
            FROM next) AS sized
   WHERE running <= %(budget)s OR (place = 1 AND %(alone)s)
), claimed AS (
  UPDATE queue
     SET claimed_by = %(consumer)s, claimed_at = now()
    FROM chosen
   WHERE queue.queue_id = chosen.queue_id
  RETURNING queue.queue_id, queue.job_id, chosen.bytes
), spent AS (
  UPDATE send_rate
     SET tokens = bucket.tokens - (SELECT count(*) FROM claimed), refreshed_at = bucket.at
    FROM bucket
   WHERE send_rate.bucket = 'default'
  RETURNING send_rate.tokens
)
SELECT spent.tokens AS tokens_left, claimed.queue_id, claimed.bytes AS attachment_bytes,
       EXTRACT(EPOCH FROM jobs.expires_at - now()) AS expires_in,
       EXTRACT(EPOCH FROM now() - jobs.deferred_since) AS deferred_for,
       (jobs.pending_recipients IS NOT NULL
        AND EXISTS (SELECT 1 FROM deliveries
                     WHERE deliveries.job_id = jobs.job_id AND deliveries.outcome = 'sent'))
         AS delivered_before,
       jobs.*
  FROM spent
  LEFT JOIN claimed ON true
  LEFT JOIN jobs ON jobs.job_id = claimed.job_id;

-- attachments_of --
-- The files of jobs just claimed (those whose attachment_bytes is not 0), read a
-- few jobs at a time so that no one reply holds much more than their bytes.
SELECT job_id, attachment_id, filename, content_type, content, content_id
  FROM attachments
 WHERE job_id = ANY(%(job_ids)s::int[])
 ORDER BY job_id, attachment_id;

-- free_unknown_claims --
-- After a claim whose reply was lost with its connection: it may have been
-- committed, so rows may be claimed for this consumer that it never heard of.
-- Free every claim of this consumer that it does not hold (%(held)s).
UPDATE queue
   SET claimed_by = NULL, claimed_at = NULL
 WHERE claimed_by = %(consumer)s AND queue_id <> ALL(%(held)s::int[]);

-- =============================================================================
-- Consumer: outcomes, many committed together
-- =============================================================================

-- record_outcomes --
-- The outcomes of many mails, in one statement (one commit): the recorder
-- commits every outcome pending at that moment. Each array holds one element per
-- mail; kind is one of (mailqueue/outcomes.py decides which)
--   sent        completed: every recipient has its answer, and one got the mail
--   failed      an attempt spent; tried again in delay seconds
--   deferred    put back for delay seconds without spending an attempt (status failed)
--   released    back to the queue at once; with deferred = 1 it counts as a deferral
--               (the relay throttled), with 0 it was not tried (stopping)
--   dead        given up (attempted: 1 if an attempt was spent, 0 if not)
--   uncertain   no final reply to the content, and the job holds (on_uncertain = 'hold')
--   suppressed  never sent: its address is on the suppression list
--   dropped     the job is no longer queued (finished, cancelled): the row goes if we hold it
-- A job is changed only while it is 'queued', so recording an outcome twice (on a
-- new connection, after the first one's reply was lost) changes nothing the second
-- time, and a job someone else finished is never overwritten. Each SMTP
-- transaction is logged in deliveries (delivery not NULL), in the same statement:
-- the two never disagree. started_at and finished_at are the database's clock.
WITH outcome AS (
  SELECT *
    FROM unnest(%(queue_ids)s::int[], %(job_ids)s::int[], %(kinds)s::text[],
                %(attempted)s::int[], %(deferred)s::int[], %(errors)s::text[],
                %(delays)s::float8[], %(codes)s::int[], %(elapsed)s::float8[],
                %(pending)s::text[], %(deliveries)s::text[], %(relays)s::text[])
         AS o(queue_id, job_id, kind, attempted, deferred, error, delay, smtp_code, elapsed,
              pending, delivery, relay)
), finished AS (
  DELETE FROM queue
   USING outcome
   WHERE queue.queue_id = outcome.queue_id AND outcome.kind <> 'released'
     AND (outcome.kind <> 'dropped' OR queue.claimed_by = %(consumer)s)
     AND queue.queue_id = ANY (%(queue_ids)s::int[])
), released AS (
  UPDATE queue
     SET claimed_by = NULL, claimed_at = NULL
    FROM outcome
   WHERE queue.queue_id = outcome.queue_id AND outcome.kind = 'released'
     AND queue.queue_id = ANY (%(queue_ids)s::int[])
     AND queue.claimed_by = %(consumer)s
), recorded AS (
  UPDATE jobs
     SET status = CASE outcome.kind WHEN 'sent' THEN 'completed'
                                    WHEN 'deferred' THEN 'failed'
                                    WHEN 'released' THEN 'queued'
                                    ELSE outcome.kind END,
         end_time = CASE WHEN outcome.kind IN ('failed', 'deferred', 'released') THEN NULL
                         ELSE now() END,
         attempts = jobs.attempts + outcome.attempted,
         deferrals = CASE WHEN outcome.deferred = 1 THEN jobs.deferrals + 1 ELSE 0 END,
         deferred_since = CASE WHEN outcome.deferred = 1 THEN COALESCE(jobs.deferred_since, now())
                               ELSE NULL END,
         pending_recipients = CASE WHEN outcome.pending IS NULL THEN NULL
                                   ELSE ARRAY(SELECT json_array_elements_text(outcome.pending::json))
                              END,
         last_error = outcome.error,
         run_at = CASE WHEN outcome.kind IN ('failed', 'deferred')
                       THEN now() + outcome.delay * interval '1 second'
                       ELSE jobs.run_at END
    FROM outcome
   WHERE jobs.job_id = outcome.job_id AND jobs.status = 'queued'
     AND (outcome.kind NOT IN ('dropped', 'released') OR outcome.deferred = 1)
     -- Said again as an array so the planner looks the jobs up by primary key
     -- even when its statistics are stale (else it may scan every queued job).
     AND jobs.job_id = ANY (%(job_ids)s::int[])
  RETURNING jobs.job_id, jobs.attempts, outcome.delivery, outcome.smtp_code, outcome.error,
            outcome.elapsed, outcome.relay
)
INSERT INTO deliveries (job_id, attempt, started_at, finished_at, outcome, smtp_code, detail,
                        relay)
SELECT job_id, CASE WHEN delivery = 'deferred' THEN attempts ELSE GREATEST(attempts, 1) END,
       now() - elapsed * interval '1 second', now(), delivery, smtp_code, error, relay
  FROM recorded
 WHERE delivery IS NOT NULL;

-- ring_consumers --
-- Rows are back in the queue (a consumer stopped or freed claims): wake the
-- other consumers at once.
SELECT pg_notify('mailqueue_queue', '');

-- queue_is_empty --
-- Consumer --drain: true when no queue row is left, held by anyone or not.
SELECT NOT EXISTS (SELECT 1 FROM queue) AS empty;

-- =============================================================================
-- Start-up and reports
-- =============================================================================

-- status_counts --
-- Reports: how many jobs are in each status.
SELECT status, count(*) AS jobs FROM jobs GROUP BY status ORDER BY status;

-- schema_ready --
-- Start-up check: sql/schema.sql (this version of it) has been run.
SELECT to_regclass('consumers') IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = to_regclass('queue') AND attname = 'claimed_by'
                      AND NOT attisdropped) AS ready;

-- keep_alive --
-- On a LISTEN connection at each poll timeout: a server's idle_session_timeout
-- never closes it for being idle.
SELECT 1;

-- =============================================================================
-- Operating the queue: python -m mailqueue report | dashboard | requeue | prune
-- (mailqueue/report.py, dashboard.py, admin.py). They only read, but requeue
-- and prune, which change finished jobs only, in short batches.
-- =============================================================================

-- ops_status_counts --
-- Every status with its count, zeros included (the view reads partial indexes).
SELECT status, jobs FROM mailqueue_status_counts;

-- ops_finished_since --
-- Jobs finished (completed or dead) in the last %(since)s seconds: how many were
-- sent, and the lag end_time - start_time (the seed's measure), from
-- jobs_finished_idx alone: one range of it per status (a condition that merely
-- repeats the index's own predicate would not bound the scan). end_time is a
-- timestamp without time zone, written with now(): compared with LOCALTIMESTAMP.
WITH finished AS (
  SELECT status, EXTRACT(EPOCH FROM end_time - start_time) AS lag
    FROM jobs
   WHERE status = 'completed' AND end_time >= LOCALTIMESTAMP - %(since)s * interval '1 second'
  UNION ALL
  SELECT status, EXTRACT(EPOCH FROM end_time - start_time)
    FROM jobs
   WHERE status = 'dead' AND end_time >= LOCALTIMESTAMP - %(since)s * interval '1 second'
)
SELECT count(*) FILTER (WHERE status = 'completed') AS sent,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY lag) AS p95,
       max(lag) AS max
  FROM finished;

-- ops_waiting --
-- The backlog (jobs due and not yet sent: available or failed with run_at come,
-- and queued) and the age in seconds of its oldest one, since it became due
-- (NULL when none waits). Two partial indexes, one per part.
WITH ready AS (
  SELECT count(*) AS jobs, min(run_at) AS oldest
    FROM jobs
   WHERE status IN ('available', 'failed') AND run_at <= now()
), queued AS (
  SELECT count(*) AS jobs, min(run_at) AS oldest
    FROM jobs
   WHERE status = 'queued'
)
SELECT ready.jobs + queued.jobs AS backlog,
       EXTRACT(EPOCH FROM now() - LEAST(ready.oldest, queued.oldest)) AS oldest_waiting_seconds
  FROM ready, queued;

-- ops_failure_reasons --
-- Why attempts failed in the last %(since)s seconds: up to %(limit)s reasons, the
-- same SMTP reply for different recipients being one (mailqueue_failures), with
-- how many jobs each.
SELECT reason, count(DISTINCT job_id) AS jobs
  FROM mailqueue_failures
 WHERE finished_at >= now() - %(since)s * interval '1 second'
 GROUP BY reason
 ORDER BY jobs DESC, reason
 LIMIT %(limit)s;

-- ops_latest_failures --
-- The dashboard's table: the latest %(limit)s failed or dead attempts, newest
-- first, with the job's recipient (masked by the dashboard) and never a body.
SELECT f.finished_at, f.job_id, f.attempt, f.outcome, f.smtp_code, f.reason, jobs.email
  FROM mailqueue_failures f
  JOIN jobs ON jobs.job_id = f.job_id
 ORDER BY f.finished_at DESC
 LIMIT %(limit)s;

-- ops_per_minute --
-- The dashboard's charts: each minute of the last hour, sent, failed and lag.
SELECT minute, sent, failed, lag_p50_seconds, lag_p95_seconds FROM mailqueue_per_minute;

-- ops_deliveries_since --
-- Attempts logged in the last %(since)s seconds, per outcome (/metrics).
SELECT outcome, count(*) AS deliveries
  FROM deliveries
 WHERE finished_at >= now() - %(since)s * interval '1 second'
 GROUP BY outcome;

-- ops_requeue --
-- Up to %(limit)s jobs of %(status)s (dead, failed or uncertain), among %(job_ids)s if not
-- NULL and last tried within %(since)s seconds if not NULL (end_time for dead
-- jobs, start_time, when last queued, for failed ones), back to available with
-- attempts = 0; the schema's trigger jobs_ring_producer_on_retry wakes the
-- producer. A job put back leaves the selection, so the caller repeats this until
-- fewer than %(limit)s come back: each batch is one short transaction, found
-- through the status's partial index (jobs_finished_idx for dead jobs).
WITH chosen AS (
  SELECT job_id
    FROM jobs
   WHERE status = %(status)s
     AND (%(job_ids)s::int[] IS NULL OR job_id = ANY(%(job_ids)s::int[]))
     AND (%(since)s::float8 IS NULL
          OR COALESCE(end_time, start_time) >= LOCALTIMESTAMP - %(since)s * interval '1 second')
   LIMIT %(limit)s
     FOR UPDATE
), requeued AS (
  UPDATE jobs
     SET status = 'available', attempts = 0, deferrals = 0, deferred_since = NULL,
         run_at = now(), end_time = NULL
    FROM chosen
   WHERE jobs.job_id = chosen.job_id AND jobs.status = %(status)s
  RETURNING jobs.job_id
)
SELECT count(*) AS jobs FROM requeued;

-- ops_requeue_count --
-- requeue --dry-run: how many jobs ops_requeue would put back; changes nothing.
SELECT count(*) AS jobs
  FROM jobs
 WHERE status = %(status)s
   AND (%(job_ids)s::int[] IS NULL OR job_id = ANY(%(job_ids)s::int[]))
   AND (%(since)s::float8 IS NULL
        OR COALESCE(end_time, start_time) >= LOCALTIMESTAMP - %(since)s * interval '1 second');

-- ops_prune_count --
-- prune: how many finished jobs (completed, dead, uncertain, suppressed, bounced)
-- ended more than %(older_than)s seconds ago: one count per partial index
-- (jobs_finished_idx, jobs_other_finished_idx), each read alone.
SELECT (SELECT count(*) FROM jobs
         WHERE status IN ('completed', 'dead')
           AND end_time < LOCALTIMESTAMP - %(older_than)s * interval '1 second')
     + (SELECT count(*) FROM jobs
         WHERE status IN ('uncertain', 'suppressed', 'bounced')
           AND end_time < LOCALTIMESTAMP - %(older_than)s * interval '1 second') AS jobs;

-- ops_prune_batch --
-- prune: delete up to %(limit)s jobs of %(status)s (a finished status) that ended
-- more than %(older_than)s seconds ago and not before %(after)s, oldest first
-- (their deliveries and attachments go with them through the foreign keys).
-- Each batch is its own short transaction; the caller goes on from the latest
-- end_time returned, so no batch walks again over what the last ones deleted.
-- SKIP LOCKED: a row someone holds (a requeue) is left alone. Never a job that is
-- available, queued or failed: the status is checked again at the DELETE.
WITH doomed AS (
  SELECT job_id
    FROM jobs
   WHERE status = %(status)s
     AND end_time >= %(after)s::timestamp
     AND end_time < LOCALTIMESTAMP - %(older_than)s * interval '1 second'
   ORDER BY end_time
   LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED
), gone AS (
  DELETE FROM jobs
   USING doomed
   WHERE jobs.job_id = doomed.job_id
     AND jobs.status IN ('completed', 'dead', 'uncertain', 'suppressed', 'bounced')
  RETURNING jobs.end_time
)
SELECT count(*) AS jobs, max(end_time) AS last FROM gone;

-- =============================================================================
-- Several relays (mailqueue/relays.py; docs/relays.md): health shared by every
-- consumer, rate and daily quota per relay. The hour of relay_usage is always
-- truncated in UTC, so that consumers in any TimeZone count the same rows.
-- ======================================================================

-- relay_register --
-- A consumer starts: a row of relays for each relay it knows (%(names)s), up
-- unless another consumer already knows better.
INSERT INTO relays (name)
SELECT name FROM unnest(%(names)s::varchar[]) AS given(name)
ON CONFLICT (name) DO NOTHING;

-- relay_states --
-- Every relay's health, judged by the database's clock: down (not yet known to
-- be back), and probe_due: down_until has passed and no consumer is trying it.
SELECT name,
       down_until IS NOT NULL AS down,
       down_until IS NOT NULL AND down_until <= now()
         AND (probe_until IS NULL OR probe_until < now()) AS probe_due,
       down_until, probe_until, last_error, changed_at
  FROM relays
 ORDER BY name;

-- relay_mark_down --
-- The relay %(relay)s failed (%(reason)s): down for every consumer for
-- %(seconds)s seconds from now, any probe ended. `changed` is true only when it
-- was up (or unknown) before: the caller logs the change once. (changed_at is set
-- to this transaction's now() exactly when the state flips.)
INSERT INTO relays AS r (name, down_until, last_error, changed_at)
VALUES (%(relay)s, now() + %(seconds)s * interval '1 second', %(reason)s, now())
ON CONFLICT (name) DO UPDATE
   SET down_until = EXCLUDED.down_until,
       last_error = EXCLUDED.last_error,
       probe_until = NULL,
       changed_at = CASE WHEN r.down_until IS NULL THEN now() ELSE r.changed_at END
RETURNING changed_at = now() AS changed;

-- relay_mark_up --
-- The relay %(relay)s worked: up for every consumer. A row comes back only if it
-- was down (the caller logs the change once); an up relay is not written.
UPDATE relays
   SET down_until = NULL, probe_until = NULL, changed_at = now()
 WHERE name = %(relay)s AND down_until IS NOT NULL
RETURNING name;

-- relay_claim_probe --
-- The right to try the relay %(relay)s again, once its down_until has passed:
-- one caller across all consumers gets the row back; the others (a concurrent
-- UPDATE re-checks the condition on the row the winner wrote) get none, and keep
-- seeing it down until the probe marks it up or down, or %(hold)s seconds pass
-- (a prober that died).
UPDATE relays
   SET probe_until = now() + %(hold)s * interval '1 second'
 WHERE name = %(relay)s
   AND down_until <= now()
   AND (probe_until IS NULL OR probe_until < now())
RETURNING name;

-- relay_open_bucket --
-- The token bucket of the relay %(relay)s's rate_limit (a row of send_rate named
-- 'relay:' and the relay), full (%(burst)s tokens) when new.
INSERT INTO send_rate (bucket, tokens)
VALUES ('relay:' || %(relay)s, %(burst)s)
ON CONFLICT (bucket) DO NOTHING;

-- relay_take_tokens --
-- Up to %(wanted)s mails to the relay %(relay)s under its rate_limit: its bucket
-- is locked, brought up to date (%(rate)s tokens a second, at most %(burst)s
-- saved up), and each mail granted takes a token. wait_seconds: until the next
-- token. No row when the bucket does not exist yet (relay_open_bucket, then again).
WITH bucket AS (
  SELECT clock_timestamp() AS at,
         LEAST(%(burst)s::float8,
               tokens + %(rate)s * EXTRACT(EPOCH FROM clock_timestamp() - refreshed_at))
           AS tokens
    FROM send_rate
   WHERE bucket = 'relay:' || %(relay)s
     FOR UPDATE
), granted AS (
  SELECT at, tokens, GREATEST(0, LEAST(%(wanted)s, floor(tokens)))::int AS mails
    FROM bucket
), spent AS (
  UPDATE send_rate
     SET tokens = granted.tokens - granted.mails, refreshed_at = granted.at
    FROM granted
   WHERE send_rate.bucket = 'relay:' || %(relay)s
  RETURNING send_rate.tokens
)
SELECT granted.mails AS granted,
       GREATEST(0.0, (1 - spent.tokens) / %(rate)s::float8) AS wait_seconds
  FROM granted, spent;

-- relay_open_hour --
-- The relay %(relay)s's row of relay_usage for this hour, and its rows older than
-- the quota's window gone (once an hour per relay).
WITH old AS (
  DELETE FROM relay_usage
   WHERE relay = %(relay)s
     AND hour < (date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                - interval '24 hours'
)
INSERT INTO relay_usage (relay, hour)
VALUES (%(relay)s, date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
ON CONFLICT (relay, hour) DO NOTHING;

-- relay_take_quota --
-- Up to %(wanted)s mails of the relay %(relay)s's daily_quota (%(quota)s mails in
-- the rolling 24 hours, counted as this hour and the 24 before it, so a mail
-- counts for 24 to 25 hours). This hour's row is locked (FOR UPDATE reads its
-- newest version, written by any consumer), so that two consumers never both take
-- the last mails; the earlier hours no longer change. No row when this hour's row
-- does not exist yet (relay_open_hour, then again).
WITH this_hour AS (
  SELECT sent, hour
    FROM relay_usage
   WHERE relay = %(relay)s
     AND hour = date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
     FOR UPDATE
), earlier AS (
  SELECT COALESCE(sum(sent), 0) AS sent
    FROM relay_usage
   WHERE relay = %(relay)s
     AND hour >= (date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                 - interval '24 hours'
     AND hour < date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
), granted AS (
  SELECT this_hour.hour,
         GREATEST(0, LEAST(%(wanted)s, %(quota)s - earlier.sent - this_hour.sent))::int AS mails
    FROM this_hour, earlier
), taken AS (
  UPDATE relay_usage
     SET sent = relay_usage.sent + granted.mails
    FROM granted
   WHERE relay_usage.relay = %(relay)s AND relay_usage.hour = granted.hour
     AND granted.mails > 0
)
SELECT mails AS granted FROM granted;

-- relay_give_back_quota --
-- %(count)s mails taken from the relay %(relay)s's quota were not sent after all:
-- taken off its latest hour that has any.
UPDATE relay_usage
   SET sent = sent - LEAST(sent, %(count)s)
 WHERE relay = %(relay)s
   AND hour = (SELECT max(hour) FROM relay_usage WHERE relay = %(relay)s AND sent > 0);

-- ops_relays --
-- Reports: every relay known (the relays table, and those named by the attempts
-- of the window), with its attempts in the last %(since)s seconds (sent; failed
-- or dead), its health, and its quota used (the rolling 24 hours of
-- relay_take_quota).
WITH tallies AS (
  SELECT relay,
         count(*) FILTER (WHERE outcome = 'sent') AS sent,
         count(*) FILTER (WHERE outcome IN ('failed', 'dead')) AS failed
    FROM deliveries
   WHERE finished_at >= now() - %(since)s * interval '1 second' AND relay IS NOT NULL
   GROUP BY relay
), usage AS (
  SELECT relay, sum(sent) AS used
    FROM relay_usage
   WHERE hour >= (date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                - interval '24 hours'
   GROUP BY relay
), names AS (
  SELECT name FROM relays
  UNION
  SELECT relay FROM tallies
)
SELECT names.name,
       COALESCE(tallies.sent, 0) AS sent,
       COALESCE(tallies.failed, 0) AS failed,
       relays.down_until IS NOT NULL AS down,
       relays.down_until,
       relays.last_error,
       COALESCE(usage.used, 0)::bigint AS quota_used
  FROM names
  LEFT JOIN relays ON relays.name = names.name
  LEFT JOIN tallies ON tallies.relay = names.name
  LEFT JOIN usage ON usage.relay = names.name
 ORDER BY names.name;

-- ops_relay_deliveries_since --
-- Attempts logged in the last %(since)s seconds, per relay and outcome (/metrics);
-- attempts that name no relay (written before relays) are left out.
SELECT relay, outcome, count(*) AS deliveries
  FROM deliveries
 WHERE finished_at >= now() - %(since)s * interval '1 second' AND relay IS NOT NULL
 GROUP BY relay, outcome
 ORDER BY relay, outcome;

-- =============================================================================
-- After the 250: suppressions, bounces and complaints, one-click unsubscribe
-- (mailqueue/suppressions.py, bounces.py, unsubscribe.py; issue 20)
-- =============================================================================

-- suppressed_among --
-- The batch screen: which of %(addresses)s (lower-cased) are suppressed now.
-- One look-up of the primary key per claimed batch, not one per mail.
SELECT email, reason, source, created_at
  FROM suppressions
 WHERE email = ANY (%(addresses)s::text[])
   AND (expires_at IS NULL OR expires_at > now());

-- suppress --
-- Put %(email)s on the list. An address already on it stays as it is, unless its
-- row has expired: then the new reason replaces it. Returns the row when written.
INSERT INTO suppressions AS s (email, reason, source, job_id, detail, expires_at)
VALUES (%(email)s, %(reason)s, %(source)s, %(job_id)s, %(detail)s, %(expires_at)s)
ON CONFLICT (email) DO UPDATE
   SET reason = EXCLUDED.reason, source = EXCLUDED.source, job_id = EXCLUDED.job_id,
       detail = EXCLUDED.detail, created_at = now(), expires_at = EXCLUDED.expires_at
 WHERE s.expires_at IS NOT NULL AND s.expires_at <= now()
RETURNING email;

-- suppress_rejected_recipient --
-- The consumer, when a recipient gets a 5xx with enhanced code 5.1.x at RCPT:
-- suppress %(email)s as hard_bounce (source smtp) for job %(job_id)s, and log the
-- event for the bounce rate, in one statement. Running it twice changes nothing.
WITH event AS (
  INSERT INTO mail_events (message_key, recipient, kind, status, source, job_id, detail)
  VALUES ('smtp:' || %(job_id)s::int, lower(btrim(%(email)s)), 'rejected', %(status)s,
          'smtp', %(job_id)s, %(detail)s)
  ON CONFLICT (message_key, recipient) DO NOTHING
  RETURNING event_id
)
INSERT INTO suppressions AS s (email, reason, source, job_id, detail)
VALUES (%(email)s, 'hard_bounce', 'smtp', %(job_id)s, %(detail)s)
ON CONFLICT (email) DO UPDATE
   SET reason = EXCLUDED.reason, source = EXCLUDED.source, job_id = EXCLUDED.job_id,
       detail = EXCLUDED.detail, created_at = now(), expires_at = NULL
 WHERE s.expires_at IS NOT NULL AND s.expires_at <= now();

-- unsuppress --
-- python -m mailqueue suppress remove: take %(emails)s (lower-cased) off the list.
DELETE FROM suppressions WHERE email = ANY (%(emails)s::text[]);

-- suppression_list --
-- python -m mailqueue suppress list: every row, newest first.
SELECT email, reason, source, job_id, detail, created_at, expires_at,
       expires_at IS NOT NULL AND expires_at <= now() AS expired
  FROM suppressions
 ORDER BY created_at DESC, email;

-- job_for_report --
-- A bounce or complaint names job %(job_id)s: its addresses and what it is now.
SELECT job_id, email, cc, bcc, status, created_at FROM jobs WHERE job_id = %(job_id)s;

-- record_mail_event --
-- One recipient of a DSN or an ARF report, with its effects, in one statement:
-- the event (once per report and recipient: reading a mailbox twice changes
-- nothing), the suppression (%(suppress)s: a reason, or NULL for none) and, when
-- %(bounce)s, the job completed -> bounced with %(error)s as its last_error.
WITH event AS (
  INSERT INTO mail_events (message_key, recipient, kind, status, source, job_id, detail)
  VALUES (%(key)s, %(recipient)s, %(kind)s, %(status)s, %(source)s, %(job_id)s, %(detail)s)
  ON CONFLICT (message_key, recipient) DO NOTHING
  RETURNING recipient, job_id
), suppressed AS (
  INSERT INTO suppressions AS s (email, reason, source, job_id, detail)
  SELECT recipient, %(suppress)s, %(source)s, job_id, %(detail)s
    FROM event
   WHERE %(suppress)s::text IS NOT NULL AND recipient <> ''
  ON CONFLICT (email) DO UPDATE
     SET reason = EXCLUDED.reason, source = EXCLUDED.source, job_id = EXCLUDED.job_id,
         detail = EXCLUDED.detail, created_at = now(), expires_at = NULL
   WHERE s.expires_at IS NOT NULL AND s.expires_at <= now()
  RETURNING email
), bounced AS (
  UPDATE jobs SET status = 'bounced', last_error = %(error)s
    FROM event
   WHERE %(bounce)s AND jobs.job_id = event.job_id AND jobs.status = 'completed'
  RETURNING jobs.job_id
)
SELECT (SELECT count(*) FROM event) AS recorded,
       (SELECT count(*) FROM suppressed) AS suppressed,
       (SELECT count(*) FROM bounced) AS bounced;

-- ops_after_send --
-- Rates over the last %(since)s seconds: mails that left us (completed or
-- bounced, by end_time), hard bounces (DSN failed with 5.x.x, 5.1.x at RCPT) and
-- complaints (mail_events_received_idx, jobs_finished_idx, jobs_other_finished_idx).
SELECT (SELECT count(*) FROM jobs
         WHERE status = 'completed' AND end_time >= LOCALTIMESTAMP - %(since)s * interval '1 second')
       + (SELECT count(*) FROM jobs
           WHERE status = 'bounced' AND end_time >= LOCALTIMESTAMP - %(since)s * interval '1 second')
         AS sent,
       (SELECT count(*) FROM mail_events
         WHERE received_at >= now() - %(since)s * interval '1 second'
           AND (kind = 'rejected' OR (kind = 'failed' AND status LIKE '5.%%'))) AS bounces,
       (SELECT count(*) FROM mail_events
         WHERE received_at >= now() - %(since)s * interval '1 second'
           AND kind = 'complaint') AS complaints;

-- ops_suppressions_by_reason --
-- Addresses suppressed now, per reason (expired rows left out).
SELECT reason, count(*) AS addresses
  FROM suppressions
 WHERE expires_at IS NULL OR expires_at > now()
 GROUP BY reason;

-- ops_latest_suppressions --
-- The dashboard's table: the latest %(limit)s suppressions, newest first.
SELECT email, reason, source, job_id, detail, created_at, expires_at
  FROM suppressions
 ORDER BY created_at DESC
 LIMIT %(limit)s;

-- suppress_by_link --
-- The unsubscribe server: a signed one-click POST for %(email)s from job
-- %(job_id)s (NULL in the row when the job has been deleted since). As suppress,
-- but reading no column but email and expires_at (its role may read no more).
INSERT INTO suppressions AS s (email, reason, source, job_id, detail)
SELECT %(email)s, 'unsubscribe', 'link', (SELECT job_id FROM jobs WHERE job_id = %(job_id)s),
       %(detail)s
ON CONFLICT (email) DO UPDATE
   SET reason = 'unsubscribe', source = 'link',
       job_id = (SELECT job_id FROM jobs WHERE job_id = %(job_id)s),
       detail = %(detail)s, created_at = now(), expires_at = NULL
 WHERE s.expires_at IS NOT NULL AND s.expires_at <= now();


-- =============================================================================
-- Producer: stored templates, rendered into their jobs before they are queued
-- (mailqueue/templates.py, render_ready_jobs; the three run in one transaction)
-- =============================================================================

-- render_take_jobs --
-- Up to %(limit)s jobs that are due and wait for their template to be rendered,
-- in the order move_ready_jobs would queue them (jobs_to_render_idx). Locked until
-- the transaction ends; SKIP LOCKED: several producers render different jobs.
SELECT job_id, template, locale, context, subject, content_message, html_message
  FROM jobs
 WHERE template IS NOT NULL AND rendered_at IS NULL
   AND status IN ('available', 'failed')
   AND run_at <= now()
 ORDER BY priority DESC, run_at, job_id
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED;

-- render_templates_named --
-- Every locale of the templates named %(names)s (the producer's cache compiles a
-- row again only when its updated_at changed).
SELECT name, locale, subject, text, html, updated_at
  FROM templates
 WHERE name = ANY (%(names)s::varchar[]);

-- render_record --
-- The outcome of rendering each job taken: its subject and parts written into
-- its own columns (a retry sends the same bytes, and editing the template later
-- changes nothing), or, where %(errors)s has a reason, the job is dead, spending
-- no attempt, and the reason is in last_error and in the attempt log.
WITH done AS (
  SELECT *
    FROM unnest(%(job_ids)s::int[], %(subjects)s::text[], %(texts)s::text[],
                %(htmls)s::text[], %(errors)s::text[])
         AS d(job_id, subject, text, html, error)
), rendered AS (
  UPDATE jobs
     SET subject = done.subject, content_message = done.text, html_message = done.html,
         rendered_at = now()
    FROM done
   WHERE jobs.job_id = done.job_id AND done.error IS NULL
), dead AS (
  UPDATE jobs
     SET status = 'dead', end_time = now(), last_error = done.error
    FROM done
   WHERE jobs.job_id = done.job_id AND done.error IS NOT NULL
  RETURNING jobs.job_id, jobs.attempts, done.error
)
INSERT INTO deliveries (job_id, attempt, started_at, finished_at, outcome, detail)
SELECT job_id, GREATEST(attempts, 1), now(), now(), 'dead', error
  FROM dead;

-- template_list --
-- python -m mailqueue template list: every template, by name and locale.
SELECT name, locale, updated_at, subject, text IS NOT NULL AS has_text,
       html IS NOT NULL AS has_html
  FROM templates
 ORDER BY name, locale;

-- template_named --
-- python -m mailqueue template render NAME: its locales.
SELECT name, locale, subject, text, html, updated_at
  FROM templates
 WHERE name = %(template)s;

-- =============================================================================
-- The Python way in: mailqueue.enqueue / enqueue_many (mailqueue/enqueuing.py),
-- run in the application's own transaction, on its own connection
-- =============================================================================

-- enqueue_jobs --
-- Many mails, each with its files, in one statement: one array per column, one
-- element per mail (cc, bcc, headers and context as JSON text); the files' arrays
-- name their mail by its position (file_of, from 1). Each job's id is drawn first
-- so that its files can name it; a mail whose idempotency_key is already queued
-- (or repeated earlier in the same call) is skipped with its files. One row per
-- mail comes back, in order: its job_id, or NULL when it was skipped. The
-- /*extra ...*/ marks take the application's own columns (enqueue's **columns).
WITH mail AS (
  SELECT nextval(pg_get_serial_sequence('jobs', 'job_id'))::int AS job_id, m.*
    FROM unnest(%(email)s::varchar[], %(subject)s::varchar[], %(content_message)s::varchar[],
                %(html_message)s::text[], %(sender)s::varchar[], %(reply_to)s::varchar[],
                %(cc)s::text[], %(bcc)s::text[], %(headers)s::text[], %(priority)s::int[],
                %(run_at)s::timestamptz[], %(expires_at)s::timestamptz[],
                %(idempotency_key)s::varchar[], %(template)s::varchar[], %(context)s::text[],
                %(locale)s::varchar[] /*extra arrays*/)
         WITH ORDINALITY
         AS m(email, subject, content_message, html_message, sender, reply_to, cc, bcc,
              headers, priority, run_at, expires_at, idempotency_key, template, context,
              locale /*extra names*/, n)
), job AS (
  INSERT INTO jobs (job_id, email, subject, content_message, html_message, sender, reply_to,
                    cc, bcc, headers, priority, run_at, expires_at, idempotency_key,
                    template, context, locale /*extra columns*/)
  SELECT job_id, email, subject, content_message, html_message, sender, reply_to,
         CASE WHEN cc IS NOT NULL
              THEN ARRAY(SELECT a FROM jsonb_array_elements_text(cc::jsonb) WITH ORDINALITY
                                       AS x(a, i) ORDER BY i) END,
         CASE WHEN bcc IS NOT NULL
              THEN ARRAY(SELECT a FROM jsonb_array_elements_text(bcc::jsonb) WITH ORDINALITY
                                       AS x(a, i) ORDER BY i) END,
         headers::jsonb, COALESCE(priority, 0), COALESCE(run_at, now()), expires_at,
         idempotency_key, template, context::jsonb, locale /*extra values*/
    FROM mail
   ORDER BY n
  ON CONFLICT (idempotency_key) DO NOTHING
  RETURNING job_id
), file AS (
  INSERT INTO attachments (job_id, filename, content_type, content, content_id)
  SELECT job.job_id, f.filename, f.content_type, f.content, f.content_id
    FROM unnest(%(file_of)s::int[], %(filename)s::varchar[], %(content_type)s::varchar[],
                %(content)s::bytea[], %(content_id)s::varchar[]) WITH ORDINALITY
         AS f(n, filename, content_type, content, content_id, position)
    JOIN mail ON mail.n = f.n
    JOIN job ON job.job_id = mail.job_id
   ORDER BY f.position
)
SELECT job.job_id
  FROM mail
  LEFT JOIN job ON job.job_id = mail.job_id
 ORDER BY mail.n;

-- enqueue_job_columns --
-- The columns of jobs, for enqueue's **columns (an application's own columns).
SELECT attname::text, format_type(atttypid, atttypmod)
  FROM pg_attribute
 WHERE attrelid = 'jobs'::regclass AND attnum > 0 AND NOT attisdropped;
