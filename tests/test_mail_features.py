"""The mail applications really send (issue 11), end to end through producer.py and
consumer.py, a real PostgreSQL and a real SMTP server: HTML, attachments, per-job
sender, Reply-To, Cc, Bcc, headers, priority, expiry, idempotency, intranet
domains, size limits and DKIM; every bad input dead with a reason, others sent."""

import email
import email.policy
import json

import dkim
import psycopg2
import pytest

from devservers import SmtpSink
from helpers import PASSWORD, copies, query, recipients, send_what_is_queued, status_counts
from test_message import BINARY, HTML, VIETNAMESE, dns_for, write_dkim_key

LOGO = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) + b"\r\n.\r\n"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n.\n\x00\x00\r\n.\r\n" + BINARY

# A job and its attachments in one statement (docs/writing-mails.md's example).
INSERT_WITH_FILES = """
WITH job AS (
  INSERT INTO jobs (email, subject, content_message, html_message, sender, reply_to,
                    cc, bcc, headers, priority)
  VALUES (%(email)s, %(subject)s, %(text)s, %(html)s, %(sender)s, %(reply_to)s,
          %(cc)s, %(bcc)s, %(headers)s, %(priority)s)
  RETURNING job_id
)
INSERT INTO attachments (job_id, filename, content_type, content, content_id)
SELECT job_id, f.filename, f.content_type, f.content, f.content_id
  FROM job, (VALUES (%(logo_name)s, 'image/png', %(logo)s::bytea, 'logo'),
                    (%(pdf_name)s, 'application/pdf', %(pdf)s::bytea, NULL))
       AS f(filename, content_type, content, content_id)
"""


def full_job(**changes):
    job = dict(
        email="khach.hang@example.com",
        subject="Hoá đơn #42 — cảm ơn quý khách",
        text=VIETNAMESE,
        html=HTML,
        sender="Cửa hàng Đồ Gỗ <shop@example.org>",
        reply_to='"Hỗ trợ, CSKH" <help@example.org>',
        cc=["Kế toán <ke.toan@example.com>", "boss@example.com"],
        bcc=["archive@example.com", "audit@example.net"],
        headers=json.dumps(
            {
                "List-Unsubscribe": "<https://example.org/u/42>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "X-Campaign": "tháng mười một",
            }
        ),
        priority=0,
        logo_name="logo.png",
        logo=psycopg2.Binary(LOGO),
        pdf_name="Hoá đơn tháng 11.pdf",
        pdf=psycopg2.Binary(PDF),
    )
    job.update(changes)
    return job


def parse(content):
    return email.message_from_bytes(content, policy=email.policy.default)


def parts_by_type(message):
    return {part.get_content_type(): part for part in message.walk()}


def test_every_column_and_attachment_arrives_as_the_job_holds(db, smtp, make_config, scripts):
    query(db, INSERT_WITH_FILES, full_job())
    send_what_is_queued(scripts, make_config())

    assert status_counts(db) == {"completed": 1}
    [(mail_from, rcpts, content, _)] = smtp.received
    assert mail_from == "shop@example.org"
    assert rcpts == [
        "khach.hang@example.com",
        "ke.toan@example.com",
        "boss@example.com",
        "archive@example.com",
        "audit@example.net",
    ]
    message = parse(content)
    assert str(message["From"]) == "Cửa hàng Đồ Gỗ <shop@example.org>"
    assert message["To"] == "khach.hang@example.com"
    assert [a.addr_spec for a in message["Cc"].addresses] == [
        "ke.toan@example.com",
        "boss@example.com",
    ]
    assert message["Cc"].addresses[0].display_name == "Kế toán"
    assert message["Reply-To"].addresses[0].display_name == "Hỗ trợ, CSKH"
    assert message["Reply-To"].addresses[0].addr_spec == "help@example.org"
    assert message["Subject"] == "Hoá đơn #42 — cảm ơn quý khách"
    assert message["List-Unsubscribe"] == "<https://example.org/u/42>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["X-Campaign"] == "tháng mười một"
    assert message["Bcc"] is None
    assert b"archive@" not in content and b"audit@" not in content, "Bcc only in the envelope"

    parts = parts_by_type(message)
    assert parts["text/plain"].get_content() == VIETNAMESE.replace("\n", "\r\n")
    assert parts["text/html"].get_content() == HTML
    logo, pdf = parts["image/png"], parts["application/pdf"]
    assert logo["Content-ID"] == "<logo>" and logo.get_content_disposition() == "inline"
    assert logo.get_payload(decode=True) == LOGO
    assert pdf.get_filename() == "Hoá đơn tháng 11.pdf"
    assert pdf.get_content_disposition() == "attachment"
    assert pdf.get_payload(decode=True) == PDF, "byte-exact: NULs and lone dots included"
    assert [p.get_content_type() for p in message.walk()] == [
        "multipart/mixed",
        "multipart/related",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "image/png",
        "application/pdf",
    ]


