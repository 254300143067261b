"""Replies read by what they say, against a real SMTP server (issue 18): one
recipient's trouble never stalls the others nor keeps its job alive for ever, a
relay's connection cap is respected, a recipient refused for now is tried again
alone, and a consumer that stops says QUIT."""

import pytest

from devservers import SmtpSink
from helpers import (
    copies,
    insert_jobs,
    query,
    queue_marked,
    status_counts,
    wait_until,
)
from ops_helpers import mailqueue
from test_replies import table_of_replies

FAST = {"retry_delay": 0, "max_retry_delay": 0}


def drain(scripts, config, *args, timeout=240):
    """producer --once, then consumer --drain, as a user would: both exit 0."""
    produced = scripts.run("producer.py", "--config", config, "--once", timeout=timeout)
    assert produced.returncode == 0, produced.stderr
    return scripts.run("consumer.py", "--config", config, "--drain", *args, timeout=timeout)


def serve_until(db, scripts, config, condition, what, timeout=120):
    producer = scripts.start("producer.py", "--config", config)
    consumer = scripts.start("consumer.py", "--config", config)
    wait_until(condition, timeout=timeout, what=what)
    assert scripts.stop(consumer) == 0 and scripts.stop(producer) == 0
    return consumer


def deliveries_of(db, email):
    return query(
        db,
        "SELECT d.outcome, d.smtp_code FROM deliveries d JOIN jobs USING (job_id) "
        "WHERE jobs.email = %s ORDER BY d.delivery_id",
        (email,),
    )


@pytest.mark.parametrize(
    "reply",
    [
        "451 4.3.0 Try again later",
        "450 4.2.0 Greylisted, please try again later",
        "450 4.2.1 The user you are trying to contact is receiving mail at a rate that "
        "prevents additional messages from being delivered.",
    ],
    ids=["generic", "greylisting", "gmail-rate"],
)
def test_one_recipient_answered_for_ever_ends_and_the_others_all_arrive(
    db, smtp, make_config, scripts, reply
):
    poison = "poison@example.com"
    smtp.rcpt_behaviour = lambda address: reply if address == poison else None
    markers = queue_marked(db, 300)
    insert_jobs(db, [(poison, "never lands", None)])
    config = make_config(queue=dict(FAST, max_attempts=3, max_deferrals=3))
    serve_until(
        db,
        scripts,
        config,
        lambda: status_counts(db).get("completed") == 300 and status_counts(db).get("dead") == 1,
        "the 300 to be sent and the poison job to end",
    )
    assert copies(smtp) == {m: 1 for m in markers}
    [(attempts, deferrals, last_error)] = query(
        db, "SELECT attempts, deferrals, last_error FROM jobs WHERE email = %s", (poison,)
    )
    assert attempts == 3 and reply.split()[1] in last_error
    rows = deliveries_of(db, poison)
    failures = [outcome for outcome, _ in rows if outcome in ("failed", "dead")]
    assert len(failures) == 3, "each attempt is in deliveries"
    if reply.startswith("451"):  # the seed's rule: a failed attempt each time
        assert [outcome for outcome, _ in rows] == ["failed", "failed", "dead"]
    else:  # that recipient alone waits; an attempt is spent after max_deferrals in a row
        assert [outcome for outcome, _ in rows].count("deferred") == 3 * 3


def test_a_transient_failure_twice_then_accepted_is_completed_with_three_attempts(
    db, smtp, make_config, scripts
):
    replies = ["451 4.3.0 Try again later", "451 4.3.0 Try again later"]
    smtp.behaviour = lambda envelope: replies.pop(0) if replies else None
    markers = queue_marked(db, 1)
    config = make_config(queue=FAST)
    serve_until(db, scripts, config, lambda: status_counts(db) == {"completed": 1}, "completion")
    assert copies(smtp) == {markers[0]: 1}
    assert query(db, "SELECT status, attempts FROM jobs") == [("completed", 3)]
    assert [o for o, _ in query(db, "SELECT outcome, 1 FROM deliveries ORDER BY delivery_id")] == [
        "failed",
        "failed",
        "sent",
    ]


def test_a_cc_refused_for_now_is_sent_again_alone_and_each_gets_one_copy(
    db, smtp, make_config, scripts
):
    refusals = {"cc@example.com": ["450 4.2.1 Mailbox busy, try again later"]}
    smtp.rcpt_behaviour = lambda address: (refusals.get(address) or [None]).pop(0)
    query(
        db,
        "INSERT INTO jobs (email, cc, content_message) "
        "VALUES ('to@example.com', ARRAY['cc@example.com'], 'mail with marker:cc-1')",
    )
    config = make_config(queue=FAST)
    serve_until(db, scripts, config, lambda: status_counts(db) == {"completed": 1}, "completion")
    envelopes = [rcpts for _, rcpts, _, _ in smtp.received]
    assert envelopes == [["to@example.com"], ["cc@example.com"]]
    assert copies(smtp) == {"cc-1": 2}, "one copy for the To, one for the Cc"
    ids = {
        content.split(b"Message-ID: ")[1].split(b"\r\n")[0] for _, _, content, _ in smtp.received
    }
    assert len(ids) == 1, "the same Message-ID both times"
    [(attempts, pending)] = query(db, "SELECT attempts, pending_recipients FROM jobs")
    assert attempts == 1 and pending is None
    assert [o for o, _ in deliveries_of(db, "to@example.com")] == ["sent", "sent"]


