"""Send the mails waiting in the `queue` table.

    python consumer.py [--config config.json] [--drain] [--concurrency N] [--processes P]

N mails are in flight at once (queue.concurrency, default 32), each on its own
persistent SMTP connection, spread over P processes (queue.processes, default
one per core; mailqueue/supervise.py starts them and replaces one that dies).
Each process runs N/P sending threads (smtplib waits on the network with the GIL
released) and holds three database connections whatever N is: claim, record and
LISTEN. This is how one process works; the whole pattern is in this file:

1. LISTEN on `mailqueue_queue` (mailqueue/doorbell.py). A notification is only
   a doorbell: start-up, every notification, every ring from a sending thread
   and every POLL_INTERVAL timeout run the same drain(), so a lost notification
   delays a mail, never strands it.
2. drain() claims queue rows with FOR UPDATE SKIP LOCKED (sql/queries.sql,
   claim_batch): consumers never wait for each other and never take the same
   row. The claim marks the rows with this process's row in `consumers` and is
   committed at once: no transaction stays open while mail is sent. It holds
   while the process's heartbeat keeps its lease (mailqueue/claims.py); the
   claimed jobs wait in `ready` for a sending thread.
3. Each sending thread (send_loop) takes a job, builds its mail
   (mailqueue/message.py) and sends it (mailqueue/smtp.py) in one round trip: the
   next mail's envelope follows this mail's end-of-data dot (RFC 2920). Just
   before the content goes, the thread checks that its previous outcome is
   durable and that the claim still holds (gate); if not, the content is not sent.
4. The outcome is handed to the recorder (mailqueue/recorder.py), which commits
   all the outcomes pending at that moment in one statement: completed, failed
   (retried later), dead (given up), or released (back to the queue at no cost:
   throttled, or the connection lost before the content). Throttling replies also
   slow this process down (mailqueue/pacing.py); queue.rate_limit holds across
   all consumers through a token bucket in PostgreSQL, taken with the claim.

Delivery guarantee: at least once, and one sender per job at a time. A mail is
sent twice only if the SMTP server accepted it and its outcome was not recorded:
the process died, or lost the database for longer than its lease, between the
server's reply and the commit. Each thread sends a mail's content only once its
previous outcome is durable, so that is at most one duplicate per mail in flight
(N per consumer). No claim is sent after it may have ended: a thread sends the
content only while the lease holds by this process's own clock, with a margin,
and a claim another consumer may take has ended for this one.
"""

import argparse
import collections
import datetime
import logging
import os
import random
import socket
import threading
import time

from mailqueue import cli, db, doorbell, message, pacing, smtp, supervise
from mailqueue.claims import Claims
from mailqueue.recorder import Outcome, Recorder

log = logging.getLogger("consumer")

POLL_INTERVAL = 2.0  # seconds: the longest a consumer waits without looking at the queue
DRAIN_RECHECK = 0.05  # seconds: --drain looks this often at rows others hold
ROOM_RECHECK = 0.1  # seconds: a full `ready` is looked at again this often
GATE_RECHECK = 0.05  # seconds: a thread at the gate looks again this often at the latest
PROGRESS_EVERY = 10.0  # seconds between two progress lines in the log
SHUTDOWN_GRACE = 10.0  # seconds to record the last outcomes when stopping
SMTP_RETRY_MIN = 0.5  # seconds: first wait when the SMTP server cannot be reached
SMTP_RETRY_MAX = 30.0  # seconds: the wait doubles up to this
QUEUE_CHANNEL = "mailqueue_queue"  # rung when rows enter the queue