@pytest.mark.parametrize("pipelining", [True, False])
def test_html_only_job_arrives_with_the_visible_text_derived(
    pipelining, db, smtp, make_config, scripts
):
    smtp.pipelining = pipelining
    query(
        db, "INSERT INTO jobs (email, html_message) VALUES (%s, %s)", ("reader@example.com", HTML)
    )
    send_what_is_queued(scripts, make_config())
    [(_, _, content, _)] = smtp.received
    text, html = parse(content).iter_parts()
    assert text.get_content() == "Xin chào\r\n\r\nĐơn hàng #42 & quà tặng\r\n"
    assert html.get_content() == HTML


def test_job_and_attachments_inserted_from_python_in_one_transaction(
    postgres, database, smtp, make_config, scripts, db
):
    conn = psycopg2.connect(postgres.dsn(database))
    with conn:  # one transaction: the job and its files, or nothing
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO jobs (email, subject, content_message) "
                "VALUES (%s, %s, %s) RETURNING job_id",
                ("a@example.com", "Báo cáo", "Báo cáo đính kèm."),
            )
            job_id = cur.fetchone()[0]
            cur.executemany(
                "INSERT INTO attachments (job_id, filename, content_type, content) "
                "VALUES (%s, %s, %s, %s)",
                [
                    (job_id, "báo cáo.pdf", "application/pdf", psycopg2.Binary(PDF)),
                    (job_id, "dữ liệu.bin", "application/octet-stream", psycopg2.Binary(BINARY)),
                ],
            )
    with pytest.raises(psycopg2.errors.NotNullViolation):
        with conn:  # a file that fails takes its job with it
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO jobs (email, content_message) VALUES "
                    "('never@example.com', 'x') RETURNING job_id"
                )
                cur.execute(
                    "INSERT INTO attachments (job_id, filename, content) VALUES (%s, NULL, 'x')",
                    (cur.fetchone()[0],),
                )
    conn.close()
    send_what_is_queued(scripts, make_config())
    assert recipients(smtp) == ["a@example.com"]
    parts = list(parse(smtp.received[0][2]).iter_parts())
    assert [(p.get_filename(), p.get_payload(decode=True)) for p in parts[1:]] == [
        ("báo cáo.pdf", PDF),
        ("dữ liệu.bin", BINARY),
    ]


def test_three_identical_inserts_with_one_idempotency_key_send_one_mail(
    db, smtp, make_config, scripts
):
    insert = (
        "INSERT INTO jobs (email, content_message, idempotency_key) "
        "VALUES (%s, %s, %s) ON CONFLICT (idempotency_key) DO NOTHING RETURNING job_id"
    )
    inserted = [
        query(db, insert, ("once@example.com", "marker:order-42", "order-42/receipt"))
        for _ in range(3)
    ]
    assert [len(rows) for rows in inserted] == [1, 0, 0], "the retries insert nothing"
    query(
        db,
        "INSERT INTO jobs (email, content_message) VALUES "
        "('nokey1@example.com', 'marker:nokey-1'), ('nokey2@example.com', 'marker:nokey-2')",
    )
    send_what_is_queued(scripts, make_config())
    # a retry after the mail went out is just as harmless
    assert query(db, insert, ("once@example.com", "marker:order-42", "order-42/receipt")) == []
    send_what_is_queued(scripts, make_config())
    assert copies(smtp) == {"order-42": 1, "nokey-1": 1, "nokey-2": 1}


def test_larger_priority_goes_first_whatever_the_kind_of_mail(db, smtp, make_config, scripts):
    query(
        db,
        "INSERT INTO jobs (email, content_message, priority) "
        "SELECT 'low' || i || '@example.com', 'marker:low-' || i, 0 "
        "FROM generate_series(1, 5) i",
    )
    query(
        db, INSERT_WITH_FILES, full_job(email="urgent@example.com", priority=10, cc=None, bcc=None)
    )
    query(
        db,
        "INSERT INTO jobs (email, html_message, priority) "
        "VALUES ('second@example.com', '<p>marker:second</p>', 5)",
    )
    send_what_is_queued(scripts, make_config(), "--concurrency", "1", "--processes", "1")
    order = [rcpts[0] for _, rcpts, _, _ in smtp.received]
    assert order == ["urgent@example.com", "second@example.com"] + [
        "low%d@example.com" % i for i in range(1, 6)
    ]


