"""Faults: killed and stopped consumers, database restarts, lost LISTEN connections,
SMTP servers that go away, refuse or hang. Every test counts lost and duplicated
mails (each job has its own recipient, so a repeat is a duplicate)."""

import asyncio
import os
import random
import signal
import time

import psycopg2
import pytest

from consumer import POLL_INTERVAL
from helpers import duplicates, insert_jobs, query, recipients, status_counts, wait_until
from mailqueue.devservers import SmtpSink


def addresses(count, prefix="user"):
    return ["%s%d@example.com" % (prefix, i) for i in range(count)]


def queue_jobs(db, emails, chunk=100):
    for start in range(0, len(emails), chunk):
        insert_jobs(db, [(e, "mail for %s" % e, None) for e in emails[start:start + chunk]])


def slow_down(smtp, seconds):
    """Make the SMTP sink take `seconds` over each mail, so that there is a mail in hand."""
    async def slow(envelope):
        await asyncio.sleep(seconds)
    smtp.behaviour = slow


def assert_every_job_completed_once(db, smtp, emails, max_duplicates=0):
    wait_until(lambda: status_counts(db) == {"completed": len(emails)},
               what="%d completed jobs" % len(emails))
    assert set(recipients(smtp)) == set(emails), "lost mails: %s" % sorted(
        set(emails) - set(recipients(smtp)))[:5]
    assert duplicates(smtp) <= max_duplicates
    # A batch's queue rows go when its claim commits, just after its last outcome.
    wait_until(lambda: query(db, "SELECT count(*) FROM queue") == [(0,)], what="an empty queue")


def test_killed_consumers_lose_no_job_and_duplicate_at_most_one_mail_each(
        db, smtp, make_config, scripts):
    config = make_config()
    single = ("--config", config, "--concurrency", "1")  # the process killed is the sender
    consumers = [scripts.start("consumer.py", *single) for _ in range(3)]
    producer = scripts.start("producer.py", "--config", config)
    emails = addresses(3000)
    queue_jobs(db, emails)

    rng, kills = random.Random(7), 0
    for received in range(150, 2850, 150):  # SIGKILL a random consumer every 150 mails
        smtp.wait_for(received, timeout=120)
        victim = rng.randrange(len(consumers))
        consumers[victim].kill()
        consumers[victim].wait()
        kills += 1
        consumers[victim] = scripts.start("consumer.py", *single)

    assert_every_job_completed_once(db, smtp, emails, max_duplicates=kills)
    # The last consumer started may still be starting up: a SIGTERM before it
    # installs its handler would end it by the default action, not by a clean stop.
    wait_until(lambda: len(listeners(db)) == len(consumers) + 1, what="all to LISTEN")
    for proc in consumers + [producer]:
        assert scripts.stop(proc) == 0
    print("\n%d kills, %d duplicated mails, 0 lost, of %d" % (kills, duplicates(smtp), len(emails)))
    # A duplicate is the very same mail: the same Message-ID each time.
    by_rcpt = {}
    for _, rcpts, content, _ in smtp.received:
        message_id = [line for line in content.split(b"\r\n") if line.startswith(b"Message-ID")]
        by_rcpt.setdefault(rcpts[0], set()).update(message_id)
    assert all(len(ids) == 1 for ids in by_rcpt.values())


def worker_pids(consumer):
    return [int(pid) for pid in open("/proc/%d/task/%d/children" % (consumer.pid, consumer.pid))
            .read().split()]


