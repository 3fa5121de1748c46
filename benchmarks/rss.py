"""Whole-process memory of an idle `woolly serve` vs llama.cpp holding the same GGUF file.

    python benchmarks/rss.py [MODEL] [--residency quantized|dense] [--kv-cache-type f16|f32|bf16]
                             [--slots 4] [--ctx 2048]

Woolly: `python -m woolly.cli serve MODEL` on a free port; once /health answers, VmRSS of the
server and all its descendants (/proc/PID/status), after a few seconds' settling. llama.cpp:
llama-cpp-python's `Llama(MODEL, n_ctx=slots * ctx)` (llama-server's -np SLOTS -c SLOTS*CTX:
the same KV positions) in a fresh process, its VmRSS after loading. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

MB = 1 << 20


def rss_tree(pid: int) -> int:
    """VmRSS bytes of `pid` and every descendant."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def woolly_rss(model: str, residency: str, kv: str, timeout: float = 600) -> int:
    """The server at its configured inference.max_batch_size x max_sequence_length (4 x 2048 by default)."""
    port = free_port()
    env = dict(os.environ, WOOLLY_KV_CACHE_TYPE=kv)
    cmd = [sys.executable, "-m", "woolly.cli", "serve", model, "--port", str(port), "--residency", residency]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"woolly serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("woolly serve did not become healthy")
            time.sleep(0.5)
        time.sleep(3)   # idle: let start-up work settle
        return rss_tree(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


_LLAMA = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False)
with open("/proc/self/status") as f:
    print(next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:")))
"""


def llama_rss(path: str, n_ctx: int) -> int:
    out = subprocess.run([sys.executable, "-c", _LLAMA, path, str(n_ctx)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--residency", default="quantized", choices=("dense", "quantized"))
    ap.add_argument("--kv-cache-type", default="f16", choices=("f32", "f16", "bf16"))
    ap.add_argument("--slots", type=int, default=4, help="llama.cpp's sequences: woolly's max_batch_size")
    ap.add_argument("--ctx", type=int, default=2048, help="tokens per sequence: woolly's max_sequence_length")
    a = ap.parse_args()
    from woolly.model_store import resolve_model_path
    path = str(resolve_model_path(a.model))
    w = woolly_rss(a.model, a.residency, a.kv_cache_type)
    ll = llama_rss(path, a.slots * a.ctx)
    print(json.dumps({"model": a.model, "residency": a.residency, "kv_cache_type": a.kv_cache_type, "slots": a.slots,
                      "ctx": a.ctx, "woolly_rss_mb": round(w / MB, 1), "llama_cpp_rss_mb": round(ll / MB, 1),
                      "ratio": round(w / ll, 2), "file_mb": round(os.path.getsize(path) / MB, 1)}))


if __name__ == "__main__":
    main()
