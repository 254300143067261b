"""The configuration file (JSON) and the environment variables that override it.

Every key but the database's has a default, so a minimal file works. Mistakes
(a missing file, bad JSON, an unknown key, a wrong type) raise ConfigError with
one line that names the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from mailqueue import addresses, signing

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

# The seed's five connection keys, exactly; each may be overridden by a variable.
DATABASE_ENV = {
    "database": "MAILQUEUE_DB_NAME",
    "user": "MAILQUEUE_DB_USER",
    "password": "MAILQUEUE_DB_PASSWORD",
    "host": "MAILQUEUE_DB_HOST",
    "port": "MAILQUEUE_DB_PORT",
}
SMTP_ENV = {
    "user": "MAILQUEUE_SMTP_USER",
    "password": "MAILQUEUE_SMTP_PASSWORD",
}
SECURITY_MODES = ("none", "starttls", "ssl")


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for people."""


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 25
    user: str = ""
    password: str = ""
    security: str = "none"  # none, starttls or ssl
    ca_file: Optional[str] = None  # an extra CA to trust; certificates are always verified
    timeout: float = 30.0  # seconds for connecting and for each SMTP reply
    data_timeout: float = 600.0  # seconds for the reply to the end of data (RFC 5321 4.5.3.2)
    max_messages_per_connection: int = 100  # then a new connection (many relays cap it)
    sender: str = "Mail Queue <noreply@example.com>"
    subject: str = "Message from Mail Queue"
    max_message_bytes: Optional[int] = None  # a limit of our own, beside the server's SIZE
    allow_local_domains: bool = False  # accept corp.local, intranet...: a company relay
    dkim: Optional[signing.DkimKey] = None  # smtp.dkim, its key read at start-up

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return "SmtpSettings(host=%r, port=%r, user=%r, security=%r)" % (
            self.host,
            self.port,
            self.user,
            self.security,
        )


@dataclass(frozen=True)
class QueueSettings:
    max_attempts: int = 5  # sends tried before a job is dead
    retry_delay: float = 60.0  # seconds before the first retry; doubles each time
    max_retry_delay: float = 3600.0  # seconds: the longest wait between retries
    batch_size: int = 20  # queue rows a consumer claims at once
    producer_batch_size: int = 1000  # jobs the producer moves per transaction
    concurrency: int = 32  # mails in flight at once per consumer, one SMTP connection each
    processes: Optional[int] = None  # processes they are spread over; None: one per core
    rate_limit: Optional[float] = None  # mails per second across all consumers; None: no limit
    claim_lease: float = 10.0  # seconds a claim outlives its consumer's last heartbeat
    # a job put back without spending an attempt (throttled, a recipient refused for
    # now) spends one after this many times in a row, or once it has waited this long
    max_deferrals: int = 10
    max_defer_time: float = 3600.0  # seconds
    # attachment bytes a consumer process holds at once (claimed and in flight); a
    # claim takes fewer jobs when their files are big; one job larger goes alone
    max_claimed_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    path: str
    database: dict[str, Any]  # keyword arguments for psycopg2.connect (the seed's five keys)
    # the same, for LISTEN (a direct connection when database is a pooler)
    listen_database: dict[str, Any]
    smtp: SmtpSettings
    queue: QueueSettings

    def __repr__(self) -> str:
        return "Config(path=%r)" % self.path


# key -> (type check, description) for the sections with defaults
_SMTP_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "port": (int,),
    "user": (str,),
    "password": (str,),
    "security": (str,),
    "ca_file": (str, type(None)),
    "timeout": (int, float),
    "data_timeout": (int, float),
    "max_messages_per_connection": (int,),
    "sender": (str,),
    "subject": (str,),
    "max_message_bytes": (int, type(None)),
    "allow_local_domains": (bool,),
    "dkim": (dict, type(None)),
}
_QUEUE_TYPES: dict[str, tuple[type, ...]] = {
    "max_attempts": (int,),
    "retry_delay": (int, float),
    "max_retry_delay": (int, float),
    "batch_size": (int,),
    "producer_batch_size": (int,),
    "concurrency": (int,),
    "processes": (int, type(None)),
    "rate_limit": (int, float, type(None)),
    "claim_lease": (int, float),
    "max_deferrals": (int,),
    "max_defer_time": (int, float),
    "max_claimed_bytes": (int,),
}
_DATABASE_TYPES: dict[str, tuple[type, ...]] = {
    "database": (str,),
    "user": (str,),
    "password": (str,),
    "host": (str,),
    "port": (int, str),
}


