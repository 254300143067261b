"""Faults: killed and stopped consumers, lost and timed-out database connections,
database restarts, SMTP servers that go away, refuse, hang or throttle. Every
test counts each mail by the marker in its decoded body, so that lost and
duplicated mails both show, and checks that no two copies of a mail were ever in
flight at the same time."""

import asyncio
import os
import random
import signal
import time

import psycopg2
import pytest

from consumer import POLL_INTERVAL
from devservers import SmtpSink
from helpers import (
    arrivals,
    assert_every_job_completed_once,
    copies,
    in_flight_together,
    query,
    queue_marked,
    start_queue,
    status_counts,
    stop_cleanly,
    wait_until,
)
from mailqueue.db import QUERIES

LEASE = 3  # seconds: a short claim lease, so that a killed consumer's jobs come back soon


def slow_down(smtp, seconds):
    """Make the SMTP sink take `seconds` over each mail's final reply."""

    async def slow(envelope):
        await asyncio.sleep(seconds)

    smtp.behaviour = slow


def process_tree(pid):
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir("/proc/%d/task" % p):
                todo += [
                    int(c) for c in open("/proc/%d/task/%s/children" % (p, task)).read().split()
                ]
        except OSError:
            pass
    return found


def children(proc):
    return [
        int(pid) for pid in open("/proc/%d/task/%d/children" % (proc.pid, proc.pid)).read().split()
    ]


def kill_tree(proc):
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def connections(db, role):
    return query(
        db,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE %s",
        ("mailqueue consumer (%s)%%" % role,),
    )


def listeners(db):
    """The scripts' LISTEN connections to this database that have run their LISTEN
    (their last query is the LISTEN, or the keep_alive that follows each poll)."""
    return query(
        db,
        "SELECT pid, application_name FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE '%%(listen)%%' "
        "AND (query ILIKE 'listen%%' OR query = %s)",
        (QUERIES["keep_alive"],),
    )


def database_settings(postgres, database, **settings):
    for name, value in settings.items():
        postgres.admin('ALTER DATABASE "%s" SET %s = %s' % (database, name, value))


# ---------------------------------------------------------------- killed processes


def test_killed_consumers_lose_no_job_and_duplicate_at_most_one_mail_per_mail_in_flight(
    db, smtp, make_config, scripts
):
    config = make_config(queue={"claim_lease": LEASE})
    args = ("--config", config, "--concurrency", "4")
    consumers = [scripts.start("consumer.py", *args) for _ in range(3)]
    producer = scripts.start("producer.py", "--config", config)
    markers = queue_marked(db, 20000)

    rng, kills = random.Random(7), 0
    for received in range(1000, 19000, 1500):  # SIGKILL a whole consumer, every process of it
        smtp.wait_for(received, timeout=180)
        victim = rng.randrange(len(consumers))
        kill_tree(consumers[victim])
        kills += 1
        consumers[victim] = scripts.start("consumer.py", *args)
    assert kills >= 10

    assert_every_job_completed_once(db, smtp, markers, max_duplicates=4 * kills, timeout=300)
    print(
        "\n%d kills, %d duplicated mails, 0 lost, of %d"
        % (kills, sum(copies(smtp).values()) - len(markers), len(markers))
    )
    assert not in_flight_together(smtp)
    stop_cleanly(scripts, consumers + [producer])


def test_killed_process_is_replaced_at_once_and_those_of_a_killed_consumer_stop_by_themselves(
    db, smtp, make_config, scripts
):
    slow_down(smtp, 0.005)
    config = make_config()  # the default lease (10 s): what comes back at once is freed at once
    consumer = scripts.start(
        "consumer.py", "--config", config, "--concurrency", "6", "--processes", "3"
    )
    markers = queue_marked(db, 1500)
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0

    smtp.wait_for(100)
    workers = wait_until(lambda: len(children(consumer)) == 3 and children(consumer))
    os.kill(workers[0], signal.SIGKILL)  # at most its 2 mails in flight are sent again
    wait_until(
        lambda: len(children(consumer)) == 3 and workers[0] not in children(consumer),
        what="a replacement process",
    )
    wait_until(lambda: "starting another" in scripts.log_of(consumer), what="the restart logged")
    smtp.wait_for(500)
    orphans = children(consumer)
    consumer.kill()  # the parent alone: its processes finish their mails in hand and stop
    consumer.wait()
    for pid in orphans:
        wait_until(
            lambda: (
                not os.path.exists("/proc/%d" % pid)
                or open("/proc/%d/stat" % pid).read().split()[2] == "Z"
            ),
            what="orphans to stop",
        )
    assert query(db, "SELECT count(*) FROM consumers") == [(0,)], "they handed their claims back"

    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    assert_every_job_completed_once(db, smtp, markers, max_duplicates=2)
    assert not in_flight_together(smtp)


