"""Mistakes on the command line give one clear line and a non-zero exit."""

import json
import os

import pytest

from devservers import SmtpSink, free_port
from helpers import Forwarder, query, wait_until

SCRIPTS = ["consumer.py", "producer.py"]


def assert_one_clear_line(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "RuntimeDirWarning" not in line]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_config_file(script, scripts, tmp_path):
    result = scripts.run(script, "--config", str(tmp_path / "nope.json"))
    assert_one_clear_line(result, "nope.json", "no such file", "config.example.json")


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_file_that_is_not_json(script, scripts, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"database": {"host": "127.0.0.1",}}')
    assert_one_clear_line(scripts.run(script, "--config", str(path)), "bad.json", "not valid JSON")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_smtp_security(script, scripts, make_config):
    config = make_config(smtp_overrides={"security": "tls"})
    assert_one_clear_line(
        scripts.run(script, "--config", config), "smtp.security", "none, starttls, ssl", "'tls'"
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_misspelt_key(script, scripts, make_config):
    config = make_config(queue={"max_atempts": 3})
    assert_one_clear_line(scripts.run(script, "--config", config), "unknown key queue.max_atempts")


def test_a_database_and_an_smtp_server_that_are_not_up_yet_are_waited_for(
    db, postgres, smtp, make_config, scripts
):
    late_db, late_smtp = free_port(), free_port()
    path = make_config(smtp_overrides={"port": late_smtp})
    config = json.loads(open(path).read())
    config["database"].update(port=late_db, password="hunter2-secret")
    open(path, "w").write(json.dumps(config))
    producer = scripts.start("producer.py", "--config", path)
    consumer = scripts.start("consumer.py", "--config", path)
    for proc in (producer, consumer):  # one line per try, backing off
        wait_until(
            lambda: scripts.log_of(proc).count("waiting for the database") >= 2, what="two tries"
        )
    forwarder = Forwarder(late_db, postgres.settings_for("x")["port"]).listen()
    try:
        wait_until(
            lambda: "waiting for the SMTP server" in scripts.log_of(consumer),
            what="the consumer to wait for its SMTP server next",
        )
        query(db, "INSERT INTO jobs (email, content_message) VALUES ('late@example.com', 'hi')")
        late = SmtpSink(port=late_smtp).start()
        try:
            late.wait_for(1)
            for proc in (producer, consumer):
                assert scripts.stop(proc) == 0
        finally:
            late.stop()
    finally:
        forwarder.close()
    for proc in (producer, consumer):
        log = scripts.log_of(proc)
        assert "hunter2-secret" not in log and "Traceback" not in log
        assert str(late_db) in log


@pytest.mark.parametrize("script", SCRIPTS)
def test_what_waiting_cannot_fix_fails_at_once(script, scripts, make_config):
    env = dict(
        os.environ, MAILQUEUE_DB_NAME="no_such_database_here", MAILQUEUE_DB_PASSWORD="from-env"
    )
    result = scripts.run(script, "--config", make_config(), timeout=30, env=env)
    assert_one_clear_line(result, "cannot connect", "no_such_database_here", "does not exist")
    assert "from-env" not in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_database_without_the_schema(script, scripts, postgres, make_config, tmp_path):
    empty = postgres.create_database()
    try:
        config = make_config(database=postgres.settings_for(empty))
        assert_one_clear_line(scripts.run(script, "--config", config), "run sql/schema.sql first")
    finally:
        postgres.drop_database(empty)
