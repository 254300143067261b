"""One INFO line every PROGRESS_EVERY seconds while mail goes, never one per mail."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailqueue.pacing import Governor

log = logging.getLogger("consumer")

PROGRESS_EVERY = 10.0  # seconds between two progress lines in the log


class Progress:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.since = time.monotonic()

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def report(self, governor: Governor) -> None:
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
                "in the last %.0f s: %d sent (%.1f/s), %d failed, %d deferred, %d dead, "
                "%d throttled%s",
                elapsed,
                counts["sent"],
                counts["sent"] / elapsed,
                counts["failed"],
                counts["deferred"],
                counts["dead"],
                counts["throttled"],
                paced,
            )