def test_sigterm_with_32_mails_in_flight_finishes_them_puts_the_rest_back_and_exits_0(
    db, smtp, make_config, scripts
):
    slow_down(smtp, 0.5)
    markers = queue_marked(db, 300)
    config = make_config()
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    consumer = scripts.start("consumer.py", "--config", config, "--concurrency", "32")
    smtp.wait_for(40)

    assert scripts.stop(consumer) == 0
    sent = len(smtp.received)
    assert sent < 300, "it stopped taking work"
    assert status_counts(db) == {"completed": sent, "queued": 300 - sent}, "nothing in limbo"
    assert query(db, "SELECT count(*) FROM queue WHERE claimed_by IS NOT NULL") == [(0,)]
    assert query(db, "SELECT count(*) FROM consumers") == [(0,)]

    smtp.behaviour = None
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    assert_every_job_completed_once(db, smtp, markers)


# ------------------------------------------------------- the database misbehaves


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_or_crash_mid_run_loses_nothing(
    mode, postgres, database, smtp, make_config, scripts
):
    if postgres.throwaway is None:
        pytest.skip("restarts only the suite's own throwaway server, never TEST_DATABASE_URL's")
    slow_down(smtp, 0.002)
    config = make_config()
    consumers = [
        scripts.start("consumer.py", "--config", config, "--concurrency", "2", "--processes", "1")
        for _ in range(2)
    ]
    producer = scripts.start("producer.py", "--config", config)
    connect = lambda: psycopg2.connect(postgres.dsn(database))  # noqa: E731
    db = connect()
    db.autocommit = True
    before = queue_marked(db, 1000, "before")
    smtp.wait_for(200)

    restarted = time.monotonic()
    postgres.throwaway.restart(mode)
    db = connect()
    db.autocommit = True
    wait_until(lambda: len(listeners(db)) == 3, what="both consumers and the producer to LISTEN")
    print("\nlisteners back %.1f s after the restart began" % (time.monotonic() - restarted))
    after = queue_marked(db, 100, "after")  # reaches them only if they listen and produce again

    # a crash can undo what had not reached the disk: at most the mails in flight
    assert_every_job_completed_once(db, smtp, before + after, max_duplicates=4)
    assert not in_flight_together(smtp)
    print(
        "%s restart: %d duplicated, 0 lost, of %d" % (mode, sum(copies(smtp).values()) - 1100, 1100)
    )
    for proc in consumers + [producer]:
        assert scripts.stop(proc) == 0
        assert "trying again" in scripts.log_of(proc)
    db.close()


@pytest.mark.parametrize("whose", ["consumer", "producer"])
def test_terminated_listen_connection_comes_back_and_work_still_flows(
    whose, db, smtp, make_config, scripts
):
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config, "--processes", "1")
    producer = scripts.start("producer.py", "--config", config)
    wait_until(lambda: len(listeners(db)) == 2, what="both to LISTEN")
    [(old_pid,)] = query(
        db,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE %s",
        ("mailqueue %s (listen)%%" % whose,),
    )
    query(db, "SELECT pg_terminate_backend(%s)", (old_pid,))

    first = queue_marked(db, 1, "first")
    smtp.wait_for(1, timeout=POLL_INTERVAL + 5)
    wait_until(
        lambda: len(listeners(db)) == 2 and old_pid not in [p for p, _ in listeners(db)],
        what="a new LISTEN connection",
    )
    second = queue_marked(db, 1, "second")
    assert_every_job_completed_once(db, smtp, first + second)
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


@pytest.mark.parametrize("role", ["claim", "record"])
def test_terminated_claim_or_record_connection_sends_nothing_twice(
    role, db, smtp, make_config, scripts
):
    slow_down(smtp, 0.002)
    config = make_config()
    procs = start_queue(scripts, config, 2, "--concurrency", "4")
    markers = queue_marked(db, 600)
    kills = 0
    for received in range(40, 560, 50):
        smtp.wait_for(received)
        kills += len(
            query(
                db,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE %s",
                ("mailqueue consumer (%s)%%" % role,),
            )
        )
    assert kills >= 10
    # An outcome whose commit was lost is recorded again on a new connection, and
    # a claim whose reply was lost is freed: nothing is sent twice.
    assert_every_job_completed_once(db, smtp, markers)
    assert not in_flight_together(smtp)
    print(
        "\n%d %s connections terminated: 0 duplicated, 0 lost, of %d" % (kills, role, len(markers))
    )
    stop_cleanly(scripts, procs)


