"""python -m mailqueue report [--since 1h] [--json]: does the queue keep up, and why
do mails fail? In words (a table a person reads) or as JSON.

The JSON has exactly these keys: statuses (the eight, zeros included), sent (mails
sent in the window), sent_per_minute, lag_seconds (p50, p95 and max of
end_time - start_time of the jobs finished in the window), oldest_waiting_seconds
(how long the oldest job that is due and not yet sent has waited, or null),
failures (up to 10 {reason, jobs}: the failed and dead attempts of the window,
the same SMTP reply for different recipients being one reason), bounce_rate and
complaint_rate (hard bounces and complaints recorded in the window per mail
sent in it, as fractions; null when none was sent), suppressed (addresses on
the suppression list now, per reason), and relays ({name: {sent, failed, down,
down_until, last_error, quota_used}}: every relay known to the database, its
attempts in the window (failed counts failed and dead), its shared health, and
the mails its daily quota counts now; docs/relays.md). Every figure comes from
one query of sql/queries.sql (ops_*), each reading an index.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, SupportsFloat

from mailqueue import db

if TYPE_CHECKING:
    import argparse

    from psycopg2.extensions import connection

    from mailqueue.config import Config

STATUSES = (
    "available",
    "queued",
    "completed",
    "failed",
    "dead",
    "uncertain",
    "suppressed",
    "bounced",
)
SUPPRESSION_REASONS = ("hard_bounce", "complaint", "unsubscribe", "manual")
# Where the providers start to look (docs/suppressions.md): Amazon SES reviews an
# account at a 5% bounce rate or a 0.1% complaint rate; Gmail's bulk-sender rules
# want complaints under 0.3%.
SES_BOUNCE_REVIEW = 0.05
SES_COMPLAINT_REVIEW = 0.001
GMAIL_COMPLAINT_LIMIT = 0.003
MAX_REASONS = 10


def gather(conn: connection, since: float) -> dict[str, Any]:
    """The report of the last `since` seconds, as the JSON's dict."""
    counts = dict(db.run(conn, "ops_status_counts"))
    [finished] = db.run_dicts(conn, "ops_finished_since", since=since)
    [waiting] = db.run_dicts(conn, "ops_waiting")
    reasons = db.run_dicts(conn, "ops_failure_reasons", since=since, limit=MAX_REASONS)
    return {
        "statuses": {status: counts.get(status, 0) for status in STATUSES},
        "sent": finished["sent"],
        "sent_per_minute": round(finished["sent"] / (since / 60.0), 3),
        "lag_seconds": {key: _seconds(finished[key]) for key in ("p50", "p95", "max")},
        "oldest_waiting_seconds": _seconds(waiting["oldest_waiting_seconds"]),
        "failures": [{"reason": r["reason"], "jobs": r["jobs"]} for r in reasons],
        **after_send(conn, since),
        "relays": relays_of(conn, since),
    }


def relays_of(conn: connection, since: float) -> dict[str, dict[str, Any]]:
    """The report's `relays`: per relay name, what happened in the window."""
    return {
        row["name"]: {
            "sent": row["sent"],
            "failed": row["failed"],
            "down": row["down"],
            "down_until": row["down_until"].isoformat() if row["down_until"] else None,
            "last_error": row["last_error"],
            "quota_used": row["quota_used"],
        }
        for row in db.run_dicts(conn, "ops_relays", since=since)
    }


def after_send(conn: connection, since: float) -> dict[str, Any]:
    """bounce_rate, complaint_rate (over the window) and suppressed (now, per reason)."""
    [rates] = db.run_dicts(conn, "ops_after_send", since=since)
    by_reason = dict(db.run(conn, "ops_suppressions_by_reason"))
    sent = rates["sent"]
    return {
        "bounce_rate": round(rates["bounces"] / sent, 6) if sent else None,
        "complaint_rate": round(rates["complaints"] / sent, 6) if sent else None,
        "suppressed": {reason: by_reason.get(reason, 0) for reason in SUPPRESSION_REASONS},
    }


