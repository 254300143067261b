"""Sending built mails over one persistent SMTP connection (mailqueue.message builds them).

A mail costs one round trip on a reused connection. With PIPELINING (RFC 2920)
the envelope (MAIL FROM, RCPT TO..., DATA) goes in one write, and the message
content may be the first "command" of a group: the next mail's envelope follows
its end-of-data dot in the same write, so the reply to the dot and the replies to
the next envelope come back together. Without PIPELINING each command waits for
its reply.

The caller drives the steps, because it must decide, between the envelope's
replies and the content, whether it may still send that mail (see consumer.py):

    sender.begin(mail)              # the envelope is written (or, without
    sender.envelope_replies(mail)   #   PIPELINING, exchanged here)
    reply = sender.finish(mail, then=next_mail)   # content, dot, next envelope

Every failure is classified: SendError for the mail (transient or permanent,
throttling, or an unknown outcome), EnvelopeLost when the connection failed
before the content went (the mail was not sent: it may go again at no cost),
SmtpUnavailable when no connection can be had. No password ever goes into an error.
"""

from __future__ import annotations

import base64
import logging
import re
import smtplib
import socket
import ssl
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from mailqueue.config import SmtpSettings
    from mailqueue.message import Mail

log = logging.getLogger(__name__)


class SendError(Exception):
    """A mail was not accepted, or may not have been. `permanent`: retrying cannot
    help (5xx, or an address the server cannot take). `throttled`: the server
    says we send too fast, not that the mail is bad. `unknown`: the content went
    out and no reply came, so the server may have accepted it. `summary` is short
    and free of personal data (for logs); str(self) is the full reason (for
    last_error); `code` is the server's reply code, if there was one."""

    def __init__(
        self,
        text: str,
        permanent: bool = False,
        summary: str = "",
        code: int | None = None,
        throttled: bool = False,
        unknown: bool = False,
    ) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.summary = summary or text
        self.code = code
        self.throttled = throttled
        self.unknown = unknown


class EnvelopeLost(Exception):
    """The connection failed or was closed before the mail's content was sent (an
    idle connection the server had closed, a 421 on a reused one): the server
    cannot have accepted the mail, so it may be sent again at no cost."""


