"""Benchmarks: throughput, latency, history, memory and insert cost, a remote
relay, a global rate limit and a provider's quota; side by side with the
seed-style loop, and with the consumer of an older commit (--baseline). Prints a
table of figures beside the targets of the issues; asserts nothing.

    scripts/bench                          # every scenario (about 15 minutes)
    scripts/bench --quick                  # smaller sizes
    scripts/bench --only relay,rate        # some scenarios (names: see --help)
    scripts/bench --baseline 743873b~1     # the old consumer too, in turns

It starts a throwaway PostgreSQL (default settings: fsync and synchronous_commit
on, as in production) and Postfix's smtp-sink, a fast SMTP sink written in C
(installed from Debian's postfix package if missing and this runs as root), and
measures the sink's own ceiling first so that it is shown not to be the limit.
Latency, the rate limit and the quota are measured with a minimal SMTP sink in
its own process (bench/timing_sink.py, bench/quota_sink.py), which records when
each mail arrives. The remote relay is smtp-sink behind bench/delay_proxy.c, a
proxy that delays every chunk 25 ms each way (compiled here with cc; without
one, the asyncio bench/delay_proxy.py, which costs more CPU).

For issues 17-19: `poison` (2,000 mails beside one job whose recipient
bench/poison_sink.py answers 451/450 at RCPT for ever, each reply in turn, and
without it), `dblatency` (the delay proxy in front of PostgreSQL: 0, 2, 10 ms
each way), `bigattach` (64 jobs of 15 MB at N=32: peak PSS, first mail, all
intact), `tworelays` (round robin over two delayed relays beside one; skipped
while the consumer refuses a `relays` config) and `enqueue`
(bench/enqueue_rate.py, when there).

With --baseline REF the files of that commit are exported (git archive) into
bench/output/ and its consumer and producer run on a database made with its own
schema, in turns with today's.

On a shared machine, minutes apart can differ by a third: whatever is compared
(ours and the seed-style loop, with and without history, old and new) is
measured in turns, and the CPU time the hypervisor gave to other machines is
printed beside the latency figures, whose tail it sets.
"""

import argparse
import dataclasses
import hashlib
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
from typing import Optional

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/devservers.py: throwaway servers

from build_cost import build_costs  # noqa: E402
from timing_sink import TimingSink  # noqa: E402

from devservers import (  # noqa: E402
    ThrowawayPostgres,
    apply_schema,
    free_port,
    run_sql,
)

BODY = (
    "Kính gửi quý khách, đơn hàng của bạn đã được xác nhận và sẽ được giao trong "
    "hai ngày làm việc. Cảm ơn bạn đã mua sắm cùng chúng tôi! "
) * 7  # ~1 KB of UTF-8
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
    wait_for_port(port, "smtp-sink")
    return port, proc


def wait_for_port(port, what):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("error: %s did not start" % what)


def start_delay_proxy(folder, target_port, delay_ms):
    """bench/delay_proxy.c (compiled into `folder` with cc), or its asyncio
    fallback without a compiler; (port, process, which)."""
    source = os.path.join(ROOT, "bench", "delay_proxy.c")
    binary = os.path.join(folder, "delay_proxy")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler and (
        not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source)
    ):
        subprocess.run([compiler, "-O2", "-o", binary, source], check=True)
    if compiler:
        command, which = [binary], "C"
    else:
        command, which = [sys.executable, os.path.join(ROOT, "bench", "delay_proxy.py")], "asyncio"
    port = free_port()
    proc = subprocess.Popen(
        command + [str(port), str(target_port), str(delay_ms)], stdout=subprocess.PIPE
    )
    if proc.stdout.readline().strip() != b"ready":
        raise SystemExit("error: the delay proxy did not start")
    return port, proc, which


def _blast(port, count, data):
    smtp = smtplib.SMTP("127.0.0.1", port)
    for _ in range(count):
        smtp.sendmail("noreply@example.com", ["sink@example.com"], data)
    smtp.quit()


