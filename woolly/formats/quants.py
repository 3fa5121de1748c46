"""GGUF block formats: sizes, and vectorized host-side decoding (numpy, no JAX).

Every block format decodes to the same affine form, per sub-block of `sub` weights:

    w = scale * q + bias          q: int8 codes [n_blocks, block]  scale, bias: f32 [n_blocks, block/sub]

`dequantize` evaluates that in float32 in the same order as ggml (and gguf-py), so the
result is bit-exact with `gguf.quants.dequantize`. The runtime can keep (q, scale, bias)
resident instead of float weights; see `woolly.ops.qmatmul`.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import gguf
import numpy as np

QK_K = gguf.QK_K  # weights per K-quant super-block


class QuantizationType(enum.IntEnum):
    """The tensor types Woolly reads and writes; values are gguf-py's `GGMLQuantizationType` ids."""

    F32 = gguf.GGMLQuantizationType.F32
    F16 = gguf.GGMLQuantizationType.F16
    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    Q4_1 = gguf.GGMLQuantizationType.Q4_1
    Q5_0 = gguf.GGMLQuantizationType.Q5_0
    Q5_1 = gguf.GGMLQuantizationType.Q5_1
    Q8_0 = gguf.GGMLQuantizationType.Q8_0
    Q2_K = gguf.GGMLQuantizationType.Q2_K
    Q3_K = gguf.GGMLQuantizationType.Q3_K
    Q4_K = gguf.GGMLQuantizationType.Q4_K
    Q5_K = gguf.GGMLQuantizationType.Q5_K
    Q6_K = gguf.GGMLQuantizationType.Q6_K
    BF16 = gguf.GGMLQuantizationType.BF16

    @classmethod
    def parse(cls, name: str | int | "QuantizationType") -> "QuantizationType":
        """Accept an enum member, a type id, or a name such as 'q4_0' / 'Q4_K'."""
        if isinstance(name, cls):
            return name
        if isinstance(name, int):
            return cls(name)
        key = str(name).strip().upper()
        if key not in cls.__members__:
            raise ValueError(f"unknown quantization type {name!r}; one of {', '.join(cls.__members__)}")
        return cls[key]

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE[self][0]

    @property
    def type_size(self) -> int:
        return BLOCK_SIZE[self][1]

    @property
    def is_quantized(self) -> bool:
        return self not in (QuantizationType.F32, QuantizationType.F16, QuantizationType.BF16)


# (weights per block, bytes per block): gguf-py's copy of ggml's type traits.
BLOCK_SIZE: dict[QuantizationType, tuple[int, int]] = {
    t: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)] for t in QuantizationType}

# ggml type ids that exist but Woolly cannot decode: named in errors instead of "unknown".
OTHER_GGML_TYPES = {t.value: t.name for t in gguf.GGMLQuantizationType
                    if t.value not in QuantizationType._value2member_map_}


# llama.cpp's llama_ftype names for general.file_type ("Q4_K_M", "F16", ...), from gguf-py.
FILE_TYPE_NAMES = {t.value: t.name.removeprefix("ALL_").removeprefix("MOSTLY_")
                   for t in gguf.LlamaFileType if t is not gguf.LlamaFileType.GUESSED}


def row_nbytes(qtype: QuantizationType, n: int) -> int:
    """Bytes taken by `n` consecutive weights (n a multiple of the block size)."""
    bs, ts = BLOCK_SIZE[qtype]
    return n // bs * ts


class Affine(NamedTuple):
    """Decoded blocks: w = scale * q + bias, per sub-block of `q.shape[1] // scale.shape[1]`."""

    q: np.ndarray      # int8 [n_blocks, block]
    scale: np.ndarray  # f32  [n_blocks, n_sub]
    bias: np.ndarray | None  # f32 [n_blocks, n_sub], None where the format has no offset


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian f16 bytes [n, 2] -> f32 [n, 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, n_blocks: int, width: int) -> np.ndarray:
    """Packed bytes -> 4-bit codes: byte j gives element j (low) and j+width (high), per group."""
    q = qs.reshape(n_blocks, -1, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n_blocks, -1)


