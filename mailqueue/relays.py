"""Several relays: their health, rate and daily quota shared by every consumer of
the database (sql/queries.sql, the section "Several relays"), and the choice of a
relay for each job from its route (docs/relays.md).

- Health: a relay that failed is marked down for every consumer (mark_down);
  once its time is up, one caller across all consumers wins the right to try it
  (claim_probe), and its try marks it up (mark_up) or down again. HealthCache
  keeps every relay's state in the process, read again at most once a second.
- Rate: take_tokens takes up to n mails of a relay's rate_limit from its token
  bucket (a row of send_rate), across all consumers.
- Daily quota: take_quota takes up to n mails of a relay's rolling 24 hours;
  give_back_quota returns those that were not sent after all.
- RouteChooser: pure logic. Given a route and what is usable, the relay for the
  next job: failover takes the first usable relay in order, round_robin rotates
  over the usable ones.

Every function takes an autocommit connection (mailqueue.db.connect) and runs
one statement (or, the first time in an hour or for a new bucket, two).
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from mailqueue import db
from mailqueue.pacing import burst_for

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from psycopg2.extensions import connection

    from mailqueue.config import Route

MAX_REASON = 500  # characters of a reason kept in relays.last_error
HEALTH_MAX_AGE = 1.0  # seconds a HealthCache's view serves before it is read again
QUOTA_RECHECK = 60.0  # seconds a relay found at its quota is skipped before asking again


# ------------------------------------------------------------------ health


@dataclass(frozen=True)
class RelayState:
    """One relay's health as the database says it (judged by its clock)."""

    name: str
    down: bool  # marked down and not yet known to be back
    probe_due: bool  # down, its down_until passed, no one trying it: claim_probe may win
    down_until: Optional[datetime.datetime] = None
    probe_until: Optional[datetime.datetime] = None
    last_error: Optional[str] = None
    changed_at: Optional[datetime.datetime] = None


def register(conn: connection, names: Iterable[str]) -> None:
    """Make a row for each relay the consumer knows (at start-up), so that reports
    list them all; an existing row (and its health) is kept."""
    db.run(conn, "relay_register", names=list(names))


def read_states(conn: connection) -> dict[str, RelayState]:
    """Every relay's state, by name."""
    return {row["name"]: RelayState(**row) for row in db.run_dicts(conn, "relay_states")}


def mark_down(
    conn: connection, relay: str, seconds: float, reason: str, secrets: Iterable[str] = ()
) -> bool:
    """The relay failed: down for every consumer for `seconds` from now, with the
    reason (one line, each of `secrets` replaced by ***, at most MAX_REASON
    characters). True only if this call took it down (it was up): log it then."""
    [(changed,)] = db.run(
        conn, "relay_mark_down", relay=relay, seconds=seconds, reason=one_line(reason, secrets)
    )
    return bool(changed)


def mark_up(conn: connection, relay: str) -> bool:
    """The relay worked: up for every consumer. True only if it was down (log it
    then); a relay already up is not written."""
    return bool(db.run(conn, "relay_mark_up", relay=relay))


def claim_probe(conn: connection, relay: str, hold: float) -> bool:
    """Whether this caller, alone across all consumers, may try the relay now: it
    is down and its down_until has passed. The right lapses after `hold` seconds
    (a prober that died); the try ends it by mark_up or mark_down."""
    return bool(db.run(conn, "relay_claim_probe", relay=relay, hold=hold))


def one_line(reason: str, secrets: Iterable[str] = ()) -> str:
    """`reason` as one line of at most MAX_REASON characters, without `secrets`."""
    text = " ".join(str(reason).split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:MAX_REASON]


