"""A good client of a remote relay: few database connections however many mails
are in flight, a rate limit across consumers, throttling replies that slow the
sender and spend no attempt, relays that close connections, priority and expiry."""

import collections
import threading
import time

from devservers import SmtpSink
from helpers import (
    assert_every_job_completed_once,
    copies,
    query,
    queue_marked,
    send_what_is_queued,
    status_counts,
    wait_until,
)


def busiest_second(times):
    """The most mails that arrived within any one second."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_database_connections_do_not_grow_with_the_mails_in_flight(db, smtp, make_config, scripts):
    config = make_config()
    consumer = scripts.start(
        "consumer.py", "--config", config, "--concurrency", "64", "--processes", "2"
    )
    producer = scripts.start("producer.py", "--config", config)
    markers = queue_marked(db, 3000)
    seen = collections.Counter()
    while len(smtp.received) < 3000 and consumer.poll() is None:
        rows = query(
            db,
            "SELECT application_name FROM pg_stat_activity "
            "WHERE datname = current_database() "
            "AND application_name LIKE 'mailqueue consumer%%' "
            "AND application_name NOT LIKE '%%(start-up check)%%'",
        )
        per_process = collections.Counter(name.rsplit(" ", 1)[-1] for (name,) in rows)
        seen["peak"] = max(seen["peak"], len(rows))
        assert all(n <= 3 for n in per_process.values()), per_process
        time.sleep(0.05)  # sampling pg_stat_activity while mail goes
    assert_every_job_completed_once(db, smtp, markers)
    assert 0 < seen["peak"] <= 6, seen
    print("\n64 mails in flight: at most %d database connections" % seen["peak"])
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_the_rate_limit_holds_across_three_consumers(db, smtp, make_config, scripts):
    rate = 20
    config = make_config(queue={"rate_limit": rate})
    consumers = [scripts.start("consumer.py", "--config", config) for _ in range(3)]
    producer = scripts.start("producer.py", "--config", config)
    markers = queue_marked(db, 200)
    assert_every_job_completed_once(db, smtp, markers, timeout=120)
    times = [at for _, _, _, at in smtp.received]
    busiest = busiest_second(times)
    mean = (len(times) - 1) / (max(times) - min(times))
    print(
        "\nrate limit %d/s over 3 consumers: busiest second %d, mean %.1f/s" % (rate, busiest, mean)
    )
    assert busiest <= rate * 1.1
    # Not divided among the consumers (a third each would be 6.7/s); how close to
    # the limit it runs (the issue asks 90%) is ./scripts/bench's figure: on a
    # loaded machine the mean follows the CPU, not the limiter.
    assert mean >= rate / 2
    for proc in consumers + [producer]:
        assert scripts.stop(proc) == 0


class Quota:
    """An SMTP server's sending quota: past `per_second` accepted mails in the
    last second, it answers as Amazon SES does."""

    REPLY = "454 4.7.0 Throttling failure: Maximum sending rate exceeded."

    def __init__(self, per_second):
        self.per_second = per_second
        self.accepted = collections.deque()
        self.throttled = 0
        self.lock = threading.Lock()

    def __call__(self, envelope):
        with self.lock:
            now = time.monotonic()
            while self.accepted and self.accepted[0] < now - 1.0:
                self.accepted.popleft()
            if self.per_second is not None and len(self.accepted) >= self.per_second:
                self.throttled += 1
                return self.REPLY
            self.accepted.append(now)
            return None


def test_throttling_replies_slow_the_sender_spend_no_attempt_and_the_rate_recovers(
    db, smtp, make_config, scripts
):
    quota = Quota(15)
    smtp.behaviour = quota
    config = make_config(queue={"max_attempts": 3})
    consumer = scripts.start("consumer.py", "--config", config)
    producer = scripts.start("producer.py", "--config", config)
    markers = queue_marked(db, 150)
    wait_until(lambda: "slowing down" in scripts.log_of(consumer), what="the slow-down")
    smtp.wait_for(100, timeout=60)
    quota.per_second = None  # the quota lifts
    wait_until(
        lambda: "back to full speed" in scripts.log_of(consumer), timeout=90, what="the recovery"
    )
    assert_every_job_completed_once(db, smtp, markers)
    assert query(db, "SELECT max(attempts) FROM jobs") == [(1,)], "throttling spent no attempt"
    print("\nquota 15/s: %d throttled replies for %d mails" % (quota.throttled, len(markers)))
    assert quota.throttled <= len(markers)
    log = scripts.log_of(consumer)
    assert log.count("slowing down") <= 2, "once per process, not once per mail"
    for proc in (consumer, producer):
        assert scripts.stop(proc) == 0


def test_a_relay_that_closes_the_connection_every_10_mails_costs_no_attempt(
    db, make_config, scripts
):
    def closing(session):
        if getattr(session, "mails", 0) >= 10:
            return "421 4.4.2 closing transmission channel"

    with SmtpSink(mail_behaviour=closing) as smtp:
        config = make_config(smtp_overrides={"port": smtp.port})
        markers = queue_marked(db, 200)
        send_what_is_queued(scripts, config, "--concurrency", "4")
        assert_every_job_completed_once(db, smtp, markers)
    assert query(db, "SELECT max(attempts) FROM jobs") == [(1,)]


def test_a_relay_that_closes_idle_connections_costs_no_attempt(db, make_config, scripts):
    with SmtpSink(timeout=1) as smtp:  # aiosmtpd hangs up after 1 s of silence, as SES after 10
        config = make_config(smtp_overrides={"port": smtp.port})
        consumer = scripts.start("consumer.py", "--config", config, "--concurrency", "4")
        producer = scripts.start("producer.py", "--config", config)
        first = queue_marked(db, 5, "first")
        smtp.wait_for(5)
        time.sleep(2.5)  # the silence the relay closes connections after (what is tested)
        second = queue_marked(db, 5, "second")
        assert_every_job_completed_once(db, smtp, first + second)
        for proc in (consumer, producer):
            assert scripts.stop(proc) == 0
    assert query(db, "SELECT max(attempts) FROM jobs") == [(1,)]


def test_max_messages_per_connection_opens_a_new_connection(db, make_config, scripts):
    connections = []  # each SMTP session that got a MAIL FROM (kept: an id() may be reused)

    def count(session):
        if session not in connections:
            connections.append(session)

    with SmtpSink(mail_behaviour=count) as smtp:
        config = make_config(smtp_overrides={"port": smtp.port, "max_messages_per_connection": 5})
        markers = queue_marked(db, 40)
        send_what_is_queued(scripts, config, "--concurrency", "1", "--processes", "1")
        assert_every_job_completed_once(db, smtp, markers)
    assert len(connections) == 8


def test_larger_priority_goes_first(db, smtp, make_config, scripts):
    query(
        db,
        "INSERT INTO jobs (email, content_message, priority) "
        "SELECT 'p' || i || '@example.com', 'marker:p-' || i, i % 3 "
        "FROM generate_series(1, 30) i",
    )
    config = make_config()
    send_what_is_queued(scripts, config, "--concurrency", "1", "--processes", "1")
    order = [int(rcpts[0][1:].split("@")[0]) for _, rcpts, _, _ in smtp.received]
    expected = sorted(range(1, 31), key=lambda i: (-(i % 3), i))
    assert order == expected


def test_an_expired_job_is_dead_unsent_and_spends_no_attempt(db, smtp, make_config, scripts):
    query(
        db,
        "INSERT INTO jobs (email, content_message, expires_at) VALUES "
        "('stale@example.com', 'marker:stale-0', now() - interval '1 minute'), "
        "('fresh@example.com', 'marker:fresh-0', now() + interval '1 hour')",
    )
    config = make_config()
    send_what_is_queued(scripts, config)
    assert set(copies(smtp)) == {"fresh-0"}
    [(status, attempts, error)] = query(
        db, "SELECT status, attempts, last_error FROM jobs WHERE email = 'stale@example.com'"
    )
    assert (status, attempts) == ("dead", 0) and "expired" in error
    assert status_counts(db) == {"completed": 1, "dead": 1}
