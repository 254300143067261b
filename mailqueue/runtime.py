"""The scripts' first step: check that this Python has their requirements.

`python3 producer.py` outside the virtual environment would end in a
ModuleNotFoundError traceback; require_dependencies() says instead, in one line,
which Python to use. Standard library only: it runs before anything else of the
package is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# The import names of the requirements the scripts load at start-up.
REQUIRED = ("psycopg2", "pgnotify", "email_validator", "dkim", "prometheus_client")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")


def missing_modules() -> list[str]:
    """The required modules this Python cannot import."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def require_dependencies(script: str | None = None) -> None:
    """Return if every requirement imports; else SystemExit with one line that
    names the Python to use (the venv's) or how to make it."""
    missing = missing_modules()
    if not missing:
        return
    script = script or os.path.basename(sys.argv[0]) or "producer.py"
    venv_python = os.path.relpath(os.path.join(VENV, "bin", "python"))
    in_venv = os.path.realpath(sys.prefix) == os.path.realpath(VENV)
    if in_venv or not os.path.exists(venv_python):
        hint = "install the requirements: python3 -m venv .venv && %s -m pip install -r %s" % (
            venv_python,
            os.path.relpath(os.path.join(ROOT, "requirements.txt")),
        )
    else:
        hint = "run it with the venv's Python instead: %s %s" % (venv_python, script)
    raise SystemExit(
        "error: %s cannot import %s (the requirements are in the venv, not here): %s"
        % (sys.executable, ", ".join(missing), hint)
    )