def test_a_dba_s_timeouts_on_the_database_cause_no_duplicate(
    postgres, database, db, smtp, make_config, scripts
):
    # What managed PostgreSQL services set: no session may idle in a transaction
    # for 2 s, no statement may run for 1 s. The relay takes 300 ms per mail.
    database_settings(
        postgres, database, idle_in_transaction_session_timeout="'2s'", statement_timeout="'1s'"
    )
    slow_down(smtp, 0.3)
    config = make_config()
    procs = start_queue(scripts, config, 2, "--concurrency", "4")
    markers = queue_marked(db, 400)
    assert_every_job_completed_once(db, smtp, markers, timeout=120)
    assert not in_flight_together(smtp)
    stop_cleanly(scripts, procs)


def test_idle_session_timeout_between_bursts_causes_no_duplicate(
    postgres, database, db, smtp, make_config, scripts
):
    if int(query(db, "SHOW server_version_num")[0][0]) < 140000:
        pytest.skip("idle_session_timeout is new in PostgreSQL 14")
    database_settings(postgres, database, idle_session_timeout="'3s'")
    config = make_config()
    procs = start_queue(scripts, config, 2, "--concurrency", "4")
    markers = []
    for burst in range(3):
        markers += queue_marked(db, 200, "burst%d" % burst)
        smtp.wait_for(len(markers))
        time.sleep(4)  # the idle gap the timeout is about: longer than 3 s
    assert_every_job_completed_once(db, smtp, markers)
    stop_cleanly(scripts, procs)


def test_a_recording_error_that_keeps_coming_back_stops_sending_and_resends_nothing(
    db, smtp, make_config, scripts
):
    # As a pooler or a missing permission would: every outcome's UPDATE fails
    # for a while. The consumer must wait, not loop resending the same mails.
    query(db, "CREATE TABLE blocked (since timestamptz)")
    query(
        db,
        """CREATE FUNCTION refuse_outcomes() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF EXISTS (SELECT 1 FROM blocked) THEN
                     RAISE EXCEPTION 'outcomes refused for the test';
                   END IF;
                   RETURN NEW;
                 END $$""",
    )
    query(
        db,
        "CREATE TRIGGER refuse_outcomes BEFORE UPDATE ON jobs FOR EACH ROW "
        "WHEN (NEW.status <> 'queued') EXECUTE PROCEDURE refuse_outcomes()",
    )
    slow_down(smtp, 0.002)
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config, "--concurrency", "8")
    producer = scripts.start("producer.py", "--config", config)
    markers = queue_marked(db, 2000)
    smtp.wait_for(300)
    query(db, "INSERT INTO blocked VALUES (now())")
    wait_until(lambda: "cannot record" in scripts.log_of(consumer), what="the error to show")
    stalled = len(smtp.received)
    wait_until(
        lambda: scripts.log_of(consumer).count("cannot record") >= 4, what="a few retries"
    )  # the same error, logged per process and retry
    assert len(smtp.received) <= stalled + 8, "at most one mail per mail in flight"
    query(db, "DELETE FROM blocked")
    assert_every_job_completed_once(db, smtp, markers)
    assert "outcomes are recorded again" in scripts.log_of(consumer)
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


# ------------------------------------------------------------- people intervene


