"""Building a job's mail: the bytes the SMTP server receives (mailqueue.smtp sends them).

Composer.build() turns a job (and its attachments) into the bytes of a mail. It
writes every header itself, each value checked (mailqueue.addresses) and encoded
here, which is several times cheaper than EmailMessage and leaves nothing to the
header folding of this Python's `email` package. The body is one of

    text/plain                                     content_message alone (the fast path)
    multipart/alternative (text/plain, text/html)  with html_message; the text part is
                                                   derived from the HTML when there is no
                                                   content_message
    multipart/related (that, inline parts...)      attachments with a content_id, and HTML
    multipart/mixed (that, attachments...)         the other attachments

every part in base64, so that each byte of text and files arrives as it was
stored, whatever the relays in between do with long lines, dots or NULs.
"""

from __future__ import annotations

import binascii
import dataclasses
import re
import time
import urllib.parse
from dataclasses import dataclass
from email.utils import formatdate
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

from mailqueue import addresses, signing, tokens

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from mailqueue.config import SmtpSettings

_FORBIDDEN_IN_BODY = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")


class BadMail(ValueError):
    """The job's data cannot make a mail (bad address, header injection...)."""


@dataclass(frozen=True)
class Mail:
    job_id: int
    sender: str  # envelope sender
    recipients: tuple[str, ...]  # envelope recipients (To, Cc and Bcc)
    smtputf8: bool  # an address needs SMTPUTF8
    data: bytes  # the whole message, CRLF line ends


def with_recipients(mail: Mail, recipients: Sequence[str]) -> Mail:
    """The same mail (the same bytes, the same Message-ID) to some of its
    envelope recipients only: those still waiting after an earlier try."""
    wanted = set(recipients)
    return dataclasses.replace(mail, recipients=tuple(r for r in mail.recipients if r in wanted))


