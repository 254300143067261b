"""The cost of the suppression screen (mailqueue.suppressions.screen): one
look-up of the primary key per claimed batch, against a list of N addresses.

    python bench/screen_cost.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
                                [--suppressed 100000] [--batch 20] [--rounds 200]

Makes a scratch database on that server (dropped afterwards), fills
`suppressions`, and times, per batch of jobs (each with a To and a Cc, one in
ten of them suppressed): the screen as the consumer runs it (one query), and,
for comparison, one query per address. Prints the medians; no pass or fail.
"""

import argparse
import os
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/devservers.py: throwaway servers

import psycopg2  # noqa: E402
import psycopg2.extensions  # noqa: E402

from devservers import apply_schema, run_sql  # noqa: E402
from mailqueue import db  # noqa: E402
from mailqueue.suppressions import addresses_of, screen  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--suppressed", type=int, default=100000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    name = "mailqueue_bench_" + uuid.uuid4().hex[:10]
    run_sql(args.dsn, 'CREATE DATABASE "%s"' % name)
    dsn = psycopg2.extensions.make_dsn(args.dsn, dbname=name)
    try:
        apply_schema(dsn)
        run_sql(
            dsn,
            "INSERT INTO suppressions (email, reason) SELECT 's' || i || '@example.com', "
            "'hard_bounce' FROM generate_series(1, %s) i",
            (args.suppressed,),
        )
        run_sql(dsn, "ANALYZE suppressions")
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        batched, single = [], []
        for r in range(args.rounds):
            jobs = [
                dict(
                    job_id=i,
                    email=("s%d@example.com" if i % 10 == 0 else "ok%d@example.com")
                    % (r * args.batch + i),
                    cc=["Kế toán <cc%d@example.org>" % i],
                    bcc=None,
                    ignore_suppression=False,
                )
                for i in range(args.batch)
            ]
            started = time.perf_counter()
            screen(conn, jobs)
            batched.append(time.perf_counter() - started)
            started = time.perf_counter()
            for address in addresses_of(jobs):
                db.run(conn, "suppressed_among", addresses=[address])
            single.append(time.perf_counter() - started)
        conn.close()
    finally:
        run_sql(args.dsn, 'DROP DATABASE IF EXISTS "%s"' % name)
    b, s = statistics.median(batched) * 1e6, statistics.median(single) * 1e6
    print(
        "suppression screen, %d suppressed addresses, batches of %d jobs (To + Cc), "
        "median of %d:" % (args.suppressed, args.batch, args.rounds)
    )
    print("  one query per batch    %8.0f us a batch  %6.1f us a mail" % (b, b / args.batch))
    print("  one query per address  %8.0f us a batch  %6.1f us a mail" % (s, s / args.batch))


if __name__ == "__main__":
    main()
