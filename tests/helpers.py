"""Small helpers the tests share (fixtures are in conftest.py)."""

import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(condition, timeout=60.0, what="condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.05)


def query(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None


def status_counts(conn):
    return dict(query(conn, "SELECT status, count(*) FROM jobs GROUP BY status"))


def insert_jobs(conn, rows):
    """rows: (email, content_message, subject) tuples, inserted in one statement."""
    with conn.cursor() as cur:
        values = ",".join(cur.mogrify("(%s, %s, %s)", row).decode() for row in rows)
        cur.execute("INSERT INTO jobs (email, content_message, subject) VALUES " + values)


def recipients(smtp):
    """Every envelope recipient the sink accepted, one entry per mail."""
    return [rcpt for _, rcpts, _, _ in smtp.received for rcpt in rcpts]


def duplicates(smtp):
    """How many accepted mails were a repeat of one accepted before."""
    sent = recipients(smtp)
    return len(sent) - len(set(sent))


class Forwarder:
    """A TCP port that forwards to another (a server that comes up late, or a
    connection that can be cut): listen() starts it, close() ends it all."""

    def __init__(self, port, target_port):
        import socket
        import threading
        self.port, self.target_port = port, target_port
        self.socket_module, self.threading = socket, threading
        self.server = None
        self.connections = []

    def listen(self):
        socket = self.socket_module
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", self.port))
        self.server.listen(64)
        self.threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = self.socket_module.create_connection(("127.0.0.1", self.target_port))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self.threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, target):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        if self.server is not None:
            self.server.close()
        for s in self.connections:
            try:
                s.close()
            except OSError:
                pass