class SmtpUnavailable(Exception):
    """Cannot connect, secure or log in to the SMTP server: no job is to blame.
    `retryable`: the server may come (a refused or timed-out connection, a name
    that does not resolve yet); otherwise waiting cannot help (a refused login, a
    certificate that does not verify, no STARTTLS)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


# Replies that say the sender is too fast, not that the mail is bad: SES's
# "454 4.7.0 Throttling failure: Maximum sending rate exceeded", Gmail's "421 4.7.0
# Try again later, closing connection" and "450 4.2.1 ... rate that prevents
# additional messages", "452 4.3.2 Too many messages".
THROTTLING_CODES = (421, 450, 451, 452, 454)
_THROTTLING_TEXT = re.compile(
    r"throttl|\brate\b|too many (messages|mails|emails|recipients)|try again later"
    r"|slow down|sending limit",
    re.IGNORECASE,
)


def is_throttling(code: int, text: str) -> bool:
    """Whether a reply asks the sender to slow down."""
    return code in THROTTLING_CODES and bool(_THROTTLING_TEXT.search(text))


_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321 4.5.2)


class Sender:
    """One SMTP connection, opened on demand and kept open between mails."""

    def __init__(self, smtp_settings: SmtpSettings) -> None:
        self.settings = smtp_settings
        self.connection: smtplib.SMTP | None = None
        self.mails_on_connection = 0  # mails whose content went on this connection
        self.fresh = False  # the connection was opened for the mail under way
        # envelope replies already read (no PIPELINING)
        self._replies: list[tuple[int, bytes]] | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None

    def connect(self) -> None:
        """Open, secure and log in if not connected; SmtpUnavailable otherwise."""
        if self.connection is not None:
            return
        s = self.settings
        try:
            if s.security == "ssl":
                conn: smtplib.SMTP = smtplib.SMTP_SSL(
                    s.host, s.port, timeout=s.timeout, context=_tls_context(s.ca_file)
                )
            else:
                conn = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
            try:
                conn.ehlo()
                if s.security == "starttls":
                    # Never falls back to plain text: no STARTTLS means no mail.
                    conn.starttls(context=_tls_context(s.ca_file))
                    conn.ehlo()
                if s.user:
                    _login(conn, s.user, s.password)
            except BaseException:
                _close_quietly(conn)
                raise
        except smtplib.SMTPAuthenticationError as exc:
            raise SmtpUnavailable(
                "SMTP login as %r refused: %s" % (s.user, _reply(exc)), retryable=False
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise SmtpUnavailable(
                "SMTP server %s:%s: %s" % (s.host, s.port, exc), retryable=False
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise SmtpUnavailable(
                "TLS with SMTP server %s:%s failed: %s" % (s.host, s.port, exc), retryable=False
            ) from None
        except ssl.SSLError as exc:
            raise SmtpUnavailable(
                "TLS with SMTP server %s:%s failed: %s" % (s.host, s.port, exc)
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise SmtpUnavailable(
                "SMTP server %s:%s refused the session: %s" % (s.host, s.port, _reply(exc))
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise SmtpUnavailable(
                "cannot reach SMTP server %s:%s: %s" % (s.host, s.port, exc or type(exc).__name__)
            ) from None
        self.connection = conn
        self.mails_on_connection = 0

    @property
    def pipelining(self) -> bool:
        return self.connection is not None and self.connection.has_extn("pipelining")

    def check(self, mail: Mail) -> None:
        """Refuse, before anything is sent, a mail this server cannot take:
        SendError (permanent). Connects first, to know what the server offers."""
        self.connect()
        conn: smtplib.SMTP = self.connection  # type: ignore[assignment]  # connect() opened it
        if mail.smtputf8 and not conn.has_extn("smtputf8"):
            raise SendError(
                "an address is not ASCII and the SMTP server does not offer SMTPUTF8",
                permanent=True,
                summary="no SMTPUTF8",
            )
        limits = []
        size = conn.esmtp_features.get("size", "").strip()
        if size.isdigit() and int(size) > 0:
            limits.append((int(size), "the SMTP server's advertised SIZE"))
        configured = getattr(self.settings, "max_message_bytes", None)
        if configured:
            limits.append((configured, "smtp.max_message_bytes"))
        for limit, what in limits:
            if len(mail.data) > limit:
                raise SendError(
                    "the message is %d bytes, more than %s of %d bytes"
                    % (len(mail.data), what, limit),
                    permanent=True,
                    summary="message too large",
                )

    def begin(self, mail: Mail) -> None:
        """Write the mail's envelope (MAIL FROM, RCPT TO..., DATA) in one go when
        the server offers PIPELINING; without it, exchange it command by command.
        Its replies are read by envelope_replies()."""
        self.fresh = not self.connected  # a connection opened for this very mail
        self.connect()
        commands = self._envelope(mail)
        try:
            if self.pipelining:
                self._replies = None
                self.connection.send(b"".join(commands))  # type: ignore[union-attr]  # connected
                return
            self._replies = self._exchange(commands)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            self._lost(exc)

    def _exchange(self, commands):
        """Without PIPELINING: each envelope command waits for its reply; stop at a
        refused sender, or before DATA when every recipient was refused."""
        conn, replies = self.connection, []
        conn.send(commands[0])
        replies.append(conn.getreply())
        if replies[0][0] != 250:
            return replies
        for command in commands[1:-1]:
            conn.send(command)
            replies.append(conn.getreply())
        if any(code in (250, 251) for code, _ in replies[1:]):
            conn.send(commands[-1])
            replies.append(conn.getreply())
        return replies

    def _envelope(self, mail: Mail) -> list[bytes]:
        encoding = "utf-8" if mail.smtputf8 else "ascii"
        mail_from = "MAIL FROM:<%s>%s" % (mail.sender, " SMTPUTF8" if mail.smtputf8 else "")
        lines = [mail_from] + ["RCPT TO:<%s>" % r for r in mail.recipients] + ["DATA"]
        return [(line + "\r\n").encode(encoding) for line in lines]

    def envelope_replies(self, mail: Mail) -> list[str]:
        """The replies to the envelope begin() wrote. Returns the refused
        recipients (when some, not all, were refused) as "address: reply" texts.
        Raises SendError if the mail cannot go, EnvelopeLost if the connection
        failed before its content (nothing was sent)."""
        conn = self.connection
        if conn is None:
            raise EnvelopeLost("the SMTP connection was closed before the content was sent")
        expected = 2 + len(mail.recipients)
        replies, self._replies = self._replies, None
        if replies is None:
            replies = []
            try:
                while len(replies) < expected:
                    replies.append(conn.getreply())
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                if not replies or replies[0][0] == 250:
                    self._lost(exc)
                self.close()  # the sender was refused, and the server hung up
        (mail_code, mail_text) = replies[0]
        if mail_code != 250:
            if (
                mail_code == 421
                and not self.fresh
                and not is_throttling(mail_code, _text(mail_text))
            ):
                # A reused connection the relay is closing: go on on a new one.
                self.close()
                raise EnvelopeLost(
                    "the SMTP server closed the connection: %s" % _reply_text(mail_code, mail_text)
                )
            raise self._refused(mail_code, mail_text, "sender refused")
        rcpt_replies = replies[1 : 1 + len(mail.recipients)]
        refused = [
            "%s: %s" % (rcpt, _reply_text(code, text))
            for rcpt, (code, text) in zip(mail.recipients, rcpt_replies)
            if code not in (250, 251)
        ]
        accepted = len(rcpt_replies) - len(refused)
        data_code, data_text = replies[-1] if len(replies) == expected else (None, b"")
        if accepted == 0:
            code, text = next((c, t) for c, t in rcpt_replies if c not in (250, 251))
            if data_code == 354:  # DATA went through anyway: end it, empty
                self._end_empty()
            raise self._refused(code, text, "recipient refused")
        if data_code != 354:
            raise self._refused(data_code or -1, data_text, "mail refused")
        return refused

    def finish(self, mail: Mail, then: Mail | None = None) -> str:
        """Send the content (the server said 354) and wait for its reply, up to
        smtp.data_timeout. With PIPELINING, `then`'s envelope goes in the same
        write; its replies are read by the next envelope_replies(then).
        Returns the server's 250 reply text; SendError otherwise (`unknown` when
        no reply came: the server may have accepted the mail)."""
        conn: smtplib.SMTP = self.connection  # type: ignore[assignment]  # begin() opened it
        data = mail.data
        if data.startswith(b".") or b"\n." in data:
            data = _DOT_AT_LINE_START.sub(b"..", data)
        payload = [data, b".\r\n"]
        if then is not None and self.pipelining:
            payload += self._envelope(then)
        try:
            conn.send(b"".join(payload))
        except OSError as exc:
            self.close()
            raise SendError(
                "the connection failed while the content was being sent (%s): "
                "the server may have accepted the mail" % _describe(exc),
                summary="connection failed",
                unknown=True,
            ) from None
        self.mails_on_connection += 1
        self.fresh = False
        try:
            conn.sock.settimeout(self.settings.data_timeout)  # type: ignore[union-attr]  # connected
            try:
                code, text = conn.getreply()
            finally:
                if conn.sock is not None:
                    conn.sock.settimeout(self.settings.timeout)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            self.close()
            if _timed_out(exc):
                reason = (
                    "no reply to the end of data within %g s (smtp.data_timeout)"
                    % self.settings.data_timeout
                )
                summary = "no reply to the end of data"
            else:
                reason = "the connection was lost before the reply to the end of data"
                summary = "connection lost"
            raise SendError(
                "%s: the server may have accepted it" % reason, summary=summary, unknown=True
            ) from None
        if then is not None and not self.pipelining:
            try:
                self.begin(then)  # now that the server is ready for it
            except EnvelopeLost:
                pass  # the connection is gone: envelope_replies(then) says so
        if code != 250:
            # The transaction ended with this reply: nothing to reset, and the
            # next envelope's replies, if pipelined, follow in order.
            raise self._refused(code, text, "mail refused", reset=False)
        return _text(text)

    def _end_empty(self):
        try:
            self.connection.send(b".\r\n")
            self.connection.getreply()
        except (smtplib.SMTPException, OSError):
            self.close()

    def _lost(self, exc: BaseException) -> NoReturn:
        self.close()
        raise EnvelopeLost(
            "the SMTP connection failed before the content was sent: %s" % _describe(exc)
        ) from None

    def _refused(self, code: int, message: bytes | str, what: str, reset: bool = True) -> SendError:
        """The server answered with an error: 5xx is permanent, anything else is not."""
        text = _text(message)
        if code == 421:  # the server is closing this connection
            self.close()
        elif reset and self.connection is not None:
            try:
                self.connection.rset()  # end this mail's transaction, keep the connection
            except (OSError, smtplib.SMTPException):
                self.close()
        return SendError(
            "%s: %s" % (what, _reply_text(code, text)),
            permanent=500 <= code < 600,
            summary="%s %d" % (what, code),
            code=code if code > 0 else None,
            throttled=is_throttling(code, text),
        )

    def abort(self) -> None:
        """Drop the connection without a word: a mail whose content has not ended
        is discarded by the server (a QUIT now would be read as content)."""
        if self.connection is not None:
            try:
                self.connection.close()
            except OSError:
                pass
            self.connection = None

    def close(self) -> None:
        if self.connection is not None:
            _close_quietly(self.connection)
            self.connection = None


def _login(conn: smtplib.SMTP, user: str, password: str) -> None:
    if user.isascii() and password.isascii():
        conn.login(user, password)
        return
    # smtplib encodes credentials as ASCII; AUTH PLAIN carries UTF-8 (RFC 4616).
    if "plain" not in conn.esmtp_features.get("auth", "").lower().split():
        raise smtplib.SMTPException(
            "the user name or password is not ASCII, which needs "
            "AUTH PLAIN, and the server does not offer it"
        )
    token = base64.b64encode(("\0%s\0%s" % (user, password)).encode("utf-8"))
    code, reply = conn.docmd("AUTH", "PLAIN " + token.decode("ascii"))
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, socket.timeout) or isinstance(exc.__context__, socket.timeout)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _text(message: bytes | str) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return " ".join(str(message).split())


def _reply(exc: smtplib.SMTPResponseException) -> str:
    return _reply_text(exc.smtp_code, exc.smtp_error)


def _reply_text(code: int, message: bytes | str) -> str:
    return "%s %s" % (code, _text(message))


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificates and host names are always verified; ca_file adds a CA to trust."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def _close_quietly(conn: smtplib.SMTP) -> None:
    try:
        conn.quit()
    except (OSError, smtplib.SMTPException, socket.timeout):
        conn.close()