def test_expired_job_with_attachments_is_dead_unsent_and_spends_no_attempt(
    db, smtp, make_config, scripts
):
    query(db, INSERT_WITH_FILES, full_job(email="late@example.com", cc=None, bcc=None))
    query(db, "UPDATE jobs SET expires_at = now() - interval '1 second'")
    query(
        db,
        "INSERT INTO jobs (email, content_message, expires_at) VALUES "
        "('in-time@example.com', 'marker:in-time', now() + interval '1 hour')",
    )
    send_what_is_queued(scripts, make_config())
    assert recipients(smtp) == ["in-time@example.com"]
    [(status, attempts, error)] = query(
        db, "SELECT status, attempts, last_error FROM jobs WHERE email = 'late@example.com'"
    )
    assert (status, attempts) == ("dead", 0) and "expired" in error


# ---------------------------------------------------------------------------
# Bad input: each its own test, dead with a reason, the good job beside it sent
# ---------------------------------------------------------------------------

BAD_JOBS = {
    "CR LF in sender": (dict(sender="shop@example.org\r\nBcc: injected@example.org"), "line break"),
    "control character in sender": (
        dict(sender="Shop\x1b[31m <shop@example.org>"),
        "control character",
    ),
    "LF in reply_to": (dict(reply_to="help@example.org\nBcc: injected@example.org"), "line break"),
    "CR LF in a cc element": (
        dict(cc=["ok@example.com", "c@example.com\r\nBcc: i@example.org"]),
        "cc[2]",
    ),
    "LF in a bcc element": (dict(bcc=["b@example.com\nTo: injected@example.org"]), "bcc[1]"),
    "CR LF in a header value": (
        dict(headers={"X-A": "1\r\nBcc: injected@example.org"}),
        "line break",
    ),
    "encoded word in a header value": (
        dict(headers={"X-A": "=?UTF-8?Q?=0A?=Bcc: injected@example.org"}),
        "encoded word",
    ),
    "encoded word in a display name": (
        dict(reply_to="=?utf-8?q?x=0ABcc=3A_i=40example.org?= <help@example.org>"),
        "encoded word",
    ),
    "parseaddr's misreading in cc": (
        dict(cc=["alice@example.org(<injected@example.org>"]),
        "not one address",
    ),
    "two addresses in sender": (
        dict(sender="a@example.org, injected@example.org"),
        "more than one address",
    ),
    "two addresses in reply_to": (
        dict(reply_to="a@example.org, injected@example.org"),
        "more than one address",
    ),
    "two addresses in one cc element": (
        dict(cc=["a@example.org, injected@example.org"]),
        "more than one address",
    ),
    "invalid address in bcc": (dict(bcc=["not-an-address"]), "not a valid address"),
    "65-octet local part": (dict(email="l" * 65 + "@example.com"), "at most 64"),
    "65-octet local part in cc": (dict(cc=["l" * 65 + "@example.com"]), "at most 64"),
    "address over 254 octets": (dict(bcc=["a@" + ".".join(["d" * 60] * 5) + ".com"]), "too long"),
    "header name with a space": (dict(headers={"X Campaign": "nov"}), "not a header name"),
    "header name with a colon": (
        dict(headers={"Bcc: injected@example.org\r\nX": "1"}),
        "not a header name",
    ),
    "Bcc header": (dict(headers={"Bcc": "injected@example.org"}), "written by the queue"),
    "to header in lower case": (
        dict(headers={"to": "injected@example.org"}),
        "written by the queue",
    ),
    "Content-Type header": (dict(headers={"Content-Type": "text/html"}), "written by the queue"),
    "DKIM-Signature header": (dict(headers={"DKIM-Signature": "v=1"}), "written by the queue"),
    "Received header": (dict(headers={"Received": "from x"}), "written by the queue"),
    "headers an array": (dict(headers=["X-A", "1"]), "JSON object of strings"),
    "headers a string": (dict(headers="X-A: 1"), "JSON object of strings"),
    "header value a number": (dict(headers={"X-A": 1}), "must be a string"),
    "header value an object": (dict(headers={"X-A": {"b": "c"}}), "must be a string"),
    "intranet recipient by default": (dict(email="user@corp.local"), "special-use"),
    "single-label recipient by default": (dict(email="root@intranet"), "period"),
}


