"""Processes of one consumer: started, watched, replaced when one dies.

consumer.py spreads its mails in flight over a few processes (about one per
core), each running sending threads. This module forks them, starts another
when one dies, and frees a dead one's claims at once: a process that is gone can
send nothing more, so its claims need not wait for its lease to run out. When
this process is stopped (SIGINT, SIGTERM) the others are too; if it is killed,
they notice (doorbell.Stop) and stop by themselves, finishing their mails in hand.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, Sequence

from mailqueue import db

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from mailqueue.config import Config
    from mailqueue.doorbell import Stop

log = logging.getLogger("consumer")

RESTART_DELAY = 1.0  # seconds before replacing a process that died


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` whole numbers that differ by one at most."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_processes(
    config: Config,
    stop: Stop,
    sizes: Sequence[int],
    drain_only: bool,
    make_consumer: Callable[[int, Callable[[int], None]], Any],
) -> None:
    """One process per entry of `sizes` (its number of sending threads), each
    running make_consumer(threads, on_registered).run(drain_only)."""
    context = multiprocessing.get_context("fork")
    stop.share(context)
    consumer_ids = context.Array("i", len(sizes), lock=False)  # each process's consumers row

    def start(slot: int) -> BaseProcess:
        consumer_ids[slot] = 0
        process = context.Process(
            target=_process_main,
            name="consumer-%d" % slot,
            args=(stop, os.getpid(), make_consumer, sizes[slot], consumer_ids, slot, drain_only),
        )
        process.start()
        return process

    processes = [start(slot) for slot in range(len(sizes))]
    try:
        while not stop.requested:
            running = [p for p in processes if p.exitcode is None]
            if drain_only and not running and all(p.exitcode == 0 for p in processes):
                return
            multiprocessing.connection.wait([p.sentinel for p in running], timeout=0.2)
            for slot, process in enumerate(processes):
                if process.exitcode is None or (drain_only and process.exitcode == 0):
                    continue
                if stop.requested:
                    break
                log.warning(
                    "process %d exited with code %s; starting another",
                    process.pid,
                    process.exitcode,
                )
                free_claims_of(config, consumer_ids[slot])
                stop.sleep(RESTART_DELAY)
                processes[slot] = start(slot)
    finally:
        for process in processes:
            if process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]  # started: has a pid
        for process in processes:
            process.join()


def free_claims_of(config: Config, consumer_id: int) -> None:
    """The claims of a process that died: free for the others at once."""
    if not consumer_id:
        return
    conn = None
    try:
        conn = db.connect(config.database, "mailqueue consumer (supervisor)")
        db.run(conn, "retire_consumer", consumer=consumer_id)
        db.run(conn, "ring_consumers")
    except (db.Error, db.DatabaseUnavailable) as exc:
        log.warning(
            "could not free the claims of the process that died (%s): they come "
            "back when its lease runs out",
            exc,
        )
    finally:
        db.close_quietly(conn)


def _process_main(
    stop: Stop,
    parent: int,
    make_consumer: Callable[[int, Callable[[int], None]], Any],
    threads: int,
    consumer_ids: Any,  # a shared ctypes array of int, one per slot
    slot: int,
    drain_only: bool,
) -> None:
    # `stop` is the parent's, copied by fork, and so is the handler bound to it:
    # a signal that came before this line is not lost.
    stop.parent = parent

    def registered(consumer_id: int) -> None:
        consumer_ids[slot] = consumer_id

    make_consumer(threads, registered).run(drain_only)