def test_killed_worker_is_replaced_and_workers_of_a_killed_consumer_stop_by_themselves(
        db, smtp, make_config, scripts):
    slow_down(smtp, 0.005)
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config, "--concurrency", "3")
    emails = addresses(600)
    queue_jobs(db, emails)
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0

    smtp.wait_for(100)
    workers = wait_until(lambda: len(worker_pids(consumer)) == 3 and worker_pids(consumer))
    os.kill(workers[0], signal.SIGKILL)  # one duplicate at most
    wait_until(lambda: len(worker_pids(consumer)) == 3 and workers[0] not in worker_pids(consumer),
               what="a replacement worker")
    smtp.wait_for(300)
    orphans = worker_pids(consumer)
    consumer.kill()  # the parent: its workers finish the mail in hand and stop
    consumer.wait()
    for pid in orphans:
        wait_until(lambda: not os.path.exists("/proc/%d" % pid) or
                   open("/proc/%d/stat" % pid).read().split()[2] == "Z", what="orphans to stop")
    assert query(db, "SELECT count(*) FROM jobs WHERE status NOT IN ('queued', 'completed')") == [(0,)]

    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    assert_every_job_completed_once(db, smtp, emails, max_duplicates=1)


def test_sigterm_finishes_the_mail_in_hand_releases_the_rest_and_exits_0(
        db, smtp, make_config, scripts):
    slow_down(smtp, 0.05)
    emails = addresses(200)
    queue_jobs(db, emails)
    config = make_config()
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    consumer = scripts.start("consumer.py", "--config", config)
    smtp.wait_for(10)

    stopping = time.monotonic()
    assert scripts.stop(consumer) == 0
    took = time.monotonic() - stopping
    assert took < 10, "within the SMTP timeout"
    sent = len(smtp.received)
    assert sent < 200, "it stopped taking work"
    assert status_counts(db) == {"completed": sent, "queued": 200 - sent}, "nothing in limbo"

    smtp.behaviour = None
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    assert_every_job_completed_once(db, smtp, emails)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_or_crash_mid_run_loses_nothing(mode, postgres, database, smtp,
                                                         make_config, scripts):
    if postgres.throwaway is None:
        pytest.skip("restarts only the suite's own throwaway server, never TEST_DATABASE_URL's")
    slow_down(smtp, 0.002)
    config = make_config()
    consumers = [scripts.start("consumer.py", "--config", config, "--concurrency", "2")
                 for _ in range(2)]
    producer = scripts.start("producer.py", "--config", config)
    connect = lambda: psycopg2.connect(postgres.dsn(database))  # noqa: E731
    db = connect()
    db.autocommit = True
    before, after = addresses(1000, "before"), addresses(100, "after")
    queue_jobs(db, before)
    smtp.wait_for(200)

    restarted = time.monotonic()
    postgres.throwaway.restart(mode)
    db = connect()
    db.autocommit = True
    # Each consumer's first worker LISTENs (the others are called in by it), and the producer.
    wait_until(lambda: len(listeners(db)) == 3, what="both consumers and the producer to LISTEN")
    print("\nlisteners back %.1f s after the restart began" % (time.monotonic() - restarted))
    queue_jobs(db, after)  # reaches them only if they listen and produce again

    assert_every_job_completed_once(db, smtp, before + after, max_duplicates=4)  # one per worker
    print("%s restart: %d duplicated, 0 lost, of %d" % (mode, duplicates(smtp), 1100))
    for proc in consumers + [producer]:
        assert scripts.stop(proc) == 0
        assert "trying again" in scripts.log_of(proc)
    db.close()


def listeners(db):
    """The scripts' LISTEN connections to this database that have run their LISTEN."""
    return query(db, "SELECT pid, application_name FROM pg_stat_activity "
                     "WHERE datname = current_database() AND application_name LIKE '%%(listen)' "
                     "AND query ILIKE 'listen%%'")


