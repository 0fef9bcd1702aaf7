"""Decode throughput of the GPU data path vs Pillow, and end to end indexing with each.

    python benchmarks/bench_gpu_decode.py --device cuda --limit 2000 --precision fp16 \
        [--model ViT-L-14] [--images DIR] [--generate 4000 --size 640x480]

1. decode only: ``ImageDecoder`` on ``--workers`` threads vs ``GpuDecoder.imap`` (read + hash +
   header + batched ``decode_jpeg`` + preprocessing on ``--device``), images/s;
2. end to end: ``index_corpus`` with ``--decode cpu`` and ``--decode gpu`` into temporary
   indexes, images/s and the stage times.

Images: the first ``--limit`` JPEGs of ``--images`` (default ../shared/data/eval/flickr8k-1k/
images), or ``--generate N`` photo-like JPEGs of ``--size`` in a temporary folder. ``--model``
takes an open_clip name (random weights unless ``--pretrained``; throughput only) or
``default``. On a CPU machine, ``--device cpu`` runs the same torch path (a smoke test).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "eval" / "flickr8k-1k" / "images"


def corpus(args: argparse.Namespace, tmp: Path) -> Path:
    if args.generate:
        sys.path.insert(0, str(REPO))
        from tests.indexing.gpujpeg import photo_bytes

        w, h = (int(v) for v in args.size.split("x"))
        for i in range(args.generate):
            (tmp / f"g{i:06d}.jpg").write_bytes(photo_bytes((w, h), i))
        return tmp
    files = sorted(args.images.glob("*.jpg"))[:args.limit]
    for f in files:  # symlinks: nothing is copied
        (tmp / f.name).symlink_to(f.resolve())
    return tmp


def decode_only(encoder, root: Path, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    import torch

    from clipfp8.indexing.decode import DecodeTask, ImageDecoder, imap_bounded
    from clipfp8.indexing.gpu_decode import GpuDecoder
    from clipfp8.indexing.gpu_transform import transform_spec
    from clipfp8.indexing.scan import FileEntry

    paths = sorted(root.glob("*.jpg"))
    tasks = [DecodeTask(FileEntry(p.name.encode(), p.stat().st_size, 0), p) for p in paths]
    cpu = ImageDecoder({encoder.name: encoder.preprocess})
    spec = transform_spec(encoder.preprocess_transform)
    if spec is None:
        print("the encoder's transform is not recognised: no GPU path")
        return
    gpu = GpuDecoder({encoder.name: spec}, cpu, args.device, batch_size=args.batch_size)
    for label, run in (("pillow", lambda: imap_bounded(cpu, tasks, args.workers, 4 * args.batch_size)),
                       (f"torch on {args.device}", lambda: gpu.imap(tasks, args.workers, 4 * args.batch_size))):
        t0 = time.perf_counter()
        n = sum(1 for d in run() if d.error is None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        print(f"decode only, {label:>14}: {n / secs:8.1f} images/s ({n} images, {secs:.2f}s)")
    print(f"routes: {dict(gpu.stats)}")


def end_to_end(encoder, root: Path, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    from clipfp8.indexing.config import IndexConfig
    from clipfp8.indexing.pipeline import index_corpus

    for mode in ("cpu", "gpu"):
        with tempfile.TemporaryDirectory() as idx:
            cfg = IndexConfig(batch_size=args.batch_size, workers=args.workers, decode=mode)
            s = index_corpus(root, idx, [encoder], config=cfg)
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(s.stage_seconds.items()))
            print(f"index --decode {mode}: {s.images_per_second:8.1f} images/s ({s.indexed} indexed); {stages}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--generate", type=int, default=0, help="generate N JPEGs instead of reading --images")
    p.add_argument("--size", default="640x480", help="size of generated JPEGs, WxH")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="default")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.generate and not args.images.is_dir():
        print(f"no images at {args.images}; use --generate N")
        return 1
    from clipfp8.quant.core.config import EncoderSpec, ModelSpec
    from clipfp8.quant.core.encoder import create_encoder

    encoder = create_encoder(EncoderSpec(model=ModelSpec(name=args.model, pretrained=args.pretrained),
                                         precision=args.precision, device=args.device,
                                         batch_size=args.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        root = corpus(args, Path(tmp))
        decode_only(encoder, root, args)
        end_to_end(encoder, root, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
