"""Hostile and broken input: each bad job ends dead with a clear last_error, the
consumer keeps going, the good jobs beside them are sent, and nothing injected
reaches the SMTP server."""

import email
import email.policy

import psycopg2
import pytest

from devservers import SmtpSink
from helpers import query, recipients, status_counts

MEGABYTE = "Tiếng Việt có dấu. " * 40000  # ~1 MB of UTF-8 text
SMUGGLED = (
    "Hello\r\n.\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<injected@example.org>\r\n"
    "DATA\r\nSubject: smuggled\r\n\r\ninjected\r\n.\r\n"
)

# (email, subject, content_message, expected status, words expected in last_error)
CASES = [
    (None, None, "x", "dead", "email is NULL"),
    ("", None, "x", "dead", "email is empty"),
    ("   ", None, "x", "dead", "email is empty"),
    ("no-at-sign.example.com", None, "x", "dead", "not a valid address"),
    ("a@example.com\r\nBcc: injected@example.org", None, "x", "dead", "line break"),
    ("a@example.com\nBcc: injected@example.org", None, "x", "dead", "line break"),
    ("alice@example.org(<injected@example.org>", None, "x", "dead", "not a valid address"),
    ("Alice <alice@example.org>", None, "x", "dead", "not a valid address"),
    ("a@example.com, injected@example.org", None, "x", "dead", "not a valid address"),
    ("a@example.com;injected@example.org", None, "x", "dead", "not a valid address"),
    ("x" * 988 + "@example.com", None, "x", "dead", "too long"),
    (
        "ok1@example.com",
        "Hi\r\nBcc: injected@example.org",
        "x",
        "dead",
        "subject contains a line break",
    ),
    ("ok2@example.com", "bell\x07 and escape\x1b[31m", "x", "dead", "control character"),
    ("ok3@example.com", "next line\u2028Bcc: injected@example.org", "x", "dead", "line break"),
    ("ok4@example.com", "=?UTF-8?Q?=0A?=Bcc: injected@example.com", "x", "dead", "encoded word"),
    ("ok5@example.com", MEGABYTE, "x", "dead", "characters long"),
    ("ok6@example.com", None, None, "dead", "content_message is NULL"),
    ("ok7@example.com", None, "", "dead", "content_message is empty"),
    ("ok8@example.com", None, " \r\n ", "dead", "content_message is empty"),
    ("ok9@example.com", None, "escape \x1b[2J", "dead", "control character"),
    # Good ones, among the bad: sent, and sent as they are.
    ("good-null-subject@example.com", None, "default subject", "completed", None),
    ("good-empty-subject@example.com", "", "default subject", "completed", None),
    ("good-smuggling-body@example.com", "Trông vô hại", SMUGGLED, "completed", None),
    ("good-megabyte@example.com", "Một megabyte", MEGABYTE, "completed", None),
    ("người.nhận@ví-dụ.vn", "Địa chỉ quốc tế", "Xin chào", "completed", None),
    ("bob@ví-dụ.vn", "Tên miền quốc tế", "Xin chào", "completed", None),
]


def cases_for(*addresses):
    return [case for case in CASES if case[0] in addresses]


def insert_cases(db, cases):
    with db.cursor() as cur:
        for address, subject, body, _, _ in cases:
            cur.execute(
                "INSERT INTO jobs (email, subject, content_message) VALUES (%s, %s, %s)",
                (address, subject, body),
            )


def run_once(scripts, config):
    for script, flag in (("producer.py", "--once"), ("consumer.py", "--drain")):
        result = scripts.run(script, "--config", config, flag)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr


def test_bad_jobs_are_dead_with_a_reason_and_good_ones_beside_them_are_sent(
    db, smtp, make_config, scripts
):
    insert_cases(db, CASES)
    run_once(scripts, make_config())

    rows = query(db, "SELECT status, attempts, last_error FROM jobs ORDER BY job_id")
    wrong = []
    for (address, subject, body, status, reason), (got, attempts, error) in zip(CASES, rows):  # noqa: B007
        if (
            got != status
            or (reason and reason not in (error or ""))
            or (status == "dead" and attempts != 0)
        ):
            wrong.append((repr(address)[:40], repr(subject)[:40], got, attempts, error))
    assert not wrong, "\n".join(map(str, wrong))

    good = [c[0] for c in CASES if c[3] == "completed"]
    assert sorted(recipients(smtp)) == sorted(
        "bob@xn--v-d-rma6749a.vn" if a == "bob@ví-dụ.vn" else a for a in good
    )
    for _, _, content, _ in smtp.received:
        head = content.split(b"\r\n\r\n", 1)[0]
        assert b"injected" not in head and b"\nBcc" not in head and b"\nbcc" not in head
        assert b"evil@" not in head


