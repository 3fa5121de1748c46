"""The forward pass against llama.cpp (llama-cpp-python), the reference implementation of GGUF.

Tolerances say where the two computations differ on purpose:
- F32 weights: llama.cpp multiplies in f32 too, so logits agree to ~1e-4 of their scale (gemma3
  ~1e-3: llama.cpp's GELU reads an f16 table). KV caches are made f32 on both sides.
- F16/BF16 weights: llama.cpp rounds the activations to that type before the dot product.
- Quantized weights: llama.cpp quantizes the activations to 8 bits (Q8_0/Q8_1/Q8_K), which moves
  real-model logits by up to ~1.5 (median ~0.16, measured on both real models). Woolly's dense
  residency multiplies the exact dequantized weights in f32; its quantized residency rounds the
  activations to int8 per block of 32 (Q8_0's rule) as llama.cpp does. Greedy tokens may differ
  where two candidates are within a near-tie; perplexities agree to well under 1%.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from oracle import llama_cpp_model
from tiny_models import write_tiny_model
from woolly.formats.quants import QuantizationType
from woolly.model_file import Model
from woolly.quantize import quantize_model
from woolly.runtime import Runner, entry
from woolly.runtime.cache import bucket
from woolly.runtime.params import load_params

F32_KV = dict(type_k=0, type_v=0)   # GGML_TYPE_F32 caches in llama.cpp, as Woolly keeps them
NEAR_TIE = 1.0                      # logits: what llama.cpp's 8-bit activations can swap (see above)
PROMPTS = [
    b"The capital of France is",
    b"def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    b"Once upon a time, in a small village by the sea, there lived",
    b"<|im_start|>user\nWhat are the three primary colours?<|im_end|>\n<|im_start|>assistant\n",
]
TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()


def llama_cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of tokens, from an empty context -> [T, V]."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)])


def relative_error(mine: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(mine - ref).max() / np.abs(ref).max())


# -- tiny random models: every block format, both families --------------------------------------
TINY_TOLERANCE = {QuantizationType.F32: 1e-3, QuantizationType.F16: 2e-2, QuantizationType.BF16: 2e-2}
QUANTIZED_TOLERANCE = 0.08


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_models_match_llama_cpp(tmp_path, arch):
    # gemma3: 6 layers (5 sliding + 1 global) and 48 tokens through a 32-token window.
    for qtype in QuantizationType:
        path = str(write_tiny_model(tmp_path / f"{qtype.name}.gguf", arch=arch, qtype=qtype,
                                    n_layers=6 if arch == "gemma3" else 2))
        model = Model.from_file(path)
        tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, 48).tolist()
        ref = llama_cpp_logits(llama_cpp_model(path, logits_all=True, n_ctx=64, **F32_KV), tokens)
        mine = np.asarray(entry.all_logits(load_params(model), jnp.asarray([tokens]), cfg=model.config))[0]
        err, tol = relative_error(mine, ref), TINY_TOLERANCE.get(qtype, QUANTIZED_TOLERANCE)
        print(f"tiny {arch} {qtype.name}: max |woolly - llama.cpp| / max |logit| = {err:.2e} (tolerance {tol})")
        assert err <= tol


# -- real models ---------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.oracle
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_exact_forward_on_f32_copy(tmp_path, name):
    """With the weights written out as F32, llama.cpp does no activation quantization: the
    forward, prefill in chunks and decode past gemma3's 512-token window all match it closely."""
    f32_path = str(quantize_model(name, tmp_path / "f32.gguf", "F32"))
    model = Model.from_file(name)  # the original file: Woolly dequantizes the same values itself
    runner = Runner(model, cache_length=1024)
    llm = llama_cpp_model(f32_path, logits_all=True, n_ctx=1024, **F32_KV)
    tokens = llm.tokenize(TEXT.encode())[:530]
    ref = llama_cpp_logits(llm, tokens)                                                 # [530, V]
    errs = [relative_error(np.asarray(runner.prefill(tokens[:520])), ref[519])]        # chunks 512 + 8
    for pos in range(520, 530):
        errs.append(relative_error(np.asarray(runner.decode([tokens[pos]], [pos])[0]), ref[pos]))
    print(f"{name}: max relative logit error over prefill + decode to position 529: {max(errs):.2e}")
    assert max(errs) <= 2e-3


@pytest.fixture(scope="module", params=[("smollm2-135m-instruct", "dense"), ("gemma3-270m", "dense"),
                                        ("smollm2-135m-instruct", "quantized"), ("gemma3-270m", "quantized")],
                ids=lambda p: "-".join(p))
