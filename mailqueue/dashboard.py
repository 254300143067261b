"""python -m mailqueue dashboard [--host 127.0.0.1] [--port 8025]: a page an
operator keeps open, and GET /metrics for Prometheus.

The page shows the jobs per status, the backlog and its oldest job, charts of the
mails sent and the attempts failed per minute and of the lag p95 over the last
hour (SVG drawn here, on the server: nothing is fetched from anywhere else), and
the latest failures with their reason, recipients masked (--show-recipients
shows them), never a body. A small script of its own (static/dashboard.js)
refreshes the figures every few seconds. GET /metrics serves the same figures in
Prometheus' text format, written by prometheus_client.

It only reads, through the ops_* queries of sql/queries.sql, so the worker role
of sql/roles.sql is enough. One snapshot serves every request for SNAPSHOT_TTL
seconds, so that many open pages and scrapers cost the database no more than one.
It listens on 127.0.0.1 by default; on any other address it asks for the
password in MAILQUEUE_DASHBOARD_PASSWORD (HTTP basic auth, any user name), and
refuses to start without one.
"""

from __future__ import annotations

import base64
import hmac
import html
import ipaddress
import logging
import os
import re
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from mailqueue import db, report

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator, Mapping

    from prometheus_client.metrics_core import Metric
    from psycopg2.extensions import connection

    from mailqueue.config import Config

log = logging.getLogger("dashboard")

PASSWORD_ENV = "MAILQUEUE_DASHBOARD_PASSWORD"
WINDOW = 3600  # seconds: the page's and /metrics' window (the last hour)
SNAPSHOT_TTL = 2.0  # seconds one snapshot serves every request
REFRESH_SECONDS = 5  # the page refreshes its figures this often
LATEST_FAILURES = 20  # rows in the page's table of failures
LATEST_SUPPRESSIONS = 20  # rows in the page's table of suppressions
# an address in a suppression's detail (the server's words), masked as ...@...
_ADDRESS = re.compile(r"[^\s<>(),;:\"'\[\]]+@[^\s<>(),;:\"'\[\]]+")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
OUTCOMES = ("sent", "failed", "dead")

# The page runs nothing but its own script and loads nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Unavailable(Exception):
    """The database cannot be read now; the message is one line without secrets."""


# ------------------------------------------------------------------ the figures


def collect(conn: connection) -> dict[str, Any]:
    """Everything the page and /metrics show, read now."""
    figures = report.gather(conn, WINDOW)
    [waiting] = db.run_dicts(conn, "ops_waiting")
    figures["backlog"] = waiting["backlog"]
    figures["per_minute"] = db.run_dicts(conn, "ops_per_minute")
    figures["latest_failures"] = db.run_dicts(conn, "ops_latest_failures", limit=LATEST_FAILURES)
    deliveries = dict(db.run(conn, "ops_deliveries_since", since=WINDOW))
    figures["deliveries"] = {outcome: deliveries.get(outcome, 0) for outcome in OUTCOMES}
    # figures["relays"] comes with report.gather; per outcome for /metrics:
    figures["relay_deliveries"] = db.run(conn, "ops_relay_deliveries_since", since=WINDOW)
    figures["latest_suppressions"] = db.run_dicts(
        conn, "ops_latest_suppressions", limit=LATEST_SUPPRESSIONS
    )
    figures["taken_at"] = time.time()
    return figures


class Source:
    """One connection, reopened when lost, and the latest snapshot."""

    def __init__(self, database_settings: dict[str, Any]) -> None:
        self.database_settings = database_settings
        self.lock = threading.Lock()
        self.conn: connection | None = None
        self.snapshot: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        with self.lock:
            if self.snapshot and time.time() - self.snapshot["taken_at"] < SNAPSHOT_TTL:
                return self.snapshot
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = db.connect(self.database_settings, "mailqueue dashboard")
                self.snapshot = collect(self.conn)
                return self.snapshot
            except db.DatabaseUnavailable as exc:
                raise Unavailable("cannot connect to the %s" % exc) from None
            except db.Error as exc:
                db.close_quietly(self.conn)
                self.conn = None
                raise Unavailable(report.query_failed(exc, self.database_settings)) from None

    def close(self) -> None:
        with self.lock:
            db.close_quietly(self.conn)


