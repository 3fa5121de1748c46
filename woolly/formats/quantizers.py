"""Encoding float weights into GGUF block formats (numpy, host side, no JAX).

`quantize_rows(values, qtype)` turns float32 [rows, n] into raw bytes [rows, row_bytes].
The 32-weight formats, F16 and BF16 come from `gguf.quants` (bit-exact with ggml's
reference quantizers). The K-quants gguf cannot encode are written here, vectorized over
blocks, following ggml's `quantize_row_q{2,3,4,5,6}_K_ref` step by step in float32, with
sums accumulated in ggml's order (which is what llama.cpp's quantize runs without an
importance matrix).
"""
from __future__ import annotations

import gguf
import numpy as np

from woolly.formats.quants import BLOCK_SIZE, QK_K, QuantizationType

f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)
_GGUF_ENCODED = {QuantizationType.F16, QuantizationType.BF16, QuantizationType.Q4_0, QuantizationType.Q4_1,
                 QuantizationType.Q5_0, QuantizationType.Q5_1, QuantizationType.Q8_0}
CHUNK_WEIGHTS = 1 << 16  # K-quant work arrays stay cache-sized at this many weights


def can_encode(qtype: QuantizationType) -> bool:
    return qtype == QuantizationType.F32 or qtype in _GGUF_ENCODED or qtype in _K_ENCODERS


