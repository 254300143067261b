"""python -m mailqueue bounces: DSNs and complaints read back from a Maildir and
from Dovecot over IMAPS, found by their VERP return path (or Message-ID),
recorded once however often the mailbox is read."""

import email
import mailbox
import os

import pytest
import trustme

from dovecot import Dovecot, require_dovecot
from helpers import PASSWORD, query
from mail_samples import auto_reply, exim_dsn, gmail_dsn, postfix_dsn, ses_complaint
from mailqueue import bounces, tokens
from ops_helpers import mailqueue

SECRET = "a-test-secret-of-the-bounce-mailbox-0123456789"
RETURN_PATH = "bounces@example.org"


def sent_job(db, email_address, cc=None):
    """A job the relay accepted (completed): its id and its Message-ID."""
    [(job_id, created_at)] = query(
        db,
        "INSERT INTO jobs (email, cc, content_message, status, attempts, start_time, end_time) "
        "VALUES (%s, %s, 'sent', 'completed', 1, LOCALTIMESTAMP - interval '2 minutes', "
        "        LOCALTIMESTAMP - interval '1 minute') RETURNING job_id, created_at",
        (email_address, cc),
    )
    return job_id, "<%d.%d@example.com>" % (job_id, int(created_at.timestamp() * 1e6))


def verp(job_id):
    return tokens.verp_address(SECRET.encode(), RETURN_PATH, job_id)


def env():
    return dict(os.environ, MAILQUEUE_SECRET=SECRET, MAILQUEUE_IMAP_PASSWORD=PASSWORD)


def state(db):
    """Everything the command may change."""
    return (
        query(db, "SELECT job_id, status, last_error FROM jobs ORDER BY job_id"),
        query(db, "SELECT email, reason, source, job_id FROM suppressions ORDER BY email"),
        query(
            db,
            "SELECT recipient, kind, status, source, job_id FROM mail_events ORDER BY event_id",
        ),
    )


@pytest.fixture
def mailbag(db):
    """Seven sent jobs and a message about each, as their senders write them,
    plus three that must be left alone: a forged tag, no job, not a report."""
    jobs = {}
    for name in ("postfix", "exim", "exim_delayed", "gmail", "ses", "policy", "cc"):
        jobs[name] = sent_job(
            db,
            "%s@example.com" % name.replace("_", "."),
            ["Kế toán <ke.toan@example.net>"] if name == "cc" else None,
        )
    j = {name: job_id for name, (job_id, _) in jobs.items()}
    mid = {name: message_id for name, (_, message_id) in jobs.items()}
    forged = verp(j["postfix"]).replace("-", "-0", 1)[:-1] if False else None
    forged = "bounces+%d-%s@example.org" % (j["ses"], "0" * 16)
    messages = {
        # headers only returned; VERP in To and Delivered-To
        "postfix": postfix_dsn(verp(j["postfix"]), "Postfix@Example.com", mid["postfix"]),
        # the whole message returned, its body 8-bit
        "exim": exim_dsn(verp(j["exim"]), "exim@example.com", mid["exim"]),
        "exim_delayed": exim_dsn(
            verp(j["exim_delayed"]), "exim.delayed@example.com", mid["exim_delayed"], True
        ),
        # sent to the plain sender (no VERP): found by the returned Message-ID
        "gmail": gmail_dsn("shop@example.org", "gmail@example.com", mid["gmail"]),
        "ses": ses_complaint(verp(j["ses"]), "ses@example.com", mid["ses"]),
        # a 5.7.1 (spam, policy): the job bounced, the recipient not suppressed
        "policy": postfix_dsn(verp(j["policy"]), "policy@example.com", mid["policy"], "5.7.1"),
        # a bounce of the Cc: that address suppressed, the job still completed
        "cc": postfix_dsn(verp(j["cc"]), "ke.toan@example.net", mid["cc"]),
        "forged": postfix_dsn(forged, "ses@example.com", mid["ses"]),
        "no_job": postfix_dsn("shop@example.org", "who@example.com", "<999999.1@example.com>"),
        "auto_reply": auto_reply(verp(j["postfix"])),
    }
    return j, messages


