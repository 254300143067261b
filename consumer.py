"""Send the mails waiting in the `queue` table.

    python consumer.py [--config config.json] [--drain] [--concurrency N]

It runs N worker processes (run_workers); each is a Consumer, and this is how
one works; the whole pattern is in this file:

1. LISTEN on the channel `mailqueue_queue`, on a connection of its own. The
   schema's trigger rings it whenever rows enter `queue`. A notification is only
   a doorbell: start-up, every notification and every POLL_INTERVAL timeout run
   the same drain(), so a lost notification delays a mail, never strands it.
   (Only a consumer's first worker listens; it calls the others in when there
   is a backlog: Team.)
2. drain() claims a batch of queue rows with FOR UPDATE SKIP LOCKED
   (sql/queries.sql, claim_batch): consumers never wait for each other and never
   take the same row. The claim DELETEs the rows in a transaction that stays
   open while the batch is sent, so the row locks die with this process.
3. Each mail's outcome is committed on a second connection, guarded by the
   job's status: completed, failed (retried later), or dead (given up). A
   'completed' is sent off without waiting: the worker builds the next mail
   and sends its envelope meanwhile, but sends its content only once that
   commit is done (Sender.send's `ready`), so at most one mail per worker is
   ever sent and not yet recorded.
4. The claim is committed last, after every outcome of the batch; the queue
   rows are then gone for good.

Durability: only the outcome records (step 3) wait for the disk. The producer's
moves and the claims' commits do not (synchronous_commit off): the WAL is one
sequence, so whenever an outcome is on disk, so is everything committed before
it. A database crash can thus only undo moves and claims of mails whose outcome
was not yet recorded: such jobs come back as 'available', or their queue rows
come back and are dropped unsent if the job already finished.

Delivery guarantee: at least once. A mail is sent twice only if the worker
sending it, or its database connection, died after the SMTP server accepted it
and before step 3 committed: at most one duplicate per mail in flight, which is
one per killed worker (workers whose consumer was killed finish their mail and
stop: none). Rows of the batch not yet sent go back to the queue at
once when the claiming transaction dies; jobs already recorded are never resent,
because a job is only sent while its status is 'queued'.
"""

import argparse
import collections
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import select
import signal

from mailqueue import cli, db, doorbell, message, smtp

log = logging.getLogger("consumer")

POLL_INTERVAL = 2.0  # seconds: the longest a consumer waits without looking at the queue
DEFAULT_CONCURRENCY = 4  # worker processes: keeps 2 cores busy while each waits on SMTP and commits
WORKER_RESTART_DELAY = 1.0  # seconds before replacing a worker that died
DRAIN_RECHECK = 0.05  # seconds: --drain looks this often at rows other consumers hold
QUEUE_CHANNEL = "mailqueue_queue"  # rung when rows enter the queue
MAX_ERROR_CHARS = 2000  # last_error is for people; a longer reason is cut
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")

Job = collections.namedtuple(
    "Job", "queue_id job_id status email subject content_message attempts created_at")


