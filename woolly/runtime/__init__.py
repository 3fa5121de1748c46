"""jit, buckets, KV cache, batched decode and sampling on device (the layer under the engine).

Pure entry points (in `entry`): prefill, decode_step, decode_and_sample, generate,
all_logits, token_logprobs, embed. `Runner` is the thin stateful shell around them.
"""
from woolly.runtime.cache import bucket, new_cache
from woolly.runtime.compile_cache import compile_cache_dir, enable_compile_cache
from woolly.runtime.entry import (all_logits, decode_and_sample, decode_step, embed, generate, prefill,
                                  token_logprobs)
from woolly.runtime.params import load_params
from woolly.runtime.runner import Runner
from woolly.runtime.device_sampling import SamplingParams, sample

__all__ = ["Runner", "SamplingParams", "all_logits", "bucket", "compile_cache_dir", "decode_and_sample",
           "decode_step", "embed", "enable_compile_cache", "generate", "load_params", "new_cache", "prefill",
           "sample", "token_logprobs"]