def sink_ceiling(port, total):
    """Mails/s the sink takes from 4 processes sending ready-made bytes."""
    data = ("Subject: x\r\n\r\n" + BODY).encode("utf-8")
    started = time.monotonic()
    procs = [
        multiprocessing.Process(target=_blast, args=(port, total // 4, data)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return total / (time.monotonic() - started)


def _sink_process(port, conn, quota, poison, digest):
    """In its own process: a TimingSink (or a QuotaSink of `quota` mails/s),
    reporting (arrival times by recipient, throttled replies) when told to stop;
    or, given `poison` (a dict, maybe empty), a PoisonSink, reporting its report()."""
    if poison is not None:
        from poison_sink import PoisonSink

        sink = PoisonSink(port, poison, digest)
    elif quota:
        from quota_sink import QuotaSink

        sink = QuotaSink(port, quota)
    else:
        sink = TimingSink(port)
    conn.send("ready")
    conn.recv()  # until told to stop
    sink.close()
    if poison is not None:
        conn.send(sink.report())
    else:
        conn.send((dict(sink.arrivals), getattr(sink, "throttled", 0)))


class SinkProcess:
    """A timing (or quota, or poison) sink in a daemon process: should a run
    fail, it is stopped with the bench, not waited for. `poison`: {address: reply
    at RCPT} for bench/poison_sink.py ({} for the same server without poison),
    `digest`: it hashes each mail's largest part."""

    def __init__(self, quota=None, poison=None, digest=False):
        self.port = free_port()
        self.ours, theirs = multiprocessing.Pipe()
        self.proc = multiprocessing.Process(
            target=_sink_process, args=(self.port, theirs, quota, poison, digest), daemon=True
        )
        self.proc.start()
        self.ours.recv()

    def stop(self):
        """(arrival times by recipient, throttled replies); a poison sink's report()."""
        self.ours.send("stop")
        result = self.ours.recv()
        self.proc.join()
        return result


class Build:
    """A version of the scripts: today's (this checkout), or an older commit's
    files exported into bench/output/ for --baseline."""

    def __init__(self, root, label, template):
        self.root, self.label, self.template = root, label, template

    @classmethod
    def current(cls):
        return cls(ROOT, "new", "bench_template")

    @classmethod
    def exported(cls, ref, folder):
        if os.path.isfile(os.path.join(ref, "consumer.py")):  # a folder: a patched copy
            root = os.path.abspath(ref)
            tag = "".join(c if c.isalnum() else "_" for c in os.path.basename(root))
            return cls(root, "old %s" % os.path.basename(root), "bench_template_%s" % tag)
        sha = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", ref],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        root = os.path.join(folder, "baseline-%s" % sha)
        if not os.path.exists(os.path.join(root, "consumer.py")):
            os.makedirs(root, exist_ok=True)
            archive = subprocess.run(
                ["git", "-C", ROOT, "archive", sha], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
        return cls(root, "old %s" % sha, "bench_template_%s" % sha)

    @property
    def threaded(self):
        """Whether its consumer keeps many mails in flight per process (the
        rebuild); before it, each mail in flight was a process with two
        database connections, and 128 of them would not fit."""
        with open(os.path.join(self.root, "consumer.py"), encoding="utf-8") as f:
            return "--processes" in f.read()

    def script(self, name, *args):
        return [sys.executable, os.path.join(self.root, name), "--log-level", "WARNING"] + list(
            args
        )

    def consumer(self, *args):
        """The command (given a config path) of a draining consumer."""
        return lambda config: self.script("consumer.py", "--config", config, "--drain", *args)


def seed_loop(config):
    return [sys.executable, os.path.join(ROOT, "bench", "seed_loop.py"), config, "2"]


class Lab:
    """A throwaway PostgreSQL with a schema template per build; one fresh database per run."""

    def __init__(self, smtp_port, folder, builds):
        self.pg = ThrowawayPostgres(settings=PG_SETTINGS).start()
        self.smtp_port = smtp_port
        self.folder = folder
        for build in builds:
            self.admin("CREATE DATABASE %s" % build.template)
            apply_schema(self.pg.dsn(build.template), os.path.join(build.root, "sql", "schema.sql"))
        self.count = 0

    def admin(self, sql):
        run_sql(self.pg.dsn(), sql)

    def fresh(self, build, smtp_port=None, queue=None, database_port=None):
        """A new database from the build's template; (connection, config path)."""
        self.count += 1
        name = "bench_%d" % self.count
        self.admin("CREATE DATABASE %s TEMPLATE %s" % (name, build.template))
        conn = psycopg2.connect(self.pg.dsn(name))
        conn.autocommit = True
        return conn, self.config(conn, smtp_port, queue, database_port)

    def config(self, conn, smtp_port=None, queue=None, database_port=None):
        """The path of a config file for the scripts: conn's database, the SMTP
        server on smtp_port (default: the throughput sink), the `queue` section.
        With database_port (a delay proxy in front of PostgreSQL), the scripts'
        queries go through that port and LISTEN goes direct (listen_database)."""
        name, port = conn.info.dbname, smtp_port or self.smtp_port
        path = os.path.join(self.folder, "%s-%d.json" % (name, port))
        settings = {
            "database": self.pg.settings_for(name),
            "smtp": {"host": "127.0.0.1", "port": port},
        }
        if database_port:
            settings["database"]["port"] = database_port
            settings["listen_database"] = {"port": self.pg.port}
        if queue:
            settings["queue"] = queue
        with open(path, "w") as f:
            json.dump(settings, f)
        return path

    def postgres_cpu(self):
        """CPU seconds PostgreSQL has used so far: every live server process, and
        the ones that ended (the postmaster's reaped children)."""
        with open(os.path.join(self.pg.folder, "data", "postmaster.pid")) as f:
            postmaster = int(f.readline())
        total = 0
        for pid, ppid, fields in processes():
            if pid == postmaster:
                total += sum(int(n) for n in fields[11:15])  # utime stime cutime cstime
            elif ppid == postmaster:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.pg.stop()


def processes():
    """(pid, ppid, fields of /proc/PID/stat after the command name) of every process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(entry), int(fields[1]), fields


def tree(root):
    """root's pid and those of all its descendants."""
    children = {}
    for pid, ppid, _ in processes():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def pss_mb(root):
    """The proportional set size of a process and its descendants, summed: what
    they cost in memory together (shared pages counted once)."""
    total = 0
    for pid in tree(root):
        try:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


def process_cpu(pid):
    """CPU seconds of one live process (utime + stime)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def insert_jobs(conn, count, prefix="user"):
    conn.cursor().execute(
        "INSERT INTO jobs (email, subject, content_message) "
        "SELECT %s || i || '@example.com', 'Đơn hàng số ' || i, %s "
        "FROM generate_series(1, %s) i",
        (prefix, BODY, count),
    )


def add_history(conn, rows):
    """`rows` completed jobs, as a long-running installation accumulates."""
    conn.cursor().execute(
        "INSERT INTO jobs (email, subject, content_message, status, attempts, start_time, "
        "end_time, created_at, run_at) "
        "SELECT 'old' || i || '@example.com', 'Old mail ' || i, %s, 'completed', 1, "
        "now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', "
        "now() - interval '1 day' FROM generate_series(1, %s) i",
        (BODY[:200], rows),
    )
    conn.cursor().execute("VACUUM ANALYZE jobs")
    conn.cursor().execute("CHECKPOINT")  # history is old: its writes are not part of the run


def completed(conn):
    """Jobs completed, the history left aside (a full count: only at the end)."""
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM jobs WHERE status = 'completed' AND email NOT LIKE 'old%%'")
    return cur.fetchone()[0]


def statuses(conn):
    cur = conn.cursor()
    cur.execute("SELECT status, count(*) FROM jobs GROUP BY status")
    return dict(cur.fetchall())


def pending(conn):
    """Jobs not yet finished, cheaply (queue rows, and ready jobs by their index)."""
    cur = conn.cursor()
    cur.execute(
        "SELECT (SELECT count(*) FROM queue) + (SELECT count(*) FROM jobs "
        "WHERE status IN ('available', 'failed'))"
    )
    return cur.fetchone()[0]


def wait_listening(conn, count):
    """Until at least `count` of the scripts' connections have run their LISTEN,
    and no more come for half a second (today's consumer listens in each process)."""
    cur = conn.cursor()
    seen, steady_since = 0, None
    for _ in range(600):
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE '%%(listen)%%' AND query ILIKE 'listen%%'"
        )
        now_seen = cur.fetchone()[0]
        if now_seen != seen:
            seen, steady_since = now_seen, time.monotonic()
        elif seen >= count and time.monotonic() - steady_since >= 0.5:
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


class Run:
    """What one timed run of a command showed."""

    def __init__(self, mails, elapsed, cpu, pg_cpu, connections, pss, work):
        self.mails, self.elapsed = mails, elapsed
        self.rate = mails / elapsed
        self.cpu_per_mail = cpu / mails * 1e6  # µs in the command's processes
        self.pg_per_mail = pg_cpu / mails * 1e6  # µs in PostgreSQL
        self.connections = connections  # peak, from pg_stat_activity
        self.pss = pss  # peak MB, the command's processes
        # per mail: transactions committed, WAL flushes (fsyncs), WAL bytes, rows written
        self.work = {key: value / mails for key, value in work.items()}

    def work_text(self):
        w = self.work
        return "%.2f commits, %.2f fsyncs, %.0f B WAL, %.1f rows written" % (
            w["commits"],
            w["fsyncs"],
            w["wal_bytes"],
            w["rows"],
        )


def database_work(cur):
    """Counters of the work PostgreSQL did (cur's database; WAL: the cluster)."""
    cur.execute("SELECT pg_stat_clear_snapshot()")
    # WAL flushes: pg_stat_wal.wal_sync up to PostgreSQL 17, pg_stat_io from 18 on.
    fsyncs = (
        "wal_sync"
        if cur.connection.server_version < 180000
        else "(SELECT coalesce(sum(fsyncs), 0) FROM pg_stat_io WHERE object = 'wal')"
    )
    cur.execute(
        "SELECT (SELECT xact_commit FROM pg_stat_database "
        "         WHERE datname = current_database()), %s, wal_bytes, "
        "       (SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) "
        "          FROM pg_stat_user_tables) "
        "  FROM pg_stat_wal" % fsyncs
    )
    commits, fsyncs, wal_bytes, rows = cur.fetchone()
    return dict(commits=commits, fsyncs=fsyncs, wal_bytes=float(wal_bytes), rows=rows)


def flush_statistics(conn):
    """Have this session report its statistics now (PostgreSQL 15+): a session
    reports them at most once a second, at the end of a transaction, so they
    would land in whatever is measured next."""
    if conn.server_version >= 150000:
        cur = conn.cursor()
        cur.execute("SELECT pg_stat_force_next_flush()")
        cur.execute("SELECT 1")


def settled(cur):
    """Until the scripts' server processes have gone and their statistics are in
    (a server process reports them as it ends, after it has left
    pg_stat_activity): the counters no longer move for 0.2 s."""
    for _ in range(100):
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'mailqueue%%'"
        )
        if cur.fetchone()[0] == 0:
            break
        time.sleep(0.05)
    last = database_work(cur)
    for _ in range(15):
        time.sleep(0.2)
        now = database_work(cur)
        if now["rows"] == last["rows"]:  # (commits move with this session's own)
            return
        last = now


def watched(lab, conn, command, mails):
    """Run `command` until it exits, sampling its database connections (by
    application_name, in conn's database) and its memory; a Run."""
    sampler = psycopg2.connect(lab.pg.dsn(conn.info.dbname))
    sampler.autocommit = True
    cur = sampler.cursor()
    peak_conns = peak_pss = 0
    settled(cur)
    work_before = database_work(cur)
    pg_before = lab.postgres_cpu()
    started = time.monotonic()
    proc = subprocess.Popen(command)
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                "current_database() AND application_name LIKE 'mailqueue consumer%%'"
            )
            peak_conns = max(peak_conns, cur.fetchone()[0])
            peak_pss = max(peak_pss, pss_mb(proc.pid))
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        pg_cpu = lab.postgres_cpu() - pg_before
        settled(cur)
        after = database_work(cur)
        work = {key: after[key] - work_before[key] for key in after}
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        sampler.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit("error: %s exited with %d" % (" ".join(command), proc.returncode))
    cpu = usage.ru_utime + usage.ru_stime  # its own and its reaped children's
    return Run(mails, elapsed, cpu, pg_cpu, peak_conns, peak_pss, work)


def burn_down(lab, build, count, command, database=None, smtp_port=None):
    """Queue `count` jobs, then time `command` (a list, given the config path) until it
    exits; a Run. In a fresh database of `build`, or in `database` (connection, config)."""
    conn, config = database or lab.fresh(build, smtp_port)
    before = completed(conn)
    insert_jobs(conn, count)
    flush_statistics(conn)  # the INSERT's rows are not the consumer's work
    subprocess.run(build.script("producer.py", "--config", config, "--once"), check=True)
    run = watched(lab, conn, command(config), count)
    done = completed(conn) - before
    if database is None:
        conn.close()
    if done != count:
        raise SystemExit("error: %d of %d jobs completed" % (done, count))
    return run


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


def latency(lab, build, rate, seconds, database=None):
    """Insert jobs at `rate` per second, one transaction each, with producer and
    consumer running; time from each INSERT's commit to the mail's arrival.
    (delays in ms, share of CPU time stolen meanwhile). In a fresh database, or
    in `database` (connection, config path)."""
    sink = SinkProcess()
    if database:
        conn, config = database[0], lab.config(database[0], sink.port)
    else:
        conn, config = lab.fresh(build, smtp_port=sink.port)
    procs = [
        subprocess.Popen(build.script("consumer.py", "--config", config)),
        subprocess.Popen(build.script("producer.py", "--config", config)),
    ]
    committed = {}
    try:
        wait_listening(conn, 1 + 1)  # the consumer (each process of it), and the producer
        cur = conn.cursor()
        stolen = StolenTime()
        started = time.monotonic()
        for i in range(int(rate * seconds)):
            address = "lat%d@example.com" % i
            cur.execute(
                "INSERT INTO jobs (email, subject, content_message) VALUES (%s, %s, %s)",
                (address, "Độ trễ", BODY),
            )
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
    arrivals, _ = sink.stop()
    stages = latency_stages(conn, committed, arrivals)
    if database is None:
        conn.close()
    delays = [(arrivals[a] - t) * 1000 for a, t in committed.items() if a in arrivals]
    if len(delays) != len(committed):
        raise SystemExit("error: %d of %d mails arrived" % (len(delays), len(committed)))
    latency.stages.append(stages)
    return delays, stolen


latency.stages = []  # each run's latency_stages(), for the report


def latency_stages(conn, committed, arrivals):
    """Medians (ms) of where each mail's delay went, from what the database
    kept: INSERT's commit -> the producer's move (jobs.start_time, its
    transaction's start) -> a sending thread took it (deliveries.started_at:
    the claim and the hand-over) -> it arrived at the sink. None when the
    schema has no deliveries (an old build)."""
    cur = conn.cursor()
    cur.execute("SELECT to_regclass('deliveries') IS NOT NULL")
    if not cur.fetchone()[0]:
        return None
    cur.execute(
        "SELECT j.email, EXTRACT(EPOCH FROM j.start_time AT TIME ZONE current_setting("
        "'TimeZone')), EXTRACT(EPOCH FROM d.started_at) FROM jobs j "
        "JOIN deliveries d ON d.job_id = j.job_id WHERE j.email LIKE 'lat%%'"
    )
    moved, taken, sent = [], [], []
    for email, start_time, started_at in cur.fetchall():
        if email in committed and email in arrivals:
            moved.append((float(start_time) - committed[email]) * 1000)
            taken.append((float(started_at) - float(start_time)) * 1000)
            sent.append((arrivals[email] - float(started_at)) * 1000)
    if not moved:
        return None
    return [statistics.median(x) for x in (moved, taken, sent)]


def pooled(runs):
    """(p50, p99, mean share of CPU time stolen) of latency() runs taken together."""
    delays = sorted(d for run, _ in runs for d in run)
    stolen = statistics.mean(share for _, share in runs)
    return statistics.median(delays), delays[int(len(delays) * 0.99) - 1], stolen


def memory(lab, build, count):
    """A one-mail-in-flight consumer's PSS (with its children) after 1,000 mails
    and after `count`."""
    conn, config = lab.fresh(build)
    insert_jobs(conn, count)
    subprocess.run(build.script("producer.py", "--config", config, "--once"), check=True)
    proc = subprocess.Popen(build.script("consumer.py", "--config", config, "--concurrency", "1"))
    early = late = None
    try:
        while True:
            left = pending(conn)
            if early is None and count - left >= 1000:
                early = pss_mb(proc.pid)
            if left <= 20:  # the last batch: nearly all sent, and the process still up
                late = pss_mb(proc.pid)
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    conn.close()
    return early, late


def insert_cost(lab, build, bulk, singles):
    """(bulk INSERT ratio, single-row INSERTs ratio): time with the NOTIFY
    triggers over time without, in turns. The bulk statement: median of 3 runs
    each. The single rows: in blocks of 500, summed, so that the machine's slow
    moments (each INSERT waits for the disk) fall on both sides alike."""
    conn, _ = lab.fresh(build)
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
            cur.execute(
                "INSERT INTO jobs (email, content_message) VALUES (%s, %s)",
                ("one%d@example.com" % i, "hello"),
            )

    on, off = in_turns(3, lambda: one_statement(True), lambda: one_statement(False))
    bulk_ratio = statistics.median(on) / statistics.median(off)
    cur.execute("TRUNCATE jobs CASCADE")
    on, off = in_turns(
        singles // 500, lambda: timed(True, single_rows), lambda: timed(False, single_rows)
    )
    conn.close()
    return bulk_ratio, sum(on) / sum(off)


def relay(lab, build, proxy_port, proxy, concurrency, count):
    """Drain `count` queued jobs through the delay proxy with `concurrency`
    mails in flight; (Run, the proxy's CPU µs per mail)."""
    proxy_before = process_cpu(proxy.pid)
    run = burn_down(
        lab, build, count, build.consumer("--concurrency", str(concurrency)), smtp_port=proxy_port
    )
    return run, (process_cpu(proxy.pid) - proxy_before) / count * 1e6


# --------------------------------------------------------------------------- issues 17-19


def load_average():
    """The 1-minute load average, to print beside a figure (taken as its run
    ends): on this shared machine it says whether the run had a busy minute."""
    return os.getloadavg()[0]


POISON = "poison@example.com"
# The replies of issue 18: (label, the line the poison recipient's RCPT gets).
POISON_REPLIES = (
    ("451 4.3.0 generic", b"451 4.3.0 Try again later"),
    ("450 4.2.0 greylisted", b"450 4.2.0 Greylisted, please try again later"),
    (
        "450 4.2.1 Gmail rate",
        b"450 4.2.1 The user you are trying to contact is receiving mail at a rate that "
        b"prevents additional messages from being delivered.",
    ),
)


@dataclasses.dataclass
class PoisonRun:
    """What a poison() run showed."""

    normal: int  # normal mails queued
    done: int  # of them completed when the run ended
    rate: float  # their mails/s, first to last arrival at the sink
    elapsed: float  # s from the consumer's start until they were all done (or the timeout)
    poison: Optional[tuple]  # (status, attempts, deliveries rows, last_error); None: no poison
    refused: int  # RCPTs the sink refused to the poison recipient
    load: float  # the load average as the run ended

    def poison_text(self):
        if self.poison is None:
            return "(no poison job)"
        status, attempts, deliveries, error = self.poison
        return "poison job: %s, attempts %d, %d deliveries rows, %d RCPTs refused%s" % (
            status,
            attempts,
            deliveries,
            self.refused,
            "; last_error %r" % error[:60] if error else "",
        )


def poison(lab, build, count, reply, timeout=600.0):
    """`count` normal mails, and one job for POISON whose RCPT is answered
    `reply` for ever (None: no such job), served by a consumer and a producer
    (the failed jobs' retries go through the producer) against the same
    bench/poison_sink.py either way, until the normal mails are all completed;
    a PoisonRun. The poison job's state is read at that moment."""
    sink = SinkProcess(poison={POISON: reply} if reply else {})
    conn, config = lab.fresh(build, smtp_port=sink.port)
    cur = conn.cursor()
    if reply:  # first, so that it is in the first claims
        cur.execute(
            "INSERT INTO jobs (email, subject, content_message) VALUES (%s, %s, %s)",
            (POISON, "Độc", BODY),
        )
    insert_jobs(conn, count)
    subprocess.run(build.script("producer.py", "--config", config, "--once"), check=True)
    log = open(os.path.join(lab.folder, "%s.log" % conn.info.dbname), "w")
    started = time.monotonic()
    procs = [
        subprocess.Popen(build.script(name, "--config", config), stderr=log)
        for name in ("consumer.py", "producer.py")
    ]
    try:
        deadline = started + timeout
        while time.monotonic() < deadline:
            cur.execute(
                "SELECT count(*) FROM jobs WHERE status = 'completed' AND email <> %s", (POISON,)
            )
            done = cur.fetchone()[0]
            if done >= count or procs[0].poll() is not None:  # done, or the consumer died
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        state = None
        if reply:
            cur.execute(
                "SELECT j.status, j.attempts, (SELECT count(*) FROM deliveries d "
                "WHERE d.job_id = j.job_id), j.last_error FROM jobs j WHERE j.email = %s",
                (POISON,),
            )
            state = cur.fetchone()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        log.close()
    seen = sink.stop()
    conn.close()
    _, _, rate = per_second(t for address, t in seen["arrivals"].items() if address != POISON)
    return PoisonRun(
        count, done, rate, elapsed, state, seen["refused"].get(POISON, 0), load_average()
    )


def db_latency(lab, build, delay_ms, count, concurrency=32):
    """Burn down `count` mails to the local C sink with the consumer's (and the
    producer's) database queries through bench/delay_proxy.c, `delay_ms` each
    way (None: direct); LISTEN goes direct (listen_database). A Run."""
    proxy = proxy_port = None
    if delay_ms is not None:
        proxy_port, proxy, _ = start_delay_proxy(lab.folder, lab.pg.port, delay_ms)
    try:
        conn, config = lab.fresh(build, database_port=proxy_port)
        try:
            run = burn_down(
                lab,
                build,
                count,
                build.consumer("--concurrency", str(concurrency)),
                database=(conn, config),
            )
            run.load = load_average()
            return run
        finally:
            conn.close()
    finally:
        if proxy:
            proxy.kill()
            proxy.wait()


@dataclasses.dataclass
class BigRun:
    """What a big_attachments() run showed."""

    jobs: int
    peak_pss: float  # MB, the consumer's processes together, sampled every 0.25 s
    first: Optional[float]  # s from the consumer's start to the first mail's arrival
    total: float  # s from its start until it exited (--drain)
    intact: int  # mails whose attachment arrived with the original's SHA-256
    sizes: tuple  # (smallest, largest) mail in MB, as the sink counted it
    returncode: int
    load: float  # the load average as the run ended


def big_attachments(lab, build, jobs, megabytes, concurrency=32, timeout=1200.0):
    """`jobs` jobs with one attachment of `megabytes` MB of random bytes each,
    drained by a consumer at `concurrency` (defaults otherwise) into
    bench/poison_sink.py, which hashes each mail's attachment. A BigRun."""
    sink = SinkProcess(poison={}, digest=True)
    conn, config = lab.fresh(build, smtp_port=sink.port)
    blob = os.urandom(megabytes * 2**20)
    cur = conn.cursor()
    cur.execute(
        "INSERT INTO jobs (email, subject, content_message) "
        "SELECT 'big' || i || '@example.com', 'Tệp lớn ' || i, %s FROM generate_series(1, %s) i",
        (BODY, jobs),
    )
    cur.execute(
        "INSERT INTO attachments (job_id, filename, content_type, content) "
        "SELECT min(job_id), 'report.bin', 'application/octet-stream', %s FROM jobs",
        (psycopg2.Binary(blob),),
    )
    cur.execute(  # the same bytes for the others, copied inside PostgreSQL
        "INSERT INTO attachments (job_id, filename, content_type, content) "
        "SELECT j.job_id, a.filename, a.content_type, a.content FROM jobs j, attachments a "
        "WHERE j.job_id <> a.job_id"
    )
    expected = hashlib.sha256(blob).hexdigest()
    del blob
    subprocess.run(build.script("producer.py", "--config", config, "--once"), check=True)
    cur.execute("CHECKPOINT")  # the inserts' writes are not the run's
    started, wall = time.monotonic(), time.time()
    proc = subprocess.Popen(build.consumer("--concurrency", str(concurrency))(config))
    peak = 0.0
    try:
        while proc.poll() is None and time.monotonic() - started < timeout:
            peak = max(peak, pss_mb(proc.pid))
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    total = time.monotonic() - started
    seen = sink.stop()
    conn.close()
    arrivals = seen["arrivals"].values()
    sizes = [size / 2**20 for size in seen["sizes"].values()] or [0.0]
    return BigRun(
        jobs,
        peak,
        min(arrivals) - wall if arrivals else None,
        total,
        sum(1 for digest in seen["digests"].values() if digest == expected),
        (min(sizes), max(sizes)),
        proc.returncode,
        load_average(),
    )


def relays_config(lab, conn, relay_ports, concurrency):
    """The path of a config naming several relays (issue 19's format), one
    route `default` over all of them in round robin."""
    name = conn.info.dbname
    path = os.path.join(lab.folder, "%s-relays.json" % name)
    settings = {
        "database": lab.pg.settings_for(name),
        "relays": {
            relay_name: {"host": "127.0.0.1", "port": port}
            for relay_name, port in relay_ports.items()
        },
        "routes": {"default": {"relays": sorted(relay_ports), "strategy": "round_robin"}},
        "queue": {"concurrency": concurrency},
    }
    with open(path, "w") as f:
        json.dump(settings, f)
    return path


def relays_refused(lab, build, relay_ports):
    """None if the build's consumer takes a config of several relays (it drains an
    empty queue and exits 0), else (why skipped, its last error line): a build
    without them exits 1 at start-up ("unknown key relays")."""
    conn, _ = lab.fresh(build)
    path = relays_config(lab, conn, relay_ports, 128)
    conn.close()
    probe = subprocess.Popen(
        build.consumer()(path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its processes are stopped together if it hangs
    )
    try:
        _, errors = probe.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(probe.pid, signal.SIGKILL)
        probe.wait()
        return "skipped: the consumer hung with the relays config", "killed after 120 s"
    if not probe.returncode:
        return None
    line = (errors.strip().splitlines() or ["exit code %d" % probe.returncode])[-1]
    if probe.returncode == 1:
        return "skipped: this build has no relays config", line
    return "skipped: the consumer failed with the relays config", line


def two_relays(lab, build, relay_ports, count, concurrency=128):
    """Drain `count` jobs over the relays {name: port} in round robin with
    `concurrency` mails in flight (from the config, not a flag); a Run."""
    conn, _ = lab.fresh(build)
    path = relays_config(lab, conn, relay_ports, concurrency)
    try:
        return burn_down(lab, build, count, build.consumer(), database=(conn, path))
    finally:
        conn.close()


def enqueue_rate(quick):
    """bench/enqueue_rate.py's output lines (run as it is, in its own process),
    or None when that file is not there."""
    script = os.path.join(ROOT, "bench", "enqueue_rate.py")
    if not os.path.exists(script):
        return None
    with open(script, encoding="utf-8") as f:
        takes_quick = "--quick" in f.read()
    done = subprocess.run(
        [sys.executable, script] + (["--quick"] if quick and takes_quick else []),
        capture_output=True,
        text=True,
    )
    lines = done.stdout.rstrip().splitlines()
    if done.returncode:
        lines += ["exited with %d: %s" % (done.returncode, done.stderr.strip()[-300:])]
    return lines


def per_second(times):
    """(mails in each whole second since the first, the most in any one-second
    window, the mean rate from first to last)."""
    times = sorted(times)
    if len(times) < 2:
        return [len(times)], len(times), 0.0
    counts = [0] * (int(times[-1] - times[0]) + 1)
    for t in times:
        counts[int(t - times[0])] += 1
    busiest, start = 0, 0
    for end, t in enumerate(times):  # sliding window [t - 1 s, t]
        while times[start] <= t - 1.0:
            start += 1
        busiest = max(busiest, end - start + 1)
    return counts, busiest, (len(times) - 1) / (times[-1] - times[0])


def serve_until_done(lab, build, jobs, consumers, queue, quota=None, timeout=180.0, producer=False):
    """Queue `jobs`, then run `consumers` consumers (and, if asked, a producer,
    for the retries) against a timing sink, or a QuotaSink of `quota` mails/s,
    until no job is left to do; (arrival times, throttled replies, statuses)."""
    sink = SinkProcess(quota)
    conn, config = lab.fresh(build, smtp_port=sink.port, queue=queue)
    insert_jobs(conn, jobs)
    subprocess.run(build.script("producer.py", "--config", config, "--once"), check=True)
    # Their log (a line per failed attempt, for the old consumer) goes to a file.
    log = open(os.path.join(lab.folder, "%s.log" % conn.info.dbname), "w")
    procs = [
        subprocess.Popen(build.script("consumer.py", "--config", config), stderr=log)
        for _ in range(consumers)
    ]
    if producer:
        procs.append(subprocess.Popen(build.script("producer.py", "--config", config), stderr=log))
    try:
        deadline = time.monotonic() + timeout
        while pending(conn) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        log.close()
    arrivals, throttled = sink.stop()
    result = statuses(conn)
    conn.close()
    return arrivals, throttled, result


def profile(lab, build, count, folder):
    """Where one consumer process's CPU goes (--processes 1, the default
    concurrency, local sink), sampled with py-spy (a bench tool, not in the
    requirements: `.venv/bin/pip install py-spy`). (plain Run, profiled Run,
    [(share of samples, inclusive or self, function)], raw file); None without py-spy."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        return None
    # The old consumer has no --processes: its default workers, all sampled.
    flags, spy_flags = (["--processes", "1"], []) if build.threaded else ([], ["-s"])
    plain = burn_down(lab, build, count, build.consumer(*flags))
    raw = os.path.join(folder, "profile-%s.txt" % build.label.replace(" ", "-"))
    # --gil: only the samples of the thread that holds the GIL, i.e. Python's CPU
    # time (waits, and C code that released the GIL, are left out).
    spied = burn_down(
        lab,
        build,
        count,
        lambda config: (
            [
                spy,
                "record",
                "--nonblocking",
                "--gil",
                "--rate",
                "100",
                "--format",
                "raw",
                "--nolineno",
                "--output",
                raw,
            ]
            + spy_flags
            + ["--"]
            + build.consumer(*flags)(config)
        ),
    )
    inclusive, own, total = {}, {}, 0
    with open(raw) as f:
        for line in f:
            stack, _, samples = line.rstrip("\n").rpartition(" ")
            frames, samples = stack.split(";"), int(samples)
            total += samples
            for frame in set(frames[1:]):  # the first is the thread
                inclusive[frame] = inclusive.get(frame, 0) + samples
            own[frames[-1]] = own.get(frames[-1], 0) + samples
    table = sorted(
        [(n / total, "incl", f) for f, n in inclusive.items()]
        + [(n / total, "self", f) for f, n in own.items()],
        reverse=True,
    )
    return plain, spied, table, raw


def cpu_profile(lab, build, count, folder):
    """Where one consumer process's CPU goes, by bench/cpu_profile.py (cProfile in
    every thread, CPU time); (Run, [(share of CPU, own µs per mail, function)])."""
    out = os.path.join(folder, "cpu-%s.pstats" % build.label.replace(" ", "-"))
    flags = ["--processes", "1"] if build.threaded else ["--concurrency", "1"]
    run = burn_down(
        lab,
        build,
        count,
        lambda config: (
            [sys.executable, os.path.join(ROOT, "bench", "cpu_profile.py"), out]
            + build.consumer(*flags)(config)[1:]
        ),
    )
    import pstats

    stats = pstats.Stats(out).stats
    total = sum(tottime for _, _, tottime, _, _ in stats.values())
    table = sorted(
        (
            (
                tottime / total,
                tottime / count * 1e6,
                "%s (%s:%d)"
                % (
                    name,
                    os.path.relpath(path, ROOT)
                    if path.startswith(ROOT)
                    else os.path.basename(path),
                    line,
                ),
            )
            for (path, line, name), (_, _, tottime, _, _) in stats.items()
        ),
        reverse=True,
    )
    return run, table


# --------------------------------------------------------------------------- report

SCENARIOS = (
    "ceiling",
    "local",
    "latency",
    "history",
    "memory",
    "insert",
    "relay",
    "rate",
    "quota",
    "build",
    "poison",
    "dblatency",
    "bigattach",
    "tworelays",
    "enqueue",
)
EXTRA = ("profile",)  # only when named in --only


def main():
    parser = argparse.ArgumentParser(description="Benchmarks; prints a table of figures.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument(
        "--only",
        metavar="SCENARIO[,SCENARIO]",
        help="run only these scenarios, of: %s (and profile, run only "
        "when named)" % ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also run that commit's consumer, in turns (e.g. 743873b~1, "
        "the commit before the consumer's rebuild), or the one in a "
        "folder (a patched copy of the tree)",
    )
    parser.add_argument(
        "--relay-n",
        default="4,32,128",
        metavar="N[,N]",
        help="mails in flight for the relay scenario (default: 4,32,128)",
    )
    args = parser.parse_args()
    only = set(SCENARIOS) if not args.only else set(args.only.split(","))
    unknown = only - set(SCENARIOS) - set(EXTRA)
    if unknown:
        parser.error(
            "unknown scenario %s (known: %s)" % (", ".join(sorted(unknown)), ", ".join(SCENARIOS))
        )
    try:
        relay_n = [int(n) for n in args.relay_n.split(",")]
    except ValueError:
        parser.error("--relay-n takes whole numbers separated by commas")
    size = (
        dict(
            burn=5000,
            seed=2000,
            history=100_000,
            lat_seconds=10,
            memory=10_000,
            bulk=20_000,
            singles=2000,
            rate_jobs=400,
            quota_jobs=450,
            turns=1,
            relay={4: 400, 32: 2000, 128: 6000},
            poison=2000,
            poison_turns=1,
            dblatency=2000,
            big_jobs=32,
            two_relays=6000,
        )
        if args.quick
        else dict(
            burn=20_000,
            seed=10_000,
            history=1_000_000,
            lat_seconds=30,
            memory=30_000,
            bulk=100_000,
            singles=10_000,
            rate_jobs=800,
            quota_jobs=900,
            turns=3,
            relay={4: 1000, 32: 6000, 128: 20_000},
            poison=2000,
            poison_turns=2,
            dblatency=6000,
            big_jobs=64,
            two_relays=20_000,
        )
    )

    folder = os.path.join(ROOT, "bench", "output")
    os.makedirs(folder, exist_ok=True)
    new = Build.current()
    old = Build.exported(args.baseline, folder) if args.baseline else None
    port, sink = start_smtp_sink()
    lab = Lab(port, folder, [new] + ([old] if old else []))
    rows = []

    def row(figure, value, goal="", other=""):
        rows.append((figure, value, goal, other))
        print("  %-46s %-26s %-22s %s" % (figure, value, goal, other), flush=True)

    def cpu(run):
        return "%.0f + %.0f µs" % (run.cpu_per_mail, run.pg_per_mail)

    stolen_in_run = StolenTime()
    proxy = None
    helpers = []  # more sinks and proxies, stopped at the end
    try:
        print(
            "PostgreSQL %s (default durability), smtp-sink, %d cores, Python %s%s"
            % (
                lab.pg.version(),
                os.cpu_count(),
                sys.version.split()[0],
                ", baseline: %s" % old.label if old else "",
            )
        )
        row(
            "figure",
            "this consumer",
            "target (issue 9)",
            "old consumer (%s) / seed-style loop" % (old.label if old else "--baseline"),
        )

        if "ceiling" in only:
            row(
                "smtp-sink ceiling (4 senders, ready bytes)",
                "%.0f mails/s" % sink_ceiling(port, 40_000 if not args.quick else 20_000),
            )

        if "local" in only:
            measures = [
                lambda: burn_down(lab, new, size["burn"], new.consumer()),
                lambda: burn_down(lab, new, size["seed"], seed_loop),
            ]
            if old:
                measures.append(lambda: burn_down(lab, old, size["burn"], old.consumer()))
            results = in_turns(size["turns"], *measures)
            ours, seed = results[0], results[1]
            median = statistics.median

            def mid(runs):  # the run of median speed, for its CPU figures
                return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]

            other = "seed %.0f/s (%d mails)" % (median(r.rate for r in seed), size["seed"])
            if old:
                other = "old %.0f/s; %s" % (median(r.rate for r in results[2]), other)
            row(
                "1. burn-down of %d queued mails, local sink" % size["burn"],
                "%.0f mails/s" % median(r.rate for r in ours),
                ">= 4500/s",
                other,
            )
            ratio = median(r.rate for r in ours) / median(r.rate for r in seed)
            row(
                "   ratio to the seed-style loop",
                "%.1fx" % ratio,
                ">= 4.5x",
                "old %.1fx" % (median(r.rate for r in results[2]) / median(r.rate for r in seed))
                if old
                else "",
            )
            row(
                "   runs (mails/s, in turns)",
                " ".join("%.0f" % r.rate for r in ours),
                "",
                "old " + " ".join("%.0f" % r.rate for r in results[2]) if old else "",
            )
            row(
                "   CPU per mail: consumer + PostgreSQL",
                cpu(mid(ours)),
                "(0.19 + 0.2 ms before)",
                ("old %s; " % cpu(mid(results[2])) if old else "") + "seed %s" % cpu(mid(seed)),
            )
            row(
                "   PostgreSQL's work per mail",
                mid(ours).work_text(),
                "",
                "old " + mid(results[2]).work_text() if old else "",
            )
            row(
                "   DB connections / PSS, peak",
                "%d / %.0f MB" % (mid(ours).connections, mid(ours).pss),
                "",
                "old %d / %.0f MB" % (mid(results[2]).connections, mid(results[2]).pss)
                if old
                else "",
            )

        if "latency" in only or "history" in only:
            history = lab.fresh(new) if "history" in only else None
            if history:
                add_history(history[0], size["history"])
            half = size["lat_seconds"] / 2
            measures = [lambda: latency(lab, new, 50, half)]
            if old:
                measures.append(lambda: latency(lab, old, 50, half))
            if history:
                measures.append(lambda: latency(lab, new, 50, half, database=history))
            runs = in_turns(2, *measures)
            (p50, p99, stolen) = pooled(runs[0])
            other = ""
            if old:
                op50, op99, _ = pooled(runs[1])
            row(
                "2. latency at 50 jobs/s, p50",
                "%.1f ms" % p50,
                "<= 3 ms",
                "old %.1f ms" % op50 if old else "",
            )
            row(
                "   latency at 50 jobs/s, p99",
                "%.1f ms" % p99,
                "<= 8 ms",
                ("old %.1f ms " % op99 if old else "")
                + "(CPU stolen by the host meanwhile: %.1f%%)" % (stolen * 100),
            )
            stages = [st for st in latency.stages if st]
            if stages:
                row(
                    "   medians: commit>move, move>thread, thread>sink",
                    " / ".join("%.1f" % statistics.median(st[i] for st in stages) for i in range(3))
                    + " ms",
                    "",
                    "(this consumer, all its latency runs)",
                )
            if history:
                hp50, hp99, hstolen = pooled(runs[-1])
                empty, full = in_turns(
                    2,
                    lambda: burn_down(lab, new, size["burn"], new.consumer()),
                    lambda: burn_down(lab, new, size["burn"], new.consumer(), database=history),
                )
                empty = statistics.median(r.rate for r in empty)
                full = statistics.median(r.rate for r in full)
                row(
                    "3. burn-down with %d completed jobs" % size["history"],
                    "%.0f mails/s (%+.1f%%)" % (full, (full / empty - 1) * 100),
                    "within 10%",
                    "(%.0f mails/s without, same turns)" % empty,
                )
                row(
                    "   latency p50 / p99 with that history",
                    "%.1f / %.1f ms" % (hp50, hp99),
                    "within 10%",
                    "(CPU stolen by the host meanwhile: %.1f%%)" % (hstolen * 100),
                )
                history[0].close()
            del other

        if "memory" in only:
            early, late = memory(lab, new, size["memory"])
            other = ""
            if old:
                oearly, olate = memory(lab, old, size["memory"])
                other = "old %.1f / %.1f MB" % (oearly, olate)
            row(
                "4. PSS, 1 in flight, after 1,000 / %d mails" % size["memory"],
                "%.1f / %.1f MB (%+.1f)" % (early, late, late - early),
                "within 10 MB",
                other,
            )

        if "insert" in only:
            bulk, singles = insert_cost(lab, new, size["bulk"], size["singles"])
            row("5. INSERT of %d jobs, triggers on/off" % size["bulk"], "%.2fx" % bulk, "<= 1.5x")
            row("   %d single-row INSERTs, on/off" % size["singles"], "%.2fx" % singles, "<= 1.5x")

        if "relay" in only:
            proxy_port, proxy, which = start_delay_proxy(folder, port, 25)
            for n in relay_n:
                count = size["relay"].get(n, max(1000, 150 * n))
                measures = [lambda: relay(lab, new, proxy_port, proxy, n, count)]
                compared = old and (n <= 32 or old.threaded)  # see Build.threaded
                if compared:
                    measures.append(lambda: relay(lab, old, proxy_port, proxy, n, count))
                results = in_turns(1, *measures)
                run, proxy_cpu = results[0][0]
                other = "(%s proxy: %.0f µs CPU/mail)" % (which, proxy_cpu)
                if compared:
                    orun, _ = results[1][0]
                    other = "old %.0f/s, %d conns, %.0f MB %s" % (
                        orun.rate,
                        orun.connections,
                        orun.pss,
                        other,
                    )
                row(
                    "6. relay 50 ms RTT, N=%d, %d mails" % (n, count),
                    "%.0f/s, %d conns, %.0f MB" % (run.rate, run.connections, run.pss),
                    ">=1500/s <=16 <=300MB" if n == 128 else "",
                    other,
                )
                row(
                    "   CPU per mail: consumer + PostgreSQL",
                    cpu(run),
                    "",
                    "old %s" % cpu(orun) if compared else "",
                )
                row(
                    "   PostgreSQL's work per mail",
                    run.work_text(),
                    "",
                    "old " + orun.work_text() if compared else "",
                )

        if "rate" in only:
            arrivals, _, result = serve_until_done(
                lab, new, size["rate_jobs"], 3, {"rate_limit": 40}
            )
            counts, busiest, mean = per_second(arrivals.values())
            row(
                "7. rate_limit 40/s, 3 consumers, %d mails" % size["rate_jobs"],
                "busiest %d, mean %.1f/s" % (busiest, mean),
                "<= 45, >= 36",
                "%d completed" % result.get("completed", 0),
            )
            row("   mails in each second", " ".join(str(c) for c in counts[:30]))

        if "quota" in only:
            queue = {"max_attempts": 3, "retry_delay": 2, "max_retry_delay": 10}
            builds = [new] + ([old] if old else [])
            for build in builds:
                arrivals, throttled, result = serve_until_done(
                    lab, build, size["quota_jobs"], 1, queue, quota=30, producer=True
                )
                counts, busiest, mean = per_second(arrivals.values())
                row(
                    "8. quota 30/s (454 past it), %d mails%s"
                    % (size["quota_jobs"], "" if build is new else ", " + build.label),
                    "%d dead, %.1f/s" % (result.get("dead", 0), mean),
                    "0 dead, >= 22/s" if build is new else "",
                    "%d throttled replies, %d completed, busiest %d"
                    % (throttled, result.get("completed", 0), busiest),
                )
        if "build" in only:  # issue 11: what each kind of mail costs to build
            for kind, micros, size_bytes in build_costs(args.quick):
                row(
                    "11. building a mail: %s" % kind,
                    "%.0f µs" % micros,
                    "",
                    "%d bytes" % size_bytes,
                )
        if "poison" in only:  # issue 18
            measures = [lambda: poison(lab, new, size["poison"], None)] + [
                (lambda reply=reply: poison(lab, new, size["poison"], reply))
                for _, reply in POISON_REPLIES
            ]
            results = in_turns(size["poison_turns"], *measures)
            labels = ["none"] + [label for label, _ in POISON_REPLIES]
            base = statistics.median(run.rate for run in results[0])
            for label, runs in zip(labels, results):
                for run in runs:
                    row(
                        "12. poison (%s), %d normal mails" % (label, run.normal),
                        "%.0f mails/s" % run.rate
                        + ("" if run.done == run.normal else ", %d done" % run.done),
                        "",
                        "all done in %.1f s; %s; load %.1f"
                        % (run.elapsed, run.poison_text(), run.load),
                    )
                if label != "none":
                    median = statistics.median(run.rate for run in runs)
                    row(
                        "   median, %s" % label,
                        "%.0f mails/s, %.0f%% of none" % (median, median / base * 100),
                        ">= 90% of none",
                        "none: %.0f mails/s (median)" % base,
                    )
        if "dblatency" in only:  # issue 17
            delays = (None, 0, 2, 10)
            results = in_turns(
                size["turns"],
                *[
                    (lambda delay=delay: db_latency(lab, new, delay, size["dblatency"]))
                    for delay in delays
                ],
            )
            base = statistics.median(run.rate for run in results[1])  # 0 ms
            for delay, runs in zip(delays, results):
                rate = statistics.median(run.rate for run in runs)
                mid = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
                row(
                    "13. database %s, N=32, %d mails"
                    % ("direct" if delay is None else "%d ms each way" % delay, mid.mails),
                    "%.0f mails/s" % rate,
                    "10 ms: >= 80% of 0 ms" if delay == 10 else "",
                    "%.0f%% of 0 ms; %d conns; %s" % (rate / base * 100, mid.connections, cpu(mid)),
                )
                row(
                    "   runs, in turns (load as each ended)",
                    " ".join("%.0f" % run.rate for run in runs),
                    "",
                    " ".join("%.1f" % run.load for run in runs),
                )
        if "bigattach" in only:  # issue 17
            run = big_attachments(lab, new, size["big_jobs"], 15)
            row(
                "14. %d x 15 MB attachments, N=32: peak PSS" % run.jobs,
                "%.0f MB" % run.peak_pss,
                "< 1 GB",
                "whole consumer, sampled every 0.25 s; load %.1f" % run.load,
            )
            row(
                "   first mail after / all done in",
                "%s / %.1f s" % ("none" if run.first is None else "%.1f" % run.first, run.total),
                "",
                "exit code %d" % run.returncode,
            )
            row(
                "   arrived intact (attachment's SHA-256)",
                "%d of %d" % (run.intact, run.jobs),
                "all",
                "mails of %.1f-%.1f MB" % run.sizes,
            )
        if "tworelays" in only:  # issue 19
            ports = {}
            for name in ("a", "b"):
                sink_port, sink_proc = start_smtp_sink()
                helpers.append(sink_proc)
                relay_port, relay_proc, _ = start_delay_proxy(folder, sink_port, 25)
                helpers.append(relay_proc)
                ports[name] = relay_port
            count = size["two_relays"]
            refused = relays_refused(lab, new, ports)
            if refused:
                row("15. two relays, round robin, N=128", refused[0], "", refused[1][:100])
            else:
                one, two = in_turns(
                    1,
                    lambda: relay(lab, new, ports["a"], helpers[1], 128, count)[0],
                    lambda: two_relays(lab, new, ports, count),
                )
                row(
                    "15. two relays 50 ms RTT, round robin, N=128, %d mails" % count,
                    "%.0f/s, %d conns, %.0f MB" % (two[0].rate, two[0].connections, two[0].pss),
                    "within 10% of one relay",
                    "one relay: %.0f/s, %d conns, %.0f MB; load %.1f"
                    % (one[0].rate, one[0].connections, one[0].pss, load_average()),
                )
        if "enqueue" in only:
            lines = enqueue_rate(args.quick)
            if lines is None:
                row("16. enqueue rate", "missing: no bench/enqueue_rate.py in this build")
            for line in lines or ():
                row("16. enqueue", line)
        if "profile" in only:
            for build in [new] + ([old] if old else []):
                found = profile(lab, build, size["burn"], folder)
                if found is None:
                    row("9. profile", "skipped: no py-spy (.venv/bin/pip install py-spy)")
                    break
                plain, spied, table, raw = found
                row(
                    "9. profile, %s, %s"
                    % ("--processes 1" if build.threaded else "defaults", build.label),
                    "%.0f mails/s, %s" % (plain.rate, cpu(plain)),
                    "",
                    "%.0f mails/s under py-spy; %s" % (spied.rate, os.path.relpath(raw, ROOT)),
                )
                row("   PostgreSQL's work per mail", plain.work_text())
                for share, kind, frame in table[:45]:
                    row("   %5.1f%% %s" % (share * 100, kind), frame[:110])
        if "profile" in only:
            for build in [new] + ([old] if old else []):
                run, table = cpu_profile(lab, build, size["burn"] // 2, folder)
                row(
                    "10. CPU by function (cProfile), %s" % build.label,
                    "%.0f mails/s profiled" % run.rate,
                    "",
                    "--processes 1" if build.threaded else "--concurrency 1 (one worker)",
                )
                for share, micros, frame in table[:30]:
                    row("   %5.1f%% %6.1f µs/mail" % (share * 100, micros), frame[:110])
        row("CPU time stolen by the host, whole run", "%.1f%%" % (stolen_in_run.share() * 100))
    finally:
        for helper in ([proxy] if proxy else []) + helpers:
            helper.kill()
            helper.wait()
        lab.stop()
        sink.kill()
    with open(os.path.join(folder, "results.txt"), "w") as f:
        for r in rows:
            f.write("| %s |\n" % " | ".join(r))


if __name__ == "__main__":
    main()
