"""The suppression list: addresses that must not be mailed, and the batch screen
the consumer runs before it sends.

    python -m mailqueue suppress add ADDRESS... [--reason manual] [--expires 90d]
    python -m mailqueue suppress remove ADDRESS...
    python -m mailqueue suppress list [--json]
    python -m mailqueue suppress import FILE [--reason manual] [--expires 90d]

Addresses are compared lower-cased (the table's trigger stores them so). The
screen costs one look-up of the primary key per claimed batch (suppressed_among).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailqueue import addresses, db, durations

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from psycopg2.extensions import connection

REASONS = ("hard_bounce", "complaint", "unsubscribe", "manual")


@dataclass(frozen=True)
class Suppression:
    email: str
    reason: str
    source: str
    created_at: datetime.datetime

    def describe(self) -> str:
        """For last_error: 'x@example.com is on the suppression list (hard_bounce
        from dsn, since 2026-12-04 20:31 UTC)'."""
        when = self.created_at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return "%s is on the suppression list (%s from %s, since %s)" % (
            self.email,
            self.reason,
            self.source,
            when,
        )


@dataclass
class Screened:
    """The verdict on a claimed batch: jobs not to send at all, and the cc/bcc
    elements to leave out of the others."""

    # job_id -> last_error, for jobs whose `email` is suppressed: status suppressed,
    # no attempt spent, nothing sent
    suppressed: dict[int, str] = field(default_factory=dict)
    # job_id -> {"cc": [indexes], "bcc": [indexes]} of the elements to drop (0-based)
    dropped: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    # job_id -> a note for the deliveries row: what was dropped and why
    notes: dict[int, str] = field(default_factory=dict)

    def job_to_send(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """`job` (a dict of jobs columns) with its suppressed cc/bcc elements left
        out, for Composer.build(). The job itself is not changed."""
        job = dict(job)
        for column, indexes in self.dropped.get(job["job_id"], {}).items():
            kept = [v for i, v in enumerate(job[column]) if i not in indexes]
            job[column] = kept or None
        return job


def bare_address(value: object, allow_local: bool = True) -> str | None:
    """The lower-cased address of a jobs value ('Name <a@example.org>' or a bare
    address), or None when it is not one (the Composer reports those)."""
    if not isinstance(value, str):
        return None
    try:
        return addresses.parse_mailbox(value, "address", allow_local)[1].address.lower()
    except addresses.BadAddress:
        return None


def addresses_of(jobs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every address the screen must look up, once each: the `email`, `cc` and
    `bcc` of jobs that do not ignore suppression."""
    found: set[str] = set()
    for job in jobs:
        if job.get("ignore_suppression"):
            continue
        for value in [job.get("email")] + list(job.get("cc") or []) + list(job.get("bcc") or []):
            address = bare_address(value)
            if address:
                found.add(address)
    return sorted(found)


def screen_against(
    jobs: Iterable[Mapping[str, Any]], suppressed: Mapping[str, Suppression]
) -> Screened:
    """The pure part of screen(): the verdict given the suppressions found."""
    verdict = Screened()
    if not suppressed:
        return verdict
    for job in jobs:
        if job.get("ignore_suppression"):
            continue
        job_id = job["job_id"]
        found = suppressed.get(bare_address(job.get("email")) or "")
        if found is not None:
            verdict.suppressed[job_id] = "suppressed: " + found.describe()
            continue
        dropped: dict[str, list[int]] = {}
        words = []
        for column in ("cc", "bcc"):
            for i, value in enumerate(job.get(column) or []):
                hit = suppressed.get(bare_address(value) or "")
                if hit is not None:
                    dropped.setdefault(column, []).append(i)
                    words.append("%s[%d] %s" % (column, i + 1, hit.describe()))
        if dropped:
            verdict.dropped[job_id] = dropped
            verdict.notes[job_id] = "left out: " + "; ".join(words)
    return verdict


def screen(conn: connection, jobs: Sequence[Mapping[str, Any]]) -> Screened:
    """The verdict on a claimed batch (dicts of jobs columns: job_id, email, cc,
    bcc, ignore_suppression), from one indexed look-up."""
    wanted = addresses_of(jobs)
    if not wanted:
        return Screened()
    rows = db.run_dicts(conn, "suppressed_among", addresses=wanted)
    return screen_against(jobs, {row["email"]: Suppression(**row) for row in rows})


# ---------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name, about in (
        ("add", "put addresses on the list"),
        ("remove", "take addresses off the list"),
        ("list", "show the list"),
        ("import", "add the addresses of a file (one a line, or a CSV with an email column)"),
    ):
        action = actions.add_parser(name, help=about, description=about)
        # also after the action (suppress add --config c.json ...); SUPPRESS keeps
        # a value given before it
        action.add_argument("--config", default=argparse.SUPPRESS, help="as for suppress")
        action.add_argument(
            "--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
        )
        if name in ("add", "remove"):
            action.add_argument("addresses", nargs="+", metavar="ADDRESS")
        if name == "import":
            action.add_argument("file", metavar="FILE", help="a file, or - for standard input")
        if name in ("add", "import"):
            action.add_argument("--reason", choices=REASONS, default="manual")
            action.add_argument("--expires", help="lift it after 90d, 12h, 30m (default: never)")
            action.add_argument("--detail", help="a note kept with each row")
        if name == "list":
            action.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace, conn: connection) -> None:
    if args.action == "list":
        rows = db.run_dicts(conn, "suppression_list")
        if args.json:
            print(json.dumps(rows, indent=2, default=_json_value))
        else:
            for row in rows:
                print(
                    "%s  %-11s %-6s %s%s"
                    % (
                        row["email"],
                        row["reason"],
                        row["source"],
                        row["created_at"].strftime("%Y-%m-%d %H:%M"),
                        ""
                        if row["expires_at"] is None
                        else (" (expired)" if row["expired"] else " until %s")
                        % row["expires_at"].strftime("%Y-%m-%d %H:%M"),
                    )
                )
            print("%d suppressed address(es)" % len(rows))
        return
    if args.action == "remove":
        good, bad = _checked(args.addresses)
        _report_bad(bad)
        removed = db.run(conn, "unsuppress", emails=good) if good else 0
        print("removed %d" % removed)
        return
    expires = None
    if args.expires is not None:
        try:
            seconds = durations.parse(args.expires, "--expires")
        except durations.BadDuration as exc:
            raise SystemExit("error: %s" % exc) from None
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    if args.action == "add":
        good, bad = _checked(args.addresses)
    else:
        good, bad = _checked(_read_file(args.file))
    _report_bad(bad)
    added = 0
    for address in good:
        added += len(
            db.run(
                conn,
                "suppress",
                email=address,
                reason=args.reason,
                source="cli",
                job_id=None,
                detail=args.detail,
                expires_at=expires,
            )
        )
    print("added %d (%d already there, %d refused)" % (added, len(good) - added, len(bad)))


def _json_value(value: object) -> str:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def _checked(values: Iterable[str]) -> tuple[list[str], list[str]]:
    """(lower-cased good addresses, once each, in order; lines for the bad ones)."""
    good: list[str] = []
    bad = []
    for number, value in enumerate(values, 1):
        try:
            address = addresses.parse_recipient(value, "address", True).address.lower()
        except addresses.BadAddress as exc:
            bad.append("line %d: %s" % (number, exc) if value is not None else str(exc))
            continue
        if address not in good:
            good.append(address)
    return good, bad


def _report_bad(bad: list[str]) -> None:
    for line in bad:
        sys.stderr.write("refused: %s\n" % line)


def _read_file(path: str) -> list[str]:
    """The addresses of a file: one a line, or a CSV whose header has `email`."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit("error: cannot read %s: %s" % (path, exc)) from None
    lines = text.splitlines()
    header = [cell.strip().lower() for cell in next(csv.reader([lines[0]]))] if lines else []
    if "email" in header:
        rows = list(csv.reader(io.StringIO(text)))
        column = header.index("email")
        return [row[column] if len(row) > column else "" for row in rows[1:] if any(row)]
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
