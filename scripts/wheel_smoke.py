"""Run by scripts/wheel_smoke.sh with the fresh venv's python: the installed wheel (not the
checkout) serves the offline demo and answers a search over HTTP. Exits non-zero, saying why,
on any failure."""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", type=Path, required=True)
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()

    import clipfp8.quant

    where = Path(clipfp8.quant.__path__[0]).resolve()
    if "site-packages" not in where.parts:
        print(f"wheel-smoke: clipfp8.quant imported from {where}, not from the installed wheel", file=sys.stderr)
        return 1
    port = free_port()
    cmd = [str(args.venv / "bin" / "clipfp8"), "demo", "--no-browser", "--port", str(port),
           "--work-dir", str(args.work_dir), "--device", "cpu"]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    log = args.work_dir.parent / "demo.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}/"
            while True:
                if proc.poll() is not None:
                    print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
                    print(f"wheel-smoke: demo exited with {proc.returncode}", file=sys.stderr)
                    return 1
                if time.monotonic() - t0 > args.timeout:
                    print(f"wheel-smoke: demo not serving after {args.timeout:.0f} s", file=sys.stderr)
                    return 1
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(1.0)
            ready = time.monotonic() - t0
            printed = log.read_text(errors="replace")
            if not re.search(rf"http://127\.0\.0\.1:{port}", printed):
                print("wheel-smoke: the demo did not print its URL", file=sys.stderr)
                return 1
            from gradio_client import Client

            client = Client(url, verbose=False)
            result = client.predict("a tree", api_name="/search")
            gallery = result[0] if isinstance(result, (list, tuple)) else result
            if not gallery:
                print(f"wheel-smoke: the search answered no results: {result!r}"[:2000], file=sys.stderr)
                return 1
            print(f"wheel-smoke: demo served after {ready:.0f} s; search 'a tree' -> {len(gallery)} results")
            return 0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
