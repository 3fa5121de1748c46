"""The peer: llama.cpp through llama-cpp-python (the `peer` extra), imported only when asked for."""
from __future__ import annotations

import time

from woolly.bench.measure import SAMPLING, BenchConfig, memory_snapshot, prompt_text


# -- llama.cpp (llama-cpp-python) -------------------------------------------------------------------------
def plain_cpu_buffers(llama_cpp) -> None:
    """Load weights into plain CPU buffers (llama_model_params.use_extra_bufts = False).

    This machine's CPU reports AMX, and llama.cpp's AMX/repacked weight buffers segfault
    here on the first quantized matmul; `Llama()` has no option for it, so the default
    params it starts from are patched once (tests/oracle.py loads llama.cpp through here too).
    """
    import llama_cpp.llama as llama_module

    if getattr(llama_module.llama_cpp, "_woolly_plain_buffers", False):
        return
    default_params = llama_cpp.llama_model_default_params

    def plain_buffer_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain_buffer_params
    llama_module.llama_cpp._woolly_plain_buffers = True


def import_llama_cpp():
    from woolly.errors import InvalidRequest

    try:
        import llama_cpp
    except ImportError:
        raise InvalidRequest("--compare llama-cpp needs llama-cpp-python: pip install 'woolly[peer]'") from None
    plain_cpu_buffers(llama_cpp)
    return llama_cpp


def new_llama(path: str, threads: int, n_ctx: int = 1024):
    llama_cpp = import_llama_cpp()
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False, seed=0)


