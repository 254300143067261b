"""What consumer.py and producer.py share at start-up: configuration, logging,
and a first look at the servers, each failure one clear line and a non-zero exit."""

import logging

from mailqueue import config as configuration
from mailqueue import db, smtp

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


def add_common_arguments(parser):
    parser.add_argument("--config", default="config.json",
                        help="configuration file (JSON; default: config.json)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def start(args):
    """Set up logging and read the configuration; SystemExit on a bad file."""
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    try:
        return configuration.load(args.config)
    except configuration.ConfigError as exc:
        raise SystemExit("error: %s" % exc) from None


def check_database(config):
    """Connect once and check that sql/schema.sql has been run."""
    try:
        conn = db.connect(config.database, "mailqueue check")
    except db.DatabaseUnavailable as exc:
        raise SystemExit("error: cannot connect to the %s" % exc) from None
    try:
        ready = db.run(conn, "schema_ready")[0][0]
    finally:
        db.close_quietly(conn)
    if not ready:
        raise SystemExit("error: %s has no mail queue tables yet (or the seed's old ones): "
                         "run sql/schema.sql first" % db.where(config.database))


def check_smtp(config):
    sender = smtp.Sender(config.smtp)
    try:
        sender.connect()
    except smtp.SmtpUnavailable as exc:
        raise SystemExit("error: %s" % exc) from None
    finally:
        sender.close()
