"""A first run builds every CPU kernel at once: loading one starts the others' g++ in the
background, and a kernel whose build is under way is waited for, never compiled twice."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from woolly.ops import qmatmul

CHILD = """
import json, subprocess
from woolly.ops import attention, cpu_kernels, qmatmul
runs = []
real_run = subprocess.run
def counting_run(cmd, *a, **k):
    runs.append(cmd[-1])   # the .so each g++ writes
    return real_run(cmd, *a, **k)
subprocess.run = counting_run
ok = qmatmul.kernel_available()
started = sorted(cpu_kernels._builds)          # right after the first kernel loaded
ok = ok and attention.kernel_available()
print(json.dumps({"ok": ok, "started": started, "compiles": len(runs)}))
"""


def test_loading_one_kernel_builds_the_others_alongside(tmp_path):
    if not qmatmul.kernel_available():
        pytest.skip(f"CPU kernel unavailable: {qmatmul.kernel_error()}")
    env = dict(os.environ, WOOLLY_KERNEL_CACHE=str(tmp_path / "kernels"), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "woolly" / "ops" / "kernels").glob("*.cc"))
    assert got["ok"]
    assert got["started"] == kernels        # every build under way once the first kernel loaded
    assert got["compiles"] == len(kernels)  # each compiled once: attention's load waited for its build
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "kernels").glob("*.so")) == kernels
