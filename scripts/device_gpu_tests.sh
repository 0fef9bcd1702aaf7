#!/usr/bin/env bash
# Run the GPU-marked tests on a CUDA machine (used on the lent H200, see docs/benchmarks.md).
# On a machine with the project installed (scripts/setup.sh), `.venv/bin/python -m pytest -m gpu` is
# enough. This script is for a bare GPU image with torch but without the project's other packages:
# put their Python 3.12 wheels in .whl/ first (ignored by git; the same as scripts/device_bench.sh), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl nvidia-modelopt==0.47.0 open_clip_torch==3.3.0 ftfy wcwidth omegaconf \
#     antlr4-python3-runtime==4.9.3 pulp pydantic pydantic-core annotated-types typing-inspection \
#     faiss-cpu sqlite-utils sqlite-fts4 click-default-group
# (antlr4-python3-runtime 4.9.3 is an sdist on PyPI: build its wheel with `pip wheel` first).
# The tests that build the embedded default model need its MiniLM text weights (88 MB, over what
# one call carries): stage them first with scripts/device_ray_stage.sh (receive per part, install).
# The real-photo tests read ../shared/data, which does not travel: copy the first 64 photos of
# eval/flickr8k-1k/images into .carry/shared/data/eval/flickr8k-1k/images to run them too.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# The project itself: the clipfp8.* names and the entry points that register the precisions.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[ -d .carry/shared/data ] && export CLIPFP8_SHARED_DATA=$PWD/.carry/shared/data
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
  tests/quant/runtime tests/quant/test_ptq.py tests/indexing/test_gpu_search.py \
  tests/indexing/test_gpu_decode.py tests/indexing/test_gpu_transform.py -rA 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"
