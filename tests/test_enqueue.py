"""Mail in from Python (issue 21): mailqueue.enqueue and enqueue_many write jobs in
the application's own transaction, on psycopg2, psycopg 3 or SQLAlchemy; the
real producer and consumer then send them to a real SMTP server."""

import email
import email.policy
import json
import subprocess
import sys

import psycopg
import psycopg2
import pytest

import mailqueue
from helpers import PASSWORD, ROOT, copies, query, send_what_is_queued

LOGO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n.\r\n"
REPORT = b"%PDF-1.4\n\x00\x01\r\n.\r\n" + bytes(range(255, -1, -1)) * 40


@pytest.fixture(params=["psycopg2", "psycopg3"])
def app_conn(request, postgres, database):
    """The application's connection, in a transaction of its own (not autocommit)."""
    driver = psycopg2 if request.param == "psycopg2" else psycopg
    conn = driver.connect(postgres.dsn(database))
    yield conn
    conn.close()


def jobs(db):
    return query(db, "SELECT count(*) FROM jobs")[0][0]


def received(smtp):
    return [
        email.message_from_bytes(c, policy=email.policy.default) for _, _, c, _ in smtp.received
    ]


def test_a_rolled_back_mail_is_never_queued_and_a_committed_one_is_sent(
    app_conn, db, smtp, make_config, scripts
):
    config = make_config()
    mailqueue.enqueue(app_conn, "lan@example.com", subject="Hello", text="marker:rolled-back")
    app_conn.rollback()
    assert jobs(db) == 0

    job_id = mailqueue.enqueue(
        app_conn, "lan@example.com", subject="Xin chào", text="marker:committed"
    )
    assert isinstance(job_id, int)
    assert jobs(db) == 0, "not visible before the application commits"
    app_conn.commit()
    assert query(db, "SELECT email, subject, status FROM jobs WHERE job_id = %s", (job_id,)) == [
        ("lan@example.com", "Xin chào", "available")
    ]
    send_what_is_queued(scripts, config)
    assert copies(smtp) == {"committed": 1}
    [mail] = received(smtp)
    assert mail["Subject"] == "Xin chào" and mail["To"] == "lan@example.com"


def test_an_idempotency_key_queues_the_mail_once(app_conn, db):
    first = mailqueue.enqueue(app_conn, "lan@example.com", text="x", idempotency_key="order-42")
    app_conn.commit()
    again = mailqueue.enqueue(app_conn, "lan@example.com", text="x", idempotency_key="order-42")
    app_conn.commit()
    assert isinstance(first, int) and again is None
    assert jobs(db) == 1


