"""Helpers of the tests of python -m mailqueue (report, requeue, prune, dashboard)."""

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request

from devservers import free_port
from helpers import ROOT, query, wait_until


def finished_job(
    db, status="completed", email="done@example.com", lag=1.0, ago=60.0, body="sent long ago"
):
    """A job that finished `ago` seconds ago after `lag` seconds in the queue; its id."""
    [(job_id,)] = query(
        db,
        "INSERT INTO jobs (email, content_message, status, attempts, start_time, end_time) "
        "VALUES (%s, %s, %s, 1, LOCALTIMESTAMP - (%s + %s) * interval '1 second', "
        "        LOCALTIMESTAMP - %s * interval '1 second') RETURNING job_id",
        (email, body, status, ago, lag, ago),
    )
    return job_id


def waiting_job(db, status="available", email="wait@example.com", due_ago=0.0):
    """A job not yet sent, due since `due_ago` seconds (negative: not yet due)."""
    [(job_id,)] = query(
        db,
        "INSERT INTO jobs (email, content_message, status, run_at) "
        "VALUES (%s, 'waiting', %s, now() - %s * interval '1 second') RETURNING job_id",
        (email, status, due_ago),
    )
    if status == "queued":
        query(db, "INSERT INTO queue (job_id) VALUES (%s)", (job_id,))
    return job_id


def delivery(db, job_id, outcome, detail=None, code=None, attempt=1, ago=30.0):
    """An attempt logged `ago` seconds ago."""
    query(
        db,
        "INSERT INTO deliveries (job_id, attempt, started_at, finished_at, outcome, "
        "smtp_code, detail) VALUES (%s, %s, now() - (%s + 0.1) * interval '1 second', "
        "now() - %s * interval '1 second', %s, %s, %s)",
        (job_id, attempt, ago, ago, outcome, code, detail),
    )


def quantile(values, q):
    """Linear interpolation between closest ranks, as PostgreSQL's percentile_cont."""
    values = sorted(values)
    position = q * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def mailqueue(*args, env=None, timeout=120):
    """python -m mailqueue ARGS, as a user runs it; the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "mailqueue"] + list(args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class Dashboard:
    """python -m mailqueue dashboard in the background, on a port of its own."""

    def __init__(self, config, tmp_path, host="127.0.0.1", password=None, extra=()):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        env = dict(os.environ)
        env.pop("MAILQUEUE_DASHBOARD_PASSWORD", None)
        if password is not None:
            env["MAILQUEUE_DASHBOARD_PASSWORD"] = password
        self.log = open(tmp_path / ("dashboard-%d.log" % self.port), "w+")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailqueue",
                "dashboard",
                "--config",
                config,
                "--host",
                host,
                "--port",
                str(self.port),
            ]
            + list(extra),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        self.auth = password

    def wait(self):
        def answers():
            if self.proc.poll() is not None:
                raise AssertionError("the dashboard stopped: %s" % self.output())
            try:
                return self.get("/metrics", auth=self.auth)[0]
            except OSError:
                return None

        wait_until(answers, timeout=30, what="the dashboard to answer")
        return self

    def get(self, path, auth=None):
        """(status, headers, text) of GET path; auth: the password, or None."""
        request = urllib.request.Request(self.url + path)
        if auth is not None:
            token = base64.b64encode(("operator:%s" % auth).encode("utf-8")).decode()
            request.add_header("Authorization", "Basic " + token)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read().decode("utf-8")

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code

    def __enter__(self):
        return self.wait()

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
