"""Sending built mails over persistent SMTP connections (mailqueue.message builds them).

Every failure is classified as transient (retry later) or permanent (give up),
and no password ever goes into an error.
"""

import base64
import logging
import re
import smtplib
import socket
import ssl

log = logging.getLogger(__name__)


class SendError(Exception):
    """A send failed. `permanent`: retrying cannot help (5xx, or an address the
    server cannot take). `summary` is short and free of personal data (for logs);
    str(self) is the full reason (for last_error)."""

    def __init__(self, text, permanent, summary):
        super().__init__(text)
        self.permanent = permanent
        self.summary = summary


class SmtpUnavailable(Exception):
    """Cannot connect, secure or log in to the SMTP server: no job is to blame."""


_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")  # dot-stuffing (RFC 5321 4.5.2)


class Sender:
    """One SMTP connection, opened on demand and kept open between mails."""

    def __init__(self, smtp_settings):
        self.settings = smtp_settings
        self.connection = None

    def connect(self):
        """Open, secure and log in if not connected; SmtpUnavailable otherwise."""
        if self.connection is not None:
            return
        s = self.settings
        try:
            if s.security == "ssl":
                conn = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout,
                                        context=_tls_context(s.ca_file))
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
            raise SmtpUnavailable("SMTP login as %r refused: %s" % (s.user, _reply(exc))) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise SmtpUnavailable("SMTP server %s:%s: %s" % (s.host, s.port, exc)) from None
        except ssl.SSLError as exc:
            raise SmtpUnavailable("TLS with SMTP server %s:%s failed: %s"
                                  % (s.host, s.port, exc)) from None
        except smtplib.SMTPResponseException as exc:
            raise SmtpUnavailable("SMTP server %s:%s refused the session: %s"
                                  % (s.host, s.port, _reply(exc))) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise SmtpUnavailable("cannot reach SMTP server %s:%s: %s"
                                  % (s.host, s.port, exc or type(exc).__name__)) from None
        self.connection = conn

    def send(self, mail, ready=None):
        """Hand one mail to the server; SendError if it was not accepted.

        ready(), if given, is called once the server is ready for the content,
        just before the content is sent. If it raises, the connection is dropped
        instead: the server discards a mail whose content never ended."""
        try:
            try:
                self._envelope(mail)
            except (smtplib.SMTPServerDisconnected, OSError):
                # The connection went stale while idle. The mail's content has not
                # been sent, so the server cannot have accepted it: a new
                # connection gets one more try.
                self.close()
                self._envelope(mail)
            if ready is not None:
                try:
                    ready()
                except BaseException:
                    self.connection.close()  # no QUIT: it would be read as content
                    self.connection = None
                    raise
            data = mail.data
            if data.startswith(b".") or b"\n." in data:  # never so for build()'s mails
                data = _DOT_AT_LINE_START.sub(b"..", data)
            self.connection.send(data + b".\r\n")
            code, reply = self.connection.getreply()
            if code != 250:
                raise self._refused(code, reply, "mail refused")
        except smtplib.SMTPServerDisconnected as exc:
            self.close()
            raise SendError("SMTP server closed the connection: %s" % (exc or "no reason given"),
                            permanent=False, summary="connection lost") from None
        except (OSError, smtplib.SMTPException) as exc:  # timeouts, resets, protocol errors
            self.close()
            raise SendError("SMTP connection failed: %s" % (exc or type(exc).__name__),
                            permanent=False, summary="connection failed") from None

    def _envelope(self, mail):
        """MAIL FROM, RCPT TO and DATA; in one round trip when the server offers
        PIPELINING (RFC 2920). Returns once the server is ready for the content."""
        self.connect()
        conn = self.connection
        if mail.smtputf8 and not conn.has_extn("smtputf8"):
            raise SendError("the recipient's address is not ASCII and the SMTP server "
                            "does not offer SMTPUTF8", permanent=True, summary="no SMTPUTF8")
        commands = [("MAIL FROM:<%s>%s" % (mail.sender, " SMTPUTF8" if mail.smtputf8 else ""),
                     "sender refused", (250,)),
                    ("RCPT TO:<%s>" % mail.recipients[0], "recipient refused", (250, 251)),
                    ("DATA", "mail refused", (354,))]
        encoding = "utf-8" if mail.smtputf8 else "ascii"
        if conn.has_extn("pipelining"):
            conn.send("".join(c + "\r\n" for c, _, _ in commands).encode(encoding))
            replies = [conn.getreply() for _ in commands]
        else:
            replies = []
            for command, _, wanted in commands:
                conn.send((command + "\r\n").encode(encoding))
                replies.append(conn.getreply())
                if replies[-1][0] not in wanted:
                    break
        for (_, what, wanted), (code, reply) in zip(commands, replies):
            if code not in wanted:
                if replies[-1][0] == 354:  # DATA went through anyway: end it, empty
                    conn.send(b".\r\n")
                    conn.getreply()
                raise self._refused(code, reply, what)

    def _refused(self, code, message, what):
        """The server answered with an error: 5xx is permanent, anything else is not."""
        if code == 421:  # the server is closing this connection
            self.close()
        elif self.connection is not None:
            try:
                self.connection.rset()  # end this mail's transaction, keep the connection
            except (OSError, smtplib.SMTPException):
                self.close()
        text = "%s: %s" % (what, _reply_text(code, message))
        return SendError(text, permanent=500 <= code < 600, summary="%s %d" % (what, code))

    def close(self):
        if self.connection is not None:
            _close_quietly(self.connection)
            self.connection = None


def _login(conn, user, password):
    if user.isascii() and password.isascii():
        conn.login(user, password)
        return
    # smtplib encodes credentials as ASCII; AUTH PLAIN carries UTF-8 (RFC 4616).
    if "plain" not in conn.esmtp_features.get("auth", "").lower().split():
        raise smtplib.SMTPException("the user name or password is not ASCII, which needs "
                                    "AUTH PLAIN, and the server does not offer it")
    token = base64.b64encode(("\0%s\0%s" % (user, password)).encode("utf-8"))
    code, reply = conn.docmd("AUTH", "PLAIN " + token.decode("ascii"))
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


def _reply(exc):
    return _reply_text(exc.smtp_code, exc.smtp_error)


def _reply_text(code, message):
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return "%s %s" % (code, " ".join(str(message).split()))


def _tls_context(ca_file):
    """Certificates and host names are always verified; ca_file adds a CA to trust."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def _close_quietly(conn):
    try:
        conn.quit()
    except (OSError, smtplib.SMTPException, socket.timeout):
        conn.close()
