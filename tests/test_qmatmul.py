"""woolly.ops.qmatmul: exact dequantization for every block format, linear() against numpy
for both residencies and both code paths (CPU kernel, pure XLA), embed_rows, resident bytes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support.isa import isa_products
from woolly.formats.quants import QuantizationType as Q
from woolly.formats.quants import dequantize
from woolly.ops import qmatmul as qm

BLOCK_FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]

# Byte ranges of each format's f16 super-scales (d, dmin): set to finite values so random
# blocks decode to finite weights; every other byte stays random.
_F16_FIELDS = {
    Q.Q4_0: [(0, 2)], Q.Q4_1: [(0, 2), (2, 4)], Q.Q5_0: [(0, 2)], Q.Q5_1: [(0, 2), (2, 4)],
    Q.Q8_0: [(0, 2)], Q.Q2_K: [(80, 82), (82, 84)], Q.Q3_K: [(108, 110)],
    Q.Q4_K: [(0, 2), (2, 4)], Q.Q5_K: [(0, 2), (2, 4)], Q.Q6_K: [(208, 210)],
}


def random_raw(qtype: Q, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    O, I = shape
    n = O * I // qtype.block_size
    raw = rng.integers(0, 256, (n, qtype.type_size), dtype=np.uint8)
    for a, b in _F16_FIELDS[qtype]:
        d = (rng.standard_normal(n) * 0.05).astype(np.float16)
        raw[:, a:b] = d.view(np.uint8).reshape(n, 2)
    return raw.reshape(-1)


def _shapes(qtype: Q):
    bs = qtype.block_size
    # an even row count (nibble formats pack row pairs) and an odd one (they fall back to int8)
    return [(6, 2 * bs), (5, bs)]


@pytest.fixture(params=["kernel", "xla"])
def path(request, monkeypatch):
    """Run a test through the CPU kernel (where it builds) and through pure XLA."""
    if request.param == "kernel":
        if not qm.kernel_available():
            pytest.skip(f"CPU kernel unavailable: {qm.kernel_error()}")
    else:
        monkeypatch.setattr(qm, "kernel_available", lambda: False)
    jax.clear_caches()   # jit caches traces per function: a trace made on the other path must not be reused
    return request.param


@pytest.mark.parametrize("qtype", BLOCK_FORMATS, ids=lambda t: t.name)
def test_quantized_weight_dequantizes_exactly(qtype):
    for shape in _shapes(qtype):
        raw = random_raw(qtype, shape)
        ref = dequantize(raw, qtype, shape)
        w = qm.prepare_weight(raw, qtype, shape, "quantized")
        assert isinstance(w, qm.QuantizedWeight)
        assert w.shape == shape
        got = np.asarray(jax.jit(lambda w: w.dequantize())(w))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref)
        dense = qm.prepare_weight(raw, qtype, shape, "dense")
        np.testing.assert_array_equal(np.asarray(dense), ref)


@pytest.mark.parametrize("qtype", BLOCK_FORMATS, ids=lambda t: t.name)
def test_kernel_dequantize_is_exact(qtype):
    if not qm.kernel_available():
        pytest.skip(f"CPU kernel unavailable: {qm.kernel_error()}")
    for shape in _shapes(qtype):
        raw = random_raw(qtype, shape, seed=7)
        w = qm.prepare_weight(raw, qtype, shape, "quantized")
        got = np.asarray(jax.jit(qm._kernel_dequantize)(w))
        np.testing.assert_array_equal(got, dequantize(raw, qtype, shape))


def test_nibble_packing_is_used_for_4bit_formats():
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q3_K, Q.Q2_K):
        shape = (4, qtype.block_size)
        w = qm.prepare_weight(random_raw(qtype, shape), qtype, shape, "quantized")
        assert w.kind == "nib" and w.q.dtype == jnp.uint8 and w.q.shape == (2, shape[1])
    for qtype in (Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q5_K, Q.Q6_K):
        shape = (4, qtype.block_size)
        w = qm.prepare_weight(random_raw(qtype, shape), qtype, shape, "quantized")
        assert w.kind == "i8" and w.q.dtype == jnp.int8


@pytest.fixture(params=["q8", "f32"])
def activations(request, monkeypatch):
    """Both ways the kernel multiplies quantized weights (int8 or f32 activations)."""
    monkeypatch.setattr(qm, "ACTIVATIONS", request.param)
    jax.clear_caches()
    return request.param


def _check_linear(x: np.ndarray, W: np.ndarray, y: np.ndarray, w=None):
    """y == x @ W.T within float32 rounding of the sum (bound by |x| @ |W|.T); where the kernel
    rounds activations to int8 for `w`, x is first rounded the same way (`q8_activations`)."""
    if w is not None and qm.uses_q8_activations(w, x.shape[0], x.shape[1]):
        x = qm.q8_activations(x)
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    ref = x64 @ W64.T
    scale = np.abs(x64) @ np.abs(W64).T
    err = np.abs(y.astype(np.float64) - ref)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(err <= 1e-5 * scale + 1e-30), f"max rel err {np.max(err / (scale + 1e-30)):.3g}"


@pytest.mark.parametrize("qtype", BLOCK_FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("residency", qm.RESIDENCIES)
def test_linear_matches_numpy(qtype, residency, path, activations):
    rng = np.random.default_rng(1)
    for shape in _shapes(qtype):
        raw = random_raw(qtype, shape, seed=2)
        W = dequantize(raw, qtype, shape)
        w = qm.prepare_weight(raw, qtype, shape, residency)
        f = jax.jit(qm.linear)
        for rows in (1, 3, 8, 21, qm.KERNEL_MAX_ROWS + 4):   # 21: 8+8+4+1 row blocks; last: GEMM path
            x = rng.standard_normal((rows, shape[1])).astype(np.float32)
            _check_linear(x, W, np.asarray(f(x, w)), w)
        x = rng.standard_normal((2, 1, shape[1])).astype(np.float32)   # leading dims [B, T]
        y = np.asarray(f(x, w))
        assert y.shape == (2, 1, shape[0])
        _check_linear(x.reshape(2, -1), W, y.reshape(2, -1), w)


def test_linear_real_sizes(path, activations):
    """A decode-sized matrix (several threads' worth of rows) through each path."""
    rng = np.random.default_rng(3)
    for qtype, shape in ((Q.Q4_1, (1536, 576)), (Q.Q6_K, (640, 2048)), (Q.Q8_0, (2048, 640))):
        raw = random_raw(qtype, shape, seed=4)
        W = dequantize(raw, qtype, shape)
        for residency in qm.RESIDENCIES:
            w = qm.prepare_weight(raw, qtype, shape, residency)
            for rows in (1, 8):
                x = rng.standard_normal((rows, shape[1])).astype(np.float32)
                _check_linear(x, W, np.asarray(jax.jit(qm.linear)(x, w)), w)


def test_linear_under_vmap(path, activations):
    qtype, shape = Q.Q4_K, (8, 256)
    raw = random_raw(qtype, shape)
    W = dequantize(raw, qtype, shape)
    w = qm.prepare_weight(raw, qtype, shape, "quantized")
    x = np.random.default_rng(5).standard_normal((3, 2, 256)).astype(np.float32)
    y = np.asarray(jax.jit(jax.vmap(qm.linear, in_axes=(0, None)))(x, w))
    _check_linear(x.reshape(6, -1), W, y.reshape(6, -1), w)


@pytest.mark.parametrize("qtype", BLOCK_FORMATS, ids=lambda t: t.name)
def test_embed_rows(qtype):
    for shape in _shapes(qtype):
        raw = random_raw(qtype, shape, seed=6)
        W = dequantize(raw, qtype, shape)
        ids = np.array([[0, shape[0] - 1, shape[0] // 2], [1, shape[0] // 2 - 1, 0]], np.int32)
        for residency in qm.RESIDENCIES:
            w = qm.prepare_weight(raw, qtype, shape, residency)
            got = np.asarray(jax.jit(qm.embed_rows)(w, jnp.asarray(ids)))
            np.testing.assert_array_equal(got, W[ids])


def test_resident_nbytes_counts_every_leaf():
    qtype, shape = Q.Q4_1, (8, 64)
    w = qm.prepare_weight(random_raw(qtype, shape), qtype, shape, "quantized")
    # nibbles: 4 bits a weight; f32 scale and bias per 32 weights
    assert qm.resident_nbytes(w) == 8 * 64 // 2 + 2 * 4 * (8 * 64 // 32)
    assert qm.resident_nbytes(qm.prepare_weight(random_raw(qtype, shape), qtype, shape, "dense")) == 8 * 64 * 4
    assert qm.resident_nbytes({"a": [w, w]}) == 2 * qm.resident_nbytes(w)


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_quantized_residency_under_twice_the_file(name):
    from woolly.model_file import Model

    m = Model.from_file(name)
    total = 0
    for tname, info in m.tensors.items():
        w = qm.prepare_weight(m.raw(tname), info.qtype, tuple(info.shape), "quantized")
        total += qm.resident_nbytes(w)
        del w
    file_size = m.metadata.file_size
    print(f"{name}: resident {total / 1e6:.1f} MB, file {file_size / 1e6:.1f} MB, ratio {total / file_size:.2f}")
    assert total <= 2 * file_size


def test_zero_rows_are_skipped_exactly(path, activations):
    """Rows of x that are all zero (idle slots, padding) give zero rows; the others are as if alone."""
    rng = np.random.default_rng(9)
    for qtype, residency in ((Q.Q4_1, "quantized"), (Q.Q8_0, "quantized"), (Q.Q4_K, "dense")):
        shape = (64, 256)
        raw = random_raw(qtype, shape, seed=3)
        w = qm.prepare_weight(raw, qtype, shape, residency)
        x = rng.standard_normal((8, 256)).astype(np.float32)
        x[[1, 2, 5, 7]] = 0.0
        f = jax.jit(qm.linear)
        y = np.asarray(f(x, w))
        assert not y[[1, 2, 5, 7]].any()
        for r in (0, 3, 4, 6):
            alone = np.asarray(f(x[r:r + 1], w))[0]
            np.testing.assert_allclose(y[r], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
        assert not np.asarray(f(np.zeros((3, 256), np.float32), w)).any()
        tail = x.copy()
        tail[[1, 2]] = x[[0, 3]]
        tail[3:] = 0.0   # a padded prompt: live rows first, then zeros (multiplied in place)
        y = np.asarray(f(tail, w))
        assert not y[3:].any()
        np.testing.assert_allclose(y[:3], np.asarray(f(tail[:3], w)), rtol=1e-5, atol=1e-5 * np.abs(y).max())


# -- the grouped layout (16 rows per dword column; what the kernel's int8 path reads) ------------

GROUPED_FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0, Q.Q6_K, Q.Q5_0]   # nibble pairs and int8 codes


@pytest.mark.parametrize("qtype", GROUPED_FORMATS, ids=lambda t: t.name)
def test_grouped_layout_reads_as_the_plain_one(qtype):
    """Every reader of a grouped weight sees the plain weight: its plain() arrays, dequantize
    (jnp and kernel), embedding rows, and linear() with f32 activations (bit for bit) and with
    int8 activations (within the rounding of the sum)."""
    shape = (64, 256)
    raw = random_raw(qtype, shape, seed=4)
    W = dequantize(raw, qtype, shape)
    g = qm.prepare_weight(raw, qtype, shape, "quantized", grouped=True)
    p = qm.prepare_weight(raw, qtype, shape, "quantized", grouped=False)
    assert g.grouped and not p.grouped and g.kind == p.kind and g.q.shape == p.q.shape
    assert not np.array_equal(np.asarray(g.q), np.asarray(p.q))          # the bytes really moved
    back = g.plain()
    for a, b in ((back.q, p.q), (back.scale, p.scale), (back.bias, p.bias)):
        assert (a is None and b is None) or np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(g.dequantize()), W)
    ids = jnp.asarray([[0, 63, 17], [31, 32, 5]])
    np.testing.assert_array_equal(np.asarray(qm.embed_rows(g, ids)), W[np.asarray(ids)])
    if not qm.kernel_available():
        return
    np.testing.assert_array_equal(np.asarray(qm._kernel_dequantize(g)), W)
    x = np.random.default_rng(5).standard_normal((11, 256)).astype(np.float32)
    for act in ("f32", "q8"):
        jax.clear_caches()
        old, qm.ACTIVATIONS = qm.ACTIVATIONS, act
        try:
            yg, yp = np.asarray(qm._kernel_call(jnp.asarray(x), g)), np.asarray(qm._kernel_call(jnp.asarray(x), p))
        finally:
            qm.ACTIVATIONS = old
        if act == "f32":
            np.testing.assert_array_equal(yg, yp)
        else:
            _check_linear(qm.q8_activations(x), W, yg)
    jax.clear_caches()


def test_grouped_layout_only_where_the_shape_allows():
    raw = random_raw(Q.Q4_1, (48, 256))            # 24 row pairs: not a whole number of groups
    assert not qm.prepare_weight(raw, Q.Q4_1, (48, 256), "quantized", grouped=True).grouped
    raw = random_raw(Q.Q8_0, (32, 96))             # I % 64 != 0
    assert not qm.prepare_weight(raw, Q.Q8_0, (32, 96), "quantized", grouped=True).grouped
    if qm.kernel_available() and qm.uses_q8_activations(qm.prepare_weight(random_raw(Q.Q8_0, (32, 256)), Q.Q8_0,
                                                                           (32, 256), "quantized"), 1, 256):
        assert qm.prepare_weight(random_raw(Q.Q8_0, (32, 256)), Q.Q8_0, (32, 256), "quantized").grouped


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
def test_grouped_rows_do_not_depend_on_the_batch(qtype):
    """A row's result is bit for bit the same alone and in batches of any size (what makes
    "same seed, same text, alone or batched" hold with int8 activations)."""
    if not qm.kernel_available():
        pytest.skip(f"CPU kernel unavailable: {qm.kernel_error()}")
    shape = (64, 512)
    w = qm.prepare_weight(random_raw(qtype, shape, seed=6), qtype, shape, "quantized", grouped=True)
    x = np.random.default_rng(7).standard_normal((21, 512)).astype(np.float32)
    f = jax.jit(qm.linear)
    whole = np.asarray(f(x, w))
    for lo, hi in ((0, 1), (3, 4), (20, 21), (2, 9), (5, 8), (0, 13)):
        np.testing.assert_array_equal(np.asarray(f(x[lo:hi], w)), whole[lo:hi])


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_fused_rows_give_each_weight_s_output_bit_for_bit(qtype):
    """fuse_rows (wq/wk/wv as one matrix, w_gate/w_up as one): the fused product, split, is
    each weight's own product exactly, at 1, 8 and 96 rows (4-bit row pairs re-paired)."""
    shapes = [(96, 256), (32, 256), (32, 256)]
    parts = [qm.prepare_weight(random_raw(qtype, s, seed=11 + i), qtype, s, "quantized", grouped=False)
             for i, s in enumerate(shapes)]
    fused = qm.fuse_rows(parts)
    assert fused is not None and fused.grouped and fused.shape == (160, 256)
    np.testing.assert_array_equal(np.asarray(fused.dequantize()),
                                  np.concatenate([np.asarray(p.dequantize()) for p in parts]))
    f = jax.jit(qm.linear)
    x = np.random.default_rng(12).standard_normal((96, 256)).astype(np.float32)
    for rows in (1, 8, 96):
        y = np.asarray(f(x[:rows], fused))
        alone = [np.asarray(f(x[:rows], qm.grouped_where_possible(p))) for p in parts]
        np.testing.assert_array_equal(y, np.concatenate(alone, axis=1))
    for back, p in zip(qm.split_rows(fused, [s[0] for s in shapes]), parts):   # what sharding does
        assert not back.grouped and (back.kind, back.sub, back.off) == (p.kind, p.sub, p.off)
        for a, b in ((back.q, p.q), (back.scale, p.scale), (back.bias, p.bias)):
            assert (a is None and b is None) or np.array_equal(np.asarray(a), np.asarray(b))


def test_rows_of_different_formats_or_layouts_are_not_fused():
    a = qm.prepare_weight(random_raw(Q.Q4_K, (32, 256)), Q.Q4_K, (32, 256), "quantized", grouped=False)
    b = qm.prepare_weight(random_raw(Q.Q6_K, (32, 256)), Q.Q6_K, (32, 256), "quantized", grouped=False)
    assert qm.fuse_rows([a, b]) is None                                   # 4-bit pairs and int8 codes
    assert qm.fuse_rows([a, qm.group_layout(a)]) is None                  # already grouped
    c = qm.prepare_weight(random_raw(Q.Q4_K, (32, 512)), Q.Q4_K, (32, 512), "quantized", grouped=False)
    assert qm.fuse_rows([a, c]) is None                                   # another width
    assert qm.fuse_rows([a, jnp.zeros((32, 256))]) is None                # not quantized


# The CPU kernels built for another instruction set (cpu_kernels.isa): a child process per
# build (the choice is made once per process), each computing the same products.
_ISA_CHILD = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from test_qmatmul import random_raw
from woolly.formats.quants import QuantizationType as Q
from woolly.ops import cpu_kernels, qmatmul as qm
out = {"isa": np.array(cpu_kernels.isa()), "ok": np.array(qm.kernel_available())}
rng = np.random.default_rng(1)
# every (kind, sub, bias) of the kernel: nibbles 32 (Q4_0, Q4_K), nibbles 16 (Q3_K, Q2_K), int8
# 32 (Q8_0, Q5_K), int8 16 (Q6_K; with a bias only hand-made), grouped and in plain rows
ws = {}
for qt in (Q.Q4_0, Q.Q4_K, Q.Q3_K, Q.Q2_K, Q.Q8_0, Q.Q5_K, Q.Q6_K):
    for grouped in (True, False):
        ws[f"{qt.name}-{'g' if grouped else 'p'}"] = qm.prepare_weight(random_raw(qt, (64, 256)), qt, (64, 256),
                                                                       "quantized", grouped=grouped)
codes = jnp.asarray(rng.integers(-128, 128, (64, 256)), jnp.int8)
sc, bs = (jnp.asarray(rng.standard_normal((64, 16)) * 0.05, jnp.float32) for _ in range(2))
ws["i8-16-bias-p"] = qm.QuantizedWeight(codes, sc, bs, "i8", 16, 0)
ws["i8-16-bias-g"] = qm.group_layout(ws["i8-16-bias-p"])
assert ws["i8-16-bias-g"].grouped and ws["Q4_K-g"].grouped and not ws["Q4_K-p"].grouped
# decode, batches (each pass size, remainders), a prefill chunk, one past KERNEL_MAX_ROWS (dequantize)
ROWS = (1, 2, 3, 4, 5, 8, 17, 96, 600)
xs = {rows: rng.standard_normal((rows, 256)).astype(np.float32) for rows in ROWS}
x8z = xs[8].copy()
x8z[[2, 5]] = 0   # zero rows in the middle: the live rows multiplied as a compact block
x17z = xs[17].copy()
x17z[9:] = 0      # a zero tail: the live head in place
for act in ("q8", "f32"):
    qm.ACTIVATIONS = act
    jax.clear_caches()
    for name, w in ws.items():
        if act == "f32" and not name.endswith("-g"):
            continue
        for rows in ROWS:
            out[f"{act}-{name}-{rows}"] = np.asarray(qm.linear(jnp.asarray(xs[rows]), w))
        out[f"{act}-{name}-8z"] = np.asarray(qm.linear(jnp.asarray(x8z), w))
        out[f"{act}-{name}-17z"] = np.asarray(qm.linear(jnp.asarray(x17z), w))
        out[f"{name}-deq"] = np.asarray(qm._kernel_dequantize(w))
w = jnp.asarray(rng.standard_normal((48, 128)), jnp.float32)
out["dense"] = np.asarray(qm.linear(jnp.asarray(rng.standard_normal((4, 128)), jnp.float32), w))
np.savez(sys.argv[1], **out)
"""


@pytest.mark.parametrize("isa", ["avx2", pytest.param("portable", marks=pytest.mark.slow)])
def test_kernel_builds_for_other_isas_give_the_default_s_results(tmp_path, isa):
    """AVX-512 switched off (AVX2 through SIMDe) or no vector ISA at all: the kernels still
    build and run. AVX2 equals the default build bit for bit; the scalar build sums in another
    order (no vector FMA) and can round an int8 activation the other way: measured 2.2e-4 relative
    at most (q8 x Q6_K), far below any real disagreement; near cancellation that is relative to
    the product's scale (measured 2.2e-6 of its largest magnitude, allowed 1e-5)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the AVX2 build is an x86-64 one")
    if not qm.kernel_available():
        pytest.skip(f"CPU kernel unavailable: {qm.kernel_error()}")
    base, other = (isa_products(_ISA_CHILD, tmp_path, i, timeout=600) for i in ("auto", isa))
    assert str(other.pop("isa")) == isa and bool(other.pop("ok")), "the kernel did not build for " + isa
    base.pop("isa"), base.pop("ok")
    assert base.keys() == other.keys()
    for k in base:
        if isa == "portable":
            atol = max(2e-3, 1e-5 * float(np.abs(base[k]).max()))
            np.testing.assert_allclose(other[k], base[k], rtol=1e-3, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(other[k], base[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qmatvec", "attention"])
def test_kernels_cross_compile_for_arm64_neon(tmp_path, name):
    """The portable build compiles for ARM64 (NEON) where a cross compiler is installed
    (Debian: g++-aarch64-linux-gnu); running it needs an ARM machine."""
    import os
    import shutil
    import subprocess

    import simde_py

    from woolly.ops import cpu_kernels
    cxx = shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        pytest.skip("no aarch64-linux-gnu-g++")
    out = tmp_path / f"{name}.so"
    r = subprocess.run([cxx, *cpu_kernels.FLAGS, "-march=armv8.2-a+dotprod", "-DWOOLLY_PORTABLE",
                        f"-I{simde_py.get_include()}", f"-I{jax.ffi.include_dir()}", f"-I{cpu_kernels.KERNEL_DIR}",
                        os.path.join(cpu_kernels.KERNEL_DIR, f"{name}.cc"), "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes()[18] == 183   # ELF e_machine EM_AARCH64
