#!/usr/bin/env bash
# Regenerate requirements/ci.lock from the current .venv (after scripts/setup.sh and a green test run):
# the exact versions CI installs and tests, so a new release upstream cannot break a run in which
# nothing here changed. pyproject.toml's floors must stay <= these (tests/test_dependencies.py).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# The test environment of CI (Python 3.11, CPU): exact versions, made by scripts/lock.sh."
  echo "# scripts/setup.sh installs with '-c requirements/ci.lock'. Floors: docs/dependencies.md."
  .venv/bin/python -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)==' | LC_ALL=C sort -f
} > requirements/ci.lock
echo "wrote requirements/ci.lock ($(grep -vc '^#' requirements/ci.lock) packages)"
