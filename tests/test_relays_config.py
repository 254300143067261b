"""Relays and routes in the configuration (docs/relays.md): what a file gives,
and every mistake as one line."""

import json

import pytest

from mailqueue import config as configuration
from mailqueue.config import ConfigError, RelaySettings, Route, SmtpSettings
from test_cli import assert_one_clear_line
from test_message import dkim_config

SES = {"host": "email-smtp.eu-west-1.amazonaws.com", "port": 587, "security": "starttls"}
POSTFIX = {"host": "10.0.0.25", "port": 25}


def load(raw, environ=None):
    return configuration.from_dict(dict({"database": {"database": "mq"}}, **raw), environ=environ)


def test_a_config_of_today_is_one_relay_named_default_and_one_failover_route():
    config = load(
        {"smtp": {"host": "mail.example.com", "port": 2525, "sender": "Shop <shop@example.com>"}},
        environ={"MAILQUEUE_SMTP_USER": "shop", "MAILQUEUE_SMTP_PASSWORD": "s3cret-env"},
    )
    [relay] = config.relays.values()
    assert relay.name == "default" and list(config.relays) == ["default"]
    # every field of smtp, credentials from the environment included
    for field in SmtpSettings.__dataclass_fields__:
        assert getattr(relay, field) == getattr(config.smtp, field), field
    assert (relay.user, relay.password) == ("shop", "s3cret-env")
    assert (relay.concurrency, relay.rate_limit, relay.daily_quota) == (None, None, None)
    assert config.routes == {"default": Route("default", ("default",), "failover")}
    assert config.queue.relay_retry_after == 30


def test_relays_inherit_smtp_but_its_credentials_and_keep_their_order():
    config = load(
        {
            "smtp": {"sender": "Shop <shop@example.com>", "timeout": 12, "user": "smtp-user"},
            "relays": {
                "ses": dict(SES, user="AKIAEXAMPLE", password_env="SES_PASSWORD", rate_limit=14),
                "postfix": dict(POSTFIX, subject="From the shop", daily_quota=50000),
                "backup": {"host": "backup.example.org", "timeout": 3, "concurrency": 4},
            },
            "queue": {"relay_retry_after": 5},
        },
        environ={"SES_PASSWORD": "ses-secret", "MAILQUEUE_SMTP_PASSWORD": "smtp-secret"},
    )
    assert list(config.relays) == ["ses", "postfix", "backup"]
    ses, postfix, backup = config.relays.values()
    assert isinstance(ses, RelaySettings) and isinstance(ses, SmtpSettings)
    assert (ses.name, ses.host, ses.port, ses.security) == ("ses",) + tuple(SES.values())
    assert (ses.user, ses.password, ses.rate_limit) == ("AKIAEXAMPLE", "ses-secret", 14)
    assert ses.sender == postfix.sender == backup.sender == "Shop <shop@example.com>"
    assert (ses.timeout, backup.timeout) == (12, 3)
    assert (postfix.subject, postfix.daily_quota) == ("From the shop", 50000)
    assert backup.concurrency == 4
    # the smtp section's password (and user) go to no relay that did not ask for them
    assert (postfix.user, postfix.password, backup.password) == ("", "", "")
    assert config.routes == {"default": Route("default", ("ses", "postfix", "backup"), "failover")}
    assert config.queue.relay_retry_after == 5


def test_routes_name_relays_with_a_strategy_and_default_is_added_when_not_written():
    config = load(
        {
            "relays": {"ses": SES, "postfix": POSTFIX, "backup": {"host": "b.example.org"}},
            "routes": {
                "transactional": {"relays": ["ses", "postfix"]},
                "bulk": {"relays": ["postfix", "backup"], "strategy": "round_robin"},
            },
        }
    )
    assert config.routes["transactional"] == Route("transactional", ("ses", "postfix"))
    assert config.routes["bulk"] == Route("bulk", ("postfix", "backup"), "round_robin")
    assert config.routes["default"] == Route("default", ("ses", "postfix", "backup"), "failover")
    written = load({"relays": {"a": {}, "b": {}}, "routes": {"default": {"relays": ["b"]}}}).routes
    assert written == {"default": Route("default", ("b",), "failover")}


