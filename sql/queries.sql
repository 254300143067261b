-- Every query the producer and the consumer run, each under a `-- name --` header,
-- with %(name)s parameters. Loaded by mailqueue/db.py (load_queries).

-- move_ready_jobs --
-- Producer: move up to %(limit)s ready jobs (available, or failed and due for a
-- retry) into the queue, oldest first. SKIP LOCKED lets several producers run at
-- once without waiting on each other, and each job is moved exactly once: its
-- status leaves the ready set in the same statement. A job whose old queue row
-- is still there (a consumer is finishing its batch) waits for the next sweep.
WITH ready AS (
  SELECT job_id
    FROM jobs
   WHERE status IN ('available', 'failed')
     AND run_at <= now()
     AND NOT EXISTS (SELECT 1 FROM queue WHERE queue.job_id = jobs.job_id)
   ORDER BY run_at, job_id
   LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED
), moved AS (
  UPDATE jobs
     SET status = 'queued', start_time = now(), end_time = NULL
    FROM ready
   WHERE jobs.job_id = ready.job_id
  RETURNING jobs.job_id
)
INSERT INTO queue (job_id)
SELECT job_id FROM moved ORDER BY job_id;

-- claim_batch --
-- Consumer: take up to %(limit)s queue rows no other consumer holds, oldest
-- first. The transaction begun here stays open while the batch is sent, so the
-- DELETE's row locks are held until finish_batch: if this consumer dies, its
-- transaction rolls back and the rows are back in the queue at once, for
-- another consumer to take. The job's status comes along: only a 'queued' job
-- is sent (see consumer.py).
BEGIN;
WITH next AS (
  SELECT queue_id
    FROM queue
   ORDER BY queue_id
   LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED
), claimed AS (
  DELETE FROM queue
   USING next
   WHERE queue.queue_id = next.queue_id
  RETURNING queue.queue_id, queue.job_id
)
SELECT claimed.queue_id, claimed.job_id, jobs.status, jobs.email, jobs.subject,
       jobs.content_message, jobs.attempts, jobs.created_at
  FROM claimed
  LEFT JOIN jobs ON jobs.job_id = claimed.job_id
 ORDER BY claimed.queue_id;

-- finish_batch --
-- Consumer, every mail of the batch recorded: the queue rows are gone for good.
COMMIT;

-- release_batch --
-- Consumer, stopping mid-batch or failing: the rows not yet finished are back.
ROLLBACK;

-- queue_is_empty --
-- Consumer --drain: true when no queue row is left, held by anyone or not.
SELECT NOT EXISTS (SELECT 1 FROM queue) AS empty;

-- mark_sent --
-- Consumer, on its recording connection, right after the SMTP server accepted
-- the mail. Guarded by status: a job someone else finished is never overwritten.
UPDATE jobs
   SET status = 'completed', end_time = now(), attempts = attempts + 1,
       last_error = NULL
 WHERE job_id = %(job_id)s AND status = 'queued';

-- schedule_retry --
-- Consumer: the attempt failed for a reason that may pass; try again in
-- %(delay)s seconds (the producer re-queues the job once run_at has come).
UPDATE jobs
   SET status = 'failed', attempts = attempts + 1, last_error = %(error)s,
       run_at = now() + %(delay)s * interval '1 second'
 WHERE job_id = %(job_id)s AND status = 'queued';

-- mark_dead --
-- Consumer: give up on the job (permanent rejection, bad input, or no attempts
-- left). %(attempted)s is 1 when a send was attempted, 0 when the job was
-- refused before any send.
UPDATE jobs
   SET status = 'dead', end_time = now(), attempts = attempts + %(attempted)s,
       last_error = %(error)s
 WHERE job_id = %(job_id)s AND status = 'queued';

-- status_counts --
-- Reports: how many jobs are in each status.
SELECT status, count(*) AS jobs FROM jobs GROUP BY status ORDER BY status;

-- ring_consumers --
-- Consumer, stopping with part of a batch unsent: the rows are back in the
-- queue, so wake the other consumers at once.
SELECT pg_notify('mailqueue_queue', '');

-- schema_ready --
-- Start-up check: sql/schema.sql has been run (the queue table exists and jobs
-- has the columns the schema adds).
SELECT to_regclass('queue') IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = to_regclass('jobs') AND attname = 'run_at'
                      AND NOT attisdropped) AS ready;
