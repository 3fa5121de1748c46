"""A defensive GGUF reader over a memory map (host side, numpy, no JAX).

Files come from the internet, so every count and length is checked against the bytes
left *before* anything is allocated, and every failure is a `ModelLoadFailed` that names
the problem. Tensor data is never copied: `raw(name)` is a view into the map.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from woolly.errors import ModelLoadFailed, ModelNotFound
from woolly.formats.quants import BLOCK_SIZE, OTHER_GGML_TYPES, QuantizationType, row_nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20  # no real file pads more; larger values are corrupt or hostile
MAX_NAME_BYTES = 63      # GGML_MAX_NAME = 64 with the terminating NUL
MAX_DIMS = 4

# GGUF value types: id -> (name, struct format or None for variable size)
_SCALARS = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


def value_type_name(vtype: int) -> str:
    if vtype == STRING:
        return "string"
    if vtype == ARRAY:
        return "array"
    return _SCALARS[vtype][0] if vtype in _SCALARS else f"type {vtype}"


@dataclass(frozen=True)
class Field:
    """One metadata key: its value (str, number, list or numpy array) and GGUF type."""

    value: Any
    vtype: int
    element_type: int | None = None  # for arrays


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]        # GGUF order: innermost (row length) first
    qtype: QuantizationType
    offset: int                  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order: rows last, i.e. reversed GGUF dims."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; errors say where they happened."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0
        self.where = "header"

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise ModelLoadFailed(
                f"GGUF file is truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.left()} left (in the {self.where})")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="surrogateescape")

    def strings(self, what: str, n: int) -> list[str]:
        """n strings in a row (a vocabulary: ~50k-260k of them), as `string` reads each, in one
        tight loop: the error messages are only formatted for a bad length."""
        buf, pos, size, length, out = self.buf, self.pos, self.size, _U64.unpack_from, []
        append = out.append
        try:
            for _ in range(n):
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8, f"length of {what}")
                (k,) = length(buf, pos)
                pos += 8
                if k > size - pos:
                    self.pos = pos
                    self.need(k, what)
                append(buf[pos:pos + k].decode("utf-8", errors="surrogateescape"))
                pos += k
        finally:
            self.pos = pos
        return out

    def array(self, what: str, n: int, dtype) -> np.ndarray:
        size = n * np.dtype(dtype).itemsize
        self.need(size, what)
        a = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += size
        return a


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _map_regular_file(path: Path) -> mmap.mmap:
    """Map `path` read-only; only a regular file with bytes passes, each other case one clear error.

    Opened without blocking (a FIFO would wait for a writer) and checked on the open descriptor
    (no race with a path swapped meanwhile): directories, FIFOs and devices (/dev/zero would read
    forever) are refused before a byte is read; files that cannot be mapped (sysfs, whose size
    is a page whatever the contents) and /proc files (size 0) end as ModelLoadFailed too."""
    name = path.name
    if not os.path.exists(path):   # a dangling link too
        raise ModelNotFound(f"model file not found: {name}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ModelLoadFailed(f"cannot open the model file {name}: {e.strerror or type(e).__name__}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadFailed(f"the model file {name} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size == 0:
            raise ModelLoadFailed("GGUF file is empty")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as e:   # e.g. ENODEV: a sysfs attribute, which no file system maps
        raise ModelLoadFailed(f"cannot map the model file {name} ({e.strerror or type(e).__name__}): "
                              f"is it a file on disk?") from None
    finally:
        os.close(fd)


class GGUFFile:
    """A parsed GGUF file: `fields` (metadata), `tensors` (infos), `raw(name)` views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mmap = _map_regular_file(self.path)
        self.file_size = len(self._mmap)
        try:
            self._parse()
        except ModelLoadFailed:
            self.close()
            raise
        except (ValueError, OverflowError, struct.error) as e:  # belt and braces: still one clear error
            self.close()
            raise ModelLoadFailed(f"GGUF file is corrupt: {e}") from None

    # -- parsing ---------------------------------------------------------------------
    def _parse(self) -> None:
        c = _Cursor(self._mmap, self.file_size)
        if self.file_size < 4 or bytes(self._mmap[:4]) != GGUF_MAGIC:
            raise ModelLoadFailed("not a GGUF file (bad magic)")
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version >= 1 << 16 else ""
            raise ModelLoadFailed(f"unsupported GGUF version {self.version}{hint}; supported: 2, 3")
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # Each KV takes >= 13 bytes (key length, type, one byte of value); each tensor info >= 24.
        if n_kv * 13 > c.left():
            raise ModelLoadFailed(f"GGUF metadata count {n_kv} is larger than the file could hold")
        if n_tensors * 24 > c.left():
            raise ModelLoadFailed(f"GGUF tensor count {n_tensors} is larger than the file could hold")

        c.where = "metadata"
        fields: dict[str, Field] = {}
        for i in range(n_kv):
            key = c.string(f"key #{i}")
            if key in fields:
                raise ModelLoadFailed(f"duplicate metadata key {key!r}")
            vtype = c.u32(f"type of {key!r}")
            fields[key] = self._read_value(c, vtype, key)
        self.fields = fields

        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in fields:
            f = fields["general.alignment"]
            if f.vtype != 4:
                raise ModelLoadFailed(f"general.alignment must be uint32, got {value_type_name(f.vtype)}")
            alignment = int(f.value)
            if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
                raise ModelLoadFailed(f"general.alignment {alignment} is not a power of two up to {MAX_ALIGNMENT}")
        self.alignment = alignment

        c.where = "tensor infos"
        infos = []
        names = set()
        for i in range(n_tensors):
            name = c.string(f"name of tensor #{i}")
            if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
                raise ModelLoadFailed(f"tensor #{i} name is longer than {MAX_NAME_BYTES} bytes")
            if name in names:
                raise ModelLoadFailed(f"duplicate tensor name {name!r}")
            names.add(name)
            n_dims = c.u32(f"n_dims of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelLoadFailed(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = tuple(c.u64(f"dims of {name!r}") for _ in range(n_dims))
            for d in dims:
                if d == 0 or d >= 1 << 63:
                    raise ModelLoadFailed(f"tensor {name!r} has an invalid dimension {d}")
            n_el = 1
            for d in dims:  # Python ints: no overflow
                n_el *= d
            if n_el >= 1 << 63:
                raise ModelLoadFailed(f"tensor {name!r} dimensions {dims} overflow")
            type_id = c.u32(f"type of {name!r}")
            qtype = self._tensor_type(name, type_id)
            bs = BLOCK_SIZE[qtype][0]
            if dims[0] % bs:
                raise ModelLoadFailed(
                    f"tensor {name!r} row length {dims[0]} is not a multiple of {qtype.name}'s block size {bs}")
            rel = c.u64(f"offset of {name!r}")
            if rel % alignment:
                raise ModelLoadFailed(f"tensor {name!r} offset {rel} is not aligned to {alignment}")
            infos.append((name, dims, qtype, rel, row_nbytes(qtype, dims[0]) * (n_el // dims[0])))

        data_start = -(-c.pos // alignment) * alignment
        if data_start > self.file_size and infos:
            raise ModelLoadFailed("GGUF file is truncated before its tensor data")
        self.data_offset = data_start
        tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, rel, nbytes in infos:
            start = data_start + rel
            if start + nbytes > self.file_size:
                raise ModelLoadFailed(
                    f"tensor {name!r} data (offset {rel}, {nbytes} bytes) runs past the end of the file")
            tensors[name] = TensorInfo(name, dims, qtype, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ModelLoadFailed(f"tensors {n0!r} and {n1!r} overlap")
        self.tensors = tensors

    @staticmethod
    def _tensor_type(name: str, type_id: int) -> QuantizationType:
        try:
            return QuantizationType(type_id)
        except ValueError:
            if type_id in OTHER_GGML_TYPES:
                raise ModelLoadFailed(
                    f"tensor {name!r} uses type {OTHER_GGML_TYPES[type_id]}, which Woolly does not support") from None
            raise ModelLoadFailed(f"tensor {name!r} has an invalid type id {type_id}") from None

    def _read_value(self, c: _Cursor, vtype: int, key: str) -> Field:
        if vtype in _SCALARS:
            v = c.unpack(_SCALARS[vtype][1], f"value of {key!r}")
            return Field(v, vtype)
        if vtype == STRING:
            return Field(c.string(f"value of {key!r}"), vtype)
        if vtype == ARRAY:
            etype = c.u32(f"element type of {key!r}")
            n = c.u64(f"length of {key!r}")
            if etype == ARRAY:
                raise ModelLoadFailed(f"metadata {key!r} is a nested array, which GGUF readers do not support")
            if etype == STRING:
                if n * 8 > c.left():
                    raise ModelLoadFailed(f"metadata {key!r} claims {n} strings, more than the file could hold")
                return Field(c.strings(f"element of {key!r}", n), vtype, etype)
            if etype in _NUMPY:
                if n * np.dtype(_NUMPY[etype]).itemsize > c.left():
                    raise ModelLoadFailed(f"metadata {key!r} claims {n} elements, more than the file could hold")
                return Field(c.array(f"{key!r}", n, _NUMPY[etype]), vtype, etype)
            raise ModelLoadFailed(f"metadata {key!r} has an invalid array element type {etype}")
        raise ModelLoadFailed(f"metadata {key!r} has an invalid value type {vtype}")

    # -- access ----------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view [rows..., row_bytes] into the map."""
        t = self.tensors[name]
        a = np.frombuffer(self._mmap, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return a.reshape(*t.shape[:-1], row_nbytes(t.qtype, t.dims[0]))

    def release_pages(self) -> None:
        """Drop the map's pages from this process's resident memory (MADV_DONTNEED). The map
        stays valid: a later read faults its pages back in from the page cache or the file."""
        mm = getattr(self, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        mm, self._mmap = getattr(self, "_mmap", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views still alive; the map closes when they go
                pass
