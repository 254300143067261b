"""What becomes of a job after each try: the one outcome a job taken always gets.

An Outcome is what the recorder commits (sql/queries.sql, record_outcomes). The
functions here decide it from what happened, and nothing else: they are pure
(no connection, no clock of their own), so each rule has a unit test.

The rules for the replies of one SMTP transaction (after_transaction) are the
table of docs/delivery.md, read recipient by recipient:
- delivered recipients are done; recipients refused for good (5xx) have their
  answer too. The job is `completed` once no recipient waits any more and one
  got the mail, `dead` if none ever did;
- the others wait, all together, for the reason that weighs most: no final reply
  (`uncertain` with on_uncertain = 'hold', else as a failure), a temporary
  failure (an attempt spent, retried with backoff: the seed's rule), the relay
  asking us to slow down (back to the queue at once, no attempt spent), or a
  recipient refused for now (greylisting, a busy mailbox: that job alone waits
  retry_delay, no attempt spent). The next try goes to those recipients alone,
  with the same Message-ID;
- a job put back without spending an attempt spends one once it was put back
  queue.max_deferrals times in a row, or queue.max_defer_time after the first of
  them: whatever a server says, every job ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from mailqueue import replies
from mailqueue.backoff import retry_delay

if TYPE_CHECKING:
    from mailqueue.config import QueueSettings
    from mailqueue.jobs import Job
    from mailqueue.smtp import Envelope, Reply

# kinds (record_outcomes):
#   sent        completed (every recipient has its answer, and one got the mail)
#   failed      an attempt spent; tried again after `delay`
#   deferred    put back for `delay` seconds without spending an attempt (status failed)
#   released    back to the queue at once (throttled, or not tried: deferred says which)
#   dead        given up
#   uncertain   no final reply, and the job holds rather than risk a duplicate
#   suppressed  never sent: its address is on the suppression list
#   dropped     the job is not ours to send any more: the queue row goes, if we hold it


@dataclass
class Outcome:
    queue_id: int
    job_id: int
    kind: str
    attempted: int = 0  # 1 when an attempt is spent
    deferred: int = 0  # 1 when the job was put back without spending an attempt
    error: Optional[str] = None  # last_error
    delay: float = 0.0  # failed, deferred: seconds until the next try
    smtp_code: Optional[int] = None
    elapsed: float = 0.0  # seconds the try took (deliveries.started_at = now() - elapsed)
    pending: Optional[list[str]] = None  # pending_recipients after this (None: all, or none)
    delivery: Optional[str] = None  # the deliveries row's outcome; None: no row
    relay: Optional[str] = None
    bad_mailboxes: list[str] = field(default_factory=list)  # refused 5.1.x: may be suppressed
    throttled: bool = False  # the relay asked us to slow down

    @property
    def pending_json(self) -> Optional[str]:
        return None if self.pending is None else json.dumps(self.pending)


def _base(job: Job, kind: str, **fields: Any) -> Outcome:
    return Outcome(job.queue_id, job.job_id, kind, elapsed=job.elapsed(), relay=job.relay, **fields)


def dead(job: Job, error: str, attempted: int = 0, code: Optional[int] = None) -> Outcome:
    """Given up: bad input, expired, too large (attempted 0), or for good."""
    return _base(job, "dead", attempted=attempted, error=error, smtp_code=code, delivery="dead")


def dropped(job: Job) -> Outcome:
    return Outcome(job.queue_id, job.job_id, "dropped")


def handed_back(job: Job) -> Outcome:
    """Not tried (stopping, a claim given up): back to the queue, nothing spent."""
    return Outcome(job.queue_id, job.job_id, "released")


def failed(job: Job, error: str, settings: QueueSettings, code: Optional[int] = None) -> Outcome:
    """A try that spent an attempt and may pass: retried after backoff, or dead
    once the attempts are spent."""
    attempts = job.attempts + 1
    if attempts >= settings.max_attempts:
        return _base(
            job,
            "dead",
            attempted=1,
            error="%s (attempt %d of %d: given up)" % (error, attempts, settings.max_attempts),
            smtp_code=code,
            delivery="dead",
            pending=job.pending_recipients,
        )
    return _base(
        job,
        "failed",
        attempted=1,
        error=error,
        delay=retry_delay(attempts, settings),
        smtp_code=code,
        delivery="failed",
        pending=job.pending_recipients,
    )


def put_back(
    job: Job,
    error: str,
    settings: QueueSettings,
    now: float,
    at_once: bool,
    code: Optional[int] = None,
) -> Outcome:
    """Put back without spending an attempt: at once (`at_once`: the relay asked
    us to slow down, or could not take the mail), or after retry_delay (a
    recipient refused for now). Past queue.max_deferrals in a row, or
    queue.max_defer_time since the first, it spends an attempt instead."""
    deferrals = job.deferrals + 1
    waited = 0.0 if job.deferred_since is None else now - job.deferred_since
    if deferrals > settings.max_deferrals or waited >= settings.max_defer_time:
        why = (
            "put back %d times in a row" % job.deferrals
            if deferrals > settings.max_deferrals
            else "put back for %.0f s" % waited
        )
        return failed(job, "%s; %s without spending an attempt" % (error, why), settings, code)
    return _base(
        job,
        "released" if at_once else "deferred",
        deferred=1,
        error=error,
        delay=0.0 if at_once else retry_delay(deferrals, settings),
        smtp_code=code,
        delivery="deferred",
        pending=job.pending_recipients,
    )


def unknown(job: Job, error: str, settings: QueueSettings) -> Outcome:
    """The content went and no final reply came: held (on_uncertain = 'hold') or
    tried again as a failure."""
    if job.holds_when_uncertain:
        return _base(
            job,
            "uncertain",
            attempted=1,
            error=error + "; held (on_uncertain = 'hold'): requeue --status uncertain sends it",
            delivery="uncertain",
        )
    return failed(job, error, settings)


# How much each way of waiting weighs: the heaviest decides for all who wait.
_WEIGHT = {replies.DEFER: 1, "relay": 2, replies.FAIL: 3, "unknown": 4}


def after_transaction(
    job: Job,
    recipients: Sequence[str],
    envelope: Envelope,
    end: Reply | None,
    settings: QueueSettings,
    now: float,
    unknown_reason: Optional[str] = None,
) -> Outcome:
    """The outcome of one SMTP transaction for `recipients` (the envelope's):
    `envelope` its replies, `end` the reply to the end of data (None when the
    content did not go, or went with no reply: then `unknown_reason` says why)."""
    waiting: dict[str, tuple[str, str, Optional[int]]] = {}  # address -> (how, text, code)
    refused: list[tuple[str, str, Optional[int]]] = []
    bad_mailboxes: list[str] = []
    throttled = False

    def wait(address: str, phase: str, reply: Reply) -> None:
        nonlocal throttled
        verdict = replies.classify(phase, reply[0], reply[1])
        text = "%d %s" % reply
        if verdict.action == replies.REFUSED:
            refused.append((address, text, reply[0]))
            if phase == replies.RCPT and verdict.bad_mailbox:
                bad_mailboxes.append(address)
            return
        if verdict.action == replies.THROTTLE:
            throttled = True
        how = {replies.DEFER: replies.DEFER, replies.FAIL: replies.FAIL}.get(
            verdict.action, "relay"
        )
        waiting[address] = (how, text, reply[0])

    delivered: list[str] = []
    if envelope.mail[0] != 250:
        for address in recipients:
            wait(address, replies.MAIL, envelope.mail)
    else:
        accepted = []
        for address, reply in zip(recipients, envelope.recipients):
            if reply[0] in (250, 251):
                accepted.append(address)
            else:
                wait(address, replies.RCPT, reply)
        if accepted and not envelope.ready:
            for address in accepted:
                wait(address, replies.DATA, envelope.data or (-1, "no reply to DATA"))
        elif accepted and end is None:
            for address in accepted:
                waiting[address] = ("unknown", unknown_reason or "no reply", None)
        elif accepted and end is not None:
            if end[0] == 250:
                delivered = accepted
            else:
                for address in accepted:
                    wait(address, replies.DOT, end)

    delivered_before = bool(job.columns.get("delivered_before"))
    got_it = bool(delivered) or delivered_before
    pending = [r for r in recipients if r in waiting]
    note = "; ".join("%s: %s" % (a, t) for a, t, _ in refused)
    if not pending:
        if got_it:
            error = "sent, but refused for good for %s" % note if refused else None
            out = _base(job, "sent", attempted=1, error=error, smtp_code=250, delivery="sent")
        else:
            out = _base(
                job,
                "dead",
                attempted=1,
                error="recipient refused: %s" % note,
                smtp_code=refused[0][2] if refused else None,
                delivery="dead",
            )
        out.bad_mailboxes, out.throttled = bad_mailboxes, throttled
        return out

    how = max((waiting[a][0] for a in pending), key=_WEIGHT.__getitem__)
    reasons = "; ".join("%s: %s" % (a, waiting[a][1]) for a in pending if waiting[a][0] == how)
    code = next(waiting[a][2] for a in pending if waiting[a][0] == how)
    whole = not delivered and not refused and set(pending) == set(recipients)
    if whole and len(set(waiting[a][1] for a in pending)) == 1:
        reasons = waiting[pending[0]][1]  # one reply for the whole mail: said once
    if delivered:
        reasons = "sent to %d recipient(s); waiting for %s" % (len(delivered), reasons)
    if refused:
        reasons += "; refused for good for %s" % note
    # the next try goes to the waiting recipients alone
    job.columns["pending_recipients"] = (
        None if whole and job.pending_recipients is None else pending
    )
    if how == "unknown":
        out = unknown(job, reasons, settings)
    elif how == replies.FAIL:
        out = failed(job, reasons, settings, code)
    else:
        out = put_back(job, reasons, settings, now, at_once=(how == "relay"), code=code)
    if delivered and out.delivery is not None:
        out.delivery = "sent"
    out.bad_mailboxes, out.throttled = bad_mailboxes, throttled
    return out
