"""`EngineConfig` and its builder, as the reference describes them."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class CacheConfig:
    """Prompt (prefix) cache: finished sequences' KV kept for reuse, bounded in bytes and age."""

    enabled: bool = True
    size: int = 1 << 30      # bytes of KV snapshots kept
    ttl: float = 3600.0      # seconds an unused snapshot is kept


@dataclass(frozen=True)
class MmapConfig:
    enabled: bool = True
    prefetch: bool = False
    huge_pages: bool = False


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 4           # concurrent sequences decoded together (slots)
    max_sequence_length: int = 2048   # tokens per sequence, prompt included
    enable_gpu: bool = False
    num_threads: int | None = None    # XLA:CPU sizes its own pool; used for the llama.cpp peer in bench
    mmap_enabled: bool = True
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    residency: str = "quantized"      # "quantized" (fast) or "dense" (exact f32) weights (woolly.ops.qmatmul)
    kv_cache_type: str = "f16"        # KV cache element: "f16" (llama.cpp's default), "f32" or "bf16" (runtime.cache)
    max_queue: int = 64               # requests waiting for a slot before `busy`
    max_embedding_tokens: int = 32768     # tokens in one `embed` call, all inputs together
    embedding_chunk_tokens: int = 4096    # padded tokens per embedding pass (bounds its memory)
    # Devices (woolly.runtime.sharding, docs/sharding.md): a ("data", "model") jax Mesh, or
    # tensor_parallel x data_parallel devices (data_parallel None: all the devices left).
    # Defaults: no mesh, one device, exactly the single-device path.
    tensor_parallel: int = 1          # devices the heads and MLP are split over ("model")
    data_parallel: int | None = 1     # devices the batch (slots, perplexity chunks) is split over ("data")
    mesh: Any = None                  # a jax.sharding.Mesh with axes ("data", "model"); overrides both

    def __post_init__(self):
        if not 1 <= self.max_batch_size <= 256:
            raise ValueError("max_batch_size must be between 1 and 256")
        if not 16 <= self.max_sequence_length <= 1 << 20:
            raise ValueError("max_sequence_length must be between 16 and 1048576")
        if self.residency not in ("dense", "quantized"):
            raise ValueError("residency must be 'dense' or 'quantized'")
        if self.kv_cache_type not in ("f32", "f16", "bf16"):   # woolly.runtime.cache.KV_CACHE_TYPES
            raise ValueError("kv_cache_type must be 'f32', 'f16' or 'bf16'")
        if self.max_embedding_tokens < 1 or self.embedding_chunk_tokens < 1:
            raise ValueError("max_embedding_tokens and embedding_chunk_tokens must be >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        if self.tensor_parallel < 1:
            raise ValueError("tensor_parallel must be >= 1")
        if self.data_parallel is not None and self.data_parallel < 1:
            raise ValueError("data_parallel must be >= 1 (or None: every device left)")
        if self.mesh is not None and tuple(getattr(self.mesh, "axis_names", ())) != ("data", "model"):
            raise ValueError("mesh must be a jax.sharding.Mesh with axes ('data', 'model') (sharding.make_mesh)")

    @property
    def single_device(self) -> bool:
        """No mesh given or asked for: the single-device path (known before any device is asked)."""
        return self.mesh is None and self.tensor_parallel == 1 and self.data_parallel == 1

    def make_mesh(self):
        """The mesh to run on, or None for the single-device path (built when a model loads)."""
        if self.mesh is not None:
            return self.mesh
        if self.single_device:
            return None
        import jax

        from woolly.runtime.sharding import make_mesh
        # This process's own devices: each process of a multi-host cluster runs its own engine
        # (a mesh over every host's devices would need the processes to step in lockstep).
        mesh = make_mesh(self.tensor_parallel, self.data_parallel, devices=jax.local_devices())
        return None if mesh.size == 1 else mesh

    @classmethod
    def default(cls) -> "EngineConfig":
        return cls()

    @classmethod
    def builder(cls) -> "EngineConfigBuilder":
        return EngineConfigBuilder()


class EngineConfigBuilder:
    """`EngineConfig.builder().max_batch_size(4)....build()`."""

    def __init__(self):
        self._kw: dict = {}
        self._cache = CacheConfig()

    def max_batch_size(self, size: int):
        self._kw["max_batch_size"] = size
        return self

    def max_sequence_length(self, length: int):
        self._kw["max_sequence_length"] = length
        return self

    def enable_gpu(self, enable: bool):
        self._kw["enable_gpu"] = enable
        return self

    def num_threads(self, threads: int):
        self._kw["num_threads"] = threads
        return self

    def enable_mmap(self, enable: bool):
        self._kw["mmap_enabled"] = enable
        return self

    def cache_size(self, size: int):
        self._cache = replace(self._cache, size=size)
        return self

    def cache_ttl(self, seconds: float):
        self._cache = replace(self._cache, ttl=seconds)
        return self

    def residency(self, mode: str):
        self._kw["residency"] = mode
        return self

    def kv_cache_type(self, kind: str):
        self._kw["kv_cache_type"] = kind
        return self

    def tensor_parallel(self, devices: int):
        self._kw["tensor_parallel"] = devices
        return self

    def data_parallel(self, devices: int | None):
        self._kw["data_parallel"] = devices
        return self

    def mesh(self, mesh):
        self._kw["mesh"] = mesh
        return self

    def build(self) -> EngineConfig:
        return EngineConfig(cache_config=self._cache, **self._kw)