# ------------------------------------------------------------------ the page


def mask(address: str | None) -> str:
    """'alice@example.com' -> 'a***@example.com': enough to tell providers apart."""
    if not address:
        return "-"
    local, at, domain = address.rpartition("@")
    if not at:
        return address[:1] + "***"
    return local[:1] + "***@" + domain


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _seconds(value: float | None) -> str:
    return "-" if value is None else report._shown(value)


def bars_chart(minutes: list[dict[str, Any]], width: int = 640, height: int = 170) -> str:
    """Sent (green) and failed (red) per minute, stacked, as SVG."""
    left, top, bottom = 40, 12, 22
    inner_w, inner_h = width - left - 8, height - top - bottom
    peak = max([m["sent"] + m["failed"] for m in minutes] + [1])
    step = inner_w / max(len(minutes), 1)
    parts = []
    for i, m in enumerate(minutes):
        x = left + i * step
        sent_h = inner_h * m["sent"] / peak
        failed_h = inner_h * m["failed"] / peak
        label = "%s: %d sent, %d failed" % (m["minute"].strftime("%H:%M"), m["sent"], m["failed"])
        if m["sent"]:
            parts.append(
                '<rect class="sent" x="%.1f" y="%.1f" width="%.1f" height="%.1f" '
                'fill="#2e9b33"><title>%s</title></rect>'
                % (x, top + inner_h - sent_h, step * 0.8, sent_h, _e(label))
            )
        if m["failed"]:
            parts.append(
                '<rect class="failed" x="%.1f" y="%.1f" width="%.1f" height="%.1f" '
                'fill="#c62828"><title>%s</title></rect>'
                % (x, top + inner_h - sent_h - failed_h, step * 0.8, failed_h, _e(label))
            )
    return _frame(
        "chart-throughput",
        "mails sent (green) and attempts failed (red) per minute",
        width,
        height,
        left,
        top,
        inner_w,
        inner_h,
        "%d" % peak,
        minutes,
        parts,
        'data-sent="%d" data-failed="%d"'
        % (sum(m["sent"] for m in minutes), sum(m["failed"] for m in minutes)),
    )


def lag_chart(minutes: list[dict[str, Any]], width: int = 640, height: int = 170) -> str:
    """The lag p95 (end_time - start_time) per minute, as an SVG line; gaps where
    no job finished."""
    left, top, bottom = 40, 12, 22
    inner_w, inner_h = width - left - 8, height - top - bottom
    values = [m["lag_p95_seconds"] for m in minutes]
    peak = max([v for v in values if v is not None] + [0.001])
    step = inner_w / max(len(minutes), 1)
    segments, current, dots = [], [], []  # type: ignore[var-annotated]  # lists of str
    for i, value in enumerate(values):
        if value is None:
            if current:
                segments.append(current)
            current = []
            continue
        x, y = left + i * step + step * 0.4, top + inner_h - inner_h * value / peak
        current.append("%.1f,%.1f" % (x, y))
        dots.append(
            '<circle class="lag" cx="%.1f" cy="%.1f" r="2.5" fill="#1f5fbf">'
            "<title>%s: p95 %s</title></circle>"
            % (x, y, minutes[i]["minute"].strftime("%H:%M"), _e(_seconds(value)))
        )
    if current:
        segments.append(current)
    parts = [
        '<polyline class="lag" points="%s" fill="none" stroke="#1f5fbf" stroke-width="2"/>'
        % " ".join(s)
        for s in segments
    ] + dots
    return _frame(
        "chart-lag",
        "lag p95 per minute (end_time - start_time)",
        width,
        height,
        left,
        top,
        inner_w,
        inner_h,
        _seconds(peak),
        minutes,
        parts,
        'data-points="%d"' % len(dots),
    )


