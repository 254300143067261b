"""Stored templates: a job's subject, text and HTML rendered from a `templates` row.

The producer renders (render_ready_jobs) each job that names a template before it
queues it, once, into the job's own columns (subject, content_message,
html_message), so that a retry sends the same bytes and a template edited later
changes no job already rendered. Jinja2 in its immutable sandbox: a template
cannot reach Python internals (`''.__class__`), call unsafe methods or change
its context; a variable missing from the context is an error (StrictUndefined),
never a blank; HTML is escaped in the HTML part only. Any error makes the job
dead with a last_error naming the template, its locale and the cause, spending
no attempt.

A job's locale is looked up as given, then with its last subtag cut off, down to
the default '' (vi-VN, then vi, then ''), case-insensitively.
"""

from __future__ import annotations

import collections
import datetime
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailqueue import addresses

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

CACHE_SIZE = 512  # compiled templates kept (name, locale, updated_at)
PARTS = ("subject", "text", "html")


class RenderError(ValueError):
    """A template cannot be rendered for a job; the message says which and why."""


@dataclass(frozen=True)
class Template:
    """One row of `templates`."""

    name: str
    locale: str
    subject: str | None
    text: str | None
    html: str | None
    updated_at: datetime.datetime | None = None


@dataclass(frozen=True)
class Rendered:
    """What a job's columns become: subject, content_message, html_message."""

    subject: str | None
    text: str | None
    html: str | None


def locale_candidates(locale: str | None) -> list[str]:
    """The locales to try, in order: 'vi-VN' -> ['vi-vn', 'vi', '']."""
    wanted = (locale or "").strip().lower().replace("_", "-")
    if not wanted:
        return [""]
    tags = wanted.split("-")
    return ["-".join(tags[:n]) for n in range(len(tags), 0, -1)] + [""]


def choose(name: str, locale: str | None, rows: Iterable[Template]) -> Template:
    """The row of template `name` for `locale` (with the fallback), or RenderError."""
    by_locale = {row.locale.lower(): row for row in rows if row.name == name}
    if not by_locale:
        raise RenderError("template %s does not exist" % addresses._shown(name))
    tried = locale_candidates(locale)
    for candidate in tried:
        if candidate in by_locale:
            return by_locale[candidate]
    raise RenderError(
        "template %s has no locale %s (tried %s; it has %s)"
        % (
            addresses._shown(name),
            addresses._shown(locale or ""),
            ", ".join(repr(t) for t in tried),
            ", ".join(repr(t) for t in sorted(by_locale)),
        )
    )


class Renderer:
    """Renders templates, keeping the compiled ones by (name, locale, updated_at):
    an edited template has a new updated_at (the schema's trigger), so an edit is
    compiled afresh and the old entry ages out."""

    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        # The parts keep their last line break; the subject's source loses it
        # (see compiled): a subject is one line.
        options: dict[str, Any] = dict(
            undefined=jinja2.StrictUndefined, auto_reload=False, keep_trailing_newline=True
        )
        self.plain = ImmutableSandboxedEnvironment(autoescape=False, **options)
        self.escaped = ImmutableSandboxedEnvironment(autoescape=True, **options)
        self.cache: collections.OrderedDict[tuple[Any, ...], dict[str, Any]] = (
            collections.OrderedDict()
        )
        self.cache_size = cache_size

    def compiled(self, template: Template) -> dict[str, Any]:
        """{part: jinja2.Template or None}, compiled once per version of the row."""
        key = (template.name, template.locale, template.updated_at)
        found = self.cache.get(key)
        if found is not None:
            self.cache.move_to_end(key)
            return found
        found = {}
        for part in PARTS:
            source = getattr(template, part)
            if part == "subject" and source is not None:
                source = source.rstrip("\r\n")  # typed in an editor, with a final newline
            env = self.escaped if part == "html" else self.plain
            try:
                found[part] = None if source is None else env.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise RenderError(
                    "%s: %s line %s: %s" % (_which(template), part, exc.lineno, exc.message)
                ) from None
        if template.updated_at is not None:  # a row not from the table: not kept
            self.cache[key] = found
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return found

    def render(self, template: Template, context: object) -> Rendered:
        """The template's parts rendered with `context` (a JSON object), or
        RenderError naming the template, the part and the cause (e.g. the
        missing variable). A part the template lacks is None."""
        if context is None:
            context = {}
        if not isinstance(context, dict):
            raise RenderError(
                "%s: context must be a JSON object, not %s"
                % (_which(template), addresses._json_type(context))
            )
        compiled = self.compiled(template)
        done: dict[str, str | None] = {}
        for part in PARTS:
            if compiled[part] is None:
                done[part] = None
                continue
            try:
                done[part] = compiled[part].render(context)
            except jinja2.UndefinedError as exc:
                raise RenderError(
                    "%s: %s: %s in the context" % (_which(template), part, exc.message)
                ) from None
            except jinja2.exceptions.SecurityError as exc:
                raise RenderError(
                    "%s: %s: refused by the sandbox: %s" % (_which(template), part, exc)
                ) from None
            except Exception as exc:  # anything a template can raise: the job's error
                raise RenderError(
                    "%s: %s: %s: %s" % (_which(template), part, type(exc).__name__, exc)
                ) from None
        subject = done["subject"]
        if subject is not None:
            try:
                addresses.check_header_text(subject, "the subject rendered")
            except addresses.BadHeader as exc:
                raise RenderError("%s: %s" % (_which(template), exc)) from None
        return Rendered(subject, done["text"], done["html"])