class Consumer:
    def __init__(self, config, stop, threads, on_registered=None):
        self.config = config
        self.stop = stop
        self.threads = threads
        self.on_registered = on_registered  # the supervisor learns our consumer_id
        self.name = "%s:%d" % (socket.gethostname(), os.getpid())
        self.claims = Claims(config.queue.claim_lease)
        self.recorder = Recorder(config.database, self.claims, self.app_name("record"), stop)
        self.governor = pacing.Governor()
        self.composer = message.Composer(config.smtp)
        self.ready = collections.deque()  # claimed jobs no thread has taken yet
        self.work = threading.Condition()  # guards `ready`
        self.stopping = False
        self.claim_conn = None
        self.claim_unknown = False  # a claim's reply was lost: it may have been committed
        self.smtp_down = SmtpTrouble()
        self.progress = Progress()

    # ------------------------------------------------------------ the claimer

    def run(self, drain_only=False):
        """Serve until stopped; with drain_only, until the queue table is empty."""
        self.recorder.start()
        senders = [
            threading.Thread(target=self.send_loop, name="sender-%d" % i, daemon=True)
            for i in range(self.threads)
        ]
        for thread in senders:
            thread.start()
        try:
            doorbell.run_until_stopped(
                lambda working: self.serve(working, drain_only), self.stop, "consumer"
            )
        finally:
            self.shut_down(senders)

    def serve(self, working, drain_only):
        listen_conn = None
        try:
            self.claim_conn = db.connect(self.config.database, self.app_name("claim"))
            listen_conn = db.connect(self.config.listen_database, self.app_name("listen"))
            self.register()
            working()
            next_sweep = 0.0
            for _ in doorbell.wakeups(listen_conn, QUEUE_CHANNEL, POLL_INTERVAL, self.stop):
                if time.monotonic() >= next_sweep:  # wake-ups may come faster than polls
                    next_sweep = time.monotonic() + POLL_INTERVAL
                    self.free_expired_claims()
                self.drain()
                while drain_only and not self.stop.requested and not self.drained():
                    self.claims.wait(DRAIN_RECHECK)
                    self.drain()
                if drain_only:
                    return True
                self.progress.report(self.governor)
            return True  # stop requested
        finally:
            db.close_quietly(listen_conn)
            db.close_quietly(self.claim_conn)
            self.claim_conn = None

    def drain(self):
        """Claim queue rows until the queue has nothing left for us, or `ready` is
        full and the threads are busy."""
        while not self.stop.requested:
            self.register()
            self.governor.step()
            if self.smtp_down.active():
                return  # nothing is claimed while no mail can go; a thread rings when it can
            room = self.room()
            if room == 0:
                with self.work:
                    self.work.wait(ROOM_RECHECK)
                continue
            jobs, wait = self.claim_batch(room)
            self.hand_out(jobs)
            if wait:  # queue.rate_limit: no token left for now
                self.stop.sleep(wait)
            elif len(jobs) < room:
                return  # nothing more for us now: wait for the doorbell

    def room(self):
        """How many jobs to claim now: `ready` is refilled to two jobs per thread
        once it is down to one per thread, so that a thread finishing a mail
        nearly always finds its next one there and writes its envelope after the
        dot (one round trip per mail). With one per thread, refilled at half, a
        third of the mails found `ready` empty and cost two round trips."""
        with self.work:
            waiting = len(self.ready)
        if waiting >= self.threads:
            return 0
        return min(2 * self.threads - waiting, max(self.config.queue.batch_size, self.threads))

    def claim_batch(self, limit):
        """Claim up to `limit` jobs (step 2); (jobs, seconds to wait for a token)."""
        consumer_id = self.claims.consumer_id
        if self.claim_unknown:
            db.run(
                self.claim_conn,
                "free_unknown_claims",
                consumer=consumer_id,
                held=self.claims.held_ids(),
            )
            self.claim_unknown = False
        rate = self.config.queue.rate_limit
        try:
            if rate is None:
                rows, wait = (
                    db.run_dicts(self.claim_conn, "claim_batch", consumer=consumer_id, limit=limit),
                    0.0,
                )
            else:
                rows = db.run_dicts(
                    self.claim_conn,
                    "claim_paced_batch",
                    consumer=consumer_id,
                    limit=limit,
                    rate=rate,
                    burst=pacing.burst_for(rate),
                )
                left = rows[0]["tokens_left"] if rows else 1.0
                rows = [row for row in rows if row["queue_id"] is not None]
                wait = (1 - left) / rate if len(rows) < limit and left < 1 else 0.0
        except db.CONNECTION_ERRORS:
            self.claim_unknown = True  # committed or not, we cannot tell
            raise
        attached = [row["job_id"] for row in rows if row["has_attachments"]]
        if attached:
            files = collections.defaultdict(list)
            for part in db.run_dicts(self.claim_conn, "attachments_of", job_ids=attached):
                files[part["job_id"]].append(part)
            for row in rows:
                row["attachments"] = files.get(row["job_id"], [])
        rows.sort(key=lambda row: (-row["priority"], row["queue_id"]))
        self.claims.add(rows)
        return rows, wait

    def hand_out(self, jobs):
        if jobs:
            with self.work:
                self.ready.extend(jobs)
                self.work.notify(len(jobs))

    def register(self):
        """A row in `consumers` for our claims (again, if our lease ran out)."""
        if self.claims.consumer_id is not None:
            return
        sent_at = time.monotonic()
        consumer_id = db.run(
            self.claim_conn,
            "register_consumer",
            label=self.name,
            lease=self.config.queue.claim_lease,
        )[0][0]
        self.claims.registered(consumer_id, sent_at)
        if self.on_registered:
            self.on_registered(consumer_id)

    def free_expired_claims(self):
        """At every poll: free the claims of consumers whose lease ran out."""
        if db.run(self.claim_conn, "free_expired_claims"):
            log.warning(
                "freed the claims of a consumer that stopped without a word "
                "(no heartbeat for longer than its lease)"
            )
            db.run(self.claim_conn, "ring_consumers")

    def drained(self):
        """--drain: nothing left in the queue table, and nothing of ours unrecorded."""
        return not self.claims.held_ids() and db.run(self.claim_conn, "queue_is_empty")[0][0]

    def app_name(self, role):
        return "mailqueue consumer (%s) %s" % (role, self.name)

    # ------------------------------------------------------- a sending thread

    def send_loop(self):
        """One thread: one SMTP connection, one mail in flight (step 3)."""
        sender = smtp.Sender(self.config.smtp)
        previous = None  # the ticket of our last mail whose content went out
        job = mail = None  # a job whose envelope is written, its replies not yet read
        while True:
            try:
                if job is None:
                    job, mail = self.take(sender, wait=True)
                    if job is None:
                        return  # stopping
                job, mail, previous = self.send_one(sender, job, mail, previous)
            except Exception as exc:  # a poison job must not take the thread down
                log.exception("unexpected error")
                sender.abort()
                if job is not None:
                    self.record_failure(
                        job,
                        smtp.SendError(
                            "unexpected error: %s: %s" % (type(exc).__name__, exc),
                            summary=type(exc).__name__,
                        ),
                    )
                job = mail = None

    def send_one(self, sender, job, mail, previous):
        """Read `job`'s envelope replies, send its content (with the next mail's
        envelope, if there is one) and hand its outcome to the recorder. Returns
        the next (job, mail, previous)."""
        try:
            refused = sender.envelope_replies(mail)
        except smtp.EnvelopeLost:
            return self.begin_again(sender, job, mail) + (previous,)
        except smtp.SendError as exc:
            self.record_failure(job, exc)
            return None, None, previous
        if not self.gate(previous, job):
            sender.abort()  # the server discards a mail whose content never ended
            return None, None, previous
        following = (None, None)
        if sender.mails_on_connection + 1 < self.config.smtp.max_messages_per_connection:
            following = self.take(sender, wait=False, begin=False)
        started = job["started"]
        try:
            sender.finish(mail, then=following[1])
            previous = self.record_sent(job, refused, started)
        except smtp.SendError as exc:
            previous = self.record_failure(job, exc)
        if sender.mails_on_connection >= self.config.smtp.max_messages_per_connection:
            sender.close()  # many relays cap mails per connection
        return following + (previous,)

    def take(self, sender, wait, begin=True):
        """The next job that can be sent, with its mail built and checked, and (if
        `begin`) its envelope written; (None, None) when there is none (stopping,
        or with wait=False, none ready)."""
        while True:
            job = self.next_job(wait)
            if job is None or not self.paced(job, wait):
                return None, None
            job["started"] = time.time()
            mail = self.prepare(job, sender)
            if mail is None:
                continue
            if not begin:
                return job, mail
            try:
                sender.begin(mail)
                self.smtp_down.over()
                return job, mail
            except smtp.EnvelopeLost:
                job, mail = self.begin_again(sender, job, mail)
                if job is not None:
                    return job, mail
            except smtp.SmtpUnavailable as exc:
                self.give_back(job)
                self.wait_for_smtp(sender, exc)

    def paced(self, job, wait):
        """Whether `job` may go now by the throttling governor (waiting for its
        turn if `wait`); if not, it goes back to the front of `ready`."""
        if wait:
            self.governor.wait_to_send(self.stop)
            if not self.stop.requested:
                return True
        elif self.governor.may_send():
            return True
        with self.work:
            if not self.stopping:
                self.ready.appendleft(job)
                self.work.notify()
                return False
        self.give_back(job)  # shut_down has taken `ready` already
        return False

    def begin_again(self, sender, job, mail):
        """The connection failed before the content: the server cannot have the
        mail. One more try on a new connection; then the job goes back."""
        try:
            sender.begin(mail)
            return job, mail
        except (smtp.EnvelopeLost, smtp.SmtpUnavailable) as exc:
            self.give_back(job)
            self.wait_for_smtp(sender, exc)
            return None, None

    def next_job(self, wait):
        """A claimed job from `ready` that is still ours, or None."""
        with self.work:
            while True:
                while self.ready and not self.stopping:
                    job = self.ready.popleft()
                    if self.claims.is_lost(job["queue_id"]):
                        self.drop(job)
                        continue
                    if len(self.ready) == self.threads - 1:
                        self.work.notify_all()  # the claimer refills
                    return job
                if not wait or self.stopping:
                    return None
                self.work.wait()

    def prepare(self, job, sender):
        """The job's mail, or None when it is not to be sent (its outcome is
        recorded, or it went back)."""
        if job["status"] != "queued":
            # The queue row of a job finished or changed by hand: nothing to send.
            log.info("job %s: dropped its queue row (job is %s)", job["job_id"], job["status"])
            self.drop(job)
            return None
        expires_at = job.get("expires_at")
        if expires_at is not None and expires_at <= datetime.datetime.now(datetime.timezone.utc):
            self.record_dead(
                job,
                "expired at %s before it could be sent (expires_at): not sent"
                % expires_at.isoformat(),
                attempted=0,
                summary="expired",
            )
            return None
        try:
            mail = self.composer.build(job, job.get("attachments", ()))
            sender.check(mail)
        except message.BadMail as exc:
            self.record_dead(job, str(exc), attempted=0, summary="bad input")
            return None
        except smtp.SendError as exc:  # the server cannot take it (SIZE, SMTPUTF8)
            self.record_dead(job, str(exc), attempted=0, summary=exc.summary)
            return None
        except smtp.SmtpUnavailable as exc:
            self.give_back(job)
            self.wait_for_smtp(sender, exc)
            return None
        except Exception as exc:  # a poison job must not take the thread down
            log.exception("job %s: unexpected error", job["job_id"])
            self.record_failure(
                job,
                smtp.SendError(
                    "unexpected error: %s: %s" % (type(exc).__name__, exc),
                    summary=type(exc).__name__,
                ),
            )
            return None
        return mail

    def gate(self, previous, job):
        """Whether `job`'s content may go now: this thread's previous outcome is
        durable and the claim still holds. Waits for both (up to smtp.timeout:
        the server is holding the mail open); False when the content must not go."""
        deadline = time.monotonic() + self.config.smtp.timeout
        # First our own previous outcome: its commit wakes this thread alone.
        while (
            previous is not None
            and not previous.done
            and not self.stopping
            and time.monotonic() <= deadline
        ):
            previous.durable.wait(GATE_RECHECK)
        with self.claims.changed:
            while True:
                lost = self.claims.is_lost(job["queue_id"])
                if self.stopping or lost:
                    break
                if (previous is None or previous.done) and self.claims.lease_holds():
                    return True
                if time.monotonic() > deadline:
                    break
                self.claims.changed.wait(GATE_RECHECK)
        if lost:
            self.drop(job)
        else:
            self.give_back(job)
        return False

    def wait_for_smtp(self, sender, exc):
        """No connection to the SMTP server: say so (once per try, for all the
        threads) and wait before this thread tries again."""
        sender.close()
        delay = self.smtp_down.failed(exc)
        self.stop.sleep(delay)

    # ------------------------------------------------------------- outcomes

    def record_sent(self, job, refused, started):
        self.governor.sent()
        self.progress.count("sent")
        note = (
            "sent, but the server refused some recipients: %s" % "; ".join(refused)
            if refused
            else None
        )
        return self.recorder.submit(
            Outcome(job["queue_id"], job["job_id"], "sent", 1, note, smtp_code=250, started=started)
        )

    def record_failure(self, job, exc):
        """A send failed: released if throttled (no attempt spent), else failed
        or dead. Returns the recorder's ticket."""
        if exc.throttled:
            self.governor.throttled(exc.summary)
            self.progress.count("throttled")
            return self.recorder.submit(Outcome(job["queue_id"], job["job_id"], "released"))
        attempts = job["attempts"] + 1
        if exc.permanent or attempts >= self.config.queue.max_attempts:
            return self.record_dead(job, str(exc), attempted=1, summary=exc.summary, code=exc.code)
        delay = retry_delay(attempts, self.config.queue)
        log.warning(
            "job %s: attempt %d failed (%s); retry in %.0f s",
            job["job_id"],
            attempts,
            exc.summary,
            delay,
        )
        self.progress.count("failed")
        return self.recorder.submit(
            Outcome(
                job["queue_id"],
                job["job_id"],
                "failed",
                1,
                str(exc),
                delay,
                exc.code,
                job.get("started"),
            )
        )

    def record_dead(self, job, error, attempted, summary, code=None):
        log.warning("job %s: dead (%s; see last_error)", job["job_id"], summary)
        self.progress.count("dead")
        return self.recorder.submit(
            Outcome(
                job["queue_id"],
                job["job_id"],
                "dead",
                attempted,
                error,
                smtp_code=code,
                started=job.get("started"),
            )
        )

    def give_back(self, job):
        """A job not sent, for no fault of its own: the next thread takes it, or,
        when stopping, it goes back to the queue."""
        if self.stopping:
            self.recorder.submit(Outcome(job["queue_id"], job["job_id"], "released"))
            return
        with self.work:
            self.ready.appendleft(job)
            self.work.notify()

    def drop(self, job):
        """A job that is no longer ours to send: its queue row goes if we hold it."""
        self.recorder.submit(Outcome(job["queue_id"], job["job_id"], "dropped"))

    # ------------------------------------------------------------- stopping

    def shut_down(self, senders):
        """Each mail in hand finishes (its reply waited for); the rest go back."""
        with self.work:
            self.stopping = True
            left, self.ready = list(self.ready), collections.deque()
            self.work.notify_all()
        with self.claims.changed:
            self.claims.changed.notify_all()
        for job in left:
            self.give_back(job)
        for thread in senders:
            thread.join()
        self.recorder.close(SHUTDOWN_GRACE, retire=True)


