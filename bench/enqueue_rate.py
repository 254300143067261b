"""How fast mailqueue.enqueue_many puts plain mails into the jobs table.

    python bench/enqueue_rate.py                 # 50,000 mails in batches of 1,000
    python bench/enqueue_rate.py --mails 20000 --batch 500 --driver psycopg
    python bench/enqueue_rate.py --json

A throwaway PostgreSQL (tests/devservers.py, as bench/bench.py starts one) with
the schema; an application connection (psycopg2, or psycopg 3 with --driver
psycopg) commits after each enqueue_many call of --batch mails, each mail with
its own recipient, a subject and a ~1 KB Vietnamese text, as bench.py's. The
checks (addresses, subject, body) are in the time, as is the commit. Several
rounds on a fresh table each; the median is printed. Also the single-mail
enqueue (one per transaction) for comparison. Target (issue 21): >= 5,000/s.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/devservers.py: throwaway servers

import mailqueue  # noqa: E402
from devservers import ThrowawayPostgres, apply_schema, run_sql  # noqa: E402

TEXT = (
    "Kính gửi quý khách, đơn hàng của bạn đã được xác nhận và sẽ được giao trong "
    "hai ngày làm việc. Cảm ơn bạn đã mua sắm cùng chúng tôi!\n"
) * 7  # ~1 KB, as bench.py


def mails(count, start):
    return [
        dict(
            to="khach%d@example.com" % (start + i),
            subject="Đơn hàng #%d đã được xác nhận" % (start + i),
            text=TEXT,
        )
        for i in range(count)
    ]


def connect(driver, dsn):
    if driver == "psycopg":
        import psycopg

        return psycopg.connect(dsn)
    import psycopg2

    return psycopg2.connect(dsn)


def many_rate(conn, total, batch):
    """Mails per second through enqueue_many, committing every batch."""
    work = [mails(batch, n) for n in range(0, total, batch)]
    started = time.perf_counter()
    for chunk in work:
        mailqueue.enqueue_many(conn, chunk)
        conn.commit()
    return total / (time.perf_counter() - started)


def single_rate(conn, total):
    """Mails per second through enqueue, one transaction each."""
    work = mails(total, 0)
    started = time.perf_counter()
    for mail in work:
        mailqueue.enqueue(conn, mail.pop("to"), **mail)
        conn.commit()
    return total / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=50000, help="mails per round")
    parser.add_argument("--batch", type=int, default=1000, help="mails per enqueue_many call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--driver", choices=("psycopg2", "psycopg"), default="psycopg2")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)

    pg = ThrowawayPostgres().start()
    try:
        run_sql(pg.dsn(), "CREATE DATABASE enqueue_bench")
        dsn = pg.dsn("enqueue_bench")
        apply_schema(dsn)
        conn = connect(args.driver, dsn)
        many, single = [], []
        for _ in range(args.rounds):
            run_sql(dsn, "TRUNCATE jobs CASCADE")
            many.append(many_rate(conn, args.mails, args.batch))
            run_sql(dsn, "TRUNCATE jobs CASCADE")
            single.append(single_rate(conn, min(args.mails, 2000)))
        conn.close()
    finally:
        pg.stop()
    result = {
        "driver": args.driver,
        "mails": args.mails,
        "batch": args.batch,
        "enqueue_many_mails_per_s": round(statistics.median(many)),
        "enqueue_mails_per_s": round(statistics.median(single)),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        "enqueue_many (%s, %d mails in batches of %d, committed each batch): %d mails/s "
        "(median of %d rounds: %s)"
        % (
            args.driver,
            args.mails,
            args.batch,
            result["enqueue_many_mails_per_s"],
            args.rounds,
            ", ".join("%.0f" % r for r in many),
        )
    )
    print(
        "enqueue, one mail per transaction: %d mails/s (median: %s)"
        % (result["enqueue_mails_per_s"], ", ".join("%.0f" % r for r in single))
    )


if __name__ == "__main__":
    main()
