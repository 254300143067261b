"""python -m mailqueue bounces --maildir PATH | --imap imaps://user@host/INBOX:
read the bounce mailbox back into the database.

- DSNs (RFC 3464, multipart/report; report-type=delivery-status): a recipient
  with Action failed and a 5.x.x Status is suppressed as hard_bounce (source
  dsn; but 5.7.x, a policy refusal, is the sender's problem and suppresses no
  one) and the job, when that recipient is its `email`, goes completed -> bounced.
  4.x.x and delayed are recorded, nothing else.
- ARF reports (RFC 5965, report-type=feedback-report): the recipient is
  suppressed as complaint (source arf).
- The job is found by the VERP address our mail was sent from (smtp.return_path:
  bounces+<job_id>-<tag>@domain, the tag an HMAC under MAILQUEUE_SECRET) in the
  headers of the report or of the returned message; without one, by the returned
  Message-ID (<job_id>.<created_at in microseconds>@domain, checked against the
  job). A bad tag, or no job, is counted and left alone.

Parsing is the standard library's `email`, which reads message/delivery-status
into its per-recipient blocks. Each report's events and their effects are one
statement (record_mail_event), keyed by the SHA-256 of the message: reading the
same mailbox twice changes nothing. One line per message at most, a summary at
the end; no address is printed.
"""

from __future__ import annotations

import collections
import email
import email.message
import email.policy
import hashlib
import imaplib
import logging
import mailbox
import os
import re
import signal
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailqueue import db, tokens
from mailqueue.suppressions import bare_address

if TYPE_CHECKING:
    import argparse
    from collections.abc import Container, Iterator

    from psycopg2.extensions import connection

    from mailqueue.config import Config

log = logging.getLogger("bounces")

IMAP_PASSWORD_ENV = "MAILQUEUE_IMAP_PASSWORD"
_POLICY = email.policy.compat32  # lenient with the odd headers of bounces


# ---------------------------------------------------------------- reading a report


@dataclass(frozen=True)
class Recipient:
    address: str  # lower-cased; '' when the report names none we can read
    action: str  # failed, delayed, delivered, relayed, expanded; complaint for ARF
    status: str | None  # the enhanced status code, e.g. 5.1.1
    detail: str | None  # Diagnostic-Code, or the ARF Feedback-Type


@dataclass
class Report:
    kind: str  # dsn or arf
    recipients: list[Recipient]
    returned: email.message.Message | None  # the returned message, or its headers
    reporter: str | None = None  # Reporting-MTA, or the ARF User-Agent


_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def _field(block: email.message.Message, name: str) -> str | None:
    value = block.get(name)
    if value is None:
        return None
    return " ".join(str(value).split()) or None


def _typed_address(value: str | None) -> str:
    """'rfc822; Someone@Example.com' -> 'someone@example.com'; '' if unreadable."""
    if not value:
        return ""
    kind, _, address = value.partition(";")
    if not address:
        address, kind = kind, "rfc822"
    if kind.strip().lower() != "rfc822":
        return ""
    return bare_address(address.strip().strip("<>")) or ""


