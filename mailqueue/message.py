"""Building a job's mail: the bytes the SMTP server receives (mailqueue.smtp sends them).

Composer.build() turns a job into the bytes of a text/plain UTF-8 mail. It writes
the few headers itself, each value checked (mailqueue.addresses) and encoded
here, which is several times cheaper than EmailMessage and leaves nothing to the
header folding of this Python's `email` package.
"""

import binascii
import re
import time
from dataclasses import dataclass
from email.utils import formataddr, formatdate

from mailqueue import addresses

_FORBIDDEN_IN_BODY = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")


class BadMail(ValueError):
    """The job's data cannot make a mail (bad address, header injection...)."""


@dataclass(frozen=True)
class Mail:
    job_id: int
    sender: str          # envelope sender
    recipients: tuple    # envelope recipients (To, Cc and Bcc)
    smtputf8: bool       # an address needs SMTPUTF8
    data: bytes          # the whole message, CRLF line ends


class Composer:
    """Everything about the mail that comes from the configuration, worked out once."""

    def __init__(self, smtp_settings):
        name, sender = addresses.parse_sender(smtp_settings.sender)
        if sender.smtputf8:
            raise addresses.BadAddress("the sender's address must be ASCII")
        self.envelope_sender = sender.address
        self.domain = sender.domain
        from_header = formataddr((name, sender.address), charset="utf-8")
        self.from_line = ("From: %s\r\n" % from_header).encode("ascii")
        self.default_subject = smtp_settings.subject

    def build(self, job, attachments=()):
        """The mail for one job (a mapping of its `jobs` columns), or BadMail
        naming what is wrong with it."""
        job_id, email, subject = job["job_id"], job["email"], job["subject"]
        body, created_at = job["content_message"], job["created_at"]
        try:
            recipient = addresses.parse_recipient(email)
            subject_text = self.default_subject if not subject else subject
            addresses.check_header_text(subject_text, "subject")
        except (addresses.BadAddress, addresses.BadHeader) as exc:
            raise BadMail(str(exc)) from None
        if body is None:
            raise BadMail("content_message is NULL: nothing to send")
        if not body.strip():
            raise BadMail("content_message is empty: nothing to send")
        if _FORBIDDEN_IN_BODY.search(body):
            raise BadMail("content_message contains a NUL or other control character")

        subject_header = encode_header_text(subject_text)
        # Stable per job: a repeated send of the same job carries the same Message-ID.
        message_id = "<%d.%d@%s>" % (job_id, int(created_at.timestamp() * 1e6), self.domain)
        head = "".join((
            "To: %s\r\n" % recipient.address,
            "Subject: %s\r\n" % subject_header,
            "Date: %s\r\n" % _date_now(),
            "Message-ID: %s\r\n" % message_id,
            "MIME-Version: 1.0\r\n",
            'Content-Type: text/plain; charset="utf-8"\r\n',
            "Content-Transfer-Encoding: base64\r\n\r\n",
        ))
        if "\r" in body:
            body = body.replace("\r\n", "\n").replace("\r", "\n")
        encoded = _base64_lines(body.replace("\n", "\r\n").encode("utf-8"))
        return Mail(job_id, self.envelope_sender, (recipient.address,), recipient.smtputf8,
                    self.from_line + head.encode("utf-8") + encoded)


def _base64_lines(data):
    """`data` in base64, in lines of 76 characters ending in CRLF (RFC 2045 6.8)."""
    encoded = binascii.b2a_base64(data, newline=False)
    return b"\r\n".join([encoded[i:i + 76] for i in range(0, len(encoded), 76)]) + b"\r\n"


def encode_header_text(text):
    """ASCII as it is; anything else as RFC 2047 base64 encoded words (at most 75
    characters each, never splitting a character), one per folded line."""
    if text.isascii():
        return text
    raw = text.encode("utf-8")
    if len(raw) <= _WORD_BYTES:  # the usual subject: one word
        return _encoded_word(raw)
    words, chunk, size = [], [], 0
    for char in text:
        length = len(char.encode("utf-8"))
        if size + length > _WORD_BYTES:
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(char)
        size += length
    words.append("".join(chunk))
    return "\r\n ".join(_encoded_word(w.encode("utf-8")) for w in words)


def _encoded_word(raw):
    """UTF-8 bytes as one RFC 2047 base64 encoded word."""
    return "=?utf-8?b?%s?=" % binascii.b2a_base64(raw, newline=False).decode("ascii")


_WORD_BYTES = 42  # 56 characters of base64 + 12 of =?utf-8?b??= : lines stay within 78
_date_cache = [0, ""]


def _date_now():
    """The Date header's value, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return _date_cache[1]
