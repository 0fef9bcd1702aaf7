"""Measure compiled engines (issue 10) on a CUDA GPU: how long ``build_engine`` takes, how long a
fresh process needs to create an encoder and run its first batches with and without an engine,
how large the engine is, and whether the compiler cache was hit. Used by
``scripts/device_engine_check.sh`` (ViT-L-14, random weights) and by
``tests/quant/runtime/test_engine_gpu.py`` (a tiny model).

    python scripts/engine_check.py quantize --model ViT-L-14|tiny --out Q
    python scripts/engine_check.py build --quantized Q --precision fp8 fp16 --batch-size 64 --json B.json
    python scripts/engine_check.py probe --quantized Q --precision fp8 fp16 --batch-size 64 --json P.json
    python scripts/engine_check.py table B.json COLD.json WARM.json

Run each ``probe`` in a fresh process with fresh TORCHINDUCTOR_CACHE_DIR/TRITON_CACHE_DIR: that
start is what is measured (CLIPFP8_ENGINE=off for the "no engine" baseline).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

CAPTIONS = ["a photo of a cat.", "a red car on a street.", "a bowl of fruit.", "two people walking."]


def _model_spec(quantized: Path) -> Any:
    from clipfp8.quant.checkpoint import read_model_spec

    return read_model_spec(quantized)


def cmd_quantize(args: argparse.Namespace) -> int:
    """A random-weight model (``tiny``: ``tiny_config``; else an open_clip architecture, saved as
    a safetensors checkpoint beside ``--out`` so every process loads the same weights), FP8-
    quantized on random images and fixed captions."""
    import torch
    from safetensors.torch import save_file

    from clipfp8.quant import checkpoint, ptq
    from clipfp8.quant.core.config import ModelSpec
    from clipfp8.quant.core.models import load_model, tiny_config

    torch.manual_seed(0)
    if args.model == "tiny":
        loaded = load_model(ModelSpec(name="tiny", config=tiny_config()))
    else:
        weights = args.out.parent / f"{args.model}-random.safetensors"
        model = load_model(ModelSpec(name=args.model)).model
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
        loaded = load_model(ModelSpec(name=args.model, checkpoint=weights))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded.model.to(device)
    h, w = loaded.image_size
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, h, w, generator=gen), loaded.tokenizer([CAPTIONS[i % 4] for i in range(16)]))
               for _ in range(2)]
    ptq.quantize(loaded, batches, ptq.QuantConfig())
    loaded.model.cpu()
    checkpoint.save_quantized(loaded, args.out, ptq.QuantConfig())
    print(f"quantized {loaded.spec.model_id()} -> {args.out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """``build_engines`` one precision at a time (re-seeded: a config model's random weights are
    then those of every other process); JSON: per precision the folder, seconds and bytes."""
    import torch

    from clipfp8.quant.runtime.cli_engine import build_engines
    from clipfp8.quant.runtime.engine import EngineManifest

    out: dict[str, Any] = {"kind": "build", **_env()}
    for precision in args.precision:
        torch.manual_seed(0)
        start = time.perf_counter()
        (folder,) = build_engines((precision,), quantized=args.quantized, batch_size=args.batch_size)
        manifest = EngineManifest.read(folder)
        out[precision] = {"folder": str(folder), "wall_s": time.perf_counter() - start,
                          "build_s": manifest.build_seconds, "cache_entries": manifest.cache_entries,
                          "bytes": sum(int(f["bytes"]) for f in manifest.files.values())}
        print(precision, json.dumps(out[precision]), flush=True)
    _write(args.json, out)
    return 0


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def _timed(fn: Any) -> tuple[Any, float]:
    import torch

    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def probe_one(spec: Any, batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create the encoder of ``spec`` the product's way and time its first calls -> (figures,
    embeddings: query (1, D), texts (B, D), images (B, D) float32)."""
    import torch

    from clipfp8.quant.core.encoder import create_encoder

    torch.manual_seed(0)
    before = _counters()
    enc, create_s = _timed(lambda: create_encoder(spec))
    h, w = enc.image_size
    images = torch.randn(batch_size, 3, h, w, generator=torch.Generator().manual_seed(2))
    texts = [CAPTIONS[i % 4] for i in range(batch_size)]
    query, query_s = _timed(lambda: enc.encode_texts(["a red car"]))
    img, image_s = _timed(lambda: enc.encode_images(images))
    txt, text_s = _timed(lambda: enc.encode_texts(texts))
    _, again_s = _timed(lambda: enc.encode_images(images))
    after = _counters()
    figures = {"encoder": type(enc).__name__, "create_s": create_s, "first_query_s": query_s,
               "first_image_batch_s": image_s, "first_text_batch_s": text_s, "steady_image_batch_s": again_s,
               "start_to_results_s": create_s + query_s + image_s + text_s,
               "modelopt_imported": "modelopt" in sys.modules,
               "cache": {k: after[k] - before[k] for k in after}}
    return figures, {"query": query, "texts": txt, "images": img}


