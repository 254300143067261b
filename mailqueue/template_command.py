"""python -m mailqueue template render NAME [--locale L] --context ctx.json | list

render prints the mail as it would go out (its headers, then each part
decoded), built by the consumer's own code from the stored template, so that a
template can be previewed before any job uses it. list shows the templates.
"""

from __future__ import annotations

import argparse
import datetime
import email
import email.policy
import json
from typing import TYPE_CHECKING, Any

from mailqueue import db, message, report, templates

if TYPE_CHECKING:
    from mailqueue.config import Config

PREVIEW_RECIPIENT = "recipient@example.com"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    render = actions.add_parser("render", help="print the mail a template makes")
    render.add_argument("name", help="the template's name")
    render.add_argument("--locale", default=None, help="e.g. vi-VN (then vi, then the default)")
    render.add_argument(
        "--context", required=True, help="a JSON file holding the variables (an object)"
    )
    render.add_argument(
        "--to", default=PREVIEW_RECIPIENT, help="the To address shown (default %(default)s)"
    )
    listing = actions.add_parser("list", help="every template, by name and locale")
    for action in (render, listing):  # --config after the action too (the command's own wins)
        action.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        action.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run(args: argparse.Namespace, config: Config) -> None:
    context = _context(args) if args.action == "render" else None
    conn = report.connect(config, "mailqueue template")
    try:
        if args.action == "list":
            print(listing(db.run_dicts(conn, "template_list")), end="")
            return
        rows = templates.rows_of(db.run_dicts(conn, "template_named", template=args.name))
    except db.Error as exc:
        raise SystemExit("error: %s" % report.query_failed(exc, config.database)) from None
    finally:
        db.close_quietly(conn)
    job = dict(template=args.name, locale=args.locale, context=context, subject=None)
    job.update(content_message=None, html_message=None)
    try:
        rendered = templates.render_job(templates.Renderer(), job, rows)
        print(preview(config, args.to, rendered), end="")
    except (templates.RenderError, message.BadMail) as exc:
        raise SystemExit("error: %s" % exc) from None


def _context(args: argparse.Namespace) -> Any:
    try:
        with open(args.context, encoding="utf-8") as f:
            context = json.load(f)
    except OSError as exc:
        raise SystemExit("error: --context %s: %s" % (args.context, exc.strerror)) from None
    except ValueError as exc:
        raise SystemExit("error: --context %s is not JSON: %s" % (args.context, exc)) from None
    if not isinstance(context, dict):
        raise SystemExit("error: --context %s must hold a JSON object" % args.context)
    return context


def preview(config: Config, to: str, rendered: templates.Rendered) -> str:
    """The mail built from `rendered` as the consumer would build it: its
    headers, then each text part decoded."""
    job = dict(
        job_id=0,
        email=to,
        subject=rendered.subject,
        content_message=rendered.text,
        html_message=rendered.html,
        created_at=datetime.datetime.now(datetime.timezone.utc),
    )
    mail = message.Composer(config.smtp).build(job)
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    lines = ["%s: %s" % (name, value) for name, value in parsed.items()]
    for part in parsed.walk():
        if part.get_content_maintype() == "text":
            lines += ["", "--- %s ---" % part.get_content_type(), part.get_content().rstrip("\n")]
    return "\n".join(lines) + "\n"


def listing(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no templates yet (INSERT INTO templates ...: see docs/templates.md)\n"
    lines = [
        "%-24s %-8s %-5s %-5s %-20s %s" % ("name", "locale", "text", "html", "updated", "subject")
    ]
    for row in rows:
        lines.append(
            "%-24s %-8s %-5s %-5s %-20s %s"
            % (
                row["name"],
                row["locale"] or "''",
                "yes" if row["has_text"] else "-",
                "yes" if row["has_html"] else "-",
                row["updated_at"].strftime("%Y-%m-%d %H:%M:%S"),
                row["subject"] if row["subject"] is not None else "-",
            )
        )
    return "\n".join(lines) + "\n"
