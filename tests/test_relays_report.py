"""What happened per relay: `python -m mailqueue report` (words and --json key
`relays`), the dashboard's table of relays and /metrics, on a history whose
figures the test knows. Passwords never appear."""

import datetime
import json

import pytest

from helpers import query
from mailqueue import relays
from ops_helpers import Dashboard, finished_job, mailqueue
from test_dashboard import metric_values

PASSWORD = "relay-pass-7f3k"


def attempts(db, relay, outcome, count, ago=60):
    for n in range(count):
        job = finished_job(db, "completed", "r%d@example.com" % n, ago=ago)
        query(
            db,
            "INSERT INTO deliveries (job_id, attempt, started_at, finished_at, outcome, relay) "
            "VALUES (%s, 1, now() - (%s + 1) * interval '1 second', "
            "now() - %s * interval '1 second', %s, %s)",
            (job, ago, ago, outcome, relay),
        )


@pytest.fixture
def history(db):
    relays.register(db, ["ses", "postfix", "backup"])
    attempts(db, "ses", "sent", 5)
    attempts(db, "ses", "failed", 2)
    attempts(db, "ses", "dead", 1)
    attempts(db, "ses", "sent", 3, ago=2 * 3600)  # outside the last hour
    attempts(db, "postfix", "sent", 4)
    attempts(db, "retired", "sent", 1)  # no longer configured: still reported
    attempts(db, None, "sent", 6)  # written before relays: no relay's
    # postfix refused our password, and the reason carried it (scrubbed)
    relays.mark_down(db, "postfix", 30, "535 5.7.8 auth failed for %s" % PASSWORD, [PASSWORD])
    assert relays.take_quota(db, "ses", 7, 100) == 7
    query(
        db,
        "INSERT INTO relay_usage (relay, hour, sent) VALUES ('ses', "
        "(date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') "
        "- interval '23 hours', 10)",
    )
    return db


def config_with_relays(make_config):
    return make_config(
        relays={
            "ses": {"host": "127.0.0.1", "port": 2525, "user": "u", "password": PASSWORD},
            "postfix": {"host": "127.0.0.1", "port": 2526},
        }
    )


def test_the_report_says_per_relay_what_happened(history, make_config):
    result = mailqueue("report", "--config", config_with_relays(make_config), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["relays"]
    down_until = report["postfix"].pop("down_until")
    assert 25 < (datetime.datetime.fromisoformat(down_until) - now(history)).total_seconds() <= 30
    assert report == {
        "backup": dict(
            sent=0, failed=0, down=False, down_until=None, last_error=None, quota_used=0
        ),
        "postfix": dict(
            sent=4, failed=0, down=True, last_error="535 5.7.8 auth failed for ***", quota_used=0
        ),
        "retired": dict(
            sent=1, failed=0, down=False, down_until=None, last_error=None, quota_used=0
        ),
        "ses": dict(sent=5, failed=3, down=False, down_until=None, last_error=None, quota_used=17),
    }
    wider = json.loads(
        mailqueue("report", "--config", make_config(), "--json", "--since", "3h").stdout
    )
    assert wider["relays"]["ses"]["sent"] == 8

    words = mailqueue("report", "--config", config_with_relays(make_config))
    assert words.returncode == 0, words.stderr
    lines = {line.split()[0]: line for line in words.stdout.splitlines()[-4:]}
    assert "sent        5" in lines["ses"] and "failed      3" in lines["ses"]
    assert "quota used       17" in lines["ses"] and lines["ses"].endswith("up")
    assert "DOWN until" in lines["postfix"] and "auth failed for ***" in lines["postfix"]
    assert PASSWORD not in result.stdout + result.stderr + words.stdout + words.stderr


def now(db):
    [(value,)] = query(db, "SELECT now()")
    return value


def test_the_dashboard_and_metrics_show_each_relay(history, make_config, tmp_path):
    with Dashboard(config_with_relays(make_config), tmp_path) as dashboard:
        status, _, page = dashboard.get("/")
        assert status == 200
        table = page[page.index('<table id="relays">') :]
        table = table[: table.index("</table>")]
        rows = table.split('<tr class="relay ')[1:]
        assert [row.split('data-relay="')[1].split('"')[0] for row in rows] == [
            "backup",
            "postfix",
            "retired",
            "ses",
        ]
        postfix = rows[1]
        assert postfix.startswith("down") and "down until" in postfix
        assert "auth failed for ***" in postfix
        ses = rows[3]
        assert ses.startswith("up") and "<td>5</td><td>3</td><td>17</td>" in ses

        status, _, text = dashboard.get("/metrics")
        assert status == 200
        values = metric_values(text)
        up = {
            relay: values[("mailqueue_relay_up", (("relay", relay),))]
            for relay in ("ses", "postfix", "backup", "retired")
        }
        assert up == {"ses": 1, "postfix": 0, "backup": 1, "retired": 1}
        assert values[("mailqueue_relay_quota_used", (("relay", "ses"),))] == 17

        def delivered(relay, outcome):
            key = ("mailqueue_relay_deliveries_last_hour", (("outcome", outcome), ("relay", relay)))
            return values.get(key)

        assert (delivered("ses", "sent"), delivered("ses", "failed"), delivered("ses", "dead")) == (
            5,
            2,
            1,
        )
        assert delivered("postfix", "sent") == 4 and delivered("backup", "sent") is None
        assert PASSWORD not in page + text + dashboard.output()
        assert dashboard.stop() == 0


def test_without_relays_the_page_has_no_relay_table(db, make_config, tmp_path):
    with Dashboard(make_config(), tmp_path) as dashboard:
        page = dashboard.get("/")[2]
        assert 'id="relays"' not in page
        assert "mailqueue_relay_up{" not in dashboard.get("/metrics")[2]
        assert dashboard.stop() == 0