@pytest.mark.parametrize("whose", ["consumer", "producer"])
def test_terminated_listen_connection_comes_back_and_work_still_flows(
        whose, db, smtp, make_config, scripts):
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config, "--concurrency", "1")
    producer = scripts.start("producer.py", "--config", config)
    wait_until(lambda: len(listeners(db)) == 2, what="both to LISTEN")
    [(old_pid,)] = query(db, "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                             " AND application_name = %s", ("mailqueue %s (listen)" % whose,))
    query(db, "SELECT pg_terminate_backend(%s)", (old_pid,))

    queue_jobs(db, ["first@example.com"])
    smtp.wait_for(1, timeout=POLL_INTERVAL + 5)
    wait_until(lambda: len(listeners(db)) == 2 and old_pid not in [p for p, _ in listeners(db)],
               what="a new LISTEN connection")
    queue_jobs(db, ["second@example.com"])
    assert_every_job_completed_once(db, smtp, ["first@example.com", "second@example.com"])
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_lost_recording_connection_sends_no_mail_before_the_last_is_recorded(
        db, smtp, make_config, scripts):
    # A 'completed' commits while the next mail's envelope goes out; if that
    # commit fails, the next mail's content must not follow (consumer.py, step 3).
    slow_down(smtp, 0.002)
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config, "--concurrency", "1")
    producer = scripts.start("producer.py", "--config", config)
    emails = addresses(400)
    queue_jobs(db, emails)
    kills = 0
    for received in (50, 150, 250):
        smtp.wait_for(received)
        killed = query(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() "
                           "AND application_name = 'mailqueue consumer (record)'")
        kills += len(killed)
    assert kills == 3
    assert_every_job_completed_once(db, smtp, emails, max_duplicates=kills)
    print("\n%d recording connections lost: %d duplicated, 0 lost, of %d"
          % (kills, duplicates(smtp), len(emails)))
    assert "lost the database connection" in scripts.log_of(consumer)
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_smtp_connection_dropped_mid_mail_fails_that_mail_then_sends_it(
        db, smtp, make_config, scripts):
    dropped = []

    def drop_three(envelope):
        if len(dropped) < 3:
            dropped.append(envelope.rcpt_tos[0])
            return SmtpSink.DROP
    smtp.behaviour = drop_three
    emails = addresses(10)
    queue_jobs(db, emails)
    config = make_config(queue={"retry_delay": 1, "max_retry_delay": 1})
    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)

    failed = wait_until(lambda: query(db, "SELECT email, last_error FROM jobs "
                                          "WHERE status = 'failed'"), what="failed jobs")
    assert all("SMTP server closed the connection" in error for _, error in failed)
    assert_every_job_completed_once(db, smtp, emails)
    assert sorted(e for (e,) in query(db, "SELECT email FROM jobs WHERE attempts = 2")) == \
        sorted(dropped)
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_smtp_server_down_for_a_while_burns_no_attempt_and_loses_nothing(
        db, smtp, make_config, scripts):
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config)
    producer = scripts.start("producer.py", "--config", config)
    queue_jobs(db, ["warmup@example.com"])
    smtp.wait_for(1)  # the consumer now holds an open SMTP connection
    smtp.stop()

    emails = addresses(50)
    queue_jobs(db, emails)
    wait_until(lambda: status_counts(db) == {"completed": 1, "queued": 50},
               what="the producer to queue them")
    wait_until(lambda: scripts.log_of(consumer).count("cannot reach SMTP server") >= 2,
               what="the consumer to notice, and keep trying")
    assert status_counts(db) == {"completed": 1, "queued": 50}
    assert query(db, "SELECT max(attempts) FROM jobs WHERE status = 'queued'") == [(0,)]

    smtp.start()  # back, on the same port
    assert_every_job_completed_once(db, smtp, ["warmup@example.com"] + emails)
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


