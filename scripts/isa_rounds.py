"""The driver the kernel-per-ISA timing scripts share (probe_isa.py, bench_attention_isa.py,
bench_decode_attention_isa.py): each variant is a child process with its WOOLLY_CPU_ISA (the
build is chosen once per process; "avx2" also holds XLA to AVX2), the variants run round-robin
so every one sees the same machine load, and each key's median over the rounds is returned."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def rounds(child: str, variants: list[tuple[str, str, list[str]]], n: int, field: str,
           xla_flags: str = "", timeout: float = 1800) -> dict[str, dict[str, float]]:
    """variants: (name, WOOLLY_CPU_ISA, the child's argv); the child prints one JSON line last with
    {"isa": ..., field: {key: value}} -> {name: {key: median value}}."""
    got: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for r in range(n):
        for name, isa, argv in variants:
            flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), xla_flags,
                                         "--xla_cpu_max_isa=AVX2" if isa == "avx2" else "") if f)
            env = dict(os.environ, WOOLLY_CPU_ISA=isa, PYTHONPATH=ROOT, XLA_FLAGS=flags)
            out = subprocess.run([sys.executable, "-c", child, *argv], env=env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=timeout)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            last = json.loads(out.stdout.strip().splitlines()[-1])
            assert isa == "auto" or last["isa"] == isa, f"{name}: the child built for {last['isa']}, not {isa}"
            got[name].append(last[field])
            print(f"round {r} {name}: {got[name][-1]}", file=sys.stderr)
    keys = list(got[variants[0][0]][0])
    return {name: {k: statistics.median(run[k] for run in runs) for k in keys} for name, runs in got.items()}
