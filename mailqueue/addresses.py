"""Checking what becomes a header: addresses, the subject, display names.

This Python's `email` package predates the fixes for CVE-2024-6923 (header
injection through encoded words) and CVE-2023-27043 (parseaddr misreading
`alice@example.org(<bob@example.org>`), so nothing reaches a header unchecked:
addresses go through email-validator (no DNS), text through check_header_text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from email.utils import getaddresses, parseaddr
from typing import TYPE_CHECKING

from email_validator import EmailNotValidError, validate_email

if TYPE_CHECKING:
    from email_validator import ValidatedEmail

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
    address: str  # as it goes on the wire (ASCII where it can be)
    domain: str  # ASCII (IDNA) form of the domain
    smtputf8: bool  # the local part is not ASCII: needs a server with SMTPUTF8


def parse_recipient(value: str | None, what: str = "email", allow_local: bool = False) -> Address:
    """One bare address, e.g. 'someone@example.com'; raise BadAddress otherwise.
    `what` names the field in the message; `allow_local` accepts intranet
    domains (corp.local, a single label such as `intranet`: smtp.allow_local_domains)."""
    if value is None:
        raise BadAddress("%s is NULL: no recipient" % what)
    text = value.strip(" \t")
    if not text:
        raise BadAddress("%s is empty: no recipient" % what)
    if _FORBIDDEN_IN_HEADER.search(text):
        raise BadAddress("%s %s contains a line break or control character" % (what, _shown(text)))
    local, _, domain = text.rpartition("@")
    if _PLAIN_LOCAL_PART.match(local) and domain.isascii():
        # The common case, checked faster: a plain ASCII local part, and a domain
        # that email-validator already accepted once (domains repeat).
        ascii_domain = _valid_ascii_domain(domain.lower(), allow_local)
        if ascii_domain and len(local) + 1 + len(ascii_domain) <= MAX_ADDRESS_OCTETS:
            return Address(local + "@" + ascii_domain, ascii_domain, False)
    try:
        checked = _validate(text, allow_local)
    except EmailNotValidError as exc:
        raise BadAddress("%s %s is not a valid address: %s" % (what, _shown(text), exc)) from None
    if checked.smtputf8:
        found = Address(checked.normalized, checked.ascii_domain, True)
    else:
        # ascii_email is None only for an address that needs SMTPUTF8
        found = Address(checked.ascii_email, checked.ascii_domain, False)  # type: ignore[arg-type]
    # email-validator counts characters, and the local part only in strict mode;
    # RFC 5321 4.5.3.1 counts octets (of UTF-8, RFC 6531).
    local_octets = len(found.address.rpartition("@")[0].encode("utf-8"))
    if local_octets > MAX_LOCAL_PART_OCTETS:
        raise BadAddress(
            "%s %s is not a valid address: its local part is %d octets long; "
            "at most %d are allowed (RFC 5321)"
            % (what, _shown(text), local_octets, MAX_LOCAL_PART_OCTETS)
        )
    octets = len(found.address.encode("utf-8"))
    if octets > MAX_ADDRESS_OCTETS:
        raise BadAddress(
            "%s %s is not a valid address: it is %d octets long; at most %d "
            "are allowed (RFC 5321)" % (what, _shown(text), octets, MAX_ADDRESS_OCTETS)
        )
    return found


MAX_LOCAL_PART_OCTETS = 64
MAX_ADDRESS_OCTETS = 254
# A local part email-validator accepts as it is: dot-separated runs of these.
_PLAIN_LOCAL_PART = re.compile(r"(?=.{1,64}\Z)[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*\Z")
# An extra last label that is never special-use (see _validate).
_NEUTRAL_LABEL = ".x"


def _validate(text: str, allow_local: bool) -> ValidatedEmail:
    """email-validator's verdict on `text` (no DNS). For intranet mail the
    special-use names (local, localhost, internal ones without a dot) must pass:
    email-validator refuses them whatever its options, so the domain is checked
    with a neutral label appended, which keeps every other check of its labels,
    and the label is taken off again."""
    if not allow_local:
        return validate_email(text, check_deliverability=False)
    checked = validate_email(
        text + _NEUTRAL_LABEL, check_deliverability=False, globally_deliverable=False
    )
    cut = len(_NEUTRAL_LABEL)
    checked.normalized = checked.normalized[:-cut]
    checked.ascii_domain = checked.ascii_domain[:-cut]
    if checked.ascii_email is not None:
        checked.ascii_email = checked.ascii_email[:-cut]
    return checked


@functools.lru_cache(maxsize=4096)
def _valid_ascii_domain(domain: str, allow_local: bool = False) -> str | None:
    """email-validator's ASCII form of `domain`, or None if it refuses it."""
    try:
        return _validate("postmaster@" + domain, allow_local).ascii_domain
    except EmailNotValidError:
        return None


