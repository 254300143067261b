"""Checking what becomes a header: addresses, the subject, display names.

This Python's `email` package predates the fixes for CVE-2024-6923 (header
injection through encoded words) and CVE-2023-27043 (parseaddr misreading
`alice@example.org(<bob@example.org>`), so nothing reaches a header unchecked:
addresses go through email-validator (no DNS), text through check_header_text.
"""

import functools
import re
from dataclasses import dataclass
from email.utils import parseaddr

from email_validator import EmailNotValidError, validate_email

# Control characters, and the Unicode line breaks that str.splitlines() honours.
_FORBIDDEN_IN_HEADER = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
# The start of an RFC 2047 encoded word, e.g. =?UTF-8?Q?...?= (CVE-2024-6923).
_ENCODED_WORD = re.compile(r"=\?[^?]*\?[bBqQ]\?")
MAX_SUBJECT_CHARS = 500


class BadAddress(ValueError):
    """An address that cannot be sent to; the message says why."""


class BadHeader(ValueError):
    """Text that cannot go into a header; the message says why."""


@dataclass(frozen=True)
class Address:
    address: str     # as it goes on the wire (ASCII where it can be)
    domain: str      # ASCII (IDNA) form of the domain
    smtputf8: bool   # the local part is not ASCII: needs a server with SMTPUTF8


def parse_recipient(value):
    """One bare address, e.g. 'someone@example.com'; raise BadAddress otherwise."""
    if value is None:
        raise BadAddress("email is NULL: no recipient")
    text = value.strip(" \t")
    if not text:
        raise BadAddress("email is empty: no recipient")
    if _FORBIDDEN_IN_HEADER.search(text):
        raise BadAddress("email %s contains a line break or control character"
                         % _shown(text))
    local, _, domain = text.rpartition("@")
    if _PLAIN_LOCAL_PART.match(local) and domain.isascii():
        # The common case, checked faster: a plain ASCII local part, and a domain
        # that email-validator already accepted once (domains repeat).
        ascii_domain = _valid_ascii_domain(domain.lower())
        if ascii_domain and len(local) + 1 + len(ascii_domain) <= 254:
            return Address(local + "@" + ascii_domain, ascii_domain, False)
    try:
        checked = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise BadAddress("email %s is not a valid address: %s" % (_shown(text), exc)) from None
    if checked.smtputf8:
        return Address(checked.normalized, checked.ascii_domain, True)
    return Address(checked.ascii_email, checked.ascii_domain, False)


# A local part email-validator accepts as it is: dot-separated runs of these.
_PLAIN_LOCAL_PART = re.compile(r"(?=.{1,64}\Z)[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*\Z")


@functools.lru_cache(maxsize=4096)
def _valid_ascii_domain(domain):
    """email-validator's ASCII form of `domain`, or None if it refuses it."""
    try:
        return validate_email("postmaster@" + domain, check_deliverability=False).ascii_domain
    except EmailNotValidError:
        return None


def parse_sender(value):
    """'Name <address>' or a bare address -> (display name, Address)."""
    check_header_text(value, "sender")
    name, address = parseaddr(value)
    # parseaddr is lenient (CVE-2023-27043): accept only what it reads back exactly.
    rebuilt = "%s <%s>" % (name, address) if name else address
    if not address or " ".join(value.split()) not in (rebuilt, "<%s>" % address):
        raise BadAddress("%r is not of the form 'Name <address@example.com>'" % value)
    return name, parse_recipient(address)


def check_header_text(value, what):
    """Raise BadHeader if `value` could break out of its header."""
    if _FORBIDDEN_IN_HEADER.search(value):
        raise BadHeader("%s contains a line break or control character" % what)
    if _ENCODED_WORD.search(value):
        raise BadHeader("%s contains an RFC 2047 encoded word (=?charset?...?=), "
                        "which could inject headers" % what)
    if len(value) > MAX_SUBJECT_CHARS:
        raise BadHeader("%s is %d characters long; at most %d are allowed"
                        % (what, len(value), MAX_SUBJECT_CHARS))
    return value


def _shown(text, limit=80):
    """The value for an error message: printable, and short."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"
