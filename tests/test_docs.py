"""The documentation runs as written. Every fenced block of README.md and
docs/*.md whose info string is exactly `sql` runs on a fresh database with the
schema (`sql skip` does not); every `sh run` block runs from the repository's
folder with psql connected to such a database (the files it reads are in
docs/examples/). Every relative link points to a file, and to a heading of it,
that exist. The README stays short enough to read in five minutes."""

import glob
import os
import re
import shutil
import subprocess
import sys

import psycopg2
import pytest

import devservers
from helpers import ROOT, query
from mailqueue import config as configuration

README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^( *)(`{3,}|~{3,})\s*(.*?)\s*$")


def fenced_blocks(path):
    """(info string, text, line number) of each fenced block, its text without
    the opening fence's indentation (blocks inside list items)."""
    blocks, opened = [], None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if opened is None:
                found = FENCE.match(line)
                if found:
                    indent, fence, info = found.groups()
                    opened = (len(indent), fence, info, number, [])
                continue
            indent, fence, info, start, lines = opened
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                blocks.append((info, "\n".join(lines), start))
                opened = None
            else:
                lines.append(line[indent:] if line[:indent].strip() == "" else line)
    assert opened is None, "%s:%d: a fenced block is never closed" % (path, opened[3])
    return blocks


def blocks_marked(info):
    return [
        pytest.param(text, id="%s:%d" % (os.path.relpath(path, ROOT), start))
        for path in PAGES
        for block_info, text, start in fenced_blocks(path)
        if block_info == info
    ]


SQL_BLOCKS = blocks_marked("sql")
SH_BLOCKS = blocks_marked("sh run")


def test_the_examples_are_found():
    # the extraction itself: a change in fences must not silently run nothing
    assert len(SQL_BLOCKS) >= 6 and len(SH_BLOCKS) >= 2
    pages = {p.id.split(":")[0] for p in SQL_BLOCKS}
    assert {"README.md", "docs/writing-mails.md", "docs/delivery.md"} <= pages


@pytest.mark.parametrize("sql", SQL_BLOCKS)
def test_each_sql_example_runs_as_written(sql, db):
    with db.cursor() as cur:
        try:
            cur.execute(sql)
        except psycopg2.Error as exc:
            pytest.fail("the example fails: %s\n%s" % (exc, sql))


def psql_environment(postgres, database):
    settings = postgres.settings_for(database)
    psql = shutil.which("psql")
    bin_dir = os.path.dirname(psql) if psql else devservers._pg_bin_dir()
    return dict(
        os.environ,
        PATH=os.pathsep.join([os.path.dirname(sys.executable), bin_dir, os.environ["PATH"]]),
        PGHOST=str(settings["host"]),
        PGPORT=str(settings["port"]),
        PGUSER=settings["user"],
        PGPASSWORD=settings["password"],
        PGDATABASE=database,
    )


def run_shell(text, env):
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("commands", SH_BLOCKS)
def test_each_runnable_shell_example_runs_as_written(commands, postgres, database):
    result = run_shell(commands, psql_environment(postgres, database))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "ERROR" not in result.stderr, result.stderr


def test_the_files_example_stores_the_files_byte_for_byte(postgres, database, db):
    [commands] = [p.values[0] for p in SH_BLOCKS if "invoice-with-files.sql" in p.values[0]]
    result = run_shell(commands, psql_environment(postgres, database))
    assert result.returncode == 0, result.stderr
    stored = dict(query(db, "SELECT content_id, content FROM attachments"))
    for content_id, name in (("logo", "logo.png"), (None, "invoice-42.pdf")):
        with open(os.path.join(ROOT, "docs", "examples", name), "rb") as f:
            assert bytes(stored[content_id]) == f.read(), name


# ---------------------------------------------------------------- links


def without_code(path):
    """The page's text with fenced blocks and inline code blanked out."""
    lines, fence = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            found = FENCE.match(line.rstrip("\n"))
            if fence is None and found:
                fence = found.group(2)
                lines.append("")
            elif fence is not None:
                if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                    fence = None
                lines.append("")
            else:
                lines.append(re.sub(r"`[^`]*`", "``", line.rstrip("\n")))
    return lines


def slug(heading):
    """The anchor GitHub gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    for line in without_code_keep_headings(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else "%s-%d" % (base, count))
    return found


def without_code_keep_headings(path):
    """Lines outside fenced blocks, inline code kept (headings may hold it)."""
    lines, fence = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            found = FENCE.match(line)
            if fence is None and found:
                fence = found.group(2)
            elif fence is not None:
                if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                    fence = None
            else:
                lines.append(line)
    return lines


LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(path):
    for number, line in enumerate(without_code(path), 1):
        for target in LINK.findall(line):
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, mailto: ...
                yield number, target


def test_every_relative_link_points_to_a_file_and_heading_that_exist():
    broken, checked = [], 0
    for page in PAGES:
        for number, target in relative_links(page):
            checked += 1
            where = "%s:%d: %s" % (os.path.relpath(page, ROOT), number, target)
            file_part, _, anchor = target.partition("#")
            linked = (
                os.path.normpath(os.path.join(os.path.dirname(page), file_part))
                if file_part
                else page
            )
            if not os.path.exists(linked):
                broken.append(where + " (no such file)")
            elif anchor and not linked.endswith(".md"):
                broken.append(where + " (an anchor into a file that is not Markdown)")
            elif anchor and anchor not in anchors(linked):
                broken.append(where + " (no such heading)")
    assert checked >= 30, "the link check found only %d links" % checked
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_slugs_are_githubs():
    assert slug("Sending again: `python -m mailqueue requeue`") == (
        "sending-again-python--m-mailqueue-requeue"
    )
    assert slug("Lab notes, 2 December 2026") == "lab-notes-2-december-2026"
    assert slug("listen_database") == "listen_database"


def test_the_readme_is_short_and_leads_to_every_page():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert text.count("\n") <= 200
    linked = {os.path.normpath(t.partition("#")[0]) for _, t in relative_links(README)}
    for page in PAGES[1:]:
        assert os.path.relpath(page, ROOT) in linked, "README does not link %s" % page


# ---------------------------------------------------------------- configuration


def documented_keys(section):
    """The keys in the first column of the table under `## section` in
    docs/configuration.md."""
    keys, inside = set(), False
    for line in without_code_keep_headings(os.path.join(ROOT, "docs", "configuration.md")):
        if line.startswith("## "):
            inside = line[3:].strip() == section
        elif inside and line.startswith("| `"):
            keys.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return keys


def test_every_configuration_key_is_documented_and_nothing_else():
    assert documented_keys("database") == set(configuration._DATABASE_TYPES)
    assert documented_keys("smtp") == set(configuration._SMTP_TYPES)
    assert documented_keys("queue") == set(configuration._QUEUE_TYPES)


def test_the_configuration_pages_example_is_accepted(tmp_path):
    [example] = [
        text
        for info, text, _ in fenced_blocks(os.path.join(ROOT, "docs", "configuration.md"))
        if info == "json"
    ]
    path = tmp_path / "config.json"
    path.write_text(example, encoding="utf-8")
    config = configuration.load(str(path), environ={})
    assert config.smtp.security == "starttls" and config.queue.concurrency == 64
