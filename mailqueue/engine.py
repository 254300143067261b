"""A consumer process: the claimer, the sending threads and the recorder, wired.

consumer.py tells the pattern; this module builds one process of it. Each piece
has a module of its own: mailqueue/claimer.py takes queue rows, mailqueue/sending.py
sends them (one outcome per job, mailqueue/outcomes.py), mailqueue/recorder.py
commits the outcomes and keeps the lease (mailqueue/claims.py), mailqueue/pacing.py
and mailqueue/connections.py are the brakes a relay asks for.
"""

from __future__ import annotations

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
from mailqueue.sending import SendingThread

if TYPE_CHECKING:
    from mailqueue.config import Config
    from mailqueue.doorbell import Stop

SHUTDOWN_GRACE = 10.0  # seconds to record the last outcomes when stopping


class Consumer:
    def __init__(
        self,
        config: Config,
        stop: Stop,
        threads: int,
        on_registered: Optional[Callable[[int], None]] = None,
    ) -> None:
        self.config = config
        self.stop = stop
        self.threads = threads
        name = "%s:%d" % (socket.gethostname(), os.getpid())
        self.claims = Claims(config.queue.claim_lease)
        self.ready = ReadyJobs()
        self.progress = Progress()
        self.governor = pacing.Governor()
        self.gate = ConnectionGate(
            "%s:%s" % (config.smtp.host, config.smtp.port), threads, on_back=doorbell.ring
        )
        self.recorder = Recorder(
            config.database, self.claims, "mailqueue consumer (record) %s" % name, stop
        )
        self.claimer = Claimer(
            config,
            name,
            self.claims,
            self.ready,
            self.recorder,
            self.gate,
            threads,
            stop,
            on_registered,
            on_wakeup=lambda: self.progress.report(self.governor),
        )
        composer = message.Composer(config.smtp)
        self.senders = [
            SendingThread(
                config.smtp,
                config.queue,
                composer,
                self.ready,
                self.claims,
                self.recorder,
                self.governor,
                self.gate,
                self.progress,
                stop,
            )
            for _ in range(threads)
        ]

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
        for job in self.ready.close():
            self.recorder.submit(outcomes.handed_back(job))
        self.gate.close()
        with self.claims.changed:
            self.claims.changed.notify_all()
        for thread in threads:
            thread.join()
        self.recorder.close(SHUTDOWN_GRACE, retire=True)
