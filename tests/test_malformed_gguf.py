"""Malformed GGUF files (reliability.md): each is one clear WoollyError, fast, with no big allocation.

Files are built byte by byte here (gguf.GGUFWriter refuses bad input). Every case goes
through the whole load: Model.from_file, validate(), metadata, vocabulary, every tensor.
A hypothesis test then flips, truncates and splices a valid tiny model.
"""
from __future__ import annotations

import os
import re
import struct
import threading
import time
import tracemalloc
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny_models import write_tiny_model
from woolly.errors import WoollyError
from woolly.model_file import Model

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_Q8_0 = 0, 8
ALLOC_SLACK = 1 << 20   # bytes of Python bookkeeping allowed beyond the file's size
TIME_LIMIT_S = 1.0


# -- a byte-level GGUF builder -----------------------------------------------------------------
def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def value(vtype: int, v) -> bytes:
    return gstr(v) if vtype == STR else struct.pack(_FMT[vtype], v)


def kv(key: str, vtype: int, v) -> tuple[str, bytes]:
    return key, gstr(key) + u32(vtype) + value(vtype, v)


def kv_array(key: str, etype: int, items: list, n: int | None = None) -> tuple[str, bytes]:
    body = b"".join(value(etype, i) for i in items)
    return key, gstr(key) + u32(ARR) + u32(etype) + u64(len(items) if n is None else n) + body


@dataclass
class Tensor:
    name: str
    dims: tuple[int, ...]            # GGUF order, innermost first
    data: bytes
    ggml_type: int = GGML_F32
    offset: int | None = None        # relative to the data section; None: next aligned spot
    n_dims: int | None = None        # override the written dimension count


