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
