"""Prepared weights kept on disk, so a new process skips decoding and repacking them.

Quantized residency turns each GGUF matrix into codes, scales and biases in the CPU kernel's
grouped layout, with q/k/v and gate/up fused (`params.load_params`): numpy work on every block,
~0.5 s of SmolLM2's ~1 s load before the first token, the same result every time. The result
is a pure function of the file's bytes and of the preparing code, so it is written once, next
to the compile cache (~/.cache/woolly/weights, or WOOLLY_WEIGHTS_CACHE; "0" turns it off),
and a later load reads it back through a memory map and copies it to the device.

One entry per model path: `{hash of the path}.json` (the key, the tree, each array's offset,
dtype and shape, and the name of its data file) and that data file, `{hash}-{random}.bin` (the
arrays, 64-byte aligned). A new entry's data gets a new name and the index is replaced last,
so a reader never pairs an index with another entry's data. The key holds the file's size and
modification time, the residency and layout, and a hash of the code that prepares weights;
an entry whose key differs is rebuilt and overwritten, so a changed file or a new Woolly never
reads stale weights. Files under MIN_FILE_BYTES are not cached (their load is quick anyway).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

from woolly.ops.quantized_weight import QuantizedWeight

VERSION = 1
MIN_FILE_BYTES = 16 << 20
ALIGN = 64
# What the prepared tree depends on: the block formats, every op's layout code, the families'
# parameter names (models/, arch.py) and the loader itself (globs, so a new module counts too).
_CODE = ("formats/quants.py", "ops/*.py", "models/*.py", "arch.py", "runtime/params.py", "runtime/weights_cache.py")
_code_hash: str | None = None


def cache_dir() -> str | None:
    """$WOOLLY_WEIGHTS_CACHE (off when "0"/"off"/"false"/"no"), else ~/.cache/woolly/weights."""
    env = os.environ.get("WOOLLY_WEIGHTS_CACHE")
    if env is not None and env.lower() in ("0", "off", "false", "no", ""):
        return None
    return env or os.path.join(os.path.expanduser("~"), ".cache", "woolly", "weights")


def code_hash() -> str:
    global _code_hash
    if _code_hash is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for pattern in _CODE:
            for path in sorted(root.glob(pattern)):
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        _code_hash = h.hexdigest()[:32]
    return _code_hash


def key_for(path: str | os.PathLike, residency: str, grouped: bool) -> dict | None:
    """What an entry must match; None when this file is not cached (too small, not a file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size < MIN_FILE_BYTES:
        return None
    return {"version": VERSION, "path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "residency": residency, "grouped": bool(grouped), "code": code_hash()}


def _index_path(key: dict, root: str) -> Path:
    return Path(root) / (hashlib.sha256(key["path"].encode()).hexdigest()[:24] + ".json")


def read(key: dict):
    """The cached host tree for `key` (numpy arrays viewing a read-only map), or None."""
    root = cache_dir()
    if root is None or key is None:
        return None
    index_path = _index_path(key, root)
    try:
        index = json.loads(index_path.read_text())
        if index.get("key") != key:
            return None
        with open(index_path.parent / os.path.basename(index["data"]), "rb") as f:
            if os.fstat(f.fileno()).st_size != index["nbytes"]:
                return None
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if index["nbytes"] else b""
    except (OSError, ValueError, KeyError, TypeError):
        return None

    def decode(node):
        if node is None:
            return None
        kind, body = next(iter(node.items()))
        if kind == "a":
            offset, dtype, shape = body
            n = int(np.prod(shape, dtype=np.int64))
            return np.frombuffer(buf, dtype=np.dtype(dtype), count=n, offset=offset).reshape(shape)
        if kind == "d":
            return {k: decode(v) for k, v in body.items()}
        if kind == "l":
            return [decode(v) for v in body]
        if kind == "qw":
            return QuantizedWeight(decode(body["q"]), decode(body["scale"]), decode(body["bias"]), body["kind"],
                                   body["sub"], body["off"], body["grouped"])
        raise ValueError(f"unknown node {kind!r}")
    try:
        return decode(index["tree"])
    except (ValueError, KeyError, TypeError):
        return None


class Writer:
    """Streams host arrays into a new entry while the weights are prepared (no second copy of
    the model in memory); `commit(tree)` writes the index last, so a half-written entry is
    never read. Any OSError (read-only home, full disk) just leaves the model uncached."""

    def __init__(self, key: dict | None):
        self.key, self._f, self._offset, self._tmp = key, None, 0, None
        root = cache_dir()
        if root is None or key is None:
            return
        try:
            os.makedirs(root, exist_ok=True)
            self._index_path = _index_path(key, root)
            fd, self._tmp = tempfile.mkstemp(dir=root, prefix=self._index_path.stem + "-", suffix=".bin")
            self._f = os.fdopen(fd, "wb")
        except OSError:
            self._f = None

    def _array(self, a: np.ndarray) -> dict:
        a = np.ascontiguousarray(a)
        pad = -self._offset % ALIGN
        self._f.write(b"\0" * pad)
        self._offset += pad
        node = {"a": [self._offset, a.dtype.str if a.dtype.kind != "V" else a.dtype.name, list(a.shape)]}
        self._f.write(a.tobytes() if not a.flags.c_contiguous else memoryview(a).cast("B"))
        self._offset += a.nbytes
        return node

    def add(self, tree):
        """Write the arrays of a host tree now; -> its index node (for `commit`)."""
        if self._f is None:
            return None
        try:
            return self._encode(tree)
        except (OSError, TypeError):   # a full disk, or a leaf this format does not hold
            self._abort()
            return None

    def _encode(self, node):
        if node is None:
            return None
        if isinstance(node, np.ndarray):
            return self._array(node)
        if isinstance(node, dict):
            return {"d": {k: self._encode(v) for k, v in node.items()}}
        if isinstance(node, list):
            return {"l": [self._encode(v) for v in node]}
        if isinstance(node, QuantizedWeight):
            return {"qw": {"q": self._encode(np.asarray(node.q)), "scale": self._encode(np.asarray(node.scale)),
                           "bias": None if node.bias is None else self._encode(np.asarray(node.bias)),
                           "kind": node.kind, "sub": node.sub, "off": node.off, "grouped": node.grouped}}
        raise TypeError(f"cannot cache a {type(node).__name__}")

    def commit(self, tree_node: dict) -> None:
        """Publish the entry (replacing this path's previous one, whose data file goes)."""
        if self._f is None or tree_node is None:
            self._abort()
            return
        try:
            self._f.close()
            self._f = None
            try:
                old = json.loads(self._index_path.read_text()).get("data")
            except (OSError, ValueError, AttributeError):
                old = None
            text = json.dumps({"key": self.key, "nbytes": self._offset, "data": os.path.basename(self._tmp),
                               "tree": tree_node})
            fd, tmp = tempfile.mkstemp(dir=self._index_path.parent, prefix=self._index_path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self._index_path)
            if isinstance(old, str) and os.path.basename(old) != os.path.basename(self._tmp):
                try:   # a process still reading it keeps its map: the inode lives until unmapped
                    os.unlink(self._index_path.parent / os.path.basename(old))
                except OSError:
                    pass
        except OSError:
            self._abort()

    def _abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None
