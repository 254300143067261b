"""One-click unsubscribe (RFC 8058): python -m mailqueue unsubscribe-server
[--host 127.0.0.1] [--port 8026], or the WSGI app `application` (the
configuration file named by MAILQUEUE_CONFIG, default config.json) under any
WSGI server.

    GET  /TOKEN   a small page with a button that POSTs; changes nothing (mail
                  scanners follow links: a GET must never unsubscribe)
    POST /TOKEN   body List-Unsubscribe=One-Click: the address is suppressed
                  (reason unsubscribe, source link); 200
    a token that is malformed or not signed with MAILQUEUE_SECRET: 400, nothing written

It runs as the role mailqueue_unsubscribe of sql/roles.sql: INSERT on
suppressions and SELECT on what it checks.
"""

from __future__ import annotations

import html
import logging
import os
import re
import signal
import socketserver
import threading
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mailqueue import db, tokens
from mailqueue.dashboard import mask

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable

    from mailqueue.config import Config

log = logging.getLogger("unsubscribe")

CONFIG_ENV = "MAILQUEUE_CONFIG"
MAX_BODY = 10000
HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32em;margin:4em auto;padding:0 1em}"
    "button{font-size:1.1em;padding:.5em 1.2em}"
)
_ONE_CLICK = re.compile(
    rb'(?:^|&)List-Unsubscribe=One-Click(?:&|$)|name="?List-Unsubscribe"?[^\r\n]*\r?\n\r?\nOne-Click\r?\n'
)


def _page(title: str, body: str) -> bytes:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>%s</title><style>%s</style></head><body><h1>%s</h1>%s</body></html>"
        % (html.escape(title), _STYLE, html.escape(title), body)
    ).encode("utf-8")


class App:
    """The WSGI application: one database connection, reopened when lost."""

    def __init__(self, config: Config) -> None:
        if not config.secret:
            raise SystemExit(
                "error: set %s (the secret the links were signed with)" % tokens.SECRET_ENV
            )
        self.config = config
        self.secret = config.secret
        self.lock = threading.Lock()
        self.conn: Any = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        token = environ.get("PATH_INFO", "").rsplit("/", 1)[-1]
        try:
            found = tokens.read_unsubscribe_token(self.secret, token)
        except tokens.BadToken:
            return self._send(
                start_response,
                "400 Bad Request",
                _page(
                    "This link is not valid",
                    "<p>The unsubscribe link is damaged or was not made by us. Nothing was "
                    "changed. Try the link in the mail again, whole.</p>",
                ),
            )
        if method in ("GET", "HEAD"):
            return self._send(
                start_response,
                "200 OK",
                _page(
                    "Unsubscribe",
                    "<p>Stop sending mail to <b>%s</b>?</p>"
                    '<form method="post"><input type="hidden" name="List-Unsubscribe" '
                    'value="One-Click"><button type="submit" id="unsubscribe">'
                    "Unsubscribe</button></form>" % html.escape(mask(found.email)),
                ),
            )
        if method != "POST":
            return self._send(
                start_response, "405 Method Not Allowed", b"GET or POST\n", [("Allow", "GET, POST")]
            )
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(min(max(length, 0), MAX_BODY)) if length else b""
        if not _ONE_CLICK.search(body):
            return self._send(
                start_response,
                "400 Bad Request",
                _page("Nothing changed", "<p>The request did not ask to unsubscribe.</p>"),
            )
        try:
            self._suppress(found)
        except (db.Error, db.DatabaseUnavailable) as exc:
            log.warning("cannot record an unsubscribe: %s", db.describe(exc))
            return self._send(
                start_response,
                "503 Service Unavailable",
                _page("Please try again", "<p>We could not record it just now.</p>"),
                [("Retry-After", "60")],
            )
        log.info("unsubscribed the recipient of job %d", found.job_id)
        return self._send(
            start_response,
            "200 OK",
            _page(
                "You are unsubscribed",
                '<p id="done">No more of these mails will be sent to <b>%s</b>.</p>'
                % html.escape(mask(found.email)),
            ),
        )

    def _suppress(self, found: tokens.Unsubscribe) -> None:
        email = found.email.strip().lower()
        with self.lock:
            for attempt in (1, 2):
                try:
                    if self.conn is None or self.conn.closed:
                        self.conn = db.connect(self.config.database, "mailqueue unsubscribe")
                    db.run(
                        self.conn,
                        "suppress_by_link",
                        email=email,
                        job_id=found.job_id,
                        detail="List-Unsubscribe=One-Click",
                    )
                    return
                except db.CONNECTION_ERRORS:
                    db.close_quietly(self.conn)
                    self.conn = None
                    if attempt == 2:
                        raise

    @staticmethod
    def _send(
        start_response: Any, status: str, body: bytes, extra: list[tuple[str, str]] | None = None
    ) -> list[bytes]:
        content_type = "text/html; charset=utf-8" if body.startswith(b"<!") else "text/plain"
        start_response(
            status,
            [("Content-Type", content_type), ("Content-Length", str(len(body)))]
            + HEADERS
            + (extra or []),
        )
        return [body]


_application: App | None = None


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """For a WSGI server: the configuration file is MAILQUEUE_CONFIG (default
    config.json), read at the first request."""
    global _application
    if _application is None:
        from mailqueue import config as configuration

        _application = App(configuration.load(os.environ.get(CONFIG_ENV, "config.json")))
    return _application(environ, start_response)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no tokens in the logs
        log.debug("%s %s", self.address_string(), (format % args).split(" ", 2)[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8026, help="port (default 8026)")


def run(args: argparse.Namespace, config: Config) -> None:
    app = App(config)
    try:
        server = make_server(args.host, args.port, app, _Server, _Quiet)
    except OSError as exc:
        raise SystemExit(
            "error: cannot listen on %s:%d: %s" % (args.host, args.port, exc.strerror or exc)
        ) from None
    log.info("unsubscribe server at http://%s:%d/", args.host, server.server_port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        db.close_quietly(app.conn)
        log.info("stopped")
