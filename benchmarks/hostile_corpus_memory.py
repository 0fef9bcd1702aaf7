"""Peak memory of ``clipfp8 index`` over a hostile corpus, against the same run over good files.

    python benchmarks/hostile_corpus_memory.py [--model default] [--strip 100000] [--sparse-gib 2]

Builds two corpora in a temporary folder: ``good`` (a few ordinary images) and ``hostile`` (the
same images plus thin strips 1 x STRIP and STRIP x 1, a sparse multi-GB .jpg, a real 20000^2
decompression-bomb PNG, a FIFO and a symlink to /dev/zero; see ``tests/indexing/badfiles.py``).
Runs ``python -m clipfp8.indexing index`` on each in a child process and prints the child's peak
resident memory (``ru_maxrss`` from ``os.wait4``), the difference, the run's summary and its time.
The child inherits the environment, so ``PYTHONPATH=<old checkout's package folder>`` measures
older code. ``--model tiny`` uses a tiny random-weight open_clip config at 32 px (no trained
model needed; same Resize + CenterCrop preprocessing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.indexing.badfiles, the hostile-file generators

from tests.indexing import badfiles as bf  # noqa: E402


def run_index(corpus: Path, index_dir: Path, args: argparse.Namespace, model: str) -> tuple[int, int, float, str]:
    """Run `index` on ``corpus``; (peak RSS in bytes, exit code, seconds, output)."""
    cmd = [sys.executable, "-m", "clipfp8.indexing", "index", str(corpus), "--index-dir", str(index_dir),
           "--model", model, "--device", "cpu", "--precision", args.precision, "--workers",
           str(args.workers), "--no-progress"]
    # Popen + wait4 directly: the child's own peak RSS, not the maximum over earlier children.
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return usage.ru_maxrss * 1024, proc.returncode, time.perf_counter() - t0, text


def build(root: Path, strip: int, sparse_bytes: int) -> tuple[Path, Path]:
    good, hostile = root / "good", root / "hostile"
    for folder in (good, hostile):
        folder.mkdir(parents=True)
        for i in range(8):
            (folder / f"photo{i}.jpg").write_bytes(bf.jpeg_bytes((320, 240), seed=i))
    bf.hostile_corpus(hostile, strip=strip, sparse_bytes=sparse_bytes)
    return good, hostile


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default', 'tiny', or a --model value")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--strip", type=int, default=100_000, help="long side of the 1-pixel strips")
    p.add_argument("--sparse-gib", type=float, default=2.0, help="size of the sparse .jpg")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        model = args.model
        if model == "tiny":
            from clipfp8.quant.core.models import tiny_config

            (tmp / "tiny.json").write_text(json.dumps(tiny_config()))
            model = str(tmp / "tiny.json")
        good, hostile = build(tmp, args.strip, int(args.sparse_gib * (1 << 30)))
        res = {name: run_index(corpus, tmp / f"idx-{name}", args, model)
               for name, corpus in (("baseline", good), ("hostile", hostile))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mib = 1 << 20
    report = {name: {"peak_rss_mib": round(r[0] / mib, 1), "exit": r[1], "seconds": round(r[2], 1)}
              for name, r in res.items()}
    report["delta_mib"] = round((res["hostile"][0] - res["baseline"][0]) / mib, 1)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"model {args.model}, precision {args.precision}, {args.workers} workers, strips 1x{args.strip} "
          f"and {args.strip}x1, sparse {args.sparse_gib:g} GiB")
    for name, r in res.items():
        print(f"--- {name}: peak RSS {r[0] / mib:,.0f} MiB, exit {r[1]}, {r[2]:.1f}s")
        print("\n".join(r[3].strip().splitlines()[-30:]))
    print(f"hostile - baseline peak RSS: {report['delta_mib']:+,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
