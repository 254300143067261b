"""python -m mailqueue requeue | prune: the two commands that change jobs.

requeue puts dead or failed jobs back to available with attempts = 0; the
schema's trigger (jobs_ring_producer_on_retry) rings the producer's doorbell, so
they are queued at once. prune deletes completed and dead jobs that ended long
ago, with their deliveries and attachments. Both work in batches of BATCH jobs,
each its own short transaction, so that no lock is held for long and the
consumers, which lock jobs as they record outcomes, never wait behind them. Both
print how many jobs they changed; --dry-run changes nothing and prints the same
count. A progress bar goes to stderr when it is a terminal.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from mailqueue import db

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable

    from psycopg2.extensions import connection

BATCH = 1000  # jobs per transaction
FINISHED = ("completed", "dead", "uncertain", "suppressed", "bounced")


class ProgressBar:
    """`[#####.....] 500/1000` on a terminal, rewritten in place; nothing otherwise."""

    def __init__(
        self, total: int, what: str, stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.shown = self.stream.isatty() and total > 0
        self.total, self.what, self.width = total, what, width

    def update(self, done: int) -> None:
        if not self.shown:
            return
        done = min(done, self.total)
        filled = int(self.width * done / self.total)
        self.stream.write(
            "\r%s [%s%s] %d/%d"
            % (self.what, "#" * filled, "." * (self.width - filled), done, self.total)
        )
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def requeue(
    conn: connection,
    status: str,
    job_ids: Iterable[int] | None = None,
    since: float | None = None,
    dry_run: bool = False,
    batch: int = BATCH,
    stream: TextIO | None = None,
) -> int:
    """Put the `status` jobs (dead, failed or uncertain; among job_ids, last tried within
    `since` seconds) back to available; how many (would be) put back."""
    selection = dict(status=status, job_ids=list(job_ids) if job_ids else None, since=since)
    [(total,)] = db.run(conn, "ops_requeue_count", **selection)
    if dry_run:
        return total
    bar = ProgressBar(total, "requeue", stream)
    done = 0
    try:
        while True:
            [(count,)] = db.run(conn, "ops_requeue", limit=batch, **selection)
            done += count
            bar.update(done)
            if count < batch:
                return done
    finally:
        bar.close()


def prune(
    conn: connection,
    older_than: float,
    dry_run: bool = False,
    batch: int = BATCH,
    stream: TextIO | None = None,
) -> int:
    """Delete finished jobs (FINISHED) whose end_time is more than `older_than`
    seconds ago; how many were (would be) deleted. Never any other job."""
    [(total,)] = db.run(conn, "ops_prune_count", older_than=older_than)
    if dry_run:
        return total
    bar = ProgressBar(total, "prune", stream)
    done = 0
    try:
        for status in FINISHED:
            after = "-infinity"
            while True:
                [(count, last)] = db.run(
                    conn,
                    "ops_prune_batch",
                    status=status,
                    after=after,
                    older_than=older_than,
                    limit=batch,
                )
                done += count
                if count:  # the statuses with nothing to prune draw nothing
                    bar.update(done)
                if count < batch:
                    break
                after = last
        bar.update(done)
        return done
    finally:
        bar.close()


def add_requeue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status",
        required=True,
        choices=["dead", "failed", "uncertain"],
        help="which jobs to put back",
    )
    parser.add_argument(
        "--job", type=int, nargs="+", metavar="ID", dest="jobs", help="only these jobs"
    )
    parser.add_argument("--since", help="only jobs last tried within this long: 30d, 12h, 15m")
    parser.add_argument("--dry-run", action="store_true", help="change nothing; print the count")


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--older-than",
        required=True,
        help="delete finished jobs (completed, dead, uncertain, suppressed, bounced) "
        "that ended longer ago: 30d, 12h, 15m",
    )
    parser.add_argument("--dry-run", action="store_true", help="delete nothing; print the count")


def run_requeue(args: argparse.Namespace, conn: connection, since: float | None) -> None:
    count = requeue(conn, args.status, args.jobs, since, args.dry_run)
    if args.dry_run:
        print("would requeue %d %s job(s) (dry run: nothing changed)" % (count, args.status))
    else:
        print("requeued %d %s job(s)" % (count, args.status))


def run_prune(args: argparse.Namespace, conn: connection, older_than: float) -> None:
    count = prune(conn, older_than, args.dry_run)
    if args.dry_run:
        print(
            "would prune %d job(s) finished more than %s ago (dry run: nothing deleted)"
            % (count, args.older_than)
        )
    else:
        print("pruned %d job(s) finished more than %s ago" % (count, args.older_than))