def retry_delay(attempts, queue_settings, rand=random.random):
    """Seconds to wait after failed attempt number `attempts` (1, 2, ...):
    retry_delay doubled for each earlier failure, up to max_retry_delay, plus up
    to 25% jitter so that jobs failed together do not retry together."""
    base = queue_settings.retry_delay * 2 ** min(attempts - 1, 32)
    base = min(base, queue_settings.max_retry_delay)
    return min(base * (1 + 0.25 * rand()), queue_settings.max_retry_delay)


class SmtpTrouble:
    """Whether this process's threads can reach the SMTP server; one log line per
    try while they cannot, however many threads try."""

    def __init__(self):
        self.lock = threading.Lock()
        self.since = None
        self.delay = SMTP_RETRY_MIN
        self.next_line = 0.0

    def active(self):
        return self.since is not None

    def failed(self, exc):
        """Seconds this thread waits before it tries again."""
        with self.lock:
            now = time.monotonic()
            if self.since is None:
                self.since, self.delay = now, SMTP_RETRY_MIN
            if now >= self.next_line:
                log.warning("%s; trying again in %.1f s", exc, self.delay)
                self.next_line = now + self.delay
                delay, self.delay = self.delay, min(self.delay * 2, SMTP_RETRY_MAX)
            else:
                delay = self.delay
            return delay * random.uniform(1.0, 1.5)

    def over(self):
        if self.since is None:
            return
        with self.lock:
            if self.since is not None:
                log.warning(
                    "the SMTP server can be reached again (after %.0f s)",
                    time.monotonic() - self.since,
                )
                self.since = None
        doorbell.ring()  # the claimer held back while it could not: claim again