BAD_FIELDS = [
    (dict(to="not an address"), "to 'not an address' is not a valid address"),
    (dict(to="a@example.com\r\nBcc: x@example.com"), "line break"),
    (dict(to=["a@example.com", "b@example.com"]), "to must be one address"),
    (dict(subject="Hi\nBcc: x@example.com"), "subject contains a line break"),
    (dict(subject="=?utf-8?q?=0ABcc:_x@example.com?="), "subject contains an RFC 2047"),
    (dict(subject="x" * 501), "subject is 501 characters long"),
    (dict(text=None), "text and html are both empty"),
    (dict(text="a\x00b"), "text contains a NUL"),
    (dict(html="<p>\x00</p>"), "html contains a NUL"),
    (dict(sender="a@example.com, b@example.com"), "sender 'a@example.com, b@example.com' holds"),
    (dict(reply_to="nobody"), "reply_to 'nobody' is not"),
    (dict(cc=["ok@example.com", "bad@"]), "cc[2] 'bad@' is not a valid address"),
    (dict(bcc=["x@example..com"]), "bcc[1]"),
    (dict(headers={"Bcc": "x@example.com"}), "headers: Bcc is written by the queue"),
    (dict(headers={"X-Tag": "a\r\nb"}), "headers: X-Tag contains a line break"),
    (dict(headers={"X Tag": "a"}), "headers: 'X Tag' is not a header name"),
    (dict(attachments=[("../etc/passwd", b"x", "text/plain")]), "attachment 1: filename"),
    (dict(attachments=[("a.txt", "text, not bytes", "text/plain")]), "must be bytes"),
    (dict(attachments=[("a.eml", b"x", "message/rfc822")]), "attachment 1: content_type"),
    (dict(attachments=[("a.png", b"x", "image/png", "bad id")]), "content_id 'bad id'"),
    (
        dict(attachments=[("a.png", b"x", "image/png", "i"), ("b.png", b"y", "image/png", "i")]),
        "attachment 2: content_id 'i' is given twice",
    ),
    (dict(priority="high"), "priority must be an int"),
    (dict(priority=2**31), "priority 2147483648 is out of range"),
    (dict(run_at="tomorrow"), "run_at must be a datetime"),
    (dict(idempotency_key=""), "idempotency_key is empty"),
    (dict(context={"a": 1}), "context is given without a template"),
    (dict(template="welcome", context={"a": float("nan")}), "context cannot be stored as JSON"),
    (dict(template="welcome", context={"a": object()}), "context cannot be stored as JSON"),
    (dict(content_message="x"), "content_message: give it as text="),
    (dict(status="completed"), "status is kept by the queue itself"),
    (dict(no_such_column=1), "no_such_column: jobs has no such column"),
]


@pytest.mark.parametrize("fields, error", BAD_FIELDS, ids=[e for _, e in BAD_FIELDS])
def test_every_bad_field_raises_before_anything_is_written(app_conn, db, fields, error):
    mail = dict(to="lan@example.com", text="hello")
    mail.update(fields)
    with pytest.raises(ValueError) as raised:
        mailqueue.enqueue(app_conn, mail.pop("to"), **mail)
    assert error in str(raised.value)
    # The application's transaction is still usable: nothing failed inside it.
    assert mailqueue.enqueue(app_conn, "after@example.com", text="fine") is not None
    app_conn.commit()
    assert query(db, "SELECT email FROM jobs") == [("after@example.com",)]


def test_attachments_from_bytes_and_a_path_arrive_byte_exact_with_an_inline_image(
    app_conn, db, smtp, make_config, scripts, tmp_path
):
    path = tmp_path / "báo cáo.pdf"
    path.write_bytes(REPORT)
    mailqueue.enqueue(
        app_conn,
        "lan@example.com",
        subject="Your report",
        text="marker:files",
        html='<p>Hello <img src="cid:logo@example.org"></p>',
        attachments=[
            ("logo.png", LOGO, "image/png", "logo@example.org"),
            ("notes.bin", bytes(range(256)), "application/octet-stream"),
            path,
        ],
    )
    app_conn.commit()
    send_what_is_queued(scripts, make_config())
    [mail] = received(smtp)
    parts = {part.get_filename(): part for part in mail.walk() if part.get_filename()}
    assert parts["logo.png"].get_content() == LOGO
    assert parts["logo.png"]["Content-ID"] == "<logo@example.org>"
    assert parts["logo.png"].get_content_disposition() == "inline"
    assert parts["notes.bin"].get_content() == bytes(range(256))
    assert parts["báo cáo.pdf"].get_content() == REPORT
    assert parts["báo cáo.pdf"].get_content_type() == "application/pdf"  # guessed from the name
    assert parts["báo cáo.pdf"].get_content_disposition() == "attachment"


