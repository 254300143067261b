"""Pure functions: retry delays, configuration checks, building and checking mail."""

import datetime
import email
import email.policy

import pytest

from mailqueue import addresses
from mailqueue import config as configuration
from mailqueue.backoff import retry_delay
from mailqueue.config import ConfigError, QueueSettings, SmtpSettings
from mailqueue.message import BadMail, Composer

CREATED = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc)


def test_retry_delay_doubles_from_retry_delay_up_to_max_with_jitter():
    settings = QueueSettings(retry_delay=60, max_retry_delay=3600)
    assert [retry_delay(n, settings, rand=lambda: 0.0) for n in range(1, 9)] == [
        60,
        120,
        240,
        480,
        960,
        1920,
        3600,
        3600,
    ]
    assert retry_delay(1, settings, rand=lambda: 0.999) == pytest.approx(74.985)
    assert retry_delay(7, settings, rand=lambda: 0.999) == 3600, "jitter never passes the maximum"
    assert retry_delay(10_000, settings, rand=lambda: 0.5) == 3600, "no overflow"


def test_minimal_config_gets_defaults_and_environment_overrides_secrets():
    config = configuration.from_dict(
        {"database": {"database": "mq", "password": "in-file"}},
        environ={
            "MAILQUEUE_DB_PASSWORD": "from-env",
            "MAILQUEUE_SMTP_PASSWORD": "smtp-env",
            "MAILQUEUE_DB_PORT": "6543",
        },
    )
    assert config.database == {"database": "mq", "password": "from-env", "port": 6543}
    assert config.smtp.password == "smtp-env"
    assert config.queue == QueueSettings()
    assert "smtp-env" not in repr(config) + repr(config.smtp)


@pytest.mark.parametrize(
    "raw, message",
    [
        ([], "top level must be a JSON object"),
        ({"smtp": {"port": "25"}}, "smtp.port must be a whole number"),
        ({"smtp": {"timeout": True}}, "smtp.timeout must be a whole number or a number"),
        ({"smtp": {"security": "tls"}}, "smtp.security must be one of none, starttls, ssl"),
        ({"smtp": {"sender": "Evil\r\nBcc: x@example.org <a@example.com>"}}, "line break"),
        ({"smtp": {"sender": "alice@example.org(<bob@example.org>"}}, "smtp.sender"),
        ({"smtp": {"subject": "=?UTF-8?Q?=0A?=Bcc: injected@example.com"}}, "encoded word"),
        ({"queue": {"max_attempts": 0}}, "queue.max_attempts must be at least 1"),
        ({"queue": {"retry_delay": 100, "max_retry_delay": 10}}, "retry_delay"),
        ({"database": {"port": 70000}}, "database.port must be a port number"),
        ({"databse": {}}, "unknown key databse"),
    ],
)
def test_config_mistakes_are_named(raw, message):
    with pytest.raises(ConfigError) as caught:
        configuration.from_dict(raw, "config.json")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def build(**job):
    composer = Composer(SmtpSettings(sender="Hộp thư <noreply@example.com>", subject="Default"))
    fields = dict(
        job_id=7,
        email="someone@example.com",
        subject=None,
        content_message="Hello",
        created_at=CREATED,
    )
    fields.update(job)
    return composer.build(fields)


def test_built_mail_parses_back_to_what_the_job_holds():
    mail = build(subject="Chào bạn", content_message="Dòng một\nDòng hai\n")
    message = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert message["From"].addresses[0].display_name == "Hộp thư"
    assert message["From"].addresses[0].addr_spec == "noreply@example.com"
    assert message["To"] == "someone@example.com"
    assert message["Subject"] == "Chào bạn"
    assert message.get_content() == "Dòng một\r\nDòng hai\r\n"
    assert (mail.sender, mail.recipients[0], mail.smtputf8) == (
        "noreply@example.com",
        "someone@example.com",
        False,
    )
    assert b"\r\n\r\n" in mail.data and b"\n" not in mail.data.replace(b"\r\n", b"")


