"""Stored templates (issue 21): the producer renders a job's template into its own
columns before queueing it (Jinja2's sandbox, strict variables, HTML escaped in the
HTML part only, locale fallback), once; a render error makes the job dead with a
reason naming the template, spending no attempt. Real PostgreSQL, producer.py,
consumer.py and SMTP server."""

import datetime
import email
import email.policy
import json
import logging

import psycopg2
import pytest

import mailqueue
import ops_helpers
import producer
from helpers import query, send_what_is_queued
from mailqueue import templates
from mailqueue.sqlfile import QUERIES


def add_template(db, name, locale="", subject=None, text=None, html=None):
    query(
        db,
        "INSERT INTO templates (name, locale, subject, text, html) VALUES (%s, %s, %s, %s, %s)",
        (name, locale, subject, text, html),
    )


def templated_job(db, name, context, locale=None, email="lan@example.com"):
    """enqueue on an autocommit connection: committed at once."""
    return mailqueue.enqueue(db, email, template=name, context=context, locale=locale)


def received(smtp):
    return [
        email.message_from_bytes(c, policy=email.policy.default) for _, _, c, _ in smtp.received
    ]


def parts(mail):
    return {p.get_content_type(): p.get_content() for p in mail.walk() if not p.is_multipart()}


def job_row(db, job_id):
    [row] = query(
        db,
        "SELECT status, attempts, last_error, subject, content_message, html_message, "
        "rendered_at IS NOT NULL FROM jobs WHERE job_id = %s",
        (job_id,),
    )
    return row


def test_a_template_is_rendered_with_its_context_and_html_is_escaped_in_the_html_part_only(
    db, smtp, make_config, scripts
):
    add_template(
        db,
        "order",
        subject="Đơn hàng #{{ order.id }} cho {{ name }}",
        text="marker:{{ marker }}\nXin chào {{ name }}, {{ order.lines | length }} món.\n",
        html="<p>Xin chào <b>{{ name }}</b></p>"
        "{% for i in order.lines %}<li>{{ i }}</li>{% endfor %}",
    )
    name = "Lan <script>alert(1)</script> & co"
    context = {"marker": "tpl", "name": name, "order": {"id": 42, "lines": ["Bàn", "Ghế"]}}
    job_id = templated_job(db, "order", context)
    send_what_is_queued(scripts, make_config())
    [mail] = received(smtp)
    assert mail["Subject"] == "Đơn hàng #42 cho " + name
    body = parts(mail)
    assert body["text/plain"].replace("\r\n", "\n") == "marker:tpl\nXin chào %s, 2 món.\n" % name
    assert body["text/html"].rstrip() == (
        "<p>Xin chào <b>Lan &lt;script&gt;alert(1)&lt;/script&gt; &amp; co</b></p>"
        "<li>Bàn</li><li>Ghế</li>"
    )
    status, attempts, error, subject, _, _, rendered = job_row(db, job_id)
    assert (status, attempts, error, rendered) == ("completed", 1, None, True)
    assert subject == "Đơn hàng #42 cho " + name, "report and dashboard show the real content"


@pytest.mark.parametrize(
    "template, context, error",
    [
        (
            dict(subject="Hi {{ name }}", text="{{ greeting }}, {{ name }}"),
            {"name": "Lan"},
            "template 'welcome' (locale ''): text: 'greeting' is undefined",
        ),
        (
            dict(text="{{ user.city }}"),
            {"user": {"name": "Lan"}},
            "template 'welcome' (locale ''): text: 'dict object' has no attribute 'city'",
        ),
        (
            dict(text="{{ ''.__class__.__mro__[1].__subclasses__() }}"),
            {},
            "template 'welcome' (locale ''): text: refused by the sandbox: "
            "access to attribute '__class__' of 'str' object is unsafe",
        ),
        (
            dict(text="{{ items.append(1) }}{{ items }}"),
            {"items": []},
            "template 'welcome' (locale ''): text: refused by the sandbox: "
            "access to attribute 'append' of 'list' object is unsafe",
        ),
        (
            dict(subject="Hi {{ name }}", text="x"),
            {"name": "Lan\r\nBcc: spy@example.com"},
            "template 'welcome' (locale ''): the subject rendered contains a line break",
        ),
        (
            dict(text="{% for x in %}"),
            {},
            "template 'welcome' (locale ''): text line 1: ",
        ),
    ],
    ids=["missing variable", "missing key", "sandbox", "immutable", "subject CRLF", "syntax"],
)
def test_a_template_that_cannot_render_makes_the_job_dead_naming_why(
    db, smtp, make_config, scripts, template, context, error
):
    add_template(db, "welcome", **template)
    job_id = templated_job(db, "welcome", context)
    send_what_is_queued(scripts, make_config())
    status, attempts, last_error, subject, text, html, rendered = job_row(db, job_id)
    assert (status, attempts, rendered) == ("dead", 0, False), last_error
    assert last_error.startswith(error), last_error
    assert subject is None and text is None and html is None, "nothing rendered, nothing kept"
    assert not smtp.received
    [(outcome, detail)] = query(db, "SELECT outcome, detail FROM deliveries")
    assert outcome == "dead" and detail == last_error  # shown in report and the dashboard


