"""TLS that is verified and never falls back, AUTH only over TLS, secrets kept out
of logs and errors, and least-privilege database roles."""

import os
import ssl

import psycopg2
import pytest
import trustme
from aiosmtpd.smtp import AuthResult

from devservers import SmtpSink
from helpers import PASSWORD, insert_jobs, query, recipients, status_counts


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca, *names):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
    return context


class Logins:
    """An aiosmtpd authenticator that remembers every attempt."""

    def __init__(self, user="mailer", password=PASSWORD):
        self.expected = (user.encode(), password.encode())
        self.attempts = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        self.attempts.append((mechanism, session.ssl is not None))
        return AuthResult(
            success=(auth_data.login, auth_data.password) == self.expected, handled=False
        )


def send_one(db, scripts, config, *extra):
    insert_jobs(db, [("tls@example.com", "over TLS", None)])
    assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
    return scripts.run("consumer.py", "--config", config, "--drain", *extra)


def test_starttls_with_a_trusted_certificate_and_auth_delivers(
    db, ca, ca_file, make_config, scripts
):
    logins = Logins()
    with SmtpSink(
        tls_context=server_context(ca),
        require_starttls=True,
        authenticator=logins,
        auth_required=True,
    ) as server:
        config = make_config(
            smtp_overrides={
                "port": server.port,
                "security": "starttls",
                "ca_file": ca_file,
                "user": "mailer",
                "password": PASSWORD,
            }
        )
        result = send_one(db, scripts, config, "--log-level", "DEBUG")
        assert result.returncode == 0, result.stderr
        assert recipients(server) == ["tls@example.com"]
    assert logins.attempts and all(over_tls for _, over_tls in logins.attempts)
    assert PASSWORD not in result.stderr + result.stdout


def test_implicit_tls_delivers(db, ca, ca_file, make_config, scripts):
    with SmtpSink(ssl_context=server_context(ca)) as server:
        config = make_config(
            smtp_overrides={"port": server.port, "security": "ssl", "ca_file": ca_file}
        )
        assert send_one(db, scripts, config).returncode == 0
        assert recipients(server) == ["tls@example.com"]


@pytest.mark.parametrize("problem", ["untrusted CA", "no ca_file", "wrong host name"])
def test_a_certificate_that_does_not_verify_sends_nothing(
    problem, db, ca, tmp_path, make_config, scripts
):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    names = ("mail.example.org",) if problem == "wrong host name" else ()
    ca_file = {"untrusted CA": str(other), "no ca_file": None}.get(problem)
    if problem == "wrong host name":
        ca_file = str(tmp_path / "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
    logins = Logins()
    with SmtpSink(tls_context=server_context(ca, *names), authenticator=logins) as server:
        config = make_config(
            smtp_overrides={
                "port": server.port,
                "security": "starttls",
                "ca_file": ca_file,
                "user": "mailer",
                "password": PASSWORD,
            }
        )
        result = send_one(db, scripts, config)
        assert recipients(server) == []
    assert result.returncode != 0
    assert "certificate verify failed" in result.stderr and "Traceback" not in result.stderr
    assert logins.attempts == [], "the password was never sent"
    assert status_counts(db) == {"queued": 1}, "no job is blamed for the server's certificate"


def test_starttls_never_falls_back_to_plain_text(db, make_config, scripts):
    logins = Logins()
    with SmtpSink(authenticator=logins, auth_require_tls=False) as server:  # offers no STARTTLS
        config = make_config(
            smtp_overrides={
                "port": server.port,
                "security": "starttls",
                "user": "mailer",
                "password": PASSWORD,
            }
        )
        result = send_one(db, scripts, config)
        assert recipients(server) == []
    assert result.returncode != 0 and "STARTTLS" in result.stderr
    assert logins.attempts == []


def test_a_refused_login_is_one_clear_line_without_the_password(
    db, ca, ca_file, make_config, scripts
):
    with SmtpSink(
        tls_context=server_context(ca), authenticator=Logins(password="other"), auth_required=True
    ) as server:
        config = make_config(
            smtp_overrides={
                "port": server.port,
                "security": "starttls",
                "ca_file": ca_file,
                "user": "mailer",
                "password": PASSWORD,
            }
        )
        result = send_one(db, scripts, config, "--log-level", "DEBUG")
    assert result.returncode != 0
    assert "SMTP login as 'mailer' refused: 535" in result.stderr
    assert PASSWORD not in result.stderr
    assert query(db, "SELECT last_error FROM jobs") == [(None,)]


def test_smtp_password_from_the_environment_is_used_and_never_logged(
    db, ca, ca_file, make_config, scripts
):
    logins = Logins()
    with SmtpSink(
        tls_context=server_context(ca), authenticator=logins, auth_required=True
    ) as server:
        config = make_config(
            smtp_overrides={
                "port": server.port,
                "security": "starttls",
                "ca_file": ca_file,
                "user": "mailer",
                "password": "wrong-in-file",
            }
        )
        insert_jobs(db, [("env@example.com", "x", None)])
        env = dict(os.environ, MAILQUEUE_SMTP_PASSWORD=PASSWORD)
        assert scripts.run("producer.py", "--config", config, "--once").returncode == 0
        result = scripts.run(
            "consumer.py", "--config", config, "--drain", "--log-level", "DEBUG", env=env
        )
        assert result.returncode == 0, result.stderr
        assert recipients(server) == ["env@example.com"]
    assert PASSWORD not in result.stderr


def test_scripts_work_under_the_least_privilege_roles(
    postgres, database, roles, smtp, make_config, scripts
):
    settings = dict(
        postgres.settings_for(database), user=roles["mailqueue_worker"], password=PASSWORD
    )
    config = make_config(database=settings)
    app = psycopg2.connect(postgres.dsn(database), user=roles["mailqueue_app"], password=PASSWORD)
    app.autocommit = True
    [(job_id,)] = query(
        app,
        "INSERT INTO jobs(email, content_message) "
        "VALUES ('least@example.com', 'privilege') RETURNING job_id",
    )
    for forbidden in (
        "SELECT email FROM jobs",
        "UPDATE jobs SET status = 'dead'",
        "DELETE FROM jobs",
        "SELECT * FROM queue",
    ):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            query(app, forbidden)
    app.close()

    for script, flag in (("producer.py", "--once"), ("consumer.py", "--drain")):
        result = scripts.run(script, "--config", config, flag)
        assert result.returncode == 0, result.stderr
    assert recipients(smtp) == ["least@example.com"]

    worker = psycopg2.connect(
        postgres.dsn(database), user=roles["mailqueue_worker"], password=PASSWORD
    )
    worker.autocommit = True
    assert query(worker, "SELECT status FROM jobs WHERE job_id = %s", (job_id,)) == [("completed",)]
    for forbidden in (
        "UPDATE jobs SET email = 'other@example.com'",
        "DELETE FROM jobs",
        "INSERT INTO jobs(email, content_message) VALUES ('a@example.com', 'x')",
    ):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            query(worker, forbidden)
    worker.close()
