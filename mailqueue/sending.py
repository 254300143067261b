"""A sending thread: one SMTP connection, one mail in flight, one outcome per job.

A thread takes a claimed job, builds its mail (mailqueue/message.py) and writes
its envelope; reads the envelope's replies; checks at the gate that its previous
outcome is durable and that the claim still holds; sends the content with the
next mail's envelope after the dot (one round trip per mail, RFC 2920); and hands
the job's outcome (mailqueue/outcomes.py) to the recorder. deliver() is the one
place a job taken becomes an outcome: whatever is raised on the way, the job gets
exactly one (or goes back to `ready` untouched, for another thread). Why that
bounds duplicates: docs/delivery.md.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

from mailqueue import message, outcomes, smtp

if TYPE_CHECKING:
    from mailqueue.claims import Claims
    from mailqueue.config import QueueSettings, SmtpSettings
    from mailqueue.connections import ConnectionGate
    from mailqueue.doorbell import Stop
    from mailqueue.jobs import Job, ReadyJobs
    from mailqueue.outcomes import Outcome
    from mailqueue.pacing import Governor
    from mailqueue.progress import Progress
    from mailqueue.recorder import Recorder, Ticket

log = logging.getLogger("consumer")

GATE_RECHECK = 0.05  # seconds: a thread at the gate looks again this often at the latest
CONNECT_WAIT = 1.0  # seconds a thread with a job waits for its turn to connect, then hands it on


class SendingThread:
    def __init__(
        self,
        smtp_settings: SmtpSettings,
        queue_settings: QueueSettings,
        composer: message.Composer,
        ready: ReadyJobs,
        claims: Claims,
        recorder: Recorder,
        governor: Governor,
        gate: ConnectionGate,
        progress: Progress,
        stop: Stop,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.smtp_settings = smtp_settings
        self.settings = queue_settings
        self.composer = composer
        self.ready = ready
        self.claims = claims
        self.recorder = recorder
        self.governor = governor
        self.gate = gate
        self.progress = progress
        self.stop = stop
        self.clock = clock
        self.sender = smtp.Sender(smtp_settings)
        self.slot: Optional[str] = None  # None, "reserved" or "open": our connection slot
        self.previous: Optional[Ticket] = None  # our last outcome whose content went out
        self.following: Optional[Job] = None  # a job whose envelope is written

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            while True:
                job, self.following = self.following, None
                if job is None:
                    job = self.take(wait=True)
                    if job is None:
                        return  # stopping
                self.deliver(job)
        finally:
            if self.following is not None:
                self.give_back(self.following)
                self.following = None
            self.sender.close()  # QUIT, as a polite client does
            self._slot_check()
            if self.slot == "reserved":
                self.gate.released(was_open=False)
                self.slot = None

    def deliver(self, job: Job) -> None:
        """Exactly one outcome for `job` (or back to `ready`), whatever happens."""
        outcome: Optional[Outcome] = None
        try:
            outcome = self._deliver(job)
        except Exception as exc:  # a poison job must not take the thread down
            log.exception("job %s: unexpected error", job.job_id)
            self.sender.abort()
            outcome = outcomes.failed(
                job, "unexpected error: %s: %s" % (type(exc).__name__, exc), self.settings
            )
            if self.following is not None:  # taken on the way: not its fault
                self.give_back(self.following)
                self.following = None
        finally:
            self._slot_check()
        if outcome is not None:
            self.submit(outcome)

    def _deliver(self, job: Job) -> Optional[Outcome]:
        mail: message.Mail = job.mail  # type: ignore[assignment]  # take() built it
        for second_try in (False, True):
            try:
                envelope = self.sender.envelope_replies(mail)
                break
            except smtp.EnvelopeLost as exc:
                # Nothing was sent. A reused connection the server had closed: once
                # more on a new one. A new one that died: the relay's trouble.
                if second_try or self.sender.fresh:
                    return outcomes.put_back(
                        job, str(exc), self.settings, self.clock(), at_once=True
                    )
                self._slot_check()
                if not self._begin(job):
                    return None
        if not envelope.ready:
            return self._decided(
                job,
                mail,
                outcomes.after_transaction(
                    job, mail.recipients, envelope, None, self.settings, self.clock()
                ),
            )
        if not self.at_the_gate(job):
            self.sender.abort()  # the server discards a mail whose content never ended
            if self.claims.is_lost(job.queue_id):
                return outcomes.dropped(job)
            self.give_back(job)
            return None
        if self.sender.mails_on_connection + 1 < self.smtp_settings.max_messages_per_connection:
            self.following = self.take(wait=False, begin=False)
        then = self.following.mail if self.following is not None else None
        try:
            end: Optional[smtp.Reply] = self.sender.finish(mail, then=then)
            unknown = None
        except smtp.ContentUnknown as exc:
            end, unknown = None, str(exc)
        outcome = outcomes.after_transaction(
            job, mail.recipients, envelope, end, self.settings, self.clock(), unknown
        )
        if self.sender.mails_on_connection >= self.smtp_settings.max_messages_per_connection:
            self.sender.close()  # many relays cap mails per connection
        self.previous = self.submit(self._decided(job, mail, outcome))
        return None

    def _decided(self, job: Job, mail: message.Mail, outcome: Outcome) -> Outcome:
        if outcome.throttled:
            self.governor.throttled("%s" % (outcome.error or "throttled")[:80])
        return outcome

    # ---------------------------------------------------- taking a job

    def take(self, wait: bool, begin: bool = True) -> Optional[Job]:
        """The next job that can be sent, with its mail built and checked, and
        (if `begin`) its envelope written; None when there is none (stopping, or
        with wait=False, none ready)."""
        while True:
            if begin and not self._have_slot():
                return None
            job = self.ready.take(wait)
            if job is None:
                return None
            if self.claims.is_lost(job.queue_id):
                self.submit(outcomes.dropped(job))
                continue
            if not self._paced(job, wait):
                return None
            job.started = self.clock()
            if not self._prepare(job):
                continue
            if not begin or self._begin(job):
                return job

    def _paced(self, job: Job, wait: bool) -> bool:
        """Whether `job` may go now by the throttling governor (waiting for its
        turn if `wait`); if not, it goes back to the front of `ready`."""
        if wait:
            self.governor.wait_to_send(self.stop)
            if not self.stop.requested:
                return True
        elif self.governor.may_send():
            return True
        self.give_back(job)
        return False

    def _prepare(self, job: Job) -> bool:
        """Build and check `job`'s mail; False when it is not to be sent (its
        outcome is submitted, or it went back to `ready`)."""
        if job.columns.get("status") != "queued":
            # The queue row of a job finished or changed by hand: nothing to send.
            log.info("job %s: dropped its queue row (job is %s)", job.job_id, job.columns["status"])
            self.submit(outcomes.dropped(job))
            return False
        if job.expires_at is not None and self.clock() >= job.expires_at:
            self.submit(
                outcomes.dead(job, "expired (expires_at) before it could be sent: not sent")
            )
            return False
        try:
            if job.mail is None:
                mail = self.composer.build(job.columns, job.attachments or ())
                pending = job.pending_recipients
                if pending is not None:  # the rest had their answer: the same mail, to these
                    mail = message.with_recipients(mail, pending)
                job.mail, job.attachments = mail, None  # the files live on in the mail only
            if not self._connect(job):
                return False
            self.sender.check(job.mail)
        except message.BadMail as exc:
            self.submit(outcomes.dead(job, str(exc)))
            return False
        except smtp.SendError as exc:  # the server cannot take it (SIZE, SMTPUTF8)
            self.submit(outcomes.dead(job, str(exc)))
            return False
        return True

    def _begin(self, job: Job) -> bool:
        """Write `job`'s envelope (connecting if need be); False if no connection
        could be had (the job went back to `ready`)."""
        while True:
            if not self._connect(job):
                return False
            try:
                self.sender.begin(job.mail)  # type: ignore[arg-type]  # built
                return True
            except smtp.EnvelopeLost:
                self._slot_check()  # an idle connection the server had closed
                if self.sender.fresh:
                    self.give_back(job)
                    return False

    # ------------------------------------------------ the connection slot

    def _have_slot(self) -> bool:
        """A connection, or a slot reserved for one (waiting, with no job in hand)."""
        if self.slot is None:
            if not self.gate.reserve(self.stop):
                return False
            self.slot = "reserved"
        return True

    def _connect(self, job: Job) -> bool:
        """Connected (through the gate); if not, `job` goes back to `ready`."""
        if self.sender.connected:
            return True
        if self.slot != "reserved" or not self.gate.may_connect(CONNECT_WAIT):
            if self.slot == "reserved":  # over the relay's limit: let the others send
                self.slot = None
                self.gate.released(was_open=False)
            self.give_back(job)
            return False
        try:
            self.sender.connect()
        except smtp.SmtpUnavailable as exc:
            self.slot = None
            self.gate.refused(exc)
            self.give_back(job)
            return False
        self.slot = "open"
        self.gate.opened()
        return True

    def _slot_check(self) -> None:
        """Our connection closed (by us or the server): its slot goes back."""
        if self.slot == "open" and not self.sender.connected:
            self.slot = None
            self.gate.released(was_open=True)

    # ------------------------------------------------------------ the gate

    def at_the_gate(self, job: Job) -> bool:
        """Whether `job`'s content may go now: this thread's previous outcome is
        durable and the claim still holds. Waits for both (up to smtp.timeout:
        the server is holding the mail open)."""
        deadline = self.clock() + self.smtp_settings.timeout
        previous = self.previous
        while previous is not None and not previous.done and self.clock() <= deadline:
            previous.durable.wait(GATE_RECHECK)
        claims = self.claims
        with claims.changed:
            while True:
                if claims.is_lost(job.queue_id):
                    return False
                if (previous is None or previous.done) and claims.lease_holds():
                    return True
                if self.clock() > deadline:
                    return False
                claims.changed.wait(GATE_RECHECK)

    # ------------------------------------------------------------ outcomes

    def submit(self, outcome: Outcome) -> Ticket:
        self.progress.count(
            {"sent": "sent", "failed": "failed", "dead": "dead", "deferred": "deferred"}.get(
                outcome.kind, "other"
            )
        )
        if outcome.throttled:
            self.progress.count("throttled")
        if outcome.kind == "sent":
            self.governor.sent()
        elif outcome.kind in ("failed", "dead", "deferred", "uncertain"):
            log.warning(
                "job %s: %s (%s)",
                outcome.job_id,
                outcome.kind,
                (outcome.error or "")[:200],
            )
        return self.recorder.submit(outcome)

    def give_back(self, job: Job) -> None:
        """A job not sent, for no fault of its own: the next thread takes it, or,
        when stopping, it goes back to the queue."""
        if not self.ready.put_back(job):
            self.recorder.submit(outcomes.handed_back(job))
