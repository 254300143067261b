"""The demo: real consumer.py and producer.py against throwaway servers.

Starts a throwaway PostgreSQL and a local SMTP server that stores mail in a
Maildir, applies sql/schema.sql, inserts sample jobs (Vietnamese among them, and
a few bad addresses), runs two consumers and a producer until every job is
finished, and reports what happened. Run it with scripts/demo.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mailqueue.devservers import SmtpSink, ThrowawayPostgres, apply_schema  # noqa: E402

SUBJECTS = [
    "Xác nhận đơn hàng của bạn", "Chào mừng bạn đến với cửa hàng", "Your order has shipped",
    "Nhắc lịch hẹn ngày mai", "Password reset requested", None,
]
BODIES = [
    "Xin chào {name},\n\nCảm ơn bạn đã đặt hàng. Đơn hàng số {n} đang được chuẩn bị.\n\nTrân trọng,\nCửa hàng",
    "Hello {name},\n\nYour parcel {n} left our warehouse today.\n\nRegards,\nThe shop",
    "Chào {name},\n\nBạn có lịch hẹn lúc 9 giờ sáng mai. Vui lòng đến sớm 10 phút.\n",
]
NAMES = ["Nguyễn Văn An", "Trần Thị Bình", "Lê Hoàng Cường", "Phạm Minh Dũng", "Alice", "Bob"]
BAD_ADDRESSES = ["not-an-address", "a@example.com\r\nBcc: victim@example.org", ""]


def sample_jobs(count):
    rng = random.Random(42)
    jobs = []
    for n in range(count - len(BAD_ADDRESSES)):
        name = rng.choice(NAMES)
        jobs.append(("customer%d@example.com" % n, rng.choice(BODIES).format(name=name, n=n),
                     rng.choice(SUBJECTS)))
    jobs += [(address, "this one cannot be sent", "Bad address") for address in BAD_ADDRESSES]
    return jobs


def progress(done, total, width=40):
    filled = int(width * done / total)
    sys.stdout.write("\r  [%s%s] %d/%d" % ("#" * filled, "." * (width - filled), done, total))
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="how many sample jobs")
    parser.add_argument("--consumers", type=int, default=2, help="consumer processes")
    parser.add_argument("--dashboard", action="store_true",  # issue 13
                        help="at the end, serve the dashboard on the demo's database until Ctrl-C")
    parser.add_argument("--output", default=os.path.join(ROOT, "demo-output"),
                        help="folder for the Maildir, the config and the logs")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    maildir = os.path.join(args.output, "Maildir")
    if os.path.isdir(maildir):
        import shutil
        shutil.rmtree(maildir)

    print("Starting a throwaway PostgreSQL and a local SMTP server ...")
    with ThrowawayPostgres(settings=()) as pg, SmtpSink(maildir=maildir) as smtp:
        admin = psycopg2.connect(pg.dsn())
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE mailqueue")
        admin.close()
        apply_schema(pg.dsn("mailqueue"))
        config_path = os.path.join(args.output, "config.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump({"database": pg.settings_for("mailqueue"),
                       "smtp": {"host": "127.0.0.1", "port": smtp.port}}, f, indent=2)
        print("  PostgreSQL %s on 127.0.0.1:%d, SMTP on 127.0.0.1:%d"
              % (pg.version(), pg.port, smtp.port))

        db = psycopg2.connect(pg.dsn("mailqueue"))
        db.autocommit = True
        cur = db.cursor()
        jobs = sample_jobs(args.jobs)
        cur.execute("INSERT INTO jobs (email, content_message, subject) VALUES "
                    + ",".join(cur.mogrify("(%s, %s, %s)", job).decode() for job in jobs))
        print("Inserted %d jobs (%d with a bad address, to show 'dead')."
              % (len(jobs), len(BAD_ADDRESSES)))

        logs = open(os.path.join(args.output, "scripts.log"), "w")
        command = lambda script: [sys.executable, os.path.join(ROOT, script),  # noqa: E731
                                  "--config", config_path]
        started = time.monotonic()
        workers = [subprocess.Popen(command("consumer.py"), stderr=logs, cwd=ROOT)
                   for _ in range(args.consumers)]
        workers.append(subprocess.Popen(command("producer.py"), stderr=logs, cwd=ROOT))
        print("Running %d consumer(s) and a producer ..." % args.consumers)
        try:
            while True:
                cur.execute("SELECT count(*) FILTER (WHERE status IN ('completed', 'dead')) "
                            "FROM jobs")
                finished = cur.fetchone()[0]
                if sys.stdout.isatty():
                    progress(finished, len(jobs))
                if finished == len(jobs):
                    break
                if any(w.poll() is not None for w in workers):
                    raise SystemExit("a script stopped early; see %s" % logs.name)
                time.sleep(0.1)
            elapsed = time.monotonic() - started
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(timeout=60)
        if sys.stdout.isatty():
            print()

        cur.execute("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
        counts = cur.fetchall()
        cur.execute("SELECT email, last_error FROM jobs WHERE status = 'dead' ORDER BY job_id")
        dead = cur.fetchall()
        db.close()
        # Operating it (issue 13): the report now, the dashboard while the database is up.
        ops = [sys.executable, "-m", "mailqueue", "report", "--config", config_path]
        report = subprocess.run(ops, cwd=ROOT, capture_output=True, text=True)
        report = report.stdout or report.stderr
        if args.dashboard:
            print("\n%s\nThe dashboard: http://127.0.0.1:8025/ (Ctrl-C ends the demo)" % report)
            try:
                subprocess.run(ops[:3] + ["dashboard", "--config", config_path], cwd=ROOT)
            except KeyboardInterrupt:
                pass

    sent = dict(counts).get("completed", 0)
    print("\nDone in %.2f s: %d mails sent, %.0f mails/s." % (elapsed, sent, sent / elapsed))
    print("Jobs per status:")
    for status, count in counts:
        print("  %-10s %d" % (status, count))
    print("Why the dead ones are dead (jobs.last_error):")
    for address, error in dead:
        print("  %-45r %s" % (address, error))
    print("The mails are in %s (e.g. mutt -f %s); the scripts' logs in %s."
          % (maildir, maildir, logs.name))
    print("\npython -m mailqueue report --config %s said:\n%s" % (config_path, report))
    print("To see the dashboard: ./scripts/demo --dashboard, then open http://127.0.0.1:8025/ "
          "(on your database: python -m mailqueue dashboard --config config.json)")


if __name__ == "__main__":
    main()
