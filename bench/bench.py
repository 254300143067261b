"""Benchmarks: throughput, latency, history, memory and insert cost, side by side
with the seed-style loop. Prints a table; asserts nothing.

    scripts/bench            # the full run (several minutes)
    scripts/bench --quick    # smaller sizes, under 2 minutes

It starts a throwaway PostgreSQL (default settings: fsync and synchronous_commit
on, as in production) and Postfix's smtp-sink, a fast SMTP sink written in C
(installed from Debian's postfix package if missing and this runs as root), and
measures the sink's own ceiling first so that it is shown not to be the limit.
Latency is measured with a minimal SMTP sink in its own process
(bench/timing_sink.py), which records when each mail arrives.

On a shared machine, minutes apart can differ by a third: whatever is compared
(ours and the seed-style loop, with and without history) is measured in turns,
and the CPU time the hypervisor gave to other machines is printed beside the
latency figures, whose tail it sets.
"""

import argparse
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import time

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mailqueue.devservers import (  # noqa: E402
    ThrowawayPostgres, apply_schema, free_port, run_sql)
from timing_sink import TimingSink  # noqa: E402

BODY = ("Kính gửi quý khách, đơn hàng của bạn đã được xác nhận và sẽ được giao trong "
        "hai ngày làm việc. Cảm ơn bạn đã mua sắm cùng chúng tôi! ") * 7  # ~1 KB of UTF-8
PG_SETTINGS = ("max_connections=300",)


# --------------------------------------------------------------------------- servers

