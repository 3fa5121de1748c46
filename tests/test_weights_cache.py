"""The prepared-weights cache (woolly/runtime/weights_cache.py): a second load reads what the
first prepared, bit for bit, and a changed file, a damaged entry or new code never reads stale
weights."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tiny_models import write_tiny_model
from woolly.model_file import Model
from woolly.ops.quantized_weight import QuantizedWeight
from woolly.runtime import Runner, weights_cache
from woolly.runtime.params import load_params


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "weights"
    monkeypatch.setenv("WOOLLY_WEIGHTS_CACHE", str(root))
    monkeypatch.setattr(weights_cache, "MIN_FILE_BYTES", 0)   # tiny files are cached too, here
    return root


def _tiny(tmp_path, arch="llama", seed=0):
    return Model.from_file(write_tiny_model(tmp_path / f"{arch}-{seed}.gguf", arch=arch, qtype="Q4_1", seed=seed,
                                            n_layers=2))


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb   # same dicts, lists, QuantizedWeight kinds / layouts (meta fields are in the treedef)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _read_count(monkeypatch):
    calls = {"hit": 0}
    real = weights_cache.read

    def read(key):
        out = real(key)
        calls["hit"] += out is not None
        return out
    monkeypatch.setattr(weights_cache, "read", read)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_second_load_reads_the_same_weights(tmp_path, cache, monkeypatch, arch):
    model = _tiny(tmp_path, arch)
    calls = _read_count(monkeypatch)
    fresh = load_params(model, "quantized")                  # no cache asked: nothing written
    assert not cache.exists()
    first = load_params(model, "quantized", cache=True)      # prepares and writes
    assert calls["hit"] == 0 and len(list(cache.glob("*.json"))) == 1 and len(list(cache.glob("*.bin"))) == 1
    second = load_params(model, "quantized", cache=True)     # reads
    assert calls["hit"] == 1
    _assert_same(fresh, first)
    _assert_same(fresh, second)
    assert any(isinstance(w, QuantizedWeight) for w in jax.tree_util.tree_leaves(
        second, is_leaf=lambda x: isinstance(x, QuantizedWeight)))
    # and the model runs the same from them
    out = [np.asarray(Runner(model, "quantized", params=p, slots=1, cache_length=32).prefill([3, 5, 7, 9]))
           for p in (fresh, second)]
    np.testing.assert_array_equal(out[0], out[1])


def test_runner_uses_the_cache_only_with_the_compile_cache(tmp_path, cache, monkeypatch):
    model = _tiny(tmp_path)
    Runner(model, "quantized", slots=1, cache_length=32, compile_cache=False)
    assert not cache.exists()
    monkeypatch.setenv("WOOLLY_COMPILE_CACHE", str(tmp_path / "jax"))
    Runner(model, "quantized", slots=1, cache_length=32)
    assert len(list(cache.glob("*.json"))) == 1
    load_params(model, "dense", cache=True)                  # dense weights are never cached
    assert len(list(cache.glob("*.json"))) == 1


def test_a_changed_file_is_prepared_again(tmp_path, cache, monkeypatch):
    a, b = _tiny(tmp_path, seed=1), _tiny(tmp_path, seed=2)
    path = a.path
    load_params(a, "quantized", cache=True)
    a.close()
    # the same path now holds other weights (written elsewhere, moved over it: new size or mtime)
    os.replace(b.path, path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed = Model.from_file(path)
    calls = _read_count(monkeypatch)
    got = load_params(changed, "quantized", cache=True)
    assert calls["hit"] == 0
    _assert_same(load_params(changed, "quantized"), got)
    assert len(list(cache.glob("*.bin"))) == 1               # the old entry's data went with it
    load_params(changed, "quantized", cache=True)
    assert calls["hit"] == 1


@pytest.mark.parametrize("damage", ["truncate", "index", "key"])
def test_a_damaged_entry_is_not_read(tmp_path, cache, monkeypatch, damage):
    model = _tiny(tmp_path)
    want = load_params(model, "quantized", cache=True)
    index = next(cache.glob("*.json"))
    if damage == "truncate":
        data = next(cache.glob("*.bin"))
        os.truncate(data, os.path.getsize(data) // 2)
    elif damage == "index":
        index.write_text(index.read_text()[:100])
    else:   # written by other code (another Woolly version's preparation)
        entry = json.loads(index.read_text())
        entry["key"]["code"] = "0" * 32
        index.write_text(json.dumps(entry))
    calls = _read_count(monkeypatch)
    _assert_same(want, load_params(model, "quantized", cache=True))
    assert calls["hit"] == 0
    _assert_same(want, load_params(model, "quantized", cache=True))   # rewritten whole
    assert calls["hit"] == 1


def test_turned_off_and_unwritable(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_cache, "MIN_FILE_BYTES", 0)
    model = _tiny(tmp_path)
    monkeypatch.setenv("WOOLLY_WEIGHTS_CACHE", "0")
    load_params(model, "quantized", cache=True)
    assert weights_cache.cache_dir() is None
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("WOOLLY_WEIGHTS_CACHE", str(blocker / "weights"))
    _assert_same(load_params(model, "quantized"), load_params(model, "quantized", cache=True))


def test_small_files_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("WOOLLY_WEIGHTS_CACHE", str(tmp_path / "weights"))
    model = _tiny(tmp_path)
    assert os.path.getsize(model.path) < weights_cache.MIN_FILE_BYTES
    load_params(model, "quantized", cache=True)
    assert not (tmp_path / "weights").exists()
