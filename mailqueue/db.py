"""Connections to PostgreSQL, and the named queries of sql/queries.sql."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import psycopg2

# The queries, and where they are read from (mailqueue.sqlfile: no driver needed).
from mailqueue.sqlfile import QUERIES, SQL_DIR, load_queries  # noqa: F401

log = logging.getLogger(__name__)

# What a lost or unreachable server raises; the caller reconnects.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
Error = psycopg2.Error  # anything a query can raise
DataError = psycopg2.DataError  # a value the statement cannot take
IntegrityError = psycopg2.IntegrityError  # a constraint the statement would break

# A connection attempt gives up after 5 s (a cut network heals into a new
# connection that soon). TCP keepalives find a connection whose server or network
# died silently while it is idle (about 11 s); tcp_user_timeout while data waits
# for its acknowledgement (10 s), where retransmissions alone would take minutes.
_CONNECT_OPTIONS = dict(
    connect_timeout=5,
    keepalives=1,
    keepalives_idle=5,
    keepalives_interval=2,
    keepalives_count=3,
    tcp_user_timeout=10000,
)

# No query is PREPAREd: SQL-level PREPARE breaks behind a pooler in transaction
# mode (the next transaction may run on another server connection), and the hot
# queries each carry many mails (a claimed batch, a group of outcomes), so parsing
# them is a small share of their cost.

# A prefix for the statements of a connection made with wait_for_flush=False (see
# connect): one simple query is one transaction, so SET LOCAL lasts for exactly
# that statement, even behind a pooler, where a session's SET would leak.
_NO_FLUSH = "SET LOCAL synchronous_commit TO off; "


class Connection(psycopg2.extensions.connection):
    """A connection that knows whether its commits wait for the disk, and how
    long one round trip may take (`deadline`, seconds; None: no limit)."""

    no_flush = False
    deadline: float | None = None


class _Watchdog:
    """Cuts the socket of a connection whose round trip outlives its deadline.

    A network cut that a proxy or a middlebox hides (the packets acknowledged,
    nothing forwarded) leaves a query waiting for ever: TCP keepalives and
    tcp_user_timeout see nothing wrong. psycopg2 has no timeout of its own for a
    round trip, so one thread per process watches them: past its deadline, the
    connection's socket is shut down, the waiting query raises OperationalError,
    and the caller reconnects as after any lost connection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.watched: dict[int, tuple[float, Connection]] = {}
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None

    def watch(self, conn: Connection) -> int:
        key = id(conn)
        with self.lock:
            self.watched[key] = (time.monotonic() + conn.deadline, conn)  # type: ignore[operator]
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="db-watchdog", daemon=True)
                self.thread.start()
        return key

    def done(self, key: int) -> None:
        with self.lock:
            self.watched.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_STEP)
            now = time.monotonic()
            with self.lock:
                late = [conn for at, conn in self.watched.values() if at < now]
            for conn in late:
                log.warning(
                    "a database round trip took longer than %g s: the connection is given up",
                    conn.deadline,
                )
                try:
                    socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)
                except (OSError, psycopg2.Error):
                    pass
                with self.lock:
                    self.watched = {k: v for k, v in self.watched.items() if v[1] is not conn}


WATCH_STEP = 0.5  # seconds between two looks of the watchdog
_watchdog = _Watchdog()


def _execute(cur: Any, conn: Any, sql: str, params: Any) -> None:
    deadline = getattr(conn, "deadline", None)
    if deadline is None:
        cur.execute(sql, params)
        return
    key = _watchdog.watch(conn)
    try:
        cur.execute(sql, params)
    finally:
        _watchdog.done(key)


def run(conn: psycopg2.extensions.connection, name: str, **params: Any) -> Any:
    """Run the query `name` of sql/queries.sql in its own transaction (`conn` is
    in autocommit mode); its rows, or for a statement that returns none, how
    many rows it changed."""
    sql = QUERIES[name]
    if getattr(conn, "no_flush", False):  # any psycopg2 connection will do
        sql = _NO_FLUSH + sql
    with conn.cursor() as cur:
        _execute(cur, conn, sql, params or None)
        return cur.fetchall() if cur.description else cur.rowcount


def run_dicts(
    conn: psycopg2.extensions.connection, name: str, **params: Any
) -> list[dict[str, Any]]:
    """run() for a query that returns rows: each row as a dict by column name."""
    with conn.cursor() as cur:
        _execute(cur, conn, QUERIES[name], params or None)
        names = [column.name for column in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


class DatabaseUnavailable(Exception):
    """The database cannot be reached; the message is one line without the password.
    `fatal`: waiting will not help (see is_fatal)."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def connect(
    database_settings: dict[str, Any],
    application_name: str,
    wait_for_flush: bool = True,
    deadline: float | None = None,
) -> Connection:
    """A new autocommit connection with keepalives, or DatabaseUnavailable.

    wait_for_flush=False runs its statements with synchronous_commit off: a commit
    returns before its WAL reaches the disk. Only for writes that a crash may undo
    harmlessly: the producer's moves (a move undone leaves the job available; and
    a consumer's claim, which waits for the disk, makes every move before it
    durable too, the WAL being one sequence).

    `deadline`: seconds one round trip may take before the connection is given
    up (see _Watchdog); None for no limit."""
    try:
        conn = psycopg2.connect(
            application_name=application_name,
            connection_factory=Connection,
            **_CONNECT_OPTIONS,
            **database_settings,
        )
    except psycopg2.Error as exc:
        raise DatabaseUnavailable(describe(exc, database_settings), is_fatal(exc)) from None
    conn.autocommit = True
    conn.no_flush = not wait_for_flush
    conn.deadline = deadline
    return conn


def is_fatal(exc: BaseException) -> bool:
    """Whether a failed connection attempt is one that waiting cannot fix (a
    password refused, no such database or role, the server refusing this client),
    as opposed to a server that is not up yet or cannot be reached."""
    text = str(exc)
    return any(marker in text for marker in _FATAL_CONNECT_ERRORS)


_FATAL_CONNECT_ERRORS = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "no pg_hba.conf entry",
    "authentication failed",
    "permission denied",
    "invalid connection option",
    "unsupported startup parameter",
)


def describe(exc: BaseException, database_settings: dict[str, Any] | None = None) -> str:
    """A one-line description of a database error, never containing the password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    password = (database_settings or {}).get("password")
    if password:
        text = text.replace(password, "***")
    if database_settings:
        return "%s: %s" % (where(database_settings), text)
    return text


def where(database_settings: dict[str, Any]) -> str:
    """'database NAME at HOST:PORT', for messages."""
    return "database %s at %s:%s" % (
        database_settings.get("database", "?"),
        database_settings.get("host", "localhost"),
        database_settings.get("port", 5432),
    )


def close_quietly(conn: psycopg2.extensions.connection | None) -> None:
    if conn is not None and not conn.closed:
        try:
            conn.close()
        except psycopg2.Error:
            pass
