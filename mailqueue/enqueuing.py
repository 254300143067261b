"""mailqueue.enqueue and mailqueue.enqueue_many: mail in from Python.

    job_id = mailqueue.enqueue(conn, "lan@example.com", subject="Hi", text="Hello")

The mail is written as a `jobs` row (and its `attachments` rows) in the
caller's transaction, on the caller's connection: a psycopg2 or psycopg 3
connection or cursor, or a SQLAlchemy Connection (duck-typed: neither psycopg 3
nor SQLAlchemy is needed by this module). Nothing here commits: a rollback
queues nothing, a commit queues the mail (and wakes the producer then).

Every field is checked first, with the code the consumer builds the mail with
(mailqueue.addresses, mailqueue.message), and a ValueError naming the field is
raised before anything is written. Only the application's own columns
(**columns) need a look at the database: the table's column list, read in the
same transaction.
"""

from __future__ import annotations

import datetime
import json
import mimetypes
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mailqueue import addresses, message
from mailqueue.sqlfile import QUERIES

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

# enqueue's parameters and the jobs columns they fill, in the order of the
# enqueue_jobs query's arrays.
COLUMN_OF = {
    "to": "email",
    "subject": "subject",
    "text": "content_message",
    "html": "html_message",
    "sender": "sender",
    "reply_to": "reply_to",
    "cc": "cc",
    "bcc": "bcc",
    "headers": "headers",
    "priority": "priority",
    "run_at": "run_at",
    "expires_at": "expires_at",
    "idempotency_key": "idempotency_key",
    "template": "template",
    "context": "context",
    "locale": "locale",
}
PARAMETER_OF = {column: parameter for parameter, column in COLUMN_OF.items()}
# Columns the queue keeps itself: never given by an application.
MANAGED_COLUMNS = frozenset(
    ("job_id", "status", "start_time", "end_time", "attempts", "last_error", "created_at")
    + ("rendered_at",)
)
_INT4 = 2**31 - 1
_DEFAULT_TYPE = "application/octet-stream"


@dataclass
class CheckedMail:
    """One mail, checked: its jobs columns (the standard ones, as the query's
    arrays take them), the application's own columns, and its files as
    (filename, content_type, content, content_id)."""

    columns: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    files: list[tuple[str, str, bytes, str | None]] = field(default_factory=list)


def enqueue(
    conn: Any,
    to: str,
    *,
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    sender: str | None = None,
    reply_to: str | None = None,
    cc: Iterable[str] = (),
    bcc: Iterable[str] = (),
    headers: Mapping[str, str] | None = None,
    attachments: Iterable[Any] = (),
    priority: int = 0,
    run_at: datetime.datetime | None = None,
    expires_at: datetime.datetime | None = None,
    idempotency_key: str | None = None,
    template: str | None = None,
    context: Mapping[str, Any] | None = None,
    locale: str | None = None,
    allow_local_domains: bool = False,
    **columns: Any,
) -> int | None:
    """Queue one mail to `to` in the caller's transaction; its job_id, or None
    when `idempotency_key` is already queued. ValueError (naming the field)
    before anything is written if the consumer would refuse the mail.

    attachments: (filename, bytes, content_type), (filename, bytes,
    content_type, content_id) for an inline part the HTML shows as cid:ID, or a
    pathlib.Path (its name, and a type guessed from it). **columns: the
    application's own columns of `jobs`. allow_local_domains: accept intranet
    domains, as the consumer's smtp.allow_local_domains does."""
    mail = check(
        to,
        subject=subject,
        text=text,
        html=html,
        sender=sender,
        reply_to=reply_to,
        cc=cc,
        bcc=bcc,
        headers=headers,
        attachments=attachments,
        priority=priority,
        run_at=run_at,
        expires_at=expires_at,
        idempotency_key=idempotency_key,
        template=template,
        context=context,
        locale=locale,
        allow_local_domains=allow_local_domains,
        **columns,
    )
    return write(conn, [mail])[0]


