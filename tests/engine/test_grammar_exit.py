"""A process that exits while the grammar vocabulary is being built in the background exits cleanly.

`Engine.load_model` starts llguidance's vocabulary build once the engine has been idle
`grammar.QUIET_S`; a daemon thread still inside that build when Python finalized crashed the
process (a segfault, or "FATAL: exception not rethrown"). `grammar._stop_preparing` waits for it.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.real

CHILD = """
import sys, time
from woolly.engine import Engine, EngineConfig, grammar
e = Engine(EngineConfig(max_batch_size=1, max_sequence_length=256))
e.load_model("smollm2-135m-instruct")
time.sleep(grammar.QUIET_S + float(sys.argv[1]))   # the background build is under way (or about to be)
print("EXITING", flush=True)
"""


@pytest.mark.parametrize("after", [0.0, 0.02, 0.05])
def test_exit_during_the_background_vocabulary_build_is_clean(smollm2_path, after):
    r = subprocess.run([sys.executable, "-c", CHILD, str(after)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "FATAL" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip().endswith("EXITING")
