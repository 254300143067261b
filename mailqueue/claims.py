"""What a consumer process holds: its claims, and whether they still hold.

A claim is a queue row whose claimed_by names this process's row in `consumers`.
It is committed at once (no transaction stays open while mail is sent), and it
holds as long as the process's heartbeat keeps its row alive: if the heartbeat
stops for `lease` seconds, anyone may free the claims (sql/queries.sql,
free_expired_claims). So the process must stop sending before that can happen,
by its own clock: a claim may be sent only until `lease - margin` seconds after
the last heartbeat that was *sent* and came back (the server set heartbeat_at
after we sent it, so its count starts later than ours). A heartbeat also names
the rows held that are no longer ours (a job deleted, its status changed by hand,
the queue truncated): those are not sent either.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from mailqueue.jobs import Job


def lease_margin(lease: float) -> float:
    """Seconds of the lease the process never uses: for the clocks, the time a
    write takes, and a heartbeat that comes back late."""
    return max(0.5, 0.2 * lease)


class Claims:
    def __init__(self, lease: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease = lease
        self.clock = clock
        self.changed = threading.Condition()  # notified on every heartbeat and outcome
        self.consumer_id: int | None = None
        # queue_id -> job, from the claim until its outcome is durable
        self.held: dict[int, Job] = {}
        self.bytes_held = 0  # attachment bytes of the jobs held (queue.max_claimed_bytes)
        self.lost: set[int] = set()  # queue_ids held that are no longer ours
        self.valid_until = 0.0

    def registered(self, consumer_id: int, sent_at: float) -> None:
        with self.changed:
            self.consumer_id = consumer_id
            self._renew(sent_at)

    def _renew(self, sent_at: float) -> None:
        self.valid_until = sent_at + self.lease - lease_margin(self.lease)
        self.changed.notify_all()

    def add(self, jobs: Iterable[Job]) -> None:
        with self.changed:
            for job in jobs:
                if job.queue_id not in self.held:
                    self.held[job.queue_id] = job
                    self.bytes_held += job.attachment_bytes

    def forget(self, queue_ids: Iterable[int]) -> None:
        """Their outcomes are durable (or they were never ours)."""
        with self.changed:
            for queue_id in queue_ids:
                job = self.held.pop(queue_id, None)
                if job is not None:
                    self.bytes_held -= job.attachment_bytes
                self.lost.discard(queue_id)
            self.changed.notify_all()

    def held_ids(self) -> list[int]:
        with self.changed:
            return list(self.held)

    def beat(self, sent_at: float, alive: bool, lost: Iterable[int]) -> None:
        """A heartbeat came back: the lease runs on from `sent_at`, or, if our row
        is gone (`alive` false), nothing we hold is ours any more."""
        with self.changed:
            if alive:
                self.lost.update(q for q in lost if q in self.held)
                self._renew(sent_at)
            else:
                self.lost.update(self.held)
                self.consumer_id = None
                self.valid_until = 0.0
                self.changed.notify_all()

    def is_lost(self, queue_id: int) -> bool:
        # No lock: a set's membership test is atomic under the GIL, and taking
        # the lock gave no stronger answer (a heartbeat may mark the claim lost
        # just after either way; the lease margin covers that window). Called
        # 3.5 times per mail; the lock was ~2 us of each.
        return queue_id in self.lost

    def lease_holds(self) -> bool:
        return self.consumer_id is not None and self.clock() < self.valid_until

    def wait(self, timeout: float | None) -> None:
        """Until something changes (a heartbeat, an outcome), or `timeout` seconds."""
        with self.changed:
            self.changed.wait(timeout)