def insert_job(db, email_address="bad@example.com", content="marker:bad", **columns):
    columns = dict(email=email_address, content_message=content, **columns)
    if "headers" in columns:
        columns["headers"] = json.dumps(columns["headers"])
    names = sorted(columns)
    [(job_id,)] = query(
        db,
        "INSERT INTO jobs (%s) VALUES (%s) RETURNING job_id"
        % (", ".join(names), ", ".join("%%(%s)s" % n for n in names)),
        columns,
    )
    return job_id


def assert_dead_and_good_sent(db, smtp, bad_id, reason):
    [(status, attempts, error)] = query(
        db, "SELECT status, attempts, last_error FROM jobs WHERE job_id = %s", (bad_id,)
    )
    assert (status, attempts) == ("dead", 0), (status, attempts, error)
    assert reason in error and "\n" not in error, error
    assert copies(smtp) == {"good": 1}, "the good job beside it is sent, once"
    for _, rcpts, content, _ in smtp.received:
        assert not any("injected" in r for r in rcpts)
        assert b"injected" not in content


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_bad_job_is_dead_with_a_reason_and_the_good_one_beside_it_is_sent(
    case, db, smtp, make_config, scripts
):
    columns, reason = BAD_JOBS[case]
    columns = dict(columns)
    bad_id = insert_job(db, columns.pop("email", "bad@example.com"), **columns)
    insert_job(db, "good@example.com", "marker:good")
    send_what_is_queued(scripts, make_config())
    assert_dead_and_good_sent(db, smtp, bad_id, reason)


@pytest.mark.parametrize(
    "filename, reason",
    [
        ("", "filename is empty"),
        ("   ", "filename is empty"),
        ("../../etc/passwd", "is a path"),
        ("C:\\Windows\\evil.exe", "is a path"),
        ("a.pdf\r\nContent-Type: text/html", "line break"),
    ],
)
def test_attachment_with_a_bad_filename_is_dead_and_others_are_sent(
    filename, reason, db, smtp, make_config, scripts
):
    bad_id = insert_job(db, html_message="<p>hi</p>")
    query(
        db,
        "INSERT INTO attachments (job_id, filename, content) VALUES (%s, %s, 'x')",
        (bad_id, filename),
    )
    good_id = insert_job(db, "good@example.com", "marker:good")
    query(
        db,
        "INSERT INTO attachments (job_id, filename, content) VALUES (%s, 'ok.txt', 'ok')",
        (good_id,),
    )
    send_what_is_queued(scripts, make_config())
    assert_dead_and_good_sent(db, smtp, bad_id, reason)


def test_message_over_the_servers_size_is_dead_before_anything_is_sent(db, make_config, scripts):
    mail_froms = []
    with SmtpSink(
        data_size_limit=50_000, mail_behaviour=lambda session: mail_froms.append(1)
    ) as small:
        bad_id = insert_job(db)
        query(
            db,
            "INSERT INTO attachments (job_id, filename, content) VALUES (%s, 'big.bin', %s)",
            (bad_id, psycopg2.Binary(b"\x00" * 60_000)),
        )
        insert_job(db, "good@example.com", "marker:good")
        send_what_is_queued(scripts, make_config(smtp_overrides={"port": small.port}))
        assert_dead_and_good_sent(db, small, bad_id, "more than the SMTP server's advertised SIZE")
    assert len(mail_froms) == 1, "no MAIL FROM for the mail that cannot fit"


def test_message_over_max_message_bytes_is_dead_before_anything_is_sent(
    db, smtp, make_config, scripts
):
    bad_id = insert_job(db)
    query(
        db,
        "INSERT INTO attachments (job_id, filename, content) VALUES (%s, 'big.bin', %s)",
        (bad_id, psycopg2.Binary(b"\x00" * 20_000)),
    )
    insert_job(db, "good@example.com", "marker:good")
    send_what_is_queued(scripts, make_config(smtp_overrides={"max_message_bytes": 10_000}))
    assert_dead_and_good_sent(db, smtp, bad_id, "more than smtp.max_message_bytes of 10000")


def test_intranet_addresses_are_sent_when_allow_local_domains_is_set(
    db, smtp, make_config, scripts
):
    insert_job(
        db,
        "root@intranet",
        "marker:intranet",
        sender="App <app@corp.local>",
        cc=["ops@mail.corp.local"],
        bcc=["audit@localhost"],
    )
    send_what_is_queued(
        scripts,
        make_config(
            smtp_overrides={"allow_local_domains": True, "sender": "Mail Queue <queue@corp.local>"}
        ),
    )
    [(mail_from, rcpts, content, _)] = smtp.received
    assert mail_from == "app@corp.local"
    assert rcpts == ["root@intranet", "ops@mail.corp.local", "audit@localhost"]
    assert parse(content)["To"] == "root@intranet"