def test_enqueue_many_returns_each_job_id_in_order_and_gives_each_mail_its_own_files(
    app_conn, db, smtp, make_config, scripts
):
    mailqueue.enqueue(app_conn, "old@example.com", text="x", idempotency_key="seen")
    app_conn.commit()
    ids = mailqueue.enqueue_many(
        app_conn,
        [
            dict(
                to="m0@example.com",
                text="marker:m0",
                attachments=[("zero.txt", b"0", "text/plain")],
            ),
            dict(to="m1@example.com", text="marker:m1", idempotency_key="seen"),
            dict(to="m2@example.com", text="marker:m2", cc=["c2@example.com"], priority=5),
            dict(
                to="m3@example.com",
                text="marker:m3",
                attachments=[("three.txt", b"3", "text/plain")],
            ),
            dict(to="m4@example.com", text="marker:m4", idempotency_key="new"),
            dict(to="m5@example.com", text="marker:m5", idempotency_key="new"),
        ],
    )
    app_conn.commit()
    assert ids[1] is None and ids[5] is None, "already queued, or earlier in the same call"
    assert all(isinstance(i, int) for i in (ids[0], ids[2], ids[3], ids[4]))
    rows = dict(query(db, "SELECT job_id, email FROM jobs"))
    assert [rows[i] for i in (ids[0], ids[2], ids[3], ids[4])] == [
        "m0@example.com",
        "m2@example.com",
        "m3@example.com",
        "m4@example.com",
    ]
    assert query(db, "SELECT cc, priority FROM jobs WHERE job_id = %s", (ids[2],)) == [
        (["c2@example.com"], 5)
    ]
    assert sorted(query(db, "SELECT job_id, filename FROM attachments")) == sorted(
        [(ids[0], "zero.txt"), (ids[3], "three.txt")]
    )
    send_what_is_queued(scripts, make_config())
    assert copies(smtp) == {"m0": 1, "m2": 1, "m3": 1, "m4": 1, None: 1}
    assert sorted(r for _, rcpts, _, _ in smtp.received for r in rcpts if "2@" in r) == [
        "c2@example.com",
        "m2@example.com",
    ]


def test_a_bad_mail_in_enqueue_many_is_named_and_nothing_is_written(app_conn, db):
    with pytest.raises(ValueError, match=r"^mail 1: to 'nobody' is not"):
        mailqueue.enqueue_many(
            app_conn, [dict(to="a@example.com", text="x"), dict(to="nobody", text="x")]
        )
    with pytest.raises(ValueError, match=r"^mail 1: txt: jobs has no such column"):
        mailqueue.enqueue_many(
            app_conn,
            [dict(to="a@example.com", text="x"), dict(to="b@example.com", text="x", txt="x")],
        )
    with pytest.raises(
        ValueError, match=r"^mail 0: .*missing 1 required positional argument: 'to'"
    ):
        mailqueue.enqueue_many(app_conn, [dict(text="x")])
    app_conn.commit()
    assert jobs(db) == 0


def test_the_applications_own_columns_are_written_and_typed(app_conn, db):
    query(
        db,
        "ALTER TABLE jobs ADD COLUMN tenant INTEGER, ADD COLUMN tags TEXT[], ADD COLUMN meta JSONB",
    )
    ids = mailqueue.enqueue_many(
        app_conn,
        [
            dict(to="a@example.com", text="x", tenant=7, tags=["vip", "vi"], meta={"k": [1]}),
            dict(to="b@example.com", text="y"),
            dict(to="c@example.com", text="z", tenant=8),
        ],
    )
    app_conn.commit()
    assert query(db, "SELECT job_id, tenant, tags, meta FROM jobs ORDER BY job_id") == [
        (ids[0], 7, ["vip", "vi"], {"k": [1]}),
        (ids[1], None, None, None),
        (ids[2], 8, None, None),
    ]


def test_enqueue_runs_in_a_sqlalchemy_transaction(postgres, database, db):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg2://", creator=lambda: psycopg2.connect(postgres.dsn(database))
    )
    try:
        with engine.connect() as conn:
            mailqueue.enqueue(conn, "rolled@example.com", text="x")
            conn.rollback()
            job_id = mailqueue.enqueue(conn, "kept@example.com", text="x", cc=["c@example.com"])
            conn.commit()
        with engine.begin() as conn:
            mailqueue.enqueue(conn, "begun@example.com", text="x")
    finally:
        engine.dispose()
    assert query(db, "SELECT job_id, email FROM jobs ORDER BY job_id")[:1] == [
        (job_id, "kept@example.com")
    ]
    assert [e for _, e in query(db, "SELECT job_id, email FROM jobs ORDER BY job_id")] == [
        "kept@example.com",
        "begun@example.com",
    ]


