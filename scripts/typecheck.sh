#!/usr/bin/env bash
# mypy over the installed package names (clipfp8.*). The repository keeps its folders at the top
# (quant/, indexing/, app/, data/) and the editable install maps them through an import hook that
# mypy cannot follow, so a throw-away tree of links gives mypy the installed layout.
set -euo pipefail
cd "$(dirname "$0")/.."
root=build/typecheck
rm -rf "$root" && mkdir -p "$root/clipfp8"
for d in quant indexing app data; do ln -s "../../../$d" "$root/clipfp8/$d"; done
cd "$root"
# mypy comes from the `dev` extra that scripts/setup.sh installs (exact version: requirements/ci.lock).
# Its cache lives beside the link tree, which is rebuilt on every run, so later runs are incremental.
exec ../../.venv/bin/mypy --config-file ../../pyproject.toml --cache-dir ../mypy_cache -p clipfp8