def percent(rate: float | None) -> str:
    return "-" if rate is None else "%.2f%%" % (rate * 100)


def _seconds(value: SupportsFloat | None) -> float | None:
    return None if value is None else round(float(value), 3)


def as_text(report: dict[str, Any], window: str) -> str:
    """The report for people; `window` as given on the command line (e.g. '1h')."""
    lines = ["Jobs by status:"]
    lines += ["  %-10s %10d" % (status, n) for status, n in report["statuses"].items()]
    lag = report["lag_seconds"]
    lines += [
        "In the last %s:" % window,
        "  sent       %10d  (%.1f per minute, averaged over %s)"
        % (report["sent"], report["sent_per_minute"], window),
        "  lag        p50 %s, p95 %s, max %s  (end_time - start_time)"
        % tuple(_shown(lag[k]) for k in ("p50", "p95", "max")),
        "Oldest job waiting: %s"
        % (
            _shown(report["oldest_waiting_seconds"])
            if report["oldest_waiting_seconds"] is not None
            else "none is waiting"
        ),
    ]
    if report["failures"]:
        lines.append("Why attempts failed (jobs, reason):")
        lines += ["  %6d  %s" % (f["jobs"], f["reason"]) for f in report["failures"]]
    else:
        lines.append("No attempt failed.")
    lines += [
        "After sending, in the last %s:" % window,
        "  bounce rate     %7s  (Amazon SES reviews at %s)"
        % (percent(report["bounce_rate"]), percent(SES_BOUNCE_REVIEW)),
        "  complaint rate  %7s  (SES reviews at %s; Gmail wants under %s)"
        % (
            percent(report["complaint_rate"]),
            percent(SES_COMPLAINT_REVIEW),
            percent(GMAIL_COMPLAINT_LIMIT),
        ),
        "Suppressed addresses: %s"
        % ", ".join("%s %d" % item for item in report["suppressed"].items()),
    ]
    if report["relays"]:
        lines.append("Relays (sent and failed in the last %s):" % window)
        lines += ["  " + _relay_line(name, r) for name, r in report["relays"].items()]
    return "\n".join(lines)


def _relay_line(name: str, relay: dict[str, Any]) -> str:
    health = "up"
    if relay["down"]:
        health = "DOWN until %s (%s)" % (
            (relay["down_until"] or "-")[:19].replace("T", " "),
            relay["last_error"] or "no reason recorded",
        )
    return "%-16s sent %8d  failed %6d  quota used %8d  %s" % (
        name,
        relay["sent"],
        relay["failed"],
        relay["quota_used"],
        health,
    )


def _shown(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return "%.2f s" % seconds
    if seconds < 7200:
        return "%.1f min" % (seconds / 60)
    return "%.1f h" % (seconds / 3600)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="1h", help="the window: 30d, 12h, 15m ... (default: 1h)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace, config: Config, since: float) -> None:
    conn = connect(config, "mailqueue report")
    try:
        report = gather(conn, since)
    except db.Error as exc:
        raise SystemExit("error: %s" % query_failed(exc, config.database)) from None
    finally:
        db.close_quietly(conn)
    print(json.dumps(report, indent=2) if args.json else as_text(report, args.since))


def connect(config: Config, application_name: str) -> connection:
    """A connection for a command, or SystemExit with one line."""
    try:
        return db.connect(config.database, application_name)
    except db.DatabaseUnavailable as exc:
        raise SystemExit("error: cannot connect to the %s" % exc) from None


def query_failed(exc: Exception, database_settings: dict[str, Any]) -> str:
    """One line for a query that failed; the likely cause when the views are missing."""
    text = db.describe(exc, database_settings)
    if getattr(exc, "pgcode", None) == "42P01":  # undefined_table: an older schema
        text += " (run sql/schema.sql: this version adds the views the reports read)"
    return text