def test_what_looks_like_smtp_commands_in_a_body_stays_in_the_body(db, smtp, make_config, scripts):
    insert_cases(db, cases_for("good-smuggling-body@example.com"))
    run_once(scripts, make_config())
    [(sender, rcpts, content, _)] = smtp.received
    assert (sender, rcpts) == ("noreply@example.com", ["good-smuggling-body@example.com"])
    body = email.message_from_bytes(content, policy=email.policy.default).get_payload(decode=True)
    assert body.decode("utf-8") == SMUGGLED


def test_a_megabyte_of_text_arrives_intact(db, smtp, make_config, scripts):
    insert_cases(db, cases_for("good-megabyte@example.com"))
    run_once(scripts, make_config())
    [(_, _, content, _)] = smtp.received
    body = email.message_from_bytes(content).get_payload(decode=True)
    assert body.decode("utf-8") == MEGABYTE


def test_internationalised_address_is_sent_with_smtputf8_when_offered(
    db, smtp, make_config, scripts
):
    insert_cases(db, cases_for("người.nhận@ví-dụ.vn", "bob@ví-dụ.vn"))
    run_once(scripts, make_config())
    by_rcpt = {rcpts[0]: content for _, rcpts, content, _ in smtp.received}
    assert sorted(by_rcpt) == ["bob@xn--v-d-rma6749a.vn", "người.nhận@ví-dụ.vn"]
    message = email.message_from_bytes(by_rcpt["người.nhận@ví-dụ.vn"], policy=email.policy.default)
    assert message["To"] == "người.nhận@ví-dụ.vn"
    assert message["Subject"] == "Địa chỉ quốc tế"


def test_internationalised_address_is_dead_when_the_server_lacks_smtputf8(db, make_config, scripts):
    with SmtpSink(enable_SMTPUTF8=False) as plain:
        insert_cases(db, cases_for("người.nhận@ví-dụ.vn", "bob@ví-dụ.vn"))
        run_once(scripts, make_config(smtp_overrides={"port": plain.port}))
        assert recipients(plain) == ["bob@xn--v-d-rma6749a.vn"], "an ASCII form needs no SMTPUTF8"
    [(status, error)] = query(
        db, "SELECT status, last_error FROM jobs WHERE email = 'người.nhận@ví-dụ.vn'"
    )
    assert status == "dead" and "does not offer SMTPUTF8" in error


def test_nul_cannot_even_be_stored(db):
    with pytest.raises(ValueError, match="NUL"):
        query(
            db,
            "INSERT INTO jobs (email, content_message) VALUES (%s, %s)",
            ("a@example.com", "nul\x00byte"),
        )
    with pytest.raises(psycopg2.DataError):  # the escape form is refused by PostgreSQL
        query(db, r"INSERT INTO jobs (email, content_message) VALUES ('a@example.com', E'\x00')")


def test_rows_written_straight_into_queue_are_refused_or_dropped_never_sent_twice(
    db, smtp, make_config, scripts
):
    config = make_config()
    query(
        db,
        "INSERT INTO jobs (email, content_message, run_at) VALUES "
        "('done@example.com', 'sent once', now()), "
        "('waiting@example.com', 'not due yet', now() + interval '1 hour')",
    )
    run_once(scripts, config)
    assert recipients(smtp) == ["done@example.com"]

    with pytest.raises(psycopg2.IntegrityError):  # a job that does not exist
        query(db, "INSERT INTO queue (job_id) VALUES (424242)")
    query(db, "INSERT INTO queue (job_id) SELECT job_id FROM jobs")  # a finished and a new job
    with pytest.raises(psycopg2.IntegrityError):  # the same job twice
        query(db, "INSERT INTO queue (job_id) SELECT job_id FROM jobs")

    result = scripts.run("consumer.py", "--config", config, "--drain")
    assert result.returncode == 0 and "dropped its queue row" in result.stderr
    assert recipients(smtp) == ["done@example.com"], "nothing sent for the hand-made rows"
    query(db, "UPDATE jobs SET run_at = now() WHERE email = 'waiting@example.com'")
    run_once(scripts, config)  # the producer queues it as usual
    assert recipients(smtp) == ["done@example.com", "waiting@example.com"]
    assert status_counts(db) == {"completed": 2}
