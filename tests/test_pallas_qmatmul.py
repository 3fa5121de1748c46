"""woolly.ops.pallas_qmatmul on CPU: the Pallas kernel in interpret mode against the numpy
reference (gguf bytes -> `quants.dequantize` -> x @ W.T in float64) for every block format,
both kernel paths (GEMV rows <= 8, tiled dot above), bf16 activations, jax.grad, the shapes it
refuses, and its Triton lowering (to Triton IR, no GPU needed). On a GPU backend the same
tests run the kernel natively."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_qmatmul import random_raw
from woolly.formats.quants import QuantizationType as Q
from woolly.formats.quants import dequantize
from woolly.ops import qmatmul as qm
from woolly.ops.pallas_qmatmul import GEMV_MAX_ROWS, pallas_linear, pallas_supported

INTERPRET = jax.default_backend() != "gpu"
FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ROWS = (1, 3, 16)          # 1 and 3: GEMV path; 16: tiled dot (> GEMV_MAX_ROWS)
assert ROWS[1] <= GEMV_MAX_ROWS < ROWS[2]


def _shape(qtype: Q) -> tuple[int, int]:
    # several output tiles (and both nibble halves), several K steps (BK <= 128)
    return (96, 96) if qtype.block_size == 32 else (64, 512)


def _run(x, w, **kw):
    return np.asarray(jax.jit(lambda x, w: pallas_linear(x, w, interpret=INTERPRET, **kw))(x, w))


def _check(x: np.ndarray, W: np.ndarray, y: np.ndarray, rtol: float = 1e-5):
    """y == x @ W.T within rtol of the sum's magnitude |x| @ |W|.T (float64 reference)."""
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    ref = x64 @ W64.T
    scale = np.abs(x64) @ np.abs(W64).T
    err = np.abs(y.astype(np.float64) - ref)
    assert y.shape == ref.shape
    assert np.all(err <= rtol * scale + 1e-30), f"max rel err {np.max(err / (scale + 1e-30)):.3g}"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_pallas_linear_matches_numpy(qtype):
    shape = _shape(qtype)
    raw = random_raw(qtype, shape, seed=11)
    W = dequantize(raw, qtype, shape)
    w = qm.prepare_weight(raw, qtype, shape, "quantized", grouped=False)
    assert pallas_supported(w, shape[1])
    rng = np.random.default_rng(12)
    for rows in ROWS:
        x = rng.standard_normal((rows, shape[1])).astype(np.float32)
        y = _run(x, w)
        assert y.dtype == np.float32
        _check(x, W, y)


