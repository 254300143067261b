"""python -m mailqueue requeue and prune: what they change, what they never touch."""

import io
import select

import psycopg2
import pytest

from helpers import insert_jobs, query, status_counts, wait_until
from mailqueue import admin
from mailqueue import db as mailqueue_db
from ops_helpers import delivery, finished_job, mailqueue, waiting_job


@pytest.fixture
def conn(postgres, database):
    """A connection as the commands make it (mailqueue.db.connect)."""
    conn = mailqueue_db.connect(postgres.settings_for(database), "test of admin")
    yield conn
    conn.close()


def listening(postgres, database, channel):
    conn = psycopg2.connect(postgres.dsn(database))
    conn.autocommit = True
    query(conn, "LISTEN %s" % channel)
    return conn


def notifications_until_sentinel(conn, db, channel):
    """Every notification on `channel` up to a sentinel sent now: what came before it
    has come (notifications are delivered in commit order)."""
    query(db, "SELECT pg_notify(%s, 'sentinel')", (channel,))
    seen = []

    def sentinel():
        select.select([conn], [], [], 0.1)
        conn.poll()
        while conn.notifies:
            seen.append(conn.notifies.pop(0).payload)
        return "sentinel" in seen

    wait_until(sentinel, timeout=10, what="the sentinel notification")
    return seen[: seen.index("sentinel")]


def test_requeue_and_its_dry_run_count_the_same_and_the_producer_is_woken(
    postgres, database, db, make_config
):
    dead = [finished_job(db, "dead", "dead%d@example.com" % n) for n in range(3)]
    failed = waiting_job(db, "failed", due_ago=-3600)
    done = finished_job(db, "completed")
    query(
        db, "UPDATE jobs SET attempts = 5, last_error = 'gave up' WHERE job_id = ANY(%s)", (dead,)
    )
    before = query(db, "SELECT * FROM jobs ORDER BY job_id")
    bell = listening(postgres, database, "mailqueue_jobs")  # the producer's channel
    config = make_config()

    dry = mailqueue("requeue", "--config", config, "--status", "dead", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == "would requeue 3 dead job(s) (dry run: nothing changed)\n"
    assert query(db, "SELECT * FROM jobs ORDER BY job_id") == before
    assert notifications_until_sentinel(bell, db, "mailqueue_jobs") == []

    real = mailqueue("requeue", "--config", config, "--status", "dead")
    assert real.returncode == 0, real.stderr
    assert real.stdout == "requeued 3 dead job(s)\n"
    assert query(
        db,
        "SELECT job_id, status, attempts, end_time, run_at <= now() FROM jobs "
        "WHERE job_id = ANY(%s) ORDER BY job_id",
        (dead,),
    ) == [(job, "available", 0, None, True) for job in dead]
    assert notifications_until_sentinel(bell, db, "mailqueue_jobs"), "the producer was not rung"
    assert dict(
        query(db, "SELECT job_id, status FROM jobs WHERE job_id IN (%s, %s)", (failed, done))
    ) == {failed: "failed", done: "completed"}
    bell.close()


def test_requeued_dead_jobs_are_sent_by_the_running_scripts(db, smtp, make_config, scripts):
    smtp.behaviour = lambda envelope: "550 5.7.1 Relaying denied (misconfigured)"
    insert_jobs(db, [("a@example.com", "one", None), ("b@example.com", "two", None)])
    config = make_config()
    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)
    wait_until(lambda: status_counts(db) == {"dead": 2}, what="both jobs to be dead")
    smtp.behaviour = None  # the relay is fixed

    result = mailqueue("requeue", "--config", config, "--status", "dead")
    assert result.stdout == "requeued 2 dead job(s)\n", result.stderr
    smtp.wait_for(2)
    wait_until(lambda: status_counts(db) == {"completed": 2}, what="the requeued jobs to be sent")
    assert scripts.stop(producer) == 0 and scripts.stop(consumer) == 0
    assert query(db, "SELECT outcome, count(*) FROM deliveries GROUP BY 1 ORDER BY 1") == [
        ("dead", 2),
        ("sent", 2),
    ]


def test_requeue_only_the_jobs_named_and_tried_within_the_window(db, make_config):
    recent = [finished_job(db, "dead", ago=600) for _ in range(3)]
    old = finished_job(db, "dead", ago=3 * 86400)
    failed = waiting_job(db, "failed", due_ago=-60)
    query(
        db,
        "UPDATE jobs SET start_time = LOCALTIMESTAMP - interval '5 minutes' WHERE job_id = %s",
        (failed,),
    )
    config = make_config()

    named = mailqueue(
        "requeue",
        "--config",
        config,
        "--status",
        "dead",
        "--job",
        str(recent[0]),
        str(old),
        "--since",
        "1h",
    )
    assert named.stdout == "requeued 1 dead job(s)\n", named.stderr
    windowed = mailqueue("requeue", "--config", config, "--status", "dead", "--since", "2d")
    assert windowed.stdout == "requeued 2 dead job(s)\n", windowed.stderr
    assert (
        mailqueue("requeue", "--config", config, "--status", "failed", "--since", "15m").stdout
        == "requeued 1 failed job(s)\n"
    )
    expected = {job: "available" for job in recent + [failed]}
    expected[old] = "dead"
    assert dict(query(db, "SELECT job_id, status FROM jobs")) == expected