def enqueue_many(
    conn: Any, mails: Iterable[Mapping[str, Any]], *, allow_local_domains: bool = False
) -> list[int | None]:
    """Queue many mails, each a mapping of enqueue's keyword arguments (with
    "to"), in one statement (one per set of **columns used); the job_id of each
    in order, None for one whose idempotency_key was already queued. Every mail
    is checked before any is written: a ValueError says which one (from 0)."""
    checked = []
    for number, mail in enumerate(mails):
        try:
            checked.append(check(allow_local_domains=allow_local_domains, **mail))
        except TypeError as exc:  # an unknown or missing keyword
            raise ValueError("mail %d: %s" % (number, exc)) from None
        except ValueError as exc:
            raise type(exc)("mail %d: %s" % (number, exc)) from None
    return write(conn, checked, numbered=True)


def write(conn: Any, checked: list[CheckedMail], numbered: bool = False) -> list[int | None]:
    """Write checked mails (see check) on `conn`; their job_ids, in order.
    numbered: an error names the mail by its position."""
    if not checked:
        return []
    column_types: dict[str, str] = {}
    if any(mail.extra for mail in checked):
        column_types = dict(_rows(conn, QUERIES["enqueue_job_columns"], None))
        for number, mail in enumerate(checked):
            for name in mail.extra:
                if name not in column_types:
                    raise ValueError(
                        "%s%s: jobs has no such column"
                        % ("mail %d: " % number if numbered else "", name)
                    )
    job_ids: list[int | None] = [None] * len(checked)
    groups: dict[tuple[str, ...], list[int]] = {}
    for position, mail in enumerate(checked):
        groups.setdefault(tuple(sorted(mail.extra)), []).append(position)
    for extra_names, positions in groups.items():
        sql, params = _statement([checked[p] for p in positions], extra_names, column_types)
        for position, (job_id,) in zip(positions, _rows(conn, sql, params)):
            job_ids[position] = job_id
    return job_ids


def check(
    to: str,
    *,
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    sender: str | None = None,
    reply_to: str | None = None,
    cc: Iterable[str] = (),
    bcc: Iterable[str] = (),
    headers: Mapping[str, str] | None = None,
    attachments: Iterable[Any] = (),
    priority: int = 0,
    run_at: datetime.datetime | None = None,
    expires_at: datetime.datetime | None = None,
    idempotency_key: str | None = None,
    template: str | None = None,
    context: Mapping[str, Any] | None = None,
    locale: str | None = None,
    allow_local_domains: bool = False,
    **columns: Any,
) -> CheckedMail:
    """enqueue's arguments checked as the consumer will (ValueError naming the
    field), as the columns and files to write."""
    local = allow_local_domains
    if not isinstance(to, str):
        raise ValueError("to must be one address (a str), not %s" % type(to).__name__)
    addresses.parse_recipient(to, "to", local)
    if subject is not None:
        addresses.check_header_text(_text(subject, "subject"), "subject")
    has_text = message._check_body(_text(text, "text"), "text", required=False)
    has_html = message._check_body(_text(html, "html"), "html", required=False)
    if template is None:
        if not (has_text or has_html):
            raise ValueError("text and html are both empty: nothing to send (or give a template)")
        if context is not None or locale is not None:
            raise ValueError(
                "%s is given without a template" % ("context" if context is not None else "locale")
            )
    else:
        if not _text(template, "template").strip():
            raise ValueError("template is empty")
        _no_nul(template, "template")
        if locale is not None:
            _no_nul(_text(locale, "locale"), "locale")
        if context is not None and not isinstance(context, dict):
            raise ValueError(
                "context must be a dict (a JSON object), not %s" % type(context).__name__
            )
    if sender is not None:
        addresses.parse_mailbox(_text(sender, "sender"), "sender", local)
    if reply_to is not None:
        addresses.parse_mailbox(_text(reply_to, "reply_to"), "reply_to", local)
    cc_list, bcc_list = _address_list(cc, "cc"), _address_list(bcc, "bcc")
    message._mailboxes(cc_list, "cc", local)
    message._mailboxes(bcc_list, "bcc", local)
    if headers is not None:
        addresses.check_extra_headers(dict(headers) if hasattr(headers, "items") else headers)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError("priority must be an int, not %s" % type(priority).__name__)
    if not -_INT4 - 1 <= priority <= _INT4:
        raise ValueError("priority %d is out of range (a 32-bit integer)" % priority)
    for value, what in ((run_at, "run_at"), (expires_at, "expires_at")):
        if value is not None and not isinstance(value, datetime.datetime):
            raise ValueError("%s must be a datetime, not %s" % (what, type(value).__name__))
    if idempotency_key is not None:
        if not _text(idempotency_key, "idempotency_key"):
            raise ValueError("idempotency_key is empty (give None for no key)")
        _no_nul(idempotency_key, "idempotency_key")
    for name in columns:
        if name in PARAMETER_OF or name == "content":
            raise ValueError("%s: give it as %s=" % (name, PARAMETER_OF.get(name, "text")))
        if name in MANAGED_COLUMNS:
            raise ValueError("%s is kept by the queue itself and cannot be given" % name)
    return CheckedMail(
        columns=dict(
            email=to,
            subject=subject,
            content_message=text,
            html_message=html,
            sender=sender,
            reply_to=reply_to,
            cc=_json(cc_list, "cc") if cc_list else None,
            bcc=_json(bcc_list, "bcc") if bcc_list else None,
            headers=_json(dict(headers), "headers") if headers else None,
            priority=priority,
            run_at=run_at,
            expires_at=expires_at,
            idempotency_key=idempotency_key,
            template=template,
            context=_json(dict(context), "context") if context is not None else None,
            locale=locale,
        ),
        extra=columns,
        files=_files(attachments),
    )


