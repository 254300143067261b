"""Which relay each claimed job goes to, and what the relays' troubles change.

A consumer process has one Lane per relay of the configuration: its sending
threads, its connection gate (mailqueue/connections.py), its throttling governor
and its `ready` jobs. The claimer hands each claimed job to the Router, which
picks a relay from the job's route (mailqueue/relays.py: RouteChooser, the health
shared through the `relays` table, the daily quota) and puts the job in that
relay's lane. At each wake-up the Router looks at the lanes: a relay whose
connection failed is marked down for every consumer (queue.relay_retry_after) and
the jobs waiting for it go to the next relay of their route at once, before any
of their content went (failover spends no attempt); a relay that works again is
marked up. A relay down for everyone is tried again by one consumer (a probe).
When no relay of a route can be used, its jobs wait in its first relay's lane,
and the log says so once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mailqueue import outcomes, relays, smtp

if TYPE_CHECKING:
    import psycopg2.extensions

    from mailqueue.config import Config, RelaySettings, Route
    from mailqueue.connections import ConnectionGate
    from mailqueue.jobs import Job, ReadyJobs
    from mailqueue.pacing import Governor
    from mailqueue.recorder import Recorder

log = logging.getLogger("consumer")

HELD_BACK_RECHECK = 1.0  # seconds: jobs held back (rate, quota) are looked at again this often


@dataclass
class Lane:
    """One relay, as one consumer process sends to it."""

    settings: RelaySettings
    gate: ConnectionGate
    governor: Governor
    ready: ReadyJobs
    threads: int
    failures_seen: int = 0  # gate.failures when the Router last looked
    successes_seen: int = 0  # gate.successes when the Router last looked

    @property
    def name(self) -> str:
        return self.settings.name


class Router:
    def __init__(
        self,
        config: Config,
        lanes: dict[str, Lane],
        connection: Callable[[], psycopg2.extensions.connection],
        recorder: Recorder,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.lanes = lanes
        self.connection = connection  # the claimer's, read when needed
        self.recorder = recorder
        self.clock = clock
        self.health = relays.HealthCache(lambda: relays.read_states(self.connection()))
        self.available = relays.Availability(self.health)
        self.chooser = relays.RouteChooser()
        self.probing: set[str] = set()  # relays this process won the right to try
        self.held_back: list[tuple[float, Job]] = []  # (not before, job): rate or quota
        self.routes_without_relay: set[str] = set()
        self.registered = False
        self.several = len(lanes) > 1

    # ------------------------------------------------------------- placing

    def waiting(self) -> int:
        return sum(len(lane.ready) for lane in self.lanes.values()) + len(self.held_back)

    def usable(self, relay: str) -> bool:
        """Up, and not found at its daily quota lately (RelayView, for RouteChooser)."""
        return not self.down(relay) and self.available.usable(relay)

    def down(self, relay: str) -> bool:
        """Failed, here or for another consumer, and not being tried by this one."""
        if relay in self.probing:
            return False
        lane = self.lanes.get(relay)
        if lane is not None and lane.gate.down and self.clock() < lane.gate.retry_at:
            return True
        return not self.health.is_up(relay)

    def place(self, jobs: list[Job]) -> float:
        """Put each job in the lane of its relay (or give it its outcome: an
        unknown route). Returns seconds until a job held back (rate, quota) may go."""
        by_lane: dict[str, list[Job]] = {}
        for job in jobs:
            try:
                route = relays.route_of(self.config.routes, job.columns.get("route"))
            except relays.UnknownRoute as exc:
                log.warning("job %s: dead (%s)", job.job_id, exc)
                self.recorder.submit(outcomes.dead(job, str(exc)))
                continue
            relay = self.choose(route)
            job.relay = relay
            by_lane.setdefault(relay, []).append(job)
        wait = 0.0
        for relay, group in by_lane.items():
            wait = max(wait, self._admit(self.lanes[relay], group))
        return wait

    def choose(self, route: Route) -> str:
        if not self.several:
            return route.relays[0]
        relay = self.chooser.choose(route, self)
        if relay is None:
            if route.name not in self.routes_without_relay:
                self.routes_without_relay.add(route.name)
                log.warning(
                    "route %s has no relay up (%s): its mails wait, spending no attempt",
                    route.name,
                    ", ".join(route.relays),
                )
            return route.relays[0]
        if route.name in self.routes_without_relay:
            self.routes_without_relay.discard(route.name)
            log.warning("route %s has a relay up again: %s", route.name, relay)
        return relay

    def _admit(self, lane: Lane, jobs: list[Job]) -> float:
        """Jobs into the lane, as far as its daily quota and rate allow; the rest
        go to another relay (quota) or wait (rate)."""
        settings, wait = lane.settings, 0.0
        if settings.daily_quota is not None:
            granted = relays.take_quota(
                self.connection(), lane.name, len(jobs), settings.daily_quota
            )
            if granted < len(jobs):
                self.available.out_of_quota(lane.name)
                jobs, over = jobs[:granted], jobs[granted:]
                others = [job for job in over if self._elsewhere(job, lane)]
                if others:
                    wait = self.place(others) or 0.0
                stay = [job for job in over if job.relay == lane.name]
                self._hold(stay, HELD_BACK_RECHECK * 5)
                wait = max(wait, HELD_BACK_RECHECK * 5) if stay else wait
        if settings.rate_limit is not None and jobs:
            tokens = relays.take_tokens(
                self.connection(), lane.name, len(jobs), settings.rate_limit
            )
            if tokens.granted < len(jobs):
                jobs, late = jobs[: tokens.granted], jobs[tokens.granted :]
                self._hold(late, max(tokens.wait, 0.01))
                wait = max(wait, tokens.wait)
        lane.ready.put(jobs)
        return wait

    def _elsewhere(self, job: Job, lane: Lane) -> bool:
        """Whether another relay of the job's route may take it now."""
        route = relays.route_of(self.config.routes, job.columns.get("route"))
        return any(r != lane.name and self.usable(r) for r in route.relays)

    def _hold(self, jobs: list[Job], seconds: float) -> None:
        at = self.clock() + seconds
        self.held_back.extend((at, job) for job in jobs)

    def release_held_back(self) -> float:
        """Place again the jobs held back whose time has come; seconds until the next."""
        if not self.held_back:
            return 0.0
        now = self.clock()
        due = [job for at, job in self.held_back if at <= now]
        self.held_back = [(at, job) for at, job in self.held_back if at > now]
        wait = self.place(due) if due else 0.0
        if self.held_back:
            wait = max(wait, min(at for at, _ in self.held_back) - now)
        return wait

    def give_back_held(self) -> list[Job]:
        held, self.held_back = [job for _, job in self.held_back], []
        return held

    # ------------------------------------------------------------ watching

    def watch(self) -> None:
        """At each wake-up: tell the other consumers what this one learnt of its
        relays, move jobs off a relay that failed, and try one that is due."""
        conn = self.connection()
        if not self.registered:
            relays.register(conn, list(self.lanes))
            self.registered = True
        for lane in self.lanes.values():
            gate, name = lane.gate, lane.name
            if gate.failures > lane.failures_seen:
                lane.failures_seen = gate.failures
                self.probing.discard(name)
                reason = gate.last_error or "failed"
                if relays.mark_down(conn, name, self.config.queue.relay_retry_after, reason):
                    log.warning("relay %s is down for every consumer: %s", name, reason)
                self.health.note_down(name, reason)
            elif gate.successes > lane.successes_seen and not gate.down:
                lane.successes_seen = gate.successes
                self.probing.discard(name)
                if not self.health.is_up(name):
                    if relays.mark_up(conn, name):
                        log.warning("relay %s is up again for every consumer", name)
                    self.health.note_up(name)
        if self.several:
            for name, lane in self.lanes.items():
                if len(lane.ready) and self.down(name):  # (its quota was taken already)
                    self._move_off(lane)
                state = self.health.state(name)
                if state.probe_due and name not in self.probing and lane.gate.open == 0:
                    hold = 2 * lane.settings.timeout + 5
                    if relays.claim_probe(conn, name, hold):
                        self.probing.add(name)
                        self._probe(lane)

    def _probe(self, lane: Lane) -> None:
        """Try the relay once (connect, EHLO, STARTTLS, AUTH, QUIT), in a thread of
        its own: the gate learns the answer, and the next watch tells everyone."""

        def probe() -> None:
            sender = smtp.Sender(lane.settings)
            try:
                sender.connect()
            except smtp.SmtpUnavailable as exc:
                lane.gate.failed(exc)
                return
            except Exception as exc:  # a probe must never take the process down
                lane.gate.failed(smtp.SmtpUnavailable("probe failed: %r" % exc))
                return
            finally:
                sender.close()
            lane.gate.recovered()

        threading.Thread(target=probe, name="probe-%s" % lane.name, daemon=True).start()

    def _move_off(self, lane: Lane) -> None:
        """The jobs waiting for a relay that failed: to the next relay of their
        route if one is usable, else back where they were."""
        waiting = lane.ready.take_all()
        stay = []
        for job in waiting:
            if self._elsewhere(job, lane):
                self.place([job])
            else:
                stay.append(job)
        lane.ready.put(stay)
