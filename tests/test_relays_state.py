"""The relays' shared state in a real PostgreSQL (mailqueue/relays.py over the
section "Several relays" of sql/queries.sql): health, probes, rate and quota,
with several connections standing for several consumers."""

import threading
import time

import psycopg2
import pytest

from helpers import PASSWORD, query, wait_until
from mailqueue import db as db_module
from mailqueue import relays, report


@pytest.fixture
def connect(postgres, database):
    """Connections of their own, as other consumers have (closed at the end)."""
    opened = []

    def make():
        conn = psycopg2.connect(postgres.dsn(database))
        conn.autocommit = True
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


def all_at_once(count, work):
    """Run work(i) on `count` threads released together; their results in order."""
    results = [None] * count
    start = threading.Barrier(count)

    def run(i):
        start.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


# ---------------------------------------------------------------- health


def test_a_relay_goes_down_and_up_for_everyone_and_each_change_is_said_once(db, connect):
    other = connect()
    relays.register(db, ["ses", "postfix"])
    relays.register(other, ["ses", "postfix"])  # a second consumer starts: nothing changes
    states = relays.read_states(other)
    assert sorted(states) == ["postfix", "ses"]
    assert not states["ses"].down and not states["ses"].probe_due

    assert relays.mark_down(db, "ses", 30, "connection refused") is True
    assert relays.mark_down(other, "ses", 30, "connection refused again") is False, "said once"
    seen = relays.read_states(other)["ses"]
    assert seen.down and not seen.probe_due and seen.last_error == "connection refused again"
    assert not relays.read_states(other)["postfix"].down

    assert relays.mark_up(other, "ses") is True
    assert relays.mark_up(db, "ses") is False, "said once"
    back = relays.read_states(db)["ses"]
    assert not back.down and back.down_until is None
    assert back.last_error == "connection refused again", "the last reason stays for reports"


def test_mark_down_of_an_unknown_relay_makes_its_row(db):
    assert relays.mark_down(db, "late", 10, "TLS: certificate verify failed") is True
    assert relays.read_states(db)["late"].down


def test_a_reason_is_one_line_without_the_password(db):
    relays.mark_down(
        db, "ses", 30, "535 5.7.8 Authentication\r\nfailed for hunter2-pass", ["hunter2-pass", ""]
    )
    [(error,)] = query(db, "SELECT last_error FROM relays")
    assert error == "535 5.7.8 Authentication failed for ***"
    relays.mark_down(db, "ses", 30, "x" * 5000)
    [(error,)] = query(db, "SELECT last_error FROM relays")
    assert len(error) == relays.MAX_REASON


def test_once_down_until_passes_exactly_one_of_many_consumers_may_probe(db, connect):
    relays.mark_down(db, "ses", 30, "greeting timed out")
    conns = [connect() for _ in range(12)]
    # while down_until is ahead, nobody may try it
    assert not any(all_at_once(12, lambda i: relays.claim_probe(conns[i], "ses", hold=20)))
    query(db, "UPDATE relays SET down_until = now() - interval '1 second'")
    assert relays.read_states(db)["ses"].probe_due

    won = all_at_once(12, lambda i: relays.claim_probe(conns[i], "ses", hold=20))
    assert won.count(True) == 1, won
    # the others keep seeing it down, and no probe is due while one runs
    state = relays.read_states(conns[0])["ses"]
    assert state.down and not state.probe_due
    assert not relays.claim_probe(conns[1], "ses", hold=20)

    # the probe failed: down again for relay_retry_after, the change not said again
    prober = conns[won.index(True)]
    assert relays.mark_down(prober, "ses", 30, "greeting timed out") is False
    assert not relays.claim_probe(conns[2], "ses", hold=20)
    # its time up again, a probe that succeeds brings it back for all
    query(db, "UPDATE relays SET down_until = now() - interval '1 second'")
    assert relays.claim_probe(conns[3], "ses", hold=20)
    assert relays.mark_up(conns[3], "ses") is True
    assert not relays.read_states(conns[4])["ses"].down