def _frame(
    chart_id: str,
    title: str,
    width: int,
    height: int,
    left: int,
    top: int,
    inner_w: int,
    inner_h: int,
    peak_label: str,
    minutes: list[dict[str, Any]],
    parts: list[str],
    data: str,
) -> str:
    first = minutes[0]["minute"].strftime("%H:%M") if minutes else ""
    last = minutes[-1]["minute"].strftime("%H:%M") if minutes else ""
    return "".join(
        [
            '<svg class="chart" id="%s" %s xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '  # noqa: E501
            'viewBox="0 0 %d %d" role="img" aria-label="%s"><title>%s</title>'
            % (chart_id, data, width, height, width, height, _e(title), _e(title)),
            '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#999"/>'
            % (left, top + inner_h, left + inner_w, top + inner_h),
            '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#999"/>'
            % (left, top, left, top + inner_h),
            '<text x="%d" y="%d" text-anchor="end">%s</text>' % (left - 4, top + 8, _e(peak_label)),
            '<text x="%d" y="%d" text-anchor="end">0</text>' % (left - 4, top + inner_h),
            '<text x="%d" y="%d">%s</text>' % (left, height - 6, _e(first)),
            '<text x="%d" y="%d" text-anchor="end">%s</text>'
            % (left + inner_w, height - 6, _e(last)),
        ]
        + parts
        + ["</svg>"]
    )


def panel(figures: dict[str, Any], show_recipients: bool = False) -> str:
    """The part of the page that refreshes: every figure, the charts, the table."""
    tiles = "".join(
        '<div class="tile %s" id="status-%s"><div class="label">%s</div>'
        '<div class="value">%d</div></div>' % (s, s, s, n)
        for s, n in figures["statuses"].items()
    )
    lag = figures["lag_seconds"]
    summary = "".join(
        '<div class="tile" id="%s"><div class="label">%s</div><div class="value">%s</div></div>'
        % (i, _e(label), _e(value))
        for i, label, value in (
            ("backlog", "backlog (due, not yet sent)", figures["backlog"]),
            (
                "oldest-waiting",
                "oldest waiting",
                _seconds(figures["oldest_waiting_seconds"])
                if figures["oldest_waiting_seconds"] is not None
                else "none",
            ),
            ("sent-last-hour", "sent, last hour", figures["sent"]),
            (
                "failed-last-hour",
                "attempts failed, last hour",
                figures["deliveries"]["failed"] + figures["deliveries"]["dead"],
            ),
            (
                "lag",
                "lag p50 / p95 / max",
                "%s / %s / %s" % (_seconds(lag["p50"]), _seconds(lag["p95"]), _seconds(lag["max"])),
            ),
        )
    )
    rows = "".join(
        "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td>"
        '<td class="reason">%s</td></tr>'
        % (
            _e(f["finished_at"].strftime("%Y-%m-%d %H:%M:%S") if f["finished_at"] else "-"),
            _e(f["job_id"]),
            _e(f["attempt"]),
            _e(f["outcome"]),
            _e(f["smtp_code"] or "-"),
            _e(f["email"] if show_recipients else mask(f["email"])),
            _e(f["reason"]),
        )
        for f in figures["latest_failures"]
    )
    table = (
        '<table id="failures"><tr><th>when</th><th>job</th><th>attempt</th><th>outcome</th>'
        "<th>code</th><th>recipient</th><th>reason</th></tr>%s</table>" % rows
        if rows
        else '<p id="failures">No attempt has failed.</p>'
    )
    after = after_send_tiles(figures) + suppressions_table(figures, show_recipients)
    return "".join(
        [
            '<p class="updated" id="updated">updated %s</p>'
            % time.strftime("%H:%M:%S", time.localtime(figures["taken_at"])),
            '<h2>Jobs</h2><div class="tiles" id="statuses">%s</div>' % tiles,
            '<h2>Keeping up</h2><div class="tiles">%s</div>' % summary,
            "<h2>Last hour</h2>",
            '<p class="caption">Mails sent (green) and attempts failed (red) per minute</p>',
            bars_chart(figures["per_minute"]),
            '<p class="caption">Lag p95 per minute (end_time - start_time)</p>',
            lag_chart(figures["per_minute"]),
            "<h2>Latest failures</h2>",
            table,
            relays_table(figures["relays"]),
            after,
        ]
    )


