"""Issue 18 against the real thing: Debian's Postfix as a private relay, which
takes 8 connections from a client (anvil, `smtpd_client_connection_count_limit`)
and answers the ninth at the greeting with `421 4.7.0 ... Error: too many
connections from 127.0.0.1`. The consumer, at concurrency 32, keeps the
connections it has, sends on them, and every mail arrives once.

The instance is the test's own: its config directory, queue, data directory and
log file in a folder under /tmp (world-traversable: Postfix's daemons run as
`postfix`, virtual(8) writes the Maildir as `nobody`); /etc/postfix is only read
for the package's defaults. Skipped where Postfix is not installed, or where the
test cannot start it (its master must start as root)."""

import collections
import email
import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile

import pytest

from devservers import free_port
from helpers import marker_of, query, queue_marked, status_counts, wait_until
from test_relay_replies import drain

POSTFIX = "/usr/sbin/postfix"
DAEMONS = "/usr/lib/postfix/sbin"  # Debian's daemon_directory
CONNECTIONS = 8


def require_postfix():
    if not (os.path.exists(POSTFIX) and os.path.exists(os.path.join(DAEMONS, "smtpd"))):
        pytest.skip("Debian's postfix is not installed (apt-get install postfix)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance must be started as root (postfix -c DIR start)")


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = %(f)s/queue
data_directory = %(f)s/data
maillog_file = %(f)s/maillog
maillog_file_prefixes = %(f)s
syslog_name = mailqueue-test-postfix
myhostname = relay.example.org
mydomain = example.org
myorigin = example.org
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = %(limit)d
smtpd_client_event_limit_exceptions =
virtual_mailbox_domains = example.com
virtual_mailbox_base = %(f)s/mail
virtual_mailbox_maps = static:example.com/
virtual_uid_maps = static:%(uid)d
virtual_gid_maps = static:%(gid)d
virtual_minimum_uid = 1
biff = no
"""

# Only what this test needs: one smtpd on the test's port, no chroot.
MASTER_CF = """\
127.0.0.1:%(port)d inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
retry     unix - - n - - error
error     unix - - n - - error
discard   unix - - n - - discard
virtual   unix - n n - - virtual
"""


class PrivatePostfix:
    """A Postfix instance of the test's own, delivering example.com into one Maildir."""

    def __init__(self, limit):
        self.folder = tempfile.mkdtemp(prefix="mailqueue-postfix-")
        os.chmod(self.folder, 0o755)
        self.port = free_port()
        self.limit = limit
        self.config = os.path.join(self.folder, "etc")  # only root's, as Postfix checks
        self.maildir = os.path.join(self.folder, "mail", "example.com")
        self.started = False

    def postfix(self, *args):
        return subprocess.run(
            [POSTFIX, "-c", self.config] + list(args), capture_output=True, text=True, timeout=60
        )

    def start(self):
        f = self.folder
        mail_user = pwd.getpwnam("nobody")
        os.mkdir(os.path.join(f, "mail"))
        os.chown(os.path.join(f, "mail"), mail_user.pw_uid, mail_user.pw_gid)
        os.mkdir(self.config, 0o755)
        os.mkdir(os.path.join(f, "queue"), 0o755)  # postfix start makes the rest
        os.mkdir(os.path.join(f, "data"))
        shutil.chown(os.path.join(f, "data"), "postfix")
        settings = dict(
            f=f, limit=self.limit, uid=mail_user.pw_uid, gid=mail_user.pw_gid, port=self.port
        )
        with open(os.path.join(self.config, "main.cf"), "w") as main:
            main.write(MAIN_CF % settings)
        with open(os.path.join(self.config, "master.cf"), "w") as master:
            master.write(MASTER_CF % settings)
        started = self.postfix("start")
        self.started = started.returncode == 0
        assert self.started, started.stdout + started.stderr + self.maillog()
        wait_until(self.greets, timeout=30, what="Postfix to greet on port %d" % self.port)
        return self

    def greets(self):
        try:
            smtplib.SMTP("127.0.0.1", self.port, timeout=5).quit()
            return True
        except (OSError, smtplib.SMTPException):
            return False

    def maillog(self):
        try:
            with open(os.path.join(self.folder, "maillog"), errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def delivered(self):
        """The bytes of every mail in the Maildir (new/; nobody reads them)."""
        new = os.path.join(self.maildir, "new")
        if not os.path.isdir(new):
            return []
        found = []
        for name in os.listdir(new):
            with open(os.path.join(new, name), "rb") as f:
                found.append(f.read())
        return found

    def queued(self):
        """How many mails Postfix still holds (its incoming and active queues)."""
        queue = os.path.join(self.folder, "queue")
        return sum(
            len(files)
            for part in ("incoming", "active", "deferred", "hold")
            for _, _, files in os.walk(os.path.join(queue, part))
        )

    def stop(self):
        if self.started:
            self.postfix("stop")
            wait_until(
                lambda: self.postfix("status").returncode != 0, timeout=30, what="Postfix to stop"
            )
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def postfix():
    require_postfix()
    relay = PrivatePostfix(limit=CONNECTIONS)
    try:
        yield relay.start()
    finally:
        relay.stop()


def copies_in(relay):
    """How many times each marker arrived in the relay's Maildir."""
    return collections.Counter(marker_of(content) for content in relay.delivered())


def test_postfix_that_takes_8_connections_gets_600_mails_from_a_consumer_at_concurrency_32(
    postfix, db, make_config, scripts
):
    markers = queue_marked(db, 600)
    config = make_config(smtp_overrides={"port": postfix.port})
    result = drain(scripts, config, "--concurrency", "32", "--processes", "1", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert status_counts(db) == {"completed": 600}
    assert query(db, "SELECT count(*) FROM queue") == [(0,)]
    # Postfix turned connections away (smtpd logs this, and answers the client
    # "421 4.7.0 relay.example.org Error: too many connections from 127.0.0.1"),
    # and the consumer heard it for what it is.
    assert "Connection concurrency limit exceeded" in postfix.maillog()
    assert "takes no more connections" in result.stderr
    assert "too many connections from 127.0.0.1" in result.stderr  # Postfix's own words
    # Every mail Postfix took is delivered, once.
    wait_until(
        lambda: len(postfix.delivered()) >= 600 and postfix.queued() == 0,
        timeout=60,
        what="Postfix to deliver the 600 mails it took",
    )
    assert copies_in(postfix) == {m: 1 for m in markers}
    ids = {email.message_from_bytes(m)["Message-ID"] for m in postfix.delivered()}
    assert len(ids) == 600
