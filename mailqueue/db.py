"""Connections to PostgreSQL, and the named queries of sql/queries.sql."""

import logging
import os
import re
import select

import psycopg2

log = logging.getLogger(__name__)

SQL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sql")

# What a lost or unreachable server raises; the caller reconnects.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
Error = psycopg2.Error  # anything a query can raise

# TCP keepalives find a connection whose server or network died silently.
_CONNECT_OPTIONS = dict(connect_timeout=10, keepalives=1, keepalives_idle=10,
                        keepalives_interval=5, keepalives_count=3)

_HEADER = re.compile(r"^-- (\w+) --$", re.MULTILINE)


def load_queries(path=os.path.join(SQL_DIR, "queries.sql")):
    """{name: sql} from a file of `-- name --` headers, each followed by one query."""
    with open(path, encoding="utf-8") as f:
        parts = _HEADER.split(f.read())
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2])}


QUERIES = load_queries()

# The queries run for every mail or move: each connection PREPAREs them once, so
# that the server parses and plans them once, not on every run. Not claim_batch:
# its LIMIT is then a parameter, and a plan made while jobs was small (a new
# installation) joins jobs by scanning it whole, until autovacuum next analyzes
# it; planned afresh, with its LIMIT known, it takes about 0.1 ms more.
PREPARED = ("move_ready_jobs", "mark_sent")

_PARAMETER = re.compile(r"%\((\w+)\)s")
_LEADING_COMMENTS = re.compile(r"\A(?:--[^\n]*\n)*")


def prepared_forms(name, sql):
    """(PREPARE statement, EXECUTE statement with %(name)s parameters) for the
    query `name`."""
    sql = _LEADING_COMMENTS.sub("", sql)
    names = []

    def number(match):
        if match.group(1) not in names:
            names.append(match.group(1))
        return "$%d" % (names.index(match.group(1)) + 1)

    prepare = "PREPARE %s AS %s" % (name, _PARAMETER.sub(number, sql))
    arguments = "(%s)" % ", ".join("%%(%s)s" % n for n in names) if names else ""
    return prepare, "EXECUTE %s%s" % (name, arguments)


_FORMS = {name: prepared_forms(name, QUERIES[name]) for name in PREPARED}


class Connection(psycopg2.extensions.connection):
    """A connection that knows which of the PREPARED queries it has prepared and,
    if it is overlapped (see connect), which query it has under way."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared = set()
        self.pending = None  # the cursor of a query start() sent


def run(conn, name, **params):
    """Run the query `name` of sql/queries.sql; its rows, or for a statement that
    returns none, how many rows it changed."""
    if conn.async_:
        start(conn, name, **params)
        return finish(conn)
    with conn.cursor() as cur:
        _execute(conn, cur, name, params)
        return _result(cur)


def start(conn, name, **params):
    """On an overlapped connection: send the query `name` and return at once; the
    query runs while the caller does something else, until finish(conn). A query
    still under way is waited for first."""
    finish(conn)
    cur = conn.cursor()
    _execute(conn, cur, name, params)
    conn.pending = cur


def finish(conn):
    """Wait for the query start() sent on `conn`, if any; its result as run()
    gives it (None if there was none)."""
    cur, conn.pending = conn.pending, None
    if cur is None:
        return None
    try:
        _wait(conn)
        return _result(cur)
    finally:
        cur.close()


def _execute(conn, cur, name, params):
    """Send the query `name` on `cur`; one of PREPARED is prepared first, once
    per connection, and then EXECUTEd (on a Connection of ours: any other runs
    the query as it is)."""
    sql = QUERIES[name]
    if name in _FORMS and isinstance(conn, Connection):
        prepare, sql = _FORMS[name]
        if name not in conn.prepared:
            cur.execute(prepare)
            if conn.async_:
                _wait(conn)
            conn.prepared.add(name)
    cur.execute(sql, params or None)


def _result(cur):
    return cur.fetchall() if cur.description else cur.rowcount


def _wait(conn):
    """Until the overlapped connection `conn` is done with what it was doing."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn], [], [])
        else:  # POLL_WRITE
            select.select([], [conn], [])


class DatabaseUnavailable(Exception):
    """The database cannot be reached; the message is one line without the password."""


def connect(database_settings, application_name, autocommit=False, wait_for_flush=True,
            overlapped=False):
    """A new connection with keepalives, or DatabaseUnavailable.

    wait_for_flush=False sets synchronous_commit off: a commit returns before its
    WAL reaches the disk. Only for writes that a crash may undo harmlessly: the
    producer's moves and the consumer's claims (see consumer.py, "Durability").

    overlapped=True makes an asynchronous connection (always autocommit): start()
    sends a query on it and finish() waits for the result, so that the caller
    can do other work while the server runs the query."""
    options = {} if wait_for_flush else {"options": "-c synchronous_commit=off"}
    try:
        conn = psycopg2.connect(application_name=application_name, **options,
                                connection_factory=Connection, async_=overlapped,
                                **_CONNECT_OPTIONS, **database_settings)
        if overlapped:
            _wait(conn)
    except psycopg2.Error as exc:
        raise DatabaseUnavailable(describe(exc, database_settings)) from None
    if not overlapped:
        conn.autocommit = autocommit
    return conn


def describe(exc, database_settings=None):
    """A one-line description of a database error, never containing the password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    password = (database_settings or {}).get("password")
    if password:
        text = text.replace(password, "***")
    if database_settings:
        return "%s: %s" % (where(database_settings), text)
    return text


def where(database_settings):
    """'database NAME at HOST:PORT', for messages."""
    return "database %s at %s:%s" % (database_settings.get("database", "?"),
                                     database_settings.get("host", "localhost"),
                                     database_settings.get("port", 5432))


def close_quietly(conn):
    if conn is not None and not conn.closed:
        try:
            conn.close()
        except psycopg2.Error:
            pass
