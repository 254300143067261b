"""Connections to PostgreSQL, and the named queries of sql/queries.sql."""

import logging
import os
import re

import psycopg2

log = logging.getLogger(__name__)

SQL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sql")

# What a lost or unreachable server raises; the caller reconnects.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)

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


def run(conn, name, **params):
    """Run the query `name` of sql/queries.sql; its rows, or for a statement that
    returns none, how many rows it changed."""
    with conn.cursor() as cur:
        cur.execute(QUERIES[name], params or None)
        return cur.fetchall() if cur.description else cur.rowcount


class DatabaseUnavailable(Exception):
    """The database cannot be reached; the message is one line without the password."""


def connect(database_settings, application_name, autocommit=False, wait_for_flush=True):
    """A new connection with keepalives, or DatabaseUnavailable.

    wait_for_flush=False sets synchronous_commit off: a commit returns before its
    WAL reaches the disk. Only for writes that a crash may undo harmlessly: the
    producer's moves and the consumer's claims (see consumer.py, "Durability")."""
    options = {} if wait_for_flush else {"options": "-c synchronous_commit=off"}
    try:
        conn = psycopg2.connect(application_name=application_name, **options,
                                **_CONNECT_OPTIONS, **database_settings)
    except psycopg2.Error as exc:
        raise DatabaseUnavailable(describe(exc, database_settings)) from None
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
