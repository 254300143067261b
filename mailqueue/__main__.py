"""python -m mailqueue COMMAND: operate the queue.

    report    [--since 1h] [--json]             does it keep up, why do mails fail
    requeue   --status dead|failed [--job ID ...] [--since DURATION] [--dry-run]
    prune     --older-than DURATION [--dry-run] delete old completed and dead jobs
    dashboard [--host 127.0.0.1] [--port 8025]  a web page and GET /metrics
    suppress  add|remove|list|import ...        the suppression list
    bounces   --maildir PATH | --imap URL       read bounces and complaints back
    unsubscribe-server [--host] [--port 8026]   one-click unsubscribe (RFC 8058)
    template  render NAME [--locale L] --context ctx.json | list   stored templates

Each takes --config PATH (default config.json) and --log-level, like the scripts.
Durations are 30d, 12h or 15m; anything else is one line and exit code 2, before
anything is read or changed.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from mailqueue import (
    admin,
    bounces,
    cli,
    dashboard,
    db,
    durations,
    report,
    suppressions,
    template_command,
    unsubscribe,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mailqueue", description="Operate the mail queue."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, add, about in (
        ("report", report.add_arguments, "statuses, throughput, lag and failures"),
        ("requeue", admin.add_requeue_arguments, "put dead or failed jobs back"),
        ("prune", admin.add_prune_arguments, "delete old completed and dead jobs"),
        ("dashboard", dashboard.add_arguments, "a web page and Prometheus metrics"),
        ("suppress", suppressions.add_arguments, "add, remove, list or import suppressions"),
        ("bounces", bounces.add_arguments, "read DSNs and complaints from a mailbox"),
        ("unsubscribe-server", unsubscribe.add_arguments, "one-click unsubscribe (RFC 8058)"),
        ("template", template_command.add_arguments, "preview and list stored templates"),
    ):
        command = commands.add_parser(name, help=about, description=about)
        cli.add_common_arguments(command)
        add(command)
    return parser


def duration_of(args: argparse.Namespace) -> int | None:
    """The command's duration in seconds (or None), or exit 2 with one line."""
    option = {"report": "since", "requeue": "since", "prune": "older_than"}.get(args.command)
    text = getattr(args, option, None) if option else None
    if option is None or text is None:
        return None
    try:
        return durations.parse(text, "--" + option.replace("_", "-"))
    except durations.BadDuration as exc:
        sys.stderr.write("error: %s\n" % exc)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    seconds = duration_of(args)
    config = cli.start(args, "mailqueue-%s" % args.command)
    if args.command == "report":
        # seconds is an int: --since has a default
        return report.run(args, config, seconds)  # type: ignore[arg-type]
    if args.command == "dashboard":
        return dashboard.run(args, config)
    if args.command == "unsubscribe-server":
        return unsubscribe.run(args, config)
    if args.command == "template":
        return template_command.run(args, config)
    conn = report.connect(config, "mailqueue %s" % args.command)
    try:
        if args.command == "suppress":
            suppressions.run(args, conn)
        elif args.command == "bounces":
            bounces.run(args, config, conn)
        elif args.command == "requeue":
            admin.run_requeue(args, conn, seconds)
        else:
            # seconds is an int: --older-than is required
            admin.run_prune(args, conn, seconds)  # type: ignore[arg-type]
    except db.Error as exc:
        raise SystemExit("error: %s" % report.query_failed(exc, config.database)) from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the batches done so far are committed") from None
    finally:
        db.close_quietly(conn)


if __name__ == "__main__":
    main()