def test_a_probe_whose_prober_died_lapses_after_its_hold(db, connect):
    relays.mark_down(db, "ses", 30, "connection refused")
    query(db, "UPDATE relays SET down_until = now() - interval '1 second'")
    assert relays.claim_probe(connect(), "ses", hold=20)  # and that consumer is never heard of
    assert not relays.claim_probe(db, "ses", hold=20)
    query(db, "UPDATE relays SET probe_until = now() - interval '1 second'")
    assert relays.claim_probe(db, "ses", hold=20)


def test_the_health_cache_reads_at_most_once_a_second_and_shows_its_own_changes_at_once(db):
    reads = []
    now = [100.0]

    def reader():
        reads.append(now[0])
        return relays.read_states(db)

    relays.register(db, ["ses", "postfix"])
    cache = relays.HealthCache(reader, clock=lambda: now[0])
    assert cache.is_up("ses") and cache.is_up("never-seen")
    for _ in range(50):
        cache.is_up("ses")
    assert reads == [100.0]

    relays.mark_down(db, "ses", 30, "connection refused")  # by another consumer
    now[0] += 0.5
    assert cache.is_up("ses"), "still the view of half a second ago"
    now[0] += 0.6
    assert not cache.is_up("ses") and reads == [100.0, 101.1]

    cache.note_up("ses")  # this process's own probe worked
    assert cache.is_up("ses") and len(reads) == 2
    cache.note_down("postfix", "421 4.7.0 too many connections")
    assert not cache.is_up("postfix")


# ---------------------------------------------------------------- rate


def test_a_relays_rate_limit_holds_across_consumers(db, connect):
    rate, seconds = 40.0, 2.0
    conns = [connect() for _ in range(3)]
    sent_at = []
    lock = threading.Lock()

    def consumer(i):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tokens = relays.take_tokens(conns[i], "ses", 5, rate)
            with lock:
                sent_at.extend([time.monotonic()] * tokens.granted)
            if tokens.granted < 5:
                time.sleep(min(tokens.wait, 0.05))  # pacing, as a consumer paces
        return True

    began = time.monotonic()
    all_at_once(3, consumer)
    # a full bucket (burst_for(40) = 2) and then 40 a second, +-10%
    expected = 2 + rate * seconds
    assert 0.9 * expected <= len(sent_at) <= 1.1 * expected, len(sent_at)
    first_second = [t for t in sent_at if t - began < 1.0]
    assert len(first_second) <= 1.1 * rate
    # another relay's bucket is its own
    assert relays.take_tokens(db, "postfix", 3, 100.0).granted == 3


def test_take_tokens_says_how_long_to_wait_for_the_next(db):
    first = relays.take_tokens(db, "ses", 10, 20.0)  # burst 1
    assert first.granted == 1
    empty = relays.take_tokens(db, "ses", 10, 20.0)
    assert empty.granted == 0 and 0 < empty.wait <= 0.05


# ---------------------------------------------------------------- daily quota


def test_a_daily_quota_is_never_passed_by_many_consumers_at_once(db, connect):
    conns = [connect() for _ in range(8)]
    assert relays.take_quota(db, "ses", 5, 50) == 5  # this hour's row is there
    # Another consumer holds the row (its take not yet committed) while eight ask
    # for 10 each: they all wait, then go together once it commits its 10.
    holder = connect()
    holder.autocommit = False
    query(holder, "UPDATE relay_usage SET sent = sent + 10 WHERE relay = 'ses'")
    results = []
    takers = [
        threading.Thread(target=lambda c=c: results.append(relays.take_quota(c, "ses", 10, 50)))
        for c in conns
    ]
    for taker in takers:
        taker.start()
    wait_until(
        lambda: (
            query(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%%relay_usage%%'",
            )
            == [(8,)]
        ),
        what="the eight takers to wait for the row",
    )
    holder.commit()
    for taker in takers:
        taker.join(timeout=60)
    assert sum(results) == 35, results  # 50 - 5 - 10: never more
    assert relays.take_quota(db, "ses", 1, 50) == 0

    def consumer(i):
        granted = 0
        while True:
            got = relays.take_quota(conns[i], "late", 3, 50)
            if not got:
                return granted
            granted += got

    assert sum(all_at_once(8, consumer)) == 50
    assert relays.take_quota(db, "late", 1, 50) == 0
    assert relays.take_quota(db, "other", 5, 50) == 5, "each relay its own quota"


