"""A consumer process's claimer: it takes queue rows for the sending threads.

It runs on the main thread, woken by the doorbell (mailqueue/doorbell.py: every
notification, every ring from a sending thread, every POLL_INTERVAL). Each wake-up
frees the claims of consumers whose lease ran out (at most every SWEEP_EVERY,
also while this one has a backlog of its own), then claims rows (sql/queries.sql,
claim_batch) until `ready` holds two jobs per sending thread: the claim is
committed at once and held under this process's lease (mailqueue/claims.py). A
claimed job is registered before anything else is read for it, so that a
connection lost after the claim strands nothing: the jobs whose files could not
be read go back to the queue. Attachment bytes held are capped
(queue.max_claimed_bytes): a claim takes fewer jobs when their files are big.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from mailqueue import db, doorbell, outcomes, pacing
from mailqueue.jobs import Job

if TYPE_CHECKING:
    import psycopg2.extensions

    from mailqueue.claims import Claims
    from mailqueue.config import Config
    from mailqueue.connections import ConnectionGate
    from mailqueue.doorbell import Stop
    from mailqueue.jobs import ReadyJobs
    from mailqueue.recorder import Recorder

log = logging.getLogger("consumer")

POLL_INTERVAL = 2.0  # seconds: the longest a consumer waits without looking at the queue
DRAIN_RECHECK = 0.05  # seconds: --drain looks this often at rows others hold
ROOM_RECHECK = 0.1  # seconds: a full `ready` is looked at again this often
QUEUE_CHANNEL = "mailqueue_queue"  # rung when rows enter the queue
FETCH_BYTES = 32 * 1024 * 1024  # attachment bytes read in one statement at most


class Claimer:
    def __init__(
        self,
        config: Config,
        name: str,
        claims: Claims,
        ready: ReadyJobs,
        recorder: Recorder,
        gate: ConnectionGate,
        threads: int,
        stop: Stop,
        on_registered: Optional[Callable[[int], None]] = None,
        on_wakeup: Optional[Callable[[], None]] = None,
    ) -> None:
        self.config = config
        self.name = name
        self.claims = claims
        self.ready = ready
        self.recorder = recorder
        self.gate = gate
        self.threads = threads
        self.stop = stop
        self.on_registered = on_registered  # the supervisor learns our consumer_id
        self.on_wakeup = on_wakeup  # progress lines
        self.conn: Optional[psycopg2.extensions.connection] = None
        self.claim_unknown = False  # a claim's reply was lost: it may have been committed
        self.sweep_every = min(POLL_INTERVAL, config.queue.claim_lease / 2)
        self.fetch_bytes = FETCH_BYTES
        self.next_sweep = 0.0

    def app_name(self, role: str) -> str:
        return "mailqueue consumer (%s) %s" % (role, self.name)

    def serve(self, working: Callable[[], None], drain_only: bool) -> bool:
        listen_conn = None
        try:
            lease = self.config.queue.claim_lease
            # A round trip longer than that is a cut network (db._Watchdog): the
            # claim may read attachments, so it has twice the lease.
            self.conn = db.connect(self.config.database, self.app_name("claim"), deadline=2 * lease)
            listen_conn = db.connect(
                self.config.listen_database, self.app_name("listen"), deadline=lease
            )
            self.register()
            working()
            for _ in doorbell.wakeups(listen_conn, QUEUE_CHANNEL, POLL_INTERVAL, self.stop):
                self.drain()
                while drain_only and not self.stop.requested and not self.drained():
                    self.claims.wait(DRAIN_RECHECK)
                    self.drain()
                if drain_only:
                    return True
                if self.on_wakeup:
                    self.on_wakeup()
            return True  # stop requested
        finally:
            db.close_quietly(listen_conn)
            db.close_quietly(self.conn)
            self.conn = None

    def drain(self) -> None:
        """Claim queue rows until the queue has nothing left for us, or `ready` is
        full and the threads are busy."""
        while not self.stop.requested:
            self.sweep()
            self.register()
            if self.gate.down:
                return  # nothing is claimed while no mail can go; the gate rings when it can
            room = self.room()
            if room == 0:
                if self.over_budget():  # until an outcome frees some bytes
                    self.claims.wait(ROOM_RECHECK)
                else:
                    self.ready.wait_for_room(self.threads, ROOM_RECHECK)
                continue
            jobs, wait = self.claim_batch(room)
            self.ready.put(jobs)
            if wait:  # queue.rate_limit: no token left for now
                self.stop.sleep(wait)
            elif len(jobs) < room and not self.over_budget():
                return  # nothing more for us now: wait for the doorbell

    def room(self) -> int:
        """How many jobs to claim now: `ready` is refilled to two jobs per thread
        once it is down to one per thread, so that a thread finishing a mail
        nearly always finds its next one there and writes its envelope after the
        dot (one round trip per mail). None while the attachment bytes held are
        at the cap."""
        waiting = len(self.ready)
        if waiting >= self.threads or self.over_budget():
            return 0
        return min(2 * self.threads - waiting, max(self.config.queue.batch_size, self.threads))

    def over_budget(self) -> bool:
        return self.claims.bytes_held >= self.config.queue.max_claimed_bytes

    def sweep(self) -> None:
        """Free the claims of consumers whose lease ran out: at every wake-up, and
        every sweep_every while a backlog keeps this one busy."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + self.sweep_every
        if db.run(self.conn, "free_expired_claims"):
            log.warning(
                "freed the claims of a consumer that stopped without a word "
                "(no heartbeat for longer than its lease)"
            )
            db.run(self.conn, "ring_consumers")

    def claim_batch(self, limit: int) -> tuple[list[Job], float]:
        """Claim up to `limit` jobs; (jobs, seconds to wait for a token)."""
        consumer_id = self.claims.consumer_id
        if self.claim_unknown:
            db.run(
                self.conn, "free_unknown_claims", consumer=consumer_id, held=self.claims.held_ids()
            )
            self.claim_unknown = False
        budget = max(0, self.config.queue.max_claimed_bytes - self.claims.bytes_held)
        common = dict(
            consumer=consumer_id, limit=limit, budget=budget, alone=not self.claims.held_ids()
        )
        rate = self.config.queue.rate_limit
        try:
            if rate is None:
                rows, wait = db.run_dicts(self.conn, "claim_batch", **common), 0.0
            else:
                rows = db.run_dicts(
                    self.conn,
                    "claim_paced_batch",
                    rate=rate,
                    burst=pacing.burst_for(rate),
                    **common,
                )
                left = rows[0]["tokens_left"] if rows else 1.0
                rows = [row for row in rows if row["queue_id"] is not None]
                for row in rows:
                    del row["tokens_left"]
                wait = (1 - left) / rate if len(rows) < limit and left < 1 else 0.0
        except db.CONNECTION_ERRORS:
            self.claim_unknown = True  # committed or not, we cannot tell
            raise
        jobs = [Job.from_claim(row) for row in rows]
        jobs.sort(key=lambda job: (-job.columns["priority"], job.queue_id))
        self.claims.add(jobs)  # ours now: from here on, each gets an outcome
        return self.with_attachments(jobs), wait

    def with_attachments(self, jobs: list[Job]) -> list[Job]:
        """Read the files of the jobs that have some, a few jobs per statement (one
        job per statement once a statement timed out: a DBA's statement_timeout).
        A job whose files cannot be read goes back to the queue, a deferral; a
        lost connection gives back every job not read yet, and is raised after."""
        unread = [job for job in jobs if job.attachment_bytes]
        failed: list[Job] = []
        while unread:
            group = _groups(unread, self.fetch_bytes)[0]
            try:
                files: dict[int, list[dict[str, Any]]] = {job.job_id: [] for job in group}
                for part in db.run_dicts(self.conn, "attachments_of", job_ids=list(files)):
                    files[part["job_id"]].append(part)
            except db.Error as exc:
                lost = isinstance(exc, db.CONNECTION_ERRORS)
                if not lost and len(group) > 1:
                    self.fetch_bytes = 1  # one job per statement from now on
                    continue
                for job in unread if lost else group:
                    failed.append(job)
                    self.recorder.submit(
                        outcomes.put_back(
                            job,
                            "could not read its attachments: %s" % db.describe(exc),
                            self.config.queue,
                            time.monotonic(),
                            at_once=True,
                        )
                    )
                if lost:  # the rest of the batch goes back too, nothing spent
                    for job in jobs:
                        if job not in failed:
                            self.recorder.submit(outcomes.handed_back(job))
                    raise
                unread = unread[len(group) :]
                continue
            for job in group:
                job.attachments = files[job.job_id]
            unread = unread[len(group) :]
        return [job for job in jobs if job not in failed]

    def register(self) -> None:
        """A row in `consumers` for our claims (again, if our lease ran out)."""
        if self.claims.consumer_id is not None:
            return
        sent_at = time.monotonic()
        consumer_id = db.run(
            self.conn, "register_consumer", label=self.name, lease=self.config.queue.claim_lease
        )[0][0]
        self.claims.registered(consumer_id, sent_at)
        if self.on_registered:
            self.on_registered(consumer_id)

    def drained(self) -> bool:
        """--drain: nothing left in the queue table, and nothing of ours unrecorded."""
        self.sweep()
        return not self.claims.held_ids() and db.run(self.conn, "queue_is_empty")[0][0]


def _groups(jobs: list[Job], most_bytes: int) -> list[list[Job]]:
    """Jobs in order, in groups of at most `most_bytes` of files (one job may be more)."""
    groups: list[list[Job]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.attachment_bytes > most_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.attachment_bytes
    return groups
