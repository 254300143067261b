"""One-click unsubscribe (RFC 8058): the headers in the sent mail (signed by
DKIM where DKIM is on), the server's answers to POST, GET and forged tokens,
as the role of sql/roles.sql, and its page clicked in headless Chromium."""

import email
import email.policy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import dkim
import pytest

from devservers import free_port
from helpers import PASSWORD, ROOT, query, wait_until
from mailqueue import signing, tokens
from mailqueue.config import SmtpSettings
from mailqueue.message import BadMail, Composer
from test_message import dns_for, job, write_dkim_key

SECRET = "the-unsubscribe-secret-0123456789abcdef"
URL = "https://example.org/unsubscribe"


def composer(**smtp):
    return Composer(
        SmtpSettings(
            sender="Shop <shop@example.org>", unsubscribe_url=URL, secret=SECRET.encode(), **smtp
        )
    )


def test_the_headers_name_a_signed_link_and_are_covered_by_dkim(tmp_path):
    key = signing.load_key(
        {
            "domain": "example.org",
            "selector": "mail2026",
            "private_key_file": write_dkim_key(tmp_path),
        }
    )
    mail = composer(dkim=key).build(job(job_id=42, email="An@example.com", unsubscribe=True))
    message = email.message_from_bytes(mail.data, policy=email.policy.default)
    link = message["List-Unsubscribe"]
    assert link.startswith("<%s/" % URL) and link.endswith(">")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    found = tokens.read_unsubscribe_token(SECRET.encode(), link[1:-1].rsplit("/", 1)[1])
    assert (found.job_id, found.email) == (42, "An@example.com")
    assert dkim.verify(mail.data, dnsfunc=dns_for("mail2026", "example.org"))
    fields = dkim.util.parse_tag_value(message["DKIM-Signature"].encode().replace(b"\r\n", b""))
    signed = [h.strip() for h in fields[b"h"].split(b":")]
    assert b"list-unsubscribe" in signed and b"list-unsubscribe-post" in signed


def test_a_job_without_unsubscribe_has_no_such_header_and_one_that_asks_needs_the_url():
    plain = composer().build(job())
    assert b"List-Unsubscribe" not in plain.data
    no_url = Composer(SmtpSettings(sender="shop@example.org"))
    with pytest.raises(BadMail, match="unsubscribe.url is not set"):
        no_url.build(job(unsubscribe=True))
    with pytest.raises(BadMail, match="give one or the other"):
        composer().build(job(unsubscribe=True, headers={"List-Unsubscribe": "<https://x.org>"}))


def test_forged_and_damaged_tokens_are_refused():
    secret = SECRET.encode()
    token = tokens.unsubscribe_token(secret, 7, "an@example.com")
    assert tokens.read_unsubscribe_token(secret, token).email == "an@example.com"
    payload, mac = token.split(".")
    other = tokens.unsubscribe_token(secret, 7, "boss@example.com").split(".")[0]
    for bad in (
        other + "." + mac,  # another address under this signature
        payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),
        tokens.unsubscribe_token(b"another-secret-0123456789", 7, "an@example.com"),
        "",
        "not-a-token",
        token + "." + mac,
    ):
        with pytest.raises(tokens.BadToken):
            tokens.read_unsubscribe_token(secret, bad)


# ---------------------------------------------------------------- the server