def check_recorded(db, j):
    statuses = dict(query(db, "SELECT job_id, status FROM jobs"))
    assert statuses == {
        j["postfix"]: "bounced",
        j["exim"]: "bounced",
        j["exim_delayed"]: "completed",
        j["gmail"]: "bounced",
        j["ses"]: "completed",
        j["policy"]: "bounced",
        j["cc"]: "completed",
    }
    assert query(db, "SELECT email, reason, source, job_id FROM suppressions ORDER BY email") == [
        ("exim@example.com", "hard_bounce", "dsn", j["exim"]),
        ("gmail@example.com", "hard_bounce", "dsn", j["gmail"]),
        ("ke.toan@example.net", "hard_bounce", "dsn", j["cc"]),
        ("postfix@example.com", "hard_bounce", "dsn", j["postfix"]),
        ("ses@example.com", "complaint", "arf", j["ses"]),
    ]
    [(error,)] = query(db, "SELECT last_error FROM jobs WHERE job_id = %s", (j["postfix"],))
    assert error.startswith("bounced after it was sent: 5.1.1 smtp; 550 5.1.1")
    kinds = query(db, "SELECT job_id, kind, status FROM mail_events ORDER BY job_id")
    assert (j["exim_delayed"], "delayed", "4.0.0") in kinds
    assert (j["ses"], "complaint", None) in kinds
    assert len(kinds) == 7


def run_bounces(config, *args):
    result = mailqueue("bounces", "--config", config, "--once", *args, env=env())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout.splitlines()


def test_a_maildir_of_bounces_and_complaints_is_recorded_once(db, make_config, mailbag, tmp_path):
    j, messages = mailbag
    box = mailbox.Maildir(str(tmp_path / "Maildir"), create=True)
    for raw in messages.values():
        box.add(raw)
    config = make_config({"return_path": RETURN_PATH})

    lines = run_bounces(config, "--maildir", str(tmp_path / "Maildir"))
    check_recorded(db, j)
    assert len(lines) == len(messages) + 1, lines  # one line each, and the summary
    assert lines[-1].startswith("10 message(s): 7 report(s) recorded")
    assert "5 address(es) suppressed, 4 job(s) bounced" in lines[-1]
    assert "1 matching no job, 1 with a forged tag, 1 not a bounce" in lines[-1]
    assert not any("@" in line for line in lines), "no address is printed"

    before = state(db)
    lines = run_bounces(config, "--maildir", str(tmp_path / "Maildir"), "--move-to", "Done")
    assert state(db) == before, "a second read changes nothing"
    assert "7 already read" in lines[-1]
    # what was recorded is moved; what was left alone stays
    assert len(box) == 3
    assert len(box.get_folder("Done")) == 7


