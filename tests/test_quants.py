"""Block formats: woolly's dequantization is bit-exact with gguf-py's reference for every type."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from woolly.formats.quants import BLOCK_SIZE, QuantizationType, decode_blocks, dequantize, row_nbytes
from woolly.model_file import Model

ALL_TYPES = list(QuantizationType)
BLOCK_TYPES = [t for t in ALL_TYPES if t.is_quantized]
CHUNK_ROWS_WEIGHTS = 1 << 22  # real tensors are compared this many weights at a time
# Random bytes hold inf/NaN scales on purpose; numpy's warnings about them are expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def assert_bit_exact(ours: np.ndarray, reference: np.ndarray) -> None:
    """Same shape, same float32 bits everywhere, except that any NaN matches any NaN."""
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    ref = reference.astype(np.float32, copy=False)
    nan_ours, nan_ref = np.isnan(ours), np.isnan(ref)
    assert np.array_equal(nan_ours, nan_ref), "NaNs in different places"
    keep = ~nan_ours
    mismatch = np.flatnonzero(ours[keep].view(np.uint32) != ref[keep].view(np.uint32))
    assert mismatch.size == 0, f"{mismatch.size} values differ, first at {mismatch[0]}"


def reference_dequantize(raw: np.ndarray, qtype: QuantizationType) -> np.ndarray:
    return gguf.quants.dequantize(np.ascontiguousarray(raw), gguf.GGMLQuantizationType(int(qtype)))


def random_rows(rng: np.random.Generator, qtype: QuantizationType, rows: int, blocks_per_row: int) -> np.ndarray:
    """Random bytes [rows, row_bytes]: every bit pattern, so NaN and inf scales included."""
    bs, ts = BLOCK_SIZE[qtype]
    return rng.integers(0, 256, size=(rows, blocks_per_row * ts), dtype=np.uint8)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    bs, _ = BLOCK_SIZE[qtype]
    blocks_per_row = 8 if bs > 1 else 256
    raw = random_rows(rng, qtype, rows=16, blocks_per_row=blocks_per_row)
    ours = dequantize(raw, qtype, (16, blocks_per_row * bs))
    assert_bit_exact(ours, reference_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x7C, 0x80], ids=lambda b: f"{b:#04x}")
def test_dequantize_constant_bytes_bit_exact(qtype, fill):
    """All-zero, all-0xFF (NaN f16 scales), 0x7C7C (inf-ish) and 0x8080 (negative zero) blocks."""
    bs, ts = BLOCK_SIZE[qtype]
    n = 4 if bs > 1 else 64
    raw = np.full((2, n * ts), fill, np.uint8)
    ours = dequantize(raw, qtype, (2, n * bs))
    assert_bit_exact(ours, reference_dequantize(raw, qtype))
    if fill == 0xFF and qtype in (QuantizationType.F16, QuantizationType.BF16, QuantizationType.F32):
        assert np.isnan(ours).all()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_inf_scales_give_inf_or_nan_like_the_reference(qtype):
    """A block whose f16 scale is +inf decodes to +-inf (or NaN for a zero code), as gguf-py does."""
    rng = np.random.default_rng(7)
    _, ts = BLOCK_SIZE[qtype]
    raw = random_rows(rng, qtype, rows=1, blocks_per_row=4).reshape(4, ts)
    offsets = {QuantizationType.Q2_K: 80, QuantizationType.Q3_K: 108, QuantizationType.Q6_K: 208}
    at = offsets.get(qtype, 0)
    raw[:, at:at + 2] = np.array([0x00, 0x7C], np.uint8)  # f16 +inf, little-endian
    ours = dequantize(raw, qtype, (1, 4 * BLOCK_SIZE[qtype][0]))
    assert not np.isfinite(ours).all()
    assert_bit_exact(ours, reference_dequantize(raw.reshape(1, -1), qtype))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_decode_blocks_affine_form_matches(qtype):
    """decode_blocks gives (q, scale, bias) whose w = scale * q + bias is the dequantized block."""
    rng = np.random.default_rng(100 + int(qtype))
    bs, ts = BLOCK_SIZE[qtype]
    raw = rng.integers(0, 256, size=(32, ts), dtype=np.uint8)
    q, scale, bias = decode_blocks(raw, qtype)
    assert q.dtype == np.int8 and q.shape == (32, bs)
    n_sub = scale.shape[1]
    w = scale[:, :, None] * q.astype(np.float32).reshape(32, n_sub, -1)
    if bias is not None:
        w = w + bias[:, :, None]
    assert_bit_exact(w.reshape(32, bs), reference_dequantize(raw, qtype).reshape(32, bs))


def test_row_nbytes_matches_gguf():
    for qtype in ALL_TYPES:
        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(qtype))]
        assert BLOCK_SIZE[qtype] == (bs, ts), qtype.name
        assert row_nbytes(qtype, 4 * 256) == 4 * 256 // bs * ts


def test_quantization_type_parse():
    assert QuantizationType.parse("q4_k") is QuantizationType.Q4_K
    assert QuantizationType.parse(8) is QuantizationType.Q8_0
    with pytest.raises(ValueError, match="unknown quantization type"):
        QuantizationType.parse("Q9_9")


@pytest.mark.real
def test_every_tensor_of_both_real_models_bit_exact(real_model_path):
    m = Model.from_file(real_model_path)
    seen = set()
    for name, info in m.tensors.items():
        raw = m.raw(name).reshape(-1, row_nbytes(info.qtype, info.dims[0]))
        step = max(1, CHUNK_ROWS_WEIGHTS // info.dims[0])
        for r in range(0, raw.shape[0], step):
            part = raw[r:r + step]
            ours = dequantize(part, info.qtype, (part.shape[0], info.dims[0]))
            assert_bit_exact(ours, reference_dequantize(part, info.qtype))
        seen.add(info.qtype)
    # the two files between them hold F32, Q8_0, Q4_1 (SmolLM2) and Q5_0, Q4_K, Q6_K (Gemma)
    assert QuantizationType.F32 in seen and QuantizationType.Q8_0 in seen and len(seen) >= 3


def test_file_type_names_follow_llama_cpp():
    """general.file_type ids name llama.cpp's ftypes; the writer's ftype for `T` names `T`'s mix."""
    from woolly.formats.quants import FILE_TYPE_NAMES
    from woolly.quantize import FILE_TYPE
    assert FILE_TYPE_NAMES[15] == "Q4_K_M" and FILE_TYPE_NAMES[7] == "Q8_0" and FILE_TYPE_NAMES[32] == "BF16"
    for qtype, ftype in FILE_TYPE.items():
        assert FILE_TYPE_NAMES[ftype].startswith(qtype.name), (qtype, ftype)
