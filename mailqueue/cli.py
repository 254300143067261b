"""What consumer.py and producer.py share at start-up: configuration, logging,
and a first look at the servers, each failure one clear line and a non-zero exit."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from mailqueue import config as configuration
from mailqueue import db, doorbell, smtp
from mailqueue.backoff import Backoff

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("mailqueue")

# Every line names the program (consumer, producer, mailqueue-report ...), not the
# module that logged it: a reader of the journal knows which script spoke.
LOG_FORMAT = "%(asctime)s {program}[%(process)d] %(levelname)s %(message)s"


def program_name(argv0: str | None = None) -> str:
    """'consumer' for consumer.py, 'producer' for producer.py, 'mailqueue' for
    python -m mailqueue."""
    name = os.path.splitext(os.path.basename(sys.argv[0] if argv0 is None else argv0))[0]
    return "mailqueue" if name in ("__main__", "") else name


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="config.json", help="configuration file (JSON; default: config.json)"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def start(args: argparse.Namespace, program: str | None = None) -> configuration.Config:
    """Set up logging, each line naming `program` (by default the script's name),
    and read the configuration; SystemExit on a bad file."""
    name = (program or program_name()).replace("%", "")
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT.format(program=name))
    try:
        return configuration.load(args.config)
    except configuration.ConfigError as exc:
        raise SystemExit("error: %s" % exc) from None


def wait_for_database(config: configuration.Config, stop: doorbell.Stop, what: str) -> None:
    """Connect once and check that sql/schema.sql has been run. A server that is
    not up yet (refused, timed out, a name that does not resolve yet) is waited
    for, one log line per try; what waiting cannot fix (a password refused, no
    such database, the schema not applied) ends the script with one line."""
    backoff = Backoff(doorbell.RECONNECT_DELAY_MIN, doorbell.RECONNECT_DELAY_MAX)
    while not stop.requested:
        try:
            conn = db.connect(config.database, "mailqueue %s (start-up check)" % what)
        except db.DatabaseUnavailable as exc:
            if exc.fatal:
                raise SystemExit("error: cannot connect to the %s" % exc) from None
            wait = backoff.next()
            log.warning("waiting for the %s; trying again in %.1f s", exc, wait)
            stop.sleep(wait)
            continue
        try:
            ready = db.run(conn, "schema_ready")[0][0]
        except db.Error as exc:
            raise SystemExit("error: %s" % db.describe(exc, config.database)) from None
        finally:
            db.close_quietly(conn)
        if not ready:
            raise SystemExit(
                "error: %s has no mail queue tables yet, or older ones: "
                "run sql/schema.sql first" % db.where(config.database)
            )
        return


def wait_for_smtp(config: configuration.Config, stop: doorbell.Stop) -> None:
    """Connect to the SMTP server once: as wait_for_database, a server not up yet
    is waited for; a refused login, a certificate that does not verify or a
    missing STARTTLS end the script with one line. With several relays, each is
    tried once: one that cannot be used for good ends the script the same way,
    one that is merely down is left to failover (docs/relays.md)."""
    relays: list[configuration.SmtpSettings] = list(config.relays.values()) or [config.smtp]
    if len(relays) > 1:
        fatal = []
        for relay in relays:
            sender = smtp.Sender(relay)
            try:
                sender.connect()
            except smtp.SmtpUnavailable as exc:
                line = "relay %s: %s" % (getattr(relay, "name", "default"), exc)
                if not exc.retryable:
                    fatal.append(line)
                log.warning("%s (its mails go to the next relay of their route)", line)
            finally:
                sender.close()
        if len(fatal) == len(relays):  # no relay can ever be used: nothing to wait for
            raise SystemExit("error: %s" % "; ".join(fatal))
        return
    backoff = Backoff(doorbell.RECONNECT_DELAY_MIN, doorbell.RECONNECT_DELAY_MAX)
    sender = smtp.Sender(relays[0])
    while not stop.requested:
        try:
            sender.connect()
            return
        except smtp.SmtpUnavailable as exc:
            if not exc.retryable:
                raise SystemExit("error: %s" % exc) from None
            wait = backoff.next()
            log.warning("waiting for the SMTP server: %s; trying again in %.1f s", exc, wait)
            stop.sleep(wait)
        finally:
            sender.close()
