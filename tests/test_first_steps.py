"""What a new user tripped on in their first hour (issue 22), each as they met it:
a configuration without a database, the scripts run with a Python that lacks
the requirements, log lines that did not say which script wrote them, and a
demo that inserted more mails than it said."""

import json
import os
import re
import subprocess
import sys

import pytest

from devservers import free_port
from helpers import ROOT, query, wait_until
from mailqueue import cli
from test_cli import SCRIPTS, assert_one_clear_line


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_config_without_a_database_section_is_one_line(script, scripts, smtp, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"smtp": {"host": "127.0.0.1", "port": smtp.port}}))
    result = scripts.run(script, "--config", str(path), timeout=30)
    assert result.returncode == 1
    assert_one_clear_line(result, "config.json", "no database section", "config.example.json")
    assert "database ?" not in result.stderr


def test_a_database_section_without_a_database_name_is_one_line(scripts, postgres, tmp_path):
    settings = postgres.settings_for("unused")
    del settings["database"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"database": settings}))
    result = scripts.run("producer.py", "--config", str(path), timeout=30)
    assert result.returncode == 1
    assert_one_clear_line(result, "database.database is missing")
    # the variable names it as well as the file does
    env = dict(os.environ, MAILQUEUE_DB_NAME="no_such_database_here")
    result = scripts.run("producer.py", "--config", str(path), timeout=30, env=env)
    assert_one_clear_line(result, "no_such_database_here", "does not exist")


def base_python():
    """The interpreter the venv was made from: python3 as a user types it."""
    for name in ("python3", "python"):
        candidate = os.path.join(sys.base_prefix, "bin", name)
        if os.path.exists(candidate):
            return candidate
    return sys.executable


@pytest.mark.parametrize(
    "script",
    ["producer.py", "consumer.py"],
)
def test_a_script_outside_the_venv_says_which_python_to_use(script, tmp_path):
    # -S: no site-packages at all, so none of the requirements can be imported,
    # whatever this machine has installed for its own python3
    result = subprocess.run(
        [base_python(), "-S", script, "--drain" if script == "consumer.py" else "--once"]
        + ["--config", str(tmp_path / "none.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "cannot import psycopg2" in line
    assert re.search(r"\.venv/bin/python", line), line


def test_the_program_names_the_log_lines():
    assert cli.program_name("/opt/mailqueue/consumer.py") == "consumer"
    assert cli.program_name("producer.py") == "producer"
    assert cli.program_name("/x/mailqueue/__main__.py") == "mailqueue"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_log_line_names_its_script_not_a_module(script, scripts, make_config):
    # The start-up check's lines were logged as "mailqueue", the doorbell's as
    # "mailqueue.doorbell": a journal reader could not tell the scripts apart.
    path = make_config()
    config = json.loads(open(path).read())
    config["database"]["port"] = free_port()  # not up: the script waits, logging each try
    open(path, "w").write(json.dumps(config))
    proc = scripts.start(script, "--config", path)
    wait_until(lambda: "waiting for the database" in scripts.log_of(proc), what="a try")
    assert scripts.stop(proc) == 0
    lines = [line for line in scripts.log_of(proc).splitlines() if "RuntimeDirWarning" not in line]
    stem = script[: -len(".py")]
    assert lines and all(re.match(r"\S+ \S+ %s\[\d+\] [A-Z]+ " % stem, line) for line in lines), (
        lines
    )


def test_the_demo_inserts_as_many_mails_as_it_says(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--jobs", "60", "--consumers", "1"]
        + ["--output", str(tmp_path / "demo")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Inserted 60 jobs" in result.stdout, result.stdout
    per_status = re.search(r"^Jobs per status:\n((?:  \w+ +\d+\n)+)", result.stdout, re.M)
    assert per_status, result.stdout
    assert sum(int(line.split()[1]) for line in per_status.group(1).splitlines()) == 60
    # the report's rate is an hour's average, and says so beside the demo's mails/s
    assert re.search(r"per minute, averaged over 1h", result.stdout), result.stdout


def test_the_report_says_over_which_window_it_averages(db, make_config):
    query(db, "INSERT INTO jobs (email, content_message) VALUES ('a@example.com', 'x')")
    result = subprocess.run(
        [sys.executable, "-m", "mailqueue", "report", "--config", make_config(), "--since", "15m"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "per minute, averaged over 15m" in result.stdout
