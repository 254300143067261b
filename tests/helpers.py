"""Small helpers the tests share (fixtures are in conftest.py)."""

import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(condition, timeout=60.0, what="condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.05)


def query(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None


def status_counts(conn):
    return dict(query(conn, "SELECT status, count(*) FROM jobs GROUP BY status"))


def insert_jobs(conn, rows):
    """rows: (email, content_message, subject) tuples, inserted in one statement."""
    with conn.cursor() as cur:
        values = ",".join(cur.mogrify("(%s, %s, %s)", row).decode() for row in rows)
        cur.execute("INSERT INTO jobs (email, content_message, subject) VALUES " + values)


def recipients(smtp):
    """Every envelope recipient the sink accepted, one entry per mail."""
    return [rcpt for _, rcpts, _, _ in smtp.received for rcpt in rcpts]


def duplicates(smtp):
    """How many accepted mails were a repeat of one accepted before."""
    sent = recipients(smtp)
    return len(sent) - len(set(sent))