def real(request):
    """(model, params, llama.cpp) per model and residency: quantized residency multiplies with
    int8 activations, as llama.cpp does, dense in f32."""
    name, residency = request.param
    model = Model.from_file(name)
    return model, load_params(model, residency), llama_cpp_model(str(model.path), logits_all=True, n_ctx=512)


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of n tokens and the logits that chose each -> (tokens, [n, V])."""
    llm.reset()
    llm.eval(prompt)
    out, rows = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1])
        out.append(int(row.argmax()))
        rows.append(row)
        llm.eval([out[-1]])
    return out, np.stack(rows)


@pytest.mark.real
@pytest.mark.oracle
def test_greedy_continuations_agree(real):
    model, params, llm = real
    cfg, n = model.config, 32
    agree, total = 0, 0
    for text in PROMPTS:
        prompt = llm.tokenize(text, special=True)
        ref_tokens, ref_rows = llama_cpp_greedy(llm, prompt, n)
        # Teacher-forced on llama.cpp's continuation, so one disagreement does not cascade.
        seq = prompt + ref_tokens
        padded = seq + [0] * (bucket(len(seq)) - len(seq))   # causal: padding after changes nothing before
        mine_rows = np.asarray(entry.all_logits(params, jnp.asarray([padded]), cfg=cfg))[0, len(prompt) - 1:len(seq) - 1]
        mine_tokens = mine_rows.argmax(-1)
        for i in np.flatnonzero(mine_tokens != np.array(ref_tokens)):
            a, b = ref_tokens[i], int(mine_tokens[i])
            ref_gap, my_gap = ref_rows[i, a] - ref_rows[i, b], mine_rows[i, b] - mine_rows[i, a]
            print(f"  step {i}: llama.cpp {a} by {ref_gap:.3f} over {b}; woolly {b} by {my_gap:.3f} over {a}")
            assert ref_gap <= NEAR_TIE and my_gap <= NEAR_TIE, "a disagreement that is not a near-tie"
        same = int((mine_tokens == np.array(ref_tokens)).sum())
        agree, total = agree + same, total + n
        # Free-running greedy on device, for the record: how long the two stay identical.
        free = generate_greedy(model, params, prompt, n)
        prefix = next((i for i, (x, y) in enumerate(zip(free, ref_tokens)) if x != y), n)
        print(f"{model.name} {text[:30]!r}: {same}/{n} teacher-forced agree, free-running identical for {prefix}")
    print(f"{model.name}: {agree}/{total} = {agree / total:.1%} of greedy tokens agree with llama.cpp")
    assert agree / total >= 0.9


def generate_greedy(model: Model, params: dict, prompt: list[int], n: int) -> list[int]:
    runner = Runner(model, params=params, slots=1, cache_length=bucket(len(prompt) + n))
    return runner.generate([prompt], max_tokens=n)[0]


def perplexity(logprob_chunks: list[np.ndarray]) -> float:
    return float(np.exp(-np.mean(np.concatenate(logprob_chunks))))


@pytest.mark.real
@pytest.mark.oracle
def test_perplexity_within_one_percent(real):
    """llama-perplexity's method: chunks of 256 tokens (first token -> BOS where the model adds
    one), each scored over its second half."""
    model, params, llm = real
    n_ctx, vocab = 256, model.vocabulary
    tokens = llm.tokenize(TEXT.encode(), add_bos=False)
    assert len(tokens) >= 3 * n_ctx
    mine, ref = [], []
    for c in range(len(tokens) // n_ctx):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        if vocab.add_bos:
            chunk = [vocab.bos_id] + chunk[1:]
        targets = np.array(chunk[n_ctx // 2 + 1:])
        logits = llama_cpp_logits(llm, chunk)[n_ctx // 2:-1]                              # [n/2 - 1, V]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        ref.append(logp[np.arange(len(targets)), targets])
        mine.append(np.asarray(entry.token_logprobs(params, jnp.asarray([chunk]), cfg=model.config))[0, n_ctx // 2:])
    ppl_mine, ppl_ref = perplexity(mine), perplexity(ref)
    print(f"{model.name}: perplexity woolly {ppl_mine:.4f}, llama.cpp {ppl_ref:.4f}, "
          f"{abs(ppl_mine / ppl_ref - 1):.3%} apart over {len(mine)} chunks of {n_ctx}")
    assert abs(ppl_mine / ppl_ref - 1) <= 0.01