class Composer:
    """Everything about the mail that comes from the configuration, worked out once."""

    def __init__(self, smtp_settings: SmtpSettings) -> None:
        self.allow_local = bool(getattr(smtp_settings, "allow_local_domains", False))
        name, sender = addresses.parse_sender(smtp_settings.sender, self.allow_local)
        if sender.smtputf8:
            raise addresses.BadAddress("the sender's address must be ASCII")
        self.envelope_sender = sender.address
        self.domain = sender.domain
        self.from_line = ("From: %s\r\n" % format_mailbox(name, sender.address)).encode("ascii")
        self.default_subject = smtp_settings.subject
        dkim_key = getattr(smtp_settings, "dkim", None)
        self.signer = None if dkim_key is None else signing.Signer(dkim_key)
        # VERP and one-click unsubscribe (config.py copies unsubscribe.url and
        # MAILQUEUE_SECRET into the smtp settings; it refuses either without the secret)
        self.return_path = getattr(smtp_settings, "return_path", None)
        url = getattr(smtp_settings, "unsubscribe_url", None)
        self.unsubscribe_url = None if url is None else url.rstrip("/")
        self.secret = getattr(smtp_settings, "secret", None)
        if (self.return_path or self.unsubscribe_url) and not self.secret:
            raise ValueError("smtp.return_path and unsubscribe.url need MAILQUEUE_SECRET")

    def envelope_sender_for(self, job_id: int, sender: str) -> str:
        """The envelope sender (MAIL FROM) of job `job_id`: with smtp.return_path,
        its VERP address bounces+<job_id>-<tag>@domain, whatever the From; else
        `sender`, the From's address."""
        if self.return_path is None:
            return sender
        return tokens.verp_address(self.secret, self.return_path, job_id)  # type: ignore[arg-type]

    def unsubscribe_lines(self, job_id: int, address: str) -> list[str]:
        """List-Unsubscribe and List-Unsubscribe-Post (RFC 8058) for `address`."""
        if self.unsubscribe_url is None:
            raise BadMail("unsubscribe is true but unsubscribe.url is not set in the configuration")
        token = tokens.unsubscribe_token(self.secret, job_id, address)  # type: ignore[arg-type]
        return [
            "List-Unsubscribe: <%s/%s>\r\n" % (self.unsubscribe_url, token),
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        ]

    def build(self, job: Mapping[str, Any], attachments: Sequence[Mapping[str, Any]] = ()) -> Mail:
        """The mail for one job (a mapping of its `jobs` columns) and its
        `attachments` rows (mappings), or BadMail naming what is wrong."""
        get = job.get
        if (
            not attachments
            and get("html_message") is None
            and get("sender") is None
            and get("reply_to") is None
            and get("cc") is None
            and get("bcc") is None
            and get("headers") is None
            and self.signer is None
            and not get("unsubscribe")
        ):
            return self._plain(job)  # none of the optional columns: the seed's kind of job
        job_id, created_at = job["job_id"], job["created_at"]
        allow_local = self.allow_local
        try:
            recipient = addresses.parse_recipient(job["email"], "email", allow_local)
            subject = job["subject"]
            subject_text = self.default_subject if not subject else subject
            addresses.check_header_text(subject_text, "subject")
            if job.get("sender") is None:
                envelope_sender, domain, from_line = (
                    self.envelope_sender,
                    self.domain,
                    self.from_line,
                )
                smtputf8 = False
            else:
                name, sender = addresses.parse_mailbox(job["sender"], "sender", allow_local)
                envelope_sender, domain, smtputf8 = sender.address, sender.domain, sender.smtputf8
                from_line = ("From: %s\r\n" % format_mailbox(name, sender.address)).encode("utf-8")
            reply_to = job.get("reply_to")
            if reply_to is not None:
                name, address = addresses.parse_mailbox(reply_to, "reply_to", allow_local)
                reply_to = format_mailbox(name, address.address)
            cc = _mailboxes(job.get("cc"), "cc", allow_local)
            bcc = _mailboxes(job.get("bcc"), "bcc", allow_local)
            extra = addresses.check_extra_headers(job.get("headers"))
            if get("unsubscribe") and any(
                name.lower() in ("list-unsubscribe", "list-unsubscribe-post") for name, _ in extra
            ):
                raise addresses.BadHeader(
                    "headers: List-Unsubscribe is written by the queue when unsubscribe is "
                    "true; give one or the other"
                )
        except (addresses.BadAddress, addresses.BadHeader) as exc:
            raise BadMail(str(exc)) from None

        # The envelope: To, Cc, then Bcc, each address once.
        recipients = [recipient.address]
        for _, address in cc + bcc:
            if address.address not in recipients:
                recipients.append(address.address)
        smtputf8 = smtputf8 or recipient.smtputf8 or any(a.smtputf8 for _, a in cc + bcc)

        text, html = job["content_message"], job.get("html_message")
        lines = ["To: %s\r\n" % recipient.address]
        if cc:
            lines.append(
                "Cc: %s\r\n"
                % ",\r\n ".join(format_mailbox(name, address.address) for name, address in cc)
            )
        if reply_to is not None:
            lines.append("Reply-To: %s\r\n" % reply_to)
        # Stable per job: a repeated send of the same job carries the same Message-ID.
        message_id = "<%d.%d@%s>" % (job_id, int(created_at.timestamp() * 1e6), domain)
        lines += [
            "Subject: %s\r\n" % encode_header_text(subject_text),
            "Date: %s\r\n" % _date_now(),
            "Message-ID: %s\r\n" % message_id,
        ]
        lines += ["%s: %s\r\n" % (name, encode_header_text(value)) for name, value in extra]
        if get("unsubscribe"):
            lines += self.unsubscribe_lines(job_id, recipient.address)
        lines.append("MIME-Version: 1.0\r\n")

        if html is None and not attachments:
            # The fast path: plain text, the seed's kind of job.
            _check_body(text, "content_message", required=True)
            lines.append(
                'Content-Type: text/plain; charset="utf-8"\r\n'
                "Content-Transfer-Encoding: base64\r\n\r\n"
            )
            body = _base64_lines(_canonical(text))
        else:
            part = _body_part(
                job_id, text, html, [_attachment(row, i) for i, row in enumerate(attachments, 1)]
            )
            lines.append(part[0] + "\r\n")
            body = part[1]

        data = from_line + "".join(lines).encode("utf-8") + body
        if self.signer is not None:
            try:
                data = self.signer.sign(data) + data
            except signing.SigningError as exc:
                raise BadMail(str(exc)) from None
        return Mail(
            job_id,
            self.envelope_sender_for(job_id, envelope_sender),
            tuple(recipients),
            smtputf8,
            data,
        )

    def _plain(self, job: Mapping[str, Any]) -> Mail:
        """The seed's kind of job (a recipient, a subject, a text), on the
        shortest path: what build() writes for it, without looking at the rest."""
        job_id, body = job["job_id"], job["content_message"]
        try:
            recipient = addresses.parse_recipient(job["email"], "email", self.allow_local)
            subject = job["subject"] or self.default_subject
            addresses.check_header_text(subject, "subject")
        except (addresses.BadAddress, addresses.BadHeader) as exc:
            raise BadMail(str(exc)) from None
        _check_body(body, "content_message", required=True)
        head = "".join(
            (
                "To: %s\r\n" % recipient.address,
                "Subject: %s\r\n" % encode_header_text(subject),
                "Date: %s\r\n" % _date_now(),
                "Message-ID: <%d.%d@%s>\r\n"
                % (job_id, int(job["created_at"].timestamp() * 1e6), self.domain),
                "MIME-Version: 1.0\r\n",
                'Content-Type: text/plain; charset="utf-8"\r\n',
                "Content-Transfer-Encoding: base64\r\n\r\n",
            )
        )
        return Mail(
            job_id,
            self.envelope_sender_for(job_id, self.envelope_sender),
            (recipient.address,),
            recipient.smtputf8,
            self.from_line + head.encode("utf-8") + _base64_lines(_canonical(body)),
        )