def _blocks(part: email.message.Message) -> list[email.message.Message]:
    """The field blocks of a message/delivery-status or message/feedback-report."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, email.message.Message)]
    if isinstance(payload, str):  # parsed as text: read the blocks ourselves
        text = payload.replace("\r\n", "\n")
        return [email.message_from_string(b.strip() + "\n") for b in text.split("\n\n") if b]
    return []


def _returned(part: email.message.Message) -> email.message.Message | None:
    payload = part.get_payload()
    if part.get_content_type() == "message/rfc822":
        if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
            return payload[0]
        return None
    # text/rfc822-headers: the headers alone, as text
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes) or not raw:
        return None
    return email.message_from_bytes(raw.lstrip(), policy=_POLICY)


def parse(raw: bytes) -> Report | None:
    """The report in a message, or None when it is neither a DSN nor an ARF report."""
    message = email.message_from_bytes(raw, policy=_POLICY)
    if message.get_content_type() != "multipart/report":
        return None
    report_type = str(message.get_param("report-type") or "").lower()
    payload = message.get_payload()
    if not isinstance(payload, list):
        return None
    parts = [p for p in payload if isinstance(p, email.message.Message)]
    returned = None
    for part in parts[1:]:
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            returned = _returned(part)
    if report_type == "delivery-status":
        status_part = next(
            (p for p in parts if p.get_content_type() == "message/delivery-status"), None
        )
        if status_part is None:
            return None
        blocks = _blocks(status_part)
        if not blocks:
            return None
        recipients = []
        for block in blocks[1:]:
            action = (_field(block, "Action") or "").lower()
            status = _STATUS.search(_field(block, "Status") or "")
            address = _typed_address(_field(block, "Original-Recipient")) or _typed_address(
                _field(block, "Final-Recipient")
            )
            if not action:
                continue
            recipients.append(
                Recipient(
                    address,
                    action,
                    status.group(0) if status else None,
                    _field(block, "Diagnostic-Code"),
                )
            )
        if not recipients:
            return None
        return Report("dsn", recipients, returned, _field(blocks[0], "Reporting-MTA"))
    if report_type == "feedback-report":
        feedback_part = next(
            (p for p in parts if p.get_content_type() == "message/feedback-report"), None
        )
        if feedback_part is None:
            return None
        blocks = _blocks(feedback_part)
        fields = blocks[0] if blocks else email.message.Message()
        address = _typed_address(_field(fields, "Original-Rcpt-To"))
        feedback = _field(fields, "Feedback-Type") or "abuse"
        return Report(
            "arf",
            [Recipient(address, "complaint", None, "feedback-type: %s" % feedback)],
            returned,
            _field(fields, "User-Agent"),
        )
    return None


# ---------------------------------------------------------------- finding the job


@dataclass(frozen=True)
class Reference:
    job_id: int | None
    how: str  # verp, message-id, forged, none


_MESSAGE_ID = re.compile(r"<([0-9]{1,10})\.([0-9]{1,20})@[^>\s]+>")
_VERP_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")


def reference(
    raw: bytes, report: Report, return_path: str | None, secret: bytes | None
) -> Reference:
    """Which job the report is about, and how we know (from the headers only)."""
    if return_path and secret:
        pattern = tokens.verp_pattern(return_path)
        head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
        outer = email.message_from_bytes(head, policy=_POLICY)
        texts = [str(v) for name in _VERP_HEADERS for v in outer.get_all(name) or []]
        if report.returned is not None:
            texts += [str(v) for v in report.returned.get_all("Return-Path") or []]
        forged = None
        for text in texts:
            for job_text, tag in pattern.findall(text):
                match = tokens.check_verp(secret, job_text, tag)
                if match.genuine:
                    return Reference(match.job_id, "verp")
                forged = match.job_id
        if forged is not None:
            return Reference(forged, "forged")
    if report.returned is not None:
        found = _MESSAGE_ID.search(str(report.returned.get("Message-ID") or ""))
        if found:
            return Reference(int(found.group(1)), "message-id:%s" % found.group(2))
    return Reference(None, "none")


def _message_id_micros(created_at: Any) -> str:
    """The microseconds Composer writes in a job's Message-ID."""
    return "%d" % int(created_at.timestamp() * 1e6)


# ---------------------------------------------------------------- recording


@dataclass
class Tally:
    messages: int = 0
    recorded: int = 0
    suppressed: int = 0
    bounced: int = 0
    already: int = 0
    unmatched: int = 0
    forged: int = 0
    not_reports: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)

    def summary(self) -> str:
        return (
            "%d message(s): %d report(s) recorded (%s), %d address(es) suppressed, "
            "%d job(s) bounced; %d already read, %d matching no job, %d with a forged tag, "
            "%d not a bounce or complaint"
            % (
                self.messages,
                self.recorded,
                ", ".join("%s %d" % kv for kv in sorted(self.kinds.items())) or "none",
                self.suppressed,
                self.bounced,
                self.already,
                self.unmatched,
                self.forged,
                self.not_reports,
            )
        )


def _effects(recipient: Recipient, kind: str, job: dict[str, Any]) -> tuple[str | None, bool, str]:
    """(suppression reason or None, bounce the job?, the address to record)."""
    values = [job["email"]] + list(job["cc"] or []) + list(job["bcc"] or [])
    own = [a for a in (bare_address(v) for v in values) if a]
    address = recipient.address
    if address not in own:
        # a forwarded or aliased address: the job's own when it has only one
        address = own[0] if len(own) == 1 else ""
    if kind == "arf":
        return ("complaint" if address else None), False, address
    permanent = recipient.action == "failed" and (recipient.status or "").startswith("5.")
    if not permanent or not address:
        return None, False, address
    policy = (recipient.status or "").startswith("5.7.")
    bounce = address == bare_address(job["email"])
    return (None if policy else "hard_bounce"), bounce, address


