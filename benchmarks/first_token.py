"""Seconds to the first token of `woolly run MODEL "Hi" -n 1` in a new process.

    python benchmarks/first_token.py [MODEL] [--runs 3] [--cold]

Warm (default): the caches as they are (kernels in ~/.cache/woolly/kernels, compiled XLA
programs and traced entry points in ~/.cache/woolly/jax); one untimed run fills them first.
--cold: each run gets empty WOOLLY_KERNEL_CACHE and WOOLLY_COMPILE_CACHE directories, as on
a first install. Reports, per run, the time to the first byte on stdout (the first token) and
to exit, and separately the time for a new process to `import woolly.cli`. One JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(seconds to the first stdout byte, seconds to exit)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.read(1)
    first = time.perf_counter() - t0
    p.stdout.read()
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {p.returncode}")
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--residency", default="dense", choices=("dense", "quantized"))
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "woolly.cli", "run", a.model, "Hi", "-n", "1", "--residency", a.residency]
    env = dict(os.environ)
    if not a.cold:
        _timed(cmd, env)   # fill the caches
    first, total = [], []
    for _ in range(a.runs):
        with tempfile.TemporaryDirectory() as tmp:
            e = dict(env, WOOLLY_KERNEL_CACHE=os.path.join(tmp, "k"), WOOLLY_COMPILE_CACHE=os.path.join(tmp, "j")) \
                if a.cold else env
            f, t = _timed(cmd, e)
        first.append(round(f, 3))
        total.append(round(t, 3))
    imp = [round(_timed([sys.executable, "-c", "import woolly.cli; print(1)"], env)[0], 3) for _ in range(a.runs)]
    print(json.dumps({"model": a.model, "residency": a.residency, "cold": a.cold, "first_token_s": first,
                      "exit_s": total, "import_woolly_cli_s": imp, "median_first_token_s": sorted(first)[len(first) // 2]}))


if __name__ == "__main__":
    main()
