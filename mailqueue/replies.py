"""What an SMTP reply asks of us, read by its phase, its code, its enhanced status
code (RFC 3463) and, last, its words.

The same words mean different things in different places: "Try again later"
appears in throttling, greylisting and plain temporary errors alike. So a reply is
read in this order: where it came (greeting, MAIL, RCPT, DATA, or the end of
data), its code (2xx/3xx fine, 5xx for good, 4xx for now), its enhanced code
(4.2.x: that mailbox; 4.7.x: policy or rate), and only then its words. The table
of real replies and what each leads to is in docs/delivery.md; every row of it is
a case of tests/test_replies.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Phases of one SMTP transaction.
GREETING = "greeting"  # the banner, EHLO, STARTTLS, AUTH: the connection itself
MAIL = "mail"
RCPT = "rcpt"
DATA = "data"  # the reply to DATA (354 expected)
DOT = "dot"  # the reply to the end of data: the server's verdict on the mail

# What a reply asks of us.
OK = "ok"
THROTTLE = "throttle"  # the relay: slow down; the mail goes back, no attempt spent
FEWER_CONNECTIONS = "fewer_connections"  # the relay takes no more connections from us
RELAY_UNAVAILABLE = "relay_unavailable"  # the relay cannot take mail now (try another)
CLOSING = "closing"  # the relay is closing this connection (421 without a reason)
DEFER = "defer"  # that recipient, for now (greylisting, mailbox busy or full)
FAIL = "fail"  # a temporary failure: an attempt spent, retried with backoff
REFUSED = "refused"  # for good (5xx)

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_RATE_WORDS = re.compile(
    r"throttl|\brate\b|rate limit|too many (messages|mails|emails|recipients)|too much mail"
    r"|slow down|sending limit",
    re.IGNORECASE,
)
_CONNECTION_WORDS = re.compile(
    r"too many (concurrent )?(smtp )?(connections|sessions)|connection (count |rate )?limit"
    r"|connections from|concurrent (smtp )?connections",
    re.IGNORECASE,
)
_GREYLIST_WORDS = re.compile(r"gr[ae]y-?list", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    action: str  # one of the constants above
    enhanced: str | None = None  # "4.2.1", if the reply carried one

    @property
    def bad_mailbox(self) -> bool:
        """A permanent refusal of the address itself (5.1.x: no such user, bad
        domain...): the address may be suppressed. 5.7.x (policy: spam, DMARC,
        authentication) is the sender's problem and never is."""
        return self.action == REFUSED and (self.enhanced or "").startswith("5.1.")

    @property
    def policy(self) -> bool:
        return (self.enhanced or "").startswith("5.7.")


def enhanced_code(text: str) -> str | None:
    found = _ENHANCED.match(text)
    return ".".join(found.groups()) if found else None


def classify(phase: str, code: int | None, text: str) -> Verdict:
    """What the reply `code text` at `phase` asks of us."""
    enhanced = enhanced_code(text)
    if code is None or code < 0:
        return Verdict(FAIL, enhanced)
    if 200 <= code < 400:
        return Verdict(OK, enhanced)
    if code >= 500:
        return Verdict(REFUSED, enhanced)
    klass = enhanced.split(".")[1] if enhanced else None
    if phase == GREETING:
        if _CONNECTION_WORDS.search(text):
            return Verdict(FEWER_CONNECTIONS, enhanced)
        if _RATE_WORDS.search(text):
            return Verdict(THROTTLE, enhanced)
        return Verdict(RELAY_UNAVAILABLE, enhanced)
    if code == 421:
        if _CONNECTION_WORDS.search(text):
            return Verdict(FEWER_CONNECTIONS, enhanced)
        # Gmail's "421 4.7.0 Try again later, closing connection" at MAIL: the relay's policy
        if _RATE_WORDS.search(text) or (klass == "7" and phase == MAIL):
            return Verdict(THROTTLE, enhanced)
        # Before the mail began, the relay is closing the connection; after, it
        # refused this mail for now as it went.
        return Verdict(CLOSING if phase == MAIL else FAIL, enhanced)
    if _GREYLIST_WORDS.search(text):
        return Verdict(DEFER, enhanced)
    if klass == "2" and phase == RCPT:
        # that mailbox: busy, full, or receiving mail too fast (Gmail's 4.2.1)
        return Verdict(DEFER, enhanced)
    if _RATE_WORDS.search(text):
        return Verdict(THROTTLE, enhanced)
    return Verdict(FAIL, enhanced)