def test_the_locale_falls_back_from_region_to_language_to_the_default(
    db, smtp, make_config, scripts
):
    add_template(db, "hello", "", subject="Hello", text="marker:{{ m }} default")
    add_template(db, "hello", "vi", subject="Xin chào", text="marker:{{ m }} vi")
    add_template(db, "hello", "vi-VN", subject="Chào (VN)", text="marker:{{ m }} vi-VN")
    add_template(db, "only-vi", "vi", text="marker:{{ m }} only vi")
    jobs = {
        "vi-VN": templated_job(db, "hello", {"m": "a"}, "vi-VN"),
        "VI_vn": templated_job(db, "hello", {"m": "b"}, "VI_vn"),
        "vi-Latn-VN": templated_job(db, "hello", {"m": "c"}, "vi-Latn-VN"),
        "vi-US": templated_job(db, "hello", {"m": "d"}, "vi-US"),
        "fr-FR": templated_job(db, "hello", {"m": "e"}, "fr-FR"),
        "none": templated_job(db, "hello", {"m": "f"}),
        "missing locale": templated_job(db, "only-vi", {"m": "g"}, "fr"),
        "missing template": templated_job(db, "nope", {"m": "h"}, "vi"),
    }
    send_what_is_queued(scripts, make_config())
    subjects = {k: job_row(db, j)[3] for k, j in jobs.items()}
    assert subjects == {
        "vi-VN": "Chào (VN)",
        "VI_vn": "Chào (VN)",
        "vi-Latn-VN": "Xin chào",
        "vi-US": "Xin chào",
        "fr-FR": "Hello",
        "none": "Hello",
        "missing locale": None,
        "missing template": None,
    }
    assert job_row(db, jobs["missing locale"])[:3] == (
        "dead",
        0,
        "template 'only-vi' has no locale 'fr' (tried 'fr', ''; it has 'vi')",
    )
    assert job_row(db, jobs["missing template"])[:3] == (
        "dead",
        0,
        "template 'nope' does not exist",
    )
    assert len(smtp.received) == 6


def test_a_template_edited_after_rendering_changes_no_job_already_rendered(
    db, smtp, make_config, scripts
):
    add_template(db, "news", subject="Issue 1", text="marker:{{ m }} first version")
    job_id = templated_job(db, "news", {"m": "n1"})
    config = make_config()
    send_what_is_queued(scripts, config)
    query(db, "UPDATE templates SET subject = 'Edited', text = 'marker:{{ m }} edited'")
    # The job is sent again (as a retry would be): the same content, not the edit.
    query(db, "UPDATE jobs SET status = 'failed', run_at = now() WHERE job_id = %s", (job_id,))
    later = templated_job(db, "news", {"m": "n2"})
    send_what_is_queued(scripts, config)
    first, again, new = received(smtp)
    assert first["Subject"] == again["Subject"] == "Issue 1"
    assert parts(first)["text/plain"] == parts(again)["text/plain"]
    assert "first version" in parts(again)["text/plain"]
    assert new["Subject"] == "Edited" and "n2 edited" in parts(new)["text/plain"]
    assert job_row(db, later)[0] == "completed"


def test_a_job_waits_for_its_template_to_be_rendered_before_it_is_queued(db):
    add_template(db, "t", text="hello {{ n }}")
    job_id = templated_job(db, "t", {"n": 1})
    query(db, "INSERT INTO jobs (email, content_message) VALUES ('plain@example.com', 'x')")
    assert query(db, QUERIES["move_ready_jobs"], {"limit": 100}) is None
    assert query(db, "SELECT email FROM jobs WHERE status = 'queued'") == [("plain@example.com",)]
    assert job_row(db, job_id)[0] == "available"
    assert producer.move_ready_jobs(db, 100) == (1, 1, 0)
    assert job_row(db, job_id)[0] == "queued" and job_row(db, job_id)[4] == "hello 1"


def test_two_producers_never_render_the_same_job(db, postgres, database):
    """A batch another producer holds (its transaction open) is skipped, not waited for."""
    add_template(db, "t", text="hello {{ n }}")
    first = templated_job(db, "t", {"n": 1})
    holder = psycopg2.connect(postgres.dsn(database))
    try:
        with holder.cursor() as cur:
            cur.execute(QUERIES["render_take_jobs"], {"limit": 10})
            assert [r[0] for r in cur.fetchall()] == [first]
        second = templated_job(db, "t", {"n": 2})
        assert templates.render_ready_jobs(db, templates.Renderer(), 10) == (1, 0)
        assert job_row(db, second)[4] == "hello 2" and job_row(db, first)[6] is False
    finally:
        holder.rollback()
        holder.close()
    assert templates.render_ready_jobs(db, templates.Renderer(), 10) == (1, 0)
    assert job_row(db, first)[4] == "hello 1"