class Server:
    """python -m mailqueue unsubscribe-server in the background."""

    def __init__(self, config, tmp_path, secret=SECRET):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log = open(tmp_path / "unsubscribe.log", "w+")
        env = dict(os.environ, MAILQUEUE_SECRET=secret)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailqueue", "unsubscribe-server", "--config", config]
            + ["--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def request(self, path, body=None, content_type="application/x-www-form-urlencoded"):
        request = urllib.request.Request(self.url + path, data=body)
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8")

    def __enter__(self):
        def answers():
            assert self.proc.poll() is None, self.output()
            try:
                return self.request("/x")[0]
            except OSError:
                return None

        wait_until(answers, timeout=30, what="the unsubscribe server")
        return self

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def __exit__(self, *exc):
        self.proc.terminate()
        assert self.proc.wait(timeout=30) == 0
        assert "Traceback" not in self.output()
        self.log.close()


def suppressions(db):
    return query(db, "SELECT email, reason, source, job_id FROM suppressions")


@pytest.fixture
def sent_with_link(db, make_config, smtp, scripts):
    """A job with unsubscribe = true sent through the queue; (job id, its link's
    path, the configuration for the unsubscribe role)."""
    [(job_id,)] = query(
        db,
        "INSERT INTO jobs (email, content_message, unsubscribe) "
        "VALUES ('Reader@example.com', 'marker:u1', true) RETURNING job_id",
    )
    config = make_config(unsubscribe={"url": "http://127.0.0.1:1/u"})
    env = dict(os.environ, MAILQUEUE_SECRET=SECRET)
    assert scripts.run("producer.py", "--config", config, "--once", env=env).returncode == 0
    assert scripts.run("consumer.py", "--config", config, "--drain", env=env).returncode == 0
    [(_, _, content, _)] = smtp.received
    message = email.message_from_bytes(content)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = message["List-Unsubscribe"]
    assert link.startswith("<http://127.0.0.1:1/u/")
    return job_id, "/u/" + link[1:-1].rsplit("/", 1)[1]


@pytest.fixture
def as_unsubscribe_role(postgres, database, roles, make_config):
    settings = dict(
        postgres.settings_for(database), user=roles["mailqueue_unsubscribe"], password=PASSWORD
    )
    return make_config(database=settings)


def test_post_suppresses_get_does_not_and_forged_tokens_get_400(
    db, sent_with_link, as_unsubscribe_role, tmp_path
):
    job_id, path = sent_with_link
    with Server(as_unsubscribe_role, tmp_path) as server:
        status, page = server.request(path)
        assert status == 200 and 'method="post"' in page and "R***@example.com" in page
        assert suppressions(db) == [], "a GET alone never unsubscribes"

        payload, mac = path.rsplit("/", 1)[1].split(".")
        forged = tokens.unsubscribe_token(b"not-our-secret-at-all-0000", job_id, "boss@example.com")
        for bad in ("/u/" + forged, "/u/%s.%s" % (payload, mac[::-1]), "/u/nothing"):
            assert server.request(bad)[0] == 400
            assert server.request(bad, b"List-Unsubscribe=One-Click")[0] == 400
        assert server.request(path, b"something=else")[0] == 400
        assert suppressions(db) == []

        status, page = server.request(path, b"List-Unsubscribe=One-Click")
        assert status == 200 and "You are unsubscribed" in page
        assert suppressions(db) == [("reader@example.com", "unsubscribe", "link", job_id)]
        # again (a client retrying): still one row, still 200
        assert server.request(path, b"List-Unsubscribe=One-Click")[0] == 200
        # multipart/form-data, as some clients send it
        query(db, "DELETE FROM suppressions")
        body = (
            b'--xyz\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
            b"One-Click\r\n--xyz--\r\n"
        )
        status, _ = server.request(path, body, "multipart/form-data; boundary=xyz")
        assert status == 200 and len(suppressions(db)) == 1
        assert PASSWORD not in server.output() and SECRET not in server.output()


def test_the_unsubscribe_role_cannot_read_addresses_or_bodies(
    postgres, database, roles, sent_with_link
):
    import psycopg2

    conn = psycopg2.connect(
        **dict(
            postgres.settings_for(database), user=roles["mailqueue_unsubscribe"], password=PASSWORD
        )
    )
    conn.autocommit = True
    try:
        for sql in (
            "SELECT email FROM jobs",
            "SELECT content_message FROM jobs",
            "SELECT reason FROM suppressions",
            "DELETE FROM suppressions",
            "UPDATE suppressions SET email = 'x@example.com'",
        ):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                query(conn, sql)
    finally:
        conn.close()


# ---------------------------------------------------------------- headless Chromium


class ChromeDriver:
    """Debian's chromedriver (chromium-driver) spoken to over its W3C WebDriver
    HTTP API, with the standard library alone."""

    def __init__(self):
        binary = shutil.which("chromedriver")
        browser = shutil.which("chromium")
        if not binary or not browser:
            message = "needs Debian's chromium and chromium-driver"
            if os.environ.get("CI"):
                pytest.fail(message + "; .ci/run installs them")
            pytest.skip(message)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port=%d" % self.port],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = "http://127.0.0.1:%d" % self.port
        wait_until(self._ready, timeout=30, what="chromedriver")
        self.profile = tempfile.mkdtemp(prefix="mailqueue-chromium-")
        session = self.call(
            "POST",
            "/session",
            {
                "capabilities": {
                    "alwaysMatch": {
                        "goog:chromeOptions": {
                            "binary": browser,
                            "args": [
                                "--headless",
                                "--no-sandbox",
                                "--disable-gpu",
                                "--no-first-run",
                                "--disable-background-networking",
                                "--disable-component-update",
                                "--disable-sync",
                                "--user-data-dir=" + self.profile,
                            ],
                        }
                    }
                }
            },
        )
        self.session = "/session/" + session["sessionId"]

    def _ready(self):
        try:
            return self.call("GET", "/status")["ready"]
        except OSError:
            return False

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["value"]

    def open(self, url):
        self.call("POST", self.session + "/url", {"url": url})

    def click(self, css):
        element = self.call(
            "POST", self.session + "/element", {"using": "css selector", "value": css}
        )
        element_id = next(iter(element.values()))
        self.call("POST", self.session + "/element/%s/click" % element_id, {})

    def source(self):
        return self.call("GET", self.session + "/source")

    def close(self):
        try:
            self.call("DELETE", self.session)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            shutil.rmtree(self.profile, ignore_errors=True)


def test_the_page_in_headless_chromium_unsubscribes_only_when_the_button_is_pressed(
    db, sent_with_link, as_unsubscribe_role, tmp_path
):
    job_id, path = sent_with_link
    with Server(as_unsubscribe_role, tmp_path) as server:
        browser = ChromeDriver()
        try:
            browser.open(server.url + path)
            page = browser.source()
            assert "Stop sending mail to" in page and 'id="unsubscribe"' in page
            assert suppressions(db) == []
            browser.click("#unsubscribe")
            wait_until(lambda: "You are unsubscribed" in browser.source(), what="the answer")
            assert suppressions(db) == [("reader@example.com", "unsubscribe", "link", job_id)]
            browser.open(server.url + "/u/forged.token")
            assert "This link is not valid" in browser.source()
        finally:
            browser.close()


@pytest.mark.parametrize(
    "section, environ, words",
    [
        ({"smtp": {"return_path": "bounces@example.org"}}, {}, "set MAILQUEUE_SECRET"),
        ({"unsubscribe": {"url": URL}}, {"MAILQUEUE_SECRET": "short"}, "at least 16"),
        ({"smtp": {"return_path": "b+x@example.org"}}, {"MAILQUEUE_SECRET": SECRET}, "'+'"),
        ({"smtp": {"return_path": "not an address"}}, {"MAILQUEUE_SECRET": SECRET}, "return_path"),
        ({"unsubscribe": {"url": "ftp://example.org/u"}}, {"MAILQUEUE_SECRET": SECRET}, "https"),
        ({"unsubscribe": {"url": URL + "?a=1"}}, {"MAILQUEUE_SECRET": SECRET}, "without query"),
        ({"unsubscribe": {"link": URL}}, {"MAILQUEUE_SECRET": SECRET}, "unknown key"),
    ],
)
def test_the_configuration_refuses_what_cannot_work(section, environ, words):
    from mailqueue import config as configuration

    raw = dict({"database": {"database": "x"}}, **section)
    with pytest.raises(configuration.ConfigError, match=re.escape(words)):
        configuration.from_dict(raw, "c.json", environ)


def test_the_secret_never_shows_in_a_repr():
    from mailqueue import config as configuration

    loaded = configuration.from_dict(
        {"database": {"database": "x"}, "unsubscribe": {"url": URL}},
        "c.json",
        {"MAILQUEUE_SECRET": SECRET},
    )
    assert loaded.secret == SECRET.encode() and loaded.smtp.secret == SECRET.encode()
    assert SECRET not in repr(loaded) and SECRET not in repr(loaded.smtp)
