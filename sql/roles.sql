-- =============================================================================
-- Mail job queue: least-privilege roles (optional).
--
-- Run after sql/schema.sql, on the same database, as its owner (CREATE ROLE needs
-- the CREATEROLE attribute; nothing here needs a superuser). Safe to run again.
-- The roles cannot log in; grant them to login roles of your own, e.g.
--   CREATE ROLE shop_app LOGIN PASSWORD '...' IN ROLE mailqueue_app;
--   CREATE ROLE mail_worker LOGIN PASSWORD '...' IN ROLE mailqueue_worker;
-- =============================================================================

DO $$
BEGIN
  -- mailqueue_app: your application. It may insert jobs, and read back their ids.
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mailqueue_app') THEN
    CREATE ROLE mailqueue_app NOLOGIN;
  END IF;
  -- mailqueue_worker: producer.py and consumer.py.
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mailqueue_worker') THEN
    CREATE ROLE mailqueue_worker NOLOGIN;
  END IF;
  -- mailqueue_unsubscribe: python -m mailqueue unsubscribe-server (one-click links).
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mailqueue_unsubscribe') THEN
    CREATE ROLE mailqueue_unsubscribe NOLOGIN;
  END IF;
END
$$;

-- The application: INSERT, and job_id for INSERT ... RETURNING job_id. It cannot
-- read other jobs' addresses or contents, change a job, or touch the queue.
GRANT INSERT ON jobs TO mailqueue_app;
GRANT SELECT (job_id) ON jobs TO mailqueue_app;
-- ... ON CONFLICT (idempotency_key) DO NOTHING: PostgreSQL requires SELECT on the
-- column it names (the keys are the application's own; no address or content).
GRANT SELECT (idempotency_key) ON jobs TO mailqueue_app;
GRANT USAGE ON SEQUENCE jobs_job_id_seq TO mailqueue_app;
-- Its files, in the same transaction as their job (docs/writing-mails.md); it cannot read
-- back or change any file, its own included.
GRANT INSERT ON attachments TO mailqueue_app;
GRANT USAGE ON SEQUENCE attachments_attachment_id_seq TO mailqueue_app;

-- The scripts: read jobs and change only their bookkeeping columns; move rows
-- through the queue. They cannot insert or delete jobs, nor change a mail's
-- address, nor its subject or content but by rendering its template.
GRANT SELECT ON jobs TO mailqueue_worker;
GRANT UPDATE (status, start_time, end_time, attempts, last_error, run_at,
              deferrals, deferred_since, pending_recipients) ON jobs
  TO mailqueue_worker;
-- The producer renders a job's stored template into the job's subject and parts
-- (once, before it is queued: mailqueue/templates.py); it reads the templates.
GRANT UPDATE (subject, content_message, html_message, rendered_at) ON jobs TO mailqueue_worker;
GRANT SELECT ON templates TO mailqueue_worker;
-- (UPDATE on queue only because SELECT ... FOR UPDATE requires it; no query updates it.)
GRANT SELECT, INSERT, UPDATE, DELETE ON queue TO mailqueue_worker;
GRANT USAGE ON SEQUENCE queue_queue_id_seq TO mailqueue_worker;

-- The consumers' bookkeeping: their own rows in consumers (the heartbeat, and
-- freeing the claims of one that is gone), the rate limit's token bucket, and the
-- attempt log. They may read attachments, never change them.
GRANT SELECT, INSERT, UPDATE, DELETE ON consumers TO mailqueue_worker;
GRANT USAGE ON SEQUENCE consumers_consumer_id_seq TO mailqueue_worker;
GRANT SELECT, UPDATE ON send_rate TO mailqueue_worker;
GRANT SELECT, INSERT ON deliveries TO mailqueue_worker;
GRANT USAGE ON SEQUENCE deliveries_delivery_id_seq TO mailqueue_worker;
GRANT SELECT ON attachments TO mailqueue_worker;

-- Operating the queue (python -m mailqueue report, dashboard, requeue): the
-- worker may read the views, and the attempt log they read (granted above). The
-- views run with their owner's rights on jobs and deliveries; prune deletes jobs,
-- which only the owner (or a role you grant DELETE ON jobs) may do.
GRANT SELECT ON mailqueue_status_counts, mailqueue_per_minute, mailqueue_failures
  TO mailqueue_worker;

-- Several relays (docs/relays.md): the consumers share each relay's health and
-- its quota's hourly counts; the rate limit per relay is a bucket of send_rate
-- (granted above), and the worker may add one for each relay.
GRANT SELECT, INSERT, UPDATE ON relays TO mailqueue_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON relay_usage TO mailqueue_worker;
GRANT INSERT ON send_rate TO mailqueue_worker;

-- After the 250 (docs/suppressions.md). The scripts read the suppression list
-- (the consumer's batch screen), add to it (a 5.1.x at RCPT, bounces, complaints,
-- python -m mailqueue suppress) and remove from it (suppress remove); they log
-- what came back in mail_events and mark jobs bounced (status, last_error above).
GRANT SELECT, INSERT, UPDATE, DELETE ON suppressions TO mailqueue_worker;
GRANT SELECT, INSERT ON mail_events TO mailqueue_worker;
GRANT USAGE ON SEQUENCE mail_events_event_id_seq TO mailqueue_worker;

-- The unsubscribe server: it adds an address to the list, nothing else. INSERT,
-- and for INSERT ... ON CONFLICT (email) DO UPDATE ... WHERE the row has expired:
-- SELECT on the two columns it checks and UPDATE of the columns it rewrites (never
-- the address). It checks that the link's job still exists: SELECT (job_id) on jobs,
-- no address, subject or body.
GRANT INSERT ON suppressions TO mailqueue_unsubscribe;
GRANT SELECT (email, expires_at) ON suppressions TO mailqueue_unsubscribe;
GRANT UPDATE (reason, source, job_id, detail, created_at, expires_at) ON suppressions
  TO mailqueue_unsubscribe;
GRANT SELECT (job_id) ON jobs TO mailqueue_unsubscribe;