def load(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read the file at `path`, apply the environment, and check everything."""
    environ = os.environ if environ is None else environ
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            "%s: no such file (copy config.example.json to %s and edit it)" % (path, path)
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError("%s: not valid JSON: %s" % (path, exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("%s: cannot read: %s" % (path, exc)) from None
    return from_dict(raw, path, environ)


def from_dict(
    raw: object, path: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    environ = {} if environ is None else environ
    if not isinstance(raw, dict):
        raise ConfigError("%s: the top level must be a JSON object" % path)
    _no_unknown_keys(raw, ("database", "listen_database", "smtp", "queue"), path, "")

    database = _section(raw, "database", _DATABASE_TYPES, path)
    for key, var in DATABASE_ENV.items():
        if environ.get(var):
            database[key] = environ[var]
    if "port" in database:
        database["port"] = _port(database["port"], path, "database.port")
    # LISTEN needs a direct connection (a pooler in transaction mode delivers no
    # notifications); keys it does not name are taken from `database`.
    listen_database = dict(database, **_section(raw, "listen_database", _DATABASE_TYPES, path))
    if "port" in listen_database:
        listen_database["port"] = _port(listen_database["port"], path, "listen_database.port")

    smtp_raw = _section(raw, "smtp", _SMTP_TYPES, path)
    for key, var in SMTP_ENV.items():
        if environ.get(var):
            smtp_raw[key] = environ[var]
    smtp = SmtpSettings(**smtp_raw)
    if smtp.security not in SECURITY_MODES:
        raise ConfigError(
            "%s: smtp.security must be one of %s, not %r"
            % (path, ", ".join(SECURITY_MODES), smtp.security)
        )
    _port(smtp.port, path, "smtp.port")
    for key in ("timeout", "data_timeout"):
        if getattr(smtp, key) <= 0:
            raise ConfigError("%s: smtp.%s must be a positive number of seconds" % (path, key))
    if smtp.max_messages_per_connection < 1:
        raise ConfigError("%s: smtp.max_messages_per_connection must be at least 1" % path)
    if smtp.ca_file is not None and not os.path.isfile(smtp.ca_file):
        raise ConfigError("%s: smtp.ca_file %r is not a file" % (path, smtp.ca_file))
    if smtp.max_message_bytes is not None and smtp.max_message_bytes < 1:
        raise ConfigError(
            "%s: smtp.max_message_bytes must be at least 1 (or null: the server's SIZE only)" % path
        )
    if smtp.dkim is not None:
        try:
            smtp = dataclasses.replace(smtp, dkim=signing.load_key(smtp.dkim))
        except signing.BadKey as exc:
            raise ConfigError("%s: %s" % (path, exc)) from None
    try:
        addresses.parse_sender(smtp.sender, smtp.allow_local_domains)
        addresses.check_header_text(smtp.subject, "smtp.subject")
    except addresses.BadAddress as exc:
        raise ConfigError("%s: smtp.sender: %s" % (path, exc)) from None
    except addresses.BadHeader as exc:
        raise ConfigError("%s: %s" % (path, exc)) from None

    queue = QueueSettings(**_section(raw, "queue", _QUEUE_TYPES, path))
    for key in ("max_attempts", "batch_size", "producer_batch_size", "concurrency"):
        if getattr(queue, key) < 1:
            raise ConfigError("%s: queue.%s must be at least 1" % (path, key))
    if queue.processes is not None and queue.processes < 1:
        raise ConfigError("%s: queue.processes must be at least 1 (or null: one per core)" % path)
    if queue.rate_limit is not None and queue.rate_limit <= 0:
        raise ConfigError(
            "%s: queue.rate_limit must be a positive number of mails per second "
            "(or null: no limit)" % path
        )
    if queue.max_deferrals < 0:
        raise ConfigError("%s: queue.max_deferrals must be 0 or more" % path)
    if queue.max_defer_time <= 0:
        raise ConfigError("%s: queue.max_defer_time must be a positive number of seconds" % path)
    if queue.max_claimed_bytes < 1:
        raise ConfigError("%s: queue.max_claimed_bytes must be at least 1" % path)
    if queue.claim_lease < 1:
        raise ConfigError("%s: queue.claim_lease must be at least 1 second" % path)
    if queue.retry_delay < 0 or queue.max_retry_delay < queue.retry_delay:
        raise ConfigError("%s: queue.retry_delay must be >= 0 and <= queue.max_retry_delay" % path)
    return Config(
        path=path, database=database, listen_database=listen_database, smtp=smtp, queue=queue
    )


def _section(
    raw: dict[str, Any], name: str, types: dict[str, tuple[type, ...]], path: str
) -> dict[str, Any]:
    section = raw.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError("%s: %s must be a JSON object" % (path, name))
    _no_unknown_keys(section, types, path, name + ".")
    for key, value in section.items():
        allowed = types[key]
        # JSON true/false are ints to Python; never accept them as numbers
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            wanted = " or ".join(
                "null"
                if t is type(None)
                else {
                    "str": "a string",
                    "int": "a whole number",
                    "float": "a number",
                    "bool": "true or false",
                    "dict": "a JSON object",
                }[t.__name__]
                for t in allowed
            )
            raise ConfigError("%s: %s%s must be %s" % (path, name + ".", key, wanted))
    return dict(section)


def _no_unknown_keys(section: Iterable[str], known: Iterable[str], path: str, prefix: str) -> None:
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(
            "%s: unknown key %s%s (known: %s)"
            % (path, prefix, unknown[0], ", ".join(sorted(known)))
        )


def _port(value: Any, path: str, key: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 0 < port < 65536:
        raise ConfigError("%s: %s must be a port number, not %r" % (path, key, value))
    return port
