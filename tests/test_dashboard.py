"""python -m mailqueue dashboard: the page and GET /metrics over HTTP, the page in
headless Chromium, the password off loopback, the worker role enough."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import PASSWORD, status_counts
from mailqueue.dashboard import mask
from mailqueue.report import STATUSES
from ops_helpers import Dashboard, delivery, finished_job, mailqueue, waiting_job

SECRET_BODY = "the body of a mail nobody but its recipient reads"


@pytest.fixture
def activity(db):
    """Mails sent over the last minutes, failures with replies that name recipients,
    and a backlog."""
    for n in range(30):
        finished_job(
            db,
            "completed",
            "sent%d@example.com" % n,
            lag=1 + n % 4,
            ago=30 + 60 * (n % 6),
            body=SECRET_BODY,
        )
    for n in range(3):
        job = finished_job(db, "dead", "rejected%d@example.net" % n, ago=90, body=SECRET_BODY)
        delivery(
            db,
            job,
            "dead",
            "recipient refused: 550 5.1.1 <rejected%d@example.net>: no such user" % n,
            550,
            ago=90,
        )
    job = waiting_job(db, "failed", "later@example.org", due_ago=-600)
    delivery(db, job, "failed", "mail refused: 451 4.3.0 Try again later", 451, ago=45)
    for n in range(4):
        waiting_job(db, "available", "wait%d@example.com" % n, due_ago=120)
    return db


def metric_values(text):
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_the_page_and_metrics_over_http(activity, make_config, tmp_path):
    counts = dict({s: 0 for s in STATUSES}, **status_counts(activity))
    with Dashboard(make_config(), tmp_path) as dashboard:
        status, headers, page = dashboard.get("/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        for status_name, count in counts.items():
            assert re.search(
                r'id="status-%s"><div class="label">%s</div><div class="value">%d<'
                % (status_name, status_name, count),
                page,
            ), status_name
        assert re.search(r'id="backlog">.*?<div class="value">4<', page)
        assert 'id="chart-throughput" data-sent="30" data-failed="4"' in page
        assert len(re.findall(r'<rect class="sent"', page)) == 6  # six minutes with mail
        assert len(re.findall(r'<circle class="lag"', page)) == 6
        assert "550 5.1.1 &lt;...@...&gt;: no such user" in page
        assert "r***@example.net" in page and "rejected0@example.net" not in page
        assert SECRET_BODY not in page and "@example.com" not in page

        status, _, panel = dashboard.get("/panel")
        assert status == 200 and 'id="chart-lag"' in panel and "<html" not in panel
        assert dashboard.get("/static/dashboard.js")[0] == 200
        assert dashboard.get("/nothing-here")[0] == 404

        status, headers, text = dashboard.get("/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        values = metric_values(text)
        for status_name, count in counts.items():
            assert values[("mailqueue_jobs", (("status", status_name),))] == count
        assert 120 <= values[("mailqueue_oldest_waiting_seconds", ())] < 180
        lags = [1 + n % 4 for n in range(30)] + [1.0] * 3
        assert values[("mailqueue_lag_seconds", (("quantile", "0.5"),))] == pytest.approx(
            sorted(lags)[len(lags) // 2], abs=0.01
        )
        assert values[("mailqueue_lag_seconds", (("quantile", "0.95"),))] == pytest.approx(
            4.0, abs=0.01
        )
        assert values[("mailqueue_deliveries_last_hour", (("outcome", "dead"),))] == 3
        assert values[("mailqueue_deliveries_last_hour", (("outcome", "failed"),))] == 1
        assert values[("mailqueue_deliveries_last_hour", (("outcome", "sent"),))] == 0
        assert SECRET_BODY not in text and "example" not in text
        assert dashboard.stop() == 0


def test_recipients_are_shown_only_when_asked(activity, make_config, tmp_path):
    with Dashboard(make_config(), tmp_path, extra=["--show-recipients"]) as dashboard:
        assert "rejected0@example.net" in dashboard.get("/")[2]


def test_masked_recipients_keep_only_a_first_letter_and_the_domain():
    assert mask("alice@example.com") == "a***@example.com"
    assert mask("not-an-address") == "n***"
    assert mask(None) == mask("") == "-"


def test_the_dashboard_refuses_another_address_without_a_password(make_config):
    result = mailqueue(
        "dashboard",
        "--config",
        make_config(),
        "--host",
        "0.0.0.0",
        env=dict(os.environ, MAILQUEUE_DASHBOARD_PASSWORD=""),
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "MAILQUEUE_DASHBOARD_PASSWORD" in result.stderr


def test_on_another_address_it_asks_for_the_password(db, make_config, tmp_path):
    with Dashboard(make_config(), tmp_path, host="0.0.0.0", password=PASSWORD) as dashboard:
        for path in ("/", "/metrics", "/panel"):
            status, headers, body = dashboard.get(path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
            assert dashboard.get(path, auth="wrong")[0] == 401
            assert dashboard.get(path, auth=PASSWORD)[0] == 200
        assert PASSWORD not in dashboard.output()


def test_the_worker_role_is_enough(
    postgres,
    database,
    roles,
    activity,  # noqa: F811
    make_config,
    tmp_path,
):
    settings = dict(
        postgres.settings_for(database), user=roles["mailqueue_worker"], password=PASSWORD
    )
    with Dashboard(make_config(database=settings), tmp_path) as dashboard:
        status, _, text = dashboard.get("/metrics")
        assert status == 200, text
        assert metric_values(text)[("mailqueue_jobs", (("status", "completed"),))] == 30
        assert dashboard.get("/")[0] == 200
    result = mailqueue("report", "--config", make_config(database=settings), "--json")
    assert result.returncode == 0, result.stderr


def test_a_lost_database_is_one_line_on_the_page_not_a_traceback(postgres, make_config, tmp_path):
    config = make_config(
        database=dict(postgres.settings_for("postgres"), database="nowhere_x", port=1)
    )
    with Dashboard(config, tmp_path) as dashboard:
        for path in ("/", "/metrics"):
            status, _, body = dashboard.get(path)
            assert status == 503 and body.count("\n") == 1, body
            assert body.startswith("unavailable: cannot connect to the database nowhere_x")
        assert "Traceback" not in dashboard.output()


# ---------------------------------------------------------------- headless Chromium


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI") == "true":
        pytest.fail("headless Chromium is needed in CI (.ci/run installs Debian's chromium)")
    pytest.skip("no chromium on PATH (apt-get install chromium); CI installs it")


def run_chromium(*args):
    profile = tempfile.mkdtemp(prefix="mailqueue-chromium-")
    try:
        return subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--user-data-dir=" + profile,
            ]
            + list(args),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_the_page_in_headless_chromium_shows_the_counts_draws_its_charts_and_refreshes(
    activity, make_config, tmp_path
):
    counts = dict({s: 0 for s in STATUSES}, **status_counts(activity))
    with Dashboard(make_config(), tmp_path) as dashboard:
        # The DOM after the page's own script has refreshed it (virtual time
        # passes the 5 s at once; the fetch is real).
        dom = run_chromium("--virtual-time-budget=12000", "--dump-dom", dashboard.url + "/")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert re.search(r'<body[^>]* data-refreshes="[1-9]', html), "the page never refreshed"
        assert "data-stale" not in html
        for status_name, count in counts.items():
            assert re.search(
                r'id="status-%s">.*?<div class="value">%d</div>' % (status_name, count), html
            ), status_name
        assert len(re.findall(r'<rect class="sent"', html)) == 6
        assert len(re.findall(r'<polyline class="lag"', html)) >= 1
        assert "r***@example.net" in html

        screenshot = tmp_path / "dashboard.png"
        shot = run_chromium(
            "--screenshot=%s" % screenshot,
            "--window-size=1000,1100",
            "--hide-scrollbars",
            dashboard.url + "/",
        )
        assert shot.returncode == 0, shot.stderr[-2000:]
        data = screenshot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000
        print("dashboard screenshot: %s" % screenshot)


def test_the_page_and_metrics_show_bounce_and_complaint_rates_and_suppressions(
    db, make_config, tmp_path
):
    from helpers import query

    for n in range(20):
        finished_job(db, "completed", "ok%d@example.com" % n, ago=120)
    query(
        db,
        "INSERT INTO mail_events (message_key, recipient, kind, status, source) VALUES "
        "('sha256:a', 'ok0@example.com', 'failed', '5.1.1', 'dsn'), "
        "('sha256:b', 'ok1@example.com', 'failed', '5.1.1', 'dsn'), "
        "('sha256:c', 'ok2@example.com', 'complaint', NULL, 'arf')",
    )
    query(
        db,
        "INSERT INTO suppressions (email, reason, source, detail) VALUES "
        "('ok0@example.com', 'hard_bounce', 'dsn', '550 5.1.1 <ok0@example.com>: User unknown'), "
        "('ok1@example.com', 'hard_bounce', 'dsn', NULL), "
        "('ok2@example.com', 'complaint', 'arf', 'feedback-type: abuse')",
    )
    with Dashboard(make_config(), tmp_path) as dashboard:
        status, _, page = dashboard.get("/")
        assert status == 200
        # 2 bounces in 20 mails: 10%, over SES's 5%; 1 complaint: 5%, over 0.1%
        assert re.search(r'class="tile over" id="bounce-rate" data-rate="0.1">.*?10.00%', page)
        assert re.search(r'class="tile over" id="complaint-rate" data-rate="0.05"', page)
        assert re.search(r'id="suppressed-addresses">.*?<div class="value">3<', page)
        assert "o***@example.com" in page and "ok0@example.com" not in page
        assert "550 5.1.1 &lt;...@...&gt;: User unknown" in page
        values = metric_values(dashboard.get("/metrics")[2])
        assert values[("mailqueue_suppressions", (("reason", "hard_bounce"),))] == 2
        assert values[("mailqueue_suppressions", (("reason", "complaint"),))] == 1
        assert values[("mailqueue_suppressions", (("reason", "unsubscribe"),))] == 0
        assert values[("mailqueue_bounce_rate", ())] == pytest.approx(0.1)
        assert values[("mailqueue_complaint_rate", ())] == pytest.approx(0.05)
