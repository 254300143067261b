"""Move ready jobs from the `jobs` table into the `queue` table.

    python producer.py [--config config.json] [--once]

A job is ready when it is 'available', or 'failed' and its retry time (run_at)
has come. move_ready_jobs() queues it in one statement (sql/queries.sql,
move_ready_jobs): the job becomes 'queued' with start_time set and a queue row
appears, exactly once even with several producers, thanks to FOR UPDATE SKIP
LOCKED. The queue's trigger then wakes the consumers.

A job that names a stored template is rendered first (mailqueue.templates:
its subject and parts written into its own columns, or the job dead naming
the template and the error), and only then queued.

The producer LISTENs on `mailqueue_jobs`, rung by the schema's trigger when jobs
are inserted (or put back to 'available'), and also sweeps every POLL_INTERVAL
for retries that have come due. Every HEAL_INTERVAL it also gives a queue row
back to any job that is 'queued' without one (an admin's TRUNCATE queue): no job
strands silently. --once moves what is ready now and exits. Under steady
traffic it logs one progress line every PROGRESS_EVERY seconds at most, never
one per batch.
"""

import argparse
import logging
import time

from mailqueue import runtime

runtime.require_dependencies("producer.py")  # one line, not a traceback, outside the venv

from mailqueue import cli, db, doorbell, templates  # noqa: E402

log = logging.getLogger("producer")

POLL_INTERVAL = 1.0  # seconds: how late a retry may be queued after its run_at
HEAL_INTERVAL = 30.0  # seconds: how long a queued job without a queue row may wait
JOBS_CHANNEL = "mailqueue_jobs"
PROGRESS_EVERY = 10.0  # seconds between two progress lines in the log


def move_ready_jobs(conn, batch_size, renderer=None):
    """Render the due jobs that wait for their template, then queue every job
    that is ready now, batch_size per statement (each its own transaction:
    `conn` is in autocommit mode); return (queued, rendered, dead)."""
    rendered, dead = templates.render_ready_jobs(conn, renderer or templates.Renderer(), batch_size)
    total = 0
    while True:
        moved = db.run(conn, "move_ready_jobs", limit=batch_size)
        total += moved
        if moved < batch_size:
            return total, rendered, dead


class Progress:
    """What the producer did, logged as one INFO line every PROGRESS_EVERY
    seconds at most (a line per INSERT would flood the log under light traffic)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.since = clock()
        self.queued = self.rendered = self.dead = 0

    def add(self, queued, rendered, dead):
        self.queued += queued
        self.rendered += rendered
        self.dead += dead

    def report(self):
        now = self.clock()
        if now - self.since < PROGRESS_EVERY:
            return
        elapsed, self.since = now - self.since, now
        if self.queued or self.rendered or self.dead:
            log.info(
                "in the last %.0f s: queued %d job(s), rendered %d template(s), "
                "%d dead on a template error",
                elapsed,
                self.queued,
                self.rendered,
                self.dead,
            )
        self.queued = self.rendered = self.dead = 0


class Producer:
    def __init__(self, config, stop):
        self.config = config
        self.stop = stop
        self.next_heal = 0.0
        self.renderer = templates.Renderer()  # keeps compiled templates between sweeps
        self.progress = Progress()

    def run(self):
        doorbell.run_until_stopped(self.serve, self.stop, "producer")

    def serve(self, working):
        listen_conn = conn = None
        try:
            listen_conn = db.connect(self.config.listen_database, "mailqueue producer (listen)")
            conn = db.connect(self.config.database, "mailqueue producer", wait_for_flush=False)
            working()
            for _ in doorbell.wakeups(listen_conn, JOBS_CHANNEL, POLL_INTERVAL, self.stop):
                self.progress.add(
                    *move_ready_jobs(conn, self.config.queue.producer_batch_size, self.renderer)
                )
                self.progress.report()
                if time.monotonic() >= self.next_heal:
                    self.heal(conn)
            return True  # stop requested
        finally:
            db.close_quietly(listen_conn)
            db.close_quietly(conn)

    def heal(self, conn):
        """Queue rows for queued jobs that lost theirs (logged: it should not happen)."""
        self.next_heal = time.monotonic() + HEAL_INTERVAL
        healed = db.run(conn, "requeue_stranded_jobs")
        if healed:
            log.warning(
                "%d queued job(s) had no queue row (removed by hand?): queued again", healed
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Move ready jobs into the queue table.")
    cli.add_common_arguments(parser)
    parser.add_argument("--once", action="store_true", help="move what is ready now, then exit")
    args = parser.parse_args(argv)
    config = cli.start(args)
    stop = doorbell.Stop()
    stop.install()
    cli.wait_for_database(config, stop, "producer")
    if stop.requested:
        return
    if args.once:
        conn = None
        try:
            conn = db.connect(config.database, "mailqueue producer")
            moved, rendered, dead = move_ready_jobs(conn, config.queue.producer_batch_size)
        except db.DatabaseUnavailable as exc:
            raise SystemExit("error: %s" % exc) from None
        except db.CONNECTION_ERRORS as exc:
            raise SystemExit("error: %s" % db.describe(exc, config.database)) from None
        finally:
            db.close_quietly(conn)
        log.info(
            "queued %d job(s), rendered %d template(s), %d dead on a template error",
            moved,
            rendered,
            dead,
        )
        return
    log.info("producing into %s", db.where(config.database))
    Producer(config, stop).run()
    log.info("stopped")


if __name__ == "__main__":
    main()
