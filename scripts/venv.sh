# Sourced by the scripts in this folder: make .venv with the pinned requirements
# (once; again whenever a requirements file changes) and put it first on PATH.
set -e
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  for candidate in python3.12 python3.11 python3.10 python3.9 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
  if [ -z "${PYTHON:-}" ]; then
    echo "error: need Python 3.9 to 3.12 (the throwaway PostgreSQL wheel has no build for newer)" >&2
    exit 1
  fi
  echo "Creating .venv with $($PYTHON --version) ..."
  "$PYTHON" -m venv .venv
fi
if ! cat requirements.txt requirements-dev.txt | cmp -s - .venv/installed-requirements.txt; then
  echo "Installing the pinned requirements into .venv ..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  cat requirements.txt requirements-dev.txt > .venv/installed-requirements.txt
fi
PATH="$PWD/.venv/bin:$PATH"
export PATH