def _bits(b: np.ndarray, n_blocks: int, shifts: list[int], mask: int) -> np.ndarray:
    """Byte rows [n, m*32] -> codes, one group of 32 per (byte row, shift)."""
    q = b.reshape(n_blocks, -1, 1, 32) >> np.array(shifts, np.uint8).reshape(1, 1, len(shifts), 1)
    return (q & np.uint8(mask)).reshape(n_blocks, -1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 6-bit packed (scale, min) pairs: [n, 12] bytes -> two [n, 8] uint8."""
    n = scales.shape[0]
    d, m, md = np.split(scales.reshape(n, 3, 4), 3, axis=1)
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def decode_blocks(blocks: np.ndarray, qtype: QuantizationType) -> Affine:
    """Raw blocks uint8 [n_blocks, type_size] -> their affine form."""
    n = blocks.shape[0]
    T = QuantizationType
    if qtype == T.Q8_0:
        return Affine(blocks[:, 2:].view(np.int8), _f16(blocks[:, :2]), None)
    if qtype == T.Q4_0:
        q = _nibbles(blocks[:, 2:], n, 16).astype(np.int8) - np.int8(8)
        return Affine(q, _f16(blocks[:, :2]), None)
    if qtype == T.Q4_1:
        return Affine(_nibbles(blocks[:, 4:], n, 16).astype(np.int8), _f16(blocks[:, :2]), _f16(blocks[:, 2:4]))
    if qtype in (T.Q5_0, T.Q5_1):
        o = 2 if qtype == T.Q5_0 else 4
        qh = np.ascontiguousarray(blocks[:, o:o + 4]).view(np.uint32)
        hi = ((qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)
        q = (_nibbles(blocks[:, o + 4:], n, 16) | (hi << np.uint8(4))).astype(np.int8)
        if qtype == T.Q5_0:
            return Affine(q - np.int8(16), _f16(blocks[:, :2]), None)
        return Affine(q, _f16(blocks[:, :2]), _f16(blocks[:, 2:4]))
    if qtype == T.Q2_K:
        scales, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        q = _bits(qs, n, [0, 2, 4, 6], 3).astype(np.int8)
        return Affine(q, d * (scales & 0xF).astype(np.float32), -(dmin * (scales >> 4).astype(np.float32)))
    if qtype == T.Q3_K:
        hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
        d = _f16(blocks[:, 108:110])
        lo = (scales[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
        hi = (scales[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
        sc = ((lo & 0x0F) | ((hi & 0x03) << np.uint8(4))).astype(np.int8) - np.int8(32)
        ql = _bits(qs, n, [0, 2, 4, 6], 3).astype(np.int8)
        qh = _bits(hmask, n, list(range(8)), 1) ^ np.uint8(1)  # the offset applies where the mask bit is 0
        return Affine(ql - (qh << np.uint8(2)).astype(np.int8), d * sc.astype(np.float32), None)
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scale_min(blocks[:, 4:16])
        if qtype == T.Q4_K:
            q = _nibbles(blocks[:, 16:], n, 32)
        else:
            q = _nibbles(blocks[:, 48:], n, 32) | (_bits(blocks[:, 16:48], n, list(range(8)), 1) << np.uint8(4))
        return Affine(q.astype(np.int8), d * sc.astype(np.float32), -(dmin * mn.astype(np.float32)))
    if qtype == T.Q6_K:
        ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
        d = _f16(blocks[:, 208:210])
        lo = _nibbles(ql, n, 64).reshape(n, -1, 32)
        hi = _bits(qh, n, [0, 2, 4, 6], 3).reshape(n, -1, 32)
        q = ((lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, QK_K)
        return Affine(q, d * scales.view(np.int8).astype(np.float32), None)
    raise ValueError(f"{qtype!r} is not a block format")


def dequantize(raw: np.ndarray, qtype: QuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes (uint8, any shape) -> float32 array of `shape` (numpy order, rows last)."""
    qtype = QuantizationType(qtype)
    raw = np.ascontiguousarray(raw).reshape(-1)
    if qtype == QuantizationType.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if qtype == QuantizationType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if qtype == QuantizationType.BF16:
        return (raw.view(np.int16).astype(np.int32) << 16).view(np.float32).reshape(shape)
    bs, ts = BLOCK_SIZE[qtype]
    q, scale, bias = decode_blocks(raw.reshape(-1, ts), qtype)
    n_sub = scale.shape[1]
    qf = q.astype(np.float32).reshape(q.shape[0], n_sub, -1)
    w = scale[:, :, None] * qf
    if bias is not None:
        w = w + bias[:, :, None]
    return w.reshape(shape)
