"""Mistakes on the command line give one clear line and a non-zero exit."""

import json
import os

import pytest

from mailqueue.devservers import free_port

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
    assert_one_clear_line(scripts.run(script, "--config", config),
                          "smtp.security", "none, starttls, ssl", "'tls'")


@pytest.mark.parametrize("script", SCRIPTS)
def test_misspelt_key(script, scripts, make_config):
    config = make_config(queue={"max_atempts": 3})
    assert_one_clear_line(scripts.run(script, "--config", config), "unknown key queue.max_atempts")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unreachable_database(script, scripts, make_config, tmp_path):
    path = make_config()
    config = json.loads(open(path).read())
    config["database"]["port"] = free_port()
    config["database"]["password"] = "hunter2-secret"
    open(path, "w").write(json.dumps(config))
    result = scripts.run(script, "--config", path)
    assert_one_clear_line(result, "cannot connect", str(config["database"]["port"]))
    assert "hunter2-secret" not in result.stderr


def test_unreachable_smtp_server(scripts, make_config):
    port = free_port()
    result = scripts.run("consumer.py", "--config", make_config(smtp_overrides={"port": port}))
    assert_one_clear_line(result, "cannot reach SMTP server", str(port))


@pytest.mark.parametrize("script", SCRIPTS)
def test_database_without_the_schema(script, scripts, postgres, make_config, tmp_path):
    empty = postgres.create_database()
    try:
        config = make_config(database=postgres.settings_for(empty))
        assert_one_clear_line(scripts.run(script, "--config", config), "run sql/schema.sql first")
    finally:
        postgres.drop_database(empty)


def test_environment_overrides_the_database_password(scripts, make_config, tmp_path):
    env = dict(os.environ, MAILQUEUE_DB_PORT=str(free_port()), MAILQUEUE_DB_PASSWORD="from-env")
    result = scripts.run("producer.py", "--config", make_config(), "--once", env=env)
    assert_one_clear_line(result, "cannot connect", env["MAILQUEUE_DB_PORT"])
    assert "from-env" not in result.stderr