def record(conn: connection, raw: bytes, config: Config, tally: Tally) -> tuple[bool, str]:
    """Read one message and record what it says; (done with it?, its line)."""
    tally.messages += 1
    try:
        report = parse(raw)
    except Exception as exc:  # a stranger's bytes: never a traceback
        tally.not_reports += 1
        return False, "cannot be read (%s): left alone" % type(exc).__name__
    if report is None:
        tally.not_reports += 1
        return False, "not a delivery status notification or a feedback report: left alone"
    found = reference(raw, report, config.smtp.return_path, config.secret)
    if found.how == "forged":
        tally.forged += 1
        return False, "%s naming job %s with a forged tag: left alone" % (
            report.kind.upper(),
            found.job_id,
        )
    rows = db.run_dicts(conn, "job_for_report", job_id=found.job_id) if found.job_id else []
    if rows and found.how.startswith("message-id:"):
        if _message_id_micros(rows[0]["created_at"]) != found.how.split(":", 1)[1]:
            rows = []
    if not rows:
        tally.unmatched += 1
        return False, "%s matching no job: left alone" % report.kind.upper()
    job = rows[0]
    key = "sha256:" + hashlib.sha256(raw).hexdigest()
    source = report.kind
    words = []
    new = False
    for recipient in report.recipients:
        suppress, bounce, address = _effects(recipient, report.kind, job)
        kind = "complaint" if report.kind == "arf" else recipient.action
        if kind not in ("failed", "delayed", "delivered", "relayed", "expanded", "complaint"):
            continue
        detail = (
            " ".join(
                x
                for x in (
                    recipient.status,
                    recipient.detail,
                    report.reporter and "(%s)" % report.reporter,
                )
                if x
            )[:1000]
            or None
        )
        [result] = db.run_dicts(
            conn,
            "record_mail_event",
            key=key,
            recipient=address,
            kind=kind,
            status=recipient.status,
            source=source,
            job_id=job["job_id"],
            detail=detail,
            suppress=suppress,
            bounce=bounce,
            error="bounced after it was sent: %s" % (detail or "no detail"),
        )
        if result["recorded"]:
            new = True
            tally.kinds[kind] += 1
            tally.suppressed += result["suppressed"]
            tally.bounced += result["bounced"]
            words.append(
                "%s%s%s%s"
                % (
                    kind,
                    " %s" % recipient.status if recipient.status else "",
                    ", suppressed" if result["suppressed"] else "",
                    ", job bounced" if result["bounced"] else "",
                )
            )
    if not new:
        tally.already += 1
        return True, "%s for job %d: already read" % (report.kind.upper(), job["job_id"])
    tally.recorded += 1
    return True, "%s for job %d (by %s): %s" % (
        report.kind.upper(),
        job["job_id"],
        found.how.split(":")[0],
        "; ".join(words) or "nothing to record",
    )


# ---------------------------------------------------------------- mailboxes


