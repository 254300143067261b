"""Small helpers the tests share (fixtures are in conftest.py)."""

import collections
import email
import os
import re
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The password of every login the tests make: it must never show in a log or page.
PASSWORD = "s3cret-Pässwörd-never-logged"


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


def queue_marked(conn, count, prefix="mark"):
    """Insert `count` jobs, each with its own recipient and the marker
    `prefix-N` in its body; return the markers."""
    query(
        conn,
        "INSERT INTO jobs (email, content_message) "
        "SELECT %s || (i - 1) || '@example.com', 'mail with marker:' || %s || '-' || (i - 1)"
        "  FROM generate_series(1, %s) i",
        (prefix, prefix, count),
    )
    return ["%s-%d" % (prefix, i) for i in range(count)]


_MARKER = re.compile(r"marker:(\S+)")


def marker_of(content):
    """The marker in a received mail's decoded body (any MIME structure)."""
    message = email.message_from_bytes(content)
    for part in message.walk():
        if part.get_content_maintype() == "text":
            found = _MARKER.search(part.get_payload(decode=True).decode("utf-8", "replace"))
            if found:
                return found.group(1)
    return None


def copies(smtp):
    """How many times each marker arrived."""
    return collections.Counter(marker_of(content) for _, _, content, _ in list(smtp.received))


def arrivals(smtp):
    """When each marker (last) arrived."""
    return {marker_of(content): at for _, _, content, at in list(smtp.received)}


def in_flight_together(smtp):
    """Markers of which two copies were at the server at the same time (one's MAIL
    FROM came before the other's content ended): two senders of one job at once."""
    spans = collections.defaultdict(list)
    for (_, _, content, arrived), began in zip(list(smtp.received), list(smtp.began)):
        spans[marker_of(content)].append((began or arrived, arrived))
    return sorted(
        m
        for m, s in spans.items()
        if len(s) > 1
        and any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(s) for b in s[i + 1 :])
    )


def assert_every_job_completed_once(conn, smtp, markers, max_duplicates=0, timeout=60.0):
    """Every job completed, each marker arrived, at most `max_duplicates` repeats,
    every repeat the very same mail (one Message-ID), and the queue empty."""
    wait_until(
        lambda: status_counts(conn) == {"completed": len(markers)},
        timeout=timeout,
        what="%d completed jobs (now %s)" % (len(markers), status_counts(conn)),
    )
    sent = copies(smtp)
    missing = set(markers) - set(sent)
    assert not missing, "lost mails: %s" % sorted(missing)[:5]
    assert sum(sent.values()) - len(sent) <= max_duplicates, sent.most_common(3)
    ids = collections.defaultdict(set)
    for _, _, content, _ in list(smtp.received):
        ids[marker_of(content)].add(email.message_from_bytes(content)["Message-ID"])
    assert all(len(i) == 1 for i in ids.values())
    wait_until(lambda: query(conn, "SELECT count(*) FROM queue") == [(0,)], what="an empty queue")


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

        self.port, self.target_port = port, target_port
        self.socket_module, self.threading = socket, threading
        self.server = None
        self.connections = []
        self.flowing = threading.Event()  # cleared: nothing is forwarded (pause)
        self.flowing.set()

    def pause(self):
        """Forward nothing, close nothing: a network cut that TCP does not see
        (each side's data is acknowledged by this machine, and waits here)."""
        self.flowing.clear()

    def resume(self):
        self.flowing.set()

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

    def _pump(self, source, target):
        try:
            while True:
                self.flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self.flowing.wait()
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


def start_queue(scripts, config, consumers=2, *consumer_args):
    """`consumers` consumer.py (with `consumer_args`) and one producer.py, running."""
    started = [
        scripts.start("consumer.py", "--config", config, *consumer_args) for _ in range(consumers)
    ]
    return started + [scripts.start("producer.py", "--config", config)]


def stop_cleanly(scripts, procs):
    """SIGTERM each; each must exit 0 without a traceback."""
    for proc in procs:
        assert scripts.stop(proc) == 0
        assert "Traceback" not in scripts.log_of(proc)


def send_what_is_queued(scripts, config, *consumer_args):
    """producer.py --once, then consumer.py --drain: both must exit 0."""
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain", *consumer_args).returncode == 0