def cmd_probe(args: argparse.Namespace) -> int:
    import os

    import numpy as np

    from clipfp8.quant.core.config import EncoderSpec

    out: dict[str, Any] = {"kind": "probe", "policy": os.environ.get("CLIPFP8_ENGINE", "auto"), **_env()}
    arrays: dict[str, Any] = {}
    for precision in args.precision:
        spec = EncoderSpec(model=_model_spec(args.quantized), precision=precision, device="cuda",
                           quantized=args.quantized if precision == "fp8" else None, batch_size=args.batch_size)
        out[precision], emb = probe_one(spec, args.batch_size)
        arrays.update({f"{precision}_{k}": v for k, v in emb.items()})
        print(precision, json.dumps(out[precision]), flush=True)
    _write(args.json, out)
    if args.npz is not None:
        np.savez(args.npz, **arrays)
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    """A Markdown table from one build JSON and any number of probe JSONs."""
    runs = [json.loads(Path(p).read_text()) for p in args.files]
    build = next((r for r in runs if r["kind"] == "build"), {})
    probes = [r for r in runs if r["kind"] == "probe"]
    precisions = [p for p in ("fp8", "fp16", "bf16") if p in build or any(p in r for r in probes)]
    head = ["precision", "build s", "engine MiB"] + [f"{r['policy']}: create s | first query s | first batch s | "
                                                      f"cache hit/miss" for r in probes]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * (3 + 4 * len(probes)))
    for p in precisions:
        b = build.get(p, {})
        row = [p, f"{b.get('build_s', float('nan')):.1f}", f"{b.get('bytes', 0) / 2**20:.1f}"]
        for r in probes:
            f = r.get(p, {})
            c = f.get("cache", {})
            row += [f"{f.get('create_s', float('nan')):.1f}", f"{f.get('first_query_s', float('nan')):.2f}",
                    f"{f.get('first_image_batch_s', float('nan')):.2f}",
                    f"{c.get('aot_hit', 0) + c.get('fxgraph_hit', 0)}/"
                    f"{c.get('aot_miss', 0) + c.get('fxgraph_miss', 0)}"]
        print("| " + " | ".join(row) + " |")
    env = (probes or [build])[0] if (probes or build) else {}
    print(f"\n{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}")
    return 0


def _env() -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "triton": triton_version, "gpu": gpu}


def _write(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))


def main(argv: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--model", default="tiny")
    q.add_argument("--out", type=Path, required=True)
    q.set_defaults(func=cmd_quantize)
    for name, func in (("build", cmd_build), ("probe", cmd_probe)):
        p = sub.add_parser(name)
        p.add_argument("--quantized", type=Path, required=True)
        p.add_argument("--precision", nargs="+", default=["fp8", "fp16"])
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--json", type=Path, default=None)
        if name == "probe":
            p.add_argument("--npz", type=Path, default=None, help="also save the embeddings")
        p.set_defaults(func=func)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    t.set_defaults(func=cmd_table)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