def relays_table(relays: dict[str, dict[str, Any]]) -> str:
    """A row per relay (docs/relays.md): up or down, sent and failed in the last
    hour, its daily quota used; nothing when the database knows no relay."""
    if not relays:
        return ""
    rows = "".join(
        '<tr class="relay %s" data-relay="%s"><td>%s</td><td class="health">%s</td>'
        '<td>%d</td><td>%d</td><td>%d</td><td class="reason">%s</td></tr>'
        % (
            "down" if r["down"] else "up",
            _e(name),
            _e(name),
            "down until %s" % _e((r["down_until"] or "-")[11:19]) if r["down"] else "up",
            r["sent"],
            r["failed"],
            r["quota_used"],
            _e(r["last_error"]) if r["down"] else "",
        )
        for name, r in relays.items()
    )
    return (
        '<h2>Relays</h2><table id="relays"><tr><th>relay</th><th>health</th>'
        "<th>sent, last hour</th><th>failed, last hour</th><th>quota used (24 h)</th>"
        "<th>why down</th></tr>%s</table>" % rows
    )


def _rate_tile(tile_id: str, label: str, rate: float | None, limit: float) -> str:
    over = rate is not None and rate >= limit
    return (
        '<div class="tile%s" id="%s" data-rate="%s"><div class="label">%s</div>'
        '<div class="value">%s</div></div>'
        % (
            " over" if over else "",
            tile_id,
            "" if rate is None else rate,
            _e(label),
            _e(report.percent(rate)),
        )
    )


def after_send_tiles(figures: dict[str, Any]) -> str:
    """Bounce and complaint rates of the last hour beside the providers' levels,
    and the addresses suppressed now."""
    suppressed = figures["suppressed"]
    bounce_label = "bounce rate, last hour (SES reviews at %s)" % report.percent(
        report.SES_BOUNCE_REVIEW
    )
    complaint_label = "complaint rate, last hour (SES reviews at %s; Gmail: under %s)" % (
        report.percent(report.SES_COMPLAINT_REVIEW),
        report.percent(report.GMAIL_COMPLAINT_LIMIT),
    )
    tiles = [
        _rate_tile("bounce-rate", bounce_label, figures["bounce_rate"], report.SES_BOUNCE_REVIEW),
        _rate_tile(
            "complaint-rate",
            complaint_label,
            figures["complaint_rate"],
            report.SES_COMPLAINT_REVIEW,
        ),
        '<div class="tile" id="suppressed-addresses"><div class="label">addresses suppressed '
        '(%s)</div><div class="value">%d</div></div>'
        % (_e(", ".join("%s %d" % kv for kv in suppressed.items())), sum(suppressed.values())),
    ]
    return '<h2>After sending</h2><div class="tiles">%s</div>' % "".join(tiles)


def suppressions_table(figures: dict[str, Any], show_recipients: bool = False) -> str:
    """The latest suppressions, addresses masked (also in the server's words)."""
    rows = "".join(
        "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td>"
        '<td class="reason">%s</td></tr>'
        % (
            _e(s["created_at"].strftime("%Y-%m-%d %H:%M:%S")),
            _e(s["email"] if show_recipients else mask(s["email"])),
            _e(s["reason"]),
            _e(s["source"]),
            _e(s["job_id"] or "-"),
            _e(s["expires_at"].strftime("%Y-%m-%d %H:%M") if s["expires_at"] else "never"),
            _e(s["detail"] if show_recipients else _ADDRESS.sub("...@...", s["detail"] or "")),
        )
        for s in figures["latest_suppressions"]
    )
    if not rows:
        return '<h2>Latest suppressions</h2><p id="suppressions">No address is suppressed.</p>'
    return (
        '<h2>Latest suppressions</h2><table id="suppressions"><tr><th>when</th><th>address</th>'
        "<th>reason</th><th>source</th><th>job</th><th>expires</th><th>detail</th></tr>%s"
        "</table>" % rows
    )