# ---------------------------------------------------------------------------
# Addresses in headers
# ---------------------------------------------------------------------------


def _mailboxes(values: object, what: str, allow_local: bool) -> list[tuple[str, addresses.Address]]:
    """A TEXT[] column of addresses -> [(display name, Address)]; NULL or {} is none."""
    if not values:
        return []
    if not isinstance(values, list):
        raise addresses.BadAddress("%s must be an array of addresses" % what)
    return [
        addresses.parse_mailbox(value, "%s[%d]" % (what, i), allow_local)
        for i, value in enumerate(values, 1)
    ]


_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*\Z")


def format_mailbox(name: str, address: str) -> str:
    """`Name <address>` for a header (a bare address without a name): an ASCII
    name as atoms or a quoted string, any other as RFC 2047 encoded words. Both
    were checked by mailqueue.addresses: no line breaks, no encoded words."""
    if not name:
        return address
    if not name.isascii():
        return "%s <%s>" % (encode_header_text(name), address)
    if _ATOM_PHRASE.match(name):
        return "%s <%s>" % (name, address)
    return '"%s" <%s>' % (name.replace("\\", "\\\\").replace('"', '\\"'), address)


# ---------------------------------------------------------------------------
# The body: text, HTML, inline parts and attachments
# ---------------------------------------------------------------------------


def _check_body(value: str | None, column: str, required: bool) -> bool:
    """BadMail if `value` (a text column) cannot be a body; whether there is one."""
    if value is None:
        if required:
            raise BadMail("%s is NULL: nothing to send" % column)
        return False
    if not value.strip():
        if required:
            raise BadMail("%s is empty: nothing to send" % column)
        return False
    if _FORBIDDEN_IN_BODY.search(value):
        raise BadMail("%s contains a NUL or other control character" % column)
    return True


def _body_part(
    job_id: int,
    text: str | None,
    html: str | None,
    files: list[tuple[tuple[str, bytes], str | None]],
) -> tuple[str, bytes]:
    """(headers, body bytes) of the whole MIME body but the plain-text one."""
    has_html = html is not None and _check_body(html, "html_message", required=True)
    if has_html:
        if not _check_body(text, "content_message", required=False):
            text = text_of_html(html)  # type: ignore[arg-type]  # has_html: not None
        body = _multipart(
            job_id,
            "alternative",
            # not None: has_html, and text was checked or derived just above
            [_text_part(text, "plain"), _text_part(html, "html")],  # type: ignore[arg-type]
        )
    else:
        _check_body(text, "content_message", required=True)
        body = _text_part(text, "plain")  # type: ignore[arg-type]  # _check_body raised if None
    ids = [cid for _, cid in files if cid is not None]
    if len(set(ids)) < len(ids):
        raise BadMail("attachments: two inline parts have the same content_id")
    inline = [part for part, cid in files if cid is not None]
    attached = [part for part, cid in files if cid is None]
    if has_html and inline:
        body = _multipart(job_id, "related", [body] + inline, '; type="multipart/alternative"')
    else:
        attached = [part for part, _ in files]  # without HTML nothing refers to a cid:
    if attached:
        body = _multipart(job_id, "mixed", [body] + attached)
    return body


def _text_part(text: str, subtype: str) -> tuple[str, bytes]:
    return (
        'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: base64\r\n' % subtype,
        _base64_lines(_canonical(text)),
    )


