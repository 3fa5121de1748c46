"""Tiny random-weight GGUF models for fast tests, written with `gguf.GGUFWriter`.

`write_tiny_model(path, arch="llama" | "gemma3", qtype=...)` writes a complete model the
loader (and llama.cpp) accepts: every metadata key the family needs, a small but valid
vocabulary, weight matrices in `qtype`, norms and other 1-D tensors in F32, tied output.
Weights are N(0, 0.02) and norms near 1, so a forward pass stays numerically sane.

- llama: a GPT-2-style byte-level BPE vocabulary (3 specials, 256 byte symbols, merges
  learnt from a fixed corpus), ChatML template, pre-tokenizer "smollm" (as SmolLM2).
- gemma3: a SentencePiece-style vocabulary (`tokenizer.ggml.model = llama`) with scores,
  <0xHH> byte tokens and <start_of_turn>/<end_of_turn>, no chat template (as Gemma 3).

Matrices are encoded by `woolly.formats.quantizers` (gguf-py's reference quantizers for
the 32-weight formats, F16 and BF16; Woolly's own K-quant encoders, bit-exact with
llama.cpp's), so every type holds the same N(0, 0.02) weights up to its own error.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from woolly.formats.quantizers import quantize_rows
from woolly.formats.quants import BLOCK_SIZE, QuantizationType
from woolly.quantize import FILE_TYPE

CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs "
    "into the forest. Hello world! This is a tiny model for tests: it says hello, then it says "
    "the end. There is the thing that the others think is in there, then the three of them "
    "went to the theatre together."
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FAMILIES = ("llama", "gemma3", "qwen2", "qwen3", "phi3", "gemma2", "qwen3moe")
K_QUANTS = (QuantizationType.Q2_K, QuantizationType.Q3_K, QuantizationType.Q4_K,
            QuantizationType.Q5_K, QuantizationType.Q6_K)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[list[str]], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    words = [list(w) for w in words]
    merges = []
    for _ in range(n_merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [w[i] + w[i + 1]]
                i += 1
    return merges


def _corpus_words(space: str) -> list[str]:
    """The corpus split before each space, the space written as `space` (Ġ or ▁)."""
    words = CORPUS.split(" ")
    return [words[0]] + [space + w for w in words[1:]]


def bpe_vocabulary(n_merges: int = 64) -> dict:
    """GPT-2-style vocabulary: specials, then the 256 byte symbols, then one token per merge."""
    byte_map = bytes_to_unicode()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [[byte_map[b] for b in w.replace("Ġ", " ").encode("utf-8")] for w in _corpus_words("Ġ")]
    merges = learn_merges(words, n_merges)
    tokens = specials + list(byte_map.values()) + [a + b for a, b in merges]
    assert len(set(tokens)) == len(tokens)
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return dict(model="gpt2", pre="smollm", tokens=tokens, token_type=types, merges=[f"{a} {b}" for a, b in merges],
                scores=None, bos=1, eos=2, unk=0, pad=2, add_bos=False, add_space_prefix=False,
                chat_template=CHATML_TEMPLATE)


def spm_vocabulary(n_merges: int = 64) -> dict:
    """SentencePiece-style vocabulary: specials, <0xHH> byte tokens, characters, merged pieces."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    words = [list(w) for w in _corpus_words("▁")]
    chars = sorted({c for w in words for c in w})
    merges = learn_merges(words, n_merges)
    pieces = [a + b for a, b in merges]
    pieces = [p for i, p in enumerate(pieces) if p not in chars and p not in pieces[:i]]
    tokens = specials + byte_tokens + chars + pieces
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces))
    # SentencePiece merges the pair whose result scores highest: earlier merges score higher.
    scores = ([-1000.0] * len(specials) + [0.0] * 256 + [-1000.0 - i for i in range(len(chars))]
              + [-float(i) for i in range(len(pieces))])
    return dict(model="llama", pre="default", tokens=tokens, token_type=types, merges=None, scores=scores,
                bos=2, eos=1, unk=3, pad=0, add_bos=True, add_space_prefix=False, chat_template=None)


def encode_matrix(weights: np.ndarray, qtype: QuantizationType) -> tuple[np.ndarray, dict]:
    """A float matrix [rows, cols] -> (array, add_tensor keyword arguments) in `qtype`."""
    if weights.shape[1] % BLOCK_SIZE[qtype][0]:
        raise ValueError(f"row length {weights.shape[1]} is not a multiple of {qtype.name}'s block size")
    if qtype == QuantizationType.F32:
        return weights.astype(np.float32), {}
    if qtype == QuantizationType.F16:
        return weights.astype(np.float16), {}
    return quantize_rows(weights, qtype), {"raw_dtype": gguf.GGMLQuantizationType(int(qtype))}