def page(figures: dict[str, Any], where: str, show_recipients: bool = False) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>Mail queue</title>"
        '<noscript><meta http-equiv="refresh" content="%d"></noscript>'
        '<link rel="stylesheet" href="static/dashboard.css"></head>'
        '<body data-refresh-seconds="%d"><header><h1>Mail queue</h1>'
        '<span class="where">%s</span></header><main id="panel">%s</main>'
        '<script src="static/dashboard.js"></script></body></html>'
        % (REFRESH_SECONDS, REFRESH_SECONDS, _e(where), panel(figures, show_recipients))
    )


# ------------------------------------------------------------------ /metrics


class _Figures:
    """A prometheus_client collector of one snapshot."""

    def __init__(self, figures: dict[str, Any]) -> None:
        self.figures = figures

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        f = self.figures
        jobs = GaugeMetricFamily("mailqueue_jobs", "Jobs per status.", labels=["status"])
        for status, count in f["statuses"].items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            "mailqueue_backlog_jobs",
            "Jobs due and not yet sent (available or failed with run_at come, and queued).",
            value=f["backlog"],
        )
        yield GaugeMetricFamily(
            "mailqueue_oldest_waiting_seconds",
            "How long the oldest job due and not yet sent has waited (0 when none waits).",
            value=f["oldest_waiting_seconds"] or 0.0,
        )
        lag = GaugeMetricFamily(
            "mailqueue_lag_seconds",
            "end_time - start_time of the jobs finished in the last hour (NaN when none finished).",
            labels=["quantile"],
        )
        for quantile, key in (("0.5", "p50"), ("0.95", "p95"), ("1", "max")):
            value = f["lag_seconds"][key]
            lag.add_metric([quantile], float("nan") if value is None else value)
        yield lag
        deliveries = GaugeMetricFamily(
            "mailqueue_deliveries_last_hour",
            "Send attempts logged in deliveries in the last hour, per outcome.",
            labels=["outcome"],
        )
        for outcome, count in f["deliveries"].items():
            deliveries.add_metric([outcome], count)
        yield deliveries
        suppressions = GaugeMetricFamily(
            "mailqueue_suppressions",
            "Addresses on the suppression list now (not expired), per reason.",
            labels=["reason"],
        )
        for reason, count in f["suppressed"].items():
            suppressions.add_metric([reason], count)
        yield suppressions
        for name, key, words in (
            ("mailqueue_bounce_rate", "bounce_rate", "Hard bounces"),
            ("mailqueue_complaint_rate", "complaint_rate", "Complaints"),
        ):
            value = f[key]
            yield GaugeMetricFamily(
                name,
                "%s recorded in the last hour per mail sent in it (NaN when none was sent)."
                % words,
                value=float("nan") if value is None else value,
            )
        yield from _relay_metrics(f)


def _relay_metrics(f: dict[str, Any]) -> Iterator[Metric]:
    """Per relay (docs/relays.md): up, attempts per outcome, quota used."""
    up = GaugeMetricFamily(
        "mailqueue_relay_up",
        "1 while the relay is up for every consumer, 0 while marked down.",
        labels=["relay"],
    )
    quota = GaugeMetricFamily(
        "mailqueue_relay_quota_used",
        "Mails its daily_quota counts now (the rolling 24 hours).",
        labels=["relay"],
    )
    for name, relay in f["relays"].items():
        up.add_metric([name], 0 if relay["down"] else 1)
        quota.add_metric([name], relay["quota_used"])
    yield up
    yield quota
    deliveries = GaugeMetricFamily(
        "mailqueue_relay_deliveries_last_hour",
        "Send attempts logged in deliveries in the last hour, per relay and outcome.",
        labels=["relay", "outcome"],
    )
    for relay_name, outcome, count in f["relay_deliveries"]:
        deliveries.add_metric([relay_name, outcome], count)
    yield deliveries