def test_message_id_is_stable_per_job_and_distinct_between_jobs():
    first, again, other = build(job_id=7), build(job_id=7), build(job_id=8)
    header = lambda m: email.message_from_bytes(m.data)["Message-ID"]  # noqa: E731
    assert header(first) == header(again) == "<7.1767323045678901@example.com>"
    assert header(other) != header(first)


def test_null_subject_uses_the_configured_default():
    message = email.message_from_bytes(build(subject=None).data, policy=email.policy.default)
    assert message["Subject"] == "Default"


@pytest.mark.parametrize(
    "job, reason",
    [
        (dict(email=None), "email is NULL"),
        (dict(email=""), "email is empty"),
        (dict(email="   "), "email is empty"),
        (dict(email="no-at-sign"), "not a valid address"),
        (dict(email="a@example.com\r\nBcc: x@example.org"), "line break"),
        (dict(email="alice@example.org(<bob@example.org>"), "not a valid address"),
        (dict(email="a@example.com, b@example.com"), "not a valid address"),
        (dict(email="x" * 990 + "@example.com"), "not a valid address"),
        (dict(subject="Hi\r\nBcc: x@example.org"), "line break"),
        (dict(subject="=?UTF-8?Q?=0A?=Bcc: injected@example.com"), "encoded word"),
        (dict(subject="nul\x00"), "control character"),
        (dict(subject="x" * 1_000_000), "characters long"),
        (dict(content_message=None), "content_message is NULL"),
        (dict(content_message=""), "content_message is empty"),
        (dict(content_message="nul\x00byte"), "NUL"),
    ],
)
def test_bad_input_is_refused_with_a_reason(job, reason):
    with pytest.raises(BadMail) as caught:
        build(**job)
    assert reason in str(caught.value)


def test_internationalised_address_needs_smtputf8_only_for_a_non_ascii_local_part():
    assert build(email="người.nhận@ví-dụ.vn").smtputf8
    ascii_local = build(email="bob@ví-dụ.vn")
    assert not ascii_local.smtputf8 and ascii_local.recipients[0] == "bob@xn--v-d-rma6749a.vn"


def test_header_text_check_allows_ordinary_unicode():
    assert addresses.check_header_text("Đơn hàng #42 — ✓", "subject")


@pytest.mark.parametrize(
    "address",
    [
        "user@example.com",
        "User.Name+tag@Example.COM",
        "a_b-c%d@sub.example.co.uk",
        "x@example.com.",
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a@-example.com",
        "a@example-.com",
        "a@exa_mple.com",
        "a@123.com",
        "a@example.123",
        "a@localhost",
        "a@example.invalid",
        "a@test",
        "a@xn--v-d-rma6749a.vn",
        "a@xn--zz.com",
        "l" * 64 + "@example.com",
        "l" * 65 + "@example.com",
        "a@" + "d" * 63 + ".com",
        "a@" + "d" * 64 + ".com",
        "a@" + ".".join(["d" * 60] * 4) + ".com",
    ],
)
def test_fast_path_agrees_with_email_validator(address):
    """The shortcut for plain addresses must accept and refuse exactly what
    email-validator does, with the same normalised result."""
    from email_validator import EmailNotValidError, validate_email

    try:
        # strict: with the 64-octet limit of the local part (RFC 5321), which we keep
        expected = validate_email(address, check_deliverability=False, strict=True).ascii_email
    except EmailNotValidError:
        expected = None
    try:
        got = addresses.parse_recipient(address).address
    except addresses.BadAddress:
        got = None
    assert got == expected


def test_long_unicode_subject_is_folded_into_short_encoded_words_and_reads_back():
    subject = "Thông báo về đơn hàng của quý khách — chữ có dấu ắ ằ ẳ ẵ ặ " * 8
    subject = subject[:480]
    mail = build(subject=subject)
    head = mail.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert all(len(line) <= 78 for line in head)
    message = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert message["Subject"] == subject
