"""Debian's Dovecot (dovecot-imapd) as a private IMAPS server for a test.

Its own folder (world-traversable, under /tmp, since mail is read and written as
an unprivileged user), its own config file (no system config is read or
touched), its own instance name, base_dir and log, a certificate from a trustme
CA, one user in a passwd-file, and a free port. Dovecot refuses to hand mail to
uid 0 ("userdb returned 0 as uid"), so as root the mail user is nobody; as
another user, that user."""

import imaplib
import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
import uuid

import pytest

from devservers import free_port
from helpers import wait_until

BINARY = "/usr/sbin/dovecot"
USER = "bounces"


def require_dovecot():
    if os.path.exists(BINARY):
        return
    message = "Debian's dovecot-imapd is not installed (apt-get install dovecot-imapd)"
    if os.environ.get("CI"):
        pytest.fail(message + "; .ci/run should have installed it")
    pytest.skip(message)


class Dovecot:
    def __init__(self, ca, password):
        self.ca, self.password = ca, password
        self.folder = tempfile.mkdtemp(prefix="mailqueue-dovecot-")
        os.chmod(self.folder, 0o755)
        self.port = free_port()
        self.config = os.path.join(self.folder, "dovecot.conf")
        self.log = os.path.join(self.folder, "dovecot.log")
        self.ca_file = os.path.join(self.folder, "ca.pem")

    def start(self):
        f = self.folder
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(os.path.join(f, "key.pem"))
        cert.cert_chain_pems[0].write_to_path(os.path.join(f, "cert.pem"))
        self.ca.cert_pem.write_to_path(self.ca_file)
        mail = os.path.join(f, "mail")
        os.mkdir(mail)
        me = pwd.getpwuid(os.getuid())
        owner = pwd.getpwnam("nobody") if os.getuid() == 0 else me
        os.chown(mail, owner.pw_uid, owner.pw_gid)
        with open(os.path.join(f, "passwd"), "w") as p:
            p.write("%s:{PLAIN}%s::::::\n" % (USER, self.password))
        internal = (
            ""
            if os.getuid() == 0
            else (
                "default_internal_user = %s\ndefault_login_user = %s\n" % (me.pw_name, me.pw_name)
            )
        )
        with open(self.config, "w") as c:
            c.write(
                "instance_name = mailqueue-test-%(id)s\n"
                "base_dir = %(f)s/run\n"
                "state_dir = %(f)s/state\n"
                "log_path = %(log)s\n"
                "%(internal)s"
                "protocols = imap\n"
                "listen = 127.0.0.1\n"
                "ssl = required\n"
                "ssl_cert = <%(f)s/cert.pem\n"
                "ssl_key = <%(f)s/key.pem\n"
                "auth_mechanisms = plain\n"
                "mail_location = maildir:%(mail)s/%%u\n"
                "passdb {\n  driver = passwd-file\n  args = %(f)s/passwd\n}\n"
                "userdb {\n  driver = static\n"
                "  args = uid=%(uid)d gid=%(gid)d home=%(mail)s/%%u\n}\n"
                "service imap-login {\n  chroot =\n"
                "  inet_listener imap {\n    port = 0\n  }\n"
                "  inet_listener imaps {\n    port = %(port)d\n    ssl = yes\n  }\n}\n"
                "service anvil {\n  chroot =\n}\n"
                % dict(
                    id=uuid.uuid4().hex[:8],
                    f=f,
                    log=self.log,
                    internal=internal,
                    mail=mail,
                    uid=owner.pw_uid,
                    gid=owner.pw_gid,
                    port=self.port,
                )
            )
        subprocess.run([BINARY, "-c", self.config], check=True, timeout=30)
        wait_until(self._answers, timeout=30, what="Dovecot to answer")
        return self

    def _answers(self):
        try:
            self.client().logout()
            return True
        except (OSError, imaplib.IMAP4.error):
            return False

    def client(self):
        context = ssl.create_default_context(cafile=self.ca_file)
        conn = imaplib.IMAP4_SSL("127.0.0.1", self.port, ssl_context=context, timeout=10)
        plain = "\0%s\0%s" % (USER, self.password)
        conn.authenticate("PLAIN", lambda _: plain.encode("utf-8"))
        return conn

    def append(self, raw, folder="INBOX"):
        conn = self.client()
        try:
            status, _ = conn.append(folder, None, None, raw)
            assert status == "OK"
        finally:
            conn.logout()

    def messages(self, folder="INBOX"):
        """The bytes of every message in `folder`, not marked deleted."""
        conn = self.client()
        try:
            status, _ = conn.select('"%s"' % folder, readonly=True)
            if status != "OK":
                return []
            _, data = conn.uid("SEARCH", "UNDELETED")
            found = []
            for uid in data[0].split():
                _, fetched = conn.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
                found += [item[1] for item in fetched if isinstance(item, tuple)]
            return found
        finally:
            conn.logout()

    def url(self, folder="INBOX"):
        return "imaps://%s@127.0.0.1:%d/%s" % (USER, self.port, folder)

    def stop(self):
        subprocess.run([BINARY, "-c", self.config, "stop"], timeout=30)
        pid_file = os.path.join(self.folder, "run", "master.pid")
        wait_until(lambda: not os.path.exists(pid_file), timeout=30, what="Dovecot to stop")
        shutil.rmtree(self.folder, ignore_errors=True)