@pytest.mark.parametrize("kind,sub,bias,off", [
    ("nib", 32, False, 8), ("nib", 16, True, 0), ("nib", 16, False, 5),
    ("i8", 32, True, 3), ("i8", 16, False, 0), ("i8", 16, True, -2),
])
def test_every_layout(kind, sub, bias, off):
    """Each layout the kernel reads, with any code offset, against the affine form in numpy."""
    rng = np.random.default_rng(13)
    O, I = (64, 64) if kind == "nib" else (48, 64)      # 48 rows: three 16-row tiles
    if kind == "nib":
        codes = rng.integers(0, 16, (O, I))
        q = (codes[: O // 2] | (codes[O // 2:] << 4)).astype(np.uint8)
    else:
        codes = rng.integers(-128, 128, (O, I))
        q = codes.astype(np.int8)
    scale = rng.standard_normal((O, I // sub)).astype(np.float32) * 0.01
    b = rng.standard_normal((O, I // sub)).astype(np.float32) * 0.01 if bias else None
    W = np.repeat(scale, sub, axis=1) * (codes - off).astype(np.float32)
    if bias:
        W = W + np.repeat(b, sub, axis=1)
    w = qm.QuantizedWeight(jnp.asarray(q), jnp.asarray(scale), None if b is None else jnp.asarray(b), kind, sub, off)
    np.testing.assert_array_equal(np.asarray(w.dequantize()), W)
    for rows in (2, 20):
        x = rng.standard_normal((rows, I)).astype(np.float32)
        _check(x, W, _run(x, w))


def test_leading_dims_and_bf16():
    qtype, shape = Q.Q4_K, (64, 256)
    raw = random_raw(qtype, shape, seed=14)
    W = dequantize(raw, qtype, shape)
    w = qm.prepare_weight(raw, qtype, shape, "quantized", grouped=False)
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 1, 256)).astype(np.float32)          # [B, T, I]
    y = _run(x, w)
    assert y.shape == (2, 1, 64)
    _check(x.reshape(2, -1), W, y.reshape(2, -1))
    for rows in (1, 40):                   # GEMV; dot with padded rows (BR = 64)
        xb = jnp.asarray(rng.standard_normal((rows, 256)), jnp.bfloat16)
        yb = _run(xb, w)
        assert yb.dtype == jnp.bfloat16
        # bf16 output (and bf16 weights in the dot path): within bf16 rounding
        _check(np.asarray(xb, np.float32), W, np.asarray(yb, np.float32), rtol=1e-2)


def test_grad_through_activations():
    qtype, shape = Q.Q6_K, (32, 256)
    raw = random_raw(qtype, shape, seed=16)
    W = dequantize(raw, qtype, shape).astype(np.float64)
    w = qm.prepare_weight(raw, qtype, shape, "quantized", grouped=False)
    rng = np.random.default_rng(17)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    c = rng.standard_normal((3, 32)).astype(np.float32)
    f = lambda x, w: jnp.sum(pallas_linear(x, w, interpret=INTERPRET) * c)   # noqa: E731
    val, g = jax.jit(jax.value_and_grad(f))(x, w)
    ref_val = float(np.sum((x.astype(np.float64) @ W.T) * c))
    assert abs(float(val) - ref_val) <= 1e-5 * float(np.sum(np.abs(x) @ np.abs(W).T * np.abs(c)))
    err = np.abs(np.asarray(g, np.float64) - c.astype(np.float64) @ W)
    assert np.all(err <= 1e-5 * (np.abs(c) @ np.abs(W)))


def test_supported_shapes():
    def weight(qtype, shape):
        return qm.prepare_weight(random_raw(qtype, shape), qtype, shape, "quantized", grouped=False)

    assert pallas_supported(weight(Q.Q4_0, (32, 64)), 64)
    assert pallas_supported(weight(Q.Q8_0, (16, 64)), 64)
    assert not pallas_supported(weight(Q.Q4_0, (16, 64)), 64)        # O/2 = 8 < one tile
    assert not pallas_supported(weight(Q.Q4_0, (5, 64)), 64)         # odd O: int8, 5 rows
    assert not pallas_supported(weight(Q.Q8_0, (24, 64)), 64)        # 24 not a multiple of 16
    assert not pallas_supported(weight(Q.Q8_0, (16, 64)), 32)        # I mismatch
    assert not pallas_supported(jnp.zeros((16, 64)), 64)              # dense weight
    with pytest.raises(ValueError):
        pallas_linear(jnp.zeros((1, 64)), weight(Q.Q4_0, (16, 64)), interpret=INTERPRET)
    y = pallas_linear(jnp.zeros((0, 64)), weight(Q.Q8_0, (16, 64)), interpret=INTERPRET)
    assert y.shape == (0, 16)


@pytest.mark.parametrize("qtype,shape", [(Q.Q4_1, (1536, 576)), (Q.Q6_K, (640, 2048))], ids=["nib", "i8"])
def test_triton_lowering(qtype, shape):
    """The kernel lowers through Pallas's Triton backend (Triton IR, no GPU needed), and the
    module around it holds no [O, I] float matrix: W is never materialized."""
    w = qm.prepare_weight(random_raw(qtype, shape), qtype, shape, "quantized", grouped=False)
    O, I = shape
    for rows in (1, 8, 128):
        for dt in (jnp.float32, jnp.bfloat16):
            x = jax.ShapeDtypeStruct((rows, I), dt)
            try:
                low = jax.jit(pallas_linear).trace(x, w).lower(lowering_platforms=("cuda",))
            except ValueError as e:
                if "Cannot lower pallas_call" in str(e):
                    pytest.skip(f"this jaxlib cannot lower Pallas for GPU: {e}")
                raise
            text = low.as_text()
            assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text
            for t in ("f32", "bf16"):
                assert f"tensor<{O}x{I}x{t}>" not in text
