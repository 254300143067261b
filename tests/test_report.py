"""The attempt log (deliveries) as the real consumer writes it, and
`python -m mailqueue report` on a history whose figures the test knows."""

import json

import pytest

from helpers import insert_jobs, query, status_counts, wait_until
from mailqueue import durations
from mailqueue.report import STATUSES
from ops_helpers import delivery, finished_job, mailqueue, quantile, waiting_job


def deliveries(db):
    return query(
        db,
        "SELECT attempt, outcome, smtp_code, detail, started_at <= finished_at, "
        "finished_at IS NOT NULL FROM deliveries ORDER BY delivery_id",
    )


# ---------------------------------------------------------------- the attempt log


def test_a_job_that_fails_once_then_succeeds_has_two_deliveries(db, smtp, make_config, scripts):
    tries = []

    def fail_the_first_try(envelope):
        tries.append(envelope.rcpt_tos)
        if len(tries) == 1:
            return "451 4.3.0 Temporary local problem, try again"

    smtp.behaviour = fail_the_first_try
    insert_jobs(db, [("retry@example.com", "second time lucky", None)])
    config = make_config(queue={"retry_delay": 0.5, "max_retry_delay": 1})
    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)
    wait_until(lambda: status_counts(db) == {"completed": 1}, what="the retry to complete")
    assert scripts.stop(producer) == 0 and scripts.stop(consumer) == 0

    [failed, sent] = deliveries(db)
    assert failed[:3] == (1, "failed", 451) and failed[4:] == (True, True)
    assert "451 4.3.0 Temporary local problem, try again" in failed[3]
    assert sent[:4] == (2, "sent", 250, None) and sent[4:] == (True, True)
    # written with the job's outcome: the two agree
    assert query(db, "SELECT attempts, last_error FROM jobs") == [(2, None)]
    assert len(smtp.received) == 1


def test_a_job_rejected_with_5xx_has_one_dead_delivery_with_the_reply(
    db, smtp, make_config, scripts
):
    smtp.behaviour = lambda envelope: "550 5.1.1 <nobody@example.com>: no such user here"
    insert_jobs(db, [("nobody@example.com", "bounce me", None)])
    config = make_config()
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain").returncode == 0

    [(attempt, outcome, code, detail, ordered, finished)] = deliveries(db)
    assert (attempt, outcome, code, ordered, finished) == (1, "dead", 550, True, True)
    [(last_error, attempts)] = query(db, "SELECT last_error, attempts FROM jobs")
    assert detail == last_error and attempts == 1
    assert "550 5.1.1 <nobody@example.com>: no such user here" in detail


# ---------------------------------------------------------------- the report


@pytest.fixture
def history(db):
    """A known history: what the report must say about it, worked out here."""
    lags = [float(n) for n in range(1, 21)]  # 20 jobs sent in the last hour
    for n, lag in enumerate(lags):
        finished_job(db, "completed", "sent%d@example.com" % n, lag=lag, ago=60 + 90 * n)
    finished_job(db, "completed", "old@example.com", lag=5000, ago=3 * 3600)  # outside
    dead_lags = [0.5, 2.5]  # finished in the window too
    refused = []
    for n, lag in enumerate(dead_lags):
        job = finished_job(db, "dead", "gone%d@example.com" % n, lag=lag, ago=120)
        refused.append(job)
        delivery(
            db,
            job,
            "dead",
            "recipient refused: 550 5.1.1 <gone%d@example.com>: Recipient address rejected" % n,
            550,
        )
    third = finished_job(db, "dead", "bob.smith+news@example.org", lag=1.0, ago=300)
    delivery(
        db,
        third,
        "dead",
        "recipient refused: 550 5.1.1 <bob.smith+news@example.org>: Recipient address rejected",
        550,
    )
    dead_lags.append(1.0)
    busy = [waiting_job(db, "failed", "busy%d@example.com" % n, due_ago=-600) for n in range(2)]
    for n, job in enumerate(busy):  # noqa: B007
        delivery(db, job, "failed", "mail refused: 451 4.3.0 Try again later", 451, ago=200)
    delivery(
        db, busy[0], "failed", "mail refused: 451 4.3.0 Try again later", 451, attempt=2, ago=100
    )  # the same job twice: one job
    delivery(db, busy[1], "failed", "mail refused: 421 4.4.2 Timeout", 421, ago=2 * 3600)  # outside
    waiting_job(db, "available", "new@example.com", due_ago=300)  # the oldest waiting
    waiting_job(db, "queued", "queued@example.com", due_ago=120)
    waiting_job(db, "available", "later@example.com", due_ago=-3600)  # not due yet
    finished = lags + dead_lags
    return {"sent": len(lags), "lags": finished, "oldest": 300.0}