def test_dovecot_over_imaps_with_a_verified_certificate(db, make_config, mailbag):
    require_dovecot()
    j, messages = mailbag
    dovecot = Dovecot(trustme.CA(), PASSWORD).start()
    try:
        for raw in messages.values():
            dovecot.append(raw)
        config = make_config({"return_path": RETURN_PATH})

        # a certificate nobody vouched for: one line, nothing read
        result = mailqueue(
            "bounces", "--config", config, "--once", "--imap", dovecot.url(), env=env()
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr and result.stderr.count("\n") == 1
        assert query(db, "SELECT count(*) FROM mail_events") == [(0,)]

        imap = ("--imap", dovecot.url(), "--ca-file", dovecot.ca_file)
        lines = run_bounces(config, *imap)
        check_recorded(db, j)
        assert "7 report(s) recorded" in lines[-1]
        before = state(db)
        lines = run_bounces(config, *imap, "--delete")
        assert state(db) == before and "7 already read" in lines[-1]
        left = dovecot.messages()
        assert sorted(email.message_from_bytes(m)["Subject"] for m in left) == [
            "Out of office",
            "Undelivered Mail Returned to Sender",
            "Undelivered Mail Returned to Sender",
        ]
        assert PASSWORD not in "".join(lines)
    finally:
        dovecot.stop()


def test_a_wrong_password_is_one_line(make_config):
    require_dovecot()
    dovecot = Dovecot(trustme.CA(), PASSWORD).start()
    try:
        result = mailqueue(
            "bounces",
            "--config",
            make_config(),
            "--once",
            "--imap",
            dovecot.url(),
            "--ca-file",
            dovecot.ca_file,
            env=dict(os.environ, MAILQUEUE_IMAP_PASSWORD="wrong"),
        )
        assert result.returncode == 1
        assert result.stderr.strip().endswith("refused the login")
    finally:
        dovecot.stop()


def test_verp_the_sent_mail_carries_the_tag_and_its_bounce_finds_the_job(
    db, make_config, smtp, scripts, tmp_path
):
    [(job_id,)] = query(
        db,
        "INSERT INTO jobs (email, content_message) VALUES ('gone@example.com', 'marker:v1') "
        "RETURNING job_id",
    )
    config = make_config({"return_path": RETURN_PATH})
    assert scripts.run("producer.py", "--config", config, "--once", env=env()).returncode == 0
    result = scripts.run("consumer.py", "--config", config, "--drain", env=env())
    assert result.returncode == 0, result.stderr
    [(mail_from, rcpts, content, _)] = smtp.received
    assert mail_from == verp(job_id)
    local, _, domain = mail_from.partition("@")
    assert domain == "example.org" and local.startswith("bounces+%d-" % job_id)
    message_id = email.message_from_bytes(content)["Message-ID"]

    box = mailbox.Maildir(str(tmp_path / "Maildir"), create=True)
    box.add(postfix_dsn(mail_from, "gone@example.com", message_id))
    lines = run_bounces(config, "--maildir", str(tmp_path / "Maildir"))
    assert "by verp" in lines[0]
    assert query(db, "SELECT status FROM jobs") == [("bounced",)]
    assert query(db, "SELECT email, reason FROM suppressions") == [
        ("gone@example.com", "hard_bounce")
    ]


def test_return_path_without_the_secret_is_refused_at_start(make_config):
    environ = dict(os.environ)
    environ.pop("MAILQUEUE_SECRET", None)
    result = mailqueue(
        "bounces",
        "--config",
        make_config({"return_path": RETURN_PATH}),
        "--once",
        "--maildir",
        "/nonexistent",
        env=environ,
    )
    assert result.returncode == 1 and "MAILQUEUE_SECRET" in result.stderr


# ---------------------------------------------------------------- parsing alone


def test_each_sample_reads_as_its_sender_meant():
    to = "bounces@example.org"
    dsn = bounces.parse(postfix_dsn(to, "A@Example.com", "<1.2@example.com>"))
    assert dsn.kind == "dsn" and dsn.reporter == "dns; mx.example.com"
    [r] = dsn.recipients
    assert (r.address, r.action, r.status) == ("a@example.com", "failed", "5.1.1")
    assert dsn.returned["Message-ID"] == "<1.2@example.com>"

    exim = bounces.parse(exim_dsn(to, "b@example.com", "<3.4@example.com>"))
    [r] = exim.recipients
    assert (r.action, r.status) == ("failed", "5.0.0")
    assert "Nguyễn".encode() in exim.returned.as_bytes()

    delayed = bounces.parse(exim_dsn(to, "b@example.com", "<3.4@example.com>", delayed=True))
    assert delayed.recipients[0].action == "delayed"

    gmail = bounces.parse(gmail_dsn(to, "c@example.com", "<5.6@example.com>"))
    assert gmail.recipients[0].status == "5.1.1"
    assert "does not exist" in gmail.recipients[0].detail

    arf = bounces.parse(ses_complaint(to, "d@example.com", "<7.8@example.com>"))
    assert arf.kind == "arf"
    assert arf.recipients[0].address == "d@example.com"
    assert arf.recipients[0].detail == "feedback-type: abuse"

    assert bounces.parse(auto_reply(to)) is None


def test_a_tag_made_with_another_secret_is_forged():
    other = tokens.verp_address(b"another-secret-entirely-000000", RETURN_PATH, 42)
    raw = postfix_dsn(other, "x@example.com", "<42.1@example.com>")
    found = bounces.reference(raw, bounces.parse(raw), RETURN_PATH, SECRET.encode())
    assert (found.job_id, found.how) == (42, "forged")
    genuine = postfix_dsn(verp(42), "x@example.com", "<42.1@example.com>")
    found = bounces.reference(genuine, bounces.parse(genuine), RETURN_PATH, SECRET.encode())
    assert (found.job_id, found.how) == (42, "verp")


def test_watching_as_the_worker_role_records_what_arrives_and_stops_on_sigterm(
    db, postgres, database, roles, make_config, mailbag, tmp_path
):
    import subprocess
    import sys

    from helpers import ROOT, wait_until

    j, messages = mailbag
    settings = dict(
        postgres.settings_for(database), user=roles["mailqueue_worker"], password=PASSWORD
    )
    config = make_config({"return_path": RETURN_PATH}, database=settings)
    box = mailbox.Maildir(str(tmp_path / "Maildir"), create=True)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "mailqueue", "bounces", "--config", config]
        + ["--maildir", str(tmp_path / "Maildir"), "--interval", "0.2", "--delete"],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for raw in messages.values():
            box.add(raw)
        wait_until(
            lambda: query(db, "SELECT count(*) FROM mail_events") == [(7,)],
            timeout=30,
            what="the watcher to record the seven reports",
        )
        wait_until(lambda: len(box) == 3, timeout=30, what="the recorded messages deleted")
    finally:
        watcher.terminate()
        out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert "Traceback" not in err
    check_recorded(db, j)