# ---------------------------------------------------------------------------
# DKIM
# ---------------------------------------------------------------------------


def test_every_mail_is_dkim_signed_and_verifies_against_the_public_key(
    db, smtp, make_config, scripts, tmp_path
):
    query(db, INSERT_WITH_FILES, full_job())
    insert_job(db, "plain@example.com", VIETNAMESE)
    config = make_config(
        smtp_overrides={
            "dkim": {
                "domain": "example.org",
                "selector": "mq",
                "private_key_file": write_dkim_key(tmp_path),
            }
        }
    )
    send_what_is_queued(scripts, config)
    assert status_counts(db) == {"completed": 2}
    dns = dns_for("mq", "example.org")
    for _, _, content, _ in smtp.received:
        assert content.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
        assert dkim.verify(content, dnsfunc=dns)
        assert not dkim.verify(content.replace(b"example.com", b"example.net"), dnsfunc=dns)


@pytest.mark.parametrize("script", ["consumer.py", "producer.py"])
def test_a_missing_dkim_key_stops_the_scripts_with_one_line(script, make_config, scripts, tmp_path):
    config = make_config(
        smtp_overrides={
            "dkim": {
                "domain": "example.org",
                "selector": "mq",
                "private_key_file": str(tmp_path / "missing.pem"),
            }
        }
    )
    result = scripts.run(
        script, "--config", config, "--drain" if script == "consumer.py" else "--once"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "smtp.dkim.private_key_file" in line and "missing.pem" in line
    assert "cannot be read" in line


def test_an_unreadable_dkim_key_stops_the_consumer_with_one_line(make_config, scripts, tmp_path):
    key = tmp_path / "not-a-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    config = make_config(
        smtp_overrides={
            "dkim": {"domain": "example.org", "selector": "mq", "private_key_file": str(key)}
        }
    )
    result = scripts.run("consumer.py", "--config", config, "--drain")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not an unencrypted RSA private key in PEM" in result.stderr


# ---------------------------------------------------------------------------
# Roles
# ---------------------------------------------------------------------------


def test_the_application_role_inserts_jobs_with_files_and_the_worker_cannot_change_them(
    postgres,
    database,
    roles,
    smtp,
    make_config,
    scripts,
):
    app = psycopg2.connect(postgres.dsn(database), user=roles["mailqueue_app"], password=PASSWORD)
    app.autocommit = True
    query(app, INSERT_WITH_FILES, full_job(email="least@example.com"))
    retried = (
        "INSERT INTO jobs (email, content_message, idempotency_key) VALUES "
        "('key@example.com', 'marker:key', 'k-1') ON CONFLICT (idempotency_key) DO NOTHING"
    )
    query(app, retried)
    query(app, retried)
    for forbidden in (
        "SELECT content FROM attachments",
        "UPDATE attachments SET content = 'x'",
        "DELETE FROM attachments",
    ):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            query(app, forbidden)
    app.close()

    settings = dict(
        postgres.settings_for(database), user=roles["mailqueue_worker"], password=PASSWORD
    )
    send_what_is_queued(scripts, make_config(database=settings))
    by_rcpt = {rcpts[0]: content for _, rcpts, content, _ in smtp.received}
    assert sorted(by_rcpt) == ["key@example.com", "least@example.com"]
    pdf = parts_by_type(parse(by_rcpt["least@example.com"]))["application/pdf"]
    assert pdf.get_payload(decode=True) == PDF, "the worker reads the files"

    worker = psycopg2.connect(
        postgres.dsn(database), user=roles["mailqueue_worker"], password=PASSWORD
    )
    worker.autocommit = True
    # (subject, content_message and html_message it may write: the producer renders
    # stored templates into them, docs/templates.md)
    for forbidden in (
        "UPDATE jobs SET sender = 'evil@example.org'",
        "UPDATE jobs SET cc = '{evil@example.org}'",
        "UPDATE jobs SET bcc = '{evil@example.org}'",
        "UPDATE jobs SET reply_to = 'evil@example.org'",
        "UPDATE jobs SET headers = '{}'",
        "UPDATE attachments SET content = 'x'",
        "INSERT INTO attachments (job_id, filename, content) "
        "SELECT job_id, 'x', 'x' FROM jobs LIMIT 1",
        "DELETE FROM attachments",
    ):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            query(worker, forbidden)
    worker.close()
