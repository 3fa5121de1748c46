"""One module per architecture family; `forward(params, tokens, positions, cache, cfg)`."""
from woolly.models.base import KVCache
from woolly.models.families import ARCHITECTURES, architecture, forward, forward_hidden, output_logits

__all__ = ["ARCHITECTURES", "KVCache", "architecture", "forward", "forward_hidden", "output_logits"]
