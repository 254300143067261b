"""DKIM signatures (RFC 6376) on every mail, with dkimpy, when smtp.dkim is set.

smtp.dkim = {"domain": "example.org", "selector": "mail", "private_key_file": "..."}
names an RSA private key in PEM (PKCS#1 "BEGIN RSA PRIVATE KEY" or PKCS#8
"BEGIN PRIVATE KEY", unencrypted); its public half is published in DNS as
`<selector>._domainkey.<domain>`. load_key() reads and checks it at start-up, so a
missing or unreadable key stops the scripts with one line (a ConfigError).

The signature is relaxed/relaxed (it survives relays that refold headers or
change trailing spaces) and covers the headers RFC 6376 5.4.1 recommends that the
message has (From twice, so that no second From can be added), and the
List-Unsubscribe-Post of one-click unsubscribe (RFC 8058 3 requires it). dkimpy
signs in pure Python, holding the GIL: about 10 ms a mail with a 2048-bit key
(bench/build_cost.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim
import dkim.crypto

_KEYS = ("domain", "selector", "private_key_file")
_LABELS = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)


class BadKey(ValueError):
    """smtp.dkim cannot be used; the message is one line for people."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_key_file: str
    private_key: bytes  # the PEM, read once at start-up

    def __repr__(self) -> str:  # never show the key, even in a traceback
        return "DkimKey(domain=%r, selector=%r, private_key_file=%r)" % (
            self.domain,
            self.selector,
            self.private_key_file,
        )


def load_key(settings: object) -> DkimKey:
    """smtp.dkim (a dict from the configuration) -> DkimKey, or BadKey."""
    if not isinstance(settings, dict):
        raise BadKey("smtp.dkim must be a JSON object with %s" % ", ".join(_KEYS))
    unknown = sorted(set(settings) - set(_KEYS))
    if unknown:
        raise BadKey("unknown key smtp.dkim.%s (known: %s)" % (unknown[0], ", ".join(_KEYS)))
    for key in _KEYS:
        if not isinstance(settings.get(key), str) or not settings[key]:
            raise BadKey("smtp.dkim.%s must be a non-empty string" % key)
    for key in ("domain", "selector"):
        if not _LABELS.match(settings[key]):
            raise BadKey(
                "smtp.dkim.%s %r is not a DNS name (ASCII letters, digits, '-' "
                "and dots)" % (key, settings[key])
            )
    path = settings["private_key_file"]
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise BadKey(
            "smtp.dkim.private_key_file %r cannot be read: %s" % (path, exc.strerror or exc)
        ) from None
    pem = pem.replace(b"\r\n", b"\n")  # dkimpy's PEM reader wants LF line ends
    try:
        dkim.crypto.parse_pem_private_key(pem)
    except Exception as exc:  # dkimpy's ASN.1 reader raises several kinds
        raise BadKey(
            "smtp.dkim.private_key_file %r is not an unencrypted RSA private key "
            "in PEM (%s)" % (path, " ".join(str(exc).split()) or type(exc).__name__)
        ) from None
    return DkimKey(settings["domain"], settings["selector"], path, pem)


class SigningError(ValueError):
    """dkimpy could not sign this message."""


class Signer:
    """Signs mails with one key."""

    def __init__(self, key: DkimKey) -> None:
        self.key = key
        self.domain = key.domain.encode("ascii")
        self.selector = key.selector.encode("ascii")

    def sign(self, data: bytes) -> bytes:
        """The DKIM-Signature header (bytes, CRLF-terminated) for `data`, a whole
        message with CRLF line ends."""
        signature = dkim.DKIM(data, linesep=b"\r\n")
        signature.should_sign.add(b"list-unsubscribe-post")
        try:
            return signature.sign(
                self.selector,
                self.domain,
                self.key.private_key,
                canonicalize=(b"relaxed", b"relaxed"),
            )
        except dkim.DKIMException as exc:
            raise SigningError("DKIM signing failed: %s" % exc) from None
