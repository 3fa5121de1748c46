"""The CPU kernels built for another instruction set (`cpu_kernels.isa` is chosen once per process):
a child process per build runs a script that saves its results to the .npz path it is given."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]   # the child's working directory: it imports test modules


def isa_products(script: str, tmp_path: Path, isa: str, timeout: float) -> dict:
    """{name: array} that `script` (run as `python -c script OUT.npz`) saved under WOOLLY_CPU_ISA=isa."""
    path = tmp_path / f"{isa}.npz"
    r = subprocess.run([sys.executable, "-c", script, str(path)], env=dict(os.environ, WOOLLY_CPU_ISA=isa),
                       capture_output=True, text=True, timeout=timeout, cwd=TESTS)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(path))
