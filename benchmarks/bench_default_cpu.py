"""CPU throughput of the embedded default model (fp32): image tower img/s at batch 64, text encodes/s.

Usage:
    python benchmarks/bench_default_cpu.py                # the shipped model (data/default_model)
    python benchmarks/bench_default_cpu.py --candidate --width 256 --layers 8   # size a random ViT

Prints the best of ``--repeats`` timed runs (the CPU is shared, so the best run is the fairest
figure). ``--threads`` defaults to torch's choice (all cores).
"""
from __future__ import annotations

import argparse
import time

import torch


def _best_rate(fn, n_items: int, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def _candidate_visual(args: argparse.Namespace) -> torch.nn.Module:
    from open_clip.model import _build_vision_tower

    cfg = {"image_size": args.image_size, "patch_size": args.patch_size, "width": args.width,
           "layers": args.layers, "head_width": args.head_width, "mlp_ratio": args.mlp_ratio}
    return _build_vision_tower(args.embed_dim, cfg).eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidate", action="store_true", help="time a random ViT of the given size instead")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--head-width", type=int, default=64)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = [f"a photo of a {w} on the table near the window." for w in ("dog", "cat", "car", "bird")] * 16
    if args.candidate:
        visual, size, text_fn = _candidate_visual(args), args.image_size, None
    else:
        from clipfp8.quant.core.models import load_model

        loaded = load_model()
        visual, size = loaded.model.visual, loaded.image_size[0]
        tokens = loaded.tokenizer(texts)
        text_fn = lambda: loaded.model.encode_text(tokens)  # noqa: E731
    n_params = sum(t.numel() for t in visual.parameters())
    x = torch.randn(args.batch_size, 3, size, size)
    with torch.inference_mode():
        img_rate = _best_rate(lambda: visual(x), args.batch_size, args.repeats)
        print(f"image tower: {n_params / 1e6:.2f} M params, {size}px, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads: {img_rate:.1f} img/s (fp32, best of {args.repeats})")
        if text_fn is not None:
            txt_rate = _best_rate(text_fn, len(texts), args.repeats)
            print(f"text tower (MiniLM-L6 + proj), batch {len(texts)}: {txt_rate:.1f} texts/s (fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
