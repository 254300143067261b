"""The cost of the relays' shared bookkeeping (mailqueue/relays.py): one call of
each statement, alone and with several consumers at once on the same relay (the
quota and the rate lock one row per relay: how many calls a second that row takes).

    python bench/relay_state.py                      # a throwaway PostgreSQL
    python bench/relay_state.py --dsn postgresql://postgres@127.0.0.1/postgres

It makes (and drops) a database of its own. Prints figures; asserts nothing.
The send path should take quota and tokens per claimed batch, not per mail, and
read the health through a HealthCache (at most once a second per process).
"""

import argparse
import os
import statistics
import sys
import threading
import time
import uuid

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/devservers.py: throwaway servers

from devservers import ThrowawayPostgres, apply_schema, run_sql  # noqa: E402
from mailqueue import relays  # noqa: E402


def connect(dsn):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


def per_call(conn, call, count):
    """Microseconds per call, the median of 5 rounds."""
    rounds = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(count):
            call(conn)
        rounds.append((time.perf_counter() - began) / count * 1e6)
    return statistics.median(rounds)


def together(dsn, call, threads, seconds):
    """Calls a second with `threads` connections calling at once."""
    conns = [connect(dsn) for _ in range(threads)]
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(i):
        while time.monotonic() < stop:
            call(conns[i])
            counts[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for conn in conns:
        conn.close()
    return sum(counts) / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a server to make the database on (default: a throwaway)")
    parser.add_argument("--count", type=int, default=500, help="calls per round")
    args = parser.parse_args()
    throwaway = None if args.dsn else ThrowawayPostgres().start()
    admin = args.dsn or throwaway.dsn()
    name = "relay_bench_" + uuid.uuid4().hex[:8]
    run_sql(admin, 'CREATE DATABASE "%s"' % name)
    dsn = psycopg2.extensions.make_dsn(admin, dbname=name)
    try:
        apply_schema(dsn)
        conn = connect(dsn)
        relays.register(conn, ["ses", "postfix"])
        big = 10**9
        calls = [
            ("read_states (2 relays)", lambda c: relays.read_states(c)),
            ("take_tokens 10 (rate 1e6/s)", lambda c: relays.take_tokens(c, "ses", 10, 1e6)),
            ("take_quota 10", lambda c: relays.take_quota(c, "ses", 10, big)),
            ("mark_up (already up: no write)", lambda c: relays.mark_up(c, "postfix")),
            ("mark_down (already down)", lambda c: relays.mark_down(c, "ses", 30, "x")),
            ("claim_probe (not due)", lambda c: relays.claim_probe(c, "ses", 10)),
        ]
        print("%-34s %12s" % ("one connection", "us per call"))
        for label, call in calls:
            print("%-34s %12.0f" % (label, per_call(conn, call, args.count)))
        relays.mark_up(conn, "ses")
        print()
        print("%-34s %12s" % ("8 connections, one relay", "calls/s"))
        for label, call in calls[1:3]:
            print("%-34s %12.0f" % (label, together(dsn, call, 8, 3.0)))
        conn.close()
    finally:
        run_sql(admin, 'DROP DATABASE IF EXISTS "%s"' % name)
        if throwaway:
            throwaway.stop()


if __name__ == "__main__":
    main()