def _holds_several_addresses(value: str) -> bool:
    """Whether `value` reads as a list, e.g. 'a@example.org, b@example.org' or
    'a@example.org; b@example.org'. Only to word an error: Python 3.13's strict
    getaddresses reads a ';'-separated list as one unparseable address, so ';'
    is counted as the ',' people meant."""
    found = [address for _, address in getaddresses([value.replace(";", ",")]) if address]
    return len(found) > 1


def parse_mailbox(value: str | None, what: str, allow_local: bool = False) -> tuple[str, Address]:
    """One address, bare or with a display name: 'Name <address>', '"Name, Inc."
    <address>' or 'address' -> (display name, Address). BadAddress for anything
    else, a list of addresses included."""
    if value is None:
        raise BadAddress("%s is NULL" % what)
    if not value.strip():
        raise BadAddress("%s is empty" % what)
    try:
        check_header_text(value, what)
    except BadHeader as exc:
        raise BadAddress(str(exc)) from None
    simple = _SIMPLE_MAILBOX.match(value)
    if simple:  # no quotes, comments or lists: what parseaddr would read, cheaper
        name, bracketed, bare = simple.groups()
        return (
            " ".join((name or "").split()),
            parse_recipient(bracketed or bare, what, allow_local),
        )
    name, address = parseaddr(value)
    # parseaddr is lenient (CVE-2023-27043): accept only what it reads back exactly.
    forms = (
        ("%s <%s>" % (name, address), '"%s" <%s>' % (name, address))
        if name
        else (address, "<%s>" % address)
    )
    if not address or " ".join(value.split()) not in forms:
        if _holds_several_addresses(value):
            raise BadAddress(
                "%s %s holds more than one address; one is expected" % (what, _shown(value))
            )
        raise BadAddress(
            "%s %s is not one address of the form 'Name <address@example.com>' "
            "or 'address@example.com'" % (what, _shown(value))
        )
    return name, parse_recipient(address, what, allow_local)


# 'address' or 'Name <address>' where neither holds an RFC 5322 special character
_SIMPLE_MAILBOX = re.compile(
    r'\s*(?:([^"<>,;:()\\@\[\].\s][^"<>,;:()\\@\[\].]*?)\s*<'
    r'([^"<>,;:()\\\[\]\s]+)>|([^"<>,;:()\\\[\]\s]+))\s*\Z'
)


def parse_sender(value: str | None, allow_local: bool = False) -> tuple[str, Address]:
    """'Name <address>' or a bare address -> (display name, Address)."""
    return parse_mailbox(value, "sender", allow_local)


# Headers the queue writes itself, or that would change the message's structure
# or its routing; `Content-*` is refused as a prefix.
RESERVED_HEADERS = frozenset(
    (
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "reply-to",
        "sender",
        "return-path",
        "mime-version",
        "dkim-signature",
        "received",
    )
)
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,76}\Z")


def check_extra_headers(headers: object) -> list[tuple[str, str]]:
    """A job's `headers` (JSONB: psycopg2 gives a dict) -> [(name, value)], or
    BadHeader: it must be a JSON object of strings whose names are
    [A-Za-z0-9-]+ and not among those the queue writes itself."""
    if headers is None:
        return []
    if not isinstance(headers, dict):
        raise BadHeader("headers must be a JSON object of strings, not %s" % _json_type(headers))
    checked = []
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise BadHeader(
                "headers: %s is not a header name (1 to 76 letters, digits and '-')" % _shown(name)
            )
        lower = name.lower()
        if lower in RESERVED_HEADERS or lower.startswith("content-"):
            raise BadHeader(
                "headers: %s is written by the queue itself (or would change "
                "the message's structure or routing) and cannot be given" % name
            )
        if not isinstance(value, str):
            raise BadHeader(
                "headers: the value of %s must be a string, not %s" % (name, _json_type(value))
            )
        checked.append((name, check_header_text(value, "headers: %s" % name)))
    return checked


def _json_type(value: object) -> str:
    for kind, word in (
        (bool, "true/false"),
        (dict, "an object"),
        (list, "an array"),
        (str, "a string"),
        ((int, float), "a number"),
    ):
        if isinstance(value, kind):
            return word
    return "null" if value is None else type(value).__name__


def check_header_text(value: str, what: str) -> str:
    """Raise BadHeader if `value` could break out of its header."""
    if _FORBIDDEN_IN_HEADER.search(value):
        raise BadHeader("%s contains a line break or control character" % what)
    if _ENCODED_WORD.search(value):
        raise BadHeader(
            "%s contains an RFC 2047 encoded word (=?charset?...?=), "
            "which could inject headers" % what
        )
    if len(value) > MAX_SUBJECT_CHARS:
        raise BadHeader(
            "%s is %d characters long; at most %d are allowed"
            % (what, len(value), MAX_SUBJECT_CHARS)
        )
    return value


def _shown(text: object, limit: int = 80) -> str:
    """The value for an error message: printable, and short."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