def test_cancelling_a_claimed_job_never_hangs_and_is_never_overwritten(
    db, smtp, make_config, scripts
):
    slow_down(smtp, 0.5)
    markers = queue_marked(db, 24)
    config = make_config()
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    consumer = scripts.start(
        "consumer.py", "--config", config, "--concurrency", "4", "--processes", "1"
    )
    smtp.wait_for(1)
    claimed = wait_until(
        lambda: query(
            db, "SELECT job_id FROM queue WHERE claimed_by IS NOT NULL ORDER BY job_id DESC LIMIT 4"
        )
    )
    conn = psycopg2.connect(db.dsn)
    conn.autocommit = True
    query(conn, "SET statement_timeout = '2s'")  # fails if it has to wait
    started = time.monotonic()
    query(conn, "DELETE FROM jobs WHERE job_id = %s", (claimed[0][0],))  # docs/delivery.md's way
    query(
        conn,
        "UPDATE jobs SET status = 'dead', last_error = 'cancelled by hand' WHERE job_id = %s",
        (claimed[1][0],),
    )
    assert time.monotonic() - started < 2
    conn.close()

    stopping = time.monotonic()
    assert scripts.stop(consumer) == 0
    assert time.monotonic() - stopping < 10
    smtp.behaviour = None
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    assert query(db, "SELECT status, last_error FROM jobs WHERE job_id = %s", (claimed[1][0],)) == [
        ("dead", "cancelled by hand")
    ]
    assert status_counts(db) == {"completed": 22, "dead": 1}
    sent = copies(smtp)
    assert all(n == 1 for n in sent.values()), "a mail in flight may go, but only once"
    assert len(set(markers) - set(sent)) <= 2, "only the two cancelled ones may be missing"


def test_a_truncated_queue_heals_within_a_minute(db, smtp, make_config, scripts):
    slow_down(smtp, 0.05)
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config, "--concurrency", "4")
    producer = scripts.start("producer.py", "--config", config)
    markers = queue_marked(db, 300)
    smtp.wait_for(20)
    query(db, "TRUNCATE queue")  # an admin's mistake: queued jobs left without queue rows
    assert_every_job_completed_once(db, smtp, markers, timeout=90)
    assert "had no queue row" in scripts.log_of(producer)
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_dead_job_put_back_by_the_documented_sql_is_sent(db, smtp, make_config, scripts):
    smtp.behaviour = lambda envelope: "550 5.1.1 No such user (yet)"
    markers = queue_marked(db, 1, "late")
    config = make_config()
    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)
    wait_until(lambda: status_counts(db) == {"dead": 1}, what="the job to be dead")

    smtp.behaviour = None
    [(job_id,)] = query(db, "SELECT job_id FROM jobs")
    # docs/delivery.md's statement, as is:
    query(
        db,
        "UPDATE jobs SET status = 'available', attempts = 0, run_at = now() WHERE job_id = %s",
        (job_id,),
    )
    assert_every_job_completed_once(db, smtp, markers)
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_idle_in_transaction_session_elsewhere_slows_nothing_into_errors(
    postgres, database, db, smtp, make_config, scripts
):
    holder = psycopg2.connect(postgres.dsn(database))
    query(holder, "SELECT txid_current()")  # holds back vacuum's horizon until closed
    try:
        config = make_config()
        consumers = [scripts.start("consumer.py", "--config", config) for _ in range(2)]
        producer = scripts.start("producer.py", "--config", config)
        markers = queue_marked(db, 2000)
        assert_every_job_completed_once(db, smtp, markers)
        for proc in consumers + [producer]:
            assert scripts.stop(proc) == 0
            assert "WARNING" not in scripts.log_of(proc)
    finally:
        holder.close()


# ---------------------------------------------------------- the SMTP server misbehaves


def test_smtp_connection_dropped_after_the_content_fails_that_mail_then_sends_it(
    db, smtp, make_config, scripts
):
    dropped = []

    def drop_three(envelope):
        if len(dropped) < 3:
            dropped.append(envelope.rcpt_tos[0])
            return SmtpSink.DROP

    smtp.behaviour = drop_three
    markers = queue_marked(db, 10)
    config = make_config(queue={"retry_delay": 1, "max_retry_delay": 1})
    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)

    failed = wait_until(
        lambda: query(db, "SELECT email, last_error FROM jobs WHERE status = 'failed'"),
        what="failed jobs",
    )
    assert all("the server may have accepted it" in error for _, error in failed)
    assert_every_job_completed_once(db, smtp, markers)
    assert sorted(e for (e,) in query(db, "SELECT email FROM jobs WHERE attempts = 2")) == sorted(
        dropped
    )
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_smtp_server_down_for_a_while_burns_no_attempt_and_loses_nothing(
    db, smtp, make_config, scripts
):
    config = make_config()
    consumer = scripts.start("consumer.py", "--config", config, "--processes", "1")
    producer = scripts.start("producer.py", "--config", config)
    warmup = queue_marked(db, 1, "warmup")
    smtp.wait_for(1)  # the consumer now holds open SMTP connections
    smtp.stop()

    markers = queue_marked(db, 50)
    wait_until(
        lambda: status_counts(db) == {"completed": 1, "queued": 50},
        what="the producer to queue them",
    )
    wait_until(
        lambda: scripts.log_of(consumer).count("cannot reach SMTP server") >= 2,
        what="the consumer to notice, and keep trying",
    )
    assert status_counts(db) == {"completed": 1, "queued": 50}
    assert query(db, "SELECT max(attempts) FROM jobs WHERE status = 'queued'") == [(0,)]

    smtp.start()  # back, on the same port
    assert_every_job_completed_once(db, smtp, warmup + markers)
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