def _multipart(
    job_id: int, subtype: str, parts: list[tuple[str, bytes]], parameters: str = ""
) -> tuple[str, bytes]:
    """A multipart of (headers, body) parts. Every part body is base64 and every
    part header starts with a name, so no line of them can begin with "--": any
    boundary is safe, and this one stays the same for each send of the job."""
    boundary = "=_mailqueue_%s_%s" % (job_id, subtype)
    delimiter = ("--%s\r\n" % boundary).encode("ascii")
    chunks = []
    for headers, body in parts:
        chunks += [delimiter, headers.encode("ascii"), b"\r\n", body]
    chunks.append(("--%s--\r\n" % boundary).encode("ascii"))
    return (
        'Content-Type: multipart/%s%s;\r\n boundary="%s"\r\n' % (subtype, parameters, boundary),
        b"".join(chunks),
    )


def _canonical(text: str) -> bytes:
    """Text as MIME's canonical form: UTF-8, lines ending in CRLF."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "\r\n").encode("utf-8")


# type/subtype, and parameters of tokens or quoted strings (RFC 2045 5.1)
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+"
_CONTENT_TYPE = re.compile(
    r"(%s)/(%s)((?:\s*;\s*%s=(?:%s|\"[^\"\\\x00-\x1f\x7f]*\"))*)\s*\Z"
    % (_TOKEN, _TOKEN, _TOKEN, _TOKEN)
)
# What may stand between the < > of a Content-ID: atext, dots and one @ (RFC 2392).
_ID_PART = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
_CONTENT_ID = re.compile(r"%s(?:@%s)?\Z" % (_ID_PART, _ID_PART))
MAX_FILENAME_CHARS = 255


def check_attachment(row: Mapping[str, Any], number: int) -> tuple[str, str, str | None]:
    """One `attachments` row's (filename, content type, content_id without its
    < >, or None), or BadMail naming the attachment and what is wrong. Also what
    mailqueue.enqueue checks before a file is written."""
    what = "attachment %d" % number
    filename = row["filename"]
    if filename is None or not filename.strip():
        raise BadMail("%s: filename is empty" % what)
    shown = addresses._shown(filename)
    if addresses._FORBIDDEN_IN_HEADER.search(filename):
        raise BadMail("%s: filename %s contains a line break or control character" % (what, shown))
    if "/" in filename or "\\" in filename or filename.strip() in (".", ".."):
        raise BadMail("%s: filename %s is a path; give the file's name only" % (what, shown))
    if len(filename) > MAX_FILENAME_CHARS:
        raise BadMail(
            "%s: filename is %d characters long; at most %d are allowed"
            % (what, len(filename), MAX_FILENAME_CHARS)
        )
    content_type = row.get("content_type") or "application/octet-stream"
    matched = _CONTENT_TYPE.match(content_type)
    if not matched:
        raise BadMail(
            "%s: content_type %s is not of the form type/subtype"
            % (what, addresses._shown(content_type))
        )
    if matched.group(1).lower() in ("multipart", "message"):
        raise BadMail(
            "%s: content_type %s is not allowed: the queue builds the message's "
            "structure itself (send it as application/octet-stream)" % (what, content_type)
        )
    content_id = row.get("content_id")
    if content_id is not None:
        cid = content_id[1:-1] if content_id[:1] == "<" and content_id[-1:] == ">" else content_id
        if not _CONTENT_ID.match(cid):
            raise BadMail(
                "%s: content_id %s is not an id such as logo or logo@example.com"
                % (what, addresses._shown(content_id))
            )
        content_id = cid
    return filename, "%s/%s%s" % matched.groups(), content_id


def _attachment(row: Mapping[str, Any], number: int) -> tuple[tuple[str, bytes], str | None]:
    """One `attachments` row -> ((headers, body), content_id or None)."""
    filename, content_type, content_id = check_attachment(row, number)
    headers = "Content-Type: %s;\r\n %s\r\n" % (
        content_type,
        _parameter("name", filename),
    )
    headers += "Content-Disposition: %s;\r\n %s\r\n" % (
        "attachment" if content_id is None else "inline",
        _parameter("filename", filename),
    )
    if content_id is not None:
        headers += "Content-ID: <%s>\r\n" % content_id
    headers += "Content-Transfer-Encoding: base64\r\n"
    return (headers, _base64_lines(bytes(row["content"]))), content_id


_PLAIN_VALUE = re.compile(r"[\x20-\x7e]{1,50}\Z")
_PARAMETER_SAFE = "!#$&+-.^_`|~"  # RFC 2231 attribute-char beyond letters and digits


def _parameter(name: str, value: str) -> str:
    """name="value" for short printable ASCII; otherwise RFC 2231: UTF-8,
    percent-encoded, in continuations of at most 50 characters each (every
    line of the header stays within 78)."""
    if _PLAIN_VALUE.match(value):
        return '%s="%s"' % (name, value.replace("\\", "\\\\").replace('"', '\\"'))
    chunks, chunk = [], ""
    for char in value:  # a character is never split between continuations
        encoded = urllib.parse.quote(char, safe=_PARAMETER_SAFE)
        if len(chunk) + len(encoded) > 50:
            chunks.append(chunk)
            chunk = ""
        chunk += encoded
    chunks.append(chunk)
    if len(chunks) == 1:
        return "%s*=utf-8''%s" % (name, chunks[0])
    return ";\r\n ".join(
        "%s*%d*=%s%s" % (name, i, "utf-8''" if i == 0 else "", chunk)
        for i, chunk in enumerate(chunks)
    )


class _VisibleText(HTMLParser):
    """Collects what a reader sees of an HTML page: its text, with a line break
    where a line-like block ends and a blank line between paragraph-like ones,
    a table's cells on one line, and nothing of <head>, <script>, <style> or
    <template>. Whitespace is
    collapsed as a browser does, except inside <pre>."""

    HIDDEN = frozenset(("head", "title", "script", "style", "template"))
    LINES = frozenset(
        (
            "address",
            "article",
            "aside",
            "br",
            "dd",
            "div",
            "dt",
            "figcaption",
            "figure",
            "footer",
            "form",
            "header",
            "li",
            "main",
            "nav",
            "section",
            "tr",
        )
    )
    PARAGRAPHS = frozenset(
        (
            "blockquote",
            "dl",
            "fieldset",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "hr",
            "ol",
            "p",
            "pre",
            "table",
            "ul",
        )
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hidden = 0
        self.pre = 0
        self.chunks: list[str] = []

    def _break(self, tag: str) -> None:
        if tag in self.PARAGRAPHS:
            self.chunks.append(_PARAGRAPH)
        elif tag in self.LINES:
            self.chunks.append(_LINE)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        else:
            self.pre += tag == "pre"
            self._break(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        else:
            self.pre = max(0, self.pre - (tag == "pre"))
            self._break(tag)
            if tag in ("td", "th"):
                self.chunks.append("\t")  # cells of a row on one line

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.chunks.append(data if self.pre else _WHITESPACE.sub(" ", data))


_LINE, _PARAGRAPH = "\x00", "\x01"  # markers (the HTML was checked to hold neither)
_WHITESPACE = re.compile(r"[ \t\n\r\f\v\u00a0]+")
_BREAKS = re.compile(r"[ \t]*[\x00\x01][\x00\x01 \t]*")


def text_of_html(html: str) -> str:
    """The plain-text part for an HTML-only job: its visible text."""
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    text = _BREAKS.sub(
        lambda m: "\n\n" if _PARAGRAPH in m.group() else "\n",
        "".join(parser.chunks).replace("\r\n", "\n"),
    )
    text = "\n".join(line.rstrip() for line in text.strip("\n ").split("\n"))
    return text + "\n" if text else ""


# ---------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------


def _base64_lines(data: bytes) -> bytes:
    """`data` in base64, in lines of 76 characters ending in CRLF (RFC 2045 6.8)."""
    encoded = binascii.b2a_base64(data, newline=False)
    if len(encoded) > 8192:
        encoded = memoryview(encoded)  # slices without copies: quicker for files
    return b"\r\n".join([encoded[i : i + 76] for i in range(0, len(encoded), 76)]) + b"\r\n"


def encode_header_text(text: str) -> str:
    """ASCII as it is; anything else as RFC 2047 base64 encoded words (at most 75
    characters each, never splitting a character), one per folded line."""
    if text.isascii():
        return text
    raw = text.encode("utf-8")
    if len(raw) <= _WORD_BYTES:  # the usual subject: one word
        return _encoded_word(raw)
    words, chunk, size = [], [], 0  # type: ignore[var-annotated]  # lists of str
    for char in text:
        length = len(char.encode("utf-8"))
        if size + length > _WORD_BYTES:
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(char)
        size += length
    words.append("".join(chunk))
    return "\r\n ".join(_encoded_word(w.encode("utf-8")) for w in words)


def _encoded_word(raw: bytes) -> str:
    """UTF-8 bytes as one RFC 2047 base64 encoded word."""
    return "=?utf-8?b?%s?=" % binascii.b2a_base64(raw, newline=False).decode("ascii")


_WORD_BYTES = 42  # 56 characters of base64 + 12 of =?utf-8?b??= : lines stay within 78
_date_cache: list[Any] = [0, ""]  # [the second, the Date header's value for it]


def _date_now() -> str:
    """The Date header's value, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return _date_cache[1]