def test_a_template_job_inserted_in_sql_is_rendered_too(db, smtp, make_config, scripts):
    add_template(db, "t", subject="S {{ n }}", text="marker:m{{ n }}")
    query(
        db,
        "INSERT INTO jobs (email, template, context) VALUES ('a@example.com', 't', '{\"n\": 7}')",
    )
    send_what_is_queued(scripts, make_config())
    assert [m["Subject"] for m in received(smtp)] == ["S 7"]


def test_compiled_templates_are_cached_by_name_locale_and_updated_at():
    renderer = templates.Renderer()
    at = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    row = templates.Template("t", "", "S {{ n }}", "T {{ n }}", None, at)
    assert renderer.render(row, {"n": 1}) == templates.Rendered("S 1", "T 1", None)
    compiled = renderer.compiled(row)
    renderer.render(row, {"n": 2})
    assert renderer.compiled(row) is compiled and len(renderer.cache) == 1
    edited = templates.Template("t", "", "New {{ n }}", None, None, at + datetime.timedelta(1))
    assert renderer.render(edited, {"n": 3}).subject == "New 3"
    assert len(renderer.cache) == 2


def test_template_render_prints_the_mail_as_it_would_go(db, make_config, tmp_path, scripts):
    add_template(db, "welcome", "", subject="Welcome {{ name }}", text="Hi {{ name }}!")
    add_template(
        db,
        "welcome",
        "vi",
        subject="Chào {{ name }}",
        text="Chào {{ name }}!",
        html="<p>{{ name }}</p>",
    )
    config = make_config(smtp_overrides={"sender": "Shop <shop@example.org>"})
    context = tmp_path / "ctx.json"
    context.write_text(json.dumps({"name": "Lan & <Minh>"}), encoding="utf-8")

    def mailqueue_cli(*args):
        return ops_helpers.mailqueue(*args, "--config", config)

    shown = mailqueue_cli(
        "template", "render", "welcome", "--locale", "vi-VN", "--context", str(context)
    )
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "From: Shop <shop@example.org>\n" in out
    assert "To: recipient@example.com\n" in out
    assert "Subject: Chào Lan & <Minh>\n" in out
    assert "--- text/plain ---\nChào Lan & <Minh>!\n" in out
    assert "--- text/html ---\n<p>Lan &amp; &lt;Minh&gt;</p>\n" in out

    listed = mailqueue_cli("template", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["name", "locale", "text", "html", "updated", "subject"]
    assert lines[1].split()[:4] == ["welcome", "''", "yes", "-"]
    assert lines[2].split()[:4] == ["welcome", "vi", "yes", "yes"]

    context.write_text("{}", encoding="utf-8")
    missing = mailqueue_cli("template", "render", "welcome", "--context", str(context))
    assert missing.returncode == 1
    assert missing.stderr == (
        "error: template 'welcome' (locale ''): subject: 'name' is undefined in the context\n"
    )
    unknown = mailqueue_cli("template", "render", "nope", "--context", str(context))
    assert unknown.stderr == "error: template 'nope' does not exist\n"
    context.write_text("[1]", encoding="utf-8")
    not_object = mailqueue_cli("template", "render", "welcome", "--context", str(context))
    assert not_object.stderr == "error: --context %s must hold a JSON object\n" % context


def test_the_producer_logs_progress_every_ten_seconds_not_once_per_insert(caplog):
    now = [1000.0]
    progress = producer.Progress(clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="producer")
    for _ in range(10):  # light traffic: a job inserted, and queued, each second
        progress.add(1, 0, 0)
        progress.report()
        now[0] += 1.0
    assert caplog.messages == [], "no line per insert"
    progress.add(1, 2, 1)
    progress.report()  # 10 s after the last line (here: the start)
    assert caplog.messages == [
        "in the last 10 s: queued 11 job(s), rendered 2 template(s), 1 dead on a template error"
    ]
    now[0] += 30.0
    progress.report()  # nothing happened since: no line
    assert len(caplog.messages) == 1


def test_the_search_for_jobs_to_render_reads_its_small_index_not_the_history(db):
    query(
        db,
        "INSERT INTO jobs (email, content_message, status, end_time) "
        "SELECT 'h' || i || '@example.com', 'x', 'completed', now() "
        "FROM generate_series(1, 20000) i",
    )
    query(
        db,
        "INSERT INTO jobs (email, content_message) "
        "SELECT 'a@example.com', 'x' FROM generate_series(1, 2000)",
    )
    query(db, "INSERT INTO jobs (email, template) VALUES ('t@example.com', 't')")
    query(db, "ANALYZE jobs")
    with db.cursor() as cur:
        explained = cur.mogrify(
            "EXPLAIN (FORMAT JSON) " + QUERIES["render_take_jobs"], {"limit": 100}
        )
    [(plan,)] = query(db, explained.decode())
    plan = plan if isinstance(plan, list) else json.loads(plan)
    nodes, todo = [], [plan[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    assert [n.get("Index Name") for n in nodes if n.get("Relation Name") == "jobs"] == [
        "jobs_to_render_idx"
    ]
