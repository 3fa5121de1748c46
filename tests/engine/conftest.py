"""One Engine per test module on the real SmolLM2 (shapes in support.py)."""
import pytest

from support.engine import make_engine


@pytest.fixture(scope="module")
def engine(smollm2_path):
    e = make_engine(smollm2_path)
    yield e
    if e.current_model_name is not None:
        e.unload_model()
