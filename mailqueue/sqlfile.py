"""The named queries of sql/queries.sql, read without a database driver (so that
mailqueue.enqueue works on psycopg 3 alone; mailqueue.db runs them on psycopg2)."""

from __future__ import annotations

import os
import re

# sql/ is beside the package in a checkout, and inside it once `pip install .`
# has put it there (pyproject.toml).
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
SQL_DIR = os.path.join(_PACKAGE, "sql")
if not os.path.isdir(SQL_DIR):
    SQL_DIR = os.path.join(os.path.dirname(_PACKAGE), "sql")

_HEADER = re.compile(r"^-- (\w+) --$", re.MULTILINE)


def load_queries(path: str = os.path.join(SQL_DIR, "queries.sql")) -> dict[str, str]:  # noqa: B008
    """{name: sql} from a file of `-- name --` headers, each followed by one query."""
    with open(path, encoding="utf-8") as f:
        parts = _HEADER.split(f.read())
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2])}


QUERIES = load_queries()
