"""The consumer's pieces on their own, with fake clocks and a fake SMTP
connection (no server, no database): the claims and their lease, the throttling
governor, the connection gate, and the sending thread, which gives every job it
takes exactly one outcome whatever fails on the way."""

import datetime
import itertools
import threading

import pytest

from mailqueue import doorbell, message, outcomes, smtp
from mailqueue.claims import Claims, lease_margin
from mailqueue.config import QueueSettings, SmtpSettings
from mailqueue.connections import RAISE_EVERY, ConnectionGate
from mailqueue.jobs import Job, ReadyJobs
from mailqueue.pacing import Governor
from mailqueue.progress import Progress
from mailqueue.recorder import Ticket
from mailqueue.sending import SendingThread


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def a_job(number, **columns):
    row = dict(
        job_id=number,
        status="queued",
        email="to%d@example.com" % number,
        content_message="mail with marker:m-%d" % number,
        subject=None,
        created_at=datetime.datetime(2026, 12, 4, tzinfo=datetime.timezone.utc),
        attempts=0,
        deferrals=0,
    )
    row.update(columns)
    return Job(queue_id=100 + number, job_id=number, columns=row)


# ------------------------------------------------------------------ claims


def test_a_claim_holds_until_the_lease_less_its_margin_after_the_last_heartbeat_sent():
    clock = Clock()
    claims = Claims(10.0, clock=clock)
    assert not claims.lease_holds(), "not before the consumer is registered"
    claims.registered(7, sent_at=clock.now)
    clock.now += 10.0 - lease_margin(10.0) - 0.01
    assert claims.lease_holds()
    clock.now += 0.02
    assert not claims.lease_holds()
    claims.beat(sent_at=clock.now, alive=True, lost=[])
    assert claims.lease_holds()


def test_claims_count_their_bytes_and_a_lost_heartbeat_loses_them_all():
    claims = Claims(10.0, clock=Clock())
    claims.registered(7, sent_at=1000.0)
    big, small = a_job(1), a_job(2)
    big.attachment_bytes = 5_000_000
    claims.add([big, small])
    claims.add([big])  # twice: counted once
    assert claims.bytes_held == 5_000_000
    claims.beat(sent_at=1001.0, alive=True, lost=[small.queue_id, 999])
    assert claims.is_lost(small.queue_id) and not claims.is_lost(big.queue_id)
    claims.forget([big.queue_id])
    assert claims.bytes_held == 0
    claims.beat(sent_at=1002.0, alive=False, lost=[])
    assert claims.is_lost(small.queue_id) and claims.consumer_id is None


# ------------------------------------------------------------------ pacing


def test_the_governor_halves_on_throttling_and_recovers_without_it():
    clock = Clock()
    governor = Governor(clock=clock)
    for _ in range(100):
        clock.now += 0.01
        governor.sent()
    governor.throttled("454 4.7.0 Throttling failure")
    assert governor.rate == pytest.approx(50, rel=0.05), "half of the ~100/s measured"
    governor.throttled("again, within the cooldown: one event")
    assert governor.rate == pytest.approx(50, rel=0.05)
    for _ in range(60):
        clock.now += 1.0
        governor.step()
    assert governor.rate is None, "back to full speed after a quiet spell"