def start_smtp_sink():
    """Postfix's smtp-sink on a free port; (port, process)."""
    path = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(path) and os.geteuid() == 0 and shutil.which("apt-get"):
        print("Installing Debian's postfix for smtp-sink ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], **quiet).returncode:
            subprocess.run(["apt-get", "update", "-q"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], **quiet)
        subprocess.run(["postfix", "stop"], **quiet)  # the package may start its daemon
    if not os.path.exists(path):
        raise SystemExit("error: smtp-sink not found; install Debian's postfix package")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([path] + user + ["-8", "127.0.0.1:%d" % port, "1000"])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port, proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("error: smtp-sink did not start")


def _blast(port, count, data):
    smtp = smtplib.SMTP("127.0.0.1", port)
    for _ in range(count):
        smtp.sendmail("noreply@example.com", ["sink@example.com"], data)
    smtp.quit()


def sink_ceiling(port, total):
    """Mails/s the sink takes from 4 processes sending ready-made bytes."""
    data = ("Subject: x\r\n\r\n" + BODY).encode("utf-8")
    started = time.monotonic()
    procs = [multiprocessing.Process(target=_blast, args=(port, total // 4, data))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return total / (time.monotonic() - started)


class Lab:
    """A throwaway PostgreSQL with a schema template; one fresh database per run."""

    def __init__(self, smtp_port, folder):
        self.pg = ThrowawayPostgres(settings=PG_SETTINGS).start()
        self.smtp_port = smtp_port
        self.folder = folder
        self.admin("CREATE DATABASE bench_template")
        apply_schema(self.pg.dsn("bench_template"))
        self.count = 0

    def admin(self, sql):
        run_sql(self.pg.dsn(), sql)

    def fresh(self, smtp_port=None):
        """A new database from the template; (connection, config path)."""
        self.count += 1
        name = "bench_%d" % self.count
        self.admin("CREATE DATABASE %s TEMPLATE bench_template" % name)
        conn = psycopg2.connect(self.pg.dsn(name))
        conn.autocommit = True
        return conn, self.config(conn, smtp_port)

    def config(self, conn, smtp_port=None):
        """The path of a config file for the scripts: conn's database, and the
        SMTP server on smtp_port (default: the throughput sink)."""
        name, port = conn.info.dbname, smtp_port or self.smtp_port
        path = os.path.join(self.folder, "%s-%d.json" % (name, port))
        with open(path, "w") as f:
            json.dump({"database": self.pg.settings_for(name),
                       "smtp": {"host": "127.0.0.1", "port": port}}, f)
        return path

    def stop(self):
        self.pg.stop()


def script(name, *args):
    return [sys.executable, os.path.join(ROOT, name), "--log-level", "WARNING"] + list(args)


def insert_jobs(conn, count, prefix="user"):
    conn.cursor().execute(
        "INSERT INTO jobs (email, subject, content_message) "
        "SELECT %s || i || '@example.com', 'Đơn hàng số ' || i, %s "
        "FROM generate_series(1, %s) i", (prefix, BODY, count))


def add_history(conn, rows):
    """`rows` completed jobs, as a long-running installation accumulates."""
    conn.cursor().execute(
        "INSERT INTO jobs (email, subject, content_message, status, attempts, start_time, "
        "end_time, created_at, run_at) "
        "SELECT 'old' || i || '@example.com', 'Old mail ' || i, %s, 'completed', 1, "
        "now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', "
        "now() - interval '1 day' FROM generate_series(1, %s) i", (BODY[:200], rows))
    conn.cursor().execute("VACUUM ANALYZE jobs")
    conn.cursor().execute("CHECKPOINT")  # history is old: its writes are not part of the run


def completed(conn):
    """Jobs completed, the history left aside (a full count: only at the end)."""
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM jobs WHERE status = 'completed' "
                "AND email NOT LIKE 'old%%'")
    return cur.fetchone()[0]


def pending(conn):
    """Jobs not yet finished, cheaply (queue rows, and ready jobs by their index)."""
    cur = conn.cursor()
    cur.execute("SELECT (SELECT count(*) FROM queue) + (SELECT count(*) FROM jobs "
                "WHERE status IN ('available', 'failed'))")
    return cur.fetchone()[0]


def wait_listening(conn, count):
    """Until `count` of the scripts' connections have run their LISTEN."""
    cur = conn.cursor()
    for _ in range(600):
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE '%%(listen)' AND query ILIKE 'listen%%'")
        if cur.fetchone()[0] >= count:
            return
        time.sleep(0.05)
    raise SystemExit("error: the scripts did not start listening")


# --------------------------------------------------------------------------- goals

def in_turns(rounds, *measures):
    """Call each of `measures` in turn, `rounds` times; a list of results per
    measure. On a shared machine, minutes apart can differ by a third: taking
    turns puts the slower and faster minutes on every side of a comparison."""
    results = [[] for _ in measures]
    for _ in range(rounds):
        for measure, got in zip(measures, results):
            got.append(measure())
    return results


def burn_down(lab, count, command, database=None):
    """Queue `count` jobs, then time `command` (a list, given the config path) until it
    exits; mails/s. In a fresh database, or in `database` (connection, config path)."""
    conn, config = database or lab.fresh()
    before = completed(conn)
    insert_jobs(conn, count)
    subprocess.run(script("producer.py", "--config", config, "--once"), check=True)
    started = time.monotonic()
    subprocess.run(command(config), check=True)
    elapsed = time.monotonic() - started
    done = completed(conn) - before
    if database is None:
        conn.close()
    if done != count:
        raise SystemExit("error: %d of %d jobs completed" % (done, count))
    return count / elapsed


class StolenTime:
    """The share of CPU time the hypervisor gave to other machines while this
    ran (the `steal` of /proc/stat): on a shared VM, what stalls the tail."""

    def __init__(self):
        self.start = self._read()

    def share(self):
        """Since this object was made."""
        end = self._read()
        spent = sum(end) - sum(self.start)
        return (end[7] - self.start[7]) / spent if spent else 0.0

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                return [int(n) for n in f.readline().split()[1:9]]
        except OSError:  # not Linux
            return [0] * 8


def _latency_sink(port, conn):
    """In its own process: a TimingSink, reporting its arrival times when told to stop."""
    sink = TimingSink(port)
    conn.send("ready")
    conn.recv()  # until told to stop
    sink.close()
    conn.send(dict(sink.arrivals))


def latency(lab, rate, seconds, database=None):
    """Insert jobs at `rate` per second, one transaction each, with producer and
    consumer running; time from each INSERT's commit to the mail's arrival.
    (delays in ms, share of CPU time stolen meanwhile). In a fresh database, or
    in `database` (connection, config path)."""
    port = free_port()
    ours, theirs = multiprocessing.Pipe()
    # daemon: should this run fail, the sink is stopped with the bench, not waited for
    sink = multiprocessing.Process(target=_latency_sink, args=(port, theirs), daemon=True)
    sink.start()
    ours.recv()
    if database:
        conn, config = database[0], lab.config(database[0], port)
    else:
        conn, config = lab.fresh(smtp_port=port)
    procs = [subprocess.Popen(script("consumer.py", "--config", config)),
             subprocess.Popen(script("producer.py", "--config", config))]
    committed = {}
    try:
        wait_listening(conn, 1 + 1)  # the consumer's first worker, and the producer
        cur = conn.cursor()
        stolen = StolenTime()
        started = time.monotonic()
        for i in range(int(rate * seconds)):
            address = "lat%d@example.com" % i
            cur.execute("INSERT INTO jobs (email, subject, content_message) "
                        "VALUES (%s, %s, %s)", (address, "Độ trễ", BODY))
            committed[address] = time.time()
            pause = started + (i + 1) / rate - time.monotonic()  # pacing the load
            if pause > 0:
                time.sleep(pause)
        stolen = stolen.share()
        deadline = time.monotonic() + 30
        while pending(conn) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait()
    ours.send("stop")
    arrivals = ours.recv()
    sink.join()
    if database is None:
        conn.close()
    delays = [(arrivals[a] - t) * 1000 for a, t in committed.items() if a in arrivals]
    if len(delays) != len(committed):
        raise SystemExit("error: %d of %d mails arrived" % (len(delays), len(committed)))
    return delays, stolen


def pooled(runs):
    """(p50, p99, mean share of CPU time stolen) of latency() runs taken together."""
    delays = sorted(d for run, _ in runs for d in run)
    stolen = statistics.mean(share for _, share in runs)
    return statistics.median(delays), delays[int(len(delays) * 0.99) - 1], stolen


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def memory(lab, count):
    """A single-worker consumer's RSS after 1,000 mails and after `count`."""
    conn, config = lab.fresh()
    insert_jobs(conn, count)
    subprocess.run(script("producer.py", "--config", config, "--once"), check=True)
    proc = subprocess.Popen(script("consumer.py", "--config", config, "--concurrency", "1"))
    early = late = None
    try:
        while True:
            left = pending(conn)
            if early is None and count - left >= 1000:
                early = rss_mb(proc.pid)
            if left <= 20:  # the last batch: nearly all sent, and the process still up
                late = rss_mb(proc.pid)
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    conn.close()
    return early, late


def insert_cost(lab, bulk, singles):
    """(bulk INSERT ratio, single-row INSERTs ratio): time with the NOTIFY
    triggers over time without, in turns. The bulk statement: median of 3 runs
    each. The single rows: in blocks of 500, summed, so that the machine's slow
    moments (each INSERT waits for the disk) fall on both sides alike."""
    conn, _ = lab.fresh()
    cur = conn.cursor()
    numbers = itertools.count()

    def timed(triggers, action):
        cur.execute("ALTER TABLE jobs %s TRIGGER USER" % ("ENABLE" if triggers else "DISABLE"))
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    def one_statement(triggers):
        cur.execute("TRUNCATE jobs CASCADE")
        return timed(triggers, lambda: insert_jobs(conn, bulk))

    def single_rows():
        for i in itertools.islice(numbers, 500):
            cur.execute("INSERT INTO jobs (email, content_message) VALUES (%s, %s)",
                        ("one%d@example.com" % i, "hello"))

    on, off = in_turns(3, lambda: one_statement(True), lambda: one_statement(False))
    bulk_ratio = statistics.median(on) / statistics.median(off)
    cur.execute("TRUNCATE jobs CASCADE")
    on, off = in_turns(singles // 500, lambda: timed(True, single_rows),
                       lambda: timed(False, single_rows))
    conn.close()
    return bulk_ratio, sum(on) / sum(off)


# --------------------------------------------------------------------------- report

def main():
    parser = argparse.ArgumentParser(description="Benchmarks; prints a table.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under 2 minutes")
    args = parser.parse_args()
    size = dict(burn=5000, seed=2000, history=100_000, lat_seconds=10, memory=10_000,
                bulk=20_000, singles=2000) if args.quick else dict(
        burn=20_000, seed=10_000, history=1_000_000, lat_seconds=30, memory=100_000,
        bulk=100_000, singles=10_000)

    folder = os.path.join(ROOT, "bench", "output")
    os.makedirs(folder, exist_ok=True)
    port, sink = start_smtp_sink()
    lab = Lab(port, folder)
    rows = []

    def row(figure, value, goal="", seed=""):
        rows.append((figure, value, goal, seed))
        print("  %-44s %-22s %-14s %s" % (figure, value, goal, seed), flush=True)

    stolen_in_run = StolenTime()
    try:
        print("PostgreSQL %s (default durability), smtp-sink, %d cores, Python %s"
              % (lab.pg.version(), os.cpu_count(), sys.version.split()[0]))
        row("figure", "value", "goal", "seed-style loop")
        row("smtp-sink ceiling (4 senders, ready bytes)",
            "%.0f mails/s" % sink_ceiling(port, 40_000 if not args.quick else 20_000))

        def consumer(config):
            return script("consumer.py", "--config", config, "--drain")

        def seed_loop(config):
            return [sys.executable, os.path.join(ROOT, "bench", "seed_loop.py"), config, "2"]

        ours, seed = in_turns(3, lambda: burn_down(lab, size["burn"], consumer),
                              lambda: burn_down(lab, size["seed"], seed_loop))
        ours, seed = statistics.median(ours), statistics.median(seed)
        row("1. burn-down of %d queued mails" % size["burn"], "%.0f mails/s" % ours,
            ">= 2500/s", "%.0f mails/s (%d mails)" % (seed, size["seed"]))
        row("   ratio to the seed-style loop", "%.1fx" % (ours / seed), ">= 3.5x")

        history = lab.fresh()
        add_history(history[0], size["history"])
        runs = in_turns(2, lambda: latency(lab, 50, size["lat_seconds"] / 2),
                        lambda: latency(lab, 50, size["lat_seconds"] / 2, database=history))
        (p50, p99, stolen), (hp50, hp99, hstolen) = [pooled(r) for r in runs]
        row("2. latency at 50 jobs/s, p50", "%.1f ms" % p50, "<= 5 ms")
        row("   latency at 50 jobs/s, p99", "%.1f ms" % p99, "<= 10 ms",
            "(CPU stolen by the host meanwhile: %.1f%%)" % (stolen * 100))

        empty, full = in_turns(2, lambda: burn_down(lab, size["burn"], consumer),
                               lambda: burn_down(lab, size["burn"], consumer, database=history))
        empty, full = statistics.median(empty), statistics.median(full)
        row("3. burn-down with %d completed jobs" % size["history"],
            "%.0f mails/s (%+.1f%%)" % (full, (full / empty - 1) * 100),
            "within 10%", "(%.0f mails/s without, same turns)" % empty)
        row("   latency p50 / p99 with that history", "%.1f / %.1f ms" % (hp50, hp99),
            "within 10%", "(CPU stolen by the host meanwhile: %.1f%%)" % (hstolen * 100))
        history[0].close()

        early, late = memory(lab, size["memory"])
        row("4. consumer RSS after 1,000 / %d mails" % size["memory"],
            "%.1f / %.1f MB (%+.1f)" % (early, late, late - early), "within 10 MB")

        bulk, singles = insert_cost(lab, size["bulk"], size["singles"])
        row("5. INSERT of %d jobs, triggers on/off" % size["bulk"], "%.2fx" % bulk, "<= 1.5x")
        row("   %d single-row INSERTs, on/off" % size["singles"], "%.2fx" % singles, "<= 1.5x")
        row("CPU time stolen by the host, whole run", "%.1f%%" % (stolen_in_run.share() * 100))
    finally:
        lab.stop()
        sink.kill()
    with open(os.path.join(folder, "results.txt"), "w") as f:
        for r in rows:
            f.write("| %s |\n" % " | ".join(r))


if __name__ == "__main__":
    main()