def test_requeue_in_batches_puts_back_every_job(db, conn):
    jobs = [finished_job(db, "dead", "d%d@example.com" % n) for n in range(23)]
    assert admin.requeue(conn, "dead", batch=5) == 23
    assert status_counts(db) == {"available": 23}
    assert admin.requeue(conn, "dead", job_ids=jobs, batch=5) == 0


def unfinished_jobs(db):
    """Jobs of every unfinished status, with old times too: none may ever be pruned."""
    jobs = [
        waiting_job(db, status, "%s%d@example.com" % (status, n), due_ago=90 * 86400)
        for status in ("available", "queued", "failed")
        for n in range(3)
    ]
    query(
        db,
        "UPDATE jobs SET start_time = LOCALTIMESTAMP - interval '90 days', "
        "end_time = LOCALTIMESTAMP - interval '90 days' WHERE job_id = ANY(%s)",
        (jobs,),
    )
    return jobs


def test_prune_deletes_old_finished_jobs_with_their_attempts_and_files_and_nothing_else(
    db, make_config
):
    old = [
        finished_job(db, status, ago=40 * 86400)
        for status in ("completed", "dead")
        for _ in range(15)
    ]
    recent = [finished_job(db, status, ago=86400) for status in ("completed", "dead")]
    unfinished = unfinished_jobs(db)
    for job in old + recent:
        delivery(db, job, "sent")
        query(
            db,
            "INSERT INTO attachments (job_id, filename, content) VALUES (%s, 'a.txt', 'x')",
            (job,),
        )
    config = make_config()

    dry = mailqueue("prune", "--config", config, "--older-than", "30d", "--dry-run")
    assert dry.stdout == (
        "would prune 30 job(s) finished more than 30d ago (dry run: nothing deleted)\n"
    ), dry.stderr
    assert query(db, "SELECT count(*) FROM jobs") == [(len(old + recent + unfinished),)]

    real = mailqueue("prune", "--config", config, "--older-than", "30d")
    assert real.stdout == "pruned 30 job(s) finished more than 30d ago\n", real.stderr
    assert sorted(j for (j,) in query(db, "SELECT job_id FROM jobs")) == sorted(recent + unfinished)
    assert sorted(j for (j,) in query(db, "SELECT job_id FROM deliveries")) == sorted(recent)
    assert sorted(j for (j,) in query(db, "SELECT job_id FROM attachments")) == sorted(recent)
    assert query(db, "SELECT count(*) FROM queue") == [(3,)]


def test_prune_in_small_batches_deletes_exactly_what_it_counted(db, conn):
    for n in range(40):
        finished_job(db, "completed" if n % 3 else "dead", ago=(2 + n % 5) * 86400)
    kept = unfinished_jobs(db) + [finished_job(db, "completed", ago=3600)]
    assert admin.prune(conn, 86400, dry_run=True, batch=7) == 40
    assert admin.prune(conn, 86400, batch=7) == 40
    assert sorted(j for (j,) in query(db, "SELECT job_id FROM jobs")) == sorted(kept)
    assert admin.prune(conn, 86400, batch=7) == 0


@pytest.mark.parametrize(
    "bad", ["30", "30 d", "1w", "-30d", "0d", "", "thirty days", "30d; DELETE FROM jobs", "1y"]
)
def test_prune_refuses_a_bad_duration_with_one_line_exit_code_2_and_deletes_nothing(
    db, make_config, bad
):
    finished_job(db, "completed", ago=40 * 86400)
    result = mailqueue("prune", "--config", make_config(), "--older-than=" + bad)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --older-than") and result.stderr.count("\n") == 1
    assert result.stdout == ""
    assert query(db, "SELECT count(*) FROM jobs") == [(1,)]


class Terminal(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_prune_shows_a_progress_bar_on_a_terminal_only(db, conn, tty):
    for _ in range(12):
        finished_job(db, "completed", ago=2 * 86400)
    stream = Terminal(tty)
    assert admin.prune(conn, 86400, batch=5, stream=stream) == 12
    if tty:
        assert stream.getvalue().endswith("\rprune [%s] 12/12\n" % ("#" * 30))
        assert stream.getvalue().count("\r") == 4  # batches of 5, 5, 2, and the empty last
    else:
        assert stream.getvalue() == ""