@dataclass
class GGUF:
    kvs: list[tuple[str, bytes]]
    tensors: list[Tensor]
    magic: bytes = b"GGUF"
    version: int = 3
    n_kv: int | None = None
    n_tensors: int | None = None
    alignment: int = 32

    def with_kv(self, key: str, encoded: tuple[str, bytes] | None) -> "GGUF":
        """Replace (or with None, drop) every entry of `key`; append when absent."""
        kvs = [(k, b) for k, b in self.kvs if k != key]
        if encoded is not None:
            at = next((i for i, (k, _) in enumerate(self.kvs) if k == key), len(kvs))
            kvs.insert(at, encoded)
        return replace(self, kvs=kvs)

    def with_tensor(self, name: str, **changes) -> "GGUF":
        return replace(self, tensors=[replace(t, **changes) if t.name == name else t for t in self.tensors])

    def without_tensor(self, name: str) -> "GGUF":
        return replace(self, tensors=[t for t in self.tensors if t.name != name])

    def layout(self) -> tuple[bytes, list[int]]:
        """Header + KV + tensor infos (unpadded), and each tensor's relative offset."""
        head = self.magic + u32(self.version) + u64(len(self.tensors) if self.n_tensors is None else self.n_tensors)
        head += u64(len(self.kvs) if self.n_kv is None else self.n_kv)
        head += b"".join(b for _, b in self.kvs)
        offsets, pos = [], 0
        for t in self.tensors:
            if t.offset is None:  # the next aligned spot after the previous auto-placed tensor
                pos = -(-pos // self.alignment) * self.alignment
                offsets.append(pos)
                pos += len(t.data)
            else:
                offsets.append(t.offset)
        for t, off in zip(self.tensors, offsets):
            n_dims = len(t.dims) if t.n_dims is None else t.n_dims
            head += gstr(t.name) + u32(n_dims) + b"".join(u64(d) for d in t.dims) + u32(t.ggml_type) + u64(off)
        return head, offsets

    def build(self) -> bytes:
        head, offsets = self.layout()
        data_start = -(-len(head) // self.alignment) * self.alignment
        out = bytearray(head + b"\0" * (data_start - len(head)))
        for t, off in zip(self.tensors, offsets):
            if off >= 1 << 40:
                continue  # a hostile offset: nothing to place
            end = data_start + off + len(t.data)
            if len(out) < end:
                out += b"\0" * (end - len(out))
            out[data_start + off:end] = t.data
        return bytes(out)

    def data_start(self) -> int:
        head, _ = self.layout()
        return -(-len(head) // self.alignment) * self.alignment


D, N_HEADS, N_KV, HEAD, FFN = 32, 2, 1, 16, 32
TOKENS = ["<unk>", "<s>", "</s>", "<0x41>", "▁a", "a", "b", "▁"]
TOKEN_TYPES = [2, 3, 3, 6, 1, 1, 1, 1]


def f32_tensor(name: str, *dims: int, seed: int = 0) -> Tensor:
    n = int(np.prod(dims))
    data = (np.random.default_rng(seed).normal(0, 0.02, n) + (1.0 if len(dims) == 1 else 0.0)).astype(np.float32)
    return Tensor(name, tuple(dims), data.tobytes())


def valid_gguf() -> GGUF:
    """A complete, loadable one-layer llama model in F32 with an 8-token SentencePiece vocabulary."""
    kvs = [
        kv("general.architecture", STR, "llama"),
        kv("general.name", STR, "malformed-base"),
        kv("llama.block_count", U32, 1),
        kv("llama.context_length", U32, 64),
        kv("llama.embedding_length", U32, D),
        kv("llama.feed_forward_length", U32, FFN),
        kv("llama.attention.head_count", U32, N_HEADS),
        kv("llama.attention.head_count_kv", U32, N_KV),
        kv("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        kv("tokenizer.ggml.model", STR, "llama"),
        kv_array("tokenizer.ggml.tokens", STR, TOKENS),
        kv_array("tokenizer.ggml.scores", F32, [-float(i) for i in range(len(TOKENS))]),
        kv_array("tokenizer.ggml.token_type", I32, TOKEN_TYPES),
        kv("tokenizer.ggml.bos_token_id", U32, 1),
        kv("tokenizer.ggml.eos_token_id", U32, 2),
        kv("tokenizer.ggml.unknown_token_id", U32, 0),
    ]
    tensors = [f32_tensor("token_embd.weight", D, len(TOKENS)), f32_tensor("output_norm.weight", D)]
    b = "blk.0."
    for i, (name, dims) in enumerate([
        ("attn_norm", (D,)), ("attn_q", (D, N_HEADS * HEAD)), ("attn_k", (D, N_KV * HEAD)),
        ("attn_v", (D, N_KV * HEAD)), ("attn_output", (N_HEADS * HEAD, D)), ("ffn_norm", (D,)),
        ("ffn_gate", (D, FFN)), ("ffn_up", (D, FFN)), ("ffn_down", (FFN, D)),
    ]):
        tensors.append(f32_tensor(b + name + ".weight", *dims, seed=i + 1))
    return GGUF(kvs, tensors)


# -- loading and the checks every case shares ----------------------------------------------------
def full_load(path: Path) -> None:
    m = Model.from_file(path)
    try:
        m.validate()
        _ = m.metadata, m.vocabulary, m.config
        for name in m.tensors:
            m.tensor(name)
    finally:
        m.close()


def expect_error(tmp_path: Path, data: bytes, pattern: str, code: str = "MODEL_LOAD_FAILED") -> WoollyError:
    """Load `data` as a file: one WoollyError with `code` whose message matches `pattern`,
    in under a second, with Python's peak allocation under the file's size plus slack."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    error = None
    tracemalloc.start()
    start = time.perf_counter()
    try:
        full_load(path)
    except WoollyError as e:
        error = e
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert error is not None, f"loaded without error; expected /{pattern}/"
    assert error.code == code, (error.code, str(error))
    assert re.search(pattern, str(error)), f"message {str(error)!r} does not match /{pattern}/"
    assert "\n" not in str(error) and str(tmp_path) not in str(error)
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.2f}s"
    assert peak < len(data) + ALLOC_SLACK, f"allocated {peak} bytes for a {len(data)}-byte file"
    return error


@pytest.fixture(scope="module", autouse=True)
def warm_imports(tmp_path_factory):
    """Load the valid base once so lazy imports do not count as allocations of the first case."""
    path = tmp_path_factory.mktemp("base") / "ok.gguf"
    path.write_bytes(valid_gguf().build())
    full_load(path)


def test_the_base_file_is_valid(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(valid_gguf().build())
    full_load(path)
    m = Model.from_file(path)
    assert m.config.n_layers == 1 and m.vocabulary.size == len(TOKENS)


# -- the file itself -------------------------------------------------------------------------
def test_missing_file_is_model_not_found(tmp_path):
    with pytest.raises(WoollyError) as ei:
        full_load(tmp_path / "nope.gguf")
    assert ei.value.code == "MODEL_NOT_FOUND" and "nope.gguf" in str(ei.value)


def test_empty_file(tmp_path):
    expect_error(tmp_path, b"", r"empty")


def test_directory_named_gguf(tmp_path):
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(WoollyError) as ei:
        full_load(tmp_path / "dir.gguf")
    assert ei.value.code in ("MODEL_LOAD_FAILED", "MODEL_NOT_FOUND")


def _load_error(path: Path) -> WoollyError:
    """Load `path` in a thread: one WoollyError within TIME_LIMIT_S (a FIFO or device must not block)."""
    box: list = []

    def load():
        try:
            full_load(path)
            box.append(None)
        except BaseException as e:   # anything but a WoollyError fails the test below
            box.append(e)
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(TIME_LIMIT_S)
    assert box, f"loading {path.name} still runs after {TIME_LIMIT_S}s"
    assert isinstance(box[0], WoollyError), repr(box[0])
    assert "\n" not in str(box[0]) and str(path.parent) not in str(box[0])
    return box[0]


SYSFS_FILE = next((p for p in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/power/state",
                               "/sys/kernel/uevent_seqnum") if os.path.isfile(p)), None)


@pytest.mark.parametrize("target, pattern", [
    pytest.param(SYSFS_FILE, r"cannot map .*is it a file on disk", id="sysfs",
                 marks=pytest.mark.skipif(SYSFS_FILE is None, reason="no sysfs here")),
    ("/proc/self/status", r"empty"),
    ("/dev/zero", r"a character device, not a regular file"),
    ("/", r"a directory, not a regular file"),
])
def test_a_link_to_a_file_that_is_not_a_model_is_one_clear_error(tmp_path, target, pattern):
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    err = _load_error(link)
    assert err.code == "MODEL_LOAD_FAILED" and re.search(pattern, str(err)), str(err)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.gguf")
    err = _load_error(tmp_path / "pipe.gguf")
    assert err.code == "MODEL_LOAD_FAILED" and "a FIFO, not a regular file" in str(err), str(err)


def test_a_dangling_link_is_model_not_found(tmp_path):
    (tmp_path / "gone.gguf").symlink_to(tmp_path / "missing.gguf")
    assert _load_error(tmp_path / "gone.gguf").code == "MODEL_NOT_FOUND"


def test_an_unreadable_file_is_one_clear_error(tmp_path):
    path = tmp_path / "secret.gguf"
    path.write_bytes(valid_gguf().build())
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions do not apply")
    err = _load_error(path)
    assert err.code == "MODEL_LOAD_FAILED" and "cannot open" in str(err), str(err)


@pytest.mark.parametrize("magic", [b"GGUG", b"\0\0\0\0", b"GGML", b"FUGG"])
def test_bad_magic(tmp_path, magic):
    expect_error(tmp_path, replace(valid_gguf(), magic=magic).build(), r"bad magic")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path, version):
    expect_error(tmp_path, replace(valid_gguf(), version=version).build(), rf"unsupported GGUF version {version}")


def test_big_endian_version_is_named(tmp_path):
    data = bytearray(valid_gguf().build())
    data[4:8] = struct.pack(">I", 3)
    expect_error(tmp_path, bytes(data), r"big-endian")


def test_truncated_at_every_byte_of_header_kv_and_tensor_infos(tmp_path):
    g = valid_gguf()
    data = g.build()
    data_start = g.data_start()
    for cut in range(0, data_start + 1):
        expect_error(tmp_path, data[:cut], r"empty|bad magic|truncated|past the end|larger than the file|more than the file could hold")


def test_truncated_inside_tensor_data(tmp_path):
    g = valid_gguf()
    data = g.build()
    cuts = list(range(g.data_start() + 1, len(data), 97)) + [len(data) - 1]
    for cut in cuts:
        expect_error(tmp_path, data[:cut], r"runs past the end of the file")


# -- counts and lengths ----------------------------------------------------------------------
@pytest.mark.parametrize("count", [2**64 - 1, 2**63, 10_000_000])
def test_tensor_count_larger_than_the_file(tmp_path, count):
    expect_error(tmp_path, replace(valid_gguf(), n_tensors=count).build(), r"tensor count \d+ is larger than the file")


@pytest.mark.parametrize("count", [2**64 - 1, 2**63, 10_000_000])
def test_kv_count_larger_than_the_file(tmp_path, count):
    expect_error(tmp_path, replace(valid_gguf(), n_kv=count).build(), r"metadata count \d+ is larger than the file")


def test_kv_count_slightly_too_large(tmp_path):
    g = valid_gguf()
    expect_error(tmp_path, replace(g, n_kv=len(g.kvs) + 1).build(), r"truncated|corrupt|invalid")


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 1 << 40])
def test_key_length_beyond_the_file(tmp_path, length):
    bad = ("bad", gstr("general.bad", length=length) + u32(U32) + u32(1))
    g = valid_gguf()
    expect_error(tmp_path, replace(g, kvs=[bad] + g.kvs).build(), r"length of key #0|key #0 needs")


@pytest.mark.parametrize("length", [2**64 - 1, 1 << 40])
def test_string_value_length_beyond_the_file(tmp_path, length):
    bad = ("general.name", gstr("general.name") + u32(STR) + gstr("x", length=length))
    expect_error(tmp_path, valid_gguf().with_kv("general.name", bad).build(), r"value of 'general.name'")


@pytest.mark.parametrize("etype", [STR, U8, I32, F64])
@pytest.mark.parametrize("n", [2**63, 2**64 - 1, 1 << 40])
def test_array_length_beyond_the_file(tmp_path, etype, n):
    bad = kv_array("general.tags", etype, [], n=n)
    expect_error(tmp_path, valid_gguf().with_kv("general.tags", bad).build(), r"'general.tags' claims \d+")


def test_nested_array(tmp_path):
    inner = u32(U32) + u64(1) + u32(7)
    bad = ("general.nested", gstr("general.nested") + u32(ARR) + u32(ARR) + u64(1) + inner)
    expect_error(tmp_path, valid_gguf().with_kv("general.nested", bad).build(), r"'general.nested' is a nested array")


@pytest.mark.parametrize("vtype", [13, 100, 2**31, 2**32 - 1])
def test_value_type_out_of_range(tmp_path, vtype):
    bad = ("general.odd", gstr("general.odd") + u32(vtype) + u32(0))
    expect_error(tmp_path, valid_gguf().with_kv("general.odd", bad).build(), rf"'general.odd' has an invalid value type {vtype}")


@pytest.mark.parametrize("etype", [13, 2**32 - 1])
def test_array_element_type_out_of_range(tmp_path, etype):
    bad = ("general.odd", gstr("general.odd") + u32(ARR) + u32(etype) + u64(1) + u32(0))
    expect_error(tmp_path, valid_gguf().with_kv("general.odd", bad).build(), rf"invalid array element type {etype}")


def test_duplicate_key(tmp_path):
    g = valid_gguf()
    dup = kv("llama.block_count", U32, 2)
    expect_error(tmp_path, replace(g, kvs=g.kvs + [dup]).build(), r"duplicate metadata key 'llama.block_count'")


# -- metadata of the wrong type for its reader ---------------------------------------------------
@pytest.mark.parametrize("key,encoded,pattern", [
    ("tokenizer.ggml.tokens", kv_array("tokenizer.ggml.tokens", F32, [0.5] * len(TOKENS)), r"'tokenizer.ggml.tokens' must be an array of string"),
    ("tokenizer.ggml.tokens", kv("tokenizer.ggml.tokens", STR, "abc"), r"'tokenizer.ggml.tokens' must be an array of string"),
    ("tokenizer.ggml.scores", kv_array("tokenizer.ggml.scores", STR, ["x"] * len(TOKENS)), r"'tokenizer.ggml.scores' must be an array of float32"),
    ("tokenizer.ggml.token_type", kv_array("tokenizer.ggml.token_type", F32, [1.0] * len(TOKENS)), r"'tokenizer.ggml.token_type' must be an array"),
    ("tokenizer.ggml.model", kv("tokenizer.ggml.model", U32, 1), r"'tokenizer.ggml.model' is missing or not a string"),
    ("general.architecture", kv("general.architecture", U32, 1), r"'general.architecture' is missing or not a string"),
    ("general.architecture", kv("general.architecture", STR, "mamba9"), r"architecture 'mamba9' is not supported"),
    ("llama.block_count", kv("llama.block_count", STR, "1"), r"'llama.block_count' has the wrong type"),
    ("llama.block_count", kv_array("llama.block_count", U32, [1]), r"'llama.block_count' has the wrong type"),
    ("llama.block_count", None, r"'llama.block_count' is missing"),
    ("llama.embedding_length", kv("llama.embedding_length", U32, 0), r"'llama.embedding_length' = 0 is out of range"),
    ("llama.attention.head_count_kv", kv("llama.attention.head_count_kv", U32, 3), r"do not divide"),
    ("llama.attention.layer_norm_rms_epsilon", kv("llama.attention.layer_norm_rms_epsilon", F32, float("nan")), r"out of range"),
    ("tokenizer.ggml.add_bos_token", kv("tokenizer.ggml.add_bos_token", STR, "yes"), r"'tokenizer.ggml.add_bos_token' has the wrong type"),
])
def test_metadata_of_the_wrong_type(tmp_path, key, encoded, pattern):
    expect_error(tmp_path, valid_gguf().with_kv(key, encoded).build(), pattern)


@pytest.mark.parametrize("n_layers", [2, 1000, 2**31 - 1])
def test_block_count_beyond_the_tensors(tmp_path, n_layers):
    """A huge block count must not make validate() build millions of expected names."""
    bad = kv("llama.block_count", U32, n_layers)
    expect_error(tmp_path, valid_gguf().with_kv("llama.block_count", bad).build(),
                 r"blk\.1\.\w+\.weight' is missing|block_count")


# -- alignment ---------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", [0, 13, 2**31, 3 << 20])
def test_bad_alignment_value(tmp_path, alignment):
    bad = kv("general.alignment", U32, alignment)
    expect_error(tmp_path, valid_gguf().with_kv("general.alignment", bad).build(), rf"general.alignment {alignment} is not a power of two")


@pytest.mark.parametrize("encoded", [kv("general.alignment", U64, 32), kv("general.alignment", STR, "32"),
                                     kv("general.alignment", I32, 32), kv_array("general.alignment", U32, [32])])
def test_alignment_of_the_wrong_type(tmp_path, encoded):
    expect_error(tmp_path, valid_gguf().with_kv("general.alignment", encoded).build(), r"general.alignment must be uint32")


def test_custom_alignment_is_honoured(tmp_path):
    g = replace(valid_gguf(), alignment=64).with_kv("general.alignment", kv("general.alignment", U32, 64))
    path = tmp_path / "a64.gguf"
    path.write_bytes(g.build())
    full_load(path)
    assert Model.from_file(path).gguf.data_offset % 64 == 0


# -- tensor infos ------------------------------------------------------------------------------
def test_tensor_name_of_64_bytes(tmp_path):
    g = valid_gguf()
    long = replace(f32_tensor("x" * 64, 4), name="x" * 64)
    expect_error(tmp_path, replace(g, tensors=g.tensors + [long]).build(), r"name is longer than 63 bytes")


def test_tensor_name_of_63_bytes_is_fine(tmp_path):
    g = valid_gguf()
    path = tmp_path / "ok.gguf"
    path.write_bytes(replace(g, tensors=g.tensors + [f32_tensor("y" * 63, 4)]).build())
    full_load(path)


def test_duplicate_tensor_names(tmp_path):
    g = valid_gguf()
    expect_error(tmp_path, replace(g, tensors=g.tensors + [f32_tensor("output_norm.weight", D)]).build(),
                 r"duplicate tensor name 'output_norm.weight'")


@pytest.mark.parametrize("n_dims", [0, 5, 2**32 - 1])
def test_bad_number_of_dimensions(tmp_path, n_dims):
    dims = (D,) * min(n_dims, 5)
    g = valid_gguf().with_tensor("output_norm.weight", dims=dims, n_dims=n_dims)
    expect_error(tmp_path, g.build(), rf"'output_norm.weight' has {n_dims} dimensions|truncated")


@pytest.mark.parametrize("dim", [0, 2**64 - 1, 2**63])
def test_bad_dimension(tmp_path, dim):
    g = valid_gguf().with_tensor("output_norm.weight", dims=(dim,))
    expect_error(tmp_path, g.build(), rf"'output_norm.weight' has an invalid dimension {dim}")


def test_dimensions_whose_product_overflows(tmp_path):
    g = valid_gguf().with_tensor("output_norm.weight", dims=(2**32, 2**32))
    expect_error(tmp_path, g.build(), r"'output_norm.weight' dimensions .* overflow")


def test_dimensions_whose_product_exceeds_the_file(tmp_path):
    g = valid_gguf().with_tensor("output_norm.weight", dims=(2**31, 2**31 - 1))
    expect_error(tmp_path, g.build(), r"'output_norm.weight' data .* runs past the end")


@pytest.mark.parametrize("ggml_type,pattern", [
    (99, r"invalid type id 99"), (2**32 - 1, r"invalid type id 4294967295"), (2**31, r"invalid type id"),
    (4, r"invalid type id 4"), (16, r"IQ2_XXS, which Woolly does not support"),
])
def test_tensor_type_out_of_range(tmp_path, ggml_type, pattern):
    g = valid_gguf().with_tensor("output_norm.weight", ggml_type=ggml_type)
    expect_error(tmp_path, g.build(), rf"'output_norm.weight'.*{pattern}|{pattern}")


def test_row_length_not_a_multiple_of_the_block(tmp_path):
    g = valid_gguf().with_tensor("output_norm.weight", dims=(33,), ggml_type=GGML_Q8_0, data=b"\0" * 68)
    expect_error(tmp_path, g.build(), r"row length 33 is not a multiple of Q8_0's block size 32")


@pytest.mark.parametrize("offset,pattern", [
    (3, r"offset 3 is not aligned to 32"),
    (2**64 - 1, r"not aligned|past the end"),
    (2**64 - 32, r"runs past the end of the file"),
    (1 << 40, r"runs past the end of the file"),
])
def test_bad_tensor_offset(tmp_path, offset, pattern):
    g = valid_gguf().with_tensor("blk.0.ffn_down.weight", offset=offset)
    expect_error(tmp_path, g.build(), rf"'blk.0.ffn_down.weight'.*({pattern})")


def test_tensor_data_past_the_end_of_the_file(tmp_path):
    g = valid_gguf()
    data = g.build()
    last = g.tensors[-1]
    expect_error(tmp_path, data[:-4], rf"'{re.escape(last.name)}' data .* runs past the end of the file")


def test_overlapping_tensors(tmp_path):
    g = valid_gguf().with_tensor("blk.0.ffn_up.weight", offset=0)
    expect_error(tmp_path, g.build(), r"tensors '.+' and '.+' overlap")


# -- what the architecture needs --------------------------------------------------------------
@pytest.mark.parametrize("name", ["blk.0.ffn_up.weight", "token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"])
def test_missing_required_tensor(tmp_path, name):
    pattern = rf"'{re.escape(name)}' is missing" if name != "token_embd.weight" else r"token_embd|vocabulary"
    expect_error(tmp_path, valid_gguf().without_tensor(name).build(), pattern)


def test_required_tensor_with_the_wrong_shape(tmp_path):
    g = valid_gguf().with_tensor("blk.0.attn_k.weight", dims=(D, 2 * HEAD), data=b"\0" * (D * 2 * HEAD * 4))
    expect_error(tmp_path, g.build(), r"'blk.0.attn_k.weight' has shape \[32, 32\], expected \[32, 16\]")


def test_embedding_rows_differ_from_the_vocabulary(tmp_path):
    g = valid_gguf().with_tensor("token_embd.weight", dims=(D, 9), data=b"\0" * (D * 9 * 4))
    expect_error(tmp_path, g.build(), r"vocabulary has 8 tokens but token_embd has 9 rows")


# -- the vocabulary -----------------------------------------------------------------------------
@pytest.mark.parametrize("key,encoded", [
    ("tokenizer.ggml.scores", kv_array("tokenizer.ggml.scores", F32, [0.0] * 7)),
    ("tokenizer.ggml.token_type", kv_array("tokenizer.ggml.token_type", I32, [1] * 9)),
])
def test_vocabulary_arrays_of_different_lengths(tmp_path, key, encoded):
    n = 7 if "scores" in key else 9
    expect_error(tmp_path, valid_gguf().with_kv(key, encoded).build(), rf"'{re.escape(key)}' has {n} entries for 8 tokens")


@pytest.mark.parametrize("byte_token", ["<0x-1>", "<0xZZ>", "<0x1>", "<0x100>", "0x41", "<0x4 >", "<0x+1>"])
def test_malformed_byte_token(tmp_path, byte_token):
    tokens = list(TOKENS)
    tokens[3] = byte_token  # token 3 has type BYTE
    g = valid_gguf().with_kv("tokenizer.ggml.tokens", kv_array("tokenizer.ggml.tokens", STR, tokens))
    expect_error(tmp_path, g.build(), rf"byte token #3 .* is not of the form <0xHH>")


@pytest.mark.parametrize("key,token_id", [("bos", 8), ("eos", 2**32 - 1), ("unknown", 100), ("padding", 8), ("eot", 9)])
def test_special_token_id_beyond_the_vocabulary(tmp_path, key, token_id):
    full = f"tokenizer.ggml.{key}_token_id"
    g = valid_gguf().with_kv(full, kv(full, U32, token_id))
    expect_error(tmp_path, g.build(), rf"{re.escape(full)} {token_id} is outside the vocabulary of 8")


def test_bpe_vocabulary_without_merges(tmp_path):
    g = valid_gguf().with_kv("tokenizer.ggml.model", kv("tokenizer.ggml.model", STR, "gpt2"))
    expect_error(tmp_path, g.build(), r"needs 'tokenizer.ggml.merges'")


def test_empty_vocabulary(tmp_path):
    g = valid_gguf().with_kv("tokenizer.ggml.tokens", kv_array("tokenizer.ggml.tokens", STR, []))
    expect_error(tmp_path, g.build(), r"vocabulary is empty|entries for 0 tokens")


def test_invalid_utf8_in_names_does_not_escape(tmp_path):
    g = valid_gguf()
    bad = ("general.name", gstr("general.name") + u32(STR) + gstr(b"\xff\xfe bad"))
    path = tmp_path / "utf8.gguf"
    path.write_bytes(g.with_kv("general.name", bad).build())
    full_load(path)  # odd bytes in a name are not an error; they must not crash the loader either
    assert isinstance(Model.from_file(path).metadata.name, str)


# -- a chat template that tries to escape the sandbox -----------------------------------------
def test_chat_template_sandbox_escape_runs_nothing(tmp_path):
    marker = tmp_path / "escaped"
    template = f'{{{{ lipsum.__globals__["os"].popen("touch {marker}").read() }}}}'
    g = valid_gguf().with_kv("tokenizer.chat_template", kv("tokenizer.chat_template", STR, template))
    path = tmp_path / "evil.gguf"
    path.write_bytes(g.build())
    m = Model.from_file(path)
    m.validate()
    with pytest.raises(WoollyError) as ei:
        m.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(ei.value)
    assert not marker.exists()


# -- property test: mutations of a valid tiny model -----------------------------------------------
@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_bytes(request, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_model(path, arch=request.param, n_layers=1, n_merges=8)
    use_vocabulary(path)  # first-use imports (tokenizers, jinja2) stay out of the timed examples
    return path.read_bytes()


def _mutate(data: bytes, ops: list) -> bytes:
    out = bytearray(data)
    for op in ops:
        kind, a, b, c = op
        if not out:
            break
        if kind == "flip":
            out[a % len(out)] ^= (b % 255) + 1
        elif kind == "set64":  # overwrite 8 bytes with an extreme little-endian value
            pos = a % len(out)
            out[pos:pos + 8] = struct.pack("<Q", [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, 255, 64][b % 8])
        elif kind == "truncate":
            del out[a % (len(out) + 1):]
        elif kind == "splice":  # copy a slice of the file over another place
            src, dst, n = a % len(out), b % len(out), c % 64 + 1
            out[dst:dst + n] = out[src:src + n]
    return bytes(out)


def use_vocabulary(path: Path) -> None:
    """What a loaded model's vocabulary is for: tokenizing, decoding, the chat template."""
    m = Model.from_file(path)
    tok = m.tokenizer
    ids = tok.tokenize("Hello the world <|im_start|> é 😀")
    tok.decode(ids)
    m.apply_chat_template([{"role": "user", "content": "hi"}])


_op = st.tuples(st.sampled_from(["flip", "set64", "truncate", "splice"]),
                st.integers(0, 2**20), st.integers(0, 2**20), st.integers(0, 2**20))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=4), head_bias=st.booleans())
def test_mutated_files_load_cleanly_or_raise_a_woolly_error(tmp_path, tiny_bytes, ops, head_bias):
    """Model.from_file, validate, every tensor, then tokenizer and chat template: all or a WoollyError."""
    if head_bias:  # most structure lives in the first few KB: aim half of the examples there
        ops = [(k, a % 4096, b, c) if k != "splice" else (k, a % 4096, b % 4096, c) for k, a, b, c in ops]
    data = _mutate(tiny_bytes, ops)
    path = tmp_path / "mutant.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN weights from flipped bytes are data, not errors
        try:
            full_load(path)
            use_vocabulary(path)
        except WoollyError as e:
            # a corrupted chat template is the tokenizer layer's error, said as such
            assert e.code in ("MODEL_LOAD_FAILED", "TOKENIZER_ERROR"), (e.code, str(e))
            assert str(e) and "\n" not in str(e)
    assert time.perf_counter() - start < TIME_LIMIT_S


@pytest.mark.parametrize("key,encoded,pattern", [
    ("tokenizer.ggml.tokens",
     ("tokenizer.ggml.tokens", gstr("tokenizer.ggml.tokens") + u32(ARR) + u32(STR) + u64(len(TOKENS))
      + b"".join(gstr(t) for t in TOKENS[:5]) + gstr(b"\xff\xfe") + b"".join(gstr(t) for t in TOKENS[6:])),
     r"'tokenizer.ggml.tokens' entry #5 is not valid UTF-8"),
    ("tokenizer.chat_template",
     ("tokenizer.chat_template", gstr("tokenizer.chat_template") + u32(STR) + gstr(b"{{ '\xc3' }}")),
     r"'tokenizer.chat_template' entry #0 is not valid UTF-8"),
])
def test_vocabulary_text_that_is_not_utf8(tmp_path, key, encoded, pattern):
    """Tokenizers need real text: undecodable bytes in tokens, merges or the template are named."""
    expect_error(tmp_path, valid_gguf().with_kv(key, encoded).build(), pattern)
