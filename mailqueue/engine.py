"""A consumer process: the claimer, the sending threads and the recorder, wired.

consumer.py tells the pattern; this module builds one process of it. Each piece
has a module of its own: mailqueue/claimer.py takes queue rows, mailqueue/sending.py
sends them (one outcome per job, mailqueue/outcomes.py), mailqueue/recorder.py
commits the outcomes and keeps the lease (mailqueue/claims.py), mailqueue/pacing.py
and mailqueue/connections.py are the brakes a relay asks for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from typing import TYPE_CHECKING, Callable, Optional

from mailqueue import doorbell, message, outcomes, pacing
from mailqueue.claimer import Claimer
from mailqueue.claims import Claims
from mailqueue.connections import ConnectionGate
from mailqueue.jobs import ReadyJobs
from mailqueue.progress import Progress
from mailqueue.recorder import Recorder
from mailqueue.routing import Lane, Router
from mailqueue.sending import SendingThread

if TYPE_CHECKING:
    from mailqueue.config import Config
    from mailqueue.doorbell import Stop

SHUTDOWN_GRACE = 10.0  # seconds to record the last outcomes when stopping
LARGE_BUFFER = 1024 * 1024  # bytes: buffers this large are mapped, and unmapped when freed


def give_large_buffers_back() -> None:
    """glibc serves large buffers (a big attachment, its base64, the mail) from
    per-thread heaps once one has been freed (its mmap threshold rises), and a heap
    seldom shrinks: with 32 threads each building a 20 MB mail, a process kept
    gigabytes. A fixed threshold maps each large buffer on its own and unmaps it
    when freed, so memory follows queue.max_claimed_bytes. Nothing elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, LARGE_BUFFER)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class Consumer:
    def __init__(
        self,
        config: Config,
        stop: Stop,
        threads: int,
        on_registered: Optional[Callable[[int], None]] = None,
        processes: int = 1,
    ) -> None:
        give_large_buffers_back()
        self.config = config
        self.stop = stop
        name = "%s:%d" % (socket.gethostname(), os.getpid())
        self.claims = Claims(config.queue.claim_lease)
        self.progress = Progress()
        self.recorder = Recorder(
            config.database, self.claims, "mailqueue consumer (record) %s" % name, stop
        )
        self.lanes: dict[str, Lane] = {}
        self.senders: list[SendingThread] = []
        composers: dict[str, message.Composer] = {}
        for relay in config.relays.values():
            # relay.concurrency is per consumer, spread over its processes
            own = threads if relay.concurrency is None else -(-relay.concurrency // processes)
            lane = Lane(
                relay,
                ConnectionGate(
                    "%s (%s:%s)" % (relay.name, relay.host, relay.port),
                    own,
                    on_back=doorbell.ring,
                    on_trouble=doorbell.ring,
                ),
                pacing.Governor(),
                ReadyJobs(),
                own,
            )
            self.lanes[relay.name] = lane
            composer = composers[relay.name] = message.Composer(relay)
            self.senders += [
                SendingThread(
                    relay,
                    config.queue,
                    composer,
                    lane.ready,
                    self.claims,
                    self.recorder,
                    lane.governor,
                    lane.gate,
                    self.progress,
                    stop,
                )
                for _ in range(own)
            ]
        # the first relay's, shared by its threads (a test patches its build)
        self.composer = next(iter(composers.values()))
        self.threads = len(self.senders)
        self.claimer = Claimer(
            config,
            name,
            self.claims,
            None,  # type: ignore[arg-type]  # the router, below: it reads the claimer's connection
            self.recorder,
            self.threads,
            stop,
            on_registered,
            on_wakeup=self.on_wakeup,
        )
        self.router = Router(config, self.lanes, lambda: self.claimer.conn, self.recorder)
        self.claimer.router = self.router

    def on_wakeup(self) -> None:
        for lane in self.lanes.values():
            lane.governor.step()
        first = next(iter(self.lanes.values()))
        self.progress.report(first.governor)

    def run(self, drain_only: bool = False) -> None:
        """Serve until stopped; with drain_only, until the queue table is empty."""
        self.recorder.start()
        threads = [
            threading.Thread(target=sender.run, name="sender-%d" % i, daemon=True)
            for i, sender in enumerate(self.senders)
        ]
        for thread in threads:
            thread.start()
        try:
            doorbell.run_until_stopped(
                lambda working: self.claimer.serve(working, drain_only), self.stop, "consumer"
            )
        finally:
            self.shut_down(threads)

    def shut_down(self, threads: list[threading.Thread]) -> None:
        """Each mail in hand finishes (its reply waited for); the rest go back."""
        for job in self.router.give_back_held():
            self.recorder.submit(outcomes.handed_back(job))
        for lane in self.lanes.values():
            for job in lane.ready.close():
                self.recorder.submit(outcomes.handed_back(job))
            lane.gate.close()
        with self.claims.changed:
            self.claims.changed.notify_all()
        for thread in threads:
            thread.join()
        self.recorder.close(SHUTDOWN_GRACE, retire=True)
