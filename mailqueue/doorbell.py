"""LISTEN/NOTIFY as a doorbell, graceful stop, and reconnecting with backoff.

A notification only says "there may be work": its payload is empty, and every
wake-up (start-up, notification, poll timeout) runs the same work function. A
lost notification therefore delays work by one poll interval at most, never
strands it. Shared by consumer.py and producer.py.
"""

import logging
import os
import random
import signal
import time

import pgnotify
import pgnotify.notify

from mailqueue import db, smtp

log = logging.getLogger(__name__)

# pgnotify logs through logx, whose every call finds the caller's module with
# inspect.stack(): about 1 ms here, twice per wake-up, on the path of every mail.
# Its module gets a plain logger instead (the same name, and quiet: what it says
# at INFO, a signal received, we say ourselves).
pgnotify.notify.log = logging.getLogger("pgnotify")
pgnotify.notify.log.setLevel(logging.WARNING)

_wakeup_pipe = None  # (read, write) of the pipe pgnotify's loop last made


def _new_wakeup_pipe():
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
RECONNECT_DELAY_MIN = 0.5   # seconds: first wait after a lost connection
RECONNECT_DELAY_MAX = 30.0  # seconds: the wait doubles up to this


class Stop:
    """Set by SIGINT or SIGTERM; the loops check it between units of work.

    In a worker process (`parent` set), it is also set once the parent asks
    (through shared memory, see share()) or is gone."""

    def __init__(self):
        self._requested = False
        self.parent = None
        self._shared = None

    def share(self, context):
        """Before forking workers: let them see at once when this process stops."""
        self._shared = context.Value("b", 0, lock=False)

    @property
    def requested(self):
        if self.parent is not None and not self._requested:
            if os.getppid() != self.parent or (self._shared is not None and self._shared.value):
                self._requested = True
        return self._requested

    @requested.setter
    def requested(self, value):
        self._requested = value
        if value and self.parent is None and self._shared is not None:
            self._shared.value = 1

    def install(self):
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if not self._requested:
            log.info("%s received: finishing the mail in hand, then stopping",
                     signal.Signals(signum).name)
        self.requested = True

    def sleep(self, seconds):
        """Sleep, but wake up early if a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def wakeups(listen_conn, channel, poll_interval, stop):
    """Yield "start-up" once LISTEN is in place, then "notification" or "timeout"
    at each wake-up, until a stop is requested.

    `listen_conn` must be an autocommit connection used for nothing else: a query
    on it would swallow notifications that pgnotify then never sees.
    """
    pgnotify.start_listening(listen_conn, [channel])  # LISTEN before the first look
    if stop.requested:
        return
    yield "start-up"
    events = pgnotify.await_pg_notifications(
        listen_conn, timeout=poll_interval, yield_on_timeout=True,
        handle_signals=STOP_SIGNALS, notifications_as_list=True)
    try:
        for event in events:
            # While it waits, pgnotify puts a do-nothing handler on our signals
            # and reports them here; ours must be back in place during the work.
            stop.install()
            if isinstance(event, int):  # a signal number
                stop.requested = True
            if stop.requested:
                return
            yield "notification" if event else "timeout"
    finally:
        events.close()


def run_until_stopped(serve, stop, what):
    """Call serve() until it returns True or a stop is requested. A database or
    SMTP server that goes away is waited for, with exponential backoff."""
    delay = RECONNECT_DELAY_MIN
    while not stop.requested:
        started = time.monotonic()
        try:
            if serve():
                return
            continue
        except db.CONNECTION_ERRORS as exc:
            problem = "lost the database connection: %s" % db.describe(exc)
        except db.DatabaseUnavailable as exc:
            problem = str(exc)
        except smtp.SmtpUnavailable as exc:
            problem = str(exc)
        if time.monotonic() - started > 10 * RECONNECT_DELAY_MAX:
            delay = RECONNECT_DELAY_MIN  # it had been working for a good while
        wait = delay * random.uniform(1.0, 1.5)
        log.warning("%s %s; trying again in %.1f s", what, problem, wait)
        stop.sleep(wait)
        delay = min(delay * 2, RECONNECT_DELAY_MAX)
