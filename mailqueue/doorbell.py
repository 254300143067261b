"""Every wake-up of a loop, in one place: LISTEN/NOTIFY as a doorbell, rings from
the process's own threads, stop signals, and the poll timeout; and reconnecting
with backoff.

A notification only says "there may be work": its payload is empty, and every
wake-up (start-up, notification, ring, poll timeout) runs the same work
function. A lost notification therefore delays work by one poll interval at
most, never strands it. Shared by consumer.py and producer.py.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pgnotify
import pgnotify.notify

from mailqueue import db, smtp

if TYPE_CHECKING:
    import multiprocessing.context

    import psycopg2.extensions

log = logging.getLogger(__name__)

# pgnotify logs through logx, whose every call finds the caller's module with
# inspect.stack(): about 1 ms here, twice per wake-up, on the path of every mail.
# Its module gets a plain logger instead (the same name, and quiet: what it says
# at INFO, a signal received, we say ourselves).
pgnotify.notify.log = logging.getLogger("pgnotify")
pgnotify.notify.log.setLevel(logging.WARNING)

_wakeup_pipe: tuple[int, int] | None = None  # (read, write) of the pipe pgnotify's loop last made


def _new_wakeup_pipe() -> int:
    """pgnotify's get_wakeup_fd (the pipe that signals write to while its loop
    waits), but closing the previous loop's pipe, which pgnotify never closes:
    every reconnect would lose two file descriptors. One loop runs at a time in
    a process, so the previous one is done with it."""
    global _wakeup_pipe
    previous, (read, write) = _wakeup_pipe, os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    _wakeup_pipe = read, write
    for fd in previous or ():
        os.close(fd)
    return read


pgnotify.notify.get_wakeup_fd = _new_wakeup_pipe

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RECONNECT_DELAY_MIN = 0.5  # seconds: first wait after a lost connection
RECONNECT_DELAY_MAX = 30.0  # seconds: the wait doubles up to this


class Stop:
    """Set by SIGINT or SIGTERM; the loops check it between units of work.

    In a worker process (`parent` set), it is also set once the parent asks
    (through shared memory, see share()) or is gone."""

    def __init__(self, farewell: str = "stopping") -> None:
        self.farewell = farewell  # what a stop signal makes happen, for the log
        self._requested = False
        self.parent: int | None = None  # the parent's pid, in a worker process
        self._shared: Any = None

    def share(self, context: multiprocessing.context.BaseContext) -> None:
        """Before forking workers: let them see at once when this process stops."""
        self._shared = context.Value("b", 0, lock=False)

    @property
    def requested(self) -> bool:
        if self.parent is not None and not self._requested:
            if os.getppid() != self.parent or (self._shared is not None and self._shared.value):
                self._requested = True
        return self._requested

    @requested.setter
    def requested(self, value: bool) -> None:
        self._requested = value
        if value and self.parent is None and self._shared is not None:
            self._shared.value = 1

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._requested:
            log.info("%s received: %s", signal.Signals(signum).name, self.farewell)
        self.requested = True

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up early if a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


RING = int(signal.SIGUSR2)  # the byte a thread writes to wake the loop; never a stop signal


def ring() -> None:
    """Wake the loop of this process now (from any thread): it runs its work as on
    a notification. Before the loop waits for the first time, a ring is not
    needed: it works once at start-up anyway."""
    if _wakeup_pipe is not None:
        try:
            os.write(_wakeup_pipe[1], bytes([RING]))
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the loop has been rung already) or closed


def wakeups(
    listen_conn: psycopg2.extensions.connection, channel: str, poll_interval: float, stop: Stop
) -> Iterator[str]:
    """Yield "start-up" once LISTEN is in place, then "notification", "ring" or
    "timeout" at each wake-up, until a stop is requested. Runs on the main thread
    (signals can only be handled there).

    `listen_conn` must be an autocommit connection used for nothing else: a query
    on it would swallow notifications that pgnotify then never sees. The one
    query run on it, at each timeout, keeps it from being closed as idle
    (idle_session_timeout), and what it swallows is looked at at once.
    """
    pgnotify.start_listening(listen_conn, [channel])  # LISTEN before the first look
    if stop.requested:
        return
    yield "start-up"
    events = pgnotify.await_pg_notifications(
        listen_conn,
        timeout=poll_interval,
        yield_on_timeout=True,
        handle_signals=STOP_SIGNALS,
        notifications_as_list=True,
    )
    try:
        for event in events:
            # While it waits, pgnotify puts a do-nothing handler on our signals
            # and reports them here; ours must be back in place during the work.
            stop.install()
            if event == RING:
                reason = "ring"
            elif isinstance(event, int):  # a stop signal's number
                stop.requested = True
            elif event is None:
                reason = "timeout"
                db.run(listen_conn, "keep_alive")
                if listen_conn.notifies:
                    del listen_conn.notifies[:]
                    reason = "notification"
            else:
                reason = "notification"
            if stop.requested:
                return
            yield reason
    finally:
        events.close()


def run_until_stopped(serve: Callable[[Callable[[], None]], bool], stop: Stop, what: str) -> None:
    """Call serve(working) until it returns True or a stop is requested. A
    database or SMTP server that goes away, or is not up yet, is waited for with
    exponential backoff, one log line per try; serve calls working() once its
    connections work, and the next wait starts from the shortest again."""
    delay = [RECONNECT_DELAY_MIN]

    def working() -> None:
        delay[0] = RECONNECT_DELAY_MIN

    while not stop.requested:
        try:
            if serve(working):
                return
            continue
        except db.CONNECTION_ERRORS as exc:
            problem = "lost the database connection: %s" % db.describe(exc)
        except db.DatabaseUnavailable as exc:
            if exc.fatal:
                raise
            problem = "cannot reach the %s" % exc
        except smtp.SmtpUnavailable as exc:
            if not exc.retryable:
                raise
            problem = str(exc)
        wait = delay[0] * random.uniform(1.0, 1.5)
        log.warning("%s: %s; trying again in %.1f s", what, problem, wait)
        stop.sleep(wait)
        delay[0] = min(delay[0] * 2, RECONNECT_DELAY_MAX)
