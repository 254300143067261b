"""A claimed job, and the jobs a consumer process has claimed and not yet sent."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from mailqueue.message import Mail


@dataclass(eq=False)
class Job:
    """A queue row this process has claimed, with its job's columns as they were
    at the claim. Times are this process's monotonic clock, worked out from the
    database's own clock at the claim, so that a consumer whose wall clock is
    wrong still judges expiry and deferral time right."""

    queue_id: int
    job_id: int
    columns: dict[str, Any]  # the `jobs` row
    attachment_bytes: int = 0
    attachments: Optional[list[dict[str, Any]]] = None  # rows of `attachments`, once read
    expires_at: Optional[float] = None  # monotonic; None: never
    deferred_since: Optional[float] = None  # monotonic; None: not deferred
    started: Optional[float] = None  # monotonic: when this attempt began
    mail: Optional[Mail] = None  # built once, kept while the job waits for a connection
    relay: str = "default"  # the relay it goes to

    @classmethod
    def from_claim(cls, row: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> Job:
        """From a row of claim_batch: the jobs columns plus queue_id,
        attachment_bytes, expires_in and deferred_for (seconds, by the database's
        clock)."""
        now = clock()
        expires_in = row.pop("expires_in", None)
        deferred_for = row.pop("deferred_for", None)
        return cls(
            queue_id=row.pop("queue_id"),
            job_id=row["job_id"],
            attachment_bytes=int(row.pop("attachment_bytes", 0) or 0),
            columns=row,
            expires_at=None if expires_in is None else now + float(expires_in),
            deferred_since=None if deferred_for is None else now - float(deferred_for),
        )

    @property
    def attempts(self) -> int:
        return int(self.columns.get("attempts") or 0)

    @property
    def deferrals(self) -> int:
        return int(self.columns.get("deferrals") or 0)

    @property
    def pending_recipients(self) -> Optional[list[str]]:
        return self.columns.get("pending_recipients")

    @property
    def holds_when_uncertain(self) -> bool:
        return self.columns.get("on_uncertain") == "hold"

    def elapsed(self, clock: Callable[[], float] = time.monotonic) -> float:
        """Seconds since this attempt began (0 if it has not)."""
        return 0.0 if self.started is None else max(0.0, clock() - self.started)


class ReadyJobs:
    """Claimed jobs waiting for a sending thread, in order, shared by the claimer
    (put) and the sending threads (take). Two conditions on one lock: a job put
    wakes one sending thread, a job taken wakes the claimer, never everyone."""

    def __init__(self) -> None:
        self.jobs: collections.deque[Job] = collections.deque()
        self.lock = threading.Lock()
        self.has_jobs = threading.Condition(self.lock)
        self.has_room = threading.Condition(self.lock)
        self.closed = False  # stopping: nothing more is taken

    def put(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        with self.lock:
            self.jobs.extend(jobs)
            self.has_jobs.notify(len(jobs))

    def put_back(self, job: Job) -> bool:
        """A job taken and not sent, for no fault of its own: first in line again.
        False when stopping (the caller hands it back to the queue)."""
        with self.lock:
            if self.closed:
                return False
            self.jobs.appendleft(job)
            self.has_jobs.notify()
            return True

    def take(self, wait: bool) -> Optional[Job]:
        """The next job; with `wait`, waits for one (None once closed)."""
        with self.lock:
            while True:
                if self.jobs and not self.closed:
                    job = self.jobs.popleft()
                    self.has_room.notify()
                    return job
                if not wait or self.closed:
                    return None
                self.has_jobs.wait()

    def __len__(self) -> int:
        return len(self.jobs)

    def wait_for_room(self, below: int, timeout: float) -> None:
        """Until fewer than `below` jobs wait (or `timeout` seconds)."""
        with self.lock:
            if len(self.jobs) >= below and not self.closed:
                self.has_room.wait(timeout)

    def close(self) -> list[Job]:
        """Stop handing out jobs; the ones left, for the caller to give back."""
        with self.lock:
            self.closed = True
            left, self.jobs = list(self.jobs), collections.deque()
            self.has_jobs.notify_all()
            self.has_room.notify_all()
            return left
