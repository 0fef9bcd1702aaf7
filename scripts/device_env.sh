# Sourced by the device scripts (device_bench.sh, device_towers.sh, device_read_ab.sh) on a bare GPU
# image with torch preinstalled: installs the carried wheels (.whl/, see device_bench.sh) and the
# project into /tmp/site without network, and sets the environment the measurements run in.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# The project itself, with its entry points (the precision registry reads them): no network needed.
# Byte-compiled at install, as a normal `pip install` does (cold starts are measured here).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
  --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# The lent GPU image sets PYTHONDONTWRITEBYTECODE=1 and its torch has no .pyc files, so every
# process there compiles torch, transformers and sklearn from source: 5-9 s of each cold start
# (measured 2026-12-04: cold `clipfp8 search` 14-19 s without a bytecode cache, 9.0-9.6 s with).
# A pip-installed torch has its .pyc files; let Python cache bytecode as an installed one does.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/clipfp8-pycache}
