"""The claim path's holes, closed (issue 17): a claim whose connection dies before
its jobs are in hand, a DBA's statement_timeout on big attachments, a dead
consumer's claims while the others have a backlog, a network cut that TCP does
not see, and a consumer whose clock is wrong. Each counts every mail by its
marker: lost, dropped and duplicated all show."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from devservers import free_port
from helpers import (
    ROOT,
    Forwarder,
    assert_every_job_completed_once,
    copies,
    query,
    queue_marked,
    status_counts,
    wait_until,
)

LEASE = 3  # seconds: a short claim lease, so that these tests are short


def with_attachments(db, count, megabytes, prefix="big"):
    """`count` jobs, each with a file of `megabytes` MB and a marker in its body."""
    markers = queue_marked(db, count, prefix)
    query(
        db,
        "INSERT INTO attachments (job_id, filename, content) "
        "SELECT job_id, 'file.bin', decode(repeat('5a', %s), 'hex') FROM jobs",
        (megabytes * 1024 * 1024,),
    )
    return markers


def drain(scripts, config, timeout=180):
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    return scripts.run("consumer.py", "--config", config, "--drain", timeout=timeout)


def test_claim_connection_killed_while_attachments_are_read_strands_nothing(
    postgres, database, db, smtp, make_config, scripts
):
    markers = with_attachments(db, 8, 15)
    killed = []
    stop = threading.Event()

    def kill_the_reads():
        watcher = psycopg2.connect(postgres.dsn(database))
        watcher.autocommit = True
        while not stop.is_set() and len(killed) < 2:
            rows = query(
                watcher,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'mailqueue consumer (claim)%%' "
                "AND state = 'active' AND query LIKE '%%FROM attachments%%WHERE job_id = ANY%%'",
            )
            killed.extend(r for r in rows if r[0])
        watcher.close()

    watcher = threading.Thread(target=kill_the_reads, daemon=True)
    watcher.start()
    config = make_config(queue={"claim_lease": LEASE})
    result = drain(scripts, config)
    stop.set()
    watcher.join()
    assert result.returncode == 0, result.stderr[-2000:]
    assert killed, "the test must have cut a read of attachments"
    assert_every_job_completed_once(db, smtp, markers)
    assert query(db, "SELECT count(*) FROM queue") == [(0,)]


def test_a_dba_statement_timeout_on_big_attachments_strands_nothing(
    postgres, database, db, smtp, make_config, scripts
):
    markers = with_attachments(db, 12, 8)
    postgres.admin("ALTER DATABASE \"%s\" SET statement_timeout = '1s'" % database)
    config = make_config(queue={"claim_lease": LEASE})
    result = drain(scripts, config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_every_job_completed_once(db, smtp, markers)


@pytest.mark.parametrize("mode", ["service", "drain"])
def test_a_killed_consumers_claims_come_back_while_the_other_has_a_backlog(
    db, smtp, make_config, scripts, mode
):
    async def slow(envelope):
        await asyncio.sleep(0.01)

    smtp.behaviour = slow
    markers = queue_marked(db, 5000)
    config = make_config(queue={"claim_lease": LEASE, "concurrency": 4})
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    doomed = scripts.start("consumer.py", "--config", config, "--processes", "1")
    wait_until(
        lambda: query(db, "SELECT count(*) FROM queue WHERE claimed_by IS NOT NULL")[0][0] > 0,
        what="the first consumer to hold claims",
    )
    if mode == "drain":
        survivor = scripts.start("consumer.py", "--config", config, "--drain", "--processes", "1")
    else:
        survivor = scripts.start("consumer.py", "--config", config, "--processes", "1")
    wait_until(lambda: len(copies(smtp)) > 200, what="both to be sending")
    [(doomed_id,)] = query(
        db, "SELECT consumer_id FROM consumers WHERE name LIKE %s", ("%%:%d" % doomed.pid,)
    )
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    killed_at = time.monotonic()
    wait_until(
        lambda: (
            query(db, "SELECT count(*) FROM queue WHERE claimed_by = %s", (doomed_id,)) == [(0,)]
        ),
        timeout=LEASE + 5,
        what="the killed consumer's claims to be freed within the lease + 5 s",
    )
    freed_after = time.monotonic() - killed_at
    assert status_counts(db).get("queued", 0) > 0, "the survivor still had a backlog"
    print("\nclaims freed %.1f s after the kill (lease %d s)" % (freed_after, LEASE))
    if mode == "drain":
        assert survivor.wait(timeout=300) == 0
    else:
        assert_every_job_completed_once(db, smtp, markers, max_duplicates=4, timeout=300)
        assert scripts.stop(survivor) == 0
    assert_every_job_completed_once(db, smtp, markers, max_duplicates=4)


def test_a_network_cut_tcp_does_not_see_is_noticed_and_work_resumes_after_it(
    postgres, database, db, smtp, make_config, scripts
):
    settings = postgres.settings_for(database)
    cut = Forwarder(free_port(), settings["port"]).listen()
    try:
        through = dict(settings, port=cut.port)
        config = make_config(
            queue={"claim_lease": LEASE}, database=through, listen_database=through
        )
        markers = queue_marked(db, 400)
        producer = scripts.start("producer.py", "--config", config)
        consumer = scripts.start("consumer.py", "--config", config, "--processes", "1")
        wait_until(lambda: len(copies(smtp)) > 0, what="mail to flow")
        cut.pause()
        paused_at = time.monotonic()
        wait_until(
            lambda: "longer than" in scripts.log_of(consumer),
            timeout=2 * LEASE + 5,
            what="the consumer to notice the cut within about twice the lease",
        )
        noticed = time.monotonic() - paused_at
        time.sleep(0.5)  # the cut lasts a little past the notice (a duration, not a sync)
        before = len(smtp.received)
        cut.resume()
        healed_at = time.monotonic()
        wait_until(lambda: len(smtp.received) > before, timeout=30, what="sending to resume")
        resumed = time.monotonic() - healed_at
        print(
            "\ncut noticed after %.1f s; sending resumed %.1f s after the heal" % (noticed, resumed)
        )
        assert_every_job_completed_once(db, smtp, markers, max_duplicates=32, timeout=120)
        assert scripts.stop(consumer) == 0 and scripts.stop(producer) == 0
    finally:
        cut.close()


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime is not installed")
@pytest.mark.parametrize("offset", ["+90s", "-90s"])
def test_expiry_is_judged_by_the_database_clock_not_the_consumers(db, smtp, make_config, offset):
    query(
        db,
        "INSERT INTO jobs (email, content_message, expires_at) "
        "SELECT 'live' || i || '@example.com', 'mail with marker:live-' || i, "
        "       now() + interval '60 s'"
        "  FROM generate_series(1, 20) i",
    )
    query(
        db,
        "INSERT INTO jobs (email, content_message, expires_at) "
        "SELECT 'old' || i || '@example.com', 'mail with marker:old-' || i, "
        "       now() - interval '30 s'"
        "  FROM generate_series(1, 20) i",
    )
    config = make_config()
    run = lambda script, *args: subprocess.run(  # noqa: E731
        ["faketime", "-f", offset, sys.executable, os.path.join(ROOT, script), "--config", config]
        + list(args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        # the wall clock is wrong; the monotonic clock (waits, leases) runs true
        env=dict(os.environ, FAKETIME_DONT_FAKE_MONOTONIC="1"),
    )
    assert run("producer.py", "--once").returncode == 0
    result = run("consumer.py", "--drain")
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(copies(smtp)) == {"live-%d" % i for i in range(1, 21)}
    assert status_counts(db) == {"completed": 20, "dead": 20}
    assert query(db, "SELECT count(*) FROM deliveries WHERE started_at > finished_at") == [(0,)]