def test_a_relay_has_its_own_dkim_key_or_inherits_the_one_of_smtp(tmp_path):
    (tmp_path / "own").mkdir()
    config = load(
        {
            "smtp": dkim_config(tmp_path, selector="shared")["smtp"],
            "relays": {
                "ses": SES,
                "postfix": dict(
                    POSTFIX, dkim=dkim_config(tmp_path / "own", selector="own")["smtp"]["dkim"]
                ),
            },
        }
    )
    ses, postfix = config.relays.values()
    assert ses.dkim.selector == "shared" and ses.dkim == config.smtp.dkim
    assert postfix.dkim.selector == "own" and postfix.dkim.private_key.startswith(b"-----BEGIN")
    assert "PRIVATE" not in repr(config.relays)


def test_no_password_in_what_a_relay_or_the_config_shows():
    config = load({"relays": {"ses": dict(SES, user="AKIAEXAMPLE", password="in-the-file-secret")}})
    shown = repr(config) + repr(config.relays) + repr(config.relays["ses"]) + str(config.relays)
    assert "in-the-file-secret" not in shown and "AKIAEXAMPLE" in shown


MISTAKES = [
    ({"relays": {}}, "relays must be a JSON object naming at least one relay"),
    ({"relays": []}, "relays must be a JSON object naming at least one relay"),
    ({"relays": {"ses": "smtp.example.com"}}, "relays.ses must be a JSON object"),
    ({"relays": {"bad name": {}}}, "relay name 'bad name'"),
    ({"relays": {"ses": {"hots": "x"}}}, "unknown key relays.ses.hots"),
    ({"relays": {"ses": {"port": "25"}}}, "relays.ses.port must be a whole number"),
    ({"relays": {"ses": {"port": 0}}}, "relays.ses.port must be a port number"),
    ({"relays": {"ses": {"security": "tls"}}}, "relays.ses.security must be one of"),
    ({"relays": {"ses": {"timeout": 0}}}, "relays.ses.timeout must be a positive number"),
    ({"relays": {"ses": {"sender": "a\r\nBcc: x@example.org"}}}, "relays.ses.sender"),
    ({"relays": {"ses": {"concurrency": 0}}}, "relays.ses.concurrency must be at least 1"),
    ({"relays": {"ses": {"rate_limit": -1}}}, "relays.ses.rate_limit must be a positive number"),
    ({"relays": {"ses": {"rate_limit": 0}}}, "relays.ses.rate_limit must be a positive number"),
    ({"relays": {"ses": {"daily_quota": -5}}}, "relays.ses.daily_quota must be at least 1"),
    ({"relays": {"ses": {"daily_quota": 1.5}}}, "relays.ses.daily_quota must be a whole number"),
    ({"relays": {"ses": {"password_env": "NOT_SET_HERE"}}}, "NOT_SET_HERE, which is not set"),
    (
        {"relays": {"ses": {"password": "x", "password_env": "SES_PASSWORD"}}},
        "both password and password_env",
    ),
    ({"relays": {"ses": {}}, "routes": []}, "routes must be a JSON object"),
    ({"relays": {"ses": {}}, "routes": {"bulk": ["ses"]}}, "routes.bulk must be a JSON object"),
    ({"relays": {"ses": {}}, "routes": {"bulk": {"relays": []}}}, "routes.bulk.relays must name"),
    ({"relays": {"ses": {}}, "routes": {"bulk": {}}}, "routes.bulk.relays must name"),
    (
        {"relays": {"ses": {}}, "routes": {"bulk": {"relays": "ses"}}},
        "routes.bulk.relays must be a JSON list",
    ),
    (
        {"relays": {"ses": {}}, "routes": {"bulk": {"relays": ["ses", "postfix"]}}},
        "routes.bulk names the relay 'postfix', which relays does not define (known: ses)",
    ),
    ({"routes": {"bulk": {"relays": ["ses"]}}}, "which relays does not define (known: default)"),
    (
        {"relays": {"ses": {}}, "routes": {"bulk": {"relays": ["ses", "ses"]}}},
        "routes.bulk.relays names a relay twice",
    ),
    (
        {"relays": {"ses": {}}, "routes": {"bulk": {"relays": ["ses"], "strategy": "random"}}},
        "routes.bulk.strategy must be one of failover, round_robin, not 'random'",
    ),
    (
        {"relays": {"ses": {}}, "routes": {"bulk": {"relay": ["ses"]}}},
        "unknown key routes.bulk.relay",
    ),
    ({"relays": {"ses": {}}, "routes": {"b/k": {"relays": ["ses"]}}}, "route name 'b/k'"),
    ({"queue": {"relay_retry_after": 0}}, "queue.relay_retry_after must be a positive number"),
    ({"relayz": {}}, "unknown key relayz"),
]


