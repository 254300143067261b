"""The seed-style loop, for comparison only: what the seed describes done the
simple way. Each worker takes one queue row per transaction (FOR UPDATE SKIP
LOCKED), holds the lock while it opens a new SMTP connection and sends, then
records the outcome and deletes the row in the same transaction.

It builds each mail with the same code as consumer.py (mailqueue.message.Composer),
so the comparison is about the queue design, not about message building. Its
SQL lives here, not in sql/queries.sql: it is not part of the product.

    python bench/seed_loop.py CONFIG WORKERS
"""

import multiprocessing
import os
import smtplib
import sys

import psycopg2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailqueue import config as configuration  # noqa: E402
from mailqueue.message import Composer  # noqa: E402

TAKE_ONE = """
SELECT q.queue_id, j.job_id, j.email, j.subject, j.content_message, j.created_at
  FROM queue q JOIN jobs j ON j.job_id = q.job_id
 ORDER BY q.queue_id
 LIMIT 1
   FOR UPDATE OF q SKIP LOCKED"""
FINISH = """
UPDATE jobs SET status = 'completed', end_time = now(), attempts = attempts + 1
 WHERE job_id = %(job_id)s;
DELETE FROM queue WHERE queue_id = %(queue_id)s"""


def work(config_path):
    config = configuration.load(config_path)
    composer = Composer(config.smtp)
    conn = psycopg2.connect(**config.database)
    while True:
        with conn, conn.cursor() as cur:
            cur.execute(TAKE_ONE)
            row = cur.fetchone()
            if row is None:
                return
            queue_id, job_id, email, subject, body, created_at = row
            mail = composer.build(
                dict(
                    job_id=job_id,
                    email=email,
                    subject=subject,
                    content_message=body,
                    created_at=created_at,
                )
            )
            smtp = smtplib.SMTP(config.smtp.host, config.smtp.port, timeout=config.smtp.timeout)
            smtp.sendmail(mail.sender, list(mail.recipients), mail.data)
            smtp.quit()
            cur.execute(FINISH, {"job_id": job_id, "queue_id": queue_id})


if __name__ == "__main__":
    path, workers = sys.argv[1], int(sys.argv[2])
    processes = [multiprocessing.Process(target=work, args=(path,)) for _ in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    sys.exit(max(p.exitcode for p in processes))
