"""Woolly: run GGUF language models on JAX."""
from woolly.errors import (
    ContextLengthExceeded, GenerationFailed, GpuError, InternalError, InvalidRequest, ModelLoadFailed,
    ModelNotFound, ModelNotLoaded, OutOfMemory, RateLimited, TokenizerError, Unauthorized, WoollyError,
)
from woolly.formats.quants import QuantizationType
from woolly.model import Model, ModelMetadata, Vocabulary

__version__ = "0.1.0"


def __getattr__(name):  # heavier parts load on first use, so `import woolly` stays quick
    lazy = {
        "quantize_model": "woolly.quantize",
        "Tokenizer": "woolly.tokenizers", "BPETokenizer": "woolly.tokenizers",
        "SentencePieceTokenizer": "woolly.tokenizers",
        "pull": "woolly.model_store", "list_models": "woolly.model_store",
        "WoollyClient": "woolly.client", "AsyncWoollyClient": "woolly.client",
        **{n: "woolly.engine" for n in ("Engine", "EngineConfig", "CacheConfig", "MmapConfig", "Session",
                                         "Sampler", "DefaultSampler", "MirostatSampler", "GenerationResult")},
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'woolly' has no attribute {name!r}")
