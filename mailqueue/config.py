"""The configuration file (JSON) and the environment variables that override it.

Every key but the database's has a default, so a minimal file works. Mistakes
(a missing file, bad JSON, no database named, an unknown key, a wrong type)
raise ConfigError with one line that names the file and the key. The keys are
described in docs/configuration.md.

Relays and routes (docs/relays.md): `relays` names the SMTP servers, each taking
the keys of `smtp` (whose values they inherit, but for user and password) plus
its limits; `routes` names lists of them. Without `relays`, `smtp` is the one
relay, named `default`; without `routes`, the route `default` is every relay in
order, failover.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from mailqueue import addresses, signing, tokens

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
STRATEGIES = ("failover", "round_robin")
DEFAULT = "default"  # the relay made of `smtp` alone, and the route of jobs with none
# Relay and route names: they appear in logs, pages, metrics' labels and buckets.
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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
    # bounces@example.org: each mail's envelope sender becomes bounces+<job>-<tag>@...
    return_path: Optional[str] = None
    # Not keys of smtp: copied here from unsubscribe.url and MAILQUEUE_SECRET, so
    # that the Composer, made from these settings alone, has them.
    unsubscribe_url: Optional[str] = None
    secret: Optional[bytes] = None

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return "SmtpSettings(host=%r, port=%r, user=%r, security=%r)" % (
            self.host,
            self.port,
            self.user,
            self.security,
        )


@dataclass(frozen=True)
class RelaySettings(SmtpSettings):
    """One SMTP server mails may go through: everything `smtp` says, and its limits."""

    name: str = DEFAULT
    concurrency: Optional[int] = None  # mails in flight to it per consumer; None: no own cap
    rate_limit: Optional[float] = None  # mails per second, across all consumers; None: no limit
    daily_quota: Optional[int] = None  # mails per rolling 24 hours, across all consumers

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return "RelaySettings(name=%r, host=%r, port=%r, user=%r, security=%r)" % (
            self.name,
            self.host,
            self.port,
            self.user,
            self.security,
        )


@dataclass(frozen=True)
class Route:
    """Where a job whose `route` is this name may go: these relays, in this order."""

    name: str
    relays: tuple[str, ...]
    strategy: str = "failover"  # or round_robin


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
    # (64 MiB: a byte held costs about 5.5 in memory, raw, base64, the mail: under
    # 1 GB for two processes; docs/performance.md)
    max_claimed_bytes: int = 64 * 1024 * 1024
    relay_retry_after: float = 30.0  # seconds a failed relay is left alone by every consumer


@dataclass(frozen=True)
class UnsubscribeSettings:
    url: Optional[str] = None  # public base URL of the unsubscribe server; None: off


@dataclass(frozen=True)
class Config:
    path: str
    database: dict[str, Any]  # keyword arguments for psycopg2.connect (the seed's five keys)
    # the same, for LISTEN (a direct connection when database is a pooler)
    listen_database: dict[str, Any]
    smtp: SmtpSettings  # the defaults of every relay (the one relay without `relays`)
    queue: QueueSettings
    # name -> relay, in the order written; never empty
    relays: dict[str, RelaySettings] = dataclasses.field(default_factory=dict)
    # name -> route; always has "default"
    routes: dict[str, Route] = dataclasses.field(default_factory=dict)
    unsubscribe: UnsubscribeSettings = UnsubscribeSettings()
    # MAILQUEUE_SECRET (never from the file): signs VERP tags and unsubscribe links
    secret: Optional[bytes] = None

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
    "return_path": (str, type(None)),
}
_UNSUBSCRIBE_TYPES: dict[str, tuple[type, ...]] = {"url": (str, type(None))}
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
    "relay_retry_after": (int, float),
}
# A relay's own keys, beside those of smtp.
_RELAY_TYPES: dict[str, tuple[type, ...]] = dict(
    _SMTP_TYPES,
    password_env=(str,),
    concurrency=(int, type(None)),
    rate_limit=(int, float, type(None)),
    daily_quota=(int, type(None)),
)
# What a relay does not inherit from smtp: credentials go only where they are written.
_NOT_INHERITED = ("user", "password")
_ROUTE_TYPES: dict[str, tuple[type, ...]] = {"relays": (list,), "strategy": (str,)}
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
    config = from_dict(raw, path, environ)
    # Without a database name libpq would pick one by the user's name, and every
    # later error would be about that one ("database ?"): ask for it here.
    if not config.database.get("database"):
        missing = "database.database is missing" if raw.get("database") else "no database section"
        raise ConfigError(
            '%s: %s: name the database to use, e.g. "database": {"database": "mailqueue", '
            '"user": "mailqueue", "host": "127.0.0.1", "port": 5432} (see config.example.json)'
            % (path, missing)
        )
    return config


def from_dict(
    raw: object, path: str = "<config>", environ: Mapping[str, str] | None = None
) -> Config:
    environ = {} if environ is None else environ
    if not isinstance(raw, dict):
        raise ConfigError("%s: the top level must be a JSON object" % path)
    _no_unknown_keys(
        raw,
        ("database", "listen_database", "smtp", "queue", "relays", "routes", "unsubscribe"),
        path,
        "",
    )

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
    smtp = _checked(SmtpSettings(**smtp_raw), path, "smtp")
    relays = _relays(raw, smtp, path, environ)
    routes = _routes(raw, relays, path)

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
    if queue.relay_retry_after <= 0:
        raise ConfigError("%s: queue.relay_retry_after must be a positive number of seconds" % path)
    unsubscribe = UnsubscribeSettings(**_section(raw, "unsubscribe", _UNSUBSCRIBE_TYPES, path))
    secret = tokens.secret_from(environ)
    _check_after_send(smtp, unsubscribe, secret, path)
    smtp = dataclasses.replace(smtp, unsubscribe_url=unsubscribe.url, secret=secret)
    # every relay signs its VERP tags and unsubscribe links the same way
    relays = {
        name: dataclasses.replace(relay, unsubscribe_url=unsubscribe.url, secret=secret)
        for name, relay in relays.items()
    }
    return Config(
        path=path,
        database=database,
        listen_database=listen_database,
        smtp=smtp,
        queue=queue,
        relays=relays,
        routes=routes,
        unsubscribe=unsubscribe,
        secret=secret,
    )


_SettingsT = TypeVar("_SettingsT", SmtpSettings, RelaySettings)


def _checked(smtp: _SettingsT, path: str, where: str) -> _SettingsT:
    """The settings of `smtp` or of a relay (`where` names it), checked, with the
    DKIM key read; or ConfigError."""
    if smtp.security not in SECURITY_MODES:
        raise ConfigError(
            "%s: %s.security must be one of %s, not %r"
            % (path, where, ", ".join(SECURITY_MODES), smtp.security)
        )
    _port(smtp.port, path, where + ".port")
    for key in ("timeout", "data_timeout"):
        if getattr(smtp, key) <= 0:
            raise ConfigError("%s: %s.%s must be a positive number of seconds" % (path, where, key))
    if smtp.max_messages_per_connection < 1:
        raise ConfigError("%s: %s.max_messages_per_connection must be at least 1" % (path, where))
    if smtp.ca_file is not None and not os.path.isfile(smtp.ca_file):
        raise ConfigError("%s: %s.ca_file %r is not a file" % (path, where, smtp.ca_file))
    if smtp.max_message_bytes is not None and smtp.max_message_bytes < 1:
        raise ConfigError(
            "%s: %s.max_message_bytes must be at least 1 (or null: the server's SIZE only)"
            % (path, where)
        )
    if isinstance(smtp.dkim, dict):  # a key already read (inherited from smtp) stays
        try:
            smtp = dataclasses.replace(smtp, dkim=signing.load_key(smtp.dkim))
        except signing.BadKey as exc:
            raise ConfigError("%s: %s" % (path, exc)) from None
    try:
        addresses.parse_sender(smtp.sender, smtp.allow_local_domains)
        addresses.check_header_text(smtp.subject, where + ".subject")
    except addresses.BadAddress as exc:
        raise ConfigError("%s: %s.sender: %s" % (path, where, exc)) from None
    except addresses.BadHeader as exc:
        raise ConfigError("%s: %s" % (path, exc)) from None
    return smtp


def _relays(
    raw: dict[str, Any],
    smtp: SmtpSettings,
    path: str,
    environ: Mapping[str, str],
) -> dict[str, RelaySettings]:
    """The relays, in the order written; without `relays`, smtp as the relay "default"."""
    inherited = {f.name: getattr(smtp, f.name) for f in dataclasses.fields(SmtpSettings)}
    if "relays" not in raw:
        return {DEFAULT: RelaySettings(name=DEFAULT, **inherited)}
    section = raw["relays"]
    if not isinstance(section, dict) or not section:
        raise ConfigError("%s: relays must be a JSON object naming at least one relay" % path)
    for key in _NOT_INHERITED:
        inherited.pop(key)
    relays = {}
    for name, given in section.items():
        where = "relays." + name
        if not _NAME.match(name):
            raise ConfigError(
                "%s: relay name %r: use 1 to 64 letters, digits, '_', '.' or '-'" % (path, name)
            )
        if not isinstance(given, dict):
            raise ConfigError("%s: %s must be a JSON object" % (path, where))
        own = _section(section, name, _RELAY_TYPES, path, prefix="relays.")
        variable = own.pop("password_env", None)
        if variable is not None:
            if "password" in own:
                raise ConfigError(
                    "%s: %s has both password and password_env: keep one" % (path, where)
                )
            if not environ.get(variable):
                raise ConfigError(
                    "%s: %s.password_env names %s, which is not set" % (path, where, variable)
                )
            own["password"] = environ[variable]
        relay = _checked(RelaySettings(name=name, **dict(inherited, **own)), path, where)
        if relay.concurrency is not None and relay.concurrency < 1:
            raise ConfigError("%s: %s.concurrency must be at least 1 (or null)" % (path, where))
        if relay.rate_limit is not None and relay.rate_limit <= 0:
            raise ConfigError(
                "%s: %s.rate_limit must be a positive number of mails per second (or null)"
                % (path, where)
            )
        if relay.daily_quota is not None and relay.daily_quota < 1:
            raise ConfigError(
                "%s: %s.daily_quota must be at least 1 mail (or null: no quota)" % (path, where)
            )
        relays[name] = relay
    return relays


def _routes(raw: dict[str, Any], relays: dict[str, RelaySettings], path: str) -> dict[str, Route]:
    """The routes; "default" is every relay in order, failover, unless written."""
    section = raw.get("routes", {})
    if not isinstance(section, dict):
        raise ConfigError("%s: routes must be a JSON object" % path)
    routes = {}
    for name, given in section.items():
        where = "routes." + name
        if not _NAME.match(name):
            raise ConfigError(
                "%s: route name %r: use 1 to 64 letters, digits, '_', '.' or '-'" % (path, name)
            )
        if not isinstance(given, dict):
            raise ConfigError("%s: %s must be a JSON object" % (path, where))
        own = _section(section, name, _ROUTE_TYPES, path, prefix="routes.")
        names = own.get("relays")
        if not names:
            raise ConfigError("%s: %s.relays must name at least one relay" % (path, where))
        for relay in names:
            if relay not in relays:
                raise ConfigError(
                    "%s: %s names the relay %r, which relays does not define (known: %s)"
                    % (path, where, relay, ", ".join(relays))
                )
        if len(set(names)) < len(names):
            raise ConfigError("%s: %s.relays names a relay twice" % (path, where))
        strategy = own.get("strategy", "failover")
        if strategy not in STRATEGIES:
            raise ConfigError(
                "%s: %s.strategy must be one of %s, not %r"
                % (path, where, ", ".join(STRATEGIES), strategy)
            )
        routes[name] = Route(name=name, relays=tuple(names), strategy=strategy)
    if DEFAULT not in routes:
        routes[DEFAULT] = Route(name=DEFAULT, relays=tuple(relays), strategy="failover")
    return routes


# A VERP address adds "+<job id>-<tag>" (at most 1 + 10 + 1 + 16 characters) to
# the local part of smtp.return_path, which must stay within 64 octets.
_VERP_ROOM = 64 - 28


def _check_after_send(
    smtp: SmtpSettings, unsubscribe: UnsubscribeSettings, secret: bytes | None, path: str
) -> None:
    """smtp.return_path and unsubscribe.url, and the secret they need."""
    if smtp.return_path is not None:
        try:
            found = addresses.parse_recipient(
                smtp.return_path, "smtp.return_path", smtp.allow_local_domains
            )
        except addresses.BadAddress as exc:
            raise ConfigError("%s: %s" % (path, exc)) from None
        local = found.address.rpartition("@")[0]
        if found.smtputf8 or "+" in local or len(local) > _VERP_ROOM:
            raise ConfigError(
                "%s: smtp.return_path must be a plain ASCII address without '+' and with "
                "a local part of at most %d characters (each mail adds +<job>-<tag>)"
                % (path, _VERP_ROOM)
            )
    if unsubscribe.url is not None:
        parsed = urllib.parse.urlsplit(unsubscribe.url)
        if (
            parsed.scheme not in ("https", "http")
            or not parsed.netloc
            or parsed.query
            or parsed.fragment
            or not unsubscribe.url.isascii()
            or any(c in unsubscribe.url for c in ' <>"\\')
            or addresses._FORBIDDEN_IN_HEADER.search(unsubscribe.url)
        ):
            raise ConfigError(
                "%s: unsubscribe.url must be an https:// URL without query or fragment, "
                "e.g. https://example.org/unsubscribe" % path
            )
    if (smtp.return_path is not None or unsubscribe.url is not None) and (
        secret is None or len(secret) < tokens.MIN_SECRET_CHARS
    ):
        raise ConfigError(
            "%s: smtp.return_path and unsubscribe.url sign what they send: set %s in the "
            "environment to a random string of at least %d characters "
            "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            % (path, tokens.SECRET_ENV, tokens.MIN_SECRET_CHARS)
        )


def _section(
    raw: dict[str, Any],
    name: str,
    types: dict[str, tuple[type, ...]],
    path: str,
    prefix: str = "",
) -> dict[str, Any]:
    section = raw.get(name, {})
    name = prefix + name
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
                    "list": "a JSON list",
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
