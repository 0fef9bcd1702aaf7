"""Reading an engine's FP8 runtime state for a text query: the whole file read, hashed and loaded
(the code before 2026-12-05) against the verified, memory-mapped load of the text tower only
(``runtime_state.load_from_engine``: ``engine.verified_engine_file`` + ``runtime_state.map_state``).

Usage:
    python benchmarks/bench_engine_state_load.py            # ViT-L/14's shapes, 5 rounds
    python benchmarks/bench_engine_state_load.py --rounds 9

A state of ViT-L/14's FP8 runtime shapes (464 MB: float8 weights of the 24 image and 12 text
blocks, fp16 embeddings) is stored with ``engine.write_engine`` in a temp folder. Each round times,
in this process, from the page cache (as a repeated cold ``search`` finds it):

* ``whole``: read the file, sha256 it, ``safetensors.torch.load`` every tensor, keep the text
  tower's (the old ``read_engine_file`` + ``decode_plan`` + ``text_tower_only``);
* ``first``: ``verified_engine_file`` with an empty digest cache (reads and hashes once), then
  ``map_state`` of the text tower and a copy of its tensors (what moving them to the GPU reads);
* ``later``: the same with the digest remembered (every later start of that engine file).

The three run interleaved per round; the best and median of each are printed as JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def vit_l_state() -> dict[str, torch.Tensor]:
    """Tensors named and shaped as ViT-L/14's FP8 runtime state (weights only; zeros)."""
    f8 = torch.float8_e4m3fn
    state: dict[str, torch.Tensor] = {}
    for prefix, blocks, w in (("visual.transformer", 24, 1024), ("transformer", 12, 768)):
        for i in range(blocks):
            b = f"{prefix}.resblocks.{i}"
            for name, shape in (("attn.q_proj", (w, w)), ("attn.k_proj", (w, w)), ("attn.v_proj", (w, w)),
                                ("attn.out_proj", (w, w)), ("mlp.c_fc", (4 * w, w)), ("mlp.c_proj", (w, 4 * w))):
                state[f"{b}.{name}.weight"] = torch.zeros(shape, dtype=f8)
                state[f"{b}.{name}.weight_scale"] = torch.ones(())
                state[f"{b}.{name}.input_qmul"] = torch.ones(())
    state["token_embedding.weight"] = torch.zeros((49408, 768), dtype=torch.float16)
    state["visual.conv1.weight"] = torch.zeros((1024, 3, 14, 14), dtype=torch.float16)
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "xdg")  # before the project reads it
        from safetensors.torch import load, save

        from clipfp8.quant.core import checksum_cache
        from clipfp8.quant.runtime import engine as eng
        from clipfp8.quant.runtime.runtime_state import STATE_FILE, map_state
        from clipfp8.quant.runtime.runtime_trace import tower_of

        key = eng.EngineKey("c0ffee", "ViT-L-14", "fp8", "probe", (9, 0), torch.__version__, "")
        folder = eng.write_engine(Path(tmp) / "engines", key, {STATE_FILE: save(vit_l_state())})
        manifest = eng.EngineManifest.read(folder)
        path = folder / str(manifest.files[STATE_FILE]["file"])

        def whole() -> int:
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == manifest.files[STATE_FILE]["sha256"]
            return sum(t.numel() for k, t in load(data).items() if tower_of(k) != "image")

        def mapped(forget: bool) -> int:
            if forget:
                checksum_cache.cache_file().unlink(missing_ok=True)
            p = eng.verified_engine_file(folder, manifest, STATE_FILE, "rebuild")
            return sum(t.clone().numel() for t in map_state(p, keep=lambda k: tower_of(k) != "image").values())

        arms = {"whole": whole, "first": lambda: mapped(True), "later": lambda: mapped(False)}
        times: dict[str, list[float]] = {a: [] for a in arms}
        counts = set()
        for _ in range(args.rounds):
            for name, fn in arms.items():
                t0 = time.perf_counter()
                counts.add(fn())
                times[name].append(time.perf_counter() - t0)
        assert len(counts) == 1, counts  # every arm kept the same text-tower tensors
        print(json.dumps({"state_bytes": path.stat().st_size, "text_elements": counts.pop(), "rounds": args.rounds,
                          **{a: {"best_s": round(min(v), 3), "median_s": round(statistics.median(v), 3)}
                             for a, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