@pytest.mark.parametrize("reply, status, retried", [
    ("451 4.3.0 Mail server temporarily rejected message", "failed", True),
    ("452 4.2.2 Mailbox full", "failed", True),
    ("550 5.7.1 Message rejected as spam", "dead", False),
    ("554 5.0.0 Transaction failed", "dead", False),
])
def test_4xx_replies_are_retried_and_5xx_replies_are_dead_at_once(
        reply, status, retried, db, smtp, make_config, scripts):
    smtp.behaviour = lambda envelope: reply
    queue_jobs(db, ["someone@example.com"])
    config = make_config(queue={"retry_delay": 60, "max_retry_delay": 600})
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    [(got, attempts, error, wait)] = query(
        db, "SELECT status, attempts, last_error, extract(epoch FROM run_at - now()) FROM jobs")
    assert (got, attempts) == (status, 1)
    assert reply in error
    if retried:
        assert 55 <= wait <= 76, "60 s, plus up to 25% jitter"


def test_smtp_timeout_is_transient_and_a_hanging_server_does_not_stall_the_queue(
        db, smtp, make_config, scripts):
    async def hang_for_one(envelope):
        if envelope.rcpt_tos == ["hang@example.com"]:
            await asyncio.sleep(5)
    smtp.behaviour = hang_for_one
    emails = ["hang@example.com"] + addresses(20)
    queue_jobs(db, emails)
    config = make_config(smtp_overrides={"timeout": 1})
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0

    assert status_counts(db) == {"completed": 20, "failed": 1}
    [(error,)] = query(db, "SELECT last_error FROM jobs WHERE status = 'failed'")
    assert "timed out" in error


def test_dead_job_put_back_by_the_documented_sql_is_sent(db, smtp, make_config, scripts):
    smtp.behaviour = lambda envelope: "550 5.1.1 No such user (yet)"
    queue_jobs(db, ["late@example.com"])
    config = make_config()
    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)
    wait_until(lambda: status_counts(db) == {"dead": 1}, what="the job to be dead")

    smtp.behaviour = None
    [(job_id,)] = query(db, "SELECT job_id FROM jobs")
    # The README's statement, as is:
    query(db, "UPDATE jobs SET status = 'available', attempts = 0, run_at = now() "
              "WHERE job_id = %s", (job_id,))
    assert_every_job_completed_once(db, smtp, ["late@example.com"])
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_unexpected_error_on_one_job_does_not_stop_the_worker(
        postgres, database, db, smtp, make_config):
    """A poison job, in process: the error is injected into our own code only."""
    import consumer as consumer_module
    from mailqueue import config as configuration, doorbell
    queue_jobs(db, ["poison@example.com", "fine1@example.com", "fine2@example.com"])
    config = configuration.load(make_config())
    consumer = consumer_module.Consumer(config, doorbell.Stop())
    real_build = consumer.composer.build

    def build(job_id, email, *rest):
        if email == "poison@example.com":
            raise RuntimeError("something nobody foresaw")
        return real_build(job_id, email, *rest)
    consumer.composer.build = build
    from producer import move_ready_jobs
    conn = psycopg2.connect(postgres.dsn(database))
    conn.autocommit = True
    move_ready_jobs(conn, 100)
    conn.close()
    consumer.run(drain_only=True)

    assert sorted(recipients(smtp)) == ["fine1@example.com", "fine2@example.com"]
    [(status, error)] = query(db, "SELECT status, last_error FROM jobs "
                                  "WHERE email = 'poison@example.com'")
    assert status == "failed" and "RuntimeError: something nobody foresaw" in error


def test_idle_in_transaction_session_elsewhere_slows_nothing_into_errors(
        postgres, database, db, smtp, make_config, scripts):
    holder = psycopg2.connect(postgres.dsn(database))
    query(holder, "SELECT txid_current()")  # holds back vacuum's horizon until closed
    try:
        config = make_config()
        consumers = [scripts.start("consumer.py", "--config", config) for _ in range(2)]
        producer = scripts.start("producer.py", "--config", config)
        emails = addresses(2000)
        queue_jobs(db, emails)
        assert_every_job_completed_once(db, smtp, emails)
        for proc in consumers + [producer]:
            assert scripts.stop(proc) == 0
            assert "WARNING" not in scripts.log_of(proc)
    finally:
        holder.close()