class Consumer:
    def __init__(self, config, stop, team=None):
        self.config = config
        self.stop = stop
        self.team = team  # shared with sibling worker processes, if any
        self.composer = message.Composer(config.smtp)
        self.sender = smtp.Sender(config.smtp)
        self.listen_conn = self.claim_conn = self.record_conn = None

    def run(self, drain_only=False):
        """Serve until stopped; with drain_only, until the queue table is empty."""
        try:
            doorbell.run_until_stopped(lambda: self.serve(drain_only), self.stop, "consumer")
        finally:
            self.sender.close()

    def serve(self, drain_only):
        try:
            self.open_connections()
            if self.listens():
                wakeups = doorbell.wakeups(self.listen_conn, QUEUE_CHANNEL, POLL_INTERVAL,
                                           self.stop)
            else:
                wakeups = self.team.wakeups(POLL_INTERVAL, self.stop)
            for _ in wakeups:
                self.drain()
                if drain_only:
                    # What is left is held by other consumers: it goes when they
                    # commit, or comes back for us if they die.
                    while not self.stop.requested and not self.queue_is_empty():
                        self.stop.sleep(DRAIN_RECHECK)
                        self.drain()
                    return True
            return True  # stop requested
        finally:
            self.close_connections()

    def drain(self):
        """Claim and send batches until the queue has nothing left for us."""
        while not self.stop.requested:
            self.sender.connect()  # no claim while the SMTP server is unreachable
            batch = self.claim_batch()
            if self.team:
                self.team.note_backlog(len(batch) == self.config.queue.batch_size)
            if not batch:
                self.end_claim("release_batch")
                return
            self.send_batch(batch)

    def claim_batch(self):
        """Lock and delete up to batch_size queue rows, in a transaction that stays
        open (step 2). BEGIN is part of the query, saving a round trip."""
        rows = db.run(self.claim_conn, "claim_batch", limit=self.config.queue.batch_size)
        return [Job(*row) for row in rows]

    def end_claim(self, query):
        """finish_batch (COMMIT) or release_batch (ROLLBACK) the claim's transaction,
        once every outcome of the batch is committed (step 4 comes after step 3)."""
        self.outcome_recorded()
        db.run(self.claim_conn, query)

    def send_batch(self, batch):
        try:
            for job in batch:
                if self.stop.requested:
                    break
                self.process(job)
            else:
                self.end_claim("finish_batch")  # step 4: the batch's queue rows are gone
                return
            # Stopping: put the unsent rows back and tell the other consumers.
            # (Rows of jobs already recorded come back too; as their status is
            # no longer 'queued', whoever claims them drops them unsent.)
            self.end_claim("release_batch")
            self.record("ring_consumers")
        except BaseException:
            try:
                self.outcome_recorded()  # a mail sent is recorded, if the database lets us
            except db.Error:
                pass
            if not self.claim_conn.closed:
                self.end_claim("release_batch")
            raise

    def process(self, job):
        """Send one claimed job and record the outcome."""
        if job.status != "queued":
            # The queue row of a job that no longer exists, or of one already
            # finished in a batch that was rolled back: there is nothing to send.
            log.info("job %s: dropped its queue row (job is %s)", job.job_id,
                     job.status or "missing")
            return
        try:
            mail = self.composer.build(job._asdict())
            self.sender.send(mail, ready=self.outcome_recorded)
        except message.BadMail as exc:
            self.record("mark_dead", job_id=job.job_id, error=str(exc), attempted=0)
            log.warning("job %s: dead, bad input (see last_error)", job.job_id)
        except smtp.SendError as exc:
            self.record_failure(job, str(exc), exc.permanent, exc.summary)
        except (smtp.SmtpUnavailable, db.Error):
            # Not this job's fault (a database error here is the previous mail's
            # outcome failing to commit): the batch goes back, and we wait.
            raise
        except Exception as exc:  # a poison job must not take the worker down
            self.sender.close()
            log.exception("job %s: unexpected error", job.job_id)
            self.record_failure(job, "unexpected error: %s: %s" % (type(exc).__name__, exc),
                                permanent=False, summary=type(exc).__name__)
        else:
            db.start(self.record_conn, "mark_sent", job_id=job.job_id)  # step 3, overlapped
            log.debug("job %s: sent", job.job_id)

    def outcome_recorded(self):
        """Wait until the last outcome sent off is committed."""
        db.finish(self.record_conn)

    def record_failure(self, job, error, permanent, summary):
        attempts = job.attempts + 1
        if permanent or attempts >= self.config.queue.max_attempts:
            self.record("mark_dead", job_id=job.job_id, error=error, attempted=1)
            log.warning("job %s: dead after attempt %d (%s)", job.job_id, attempts, summary)
        else:
            delay = retry_delay(attempts, self.config.queue)
            self.record("schedule_retry", job_id=job.job_id, error=error, delay=delay)
            log.warning("job %s: attempt %d failed (%s); retry in %.0f s",
                        job.job_id, attempts, summary, delay)

    def record(self, query, **params):
        """Run one recording query on the autocommit connection: durable at once."""
        if "error" in params:  # for people, and PostgreSQL text cannot hold NUL
            params["error"] = _CONTROL.sub(" ", params["error"])[:MAX_ERROR_CHARS]
        db.run(self.record_conn, query, **params)

    def queue_is_empty(self):
        return db.run(self.claim_conn, "queue_is_empty")[0][0]

    def listens(self):
        """Whether this worker LISTENs (see Team): a lone one, or a team's first."""
        return self.team is None or self.team.slot == 0

    def open_connections(self):
        settings = self.config.database
        if self.listens():
            self.listen_conn = db.connect(settings, "mailqueue consumer (listen)",
                                          autocommit=True)
        # autocommit: the claim's transaction is begun and ended by its queries
        self.claim_conn = db.connect(settings, "mailqueue consumer (claim)", autocommit=True,
                                     wait_for_flush=False)
        self.record_conn = db.connect(settings, "mailqueue consumer (record)", overlapped=True)

    def close_connections(self):
        for conn in (self.listen_conn, self.claim_conn, self.record_conn):
            db.close_quietly(conn)
        self.listen_conn = self.claim_conn = self.record_conn = None


