"""Send the mails waiting in the `queue` table.

    python consumer.py [--config config.json] [--drain] [--concurrency N] [--processes P]

N mails are in flight at once (queue.concurrency, default 32), each on its own
persistent SMTP connection, spread over P processes (queue.processes, default
one per core; mailqueue/supervise.py starts them and replaces one that dies).
Each process runs N/P sending threads and holds three database connections
whatever N is: claim, record and LISTEN. The pattern of one process, each step
in a module of its own (the path of one mail through them: docs/architecture.md):

1. LISTEN on `mailqueue_queue` (mailqueue/doorbell.py). A notification is only a
   doorbell: start-up, every notification, every ring and every poll timeout run
   the same drain, so a lost notification delays a mail, never strands it.
2. The claimer (mailqueue/claimer.py) claims queue rows with FOR UPDATE SKIP
   LOCKED and commits the claim at once, under this process's lease
   (mailqueue/claims.py); the claimed jobs wait in `ready` (mailqueue/jobs.py).
3. Each sending thread (mailqueue/sending.py) takes a job, builds its mail
   (mailqueue/message.py), sends it (mailqueue/smtp.py) with the next mail's
   envelope after the dot, and turns the replies into the job's one outcome
   (mailqueue/outcomes.py, read by mailqueue/replies.py).
4. The recorder (mailqueue/recorder.py) commits the outcomes pending at each
   moment in one statement, and keeps the lease alive with its heartbeat.
   The relay's brakes: mailqueue/pacing.py (throttling replies, queue.rate_limit)
   and mailqueue/connections.py (how many connections the relay takes).

What is guaranteed, and what a crash or a cut network can cost: docs/delivery.md.
"""

import argparse
import logging

from mailqueue import cli, db, doorbell, supervise
from mailqueue.claimer import POLL_INTERVAL  # noqa: F401  (the tests read it here)
from mailqueue.engine import Consumer

log = logging.getLogger("consumer")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Send the mails waiting in the queue table.")
    cli.add_common_arguments(parser)
    parser.add_argument("--drain", action="store_true", help="exit once the queue table is empty")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="mails in flight at once, each on its own SMTP connection "
        "(default: queue.concurrency, 32)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="processes the mails in flight are spread over "
        "(default: queue.processes, or one per core)",
    )
    args = parser.parse_args(argv)
    for flag in ("concurrency", "processes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error("--%s must be at least 1" % flag)
    config = cli.start(args)
    stop = doorbell.Stop(farewell="finishing the mails in hand, then stopping")
    stop.install()
    cli.wait_for_database(config, stop, "consumer")
    cli.wait_for_smtp(config, stop)
    if stop.requested:
        return
    concurrency = args.concurrency or config.queue.concurrency
    processes = min(concurrency, args.processes or config.queue.processes or supervise.cores())
    sizes = supervise.split(concurrency, processes)
    log.info(
        "consuming from %s: %d mail(s) in flight over %d process(es)",
        db.where(config.database),
        concurrency,
        processes,
    )
    if processes == 1:
        Consumer(config, stop, sizes[0]).run(drain_only=args.drain)
    else:
        supervise.run_processes(
            config,
            stop,
            sizes,
            args.drain,
            lambda threads, registered: Consumer(config, stop, threads, registered),
        )
    log.info("stopped")


if __name__ == "__main__":
    main()