class HealthCache:
    """Every relay's state, read through `reader` at most once every `max_age`
    seconds, shared by the threads of a process. While one thread reads, the
    others keep the last view; a process's own changes (note_down, note_up) show at
    once. A read that fails raises to its caller, and the next call tries again."""

    def __init__(
        self,
        reader: Callable[[], Mapping[str, RelayState]],
        max_age: float = HEALTH_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reader = reader
        self.max_age = max_age
        self.clock = clock
        self.lock = threading.Lock()
        self.states: dict[str, RelayState] | None = None
        self.read_at = 0.0
        self.reading = False
        self.noted: dict[str, RelayState] = {}  # noted while a read was under way

    def get(self) -> dict[str, RelayState]:
        with self.lock:
            fresh = self.states is not None and self.clock() - self.read_at < self.max_age
            if fresh or (self.reading and self.states is not None):
                return self.states  # type: ignore[return-value]  # not None here
            self.reading = True
            self.noted = {}
        try:
            states = dict(self.reader())
        finally:
            with self.lock:
                self.reading = False
        with self.lock:
            # a note made during the read may be newer than what the read saw
            states.update(self.noted)
            self.states, self.read_at = states, self.clock()
            return states

    def state(self, relay: str) -> RelayState:
        """The relay's state; one no consumer has marked yet is up."""
        return self.get().get(relay) or RelayState(relay, down=False, probe_due=False)

    def is_up(self, relay: str) -> bool:
        return not self.state(relay).down

    def probe_due(self, relay: str) -> bool:
        return self.state(relay).probe_due

    def note_down(self, relay: str, reason: str) -> None:
        """This process marked the relay down: its threads skip it at once."""
        self._note(RelayState(relay, down=True, probe_due=False, last_error=reason))

    def note_up(self, relay: str) -> None:
        self._note(RelayState(relay, down=False, probe_due=False))

    def _note(self, state: RelayState) -> None:
        with self.lock:
            if self.reading:
                self.noted[state.name] = state
            if self.states is not None:
                self.states = dict(self.states, **{state.name: state})


# ------------------------------------------------------------------ rate and quota


@dataclass(frozen=True)
class Tokens:
    granted: int  # mails that may go to the relay now
    wait: float  # seconds until the next token


def take_tokens(conn: connection, relay: str, wanted: int, rate: float) -> Tokens:
    """Up to `wanted` mails to the relay under its rate_limit (`rate` mails a
    second across all consumers, at most pacing.burst_for(rate) saved up)."""
    burst = burst_for(rate)
    params = dict(relay=relay, wanted=wanted, rate=rate, burst=burst)
    rows = db.run(conn, "relay_take_tokens", **params)
    if not rows:  # the relay's first mail ever: its bucket, full
        db.run(conn, "relay_open_bucket", relay=relay, burst=burst)
        rows = db.run(conn, "relay_take_tokens", **params)
    [(granted, wait)] = rows
    return Tokens(granted, float(wait))


def take_quota(conn: connection, relay: str, wanted: int, quota: int) -> int:
    """Up to `wanted` mails of the relay's daily_quota (`quota` mails in the
    rolling 24 hours, across all consumers): how many are granted (0: it is at its
    quota). Give back those not sent after all (give_back_quota)."""
    rows = db.run(conn, "relay_take_quota", relay=relay, wanted=wanted, quota=quota)
    if not rows:  # the first mail of this hour: its row
        db.run(conn, "relay_open_hour", relay=relay)
        rows = db.run(conn, "relay_take_quota", relay=relay, wanted=wanted, quota=quota)
    [(granted,)] = rows
    return int(granted)


def give_back_quota(conn: connection, relay: str, count: int) -> None:
    """`count` mails taken by take_quota were not sent after all (failed over
    before their content went, released, stopped)."""
    if count > 0:
        db.run(conn, "relay_give_back_quota", relay=relay, count=count)


# ------------------------------------------------------------------ choosing


class RelayView(Protocol):
    """What a RouteChooser asks: may a job go to this relay now?"""

    def usable(self, relay: str) -> bool: ...


class Availability:
    """A RelayView: up in the shared health (HealthCache), and not found at its
    quota in the last QUOTA_RECHECK seconds (out_of_quota)."""

    def __init__(
        self,
        health: HealthCache,
        recheck: float = QUOTA_RECHECK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health = health
        self.recheck = recheck
        self.clock = clock
        self.lock = threading.Lock()
        self.full_until: dict[str, float] = {}

    def out_of_quota(self, relay: str) -> None:
        """take_quota granted nothing: skip the relay for a while."""
        with self.lock:
            self.full_until[relay] = self.clock() + self.recheck

    def usable(self, relay: str) -> bool:
        with self.lock:
            full = self.full_until.get(relay, 0.0) > self.clock()
        return not full and self.health.is_up(relay)


class UnknownRoute(Exception):
    """A job names a route the configuration does not define; the message, one line
    naming it and the known ones, is the job's last_error (it ends dead, spending
    no attempt)."""


def route_of(routes: Mapping[str, Route], name: str | None) -> Route:
    """The route of a job whose `route` column is `name` (NULL: "default")."""
    route = routes.get(name or "default")
    if route is None:
        raise UnknownRoute(
            "the route %r is not in the configuration (known: %s)"
            % (one_line(str(name))[:64], ", ".join(sorted(routes)))
        )
    return route


class RouteChooser:
    """The relay for each job, from its route. No database: the caller says what is
    usable (a RelayView). Thread-safe: round robin's position is per route."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_index: dict[str, int] = {}

    def choose(self, route: Route, view: RelayView) -> str | None:
        """failover: the first usable relay of the route, in order; round_robin:
        the next usable one after the last chosen; None when none is usable."""
        relays = route.relays
        if route.strategy != "round_robin":
            return next((relay for relay in relays if view.usable(relay)), None)
        with self.lock:
            start = self.next_index.get(route.name, 0)
            for step in range(len(relays)):
                index = (start + step) % len(relays)
                if view.usable(relays[index]):
                    self.next_index[route.name] = index + 1
                    return relays[index]
            return None