@pytest.mark.parametrize("raw, message", MISTAKES)
def test_every_mistake_is_one_line_naming_it(raw, message):
    with pytest.raises(ConfigError) as caught:
        load(raw, environ={"SES_PASSWORD": "x"})
    text = str(caught.value)
    assert message in text and "\n" not in text, text


@pytest.mark.parametrize(
    "raw, words",
    [
        (
            {"routes": {"bulk": {"relays": ["ses", "nowhere"]}}},
            ["routes.bulk", "'nowhere'", "known: ses"],
        ),
        ({"routes": {"bulk": {"relays": []}}}, ["routes.bulk.relays must name"]),
        ({"routes": {"bulk": {"relays": ["ses"], "strategy": "x"}}}, ["routes.bulk.strategy"]),
        ({"relays": {"ses": {"rate_limit": -2}}}, ["relays.ses.rate_limit"]),
        ({"relays": {"ses": {"colour": "red"}}}, ["unknown key relays.ses.colour"]),
    ],
)
def test_the_consumer_says_a_relay_mistake_in_one_line_and_exits_1(
    raw, words, scripts, make_config
):
    sections = {"relays": {"ses": {"host": "127.0.0.1", "port": 2525}}}
    for key, value in raw.items():
        sections[key] = value
    result = scripts.run("consumer.py", "--config", make_config(**sections))
    assert result.returncode == 1
    assert_one_clear_line(result, *words)


def test_the_example_of_docs_relays_loads_as_it_reads():
    import os
    import re

    from helpers import ROOT

    text = open(os.path.join(ROOT, "docs", "relays.md"), encoding="utf-8").read()
    [example] = re.findall(r"```json\n(.*?)```", text, re.S)
    config = configuration.from_dict(
        json.loads(example), "config.json", environ={"SES_SMTP_PASSWORD": "from-env"}
    )
    assert list(config.relays) == ["ses", "postfix"]
    ses, postfix = config.relays.values()
    assert (ses.password, ses.rate_limit, ses.daily_quota) == ("from-env", 14, 50000)
    assert postfix.password == "" and postfix.sender == "Example Shop <noreply@example.com>"
    assert config.routes["transactional"] == Route("transactional", ("ses", "postfix"))
    assert config.routes["bulk"] == Route("bulk", ("postfix", "ses"))
    # the one-line error the docs show
    broken = json.loads(example)
    broken["routes"]["bulk"]["relays"][0] = "postfx"
    with pytest.raises(ConfigError) as caught:
        configuration.from_dict(broken, "config.json", environ={"SES_SMTP_PASSWORD": "x"})
    assert "error: %s" % caught.value in text
