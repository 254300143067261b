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

The replies are returned as they came (an Envelope, the reply to the dot): what
they ask of us is mailqueue.replies' and mailqueue.outcomes' to say. This module
raises only for the connection itself: EnvelopeLost when it failed before the
content went (the mail was not sent: it may go again at no cost), ContentUnknown
when the content went out and no reply came (the server may have the mail),
SmtpUnavailable when no connection can be had, and SendError when the server
cannot take the mail at all (SIZE, SMTPUTF8). No password ever goes into an error.
"""

from __future__ import annotations

import base64
import logging
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Tuple

if TYPE_CHECKING:
    from mailqueue.config import SmtpSettings
    from mailqueue.message import Mail

from mailqueue import replies

log = logging.getLogger(__name__)


class SendError(Exception):
    """The server cannot take this mail at all, whatever we do (check()): too
    large for its SIZE, or an address that needs SMTPUTF8 it does not offer.
    `summary` is short and free of personal data (for logs); str(self) is the
    full reason (for last_error)."""

    def __init__(self, text: str, summary: str = "") -> None:
        super().__init__(text)
        self.summary = summary or text


class ContentUnknown(Exception):
    """The content went out and no reply to it came (a timeout, a lost
    connection): the server may have accepted the mail."""

    def __init__(self, text: str, summary: str) -> None:
        super().__init__(text)
        self.summary = summary


class EnvelopeLost(Exception):
    """The connection failed or was closed before the mail's content was sent (an
    idle connection the server had closed, a 421 on a reused one): the server
    cannot have accepted the mail, so it may be sent again at no cost."""


class SmtpUnavailable(Exception):
    """Cannot connect, secure or log in to the SMTP server: no job is to blame.
    `retryable`: the server may come (a refused or timed-out connection, a name
    that does not resolve yet); otherwise waiting cannot help (a refused login, a
    certificate that does not verify, no STARTTLS). `verdict` reads the server's
    reply, when it gave one (mailqueue.replies: fewer_connections when it takes
    no more connections from us)."""

    def __init__(self, message: str, retryable: bool = True, verdict: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.verdict = verdict


Reply = Tuple[int, str]


@dataclass(frozen=True)
class Envelope:
    """The replies to one mail's envelope. `mail`: to MAIL FROM; `recipients`: to
    each RCPT TO, in the mail's order (empty when MAIL FROM was refused);
    `data`: to DATA (None when it was not sent). `ready`: the server waits for
    the content (354, with at least one recipient accepted)."""

    mail: Reply
    recipients: tuple[Reply, ...]
    data: Reply | None

    @property
    def ready(self) -> bool:
        return self.data is not None and self.data[0] == 354


_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321 4.5.2)


class Sender:
    """One SMTP connection, opened on demand and kept open between mails."""

    def __init__(self, smtp_settings: SmtpSettings) -> None:
        self.settings = smtp_settings
        self.connection: smtplib.SMTP | None = None
        self.mails_on_connection = 0  # mails whose content went on this connection
        self.fresh = False  # no mail's content has gone on this connection yet
        # envelope replies already read (no PIPELINING)
        self._replies: list[tuple[int, bytes]] | None = None
        # DATA may have been answered 354 and no content ended it: a QUIT now would
        # be read as content, so closing drops the connection instead
        self._mid_mail = False

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
                _give_up_unacknowledged(conn.sock, s.timeout)
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
            verdict = replies.classify(replies.GREETING, exc.smtp_code, _text(exc.smtp_error))
            raise SmtpUnavailable(
                "SMTP server %s:%s refused the session: %s" % (s.host, s.port, _reply(exc)),
                verdict=verdict.action,
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise SmtpUnavailable(
                "cannot reach SMTP server %s:%s: %s" % (s.host, s.port, exc or type(exc).__name__)
            ) from None
        self.connection = conn
        self.mails_on_connection = 0
        self.fresh = True  # until a mail's content has gone on it
        self._mid_mail = False

    @property
    def pipelining(self) -> bool:
        return self.connection is not None and self.connection.has_extn("pipelining")

    def check(self, mail: Mail) -> None:
        """Refuse, before anything is sent, a mail this server cannot take:
        SendError. Connects first, to know what the server offers."""
        self.connect()
        conn: smtplib.SMTP = self.connection  # type: ignore[assignment]  # connect() opened it
        if mail.smtputf8 and not conn.has_extn("smtputf8"):
            raise SendError(
                "an address is not ASCII and the SMTP server does not offer SMTPUTF8",
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
                    summary="message too large",
                )

    def begin(self, mail: Mail) -> None:
        """Write the mail's envelope (MAIL FROM, RCPT TO..., DATA) in one go when
        the server offers PIPELINING; without it, exchange it command by command.
        Its replies are read by envelope_replies()."""
        self.connect()
        commands = self._envelope(mail)
        try:
            if self.pipelining:
                self._replies = None
                self._mid_mail = True
                self.connection.send(b"".join(commands))  # type: ignore[union-attr]  # connected
                return
            self._replies = self._exchange(commands)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            self._lost(exc)

    def _exchange(self, commands: list[bytes]) -> list[tuple[int, bytes]]:
        """Without PIPELINING: each envelope command waits for its reply; stop at a
        refused sender, or before DATA when every recipient was refused."""
        conn: smtplib.SMTP = self.connection  # type: ignore[assignment]  # connected
        got = []
        conn.send(commands[0])
        got.append(conn.getreply())
        if got[0][0] != 250:
            return got
        for command in commands[1:-1]:
            conn.send(command)
            got.append(conn.getreply())
        if any(code in (250, 251) for code, _ in got[1:]):
            self._mid_mail = True
            conn.send(commands[-1])
            got.append(conn.getreply())
        return got

    def _envelope(self, mail: Mail) -> list[bytes]:
        encoding = "utf-8" if mail.smtputf8 else "ascii"
        mail_from = "MAIL FROM:<%s>%s" % (mail.sender, " SMTPUTF8" if mail.smtputf8 else "")
        lines = [mail_from] + ["RCPT TO:<%s>" % r for r in mail.recipients] + ["DATA"]
        return [(line + "\r\n").encode(encoding) for line in lines]

    def envelope_replies(self, mail: Mail) -> Envelope:
        """The replies to the envelope begin() wrote, as they came. When the
        content cannot go (a refusal), the transaction is ended here and the
        connection kept if it can be. Raises EnvelopeLost if the connection failed
        before the content (nothing was sent), or if a reused connection is being
        closed by the server (421 with no reason of rate or connections)."""
        conn = self.connection
        if conn is None:
            raise EnvelopeLost("the SMTP connection was closed before the content was sent")
        expected = 2 + len(mail.recipients)
        got, self._replies = self._replies, None
        if got is None:
            got = []
            try:
                while len(got) < expected:
                    got.append(conn.getreply())
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                if not got or got[0][0] == 250:
                    self._lost(exc)
                self.abort()  # the sender was refused, and the server hung up
        mail_reply = (got[0][0], _text(got[0][1]))
        if mail_reply[0] != 250:
            if mail_reply[0] == 421:
                self.abort()
                verdict = replies.classify(replies.MAIL, *mail_reply)
                if verdict.action == replies.CLOSING and not self.fresh:
                    # A reused connection the relay is closing: go on on a new one.
                    raise EnvelopeLost(
                        "the SMTP server closed the connection: %s" % _reply_text(*mail_reply)
                    )
            else:
                self._reset()
            return Envelope(mail_reply, (), None)
        rcpts = tuple((code, _text(text)) for code, text in got[1 : 1 + len(mail.recipients)])
        data = (got[-1][0], _text(got[-1][1])) if len(got) == expected else None
        accepted = any(code in (250, 251) for code, _ in rcpts)
        if data is not None and data[0] == 354:
            if not accepted:  # DATA went through anyway: end it, empty
                self._end_empty()
                data = None
        elif any(code == 421 for code, _ in rcpts) or (data is not None and data[0] == 421):
            self.abort()
        else:
            self._reset()
        return Envelope(mail_reply, rcpts, data)

    def finish(self, mail: Mail, then: Mail | None = None) -> Reply:
        """Send the content (the server said 354) and wait for its reply, up to
        smtp.data_timeout. With PIPELINING, `then`'s envelope goes in the same
        write; its replies are read by the next envelope_replies(then).
        Returns the server's reply to the end of data (250 or a refusal);
        ContentUnknown when none came (the server may have accepted the mail)."""
        conn: smtplib.SMTP = self.connection  # type: ignore[assignment]  # begin() opened it
        data = mail.data
        if data.startswith(b".") or b"\n." in data:
            data = _DOT_AT_LINE_START.sub(b"..", data)
        payload = [data, b".\r\n"]
        pipelined = then is not None and self.pipelining
        if pipelined:
            payload += self._envelope(then)  # type: ignore[arg-type]  # then is not None
        self._mid_mail = pipelined
        try:
            conn.send(b"".join(payload))
        except OSError as exc:
            self.abort()
            raise ContentUnknown(
                "the connection failed while the content was being sent (%s): "
                "the server may have accepted the mail" % _describe(exc),
                summary="connection failed",
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
            self.abort()
            if _timed_out(exc):
                reason = (
                    "no reply to the end of data within %g s (smtp.data_timeout)"
                    % self.settings.data_timeout
                )
                summary = "no reply to the end of data"
            else:
                reason = "the connection was lost before the reply to the end of data"
                summary = "connection lost"
            raise ContentUnknown(
                "%s: the server may have accepted it" % reason, summary=summary
            ) from None
        if then is not None and not self.pipelining:
            try:
                self.begin(then)  # now that the server is ready for it
            except EnvelopeLost:
                pass  # the connection is gone: envelope_replies(then) says so
        if code == 421:
            self.abort()
        return code, _text(text)

    def _end_empty(self) -> None:
        conn: smtplib.SMTP = self.connection  # type: ignore[assignment]  # connected
        try:
            conn.send(b".\r\n")
            conn.getreply()
            self._mid_mail = False
        except (smtplib.SMTPException, OSError):
            self.abort()

    def _reset(self) -> None:
        """End this mail's transaction, keep the connection."""
        self._mid_mail = False
        if self.connection is not None:
            try:
                self.connection.rset()
            except (OSError, smtplib.SMTPException):
                self.abort()

    def _lost(self, exc: BaseException) -> NoReturn:
        self.abort()
        raise EnvelopeLost(
            "the SMTP connection failed before the content was sent: %s" % _describe(exc)
        ) from None

    def abort(self) -> None:
        """Drop the connection without a word: a mail whose content has not ended
        is discarded by the server (a QUIT now would be read as content)."""
        if self.connection is not None:
            try:
                self.connection.close()
            except OSError:
                pass
            self.connection = None
        self._mid_mail = False

    def close(self) -> None:
        """Say QUIT and close, as a polite client does; a connection in the
        middle of a mail is dropped instead (see abort)."""
        if self._mid_mail:
            self.abort()
        elif self.connection is not None:
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


def _give_up_unacknowledged(sock: socket.socket | None, seconds: float) -> None:
    """Data that the server does not acknowledge for `seconds` (a network cut)
    ends the connection then, instead of after minutes of TCP retransmissions."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is not None and option is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, int(seconds * 1000))
        except OSError:
            pass


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
