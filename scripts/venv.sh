# Sourced by the scripts in this folder: make a virtual environment with the
# pinned requirements (once; again whenever a requirements file changes) and put
# it first on PATH.
#
# The interpreter is python3 from PATH (3.9 or newer), or PYTHON if set, e.g.
# PYTHON=python3.13 ./scripts/test. The folder is .venv, or with PYTHON set
# .venv-X.Y for its version, so that several Pythons can sit side by side;
# VENV names another folder.
set -e
cd "$(dirname "$0")/.."

usable() {  # runs, and is Python 3.9 or newer (a pyenv shim may exist and fail)
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 9))' 2>/dev/null
}

if [ -n "${PYTHON:-}" ]; then
  if ! usable "$PYTHON"; then
    echo "error: PYTHON=$PYTHON does not run, or is older than Python 3.9" >&2
    exit 1
  fi
  VENV=${VENV:-.venv-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
else
  for candidate in python3 python3.14 python3.13 python3.12 python3.11 python3.10 python3.9; do
    if usable "$candidate"; then PYTHON=$candidate; break; fi
  done
  if [ -z "${PYTHON:-}" ]; then
    echo "error: need Python 3.9 or newer as python3 on PATH (or PYTHON=/path/to/python3)" >&2
    exit 1
  fi
  VENV=${VENV:-.venv}
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating $VENV with $("$PYTHON" --version 2>&1) ..."
  if ! "$PYTHON" -m venv "$VENV"; then
    rm -rf "$VENV"
    echo "error: $PYTHON -m venv failed (on Debian and Ubuntu: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
if ! cat requirements.txt requirements-dev.txt | cmp -s - "$VENV/installed-requirements.txt"; then
  echo "Installing the pinned requirements into $VENV ..."
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  cat requirements.txt requirements-dev.txt > "$VENV/installed-requirements.txt"
fi
PATH="$PWD/$VENV/bin:$PATH"
export PATH
