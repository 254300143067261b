"""Replies read by what they say (issue 18): each row of docs/replies.md's table of
real replies is a case, and the rules that turn one transaction's replies into a
job's one outcome (mailqueue/outcomes.py) with a fake clock and no server."""

import os
import re

import pytest

from helpers import ROOT
from mailqueue import outcomes, replies
from mailqueue.config import QueueSettings
from mailqueue.jobs import Job
from mailqueue.smtp import Envelope

_ROW = re.compile(r"^\| ([^|]+) \| (\w+) \| `(\d{3}) ([^`]*)` \| `(\w+)` \|$")


def table_of_replies():
    with open(os.path.join(ROOT, "docs", "replies.md"), encoding="utf-8") as f:
        rows = [_ROW.match(line.strip()) for line in f]
    return [row.groups() for row in rows if row]


def test_the_docs_table_has_the_replies_of_every_server_the_issue_names():
    servers = " ".join(row[0] for row in table_of_replies())
    for name in ("SES", "Gmail", "Outlook", "Postfix", "Exim", "greylisting", "Postgrey"):
        assert name in servers


@pytest.mark.parametrize(
    "server, phase, code, text, action", table_of_replies(), ids=lambda v: str(v)[:30]
)
def test_each_real_reply_leads_to_its_action(server, phase, code, text, action):
    assert replies.classify(phase, int(code), text).action == action


def test_a_bad_mailbox_may_be_suppressed_and_a_policy_refusal_never():
    assert replies.classify("rcpt", 550, "5.1.1 <x@example.com>: User unknown").bad_mailbox
    assert not replies.classify("rcpt", 550, "5.7.1 Message rejected as spam").bad_mailbox
    assert replies.classify("rcpt", 550, "5.7.1 Message rejected as spam").policy


# ---------------------------------------------------------------- outcomes

SETTINGS = QueueSettings(
    max_attempts=3, retry_delay=60, max_retry_delay=3600, max_deferrals=10, max_defer_time=3600
)
OK = (250, "2.1.5 OK")
READY = (354, "go ahead")
TO, CC = "to@example.com", "cc@example.com"


def job(**columns):
    row = dict(job_id=7, status="queued", attempts=0, deferrals=0, on_uncertain="retry")
    row.update(columns)
    return Job(queue_id=70, job_id=7, columns=row)


def transaction(the_job, rcpts, end=(250, "2.0.0 queued"), mail=OK, data=READY, now=0.0):
    recipients = [r for r, _ in rcpts]
    envelope = Envelope(mail, tuple(reply for _, reply in rcpts if reply), data)
    return outcomes.after_transaction(the_job, recipients, envelope, end, SETTINGS, now)


def test_a_mail_accepted_completes_and_spends_its_attempt():
    out = transaction(job(), [(TO, OK)])
    assert (out.kind, out.attempted, out.deferred, out.delivery) == ("sent", 1, 0, "sent")


def test_a_generic_temporary_failure_spends_an_attempt_and_the_last_one_is_dead():
    out = transaction(job(), [(TO, OK)], end=(451, "4.3.0 Try again later"))
    assert (out.kind, out.attempted, out.delivery) == ("failed", 1, "failed")
    assert out.delay >= 60
    out = transaction(job(attempts=2), [(TO, OK)], end=(451, "4.3.0 Try again later"))
    assert (out.kind, out.attempted) == ("dead", 1)
    assert "attempt 3 of 3" in out.error


def test_greylisting_defers_that_job_alone_without_an_attempt():
    grey = (450, "4.2.0 Greylisted, please try again later")
    out = transaction(job(), [(TO, grey)], data=(554, "no valid recipients"))
    assert (out.kind, out.attempted, out.deferred, out.delivery) == ("deferred", 0, 1, "deferred")
    assert not out.throttled
    assert 60 <= out.delay <= 75


def test_deferrals_are_bounded_in_number_and_in_time():
    grey = (450, "4.2.0 Greylisted")
    tenth = transaction(job(deferrals=9), [(TO, grey)], data=(554, "no"))
    assert (tenth.kind, tenth.attempted) == ("deferred", 0)
    eleventh = transaction(job(deferrals=10), [(TO, grey)], data=(554, "no"))
    assert (eleventh.kind, eleventh.attempted) == ("failed", 1)
    assert "put back 10 times in a row" in eleventh.error
    late = job(deferrals=2)
    late.deferred_since = 100.0
    out = transaction(late, [(TO, grey)], data=(554, "no"), now=100.0 + 3600)
    assert (out.kind, out.attempted) == ("failed", 1)
    last = job(deferrals=10, attempts=2)
    assert transaction(last, [(TO, grey)], data=(554, "no")).kind == "dead"


def test_a_throttling_reply_puts_the_mail_back_at_once_and_slows_the_relay():
    too_much = (450, "4.7.1 Error: too much mail from 127.0.0.1")
    out = transaction(job(), [(TO, None)], mail=too_much, data=None)
    assert (out.kind, out.attempted, out.deferred, out.delay) == ("released", 0, 1, 0.0)
    assert out.throttled and out.delivery == "deferred"


def test_a_cc_refused_for_now_waits_alone_while_the_to_gets_the_mail():
    busy = (450, "4.2.1 Mailbox busy, try again later")
    the_job = job()
    out = transaction(the_job, [(TO, OK), (CC, busy)])
    assert (out.kind, out.attempted, out.delivery) == ("deferred", 0, "sent")
    assert out.pending == [CC] and "sent to 1 recipient(s); waiting for" in out.error
    # the next try: the Cc alone, accepted: the job completes
    again = job(pending_recipients=[CC], delivered_before=True, deferrals=1)
    done = transaction(again, [(CC, OK)])
    assert (done.kind, done.pending) == ("sent", None)


def test_every_recipient_refused_for_good_is_dead_and_a_bad_mailbox_is_named():
    unknown = (550, "5.1.1 <to@example.com>: User unknown")
    out = transaction(job(), [(TO, unknown)], data=(554, "no valid recipients"))
    assert (out.kind, out.attempted) == ("dead", 1)
    assert out.bad_mailboxes == [TO]
    policy = (550, "5.7.1 spam")
    assert transaction(job(), [(TO, policy)], data=(554, "no")).bad_mailboxes == []


def test_some_refused_for_good_others_accepted_completes_naming_them():
    out = transaction(job(), [(TO, OK), (CC, (550, "5.1.1 unknown"))])
    assert out.kind == "sent" and CC in out.error


def test_no_final_reply_holds_when_the_job_says_hold_and_retries_otherwise():
    held = outcomes.after_transaction(
        job(on_uncertain="hold"), [TO], Envelope(OK, (OK,), READY), None, SETTINGS, 0.0, "timed out"
    )
    assert (held.kind, held.attempted, held.delivery) == ("uncertain", 1, "uncertain")
    retried = outcomes.after_transaction(
        job(), [TO], Envelope(OK, (OK,), READY), None, SETTINGS, 0.0, "timed out"
    )
    assert (retried.kind, retried.attempted) == ("failed", 1)