def report_json(make_config, *args):
    result = mailqueue("report", "--config", make_config(), "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_report_json_on_a_known_history(db, history, make_config):
    report = report_json(make_config, "--since", "1h")

    assert list(report) == [
        "statuses",
        "sent",
        "sent_per_minute",
        "lag_seconds",
        "oldest_waiting_seconds",
        "failures",
        "bounce_rate",
        "complaint_rate",
        "suppressed",
        "relays",
    ]
    assert report["statuses"] == dict({s: 0 for s in STATUSES}, **status_counts(db))
    assert report["statuses"]["queued"] == 1 and set(report["statuses"]) == set(STATUSES)
    assert report["sent"] == history["sent"]
    assert report["sent_per_minute"] == pytest.approx(history["sent"] / 60.0, abs=0.001)
    lags = history["lags"]
    assert report["lag_seconds"] == pytest.approx(
        {"p50": quantile(lags, 0.5), "p95": quantile(lags, 0.95), "max": max(lags)}, abs=0.01
    )
    # run_at was set 300 s before the report ran: a little more by now
    assert history["oldest"] <= report["oldest_waiting_seconds"] < history["oldest"] + 60

    reasons = {f["reason"]: f["jobs"] for f in report["failures"]}
    rejected = "recipient refused: 550 5.1.1 <...@...>: Recipient address rejected"
    assert reasons == {rejected: 3, "mail refused: 451 4.3.0 Try again later": 2}
    assert report["failures"][0]["reason"] == rejected  # the most jobs first
    assert "example" not in json.dumps(report["failures"]), "no address in a reason"


def test_report_window_decides_what_is_counted(db, history, make_config):
    report = report_json(make_config, "--since", "4h")
    assert report["sent"] == history["sent"] + 1
    assert report["lag_seconds"]["max"] == pytest.approx(5000, abs=0.01)
    assert "mail refused: 421 4.4.2 Timeout" in {f["reason"] for f in report["failures"]}
    assert report["sent_per_minute"] == pytest.approx((history["sent"] + 1) / 240.0, abs=0.001)


def test_report_on_an_empty_queue_has_zeros_and_nulls(make_config):
    report = report_json(make_config)
    assert report == {
        "statuses": {s: 0 for s in STATUSES},
        "sent": 0,
        "sent_per_minute": 0.0,
        "lag_seconds": {"p50": None, "p95": None, "max": None},
        "oldest_waiting_seconds": None,
        "failures": [],
        "bounce_rate": None,
        "complaint_rate": None,
        "suppressed": {"hard_bounce": 0, "complaint": 0, "unsubscribe": 0, "manual": 0},
        "relays": {},
    }


def test_report_in_words_for_people(db, history, make_config):
    result = mailqueue("report", "--config", make_config())
    assert result.returncode == 0, result.stderr
    for status in STATUSES:
        assert status in result.stdout
    assert "sent" in result.stdout and " 20 " in result.stdout
    assert "550 5.1.1 <...@...>: Recipient address rejected" in result.stdout
    assert "gone0@example.com" not in result.stdout


@pytest.mark.parametrize("bad", ["1", "1 h", "1w", "-1h", "0m", "1.5h", "h", "1h;"])
def test_report_refuses_a_bad_window_with_one_line_and_exit_code_2(make_config, bad):
    result = mailqueue("report", "--config", make_config(), "--since=" + bad)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--since" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_with_an_unreachable_database_is_one_line(make_config):
    config = make_config(database={"database": "x", "host": "127.0.0.1", "port": 1})
    result = mailqueue("report", "--config", config)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect") and result.stderr.count("\n") == 1


def test_durations_are_whole_days_hours_or_minutes():
    assert durations.parse("30d") == 30 * 86400
    assert durations.parse("12h") == 12 * 3600
    assert durations.parse("15m") == 15 * 60
    for bad in ("", "15", "15s", "15M", " 15m", "15m ", "0h", "1e3m", "١٥m"):
        with pytest.raises(durations.BadDuration):
            durations.parse(bad)


def test_report_gives_bounce_and_complaint_rates_and_the_suppressions(db, make_config):
    """Forty mails sent in the window; two came back (a DSN, a 5.1.1 at RCPT), one
    drew a complaint; and one bounce older than the window is not counted."""
    from helpers import query

    for n in range(38):
        finished_job(db, "completed", "ok%d@example.com" % n, ago=120)
    bounced = [finished_job(db, "completed", "b%d@example.com" % n, ago=120) for n in range(2)]
    query(db, "UPDATE jobs SET status = 'bounced' WHERE job_id = %s", (bounced[0],))
    query(
        db,
        "INSERT INTO mail_events (message_key, recipient, kind, status, source, job_id, "
        "received_at) VALUES "
        "('sha256:a', 'b0@example.com', 'failed', '5.1.1', 'dsn', %(b0)s, now()), "
        "('smtp:x', 'b1@example.com', 'rejected', '5.1.1', 'smtp', %(b1)s, now()), "
        "('sha256:b', 'ok1@example.com', 'complaint', NULL, 'arf', NULL, now()), "
        "('sha256:c', 'ok2@example.com', 'delayed', '4.2.0', 'dsn', NULL, now()), "
        "('sha256:d', 'ok3@example.com', 'failed', '5.1.1', 'dsn', NULL, "
        " now() - interval '3 hours')",
        {"b0": bounced[0], "b1": bounced[1]},
    )
    query(
        db,
        "INSERT INTO suppressions (email, reason, expires_at) VALUES "
        "('b0@example.com', 'hard_bounce', NULL), ('b1@example.com', 'hard_bounce', NULL), "
        "('ok1@example.com', 'complaint', NULL), "
        "('gone@example.com', 'manual', now() - interval '1 minute')",
    )
    report = report_json(make_config, "--since", "1h")
    assert report["bounce_rate"] == pytest.approx(2 / 40)
    assert report["complaint_rate"] == pytest.approx(1 / 40)
    assert report["suppressed"] == {"hard_bounce": 2, "complaint": 1, "unsubscribe": 0, "manual": 0}
    assert report["statuses"]["bounced"] == 1

    words = mailqueue("report", "--config", make_config()).stdout
    assert "bounce rate       5.00%  (Amazon SES reviews at 5.00%)" in words
    assert "complaint rate    2.50%" in words and "Gmail wants under 0.30%" in words