def retry_delay(attempts, queue_settings, rand=random.random):
    """Seconds to wait after failed attempt number `attempts` (1, 2, ...):
    retry_delay doubled for each earlier failure, up to max_retry_delay, plus up
    to 25% jitter so that jobs failed together do not retry together."""
    base = queue_settings.retry_delay * 2 ** min(attempts - 1, 32)
    base = min(base, queue_settings.max_retry_delay)
    return min(base * (1 + 0.25 * rand()), queue_settings.max_retry_delay)


class Team:
    """What the worker processes of one consumer share. Only the first worker
    LISTENs for new queue rows: were all of them woken by every notification,
    they would race to claim one job and slow down the one who gets it (a
    thundering herd), and each listening connection costs PostgreSQL a wake-up
    on every NOTIFY in the database. The others wait on a pipe of their own,
    which a worker that claims a full batch writes to (a backlog: help wanted),
    and drain on every poll timeout too."""

    def __init__(self, context, count):
        self.help_wanted = context.Value("b", 0)
        self.bells = [os.pipe() for _ in range(count)]  # (read, write) per worker
        for read, write in self.bells:
            os.set_blocking(read, False)
            os.set_blocking(write, False)
        self.slot = None  # set in each worker

    def note_backlog(self, full_batch):
        """After each claim: call the other workers in when a backlog begins."""
        if full_batch and not self.help_wanted.value:
            for slot, (_, write) in enumerate(self.bells):
                if slot != self.slot:
                    self.ring(write)
        self.help_wanted.value = full_batch

    @staticmethod
    def ring(write):
        try:
            os.write(write, b"!")
        except BlockingIOError:
            pass  # the pipe is full: that worker has been rung already

    def wakeups(self, poll_interval, stop):
        """Like doorbell.wakeups, for the workers that do not LISTEN: yield at
        start-up, when rung, and after poll_interval without a ring."""
        read, write = self.bells[self.slot]
        signal.set_wakeup_fd(write)  # a stop signal rings too
        yield "start-up"
        while not stop.requested:
            rung, _, _ = select.select([read], [], [], poll_interval)
            try:
                while os.read(read, 512):
                    pass
            except BlockingIOError:
                pass
            if stop.requested:
                return
            yield "backlog" if rung else "timeout"


def run_workers(config, stop, count, drain_only):
    """Run `count` worker processes, each a Consumer sending one mail at a time.
    A worker that dies is replaced; SIGINT or SIGTERM stops them all gracefully,
    and workers stop by themselves if this process is killed."""
    context = multiprocessing.get_context("fork")
    team = Team(context, count)
    stop.share(context)

    def start_worker(slot):
        worker = context.Process(target=_worker_main, name="consumer-worker",
                                 args=(config, drain_only, stop, os.getpid(), team, slot))
        worker.start()
        return worker

    workers = [start_worker(slot) for slot in range(count)]
    try:
        while not stop.requested:
            running = [w for w in workers if w.exitcode is None]
            if drain_only and not running and all(w.exitcode == 0 for w in workers):
                return
            multiprocessing.connection.wait([w.sentinel for w in running], timeout=0.2)
            for i, worker in enumerate(workers):
                if worker.exitcode is None or (drain_only and worker.exitcode == 0):
                    continue
                if stop.requested:
                    break
                log.warning("worker %d exited with code %s; starting another",
                            worker.pid, worker.exitcode)
                stop.sleep(WORKER_RESTART_DELAY)
                workers[i] = start_worker(i)
    finally:
        for worker in workers:
            if worker.exitcode is None:
                os.kill(worker.pid, signal.SIGTERM)
        for worker in workers:
            worker.join()


def _worker_main(config, drain_only, stop, parent, team, slot):
    # `stop` is the parent's, copied by fork, and so is the handler bound to it:
    # a signal that came before this line is not lost.
    stop.parent = parent
    team.slot = slot
    Consumer(config, stop, team).run(drain_only)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Send the mails waiting in the queue table.")
    cli.add_common_arguments(parser)
    parser.add_argument("--drain", action="store_true",
                        help="exit once the queue table is empty")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="worker processes, each sending one mail at a time "
                             "(default: %(default)s; 1 runs the worker in this process)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    config = cli.start(args)
    stop = doorbell.Stop()
    stop.install()
    cli.check_database(config)
    cli.check_smtp(config)
    log.info("consuming from %s (%d worker(s), batch of %d)", db.where(config.database),
             args.concurrency, config.queue.batch_size)
    if args.concurrency == 1:
        Consumer(config, stop).run(drain_only=args.drain)
    else:
        run_workers(config, stop, args.concurrency, args.drain)
    log.info("stopped")


if __name__ == "__main__":
    main()
