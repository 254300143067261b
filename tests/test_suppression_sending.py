"""Sending respects the suppression list (issue 20), end to end: real
PostgreSQL, consumer.py and a real SMTP server that refuses some recipients at
RCPT and counts its connections.

These stories need the send path to call the hooks of mailqueue/suppressions.py
(the batch screen) and sql/queries.sql (suppress_rejected_recipient), which the
consumer's owner wires in; until SEND_PATH_SCREENS is True they are skipped,
and say so."""

import email

import pytest

from devservers import SmtpSink
from helpers import marker_of, query, send_what_is_queued

SEND_PATH_SCREENS = True  # True once the consumer calls suppressions.screen (issue 20)

pytestmark = pytest.mark.skipif(
    not SEND_PATH_SCREENS,
    reason="the send path does not call suppressions.screen yet (issue 20: see the report)",
)

REFUSALS = {
    "gone@example.com": "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown",
    "spam@example.com": "550 5.7.1 Message rejected as spam",
}


class RefusingSink(SmtpSink):
    """A sink that refuses the addresses of `refusals` at RCPT, and notes every
    connection (EHLO) and every RCPT it is asked."""

    def __init__(self, refusals, **options):
        super().__init__(**options)
        self.refusals = refusals
        self.connections = 0
        self.asked = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.connections += 1
        return await super().handle_EHLO(server, session, envelope, hostname, responses)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.asked.append(address)
        if address in self.refusals:
            return self.refusals[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def refusing():
    sink = RefusingSink(REFUSALS).start()
    yield sink
    sink.stop()


def job(db, address, marker, **columns):
    names = ["email", "content_message"] + list(columns)
    [(job_id,)] = query(
        db,
        "INSERT INTO jobs (%s) VALUES (%s) RETURNING job_id"
        % (", ".join(names), ", ".join(["%s"] * len(names))),
        [address, "marker:" + marker] + list(columns.values()),
    )
    return job_id


def test_a_5_1_1_at_rcpt_suppresses_and_the_next_job_to_it_is_never_sent(
    db, make_config, scripts, refusing
):
    config = make_config({"port": refusing.port})
    first = job(db, "gone@example.com", "g1")
    spam = job(db, "spam@example.com", "s1")
    send_what_is_queued(scripts, config)
    assert query(db, "SELECT email, reason, source, job_id FROM suppressions") == [
        ("gone@example.com", "hard_bounce", "smtp", first)
    ], "the 5.1.1 suppresses its address; the 5.7.1 (policy) no one"
    assert dict(query(db, "SELECT job_id, status FROM jobs")) == {first: "dead", spam: "dead"}

    refusing.connections, refusing.asked = 0, []
    again = job(db, "Gone@Example.com", "g2")
    send_what_is_queued(scripts, config)
    [(status, attempts, error)] = query(
        db, "SELECT status, attempts, last_error FROM jobs WHERE job_id = %s", (again,)
    )
    assert (status, attempts) == ("suppressed", 0)
    assert error.startswith(
        "suppressed: gone@example.com is on the suppression list (hard_bounce from smtp, since "
    )
    assert refusing.asked == [], "no SMTP transaction for a suppressed job"
    assert refusing.connections <= 1, "the consumer's start-up check alone connected"

    reset = job(db, "gone@example.com", "g3", ignore_suppression=True)
    send_what_is_queued(scripts, config)
    assert refusing.asked.count("gone@example.com") == 1, "ignore_suppression: tried again"
    assert query(db, "SELECT status FROM jobs WHERE job_id = %s", (reset,)) == [("dead",)]


def test_a_suppressed_cc_or_bcc_is_left_out_and_the_others_get_the_mail(
    db, make_config, scripts, refusing
):
    query(
        db,
        "INSERT INTO suppressions (email, reason) VALUES "
        "('cc.gone@example.org', 'hard_bounce'), ('bcc.gone@example.org', 'complaint')",
    )
    job(
        db,
        "to@example.com",
        "c1",
        cc=["Kế toán <CC.gone@example.org>", "cc.ok@example.org"],
        bcc=["bcc.gone@example.org", "bcc.ok@example.org"],
    )
    send_what_is_queued(scripts, make_config({"port": refusing.port}))
    [(_, rcpts, content, _)] = refusing.received
    assert sorted(rcpts) == ["bcc.ok@example.org", "cc.ok@example.org", "to@example.com"]
    assert marker_of(content) == "c1"
    assert "gone" not in email.message_from_bytes(content)["Cc"]
    assert query(db, "SELECT status FROM jobs") == [("completed",)]
    details = " ".join(d or "" for (d,) in query(db, "SELECT detail FROM deliveries"))
    assert "cc.gone@example.org" in details and "bcc.gone@example.org" in details