def _which(template: Template) -> str:
    return "template %s (locale %s)" % (
        addresses._shown(template.name),
        addresses._shown(template.locale),
    )


def render_job(renderer: Renderer, job: Mapping[str, Any], rows: Iterable[Template]) -> Rendered:
    """A job's columns after rendering its template (`rows`: the template's rows,
    any locale). A part the template lacks keeps the job's own column."""
    template = choose(job["template"], job.get("locale"), rows)
    context = job.get("context")
    if isinstance(context, str):  # a driver that returns JSONB as text
        context = json.loads(context)
    rendered = renderer.render(template, context)
    return Rendered(
        rendered.subject if rendered.subject is not None else job.get("subject"),
        rendered.text if rendered.text is not None else job.get("content_message"),
        rendered.html if rendered.html is not None else job.get("html_message"),
    )


def rows_of(records: Iterable[Mapping[str, Any]]) -> list[Template]:
    return [
        Template(r["name"], r["locale"], r["subject"], r["text"], r["html"], r["updated_at"])
        for r in records
    ]


def render_ready_jobs(conn: Any, renderer: Renderer, batch_size: int) -> tuple[int, int]:
    """Render every due job that waits for its template, batch_size per short
    transaction (its jobs locked FOR UPDATE SKIP LOCKED: several producers are
    safe); return (rendered, dead). `conn` is the producer's autocommit psycopg2
    connection; each batch commits before the next is taken."""
    from mailqueue import db  # psycopg2: only where the producer runs this

    rendered = dead = 0
    while True:
        with conn:  # one transaction (psycopg2 opens one even in autocommit)
            jobs = db.run_dicts(conn, "render_take_jobs", limit=batch_size)
            if not jobs:
                return rendered, dead
            names = sorted({job["template"] for job in jobs})
            rows = rows_of(db.run_dicts(conn, "render_templates_named", names=names))
            outcome: dict[str, list[Any]] = {
                "job_ids": [],
                "subjects": [],
                "texts": [],
                "htmls": [],
                "errors": [],
            }
            for job in jobs:
                try:
                    done = render_job(renderer, job, rows)
                    error = None
                except RenderError as exc:
                    done, error = Rendered(None, None, None), str(exc)
                outcome["job_ids"].append(job["job_id"])
                outcome["subjects"].append(done.subject)
                outcome["texts"].append(done.text)
                outcome["htmls"].append(done.html)
                outcome["errors"].append(error)
                dead += error is not None
            rendered += len(jobs) - sum(e is not None for e in outcome["errors"])
            db.run(conn, "render_record", **outcome)
        if len(jobs) < batch_size:
            return rendered, dead