def metrics(figures: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Figures(figures))
    return generate_latest(registry)


# ------------------------------------------------------------------ the server


if TYPE_CHECKING:

    class _Server(ThreadingHTTPServer):
        """What serve() returns: a ThreadingHTTPServer with the attributes it sets."""

        source: Source
        password: str
        show_recipients: bool
        where: str


class Handler(BaseHTTPRequestHandler):
    server: _Server  # an annotation only: the server serve() made
    server_version = "mailqueue-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        if not self.authorised():
            return self.send(
                401,
                b"a password is needed\n",
                "text/plain; charset=utf-8",
                {"WWW-Authenticate": 'Basic realm="mailqueue", charset="UTF-8"'},
            )
        path = self.path.split("?", 1)[0]
        if path.startswith("/static/") and path[len("/static/") :] in STATIC_FILES:
            name = path[len("/static/") :]
            with open(os.path.join(STATIC, name), "rb") as f:
                return self.send(200, f.read(), STATIC_FILES[name])
        if path not in ("/", "/panel", "/metrics"):
            return self.send(404, b"not found\n", "text/plain; charset=utf-8")
        try:
            figures = self.server.source.get()
        except Unavailable as exc:
            log.warning("%s", exc)
            return self.send(
                503, ("unavailable: %s\n" % exc).encode("utf-8"), "text/plain; charset=utf-8"
            )
        if path == "/metrics":
            return self.send(200, metrics(figures), CONTENT_TYPE_LATEST)
        if path == "/panel":
            body = panel(figures, self.server.show_recipients)
        else:
            body = page(figures, self.server.where, self.server.show_recipients)
        return self.send(200, body.encode("utf-8"), "text/html; charset=utf-8")

    def authorised(self) -> bool:
        password = self.server.password
        if not password:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        _, _, given_password = given.partition(":")
        return hmac.compare_digest(given_password.encode("utf-8"), password.encode("utf-8"))

    def send(
        self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in dict(SECURITY_HEADERS, **(headers or {})).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    # one DEBUG line per request, never stderr noise
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    config: Config,
    host: str,
    port: int,
    show_recipients: bool = False,
    environ: Mapping[str, str] | None = None,
) -> _Server:
    """Bind (or SystemExit with one line) and return the server, not yet serving."""
    environ = os.environ if environ is None else environ
    password = environ.get(PASSWORD_ENV, "")
    if not is_loopback(host) and not password:
        raise SystemExit(
            "error: the dashboard on %s would be open to others: set %s "
            "(HTTP basic auth), or keep it on 127.0.0.1" % (host, PASSWORD_ENV)
        )

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        # a _Server once the four attributes below are set
        server: _Server = Server((host, port), Handler)  # type: ignore[assignment]
    except OSError as exc:
        raise SystemExit(
            "error: cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc)
        ) from None
    server.source = Source(config.database)
    server.password = password
    server.show_recipients = show_recipients
    server.where = db.where(config.database)
    return server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other needs %s)" % PASSWORD_ENV,
    )
    parser.add_argument("--port", type=int, default=8025, help="port (default 8025)")
    parser.add_argument(
        "--show-recipients",
        action="store_true",
        help="show recipients in the table of failures (masked by default)",
    )


def run(args: argparse.Namespace, config: Config) -> None:
    server = serve(config, args.host, args.port, args.show_recipients)
    host, port = server.server_address[:2]
    # host is a str: the server is AF_INET or AF_INET6
    shown = "[%s]" % host if ":" in host else host  # type: ignore[str-bytes-safe]
    log.info(
        "dashboard at http://%s:%d/ (metrics at /metrics), reading %s",
        shown,
        port,
        db.where(config.database),
    )
    # SIGTERM stops it as Ctrl-C does (shutdown() waits for serve_forever, so
    # not from the handler, which runs on serve_forever's own thread).
    signal.signal(
        signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown).start()
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.source.close()
        log.info("stopped")