def test_postfix_too_much_mail_spends_no_attempt_and_kills_no_job(db, smtp, make_config, scripts):
    refused = []

    def anvil(session):
        if len(refused) < 20:
            refused.append(1)
            return "450 4.7.1 Error: too much mail from 127.0.0.1"
        return None

    smtp.mail_behaviour = anvil
    markers = queue_marked(db, 60)
    result = drain(scripts, make_config(queue=dict(FAST, max_attempts=1)))
    assert result.returncode == 0, result.stderr
    assert copies(smtp) == {m: 1 for m in markers}
    assert status_counts(db) == {"completed": 60}
    assert query(db, "SELECT max(attempts) FROM jobs") == [(1,)]
    assert query(db, "SELECT count(*) FROM deliveries WHERE outcome = 'deferred'") == [(20,)]


@pytest.mark.parametrize(
    "greeting",
    [
        "421 4.7.0 sink.example.com Error: too many connections from 127.0.0.1",
        "421 Too many concurrent SMTP connections from this IP address; please try again later.",
    ],
    ids=["postfix", "exim"],
)
def test_a_relay_that_takes_8_connections_drains_600_mails_at_concurrency_32(
    postgres, database, db, make_config, scripts, greeting
):
    with SmtpSink(max_connections=8) as capped:
        capped.greeting = greeting
        markers = queue_marked(db, 600)
        config = make_config(smtp_overrides={"port": capped.port})
        result = drain(scripts, config, "--concurrency", "32", "--processes", "1")
        assert result.returncode == 0, result.stderr
        assert copies(capped) == {m: 1 for m in markers}
        assert capped.most_connections <= 8 and capped.refused_at_greeting > 0
        assert "takes no more connections" in result.stderr


def test_no_final_reply_holds_a_job_that_says_hold_until_requeued(db, smtp, make_config, scripts):
    swallowed = []

    def swallow_once(envelope):
        if not swallowed:
            swallowed.append(1)
            return SmtpSink.DROP
        return None

    smtp.behaviour = swallow_once
    query(
        db,
        "INSERT INTO jobs (email, content_message, on_uncertain) "
        "VALUES ('code@example.com', 'mail with marker:otp', 'hold')",
    )
    config = make_config(queue=FAST)
    result = drain(scripts, config)
    assert result.returncode == 0, result.stderr
    [(status, attempts, last_error)] = query(db, "SELECT status, attempts, last_error FROM jobs")
    assert (status, attempts) == ("uncertain", 1) and "may have accepted" in last_error
    assert copies(smtp) == {}
    requeued = mailqueue("requeue", "--config", config, "--status", "uncertain")
    assert requeued.returncode == 0, requeued.stderr
    assert drain(scripts, config).returncode == 0
    assert copies(smtp) == {"otp": 1}
    assert status_counts(db) == {"completed": 1}


def test_a_consumer_that_stops_says_quit_on_its_connections(db, smtp, make_config, scripts):
    queue_marked(db, 40)
    config = make_config()
    consumer = serve_until(
        db, scripts, config, lambda: status_counts(db) == {"completed": 40}, "the mails"
    )
    assert consumer.returncode == 0
    assert smtp.quits >= 1


LIVE_PHASES = ("mail", "rcpt", "dot")  # aiosmtpd answers DATA with 354 itself


@pytest.mark.parametrize(
    "server, phase, code, text, action",
    [row for row in table_of_replies() if row[1] in LIVE_PHASES],
    ids=lambda v: str(v)[:24],
)
def test_each_reply_of_the_docs_table_once_then_the_mail_goes(
    db, smtp, make_config, scripts, server, phase, code, text, action
):
    reply = ["%s %s" % (code, text)]
    once = lambda *args: reply.pop() if reply else None  # noqa: E731
    if phase == "mail":
        smtp.mail_behaviour = once
    elif phase == "rcpt":
        smtp.rcpt_behaviour = once
    else:
        smtp.behaviour = once
    markers = queue_marked(db, 1)
    config = make_config(queue=dict(FAST, max_attempts=2))
    serve_until(
        db,
        scripts,
        config,
        lambda: status_counts(db) in ({"completed": 1}, {"dead": 1}),
        "the job to end",
    )
    [(status, attempts)] = query(db, "SELECT status, attempts FROM jobs")
    outcomes = [o for o, _ in query(db, "SELECT outcome, 1 FROM deliveries ORDER BY delivery_id")]
    if action == "refused":
        assert (status, attempts, outcomes) == ("dead", 1, ["dead"])
        assert copies(smtp) == {}
        return
    assert copies(smtp) == {markers[0]: 1}
    assert status == "completed"
    if action == "fail":
        assert (attempts, outcomes) == (2, ["failed", "sent"])
    elif action == "closing":  # the relay's trouble: tried again, nothing spent or logged
        assert (attempts, outcomes) == (1, ["sent"])
    else:  # throttle, defer: no attempt spent, the deferral in deliveries
        assert (attempts, outcomes) == (1, ["deferred", "sent"])
