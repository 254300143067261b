"""Django's mail into the queue (issue 21): a minimal project (settings in code) with
EMAIL_BACKEND = "mailqueue.django.EmailBackend" (and, on Django 6.1, MAILERS)
sends through send_mail, send_mass_mail and EmailMultiAlternatives inside
transaction.atomic(); the real producer and consumer deliver what was committed."""

import email
import email.policy
from email.mime.image import MIMEImage

import pytest

from helpers import copies, query, send_what_is_queued

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": "set per test"}},
        EMAIL_BACKEND="mailqueue.django.EmailBackend",
        DEFAULT_FROM_EMAIL="Shop <shop@example.org>",
        USE_TZ=True,
        INSTALLED_APPS=[],
    )
    django.setup()

from django.core import mail  # noqa: E402
from django.db import connections, transaction  # noqa: E402

LOGO = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\n\x00\r\n.\r\n" + bytes(range(256)) * 8
DJANGO_6_1 = django.VERSION >= (6, 1)


@pytest.fixture
def django_db(postgres, database):
    """Django's "default" database is this test's database."""
    params = postgres.settings_for(database)
    connections["default"].close()
    connections["default"].settings_dict.update(
        NAME=database,
        USER=params["user"],
        PASSWORD=params["password"],
        HOST=params["host"],
        PORT=params["port"],
    )
    yield connections["default"]
    connections["default"].close()


def received(smtp):
    return [
        (sorted(rcpts), email.message_from_bytes(c, policy=email.policy.default))
        for _, rcpts, c, _ in smtp.received
    ]


def test_send_mail_in_a_committed_atomic_block_arrives_and_a_rolled_back_one_does_not(
    django_db, db, smtp, make_config, scripts
):
    with transaction.atomic():
        assert mail.send_mail("Sent", "marker:kept", None, ["lan@example.com"]) == 1

    class ViewFailed(Exception):
        pass

    with pytest.raises(ViewFailed):
        with transaction.atomic():
            mail.send_mail("Lost", "marker:lost", None, ["minh@example.com"])
            raise ViewFailed
    assert query(db, "SELECT email, subject, sender FROM jobs") == [
        ("lan@example.com", "Sent", "Shop <shop@example.org>")
    ]
    send_what_is_queued(scripts, make_config())
    assert copies(smtp) == {"kept": 1}
    [(rcpts, message)] = received(smtp)
    assert rcpts == ["lan@example.com"] and message["From"] == "Shop <shop@example.org>"


def test_send_mass_mail_queues_each_message(django_db, smtp, make_config, scripts):
    messages = [
        ("Hello %d" % i, "marker:mass-%d" % i, None, ["user%d@example.com" % i]) for i in range(5)
    ]
    assert mail.send_mass_mail(messages) == 5
    send_what_is_queued(scripts, make_config())
    assert copies(smtp) == {"mass-%d" % i: 1 for i in range(5)}


def test_a_message_with_several_recipients_reaches_each_once_and_hides_the_bcc(
    django_db, db, smtp, make_config, scripts
):
    message = mail.EmailMultiAlternatives(
        subject="Hoá đơn",
        body="marker:multi",
        to=["Lan <lan@example.com>", "minh@example.com", "LAN@example.com"],
        cc=["boss@example.com", "minh@example.com"],
        bcc=["audit@example.com", "boss@example.com"],
        reply_to=["help@example.org"],
        headers={"X-Campaign": "tháng 11"},
    )
    message.attach_alternative('<p>marker:multi <img src="cid:logo"></p>', "text/html")
    message.attach("hoá đơn.pdf", PDF, "application/pdf")
    logo = MIMEImage(LOGO, "png")
    logo.add_header("Content-ID", "<logo>")
    logo.add_header("Content-Disposition", "inline", filename="logo.png")
    message.attach(logo)
    with transaction.atomic():
        assert message.send() == 1
    send_what_is_queued(scripts, make_config())

    got = received(smtp)
    everyone = sorted(r for rcpts, _ in got for r in rcpts)
    assert everyone == [
        "audit@example.com",
        "boss@example.com",
        "lan@example.com",
        "minh@example.com",
    ], "each address exactly once"
    for _, sent in got:
        raw = sent.as_bytes()
        assert b"audit@example.com" not in raw, "nobody sees the Bcc"
        assert sent["Reply-To"] == "help@example.org" and sent["X-Campaign"] == "tháng 11"
        files = {p.get_filename(): p for p in sent.walk() if p.get_filename()}
        assert files["hoá đơn.pdf"].get_content() == PDF
        assert (
            files["logo.png"].get_content() == LOGO and files["logo.png"]["Content-ID"] == "<logo>"
        )
        assert sent.get_body(("html",)).get_content().startswith("<p>marker:multi")
    by_to = {m["To"]: rcpts for rcpts, m in got}
    assert by_to == {
        "lan@example.com": ["audit@example.com", "boss@example.com", "lan@example.com"],
        "minh@example.com": ["minh@example.com"],
    }
    assert [m["Cc"] for _, m in got if m["To"] == "lan@example.com"] == ["boss@example.com"]


def test_only_bcc_recipients_get_a_job_each(django_db, smtp, make_config, scripts):
    message = mail.EmailMessage("News", "marker:bcc", bcc=["a@example.com", "b@example.com"])
    assert message.send() == 1
    send_what_is_queued(scripts, make_config())
    got = received(smtp)
    assert sorted((rcpts, m["To"]) for rcpts, m in got) == [
        (["a@example.com"], "a@example.com"),
        (["b@example.com"], "b@example.com"),
    ]


def test_a_bad_message_raises_or_with_fail_silently_is_left_out(django_db, db):
    bad = mail.EmailMessage("Hi\nBcc: spy@example.com", "x", to=["lan@example.com"])
    good = mail.EmailMessage("Fine", "x", to=["lan@example.com"])
    with pytest.raises(ValueError, match="line break"):
        mail.get_connection().send_messages([good, bad])
    assert query(db, "SELECT count(*) FROM jobs") == [(0,)], "nothing written"
    silent = mail.get_connection(fail_silently=True)
    assert silent.send_messages([good, bad]) == 1
    assert query(db, "SELECT subject FROM jobs") == [("Fine",)]
    with pytest.raises(ValueError, match="to 'nobody' is not a valid address"):
        mail.send_mail("Hi", "x", None, ["nobody"])
    assert mail.send_mail("Hi", "x", None, ["nobody"], fail_silently=True) == 0


@pytest.mark.skipif(not DJANGO_6_1, reason="MAILERS is Django 6.1's")
def test_the_backend_serves_django_6_1_mailers(django_db, db, smtp, make_config, scripts):
    from django.test import override_settings

    mailers = {
        "default": {"BACKEND": "mailqueue.django.EmailBackend", "OPTIONS": {"database": "default"}},
        "queue": {"BACKEND": "mailqueue.django.EmailBackend"},
    }
    with override_settings(MAILERS=mailers):
        with transaction.atomic():
            assert mail.send_mail("M", "marker:mailers", None, ["lan@example.com"]) == 1
            assert (
                mail.mailers["queue"].send_messages(
                    [mail.EmailMessage("Q", "marker:queue", to=["minh@example.com"])]
                )
                == 1
            )
    send_what_is_queued(scripts, make_config())
    assert copies(smtp) == {"mailers": 1, "queue": 1}
