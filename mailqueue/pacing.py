"""How fast a consumer process may send mails: the server's throttling replies.

queue.rate_limit, the limit across every consumer, lives in PostgreSQL (the
token bucket of sql/queries.sql, claim_paced_batch). This module is the other
brake, local to one process: a Governor that slows down when the SMTP server
says we send too fast (SES's "454 Throttling failure", Gmail's "421 Try again
later"...), and speeds up again step by step while no such reply comes, the way
TCP finds a path's capacity: halve at once, climb back quickly to just under the
rate that was too fast, then probe past it slowly.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from mailqueue.doorbell import Stop

log = logging.getLogger(__name__)

MIN_RATE = 1.0  # mails per second: never slower than this
CUT_COOLDOWN = 1.0  # seconds: throttled replies within this time of a cut are one event
STEP_INTERVAL = 1.0  # seconds between two speed-ups
RECOVERED_AFTER = 10.0  # seconds without throttling, past the old ceiling: no limit
MEASURE_WINDOW = 2.0  # seconds of sent mails over which the rate is measured


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, wanted: int) -> int:
        """Up to `wanted` whole tokens, taken now."""
        self._refill()
        granted = max(0, min(wanted, int(self.tokens)))
        self.tokens -= granted
        return granted

    def wait_time(self) -> float:
        """Seconds until one whole token is there."""
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)


def burst_for(rate: float) -> float:
    """Tokens a bucket may save up: a twentieth of a second's worth (at least one),
    so that no one-second window sees much more than `rate` mails."""
    return max(1.0, rate / 20.0)


class Governor:
    """This process's own speed limit, set by the server's throttling replies.
    It paces the sends themselves, not the claims: the mails already claimed
    when the first throttling reply comes would otherwise all go at full speed,
    and be throttled too. Every method may be called from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.bucket: TokenBucket | None = None  # None: no limit
        self.ceiling: float | None = None  # the rate at which the server last throttled us
        self.last_cut = -CUT_COOLDOWN
        self.last_step = 0.0
        self.last_throttled = 0.0
        self.sent_at: collections.deque[float] = collections.deque()

    @property
    def rate(self) -> float | None:
        return self.bucket.rate if self.bucket else None

    def sent(self) -> None:
        with self.lock:
            now = self.clock()
            self.sent_at.append(now)
            while self.sent_at and self.sent_at[0] < now - MEASURE_WINDOW:
                self.sent_at.popleft()

    def measured_rate(self) -> float:
        """Mails sent per second lately (over MEASURE_WINDOW, or since the first
        of them if sending began more recently). Called with the lock held."""
        now = self.clock()
        while self.sent_at and self.sent_at[0] < now - MEASURE_WINDOW:
            self.sent_at.popleft()
        if not self.sent_at:
            return 0.0
        return len(self.sent_at) / max(0.25, now - self.sent_at[0])

    def throttled(self, reason: str) -> None:
        """The server said we send too fast: halve the rate (once per episode)."""
        with self.lock:
            self._throttled(reason)

    def _throttled(self, reason):
        now = self.clock()
        self.last_throttled = now
        if now - self.last_cut < CUT_COOLDOWN:
            return
        current = self.rate if self.bucket else max(self.measured_rate(), MIN_RATE)
        self.ceiling = current
        new_rate = max(MIN_RATE, current / 2)
        if self.bucket is None:
            log.warning(
                "the SMTP server throttles us (%s): slowing down to %.1f mails/s", reason, new_rate
            )
            self.bucket = TokenBucket(new_rate, burst_for(new_rate), self.clock)
            self.bucket.tokens = 0
        else:
            log.debug("throttled again: %.1f mails/s", new_rate)
            self._set_rate(new_rate)
        self.last_cut = self.last_step = now

    def _set_rate(self, rate):
        self.bucket.rate = rate
        self.bucket.burst = burst_for(rate)
        self.bucket.tokens = min(self.bucket.tokens, self.bucket.burst)

    def _step(self):
        """Speed up while no throttling comes (at most every STEP_INTERVAL)."""
        if self.bucket is None:
            return
        now = self.clock()
        if now - self.last_step < STEP_INTERVAL:
            return
        self.last_step = now
        rate = self.bucket.rate
        if rate < 0.9 * self.ceiling:
            rate = min(0.9 * self.ceiling, rate + 0.1 * self.ceiling)
        elif rate < self.ceiling:
            rate += 0.02 * self.ceiling
        else:
            rate *= 1.1
        if rate > self.ceiling and now - self.last_throttled > RECOVERED_AFTER:
            log.warning("no throttling for %.0f s: back to full speed", RECOVERED_AFTER)
            self.bucket = self.ceiling = None
            return
        self._set_rate(rate)

    def step(self) -> None:
        """Speed up while no throttling comes; the claiming thread calls it at
        every wake-up too, so that an idle process recovers as well."""
        with self.lock:
            self._step()

    def may_send(self) -> bool:
        """Whether a mail may go now (taking its token if so)."""
        with self.lock:
            self._step()
            return self.bucket is None or self.bucket.take(1) == 1

    def wait_to_send(self, stop: Stop) -> None:
        """Until a mail may go (or a stop is requested)."""
        while not self.may_send() and not stop.requested:
            with self.lock:
                wait = 0.0 if self.bucket is None else self.bucket.wait_time()
            stop.sleep(wait)
