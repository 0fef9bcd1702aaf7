#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the project and its test tools.
# Needs PyPI (no model hub). With root and apt, also installs Debian's Chromium for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Exact versions of the tested environment (requirements/ci.lock; floors: docs/dependencies.md).
.venv/bin/python -m pip install -q -c requirements/ci.lock -e ".[dev]"
if [ "${CLIPFP8_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # Browser end-to-end test (tests/app): Debian's Chromium driven by Playwright (no browser download).
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || echo "setup: chromium not installed; the browser test will be skipped" >&2
fi
echo "setup: done (.venv ready; run .venv/bin/clipfp8 --help)"