class Maildir:
    """A Maildir (new/ and cur/); --move-to names a Maildir++ folder of it."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(os.path.join(path, "cur")) and not os.path.isdir(
            os.path.join(path, "new")
        ):
            raise SystemExit("error: %s is not a Maildir (no cur/ or new/)" % path)
        self.box = mailbox.Maildir(path, factory=None, create=False)

    def messages(self, skip: Container[str]) -> Iterator[tuple[str, bytes]]:
        for key in sorted(self.box.iterkeys()):
            if key in skip:
                continue
            try:
                yield key, self.box.get_bytes(key)
            except KeyError:  # gone meanwhile
                continue

    def delete(self, key: str) -> None:
        self.box.discard(key)

    def move(self, key: str, folder: str) -> None:
        try:
            target = self.box.get_folder(folder)
        except mailbox.NoSuchMailboxError:
            target = self.box.add_folder(folder)
        target.add(self.box.get_bytes(key))
        self.box.discard(key)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.box.close()


class Imap:
    """An IMAP folder over TLS (imaps://user@host[:port]/FOLDER), the password in
    MAILQUEUE_IMAP_PASSWORD, the certificate and host name verified."""

    def __init__(self, url: str, ca_file: str | None, environ: Any = os.environ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "imaps" or not parsed.hostname or not parsed.username:
            raise SystemExit(
                "error: --imap wants imaps://user@host[:port]/FOLDER (TLS from the start)"
            )
        if parsed.password:
            raise SystemExit(
                "error: put the IMAP password in %s, not in the URL" % IMAP_PASSWORD_ENV
            )
        password = environ.get(IMAP_PASSWORD_ENV)
        if not password:
            raise SystemExit("error: set %s to the IMAP password" % IMAP_PASSWORD_ENV)
        self.folder = urllib.parse.unquote(parsed.path.lstrip("/")) or "INBOX"
        context = ssl.create_default_context(cafile=ca_file)
        where = "%s:%d" % (parsed.hostname, parsed.port or 993)
        try:
            self.conn = imaplib.IMAP4_SSL(
                parsed.hostname, parsed.port or 993, ssl_context=context, timeout=30
            )
        except (OSError, imaplib.IMAP4.error) as exc:
            raise SystemExit("error: cannot connect to IMAP %s: %s" % (where, exc)) from None
        # AUTHENTICATE PLAIN in UTF-8: imaplib's LOGIN cannot send a non-ASCII password
        plain = "\0%s\0%s" % (urllib.parse.unquote(parsed.username), password)
        try:
            self.conn.authenticate("PLAIN", lambda _: plain.encode("utf-8"))
        except imaplib.IMAP4.error:
            raise SystemExit("error: IMAP %s refused the login" % where) from None
        status, _ = self.conn.select(_quoted(self.folder))
        if status != "OK":
            raise SystemExit("error: IMAP %s has no folder %s" % (where, self.folder))
        self.expunge = False

    def messages(self, skip: Container[str]) -> Iterator[tuple[str, bytes]]:
        self.conn.noop()
        status, data = self.conn.uid("SEARCH", "UNDELETED")
        for uid in (data[0] or b"").split() if status == "OK" else []:
            if uid.decode() in skip:
                continue
            status, fetched = self.conn.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
            for item in fetched if status == "OK" else []:
                if isinstance(item, tuple):
                    yield uid.decode(), item[1]

    def delete(self, uid: str) -> None:
        self.conn.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
        self.expunge = True

    def move(self, uid: str, folder: str) -> None:
        self.conn.create(_quoted(folder))  # NO when it exists: fine
        status, _ = self.conn.uid("MOVE", uid, _quoted(folder))
        if status != "OK":
            self.conn.uid("COPY", uid, _quoted(folder))
            self.delete(uid)

    def finish(self) -> None:
        if self.expunge:
            self.conn.expunge()
            self.expunge = False

    def close(self) -> None:
        try:
            self.conn.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


def _quoted(name: str) -> str:
    return '"%s"' % name.replace("\\", "\\\\").replace('"', '\\"')


# ---------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--maildir", metavar="PATH", help="a Maildir the bounces are delivered to")
    where.add_argument(
        "--imap",
        metavar="URL",
        help="imaps://user@host[:port]/FOLDER (password in %s)" % IMAP_PASSWORD_ENV,
    )
    parser.add_argument("--ca-file", help="a PEM file of an extra CA to trust for IMAP")
    after = parser.add_mutually_exclusive_group()
    after.add_argument("--delete", action="store_true", help="delete each message recorded")
    after.add_argument("--move-to", metavar="FOLDER", help="move each message recorded there")
    parser.add_argument("--once", action="store_true", help="read once and exit")
    parser.add_argument(
        "--interval", type=float, default=60.0, help="seconds between reads (default 60)"
    )


def read_once(
    box: Maildir | Imap, conn: connection, config: Config, args: Any, seen: set[str]
) -> Tally:
    """Read every message not in `seen` (the ones this process has read already:
    watching, a message left alone is not read and printed again), and add them."""
    tally = Tally()
    for ref, raw in list(box.messages(seen)):
        seen.add(ref)
        done, line = record(conn, raw, config, tally)
        print("%s: %s" % (ref, line), flush=True)
        if done and args.delete:
            box.delete(ref)
        elif done and args.move_to:
            box.move(ref, args.move_to)
    box.finish()
    return tally


def run(args: argparse.Namespace, config: Config, conn: connection) -> None:
    box: Maildir | Imap = Maildir(args.maildir) if args.maildir else Imap(args.imap, args.ca_file)
    stop = threading.Event()
    seen: set[str] = set()
    if not args.once:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    try:
        while True:
            try:
                tally = read_once(box, conn, config, args, seen)
            except (OSError, imaplib.IMAP4.error) as exc:
                # one line; a supervisor (systemd Restart=) starts it again
                raise SystemExit(
                    "error: lost the mailbox: %s" % (exc or type(exc).__name__)
                ) from None
            if args.once or tally.messages:  # watching: silent while nothing comes
                print(tally.summary(), flush=True)
            if args.once or stop.wait(args.interval):
                return
    finally:
        box.close()