def test_the_governor_counts_sends_from_many_threads_without_losing_any():
    governor = Governor()
    threads = [
        threading.Thread(target=lambda: [governor.sent() for _ in range(2000)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(governor.sent_at) == 8000


# ---------------------------------------------------------- the connection gate


def test_the_gate_uses_the_connections_a_capped_relay_takes_and_tries_one_more_later():
    clock, stop = Clock(), doorbell.Stop()
    gate = ConnectionGate("relay", 8, clock=clock)
    for _ in range(3):
        assert gate.reserve(stop) and gate.may_connect(0)
        gate.opened()
    assert gate.reserve(stop) and gate.may_connect(0)
    gate.refused(smtp.SmtpUnavailable("421 too many", verdict="fewer_connections"))
    assert gate.limit == 3 and gate.held == 3 and not gate.down, "the three that work go on"
    clock.now += RAISE_EVERY
    assert gate.reserve(stop) and gate.limit == 4, "one more is tried after a quiet spell"


def test_a_relay_that_cannot_be_reached_is_tried_by_one_thread_at_a_time():
    clock, stop = Clock(), doorbell.Stop()
    gate = ConnectionGate("relay", 8, clock=clock)
    assert gate.reserve(stop) and gate.reserve(stop)
    assert gate.may_connect(0)
    assert not gate.may_connect(0), "slow start: one connects while none is open"
    gate.refused(smtp.SmtpUnavailable("connection refused"))
    assert gate.down
    assert not gate.may_connect(0), "not before the wait is over"
    clock.now = gate.retry_at
    assert gate.may_connect(0)
    gate.opened()
    assert not gate.down


# ------------------------------------------------------- the sending thread


class FakeSender:
    """smtp.Sender's interface, failing with `error` at `step` every time."""

    def __init__(self, step, error):
        self.step, self.error = step, error
        self.connected = False
        self.fresh = False
        self.mails_on_connection = 0
        self.envelopes = []

    def _maybe_fail(self, step):
        if step == self.step:
            if step in ("envelope_replies", "finish") and not isinstance(
                self.error, (smtp.SmtpUnavailable, smtp.SendError)
            ):
                self.connected = False
            raise self.error

    def connect(self):
        self._maybe_fail("connect")
        self.connected, self.fresh = True, True

    def check(self, mail):
        self._maybe_fail("check")

    def begin(self, mail):
        self._maybe_fail("begin")
        self.envelopes.append(mail)

    def envelope_replies(self, mail):
        self._maybe_fail("envelope_replies")
        return smtp.Envelope((250, "OK"), tuple((250, "OK") for _ in mail.recipients), (354, "go"))

    def finish(self, mail, then=None):
        self._maybe_fail("finish")
        self.mails_on_connection += 1
        self.fresh = False
        if then is not None:
            self.envelopes.append(then)
        return 250, "2.0.0 queued"

    def abort(self):
        self.connected = False

    close = abort


class FakeRecorder:
    def __init__(self):
        self.outcomes = []
        self.lock = threading.Lock()

    def submit(self, outcome):
        with self.lock:
            self.outcomes.append(outcome)
        ticket = Ticket()
        ticket.done = True
        ticket.durable.set()
        return ticket


FAILURES = [
    ("connect", smtp.SmtpUnavailable("cannot reach SMTP server")),
    ("connect", RuntimeError("a bug")),
    ("check", smtp.SendError("too large")),
    ("check", RuntimeError("a bug")),
    ("begin", smtp.EnvelopeLost("gone before the content")),
    ("begin", RuntimeError("a bug")),
    ("envelope_replies", smtp.EnvelopeLost("gone before the content")),
    ("envelope_replies", RuntimeError("a bug")),
    ("finish", smtp.ContentUnknown("no reply", summary="no reply")),
    ("finish", OSError("a socket error")),
    ("finish", RuntimeError("a bug")),
    (None, None),
]


@pytest.mark.parametrize(
    "step, error", FAILURES, ids=["%s-%s" % (s, type(e).__name__) for s, e in FAILURES]
)
def test_every_job_taken_gets_exactly_one_outcome_whatever_fails(step, error):
    settings = QueueSettings(max_attempts=3, retry_delay=0, max_retry_delay=0)
    smtp_settings = SmtpSettings(timeout=1.0)
    ready, recorder, stop = ReadyJobs(), FakeRecorder(), doorbell.Stop()
    claims = Claims(60.0)
    claims.registered(1, sent_at=claims.clock())
    jobs = [a_job(n) for n in range(1, 9)]
    claims.add(jobs)
    ready.put(jobs)
    gate = ConnectionGate("fake", 2)
    threads = []
    for _ in range(2):
        sending = SendingThread(
            smtp_settings,
            settings,
            message.Composer(smtp_settings),
            ready,
            claims,
            recorder,
            Governor(),
            gate,
            Progress(),
            stop,
        )
        sending.sender = FakeSender(step, error)
        threads.append(threading.Thread(target=sending.run, daemon=True))
    for t in threads:
        t.start()
    ids = lambda: {o.job_id for o in recorder.outcomes}  # noqa: E731
    deadline = threading.Event()
    for _ in itertools.repeat(None, 40):  # up to 2 s: a relay that is never reached stays so
        if ids() == {job.job_id for job in jobs}:
            break
        deadline.wait(0.05)
    for job in ready.close():
        recorder.submit(outcomes.handed_back(job))
    gate.close()
    stop.requested = True
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()
    per_job = {
        job.job_id: [o.kind for o in recorder.outcomes if o.job_id == job.job_id] for job in jobs
    }
    assert all(len(kinds) == 1 for kinds in per_job.values()), per_job
    if step is None:
        assert {k[0] for k in per_job.values()} == {"sent"}
