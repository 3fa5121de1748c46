"""The attention kernels (woolly/ops/kernels/attention.cc) built for AVX2 give the default
build's results bit for bit: a child process per WOOLLY_CPU_ISA (the build is chosen once per
process) computes the same attentions and cache writes, and the outputs are compared exactly.

On an AVX-512 machine "auto" is the AVX-512 build and "avx2" the 256-bit one (WOOLLY_AVX2:
its own intrinsics, each 16-lane vector as two halves, sums in the AVX-512 order).
"""
from __future__ import annotations

import os
import platform
import subprocess

import numpy as np
import pytest

from support.isa import isa_products
from woolly.ops import attention

_CHILD = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from woolly.ops import attention, cpu_kernels
out = {"isa": np.array(cpu_kernels.isa()), "ok": np.array(attention.kernel_available())}
rng = np.random.default_rng(5)
call = jax.jit(attention._kernel_call, static_argnums=(4, 5))
# (B, T, K, G, S, H, positions [B*T], window, k's spread): GQA, idle slots (-1), windows,
# positions not multiples of 16, long rows (chunked and merged across threads), H = 48 / 256
# (the runtime-H score loop), k spread 40: scores far apart, exp underflows to denormals and
# reaches the -100 clamp.
CASES = [
    (1, 1, 3, 3, 64, 64, [0], 0, 2),
    (1, 1, 3, 3, 64, 64, [17], 0, 2),
    (1, 1, 3, 3, 2048, 64, [2047], 0, 2),
    (1, 1, 3, 3, 2048, 64, [1500], 333, 2),
    (8, 1, 3, 3, 600, 64, [599, -1, 0, 15, 16, 31, 100, 513], 0, 2),
    (8, 1, 3, 3, 600, 64, [599, 300, -1, 7, 64, 577, 200, 33], 50, 2),
    (3, 1, 2, 4, 80, 64, [79, -1, 40], 0, 40),
    (3, 1, 1, 1, 80, 64, [5, 79, 1], 0, 2),
    (2, 1, 2, 2, 40, 48, [39, 3], 0, 2),
    (2, 1, 1, 5, 90, 256, [89, 44], 7, 2),
    (2, 1, 2, 3, 300, 64, [-1, -1], 0, 2),
    (2, 6, 3, 3, 48, 64, [10, 11, 12, 13, -1, -1, 0, 1, 2, 3, 4, 47], 0, 2),   # prefill-shaped
]
for dt in ("float32", "float16", "bfloat16"):
    for i, (B, T, K, G, S, H, pos, window, spread) in enumerate(CASES):
        q = jnp.asarray(rng.standard_normal((B, T, K * G, H)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((B, K, S, H)) * spread, dt)
        v = jnp.asarray(rng.standard_normal((B, K, S, H)), dt)
        positions = jnp.asarray(pos, jnp.int32).reshape(B, T)
        out[f"attend-{dt}-{i}"] = np.asarray(call(q, k, v, positions, window, H ** -0.5))
    # exp's far tail visible in the output: row 0 scores 0 and has v = 0; row r scores about
    # -80 - 0.4 r (past the -100 clamp) and has v = e_r, so out[r] = exp(score_r) / 1 (< 1e-34).
    q = np.zeros((1, 1, 1, 64), np.float32)
    q[..., 0] = 1
    k = np.zeros((1, 1, 64, 64), np.float32)
    k[0, 0, 1:, 0] = -80 - 0.4 * np.arange(1, 64)
    v = np.eye(64, dtype=np.float32)[None, None]
    v[0, 0, 0] = 0
    out[f"tail-{dt}"] = np.asarray(call(jnp.asarray(q), jnp.asarray(k, dt), jnp.asarray(v, dt),
                                        jnp.asarray([[63]], jnp.int32), 0, 1.0))
# The cache write (f16 / bf16): NaN, infinities, ties, f16 overflow and denormals, -1 and S dropped.
for dt in ("float16", "bfloat16"):
    for B, T, K, S, H in ((1, 1, 3, 64, 64), (8, 1, 3, 32, 64), (3, 5, 2, 24, 48)):
        cache = jnp.asarray(rng.standard_normal((B, K, S, H)), dt)
        new = rng.standard_normal((B, T, K, H)).astype(np.float32) * 3
        new.reshape(-1)[:8] = [np.nan, np.inf, -np.inf, 1 + 2 ** -9, 1 + 3 * 2 ** -9, 7e4, 3e-6, -1e-8]
        pos = rng.integers(-1, S + 1, (B, T)).astype(np.int32)
        out[f"write-{dt}-{B}-{T}"] = np.asarray(attention.write_cache(cache, jnp.asarray(new), jnp.asarray(pos))).view(np.uint16)
np.savez(sys.argv[1], **out)
"""


def test_avx2_build_gives_the_default_s_results_bit_for_bit(tmp_path):
    from woolly.ops import cpu_kernels
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx512f", "avx512bw"} <= cpu_kernels.cpu_flags():
        pytest.skip("needs an AVX-512 x86-64 machine (elsewhere auto is not the AVX-512 build)")
    if not attention.kernel_available():
        pytest.skip(f"attention kernel unavailable: {attention.kernel_error()}")
    base, other = (isa_products(_CHILD, tmp_path, isa, timeout=900) for isa in ("auto", "avx2"))
    assert str(other.pop("isa")) == "avx2" and bool(other.pop("ok")), "the kernel did not build for avx2"
    base.pop("isa"), base.pop("ok")
    assert base.keys() == other.keys() and len(base) == 3 * 13 + 6
    for key in base:
        assert np.isfinite(base[key]).all() or key.startswith("write"), key
        np.testing.assert_array_equal(other[key], base[key], err_msg=key)
    tail = base["tail-float32"][0, 0, 0]   # XLA's threads flush denormals: the far rows give 0 in both
    assert tail[0] == 0 and (tail[1:10] > 0).all() and (tail[1:10] < 1e-34).all(), tail


# exp over every float in [-128, -0], each build's own (exp_ps on AVX-512, exp8 on AVX2), with
# flush-to-zero / denormals-are-zero off (the kernels' own worker thread) and on (XLA's threads):
# a digest of the results and the count of denormal ones.
_EXP_HARNESS = r"""
#include "attention.cc"
#include <cstdio>
#include <cstdlib>
#include <pmmintrin.h>
int main(int argc, char** argv) {
  if (atoi(argv[1])) { _MM_SET_FLUSH_ZERO_MODE(_MM_FLUSH_ZERO_ON); _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_ON); }
  uint64_t h = 1469598103934665603ull, denormal = 0;
  alignas(64) float xs[16], ys[16];
  for (uint64_t b = 0x80000000u; b < 0xC3000000u; b += 16) {   // -0 down to -128, every float
    for (int i = 0; i < 16; ++i) { const uint32_t u = (uint32_t)(b + i); memcpy(&xs[i], &u, 4); }
#if defined(WOOLLY_AVX2)
    _mm256_store_ps(ys, exp8(_mm256_load_ps(xs)));
    _mm256_store_ps(ys + 8, exp8(_mm256_load_ps(xs + 8)));
#else
    _mm512_store_ps(ys, exp_ps(_mm512_load_ps(xs)));
#endif
    for (int i = 0; i < 16; ++i) {
      uint32_t u;
      memcpy(&u, &ys[i], 4);
      h = (h ^ u) * 1099511628211ull;
      denormal += u != 0 && u < 0x00800000u;
    }
  }
  printf("%016llx %llu\n", (unsigned long long)h, (unsigned long long)denormal);
}
"""


def test_avx2_exp_equals_the_avx512_one_on_every_input(tmp_path, monkeypatch):
    import shutil

    import jax

    from woolly.ops import cpu_kernels
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx512f", "avx512bw"} <= cpu_kernels.cpu_flags():
        pytest.skip("needs an AVX-512 x86-64 machine (both builds run here)")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "exp.cc"
    src.write_text(_EXP_HARNESS)
    inc = [f"-I{jax.ffi.include_dir()}", f"-I{cpu_kernels.KERNEL_DIR}"]
    flags = [f for f in cpu_kernels.FLAGS if f not in ("-shared", "-fPIC")]
    procs, exes = [], {}
    for isa in ("avx512", "avx2"):
        monkeypatch.setenv("WOOLLY_CPU_ISA", isa)
        isa_flags = cpu_kernels.compile_flags()[len(cpu_kernels.FLAGS):]
        exes[isa] = tmp_path / isa
        procs.append(subprocess.Popen([cxx, *flags, *isa_flags, *inc, str(src), "-o", str(exes[isa])],
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    for ftz in ("0", "1"):
        got = {isa: subprocess.run([str(exe), ftz], capture_output=True, text=True, timeout=600, check=True).stdout
               for isa, exe in exes.items()}
        assert got["avx2"] == got["avx512"], (ftz, got)
        assert (int(got["avx2"].split()[1]) > 0) == (ftz == "0")   # denormal results exactly when not flushed