def quantize_rows(values: np.ndarray, qtype: QuantizationType) -> np.ndarray:
    """float32 [rows, n] (n a multiple of the block size) -> raw bytes uint8 [rows, row_bytes]."""
    qtype = QuantizationType(qtype)
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, n = values.shape
    bs, ts = BLOCK_SIZE[qtype]
    if n % bs:
        raise ValueError(f"row length {n} is not a multiple of {qtype.name}'s block size {bs}")
    if qtype == QuantizationType.F32:
        return values.view(np.uint8)
    if qtype in _GGUF_ENCODED:
        out = gguf.quants.quantize(values, gguf.GGMLQuantizationType(int(qtype)))
        return np.ascontiguousarray(out).view(np.uint8).reshape(rows, -1)
    if qtype not in _K_ENCODERS:
        raise ValueError(f"Woolly cannot encode {qtype.name}")
    blocks = values.reshape(-1, bs)
    out = np.empty((blocks.shape[0], ts), np.uint8)
    step = max(1, CHUNK_WEIGHTS // bs)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(0, blocks.shape[0], step):
            out[i:i + step] = _K_ENCODERS[qtype](blocks[i:i + step])
    return out.reshape(rows, -1)


# -- helpers mirroring ggml's scalar code ---------------------------------------------------
def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of [n, B], left to right from 0.0 in float32, as ggml's loops do -> [B].

    The K-quant helpers keep sub-blocks as columns ([n, B]) so that this is n vector adds.
    """
    acc = np.zeros(a.shape[1:], np.float32)
    for row in a:
        acc += row
    return acc


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (the 1.5 * 2^23 trick), as int32."""
    return np.rint(np.nan_to_num(x, nan=0.0, posinf=4e6, neginf=-4e6)).astype(np.int32)


def _fp16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32 [n] -> (its f16 bytes [n, 2], the f16 value back in f32 [n])."""
    h = np.asarray(x, np.float32).astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _columns(x: np.ndarray) -> np.ndarray:
    """[B, n] -> contiguous [n, B]."""
    return np.ascontiguousarray(x.T)


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (scale, min) per row of x [B, n] for codes 0..nmax, weighted by w -> (scale, -min, L [B, n])."""
    x, w = _columns(x), _columns(w)  # [n, B]
    nmax_f = f32(nmax)
    mn = np.minimum(x.min(axis=0), f32(0))
    mx = x.max(axis=0)
    sum_w, sum_x = w[0].copy(), w[0] * x[0]
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += w[i] * x[i]

    def error(scale, minimum, L):
        diff = scale * L + minimum - x
        return _seq_sum(w * (np.abs(diff) if use_mad else diff * diff))

    iscale = nmax_f / (mx - mn)
    scale = f32(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(np.float32)
    best = error(scale, mn, L)
    minimum = mn.copy()
    for step in range(nstep + 1):
        # ggml updates `min` as it finds better fits, and later steps measure from the new one
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + nmax_f) / (mx - minimum)
        Laux = np.clip(_nearest_int(iscale * (x - minimum)), 0, nmax).astype(np.float32)
        wl = w * Laux
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * Laux), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = np.where(positive, f32(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, Laux)
        better = (D > 0) & (cur < best)
        if better.any():
            L = np.where(better, Laux, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            minimum = np.where(better, this_min, minimum)
    flat = mx == mn
    L = np.where(flat, f32(0), L)
    scale = np.where(flat, f32(0), scale)
    minimum = np.where(flat, mn, minimum)
    return scale.astype(np.float32), (-minimum).astype(np.float32), L.T.astype(np.uint8)


def _abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of [n, B]: (largest |x|, the x that has it, first one on ties)."""
    at = np.argmax(np.abs(x), axis=0)
    value = x[at, np.arange(x.shape[1])]
    return np.abs(value), value


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) per row of [B, n] -> (scale [B], L [B, n])."""
    x = _columns(x)
    amax, max_ = _abs_max(x)
    w = x * x
    nmax_f = f32(nmax)

    def codes(iscale):
        return np.clip(_nearest_int(iscale * x), -nmax, nmax - 1).astype(np.float32)

    def sums(l):
        return _seq_sum(w * x * l), _seq_sum(w * l * l)

    l = codes(-nmax_f / max_)
    sumlx, suml2 = sums(l)
    scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lt = codes(-(nmax_f + f32(0.1) * f32(step)) / max_)
        slx, sl2 = sums(lt)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        if better.any():
            l = np.where(better, lt, l)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    zero = amax < GROUP_MAX_EPS
    L = np.where(zero, 0, l.astype(np.int32) + nmax)
    return np.where(zero, f32(0), scale).astype(np.float32), L.T


def _make_q3_quants_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_q3_quants(n, nmax, x, L, do_rmse=true) per row of [B, n] -> (scale [B], L [B, n])."""
    x = _columns(x)
    amax, max_ = _abs_max(x)
    L = np.clip(_nearest_int((-f32(nmax) / max_) * x), -nmax, nmax - 1).astype(np.float32)
    w = x * x
    sumlx, suml2 = _seq_sum(w * x * L), _seq_sum(w * L * L)
    for _ in range(5):  # a pass that changes nothing would change nothing again: no per-row early exit needed
        changed = False
        for i in range(x.shape[0]):
            wi, xi, li = w[i], x[i], L[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1).astype(np.float32)
            slx_new = slx + wi * xi * new_l
            sl2_new = sl2 + wi * new_l * new_l
            take = ((slx > 0) & (new_l != li) & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
            if take.any():
                changed = True
                L[i] = np.where(take, new_l, li)
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
        if not changed:
            break
    zero = amax < GROUP_MAX_EPS
    scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    L = np.where(zero, 0, L.astype(np.int32) + nmax)
    return np.where(zero, f32(0), scale).astype(np.float32), L.T


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and mins [B, 8] -> the 12 packed bytes [B, 12]."""
    s = np.zeros((ls.shape[0], 12), np.uint8)
    s[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    s[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return s


# -- the K-quant encoders: blocks f32 [B, 256] -> bytes uint8 [B, type_size] ------------------
def _encode_q2_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    xs = x.reshape(B * 16, 16)
    scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(B, 16), mins.reshape(B, 16), L.reshape(B, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    q4scale = f32(15)
    has_scale, has_min = max_scale > 0, max_min > 0
    sc = np.where(has_scale[:, None], _nearest_int((q4scale / max_scale)[:, None] * scales), 0)
    mn = np.where(has_min[:, None], _nearest_int((q4scale / max_min)[:, None] * mins), 0)
    packed = ((sc & 0xFF) | ((mn << 4) & 0xFF)).astype(np.uint8)
    d_bytes, d = _fp16(np.where(has_scale, max_scale / q4scale, f32(0)))
    dmin_bytes, dmin = _fp16(np.where(has_min, max_min / q4scale, f32(0)))
    dl = d[:, None] * (packed & 0xF).astype(np.float32)
    ml = dmin[:, None] * (packed >> 4).astype(np.float32)
    requant = np.clip(_nearest_int((x.reshape(B, 16, 16) + ml[..., None]) / dl[..., None]), 0, 3)
    L = np.where((dl != 0)[..., None], requant, L).astype(np.uint8).reshape(B, 2, 4, 32)
    qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return np.concatenate([packed, qs.reshape(B, 64), d_bytes, dmin_bytes], axis=1)


def _encode_q3_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    scales, L = _make_q3_quants_rmse(x.reshape(B * 16, 16), 4)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    at = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(B), at]
    has_scale = max_scale != 0
    iscale = f32(-32) / max_scale
    ls = np.where(has_scale[:, None], np.clip(_nearest_int(iscale[:, None] * scales), -32, 31) + 32, 0)  # 6-bit
    packed = np.zeros((B, 12), np.int32)
    packed[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(B, 4, 4)  # [B, j // 4, j % 4]
    packed[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d_bytes, d = _fp16(np.where(has_scale, f32(1) / iscale, f32(0)))
    dl = d[:, None] * (ls - 32).astype(np.float32)
    dl = np.where(has_scale[:, None], dl, f32(0))
    requant = np.clip(_nearest_int(x.reshape(B, 16, 16) / dl[..., None]), -4, 3) + 4
    L = np.where((dl != 0)[..., None], requant, L).reshape(B, 8, 32)  # [B, bit of hmask, 32]
    hmask = np.bitwise_or.reduce((L > 3).astype(np.uint8) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
    L = np.where(L > 3, L - 4, L).astype(np.uint8).reshape(B, 2, 4, 32)
    qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return np.concatenate([hmask.astype(np.uint8), qs.reshape(B, 64), packed.astype(np.uint8), d_bytes], axis=1)


def _encode_q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared Q4_K/Q5_K steps -> (header bytes d, dmin, scales [B, 16], codes L [B, 256])."""
    B = x.shape[0]
    xs = x.reshape(B * 8, 32)
    av_x = np.sqrt(_seq_sum(_columns(xs * xs)) / f32(32))
    scales, mins, L = _make_qkx2_quants(xs, av_x[:, None] + np.abs(xs), nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.reshape(B, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
    inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d_bytes, d = _fp16(max_scale / f32(63))
    dmin_bytes, dmin = _fp16(max_min / f32(63))
    dl = d[:, None] * ls.astype(np.float32)
    ml = dmin[:, None] * lm.astype(np.float32)
    requant = np.clip(_nearest_int((x.reshape(B, 8, 32) + ml[..., None]) / dl[..., None]), 0, nmax)
    L = np.where((dl != 0)[..., None], requant, L).astype(np.uint8).reshape(B, QK_K)
    return np.concatenate([d_bytes, dmin_bytes, _pack_k_scales(ls, lm)], axis=1), L


def _encode_q4_k(x: np.ndarray) -> np.ndarray:
    head, L = _encode_q45_k(x, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32)
    return np.concatenate([head, (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def _encode_q5_k(x: np.ndarray) -> np.ndarray:
    head, L = _encode_q45_k(x, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32)  # [B, pair k, half, 32]: bit 2k / 2k+1 of qh hold their fifth bits
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1, 1) + np.arange(2, dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = np.bitwise_or.reduce(((L >> 4) << shifts).reshape(-1, 8, 32), axis=1).astype(np.uint8)
    ql = (L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)
    return np.concatenate([head, qh, ql.reshape(-1, 128)], axis=1)


def _encode_q6_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    scales, L = _make_qx_quants_rmse1(x.reshape(B * 16, 16), 32)
    scales, L = scales.reshape(B, 16), L.reshape(B, 16, 16)
    at = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(B), at]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = f32(-128) / max_scale
    d_bytes, d = _fp16(np.where(zero, f32(0), f32(1) / iscale))
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    dl = d[:, None] * sc.astype(np.float32)
    requant = np.clip(_nearest_int(x.reshape(B, 16, 16) / dl[..., None]), -32, 31) + 32
    L = np.where((dl != 0)[..., None], requant, L).astype(np.uint8).reshape(B, 2, 4, 32)
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2)  # [B, 2, 64]
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64), sc.view(np.uint8), d_bytes], axis=1)
    out[zero] = 0
    return out


_K_ENCODERS = {
    QuantizationType.Q2_K: _encode_q2_k,
    QuantizationType.Q3_K: _encode_q3_k,
    QuantizationType.Q4_K: _encode_q4_k,
    QuantizationType.Q5_K: _encode_q5_k,
    QuantizationType.Q6_K: _encode_q6_k,
}
