#!/usr/bin/env bash
# The wheel works on its own: build it, install it into a fresh venv (no editable checkout, run
# from outside the repository), then `clipfp8 demo --no-browser` must serve offline and answer a
# search (scripts/wheel_smoke.py). CI runs this before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$repo/build/wheel-smoke
rm -rf "$work" && mkdir -p "$work/home"
.venv/bin/python -m pip wheel -q --no-deps -w "$work/dist" . 2>&1 | grep -v "is ignored: it is neither" || true
wheel=$(ls "$work"/dist/clip_fp8-*.whl)
echo "wheel-smoke: built $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
"$work/venv/bin/python" -m pip install -q -c requirements/ci.lock "$wheel" 2>&1 | grep -v "is ignored: it is neither" || true
cd "$work"
HOME="$work/home" "$work/venv/bin/python" "$repo/scripts/wheel_smoke.py" --venv "$work/venv" --work-dir "$work/demo"