class Progress:
    """One INFO line every PROGRESS_EVERY seconds while mail goes, never one per mail."""

    def __init__(self):
        self.counts = collections.Counter()
        self.lock = threading.Lock()
        self.since = time.monotonic()

    def count(self, what):
        with self.lock:
            self.counts[what] += 1

    def report(self, governor):
        now = time.monotonic()
        if now - self.since < PROGRESS_EVERY:
            return
        with self.lock:
            counts, self.counts = self.counts, collections.Counter()
        elapsed, self.since = now - self.since, now
        if counts:
            paced = (
                " (slowed to %.1f mails/s by throttling)" % governor.rate if governor.rate else ""
            )
            log.info(
                "in the last %.0f s: %d sent (%.1f/s), %d failed, %d dead, %d throttled%s",
                elapsed,
                counts["sent"],
                counts["sent"] / elapsed,
                counts["failed"],
                counts["dead"],
                counts["throttled"],
                paced,
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Send the mails waiting in the queue table.")
    cli.add_common_arguments(parser)
    parser.add_argument("--drain", action="store_true", help="exit once the queue table is empty")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="mails in flight at once, each on its own SMTP connection "
        "(default: queue.concurrency, 32)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="processes the mails in flight are spread over "
        "(default: queue.processes, or one per core)",
    )
    args = parser.parse_args(argv)
    for flag in ("concurrency", "processes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error("--%s must be at least 1" % flag)
    config = cli.start(args)
    stop = doorbell.Stop(farewell="finishing the mails in hand, then stopping")
    stop.install()
    cli.wait_for_database(config, stop, "consumer")
    cli.wait_for_smtp(config, stop)
    if stop.requested:
        return
    concurrency = args.concurrency or config.queue.concurrency
    processes = min(concurrency, args.processes or config.queue.processes or supervise.cores())
    sizes = supervise.split(concurrency, processes)
    log.info(
        "consuming from %s: %d mail(s) in flight over %d process(es)",
        db.where(config.database),
        concurrency,
        processes,
    )
    if processes == 1:
        Consumer(config, stop, sizes[0]).run(drain_only=args.drain)
    else:
        supervise.run_processes(
            config,
            stop,
            sizes,
            args.drain,
            lambda threads, registered: Consumer(config, stop, threads, registered),
        )
    log.info("stopped")


if __name__ == "__main__":
    main()
