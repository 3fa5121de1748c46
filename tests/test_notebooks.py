"""Both notebooks run top to bottom on the real SmolLM2 (nbclient), so they cannot rot.

Their cells assert what they show (seeded reproducibility, the session's cache reuse, the
logit lens ending at the model's output, vmap agreeing with single prompts); any failing cell
fails the test. The committed notebooks carry no outputs."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.real

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "research.ipynb"])
def test_notebook_runs(name, smollm2_path, tmp_path):
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "commit notebooks cleared"
    # the kernel inherits os.environ: WOOLLY_COMPILE_CACHE (conftest) shares compiled code between runs
    assert os.environ.get("WOOLLY_COMPILE_CACHE")
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(o.get("text") for c in code for o in c.outputs)


def test_the_forward_pass_is_differentiable_for_few_rows(tmp_path):
    """What the research notebook needs without its WOOLLY_QMATMUL_KERNEL=0 line: jax.grad through
    forward_hidden on a short prompt (<= 16 rows takes the CPU matmul kernel, a custom call)."""
    import jax
    import jax.numpy as jnp

    from tiny_models import write_tiny_model
    from woolly.model_file import Model
    from woolly.models import forward_hidden, output_logits
    from woolly.runtime import load_params, new_cache

    model = Model.from_file(write_tiny_model(tmp_path / "tiny.gguf", arch="llama"))
    cfg, params = model.config, load_params(model)
    tokens = jnp.arange(1, 5, dtype=jnp.int32)[None]
    positions = jnp.arange(4, dtype=jnp.int32)[None]

    def loss(p):
        h, _ = forward_hidden(p, tokens, positions, new_cache(cfg, 1, 4), cfg)
        return jax.nn.log_softmax(output_logits(p, h[0, -1]))[7]
    grads = jax.grad(loss)(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["output_norm"]).sum()) > 0
