#!/usr/bin/env bash
# Run the GPU-marked tests on the lent H200 (see docs/benchmarks.md). Wheels for what the device
# image lacks are carried in .carry/wheels (ignored by git).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
  tests/quant/runtime tests/quant/test_ptq.py tests/indexing/test_gpu_search.py -rA 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"