def _text(value: Any, what: str) -> Any:
    if value is not None and not isinstance(value, str):
        raise ValueError("%s must be a str, not %s" % (what, type(value).__name__))
    return value


def _no_nul(value: str, what: str) -> None:
    if "\x00" in value:
        raise ValueError("%s contains a NUL character" % what)


def _address_list(values: Any, what: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):  # one address given alone
        values = [values]
    found = list(values)
    for i, value in enumerate(found, 1):
        if not isinstance(value, str):
            raise ValueError("%s[%d] must be a str, not %s" % (what, i, type(value).__name__))
    return found


def _json(value: Any, what: str) -> str:
    """JSON text for a JSONB column: ValueError for what JSON (or PostgreSQL's
    jsonb: no NUL, no NaN) cannot hold."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError("%s cannot be stored as JSON: %s" % (what, exc)) from None
    if "\\u0000" in text:
        raise ValueError("%s contains a NUL character" % what)
    return text


def _files(attachments: Iterable[Any]) -> list[tuple[str, str, bytes, str | None]]:
    """enqueue's attachments -> [(filename, content_type, content, content_id)],
    checked by the consumer's own check (mailqueue.message.check_attachment)."""
    files = []
    ids = set()
    for number, item in enumerate(attachments or (), 1):
        if isinstance(item, os.PathLike):
            path = os.fspath(item)
            filename = os.path.basename(path)
            try:
                with open(path, "rb") as f:
                    content = f.read()
            except OSError as exc:
                raise ValueError(
                    "attachment %d: cannot read %s: %s" % (number, path, exc.strerror)
                ) from None
            content_type = mimetypes.guess_type(filename)[0] or _DEFAULT_TYPE
            content_id = None
        elif isinstance(item, (tuple, list)) and len(item) in (3, 4):
            filename, content, content_type = item[:3]
            content_id = item[3] if len(item) == 4 else None
        else:
            raise ValueError(
                "attachment %d must be (filename, bytes, content_type), "
                "(filename, bytes, content_type, content_id) or a pathlib.Path" % number
            )
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise ValueError(
                "attachment %d: the content must be bytes, not %s"
                % (number, type(content).__name__)
            )
        for value, what in ((filename, "filename"), (content_type, "content_type")):
            if value is not None and not isinstance(value, str):
                raise ValueError("attachment %d: %s must be a str" % (number, what))
        if content_id is not None and not isinstance(content_id, str):
            raise ValueError("attachment %d: content_id must be a str" % number)
        filename, content_type, content_id = message.check_attachment(
            dict(filename=filename, content_type=content_type, content_id=content_id), number
        )
        if content_id is not None:
            if content_id in ids:
                raise ValueError(
                    "attachment %d: content_id %r is given twice" % (number, content_id)
                )
            ids.add(content_id)
        files.append((filename, content_type, bytes(content), content_id))
    return files


