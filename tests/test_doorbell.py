"""The doorbell (mailqueue/doorbell.py): pgnotify's LISTEN loop on a real
PostgreSQL, and what we had to mend in it."""

import contextlib
import inspect
import os

import psycopg2

from helpers import query
from mailqueue import doorbell


@contextlib.contextmanager
def doorbell_on(postgres, database, poll_interval):
    """doorbell.wakeups on a listening connection of its own, closed afterwards."""
    listener = psycopg2.connect(postgres.dsn(database))
    listener.autocommit = True
    events = doorbell.wakeups(listener, "mailqueue_queue", poll_interval, doorbell.Stop())
    try:
        yield events
    finally:
        events.close()
        listener.close()


def test_a_notification_wakes_the_doorbell_without_walking_the_stack(
    postgres, database, db, monkeypatch
):
    # pgnotify logs through logx, which called inspect.stack() on every log line:
    # about 1 ms each, twice per wake-up, on the path of every mail.
    walks = []
    real_stack = inspect.stack
    monkeypatch.setattr(inspect, "stack", lambda *a: walks.append(1) or real_stack(*a))
    with doorbell_on(postgres, database, 10.0) as events:
        assert next(events) == "start-up"
        query(db, "INSERT INTO jobs(email, content_message) VALUES ('a@example.com', 'hi')")
        query(
            db,
            "WITH m AS (UPDATE jobs SET status = 'queued' RETURNING job_id) "
            "INSERT INTO queue(job_id) SELECT job_id FROM m",
        )
        assert next(events) == "notification"
    assert walks == []


def test_reconnecting_the_doorbell_leaves_no_file_descriptor_open(postgres, database):
    # pgnotify opens a pipe for signals on every run and closes neither end: a
    # consumer whose database came and went for hours would run out of files.
    def one_run():
        with doorbell_on(postgres, database, 0.01) as events:
            assert next(events) == "start-up"
            assert next(events) == "timeout"  # pgnotify's loop has run

    one_run()  # anything opened once for good (imports, caches) is open by now
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        one_run()
    assert len(os.listdir("/proc/self/fd")) == before
