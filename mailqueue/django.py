"""mailqueue.django.EmailBackend: Django's mail goes into the queue.

    EMAIL_BACKEND = "mailqueue.django.EmailBackend"          # Django 4.2 to 6.x
    MAILERS = {"default": {"BACKEND": "mailqueue.django.EmailBackend",
                           "OPTIONS": {"database": "default"}}}  # Django 6.1+

send_messages() turns each EmailMessage / EmailMultiAlternatives into jobs
through mailqueue.enqueue's checks, on the Django database connection named by
the `database` option (default "default"), inside the caller's transaction: a
view that rolls back queues nothing. It returns the number of messages queued.

A job has one To address, so a message becomes (docs/python.md):
  - one job per To address, each showing only its own address in To;
  - the Cc addresses in the first job's Cc header (they see its To address
    and each other, as Cc is meant), and the Bcc addresses in the first job's
    envelope only: nobody sees a Bcc address;
  - with no To address the first Cc address stands in as the To of that job;
    with neither, each Bcc address gets a job of its own (To: itself).
Each address, compared without case or display name, gets exactly one copy.
Display names in To are dropped (the queue's `email` column is a bare address).
"""

from __future__ import annotations

import email.message
import email.utils
import mimetypes
from typing import Any

from django.core.mail.backends.base import BaseEmailBackend
from django.db import connections

from mailqueue import addresses, enqueuing


class EmailBackend(BaseEmailBackend):
    """Options (EMAIL_BACKEND: get_connection(...) keywords; MAILERS: OPTIONS):
    database: the alias of the Django database the queue's tables are in;
    allow_local_domains: accept intranet domains, as the consumer's
    smtp.allow_local_domains does."""

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        database: str = "default",
        allow_local_domains: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # Django 6.1's alias; unknown options are reported there
        self.fail_silently = fail_silently
        self.database = database
        self.allow_local_domains = allow_local_domains

    def send_messages(self, email_messages: Any) -> int:
        """Queue each message (as its jobs); how many messages were queued. A
        message the consumer would refuse raises ValueError, or with
        fail_silently is left out; nothing is written until all are checked."""
        checked: list[enqueuing.CheckedMail] = []
        queued = 0
        for message in email_messages or ():
            try:
                mails = [
                    enqueuing.check(allow_local_domains=self.allow_local_domains, **mail)
                    for mail in mails_of(message)
                ]
            except ValueError:
                if not self.fail_silently:
                    raise
                continue
            checked += mails
            queued += bool(mails)
        if not checked:
            return 0
        try:
            with connections[self.database].cursor() as cursor:
                enqueuing.write(cursor, checked)
        except Exception:
            if not self.fail_silently:
                raise
            return 0
        return queued


def mails_of(message: Any) -> list[dict[str, Any]]:
    """A Django EmailMessage as enqueue's keyword arguments, one dict per job
    (see the module's docstring for how its recipients are spread)."""
    headers = {str(name): str(value) for name, value in (message.extra_headers or {}).items()}
    sender = message.from_email
    reply_to = list(message.reply_to or ())
    for name in list(headers):
        if name.lower() == "from":
            sender = headers.pop(name)
        elif name.lower() == "reply-to":
            reply_to = [headers.pop(name)]
    if len(reply_to) > 1:
        raise ValueError(
            "reply_to: the queue sends one Reply-To address; this message has %d" % len(reply_to)
        )
    text = str(message.body) if message.body else None
    html = None
    if getattr(message, "content_subtype", "plain") == "html":
        text, html = None, text
    for content, mimetype in getattr(message, "alternatives", None) or ():
        if mimetype == "text/html" and html is None:
            html = str(content)
        else:
            raise ValueError(
                "alternatives: a %s alternative cannot be queued (one text/html only)" % mimetype
            )
    common = dict(
        subject=str(message.subject) if message.subject else None,
        text=text,
        html=html,
        sender=str(sender) if sender else None,
        reply_to=str(reply_to[0]) if reply_to else None,
        headers=headers or None,
        attachments=[
            attachment_of(item, number, message.encoding)
            for number, item in enumerate(message.attachments, 1)
        ],
    )
    seen: set[str] = set()
    to = [bare for bare in (_bare(a, "to", seen) for a in message.to) if bare]
    cc = [a for a in message.cc if _bare(a, "cc", seen)]
    bcc = [a for a in message.bcc if _bare(a, "bcc", seen)]
    if not to and cc:
        to = [_address_of(cc.pop(0), "cc")]
    if not to:  # Bcc only: each its own job, so that no Bcc address shows
        return [dict(common, to=_address_of(a, "bcc")) for a in bcc]
    first = dict(common, to=to[0], cc=cc, bcc=bcc)
    return [first] + [dict(common, to=address) for address in to[1:]]


def _address_of(value: str, what: str) -> str:
    return addresses.parse_mailbox(str(value), what)[1].address


def _bare(value: Any, what: str, seen: set[str]) -> str | None:
    """`value`'s bare address, or None if an earlier recipient had it."""
    address = email.utils.parseaddr(str(value))[1] or str(value)
    key = address.lower()
    if key in seen:
        return None
    seen.add(key)
    return _address_of(value, what) if what == "to" else address


def attachment_of(item: Any, number: int, encoding: str | None) -> tuple[Any, ...]:
    """A Django attachment (a (filename, content, mimetype) tuple, or a MIME
    part: MIMEBase, or MIMEPart on Django 6) as enqueue's attachment tuple; a
    part with a Content-ID is inline (cid:)."""
    if isinstance(item, email.message.Message):
        content_type = item.get_content_type()
        content_id = item.get("Content-ID")
        content_id = str(content_id).strip().strip("<>") if content_id else None
        filename = item.get_filename() or _name_for(content_id, number, content_type)
        content = item.get_payload(decode=True)
        if content is None:
            raise ValueError("attachment %d: a multipart part cannot be attached" % number)
        return (filename, content, content_type, content_id)
    filename, content, mimetype = item
    mimetype = mimetype or (filename and mimetypes.guess_type(filename)[0])
    mimetype = mimetype or "application/octet-stream"
    if isinstance(content, str):
        charset = encoding or "utf-8"
        content = content.encode(charset)
        if mimetype.startswith("text/") and "charset" not in mimetype:
            mimetype += "; charset=%s" % charset
    return (filename or _name_for(None, number, mimetype), content, mimetype)


def _name_for(content_id: str | None, number: int, content_type: str) -> str:
    """A filename for a part that has none: its Content-ID, or attachment-N."""
    stem = (content_id or "attachment-%d" % number).split("@")[0]
    return stem + (mimetypes.guess_extension(content_type.split(";")[0]) or "")
