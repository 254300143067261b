"""How many SMTP connections a consumer process holds to a relay, and when it
tries again one that cannot be reached.

A relay may cap the connections it takes from one client (Postfix's
smtpd_client_connection_count_limit, Exim's smtp_accept_max_per_host: "421 ...
too many connections from ..."). Like Postfix's own client, a process then uses
as many connections as the relay took, keeps sending on them, and tries one more
now and then (RAISE_EVERY) while no such reply comes. A relay that cannot be
reached is tried by one thread at a time (a slow start: while no connection is
open, one thread connects and the others wait), with a growing wait between
tries, one log line per try, and one when it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from mailqueue import replies
from mailqueue.backoff import Backoff

if TYPE_CHECKING:
    from mailqueue.doorbell import Stop
    from mailqueue.smtp import SmtpUnavailable

log = logging.getLogger(__name__)

RAISE_EVERY = 30.0  # seconds without a "too many connections": one more connection may be tried
WAIT_STEP = 0.2  # seconds: a thread waiting for its turn looks again this often at the latest


class ConnectionGate:
    """The connections of one process to one relay: `most` at most (its sending
    threads), fewer when the relay says so. Every method is thread-safe."""

    def __init__(
        self,
        relay: str,
        most: int,
        clock: Callable[[], float] = time.monotonic,
        on_back: Callable[[], None] | None = None,
        on_trouble: Callable[[], None] | None = None,
    ) -> None:
        self.relay = relay
        self.most = most
        self.limit = most
        self.clock = clock
        self.on_back = on_back  # called when a relay that could not be reached is back
        self.on_trouble = on_trouble  # called when a try failed (the claimer looks)
        self.changed = threading.Condition()
        self.held = 0  # slots reserved: connections open, being opened, or about to be
        self.connecting = 0  # connections being opened
        self.open = 0  # connections open
        self.down_since: float | None = None  # no connection could be made since then
        self.retry_at = 0.0
        self.backoff = Backoff(0.5, 30.0)
        self.last_refusal = clock()
        self.closed = False
        self.failures = 0  # tries that found the relay unusable (mailqueue/routing.py reads it)
        self.successes = 0  # connections opened, and probes that worked
        self.last_error: str | None = None

    @property
    def down(self) -> bool:
        """No connection is open, and the last try failed."""
        return self.down_since is not None and self.open == 0

    def reserve(self, stop: Stop) -> bool:
        """Wait, holding no job, for a connection slot; False when stopping."""
        with self.changed:
            while not (stop.requested or self.closed):
                self._raise(self.clock())
                if self.held < self.limit:
                    self.held += 1
                    return True
                self.changed.wait(WAIT_STEP)
            return False

    def may_connect(self, timeout: float) -> bool:
        """Wait, up to `timeout`, for the right to open the connection of a slot
        reserved: within the limit, not before the next try is due, and while no
        connection is open, one at a time (a slow start). False: the caller gives
        its job back and its slot up."""
        deadline = self.clock() + timeout
        with self.changed:
            while not self.closed:
                now = self.clock()
                first = self.open == 0 and self.connecting > 0
                if self.open + self.connecting < self.limit and not first and now >= self.retry_at:
                    self.connecting += 1
                    return True
                if now >= deadline:
                    return False
                self.changed.wait(min(WAIT_STEP, deadline - now))
            return False

    def opened(self) -> None:
        """The connection of a slot is open."""
        with self.changed:
            self.connecting -= 1
            self.open += 1
        self.recovered()

    def released(self, was_open: bool, was_connecting: bool = False) -> None:
        """A slot is given up: its connection closed (`was_open`), or it was
        never opened (stopping; `was_connecting`: after may_connect said yes)."""
        with self.changed:
            self.held -= 1
            if was_open:
                self.open -= 1
            if was_connecting:
                self.connecting -= 1
            self.changed.notify_all()

    def refused(self, exc: SmtpUnavailable) -> None:
        """Opening a slot's connection failed with `exc` (the slot is released)."""
        with self.changed:
            self.connecting -= 1
            self.held -= 1
            now = self.clock()
            if exc.verdict == replies.FEWER_CONNECTIONS and self.open > 0:
                self.last_refusal = now
                if self.open < self.limit:
                    log.warning(
                        "the SMTP relay %s takes no more connections from us (%s): "
                        "using %d from this process",
                        self.relay,
                        exc,
                        self.open,
                    )
                    self.limit = self.open
            else:
                if exc.verdict == replies.FEWER_CONNECTIONS:
                    self.last_refusal = now
                    self.limit = 1
                self._down(exc, now)
            self.changed.notify_all()
        if self.on_trouble is not None:
            self.on_trouble()

    def failed(self, exc: SmtpUnavailable) -> None:
        """An open connection found the relay unable to take mail (a 421 at MAIL
        FROM): as a refused connection, for the relay's health (its slot is
        released as the connection closes)."""
        with self.changed:
            self._down(exc, self.clock())
            self.changed.notify_all()
        if self.on_trouble is not None:
            self.on_trouble()

    def _down(self, exc: SmtpUnavailable, now: float) -> None:
        if self.down_since is None:
            self.down_since = now
        self.failures += 1
        self.last_error = str(exc)
        wait = self.backoff.next()
        self.retry_at = now + wait
        log.warning("%s; trying again in %.1f s", exc, wait)

    def recovered(self) -> None:
        """A connection opened, or a probe (mailqueue/routing.py) could connect:
        the relay works; if it did not, it is back (said once, and the claimer rung)."""
        with self.changed:
            self.successes += 1
            back = None if self.down_since is None else self.clock() - self.down_since
            if back is not None:
                self.down_since, self.retry_at = None, 0.0
                self.backoff.reset()
            self.changed.notify_all()
        if back is not None:
            log.warning("the SMTP relay %s can be reached again (after %.0f s)", self.relay, back)
            if self.on_back is not None:
                self.on_back()

    def retry_now(self) -> None:
        """The next try may be made at once (this process won the right to probe)."""
        with self.changed:
            self.retry_at = 0.0
            self.changed.notify_all()

    def _raise(self, now: float) -> None:
        if self.limit < self.most and now - self.last_refusal >= RAISE_EVERY:
            self.limit += 1
            self.last_refusal = now

    def close(self) -> None:
        """Stopping: no thread waits for a slot any more."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