class LlamaSide:
    name = "llama_cpp"

    def __init__(self, cfg: BenchConfig, path: str):
        self.cfg, self.path = cfg, path
        self.llm = None
        self.native: LlamaNative | None = None
        self.memory: dict = {}

    def load(self) -> float:
        import_llama_cpp()
        before = memory_snapshot()
        t0 = time.perf_counter()
        self.llm = new_llama(self.path, self.cfg.threads)
        dt = time.perf_counter() - t0
        after = memory_snapshot()
        self.memory = {"rss_bytes": after["rss"] - before["rss"],
                       "rss_anon_bytes": after["rss_anon"] - before["rss_anon"]}
        return dt

    def prefill(self, ids: list[int]) -> float:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)

    def _run(self, ids: list[int], n: int) -> tuple[float, float, int]:
        """-> (time of the first token, time of the last, tokens after the first)."""
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        t_first = None
        count = 0
        for _ in llm.generate(ids, top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"], min_p=SAMPLING["min_p"],
                              temp=SAMPLING["temperature"], repeat_penalty=1.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            else:
                count += 1
            if count >= n:
                break
        return t_first - t0, time.perf_counter() - t0, count

    def decode(self, ids: list[int], n: int, seed: int) -> tuple[float, int]:
        first, last, count = self._run(ids, n)
        return count / (last - first), count

    def decode_one_thread(self, ids: list[int], n: int) -> float:
        """Decode with 1 thread instead of `threads`: on an oversubscribed machine llama.cpp's
        spinning thread barriers collapse, and this shows it (a contention check, not a figure)."""
        import llama_cpp

        ctx = self.llm._ctx.ctx
        llama_cpp.llama_set_n_threads(ctx, 1, 1)
        try:
            first, last, count = self._run(ids, n)
        finally:
            llama_cpp.llama_set_n_threads(ctx, self.cfg.threads, self.cfg.threads)
        return count / (last - first)

    def aggregate_all(self, sessions: tuple[int, ...], n_tokens: int, seed: int) -> dict:
        """N sessions one after another (llama-cpp-python serves one sequence at a time): the
        first N of max(sessions) sequential runs are the N-session figure -> {N: (tok/s, tokens)}."""
        total, out = 0, {}
        t0 = time.perf_counter()
        for i in range(max(sessions)):
            ids = self.llm.tokenize(prompt_text(12, seed * 100 + i).encode(), add_bos=True)
            _, _, count = self._run(ids, n_tokens - 1)
            total += count + 1
            if i + 1 in sessions:
                out[i + 1] = (total / (time.perf_counter() - t0), total)
        return out

    def ttft_warmup(self, ids: list[int]) -> None:
        self.prefill(ids[:16])
        self._run(ids[:16], 2)
        self.native = LlamaNative(self.llm._model.model, self.cfg.threads, max(self.cfg.sessions))
        self.native.prefill(ids[:16])
        self.native.generate([ids[:16]] * max(self.cfg.sessions), 2, 0)

    # llama.cpp's own batching, the same weights (`LlamaNative`)
    def native_prefill(self, ids: list[int]) -> float:
        return self.native.prefill(ids)

    def native_decode(self, ids: list[int], n: int, seed: int) -> tuple[float, int]:
        """Batch-1 decode tokens/s after the first token, one llama_decode per token (as Woolly's
        decode: retried with another seed when an end-of-generation token cuts it short)."""
        best = None
        for attempt in range(3):
            _, total, rate = self.native.generate([ids], n + 1, seed + 1000 * attempt)
            if rate and (best is None or total - 1 > best[1]):
                best = (rate, total - 1)
            if total - 1 >= n:
                break
        return best if best else (None, 0)

    def native_aggregate(self, n_sessions: int, n_tokens: int, seed: int) -> tuple[float, int]:
        """N sequences in one llama_batch per step (llama-server's parallel slots), the prompts
        Woolly's aggregate uses -> (generated tokens / wall time, tokens)."""
        prompts = [self.llm.tokenize(prompt_text(12, seed * 100 + i).encode(), add_bos=True)
                   for i in range(n_sessions)]
        rate, total, _ = self.native.generate(prompts, n_tokens, seed)
        return rate, total

    def close(self) -> None:
        if getattr(self, "native", None) is not None:
            self.native.close()
            self.native = None
        self.llm = None


# -- llama.cpp's own batching (llama-cpp-python's low-level API) -----------------------------------------
class LlamaNative:
    """llama.cpp without llama-cpp-python's Python loop, as llama-server drives it.

    One context with `n_seq_max` sequences (llama-server's parallel slots) in a unified KV cache of
    `n_seq_max` x `seq_len` cells, n_batch = n_ubatch = 512, flash attention left to llama.cpp
    (`auto`, llama-server's default). Every step is one `llama_decode` of one `llama_batch` holding
    every live sequence's token (its own `seq_id` and position); each sequence samples with its
    own native sampler chain (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8, seeded).
    Shares the weights of the `Llama` the sequential peer loaded (`model`, a llama_model pointer).
    """

    def __init__(self, model, threads: int, n_seq_max: int, seq_len: int = 512, n_batch: int = 512):
        import llama_cpp

        self.lib, self.model, self.n_seq_max, self.n_batch = llama_cpp, model, n_seq_max, n_batch
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_seq_max * seq_len, n_batch, n_batch
        p.n_seq_max, p.kv_unified = n_seq_max, True
        p.n_threads = p.n_threads_batch = threads
        p.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the batched context")
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.batch = llama_cpp.llama_batch_init(max(n_batch, n_seq_max), 0, n_seq_max)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def _sampler(self, seed: int):
        lib = self.lib
        s = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(s, lib.llama_sampler_init_top_k(SAMPLING["top_k"]))
        lib.llama_sampler_chain_add(s, lib.llama_sampler_init_top_p(SAMPLING["top_p"], 1))
        lib.llama_sampler_chain_add(s, lib.llama_sampler_init_min_p(SAMPLING["min_p"], 1))
        lib.llama_sampler_chain_add(s, lib.llama_sampler_init_temp(SAMPLING["temperature"]))
        lib.llama_sampler_chain_add(s, lib.llama_sampler_init_dist(seed))
        return s

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of [(token, position, seq_id, wants logits)]."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.lib.llama_synchronize(self.ctx)

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def prefill(self, ids: list[int]) -> float:
        """Prompt tokens/s: the prompt in llama_decode calls of n_batch tokens (one call for <= 512),
        logits for the last token only."""
        self._clear()
        t0 = time.perf_counter()
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            self._decode([(t, start + j, 0, start + j == len(ids) - 1) for j, t in enumerate(chunk)])
        return len(ids) / (time.perf_counter() - t0)

    def generate(self, prompts: list[list[int]], n_tokens: int, seed: int) -> tuple[float, int, float]:
        """`len(prompts)` sequences at once: every prompt prefilled in one batch (each its own seq_id),
        then one llama_decode per step over every live sequence, until each has `n_tokens` tokens
        or its end-of-generation token. -> (generated tokens / wall time, tokens,
        decode-only tokens/s after the first token of each sequence)."""
        lib, n = self.lib, len(prompts)
        if n > self.n_seq_max or sum(map(len, prompts)) > self.n_batch:
            raise ValueError("prompts exceed the batched context")
        samplers = [self._sampler(seed * 1000 + i) for i in range(n)]
        try:
            self._clear()
            t0 = time.perf_counter()
            entries, last = [], {}
            for s, ids in enumerate(prompts):
                for j, t in enumerate(ids):
                    entries.append((t, j, s, j == len(ids) - 1))
                last[s] = len(entries) - 1
            self._decode(entries)
            pos = {s: len(ids) for s, ids in enumerate(prompts)}
            counts = dict.fromkeys(range(n), 0)
            live, t_first = list(range(n)), None
            while live:
                nxt = []
                for s in live:
                    tok = lib.llama_sampler_sample(samplers[s], self.ctx, last[s])
                    counts[s] += 1
                    if counts[s] < n_tokens and not lib.llama_vocab_is_eog(self.vocab, tok):
                        nxt.append((tok, pos[s], s, True))
                        pos[s] += 1
                if t_first is None:
                    t_first, first_total = time.perf_counter(), sum(counts.values())
                if not nxt:
                    break
                self._decode(nxt)
                live = [e[2] for e in nxt]
                last = {s: i for i, s in enumerate(live)}
            dt = time.perf_counter() - t0
            total = sum(counts.values())
            after_first = total - first_total
            rate_after_first = after_first / (time.perf_counter() - t_first) if after_first else None
            return total / dt, total, rate_after_first
        finally:
            for s in samplers:
                lib.llama_sampler_free(s)
