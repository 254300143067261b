"""A consumer process's recorder: group-committed outcomes, and the heartbeat.

Each sending thread hands the outcome of its mail to the recorder (submit) and
goes on; the recorder commits every outcome pending at that moment in one
statement (sql/queries.sql, record_outcomes), with no added wait: under light
load a group is one outcome, under heavy load one commit (one flush to disk)
serves many mails. A thread sends its next mail's content only once its previous
outcome is durable (Ticket.done), so at most one mail per thread is ever sent and
not recorded.

Recording is guarded by the job's state, so an outcome recorded twice changes
nothing the second time: a group whose connection was lost is simply recorded
again on a new connection, and nothing is sent again. An error that keeps coming
back (a permission, a pooler) is retried with backoff while the threads wait: the
mails stay unsent, never sent twice.

On the same connection, every BEAT_INTERVAL, the heartbeat keeps the process's
claims (mailqueue/claims.py).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any

from mailqueue import db
from mailqueue.outcomes import Outcome

if TYPE_CHECKING:
    import psycopg2.extensions

    from mailqueue.claims import Claims
    from mailqueue.doorbell import Stop

log = logging.getLogger(__name__)

RETRY_MIN = 0.5  # seconds: first wait after a failed commit or heartbeat
RETRY_MAX = 30.0  # seconds: the wait doubles up to this
COMPLAIN_EVERY = 30.0  # seconds between two log lines about the same trouble
MAX_ERROR_CHARS = 2000  # last_error is for people; a longer reason is cut


class Ticket:
    """Whether an outcome handed to the recorder is durable yet. `durable` is
    set with `done`: the one thread waiting for this outcome wakes, not all of
    them (each commit used to wake every thread at the gate)."""

    __slots__ = ("done", "durable")

    def __init__(self) -> None:
        self.done = False
        self.durable = threading.Event()


class Recorder:
    def __init__(
        self, database_settings: dict[str, Any], claims: Claims, app_name: str, stop: Stop
    ) -> None:
        self.database_settings = database_settings
        self.claims = claims
        self.app_name = app_name  # of its connection, for pg_stat_activity
        self.stop = stop
        self.beat_interval = min(claims.lease / 5.0, 1.0)  # seconds
        self.pending: list[tuple[Outcome, Ticket]] = []  # (outcome, ticket)
        self.wakeup = threading.Condition()
        self.closing = False
        self.deadline = 0.0
        self.gave_up = 0  # outcomes that could not be recorded before the end
        self.conn: psycopg2.extensions.connection | None = None
        self.next_beat = 0.0
        self.trouble = _Complaints()
        self.thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, outcome: Outcome) -> Ticket:
        if outcome.error is not None:  # for people, and PostgreSQL text cannot hold NUL
            outcome.error = "".join(c if c >= " " or c in "\t" else " " for c in outcome.error)[
                :MAX_ERROR_CHARS
            ]
        ticket = Ticket()
        with self.wakeup:
            self.pending.append((outcome, ticket))
            self.wakeup.notify()
        return ticket

    def close(self, grace: float, retire: bool = False) -> None:
        """Record what is pending (trying for `grace` seconds at most), then stop.
        With `retire`, the consumer's row goes too: every claim it still holds is
        free at once, and the other consumers are rung."""
        with self.wakeup:
            self.closing = True
            self.deadline = time.monotonic() + grace
            self.wakeup.notify()
        self.thread.join()
        consumer_id = self.claims.consumer_id
        if retire and consumer_id is not None:
            try:
                conn = self._connection()
                db.run(conn, "retire_consumer", consumer=consumer_id)
                db.run(conn, "ring_consumers")
            except (db.Error, db.DatabaseUnavailable) as exc:
                log.warning(
                    "could not hand back the unsent claims (%s): they come back "
                    "when the lease runs out",
                    _describe(exc),
                )
        db.close_quietly(self.conn)
        self.conn = None

    def _run(self) -> None:
        while True:
            with self.wakeup:
                while not self.pending and not self.closing and time.monotonic() < self.next_beat:
                    self.wakeup.wait(self.next_beat - time.monotonic())
                group, self.pending = self.pending, []
                closing = self.closing
            if group:
                self._commit(group)
            if closing:
                with self.wakeup:
                    if not self.pending:
                        return
            elif time.monotonic() >= self.next_beat:
                self._beat()

    def _commit(self, group: list[tuple[Outcome, Ticket]]) -> None:
        outcomes = [o for o, _ in group]
        delay = RETRY_MIN
        while True:
            try:
                conn = self._connection()
                self._record(conn, outcomes)
                break
            except (db.Error, db.DatabaseUnavailable) as exc:
                if _about_the_data(exc) and self._isolate(outcomes):
                    break
                self._lost(exc)
                self.trouble.say(
                    "cannot record %d outcome(s) (%s); the mails wait, unsent, "
                    "until they are recorded" % (len(outcomes), _describe(exc))
                )
                if self.closing and time.monotonic() > self.deadline:
                    self.gave_up += len(outcomes)
                    log.error(
                        "stopping with %d mail(s) sent but not recorded: they will be sent again",
                        len(outcomes),
                    )
                    return
                self._wait_beating(delay * random.uniform(1.0, 1.5))
                delay = min(delay * 2, RETRY_MAX)
        self.trouble.over("outcomes are recorded again")
        with self.claims.changed:
            for _, ticket in group:
                ticket.done = True
        for _, ticket in group:
            ticket.durable.set()
        self.claims.forget([o.queue_id for o in outcomes])

    def _record(self, conn: psycopg2.extensions.connection, outcomes: list[Outcome]) -> None:
        db.run(
            conn, "record_outcomes", consumer=self.claims.consumer_id or -1, **_columns(outcomes)
        )
        if any(o.kind == "released" for o in outcomes):
            db.run(conn, "ring_consumers")  # rows are back: tell the others

    def _isolate(self, outcomes: list[Outcome]) -> bool:
        """A group refused for what one of its outcomes holds (not for the
        connection): each is recorded alone, and one refused alone is recorded as
        a failure carrying the error instead, so that the others are not held up
        with it. True when every outcome is recorded."""
        conn = self._connection()
        for outcome in outcomes:
            try:
                self._record(conn, [outcome])
            except db.CONNECTION_ERRORS:
                return False
            except db.Error as alone:
                log.error(
                    "job %s: its outcome cannot be recorded: %s", outcome.job_id, db.describe(alone)
                )
                plain = Outcome(
                    outcome.queue_id,
                    outcome.job_id,
                    "failed",
                    attempted=1,
                    error="its outcome (%s) could not be recorded: %s"
                    % (outcome.kind, db.describe(alone)),
                    delay=60.0,
                    delivery="failed",
                )
                try:
                    self._record(conn, [plain])
                except db.Error:
                    return False
        return True

    def _beat(self) -> None:
        consumer_id = self.claims.consumer_id
        if consumer_id is None:  # the claimer registers (again)
            self.next_beat = time.monotonic() + self.beat_interval
            return
        sent_at = time.monotonic()
        try:
            alive, lost = db.run(
                self._connection(), "heartbeat", consumer=consumer_id, held=self.claims.held_ids()
            )[0]
        except (db.Error, db.DatabaseUnavailable) as exc:
            self._lost(exc)
            self.trouble.say(
                "heartbeat failed (%s); sending stops if it keeps failing" % _describe(exc)
            )
            self.next_beat = time.monotonic() + RETRY_MIN
            return
        if not alive:
            log.warning(
                "this consumer's claims ran out (no heartbeat for %g s) and were "
                "freed for others; its unsent mails are theirs now",
                self.claims.lease,
            )
        self.claims.beat(sent_at, alive, lost)
        self.next_beat = sent_at + self.beat_interval

    def _connection(self) -> psycopg2.extensions.connection:
        if self.conn is None or self.conn.closed:
            # a round trip longer than the lease is a cut network (db._Watchdog)
            self.conn = db.connect(
                self.database_settings, self.app_name, deadline=max(self.claims.lease, 5.0)
            )
        return self.conn

    def _lost(self, exc: BaseException) -> None:
        if isinstance(exc, db.CONNECTION_ERRORS) or (self.conn is not None and self.conn.closed):
            db.close_quietly(self.conn)
            self.conn = None

    def _wait_beating(self, seconds: float) -> None:
        """Wait `seconds` before trying again, keeping the heartbeat going all the
        while: the mails of the outcomes that wait were sent, and if their claims
        lapsed, another consumer would send them again."""
        until = time.monotonic() + seconds
        while not (self.closing and time.monotonic() > self.deadline):
            now = time.monotonic()
            if now >= self.next_beat:
                self._beat()
                continue
            if now >= until:
                return
            with self.wakeup:
                self.wakeup.wait(min(until, self.next_beat) - now)


def _columns(outcomes: list[Outcome]) -> dict[str, list[Any]]:
    """record_outcomes' parameters: one array per field, one element per mail."""
    return dict(
        queue_ids=[o.queue_id for o in outcomes],
        job_ids=[o.job_id for o in outcomes],
        kinds=[o.kind for o in outcomes],
        attempted=[o.attempted for o in outcomes],
        deferred=[o.deferred for o in outcomes],
        errors=[o.error for o in outcomes],
        delays=[float(o.delay) for o in outcomes],
        codes=[o.smtp_code for o in outcomes],
        elapsed=[float(o.elapsed) for o in outcomes],
        pending=[o.pending_json for o in outcomes],
        deliveries=[o.delivery for o in outcomes],
        relays=[o.relay for o in outcomes],
    )


def _about_the_data(exc: BaseException) -> bool:
    """An error that some outcome's data may cause (a value too long, a constraint),
    as opposed to the connection, a permission or the server going away."""
    return isinstance(exc, (db.DataError, db.IntegrityError))


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, db.DatabaseUnavailable) else db.describe(exc)


class _Complaints:
    """One log line when a trouble starts, one every COMPLAIN_EVERY while it lasts,
    and one when it is over."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.last = 0.0

    def say(self, message: str) -> None:
        now = time.monotonic()
        if self.since is None or now - self.last > COMPLAIN_EVERY:
            log.warning(message)
            self.last = now
        if self.since is None:
            self.since = now

    def over(self, message: str) -> None:
        if self.since is not None:
            log.warning("%s (after %.0f s)", message, time.monotonic() - self.since)
            self.since = None
