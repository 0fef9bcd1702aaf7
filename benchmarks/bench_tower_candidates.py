"""CPU throughput of candidate image towers for the default model (fp32, random weights).

Usage:
    python benchmarks/bench_tower_candidates.py                       # the candidates below
    python benchmarks/bench_tower_candidates.py --towers 64/8/256x8 80/10/256x8 --rounds 5

A tower is ``SIZE/PATCH/WIDTHxLAYERS`` (head width 64, MLP ratio 4, 256-d projection). The
candidates are timed in interleaved rounds (every candidate once per round), so a load spike of the
shared CPU hits them all alike; each one's best batch over all rounds is printed, with its
parameter count and its fp16 ``model.safetensors`` size (tower + the 384->256 text projection).
"""
from __future__ import annotations

import argparse
import time

import torch

DEFAULT_TOWERS = ("64/8/256x8", "64/8/256x10", "64/8/288x8", "64/8/256x12", "64/8/320x8", "80/10/256x8",
                  "96/12/256x8", "80/8/256x8")


def build(spec: str, embed_dim: int = 256) -> tuple[torch.nn.Module, int]:
    """``SIZE/PATCH/WIDTHxLAYERS`` -> (open_clip VisionTransformer in eval mode, input size)."""
    from open_clip.model import _build_vision_tower

    size, patch, rest = spec.split("/")
    width, layers = rest.split("x")
    cfg = {"image_size": int(size), "patch_size": int(patch), "width": int(width), "layers": int(layers),
           "head_width": 64, "mlp_ratio": 4.0}
    return _build_vision_tower(embed_dim, cfg).eval(), int(size)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--towers", nargs="+", default=list(DEFAULT_TOWERS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    towers = {s: build(s) for s in args.towers}
    inputs = {s: torch.randn(args.batch_size, 3, size, size) for s, (_, size) in towers.items()}
    best = dict.fromkeys(towers, float("inf"))
    with torch.inference_mode():
        for s, (m, _) in towers.items():
            m(inputs[s])  # warm-up (allocator, oneDNN primitive cache)
        for _ in range(args.rounds):
            for s, (m, _) in towers.items():
                t0 = time.perf_counter()
                m(inputs[s])
                best[s] = min(best[s], time.perf_counter() - t0)
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, fp32, best of {args.rounds} interleaved rounds")
    print(f"{'tower':<14} {'tokens':>6} {'params M':>9} {'fp16 MB':>8} {'img/s':>7}")
    for s, (m, size) in towers.items():
        n = sum(t.numel() for t in m.parameters())
        patch = int(s.split("/")[1])
        mb = (n + 384 * 256 + 1) * 2 / 1e6
        print(f"{s:<14} {(size // patch) ** 2 + 1:>6} {n / 1e6:>9.2f} {mb:>8.1f} {args.batch_size / best[s]:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
