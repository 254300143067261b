"""Signed tokens for what strangers send back to us: the VERP return path of
bounces and the one-click unsubscribe link.

Both are HMAC-SHA256 under the secret in MAILQUEUE_SECRET (never in the
configuration file), each with a purpose of its own in the signed text, so that
a tag of one kind is never accepted as the other. They are compared with
hmac.compare_digest.

    VERP:        bounces+<job_id>-<tag>@example.org   (tag: 16 hex digits, 64 bits)
    unsubscribe: <base64url of "job_id address">.<base64url of 16 bytes of HMAC>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

SECRET_ENV = "MAILQUEUE_SECRET"
MIN_SECRET_CHARS = 16
VERP_TAG_CHARS = 16


class BadToken(ValueError):
    """A token or tag that is malformed or not ours."""


def secret_from(environ: Mapping[str, str]) -> bytes | None:
    """MAILQUEUE_SECRET from a mapping of the environment, as bytes, or None."""
    value = environ.get(SECRET_ENV)
    return value.encode("utf-8") if value else None


def _mac(secret: bytes, purpose: bytes, text: bytes) -> bytes:
    return hmac.new(secret, purpose + b"\n" + text, hashlib.sha256).digest()


# ---------------------------------------------------------------- VERP


def verp_tag(secret: bytes, job_id: int) -> str:
    return _mac(secret, b"verp", b"%d" % job_id).hex()[:VERP_TAG_CHARS]


def verp_address(secret: bytes, return_path: str, job_id: int) -> str:
    """'bounces@example.org' -> 'bounces+<job_id>-<tag>@example.org'."""
    local, _, domain = return_path.rpartition("@")
    return "%s+%d-%s@%s" % (local, job_id, verp_tag(secret, job_id), domain)


@dataclass(frozen=True)
class VerpMatch:
    job_id: int
    genuine: bool  # the tag is the one we made for this job


def verp_pattern(return_path: str) -> re.Pattern[str]:
    """A pattern that finds our VERP addresses (of `return_path`) in header text."""
    local, _, domain = return_path.rpartition("@")
    return re.compile(
        r"(?<![\w.+-])%s\+([0-9]{1,10})-([0-9A-Za-z]{1,64})@%s(?![\w.-])"
        % (re.escape(local), re.escape(domain)),
        re.IGNORECASE,
    )


def check_verp(secret: bytes, job_id_text: str, tag: str) -> VerpMatch:
    job_id = int(job_id_text)
    expected = verp_tag(secret, job_id)
    return VerpMatch(job_id, hmac.compare_digest(expected, tag.lower()))


# ---------------------------------------------------------------- unsubscribe


@dataclass(frozen=True)
class Unsubscribe:
    job_id: int
    email: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise BadToken("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadToken("not base64url") from None


def unsubscribe_token(secret: bytes, job_id: int, email: str) -> str:
    """The token of the link for `email` (as sent to), from job `job_id`."""
    payload = ("%d %s" % (job_id, email)).encode("utf-8")
    return "%s.%s" % (_b64(payload), _b64(_mac(secret, b"unsubscribe", payload)[:16]))


MAX_TOKEN_CHARS = 600


def read_unsubscribe_token(secret: bytes, token: str) -> Unsubscribe:
    """The job and address a token names, or BadToken (malformed, or forged)."""
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise BadToken("malformed")
    payload_text, mac_text = token.split(".")
    payload, mac = _unb64(payload_text), _unb64(mac_text)
    if not hmac.compare_digest(mac, _mac(secret, b"unsubscribe", payload)[:16]):
        raise BadToken("not signed by us")
    job_text, _, email = payload.decode("utf-8", "replace").partition(" ")
    if not job_text.isdigit() or "@" not in email:
        raise BadToken("malformed")
    return Unsubscribe(int(job_text), email)