def write_tiny_model(
    path: str | Path,
    arch: str = "llama",
    qtype: QuantizationType | str = QuantizationType.Q8_0,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int | None = None,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    ffn_dim: int | None = None,
    n_merges: int = 64,
    context_length: int = 512,
    sliding_window: int = 32,
    chat_template: str | None = None,
    rope_freqs: bool = False,
    rope_scaling_factor: float = 0.0,
    softcaps: tuple[float, float] = (50.0, 30.0),
    declare_window: bool = False,
    weight_scale: float = 0.02,
    experts: tuple[int, int] = (4, 2),
    vocab_from: str | Path | None = None,
) -> Path:
    """Write a tiny random model to `path` and return it.

    Sizes default to d_model 64 / ffn 128 (head_dim d_model // n_heads), or 256 / 256 when
    `qtype` is a K-quant, whose 256-weight blocks run along every row. `chat_template`: the
    file's template instead of the family's (ChatML for llama, none for gemma3).

    Other families (`FAMILIES`): qwen2 (q/k/v biases), qwen3 (q/k norms), phi3 (fused qkv and
    gate-up, LongRoPE factors), gemma2 (soft-caps `softcaps` = (attention, logits), alternating
    sliding layers), qwen3moe (qwen3 with `experts` = (count, used per token) SwiGLU experts of
    width ffn_dim in place of the MLP). llama: `rope_freqs` writes Llama 3.1-style frequency factors,
    `rope_scaling_factor` linear RoPE scaling, `declare_window` writes `sliding_window` as some
    Mistral files do. `weight_scale`: the matrices' standard deviation. `vocab_from`: a real GGUF
    whose tokenizer metadata (every `tokenizer.*` key: tokens, types, merges or scores, special
    ids, flags, template) replaces the synthetic vocabulary (`borrowed_vocabulary`).
    """
    qtype = QuantizationType.parse(qtype)
    if arch not in FAMILIES:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    spm = arch in ("gemma3", "gemma2", "phi3")   # phi3: Llama 2's SentencePiece vocabulary, as Phi-3
    k_quant = qtype in K_QUANTS
    d_model = d_model or (256 if k_quant else 64)
    ffn_dim = ffn_dim or (256 if k_quant else 128)
    head_dim = head_dim or d_model // n_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    borrowed = borrowed_vocabulary(vocab_from) if vocab_from is not None else None
    vocab = None if borrowed else spm_vocabulary(n_merges) if spm else bpe_vocabulary(n_merges)
    n_vocab = len(borrowed["tokenizer.ggml.tokens"][0] if borrowed else vocab["tokens"])
    rng = np.random.default_rng(seed)
    path = Path(path)

    w = gguf.GGUFWriter(str(path), arch)
    # llama.cpp gives a model *named* phi3 Phi-3's token attributes, looking up "</s>" and others by text.
    w.add_name(f"tiny-{arch.replace('phi3', 'phi')}-{qtype.name.lower()}")
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    if spm or arch in ("qwen3", "qwen3moe") or head_dim != d_model // n_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if not spm:
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(n_vocab)
        if declare_window:
            w.add_sliding_window(sliding_window)
    else:
        w.add_rope_freq_base(1000000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_sliding_window(sliding_window)
    if arch == "qwen3moe":
        w.add_expert_count(experts[0])
        w.add_expert_used_count(experts[1])
        w.add_expert_feed_forward_length(ffn_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(softcaps[0])
        w.add_final_logit_softcapping(softcaps[1])
    if rope_scaling_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scaling_factor)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(context_length)
    w.add_file_type(FILE_TYPE[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if borrowed:
        for key, (value, vtype, etype) in borrowed.items():
            if not (chat_template and key == "tokenizer.chat_template"):
                w.add_key_value(key, value, vtype, sub_type=etype)
        if chat_template:
            w.add_chat_template(chat_template)
    else:
        _add_vocabulary(w, vocab, chat_template)

    def matrix(name: str, rows: int, cols: int) -> None:  # numpy order: [rows, cols], rows of length cols
        data, kw = encode_matrix(rng.normal(0.0, weight_scale, (rows, cols)).astype(np.float32), qtype)
        w.add_tensor(name, data, **kw)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + rng.normal(0.0, 0.01, n)).astype(np.float32))

    def factors(name: str) -> None:  # RoPE frequency divisors [H/2], as Llama 3.1's grow toward low frequencies
        w.add_tensor(name, np.geomspace(1.0, 8.0, head_dim // 2).astype(np.float32))

    matrix("token_embd.weight", n_vocab, d_model)
    norm("output_norm.weight", d_model)
    if rope_freqs:
        factors("rope_freqs.weight")
    if arch == "phi3":
        factors("rope_factors_short.weight")
        w.add_tensor("rope_factors_long.weight", np.full(head_dim // 2, 16.0, np.float32))  # unused in context
    for i in range(n_layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", d_model)
        if arch == "phi3":
            matrix(b + "attn_qkv.weight", q_dim + 2 * kv_dim, d_model)
        else:
            matrix(b + "attn_q.weight", q_dim, d_model)
            matrix(b + "attn_k.weight", kv_dim, d_model)
            matrix(b + "attn_v.weight", kv_dim, d_model)
        if arch == "qwen2":
            for name, n in (("attn_q.bias", q_dim), ("attn_k.bias", kv_dim), ("attn_v.bias", kv_dim)):
                w.add_tensor(b + name, rng.normal(0.0, 0.5, n).astype(np.float32))
        matrix(b + "attn_output.weight", d_model, q_dim)
        norm(b + "ffn_norm.weight", d_model)
        if arch == "qwen3moe":
            # the router stays F32, as llama.cpp's converter keeps it (a near-tie must not flip on rounding)
            w.add_tensor(b + "ffn_gate_inp.weight", rng.normal(0.0, weight_scale, (experts[0], d_model)).astype(np.float32))
            for name, rows, cols in (("ffn_gate_exps", ffn_dim, d_model), ("ffn_up_exps", ffn_dim, d_model),
                                     ("ffn_down_exps", d_model, ffn_dim)):
                stacked = [encode_matrix(rng.normal(0.0, weight_scale, (rows, cols)).astype(np.float32), qtype)
                           for _ in range(experts[0])]
                w.add_tensor(b + name + ".weight", np.stack([d for d, _ in stacked]), **stacked[0][1])
        elif arch == "phi3":
            matrix(b + "ffn_up.weight", 2 * ffn_dim, d_model)
        else:
            matrix(b + "ffn_gate.weight", ffn_dim, d_model)
            matrix(b + "ffn_up.weight", ffn_dim, d_model)
        if arch != "qwen3moe":
            matrix(b + "ffn_down.weight", d_model, ffn_dim)
        if arch in ("gemma3", "qwen3", "qwen3moe"):
            norm(b + "attn_q_norm.weight", head_dim)
            norm(b + "attn_k_norm.weight", head_dim)
        if arch in ("gemma3", "gemma2"):
            norm(b + "post_attention_norm.weight", d_model)
            norm(b + "post_ffw_norm.weight", d_model)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_vocabulary(w: gguf.GGUFWriter, vocab: dict, chat_template: str | None) -> None:
    """A synthetic vocabulary's metadata (bpe_vocabulary / spm_vocabulary)."""
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_type"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    if vocab["merges"] is not None:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_unk_token_id(vocab["unk"])
    w.add_pad_token_id(vocab["pad"])
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab["add_space_prefix"])
    if chat_template or vocab["chat_template"]:
        w.add_chat_template(chat_template or vocab["chat_template"])


_borrowed: dict[str, dict] = {}


def borrowed_vocabulary(path: str | Path) -> dict:
    """Every `tokenizer.*` metadata key of a real GGUF -> {key: (value, GGUF type, element type)},
    read once per path (Woolly's own GGUF reader: gguf-py's takes seconds on a 262k vocabulary)."""
    key = str(path)
    if key not in _borrowed:
        from woolly.formats.gguf_file import GGUFFile

        f = GGUFFile(path)
        try:
            out = {}
            for name, field in f.fields.items():
                if not name.startswith("tokenizer."):
                    continue
                value = field.value.tolist() if isinstance(field.value, np.ndarray) else field.value
                etype = None if field.element_type is None else gguf.GGUFValueType(field.element_type)
                out[name] = (value, gguf.GGUFValueType(field.vtype), etype)
        finally:
            f.close()
        _borrowed[key] = out
    return _borrowed[key]
