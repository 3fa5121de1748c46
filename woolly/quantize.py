"""`quantize_model`: re-encode a GGUF file's weight matrices into another block format.

What it does, as llama.cpp's `llama-quantize --pure` (without an importance matrix) does:
- every metadata key is copied with its exact GGUF type and order; `general.file_type`
  becomes llama.cpp's ftype for the target and `general.quantization_version` is set;
- norms and every other 1-D tensor are written in F32, and the small 2-D tensors llama.cpp
  never quantizes (`*_norm.weight`, MoE routers, position embeddings, ...) are copied as
  they are; a tensor already in its target type is copied byte for byte;
- every other matrix is dequantized and encoded in the target type (`woolly.formats.
  quantizers`: bit-exact with ggml's reference quantizers);
- a matrix whose row length is not a multiple of the target's block size falls back the
  way llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0 (llama.cpp
  picks IQ4_NL, which Woolly does not write; Q4_0 has the same 4.5 bits per weight), and
  F16 when that does not divide the row either (always, for the 32-weight formats).
The output is written to a temporary file beside `output_path` and renamed into place.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from woolly.errors import InternalError, InvalidRequest, ModelLoadFailed
from woolly.formats.gguf_file import ARRAY, STRING, Field, GGUFFile, TensorInfo
from woolly.formats.quantizers import can_encode, quantize_rows
from woolly.formats.quants import BLOCK_SIZE, QuantizationType, dequantize, row_nbytes

T = QuantizationType

# llama.cpp's llama_ftype for a file whose matrices are `T` (K-quants: the "_S"/"_M" mix
# closest to all-`T`), as gguf-py's `LlamaFileType`.
_FTYPE_NAME = {T.F32: "ALL_F32", T.Q3_K: "MOSTLY_Q3_K_M", T.Q4_K: "MOSTLY_Q4_K_S", T.Q5_K: "MOSTLY_Q5_K_S"}
FILE_TYPE = {t: int(gguf.LlamaFileType[_FTYPE_NAME.get(t, f"MOSTLY_{t.name}")]) for t in QuantizationType}
TARGETS = tuple(t for t in QuantizationType if can_encode(t))

# llama.cpp's fallback for K-quant targets when a row does not divide into 256-weight blocks.
_K_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# 2-D tensors llama.cpp never quantizes (name substrings, as in llama-quant.cpp).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "token_types.weight",
                    "ssm_conv1d.weight", "shortconv.conv.weight", "time_mix_", "attn_rel_b.weight")
_CHUNK_WEIGHTS = 1 << 22  # rows are converted this many weights at a time


def fallback_type(target: QuantizationType, row_length: int) -> QuantizationType:
    """The type a row of `row_length` weights gets when `target` is asked for (llama.cpp's rule)."""
    if row_length % BLOCK_SIZE[target][0] == 0:
        return target
    alt = _K_FALLBACK.get(target, T.F16)
    return alt if row_length % BLOCK_SIZE[alt][0] == 0 else T.F16


def tensor_type(info: TensorInfo, target: QuantizationType) -> QuantizationType:
    """The type `info` is written in when the file is quantized to `target`."""
    if len(info.dims) < 2:
        return T.F32
    if any(part in info.name for part in _NEVER_QUANTIZED):
        return info.qtype
    return fallback_type(target, info.dims[0])


def quantize_model(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    quantization: QuantizationType | str | int,
    progress_callback: Callable[[float], None] | None = None,
) -> Path:
    """Write `input_path` (a .gguf path or a pulled model's name) re-quantized to `output_path`.

    `progress_callback(fraction)` is called with a non-decreasing fraction that ends at
    exactly 1.0 once the output is in place. Raises InvalidRequest (unknown or unsupported
    target type, unusable output path), ModelNotFound (no such input) or ModelLoadFailed.
    """
    from woolly.model_store import resolve_model_path

    target = _parse_target(quantization)
    report = progress_callback or (lambda fraction: None)
    source = GGUFFile(resolve_model_path(input_path))
    try:
        arch = source.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadFailed("metadata 'general.architecture' is missing or not a string")
        output = _check_output(Path(output_path))
        report(0.0)
        # a unique name beside the output (not mkstemp: its 0600 mode would stick to the output)
        tmp_name = output.parent / f".{output.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            _write(source, arch, target, Path(tmp_name), report)
            os.replace(tmp_name, output)
        except BaseException as e:
            Path(tmp_name).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise InternalError(f"could not write {output.name}: {e.strerror or e}") from None
            raise
    finally:
        source.close()
    report(1.0)
    return output


def _parse_target(quantization) -> QuantizationType:
    try:
        target = QuantizationType.parse(quantization)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    if target not in TARGETS:
        raise InvalidRequest(f"Woolly cannot quantize to {target.name}; targets: {', '.join(t.name for t in TARGETS)}")
    return target


def _check_output(output: Path) -> Path:
    output = output.expanduser()
    if output.is_dir():
        raise InvalidRequest(f"output {output.name!r} is a directory")
    if not output.parent.is_dir():
        raise InvalidRequest(f"the directory for output {output.name!r} does not exist")
    return output


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write empty arrays (valid GGUF; gguf-py refuses them)."""

    def _pack_val(self, val, vtype, add_vtype: bool, sub_type=None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _gguf_value(field: Field):
    """A field's value as GGUFWriter packs it: strings as their original bytes, arrays as lists."""
    def raw(s: str) -> bytes:
        return s.encode("utf-8", "surrogateescape")

    if field.vtype == STRING:
        return raw(field.value)
    if field.vtype == ARRAY:
        if field.element_type == STRING:
            return [raw(s) for s in field.value]
        return field.value.tolist()
    return field.value


def _write(source: GGUFFile, arch: str, target: QuantizationType, path: Path, report) -> None:
    w = _Writer(str(path), arch)
    w.kv_data[0].clear()  # every key, the architecture included, is copied below in the source's order
    w.data_alignment = source.alignment
    fields = dict(source.fields)
    fields["general.file_type"] = Field(FILE_TYPE[target], int(gguf.GGUFValueType.UINT32))
    if target.is_quantized:
        fields["general.quantization_version"] = Field(gguf.GGML_QUANT_VERSION, int(gguf.GGUFValueType.UINT32))
    for key, field in fields.items():
        sub = None if field.element_type is None else gguf.GGUFValueType(field.element_type)
        w.add_key_value(key, _gguf_value(field), gguf.GGUFValueType(field.vtype), sub_type=sub)

    plan = [(info, tensor_type(info, target)) for info in source.tensors.values()]
    for info, qtype in plan:
        rows = info.n_elements // info.dims[0]
        w.add_tensor_info(info.name, info.shape, np.dtype(np.float32), rows * row_nbytes(qtype, info.dims[0]),
                          raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_tensor_data(source, plan, w.fout[0], report)
    finally:
        w.close()


def _write_tensor_data(source: GGUFFile, plan: list[tuple[TensorInfo, QuantizationType]], out, report) -> None:
    """Each tensor at the next aligned offset, converted a few million weights at a time."""
    total = sum(info.n_elements for info, _ in plan) or 1
    done = 0
    for info, qtype in plan:
        out.write(b"\0" * (-out.tell() % source.alignment))
        raw = source.raw(info.name)
        raw = raw.reshape(-1, raw.shape[-1])  # [rows, row_bytes]
        n = info.dims[0]
        step = max(1, _CHUNK_WEIGHTS // n)
        for r in range(0, raw.shape[0], step):
            block = raw[r:r + step]
            if qtype == info.qtype:
                out.write(block.tobytes())
            else:
                values = dequantize(block, info.qtype, (block.shape[0], n))
                out.write(quantize_rows(values, qtype).tobytes())
            done += block.shape[0] * n
            report(0.99 * done / total)
        out.write(b"\0" * (-out.tell() % source.alignment))