def test_mailqueue_imports_without_pgnotify_jinja2_or_django():
    code = (
        "import sys\n"
        "sys.modules['pgnotify'] = None  # any import of it fails\n"
        "import mailqueue\n"
        "assert callable(mailqueue.enqueue) and callable(mailqueue.enqueue_many)\n"
        "names = ('jinja2', 'django', 'psycopg2', 'pgnotify')\n"
        "print(sorted(m for m in names if sys.modules.get(m)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_context_and_headers_are_stored_as_json_objects(app_conn, db):
    mailqueue.enqueue(
        app_conn,
        "lan@example.com",
        template="welcome",
        context={"name": "Lan", "items": [{"sku": "A1", "qty": 2}], "note": "ký tự"},
        locale="vi-VN",
        headers={"X-Campaign": "tháng 11"},
    )
    app_conn.commit()
    [(context, headers, locale, text)] = query(
        db, "SELECT context, headers, locale, content_message FROM jobs"
    )
    assert context == {"name": "Lan", "items": [{"sku": "A1", "qty": 2}], "note": "ký tự"}
    assert headers == {"X-Campaign": "tháng 11"} and locale == "vi-VN" and text is None
    assert json.loads(json.dumps(context)) == context


def test_any_text_survives_the_trip_byte_for_byte(app_conn, db):
    tricky = 'NULL "quoted" back\\slash {braces, commas} \' é 😀\ttab\nnew line'
    ids = mailqueue.enqueue_many(
        app_conn,
        [
            dict(to="a@example.com", subject="NULL", text=tricky, html=tricky),
            dict(to="b@example.com", subject='"{x}"', text="\\", cc=['"A, B" <ab@example.com>']),
        ],
    )
    app_conn.commit()
    rows = query(db, "SELECT job_id, subject, content_message, html_message, cc FROM jobs")
    assert sorted(rows) == [
        (ids[0], "NULL", tricky, tricky, None),
        (ids[1], '"{x}"', "\\", None, ['"A, B" <ab@example.com>']),
    ]


def test_enqueue_and_rendering_work_under_the_least_privilege_roles(
    postgres, database, db, roles, smtp, make_config, scripts
):
    query(db, "INSERT INTO templates (name, subject, text) VALUES ('t', 'S {{ n }}', 'marker:r')")
    app = psycopg2.connect(postgres.dsn(database), user=roles["mailqueue_app"], password=PASSWORD)
    ids = mailqueue.enqueue_many(
        app,
        [
            dict(to="a@example.com", text="marker:a", attachments=[("a.txt", b"a", "text/plain")]),
            dict(to="b@example.com", template="t", context={"n": 1}, idempotency_key="k"),
            dict(to="b@example.com", template="t", context={"n": 1}, idempotency_key="k"),
        ],
    )
    app.commit()
    app.close()
    assert ids[0] and ids[1] and ids[2] is None
    worker = dict(
        postgres.settings_for(database), user=roles["mailqueue_worker"], password=PASSWORD
    )
    # The producer renders and queues under the worker's role (the consumer's own
    # rights are tests/test_security.py's).
    done = scripts.run("producer.py", "--config", make_config(database=worker), "--once")
    assert done.returncode == 0, done.stderr
    assert query(db, "SELECT job_id, status, subject FROM jobs ORDER BY job_id") == [
        (ids[0], "queued", None),
        (ids[1], "queued", "S 1"),
    ]
    assert query(db, "SELECT job_id, filename FROM attachments") == [(ids[0], "a.txt")]