def test_mails_given_back_may_be_taken_again(db):
    assert relays.take_quota(db, "ses", 10, 10) == 10
    relays.give_back_quota(db, "ses", 3)
    assert relays.take_quota(db, "ses", 5, 10) == 3


def test_the_quota_counts_the_rolling_24_hours_and_forgets_older_hours(db):
    hour = "date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    query(
        db,
        "INSERT INTO relay_usage (relay, hour, sent) VALUES "
        "('ses', %s - interval '23 hours', 30), ('ses', %s - interval '24 hours', 5), "
        "('ses', %s - interval '25 hours', 1000), ('ses', %s - interval '2 days', 1000)"
        % (hour, hour, hour, hour),
    )
    # 35 of 50 counted (the 25 and 48 hours old rows are outside)
    assert relays.take_quota(db, "ses", 100, 50) == 15
    assert query(db, "SELECT count(*) FROM relay_usage WHERE sent = 1000") == [(0,)], "pruned"
    # whatever the session's time zone, the same hour's row
    query(db, "SET TIME ZONE 'Asia/Kolkata'")
    query(db, "UPDATE relay_usage SET sent = sent - 5 WHERE hour = %s" % hour)
    assert relays.take_quota(db, "ses", 100, 50) == 5
    assert query(db, "SELECT count(*) FROM relay_usage") == [(3,)]


# ---------------------------------------------------------------- the schema


def test_the_relay_columns_are_optional_and_the_seed_insert_still_works(db):
    query(db, "INSERT INTO jobs(email, content_message) VALUES ('someone@example.com', 'test')")
    query(
        db,
        "INSERT INTO jobs(email, content_message, route) VALUES ('b@example.com', 'x', 'bulk')",
    )
    assert query(db, "SELECT route FROM jobs ORDER BY job_id") == [(None,), ("bulk",)]
    [(job,)] = query(db, "SELECT min(job_id) FROM jobs")
    query(
        db,
        "INSERT INTO deliveries (job_id, attempt, outcome, relay) VALUES (%s, 1, 'sent', 'ses')",
        (job,),
    )
    with pytest.raises(psycopg2.errors.CheckViolation):
        query(db, "INSERT INTO relay_usage (relay, hour, sent) VALUES ('ses', now(), -1)")
    with pytest.raises(psycopg2.errors.CheckViolation):
        query(db, "INSERT INTO relays (name, probe_until) VALUES ('ses', now())")


def test_the_worker_role_is_enough_for_every_relay_statement(db, postgres, database, roles):
    def login(role):
        conn = psycopg2.connect(postgres.dsn(database), user=roles[role], password=PASSWORD)
        conn.autocommit = True
        return conn

    worker, app = login("mailqueue_worker"), login("mailqueue_app")
    try:
        query(
            app,
            "INSERT INTO jobs (email, content_message, route) "
            "VALUES ('a@example.com', 'x', 'bulk')",
        )
        relays.register(worker, ["ses", "postfix"])
        assert relays.mark_down(worker, "ses", 30, "connection refused")
        query(db, "UPDATE relays SET down_until = now() - interval '1 second'")
        assert relays.claim_probe(worker, "ses", 10) and relays.mark_up(worker, "ses")
        assert not relays.read_states(worker)["ses"].down
        assert relays.take_tokens(worker, "ses", 2, 100.0).granted == 2
        assert relays.take_quota(worker, "ses", 4, 10) == 4
        relays.give_back_quota(worker, "ses", 1)
        assert report.relays_of(worker, 3600)["ses"]["quota_used"] == 3
        assert db_module.run(worker, "ops_relay_deliveries_since", since=3600) == []
    finally:
        worker.close()
        app.close()