def _statement(
    mails: list[CheckedMail], extra_names: tuple[str, ...], column_types: Mapping[str, str]
) -> tuple[str, dict[str, Any]]:
    """The enqueue_jobs query and its arrays for `mails` (all with the same
    application columns, `extra_names`)."""
    params: dict[str, Any] = {column: [m.columns[column] for m in mails] for column in PARAMETER_OF}
    files = [(n, f) for n, mail in enumerate(mails, 1) for f in mail.files]
    params["file_of"] = [n for n, _ in files]
    for i, name in enumerate(("filename", "content_type", "content", "content_id")):
        params[name] = [f[i] for _, f in files]
    for name, values in params.items():
        if name != "content":  # bytea stays a list: the driver sends it as bytes
            params[name] = _array_literal(values)
    sql = QUERIES["enqueue_jobs"]
    if extra_names:
        arrays, names, values = [], [], []
        for i, name in enumerate(extra_names):
            kind = column_types[name]
            key = "extra_%d" % i
            params[key] = _array_literal([_as_text(m.extra[name], kind, name) for m in mails])
            alias = "x_%d" % i
            arrays.append(", %%(%s)s::text[]" % key)
            names.append(", " + alias)
            values.append(", " + _from_text(alias, kind))
        quoted = ", ".join('"%s"' % name.replace('"', '""') for name in extra_names)
        sql = (
            sql.replace("/*extra arrays*/", "".join(arrays))
            .replace("/*extra names*/", "".join(names))
            .replace("/*extra columns*/", ", " + quoted)
            .replace("/*extra values*/", "".join(values))
        )
    return sql, params


def _array_literal(values: list[Any]) -> str:
    """A PostgreSQL array's text form, '{"a","b",NULL}', for values that are
    str, int, datetime or None (each quoted, so any text survives): one string
    for the driver to send, which PostgreSQL's array_in reads far faster than
    psycopg2's ARRAY[...] of one literal per mail (enqueue_many's rate, bench/)."""
    parts = []
    for value in values:
        if value is None:
            parts.append("NULL")
            continue
        if not isinstance(value, str):
            value = value.isoformat() if hasattr(value, "isoformat") else str(value)
        parts.append('"%s"' % value.replace("\\", "\\\\").replace('"', '\\"'))
    return "{%s}" % ",".join(parts)


def _as_text(value: Any, kind: str, name: str) -> str | None:
    """An application column's value as the text PostgreSQL reads it from."""
    if value is None:
        return None
    if kind.endswith("[]") or kind in ("json", "jsonb"):
        return _json(value, name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    text = str(value)
    _no_nul(text, name)
    return text


def _from_text(alias: str, kind: str) -> str:
    """The SQL that reads an application column from its text (see _as_text);
    `kind` is PostgreSQL's own format_type() of the column."""
    if kind.endswith("[]"):
        return (
            "CASE WHEN %s IS NOT NULL THEN ARRAY(SELECT a FROM jsonb_array_elements_text(%s::jsonb)"
            " WITH ORDINALITY AS x(a, i) ORDER BY i)::%s END" % (alias, alias, kind)
        )
    return "%s::%s" % (alias, kind)


def _rows(conn: Any, sql: str, params: Mapping[str, Any] | None) -> list[Any]:
    """Run `sql` on the caller's connection or cursor; its rows."""
    if hasattr(conn, "exec_driver_sql"):  # SQLAlchemy: its transaction, begun if need be
        return list(conn.exec_driver_sql(sql, params or ()).fetchall())
    if hasattr(conn, "fetchall"):  # a cursor (psycopg2, psycopg 3, Django's)
        conn.execute(sql, params)
        return list(conn.fetchall())
    cur = conn.cursor()  # a connection (psycopg2, psycopg 3)
    try:
        cur.execute(sql, params)
        return list(cur.fetchall())
    finally:
        cur.close()