@pytest.mark.parametrize(
    "reply, status, retried",
    [
        ("451 4.3.0 Mail server temporarily rejected message", "failed", True),
        ("452 4.2.2 Mailbox full", "failed", True),
        ("550 5.7.1 Message rejected as spam", "dead", False),
        ("554 5.0.0 Transaction failed", "dead", False),
    ],
)
def test_4xx_replies_are_retried_and_5xx_replies_are_dead_at_once(
    reply, status, retried, db, smtp, make_config, scripts
):
    smtp.behaviour = lambda envelope: reply
    queue_marked(db, 1)
    config = make_config(queue={"retry_delay": 60, "max_retry_delay": 600})
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    [(got, attempts, error, wait)] = query(
        db, "SELECT status, attempts, last_error, extract(epoch FROM run_at - now()) FROM jobs"
    )
    assert (got, attempts) == (status, 1)
    assert reply in error
    if retried:
        assert 55 <= wait <= 76, "60 s, plus up to 25% jitter"
    [(outcome, code)] = query(db, "SELECT outcome, smtp_code FROM deliveries")
    assert (outcome, code) == (status, int(reply[:3]))


def test_a_slow_final_reply_is_waited_for_and_holds_up_only_its_own_connection(
    db, smtp, make_config, scripts
):
    async def slow_for_one(envelope):
        if envelope.rcpt_tos == ["mark0@example.com"]:
            await asyncio.sleep(6)

    smtp.behaviour = slow_for_one
    markers = queue_marked(db, 20)
    config = make_config(smtp_overrides={"timeout": 5})  # data_timeout stays 600 s
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert (
        scripts.run(
            "consumer.py", "--config", config, "--drain", "--concurrency", "4", "--processes", "1"
        ).returncode
        == 0
    )
    assert_every_job_completed_once(db, smtp, markers)
    arrived = arrivals(smtp)
    assert sum(t < arrived["mark-0"] for t in arrived.values()) >= 15, "the others went meanwhile"


def test_no_final_reply_within_data_timeout_is_an_unknown_outcome_retried_after_backoff(
    db, smtp, make_config, scripts
):
    async def hang(envelope):
        await asyncio.sleep(4)

    smtp.behaviour = hang
    queue_marked(db, 1)
    config = make_config(
        smtp_overrides={"timeout": 5, "data_timeout": 1},
        queue={"retry_delay": 60, "max_retry_delay": 600},
    )
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0
    [(status, attempts, error, wait)] = query(
        db, "SELECT status, attempts, last_error, extract(epoch FROM run_at - now()) FROM jobs"
    )
    assert (status, attempts) == ("failed", 1)
    assert "within 1 s" in error and "the server may have accepted it" in error
    assert 55 <= wait <= 76


def test_unexpected_error_on_one_job_does_not_stop_the_sender(
    postgres, database, db, smtp, make_config
):
    """A poison job, in process: the error is injected into our own code only."""
    import consumer as consumer_module
    from mailqueue import config as configuration
    from mailqueue import doorbell

    markers = queue_marked(db, 3)
    [(poison,)] = query(db, "SELECT min(job_id) FROM jobs")
    config = configuration.load(make_config())
    consumer = consumer_module.Consumer(config, doorbell.Stop(), threads=2)
    real_build = consumer.composer.build

    def build(job, attachments=()):
        if job["job_id"] == poison:
            raise RuntimeError("something nobody foresaw")
        return real_build(job, attachments)

    consumer.composer.build = build
    from producer import move_ready_jobs

    conn = psycopg2.connect(postgres.dsn(database))
    conn.autocommit = True
    move_ready_jobs(conn, 100)
    conn.close()
    consumer.run(drain_only=True)

    assert sorted(copies(smtp)) == markers[1:]
    [(status, error)] = query(
        db, "SELECT status, last_error FROM jobs WHERE job_id = %s", (poison,)
    )
    assert status == "failed" and "RuntimeError: something nobody foresaw" in error