def test_whom_a_report_suppresses():
    one = dict(email="an@example.com", cc=None, bcc=None)
    several = dict(email="an@example.com", cc=["Bo <bo@example.org>"], bcc=["cy@example.org"])
    failed = bounces.Recipient("an@example.com", "failed", "5.1.1", None)
    # the job's own address: suppressed, and the job bounced
    assert bounces._effects(failed, "dsn", one) == ("hard_bounce", True, "an@example.com")
    # an address the mail was forwarded to: the job's own, when it has only one
    alias = bounces.Recipient("an.old@example.net", "failed", "5.1.1", None)
    assert bounces._effects(alias, "dsn", one) == ("hard_bounce", True, "an@example.com")
    # ... but with several recipients nobody can tell which: no one suppressed
    assert bounces._effects(alias, "dsn", several) == (None, False, "")
    # a Bcc bounced: that address suppressed, the job not bounced
    bcc = bounces.Recipient("cy@example.org", "failed", "5.2.2", None)
    assert bounces._effects(bcc, "dsn", several) == ("hard_bounce", False, "cy@example.org")
    # temporary failures and delays: nothing
    for r in (
        bounces.Recipient("an@example.com", "failed", "4.2.2", None),
        bounces.Recipient("an@example.com", "delayed", "4.0.0", None),
        bounces.Recipient("an@example.com", "delivered", "2.0.0", None),
    ):
        assert bounces._effects(r, "dsn", one)[:2] == (None, False)
    complaint = bounces.Recipient("", "complaint", None, "feedback-type: abuse")
    assert bounces._effects(complaint, "arf", one) == ("complaint", False, "an@example.com")
